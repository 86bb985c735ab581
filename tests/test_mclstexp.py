"""mclSTExp: positional spot transformer, sentences, retrieval with positions, persistence, real data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

import histoexp as hx
from histoexp.models.mclstexp import MclstexpModel, grid_positions, mclstexp_loss, sentence_order, spot_positions
from histoexp.tl._mclstexp import spatial_sentences

FAST = {
    "genes": "all",
    "use_rep": "X_feat",
    "batch_size": 64,
    "epochs": 40,
    "n_heads": 2,
    "head_dim": 16,
    "n_ensemble": 1,
}


def _pcc(pred, truth):
    p, t = pred - pred.mean(0), truth - truth.mean(0)
    return np.nanmean((p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0)))


def _shuffle_positions(adata, seed=0):
    """Permute the positions (pixels and array indices alike) among the spots of each section."""
    out = adata.copy()
    rng = np.random.default_rng(seed)
    lib = out.obs["library_id"].astype(str).to_numpy()
    array = out.obs[["array_x", "array_y"]].to_numpy()
    for s in np.unique(lib):
        idx = np.flatnonzero(lib == s)
        perm = rng.permutation(idx)
        out.obsm["spatial"][idx] = out.obsm["spatial"][perm]
        array[idx] = array[perm]
    out.obs[["array_x", "array_y"]] = array
    return out


@pytest.fixture(scope="module")
def data():
    """Four synthetic sections; every 8th gene gains low counts along a left-right gradient of the section.

    The features read the image part (the hidden density/tint fields) and, noisily, the gradient (as tissue
    architecture would show it): the spot branch can read the gradient exactly from the position and only
    noisily from the low counts.
    """
    ad = hx.datasets.synthetic(n_sections=4, random_state=0)
    rng = np.random.default_rng(1)
    lib = ad.obs["library_id"].astype(str).to_numpy()
    x = ad.obsm["spatial"][:, 0].astype(float)
    xn = np.zeros(ad.n_obs)
    for s in np.unique(lib):
        m = lib == s
        xn[m] = (x[m] - x[m].min()) / np.ptp(x[m])
    counts = ad.X.toarray().astype(float)
    pos_genes = np.arange(0, ad.n_vars, 8)
    counts[:, pos_genes] += rng.poisson(np.exp(3 * (xn[:, None] - 0.5)), size=(ad.n_obs, len(pos_genes)))
    ad.X = sp.csr_matrix(counts)
    z = np.c_[ad.obs["density"], ad.obs["tint"], 2 * xn - 1]
    z = (z - z.mean(0)) / z.std(0)
    ad.obsm["X_feat"] = (z @ rng.normal(size=(3, 8)) + 0.5 * rng.normal(size=(ad.n_obs, 8))).astype(np.float32)
    train, test = ad[lib != "S3"].copy(), ad[lib == "S3"].copy()
    return train, test, pos_genes


@pytest.fixture(scope="module")
def fitted(data):
    train, _, _ = data
    train = train.copy()
    return train, hx.tl.fit_mclstexp(train, **FAST, random_state=0)


def test_grid_positions_and_sentence_order():
    rng = np.random.default_rng(0)
    ij = np.array([(i, j) for i in range(10) for j in range(12)])
    pos = ij * 137.5 + 1000 + rng.normal(0, 3, ij.shape)  # a legacy-ST-like grid in pixels, jittered
    np.testing.assert_array_equal(grid_positions(pos), ij)
    # two sections with other offsets and pitches map onto the same grid; clipping at the table size
    both = np.r_[pos, ij * 55.0 + 7]
    np.testing.assert_array_equal(grid_positions(both, np.repeat(["a", "b"], len(ij))), np.r_[ij, ij])
    assert grid_positions(pos, size=8).max() == 7
    order = sentence_order(ij, None, "spatial")
    first = ij[order[:16]]  # a Z-order chunk of 16 is a 4 x 4 block
    assert np.ptp(first[:, 0]) == 3 and np.ptp(first[:, 1]) == 3
    assert sorted(sentence_order(ij, None, "batch")) == list(range(len(ij)))


def test_grid_positions_visium_hexagonal_and_array_columns():
    """On Visium's hexagonal grid every spot keeps its own cell; pixels and array indices give the same grid."""
    rng = np.random.default_rng(0)
    rc = np.array([(r, c) for r in range(30) for c in range(0, 60) if c % 2 == r % 2])  # array_row, array_col
    pitch = 100 / 0.2645  # 100 µm spot spacing at 0.2645 µm/px
    pix = np.c_[rc[:, 1] * pitch / 2, rc[:, 0] * pitch * np.sqrt(3) / 2] + 800 + rng.normal(0, 2, rc.shape)
    grid = grid_positions(pix)
    assert len({tuple(g) for g in grid}) == len(rc)  # no two spots share a cell
    np.testing.assert_array_equal(grid, rc[:, ::-1] - rc[:, ::-1].min(0))
    np.testing.assert_array_equal(grid_positions(rc[:, ::-1].astype(float)), grid)
    ad = AnnData(np.zeros((len(rc), 1)), obs=pd.DataFrame({"array_row": rc[:, 0], "array_col": rc[:, 1]}))
    ad.obsm["spatial"] = pix
    pos, source = spot_positions(ad)
    assert source == "array"
    np.testing.assert_array_equal(pos, rc[:, ::-1])
    assert spot_positions(ad, positions="pixels")[1] == "pixels"
    ad.obs.loc[ad.obs.index[0], "array_row"] = np.nan
    with pytest.raises(ValueError, match="missing"):
        spot_positions(ad)


