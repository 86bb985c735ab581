"""NH2ST (hx.tl.fit_nh2st, hx.tl.embed_neighbourhood): learning from the neighbourhood, persistence, seeds, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import histoexp as hx

SPACING = 12  # px between spot centres (= window side: one spot per window)


def fit(adata, **kwargs):
    """``fit_nh2st`` with one member unless asked (the default ensemble of five is five times slower)."""
    return hx.tl.fit_nh2st(adata, **{"n_ensemble": 1, **kwargs})


class MeanColour:
    """A tiny frozen encoder: the mean RGB of a patch (built lazily so that torch loads inside the tests)."""

    @staticmethod
    def make():
        from torch import nn

        class _Mean(nn.Module):
            def forward(self, x):
                return x.mean(dim=(2, 3))

        return _Mean()


def neighbourhood_sections(n_sections=4, n_side=10, n_genes=12, seed=0) -> AnnData:
    """Sections whose spots' expression follows the colour of the *neighbouring* spots, not their own.

    Each spot owns a square of the image filled with a random mix of eosin and haematoxylin (independent
    between spots). Gene rates: ``exp(a + b * ring + c * own)`` with ``ring`` the mean mix of the 8 surrounding
    spots and ``|c|`` small: a model of the spot's own patch can barely predict it, one that sees the 3x3
    surroundings can.
    """
    rng = np.random.default_rng(seed)
    b = rng.choice([-1.0, 1.0], n_genes) * rng.uniform(0.6, 1.0, n_genes)
    c = rng.normal(0, 0.15, n_genes)
    a = rng.uniform(1.0, 2.5, n_genes)
    size = SPACING * (n_side + 2)
    obs, spatial, counts, uns = [], [], [], {}
    eosin, haem = np.array([236, 170, 200.0]), np.array([70, 40, 130.0])
    for s in range(n_sections):
        lib = f"S{s}"
        mix = rng.uniform(0, 1, (n_side + 2, n_side + 2))  # one value per grid cell, the border too
        img = (1 - mix[..., None]) * eosin + mix[..., None] * haem  # (cells, cells, 3)
        img = np.repeat(np.repeat(img, SPACING, 0), SPACING, 1)
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        uns[lib] = {
            "images": {"hires": img},
            "scalefactors": {
                "tissue_hires_scalef": 1.0,
                "spot_diameter_fullres": float(SPACING),
                "microns_per_pixel": 1.0,
            },
            "metadata": {"source_image_path": "", "microns_per_pixel": 1.0},
        }
        for i in range(1, n_side + 1):
            for j in range(1, n_side + 1):
                ring = (mix[i - 1 : i + 2, j - 1 : j + 2].sum() - mix[i, j]) / 8
                own = mix[i, j]
                z_ring, z_own = (ring - 0.5) / 0.1, (own - 0.5) / 0.29
                counts.append(rng.poisson(np.exp(a + b * z_ring * 0.5 + c * z_own)))
                spatial.append(((j + 0.5) * SPACING, (i + 0.5) * SPACING))
                obs.append({"library_id": lib, "ring": ring, "own": own, "name": f"{lib}_{i}x{j}"})
    obs = pd.DataFrame(obs).set_index("name")
    obs["library_id"] = pd.Categorical(obs["library_id"])
    ad = AnnData(
        X=sp.csr_matrix(np.asarray(counts, dtype=np.float32)),
        obs=obs,
        var=pd.DataFrame(index=[f"g{k}" for k in range(n_genes)]),
    )
    ad.obsm["spatial"] = np.asarray(spatial, dtype=float)
    ad.uns["spatial"] = uns
    assert size == uns["S0"]["images"]["hires"].shape[0]
    return ad


def embed(ad: AnnData, grid: int = 3) -> None:
    hx.pp.extract_patches(ad, size_um=SPACING, patch_px=SPACING)
    enc = MeanColour.make()
    hx.tl.embed_patches(ad, enc, weights=None, key_added="X_mean")
    hx.tl.embed_neighbourhood(ad, enc, weights=None, grid=grid, key_added="X_mean_grid")


@pytest.fixture(scope="module")
def nbhd():
    ad = neighbourhood_sections()
    embed(ad)
    return ad


def _split(ad, test="S3"):
    te = (ad.obs["library_id"] == test).to_numpy()
    return ad[~te].copy(), ad[te].copy()


FAST = {"epochs": 150, "patience": 20, "lr": 3e-3, "dim": 32, "heads": 2, "batch_size": 64}


def test_embed_neighbourhood_layout(nbhd):
    d = nbhd.obsm["X_mean"].shape[1]
    win = nbhd.obsm["X_mean_grid"]
    assert win.shape == (nbhd.n_obs, 9 * d)
    np.testing.assert_allclose(win[:, 4 * d : 5 * d], nbhd.obsm["X_mean"], atol=1e-5)  # centre window = own patch
    # the window right of a spot (row 1, col 2) is its right-hand neighbour's own patch
    pos = {
        tuple(np.round(c).astype(int)): i for i, c in enumerate(nbhd.obsm["spatial"][nbhd.obs["library_id"] == "S0"])
    }
    (x, y), i = next(iter(pos.items()))
    j = pos.get((x + SPACING, y))
    assert j is not None
    np.testing.assert_allclose(win[i, 5 * d : 6 * d], nbhd.obsm["X_mean"][j], atol=1e-5)
    rec = nbhd.uns["histoexp"]["embeddings"]["X_mean_grid"]
    assert rec["grid"] == 3 and rec["window_dim"] == d and rec["window_px_fullres"]["S0"] == pytest.approx(SPACING)


def test_grid_neighbours_finds_the_surrounding_spots():
    from histoexp.tl._nh2st import grid_neighbours

    # legacy ST: 200 µm pitch, 112 µm windows (at 1 µm/px): a 5x5 grid holds the 3x3 spots in its cells 0, 2, 4
    xy = np.array([(x, y) for y in range(0, 1000, 200) for x in range(0, 1000, 200)], dtype=float)
    nb = grid_neighbours(xy, np.full(len(xy), "A"), {"A": 112.0}, 5)
    centre = 12  # spot (400, 400)
    grid = nb[centre].reshape(5, 5)
    assert grid[2, 2] == centre and grid[2, 4] == 13 and grid[0, 0] == 6 and grid[4, 2] == 17
    assert (grid[[1, 3]] == -1).all() and (grid[:, [1, 3]] == -1).all()
    assert (nb[0].reshape(5, 5)[:2] == -1).all()  # corner spot: nothing above it
    # Visium: 100 µm hexagonal pitch, 55 µm windows: an interior spot sees itself and its 6 hexagonal neighbours
    hexa = np.array([(x * 100 + (y % 2) * 50, y * 86.6) for y in range(5) for x in range(5)], dtype=float)
    nb = grid_neighbours(hexa, np.full(len(hexa), "V"), {"V": 55.0}, 5)
    assert (nb[12] >= 0).sum() == 7 and nb[12, 12] == 12
    assert set(nb[12][nb[12] >= 0]) == {12, 11, 13, 6, 7, 16, 17}


def test_nh2st_learns_from_the_neighbourhood(nbhd):
    """Expression set by the neighbours: the neighbour branch lifts the held-out PCC by a clear margin."""
    train, query = _split(nbhd)
    scores = {}
    for label, kw in (("nh2st", {}), ("no_neighbours", {"neighbours": False})):
        model = fit(train, genes="all", use_rep="X_mean", overwrite=True, **FAST, **kw)
        pred = hx.tl.impute(query, model)
        hx.tl.evaluate(pred, layer="nh2st")
        scores[label] = pred.uns["nh2st"]["metrics"]["pcc_mean"]
    print(scores)
    assert scores["nh2st"] > 0.5, scores
    assert scores["nh2st"] > scores["no_neighbours"] + 0.3, scores


def test_ablation_switches_change_the_network(nbhd):
    train, _ = _split(nbhd)
    m = fit(train, genes="all", use_rep="X_mean", contrastive=False, cross_attention=False, epochs=2)
    assert not hasattr(m.net, "cross") and m.config["contrastive"] is False
    assert list(m.config["extra_reps"]) == ["X_mean_grid"] and m.config["feature_dim"] == 10 * m.config["window_dim"]
    m = fit(train, genes="all", use_rep="X_mean", neighbours=False, epochs=2, overwrite=True)
    assert not hasattr(m.net, "image_graph") and "extra_reps" not in m.config
    assert train.uns["nh2st"]["params"]["neighbours"] is False


def test_save_load_predict_identical_and_seeds(nbhd, tmp_path):
    train, query = _split(nbhd)
    kw = {"genes": "all", "use_rep": "X_mean", "epochs": 3, "dim": 16, "heads": 2, "random_state": 3, "overwrite": True}
    kw["n_ensemble"] = 2
    a = fit(train, **kw)
    b = fit(train.copy(), **kw)
    for na, nb in zip(a.nets, b.nets, strict=True):
        for (ka, va), (kb, vb) in zip(na.state_dict().items(), nb.state_dict().items(), strict=True):
            assert ka == kb and np.array_equal(va.numpy(), vb.numpy()), ka
    c = fit(train.copy(), **{**kw, "random_state": 4})
    assert not np.array_equal(a.net.decoder[1].weight.detach().numpy(), c.net.decoder[1].weight.detach().numpy())
    a.save(tmp_path / "m")
    loaded = hx.tl.load_model(tmp_path / "m")
    assert type(loaded).__name__ == "NH2STModel" and loaded.config["grid"] == 3 and loaded.n_ensemble == 2
    p1, p2 = hx.tl.impute(query, a), hx.tl.impute(query, loaded)
    np.testing.assert_array_equal(p1.layers["nh2st"], p2.layers["nh2st"])
    assert np.isfinite(p1.layers["nh2st"]).all() and p1.layers["nh2st"].shape == (query.n_obs, nbhd.n_vars)


def test_he_only_query_from_tiles(nbhd):
    """Tiles of an image (no expression): spot and neighbourhood features, then a prediction."""
    train, _ = _split(nbhd)
    model = fit(train, genes="all", use_rep="X_mean", epochs=2, dim=16, heads=2)
    img = nbhd.uns["spatial"]["S3"]["images"]["hires"]
    tiles = hx.pp.tile_tissue(img, tile_um=SPACING, mpp=1.0, min_tissue=0.0)
    embed(tiles)
    assert "X" not in tiles.layers and tiles.n_vars == 0
    pred = hx.tl.impute(tiles, model)
    assert pred.layers["nh2st"].shape == (tiles.n_obs, nbhd.n_vars)
    assert np.isfinite(pred.layers["nh2st"]).all() and "measured" not in pred.layers


def test_errors(nbhd):
    train, query = _split(nbhd)
    with pytest.raises(KeyError, match="embed_neighbourhood"):
        fit(train, genes="all", use_rep="X_mean", context_rep="X_missing")
    bad = train.copy()
    bad.obsm["X_mean_grid"] = bad.obsm["X_mean_grid"][:, :-1]
    with pytest.raises(ValueError, match="X_mean_grid"):
        fit(bad, genes="all", use_rep="X_mean")
    with pytest.raises(ValueError, match="`grid=5` differs"):
        fit(train, genes="all", use_rep="X_mean", grid=5)
    with pytest.raises(ValueError, match="`dim`"):
        fit(train, genes="all", use_rep="X_mean", dim=30, heads=4)
    with pytest.raises(TypeError, match="`neighbours`"):
        fit(train, genes="all", use_rep="X_mean", neighbours="yes")
    with pytest.raises(ValueError, match="`grid`"):
        hx.tl.embed_neighbourhood(train, MeanColour.make(), weights=None, grid=4, key_added="X_g4")
    with pytest.raises(KeyError, match="patches_key"):
        hx.tl.embed_neighbourhood(train, MeanColour.make(), weights=None, patches_key="nope", key_added="X_g")
    model = fit(train, genes="all", use_rep="X_mean", epochs=1, dim=16, heads=2)
    q = query.copy()
    del q.obsm["X_mean_grid"]
    with pytest.raises(KeyError, match="embed_neighbourhood"):
        hx.tl.impute(q, model)
    q = query.copy()
    q.uns["histoexp"]["embeddings"]["X_mean_grid"]["grid"] = 5
    with pytest.raises(ValueError, match="grid"):
        hx.tl.impute(q, model)
    with pytest.raises(ValueError, match="regression model"):
        hx.tl.impute(query, model, k=5)


def test_her2st_smoke(her2st_c2):
    """Real legacy ST (200 µm pitch, 112 µm windows): a spot's 5 x 5 windows hold its 3 x 3 nearest spots."""
    ad = her2st_c2.copy()
    hx.pp.extract_patches(ad, size_um=112, patch_px=8)
    enc = MeanColour.make()
    hx.tl.embed_patches(ad, enc, weights=None, key_added="X_mean")
    hx.tl.embed_neighbourhood(ad, enc, weights=None, grid=5, key_added="X_mean_grid")
    genes = list(ad.var_names[np.argsort(-np.asarray(ad.X.sum(0)).ravel())[:20]])
    model = fit(ad, genes=genes, use_rep="X_mean", epochs=2, dim=16, heads=2)
    n_nb = ad.uns["nh2st"]["params"]["mean_neighbour_spots"]
    assert 6 < n_nb <= 9  # interior spots have 9 (themselves and 8 around), edge spots fewer
    pred = hx.tl.impute(ad, model)
    assert pred.layers["nh2st"].shape == (ad.n_obs, 20) and np.isfinite(pred.layers["nh2st"]).all()


