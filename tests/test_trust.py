"""Trust in predictions: reduced-rank outputs, cross-fitted expected accuracy, prediction intervals, smoothing."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histoexp as hx
from histoexp._stats import expression_axes, project


def _linear_sections(n_sections=4, n_spots=150, n_genes=12, noise=0.5, seed=0):
    """Sections whose log-expression is a known linear map of 6 image features plus Gaussian noise of known size."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, n_genes))
    parts = []
    for s in range(n_sections):
        f = rng.normal(size=(n_spots, 6)).astype(np.float32)
        y = 2.0 + f @ w * 0.5 + rng.normal(scale=noise, size=(n_spots, n_genes))
        side = int(np.ceil(np.sqrt(n_spots)))
        xy = np.c_[np.arange(n_spots) % side, np.arange(n_spots) // side].astype(float) * 100
        a = ad.AnnData(
            X=y.astype(np.float32),
            obs=pd.DataFrame({"library_id": f"S{s}"}, index=[f"S{s}_{i}" for i in range(n_spots)]),
            var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
        )
        a.obsm["X_feat"], a.obsm["spatial"] = f, xy
        parts.append(a)
    out = ad.concat(parts)
    out.obs["library_id"] = out.obs["library_id"].astype("category")
    return out


@pytest.fixture
def linear():
    data = _linear_sections()
    lib = data.obs["library_id"].astype(str).to_numpy()
    return data[lib != "S3"].copy(), data[lib == "S3"].copy()


def test_projection_is_exact_at_full_rank_and_reduces_rank():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 8))
    mean, axes = expression_axes(y)
    assert axes.shape == (8, 8)
    p = rng.normal(size=(20, 8))
    np.testing.assert_allclose(project(p, mean, axes), p, atol=1e-10)
    p2 = project(p, mean, axes[:, :2])
    assert np.linalg.matrix_rank(p2 - mean, tol=1e-8) == 2
    # orientation does not depend on the solver: loadings of every axis sum to >= 0
    assert (axes.sum(0) >= 0).all()


def test_rank_at_or_above_the_genes_is_full_rank(linear):
    train, test = linear
    full = hx.tl.fit_ridge(train, genes="all", use_rep="X_feat", normalize="none", crossfit=False)
    same = hx.tl.fit_ridge(train, genes="all", use_rep="X_feat", normalize="none", rank=12, key_added="r12")
    assert same.rank is None
    np.testing.assert_allclose(
        hx.tl.impute(test, same).layers["ridge"], hx.tl.impute(test, full).layers["ridge"], atol=1e-5
    )


def test_one_pattern_baseline_is_rank_one_and_has_no_gene_specific_skill(linear):
    train, test = linear
    one = hx.tl.fit_ridge(train, genes="all", use_rep="X_feat", normalize="none", rank=1, key_added="one")
    full = hx.tl.fit_ridge(train, genes="all", use_rep="X_feat", normalize="none")
    p1, pf = hx.tl.impute(test, one), hx.tl.impute(test, full)
    centred = p1.layers["ridge"] - np.asarray(one.config["expression_mean"], dtype=np.float32)
    assert np.linalg.matrix_rank(centred, tol=1e-3) == 1
    hx.tl.evaluate(p1, layer="ridge")
    hx.tl.evaluate(pf, layer="ridge")
    m1, mf = p1.uns["ridge"]["metrics"], pf.uns["ridge"]["metrics"]
    # the genes here follow six independent directions: one pattern explains little of each gene's own signal
    assert mf["pcc_specific_mean"] > m1["pcc_specific_mean"] + 0.3
    assert mf["pcc_mean"] > m1["pcc_mean"]


def test_conformal_intervals_cover_at_their_level_with_known_noise(linear):
    train, test = linear
    model = hx.tl.fit_ridge(train, genes="all", use_rep="X_feat", normalize="none")
    assert model.config["crossfit"]["unit"] == "section" and len(model.config["crossfit"]["folds"]) == 3
    pred = hx.tl.impute(test, model, interval=0.9)
    truth = pred.layers["measured"]
    for level in (0.8, 0.9):
        hx.tl.prediction_intervals(pred, level=level)
        inside = (truth >= pred.layers["ridge_lower"]) & (truth <= pred.layers["ridge_upper"])
        assert abs(inside.mean() - level) < 0.04
    # the half-width tracks the known noise (sd 0.5: the 0.9 half-width of a Gaussian is 0.82 sd)
    half = (pred.layers["ridge_upper"] - pred.layers["ridge_lower"]).mean() / 2
    assert 0.75 < half < 1.0
    # no clipping at 0 for targets that are not log-normalised counts
    assert pred.uns["ridge"]["params"]["intervals"]["lower_bound"] is None


