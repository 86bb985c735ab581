"""Chunked top-k retrieval with pluggable weightings: query embeddings -> k nearest reference rows -> values.

Memory is bounded by the chunk: for each chunk of query rows the similarity block ``(chunk, n_bank)`` is
computed, its top-k taken, the weights of the k neighbours computed by the chosen weighting, and the
aggregation done at once with a sparse ``(chunk, n_bank)`` weight matrix times the bank values, so nothing
of size ``n_query × n_bank`` or ``n_query × k × n_genes`` is ever held. Each query row is computed
independently of the others, so the result does not depend on the chunk size.

Weightings (:data:`WEIGHTINGS`; add one with :func:`register_weighting`) receive a :class:`TopK` and
return ``(chunk, k)`` non-negative weights (normalised afterwards).

The neighbour search is exact by default (the similarity blocks above). For references of millions of spots,
``index='faiss-ivf'`` or ``'faiss-hnsw'`` search an approximate index of the optional dependency faiss
(``pip install histoexp[ann]``, i.e. ``faiss-cpu``), built over the L2-normalised reference embeddings with the
inner-product metric: the same cosine ranking as the exact search, only approximate. The weightings then
run unchanged on the neighbours found (they recompute their distances from the raw vectors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .._settings import logger
from .._utils import progress

_SIM_BUDGET_BYTES = 256 * 2**20  # size of one similarity block
_GATHER_BUDGET_BYTES = 128 * 2**20  # size of one gathered (rows, k, d) block (L1 distances)
_ADD_BLOCK = 1 << 18  # reference rows normalised and added to a faiss index at a time


@dataclass
class TopK:
    """The k nearest bank rows of a chunk of queries (torch tensors on the retrieval device).

    ``cos`` ``(B, k)`` cosine similarities (descending), ``idx`` ``(B, k)`` bank rows, ``query``
    ``(B, d)`` raw query embeddings, ``bank`` ``(n_bank, d)`` raw bank embeddings, ``query_norm``
    ``(B,)`` and ``bank_norm`` ``(n_bank,)`` their Euclidean norms.
    """

    cos: object
    idx: object
    query: object
    bank: object
    query_norm: object
    bank_norm: object


#: Weightings by name: ``fn(TopK) -> (B, k) weights``.
WEIGHTINGS: dict[str, Callable[[TopK], object]] = {}


def register_weighting(name: str, *, overwrite: bool = False):
    """Register a retrieval weighting under ``name``, usable as ``hx.tl.impute(..., method=name)``.

    A decorator. The function receives the ``k`` nearest reference spots of a block of query spots as an
    object with the torch tensors ``cos`` ``(B, k)`` (cosine similarities, descending), ``idx`` ``(B, k)``
    (reference rows), ``query`` ``(B, d)`` and ``bank`` ``(n_reference, d)`` (the raw embeddings),
    ``query_norm`` ``(B,)`` and ``bank_norm`` ``(n_reference,)`` (their Euclidean norms); it returns
    ``(B, k)`` non-negative weights, which are normalised to sum to one per query spot. Its docstring's first
    line is what :func:`retrieval_weightings` lists.

    Parameters
    ----------
    name
        The ``method`` name.
    overwrite
        Replace a weighting already registered under ``name``.

    Examples
    --------
    >>> import histoexp as hx
    >>> @hx.tl.register_weighting("softmax_cos")  # doctest: +SKIP
    ... def softmax_cos(t):
    ...     '''Softmax of the cosine similarities (temperature 0.1).'''
    ...     return (t.cos / 0.1).softmax(1)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}.")
    if name in WEIGHTINGS and not overwrite:
        raise ValueError(
            f"`name={name!r}` is already a registered weighting; pass `overwrite=True` to replace it, or choose "
            "another name."
        )

    def deco(fn):
        if not callable(fn):
            raise TypeError(f"register_weighting({name!r}) decorates a function, got {type(fn).__name__}.")
        WEIGHTINGS[name] = fn
        return fn

    return deco


