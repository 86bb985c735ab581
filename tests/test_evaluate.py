import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats as ss

import histoexp as hx
from histoexp.tl._evaluate import gene_metrics, summarize


@pytest.fixture
def arrays():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(80, 6))
    pred = truth + rng.normal(scale=[0.2, 0.5, 1.0, 2.0, 1.0, 1.0], size=(80, 6))
    truth[:, 4] = 3.0  # constant truth -> excluded
    pred[:, 5] = -1.0  # constant prediction -> correlation 0, kept
    return pred, truth


def test_gene_metrics_match_scipy(arrays):
    pred, truth = arrays
    tab = gene_metrics(pred, truth, list("abcdef"))
    for j, g in enumerate("abcd"):
        assert tab.loc[g, "pcc"] == pytest.approx(ss.pearsonr(pred[:, j], truth[:, j])[0], abs=1e-10)
        assert tab.loc[g, "spearman"] == pytest.approx(ss.spearmanr(pred[:, j], truth[:, j])[0], abs=1e-10)
        assert tab.loc[g, "mse"] == pytest.approx(np.mean((pred[:, j] - truth[:, j]) ** 2))
        assert tab.loc[g, "mae"] == pytest.approx(np.mean(np.abs(pred[:, j] - truth[:, j])))
    assert tab["status"].tolist() == ["ok"] * 4 + ["constant_truth", "constant_prediction"]
    assert np.isnan(tab.loc["e", ["pcc", "spearman", "mse", "mae"]].astype(float)).all()
    assert tab.loc["f", "pcc"] == 0 and tab.loc["f", "spearman"] == 0
    # the correlations decrease with the noise we put in
    assert tab.loc["a", "pcc"] > tab.loc["b", "pcc"] > tab.loc["c", "pcc"] > tab.loc["d", "pcc"]


def test_summarize_counts_and_selections(arrays):
    pred, truth = arrays
    tab = gene_metrics(pred, truth, list("abcdef"))
    s = summarize(tab, n_top=2)
    assert s["n_genes"] == 5 and s["n_constant_excluded"] == 1 and s["n_constant_prediction"] == 1
    assert s["n_spots"] == 80 and s["n_top"] == 2
    ev = tab.loc[list("abcdf")]
    assert s["pcc_mean"] == pytest.approx(ev["pcc"].mean())
    assert s["pcc_at_m"] == s["pcc_mean"]
    assert s["pcc_at_h"] == pytest.approx(np.sort(ev["pcc"])[-2:].mean())
    hvg = ev["truth_var"].nlargest(2).index
    heg = ev["truth_mean"].nlargest(2).index
    assert s["pcc_hvg"] == pytest.approx(ev.loc[hvg, "pcc"].mean())
    assert s["pcc_heg"] == pytest.approx(ev.loc[heg, "pcc"].mean())
    assert s["mse_mean"] == pytest.approx(ev["mse"].mean())
    json.dumps(s)


def test_hvg_heg_are_the_right_genes():
    rng = np.random.default_rng(0)
    n = 200
    # gene j: mean j, sd (10 - j) -> HEG are the last genes, HVG the first ones
    truth = np.stack([j + (10 - j) * rng.normal(size=n) for j in range(10)], axis=1)
    good = truth.copy()
    good[:, :3] += rng.normal(scale=0.01, size=(n, 3))  # first three: near perfect
    good[:, 3:] = rng.normal(size=(n, 7))  # others: noise
    tab = gene_metrics(good, truth)
    s = summarize(tab, n_top=3)
    assert s["pcc_hvg"] > 0.99  # the three most variable genes are the well-predicted ones
    assert abs(s["pcc_heg"]) < 0.2  # the three most expressed are noise
    assert s["pcc_at_h"] > 0.99


def test_nan_prediction_handling():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(50, 4))
    pred = truth + rng.normal(scale=0.3, size=truth.shape)
    pred[:, 3] = np.nan  # not predicted
    pred[0, 0] = np.nan  # one spot without a prediction
    tab = gene_metrics(pred, truth, list("wxyz"))
    assert tab.loc["z", "status"] == "not_predicted"
    assert tab.attrs["n_spots"] == 49
    assert tab.loc["w", "pcc"] == pytest.approx(ss.pearsonr(pred[1:, 0], truth[1:, 0])[0])
    assert summarize(tab)["n_not_predicted"] == 1


def test_bad_input():
    with pytest.raises(ValueError, match="same shape|one shape"):
        gene_metrics(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="truth"):
        gene_metrics(np.zeros((3, 1)), np.array([[np.nan], [1], [2]]))


