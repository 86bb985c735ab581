"""Chunked top-k retrieval: query embeddings -> k nearest reference embeddings -> aggregated values.

Memory is bounded by the chunk: for each chunk of query rows the similarity block
``(chunk, n_bank)`` is computed, its top-k taken, and the aggregation done at once with a sparse
``(chunk, n_bank)`` weight matrix times the bank values, so nothing of size ``n_query × n_bank`` or
``n_query × k × n_genes`` is ever held. Each query row is computed independently of the others, so
the result does not depend on the chunk size.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._settings import logger
from .._utils import progress

METHODS = ("simple", "average", "weighted")
_SIM_BUDGET_BYTES = 256 * 2**20  # size of one similarity block


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
) -> tuple[np.ndarray, np.ndarray]:
    """Predict values for each query row from its top-k most similar bank rows.

    Similarity is the cosine of the embeddings (both sides L2-normalised, as BLEEP's ``find_matches``).

    Parameters
    ----------
    query_emb
        ``(n_query, d)`` query (image) embeddings, as produced by the model (not normalised).
    bank_emb
        ``(n_bank, d)`` reference (expression) embeddings.
    bank_values
        ``(n_bank, n_genes)`` values to aggregate (reference expression).
    k
        Neighbours (clipped to ``n_bank``); ``method='simple'`` uses 1.
    method
        ``'simple'``: the nearest bank row. ``'average'``: mean of the top ``k``. ``'weighted'``:
        mean of the top ``k`` weighted by ``exp(-(d_i^2 - min_j d_j^2))`` where ``d`` is the Euclidean
        distance between the *unnormalised* embeddings, as in BLEEP's ``weighted_average`` (equivalently
        a softmax of ``-d^2`` over the top ``k``).
    chunk_size
        Query rows per block (``None``: :func:`auto_chunk_size`).
    device
        Torch device for the similarity products (``None``: CPU).

    Returns
    -------
    ``(prediction (n_query, n_genes) float32, confidence (n_query,) float32)`` with confidence the mean
    cosine similarity of the neighbours used (top 1 for 'simple', top k otherwise).
    """
    import torch
    import torch.nn.functional as F

    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    n_bank = bank_emb.shape[0]
    if n_bank == 0:
        raise ValueError("The reference bank is empty.")
    if bank_values.shape[0] != n_bank:
        raise ValueError(f"bank_values has {bank_values.shape[0]} rows for {n_bank} bank embeddings.")
    if method == "simple":
        k = 1
    if k > n_bank:
        logger.warning("k=%d is larger than the reference (%d spots); using k=%d.", k, n_bank, n_bank)
        k = n_bank
    device = torch.device("cpu") if device is None else torch.device(device)
    chunk_size = auto_chunk_size(n_bank) if chunk_size is None else int(chunk_size)
    bank_raw = torch.as_tensor(np.asarray(bank_emb, dtype=np.float32), device=device)
    bank_n = F.normalize(bank_raw, dim=-1)
    bank_sq = (bank_raw * bank_raw).sum(-1)
    values = np.asarray(bank_values, dtype=np.float32)
    n_query = query_emb.shape[0]
    pred = np.empty((n_query, values.shape[1]), dtype=np.float32)
    conf = np.empty(n_query, dtype=np.float32)
    starts = range(0, n_query, chunk_size)
    for a in progress(starts, desc=desc, total=len(starts), leave=False):
        b = min(a + chunk_size, n_query)
        q_raw = torch.as_tensor(np.asarray(query_emb[a:b], dtype=np.float32), device=device)
        sims = F.normalize(q_raw, dim=-1) @ bank_n.T
        top, idx = torch.topk(sims, k, dim=1)
        conf[a:b] = top.mean(1).cpu().numpy()
        if method == "weighted":
            d2 = (q_raw * q_raw).sum(-1, keepdim=True) + bank_sq[idx] - 2 * (q_raw.unsqueeze(1) * bank_raw[idx]).sum(-1)
            w = torch.softmax(-(d2 - d2.min(1, keepdim=True).values), dim=1)
        else:
            w = torch.full(idx.shape, 1.0 / k, device=device)
        rows = np.repeat(np.arange(b - a), k)
        W = sp.csr_matrix((w.cpu().numpy().ravel(), (rows, idx.cpu().numpy().ravel())), shape=(b - a, n_bank))
        pred[a:b] = W @ values
    return pred, conf
