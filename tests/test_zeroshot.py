"""Zero-shot genes: gene embeddings (co-expression, tables, text) and fit_zeroshot (synthetic control, persistence)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import histoexp as hx
from histoexp.models.zeroshot import ZeroshotModel, zeroshot_loss

N_GENES, N_SEEN = 60, 40
FAST = {"use_rep": "X_feat", "epochs": 60, "method": "neural"}


def _pcc(pred, truth):
    p, t = pred - pred.mean(0), truth - truth.mean(0)
    return float(np.mean((p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0))))


@pytest.fixture(scope="module")
def data():
    """Three synthetic sections; a gene's log-rate is its embedding (through a fixed map) · the image's hidden fields.

    ``hx.datasets.synthetic`` draws each gene's coefficients on the two hidden image fields (density, tint); the
    gene embedding is a fixed random linear map of those coefficients plus noise, so the expression of any gene,
    seen or not, is a known function of its embedding and of the image.
    """
    ad = hx.datasets.synthetic(n_sections=3, n_genes=N_GENES, random_state=0)
    rng = np.random.default_rng(1)
    z = np.c_[ad.obs["density"], ad.obs["tint"]]
    ad.obsm["X_feat"] = (z @ rng.normal(size=(2, 8)) + 0.3 * rng.normal(size=(ad.n_obs, 8))).astype(np.float32)
    ad.obsm["X_nuc"] = (z[:, :1] @ rng.normal(size=(1, 4)) + 0.3 * rng.normal(size=(ad.n_obs, 4))).astype(np.float32)
    coef = ad.varm["true_coef"]
    emb = coef @ rng.normal(size=(2, 8)) + 0.05 * rng.normal(size=(N_GENES, 8))
    table = pd.DataFrame(emb, index=ad.var_names.copy())
    lib = ad.obs["library_id"].astype(str).to_numpy()
    train, test = ad[lib != "S2"].copy(), ad[lib == "S2"].copy()
    return train, test, table, list(ad.var_names[:N_SEEN]), list(ad.var_names[N_SEEN:])


@pytest.fixture(scope="module")
def fitted(data):
    train, _, table, seen, _ = data
    train = train.copy()
    return train, hx.tl.fit_zeroshot(train, gene_embeddings=table, genes=seen, **FAST, random_state=0)


def test_loss_is_mse_plus_correlation_term():
    torch.manual_seed(0)
    y = torch.randn(20, 5)
    assert torch.isclose(zeroshot_loss(y, y), torch.tensor(0.0), atol=1e-5)
    assert torch.isclose(zeroshot_loss(-y, y, pcc_weight=0.0), ((2 * y) ** 2).mean())
    assert torch.isclose(zeroshot_loss(-y, y, pcc_weight=1.0), ((2 * y) ** 2).mean() + 2, atol=1e-4)


def test_prompter_equals_naive_cross_attention():
    """The prompter computed from attention weights equals refining every spot's gene tokens layer by layer."""
    from histoexp.models.zeroshot import _Prompter

    torch.manual_seed(0)
    prompter = _Prompter(16, 2)
    t, ctx, h = torch.randn(7, 16), torch.randn(3, 4, 16), torch.randn(3, 16)
    g = t[None].expand(3, -1, -1)
    for layer in prompter.layers:
        a = (layer["q"](g) @ layer["k"](ctx).transpose(1, 2) / 4).softmax(-1)
        g = g + layer["o"](a @ layer["v"](ctx))
    naive = (g * h[:, None]).sum(-1) - h @ t.T
    torch.testing.assert_close(prompter(t, ctx, h), naive, atol=1e-5, rtol=1e-5)