def test_loss_identity_targets_and_weighting():
    torch.manual_seed(0)
    img, spot = torch.randn(6, 4), torch.randn(6, 4)
    logits, target = spot @ img.T, torch.arange(6)
    l_spot = torch.nn.functional.cross_entropy(logits, target)
    l_img = torch.nn.functional.cross_entropy(logits.T, target)
    assert torch.isclose(mclstexp_loss(img, spot, 0.5), (l_img + l_spot) / 2)
    assert torch.isclose(mclstexp_loss(img, spot, 1.0), l_img)


def test_spatial_sentences_are_local_and_seeded():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 100, (300, 2))
    sections = np.repeat(["a", "b", "c"], 100)
    sampler = spatial_sentences(coords, sections, 20)
    batches = sampler(torch.Generator().manual_seed(3), 0)
    assert len(batches) == 15 and all(len(b) == 20 for b in batches)
    for b in batches:
        assert len(set(sections[b])) == 1  # one section per sentence
        same = np.flatnonzero(sections == sections[b[0]])
        d = np.linalg.norm(coords - coords[b[0]], axis=1)
        rest = np.setdiff1d(same, b)
        assert d[b].max() <= d[rest].min()  # the seed's 20 nearest spots of its section
    again = sampler(torch.Generator().manual_seed(3), 0)
    assert again == batches
    assert sampler(torch.Generator().manual_seed(4), 0) != batches


def test_learns_and_uses_positions(data, fitted):
    train, test, pos_genes = data
    fit_data, model = fitted
    assert isinstance(model, MclstexpModel) and model.retrieval_defaults == {"k": 200, "method": "inverse_distance"}
    assert model.config["sentence"] == "batch" and model.reference is not None
    pred = hx.tl.impute(test, model, k=30)
    truth = pred.layers["measured"]
    r = _pcc(pred.layers["mclstexp"], truth)
    assert r > 0.6, r  # the training mean predicts nothing (PCC undefined / 0)
    # the same reference with positions permuted within each section (and the query's, which the model
    # never reads): the spot branch is fed wrong positions and the gradient genes suffer
    ctrl = hx.tl.impute(_shuffle_positions(test), model, reference=_shuffle_positions(train), k=30)
    same = hx.tl.impute(test, model, reference=train, k=30)
    np.testing.assert_allclose(same.layers["mclstexp"], pred.layers["mclstexp"], rtol=1e-5, atol=1e-6)
    g = pos_genes
    r_pos = _pcc(pred.layers["mclstexp"][:, g], truth[:, g])
    r_ctrl = _pcc(ctrl.layers["mclstexp"][:, g], truth[:, g])
    assert r_pos - r_ctrl > 0.01, (r_pos, r_ctrl)
    assert set(fit_data.uns["mclstexp"]["params"]) >= {"sentence", "n_layers", "image_weight", "grid_size"}
    assert fit_data.obsm["X_mclstexp_expression"].shape == (train.n_obs, 256)
    print(f"synthetic PCC all genes {r:.3f}; gradient genes {r_pos:.3f} vs shuffled positions {r_ctrl:.3f}")


