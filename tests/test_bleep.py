"""Tests of BLEEP: loss, fit_bleep, impute, save/load, retrieval chunking, errors, real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import histoexp as hx
from histoexp.models.bleep import BleepModel, ProjectionHead, bleep_loss
from histoexp.tl._retrieval import retrieve


def _crop_features(adata, r=16):
    """Simple image features from each spot's crop: mean/std RGB and the fraction of dark (nuclei) pixels."""
    out = []
    for lib, (x, y) in zip(adata.obs["library_id"], adata.obsm["spatial"], strict=True):
        img = adata.uns["spatial"][lib]["images"]["hires"]
        c = img[int(y) - r : int(y) + r, int(x) - r : int(x) + r].reshape(-1, 3).astype(float)
        out.append(np.r_[c.mean(0), c.std(0), (c.mean(1) < 120).mean()])
    return np.asarray(out, dtype=np.float32)


def _pcc(P, T):
    P = P - P.mean(0)
    T = T - T.mean(0)
    return (P * T).sum(0) / np.sqrt((P * P).sum(0) * (T * T).sum(0))


@pytest.fixture(scope="module")
def synth3():
    ad = hx.datasets.synthetic(n_sections=3, random_state=0)
    ad.obsm["X_fake"] = _crop_features(ad)
    return ad


@pytest.fixture(scope="module")
def fitted(synth3):
    train = synth3[synth3.obs["library_id"] != "S2"].copy()
    model = hx.tl.fit_bleep(train, genes="all", use_rep="X_fake", epochs=40, batch_size=64, random_state=0)
    return train, model


def test_bleep_loss_matches_reference_formula():
    g = torch.Generator().manual_seed(0)
    img, spot = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    t = 0.7
    logits = (spot @ img.T / t).numpy().astype(np.float64)
    sim = ((img @ img.T + spot @ spot.T) / 2 * t).numpy().astype(np.float64)
    targets = np.exp(sim - sim.max(1, keepdims=True))
    targets /= targets.sum(1, keepdims=True)

    def ce(lg, tg):
        ls = lg - lg.max(1, keepdims=True)
        ls = ls - np.log(np.exp(ls).sum(1, keepdims=True))
        return -(tg * ls).sum(1)

    expected = ((ce(logits, targets) + ce(logits.T, targets.T)) / 2).mean()
    assert float(bleep_loss(img, spot, t)) == pytest.approx(expected, rel=1e-5)
    # soft targets, not the identity: the identity-target CLIP loss differs
    clip = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.arange(5))
    assert abs(float(clip) - expected) > 1e-3


def test_projection_head_is_bleeps():
    head = ProjectionHead(10, 8, dropout=0.0)
    x = torch.randn(3, 10)
    p = head.projection(x)
    manual = head.layer_norm(head.fc(torch.nn.functional.gelu(p)) + p)
    assert torch.allclose(head(x), manual)
    assert isinstance(head.layer_norm, torch.nn.LayerNorm) and head.layer_norm.normalized_shape == (8,)


def test_bleep_learns_on_synthetic(synth3, fitted):
    train, model = fitted
    test = synth3[synth3.obs["library_id"] == "S2"].copy()
    out = hx.tl.impute(test, model)
    truth = hx.pp.expression_matrix(test)
    pcc = np.nanmean(_pcc(out.layers["bleep"], truth))
    # the mean-expression baseline has no correlation (constant prediction, Pearson 0 by convention)
    assert pcc > 0.45, pcc
    # shuffled-image control: the same model with features of other spots predicts nothing
    shuffled = test.copy()
    shuffled.obsm["X_fake"] = test.obsm["X_fake"][np.random.default_rng(0).permutation(test.n_obs)]
    ctrl = np.nanmean(_pcc(hx.tl.impute(shuffled, model).layers["bleep"], truth))
    assert pcc - ctrl > 0.35, (pcc, ctrl)
    # keys written on the training data
    # frozen default: an ensemble of 5; obsm holds the members' joined (L2-normalised) embeddings
    assert model.n_ensemble == 5 and len(model.config["history"]["members"]) == 5
    assert train.obsm["X_bleep_image"].shape == (train.n_obs, 5 * 256)
    assert train.obsm["X_bleep_expression"].shape == (train.n_obs, 5 * 256)
    np.testing.assert_allclose(np.linalg.norm(train.obsm["X_bleep_image"], axis=1), 1.0, rtol=1e-5)
    assert train.uns["bleep"]["genes"] == list(train.var_names)
    assert len(train.uns["bleep"]["history"]["train_loss"]) == model.config["history"]["epochs_run"]
    assert train.uns["bleep"]["params"]["val_libraries"] in (["S0"], ["S1"])
    assert ((out.obs["bleep_confidence"] <= 1) & (out.obs["bleep_confidence"] >= -1)).all()