def test_predicts_unseen_genes_above_shuffled_embeddings(data, fitted):
    train, test, table, seen, unseen = data
    fit_data, model = fitted
    out = hx.tl.impute(test, model, genes=seen + unseen)
    assert out.var["seen_in_training"].tolist() == [True] * N_SEEN + [False] * (N_GENES - N_SEEN)
    assert out.var["measured"].all()
    pred, truth = out.layers["zeroshot"], out.layers["measured"]
    r_unseen = _pcc(pred[:, N_SEEN:], truth[:, N_SEEN:])
    # control: the same training with the embeddings permuted among the genes (image side untouched)
    perm = np.random.default_rng(3).permutation(N_GENES)
    shuffled = pd.DataFrame(table.to_numpy()[perm], index=table.index)
    ctrl = hx.tl.fit_zeroshot(train.copy(), gene_embeddings=shuffled, genes=seen, **FAST, random_state=0)
    r_ctrl = _pcc(hx.tl.impute(test, ctrl, genes=unseen).layers["zeroshot"], truth[:, N_SEEN:])
    print(f"synthetic unseen-gene PCC {r_unseen:.3f} vs shuffled embeddings {r_ctrl:.3f}")
    assert r_unseen > 0.7, r_unseen
    assert r_unseen - r_ctrl > 0.3, (r_unseen, r_ctrl)
    assert fit_data.obsm["X_zeroshot_image"].shape == (train.n_obs, 64)
    assert fit_data.uns["zeroshot"]["params"]["gene_match"]["exact"] == N_SEEN


@pytest.mark.parametrize(
    "options",
    [{"prompter_layers": 2, "image_tokens": 3}, {"graph_k": 5}, {"nuclei_rep": "X_nuc", "nuclei_tokens": 2}],
    ids=["prompter", "graph", "nuclei"],
)
def test_options_learn_save_and_load(data, options, tmp_path):
    train, test, table, seen, unseen = data
    model = hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **FAST, **options, random_state=0)
    out = hx.tl.impute(test, model, genes=unseen)
    r = _pcc(out.layers["zeroshot"], out.layers["measured"])
    assert r > 0.6, (options, r)
    model.save(tmp_path / "m")
    loaded = hx.tl.load_model(tmp_path / "m")
    assert isinstance(loaded, ZeroshotModel)
    again = hx.tl.impute(test, loaded, genes=unseen).layers["zeroshot"]
    np.testing.assert_array_equal(again, out.layers["zeroshot"])
    if "nuclei_rep" in options:
        q = test.copy()
        del q.obsm["X_nuc"]
        with pytest.raises(KeyError, match="X_nuc"):
            hx.tl.impute(q, model, genes=unseen)


def test_graph_never_uses_a_gene_as_its_own_neighbour(data):
    train, test, table, seen, _ = data
    model = hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **FAST, graph_k=3, random_state=0)
    net = model.net
    emb = torch.as_tensor(table.loc[seen].to_numpy(), dtype=torch.float32)
    own = torch.arange(len(seen))
    with torch.no_grad():
        # with the gene itself excluded, changing its row of the neighbour pool changes nothing of its token
        a = net.gene_tokens(emb[:1], own[:1])
        net.seen[0] += 10.0
        b = net.gene_tokens(emb[:1], own[:1])
        net.seen[0] -= 10.0
    torch.testing.assert_close(a, b)


def test_save_load_and_seed(data, fitted, tmp_path):
    train, test, table, seen, unseen = data
    _, model = fitted
    model.save(tmp_path / "m")
    loaded = hx.tl.load_model(tmp_path / "m")
    assert loaded.embedding_genes == list(table.index) and loaded.genes == seen
    a = hx.tl.impute(test, model, genes=unseen + seen[:3]).layers["zeroshot"]
    np.testing.assert_array_equal(hx.tl.impute(test, loaded, genes=unseen + seen[:3]).layers["zeroshot"], a)
    again = hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **FAST, random_state=0)
    for (k, v), w in zip(model.net.state_dict().items(), again.net.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    other = hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **FAST, random_state=1)
    assert not torch.equal(other.net.gene_bias.weight, model.net.gene_bias.weight)