def retrieval_weightings() -> dict[str, str]:
    """List the retrieval weightings ``hx.tl.impute(method=...)`` accepts, with a one-line description of each.

    Built in: ``'average'`` (BLEEP's default, the mean of the top ``k``), ``'simple'`` (the nearest reference
    spot), ``'weighted'`` (BLEEP's ``weighted_average``), ``'inverse_distance'`` (mclSTExp) and
    ``'inverse_distance_l2'``; add one with :func:`register_weighting`.

    Returns
    -------
    dict
        ``{name: description}`` in registration order.
    """
    out = {}
    for name, fn in WEIGHTINGS.items():
        doc = (fn.__doc__ or "").strip()
        out[name] = doc.splitlines()[0] if doc else ""
    return out


@register_weighting("average")
def _average(t: TopK):
    """BLEEP's default: the plain mean of the top k reference spots."""
    import torch

    return torch.ones_like(t.cos)


@register_weighting("simple")
def _simple(t: TopK):
    """BLEEP's 'simple': the expression of the nearest reference spot (k is set to 1)."""
    return _average(t)


def _neighbour_distances(t: TopK, *, p: int, normalise: bool):
    """``(B, k)`` L``p`` distances between each query and its neighbours, gathered in bounded blocks.

    Computed row by row from the vectors (not from the cosines), so a row's result does not depend on the
    chunk it was computed in.
    """
    import torch

    q, b = t.query, t.bank
    if normalise:
        q = q / torch.clamp(t.query_norm[:, None], min=1e-12)
        b = b / torch.clamp(t.bank_norm[:, None], min=1e-12)
    k, d = t.idx.shape[1], b.shape[1]
    step = max(1, _GATHER_BUDGET_BYTES // (4 * k * d))
    out = []
    for a in range(0, len(q), step):
        diff = q[a : a + step, None, :] - b[t.idx[a : a + step]]
        out.append(diff.abs().sum(-1) if p == 1 else (diff * diff).sum(-1))
    return torch.cat(out)


@register_weighting("weighted")
def _bleep_weighted(t: TopK):
    """BLEEP's weighted_average: weights exp(-(d_i² - min_j d_j²)), d Euclidean on the raw embeddings."""
    import torch

    d2 = _neighbour_distances(t, p=2, normalise=False)
    return torch.exp(-(d2 - d2.min(1, keepdim=True).values))


def _inverse_square(d):
    import torch

    return 1.0 / torch.clamp(d * d, min=1e-12)


@register_weighting("inverse_distance")
def _inverse_l1(t: TopK):
    """As mclSTExp: 1/d², d the L1 distance of the L2-normalised embeddings."""
    return _inverse_square(_neighbour_distances(t, p=1, normalise=True))


@register_weighting("inverse_distance_l2")
def _inverse_l2(t: TopK):
    """1/d², d the Euclidean distance of the L2-normalised embeddings."""
    import torch

    return 1.0 / torch.clamp(_neighbour_distances(t, p=2, normalise=True), min=1e-12)


METHODS = tuple(WEIGHTINGS)

#: Neighbour searches of :func:`retrieve`: exact (default) and the approximate faiss indexes.
INDEXES = ("exact", "faiss-ivf", "faiss-hnsw")
#: Parameters of the faiss indexes and their defaults (``None``: chosen from the reference size, see
#: :func:`_index_params`).
INDEX_DEFAULTS = {
    "faiss-ivf": {"nlist": None, "nprobe": 32, "train_size": None},
    "faiss-hnsw": {"M": 32, "ef_construction": 80, "ef_search": 128},
}


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "`index='faiss-ivf'`/`'faiss-hnsw'` needs faiss: `pip install histoexp[ann]` (or `pip install faiss-cpu`); "
            "`index='exact'` (the default) needs nothing more."
        ) from err
    return faiss


