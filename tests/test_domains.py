import numpy as np
import pandas as pd
import pytest

import histoexp as hx
from histoexp.tl._domains import ari


def test_domains_recovered_from_good_prediction(synth):
    rng = np.random.default_rng(0)
    X = hx.pp.expression_matrix(synth)
    synth.layers["bleep"] = X + rng.normal(0, 0.05, X.shape)
    synth.layers["shuffled"] = X[rng.permutation(synth.n_obs)]
    hx.tl.spatial_domains(synth, layer=None)
    assert isinstance(synth.obs["measured_domains"].dtype, pd.CategoricalDtype)
    assert synth.uns["measured_domains"]["n_domains"] >= 2
    hx.tl.spatial_domains(synth, layer="bleep", compare="measured_domains")  # two prediction layers: name one
    hx.tl.spatial_domains(synth, layer="shuffled", compare="measured_domains")
    good, bad = synth.uns["bleep_domains"]["ari"], synth.uns["shuffled_domains"]["ari"]
    assert good > 0.6, good
    assert bad < 0.2, bad
    assert good == pytest.approx(ari(synth, "bleep_domains", "measured_domains"))
    # spatial smoothing: with the spatial graph, neighbouring spots share a domain more often
    hx.tl.spatial_domains(synth, layer="shuffled", use_spatial=False, key_added="plain")

    def same_neighbour_rate(key):
        import squidpy as sq

        tmp = synth.copy()
        sq.gr.spatial_neighbors_knn(tmp, n_neighs=4, library_key="library_id")
        i, j = tmp.obsp["spatial_connectivities"].nonzero()
        lab = tmp.obs[key].to_numpy()
        return np.mean(lab[i] == lab[j])

    assert same_neighbour_rate("shuffled_domains") > same_neighbour_rate("plain")


def test_domains_reproducible_and_keys(synth):
    X = hx.pp.expression_matrix(synth)
    synth.layers["bleep"] = X
    synth.layers["bleep"][:, 0] = np.nan  # a gene without prediction is ignored
    hx.tl.spatial_domains(synth, n_pcs=10)
    first = synth.obs["bleep_domains"].copy()
    assert synth.uns["bleep_domains"]["params"]["n_genes"] == synth.n_vars - 1
    hx.tl.spatial_domains(synth, n_pcs=10)  # a re-run replaces its own domains: the same ones
    assert (synth.obs["bleep_domains"] == first).all()
    synth.obs["bleep_domains"] = synth.obs["bleep_domains"].astype(str)  # now the user's column
    with pytest.raises(KeyError, match="changed since histoexp wrote it.*overwrite"):
        hx.tl.spatial_domains(synth, n_pcs=10)
    hx.tl.spatial_domains(synth, n_pcs=10, overwrite=True)
    assert (synth.obs["bleep_domains"] == first).all()
    with pytest.raises(KeyError, match="compare"):
        hx.tl.spatial_domains(synth, key_added="x", compare="nope")
    with pytest.raises(KeyError, match="layer"):
        hx.tl.spatial_domains(synth, layer="nope")


def test_domains_real_section(her2st_c2):
    a = her2st_c2.copy()
    genes = hx.pp.select_genes(a, 200)
    X = hx.pp.expression_matrix(a, genes)
    idx = a.var_names.get_indexer(genes)
    rng = np.random.default_rng(0)
    pred = np.full(a.shape, np.nan, np.float32)  # as impute writes it: NaN outside the predicted genes
    pred[:, idx] = X  # a perfect prediction must give the measured domains exactly
    a.layers["bleep"] = pred
    shuffled = np.full(a.shape, np.nan, np.float32)
    shuffled[:, idx] = X[rng.permutation(a.n_obs)]
    a.layers["shuffled"] = shuffled
    hx.tl.spatial_domains(a, layer=None, genes=genes)
    hx.tl.spatial_domains(a, layer="bleep", genes=genes, compare="measured_domains")
    hx.tl.spatial_domains(a, layer="shuffled", genes=genes, compare="measured_domains")
    assert 2 <= a.uns["measured_domains"]["n_domains"] <= 12
    assert a.uns["bleep_domains"]["params"]["n_genes"] == 200
    assert a.uns["bleep_domains"]["ari"] == pytest.approx(1.0)
    assert a.uns["shuffled_domains"]["ari"] < 0.15


def test_domains_clear_errors_on_too_few_spots_and_bad_settings(synth):
    tiny = synth[:4].copy()
    with pytest.raises(ValueError, match="at least 7 spots"):
        hx.tl.spatial_domains(tiny, layer=None)
    with pytest.raises(ValueError, match="n_pcs"):
        hx.tl.spatial_domains(synth, layer=None, n_pcs=0)
    with pytest.raises(ValueError, match="resolution"):
        hx.tl.spatial_domains(synth, layer=None, resolution=0)
    assert "measured_domains" not in synth.obs


def test_domains_do_not_depend_on_gene_order(her2st_c2):
    import anndata as ad

    panel = [g for g in hx.datasets.her2st_gene_panel() if g in her2st_c2.var_names]
    truth = hx.pp.expression_matrix(her2st_c2, panel)
    pred = truth + np.random.default_rng(0).normal(scale=0.3, size=truth.shape).astype(np.float32)
    aris = []
    for seed in (None, 1):
        perm = np.arange(len(panel)) if seed is None else np.random.default_rng(seed).permutation(len(panel))
        a = ad.AnnData(obs=her2st_c2.obs.copy(), var=pd.DataFrame(index=[panel[i] for i in perm]))
        a.obsm["spatial"] = her2st_c2.obsm["spatial"]
        a.layers["measured"], a.layers["pred"] = truth[:, perm], pred[:, perm]
        hx.tl.spatial_domains(a, layer="measured")
        hx.tl.spatial_domains(a, layer="pred", compare="measured_domains")
        aris.append(a.uns["pred_domains"]["ari"])
    assert aris[0] == aris[1]


def test_domains_silent_at_verbosity_0(synth, capfd):
    import logging

    from histoexp._utils import import_squidpy

    import_squidpy()  # imported first, so its loggers exist with their own levels

    sq_logger = logging.getLogger("spatialdata._logging")
    before = sq_logger.level
    old = hx.settings.verbosity
    hx.settings.verbosity = 0
    try:
        capfd.readouterr()
        hx.tl.spatial_domains(synth, layer=None, key_added="quiet_domains")
        out, err = capfd.readouterr()
    finally:
        hx.settings.verbosity = old
    assert "quiet_domains" in synth.obs
    assert out == "" and err == "", f"stdout={out!r} stderr={err!r}"
    assert sq_logger.level == before  # the library's own level is restored


def test_domains_fresh_process_prints_nothing():
    # squidpy's import (docrep SyntaxWarnings) and its INFO lines: in a fresh interpreter, where they happen
    import subprocess
    import sys

    code = (
        "import histoexp as hx; hx.settings.verbosity = 0; a = hx.datasets.synthetic(); "
        "hx.tl.spatial_domains(a, layer=None)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout == "" and res.stderr == "", f"stdout={res.stdout!r} stderr={res.stderr!r}"
