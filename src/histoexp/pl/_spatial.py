"""Maps over the H&E image: predicted and measured genes, spatial domains (reads AnnData keys only, no torch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._settings import logger
from .._utils import prediction_key
from ._utils import (
    EXPRESSION_LABEL,
    VBound,
    check_genes,
    clim,
    compare_label,
    finish,
    fmt_r,
    matrix,
    pearson,
    resolve_compare,
    resolve_prediction,
)


# ----------------------------------------------------------------------------------------------
# one section: spots, image, spot size, µm per pixel
# ----------------------------------------------------------------------------------------------
@dataclass
class _Section:
    lib: str | None
    mask: np.ndarray  # spots of the section among adata's
    xy: np.ndarray  # (n, 2) full-resolution pixel centres
    image: np.ndarray | None
    image_scale: float  # image pixels per full-resolution pixel
    diameter: float  # spot diameter / tile side in full-resolution pixels
    shape: str  # 'circle' or 'square'
    mpp: float | None  # µm per full-resolution pixel
    mpp_source: str


def _pick_library(adata: AnnData, library_id: str | None, library_key: str | None) -> tuple[str | None, np.ndarray]:
    """Return the library to draw and the boolean mask of its spots."""
    spatial = adata.uns.get("spatial", {}) or {}
    libs = [str(k) for k in spatial.keys()]
    if library_key is None and "library_id" in adata.obs and (len(libs) > 1 or adata.obs["library_id"].nunique() > 1):
        library_key = "library_id"
    if library_id is None:
        if library_key is not None:
            if library_key not in adata.obs:
                raise KeyError(f"`library_key={library_key!r}` is not a column of adata.obs.")
            col = adata.obs[library_key].astype(str)
            present = [lib for lib in libs if (col == lib).any()] or [str(v) for v in pd.unique(col)]
            library_id = present[0] if present else None
        elif libs:
            library_id = libs[0]
        if library_id is not None and len(libs) > 1:
            logger.info("drawing library %r (pass `library_id=` for another one).", library_id)
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
    if library_id is None and "library_id" in adata.obs and adata.obs["library_id"].nunique() == 1:
        library_id = str(adata.obs["library_id"].iloc[0])
    return library_id, mask


def _mpp(adata: AnnData, lib: str | None, entry: Mapping) -> tuple[float | None, str]:
    """µm per full-resolution pixel of ``lib``, and where it came from (None when unknown)."""
    sf = entry.get("scalefactors", {}) or {}
    meta = entry.get("metadata", {}) or {}
    if sf.get("microns_per_pixel"):
        return float(sf["microns_per_pixel"]), "scalefactors['microns_per_pixel']"
    if meta.get("microns_per_pixel"):
        return float(meta["microns_per_pixel"]), "metadata['microns_per_pixel']"
    if sf.get("spot_diameter_fullres"):
        from ..image._slide import _platform_spot_um

        spot_um, why = _platform_spot_um(adata, dict(entry))
        if spot_um is not None:
            return spot_um / float(sf["spot_diameter_fullres"]), f"spot_diameter_fullres with {spot_um:g} µm ({why})"
    hist = adata.uns.get("histoexp", {})
    if isinstance(hist, Mapping):
        for name, rec in hist.items():
            if not isinstance(rec, Mapping):
                continue
            libs = rec.get("libraries")
            if isinstance(libs, Mapping) and lib in libs and (libs[lib] or {}).get("mpp"):
                return float(libs[lib]["mpp"]), f"uns['histoexp'][{name!r}]['libraries'][{lib!r}]['mpp']"
            if "tile_um" in rec and rec.get("mpp"):
                return float(rec["mpp"]), f"uns['histoexp'][{name!r}]['mpp']"
    return None, ""


def _is_tiles(adata: AnnData) -> bool:
    hist = adata.uns.get("histoexp", {})
    if isinstance(hist, Mapping) and any(isinstance(r, Mapping) and "tile_um" in r for r in hist.values()):
        return True
    return "tissue_fraction" in adata.obs and "array_row" in adata.obs


def _section(adata: AnnData, library_id, library_key, *, shape: str | None) -> _Section:
    if "spatial" not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] is missing: spatial plots need spot coordinates.")
    lib, mask = _pick_library(adata, library_id, library_key)
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[mask, :2]
    spatial = adata.uns.get("spatial", {}) or {}
    entry = (spatial.get(lib) if lib is not None else None) or {}
    sf = entry.get("scalefactors", {}) or {}
    images = entry.get("images", {}) or {}
    image, scale = None, 1.0
    for key, sf_key in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
        if key in images and images[key] is not None:
            arr = np.asarray(images[key])
            flat = arr.reshape(arr.shape[0] * arr.shape[1], -1)[:, :3] if arr.ndim >= 2 and arr.size else arr
            if arr.size and (flat == flat[0]).all():
                continue  # a single-colour placeholder (scanpy's Visium fixture): the next image shows the tissue
            image, scale = arr, float(sf.get(sf_key, 1.0))
            break
    if sf.get("spot_diameter_fullres"):
        diameter = float(sf["spot_diameter_fullres"])
    elif len(xy) > 1:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(xy).query(xy, k=2)
        diameter = float(np.median(d[:, 1])) or 1.0
    else:
        diameter = 1.0
    if shape is None:
        shape = "square" if _is_tiles(adata) else "circle"
    elif shape not in ("circle", "square"):
        raise ValueError(f"`shape={shape!r}` must be 'circle', 'square' or None.")
    mpp, src = _mpp(adata, lib, entry)
    if mpp is None:
        logger.debug("library %r: no µm per pixel found; the scale bar is left out.", lib)
    return _Section(lib, mask, xy, image, scale, diameter, shape, mpp, src)


def _draw(
    ax,
    sec: _Section,
    *,
    values: np.ndarray | None = None,
    colors=None,
    cmap="viridis",
    lims: tuple[float, float] = (0.0, 1.0),
    alpha: float = 1.0,
    size: float = 1.0,
    img: bool = True,
    crop: bool = True,
    scalebar: bool = True,
):
    """Draw the section's image and one spot (circle) or tile (square) per observation; return the collection."""
    import matplotlib as mpl
    from matplotlib.collections import EllipseCollection, PolyCollection

    if img and sec.image is not None:
        h, w = sec.image.shape[:2]
        ax.imshow(sec.image, extent=(0, w / sec.image_scale, h / sec.image_scale, 0), zorder=0)
    d = sec.diameter * float(size)
    n = len(sec.xy)
    if sec.shape == "circle":
        coll = EllipseCollection(
            np.full(n, d), np.full(n, d), np.zeros(n), units="xy", offsets=sec.xy, offset_transform=ax.transData
        )
    else:
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * (d / 2)
        coll = PolyCollection(sec.xy[:, None, :] + corners[None])
    if values is not None:
        cm = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
        coll.set_cmap(cm.with_extremes(bad="lightgray"))
        coll.set_array(np.ma.masked_invalid(np.asarray(values, dtype=np.float64)))
        coll.set_clim(*lims)
    else:
        coll.set_facecolor(colors)
    coll.set_edgecolor("none")
    coll.set_linewidth(0)
    coll.set_alpha(alpha)
    coll.set_zorder(2)
    ax.add_collection(coll)
    if n and (crop or not (img and sec.image is not None)):
        (x0, y0), (x1, y1) = sec.xy.min(0) - d, sec.xy.max(0) + d
    elif img and sec.image is not None:
        h, w = sec.image.shape[:2]
        x0, y0, x1, y1 = 0.0, 0.0, w / sec.image_scale, h / sec.image_scale
    else:
        x0, y0, x1, y1 = 0.0, 0.0, 1.0, 1.0
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if scalebar and sec.mpp is not None:
        try:
            from matplotlib_scalebar.scalebar import ScaleBar
        except ImportError:  # pragma: no cover - installed with squidpy
            logger.debug("matplotlib-scalebar is not installed; no scale bar.")
        else:
            bar = ScaleBar(sec.mpp, units="um", location="lower right", box_alpha=0.7, font_properties={"size": 8})
            bar.set_zorder(5)
            ax.add_artist(bar)
    return coll