def _index_params(index: str, params: dict | None, n_bank: int) -> dict:
    """Resolve (and validate) the parameters of a faiss index for a reference of ``n_bank`` spots."""
    defaults = INDEX_DEFAULTS[index]
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"`index_params` for {index!r} accepts {sorted(defaults)}, got unknown {unknown}.")
    out = {**defaults, **{k: v for k, v in params.items() if v is not None}}
    if index == "faiss-ivf":
        if out["nlist"] is None:
            # ~sqrt(n) lists (faiss' guide: 4..16 sqrt(n) for the best speed at search, but k-means and the
            # assignment of every spot then cost 4..16 times more on a CPU), and >= 39 training spots per list
            out["nlist"] = int(max(1, min(round(np.sqrt(n_bank)), n_bank // 39)))
        if out["train_size"] is None:
            out["train_size"] = int(min(n_bank, 64 * out["nlist"]))
        out["nprobe"] = min(int(out["nprobe"]), int(out["nlist"]))
    for name, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"`index_params[{name!r}]` must be an integer >= 1, got {v!r}.")
    if index == "faiss-ivf":  # faiss' k-means fails in C++ on these: say it here, naming the parameter
        if out["nlist"] > n_bank:
            raise ValueError(
                f"`index_params['nlist']={out['nlist']}` is larger than the reference ({n_bank} spots): k-means cannot "
                f"make more lists than spots. Pass nlist <= {n_bank} (about sqrt(n) is usual), or leave it unset."
            )
        if out["train_size"] < out["nlist"]:
            raise ValueError(
                f"`index_params['train_size']={out['train_size']}` is below `nlist={out['nlist']}`: k-means needs at "
                "least one training spot per list (39 or more is usual). Pass a larger train_size or a smaller nlist."
            )
    return {k: int(v) for k, v in out.items()}


class _FaissSearch:
    """An approximate cosine top-k search over the reference (faiss, inner product of normalised vectors)."""

    def __init__(self, bank: np.ndarray, bank_norm: np.ndarray, index: str, params: dict, block: int) -> None:
        faiss = _import_faiss()
        n, d = bank.shape
        self.params = _index_params(index, params, n)
        p = self.params
        self.bank, self.bank_norm = bank, np.maximum(bank_norm, 1e-12)
        if index == "faiss-ivf":
            quantizer = faiss.IndexFlatIP(d)
            self.index = faiss.IndexIVFFlat(quantizer, d, p["nlist"], faiss.METRIC_INNER_PRODUCT)
            # k-means on an evenly spaced subset (deterministic); faiss seeds its own k-means
            rows = np.linspace(0, n - 1, p["train_size"]).astype(np.int64)
            self.index.train(self._normed(rows))
            self.index.nprobe = p["nprobe"]
        else:
            self.index = faiss.IndexHNSWFlat(d, p["M"], faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = p["ef_construction"]
            self.index.hnsw.efSearch = p["ef_search"]
        self._quantizer = self.index.quantizer if index == "faiss-ivf" else None  # keep it alive
        for a in range(0, n, block):  # normalised copies one block at a time: faiss holds the only full copy
            self.index.add(self._normed(np.arange(a, min(a + block, n))))

    def _normed(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.bank[rows] / self.bank_norm[rows, None], dtype=np.float32)

    def __call__(self, q_raw, k: int):
        import torch

        q = q_raw.detach().cpu().numpy().astype(np.float32)
        q = np.ascontiguousarray(q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12))
        sims, idx = self.index.search(q, k)
        short = np.flatnonzero((idx < 0).any(1))  # fewer than k found (IVF lists probed too small): exact rows
        if len(short):
            logger.debug("faiss found fewer than %d neighbours for %d queries: exact search for them.", k, len(short))
            step = auto_chunk_size(len(self.bank))
            for a in range(0, len(short), step):
                rows = short[a : a + step]
                exact = torch.from_numpy((q[rows] @ self.bank.T) / self.bank_norm[None, :])
                top, ids = torch.topk(exact, k, dim=1)
                sims[rows], idx[rows] = top.numpy(), ids.numpy()
        dev = q_raw.device
        return torch.from_numpy(sims).to(dev), torch.from_numpy(idx.astype(np.int64)).to(dev)


def auto_chunk_size(n_bank: int) -> int:
    """Query rows per chunk so that one float32 ``(chunk, n_bank)`` block stays within 256 MiB."""
    return int(max(1, min(16384, _SIM_BUDGET_BYTES // (4 * max(n_bank, 1)))))


def retrieve(
    query_emb: np.ndarray,
    bank_emb: np.ndarray,
    bank_values: np.ndarray,
    *,
    k: int = 50,
    method: str = "average",
    chunk_size: int | None = None,
    device=None,
    desc: str = "retrieval",
    index: str = "exact",
    index_params: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict values for each query row from its top-k most similar bank rows.

    Neighbours are ranked by the cosine of the embeddings (both sides L2-normalised, as BLEEP's
    ``find_matches`` and mclSTExp's retrieval).

    Parameters
    ----------
    query_emb
        ``(n_query, d)`` query (image) embeddings, as produced by the model (not normalised).
    bank_emb
        ``(n_bank, d)`` reference embeddings.
    bank_values
        ``(n_bank, n_genes)`` values to aggregate (reference expression).
    k
        Neighbours (clipped to ``n_bank``); ``method='simple'`` uses 1.
    method
        A weighting of :data:`WEIGHTINGS`: ``'simple'`` (nearest row), ``'average'`` (mean of the top k),
        ``'weighted'`` (BLEEP's softmax of ``-d²`` of the unnormalised embeddings),
        ``'inverse_distance'`` (mclSTExp: ``1/d²``, ``d`` the L1 distance of the normalised embeddings),
        ``'inverse_distance_l2'`` (the same with the Euclidean distance).
    chunk_size
        Query rows per block (``None``: :func:`auto_chunk_size`).
    device
        Torch device for the similarity products (``None``: CPU).
    desc
        Progress bar label.
    index
        Neighbour search: ``'exact'`` (default), ``'faiss-ivf'`` or ``'faiss-hnsw'`` (approximate, see
        :func:`histoexp.tl.nearest_neighbours`).
    index_params
        Parameters of a faiss index (see :func:`histoexp.tl.nearest_neighbours`).

    Returns
    -------
    ``(prediction (n_query, n_genes) float32, confidence (n_query,) float32)`` with confidence the mean
    cosine similarity of the neighbours used (top 1 for 'simple', top k otherwise).
    """
    import torch

    if method not in WEIGHTINGS:
        raise ValueError(f"`method` must be one of {tuple(WEIGHTINGS)}, got {method!r}.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:  # True is an int: not 1 neighbour
        raise ValueError(f"`k` must be an integer >= 1 (neighbours), got {k!r}.")
    n_bank = bank_emb.shape[0]
    if n_bank == 0:
        raise ValueError("The reference bank is empty.")
    if bank_values.shape[0] != n_bank:
        raise ValueError(f"bank_values has {bank_values.shape[0]} rows for {n_bank} bank embeddings.")
    arrays = {"query embeddings": query_emb, "reference embeddings": bank_emb, "reference values": bank_values}
    for name, arr in arrays.items():
        if not np.isfinite(arr).all():
            raise ValueError(f"The {name} contain NaN or infinite values; retrieval would rank them first.")
    if method == "simple":
        k = 1
    if k > n_bank:
        logger.warning("k=%d is larger than the reference (%d spots); using k=%d.", k, n_bank, n_bank)
        k = n_bank
    device = torch.device("cpu") if device is None else torch.device(device)
    bank_raw, bank_norm, search, chunk_size = _searcher(bank_emb, index, index_params, chunk_size, device)
    values = np.asarray(bank_values, dtype=np.float32)
    n_query = query_emb.shape[0]
    pred = np.empty((n_query, values.shape[1]), dtype=np.float32)
    conf = np.empty(n_query, dtype=np.float32)
    weigh = WEIGHTINGS[method]
    starts = range(0, n_query, chunk_size)
    for a in progress(starts, desc=desc, total=len(starts), leave=False):
        b = min(a + chunk_size, n_query)
        q_raw = torch.as_tensor(np.asarray(query_emb[a:b], dtype=np.float32), device=device)
        top, idx = search(q_raw, k)
        conf[a:b] = top.mean(1).cpu().numpy()
        w = weigh(TopK(top, idx, q_raw, bank_raw, q_raw.norm(dim=-1), bank_norm))
        w = w / w.sum(1, keepdim=True)
        rows = np.repeat(np.arange(b - a), k)
        W = sp.csr_matrix((w.cpu().numpy().ravel(), (rows, idx.cpu().numpy().ravel())), shape=(b - a, n_bank))
        pred[a:b] = W @ values
    return pred, conf


def _searcher(bank_emb, index: str, index_params: dict | None, chunk_size: int | None, device):
    """Return ``(bank tensor, bank norms, search(q_raw, k) -> (cos, idx), chunk size)`` for ``index``."""
    import torch
    import torch.nn.functional as F

    if index not in INDEXES:
        raise ValueError(f"`index` must be one of {INDEXES}, got {index!r}.")
    if index == "exact" and index_params:
        raise ValueError("`index_params` apply to the faiss indexes, not to `index='exact'`.")
    n_bank = len(bank_emb)
    if chunk_size is None:
        chunk_size = auto_chunk_size(n_bank) if index == "exact" else 16384
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    bank_raw = torch.as_tensor(np.asarray(bank_emb, dtype=np.float32), device=device)
    bank_norm = bank_raw.norm(dim=-1)
    if index == "exact":
        bank_n = F.normalize(bank_raw, dim=-1)

        def search(q_raw, k):
            return torch.topk(F.normalize(q_raw, dim=-1) @ bank_n.T, k, dim=1)

        return bank_raw, bank_norm, search, chunk_size
    bank_np = np.asarray(bank_emb, dtype=np.float32)
    search = _FaissSearch(bank_np, bank_norm.cpu().numpy(), index, index_params, block=_ADD_BLOCK)
    return bank_raw, bank_norm, search, chunk_size


def nearest_neighbours(
    query_emb: np.ndarray,
    bank_emb: np.ndarray,
    k: int,
    *,
    index: str = "exact",
    index_params: dict | None = None,
    chunk_size: int | None = None,
    device=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` reference rows of each query row by cosine similarity, exact or from an approximate index.

    Parameters
    ----------
    query_emb, bank_emb
        ``(n_query, d)`` and ``(n_reference, d)`` embeddings (not normalised).
    k
        Neighbours per query (at most ``n_reference``).
    index
        ``'exact'``: chunked matrix products and top-k (memory bounded by the chunk). ``'faiss-ivf'``: faiss
        ``IndexIVFFlat`` (inverted lists of the normalised vectors, inner product): k-means into ``nlist``
        lists (default ``round(sqrt(n_reference))``, at most ``n_reference // 39``) trained on ``train_size``
        evenly spaced reference rows (default ``64 * nlist``), ``nprobe`` lists searched per query (default
        32); deterministic. ``'faiss-hnsw'``: faiss ``IndexHNSWFlat`` (graph; ``M`` 32, ``ef_construction``
        80, ``ef_search`` 128); faster to query at high recall but slow to build, and its parallel build is
        not bit-reproducible. Queries for which an IVF search finds fewer than ``k`` rows are searched
        exactly. ``benchmarks/scale_retrieval.py`` reports recall against the exact search.
    index_params
        Overrides of those parameters (``dict``; ``None`` values keep the default).
    chunk_size
        Query rows per block (``None``: automatic).
    device
        Torch device of the exact search (``None``: CPU). The faiss indexes run on the CPU.

    Returns
    -------
    ``(cos (n_query, k) float32, idx (n_query, k) int64)``, each row by decreasing similarity.
    """
    import torch

    if not isinstance(k, (int, np.integer)) or not 1 <= k <= len(bank_emb):
        raise ValueError(f"`k` must be an integer in [1, {len(bank_emb)}], got {k!r}.")
    device = torch.device("cpu") if device is None else torch.device(device)
    _, _, search, chunk_size = _searcher(bank_emb, index, index_params, chunk_size, device)
    n = len(query_emb)
    cos = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        q = torch.as_tensor(np.asarray(query_emb[a:b], dtype=np.float32), device=device)
        top, ids = search(q, int(k))
        cos[a:b], idx[a:b] = top.cpu().numpy(), ids.cpu().numpy()
    return cos, idx
