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
from .._utils import import_scanpy, library_verbosity

Normalize = Literal["log1p", "none"]
#: :func:`expression_matrix` densifies this many values (rows x genes) at a time
DENSE_BLOCK_VALUES = 4_000_000


def _matrix(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"`layer={layer!r}` is not in adata.layers (found {list(adata.layers)}).")
    return adata.layers[layer]


def _check_unique_var_names(adata: AnnData) -> None:
    """Genes are selected by name: duplicated var_names would make that ambiguous (pandas InvalidIndexError)."""
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique().tolist()
        raise ValueError(
            f"`adata`: found {len(dup)} duplicated var_names (e.g. {dup[:5]}); expected unique gene names. "
            "Call `adata.var_names_make_unique()` first."
        )


def _looks_like_counts(X) -> bool:
    data = X.data if sp.issparse(X) else np.asarray(X)
    sample = np.asarray(data).ravel()[:100_000]
    sample = sample[np.isfinite(sample)]
    return sample.size == 0 or (sample.min() >= 0 and np.allclose(sample, np.round(sample)))


def _check_values(X, layer: str | None, *, counts: bool) -> None:
    """Refuse NaN/inf anywhere and, for counts, negative values: they would become plausible-looking targets."""
    data = np.asarray(X.data if sp.issparse(X) else X)
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    bad = ~np.isfinite(data)
    if bad.any():
        raise ValueError(
            f"{where} holds {int(bad.sum())} NaN or infinite values; expression must be finite (fix or drop those "
            "spots/genes first)."
        )
    if counts and data.size and data.min() < 0:
        raise ValueError(
            f"{where} holds {int((data < 0).sum())} negative values, which counts cannot be; pass normalize='none' "
            "if the matrix is already log-normalised, or `layer=` with the raw counts."
        )