def _with_prediction(adata, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    X = hx.pp.expression_matrix(adata)
    adata.layers["bleep"] = (X + rng.normal(0, noise, X.shape)).astype(np.float32)
    return X


def test_evaluate_anndata(synth, tmp_path):
    X = _with_prediction(synth)
    synth.layers["bleep"][:, -2:] = np.nan  # two genes without prediction
    synth.uns["bleep"] = {"params": {"epochs": 3}}
    hx.tl.evaluate(synth, layer="bleep")
    m = synth.uns["bleep"]["metrics"]
    assert synth.uns["bleep"]["params"] == {"epochs": 3}  # merged, not clobbered
    assert m["n_genes"] == synth.n_vars - 2 and m["n_spots"] == synth.n_obs
    assert np.isnan(synth.var["bleep_pcc"].iloc[-2:]).all()
    j = 0
    assert synth.var["bleep_pcc"].iloc[j] == pytest.approx(
        ss.pearsonr(synth.layers["bleep"][:, j], X[:, j])[0], abs=1e-6
    )
    assert m["pcc_mean"] == pytest.approx(synth.var["bleep_pcc"].mean())
    assert 0.8 < m["pcc_mean"] < 1
    for col in ("bleep_spearman", "bleep_mse", "bleep_mae"):
        assert col in synth.var
    # h5ad round trip of uns metrics
    synth.write_h5ad(tmp_path / "a.h5ad")
    import anndata as ad

    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.uns["bleep"]["metrics"]["pcc_mean"] == pytest.approx(m["pcc_mean"])
    # re-evaluation on a subset of genes overwrites metrics
    hx.tl.evaluate(synth, genes=list(synth.var_names[:5]))
    assert synth.uns["bleep"]["metrics"]["n_genes"] == 5


def test_evaluate_copy_and_truth_layer(synth):
    X = _with_prediction(synth)
    synth.layers["truth"] = X
    tab = hx.tl.evaluate(synth, truth="truth", copy=True, key_added="other")
    assert isinstance(tab, pd.DataFrame) and "other_pcc" not in synth.var and "other" not in synth.uns
    tab2 = hx.tl.evaluate(synth, layer="bleep", copy=True)  # X counts -> log1p, same as the truth layer
    np.testing.assert_allclose(tab["pcc"], tab2["pcc"], atol=1e-6)
    tab3 = hx.tl.evaluate(synth, layer="bleep", truth=X, copy=True)
    np.testing.assert_allclose(tab["pcc"], tab3["pcc"], atol=1e-6)
    assert tab.attrs["metrics"]["truth"] == "layers['truth']"


def test_evaluate_errors(synth):
    with pytest.raises(KeyError, match="layer"):
        hx.tl.evaluate(synth, layer="nope")
    _with_prediction(synth)
    with pytest.raises(KeyError, match="genes"):
        hx.tl.evaluate(synth, genes=["not_a_gene"])
    with pytest.raises(KeyError, match="truth"):
        hx.tl.evaluate(synth, truth="nope")
    synth.X = synth.X * 0
    with pytest.raises(ValueError, match="no measurement"):
        hx.tl.evaluate(synth)


# -- gene-specific skill --------------------------------------------------------------------------------------------


def _partial_r_numpy(p, t, s):
    """Direct partial correlation: residuals of p and t after least squares on [1, s], then Pearson."""
    design = np.c_[np.ones(len(s)), s]
    rp = p - design @ np.linalg.lstsq(design, p, rcond=None)[0]
    rt = t - design @ np.linalg.lstsq(design, t, rcond=None)[0]
    return np.corrcoef(rp, rt)[0, 1]


def test_gene_specific_pcc_equals_numpy_partial_correlation():
    rng = np.random.default_rng(3)
    n, g = 120, 7
    s = rng.normal(size=n)
    truth = np.outer(s, rng.uniform(0.5, 1.5, g)) + rng.normal(size=(n, g))
    pred = 0.7 * truth + np.outer(s, rng.normal(size=g)) + rng.normal(scale=0.8, size=(n, g))
    tab = gene_metrics(pred, truth, shared_axis=s)
    for j in range(g):
        assert tab["pcc_specific"].iloc[j] == pytest.approx(_partial_r_numpy(pred[:, j], truth[:, j], s), abs=1e-9)
    # without an axis the columns are absent; with the default the truth's own PC1 is used
    assert "pcc_specific" not in gene_metrics(pred, truth, shared_axis=None)
    assert gene_metrics(pred, truth).attrs["shared_axis"].startswith("PC1")


def test_gene_specific_pcc_given_several_shared_axes():
    rng = np.random.default_rng(4)
    n, g = 150, 6
    s = rng.normal(size=(n, 2))
    truth = s @ rng.uniform(0.5, 1.5, (2, g)) + rng.normal(size=(n, g))
    pred = 0.5 * truth + s @ rng.normal(size=(2, g)) + rng.normal(scale=0.8, size=(n, g))
    tab = gene_metrics(pred, truth, shared_axis=s)
    assert tab.attrs["shared_axis"] == "given (2 axes)"
    for j in range(g):
        assert tab["pcc_specific"].iloc[j] == pytest.approx(_partial_r_numpy(pred[:, j], truth[:, j], s), abs=1e-9)
    yy, xx = np.mgrid[0:15, 0:10]
    sig = gene_metrics(pred, truth, shared_axis=s, coords=np.c_[xx.ravel(), yy.ravel()].astype(float))
    assert np.isfinite(sig["pcc_specific_pval"]).all() and (sig["n_eff"] <= n).all()
    # an (n, 1) array is the one-axis figure
    one = gene_metrics(pred, truth, shared_axis=s[:, :1])
    np.testing.assert_allclose(one["pcc_specific"], gene_metrics(pred, truth, shared_axis=s[:, 0])["pcc_specific"])
    with pytest.raises(ValueError, match="k shared axes"):
        gene_metrics(pred, truth, shared_axis=s[:-1])
    with pytest.raises(ValueError, match="k shared axes"):
        gene_metrics(pred, truth, shared_axis=s[:, :, None])
    # hx.tl.shared_axis: the first column of n_axes=2 is the default one-axis score
    train = s[::-1] @ rng.uniform(0.5, 1.5, (2, g)) + rng.normal(size=(n, g))
    two = hx.tl.shared_axis(truth, train, n_axes=2)
    assert two.shape == (n, 2)
    np.testing.assert_allclose(two[:, 0], hx.tl.shared_axis(truth, train), atol=1e-9)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="n_axes"):
            hx.tl.shared_axis(truth, train, n_axes=bad)
    with pytest.raises(ValueError, match="fewer than n_axes"):
        hx.tl.shared_axis(truth[:, :2], train[:, :2], n_axes=3)