def test_expected_accuracy_is_stored_saved_and_written_by_impute(linear, tmp_path):
    train, test = linear
    model = hx.tl.fit_ridge(train, genes="all", use_rep="X_feat", normalize="none", rank="auto")
    table = model.expected
    assert list(table.index) == model.genes
    assert table["expected_pcc"].between(-1, 1).all() and (table["expected_pcc_sd"] >= 0).all()
    assert train.uns["ridge"]["params"]["crossfit"]["unit"] == "section"
    model.save(tmp_path / "m")
    back = hx.tl.load_model(tmp_path / "m")
    pd.testing.assert_frame_equal(back.expected, table)
    a, b = hx.tl.impute(test, model), hx.tl.impute(test, back)
    np.testing.assert_array_equal(a.layers["ridge"], b.layers["ridge"])
    np.testing.assert_array_equal(a.layers["ridge_upper"], b.layers["ridge_upper"])
    for col in table.columns:
        np.testing.assert_allclose(a.var[col].to_numpy(), table[col].to_numpy(), rtol=1e-6)
    # expected vs realised: genes here differ in how much of them the features explain
    hx.tl.evaluate(a, layer="ridge")
    from scipy.stats import spearmanr

    assert spearmanr(a.var["expected_pcc"], a.var["ridge_pcc"]).statistic > 0.6
    # every new key survives write_h5ad
    a.write_h5ad(tmp_path / "p.h5ad")
    r = ad.read_h5ad(tmp_path / "p.h5ad")
    for key in ("ridge_lower", "ridge_upper"):
        np.testing.assert_array_equal(r.layers[key], a.layers[key])
    np.testing.assert_array_equal(r.varm["ridge_residual_quantiles"], a.varm["ridge_residual_quantiles"])
    assert r.var["expected_specific"].dtype == bool
    np.testing.assert_array_equal(r.obs["ridge_shared_axis"], a.obs["ridge_shared_axis"])
    assert r.uns["ridge"]["params"]["rank"] == model.rank


def test_crossfit_never_reads_the_predicted_section():
    """Out-of-fold predictions of a section do not change when that section's counts do; the others' do."""
    from histoexp.tl._crossfit import _out_of_fold
    from histoexp.tl._ridge import fit_ridge

    data = _linear_sections(n_sections=3, n_spots=60, seed=2)
    lib = data.obs["library_id"].astype(str).to_numpy()
    model = hx.tl.fit_ridge(data, genes="all", use_rep="X_feat", normalize="none", crossfit=False)
    call = {
        "adata": data,
        "genes": None,
        "layer": None,
        "normalize": "none",
        "use_rep": "X_feat",
        "encoder": "resnet50",
        "n_pcs": 256,
        "alphas": (1.0,),
        "rank": None,
        "smooth_predictions": None,
        "crossfit": False,
        "library_key": None,
        "key_added": "ridge",
        "overwrite": True,
        "random_state": 0,
    }
    raw = fit_ridge.__wrapped__
    folds = ["S0", "S1", "S2"]
    oof = _out_of_fold(model, data, raw, call, lib, folds, "section", None, None)
    changed = data.copy()
    rows = np.flatnonzero(lib == "S0")
    changed.X[rows] = changed.X[np.random.default_rng(0).permutation(rows)]
    oof2 = _out_of_fold(model, changed, raw, dict(call, adata=changed), lib, folds, "section", None, None)
    np.testing.assert_array_equal(oof[lib == "S0"], oof2[lib == "S0"])
    assert not np.allclose(oof[lib == "S1"], oof2[lib == "S1"])


def test_smoothing_and_rank_choice_are_recorded_and_applied(linear):
    train, test = linear
    model = hx.tl.fit_ridge(train, genes="all", use_rep="X_feat", normalize="none", smooth_predictions=0.5)
    assert model.config["smooth_predictions"] == 0.5
    smoothed = hx.tl.impute(test, model)
    plain = hx.tl.impute(test, model, smooth=0)
    assert smoothed.uns["ridge"]["params"]["smooth"] == 0.5
    assert not np.allclose(smoothed.layers["ridge"], plain.layers["ridge"])
    # the smoothed value of a spot is the blend of its own and its neighbours' mean
    from histoexp._stats import neighbour_matrix

    nb = neighbour_matrix(test.obsm["spatial"])
    expect = 0.5 * plain.layers["ridge"] + 0.5 * (nb @ plain.layers["ridge"])
    np.testing.assert_allclose(smoothed.layers["ridge"], expect, atol=1e-5)
    with pytest.raises(ValueError, match="smooth"):
        hx.tl.impute(test, model, smooth=1.5)
    with pytest.raises(ValueError, match="rank"):
        hx.tl.fit_ridge(train, use_rep="X_feat", normalize="none", rank=0, key_added="x")
    with pytest.raises(ValueError, match="smooth_predictions"):
        hx.tl.fit_ridge(train, use_rep="X_feat", normalize="none", smooth_predictions=-1, key_added="x")


def test_single_section_cross_fits_on_spatial_blocks():
    one = _linear_sections(n_sections=1, n_spots=144, seed=3)
    model = hx.tl.fit_ridge(one, genes="all", use_rep="X_feat", normalize="none", rank="auto")
    assert model.config["crossfit"]["unit"] == "spatial block"
    assert len(model.config["crossfit"]["folds"]) == 4
    assert model.expected["expected_pcc"].notna().all()


def test_regression_ensembles_report_their_spread(split_real=None):
    data = hx.datasets.synthetic(n_sections=2, random_state=0)
    hx.pp.extract_patches(data, size_um=100, patch_px=16)
    hx.tl.embed_patches(data, encoder="handcrafted")
    model = hx.tl.fit_nh2st(
        data, genes=8, use_rep="X_handcrafted", neighbours=False, n_ensemble=2, epochs=3, crossfit=False
    )
    pred = hx.tl.impute(data, model)
    spread = pred.obs["nh2st_spread"].to_numpy()
    assert spread.shape == (data.n_obs,) and (spread > 0).all()
    # the spread is the members' disagreement: their predictions, computed one by one
    feats = np.asarray(data.obsm["X_handcrafted"], dtype=np.float32)
    members = np.stack([model.predict(feats, member=i) for i in range(2)])
    np.testing.assert_allclose(spread, members.std(0).mean(1), rtol=1e-4, atol=1e-6)
