"""Spatial domains (leiden on an expression + spatial graph) on predicted or measured expression."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from .._settings import logger
from .._utils import (
    claim_keys,
    import_scanpy,
    import_squidpy,
    jsonable,
    library_verbosity,
    mark_written,
    prediction_key,
    resolve_library_key,
)


def _expression(adata: AnnData, layer: str | None, genes, normalize: str) -> tuple[np.ndarray, list[str]]:
    if layer is None:
        from ..pp import expression_matrix

        if adata.X is None:
            raise ValueError(
                "`layer=None` reads the measured counts in adata.X, which is None (the output of hx.tl.impute keeps "
                "its measurement in layers['measured']): pass `layer='measured'`, or `layer=` with the predictions."
            )

        genes = list(adata.var_names) if genes is None else list(genes)
        return expression_matrix(adata, genes, normalize=normalize), genes
    if layer not in adata.layers:
        raise KeyError(f"`layer={layer!r}` is not in adata.layers (found {list(adata.layers)}).")
    M = adata.layers[layer]
    M = np.asarray(M.toarray() if hasattr(M, "toarray") else M, dtype=np.float32)
    ok = ~np.isnan(M).any(axis=0)
    names = adata.var_names
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in genes if g not in names]
        if missing:
            raise KeyError(f"{len(missing)} of {len(genes)} `genes` are not in adata.var_names (e.g. {missing[:5]}).")
        sel = np.zeros(len(names), dtype=bool)
        sel[names.get_indexer(genes)] = True
        ok &= sel
    if not ok.any():
        raise ValueError(f"layers[{layer!r}] has no gene without NaN among the requested genes.")
    return M[:, ok], list(names[ok])


def spatial_domains(
    adata: AnnData,
    *,
    layer: str | None = "auto",
    genes: Sequence[str] | None = None,
    normalize: str = "log1p",
    n_pcs: int = 30,
    n_neighbors: int = 15,
    n_spatial_neighbors: int = 6,
    spatial_weight: float = 1.0,
    use_spatial: bool = True,
    resolution: float = 0.5,
    library_key: str | None = None,
    compare: str | None = None,
    key_added: str | None = None,
    random_state: int = 0,
    overwrite: bool = False,
) -> None:
    r"""Find spatial domains by leiden clustering of (predicted) expression and spot neighbourhoods.

    The documented path, built only from scanpy and squidpy:

    1. expression: ``layers[layer]`` (genes without NaN, e.g. the predictions of
       :func:`histoexp.tl.impute`), or with ``layer=None`` the measured expression of ``X``
       (:func:`histoexp.pp.expression_matrix` with ``normalize``);
    2. :func:`scanpy.pp.pca` (``n_pcs`` components, no scaling) and :func:`scanpy.pp.neighbors`
       (``n_neighbors``) → expression connectivities :math:`C` (UMAP weights in [0, 1]);
    3. with ``use_spatial``, squidpy's k-nearest-neighbour spatial graph
       (``squidpy.gr.spatial_neighbors_knn``, i.e. ``spatial_neighbors(coord_type='generic')``;
       ``n_spatial_neighbors`` nearest spots within each section) → binary spatial adjacency :math:`A`;
    4. leiden (:func:`scanpy.tl.leiden`, ``flavor='igraph'``) on the weighted graph
       :math:`W = C + w A` (:math:`w` = ``spatial_weight``) (symmetrised), so spots that are both similar
       and adjacent stick together and domains come out spatially smooth.

    Parameters
    ----------
    adata
        Annotated data with ``obsm['spatial']``.
    layer
        Layer with (predicted) expression, or ``None`` for the measured, log-normalised ``X``. ``'auto'``: the one
        prediction layer (the layer :func:`histoexp.tl.impute` wrote, whatever the model: ``'bleep'``,
        ``'ridge'``, ...; an error lists the layers when there are several).
    genes
        Restrict to these genes (default: all usable genes).
    normalize
        Normalisation of ``X`` when ``layer`` is ``None``.
    n_pcs
        Number of principal components (capped by the data size).
    n_neighbors
        Expression neighbours per spot.
    n_spatial_neighbors
        Spatial neighbours per spot (6 suits hexagonal Visium, 4-8 legacy ST grids).
    spatial_weight
        Weight of a spatial edge relative to an expression connectivity.
    use_spatial
        Add the spatial graph (``False``: plain expression leiden).
    resolution
        Leiden resolution.
    library_key
        ``obs`` column with the section, so spatial edges stay within a section (default
        ``'library_id'`` when present).
    compare
        An ``obs`` column with reference domains (e.g. ``'measured_domains'`` from a run with
        ``layer=None``): the adjusted Rand index against it is stored in ``uns[key_added]['ari']``.
    key_added
        ``obs`` column of the domains (default ``f'{layer}_domains'``, ``'measured_domains'`` for ``layer=None``).
    random_state
        Seed of PCA and leiden.
    overwrite
        Replace an existing ``obs[key_added]`` / ``uns[key_added]`` that histoexp did not write (a re-run replaces
        the domains this function wrote without it).

    Returns
    -------
    None
        Writes ``obs[key_added]`` (categorical) and ``uns[key_added]`` with the keys ``params``,
        ``n_domains`` and, with ``compare``, ``ari`` and ``compare``.
    """
    import scipy.sparse as sp

    sc = import_scanpy()

    if layer == "auto":
        layer = prediction_key(adata, arg="layer")
    key = key_added or (f"{layer}_domains" if layer is not None else "measured_domains")
    claim_keys(adata, [("obs", key), ("uns", key)], overwrite=overwrite)  # a re-run replaces its own domains
    min_spots = max(3, n_spatial_neighbors + 1) if use_spatial else 3
    if adata.n_obs < min_spots:
        raise ValueError(
            f"spatial_domains needs at least {min_spots} spots (more than `n_spatial_neighbors={n_spatial_neighbors}`),"
            f" got {adata.n_obs}."
        )
    for name, value in (("n_pcs", n_pcs), ("n_neighbors", n_neighbors), ("n_spatial_neighbors", n_spatial_neighbors)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if not resolution > 0:
        raise ValueError(f"`resolution` must be positive, got {resolution!r}.")
    if compare is not None and compare not in adata.obs:
        raise KeyError(f"`compare={compare!r}` is not a column of adata.obs (run spatial_domains for it first).")
    M, used = _expression(adata, layer, genes, normalize)
    # a canonical gene order: PCA + leiden otherwise give other domains for the same genes in another order
    order = np.argsort(np.asarray(used, dtype=str), kind="stable")
    M, used = M[:, order], [used[i] for i in order]
    tmp = AnnData(X=M, obs=pd.DataFrame(index=adata.obs_names.copy()))
    n_comps = int(max(1, min(n_pcs, M.shape[1] - 1, M.shape[0] - 1)))
    sq = import_squidpy() if use_spatial else None  # before library_verbosity: importing sets its loggers' levels
    with library_verbosity():  # squidpy/scanpy log at hx.settings.verbosity
        if M.shape[1] < 2:
            tmp.obsm["X_pca"] = M.astype(np.float32)
        else:
            sc.pp.pca(tmp, n_comps=n_comps, random_state=random_state)
        sc.pp.neighbors(tmp, n_neighbors=min(n_neighbors, adata.n_obs - 1), use_rep="X_pca", random_state=random_state)
        W = tmp.obsp["connectivities"].tocsr().astype(np.float64)
        if use_spatial:
            if "spatial" not in adata.obsm:
                raise KeyError("adata.obsm['spatial'] is missing; pass use_spatial=False for expression-only domains.")
            library_key = resolve_library_key(adata, library_key)
            tmp.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64)
            if library_key is not None:
                tmp.obs[library_key] = pd.Categorical(adata.obs[library_key].astype(str))
            knn = getattr(sq.gr, "spatial_neighbors_knn", None)  # squidpy >= 1.8; spatial_neighbors before
            if knn is not None:
                knn(tmp, n_neighs=n_spatial_neighbors, library_key=library_key, key_added="spatial")
            else:  # pragma: no cover - older squidpy
                sq.gr.spatial_neighbors(
                    tmp,
                    coord_type="generic",
                    n_neighs=n_spatial_neighbors,
                    library_key=library_key,
                    key_added="spatial",
                )
            A = tmp.obsp["spatial_connectivities"].tocsr().astype(np.float64)
            A = ((A + A.T) > 0).astype(np.float64)
            W = W + spatial_weight * A
        W = sp.csr_matrix((W + W.T) / 2)
        sc.tl.leiden(
            tmp,
            resolution=resolution,
            adjacency=W,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            random_state=random_state,
            key_added="domains",
        )
    labels = tmp.obs["domains"].astype(str)
    cats = sorted(labels.unique(), key=int)
    adata.obs[key] = pd.Categorical(labels.to_numpy(), categories=cats)
    info: dict = {
        "params": {
            "layer": layer if layer is not None else "X",
            "n_genes": len(used),
            "n_pcs": n_comps,
            "n_neighbors": n_neighbors,
            "use_spatial": use_spatial,
            "n_spatial_neighbors": n_spatial_neighbors,
            "spatial_weight": spatial_weight,
            "resolution": resolution,
            "library_key": library_key,
            "random_state": random_state,
            "normalize": normalize if layer is None else "as is",
        },
        "n_domains": len(cats),
    }
    if compare is not None:
        info["compare"] = compare
        info["ari"] = ari(adata, key, compare)
        logger.info("spatial_domains %s: %d domains, ARI vs %s = %.3f", key, len(cats), compare, info["ari"])
    else:
        logger.info("spatial_domains %s: %d domains", key, len(cats))
    adata.uns[key] = jsonable(info)
    mark_written(adata, "obs", key, by="spatial_domains")
    mark_written(adata, "uns", key, by="spatial_domains")


def ari(adata: AnnData, key1: str, key2: str) -> float:
    """Compute the adjusted Rand index (:func:`sklearn.metrics.adjusted_rand_score`) between two ``obs`` labelings."""
    from sklearn.metrics import adjusted_rand_score

    for k in (key1, key2):
        if k not in adata.obs:
            raise KeyError(f"{k!r} is not a column of adata.obs.")
    a, b = adata.obs[key1].astype(str), adata.obs[key2].astype(str)
    ok = ~(adata.obs[key1].isna() | adata.obs[key2].isna()).to_numpy()
    return float(adjusted_rand_score(a[ok], b[ok]))