def test_cut_windows_matches_embed_neighbourhood_layout(nbhd):
    """The context patch cut in the net gives the windows embed_neighbourhood embeds, in the same order."""
    import torch

    from histoexp.models.nh2st import cut_windows
    from histoexp.tl._embed import _context_source, _GridWindows

    ctx, rec, _, _ = _context_source(nbhd, "patches", 3)
    idx = np.array([0, 7, 42])
    cut = cut_windows(torch.from_numpy(np.asarray(ctx.batch(idx))), 3).numpy()
    ref = _GridWindows(ctx, 3, int(rec["patch_px"])).batch((idx[:, None] * 9 + np.arange(9)).ravel())
    np.testing.assert_array_equal(cut.reshape(ref.shape), ref)
    # the centre window is the spot's own patch
    np.testing.assert_array_equal(cut[:, 4], np.asarray(hx.pp.get_patches(nbhd).batch(idx)))
    with pytest.raises(ValueError, match="divisible"):
        cut_windows(torch.zeros(1, 10, 10, 3), 3)


FINETUNE = {
    "genes": "all",
    "finetune_encoder": True,
    "encoder": "resnet18",
    "weights": None,
    "encoder_kwargs": {"transform": {"input_size": 16}},
    "grid": 3,
    "epochs": 2,
    "batch_size": 32,
    "dim": 16,
    "heads": 2,
}


