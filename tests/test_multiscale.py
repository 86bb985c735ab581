"""Multi-scale image features: ``hx.tl.embed_patches(scales=...)``, their provenance, ``embed_query`` and ``impute``."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

import histoexp as hx
from histoexp.cli import main

SCALES = (1, 2, 3, 5)


class Pixels(nn.Module):
    """The crop itself as features: equality of features is equality of pixels."""

    def forward(self, x):
        return x.flatten(1)


def pixels_encoder(px: int):
    return hx.models.get_encoder(
        Pixels(), weights=None, transform=lambda b: b.permute(0, 3, 1, 2).float(), dim=3 * px * px
    )


def hand_cut(adata, scale: float, px: int, encoder, **kw) -> np.ndarray:
    """Scale ``scale`` the way a user would cut it: extract_patches at ``scale`` x the side, then embed_patches."""
    rec = adata.uns["histoexp"]["patches"]
    b = adata.copy()
    hx.pp.extract_patches(b, size_um=scale * rec["size_um"], patch_px=px, store="memory", key_added="cut", **kw)
    hx.tl.embed_patches(b, encoder, patches_key="cut", key_added="X_cut")
    return b.obsm["X_cut"], b.obs["cut_outside"].to_numpy()


@pytest.fixture
def small():
    """Two small synthetic sections (image arrays in uns['spatial'], 2 µm/px, 64 µm spots)."""
    return hx.datasets.synthetic(n_sections=2, n_side=6, random_state=0)


@pytest.mark.parametrize("store", ["memory", "zarr", "none"])
def test_scales_equal_the_crops_cut_by_hand(small, store, tmp_path):
    px = 12
    kw = {"path": str(tmp_path / "p.zarr")} if store == "zarr" else {}
    hx.pp.extract_patches(small, patch_px=px, store=store, **kw)
    enc = pixels_encoder(px)
    # 7 patches a batch: rounded up to whole spots (8 = 2 spots x 4 scales); store 'none' read in a worker process
    hx.tl.embed_patches(small, enc, scales=SCALES, batch_size=7, num_workers=1 if store == "none" else 0)
    x = small.obsm["X_pixels_ms"]
    d = 3 * px * px
    assert x.shape == (small.n_obs, len(SCALES) * d)
    for j, s in enumerate(SCALES):
        ref, outside = hand_cut(small, s, px, enc)
        np.testing.assert_array_equal(x[:, j * d : (j + 1) * d], ref)  # the same pixels, not merely close
        if s == 5:  # the widest crops of edge spots reach beyond the image: white there, as extract_patches
            assert (outside > 0).any() and (x[outside > 0.1, j * d : (j + 1) * d] == 255).any()
    rec = small.uns["histoexp"]["embeddings"]["X_pixels_ms"]
    assert rec["scales"] == [1.0, 2.0, 3.0, 5.0] and rec["scale_dim"] == d and rec["dim"] == 4 * d
    assert rec["scales_um"] == pytest.approx([64.0, 128.0, 192.0, 320.0])
    assert rec["scales_mpp"] == pytest.approx([64 / px * s for s in SCALES])
    assert rec["patch_px"] == px and rec["size_um"] == pytest.approx(64.0) and rec["batch_size"] == 8


def test_scales_of_a_pyramid_read_from_several_levels_equal_extract_patches(tmp_path):
    """Scales read from different pyramid levels are each exactly extract_patches' patch at that side."""
    tifffile = pytest.importorskip("tifffile")
    a = hx.datasets.synthetic(n_sections=1, n_side=5, random_state=1)
    img = np.asarray(a.uns["spatial"]["S0"]["images"]["hires"])
    path = tmp_path / "slide.tif"
    levels = [img, img[::2, ::2].copy(), img[::4, ::4].copy(), img[::8, ::8].copy()]
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], tile=(64, 64), photometric="rgb", subifds=len(levels) - 1)
        for lv in levels[1:]:
            tw.write(lv, tile=(64, 64), photometric="rgb", subfiletype=1)
    px = 16  # 64 µm at 16 px: 4 µm/px (level 1 of a 2 µm/px slide); 5x: 20 µm/px (level 3)
    hx.pp.extract_patches(a, image=str(path), patch_px=px, store="none")
    slide = hx.image.SlideImage.open(path, mpp=2.0)
    assert {slide.best_level(s * 32 / px) for s in SCALES} == {1, 2, 3}
    enc = pixels_encoder(px)
    hx.tl.embed_patches(a, enc, scales=SCALES)
    d = 3 * px * px
    for j, s in enumerate(SCALES):
        ref, _ = hand_cut(a, s, px, enc, image=str(path))
        np.testing.assert_array_equal(a.obsm["X_pixels_ms"][:, j * d : (j + 1) * d], ref)