def test_same_seed_same_model(synth3):
    train = synth3[synth3.obs["library_id"] != "S2"].copy()
    kw = {"genes": "all", "use_rep": "X_fake", "epochs": 2, "batch_size": 64}
    m1 = hx.tl.fit_bleep(train.copy(), random_state=1, **kw)
    m2 = hx.tl.fit_bleep(train.copy(), random_state=1, **kw)
    m3 = hx.tl.fit_bleep(train.copy(), random_state=2, **kw)
    s1, s2, s3 = m1.net.state_dict(), m2.net.state_dict(), m3.net.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert m1.config["history"] == m2.config["history"]
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_save_load_impute_identical(tmp_path, synth3, fitted):
    _, model = fitted
    test = synth3[synth3.obs["library_id"] == "S2"].copy()
    model.save(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == [".histoexp.json", "arrays.safetensors", "config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["method"] == "bleep" and cfg["mode"] == "frozen" and cfg["use_rep"] == "X_fake"
    assert {"histoexp", "torch"} <= set(cfg["versions"])
    loaded = hx.tl.load_model(tmp_path / "m")
    assert isinstance(loaded, BleepModel) and loaded.genes == model.genes and loaded.kind == "retrieval"
    a = hx.tl.impute(test, model)
    b = hx.tl.impute(test, loaded)
    c = hx.tl.impute(test, str(tmp_path / "m"))
    assert np.array_equal(a.layers["bleep"], b.layers["bleep"])
    assert np.array_equal(a.layers["bleep"], c.layers["bleep"])
    assert np.array_equal(a.obs["bleep_confidence"], b.obs["bleep_confidence"])
    with pytest.raises(FileNotFoundError, match="not a histoexp model"):
        hx.tl.load_model(tmp_path)


def test_impute_with_faiss_index(synth3, fitted):
    pytest.importorskip("faiss")
    train, model = fitted
    test = synth3[synth3.obs["library_id"] == "S2"].copy()
    exact = hx.tl.impute(test, model, reference=train, k=10)
    approx = hx.tl.impute(test, model, reference=train, k=10, index="faiss-ivf", index_params={"nprobe": 1000})
    np.testing.assert_allclose(approx.layers["bleep"], exact.layers["bleep"], rtol=1e-4, atol=1e-5)
    params = approx.uns["bleep"]["params"]
    assert params["index"] == "faiss-ivf" and params["index_params"]["nprobe"] == params["index_params"]["nlist"]
    assert exact.uns["bleep"]["params"]["index"] == "exact" and "index_params" not in exact.uns["bleep"]["params"]
    hnsw = hx.tl.impute(test, model, reference=train, k=10, index="faiss-hnsw")
    assert np.corrcoef(hnsw.layers["bleep"].ravel(), exact.layers["bleep"].ravel())[0, 1] > 0.99
    with pytest.raises(ValueError, match="`index` must be one of"):
        hx.tl.impute(test, model, index="faiss")


@pytest.mark.parametrize("method", ["simple", "average", "weighted", "inverse_distance", "inverse_distance_l2"])
def test_chunked_retrieval_equals_unchunked(method):
    rng = np.random.default_rng(0)
    q, bank = rng.normal(size=(103, 16)).astype(np.float32), rng.normal(size=(57, 16)).astype(np.float32)
    values = rng.normal(size=(57, 9)).astype(np.float32)
    p1, c1 = retrieve(q, bank, values, k=7, method=method, chunk_size=10)
    p2, c2 = retrieve(q, bank, values, k=7, method=method, chunk_size=1000)
    np.testing.assert_allclose(p1, p2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c1, c2, rtol=1e-6, atol=1e-6)
    # against a brute-force reference
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    order = np.argsort(-(qn @ bn.T), axis=1)
    kk = 1 if method == "simple" else 7
    top = order[:, :kk]
    if method != "simple" and method != "average":
        if method == "weighted":
            d2 = ((q[:, None, :] - bank[top]) ** 2).sum(-1)
            w = np.exp(-(d2 - d2.min(1, keepdims=True)))
        elif method == "inverse_distance":  # mclSTExp: 1 / L1 distance² of the normalised embeddings
            w = 1 / np.abs(qn[:, None, :] - bn[top]).sum(-1) ** 2
        else:
            w = 1 / ((qn[:, None, :] - bn[top]) ** 2).sum(-1)
        w /= w.sum(1, keepdims=True)
        ref = (w[:, :, None] * values[top]).sum(1)
    else:
        ref = values[top].mean(1)
    np.testing.assert_allclose(p1, ref, rtol=1e-4, atol=1e-5)


def test_impute_outputs(synth3, fitted):
    import anndata as ad
    import scipy.sparse as sps

    train, model = fitted
    test = synth3[synth3.obs["library_id"] == "S2"].copy()
    before = test.copy()
    full = hx.tl.impute(test, model)
    # a new object over the predicted genes only; the query is untouched
    assert full is not test and list(full.var_names) == model.genes
    assert set(test.layers) == set(before.layers) and "bleep_confidence" not in test.obs
    assert (test.X != before.X).nnz == 0 if sps.issparse(test.X) else np.array_equal(test.X, before.X)
    assert full.X is None and np.isfinite(full.layers["bleep"]).all()
    assert full.var["measured"].all() and full.var["seen_in_training"].all()
    np.testing.assert_allclose(full.layers["measured"], hx.pp.expression_matrix(test, model.genes))
    # a query holding a subset of the genes plus an extra one: the measurement layer marks what was measured
    sub = test[:, list(test.var_names[:10])].copy()
    extra = ad.AnnData(np.ones((sub.n_obs, 1), np.float32), obs=sub.obs, var={"_": ["x"]})
    extra.var_names = ["not_a_gene"]
    q = ad.concat([sub, extra], axis=1, merge="first")
    q.obsm["X_fake"] = test.obsm["X_fake"]
    part = hx.tl.impute(q, model)
    assert list(part.var_names) == model.genes and part.var["measured"].sum() == 10
    np.testing.assert_array_equal(part.layers["bleep"], full.layers["bleep"])
    assert np.isnan(part.layers["measured"][:, 10:]).all() and np.isfinite(part.layers["measured"][:, :10]).all()
    # H&E-only query (no genes): same contract, no measurement
    he = ad.AnnData(obs=test.obs.copy(), obsm={"X_fake": test.obsm["X_fake"], "spatial": test.obsm["spatial"]})
    he.uns["spatial"] = test.uns["spatial"]
    new = hx.tl.impute(he, model)
    assert new is not he and he.n_vars == 0 and "bleep" not in he.layers
    assert list(new.var_names) == model.genes and "measured" not in new.layers and not new.var["measured"].any()
    np.testing.assert_array_equal(new.layers["bleep"], full.layers["bleep"])
    assert new.X is None
    assert "spatial" in new.obsm and "spatial" in new.uns and "bleep_confidence" in new.obs
    with pytest.raises(ValueError, match="no measurement"):
        hx.tl.evaluate(new, layer="bleep")
    # predictions in X only when asked, and then never taken for a measurement
    asked = hx.tl.impute(he, model, to_X=True)
    np.testing.assert_array_equal(asked.X, asked.layers["bleep"])
    assert asked.uns["histoexp"]["X"] == "prediction:bleep"
    with pytest.raises(ValueError, match="holds predictions"):
        hx.tl.evaluate(asked, layer="bleep")
    # reference AnnData(s): any reference gene can be predicted; a list uses the genes common to all
    ref = train.copy()
    ref2 = train[:, list(train.var_names[5:])].copy()
    # add a gene that only the reference has
    big = ad.concat([ref, ad.AnnData(np.zeros((ref.n_obs, 1), np.float32), obs=ref.obs)], axis=1, merge="first")
    big.var_names = [*ref.var_names, "EXTRA"]
    out = hx.tl.impute(he, model, reference=big, genes="all")
    assert list(out.var_names) == [*ref.var_names, "EXTRA"]
    assert out.var["seen_in_training"].tolist() == [True] * ref.n_vars + [False]
    np.testing.assert_allclose(out.layers["bleep"][:, :-1], full.layers["bleep"], rtol=1e-5, atol=1e-5)
    out2 = hx.tl.impute(he, model, reference=[big, big], genes=["EXTRA", "gene001"])
    assert list(out2.var_names) == ["EXTRA", "gene001"]
    with pytest.raises(ValueError, match=r"lacks 5 of the model's 40 genes"):
        hx.tl.impute(he, model, reference=ref2)
    with pytest.raises(KeyError, match="not in the model's stored reference"):
        hx.tl.impute(he, model, genes=["EXTRA"])
    simple = hx.tl.impute(he, model, method="simple", k=5)
    assert simple.uns["bleep"]["params"]["k"] == 1


def test_errors(synth3, fitted):
    train, model = fitted
    test = synth3[synth3.obs["library_id"] == "S2"].copy()
    with pytest.raises(KeyError, match=r"embed_patches"):
        hx.tl.fit_bleep(train.copy(), genes="all", encoder="resnet18", key_added="other")
    mine = train.copy()
    mine.uns["bleep"] = {"my": "notes"}  # the user's now: kept
    with pytest.raises(KeyError, match=r"uns\['bleep'\].*changed since histoexp wrote it.*overwrite"):
        hx.tl.fit_bleep(mine, genes="all", use_rep="X_fake", epochs=1)
    assert mine.uns["bleep"] == {"my": "notes"}
    q = test.copy()
    del q.obsm["X_fake"]
    with pytest.raises(KeyError, match="X_fake"):
        hx.tl.impute(q, model)
    q = test.copy()
    q.obsm["X_fake"] = q.obsm["X_fake"][:, :3]
    with pytest.raises(ValueError, match="expects 7 features"):
        hx.tl.impute(q, model)
    with pytest.raises(ValueError, match="method"):
        hx.tl.impute(test, model, method="median")
    # a query embedded with another encoder than the model's
    tr = train.copy()
    tr.uns["histoexp"] = {"embeddings": {"X_fake": {"encoder": "resnet50", "weights": "default", "dim": 7}}}
    m = hx.tl.fit_bleep(tr, genes="all", use_rep="X_fake", epochs=1, key_added="b2")
    q = test.copy()
    q.uns["histoexp"] = {"embeddings": {"X_fake": {"encoder": "uni", "weights": "default", "dim": 7}}}
    with pytest.raises(ValueError, match="encoder='uni'"):
        hx.tl.impute(q, m)


def test_finetune_end_to_end_on_cpu(tmp_path):
    ad = hx.datasets.synthetic(n_sections=2, n_side=8, random_state=1)
    hx.pp.extract_patches(ad, size_um=64, patch_px=32)
    kw = {"genes": "all", "encoder": "resnet18", "weights": None, "encoder_kwargs": {"transform": {"input_size": 32}}}
    model = hx.tl.fit_bleep(ad, finetune_encoder=True, epochs=2, batch_size=32, checkpoint_dir=tmp_path / "ck", **kw)
    assert model.mode == "finetune" and model.config["history"]["epochs_run"] == 2
    assert (tmp_path / "ck" / "last.safetensors").is_file()
    model.save(tmp_path / "m")
    loaded = hx.tl.load_model(tmp_path / "m")
    a = hx.tl.impute(ad, model)
    b = hx.tl.impute(ad, loaded)
    np.testing.assert_array_equal(a.layers["bleep"], b.layers["bleep"])
    # resume after "interruption" gives the uninterrupted result
    part = ad.copy()
    hx.tl.fit_bleep(
        part, finetune_encoder=True, epochs=1, batch_size=32, checkpoint_dir=tmp_path / "ck2", overwrite=True, **kw
    )
    res = hx.tl.fit_bleep(
        part,
        finetune_encoder=True,
        epochs=2,
        batch_size=32,
        checkpoint_dir=tmp_path / "ck2",
        resume=True,
        overwrite=True,
        **kw,
    )
    sa, sr = model.net.state_dict(), res.net.state_dict()
    assert all(torch.equal(sa[k], sr[k]) for k in sa)
    q = ad.copy()
    del q.obsm["patches"]
    q.uns["histoexp"].pop("patches")
    with pytest.raises(KeyError, match="extract_patches"):
        hx.tl.impute(q, model)


def test_real_her2st_heldout_section(her2st_dir):
    """Two C sections: train on C3, predict C2 from handcrafted features; beats a shuffled-image control."""
    from histoexp.models import handcrafted_features

    ad = hx.datasets.her2st(["C2", "C3"], data_dir=her2st_dir)
    hx.pp.extract_patches(ad, size_um=112, patch_px=64)
    ad.obsm["X_hc"] = handcrafted_features(ad.obsm["patches"])
    panel = [g for g in hx.datasets.her2st_gene_panel() if g in ad.var_names]
    lib = ad.obs["library_id"].astype(str).to_numpy()
    train, test = ad[lib == "C3"].copy(), ad[lib == "C2"].copy()
    model = hx.tl.fit_bleep(train, genes=panel, use_rep="X_hc", epochs=30, random_state=0)
    truth = hx.pp.expression_matrix(test, panel)
    top = np.argsort(-truth.var(0))[:50]  # HVG-50 of the test section
    pred = hx.tl.impute(test, model, k=50).layers["bleep"]
    shuffled = test.copy()
    shuffled.obsm["X_hc"] = test.obsm["X_hc"][np.random.default_rng(0).permutation(test.n_obs)]
    ctrl = hx.tl.impute(shuffled, model, k=50).layers["bleep"]
    r, r_ctrl = np.nanmean(_pcc(pred[:, top], truth[:, top])), np.nanmean(_pcc(ctrl[:, top], truth[:, top]))
    assert r > 0.15, r
    assert r - r_ctrl > 0.1, (r, r_ctrl)


def test_ensemble_members_and_averaging(synth3, fitted):
    train, model = fitted
    test = synth3[synth3.obs["library_id"] == "S2"].copy()
    # member 0 of the ensemble is exactly the single model of the same seed; member 1 differs
    single = hx.tl.fit_bleep(
        train.copy(),
        genes="all",
        use_rep="X_fake",
        epochs=40,
        batch_size=64,
        random_state=0,
        n_ensemble=1,
        overwrite=True,
    )
    assert single.n_ensemble == 1 and "members" not in single.config["history"]
    s0, s1, ss = model.nets[0].state_dict(), model.nets[1].state_dict(), single.net.state_dict()
    assert all(torch.equal(s0[k], ss[k]) for k in s0)
    assert not all(torch.equal(s0[k], s1[k]) for k in s0)
    # the ensemble prediction is the mean of the members' retrievals
    out = hx.tl.impute(test, model, k=10)
    feats, bank = test.obsm["X_fake"], model.reference.expression
    preds = [
        retrieve(model.encode_images(feats, member=i), model.encode_expression(bank, member=i), bank, k=10)[0]
        for i in range(model.n_ensemble)
    ]
    np.testing.assert_allclose(out.layers["bleep"], np.mean(preds, 0), rtol=1e-5, atol=1e-6)
    assert out.uns["bleep"]["params"]["model"]["n_ensemble"] == 5
    # joined embeddings: cosine of joined = mean of the members' cosines
    qi, be = model.encode_images(feats[:7]), model.encode_expression(bank[:9])
    cos = [
        _cos(model.encode_images(feats[:7], member=i), model.encode_expression(bank[:9], member=i))
        for i in range(model.n_ensemble)
    ]
    np.testing.assert_allclose(qi @ be.T, np.mean(cos, 0), rtol=1e-4, atol=1e-5)
    # the ensemble is not worse than its first member on held-out spots
    truth = hx.pp.expression_matrix(test)
    one = hx.tl.impute(test, single, k=10).layers["bleep"]
    assert np.nanmean(_pcc(out.layers["bleep"], truth)) >= np.nanmean(_pcc(one, truth)) - 0.02
    with pytest.raises(ValueError, match="n_ensemble"):
        hx.tl.fit_bleep(train.copy(), genes="all", use_rep="X_fake", epochs=1, n_ensemble=0, overwrite=True)


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def test_n_pcs_whitened_input_and_save_load(tmp_path, synth3):
    train = synth3[synth3.obs["library_id"] != "S2"].copy()
    test = synth3[synth3.obs["library_id"] == "S2"].copy()
    rng = np.random.default_rng(0)
    # 7 informative features plus 40 noise features: PCA keeps the leading directions
    for ad in (train, test):
        ad.obsm["X_wide"] = np.c_[ad.obsm["X_fake"], rng.normal(size=(ad.n_obs, 40))].astype(np.float32)
    kw = {"genes": "all", "use_rep": "X_wide", "epochs": 5, "batch_size": 64, "n_ensemble": 2}
    model = hx.tl.fit_bleep(train, n_pcs=4, **kw)
    net = model.net
    assert net.image_projection.projection.in_features == 4 and model.config["n_pcs"] == 4
    tr_idx = np.isin(train.obs["library_id"], train.uns["bleep"]["params"]["val_libraries"], invert=True)
    z = net.features(torch.as_tensor(train.obsm["X_wide"][tr_idx])).numpy().astype(np.float64)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(z.T, ddof=0), np.eye(4), atol=1e-3)  # unit variance, decorrelated
    # components are the leading eigenvectors of the standardised training features
    x = train.obsm["X_wide"][tr_idx].astype(np.float64)
    xs = (x - x.mean(0)) / x.std(0)
    evals = np.linalg.eigvalsh(np.cov(xs.T))[::-1]
    comps = net.features.components.numpy().astype(np.float64)
    np.testing.assert_allclose(np.diag(comps.T @ np.cov(xs.T) @ comps), evals[:4], rtol=1e-3)
    model.save(tmp_path / "m")
    loaded = hx.tl.load_model(tmp_path / "m")
    assert loaded.n_ensemble == 2 and loaded.config["n_pcs"] == 4
    a, b = hx.tl.impute(test, model), hx.tl.impute(test, loaded)
    assert np.array_equal(a.layers["bleep"], b.layers["bleep"])
    assert np.array_equal(a.obs["bleep_confidence"], b.obs["bleep_confidence"])
    with pytest.raises(ValueError, match="n_pcs"):
        hx.tl.fit_bleep(train, n_pcs=500, overwrite=True, **kw)


def test_center_reference(synth3, fitted):
    train, model = fitted
    test = synth3[synth3.obs["library_id"] == "S2"].copy()
    # a reference section with a different depth/composition: counts of half of the genes tripled
    ref = train.copy()
    X = np.asarray(ref.X.todense() if hasattr(ref.X, "todense") else ref.X, dtype=np.float32)
    X[:, : ref.n_vars // 2] *= 3
    ref.X = X
    n = ref.n_obs
    raw = hx.tl.impute(test, model, reference=ref, k=n).layers["bleep"]
    cen = hx.tl.impute(test, model, reference=ref, k=n, center_reference="library_id").layers["bleep"]
    train_mean = np.asarray(model.config["expression_mean"], dtype=np.float32)
    ref_mean = hx.pp.expression_matrix(ref).mean(0)
    # k = all spots: the prediction is the bank mean, i.e. the training mean after centring
    np.testing.assert_allclose(cen, np.broadcast_to(train_mean, cen.shape), atol=1e-4)
    np.testing.assert_allclose(raw, np.broadcast_to(ref_mean, raw.shape), atol=1e-4)
    assert np.abs(ref_mean - train_mean).max() > 0.3
    # centring per section: each section of the centred bank has the training mean
    from histoexp.tl._predict import _reference_bank

    spots, _, _ = _reference_bank(model, [ref], None, None, center="library_id")
    bank = spots.expression
    for lib in ref.obs["library_id"].unique():
        m = (ref.obs["library_id"] == lib).to_numpy()
        np.testing.assert_allclose(bank[m].mean(0), train_mean, atol=1e-4)
    with pytest.raises(ValueError, match="center_reference"):
        hx.tl.impute(test, model, center_reference=True)
    # ridge is a regression model: retrieval arguments are refused, not ignored
    ridge = hx.tl.fit_ridge(train, genes="all", use_rep="X_fake", overwrite=True)
    with pytest.raises(ValueError, match="regression model"):
        hx.tl.impute(test, ridge, reference=ref)
