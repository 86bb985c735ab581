"""Plots over AnnData keys and benchmark results: per-gene metrics, predicted vs measured, patches (no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anndata import AnnData

from ._utils import (
    finish,
    new_or_given_ax,
)


def _dense(M) -> np.ndarray:
    return np.asarray(M.toarray() if hasattr(M, "toarray") else M, dtype=np.float32)


def correlation(
    adata: AnnData,
    layer: str = "bleep",
    *,
    metric: str = "pcc",
    n_best: int = 10,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
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
    show
        Show the figure (default: unless ``save``, ``return_fig`` or ``ax`` is given).
    save
        Write the figure to this path (atomically).
    return_fig
        Return the :class:`~matplotlib.figure.Figure`.

    Returns
    -------
    The figure if ``return_fig``, else None.
    """
    import seaborn as sns

    col = f"{layer}_{metric}"
    if col not in adata.var:
        raise KeyError(f"adata.var[{col!r}] not found: run hx.tl.evaluate(adata, layer={layer!r}) first.")
    vals = adata.var[col].dropna()
    if vals.empty:
        raise ValueError(f"adata.var[{col!r}] holds no evaluated gene (all NaN).")
    fig, ax, own = new_or_given_ax(ax, (6, 4))
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
    return finish(fig, show=show, save=save, return_fig=return_fig, own=own)


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
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
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
    show
        Show the figure (default: unless ``save`` or ``return_fig`` is given).
    save
        Write the figure to this path (atomically).
    return_fig
        Return the :class:`~matplotlib.figure.Figure`.

    Returns
    -------
    The figure if ``return_fig``, else None.
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
    return finish(fig, show=show, save=save, return_fig=return_fig)