def test_single_scale_unchanged_and_one_scale_equals_it(small):
    hx.pp.extract_patches(small, patch_px=16, store="memory")
    hx.tl.embed_patches(small, "handcrafted")
    rec = small.uns["histoexp"]["embeddings"]["X_handcrafted"]
    assert "scales" not in rec and "scale_dim" not in rec and rec["dim"] == small.obsm["X_handcrafted"].shape[1]
    hx.tl.embed_patches(small, "handcrafted", scales=[1])
    np.testing.assert_allclose(small.obsm["X_handcrafted_ms"], small.obsm["X_handcrafted"], rtol=1e-6, atol=1e-6)
    assert small.uns["histoexp"]["embeddings"]["X_handcrafted_ms"]["scales"] == [1.0]


@pytest.mark.parametrize(
    ("scales", "match"),
    [
        ((1, 0, 2), "not positive"),
        ((-1,), "not positive"),
        ((1, float("nan")), "not positive"),
        ((1, "2"), "not a number"),
        ((1, None), "not a number"),
        ((True, 2), "not a number"),
        ("123", "one scale"),
        (3, "one scale"),
        ((1, 2, 2.0), "repeats"),
        ((), "empty"),
        ([], "empty"),
    ],
)
def test_bad_scales_are_refused(small, scales, match):
    hx.pp.extract_patches(small, patch_px=8, store="memory")
    with pytest.raises(ValueError, match=match) as err:
        hx.tl.embed_patches(small, "handcrafted", scales=scales)
    assert "`scales`" in str(err.value)
    assert not any(k.startswith("X_") for k in small.obsm)


def test_a_slide_that_cannot_be_read_again_is_an_error(small, tmp_path):
    from PIL import Image

    one = small[small.obs["library_id"] == "S0"].copy()
    img = np.asarray(one.uns["spatial"]["S0"]["images"]["hires"])
    # patches from an in-memory image: the 1x patches embed, the context cannot be read
    mem = one.copy()
    hx.pp.extract_patches(mem, image=img.copy(), patch_px=8, store="memory", library_id="S0")
    assert mem.uns["histoexp"]["patches"]["libraries"]["S0"]["reopenable"] is False
    hx.tl.embed_patches(mem, "handcrafted")
    with pytest.raises(ValueError, match="in-memory `image`"):
        hx.tl.embed_patches(mem, "handcrafted", scales=SCALES)
    # patches from a file that was removed afterwards
    path = tmp_path / "s0.png"
    Image.fromarray(img).save(path)
    gone = one.copy()
    hx.pp.extract_patches(gone, image=str(path), patch_px=8, store="memory", library_id="S0")
    assert gone.uns["histoexp"]["patches"]["libraries"]["S0"]["reopenable"] is True
    path.unlink()
    with pytest.raises(ValueError, match="cannot be read again.*s0.png"):
        hx.tl.embed_patches(gone, "handcrafted", scales=SCALES)
    assert "X_handcrafted_ms" not in gone.obsm


