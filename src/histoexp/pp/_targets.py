"""Expression targets: gene panels and log-normalisation, computed without touching the caller's data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import DEFAULT_TARGET_SUM
from .._settings import logger

Normalize = Literal["log1p", "none"]


def _matrix(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"`layer={layer!r}` is not in adata.layers (found {list(adata.layers)}).")
    return adata.layers[layer]


def _looks_like_counts(X) -> bool:
    data = X.data if sp.issparse(X) else np.asarray(X)
    sample = np.asarray(data).ravel()[:100_000]
    sample = sample[np.isfinite(sample)]
    return sample.size == 0 or (sample.min() >= 0 and np.allclose(sample, np.round(sample)))


def expression_matrix(
    adata: AnnData,
    genes: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    normalize: Normalize = "log1p",
    target_sum: float = DEFAULT_TARGET_SUM,
) -> np.ndarray:
    """Dense float32 expression of ``genes``, normalised as the models expect.

    With ``normalize='log1p'`` the counts are scaled to ``target_sum`` per spot using the library
    size over *all* genes of ``adata`` (as :func:`scanpy.pp.normalize_total` does) and then
    ``log1p``-transformed; the panel is selected afterwards. With ``'none'`` the values are used as
    they are (for data that is already log-normalised). The caller's ``X``/layers are never modified.

    Parameters
    ----------
    adata
        Annotated data with counts in ``X`` or ``layers[layer]``.
    genes
        Genes to return, in this order; ``None``: all of ``adata.var_names``.
    layer
        Layer to read instead of ``X``.
    normalize
        ``'log1p'`` or ``'none'``.
    target_sum
        Counts per spot after normalisation.

    Returns
    -------
    Array of shape ``(n_obs, n_genes)``.
    """
    if normalize not in ("log1p", "none"):
        raise ValueError(f"`normalize` must be 'log1p' or 'none', got {normalize!r}.")
    X = _matrix(adata, layer)
    if genes is None:
        idx = np.arange(adata.n_vars)
    else:
        genes = list(genes)
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(genes)} requested genes are not in adata.var_names (e.g. {missing[:5]})."
            )
        idx = adata.var_names.get_indexer(genes)
    if normalize == "none":
        out = X[:, idx]
        out = out.toarray() if sp.issparse(out) else np.asarray(out)
        return out.astype(np.float32, copy=True)
    if not _looks_like_counts(X):
        logger.warning(
            "normalize='log1p' was requested but the matrix does not look like raw counts "
            "(negative or non-integer values); pass normalize='none' if it is already log-normalised."
        )
    size = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    size[size == 0] = 1.0
    sub = X[:, idx]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    out = np.log1p(sub.astype(np.float64) / size[:, None] * target_sum)
    return out.astype(np.float32)


def select_genes(
    adata: AnnData,
    genes: Sequence[str] | str | int | None = None,
    *,
    layer: str | None = None,
    n_top: int = 250,
) -> list[str]:
    """Resolve a gene selection to a list of gene names present in ``adata``.

    Parameters
    ----------
    adata
        Annotated data with counts.
    genes
        A list of gene names (kept in order; missing genes raise), ``'her2st'`` for the 785-gene
        panel of :func:`histoexp.datasets.her2st_gene_panel` (intersected with ``adata``), an
        integer ``n`` for the ``n`` most highly variable genes, ``'all'``, or ``None`` for the
        ``n_top`` most highly variable genes (``scanpy.pp.highly_variable_genes``, flavour
        ``'seurat_v3'`` on counts).
    layer
        Layer with counts instead of ``X``.
    n_top
        Number of highly variable genes when ``genes`` is ``None``.
    """
    if isinstance(genes, str) and genes == "all":
        return list(adata.var_names)
    if isinstance(genes, str) and genes == "her2st":
        from ..datasets import her2st_gene_panel

        panel = her2st_gene_panel()
        present = [g for g in panel if g in adata.var_names]
        if not present:
            raise KeyError("None of the her2st panel genes are in adata.var_names.")
        if len(present) < len(panel):
            logger.info("her2st panel: %d of %d genes present in the data.", len(present), len(panel))
        return present
    if genes is None or isinstance(genes, (int, np.integer)):
        n = n_top if genes is None else int(genes)
        if n <= 0:
            raise ValueError(f"`genes` as a number must be positive, got {n}.")
        return highly_variable(adata, n, layer=layer)
    if isinstance(genes, str):
        genes = [genes]
    genes = list(dict.fromkeys(genes))
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"{len(missing)} of {len(genes)} genes are not in adata.var_names (e.g. {missing[:5]}).")
    return genes


def highly_variable(adata: AnnData, n: int, *, layer: str | None = None) -> list[str]:
    """Return the ``n`` most variable genes of log-normalised expression (dispersion ranking, no side effects)."""
    import scanpy as sc

    X = expression_matrix(
        adata, layer=layer, normalize="log1p" if _looks_like_counts(_matrix(adata, layer)) else "none"
    )
    tmp = AnnData(X=X, var=pd.DataFrame(index=adata.var_names.copy()))
    n = min(n, adata.n_vars)
    sc.pp.highly_variable_genes(tmp, n_top_genes=n, flavor="seurat")
    hv = tmp.var["highly_variable"].to_numpy()
    order = np.argsort(-tmp.var["dispersions_norm"].fillna(-np.inf).to_numpy())
    return [adata.var_names[i] for i in order if hv[i]][:n]