def test_finetune_end_to_end_on_cpu(nbhd, tmp_path):
    """End to end: context patches cut into windows, one encoder for spot and windows; save/load/resume/tiles."""
    import torch

    train, query = _split(nbhd)
    model = fit(train, checkpoint_dir=tmp_path / "ck", **FINETUNE)
    assert model.mode == "finetune" and model.config["history"]["epochs_run"] == 2
    assert model.config["patches"]["context_px"] == 3 * SPACING and model.config["window_dim"] == 512
    assert train.uns["nh2st"]["params"]["mode"] == "finetune" and "extra_reps" not in model.config
    pred = hx.tl.impute(query, model)
    assert pred.layers["nh2st"].shape == (query.n_obs, nbhd.n_vars) and np.isfinite(pred.layers["nh2st"]).all()
    model.save(tmp_path / "m")
    loaded = hx.tl.load_model(tmp_path / "m")
    np.testing.assert_array_equal(pred.layers["nh2st"], hx.tl.impute(query, loaded).layers["nh2st"])
    # an interrupted run resumed from its checkpoint gives the uninterrupted model
    part = train.copy()
    fit(part, checkpoint_dir=tmp_path / "ck2", overwrite=True, **{**FINETUNE, "epochs": 1})
    res = fit(part, checkpoint_dir=tmp_path / "ck2", resume=True, overwrite=True, **FINETUNE)
    sa, sr = model.net.state_dict(), res.net.state_dict()
    assert all(torch.equal(sa[k], sr[k]) for k in sa)
    # H&E-only tiles: the context comes from the image around each tile
    img = nbhd.uns["spatial"]["S3"]["images"]["hires"]
    tiles = hx.pp.tile_tissue(img, tile_um=SPACING, mpp=1.0, min_tissue=0.0)
    hx.pp.extract_patches(tiles, size_um=SPACING, patch_px=SPACING)
    out = hx.tl.impute(tiles, loaded)
    assert out.layers["nh2st"].shape == (tiles.n_obs, nbhd.n_vars) and np.isfinite(out.layers["nh2st"]).all()
    # without the neighbour branch the spot patches themselves are read
    m = fit(train, overwrite=True, neighbours=False, **{**FINETUNE, "epochs": 1})
    assert np.isfinite(hx.tl.impute(query, m).layers["nh2st"]).all()
    with pytest.raises(ValueError, match="`grid`"):
        fit(train, overwrite=True, **{**FINETUNE, "grid": 4})
    with pytest.raises(ValueError, match="n_pcs"):
        fit(train, overwrite=True, n_pcs=4, **FINETUNE)


