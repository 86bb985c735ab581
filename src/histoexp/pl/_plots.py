"""Plots over AnnData keys: gene maps on the H&E image, per-gene correlation, patch grids (no torch here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._settings import logger


def _dense(M) -> np.ndarray:
    return np.asarray(M.toarray() if hasattr(M, "toarray") else M, dtype=np.float32)


def _pick_library(adata: AnnData, library_id: str | None, library_key: str | None) -> tuple[str | None, np.ndarray]:
    """Return the library to draw and the boolean mask of its spots."""
    spatial = adata.uns.get("spatial", {})
    libs = list(spatial.keys())
    if library_key is None and "library_id" in adata.obs and len(libs) > 1:
        library_key = "library_id"
    if library_id is None:
        if library_key is not None:
            col = adata.obs[library_key].astype(str)
            present = [lib for lib in libs if (col == lib).any()] or list(pd.unique(col))
            library_id = str(present[0]) if present else None
        elif libs:
            library_id = str(libs[0])
        if library_id is not None and len(libs) > 1:
            logger.info("gene_map: drawing library %r (pass `library_id=` for another one).", library_id)
    elif libs and library_id not in libs:
        raise KeyError(f"`library_id={library_id!r}` is not in adata.uns['spatial'] (found {libs}).")
    if library_key is not None and library_id is not None:
        if library_key not in adata.obs:
            raise KeyError(f"`library_key={library_key!r}` is not a column of adata.obs.")
        mask = (adata.obs[library_key].astype(str) == str(library_id)).to_numpy()
        if not mask.any():
            raise KeyError(f"No spot of adata.obs[{library_key!r}] equals `library_id={library_id!r}`.")
    else:
        mask = np.ones(adata.n_obs, dtype=bool)
    return library_id, mask


def _has_measurement(adata: AnnData, compare: str | None, genes: Sequence[str]) -> bool:
    if compare is None or adata.n_vars == 0:
        return False
    if compare != "X":
        return compare in adata.layers
    X = adata.X
    if X is None:
        return False
    data = np.asarray(X.data if hasattr(X, "nnz") else X)
    return data.size > 0 and bool(np.any(np.nan_to_num(data) != 0))


def _crop_to_spots(ax, xy: np.ndarray, sf: dict) -> None:
    """Limit ``ax`` (squidpy's image coordinates: full-res pixels x hires scale) to the spots' extent."""
    scale = float(sf.get("tissue_hires_scalef", 1.0))
    pad = float(sf.get("spot_diameter_fullres", 0.0)) * scale
    pts = np.asarray(xy, dtype=float) * scale
    (x0, y0), (x1, y1) = pts.min(0) - pad, pts.max(0) + pad
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)


def gene_map(
    adata: AnnData,
    genes: str | Sequence[str],
    *,
    layer: str = "bleep",
    compare: str | None = "X",
    library_id: str | None = None,
    library_key: str | None = None,
    img: bool = True,
    normalize: str = "log1p",
    size: float | None = None,
    cmap: str = "viridis",
    panel_size: float = 3.5,
    crop: bool = True,
    return_fig: bool = True,
    save: str | Path | None = None,
    **kwargs,
):
    """Measured and predicted expression side by side over the H&E image, one row per gene.

    Each panel is drawn by :func:`squidpy.pl.spatial_scatter` (image + spots). The two panels of a
    gene share one colour scale (``vmin``/``vmax`` over both) with one colour bar per row. When the
    measurement is missing (``compare=None``, a gene absent from ``adata.var_names`` or without
    prediction, ``X`` empty or all-zero as in an H&E-only query returned by
    :func:`histoexp.tl.impute`, or ``n_vars == 0``), only the prediction is shown (one column).

    Parameters
    ----------
    adata
        Annotated data with ``obsm['spatial']``, ``uns['spatial']`` and predictions in ``layers[layer]``.
    genes
        One gene or a list of genes (rows).
    layer
        Layer with the predicted expression.
    compare
        ``'X'`` (measured counts in ``X``, normalised with ``normalize``), another layer name (used as
        it is), or ``None`` to show the prediction only.
    library_id
        Section to draw (default: the first one).
    library_key
        Column of ``obs`` holding the section (default ``'library_id'`` when several sections exist).
    img
        Draw the H&E image under the spots.
    normalize
        ``'log1p'`` (counts normalised to 10,000 per spot, log1p) or ``'none'`` for ``compare='X'``.
    size
        Spot size scale passed to squidpy (default: the spot diameter).
    cmap
        Colour map.
    panel_size
        Width/height of one panel in inches.
    crop
        Zoom on the spots (their extent plus one spot diameter) instead of the whole image.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` (else the array of axes, shape ``(n_genes, n_cols)``).
    save
        Write the figure to this path (format from the suffix).
    **kwargs
        Passed to :func:`squidpy.pl.spatial_scatter`.

    Returns
    -------
    The figure (or the axes); never calls ``plt.show``.
    """
    import matplotlib.pyplot as plt
    import squidpy as sq
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("`genes` is empty.")
    if layer not in adata.layers:
        raise KeyError(f"`layer={layer!r}` is not in adata.layers (found {list(adata.layers)}); run impute first.")
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"{len(missing)} of {len(genes)} genes are not in adata.var_names (e.g. {missing[:5]}).")
    if "spatial" not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] is missing: gene_map needs spot coordinates.")
    lib, mask = _pick_library(adata, library_id, library_key)
    idx = adata.var_names.get_indexer(genes)
    pred = _dense(adata.layers[layer][:, idx])[mask]
    with_meas = _has_measurement(adata, compare, genes)
    meas = None
    if with_meas:
        if compare == "X":
            from ..pp import expression_matrix

            meas = expression_matrix(adata[mask], genes, normalize=normalize)
            meas_label = "measured" if normalize == "none" else f"measured ({normalize})"
        else:
            meas = _dense(adata.layers[compare][:, idx])[mask]
            meas_label = compare
    elif compare is not None:
        logger.info("gene_map: no measurement found (compare=%r); showing the prediction only.", compare)

    tmp = AnnData(
        X=np.zeros((int(mask.sum()), len(genes)), dtype=np.float32),
        obs=pd.DataFrame(index=adata.obs_names[mask].copy()),
        var=pd.DataFrame(index=pd.Index(genes)),
    )
    tmp.obsm["spatial"] = np.asarray(adata.obsm["spatial"])[mask]
    tmp.layers["predicted"] = pred
    if meas is not None:
        tmp.layers["measured"] = meas
    has_img = lib is not None and "spatial" in adata.uns and lib in adata.uns["spatial"]
    if has_img:
        tmp.uns["spatial"] = {lib: adata.uns["spatial"][lib]}
    columns = (["measured"] if meas is not None else []) + ["predicted"]
    n_rows, n_cols = len(genes), len(columns)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(panel_size * n_cols + 0.8, panel_size * n_rows), squeeze=False, layout="constrained"
    )
    sf = adata.uns["spatial"][lib].get("scalefactors", {}) if has_img else {}
    shape = "circle" if "spot_diameter_fullres" in sf else None
    for r, gene in enumerate(genes):
        vals = [tmp.layers[c][:, r] for c in columns]
        finite = np.concatenate([v[np.isfinite(v)] for v in vals])
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if vmax <= vmin:
            vmax = vmin + 1e-6
        norm = Normalize(vmin=vmin, vmax=vmax)
        for c, col in enumerate(columns):
            title = f"{gene} · {meas_label if col == 'measured' else f'predicted ({layer})'}"
            sq.pl.spatial_scatter(
                tmp,
                shape=shape,
                color=gene,
                layer=col,
                library_id=lib if has_img else None,
                img=img and has_img,
                img_res_key="hires",
                size=size,
                cmap=cmap,
                norm=norm,
                colorbar=False,
                title=title,
                ax=axes[r, c],
                frameon=False,
                **kwargs,
            )
            axes[r, c].set_xlabel("")
            axes[r, c].set_ylabel("")
            if crop and has_img:
                _crop_to_spots(axes[r, c], tmp.obsm["spatial"], sf)
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=list(axes[r]), shrink=0.8, label="log expression" if normalize == "log1p" else None)
    if save is not None:
        fig.savefig(save, dpi=100, bbox_inches="tight")
    if not isinstance(fig, Figure):  # pragma: no cover - defensive
        return axes
    return fig if return_fig else axes


def correlation(
    adata: AnnData,
    layer: str = "bleep",
    *,
    metric: str = "pcc",
    n_best: int = 10,
    ax=None,
    save: str | Path | None = None,
):
    """Distribution of the per-gene correlation with the best-predicted genes named.

    Needs :func:`histoexp.tl.evaluate` first (reads ``var[f'{layer}_{metric}']``). Draws a histogram of
    the per-gene values with the mean and median marked, and lists the ``n_best`` genes.

    Parameters
    ----------
    adata
        Annotated data after :func:`histoexp.tl.evaluate`.
    layer
        The ``key_added`` / layer that was evaluated.
    metric
        ``'pcc'`` (Pearson) or ``'spearman'``.
    n_best
        Number of best genes to name.
    ax
        Axes to draw in (default: a new figure).
    save
        Write the figure to this path.

    Returns
    -------
    The :class:`~matplotlib.axes.Axes`.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    col = f"{layer}_{metric}"
    if col not in adata.var:
        raise KeyError(f"adata.var[{col!r}] not found: run hx.tl.evaluate(adata, layer={layer!r}) first.")
    vals = adata.var[col].dropna()
    if vals.empty:
        raise ValueError(f"adata.var[{col!r}] holds no evaluated gene (all NaN).")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    sns.histplot(vals.to_numpy(), bins=min(40, max(10, vals.size // 5)), ax=ax, color="#4c72b0")
    ax.axvline(vals.mean(), color="k", ls="--", lw=1, label=f"mean {vals.mean():.3f}")
    ax.axvline(vals.median(), color="grey", ls=":", lw=1, label=f"median {vals.median():.3f}")
    best = vals.sort_values(ascending=False).head(n_best)
    text = "\n".join(f"{g}  {v:.2f}" for g, v in best.items())
    ax.text(
        0.02,
        0.98,
        f"best {len(best)}:\n{text}",
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=8,
        family="monospace",
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )
    name = "Pearson" if metric == "pcc" else metric.capitalize()
    ax.set_xlabel(f"{name} r per gene ({layer}, {vals.size} genes)")
    ax.set_ylabel("genes")
    ax.legend(loc="upper right", fontsize=8)
    if save is not None:
        ax.figure.savefig(save, dpi=100, bbox_inches="tight")
    return ax


def patches(
    adata: AnnData,
    *,
    key: str = "patches",
    n: int = 16,
    obs_names: Sequence[str] | None = None,
    color: str | None = None,
    ncols: int | None = None,
    random_state: int = 0,
    panel_size: float = 1.6,
    save: str | Path | None = None,
):
    """Show a grid of extracted patches (read through :func:`histoexp.pp.get_patches`).

    Parameters
    ----------
    adata
        Annotated data after :func:`histoexp.pp.extract_patches`.
    key
        ``key_added`` of the patches.
    n
        Number of patches (random spots, seeded) when ``obs_names`` is not given.
    obs_names
        Spots to show, in this order.
    color
        An ``obs`` column or a gene whose value is written in each panel's title.
    ncols
        Number of columns (default: about square).
    random_state
        Seed of the spot sample.
    panel_size
        Size of one panel in inches.
    save
        Write the figure to this path.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure`.
    """
    import matplotlib.pyplot as plt

    from ..pp import get_patches

    src = get_patches(adata, key=key)
    if obs_names is not None:
        obs_names = [obs_names] if isinstance(obs_names, str) else list(obs_names)
        unknown = [o for o in obs_names if o not in adata.obs_names]
        if unknown:
            raise KeyError(f"{len(unknown)} `obs_names` are not in adata.obs_names (e.g. {unknown[:5]}).")
        idx = adata.obs_names.get_indexer(obs_names)
    else:
        rng = np.random.default_rng(random_state)
        idx = np.sort(rng.choice(adata.n_obs, size=min(n, adata.n_obs), replace=False))
    labels = None
    if color is not None:
        if color in adata.obs:
            labels = adata.obs[color].iloc[idx].to_numpy()
        elif color in adata.var_names:
            labels = _dense(adata[:, color].X).ravel()[idx]
        else:
            raise KeyError(f"`color={color!r}` is neither a column of adata.obs nor a gene in adata.var_names.")
    k = len(idx)
    ncols = ncols or int(np.ceil(np.sqrt(k)))
    nrows = int(np.ceil(k / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows + 0.2), squeeze=False)
    imgs = src.batch(idx)
    for j, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if j >= k:
            continue
        ax.imshow(imgs[j])
        title = str(adata.obs_names[idx[j]])
        if labels is not None:
            v = labels[j]
            title += f"\n{color}={v:.2f}" if isinstance(v, (float, np.floating)) else f"\n{color}={v}"
        ax.set_title(title, fontsize=7)
    fig.suptitle(f"{k} patches ({src.patch_px} px, {src.size_um:.0f} µm)", fontsize=9)
    if save is not None:
        fig.savefig(save, dpi=100, bbox_inches="tight")
    return fig