def test_her2st_average_gene_pattern_scores_one_axis_gene_specific_pcc_but_not_two(her2st_c2):
    # On her2st the first axis is a tumour/stroma contrast and the second the depth pattern almost every gene
    # shares. A predictor that knows no gene (every gene = the mean standardised expression of the spot) keeps
    # that second pattern after the first axis is partialled out; partialling out two axes removes it.
    panel = [g for g in hx.datasets.her2st_gene_panel() if g in her2st_c2.var_names]
    t = hx.pp.expression_matrix(her2st_c2, panel).astype(np.float64)
    z = (t - t.mean(0)) / np.maximum(t.std(0), 1e-9)
    average_gene = np.repeat(z.mean(1, keepdims=True), t.shape[1], axis=1)
    one = gene_metrics(average_gene, t, shared_axis=hx.tl.shared_axis(t, t))
    two = gene_metrics(average_gene, t, shared_axis=hx.tl.shared_axis(t, t, n_axes=2))
    assert one["pcc_specific"].mean() > 0.1  # measured 0.16
    assert two["pcc_specific"].mean() < 0.07  # measured 0.03
    assert one["pcc"].mean() == pytest.approx(two["pcc"].mean())


def _one_pattern_section(seed=0, n_side=20):
    """Genes 1.. share one spatial pattern; gene 0 has its own (a second, independent pattern)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    shared = gaussian_filter(rng.normal(size=(n_side, n_side)), 2).ravel()
    own = gaussian_filter(rng.normal(size=(n_side, n_side)), 2).ravel()
    shared, own = shared / shared.std(), own / own.std()
    n_genes = 200  # many genes: the shared axis of the truth is then well determined, as on real panels
    load = rng.uniform(0.5, 1.5, n_genes)
    truth = np.outer(shared, load) + rng.normal(scale=0.5, size=(n_side**2, n_genes))
    truth[:, 0] = 0.6 * shared + own + rng.normal(scale=0.5, size=n_side**2)
    yy, xx = np.mgrid[0:n_side, 0:n_side]
    return truth, shared, own, load, np.c_[xx.ravel(), yy.ravel()].astype(float)


def test_gene_specific_pcc_separates_one_pattern_from_gene_skill():
    truth, shared, own, load, coords = _one_pattern_section()
    # the training expression: another section of the same tissue model
    train, *_ = _one_pattern_section(seed=1)
    s = hx.tl.shared_axis(truth, train)
    assert abs(np.corrcoef(s, shared)[0, 1]) > 0.95
    # a predictor that only knows the shared pattern, as an image model estimates it (with its own smooth error):
    # every gene = loading x pattern
    from scipy.ndimage import gaussian_filter

    err = gaussian_filter(np.random.default_rng(7).normal(size=(20, 20)), 2).ravel()
    one_pattern = np.outer(shared + 0.5 * err / err.std(), load)
    tab1 = gene_metrics(one_pattern, truth, shared_axis=s, coords=coords)
    assert tab1["pcc"].mean() > 0.5  # a good-looking mean Pearson ...
    assert abs(tab1["pcc_specific"].mean()) < 0.06  # ... without any gene-specific skill
    assert summarize(tab1)["frac_specific_significant"] <= 0.05
    # a predictor that also knows gene 0's own pattern
    good = one_pattern.copy()
    good[:, 0] = 0.6 * shared + own
    tab2 = gene_metrics(good, truth, shared_axis=s, coords=coords)
    assert tab2["pcc_specific"].iloc[0] > 0.7
    assert tab2["pcc_specific_qval"].iloc[0] < 0.05
    assert tab1["pcc_specific_qval"].iloc[0] > 0.05
    s_summary = summarize(tab2)
    assert s_summary["pcc_specific_mean"] == pytest.approx(tab2["pcc_specific"].mean())
    assert 1 <= s_summary["n_specific_significant"] <= 5


def test_spatial_significance_controls_false_positives_where_the_naive_test_does_not():
    from scipy.ndimage import gaussian_filter

    from histoexp._stats import partial_pearson, spatial_effective_n, specific_pvalues

    rng = np.random.default_rng(0)
    side, reps = 20, 200
    yy, xx = np.mgrid[0:side, 0:side]
    coords = np.c_[xx.ravel(), yy.ravel()].astype(float)
    # independent, spatially smooth fields: any correlation between them is chance
    x = np.stack([gaussian_filter(rng.normal(size=(side, side)), 2).ravel() for _ in range(reps)], 1)
    y = np.stack([gaussian_filter(rng.normal(size=(side, side)), 2).ravel() for _ in range(reps)], 1)
    r, _ = partial_pearson(x, y, None)
    n_eff = spatial_effective_n(x, y, coords)
    ours = (specific_pvalues(r, n_eff, n_covariates=0) < 0.05).mean()
    naive = (specific_pvalues(r, np.full(reps, side * side), n_covariates=0) < 0.05).mean()
    assert naive > 0.2  # treating neighbouring spots as independent: many false positives
    assert ours < 0.11  # nominal 0.05, with room for 200 draws
    assert np.median(n_eff) < 0.25 * side * side


def test_evaluate_writes_gene_specific_keys_and_splits_seen_from_unseen():
    import anndata as ad

    truth, shared, own, load, coords = _one_pattern_section()
    train, *_ = _one_pattern_section(seed=1)
    pred = np.outer(shared, load)
    pred[:, 0] = 0.6 * shared + own
    genes = [f"g{i}" for i in range(truth.shape[1])]
    a = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(len(truth))]), var=pd.DataFrame(index=genes))
    a.layers["m"] = pred.astype(np.float32)
    a.layers["measured"] = truth.astype(np.float32)
    a.obsm["spatial"] = coords
    a.var["seen_in_training"] = [i % 2 == 0 for i in range(len(genes))]
    a.obs["m_shared_axis"] = hx.tl.shared_axis(truth, train)
    hx.tl.evaluate(a, layer="m")
    met = a.uns["m"]["metrics"]
    assert met["shared_axis"].startswith("obs['m_shared_axis']")
    assert {"pcc_specific_mean", "frac_specific_significant", "seen", "unseen"} <= set(met)
    assert met["seen"]["n_genes"] + met["unseen"]["n_genes"] == met["n_genes"]
    assert a.var["m_pcc_specific"].iloc[0] > 0.7 and a.var["m_pcc_specific_qval"].iloc[0] < 0.05
    # the same table as the array function with the same axis
    tab = hx.tl.evaluate(a, layer="m", copy=True)
    np.testing.assert_allclose(tab["pcc_specific"], a.var["m_pcc_specific"], atol=1e-6)
    # without the obs column the measurement's own PC1 is used, and said so
    del a.obs["m_shared_axis"]
    hx.tl.evaluate(a, layer="m")
    assert "shared_axis" not in a.uns["m"]["metrics"] or "PC1" in a.uns["m"]["metrics"]["shared_axis"]
    a.write_h5ad(tmp := __import__("tempfile").mktemp(suffix=".h5ad"))
    back = ad.read_h5ad(tmp)
    assert back.uns["m"]["metrics"]["n_genes"] == met["n_genes"]