# ----------------------------------------------------------------------------------------------
# gene_map
# ----------------------------------------------------------------------------------------------
def gene_map(
    adata: AnnData,
    genes: str | Sequence[str],
    *,
    layer: str | None = None,
    compare: str | None = "auto",
    library_id: str | None = None,
    library_key: str | None = None,
    vmin: VBound = None,
    vmax: VBound = None,
    scale: Literal["panel", "shared"] = "panel",
    cmap: str = "viridis",
    img: bool = True,
    crop: bool = True,
    size: float = 1.0,
    alpha: float | None = None,
    shape: Literal["circle", "square"] | None = None,
    normalize: str = "log1p",
    scalebar: bool = True,
    panel_size: float = 4.5,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Predicted expression over the H&E image, next to the measurement when there is one; one row per gene.

    The right panel shows the prediction (titled ``predicted (<key>)`` with the Pearson r against the
    measurement over the drawn spots); the left panel shows the measurement (titled ``measured``), when
    there is one. A prediction is never labelled "measured": an ``X`` marked as
    ``uns['histoexp']['X'] = 'prediction:<key>'`` (as :func:`histoexp.tl.impute` writes when asked to put
    predictions in ``X``) is never used as the comparison. A gene the query did not measure (a NaN column
    of ``layers['measured']``) gets an empty "not measured" panel.

    A prediction of a cross-fitted model (``var['expected_pcc']``, see :func:`histoexp.tl.impute`) says how far to
    trust each map: without a measurement the title gives the gene's expected Pearson r on a new section
    (± its spread over the cross-fitting folds), and a gene not expected to carry gene-specific signal
    (``var['expected_specific']`` False: its map is expected to follow the spatial pattern most genes share) is
    marked "shared pattern only". A zero-shot model's unseen gene also shows the expected r of the
    shuffled-embedding control (``var['expected_pcc_control']``), and is marked when it is not expected to beat it.

    Spots are drawn at their physical size (``spot_diameter_fullres``; tiles of
    :func:`histoexp.pp.tile_tissue` as squares of the tile size), cropped to the tissue, with a µm scale
    bar when the µm per pixel is known (``scalefactors['microns_per_pixel']``, ``metadata``, the
    platform's spot size or the patch records in ``uns['histoexp']``; otherwise no bar, logged at debug
    level).

    Parameters
    ----------
    adata
        Annotated data with ``obsm['spatial']``, ideally ``uns['spatial']`` (image and scale factors), and
        predictions in ``layers[layer]``: the result of :func:`histoexp.tl.impute`, or an object with counts
        in ``X`` and a prediction layer over the same genes.
    genes
        One gene or a list of genes (rows).
    layer
        The predictions: a layer, or ``'X'`` when ``X`` is marked as a prediction. Default: the only layer
        other than ``'measured'`` (else ``X`` if it is marked as a prediction).
    compare
        The measurement: ``'auto'`` (``layers['measured']`` if present, else ``X`` when it holds counts and
        is not marked as a prediction, else no comparison), ``'measured'`` or another layer (used as is),
        ``'X'`` (counts in ``X``, normalised with ``normalize``) or ``None`` (prediction only).
    library_id
        Section to draw (default: the first one; logged when there are several).
    library_key
        Column of ``obs`` holding the section (default ``'library_id'`` when there are several sections).
    vmin, vmax
        Colour limits: a number, a percentile string such as ``'p1'`` / ``'p99'``, a callable of the values,
        or ``None`` (minimum / maximum), as in scanpy. Computed over the drawn spots of each panel
        (``scale='panel'``) or of both panels of a gene (``scale='shared'``).
    scale
        ``'panel'``: one colour scale and colour bar per panel, so a prediction with a narrower range is not
        flattened by the measurement's extremes. ``'shared'``: one scale and colour bar per gene (row).
    cmap
        Colour map.
    img
        Draw the H&E image under the spots.
    crop
        Zoom on the spots (their extent plus one spot diameter) instead of the whole image.
    size
        Spot size as a multiple of the spot diameter (or tile side).
    alpha
        Opacity of the spots. Default: 1 when a measurement is shown on spots; 0.6 for tiles or a
        prediction without measurement (an H&E-only query), so the tissue stays visible.
    shape
        ``'circle'`` or ``'square'``; default squares for tiles of :func:`histoexp.pp.tile_tissue`, else circles.
    normalize
        Normalisation of counts in ``X`` when ``compare='X'``: ``'log1p'`` (counts scaled to 10,000 per spot
        over all genes, log1p) or ``'none'``.
    scalebar
        Draw a µm scale bar when the µm per pixel is known.
    panel_size
        Height (and width) of one panel in inches.
    show
        Show the figure (``plt.show``). Default: show unless ``save`` or ``return_fig`` is given.
    save
        Write the figure to this path (format from the suffix; written atomically, an existing file is
        replaced).
    return_fig
        Return the :class:`~matplotlib.figure.Figure` (and leave it open).

    Returns
    -------
    The figure if ``return_fig``, else None (the figure is closed after it is saved or shown).

    Examples
    --------
    >>> pred = hx.tl.impute(query, model)  # doctest: +SKIP
    >>> hx.pl.gene_map(pred, ["ERBB2", "GNAS"], vmax="p99")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("`genes` is empty.")
    if scale not in ("panel", "shared"):
        raise ValueError(f"`scale={scale!r}` must be 'panel' or 'shared'.")
    source, key = resolve_prediction(adata, layer)
    check_genes(adata, genes)
    cmp = resolve_compare(adata, compare)
    sec = _section(adata, library_id, library_key, shape=shape)
    pred = matrix(adata, source, genes)[sec.mask]
    nan_genes = [g for g, ok in zip(genes, np.isfinite(pred).any(axis=0), strict=True) if not ok]
    if nan_genes:
        raise ValueError(f"`layer={source!r}` holds no prediction (all NaN) for {nan_genes[:5]} in this section.")
    meas = None
    if cmp is not None:
        meas = matrix(adata, cmp, genes, normalize=normalize, measured=True)[sec.mask]
        if "measured" in adata.var and cmp == "measured":
            not_measured = ~adata.var.loc[genes, "measured"].astype(bool).to_numpy()
            meas[:, not_measured] = np.nan
        if not np.isfinite(meas).any():
            logger.info("gene_map: none of the genes is measured; showing the prediction only.")
            meas = None
    label = compare_label(cmp) if cmp is not None else None
    cbar_label = EXPRESSION_LABEL if (cmp != "X" or normalize == "log1p") else "expression"
    if alpha is None:
        alpha = 0.6 if (sec.shape == "square" or meas is None) else 1.0

    n_rows, n_cols = len(genes), (2 if meas is not None else 1)
    width = panel_size * n_cols * 1.25 if scale == "panel" else panel_size * n_cols + 1.2
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, panel_size * n_rows), squeeze=False, layout="constrained")
    for r, gene in enumerate(genes):
        p = pred[:, r]
        m = meas[:, r] if meas is not None else None
        has_m = m is not None and bool(np.isfinite(m).any())
        row_vals = np.concatenate([p, m]) if has_m else p
        colls = []
        if m is not None:
            ax = axes[r, 0]
            if has_m:
                lims = clim(m if scale == "panel" else row_vals, vmin, vmax)
                colls.append(
                    _draw(
                        ax,
                        sec,
                        values=m,
                        cmap=cmap,
                        lims=lims,
                        alpha=alpha,
                        size=size,
                        img=img,
                        crop=crop,
                        scalebar=scalebar,
                    )
                )
                ax.set_title(f"{gene} · {label}")
            else:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{gene}\nnot measured", ha="center", va="center", transform=ax.transAxes)
        ax = axes[r, n_cols - 1]
        lims = clim(p if scale == "panel" else row_vals, vmin, vmax)
        colls.append(
            _draw(
                ax, sec, values=p, cmap=cmap, lims=lims, alpha=alpha, size=size, img=img, crop=crop, scalebar=scalebar
            )
        )
        title = f"{gene} · predicted ({key})"
        if has_m:
            title += f"\n{fmt_r(pearson(p, m))} vs {label} ({int(np.isfinite(m).sum())} spots)"
        title += _expected_note(adata, gene, with_r=not has_m)
        ax.set_title(title)
        if scale == "panel":
            for c in colls:
                fig.colorbar(c, ax=c.axes, shrink=0.7, label=cbar_label)
        else:
            fig.colorbar(colls[-1], ax=[c.axes for c in colls], shrink=0.7, label=cbar_label)
    if sec.lib is not None:
        fig.suptitle(f"section {sec.lib}")
    return finish(fig, show=show, save=save, return_fig=return_fig)


