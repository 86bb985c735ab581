"""evaluate, the plots and spatial_domains find the prediction layer of any model (not only 'bleep')."""

from __future__ import annotations

import numpy as np
import pytest

import histoexp as hx
from histoexp._utils import prediction_key


@pytest.fixture(scope="module")
def ridge_pred():
    """A ridge prediction (layers 'ridge', its interval bounds, 'measured') of a synthetic section from two others."""
    ad = hx.datasets.synthetic(n_sections=3, random_state=0)
    hx.pp.extract_patches(ad, patch_px=32)
    hx.tl.embed_patches(ad, "handcrafted")
    lib = ad.obs["library_id"].astype(str).to_numpy()
    train, query = ad[lib != "S2"].copy(), ad[lib == "S2"].copy()
    model = hx.tl.fit_ridge(train, genes="all", use_rep="X_handcrafted")
    pred = hx.tl.impute(query, model)
    assert set(pred.layers) == {"ridge", "measured", "ridge_lower", "ridge_upper"}  # intervals: not predictions
    return pred


def test_defaults_find_the_ridge_layer(ridge_pred):
    pred = ridge_pred.copy()
    hx.tl.evaluate(pred)  # no layer=: the one prediction layer
    assert "ridge_pcc" in pred.var and pred.uns["ridge"]["metrics"]["layer"] == "ridge"
    explicit = ridge_pred.copy()
    hx.tl.evaluate(explicit, layer="ridge")  # explicit layer= still works, with the same numbers
    np.testing.assert_array_equal(explicit.var["ridge_pcc"], pred.var["ridge_pcc"])
    fig = hx.pl.correlation(pred, return_fig=True)
    assert "ridge" in fig.axes[0].get_xlabel()
    hx.tl.spatial_domains(pred, layer="measured", key_added="measured_domains")
    hx.tl.spatial_domains(pred, compare="measured_domains")  # default: the prediction layer
    assert "ridge_domains" in pred.obs and pred.uns["ridge_domains"]["params"]["layer"] == "ridge"
    fig = hx.pl.spatial_domains(pred, return_fig=True)  # default: the predicted domains
    assert [ax.get_title() for ax in fig.axes if ax.get_title()][:2] == ["measured_domains", "ridge_domains"]


def test_several_or_no_prediction_layers_are_never_guessed(ridge_pred):
    two = ridge_pred.copy()
    two.layers["bleep"] = two.layers["ridge"] + 0.1
    for call in (
        lambda: hx.tl.evaluate(two),
        lambda: hx.pl.correlation(two),
        lambda: hx.tl.spatial_domains(two),
        lambda: hx.pl.gene_map(two, two.var_names[0]),
    ):
        with pytest.raises(ValueError, match=r"Pass `layer=`.*\['ridge', 'bleep'\]"):
            call()
    hx.tl.evaluate(two, layer="bleep")
    assert "bleep_pcc" in two.var and "ridge_pcc" not in two.var
    none = ridge_pred.copy()
    for k in ("ridge", "ridge_lower", "ridge_upper"):
        del none.layers[k]
    with pytest.raises(KeyError, match="no prediction layer.*hx.tl.impute"):
        hx.tl.evaluate(none)
    with pytest.raises(KeyError, match=r"`layer='bleep'` is not in adata.layers \(found \['ridge', .*'measured'"):
        hx.tl.evaluate(ridge_pred.copy(), layer="bleep")
    with pytest.raises(ValueError, match="measurement, not a prediction"):
        hx.tl.evaluate(ridge_pred.copy(), layer="measured")
    with pytest.raises(ValueError, match="layer='measured'"):  # X of a prediction is None: say where to look
        hx.tl.spatial_domains(ridge_pred.copy(), layer=None)


def test_prediction_key_rules(ridge_pred):
    assert prediction_key(ridge_pred) == "ridge"
    two = ridge_pred.copy()
    two.layers["truth"] = two.layers["measured"]
    assert prediction_key(two, exclude=["truth"]) == "ridge"  # evaluate(truth='truth') leaves it out
    hx.tl.evaluate(two, truth="truth")
    assert two.uns["ridge"]["metrics"]["truth"] == "layers['truth']"


def test_mclstexp_defaults_to_the_encoder_of_every_fit():
    """One default image encoder: embed_patches(adata) then any fit_* reads obsm['X_resnet50']."""
    import inspect

    fits = [hx.tl.fit_bleep, hx.tl.fit_mclstexp, hx.tl.fit_nh2st, hx.tl.fit_ridge, hx.tl.fit_zeroshot]
    defaults = {f.__name__: inspect.signature(f).parameters["encoder"].default for f in fits}
    assert set(defaults.values()) == {inspect.signature(hx.tl.embed_patches).parameters["encoder"].default}
    ad = hx.datasets.synthetic(n_sections=2, random_state=0)
    ad.obsm["X_resnet50"] = np.random.default_rng(0).normal(size=(ad.n_obs, 16)).astype(np.float32)
    model = hx.tl.fit_mclstexp(ad, genes="all", epochs=1, batch_size=32, n_heads=2, head_dim=8, n_ensemble=1)
    assert model.use_rep == "X_resnet50"
