"""Readers: legacy Spatial Transcriptomics (her2st-style files) and 10x Visium (through squidpy)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import HIRES_MAX_SIDE, IMAGE_SUFFIXES, ST_PITCH_UM, ST_SPOT_DIAMETER_UM, VISIUM_SPOT_DIAMETER_UM
from .._settings import logger
from .._utils import import_squidpy, library_verbosity
from ..image._slide import _suffix, image_file_shape, read_downscaled


# --------------------------------------------------------------------------------------------------------------------
# small helpers (images are opened and read by histoexp.image only)
# --------------------------------------------------------------------------------------------------------------------
def _existing_path(path: str | os.PathLike, arg: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"`{arg}`: no such file or directory: {str(p)!r}.")
    return p.resolve()


def _strip_suffixes(name: str) -> str:
    for suffix in (".gz", ".bz2", ".zip", ".tsv", ".txt", ".csv"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _read_table(obj: str | os.PathLike | pd.DataFrame, arg: str, **kwargs: Any) -> pd.DataFrame:
    if isinstance(obj, pd.DataFrame):
        return obj.copy()
    path = _existing_path(obj, arg)
    try:
        return pd.read_csv(path, sep="\t", **kwargs)
    except Exception as e:
        raise ValueError(f"`{arg}`: cannot read {str(path)!r} as a tab-separated table ({e}).") from e


def _mpp_from_grid(array_xy: np.ndarray, pixel_xy: np.ndarray, pitch_um: float) -> tuple[float, float]:
    """µm/px from a least-squares affine fit ``pixel = A @ array + b``; returns ``(mpp, px_per_step)``.

    Pixels per array step is ``sqrt(|det A|)`` (the geometric mean of the two axes' steps, rotation-invariant).
    """
    n = array_xy.shape[0]
    design = np.column_stack([array_xy.astype(float), np.ones(n)])
    if n < 3 or np.linalg.matrix_rank(design) < 3:
        return float("nan"), float("nan")
    coef, *_ = np.linalg.lstsq(design, pixel_xy.astype(float), rcond=None)
    px_per_step = float(np.sqrt(abs(np.linalg.det(coef[:2, :2]))))
    if not np.isfinite(px_per_step) or px_per_step <= 0:
        return float("nan"), float("nan")
    return float(pitch_um / px_per_step), px_per_step


# --------------------------------------------------------------------------------------------------------------------
# legacy ST
# --------------------------------------------------------------------------------------------------------------------
def read_st(
    counts: str | os.PathLike | pd.DataFrame,
    spots: str | os.PathLike | pd.DataFrame,
    image: str | os.PathLike | None = None,
    *,
    mpp: float | None = None,
    library_id: str | None = None,
    spot_diameter_um: float = ST_SPOT_DIAMETER_UM,
    pitch_um: float = ST_PITCH_UM,
) -> AnnData:
    """Read a legacy Spatial Transcriptomics section (counts table + spot selection file + optional H&E).

    This is the layout of the her2st / ST-Net style data: a count table whose rows are spots named
    ``"{x}x{y}"`` (array coordinates) and whose columns are genes, and a ``*_selection.tsv`` spot file
    with columns ``x``, ``y``, ``new_x``, ``new_y``, ``pixel_x``, ``pixel_y`` (and optionally ``selected``).
    Spots are joined on ``f"{x}x{y}"``; only spots present in both tables are kept (the numbers dropped
    on either side are logged) and, if the column exists, only ``selected == 1``.

    Parameters
    ----------
    counts
        Path to a tab-separated count table (``.tsv`` or ``.tsv.gz``), spots x genes, first column the spot
        name; or such a :class:`~pandas.DataFrame` (index = spot names).
    spots
        Path to the spot selection file, or such a :class:`~pandas.DataFrame`.
    image
        Optional path to the full-resolution H&E image (RGB uint8 JPEG, PNG or TIFF/OME-TIFF; pyramidal TIFFs
        are read by level, never decoded whole). Only a downscaled copy is stored in the AnnData; the full
        image is read lazily from ``metadata['source_image_path']`` by :mod:`histoexp.image`.
    mpp
        Micrometres per full-resolution pixel. If `None`, derived from the spot grid: pixel coordinates are
        fitted (least squares) as an affine function of the array coordinates, giving pixels per array step
        (``sqrt(|det A|)``), and ``mpp = pitch_um / px_per_step``.
    library_id
        Section name, used in ``obs_names``, ``obs['library_id']`` and ``uns['spatial']``. Defaults to the
        count file name without suffixes (``'C2'`` for ``C2.tsv.gz``), else the spot file name without
        ``_selection.tsv``, else ``'section'``.
    spot_diameter_um
        Spot diameter in µm (legacy ST: 100 µm), used for ``spot_diameter_fullres``.
    pitch_um
        Centre-to-centre distance of neighbouring array positions in µm (legacy ST: 200 µm).

    Returns
    -------
    AnnData with

    - ``X``: raw counts, :class:`scipy.sparse.csr_matrix` of dtype ``float32`` (exact for counts below 2**24).
    - ``obs_names``: ``f"{library_id}_{x}x{y}"``; ``var_names``: genes (made unique if duplicated).
    - ``obs['array_x']``, ``obs['array_y']`` (int), ``obs['new_x']``, ``obs['new_y']`` (float, if present),
      ``obs['library_id']`` (categorical).
    - ``obsm['spatial']``: ``(pixel_x, pixel_y)`` full-resolution pixel centres, ``float64``.
    - ``uns['spatial'][library_id]``:

      - ``'images'``: ``{'hires': uint8 (h, w, 3)}`` (longest side about 2000 px) - only with an ``image``;
      - ``'scalefactors'``: ``'spot_diameter_fullres'`` (``spot_diameter_um / mpp``), ``'microns_per_pixel'``
        and ``'tissue_hires_scalef'`` (hires px per full-resolution px; ``1.0`` without an image, so that
        ``squidpy.pl.spatial_scatter(..., img=False)`` can size the spots);
      - ``'metadata'``: ``'source_image_path'`` (absolute path, ``''`` without an image),
        ``'microns_per_pixel'``, ``'mpp_source'`` (``'argument'`` or ``'spot grid'``), ``'platform'``
        (``'legacy ST'``), ``'spot_diameter_um'``, ``'pitch_um'``, ``'px_per_array_step'`` (nan-free, only when
        fitted) and, with an image, ``'fullres_shape'`` (``[height, width]``).

    Raises
    ------
    FileNotFoundError
        If `counts`, `spots` or `image` does not exist.
    ValueError
        If the image is unreadable/corrupted or not RGB uint8, if spots fall outside the image, if no spot is
        shared by `counts` and `spots`, or if µm/px can be neither derived nor was given.
    """
    import scipy.sparse as sp

    counts_name = None if isinstance(counts, pd.DataFrame) else Path(counts).name
    spots_name = None if isinstance(spots, pd.DataFrame) else Path(spots).name
    image_path = None if image is None else _existing_path(image, "image")
    # read tables (FileNotFoundError first, for every path argument)
    if counts_name is not None:
        _existing_path(counts, "counts")
    if spots_name is not None:
        _existing_path(spots, "spots")
    cnt = counts if isinstance(counts, pd.DataFrame) else _read_table(counts, "counts", index_col=0)
    spt = _read_table(spots, "spots")

    if library_id is None:
        if counts_name is not None:
            library_id = _strip_suffixes(counts_name)
        elif spots_name is not None:
            library_id = re.sub(r"_selection$", "", _strip_suffixes(spots_name))
        else:
            library_id = "section"
    library_id = str(library_id)

    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in spt.columns]
    if missing:
        raise ValueError(
            f"`spots`: missing column(s) {missing}; found {list(spt.columns)}, expected x, y, pixel_x, pixel_y "
            "(and optionally new_x, new_y, selected)."
        )
    if "selected" in spt.columns:
        n0 = len(spt)
        spt = spt.loc[spt["selected"].astype(float) == 1]
        if len(spt) < n0:
            logger.info("read_st(%s): kept %d of %d spots with selected == 1.", library_id, len(spt), n0)
    ax = np.round(spt["x"].to_numpy(dtype=float)).astype(int)
    ay = np.round(spt["y"].to_numpy(dtype=float)).astype(int)
    spt.index = pd.Index([f"{x}x{y}" for x, y in zip(ax, ay, strict=True)])
    spt["array_x"], spt["array_y"] = ax, ay
    if spt.index.duplicated().any():
        dup = spt.index[spt.index.duplicated()].unique().tolist()[:5]
        raise ValueError(f"`spots`: duplicated spot position(s) {dup}.")
    cnt.index = cnt.index.astype(str)
    if cnt.index.duplicated().any():
        dup = cnt.index[cnt.index.duplicated()].unique().tolist()[:5]
        raise ValueError(f"`counts`: duplicated spot name(s) {dup}.")

    common = spt.index.intersection(cnt.index, sort=False)
    if len(common) == 0:
        raise ValueError(
            f"`counts` and `spots` share no spot: counts rows look like {cnt.index[:3].tolist()}, spot positions "
            f"like {spt.index[:3].tolist()}; expected count rows named '{{x}}x{{y}}' as in the spot file."
        )
    n_only_spots, n_only_counts = len(spt) - len(common), len(cnt) - len(common)
    logger.info(
        "read_st(%s): %d spots in both tables; dropped %d only in `spots` and %d only in `counts`.",
        library_id,
        len(common),
        n_only_spots,
        n_only_counts,
    )
    spt = spt.loc[common]
    cnt = cnt.loc[common]

    try:
        values = cnt.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`counts`: expected numeric counts (spots x genes), could not convert ({e}).") from e
    X = sp.csr_matrix(values)

    obs = pd.DataFrame(index=pd.Index([f"{library_id}_{n}" for n in common]))
    obs["array_x"] = spt["array_x"].to_numpy()
    obs["array_y"] = spt["array_y"].to_numpy()
    for col in ("new_x", "new_y"):
        if col in spt.columns:
            obs[col] = spt[col].to_numpy(dtype=float)
    obs["library_id"] = pd.Categorical([library_id] * len(obs), categories=[library_id])
    var = pd.DataFrame(index=pd.Index(cnt.columns.astype(str)))
    adata = AnnData(X=X, obs=obs, var=var)
    if not adata.var_names.is_unique:
        logger.warning("read_st(%s): duplicated gene names made unique.", library_id)
        adata.var_names_make_unique()
    xy = spt[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
    if not np.isfinite(xy).all():
        raise ValueError("`spots`: pixel_x/pixel_y contain missing or non-finite values.")
    adata.obsm["spatial"] = xy

    # µm per pixel
    metadata: dict[str, Any] = {"platform": "legacy ST", "spot_diameter_um": float(spot_diameter_um)}
    metadata["pitch_um"] = float(pitch_um)
    if mpp is not None:
        mpp = float(mpp)
        if not np.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"`mpp` must be a positive number of µm per pixel, got {mpp!r}.")
        source = "argument"
    else:
        mpp, px_step = _mpp_from_grid(spt[["array_x", "array_y"]].to_numpy(), xy, pitch_um)
        if not np.isfinite(mpp):
            raise ValueError(
                f"`mpp`: no µm/px given and it cannot be derived from the spot grid of {library_id!r} "
                f"({len(spt)} spots, need >= 3 not on one line). Pass `mpp=`."
            )
        source = "spot grid"
        metadata["px_per_array_step"] = px_step
    logger.info("read_st(%s): %.4f µm/px (source: %s).", library_id, mpp, source)
    metadata["microns_per_pixel"] = float(mpp)
    metadata["mpp_source"] = source
    scalefactors: dict[str, float] = {
        "spot_diameter_fullres": float(spot_diameter_um / mpp),
        "microns_per_pixel": float(mpp),
    }
    lib: dict[str, Any] = {"scalefactors": scalefactors, "metadata": metadata}

    if image_path is not None:
        H, W = image_file_shape(image_path, arg="image")
        outside = (xy[:, 0] < 0) | (xy[:, 0] > W - 1) | (xy[:, 1] < 0) | (xy[:, 1] > H - 1)
        if outside.any():
            bad = adata.obs_names[outside][:5].tolist()
            raise ValueError(
                f"`spots`: {int(outside.sum())} spot centre(s) lie outside `image` ({W} x {H} px), e.g. {bad} "
                f"(pixel_x in [{xy[:, 0].min():.1f}, {xy[:, 0].max():.1f}], pixel_y in [{xy[:, 1].min():.1f}, "
                f"{xy[:, 1].max():.1f}]); expected full-resolution pixel coordinates of this image."
            )
        hires, scalef, _ = read_downscaled(image_path, HIRES_MAX_SIDE, arg="image")
        lib["images"] = {"hires": hires}
        scalefactors["tissue_hires_scalef"] = scalef
        metadata["source_image_path"] = str(image_path)
        metadata["fullres_shape"] = [H, W]
    else:
        metadata["source_image_path"] = ""
        scalefactors["tissue_hires_scalef"] = 1.0  # no image; lets squidpy size spots (spatial_scatter(img=False))
        logger.info("read_st(%s): no image; counts and spot coordinates only.", library_id)
    adata.uns["spatial"] = {library_id: lib}
    return adata


# --------------------------------------------------------------------------------------------------------------------
# Visium
# --------------------------------------------------------------------------------------------------------------------
def _find_source_image(path: Path) -> str:
    """Return the single image file directly in a Space Ranger output folder, else ''."""
    cands = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p) in IMAGE_SUFFIXES)
    return str(cands[0].resolve()) if len(cands) == 1 else ""


def _check_visium_files(path: Path, counts_file: str) -> None:
    """Clear errors for a damaged count file or scale-factor JSON, before squidpy's raw HDF5 / JSON errors."""
    counts = path / counts_file
    if counts.is_file() and counts.suffix == ".h5":
        import h5py

        if not h5py.is_hdf5(counts):
            raise ValueError(
                f"`path`: the count file {str(counts)!r} is not an HDF5 file (Space Ranger's "
                f"{counts.name}): it is damaged, truncated or something else under that name; copy it again "
                "(or pass `counts_file=`)."
            )
    sf = path / "spatial" / "scalefactors_json.json"
    if sf.is_file():
        try:
            rec = json.loads(sf.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(
                f"`path`: {str(sf)!r} is not readable JSON ({err}); expected Space Ranger's scale factors "
                "(spot_diameter_fullres, tissue_hires_scalef, ...): copy it again."
            ) from err
        if not isinstance(rec, dict):
            raise ValueError(f"`path`: {str(sf)!r} holds {type(rec).__name__}, not the JSON object of scale factors.")
        bad = {k: v for k, v in rec.items() if k.endswith(("scalef", "fullres")) and not _positive_number(v)}
        if bad:
            raise ValueError(f"`path`: {str(sf)!r} has scale factors that are not positive numbers: {bad}.")


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0


def read_visium(
    path: str | os.PathLike,
    *,
    source_image_path: str | os.PathLike | None = None,
    library_id: str | None = None,
    **kwargs: Any,
) -> AnnData:
    """Read a 10x Visium (Space Ranger) output folder with :func:`squidpy.read.visium` and record µm/px.

    The counts, ``obsm['spatial']``, ``uns['spatial'][library_id]['images']`` (``hires``/``lowres``) and
    ``scalefactors`` come from squidpy unchanged. histoexp then adds:

    - ``metadata['source_image_path']``: the absolute `source_image_path` if given, else the single image file
      (``.tif``/``.tiff``/``.ome.tif``/``.btf``/``.svs``/``.jpg``/``.png``) found directly in `path`, else ``''``;
    - ``scalefactors['microns_per_pixel']``, ``metadata['microns_per_pixel']`` = ``55 / spot_diameter_fullres``
      and ``metadata['mpp_source']`` = ``'spot diameter (Visium 55 µm)'``.

    Visium HD is not handled here: read it with :func:`spatialdata_io.visium_hd` and convert the table you
    want with :func:`histoexp.io.from_spatialdata`.

    Parameters
    ----------
    path
        Space Ranger output folder (with ``filtered_feature_bc_matrix.h5`` and ``spatial/``).
    source_image_path
        Full-resolution H&E image the ``spatial/`` coordinates refer to.
    library_id
        Library id; defaults to the one stored in the count file.
    kwargs
        Passed to :func:`squidpy.read.visium` (e.g. ``counts_file``, ``load_images``).

    Returns
    -------
    AnnData as returned by :func:`squidpy.read.visium`, with the keys above added.
    """
    sq = import_squidpy()

    path = _existing_path(path, "path")
    if not path.is_dir():
        raise ValueError(f"`path`: expected a Space Ranger output folder, found a file {str(path)!r}.")
    src = "" if source_image_path is None else str(_existing_path(source_image_path, "source_image_path"))
    if (path / "binned_outputs").is_dir():
        raise ValueError(
            f"`path`: {str(path)!r} looks like a Visium HD output (binned_outputs/). Read it with "
            "`spatialdata_io.visium_hd(path)` and convert a table with `histoexp.io.from_spatialdata`."
        )
    _check_visium_files(path, kwargs.get("counts_file", "filtered_feature_bc_matrix.h5"))
    with library_verbosity():
        adata = sq.read.visium(path, library_id=library_id, **kwargs)
    if "spatial" not in adata.uns or not adata.uns["spatial"]:
        return adata
    if not src:
        src = _find_source_image(path)
        if src:
            logger.info("read_visium: using %r as the full-resolution image.", src)
        else:
            logger.info("read_visium: no full-resolution image given or found; source_image_path = ''.")
    for lib, entry in adata.uns["spatial"].items():
        metadata = entry.setdefault("metadata", {})
        metadata["source_image_path"] = src
        scalefactors = entry.get("scalefactors", {})
        d = scalefactors.get("spot_diameter_fullres")
        if d is not None and float(d) > 0:
            mpp = VISIUM_SPOT_DIAMETER_UM / float(d)
            scalefactors["microns_per_pixel"] = mpp
            metadata["microns_per_pixel"] = mpp
            metadata["mpp_source"] = f"spot diameter (Visium {VISIUM_SPOT_DIAMETER_UM:g} µm)"
            logger.info(
                "read_visium(%s): %.4f µm/px (source: spot diameter, Visium %g µm).", lib, mpp, VISIUM_SPOT_DIAMETER_UM
            )
        else:
            logger.warning("read_visium(%s): no spot_diameter_fullres; µm/px unknown.", lib)
    return adata