def _expected_note(adata: AnnData, gene: str, *, with_r: bool) -> str:
    """Title line from a cross-fitted model's expectation: expected r (without a measurement) and a warning."""
    if "expected_pcc" not in adata.var or gene not in adata.var_names:
        return ""
    row = adata.var.loc[gene]
    r = row.get("expected_pcc")
    if r is None or not np.isfinite(r):
        return "\nno expected accuracy (outside the model's genes)" if with_r else ""
    parts = []
    # a zero-shot model's unseen gene is judged against the shuffled-embedding control (expected_pcc_control)
    ctrl = row.get("expected_pcc_control") if "expected_pcc_control" in adata.var else None
    unseen = ctrl is not None and np.isfinite(ctrl)
    if with_r:
        sd = row.get("expected_pcc_sd")
        parts.append(
            f"expected r {r:.2f}"
            + (f" ± {sd:.2f}" if sd is not None and np.isfinite(sd) else "")
            + (f" (control {ctrl:.2f})" if unseen else "")
        )
    if "expected_specific" in adata.var and not bool(row["expected_specific"]):
        if unseen:
            parts.append("not expected to beat the shuffled-embedding control")
        else:
            parts.append("shared pattern only (no gene-specific signal expected)")
    return ("\n" + " · ".join(parts)) if parts else ""