def test_unknown_genes_raise_never_zero(data, fitted):
    train, test, table, seen, _ = data
    _, model = fitted
    with pytest.raises(KeyError, match="no embedding.*NOT_A_GENE"):
        hx.tl.impute(test, model, genes=[seen[0], "NOT_A_GENE"])
    assert model.predictable(["NOT_A_GENE", seen[0]]) == ["NOT_A_GENE"]
    with pytest.raises(KeyError, match="lacks 1 of the"):
        hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table.drop(index=seen[3]), genes=seen, **FAST)
    bad = table.copy()
    bad.iloc[2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hx.tl.fit_zeroshot(train.copy(), gene_embeddings=bad, genes=seen, **FAST)
    with pytest.raises(ValueError, match="graph_k"):
        hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **FAST, graph_k=N_SEEN)
    with pytest.raises(ValueError, match="reference"):
        hx.tl.impute(test, model, reference=train)


def test_coexpression_embeddings_recover_correlation():
    """Two gene modules driven by independent factors, a section offset (batch, not co-expression), background genes."""
    import anndata as an

    rng = np.random.default_rng(0)
    n, n_genes, sections = 600, 200, np.repeat(["a", "b"], 300)
    f = rng.normal(size=(n, 2))
    load = np.zeros((2, n_genes))
    load[0, :15], load[1, 15:30] = 1.0, 1.0  # genes 30.. are background (they keep library sizes realistic)
    offset = np.where(sections == "a", 0.0, 1.5)[:, None] * (np.arange(n_genes) % 2 == 0)
    counts = rng.poisson(np.exp(1.0 + 0.6 * f @ load + offset)).astype(np.float32)
    ad = an.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"library_id": pd.Categorical(sections)}, index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    emb = hx.pp.gene_embeddings(ad, n_components=2, min_spots=5)
    assert emb.shape == (n_genes, 2) and emb.attrs["histoexp"]["method"] == "coexpression"
    e = emb.to_numpy()[:30]
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    cos = unit @ unit.T
    same = (cos[:15, :15][np.triu_indices(15, 1)].mean() + cos[15:, 15:][np.triu_indices(15, 1)].mean()) / 2
    across = np.abs(cos[:15, 15:]).mean()
    print(f"co-expression modules: cosine within {same:.2f}, across {across:.2f}")
    assert same > 0.9 and across < 0.2, (same, across)
    # dot products approximate within-section correlations of the log-normalised expression
    x = hx.pp.expression_matrix(ad)
    xc = np.concatenate([x[sections == s] - x[sections == s].mean(0) for s in ("a", "b")])
    corr = np.corrcoef(xc[:, :2].T)[0, 1]
    assert abs(e[0] @ e[1] - corr) < 0.1, (e[0] @ e[1], corr)
    with pytest.raises(ValueError, match="n_components"):
        hx.pp.gene_embeddings(ad[:, :30].copy(), n_components=40)


def test_table_matching_case_aliases_and_unmatched(tmp_path, caplog):
    table = pd.DataFrame(np.arange(12, dtype=float).reshape(4, 3), index=["ERBB2", "cd74", "Grb7", "ACTB"])
    emb = hx.pp.gene_embeddings(
        table, genes=["ERBB2", "CD74", "GRB7x", "ACTB", "MISSING1", "MISSING2"], aliases={"GRB7": ["GRB7x"]}
    )
    assert list(emb.index) == ["ERBB2", "CD74", "GRB7x", "ACTB"]
    np.testing.assert_array_equal(emb.loc["CD74"].to_numpy(), [3, 4, 5])
    match = emb.attrs["histoexp"]["match"]
    assert (match["exact"], match["case"], match["alias"], match["unmatched"]) == (2, 1, 1, 2)
    assert match["unmatched_genes"] == ["MISSING1", "MISSING2"]
    assert "2 of 6 genes have no embedding" in caplog.text
    # the same from a CSV, a parquet file and an AnnData varm, with a NaN row dropped (not zero-filled)
    bad = table.copy()
    bad.loc["ACTB"] = np.nan
    bad.to_csv(tmp_path / "t.csv")
    from_csv = hx.pp.gene_embeddings(tmp_path / "t.csv")
    assert list(from_csv.index) == ["ERBB2", "cd74", "Grb7"] and from_csv.attrs["histoexp"]["method"] == "table"
    table.to_parquet(tmp_path / "t.parquet")
    assert hx.pp.gene_embeddings(str(tmp_path / "t.parquet")).shape == (4, 3)
    import anndata as an

    holder = an.AnnData(X=np.zeros((2, 4)), var=pd.DataFrame(index=table.index))
    holder.varm["X_genept"] = table.to_numpy()
    assert hx.pp.gene_embeddings(holder, varm_key="X_genept").shape == (4, 3)
    with pytest.raises(KeyError, match="none of the 1 requested genes"):
        hx.pp.gene_embeddings(table, genes=["NOPE"])
    with pytest.raises(ValueError, match="duplicated"):
        hx.pp.gene_embeddings(pd.DataFrame(np.ones((2, 2)), index=["A", "A "]))
    with pytest.raises(ValueError, match="non-numeric"):
        hx.pp.gene_embeddings(pd.DataFrame({"x": ["a", "b"]}, index=["A", "B"]))


