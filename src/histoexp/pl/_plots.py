"""Plots over AnnData keys and benchmark results: per-gene metrics, predicted vs measured, patches (no torch)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from anndata import AnnData

from .._utils import prediction_key
from ._utils import (
    EXPRESSION_LABEL,
    check_genes,
    compare_label,
    finish,
    fmt_r,
    matrix,
    new_or_given_ax,
    pearson,
    resolve_compare,
    resolve_prediction,
)


def _dense(M) -> np.ndarray:
    return np.asarray(M.toarray() if hasattr(M, "toarray") else M, dtype=np.float32)


def correlation(
    adata: AnnData,
    layer: str | None = None,
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
        The ``key_added`` / layer that was evaluated. ``None``: the one evaluated key (``uns[key]['metrics']``
        with ``var[f'{key}_{metric}']``), else the one prediction layer (``'bleep'``, ``'ridge'``, ...).
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

    if layer is None:
        evaluated = [
            k
            for k, v in adata.uns.items()
            if isinstance(v, Mapping) and "metrics" in v and f"{k}_{metric}" in adata.var
        ]
        layer = evaluated[0] if len(evaluated) == 1 else prediction_key(adata)
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


def _measurement(adata: AnnData, compare: str | None, what: str) -> str:
    cmp = resolve_compare(adata, compare)
    if cmp is None:
        raise ValueError(
            f"{what} needs a measurement: adata has no layers['measured'] and no counts in X "
            f"(compare={compare!r}); an H&E-only prediction cannot be compared."
        )
    return cmp


def scatter_measured(
    adata: AnnData,
    gene: str,
    *,
    layer: str | None = None,
    compare: str | None = "auto",
    normalize: str = "log1p",
    size: float = 12.0,
    alpha: float = 0.6,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Predicted against measured expression of one gene, one point per spot, with r and the identity line.

    Parameters
    ----------
    adata
        Predictions (``layers[layer]``) and a measurement (see ``compare``), e.g. from :func:`histoexp.tl.impute`.
    gene
        The gene.
    layer
        The predictions (default: the only layer other than ``'measured'``, else ``X`` marked as a prediction).
    compare
        The measurement: ``'auto'`` (``layers['measured']``, else counts in ``X``), a layer or ``'X'``.
    normalize
        Normalisation of counts in ``X`` (``'log1p'`` or ``'none'``).
    size
        Marker size (points²).
    alpha
        Marker opacity.
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
    if not isinstance(gene, str):
        raise TypeError(f"`gene` must be one gene name (a str), got {type(gene).__name__}.")
    source, key = resolve_prediction(adata, layer)
    check_genes(adata, [gene])
    cmp = _measurement(adata, compare, "scatter_measured")
    p = matrix(adata, source, [gene])[:, 0]
    m = matrix(adata, cmp, [gene], normalize=normalize, measured=True)[:, 0]
    ok = np.isfinite(p) & np.isfinite(m)
    if not ok.any():
        raise ValueError(f"{gene!r} has no spot with both a prediction and a measurement (not measured?).")
    p, m = p[ok], m[ok]
    r = pearson(p, m)
    fig, ax, own = new_or_given_ax(ax, (4.5, 4.5))
    ax.scatter(m, p, s=size, alpha=alpha, color="#4c72b0", edgecolors="none")
    lo, hi = float(min(m.min(), p.min())), float(max(m.max(), p.max()))
    pad = 0.03 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="k", ls="--", lw=1, label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    scale = EXPRESSION_LABEL if (cmp != "X" or normalize == "log1p") else "expression"
    ax.set_xlabel(f"{compare_label(cmp)} ({scale})")
    ax.set_ylabel(f"predicted ({key})")
    ax.set_title(f"{gene}: {fmt_r(r)} ({ok.sum()} spots)")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return finish(fig, show=show, save=save, return_fig=return_fig, own=own)


def pcc_vs_expression(
    adata: AnnData,
    layer: str | None = None,
    *,
    x: str = "mean",
    metric: str = "pcc",
    compare: str | None = "auto",
    normalize: str = "log1p",
    n_labels: int = 5,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Per-gene correlation against the mean or variance of the measured expression of that gene.

    Reads ``var[f'{key}_{metric}']`` written by :func:`histoexp.tl.evaluate` and computes the mean or the
    (population) variance over spots of the measurement (``layers['measured']``, else counts in ``X``
    normalised with ``normalize``). The title gives the Spearman correlation between the two, so one sees
    whether a model only predicts the highly expressed or highly variable genes.

    Parameters
    ----------
    adata
        Predictions after :func:`histoexp.tl.evaluate`, with the measurement.
    layer
        The evaluated key / prediction layer (default: the only layer other than ``'measured'``).
    x
        ``'mean'`` or ``'variance'`` of the measured expression.
    metric
        ``'pcc'`` (Pearson) or ``'spearman'``.
    compare
        The measurement: ``'auto'``, a layer or ``'X'``.
    normalize
        Normalisation of counts in ``X`` (``'log1p'`` or ``'none'``).
    n_labels
        Name the ``n_labels`` best-predicted genes.
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
    from scipy.stats import spearmanr

    if x not in ("mean", "variance"):
        raise ValueError(f"`x={x!r}` must be 'mean' or 'variance'.")
    _, key = resolve_prediction(adata, layer)
    col = f"{key}_{metric}"
    if col not in adata.var:
        raise KeyError(f"adata.var[{col!r}] not found: run hx.tl.evaluate(adata, layer={key!r}) first.")
    vals = adata.var[col].astype(float)
    vals = vals[np.isfinite(vals.to_numpy())]
    if vals.empty:
        raise ValueError(f"adata.var[{col!r}] holds no evaluated gene (all NaN).")
    cmp = _measurement(adata, compare, "pcc_vs_expression")
    M = matrix(adata, cmp, list(vals.index), normalize=normalize, measured=True)
    with np.errstate(invalid="ignore"):
        xs = np.nanmean(M, axis=0) if x == "mean" else np.nanvar(M, axis=0)
    ok = np.isfinite(xs)
    genes, xs, ys = vals.index[ok], xs[ok], vals.to_numpy()[ok]
    if not len(genes):
        raise ValueError(f"None of the {len(vals)} evaluated genes is measured in {compare_label(cmp)!r}.")
    fig, ax, own = new_or_given_ax(ax, (5.5, 4.5))
    ax.scatter(xs, ys, s=10, alpha=0.6, color="#4c72b0", edgecolors="none")
    ax.axhline(0, color="grey", lw=0.8)
    for i in np.argsort(-ys)[: max(0, n_labels)]:
        ax.annotate(str(genes[i]), (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    rho = spearmanr(xs, ys).statistic if len(xs) > 2 else float("nan")
    name = "Pearson r" if metric == "pcc" else metric.capitalize()
    scale = EXPRESSION_LABEL if (cmp != "X" or normalize == "log1p") else "expression"
    ax.set_xlabel(f"{x} of {compare_label(cmp)} expression per gene ({scale})")
    ax.set_ylabel(f"{name} per gene ({key})")
    ax.set_title(f"{name} vs {x}: Spearman ρ = {rho:.2f} ({len(genes)} genes)")
    return finish(fig, show=show, save=save, return_fig=return_fig, own=own)


def _results_table(results, metric: str) -> tuple[dict[str, list[float]], list[str] | None]:
    """Return ``{method: per-fold values}`` and the fold names (None for a plain mapping)."""
    if isinstance(results, (str, os.PathLike)):
        with open(results) as fh:
            results = json.load(fh)
    if not isinstance(results, Mapping):
        raise TypeError(f"`results` must be a mapping or a JSON path, got {type(results).__name__}.")
    if "folds" in results:
        folds = results["folds"]
        names = [str(f.get("test", f"fold {i}")) for i, f in enumerate(folds)]
        table: dict[str, list[float]] = {}
        for f in folds:
            for meth in f.get("methods", {}):
                table.setdefault(meth, [])
        seen = set()
        for meth in table:
            for f in folds:
                rec = f.get("methods", {}).get(meth, {})
                if metric in rec:
                    seen.add(meth)
                table[meth].append(float(rec[metric]) if rec.get(metric) is not None else np.nan)
        missing = [m for m in table if m not in seen]
        if missing:
            some = next(iter(folds[0].get("methods", {}).values()), {}) if folds else {}
            raise KeyError(f"`metric={metric!r}` is missing for {missing} in every fold (metrics: {sorted(some)}).")
        return table, names
    table = {}
    for meth, vals in results.items():
        if isinstance(vals, Mapping) or isinstance(vals, str) or not isinstance(vals, Sequence | np.ndarray):
            raise TypeError(
                f"`results[{meth!r}]` must be a list of per-fold values (or pass a benchmark results dict with "
                "'folds')."
            )
        table[str(meth)] = [float(v) if v is not None else np.nan for v in vals]
    return table, None


def method_comparison(
    results,
    metric: str = "pcc_mean",
    *,
    methods: Sequence[str] | None = None,
    baselines: Sequence[str] = ("mean", "one-pattern"),
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Compare methods across cross-validation folds: one point per fold and a bar at the mean.

    Baselines (the mean predictor, the one-pattern baseline ``hx.tl.fit_ridge(..., rank=1)``) are drawn as grey
    hatched bars, and the one-pattern baseline's mean as a dashed line: a method's bar beyond that line is what it
    knows beyond the one spatial pattern most genes share (compare ``metric='pcc_specific_mean'`` too).

    Parameters
    ----------
    results
        A benchmark results dict (or the path of its JSON file) as written by ``benchmarks/her2st.py``
        (``results['folds'][i]['methods'][name][metric]``, the fold named by ``results['folds'][i]['test']``),
        or a mapping ``{method: per-fold values}``.
    metric
        The metric, e.g. ``'pcc_mean'``, ``'pcc_hvg'``, ``'ari'``.
    methods
        Methods to show, in this order (default: all, in the order of the results).
    baselines
        Method names (or name prefixes, e.g. ``'one-pattern'`` matches ``'one-pattern[handcrafted]'``) drawn as
        baselines.
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

    Examples
    --------
    >>> hx.pl.method_comparison("benchmarks/results/her2st.json", "pcc_hvg")  # doctest: +SKIP
    """
    import matplotlib as mpl

    table, fold_names = _results_table(results, metric)
    if methods is not None:
        methods = [methods] if isinstance(methods, str) else list(methods)
        unknown = [m for m in methods if m not in table]
        if unknown:
            raise KeyError(f"`methods` {unknown} are not in the results (found {list(table)}).")
    else:
        methods = list(table)
    if not methods:
        raise ValueError("`results` holds no method.")
    n_folds = max(len(table[m]) for m in methods)
    fig, ax, own = new_or_given_ax(ax, (7.0, 0.45 * len(methods) + 1.6))
    colours = mpl.colormaps["tab10" if n_folds <= 10 else "tab20"](np.arange(n_folds) % 20)
    offsets = np.linspace(-0.22, 0.22, n_folds) if n_folds > 1 else np.zeros(1)
    ys = np.arange(len(methods))[::-1]
    means = [float(np.nanmean(table[m])) if np.isfinite(table[m]).any() else np.nan for m in methods]
    base = [any(m == b or m.startswith(f"{b}[") or m.startswith(f"{b} ") for b in baselines) for m in methods]
    for y, mean, is_base in zip(ys, means, base, strict=True):
        style = {"color": "#eeeeee", "edgecolor": "#888888", "hatch": "//"} if is_base else {}
        ax.barh(y, np.nan_to_num(mean), height=0.7, zorder=1, **({"color": "#d0d8e8", "edgecolor": "#4c72b0"} | style))
    for m, mean in zip(methods, means, strict=True):
        if m.startswith("one-pattern") and np.isfinite(mean):
            ax.axvline(mean, color="#888888", lw=1, ls="--", zorder=2)
    for j in range(n_folds):  # one collection per fold: its points over the methods
        vals = np.array([table[m][j] if j < len(table[m]) else np.nan for m in methods], dtype=float)
        ok = np.isfinite(vals)
        label = fold_names[j] if fold_names is not None else f"fold {j}"
        ax.scatter(vals[ok], ys[ok] + offsets[j], s=22, color=colours[j], zorder=3, label=label, edgecolors="none")
    ax.set_yticks(ys, [f"{m}  ({mean:.3f})" for m, mean in zip(methods, means, strict=True)])
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel(f"{metric} (bar and brackets: mean over folds; points: folds)")
    ax.set_title(f"{metric}, {n_folds} folds")
    if fold_names is not None:
        ax.legend(title="test section", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    return finish(fig, show=show, save=save, return_fig=return_fig, own=own)
