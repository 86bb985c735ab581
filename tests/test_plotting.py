import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from matplotlib.collections import EllipseCollection, PolyCollection
from matplotlib.figure import Figure
from matplotlib_scalebar.scalebar import ScaleBar

import histoexp as hx

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "her2st.json"


@pytest.fixture(autouse=True)
def _no_open_figures():
    plt.close("all")
    yield
    plt.close("all")


def _panels(fig):
    """Axes that hold a spatial plot (the ones with a spot collection), in drawing order."""
    return [ax for ax in fig.axes if any(isinstance(c, EllipseCollection | PolyCollection) for c in ax.collections)]


def _spots(ax):
    return next(c for c in ax.collections if isinstance(c, EllipseCollection | PolyCollection))


def _ylabels(fig):
    return [ax.get_ylabel() for ax in fig.axes]


@pytest.fixture
def pred(synth):
    """Older-style object: counts in X and a prediction layer over the same genes."""
    rng = np.random.default_rng(0)
    X = hx.pp.expression_matrix(synth)
    synth.layers["bleep"] = (X + rng.normal(0, 0.3, X.shape)).astype(np.float32)
    return synth


def _impute_like(src: AnnData, genes, *, unmeasured=(), seed=0) -> AnnData:
    """What hx.tl.impute returns: predictions + layers['measured'] (log1p scale), X None."""
    rng = np.random.default_rng(seed)
    meas = hx.pp.expression_matrix(src, genes).astype(np.float64)
    p = (0.6 * meas + 0.4 * meas.mean(0) + rng.normal(0, 0.3, meas.shape)).clip(0).astype(np.float32)
    var = pd.DataFrame({"measured": True, "seen_in_training": True}, index=pd.Index(genes))
    for g in unmeasured:
        meas[:, genes.index(g)] = np.nan
        var.loc[g, "measured"] = False
    out = AnnData(X=None, obs=src.obs.copy(), var=var)
    out.obsm["spatial"] = np.asarray(src.obsm["spatial"]).copy()
    out.uns["spatial"] = src.uns["spatial"]
    out.layers["bleep"] = p
    out.layers["measured"] = meas.astype(np.float32)
    out.obs["bleep_confidence"] = np.float32(1.0)
    return out


C2_GENES = ["ERBB2", "GNAS", "FASN", "KRT19", "CD74", "IGKC", "MUCL1", "ACTB", "EEF1A1", "TMSB10"]


@pytest.fixture
def c2_pred(her2st_c2):
    return _impute_like(her2st_c2, C2_GENES, unmeasured=["TMSB10"])


@pytest.fixture
def synth_pred(synth):
    """New-style prediction on the synthetic sections, evaluated, with (made-up) domains."""
    genes = list(synth.var_names[:8])
    p = _impute_like(synth, genes)
    hx.tl.evaluate(p, layer="bleep", truth="measured")
    x = p.obsm["spatial"][:, 0]
    p.obs["measured_domains"] = pd.Categorical((x > np.median(x)).astype(int).astype(str))
    p.obs["bleep_domains"] = pd.Categorical((x <= np.median(x)).astype(int).astype(str))
    return p