# ----------------------------------------------------------------------------------------------
# spatial_domains
# ----------------------------------------------------------------------------------------------
def _palette(n: int) -> list[str]:
    from scanpy.plotting.palettes import default_20, default_28, default_102

    for pal in (default_20, default_28, default_102):
        if n <= len(pal):
            return list(pal)
    import matplotlib as mpl

    return [mpl.colors.to_hex(c) for c in mpl.colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))]


def match_labels(predicted: Sequence, reference: Sequence) -> dict:
    """Match predicted labels to reference labels (Hungarian method on the contingency table).

    Returns ``{predicted label: reference label}`` for the pairs of the maximum-overlap one-to-one
    assignment (:func:`scipy.optimize.linear_sum_assignment`) that share at least one spot; predicted labels
    without such a partner are left out. Missing values (NaN) are ignored.
    """
    from scipy.optimize import linear_sum_assignment

    p = pd.Series(np.asarray(predicted, dtype=object))
    q = pd.Series(np.asarray(reference, dtype=object))
    ok = p.notna().to_numpy() & q.notna().to_numpy()
    if not ok.any():
        return {}
    table = pd.crosstab(p[ok].astype(str), q[ok].astype(str))
    rows, cols = linear_sum_assignment(-table.to_numpy())
    return {table.index[i]: table.columns[j] for i, j in zip(rows, cols, strict=True) if table.iat[i, j] > 0}


