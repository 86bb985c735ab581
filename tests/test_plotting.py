import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
from anndata import AnnData

import histoexp as hx


def _panels(fig):
    """Axes that hold a spatial plot (colour bars excluded)."""
    return [ax for ax in fig.axes if ax.get_title()]


@pytest.fixture
def pred(synth):
    rng = np.random.default_rng(0)
    X = hx.pp.expression_matrix(synth)
    synth.layers["bleep"] = (X + rng.normal(0, 0.3, X.shape)).astype(np.float32)
    return synth


def test_gene_map_with_measurement(pred, tmp_path):
    genes = ["gene000", "gene001", "gene002"]
    path = tmp_path / "map.png"
    fig = hx.pl.gene_map(pred, genes, library_id="S1", save=path)
    assert path.stat().st_size > 10_000
    panels = _panels(fig)
    assert len(panels) == 3 * 2  # rows = genes, measured + predicted
    assert len(fig.axes) == 3 * 2 + 3  # plus one shared colour bar per gene
    assert panels[0].get_title().startswith("gene000") and "measured" in panels[0].get_title()
    assert "predicted" in panels[1].get_title()
    # the image is drawn under the spots, and one colour scale per gene is shared by both panels
    assert panels[0].images and panels[1].images
    lims = [c.get_clim() for ax in panels[:2] for c in ax.collections if c.get_array() is not None]
    assert len(lims) >= 2 and all(np.allclose(lim, lims[0]) for lim in lims)
    plt.close(fig)


def test_gene_map_prediction_only(pred, tmp_path):
    fig = hx.pl.gene_map(pred, "gene003", compare=None, save=tmp_path / "p.png")
    assert len(_panels(fig)) == 1
    plt.close(fig)
    # an H&E-only query as returned by impute: X empty -> prediction alone
    q = AnnData(X=np.zeros((pred.n_obs, 2), np.float32), obs=pred.obs[["library_id"]].copy())
    q.var_names = ["gene000", "gene001"]
    q.obsm["spatial"] = pred.obsm["spatial"]
    q.uns["spatial"] = pred.uns["spatial"]
    q.layers["bleep"] = pred.layers["bleep"][:, :2]
    axes = hx.pl.gene_map(q, ["gene000", "gene001"], return_fig=False)
    assert axes.shape == (2, 1)
    plt.close("all")


def test_gene_map_errors(pred):
    with pytest.raises(KeyError, match="layer"):
        hx.pl.gene_map(pred, "gene000", layer="nope")
    with pytest.raises(KeyError, match="var_names"):
        hx.pl.gene_map(pred, ["nope"])
    with pytest.raises(KeyError, match="library_id"):
        hx.pl.gene_map(pred, ["gene000"], library_id="S9")


def test_correlation_plot(pred, tmp_path):
    with pytest.raises(KeyError, match="evaluate"):
        hx.pl.correlation(pred)
    hx.tl.evaluate(pred)
    ax = hx.pl.correlation(pred, n_best=5, save=tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 5_000
    text = " ".join(t.get_text() for t in ax.texts)
    best = pred.var["bleep_pcc"].nlargest(5).index
    assert all(g in text for g in best)
    assert sum(p.get_height() for p in ax.patches) == pred.n_vars  # histogram counts every gene
    plt.close(ax.figure)


def test_patches_plot(synth, tmp_path):
    hx.pp.extract_patches(synth, patch_px=32, store="memory")
    fig = hx.pl.patches(synth, n=6, color="density", save=tmp_path / "patches.png")
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 6
    assert shown[0].images[0].get_array().shape == (32, 32, 3)
    assert (tmp_path / "patches.png").stat().st_size > 2_000
    plt.close(fig)
    names = list(synth.obs_names[:2])
    fig = hx.pl.patches(synth, obs_names=names)
    assert [ax.get_title() for ax in fig.axes if ax.images] == names
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), hx.pp.get_patches(synth)[0])
    plt.close(fig)