# ------------------------------------------------------------------------------------------------
# the show / save / return_fig contract
# ------------------------------------------------------------------------------------------------
CALLS = {
    "gene_map": lambda a, **kw: hx.pl.gene_map(a, ["gene000", "gene001"], **kw),
    "spatial_domains": lambda a, **kw: hx.pl.spatial_domains(a, **kw),
    "scatter_measured": lambda a, **kw: hx.pl.scatter_measured(a, "gene000", **kw),
    "pcc_vs_expression": lambda a, **kw: hx.pl.pcc_vs_expression(a, **kw),
    "correlation": lambda a, **kw: hx.pl.correlation(a, "bleep", **kw),
    "method_comparison": lambda a, **kw: hx.pl.method_comparison(RESULTS, **kw),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_return_and_display_contract(name, synth_pred, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(len(plt.get_fignums())))
    call = CALLS[name]

    # a notebook cell ending in the call: shown once by plt.show, nothing returned (the Jupyter repr of a
    # returned Figure would show it a second time), no figure left open (the inline backend would flush it)
    assert call(synth_pred) is None
    assert shown == [1] and plt.get_fignums() == []

    # save: written, not shown, closed
    path = tmp_path / f"{name}.png"
    assert call(synth_pred, save=path) is None
    assert path.stat().st_size > 5_000 and shown == [1] and plt.get_fignums() == []
    assert call(synth_pred, show=False, save=path) is None and plt.get_fignums() == []
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind

    # return_fig: the open figure, not shown
    fig = call(synth_pred, return_fig=True)
    assert isinstance(fig, Figure) and plt.get_fignums() == [fig.number] and shown == [1]
    plt.close(fig)

    # show=True with save: both
    assert call(synth_pred, show=True, save=tmp_path / "both.svg") is None
    assert shown == [1, 1] and b"<svg" in (tmp_path / "both.svg").read_bytes()[:1000]


@pytest.mark.parametrize("name", ["scatter_measured", "pcc_vs_expression", "correlation", "method_comparison"])
def test_drawing_into_given_axes(name, synth_pred, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    fig, (ax0, ax1) = plt.subplots(1, 2)
    assert CALLS[name](synth_pred, ax=ax1) is None
    # the caller's figure: drawn into, neither shown nor closed
    assert ax1.has_data() and not ax0.has_data() and shown == [] and plt.get_fignums() == [fig.number]
    assert CALLS[name](synth_pred, ax=ax0, return_fig=True) is fig


def test_save_is_atomic(synth_pred, tmp_path, monkeypatch):
    path = tmp_path / "map.png"
    path.write_bytes(b"old")
    hx.pl.gene_map(synth_pred, "gene000", save=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # replaced, like scanpy's figures

    def broken(self, fname, **kw):
        fname.write(b"half a figure")
        raise RuntimeError("disk full")

    before = path.read_bytes()
    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        hx.pl.gene_map(synth_pred, "gene000", save=path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["map.png"]
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hx.pl.gene_map(synth_pred, "gene000", save=tmp_path / "nope" / "map.png")
    with pytest.raises(ValueError, match="format"):
        hx.pl.gene_map(synth_pred, "gene000", save=tmp_path / "map.xyz")
    hx.pl.gene_map(synth_pred, "gene000", save=tmp_path / "noext")
    assert (tmp_path / "noext.png").is_file()


# ------------------------------------------------------------------------------------------------
# gene_map
# ------------------------------------------------------------------------------------------------
def test_gene_map_her2st_measured_vs_predicted(c2_pred):
    genes = ["ERBB2", "GNAS", "TMSB10"]
    fig = hx.pl.gene_map(c2_pred, genes, vmax="p99", return_fig=True)
    panels = _panels(fig)
    assert len(panels) == 2 + 2 + 1  # TMSB10 was not measured: prediction alone
    assert fig.get_suptitle() == "section C2"
    meas, pred = c2_pred.layers["measured"], c2_pred.layers["bleep"]
    for row, gene in enumerate(genes[:2]):
        m_ax, p_ax = panels[2 * row], panels[2 * row + 1]
        j = C2_GENES.index(gene)
        assert m_ax.get_title() == f"{gene} · measured"
        r = np.corrcoef(pred[:, j], meas[:, j])[0, 1]
        assert p_ax.get_title().startswith(f"{gene} · predicted (bleep)\nr = {r:.2f} vs measured (187 spots)")
        np.testing.assert_allclose(_spots(m_ax).get_array(), meas[:, j])
        np.testing.assert_allclose(_spots(p_ax).get_array(), pred[:, j])
        # per-panel colour limits: minimum to the 99th percentile of that panel's own values
        np.testing.assert_allclose(_spots(m_ax).get_clim(), (meas[:, j].min(), np.percentile(meas[:, j], 99)))
        np.testing.assert_allclose(_spots(p_ax).get_clim(), (pred[:, j].min(), np.percentile(pred[:, j], 99)))
        assert _spots(p_ax).get_clim() != _spots(m_ax).get_clim()
    assert "TMSB10\nnot measured" in [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "measured" not in panels[4].get_title() and "r =" not in panels[4].get_title()
    # one colour bar per panel saying what the colour means; the H&E image under the spots
    assert _ylabels(fig).count("log1p normalised counts") == 5
    assert all(ax.images for ax in panels)
    # spots at their physical size (100 µm legacy ST spots), opaque next to a measurement
    sf = c2_pred.uns["spatial"]["C2"]["scalefactors"]
    np.testing.assert_allclose(_spots(panels[0]).get_widths()[0], sf["spot_diameter_fullres"], rtol=1e-6)
    assert _spots(panels[0]).get_alpha() == 1.0
    # a µm scale bar from the section's µm per pixel
    bars = [a for a in panels[0].artists if isinstance(a, ScaleBar)]
    assert len(bars) == 1 and bars[0].dx == pytest.approx(sf["microns_per_pixel"]) and bars[0].units == "um"
    # readable: at least 4 inches per panel
    assert fig.get_size_inches()[1] >= 4 * len(genes)


def test_gene_map_color_scaling(c2_pred):
    j = C2_GENES.index("ERBB2")
    m, p = c2_pred.layers["measured"][:, j], c2_pred.layers["bleep"][:, j]
    fig = hx.pl.gene_map(c2_pred, "ERBB2", vmin="p1", vmax="p99", scale="shared", return_fig=True)
    both = np.concatenate([m, p])
    lims = [_spots(ax).get_clim() for ax in _panels(fig)]
    for lim in lims:
        np.testing.assert_allclose(lim, np.percentile(both, [1, 99]))
    assert _ylabels(fig).count("log1p normalised counts") == 1  # one colour bar for the row
    fig = hx.pl.gene_map(c2_pred, "ERBB2", vmin=0, vmax=lambda v: np.percentile(v, 50), return_fig=True)
    np.testing.assert_allclose(_spots(_panels(fig)[1]).get_clim(), (0, np.median(p)))
    fig = hx.pl.gene_map(c2_pred, "ERBB2", return_fig=True)  # default: each panel's min and max
    np.testing.assert_allclose(_spots(_panels(fig)[0]).get_clim(), (m.min(), m.max()))
    np.testing.assert_allclose(_spots(_panels(fig)[1]).get_clim(), (p.min(), p.max()))
    for bad in ("q99", "p101", [1, 2]):
        with pytest.raises(ValueError, match="vmax"):
            hx.pl.gene_map(c2_pred, "ERBB2", vmax=bad)
    with pytest.raises(ValueError, match="scale"):
        hx.pl.gene_map(c2_pred, "ERBB2", scale="global")


def test_gene_map_prediction_in_x_is_never_called_measured(c2_pred):
    q = AnnData(X=c2_pred.layers["bleep"].copy(), obs=c2_pred.obs.copy(), var=c2_pred.var.copy())
    q.obsm["spatial"], q.uns["spatial"] = c2_pred.obsm["spatial"], c2_pred.uns["spatial"]
    q.uns["histoexp"] = {"X": "prediction:bleep"}
    fig = hx.pl.gene_map(q, ["ERBB2", "GNAS"], return_fig=True)  # layer and compare resolved automatically
    titles = [ax.get_title() for ax in _panels(fig)]
    assert titles == ["ERBB2 · predicted (bleep)", "GNAS · predicted (bleep)"]
    assert not any("measured" in t for ax in fig.axes for t in [ax.get_title(), *(x.get_text() for x in ax.texts)])
    with pytest.raises(ValueError, match="holds predictions"):
        hx.pl.gene_map(q, "ERBB2", compare="X")
    # with the measurement next to it, X (the prediction) still is not the comparison
    q.layers["measured"] = c2_pred.layers["measured"]
    fig = hx.pl.gene_map(q, "ERBB2", return_fig=True)
    np.testing.assert_allclose(_spots(_panels(fig)[0]).get_array(), c2_pred.layers["measured"][:, 0])
    with pytest.raises(ValueError, match="not a prediction"):
        hx.pl.gene_map(c2_pred, "ERBB2", layer="measured")
    with pytest.raises(ValueError, match="not marked as a prediction"):
        hx.pl.gene_map(AnnData(np.ones((3, 1), np.float32)), "0", layer="X")


def test_gene_map_counts_in_x(pred):
    """Older-style object: compare='auto' uses the log1p-normalised counts of X."""
    fig = hx.pl.gene_map(pred, ["gene000", "gene001"], library_id="S1", return_fig=True)
    panels = _panels(fig)
    assert len(panels) == 4 and panels[0].get_title() == "gene000 · measured"
    mask = (pred.obs["library_id"] == "S1").to_numpy()
    np.testing.assert_allclose(_spots(panels[0]).get_array(), hx.pp.expression_matrix(pred, ["gene000"])[mask, 0])
    np.testing.assert_allclose(_spots(panels[1]).get_array(), pred.layers["bleep"][mask, 0])
    assert fig.get_suptitle() == "section S1" and "r = " in panels[1].get_title()
    # synthetic sections: 2 µm per pixel from the scale factors
    assert [a.dx for a in panels[0].artists if isinstance(a, ScaleBar)] == [2.0]
    fig = hx.pl.gene_map(pred, "gene003", compare=None, return_fig=True)
    assert len(_panels(fig)) == 1 and _spots(_panels(fig)[0]).get_alpha() == pytest.approx(0.6)
    # an all-zero X is no measurement
    q = pred.copy()
    q.X = np.zeros(q.shape, np.float32)
    assert len(_panels(hx.pl.gene_map(q, "gene000", return_fig=True))) == 1
    with pytest.raises(ValueError, match="no measurement"):
        hx.pl.gene_map(q, "gene000", compare="X")
    q.X = np.full(q.shape, np.nan, np.float32)  # NaN is no measurement either
    assert len(_panels(hx.pl.gene_map(q, "gene000", return_fig=True))) == 1


def test_gene_map_he_only_tiles(synth):
    img = synth.uns["spatial"]["S0"]["images"]["hires"]
    tiles = hx.pp.tile_tissue(img, tile_um=40, mpp=2.0, library_id="S0")
    assert tiles.n_obs > 10
    rng = np.random.default_rng(0)
    q = AnnData(X=None, obs=tiles.obs.copy(), var=pd.DataFrame(index=["gene000", "gene001"]))
    q.obsm["spatial"], q.uns["spatial"] = tiles.obsm["spatial"], tiles.uns["spatial"]
    q.layers["bleep"] = rng.random((tiles.n_obs, 2)).astype(np.float32)
    fig = hx.pl.gene_map(q, "gene001", return_fig=True)
    (ax,) = _panels(fig)
    coll = _spots(ax)
    assert isinstance(coll, PolyCollection) and coll.get_alpha() < 1  # tissue visible under the tiles
    side = np.ptp(coll.get_paths()[0].vertices[:, 0])
    assert side == pytest.approx(40 / 2.0)  # a tile of 40 µm at 2 µm/px
    assert [a.dx for a in ax.artists if isinstance(a, ScaleBar)] == [2.0]
    assert ax.get_title() == "gene001 · predicted (bleep)" and ax.images


def test_gene_map_without_mpp_has_no_scale_bar(c2_pred, caplog):
    import copy
    import logging

    entry = copy.deepcopy(dict(c2_pred.uns["spatial"]["C2"]))
    del entry["scalefactors"]["microns_per_pixel"]
    for k in ("microns_per_pixel", "platform", "spot_diameter_um"):
        entry["metadata"].pop(k, None)
    c2_pred.uns["spatial"] = {"C2": entry}
    with caplog.at_level(logging.DEBUG, logger="histoexp"):
        fig = hx.pl.gene_map(c2_pred, "ERBB2", return_fig=True)
    assert not [a for ax in fig.axes for a in ax.artists if isinstance(a, ScaleBar)]
    assert "no µm per pixel" in caplog.text
    # the µm per pixel recorded by extract_patches is enough
    c2_pred.uns["histoexp"] = {"patches": {"libraries": {"C2": {"mpp": 0.5}}}}
    fig = hx.pl.gene_map(c2_pred, "ERBB2", return_fig=True)
    assert [a.dx for a in _panels(fig)[0].artists if isinstance(a, ScaleBar)] == [0.5]


def test_gene_map_errors(pred, c2_pred):
    with pytest.raises(KeyError, match="layer"):
        hx.pl.gene_map(pred, "gene000", layer="nope")
    with pytest.raises(KeyError, match="var_names"):
        hx.pl.gene_map(pred, ["nope"])
    with pytest.raises(KeyError, match="library_id"):
        hx.pl.gene_map(pred, ["gene000"], library_id="S9")
    with pytest.raises(KeyError, match="compare='nope'"):
        hx.pl.gene_map(pred, "gene000", compare="nope")
    c2_pred.layers["ridge"] = c2_pred.layers["bleep"]
    with pytest.raises(ValueError, match="Pass `layer=`"):
        hx.pl.gene_map(c2_pred, "ERBB2")
    assert (
        "predicted (ridge)" in _panels(hx.pl.gene_map(c2_pred, "ERBB2", layer="ridge", return_fig=True))[1].get_title()
    )
    c2_pred.layers["ridge"] = np.full(c2_pred.shape, np.nan, np.float32)
    with pytest.raises(ValueError, match="no prediction"):
        hx.pl.gene_map(c2_pred, "ERBB2", layer="ridge")


# ------------------------------------------------------------------------------------------------
# spatial domains
# ------------------------------------------------------------------------------------------------
def test_match_labels():
    ref = np.array(list("aaabbbccc"))
    pred = np.array(["2", "2", "2", "0", "0", "1", "1", "1", "9"])
    assert hx.pl.match_labels(pred, ref) == {"2": "a", "0": "b", "1": "c"}  # '9' has no partner left
    assert hx.pl.match_labels(pred, [None] * 9) == {}


def test_spatial_domains_plot_matches_colours(c2_pred):
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    xy = c2_pred.obsm["spatial"]
    ref = (xy[:, 0] > np.median(xy[:, 0])).astype(int) * 2 + (xy[:, 1] > np.median(xy[:, 1])).astype(int)
    rng = np.random.default_rng(0)
    perm = np.array([3, 0, 1, 2])  # same regions under other names
    pred = perm[ref].astype(str).astype(object)
    flip = rng.random(len(pred)) < 0.1
    pred[flip] = rng.choice(list("0123"), flip.sum())
    pred[:5] = "7"  # a predicted domain with no measured partner
    c2_pred.obs["measured_domains"] = pd.Categorical(ref.astype(str))
    c2_pred.obs["bleep_domains"] = pd.Categorical(pred)
    fig = hx.pl.spatial_domains(c2_pred, return_fig=True)
    m_ax, p_ax = _panels(fig)
    assert (m_ax.get_title(), p_ax.get_title()) == ("measured_domains", "bleep_domains")
    m_col, p_col = _spots(m_ax).get_facecolors(), _spots(p_ax).get_facecolors()
    matched = pred == perm[ref].astype(str)
    assert matched.sum() > 100
    np.testing.assert_array_equal(p_col[matched], m_col[matched])  # same colour = same region
    assert not np.array_equal(p_col[~matched & (pred != "7")], m_col[~matched & (pred != "7")])
    assert not any(np.allclose(p_col[0], c) for c in m_col)  # the unmatched domain has a colour of its own
    ari = adjusted_rand_score(ref.astype(str), pred.astype(str))
    nmi = normalized_mutual_info_score(ref.astype(str), pred.astype(str))
    assert f"ARI = {ari:.3f}, NMI = {nmi:.3f}" in fig.get_suptitle() and "C2" in fig.get_suptitle()
    legend = [t.get_text() for t in p_ax.get_legend().get_texts()]
    assert "3 → 0" in legend and "7 (unmatched)" in legend
    # cropped to the tissue (the image is larger than the spots' extent)
    d = c2_pred.uns["spatial"]["C2"]["scalefactors"]["spot_diameter_fullres"]
    assert m_ax.get_xlim() == pytest.approx((xy[:, 0].min() - d, xy[:, 0].max() + d))
    fig = hx.pl.spatial_domains(c2_pred, compare=None, return_fig=True)
    assert len(_panels(fig)) == 1
    with pytest.raises(KeyError, match="run hx.tl.spatial_domains"):
        hx.pl.spatial_domains(c2_pred, "ridge_domains")


# ------------------------------------------------------------------------------------------------
# scatter, metrics, method comparison
# ------------------------------------------------------------------------------------------------
def test_scatter_measured(c2_pred):
    j = C2_GENES.index("GNAS")
    m, p = c2_pred.layers["measured"][:, j], c2_pred.layers["bleep"][:, j]
    fig = hx.pl.scatter_measured(c2_pred, "GNAS", return_fig=True)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.column_stack([m, p]))
    assert ax.get_title() == f"GNAS: r = {np.corrcoef(m, p)[0, 1]:.2f} (187 spots)"
    (line,) = ax.lines
    np.testing.assert_array_equal(line.get_xdata(), line.get_ydata())  # the identity line
    assert ax.get_xlabel() == "measured (log1p normalised counts)" and ax.get_ylabel() == "predicted (bleep)"
    with pytest.raises(ValueError, match="not measured"):
        hx.pl.scatter_measured(c2_pred, "TMSB10")
    with pytest.raises(KeyError, match="var_names"):
        hx.pl.scatter_measured(c2_pred, "NOPE")
    del c2_pred.layers["measured"]
    with pytest.raises(ValueError, match="needs a measurement"):
        hx.pl.scatter_measured(c2_pred, "GNAS")


def test_pcc_vs_expression(c2_pred):
    with pytest.raises(KeyError, match="evaluate"):
        hx.pl.pcc_vs_expression(c2_pred)
    hx.tl.evaluate(c2_pred, layer="bleep", truth="measured", genes=C2_GENES[:-1])
    meas = c2_pred.layers["measured"][:, :-1].astype(np.float64)
    for x, expect in (("mean", meas.mean(0)), ("variance", meas.var(0))):
        fig = hx.pl.pcc_vs_expression(c2_pred, x=x, n_labels=3, return_fig=True)
        ax = fig.axes[0]
        np.testing.assert_allclose(
            ax.collections[0].get_offsets(), np.column_stack([expect, c2_pred.var["bleep_pcc"][:-1]]), rtol=1e-5
        )
        best = c2_pred.var["bleep_pcc"].nlargest(3).index
        assert sorted(t.get_text() for t in ax.texts) == sorted(best)
        assert "Spearman ρ" in ax.get_title() and "9 genes" in ax.get_title()
        assert ax.get_xlabel().startswith(f"{x} of measured")
    with pytest.raises(ValueError, match="'mean' or 'variance'"):
        hx.pl.pcc_vs_expression(c2_pred, x="max")


def test_method_comparison_from_benchmark_json():
    res = json.loads(RESULTS.read_text())
    fig = hx.pl.method_comparison(RESULTS, "pcc_hvg", return_fig=True)
    ax = fig.axes[0]
    methods = list(res["folds"][0]["methods"])
    bars = sorted(ax.patches, key=lambda b: -b.get_y())  # top to bottom = results order
    for bar, m in zip(bars, methods, strict=True):
        per_fold = [f["methods"][m]["pcc_hvg"] for f in res["folds"]]
        assert bar.get_width() == pytest.approx(np.mean(per_fold))
        assert bar.get_width() == pytest.approx(res["mean"][m]["pcc_hvg"])
    # one point per fold and method, coloured by test section
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f["test"] for f in res["folds"]]
    c2_points = ax.collections[0].get_offsets()[:, 0]
    np.testing.assert_allclose(c2_points, [res["folds"][0]["methods"][m]["pcc_hvg"] for m in methods])
    assert [t.get_text() for t in ax.get_yticklabels()][0].startswith("mean")
    with pytest.raises(KeyError, match="nope"):
        hx.pl.method_comparison(res, "nope")
    with pytest.raises(KeyError, match="methods"):
        hx.pl.method_comparison(res, methods=["ridge[handcrafted]", "unknown"])


def test_method_comparison_from_mapping():
    fig = hx.pl.method_comparison({"a": [0.1, 0.3], "b": [0.5, np.nan, 0.7]}, return_fig=True, methods=["b", "a"])
    ax = fig.axes[0]
    widths = {t.get_text().split()[0]: b.get_width() for t, b in zip(ax.get_yticklabels(), ax.patches, strict=True)}
    assert widths == {"b": pytest.approx(0.6), "a": pytest.approx(0.2)}
    assert sum(len(c.get_offsets()) for c in ax.collections) == 4  # NaN folds are not drawn
    with pytest.raises(TypeError, match="per-fold values"):
        hx.pl.method_comparison({"a": 0.3})


# ------------------------------------------------------------------------------------------------
# correlation, patches
# ------------------------------------------------------------------------------------------------
def test_correlation_plot(pred, tmp_path):
    with pytest.raises(KeyError, match="evaluate"):
        hx.pl.correlation(pred)
    hx.tl.evaluate(pred)
    fig = hx.pl.correlation(pred, n_best=5, return_fig=True)
    ax = fig.axes[0]
    text = " ".join(t.get_text() for t in ax.texts)
    best = pred.var["bleep_pcc"].nlargest(5).index
    assert all(g in text for g in best)
    assert sum(p.get_height() for p in ax.patches) == pred.n_vars  # histogram counts every gene


def test_patches_plot(synth, tmp_path):
    hx.pp.extract_patches(synth, patch_px=32, store="memory")
    fig = hx.pl.patches(synth, n=6, color="density", return_fig=True)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 6
    assert shown[0].images[0].get_array().shape == (32, 32, 3)
    names = list(synth.obs_names[:2])
    fig = hx.pl.patches(synth, obs_names=names, return_fig=True)
    assert [ax.get_title() for ax in fig.axes if ax.images] == names
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), hx.pp.get_patches(synth)[0])
    plt.close("all")
    assert hx.pl.patches(synth, n=2, save=tmp_path / "p.png") is None and plt.get_fignums() == []
    assert (tmp_path / "p.png").stat().st_size > 2_000


def test_public_api_documented():
    api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for name in hx.pl.__all__:
        assert f"   pl.{name}\n" in api, f"hx.pl.{name} is missing from docs/api.md"