def _categories(col: pd.Series) -> list[str]:
    if isinstance(col.dtype, pd.CategoricalDtype):
        return [str(c) for c in col.cat.categories]
    vals = [str(v) for v in pd.unique(col.dropna())]
    try:
        return sorted(vals, key=float)
    except ValueError:
        return sorted(vals)


def _predicted_domains_key(adata: AnnData, compare: str | None) -> str:
    """Return the ``obs`` column of predicted domains (``tl.spatial_domains`` on a prediction layer)."""
    recorded = []
    for col in adata.obs.columns:
        entry = adata.uns.get(col)
        params = entry.get("params") if isinstance(entry, Mapping) else None
        if col != compare and isinstance(params, Mapping) and "resolution" in params and params.get("layer") != "X":
            recorded.append(col)
    if len(recorded) == 1:
        return recorded[0]
    if recorded:
        raise ValueError(f"Pass `key=` to choose the predicted domains: adata.obs has several {recorded}.")
    try:
        guess = f"{prediction_key(adata)}_domains"
    except (KeyError, ValueError):
        guess = None
    if guess is not None and guess in adata.obs:
        return guess
    raise KeyError(
        f"No predicted domains found in adata.obs (columns {list(adata.obs.columns)}): run "
        "hx.tl.spatial_domains(adata) on the prediction first, or pass `key=`."
    )