def test_store_in_varm_and_fit_from_varm_key(data):
    train, test, table, seen, unseen = data
    ad = train.copy()
    emb = hx.pp.gene_embeddings(table, adata=ad, key_added="X_gene_emb")
    assert ad.varm["X_gene_emb"].shape == (ad.n_vars, 8)
    assert ad.uns["histoexp"]["gene_embeddings"]["X_gene_emb"]["method"] == "table"
    hx.pp.gene_embeddings(table, adata=ad, key_added="X_gene_emb")  # a re-run replaces histoexp's own key
    ad.varm["X_gene_emb"] = ad.varm["X_gene_emb"] * 2  # the user's change is never replaced silently
    with pytest.raises(KeyError, match="already exists"):
        hx.pp.gene_embeddings(table, adata=ad, key_added="X_gene_emb")
    hx.pp.gene_embeddings(table, adata=ad, key_added="X_gene_emb", overwrite=True)
    model = hx.tl.fit_zeroshot(ad, gene_embeddings="X_gene_emb", genes=seen, **FAST, random_state=0)
    assert model.embedding_genes == list(emb.index)
    # a gene without an embedding in the stored table (a NaN row) cannot be predicted
    ad.varm["X_gene_emb"][-1] = np.nan
    m2 = hx.tl.fit_zeroshot(ad, gene_embeddings="X_gene_emb", genes=seen, **FAST, overwrite=True)
    with pytest.raises(KeyError, match="no embedding"):
        hx.tl.impute(test, m2, genes=[unseen[-1]])


DESCRIPTIONS = {
    "ERBB2": "receptor tyrosine kinase of the epidermal growth factor receptor family, amplified in breast cancer",
    "GRB7": "growth factor receptor bound adaptor binding tyrosine kinase receptors, amplified with ERBB2",
    "COL1A1": "fibrillar collagen type I alpha chain of the extracellular matrix in stroma",
    "COL1A2": "collagen type I alpha 2 chain, fibrillar extracellular matrix protein of stroma",
    "CD74": "invariant chain of MHC class II antigen presentation in immune cells",
}


