"""Approximate retrieval (faiss indexes) against the exact chunked search."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import histoexp as hx
from histoexp.tl._retrieval import WEIGHTINGS, retrieve

pytest.importorskip("faiss")  # the `ann` extra (part of the `test` extra, so CI runs these)


def _clustered(n, d=24, n_centres=60, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, d))
    return (centres[rng.integers(0, n_centres, n)] + 0.6 * rng.normal(size=(n, d))).astype(np.float32)


def _recall(a, b):
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b, strict=True)]))


@pytest.fixture(scope="module")
def data():
    bank = _clustered(6000, seed=0)
    query = _clustered(500, seed=1) * 3.0  # other norms than the bank: the ranking must be by cosine
    cos, idx = hx.tl.nearest_neighbours(query, bank, 20)
    return bank, query, cos, idx


def test_exact_search_is_cosine_top_k(data):
    bank, query, cos, idx = data
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    full = qn.astype(np.float64) @ bn.T.astype(np.float64)
    best = -np.sort(-full, axis=1)[:, :20]
    np.testing.assert_allclose(cos, best, atol=1e-5)  # the k largest cosines (row identity up to float ties)
    np.testing.assert_allclose(cos, np.take_along_axis(full, idx, 1), atol=1e-5)
    assert _recall(idx, np.argsort(-full, axis=1)[:, :20]) > 0.99


@pytest.mark.parametrize(("index", "params"), [("faiss-ivf", None), ("faiss-hnsw", None)])
def test_approximate_recall_against_exact(data, index, params):
    bank, query, cos, idx = data
    c, i = hx.tl.nearest_neighbours(query, bank, 20, index=index, index_params=params)
    assert _recall(i, idx) >= 0.95
    # the similarities reported are the true cosines of the rows found, in decreasing order
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    np.testing.assert_allclose(c, np.einsum("qd,qkd->qk", qn, bn[i]), atol=1e-5)
    assert (np.diff(c, axis=1) <= 1e-6).all()


def test_ivf_probing_every_list_is_exact_and_deterministic():
    rng = np.random.default_rng(3)  # unclustered: hard for an index, no ties
    bank, query = rng.normal(size=(3000, 16)).astype(np.float32), rng.normal(size=(300, 16)).astype(np.float32)
    _, exact = hx.tl.nearest_neighbours(query, bank, 10)
    _, i = hx.tl.nearest_neighbours(query, bank, 10, index="faiss-ivf", index_params={"nlist": 30, "nprobe": 30})
    np.testing.assert_array_equal(i, exact)
    _, few = hx.tl.nearest_neighbours(query, bank, 10, index="faiss-ivf", index_params={"nlist": 30, "nprobe": 1})
    _, again = hx.tl.nearest_neighbours(query, bank, 10, index="faiss-ivf", index_params={"nlist": 30, "nprobe": 1})
    np.testing.assert_array_equal(few, again)
    assert _recall(few, exact) < 0.9  # one list of 30 on unclustered data: a real approximation


def test_short_lists_fall_back_to_exact():
    rng = np.random.default_rng(4)
    bank, query = rng.normal(size=(400, 8)).astype(np.float32), rng.normal(size=(50, 8)).astype(np.float32)
    _, exact = hx.tl.nearest_neighbours(query, bank, 100)
    _, i = hx.tl.nearest_neighbours(query, bank, 100, index="faiss-ivf", index_params={"nlist": 10, "nprobe": 1})
    assert (i >= 0).all()
    np.testing.assert_array_equal(i, exact)  # each list holds ~40 rows < k: every query was searched exactly


@pytest.mark.parametrize("method", list(WEIGHTINGS))
def test_retrieve_with_full_probe_equals_exact(method):
    bank = _clustered(2000, d=12, seed=5)
    query = _clustered(200, d=12, seed=6)
    values = np.random.default_rng(7).gamma(2.0, size=(2000, 6)).astype(np.float32)
    p0, c0 = retrieve(query, bank, values, k=15, method=method)
    p1, c1 = retrieve(query, bank, values, k=15, method=method, index="faiss-ivf", index_params={"nprobe": 10**6})
    np.testing.assert_allclose(p1, p0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c1, c0, atol=1e-5)


def test_exact_default_is_unchanged():
    bank = _clustered(1500, d=10, seed=8)
    query = _clustered(100, d=10, seed=9)
    values = np.random.default_rng(10).normal(size=(1500, 4)).astype(np.float32)
    pred, conf = retrieve(query, bank, values, k=7, method="average", chunk_size=33)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sims = qn.astype(np.float64) @ bn.T.astype(np.float64)
    top = np.argsort(-sims, axis=1)[:, :7]
    np.testing.assert_allclose(pred, values[top].mean(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conf, np.take_along_axis(sims, top, 1).mean(1), atol=1e-6)


def test_errors(monkeypatch):
    bank = _clustered(300, d=6)
    with pytest.raises(ValueError, match="`index` must be one of"):
        hx.tl.nearest_neighbours(bank[:5], bank, 3, index="annoy")
    with pytest.raises(ValueError, match="index_params"):
        hx.tl.nearest_neighbours(bank[:5], bank, 3, index="faiss-ivf", index_params={"nprob": 4})
    with pytest.raises(ValueError, match="index_params"):
        hx.tl.nearest_neighbours(bank[:5], bank, 3, index="exact", index_params={"nprobe": 4})
    with pytest.raises(ValueError, match=r"index_params\['nprobe'\]"):
        hx.tl.nearest_neighbours(bank[:5], bank, 3, index="faiss-ivf", index_params={"nprobe": 0})
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss were not installed
    with pytest.raises(ImportError, match=r"histoexp\[ann\]"):
        hx.tl.nearest_neighbours(bank[:5], bank, 3, index="faiss-hnsw")