def spatial_domains(
    adata: AnnData,
    key: str | None = None,
    compare: str | None = "measured_domains",
    *,
    library_id: str | None = None,
    library_key: str | None = None,
    palette: Sequence[str] | None = None,
    img: bool = True,
    crop: bool = True,
    size: float = 1.0,
    alpha: float | None = None,
    shape: Literal["circle", "square"] | None = None,
    scalebar: bool = True,
    panel_size: float = 4.5,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Predicted spatial domains next to the measured ones, with matched colours, ARI and NMI.

    Draws ``obs[compare]`` (left) and ``obs[key]`` (right) over the H&E image, cropped to the tissue.
    The predicted labels are matched one-to-one to the measured ones by the Hungarian method on their
    contingency table (:func:`match_labels`), so one colour means one region in both panels; a predicted
    domain without a partner gets a colour no measured domain has (its legend entry says "unmatched").
    The title gives the adjusted Rand index and the normalised mutual information
    (:func:`sklearn.metrics.adjusted_rand_score`, :func:`~sklearn.metrics.normalized_mutual_info_score`)
    over the drawn spots that have both labels.

    Parameters
    ----------
    adata
        Annotated data after :func:`histoexp.tl.spatial_domains` (``obs[key]``, ``obs[compare]``).
    key
        ``obs`` column with the predicted domains. ``None``: the one column :func:`histoexp.tl.spatial_domains`
        wrote from a prediction layer (its ``uns[key]['params']['layer']``), else ``f'{layer}_domains'`` of the one
        prediction layer (``'bleep_domains'``, ``'ridge_domains'``, ...).
    compare
        ``obs`` column with the reference (measured) domains, or None for the predicted panel alone.
    library_id
        Section to draw (default: the first one).
    library_key
        Column of ``obs`` holding the section (default ``'library_id'`` when there are several sections).
    palette
        Colours of the reference domains in category order (default: ``uns[f'{compare}_colors']`` when it
        fits, else scanpy's default palette).
    img
        Draw the H&E image under the spots.
    crop
        Zoom on the spots instead of the whole image.
    size
        Spot size as a multiple of the spot diameter (or tile side).
    alpha
        Opacity of the spots (default 1, 0.6 for tiles).
    shape
        ``'circle'`` or ``'square'`` (default squares for tiles, else circles).
    scalebar
        Draw a µm scale bar when the µm per pixel is known.
    panel_size
        Height of one panel in inches.
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
    from matplotlib.colors import to_rgba_array
    from matplotlib.lines import Line2D

    if key is None:
        key = _predicted_domains_key(adata, compare)
    for name, col in (("key", key), ("compare", compare)):
        if col is not None and col not in adata.obs:
            raise KeyError(
                f"`{name}={col!r}` is not a column of adata.obs (found {list(adata.obs.columns)}); "
                "run hx.tl.spatial_domains first."
            )
    sec = _section(adata, library_id, library_key, shape=shape)
    if alpha is None:
        alpha = 0.6 if sec.shape == "square" else 1.0
    pred_all = adata.obs[key]
    pred = np.array([None if pd.isna(v) else str(v) for v in pred_all[sec.mask]], dtype=object)
    pred_cats = _categories(pred_all)
    panels = []  # (column, labels, {label: colour}, {label: legend text})
    title = None
    if compare is not None:
        ref_all = adata.obs[compare]
        ref = np.array([None if pd.isna(v) else str(v) for v in ref_all[sec.mask]], dtype=object)
        ref_cats = _categories(ref_all)
        mapping = match_labels(pred, ref)
        unmatched = [c for c in pred_cats if c not in mapping]
        if palette is None:
            stored = adata.uns.get(f"{compare}_colors")
            pal = list(stored) if stored is not None and len(stored) == len(ref_cats) else None
            if pal is not None:
                pal = pal + [c for c in _palette(len(ref_cats) + len(unmatched)) if c not in pal]
            else:
                pal = _palette(len(ref_cats) + len(unmatched))
        else:
            pal = list(palette)
        if len(pal) < len(ref_cats) + len(unmatched):
            raise ValueError(f"`palette` has {len(pal)} colours; {len(ref_cats) + len(unmatched)} are needed.")
        ref_col = {c: pal[i] for i, c in enumerate(ref_cats)}
        pred_col = {c: ref_col[mapping[c]] for c in mapping}
        pred_col.update({c: pal[len(ref_cats) + i] for i, c in enumerate(unmatched)})
        pred_text = {c: (f"{c} → {mapping[c]}" if c in mapping else f"{c} (unmatched)") for c in pred_cats}
        panels.append((compare, ref, ref_col, {c: c for c in ref_cats}))
        panels.append((key, pred, pred_col, pred_text))
        ok = np.array([a is not None and b is not None for a, b in zip(pred, ref, strict=True)])
        if ok.sum() >= 2:
            from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

            ari = adjusted_rand_score(ref[ok].astype(str), pred[ok].astype(str))
            nmi = normalized_mutual_info_score(ref[ok].astype(str), pred[ok].astype(str))
            title = f"ARI = {ari:.3f}, NMI = {nmi:.3f} ({key} vs {compare}, {int(ok.sum())} spots)"
        else:
            title = f"ARI and NMI undefined: fewer than 2 spots with both {key} and {compare}"
    else:
        pal = list(palette) if palette is not None else _palette(len(pred_cats))
        panels.append((key, pred, {c: pal[i] for i, c in enumerate(pred_cats)}, {c: c for c in pred_cats}))
    if sec.lib is not None:
        title = f"section {sec.lib}" + (f": {title}" if title else "")

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(panel_size * n * 1.35, panel_size), squeeze=False, layout="constrained")
    for ax, (col, labels, colours, text) in zip(axes[0], panels, strict=True):
        faces = to_rgba_array([colours.get(v, "lightgray") if v is not None else "lightgray" for v in labels])
        _draw(ax, sec, colors=faces, alpha=alpha, size=size, img=img, crop=crop, scalebar=scalebar)
        ax.set_title(col)
        present = [c for c in colours if (labels == c).any()]
        handles = [
            Line2D(
                [],
                [],
                ls="",
                marker="o",
                markersize=7,
                markerfacecolor=colours[c],
                markeredgecolor="none",
                label=text[c],
            )
            for c in present
        ]
        ax.legend(
            handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8, title="domain"
        )
    if title:
        fig.suptitle(title)
    return finish(fig, show=show, save=save, return_fig=return_fig)
