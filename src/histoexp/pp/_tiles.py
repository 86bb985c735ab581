"""A grid of tiles over the detected tissue of an H&E slide: the query for an image-only section."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import HIRES_MAX_SIDE, ST_SPOT_DIAMETER_UM
from .._settings import logger
from .._utils import jsonable
from ..image._slide import SlideImage

__all__ = ["tile_tissue", "tissue_mask"]

#: fewest full-resolution pixels a tile may span: smaller tiles mean a wrong ``mpp`` (e.g. 40 µm/px for 0.4)
MIN_TILE_PX = 8
#: longest side of the thumbnail on which tissue is detected (and stored as ``'hires'``, the same size as read_st's)
THUMBNAIL_PX = HIRES_MAX_SIDE
#: floors of the thresholds: below them nothing counts as tissue, even if Otsu says so (blank glass)
MIN_SATURATION = 0.05
MIN_OPTICAL_DENSITY = 0.1
#: the lowest of three Otsu classes is glass when its mean is at most this (saturation / optical density);
#: otherwise the image holds no glass (a crop inside the tissue) and only the floor separates tissue from blank
GLASS_SATURATION = 0.1
GLASS_OPTICAL_DENSITY = 0.15


def _glass_threshold(feature: np.ndarray, floor: float, glass: float) -> float:
    """Threshold between glass and tissue of one smoothed feature (higher on tissue).

    Three-class Otsu (``skimage.filters.threshold_multiotsu``) separates glass, pale tissue (stroma, fat
    margins) and dense tissue (nuclei); the lower threshold is glass | tissue when the lowest class looks like
    glass. Two-class Otsu would split pale from dense tissue whenever tissue fills most of the image.
    """
    from skimage.filters import threshold_multiotsu, threshold_otsu

    if np.ptp(feature) == 0:
        return floor
    try:
        low = float(threshold_multiotsu(feature, classes=3)[0])
    except ValueError:  # too few distinct values for three classes
        low = float(threshold_otsu(feature))
    below = feature[feature <= low]
    if below.size and below.mean() > glass:
        low = floor  # the lowest class is tissue too: no glass in the image
    return max(low, floor)


def tissue_mask(
    thumb: np.ndarray, *, sigma: float = 2.0, min_object_px: int = 64, max_hole_px: int = 1024
) -> tuple[np.ndarray, dict]:
    """Detect tissue on an RGB thumbnail.

    Method: two stain signals per pixel, each smoothed by a Gaussian of ``sigma`` thumbnail pixels
    (``skimage.filters.gaussian``): HSV saturation ``(max - min) / max`` of the RGB channels (as
    ``skimage.color.rgb2hsv``; stained tissue is coloured, glass grey/white) and optical density (mean over the
    channels of ``-log10((I + 1) / 256)``, Beer-Lambert absorbance: tinted glass is coloured but absorbs little).
    Each is thresholded between glass and tissue by :func:`_glass_threshold` (three-class Otsu, so pale stroma is
    not split off as background when tissue fills the image; floors :data:`MIN_SATURATION` and
    :data:`MIN_OPTICAL_DENSITY` so a blank image has no tissue). Tissue is where both exceed their threshold,
    then ``skimage.morphology.closing`` (a disk of ``sigma`` px: joins pale gaps between nuclei),
    ``remove_small_holes`` (fat vacuoles, tears, < ``max_hole_px``) and ``remove_small_objects`` (debris,
    specks, < ``min_object_px``).

    Returns
    -------
    ``(mask, thresholds)``: boolean mask of the thumbnail and the thresholds used (``'saturation'``,
    ``'optical_density'``).
    """
    from skimage.filters import gaussian
    from skimage.morphology import closing, disk, remove_small_holes, remove_small_objects

    rgb = thumb.astype(np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    od = -np.log10((rgb + 1.0) / 256.0).mean(-1)
    if sigma > 0:
        sat, od = gaussian(sat, sigma=sigma), gaussian(od, sigma=sigma)
    thr = {
        "saturation": _glass_threshold(sat, MIN_SATURATION, GLASS_SATURATION),
        "optical_density": _glass_threshold(od, MIN_OPTICAL_DENSITY, GLASS_OPTICAL_DENSITY),
    }
    mask = (sat > thr["saturation"]) & (od > thr["optical_density"])
    if mask.any():
        mask = closing(mask, disk(max(1, round(sigma))))
        mask = remove_small_holes(mask, max_size=max_hole_px)
        mask = remove_small_objects(mask, max_size=min_object_px)
    return mask, thr


def tile_tissue(
    image: Any,
    *,
    tile_um: float = ST_SPOT_DIAMETER_UM,
    mpp: float | None = None,
    min_tissue: float = 0.5,
    library_id: str = "tiles",
    spot_diameter_um: float | None = None,
    key_added: str | None = None,
) -> AnnData:
    """Lay a grid of square tiles over the tissue of an H&E slide and return them as spots.

    Tissue is detected on a thumbnail (longest side :data:`THUMBNAIL_PX`) by :func:`tissue_mask`
    (glass thresholds by three-class Otsu on smoothed HSV saturation and optical density, closing, objects
    below a quarter tile removed, holes below four tiles filled). The slide is cut into a
    grid of ``tile_um`` x ``tile_um`` tiles from its top-left corner (only whole tiles); a tile is
    kept when the tissue fraction of its area is at least ``min_tissue``.

    The result is an AnnData with no genes that :func:`histoexp.pp.extract_patches` and the
    prediction tools accept directly: the query for a slide without expression.

    Parameters
    ----------
    image
        Path (JPEG/PNG/TIFF/OME-TIFF), RGB uint8 array, SpatialData image or
        :class:`~histoexp.image.SlideImage`.
    tile_um
        Side of a tile in µm (100 µm: the legacy ST spot, 55 µm: a Visium spot).
    mpp
        µm per pixel of the full-resolution image; needed unless the image says it (TIFF metadata,
        or a :class:`SlideImage` with ``mpp``).
    min_tissue
        Minimum tissue fraction (0-1) of a tile's area to keep it.
    library_id
        Key of the section in ``uns['spatial']`` and value of ``obs['library_id']``.
    spot_diameter_um
        Stored as the spot diameter (``spot_diameter_fullres``), i.e. the default patch size of
        :func:`~histoexp.pp.extract_patches`; default ``tile_um``.
    key_added
        Key under ``uns['histoexp']`` for the parameters (default ``'tiles'``).

    Returns
    -------
    AnnData with ``X`` empty ``(n_tiles, 0)``; ``obsm['spatial']`` tile centres (x, y) in
    full-resolution pixels; ``obs['array_row']``, ``obs['array_col']`` (grid indices),
    ``obs['tissue_fraction']``, ``obs['library_id']``; ``uns['spatial'][library_id]`` with the
    thumbnail as ``images['hires']``, ``scalefactors`` (``tissue_hires_scalef``,
    ``spot_diameter_fullres``, ``microns_per_pixel``) and ``metadata['source_image_path']`` (the
    path, or ``''`` for an in-memory image: a numpy array is then kept as the full-resolution
    ``'hires'`` image itself so patches stay sharp); ``uns['histoexp'][key_added]`` the parameters.
    Tissue found but no tile with ``min_tissue``: an empty AnnData (and a warning).

    Raises
    ------
    ValueError
        No tissue at all on the image (blank glass, an empty scan), no µm per pixel, a tile smaller than
        :data:`MIN_TILE_PX` pixels of the slide (an implausible ``mpp``), or a bad argument.
    """
    if not (np.isfinite(tile_um) and tile_um > 0):
        raise ValueError(f"`tile_um` must be a positive number of µm, got {tile_um!r}.")
    if not 0 <= min_tissue <= 1:
        raise ValueError(f"`min_tissue` must be a fraction in [0, 1], got {min_tissue!r}.")
    slide = SlideImage.open(image, mpp=mpp)
    if slide.mpp is None:
        raise ValueError(
            "The image has no µm per pixel information (no TIFF resolution metadata): pass `mpp=` "
            "(µm per pixel of the full-resolution image; from the scanner's metadata, or, for a slide scanned like "
            "a model's training slides, their µm/px in `model.image_spec()['slide_mpp']`)."
        )
    res = float(slide.mpp)
    h, w = slide.shape
    tile_px = tile_um / res
    n_rows, n_cols = int(h // tile_px), int(w // tile_px)
    if tile_px < MIN_TILE_PX:  # a unit mistake in `mpp`: millions of tiles of a few pixels, for hours
        raise ValueError(
            f"`mpp={res:g}` µm per pixel ({slide.mpp_source or 'argument'}) makes a tile of `tile_um={tile_um:g}` µm "
            f"{tile_px:.3g} px of the slide, below {MIN_TILE_PX} px ({n_rows * n_cols:,} tiles over {h} x {w} px). "
            "`mpp` is micrometres per pixel of the full-resolution image (H&E scans: about 0.25 at 40x, 0.5 at 20x, "
            "1 at 10x): check it, or pass a larger `tile_um`."
        )
    if n_rows == 0 or n_cols == 0:
        raise ValueError(f"`tile_um={tile_um}` ({tile_px:.1f} px) is larger than the image ({h} x {w} px).")

    thumb, scale = slide.thumbnail(THUMBNAIL_PX)
    tile_thumb = tile_px * scale
    mask, thr = tissue_mask(
        thumb,
        sigma=max(1.0, tile_thumb / 15),
        min_object_px=max(16, int(0.25 * tile_thumb**2)),
        max_hole_px=max(64, int(4 * tile_thumb**2)),
    )
    if not mask.any():
        raise ValueError(
            "`image`: no tissue was detected (the slide looks blank: no pixel is both stained and absorbing above "
            f"the glass thresholds {thr}); check that it is an H&E image and not an empty or overexposed scan."
        )

    from PIL import Image

    frac_img = Image.fromarray(mask.astype(np.float32), mode="F").resize(
        (n_cols, n_rows), Image.Resampling.BOX, box=(0, 0, n_cols * tile_thumb, n_rows * tile_thumb)
    )
    frac = np.clip(np.asarray(frac_img, dtype=np.float64), 0, 1)
    rr, cc = np.nonzero(frac >= min_tissue)
    n = rr.size
    logger.info(
        "tile_tissue: %d of %d tiles of %.4g µm (%.1f px) with >= %.0f%% tissue (thresholds: saturation %.3f, "
        "optical density %.3f).",
        n,
        n_rows * n_cols,
        tile_um,
        tile_px,
        100 * min_tissue,
        thr["saturation"],
        thr["optical_density"],
    )
    if n == 0:
        logger.warning("tile_tissue: no tile has >= %.0f%% tissue; the result is empty.", 100 * min_tissue)

    centres = np.column_stack([(cc + 0.5) * tile_px, (rr + 0.5) * tile_px]).astype(np.float64)
    obs = pd.DataFrame(
        {
            "array_row": rr.astype(np.int64),
            "array_col": cc.astype(np.int64),
            "tissue_fraction": frac[rr, cc].astype(np.float32),
            "library_id": pd.Categorical([library_id] * n, categories=[library_id]),
        },
        index=[f"{library_id}_{r}x{c}" for r, c in zip(rr, cc, strict=True)],
    )
    adata = AnnData(X=np.zeros((n, 0), dtype=np.float32), obs=obs)
    adata.obsm["spatial"] = centres

    path = slide.source
    if path is None and isinstance(image, (str, os.PathLike)):
        path = str(image)
    hires, hires_scale = thumb, scale
    if path is None:
        if isinstance(image, np.ndarray):
            hires, hires_scale = image, 1.0  # the full-resolution array itself (no copy)
        else:
            logger.warning(
                "tile_tissue: the image is in memory and not a numpy array; uns['spatial'] keeps only a thumbnail. "
                "Pass the full-resolution image as `image=` to extract_patches for sharp patches."
            )
    diam_um = float(spot_diameter_um) if spot_diameter_um is not None else float(tile_um)
    adata.uns["spatial"] = {
        library_id: {
            "images": {"hires": hires},
            "scalefactors": {
                "tissue_hires_scalef": float(hires_scale),
                "spot_diameter_fullres": diam_um / res,
                "microns_per_pixel": res,
            },
            "metadata": {
                "source_image_path": str(Path(path).resolve()) if path else "",
                "microns_per_pixel": res,
                "mpp_source": str(slide.mpp_source or "argument"),
            },
        }
    }
    adata.uns["histoexp"] = {
        key_added or "tiles": jsonable(
            {
                "tile_um": float(tile_um),
                "tile_px": tile_px,
                "mpp": res,
                "min_tissue": float(min_tissue),
                "method": "3-class otsu glass thresholds on smoothed hsv saturation and optical density (both), "
                "closing + remove_small_holes + remove_small_objects, thumbnail",
                "saturation_threshold": thr["saturation"],
                "optical_density_threshold": thr["optical_density"],
                "thumbnail_scale": scale,
                "grid_shape": [n_rows, n_cols],
                "n_tiles": n,
            }
        )
    }
    return adata