def test_text_embeddings_tfidf_callable_and_offline_error(monkeypatch, tmp_path):
    emb = hx.pp.gene_embeddings(DESCRIPTIONS, n_components=4)
    assert emb.attrs["histoexp"]["method"] == "text" and emb.shape == (5, 4)
    sim = emb.to_numpy() @ emb.to_numpy().T
    assert sim[2, 3] > sim[2, 4] and sim[0, 1] > sim[0, 2]  # collagens together, ERBB2 with GRB7
    lengths = hx.pp.gene_embeddings(DESCRIPTIONS, text_model=lambda texts: [[len(t), 1.0] for t in texts])
    assert lengths.shape == (5, 2)
    # a hub model through the real download code, offline: a clear error naming what to pass instead
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(hx.pp.TextModelUnavailableError, match=r"(?s)text_model='/local/folder'.*tfidf"):
        hx.pp.gene_embeddings(DESCRIPTIONS, text_model="sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match="no description"):
        hx.pp.gene_embeddings({"A": "text", "B": ""})


def test_real_her2st_unseen_gene(her2st_dir):
    """C3 -> C2 on handcrafted features; ERBB2 (not in the 785 panel) predicted from co-expression of A1."""
    ad = hx.datasets.her2st(["C2", "C3"], data_dir=her2st_dir)
    bank = hx.datasets.her2st("A1", data_dir=her2st_dir)
    panel = [g for g in hx.datasets.her2st_gene_panel() if g in ad.var_names]
    assert "ERBB2" not in panel
    emb = hx.pp.gene_embeddings(bank, genes=[*panel, "ERBB2"], n_components=16)
    assert "ERBB2" in emb.index
    # genes too rarely detected in A1 have no embedding: they are reported, not zero-filled
    assert emb.attrs["histoexp"]["match"]["unmatched"] == len(panel) + 1 - len(emb)
    panel = [g for g in panel if g in emb.index][:200]
    hx.pp.extract_patches(ad, size_um=112, patch_px=64)
    hx.tl.embed_patches(ad, encoder="handcrafted")
    lib = ad.obs["library_id"].astype(str).to_numpy()
    train, test = ad[lib == "C3"].copy(), ad[lib == "C2"].copy()
    neural = hx.tl.fit_zeroshot(
        train, gene_embeddings=emb, genes=panel, use_rep="X_handcrafted", method="neural", epochs=20
    )
    model = hx.tl.fit_zeroshot(train, gene_embeddings=emb, genes=panel, use_rep="X_handcrafted", overwrite=True)
    assert model.form == "axes" and neural.form == "neural"
    assert model.config["crossfit"]["unit"] == "spatial block"  # one training section: spatial blocks
    for m, key in ((neural, "neural"), (model, "axes")):
        pred = hx.tl.impute(test, m, genes=["ERBB2", *panel[:10]], key_added=key)
        assert pred.var["seen_in_training"].tolist() == [False] + [True] * 10
        assert pred.var["measured"].all()
        hx.tl.evaluate(pred, layer=key)
        assert np.isfinite(pred.var[f"{key}_pcc"]).all()
    # the axes model says how far to trust ERBB2 (from its embedding neighbours' held-out accuracy)
    assert np.isfinite(pred.var.loc["ERBB2", "expected_pcc"])
    assert set(pred.uns["axes"]["metrics"]) >= {"seen", "unseen"}


# ------------------------------------------------------------------------------------------ expression-axes form
def _own_patterns(random_state: int = 0, n_per_section: int = 150, n_genes: int = 60):
    """Three sections of log-expression: one strong pattern every gene follows, two weaker ones genes split on.

    Every gene loads positively on the shared factor (the first expression axis); on the two other factors the
    genes load with random signs, so an unseen gene's own pattern differs from the shared one and from the
    average gene's. The image features read the three factors (plus noise); a gene's embedding is a fixed random
    map of its three loadings (plus noise), as a co-expression embedding carries a gene's co-variation.
    """
    import anndata as an

    rng = np.random.default_rng(random_state)
    n = 3 * n_per_section
    f = rng.normal(size=(n, 3)) * [2.0, 1.0, 1.0]
    load = np.c_[1.0 + 0.2 * rng.normal(size=n_genes), rng.normal(size=(n_genes, 2))]
    expr = 3.0 + f @ load.T + 0.7 * rng.normal(size=(n, n_genes))
    feats = f @ rng.normal(size=(3, 10)) + 0.3 * rng.normal(size=(n, 10))
    genes = [f"g{i:02d}" for i in range(n_genes)]
    ad = an.AnnData(
        X=expr.astype(np.float32),
        obs=pd.DataFrame(
            {"library_id": pd.Categorical(np.repeat(["S0", "S1", "S2"], n_per_section))},
            index=[f"s{i}" for i in range(n)],
        ),
        var=pd.DataFrame(index=genes),
    )
    ad.obsm["X_feat"] = feats.astype(np.float32)
    table = pd.DataFrame(load @ rng.normal(size=(3, 8)) + 0.05 * rng.normal(size=(n_genes, 8)), index=genes)
    return ad, table


AXES = {"use_rep": "X_feat", "normalize": "none"}


def _unseen_scores(model, test, train, unseen):
    out = hx.tl.impute(test, model, genes=unseen, interval=None)
    truth = out.layers["measured"]
    s = hx.tl.shared_axis(test.X, train.X)  # every gene's measurement: an evaluation device
    table = hx.tl.gene_metrics(out.layers["zeroshot"], truth, unseen, shared_axis=s)
    return float(table["pcc"].mean()), float(table["pcc_specific"].mean()), out


@pytest.fixture(scope="module")
def own():
    ad, table = _own_patterns()
    lib = ad.obs["library_id"].astype(str).to_numpy()
    train, test = ad[lib != "S2"].copy(), ad[lib == "S2"].copy()
    return train, test, table, list(ad.var_names[:40]), list(ad.var_names[40:])


def test_axes_unseen_genes_own_patterns_beat_the_shuffled_control(own):
    """The unseen genes' own patterns: the model recovers them, the control (shuffled embeddings) cannot."""
    train, test, table, seen, unseen = own
    model = hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **AXES)
    ctrl = hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **AXES, shuffle_embeddings=True)
    assert model.form == "axes" and model.config["axes_rank"] == 3  # the three factors, chosen by cross-fitting
    assert ctrl.config["shuffle_embeddings"] == {"random_state": 0, "n_genes": 60} and "SHUFFLED" in repr(ctrl)
    pcc, spec, out = _unseen_scores(model, test, train, unseen)
    pcc_c, spec_c, _ = _unseen_scores(ctrl, test, train, unseen)
    print(f"own patterns: model PCC {pcc:.3f} gene-specific {spec:.3f}; control {pcc_c:.3f} / {spec_c:.3f}")
    assert spec > 0.6 and pcc > 0.6, (pcc, spec)
    assert spec_c < 0.2 and spec - spec_c > 0.4, (spec, spec_c)
    # the control's plain PCC stays high (0.81 here): every gene follows the shared pattern, as on her2st
    assert pcc - pcc_c > 0.08, (pcc, pcc_c)
    # expected accuracy of genes outside the training genes: from their embedding neighbours' held-out accuracy
    assert np.isfinite(out.var["expected_pcc"]).all() and out.var["expected_pcc"].between(0.3, 1).all()
    assert out.var["expected_specific"].dtype == bool
    # which unseen genes to believe: ahead of the shuffled control's expected PCC (cross-fitted alongside); the
    # control model's own unseen genes are not (measured: 16 of 20 flagged for the model, 0 for the control)
    assert np.isfinite(out.var["expected_pcc_control"]).all()
    assert (out.var["expected_pcc"] - out.var["expected_pcc_control"]).mean() > 0.05
    assert out.var["expected_specific"].sum() >= 12
    ctrl_out = hx.tl.impute(test, ctrl, genes=seen[:2] + unseen, interval=None)
    assert ctrl_out.var.loc[unseen, "expected_specific"].sum() <= 3
    assert ctrl_out.var.loc[seen[:2], "expected_pcc_control"].isna().all()
    # gene_map's title line says so
    from histoexp.pl._spatial import _expected_note

    flagged = [g for g in unseen if out.var.loc[g, "expected_specific"]]
    assert "(control 0." in _expected_note(out, flagged[0], with_r=True)
    assert "not expected to beat" not in _expected_note(out, flagged[0], with_r=True)
    assert "not expected to beat the shuffled-embedding control" in _expected_note(ctrl_out, unseen[0], with_r=True)
    assert "control" not in _expected_note(ctrl_out, seen[0], with_r=True)
    # evaluate separates training genes from the others
    both = hx.tl.impute(test, model, genes=seen[:10] + unseen, interval=None)
    hx.tl.evaluate(both, layer="zeroshot", significance=False)
    metrics = both.uns["zeroshot"]["metrics"]
    assert metrics["seen"]["n_genes"] == 10 and metrics["unseen"]["n_genes"] == 20


