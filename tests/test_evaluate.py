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