def test_count_only_reference(data, fitted):
    """A reference without image or pixel positions (counts + array grid) serves the spot branch as well."""
    train, test, _ = data
    _, model = fitted
    assert model.config["positions"] == "array"
    counts_only = AnnData(train.X.copy(), obs=train.obs[["library_id", "array_x", "array_y"]].copy(), var=train.var)
    a = hx.tl.impute(test, model, reference=counts_only, k=30).layers["mclstexp"]
    np.testing.assert_allclose(a, hx.tl.impute(test, model, reference=train, k=30).layers["mclstexp"], atol=1e-6)
    bare = AnnData(train.X.copy(), obs=train.obs[["library_id"]].copy(), var=train.var)
    with pytest.raises(KeyError, match="positions"):
        hx.tl.impute(test, model, reference=bare)


def test_save_load_impute_identical(data, fitted, tmp_path):
    _, test, _ = data
    _, model = fitted
    model.save(tmp_path / "m")
    loaded = hx.tl.load_model(tmp_path / "m")
    assert isinstance(loaded, MclstexpModel) and loaded.config["sentence"] == model.config["sentence"]
    a = hx.tl.impute(test, model).layers["mclstexp"]
    np.testing.assert_array_equal(hx.tl.impute(test, loaded).layers["mclstexp"], a)


def test_same_seed_same_model_and_spatial_sentences(data, fitted):
    train, test, _ = data
    _, model = fitted
    again = hx.tl.fit_mclstexp(train.copy(), **FAST, random_state=0)
    for (k, v), w in zip(model.net.state_dict().items(), again.net.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    spatial = hx.tl.fit_mclstexp(train.copy(), **{**FAST, "epochs": 15}, sentence="spatial", random_state=0)
    assert spatial.config["sentence"] == "spatial"
    assert np.isfinite(spatial.config["history"]["train_loss"]).all()
    pred = hx.tl.impute(test, spatial, k=30)
    assert _pcc(pred.layers["mclstexp"], pred.layers["measured"]) > 0.5
    with pytest.raises(ValueError, match="sentence"):
        hx.tl.fit_mclstexp(train.copy(), **FAST, sentence="window")
    no_pos = train.copy()
    del no_pos.obsm["spatial"]
    no_pos.obs = no_pos.obs.drop(columns=["array_x", "array_y"])
    with pytest.raises(KeyError, match="positions"):
        hx.tl.fit_mclstexp(no_pos, **FAST)
    with pytest.raises(ValueError, match="positions"):
        hx.tl.fit_mclstexp(train.copy(), **FAST, positions="grid")


def test_real_her2st_smoke(her2st_dir):
    """C3 -> C2 on handcrafted features: trains, predicts through impute, scores through evaluate."""
    ad = hx.datasets.her2st(["C2", "C3"], data_dir=her2st_dir)
    hx.pp.extract_patches(ad, size_um=112, patch_px=64)
    hx.tl.embed_patches(ad, encoder="handcrafted")
    lib = ad.obs["library_id"].astype(str).to_numpy()
    train, test = ad[lib == "C3"].copy(), ad[lib == "C2"].copy()
    model = hx.tl.fit_mclstexp(train, genes=50, use_rep="X_handcrafted", epochs=5, n_heads=2, head_dim=16)
    g = grid_positions(train.obsm["spatial"])
    assert 20 <= g.max() <= 40  # legacy ST arrays are about 33 x 35 spots
    pred = hx.tl.impute(test, model)
    hx.tl.evaluate(pred, layer="mclstexp")
    metrics = pred.uns["mclstexp"]["metrics"]
    assert np.isfinite(metrics["pcc_mean"]) and metrics["pcc_mean"] > 0, metrics


def test_n_pcs_reduces_wide_frozen_features(tmp_path):
    ad = hx.datasets.synthetic(n_sections=2, random_state=0)
    rng = np.random.default_rng(0)
    ad.obsm["X_wide"] = np.c_[hx.pp.expression_matrix(ad)[:, :4], rng.normal(size=(ad.n_obs, 40))].astype(np.float32)
    model = hx.tl.fit_mclstexp(ad, genes="all", use_rep="X_wide", n_pcs=6, epochs=2, batch_size=32)
    assert model.net.image_projection.projection.in_features == 6 and model.config["n_pcs"] == 6
    assert ad.uns["mclstexp"]["params"]["n_pcs"] == 6
    model.save(tmp_path / "m")
    loaded = hx.tl.load_model(tmp_path / "m")
    again = hx.tl.impute(ad, loaded).layers["mclstexp"]
    np.testing.assert_array_equal(again, hx.tl.impute(ad, model).layers["mclstexp"])
    with pytest.raises(ValueError, match="n_pcs"):
        hx.tl.fit_mclstexp(ad, genes="all", use_rep="X_wide", n_pcs=0, overwrite=True)
