"""hx.pp.select_genes / expression_matrix: highly variable genes as scanpy computes them, no side effects, errors."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

import histoexp as hx


def _scanpy_hvg(adata, n, *, flavor="seurat_v3", layer=None):
    """Top-n genes from sc.pp.highly_variable_genes run directly (in place) on a copy, most variable first."""
    ref = adata.copy()
    sc.pp.highly_variable_genes(ref, n_top_genes=n, flavor=flavor, layer=layer)
    var = ref.var[ref.var["highly_variable"]]
    # ties (genes alone in their mean bin get dispersions_norm 1.0) keep the order of var_names
    if flavor == "seurat_v3":
        return var.sort_values("highly_variable_rank", kind="stable").index.tolist()
    return var.sort_values("dispersions_norm", ascending=False, kind="stable").index.tolist()


def _snapshot(adata):
    """Everything select_genes could touch: matrices (by content and identity), annotations, uns."""
    mats = {"X": adata.X, **{f"layer {k}": v for k, v in adata.layers.items()}}
    return {
        "ids": {k: id(v) for k, v in mats.items()},
        "mats": {k: v.copy() for k, v in mats.items()},
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "uns_keys": sorted(adata.uns),
        "spatial": copy.deepcopy({k: v.get("scalefactors") for k, v in adata.uns.get("spatial", {}).items()}),
        "var_names": adata.var_names.copy(),
    }


def _assert_unchanged(adata, snap):
    mats = {"X": adata.X, **{f"layer {k}": v for k, v in adata.layers.items()}}
    assert {k: id(v) for k, v in mats.items()} == snap["ids"]
    for k, before in snap["mats"].items():
        now = mats[k]
        assert type(now) is type(before), k
        if sp.issparse(before):
            assert (now != before).nnz == 0, k
        else:
            np.testing.assert_array_equal(now, before)
    assert adata.obs.equals(snap["obs"]) and list(adata.obs.columns) == list(snap["obs"].columns)
    assert adata.var.equals(snap["var"]) and list(adata.var.columns) == list(snap["var"].columns)
    assert sorted(adata.uns) == snap["uns_keys"]
    assert adata.var_names.equals(snap["var_names"])


@pytest.fixture(scope="module")
def synth():
    """Two synthetic sections, built once for this module: every test copies before changing anything."""
    return hx.datasets.synthetic(n_sections=2, random_state=0)


@pytest.fixture
def no_densify(monkeypatch):
    """Fail if a sparse matrix is turned into a dense one (all genes at once would not fit for large data)."""

    def boom(self, *args, **kwargs):
        raise AssertionError("a sparse matrix was densified")

    for cls in (sp.csr_matrix, sp.csc_matrix, sp.csr_array, sp.csc_array):
        monkeypatch.setattr(cls, "toarray", boom)
        monkeypatch.setattr(cls, "todense", boom, raising=False)


# ------------------------------------------------------------------------------------------------ synthetic
@pytest.mark.parametrize("n", [5, 12, 40])
def test_hvg_matches_scanpy_seurat_v3_and_leaves_input_alone(synth, n):
    snap = _snapshot(synth)
    expected = _scanpy_hvg(synth, n)
    assert len(expected) == n
    assert hx.pp.select_genes(synth, n) == expected
    assert hx.pp.select_genes(synth, n_top=n) == expected  # genes=None
    _assert_unchanged(synth, snap)


def test_hvg_is_not_dispersion_of_log_data(synth):
    """The old behaviour (dispersion of log-normalised values) picks other genes: the test above can fail."""
    log = synth.copy()
    sc.pp.normalize_total(log, target_sum=1e4)
    sc.pp.log1p(log)
    assert set(hx.pp.select_genes(synth, 10)) != set(_scanpy_hvg(log, 10, flavor="seurat"))


def test_hvg_stays_sparse(synth, no_densify):
    snap_x = synth.X.copy()
    genes = hx.pp.select_genes(synth, 10)
    assert len(genes) == 10
    assert sp.issparse(synth.X) and (synth.X != snap_x).nnz == 0


def test_hvg_from_counts_layer(synth):
    """Counts in a layer, log-normalised values in X: the layer is ranked; X and the layer stay as they are."""
    a = synth.copy()
    a.layers["counts"] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    snap = _snapshot(a)
    assert hx.pp.select_genes(a, 10, layer="counts") == _scanpy_hvg(a, 10, layer="counts")
    _assert_unchanged(a, snap)
    with pytest.raises(KeyError, match="layer='nope'"):
        hx.pp.select_genes(a, 10, layer="nope")


def test_hvg_of_log_normalised_values_uses_seurat(synth, caplog, no_densify):
    """Values that are not counts cannot go through seurat_v3: 'seurat' on the sparse values, with a warning."""
    a = synth.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.uns.pop("log1p")  # as if the data came log-normalised from elsewhere
    snap = _snapshot(a)
    with caplog.at_level(logging.WARNING, logger="histoexp"):
        genes = hx.pp.select_genes(a, 10)
    assert "flavor='seurat'" in caplog.text
    _assert_unchanged(a, snap)
    assert genes == _scanpy_hvg(a, 10, flavor="seurat")


def test_hvg_of_a_view(synth):
    """A view (a subset of spots or genes) is ranked like its copy, and stays a view."""
    view = synth[synth.obs["library_id"] == "S1", 5:]
    assert view.is_view
    assert hx.pp.select_genes(view, 8) == _scanpy_hvg(view.copy(), 8)
    assert view.is_view


def test_gene_lists_and_keywords(synth):
    assert hx.pp.select_genes(synth, ["gene003", "gene001", "gene003"]) == ["gene003", "gene001"]
    assert hx.pp.select_genes(synth, "gene002") == ["gene002"]
    assert hx.pp.select_genes(synth, "all") == list(synth.var_names)
    assert hx.pp.select_genes(synth, 10_000) == _scanpy_hvg(synth, synth.n_vars)  # capped at n_vars


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"genes": []}, r"`genes`: got an empty list"),
        ({"genes": ()}, r"`genes`: got an empty list"),
        ({"genes": 0}, r"`genes` must be a positive number .*got 0"),
        ({"genes": -5}, r"`genes` must be a positive number .*got -5"),
        ({"genes": np.int64(0)}, r"`genes` must be a positive number"),
        ({"genes": True}, r"`genes` must be a positive number .*got True"),
        ({"genes": None, "n_top": 0}, r"`n_top` \(used as `genes=None`\) must be a positive number .*got 0"),
        ({"n_top": -1}, r"`n_top`.*got -1"),
        ({"n_top": 2.5}, r"`n_top`.*got 2.5"),
    ],
)
def test_select_genes_bad_numbers_and_empty(synth, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hx.pp.select_genes(synth, **kwargs)


def test_duplicated_var_names(synth):
    a = synth.copy()
    names = a.var_names.tolist()
    names[5], names[7] = "gene001", "gene002"
    a.var_names = names
    match = r"`adata`: found 2 duplicated var_names \(e\.g\. \['gene001', 'gene002'\]\).*var_names_make_unique\(\)"
    for genes in (None, 10, "all", ["gene003"], "her2st"):
        with pytest.raises(ValueError, match=match):
            hx.pp.select_genes(a, genes)
    for genes in (None, ["gene003"], ["gene001"]):
        with pytest.raises(ValueError, match=match):
            hx.pp.expression_matrix(a, genes)
    a.var_names_make_unique()  # the suggested fix works
    assert len(hx.pp.select_genes(a, 10)) == 10
    assert hx.pp.expression_matrix(a, ["gene001"]).shape == (a.n_obs, 1)


# ------------------------------------------------------------------------------------------------ real data
def test_hvg_real_her2st_c2(her2st_c2):
    a = her2st_c2
    snap = _snapshot(a)
    assert sp.issparse(a.X) and a.n_vars > 10_000
    expected = _scanpy_hvg(a, 250)
    genes = hx.pp.select_genes(a)  # default: n_top=250
    assert genes == expected
    assert hx.pp.select_genes(a, 50) == expected[:50]  # the ranking does not depend on how many are asked for
    _assert_unchanged(a, snap)
    assert "SCGB2A2" in genes[:20]  # mammaglobin, a breast-tissue marker that varies across C2