def test_provenance_embed_query_and_impute(small, tmp_path):
    """A ridge on multi-scale features of one section: embed_query rebuilds them for a query, impute checks them."""
    hx.pp.extract_patches(small, patch_px=16, store="memory")
    hx.tl.embed_patches(small, "handcrafted", scales=SCALES)
    lib = small.obs["library_id"].astype(str)
    train, query = small[lib == "S0"].copy(), small[lib == "S1"].copy()
    full = query.obsm.pop("X_handcrafted_ms")
    query.uns["histoexp"].pop("embeddings")
    model = hx.tl.fit_ridge(train, use_rep="X_handcrafted_ms", genes="all")
    assert model.image_spec()["scales"] == [1.0, 2.0, 3.0, 5.0]
    model.save(tmp_path / "m")
    model = hx.tl.load_model(tmp_path / "m")
    assert model.image_spec()["scales"] == [1.0, 2.0, 3.0, 5.0]

    with pytest.raises(KeyError, match=r"embed_query\(query, model\)"):
        hx.tl.impute(query, model)
    assert hx.tl.embed_query(query, model) == ["X_handcrafted_ms"]
    np.testing.assert_allclose(query.obsm["X_handcrafted_ms"], full, rtol=1e-6, atol=1e-6)
    assert query.uns["histoexp"]["embeddings"]["X_handcrafted_ms"]["scales"] == [1.0, 2.0, 3.0, 5.0]
    pred = hx.tl.impute(query, model).layers["ridge"]
    assert pred.shape == (query.n_obs, small.n_vars) and np.isfinite(pred).all()

    # the same width at other scales, and single-scale features under the model's key: refused, with the remedy
    hx.tl.embed_patches(query, "handcrafted", scales=(1, 2, 4, 5), key_added="X_handcrafted_ms", overwrite=True)
    with pytest.raises(ValueError, match=r"scales=\(1, 2, 4, 5\).*scales=\(1, 2, 3, 5\).*embed_query\(query, model"):
        hx.tl.impute(query, model)
    hx.tl.embed_patches(query, "handcrafted", key_added="X_handcrafted_ms", overwrite=True)
    with pytest.raises(ValueError, match=r"scales=\(1,\) but the model was trained on features at scales=\(1, 2"):
        hx.tl.impute(query, model)
    with pytest.raises(ValueError, match=r"scales \(1.0,\).*\(1.0, 2.0, 3.0, 5.0\).*overwrite=True"):
        hx.tl.embed_query(query, model)  # features of other scales are refused ...
    assert hx.tl.embed_query(query, model, overwrite=True) == ["X_handcrafted_ms"]  # ... or recomputed when asked
    assert hx.tl.embed_query(query, model) == []  # matching features are kept
    np.testing.assert_allclose(hx.tl.impute(query, model).layers["ridge"], pred, rtol=1e-5, atol=1e-6)

    # a single-scale model refuses multi-scale features under its key
    hx.tl.embed_patches(train, "handcrafted")
    single = hx.tl.fit_ridge(train, use_rep="X_handcrafted", genes="all", key_added="ridge1")
    assert single.image_spec()["scales"] is None
    q1 = query.copy()
    hx.tl.embed_patches(q1, "handcrafted", scales=(1,), key_added="X_handcrafted")  # (1,) is the single scale
    hx.tl.impute(q1, single)
    hx.tl.embed_patches(q1, "handcrafted", scales=(2,), key_added="X_handcrafted", overwrite=True)
    with pytest.raises(ValueError, match=r"scales=\(2,\) but the model was trained on features at scales=\(1,\)"):
        hx.tl.impute(q1, single)


def test_record_survives_write_h5ad(small, tmp_path):
    import anndata as ad

    hx.pp.extract_patches(small, patch_px=8, store="memory")
    hx.tl.embed_patches(small, "handcrafted", scales=(1, 2.5))
    path = hx.io.write_h5ad(small, tmp_path / "a.h5ad")
    back = ad.read_h5ad(path)
    rec = back.uns["histoexp"]["embeddings"]["X_handcrafted_ms"]
    np.testing.assert_allclose(np.asarray(rec["scales"], float), [1.0, 2.5])
    np.testing.assert_allclose(np.asarray(rec["scales_um"], float), [64.0, 160.0])
    assert int(rec["scale_dim"]) * 2 == int(rec["dim"]) == back.obsm["X_handcrafted_ms"].shape[1]
    assert bool(back.uns["histoexp"]["patches"]["libraries"]["S0"]["reopenable"])
    # a model trained on the reloaded object records plain JSON scales; its query check reads the h5ad record
    model = hx.tl.fit_ridge(back, use_rep="X_handcrafted_ms", genes="all")
    assert model.image_spec()["scales"] == [1.0, 2.5]
    hx.tl.impute(back, model)
    # recomputed from the reloaded object (patches in memory, slide from uns['spatial']): the same features
    hx.tl.embed_patches(back, "handcrafted", scales=(1, 2.5), key_added="X_again")
    np.testing.assert_allclose(back.obsm["X_again"], small.obsm["X_handcrafted_ms"], rtol=1e-6, atol=1e-6)