def expression_matrix(
    adata: AnnData,
    genes: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    normalize: Normalize = "log1p",
    target_sum: float = DEFAULT_TARGET_SUM,
) -> np.ndarray:
    """Dense float32 expression of ``genes``, normalised as the models expect.

    The matrix is read in blocks of rows, so memory is the result plus one block (a sparse matrix is never
    densified beyond the selected genes); a result larger than the available memory is refused.

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

    Raises
    ------
    ValueError
        ``adata.var_names`` has duplicates (call ``adata.var_names_make_unique()``), ``normalize`` is unknown, the
        matrix holds NaN or infinite values, or (``'log1p'``) negative counts; the dense result would not fit in
        the available memory (choose a gene panel).
    KeyError
        A gene of ``genes`` or ``layer`` is not in ``adata``.
    """
    if normalize not in ("log1p", "none"):
        raise ValueError(f"`normalize` must be 'log1p' or 'none', got {normalize!r}.")
    _check_unique_var_names(adata)
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
    _check_values(X, layer, counts=normalize == "log1p")
    _check_dense_fits(adata.n_obs, len(idx), genes is None)
    out = np.empty((adata.n_obs, len(idx)), dtype=np.float32)
    if normalize == "log1p":
        if not _looks_like_counts(X):
            logger.warning(
                "normalize='log1p' was requested but the matrix does not look like raw counts "
                "(negative or non-integer values); pass normalize='none' if it is already log-normalised."
            )
        size = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        size[size == 0] = 1.0
    # blocks of rows: the float64 intermediate is one block, not spots x genes (a sparse matrix stays sparse)
    step = max(1, DENSE_BLOCK_VALUES // max(len(idx), 1))
    for r0 in range(0, adata.n_obs, step):
        r1 = min(r0 + step, adata.n_obs)
        sub = X[r0:r1][:, idx]
        sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
        if normalize == "none":
            out[r0:r1] = sub
        else:
            out[r0:r1] = np.log1p(sub.astype(np.float64) / size[r0:r1, None] * target_sum)
    return out


def _check_dense_fits(n_obs: int, n_genes: int, all_genes: bool) -> None:
    """Refuse dense targets larger than the available memory (e.g. all genes of 500,000 Visium HD bins)."""
    from ._patches import _available_memory

    need = n_obs * n_genes * 4
    avail = _available_memory()
    if avail is not None and need > avail:
        which = "all genes (`genes=None`)" if all_genes else f"`genes` ({n_genes} genes)"
        raise ValueError(
            f"{which} for {n_obs} spots make dense float32 targets of {need / 1e9:.3g} GB, but only "
            f"{avail / 1e9:.3g} GB of memory are available: choose a gene panel (e.g. `genes=100` highly "
            "variable genes, or a list) or fewer spots."
        )


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
        Annotated data with counts (never modified).
    genes
        A list of gene names (kept in order, duplicates dropped; missing genes raise), ``'her2st'`` for the
        785-gene panel of :func:`histoexp.datasets.her2st_gene_panel` (intersected with ``adata``), ``'all'``,
        an integer ``n`` for the ``n`` most highly variable genes, or ``None`` for the ``n_top`` most highly
        variable genes. Highly variable genes come from :func:`scanpy.pp.highly_variable_genes` with
        ``flavor='seurat_v3'`` on the counts, computed without copying or modifying ``adata`` (a sparse matrix
        stays sparse); values that are not counts (already log-normalised) are ranked with ``flavor='seurat'``
        instead, with a warning.
    layer
        Layer with counts instead of ``X``.
    n_top
        Number of highly variable genes when ``genes`` is ``None``.

    Returns
    -------
    Gene names; highly variable genes are ordered from the most variable.

    Raises
    ------
    ValueError
        ``genes`` is an empty list or a number ``<= 0``, ``n_top <= 0`` (with ``genes=None``), or
        ``adata.var_names`` has duplicates (call ``adata.var_names_make_unique()``).
    KeyError
        Genes of the list, or every gene of the her2st panel, are missing from ``adata``.
    """
    _check_unique_var_names(adata)
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
        arg, n = ("n_top", n_top) if genes is None else ("genes", genes)
        # bool is an int: genes=True would silently mean "1 gene"
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(
                f"`{arg}`{' (used as `genes=None`)' if genes is None else ''} must be a positive number of highly "
                f"variable genes, got {n!r}."
            )
        return highly_variable(adata, int(n), layer=layer)
    if isinstance(genes, str):
        genes = [genes]
    genes = list(dict.fromkeys(genes))
    if not genes:
        raise ValueError(
            "`genes`: got an empty list; expected gene names, 'her2st', 'all', a positive number of highly "
            "variable genes, or None."
        )
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"{len(missing)} of {len(genes)} genes are not in adata.var_names (e.g. {missing[:5]}).")
    return genes


def highly_variable(adata: AnnData, n: int, *, layer: str | None = None) -> list[str]:
    """Return the ``n`` most highly variable genes, most variable first, without modifying ``adata``.

    Raw counts (non-negative integers, the usual case) are ranked by :func:`scanpy.pp.highly_variable_genes` with
    ``flavor='seurat_v3'`` (variance of the counts standardised by a loess fit of variance on mean), run on a new
    AnnData that shares ``adata``'s matrix: a sparse matrix stays sparse and nothing of ``adata`` is copied or
    written. Values that are not counts (e.g. already log-normalised) cannot be used by ``seurat_v3``; they are
    ranked with ``flavor='seurat'`` (normalised dispersion, which expects log-normalised values), and a warning
    says so.

    Parameters
    ----------
    adata
        Annotated data.
    n
        Number of genes (at most ``adata.n_vars``).
    layer
        Layer to use instead of ``X``.

    Returns
    -------
    Gene names.
    """
    sc = import_scanpy()

    _check_unique_var_names(adata)
    X = _matrix(adata, layer)
    n = min(int(n), adata.n_vars)
    # a shallow AnnData over the same matrix: scanpy only reads it, and any key it writes lands on this object
    tmp = AnnData(X=X, obs=pd.DataFrame(index=adata.obs_names.copy()), var=pd.DataFrame(index=adata.var_names.copy()))
    if _looks_like_counts(X):
        with library_verbosity():
            df = sc.pp.highly_variable_genes(tmp, n_top_genes=n, flavor="seurat_v3", inplace=False)
        score = -df["highly_variable_rank"].to_numpy(dtype=float)  # rank 0 = most variable
    else:
        logger.warning(
            "select_genes: the matrix does not look like raw counts, so highly variable genes are ranked with "
            "scanpy's flavor='seurat' (for log-normalised values) instead of 'seurat_v3' (for counts)."
        )
        with library_verbosity():
            df = sc.pp.highly_variable_genes(tmp, n_top_genes=n, flavor="seurat", inplace=False)
        score = df["dispersions_norm"].to_numpy(dtype=float)
    hv = df["highly_variable"].to_numpy(dtype=bool)
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    return [adata.var_names[i] for i in order if hv[i]][:n]