def test_axes_save_load_identical_and_deterministic(own, tmp_path):
    train, test, table, seen, unseen = own
    model = hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **AXES)
    a = hx.tl.impute(test, model, genes=unseen + seen[:3])
    model.save(tmp_path / "m")
    loaded = hx.tl.load_model(tmp_path / "m")
    assert isinstance(loaded, ZeroshotModel) and loaded.form == "axes"
    b = hx.tl.impute(test, loaded, genes=unseen + seen[:3])
    np.testing.assert_array_equal(a.layers["zeroshot"], b.layers["zeroshot"])
    pd.testing.assert_frame_equal(a.var, b.var)
    again = hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **AXES)
    for (k, v), w in zip(model.net.state_dict().items(), again.net.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    # a training gene keeps its own loadings: its prediction is the reduced-rank ridge of its own training data
    mean, axes = hx._stats.expression_axes(hx.pp.expression_matrix(train, seen, normalize="none"), 3)
    rows = [model.embedding_genes.index(g) for g in seen]
    np.testing.assert_allclose(model.net.loadings[rows].numpy(), axes, atol=1e-5)
    np.testing.assert_allclose(model.net.levels[rows].numpy(), mean, atol=1e-5)


def test_zeroshot_crossfit_never_reads_what_it_predicts(own):
    """A held-out gene's counts and a held-out section's counts never change their out-of-fold predictions."""
    train, _, table, seen, _ = own
    kw = {"gene_embeddings": table, "genes": seen, "rank": 3, **AXES}
    oof, groups = hx.tl.zeroshot_crossfit(train, **kw)
    assert oof.shape == (train.n_obs, len(seen)) and np.isfinite(oof.to_numpy()).all()
    assert list(groups) == list(train.obs["library_id"].astype(str))
    changed = train.copy()
    changed.X[:, 5] = np.random.default_rng(9).normal(size=train.n_obs) * 10  # gene 5's counts replaced
    oof2, _ = hx.tl.zeroshot_crossfit(changed, **kw)
    np.testing.assert_allclose(oof2[seen[5]], oof[seen[5]], rtol=1e-6, atol=1e-6)
    assert not np.allclose(oof2.drop(columns=seen[5]), oof.drop(columns=seen[5]))  # it trains the other folds
    sec = groups == "S0"
    changed = train.copy()
    changed.X[sec] = changed.X[sec][::-1]  # section S0's measurements scrambled across its spots
    oof3, _ = hx.tl.zeroshot_crossfit(changed, **kw)
    np.testing.assert_allclose(oof3[sec], oof[sec], rtol=1e-6, atol=1e-6)
    auto, _ = hx.tl.zeroshot_crossfit(train, **{**kw, "rank": "auto"})
    assert auto.attrs["rank"] == 3 and set(auto.attrs["rank_scores"]) >= {"1", "2", "3", "4"}


def test_axes_arguments_and_errors(own):
    train, _, table, seen, _ = own
    with pytest.raises(ValueError, match=r"\['epochs'\] belong to method='neural'"):
        hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **AXES, epochs=3)
    with pytest.raises(ValueError, match="belong to method='axes'"):
        hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **AXES, method="neural", rank=3)
    with pytest.raises(ValueError, match="`method`"):
        hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **AXES, method="sgn")
    with pytest.raises(ValueError, match="`rank`"):
        hx.tl.fit_zeroshot(train.copy(), gene_embeddings=table, genes=seen, **AXES, rank=0)
    one = train[train.obs["library_id"] == "S0"].copy()  # one section, no positions: nothing to cross-fit over
    with pytest.raises(ValueError, match="pass an integer `rank` and `crossfit=False`"):
        hx.tl.fit_zeroshot(one, gene_embeddings=table, genes=seen, **AXES)
    model = hx.tl.fit_zeroshot(one, gene_embeddings=table, genes=seen, **AXES, rank=3, crossfit=None)
    assert model.config["crossfit"] is None and model.expected is None
    with pytest.raises(KeyError, match="no embedding"):
        hx.tl.impute(one, model, genes=["NOT_A_GENE"])
    shuffled = hx.tl.shuffle_embedding_table(table, 0)
    assert sorted(map(tuple, shuffled.to_numpy())) == sorted(map(tuple, table.to_numpy()))
    assert not np.array_equal(shuffled.to_numpy(), table.to_numpy()) and shuffled.index.equals(table.index)