def test_impute_slide_and_cli_carry_the_scales(small, tmp_path):
    from PIL import Image

    hx.pp.extract_patches(small, patch_px=16, store="memory")
    hx.tl.embed_patches(small, "handcrafted", scales=(1, 3))
    model = hx.tl.fit_ridge(small, use_rep="X_handcrafted_ms", genes=list(small.var_names[:5]))
    png = tmp_path / "S1.png"
    Image.fromarray(np.asarray(small.uns["spatial"]["S1"]["images"]["hires"])).save(png)
    pred = hx.tl.impute_slide(png, model, mpp=2.0)
    assert pred.uns["histoexp"]["embeddings"]["X_handcrafted_ms"]["scales"] == [1.0, 3.0]
    # the tiles through the in-memory route, embedded by hand at the model's scales: the same predictions
    q = hx.pp.tile_tissue(str(png), tile_um=64.0, mpp=2.0, library_id="slide")
    hx.pp.extract_patches(q, size_um=64.0, patch_px=16, store="memory")
    hx.tl.embed_patches(q, "handcrafted", scales=(1, 3))
    np.testing.assert_allclose(pred.layers["ridge"], hx.tl.impute(q, model).layers["ridge"], rtol=1e-5, atol=1e-6)

    # the command line: fit --scales, then impute an .h5ad query at the model's scales
    files, fresh = [], hx.datasets.synthetic(n_sections=2, n_side=6, random_state=0)
    for lib in ("S0", "S1"):
        s = fresh[fresh.obs["library_id"] == lib].copy()
        s.obs["library_id"] = s.obs["library_id"].cat.remove_unused_categories()
        s.uns["spatial"] = {lib: fresh.uns["spatial"][lib]}
        files.append(tmp_path / f"{lib}.h5ad")
        s.write_h5ad(files[-1])
    out = tmp_path / "model"
    args = ["fit", str(files[0]), "-o", str(out), "--method", "ridge", "--genes", "5", "--patch-px", "16", "-q"]
    assert main([*args, "--scales", "1,0"]) == 1
    assert main([*args, "--method", "nh2st", "--scales", "1,2"]) == 1
    assert main([*args, "--scales", "1,3"]) == 0
    cli_model = hx.tl.load_model(out)
    assert cli_model.use_rep == "X_handcrafted_ms" and cli_model.image_spec()["scales"] == [1.0, 3.0]
    assert main(["impute", str(out), str(files[1]), "-o", str(tmp_path / "pred"), "--n-maps", "1", "-q"]) == 0
    import anndata as ad

    got = ad.read_h5ad(tmp_path / "pred" / "predictions.h5ad")
    assert np.asarray(got.uns["histoexp"]["embeddings"]["X_handcrafted_ms"]["scales"]).tolist() == [1.0, 3.0]
    assert np.isfinite(np.asarray(got.layers["ridge"])).all() and got.n_vars == 5


def test_real_her2st_scales_equal_hand_cut_handcrafted(her2st_c2):
    """Real C2: handcrafted features of the 1x..5x crops of 112 µm patches (at 56 px) equal the hand-cut ones."""
    a = her2st_c2[:10].copy()
    hx.pp.extract_patches(a, size_um=112.0, patch_px=56, store="none")
    hx.tl.embed_patches(a, "handcrafted", scales=SCALES)
    x = a.obsm["X_handcrafted_ms"]
    d = x.shape[1] // len(SCALES)
    for j, s in enumerate(SCALES):
        ref, _ = hand_cut(a, s, 56, "handcrafted")
        np.testing.assert_allclose(x[:, j * d : (j + 1) * d], ref, rtol=1e-5, atol=1e-5)
    # coarser scales see more of the section: the features of 1x and 5x differ for every spot
    assert (np.abs(x[:, :d] - x[:, 3 * d :]).max(axis=1) > 1e-3).all()
    mpp = a.uns["histoexp"]["embeddings"]["X_handcrafted_ms"]["scales_mpp"]
    assert mpp == pytest.approx([2.0 * s for s in SCALES])