def test_embed_query_computes_what_the_model_reads(nbhd):
    """A query with patches only gets the spot and window features of the model's records, then predicts."""
    ad = nbhd[nbhd.obs["library_id"].isin(["S2", "S3"]).to_numpy()].copy()
    hx.tl.embed_patches(ad, "handcrafted", key_added="X_hc")
    hx.tl.embed_neighbourhood(ad, "handcrafted", grid=3, key_added="X_hc_grid")
    train, query = _split(ad)
    model = fit(train, genes="all", use_rep="X_hc", epochs=2, dim=16, heads=2)
    want = hx.tl.impute(query, model).layers["nh2st"]
    bare = query.copy()
    for key in ("X_hc", "X_hc_grid"):
        del bare.obsm[key]
        bare.uns["histoexp"]["embeddings"].pop(key)
    assert hx.tl.embed_query(bare, model) == ["X_hc", "X_hc_grid"]
    assert hx.tl.embed_query(bare, model) == []  # present: kept
    np.testing.assert_allclose(hx.tl.impute(bare, model).layers["nh2st"], want, rtol=1e-5, atol=1e-6)


def test_smooth_targets_rings():
    """Square grid: a spot and its 8 neighbours; hexagonal grid: 6; never across sections."""
    from histoexp.tl._nh2st import smooth_targets

    xy = np.array([(x, y) for y in range(5) for x in range(5)], dtype=float) * 200.0
    expr = np.arange(25, dtype=np.float64)[:, None] * np.array([[1.0, 2.0]])
    out = smooth_targets(expr, xy, np.zeros(25, dtype=str))
    centre = 12  # neighbours 6,7,8,11,13,16,17,18: the mean is the centre's value on a linear ramp
    np.testing.assert_allclose(out[centre], expr[centre])
    np.testing.assert_allclose(out[0], expr[[0, 1, 5, 6]].mean(0))  # corner
    hexa = np.array([(x + 0.5 * (y % 2), y * np.sqrt(3) / 2) for y in range(5) for x in range(5)]) * 100.0
    one = np.zeros((25, 1))
    one[12] = 7.0
    got = smooth_targets(one, hexa, np.zeros(25, dtype=str))
    assert np.isclose(got[12, 0], 1.0) and (got[:, 0] > 0).sum() == 7  # itself + 6 around, weight 1/7 each
    two = smooth_targets(expr[:4], np.vstack([xy[:2], xy[:2]]), np.array(["a", "a", "b", "b"]))
    np.testing.assert_allclose(two[:, 0], [0.5, 0.5, 2.5, 2.5])  # sections apart even at the same positions
    with pytest.raises(ValueError, match="rows"):
        smooth_targets(expr, xy[:3], np.zeros(3, dtype=str))
