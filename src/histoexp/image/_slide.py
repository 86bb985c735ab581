"""One abstraction for region reads from slide images, whatever they are stored in.

:class:`SlideImage` reads rectangular regions (and resampled square patches) from

- JPEG / PNG files: decoded once with PIL and kept in a small module-level LRU cache keyed by path
  and modification time, so repeated reads and per-section calls do not decode again;
- TIFF / OME-TIFF files, pyramidal or not: read by region through tifffile's zarr store, never
  decoded whole; the pyramid level whose resolution is just finer than requested is read and then
  resampled;
- vendor whole-slide files (SVS, NDPI, SCN, BIF, MRXS, ...): read by region through tiffslide (or
  OpenSlide for the formats tiffslide does not read), the optional extra ``histoexp[slide]``;
- OME-Zarr image directories (SpatialData image elements written to disk): zarr reads by region and scale;
- SpatialData image elements (``xarray.DataArray`` with dims ``(c, y, x)`` or a multiscale
  ``DataTree``): lazy (dask) reads of the chosen scale;
- numpy ``uint8`` arrays of shape ``(H, W, 3)``.

Coordinates are always level-0 (full-resolution) pixels, ``x`` along columns and ``y`` along rows,
continuous: pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._constants import (
    HIRES_MAX_SIDE,
    IMAGE_SUFFIXES,
    OPENSLIDE_ONLY_SUFFIXES,
    ST_SPOT_DIAMETER_UM,
    TIFF_SUFFIXES,
    VENDOR_SUFFIXES,
    VISIUM_SPOT_DIAMETER_UM,
)
from .._settings import logger

__all__ = ["SlideImage", "slide_for_library"]

_RGB_MSG = "RGB uint8 expected"
#: largest level (pixels) :meth:`SlideImage.thumbnail` reads in one piece; above it, strip by strip
THUMBNAIL_READ_MAX_PX = 64_000_000
#: :meth:`SlideImage.read_patches` groups patches on a grid of this many pixels and reads each group's window once
READ_WINDOW_PX = 1024

#: platform spot diameters in µm used to derive µm/px from ``spot_diameter_fullres``
SPOT_DIAMETER_UM = {"visium": VISIUM_SPOT_DIAMETER_UM, "st": ST_SPOT_DIAMETER_UM}


def _not_rgb(found: str, path: Path, arg: str) -> ValueError:
    """Build the one error for an image file that is not RGB uint8 (``arg``: the argument that named the file)."""
    return ValueError(
        f"`{arg}`: expected an RGB uint8 image (H x W x 3, 8 bits per channel), found {found} in {str(path)!r}. "
        f"Grayscale, RGBA and 16-bit images are rejected, not converted ({_RGB_MSG}): convert the file first, e.g. "
        "`PIL.Image.open(path).convert('RGB').save(...)`."
    )


def _check_decode_size(size: tuple[int, int], path: Path, arg: str) -> None:
    """Refuse a JPEG/PNG whose header declares more pixels than ``hx.settings.max_image_pixels`` (before decoding)."""
    from .._settings import settings

    w, h = (int(v) for v in size)
    limit = settings.max_image_pixels
    if limit is not None and w * h > limit:
        raise ValueError(
            f"`{arg}`: {str(path)!r} declares {w} x {h} px ({w * h / 1e6:.0f} Mpx, {3 * w * h / 1e9:.2g} GB as RGB), "
            f"more than hx.settings.max_image_pixels ({limit / 1e6:.0f} Mpx): a JPEG/PNG is decoded whole. If the "
            "image is genuine, convert it to a tiled pyramidal TIFF (read by region, e.g. with tifffile or vips) or "
            "raise the limit (hx.settings.max_image_pixels = None for none)."
        )


@contextmanager
def _open_pil(path: Path, arg: str = "source") -> Iterator[Any]:
    """Open a JPEG/PNG with PIL (header only until ``load()``), checked to be RGB; PIL errors become ValueErrors.

    Histology images are legitimately larger than PIL's decompression-bomb limit (~89 Mpx), so the check is off
    while the file is open.
    """
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(path)
            except (OSError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
                raise ValueError(
                    f"`{arg}`: cannot read {str(path)!r} as an image ({type(e).__name__}: {e}); "
                    "expected an RGB uint8 JPEG, PNG or TIFF."
                ) from e
            with im:
                _check_decode_size(im.size, path, arg)
                if im.mode != "RGB":
                    raise _not_rgb(f"PIL mode {im.mode!r}", path, arg)
                try:
                    yield im
                except (OSError, SyntaxError, ValueError) as e:  # PIL's load() on truncated / corrupt data
                    raise ValueError(
                        f"`{arg}`: cannot decode {str(path)!r} ({type(e).__name__}: {e}); the file looks corrupted "
                        "or truncated. Expected an RGB uint8 JPEG, PNG or TIFF."
                    ) from e
    finally:
        Image.MAX_IMAGE_PIXELS = old


# ----------------------------------------------------------------------------------------------
# decoded-image cache (JPEG/PNG)
# ----------------------------------------------------------------------------------------------
_CACHE: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
_CACHE_LOCK = threading.Lock()
#: maximum number of decoded images kept, and their maximum total size in bytes (the newest is always kept)
CACHE_MAX_ITEMS = 3
CACHE_MAX_BYTES = 1_500_000_000


def clear_cache() -> None:
    """Forget every decoded JPEG/PNG image kept by :class:`SlideImage`."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cache_key(path: Path) -> tuple[str, int]:
    return (str(path.resolve()), path.stat().st_mtime_ns)


def _decode_pil(path: Path) -> np.ndarray:
    """Decode a JPEG/PNG to an RGB uint8 array (cached by path and mtime)."""
    key = _cache_key(path)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    with _open_pil(path) as im:
        im.load()
        arr = np.asarray(im)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise _not_rgb(f"pixels decoded to {arr.dtype} {arr.shape}", path, "source")
    arr.setflags(write=False)  # shared by every SlideImage of this file
    with _CACHE_LOCK:
        _CACHE[key] = arr
        _CACHE.move_to_end(key)
        total = sum(a.nbytes for a in _CACHE.values())
        while len(_CACHE) > 1 and (len(_CACHE) > CACHE_MAX_ITEMS or total > CACHE_MAX_BYTES):
            _, dropped = _CACHE.popitem(last=False)
            total -= dropped.nbytes
    return arr


# ----------------------------------------------------------------------------------------------
# levels
# ----------------------------------------------------------------------------------------------
@dataclass
class _Level:
    """One resolution level: ``read(y0, y1, x0, x1)`` returns in-bounds pixels ``(h, w, 3)`` uint8."""

    height: int
    width: int
    downsample: float
    array: Any
    axes: str = "YXS"  # 'YXS' (numpy, tifffile) or 'SYX'; 'xarray' for DataArray (c, y, x)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self.axes == "xarray":
            out = self.array.isel(y=slice(y0, y1), x=slice(x0, x1)).transpose("y", "x", "c").values
        elif self.axes == "SYX":
            out = np.moveaxis(np.asarray(self.array[:, y0:y1, x0:x1]), 0, -1)
        else:
            out = np.asarray(self.array[y0:y1, x0:x1])
        return np.ascontiguousarray(out, dtype=np.uint8)


def _check_rgb_array(arr: Any, what: str) -> None:
    dtype = np.dtype(arr.dtype)
    shape = tuple(arr.shape)
    if dtype != np.uint8 or len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"{what} has dtype {dtype} and shape {shape}: {_RGB_MSG} with shape (H, W, 3).")


def _is_xarray(obj: Any, name: str) -> bool:
    mod = sys.modules.get("xarray")
    return mod is not None and hasattr(mod, name) and isinstance(obj, getattr(mod, name))


def _xarray_level(da: Any, what: str, base_hw: tuple[int, int] | None) -> _Level:
    dims = tuple(da.dims)
    if set(dims) != {"c", "y", "x"}:
        raise ValueError(f"{what} has dims {dims}: expected a SpatialData image with dims ('c', 'y', 'x').")
    if da.sizes["c"] != 3 or np.dtype(da.dtype) != np.uint8:
        raise ValueError(f"{what} has {da.sizes['c']} channels of dtype {da.dtype}: {_RGB_MSG}.")
    h, w = int(da.sizes["y"]), int(da.sizes["x"])
    ds = 1.0 if base_hw is None else base_hw[1] / w
    return _Level(h, w, ds, da, "xarray")


def _tiff_mpp(tf: Any) -> float | None:
    """µm/px from OME PhysicalSizeX or the TIFF resolution tags (centimetre/inch units only)."""
    try:
        if tf.is_ome and tf.ome_metadata:
            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tf.ome_metadata)
            if m:
                unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tf.ome_metadata)
                factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm")
                if factor is not None:
                    return float(m.group(1)) * factor
        page = tf.pages[0]
        xres = page.tags.get("XResolution")
        unit = page.tags.get("ResolutionUnit")
        if xres is not None and unit is not None:
            num, den = xres.value
            per_unit = num / den if den else 0.0
            unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            if per_unit > 0 and unit_um is not None:
                mpp = unit_um / per_unit
                if 0.01 <= mpp <= 100:  # 72 dpi defaults etc. are not microscopy resolutions
                    return mpp
    except Exception as e:  # pragma: no cover - metadata is best effort
        logger.debug("could not read µm/px from TIFF metadata: %s", e)
    return None


def _open_tiff(path: Path, arg: str = "source") -> tuple[list[_Level], float | None, Any]:
    """Levels (lazy zarr views, nothing decoded), µm/px from the metadata and the open ``TiffFile`` of ``path``."""
    import tifffile
    import zarr

    try:
        tf = tifffile.TiffFile(path)
    except Exception as e:
        raise ValueError(f"`{arg}`: cannot read {str(path)!r} as a TIFF ({type(e).__name__}: {e}).") from e
    try:
        series = tf.series[0]
        axes = series.axes
        mpp = _tiff_mpp(tf)
        dtype = np.dtype(series.dtype)
        shape = tuple(series.shape)
        squeezed = "".join(a for a, n in zip(axes, shape, strict=True) if not (n == 1 and a not in "YX"))
        if squeezed not in ("YXS", "SYX", "CYX") or dtype != np.uint8:
            raise _not_rgb(f"axes {axes!r}, shape {shape}, dtype {dtype}", path, arg)
        n_ch = dict(zip(axes, shape, strict=True)).get("S", dict(zip(axes, shape, strict=True)).get("C", 1))
        if n_ch != 3:
            raise _not_rgb(f"{n_ch} channels (axes {axes!r}, shape {shape})", path, arg)
        store = tf.series[0].aszarr()
        root = zarr.open(store, mode="r")
        if hasattr(root, "array_keys"):
            keys = sorted(root.array_keys(), key=int)
            arrays = [root[k] for k in keys]
        else:
            arrays = [root]
    except Exception:  # do not leak the file handle
        tf.close()
        raise
    layout = "YXS" if squeezed == "YXS" else "SYX"
    levels = []
    base_w = None
    for arr in arrays:
        a = arr
        if a.ndim != 3:  # size-1 leading axes (T, Z, ...) squeezed away by indexing
            a = _Squeeze(a)
        h, w = (a.shape[0], a.shape[1]) if layout == "YXS" else (a.shape[1], a.shape[2])
        base_w = base_w or w
        levels.append(_Level(int(h), int(w), base_w / w, a, layout))
    return levels, mpp, tf


class _OpenSlideLevel:
    """``array``-like view of one OpenSlide level: ``[y0:y1, x0:x1]`` in level pixels -> RGB uint8."""

    def __init__(self, slide: Any, level: int, downsample: float, shape: tuple[int, int]):
        self.slide, self.level, self.downsample = slide, level, downsample
        self.shape = (*shape, 3)

    def __getitem__(self, key):
        ys, xs = key
        # OpenSlide takes the corner in level-0 pixels and the size in level pixels
        loc = (round(xs.start * self.downsample), round(ys.start * self.downsample))
        im = self.slide.read_region(loc, self.level, (xs.stop - xs.start, ys.stop - ys.start))
        return np.asarray(im.convert("RGB"))


_EXTRA_HINT = "pip install 'histoexp[slide]' (tiffslide)"


def _open_vendor(path: Path, arg: str = "source") -> tuple[list[_Level], float | None, Any] | None:
    """Levels, µm/px and the open handle of a vendor whole-slide file, through tiffslide or OpenSlide.

    Returns ``None`` for ``.svs`` when neither library is installed (tifffile reads Aperio files too, minus
    their µm/px); other vendor formats then raise an ImportError naming the extra.
    """
    suffix = _suffix(path)
    tiffslide = openslide = None
    if suffix not in OPENSLIDE_ONLY_SUFFIXES:
        try:
            import tiffslide
        except ImportError:
            tiffslide = None
    if tiffslide is None:
        try:
            import openslide
        except ImportError:  # the package or its native library
            openslide = None
    if tiffslide is None and openslide is None:
        if suffix == ".svs":
            logger.info("tiffslide is not installed: reading %s with tifffile (no µm/px from its metadata).", path)
            return None
        need = "openslide-python and openslide-bin" if suffix in OPENSLIDE_ONLY_SUFFIXES else "tiffslide"
        raise ImportError(
            f"`{arg}`: {str(path)!r} is a {suffix} whole-slide file; reading it needs {need}: "
            + (
                "pip install openslide-python openslide-bin."
                if suffix in OPENSLIDE_ONLY_SUFFIXES
                else f"{_EXTRA_HINT}."
            )
        )
    lib = "tiffslide" if tiffslide is not None else "openslide"
    try:
        slide = tiffslide.TiffSlide(path) if tiffslide is not None else openslide.OpenSlide(str(path))
    except Exception as e:
        raise ValueError(f"`{arg}`: {lib} cannot read {str(path)!r} ({type(e).__name__}: {e}).") from e
    try:
        props = slide.properties
        mpp = props.get(f"{lib}.mpp-x")
        mpp = float(mpp) if mpp not in (None, "") and float(mpp) > 0 else None
        levels = []
        for i, ((w, h), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples, strict=True)):
            if tiffslide is not None:
                arr = slide.zarr_group[str(i)]  # tifffile's zarr view of the level: exact level pixels
                if arr.ndim != 3 or arr.shape[2] != 3 or np.dtype(arr.dtype) != np.uint8:
                    raise _not_rgb(f"level {i} of shape {tuple(arr.shape)} and dtype {arr.dtype}", path, arg)
            else:
                arr = _OpenSlideLevel(slide, i, float(ds), (int(h), int(w)))
            levels.append(_Level(int(h), int(w), float(ds), arr, "YXS"))
    except Exception:
        slide.close()
        raise
    return levels, mpp, slide


def _downscale_levels(levels: list[_Level], max_side: int) -> np.ndarray:
    """Box-averaged copy of an image from its levels, about ``max_side`` px on the longer side (not resized exactly).

    Reads the coarsest level whose longer side is still >= ``max_side`` (else level 0) one strip of rows at a time
    and averages ``step`` x ``step`` blocks (``step = side // max_side``): memory is one strip plus the output,
    never the decoded level.
    """
    from PIL import Image

    level = levels[0]
    for lv in levels:  # levels go from fine to coarse
        if max(lv.height, lv.width) >= max_side:
            level = lv
    h, w = level.height, level.width
    step = max(1, int(max(h, w) // max_side))
    strip = step * max(1, 256 // step)
    parts = []
    for r0 in range(0, h, strip):
        block = level.read(r0, min(h, r0 + strip), 0, w)
        parts.append(np.asarray(Image.fromarray(block).reduce(step)) if step > 1 else block)
    return np.ascontiguousarray(np.concatenate(parts, axis=0))


def _is_ome_zarr_image(path: Path) -> bool:
    """``path`` is a directory holding an OME-Zarr multiscale image (e.g. ``<sdata>.zarr/images/<name>``)."""
    if not path.is_dir():
        return False
    for meta in ("zarr.json", ".zattrs"):
        f = path / meta
        if f.is_file():
            try:
                import json

                attrs = json.loads(f.read_text())
            except (OSError, ValueError):
                return False
            attrs = attrs.get("attributes", attrs)  # zarr v3 keeps user attributes under "attributes"
            return "multiscales" in attrs.get("ome", attrs)
    return False


def _open_ome_zarr(path: Path, arg: str = "source") -> list[_Level]:
    """Levels of an OME-Zarr multiscale image (axes ``c, y, x``): zarr views, read chunk by chunk, never whole.

    This is how SpatialData writes image elements; reading the arrays directly (not through dask) keeps a
    region read at a few chunk decompressions, without building a task graph per patch.
    """
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        ms = attrs.get("ome", attrs)["multiscales"][0]
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms["axes"]]
        arrays = [group[d["path"]] for d in ms["datasets"]]
    except Exception as e:
        raise ValueError(f"`{arg}`: cannot read {str(path)!r} as an OME-Zarr image ({type(e).__name__}: {e}).") from e
    if axes != ["c", "y", "x"]:
        raise ValueError(f"`{arg}`: OME-Zarr image {str(path)!r} has axes {axes}; expected ['c', 'y', 'x'].")
    levels: list[_Level] = []
    for i, arr in enumerate(arrays):
        if arr.ndim != 3 or arr.shape[0] != 3 or np.dtype(arr.dtype) != np.uint8:
            raise ValueError(
                f"`{arg}`: scale {i} of {str(path)!r} has shape {tuple(arr.shape)} and dtype {arr.dtype}: "
                f"{_RGB_MSG} with axes (c, y, x) and 3 channels."
            )
        h, w = int(arr.shape[1]), int(arr.shape[2])
        levels.append(_Level(h, w, 1.0 if not levels else levels[0].width / w, arr, "SYX"))
    return levels


def _file_kind(path: Path) -> str:
    if _is_ome_zarr_image(path):
        return "ome-zarr"
    suffix = _suffix(path)
    return "vendor" if suffix in VENDOR_SUFFIXES else "tiff" if suffix in TIFF_SUFFIXES else "pil"


def _open_file_levels(path: Path, arg: str = "source") -> tuple[list[_Level], float | None, Any]:
    """Levels, µm/px and open handle of a TIFF or vendor file (``.svs`` falls back to tifffile)."""
    if _file_kind(path) == "vendor":
        opened = _open_vendor(path, arg)
        if opened is not None:
            return opened
    return _open_tiff(path, arg)


def image_file_shape(path: str | os.PathLike, *, arg: str = "source") -> tuple[int, int]:
    """``(H, W)`` of an image file at full resolution, from its header; checks that it is RGB uint8.

    Nothing is decoded: a JPEG/PNG header is read with PIL, a TIFF's first series with tifffile.
    Errors name ``arg`` (the argument that gave the path).
    """
    path = Path(path)
    if _file_kind(path) != "pil":
        levels, _, tf = _open_file_levels(path, arg)
        tf.close()
        return levels[0].height, levels[0].width
    with _open_pil(path, arg) as im:
        return int(im.size[1]), int(im.size[0])


def read_downscaled(
    path: str | os.PathLike, max_side: int = HIRES_MAX_SIDE, *, arg: str = "source"
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Downscaled RGB uint8 copy of an image file, longest side ``<= max_side`` (the ``'hires'`` image).

    A JPEG is decoded once at a reduced DCT scale (PIL ``draft``), a PNG once in full; a TIFF (flat, pyramidal,
    OME) is read by region from the coarsest sufficient pyramid level, never decoded whole
    (:func:`_downscale_levels`). The copy is then resized (Lanczos) to exactly ``round((H, W) * scalef)``.

    Returns
    -------
    ``(image, scalef, (H, W))``: the copy, its pixels per full-resolution pixel (``<= 1``), and the full-resolution
    size.
    """
    from PIL import Image

    def target_size(h: int, w: int) -> tuple[float, tuple[int, int]]:
        scalef = min(1.0, max_side / max(h, w))
        return scalef, (max(1, round(w * scalef)), max(1, round(h * scalef)))  # PIL (w, h)

    path = Path(path)
    if _file_kind(path) != "pil":
        levels, _, tf = _open_file_levels(path, arg)
        try:
            H, W = levels[0].height, levels[0].width
            scalef, target = target_size(H, W)
            im = Image.fromarray(_downscale_levels(levels, max_side))
        except Exception as e:
            raise ValueError(f"`{arg}`: cannot decode {str(path)!r} ({type(e).__name__}: {e}).") from e
        finally:
            tf.close()
    else:
        with _open_pil(path, arg) as src:
            W, H = src.size  # the header's full-resolution size, before draft()
            scalef, target = target_size(H, W)
            if src.format == "JPEG":
                src.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale directly
            src.load()
            im = src.copy()
        if im.mode != "RGB":
            raise _not_rgb(f"PIL mode {im.mode!r} after decoding", path, arg)
    if im.size != target:
        im = im.resize(target, Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)), float(scalef), (int(H), int(W))


class _Squeeze:
    """View of a zarr array with leading singleton axes dropped."""

    def __init__(self, arr: Any):
        self.arr = arr
        self.lead = arr.ndim - 3
        self.shape = arr.shape[self.lead :]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        return self.arr[(0,) * self.lead + key]


# ----------------------------------------------------------------------------------------------
# SlideImage
# ----------------------------------------------------------------------------------------------
class SlideImage:
    """Lazy, picklable region reads from a slide image at a requested resolution.

    Create with :meth:`SlideImage.open` (a path, a numpy array or a SpatialData image element) or
    :func:`slide_for_library` (the image of a section of an AnnData).

    Attributes
    ----------
    shape
        ``(H, W)`` at full resolution (level 0).
    mpp
        µm per pixel at level 0: from the ``mpp`` argument, else the TIFF metadata (OME
        ``PhysicalSizeX`` or resolution tags), else ``None``.
    mpp_source
        Where :attr:`mpp` came from (``'argument'``, ``'tiff metadata'``, ...), or ``None``.
    levels
        Number of resolution levels.
    downsamples
        Downsample factor of each level relative to level 0 (``1.0`` first).
    source
        The path (``str``) for file-backed images, else ``None``.
    """

    def __init__(
        self,
        *,
        kind: str,
        path: str | None = None,
        levels: list[_Level] | None = None,
        shape: tuple[int, int] | None = None,
        mpp: float | None = None,
        mpp_source: str | None = None,
    ):
        self._kind = kind
        self._path = path
        self._levels = levels
        self._handle = None
        self._shape = shape
        self.mpp = None if mpp is None else float(mpp)
        self.mpp_source = mpp_source if mpp is not None else None
        if self._levels is None:
            self._load()
        if self._shape is None:
            self._shape = (self._levels[0].height, self._levels[0].width)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def open(cls, source: Any, *, mpp: float | None = None) -> SlideImage:
        """Open a slide image.

        Parameters
        ----------
        source
            A path to a JPEG/PNG (decoded once, cached), TIFF/OME-TIFF (read by region from its
            pyramid) or vendor whole-slide file (``.svs``, ``.ndpi``, ``.scn``, ``.bif``, ``.mrxs``, ...: read by
            region through tiffslide or OpenSlide, ``pip install 'histoexp[slide]'``), a directory holding an
            OME-Zarr image (a SpatialData image element on disk, ``<sdata>.zarr/images/<name>``: read chunk by
            chunk through zarr), a numpy ``uint8`` array
            ``(H, W, 3)``, a SpatialData image element (``xarray.DataArray`` with dims ``(c, y, x)`` or a
            multiscale ``DataTree``), or a :class:`SlideImage` (returned as is, with ``mpp`` set if given).
        mpp
            µm per pixel at full resolution; overrides what the file says.

        Returns
        -------
        The :class:`SlideImage`.

        Raises
        ------
        FileNotFoundError
            ``source`` is a path that does not exist.
        ValueError
            The file cannot be decoded, or the image is not RGB ``uint8`` (grayscale, RGBA and
            16-bit images are rejected, not converted).
        """
        if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
            raise ValueError(f"`mpp` must be a positive number of µm per pixel, got {mpp!r}.")
        src_mpp = ("argument", mpp) if mpp is not None else (None, None)
        if isinstance(source, SlideImage):
            return source.with_mpp(mpp) if mpp is not None else source
        if isinstance(source, (str, os.PathLike)):
            path = Path(source).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"`source`: image file {str(path)!r} does not exist.")
            kind = _file_kind(path)
            if path.is_dir() and kind != "ome-zarr":
                raise ValueError(
                    f"`source`: {str(path)!r} is a directory but not an OME-Zarr image; expected an image file or a "
                    "SpatialData image element on disk (<sdata>.zarr/images/<name>)."
                )
            return cls(kind=kind, path=str(path), mpp=src_mpp[1], mpp_source=src_mpp[0])
        if isinstance(source, np.ndarray):
            _check_rgb_array(source, "`source` array")
            h, w = source.shape[:2]
            return cls(kind="array", levels=[_Level(h, w, 1.0, source)], mpp=mpp, mpp_source=src_mpp[0])
        if _is_xarray(source, "DataArray"):
            lv = _xarray_level(source, "`source` DataArray", None)
            return cls(kind="spatialdata", levels=[lv], mpp=mpp, mpp_source=src_mpp[0])
        if _is_xarray(source, "DataTree"):
            levels = []
            base = None
            for name in sorted(source.children, key=lambda s: int(re.sub(r"\D", "", s) or 0)):
                node = source[name]
                var = list(node.ds.data_vars)[0]
                lv = _xarray_level(node.ds[var], f"`source` DataTree scale {name!r}", base)
                base = base or (lv.height, lv.width)
                levels.append(lv)
            if not levels:
                raise ValueError("`source` DataTree has no scales.")
            return cls(kind="spatialdata", levels=levels, mpp=mpp, mpp_source=src_mpp[0])
        raise ValueError(
            f"`source` of type {type(source).__name__} is not supported: expected a path, a numpy uint8 array "
            "(H, W, 3), a SpatialData image (DataArray/DataTree) or a SlideImage."
        )

    @classmethod
    def from_downscaled(cls, array: np.ndarray, scale: float, *, mpp: float | None = None) -> SlideImage:
        """Wrap a downscaled copy of a full-resolution image (e.g. a 'hires' image with ``tissue_hires_scalef``).

        Coordinates stay full-resolution: the array is a single level with downsample ``1 / scale``.
        """
        _check_rgb_array(array, "`array`")
        if not scale > 0:
            raise ValueError(f"`scale` must be positive, got {scale!r}.")
        h, w = array.shape[:2]
        shape = (round(h / scale), round(w / scale))
        lv = _Level(h, w, 1.0 / scale, array)
        return cls(kind="array", levels=[lv], shape=shape, mpp=mpp, mpp_source="argument" if mpp else None)

    def with_mpp(self, mpp: float | None, source: str = "argument") -> SlideImage:
        """Return a shallow copy with :attr:`mpp` set (the pixels are shared, not copied)."""
        new = object.__new__(SlideImage)
        new.__dict__.update(self.__dict__)
        new.mpp = None if mpp is None else float(mpp)
        new.mpp_source = source if mpp is not None else None
        return new

    def _load(self) -> None:
        path = Path(self._path)
        if not path.exists():
            raise FileNotFoundError(f"`source`: image file {str(path)!r} does not exist.")
        if self._kind == "pil":
            arr = _decode_pil(path)
            self._levels = [_Level(arr.shape[0], arr.shape[1], 1.0, arr)]
        elif self._kind == "ome-zarr":
            self._levels = _open_ome_zarr(path)
        else:
            self._levels, tmpp, self._handle = _open_file_levels(path)
            if self.mpp is None and tmpp is not None:
                self.mpp, self.mpp_source = tmpp, "tiff metadata" if self._kind == "tiff" else "slide metadata"

    def __getstate__(self):
        state = self.__dict__.copy()
        if self._kind in ("pil", "tiff", "vendor", "ome-zarr"):  # reopened lazily in each process
            state["_levels"] = None
            state["_handle"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _lv(self) -> list[_Level]:
        if self._levels is None:
            self._load()
        return self._levels

    # -- properties ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` in full-resolution pixels."""
        return self._shape

    @property
    def levels(self) -> int:
        """Number of resolution levels."""
        return len(self._lv())

    @property
    def downsamples(self) -> list[float]:
        """Downsample factor of each level relative to full resolution."""
        return [lv.downsample for lv in self._lv()]

    @property
    def source(self) -> str | None:
        """Path of a file-backed image, else ``None``."""
        return self._path

    def __repr__(self) -> str:
        src = self._path if self._path else self._kind
        return f"SlideImage({src!r}, shape={self.shape}, mpp={self.mpp}, downsamples={self.downsamples})"

    # -- reads --------------------------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """Index of the coarsest level whose resolution is at least as fine as ``downsample`` (else the finest)."""
        ds = self.downsamples
        ok = [i for i, d in enumerate(ds) if d <= downsample * (1 + 1e-6)]
        if not ok:
            return int(np.argmin(ds))
        return max(ok, key=lambda i: ds[i])

    def _window(self, li: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels ``[y0, y1) x [x0, x1)`` of level ``li`` (level coordinates), white outside."""
        lv = self._lv()[li]
        if x0 >= 0 and y0 >= 0 and x1 <= lv.width and y1 <= lv.height:
            return self._read(lv, y0, y1, x0, x1)
        out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1, lv.width), min(y1, lv.height)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self._read(lv, cy0, cy1, cx0, cx1)
        return out

    def _read(self, lv: _Level, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``lv.read``; a file that fails to decode (truncated, corrupted) raises a ValueError naming the file."""
        try:
            return lv.read(y0, y1, x0, x1)
        except MemoryError:
            raise
        except Exception as e:  # codec errors of tifffile / imagecodecs / zarr have no common base class
            if self._path is None:
                raise
            raise ValueError(
                f"`source`: cannot decode pixels [{y0}:{y1}, {x0}:{x1}] (downsample {lv.downsample:g}) of "
                f"{self._path!r} ({type(e).__name__}: {e}); the file looks truncated or corrupted: copy or export it "
                "again."
            ) from e

    def read_region(self, x0: int, y0: int, width: int, height: int, *, level: int = 0) -> np.ndarray:
        """Read a rectangle given in full-resolution pixels, at the resolution of ``level``.

        Parameters
        ----------
        x0, y0
            Top-left corner in level-0 pixels (may be negative or beyond the image).
        width, height
            Size in level-0 pixels.
        level
            Pyramid level to read from (see :attr:`downsamples`).

        Returns
        -------
        ``uint8`` array ``(h, w, 3)``; at level 0 exactly ``(height, width, 3)``, at level ``l``
        the level pixels covering the rectangle. Pixels outside the image are white (255).
        """
        lvs = self._lv()
        if not 0 <= level < len(lvs):
            raise ValueError(f"`level` must be in [0, {len(lvs) - 1}], got {level}.")
        if width <= 0 or height <= 0:
            raise ValueError(f"`width` and `height` must be positive, got {width}, {height}.")
        d = lvs[level].downsample
        lx0, ly0 = int(np.floor(x0 / d)), int(np.floor(y0 / d))
        lx1, ly1 = int(np.ceil((x0 + width) / d)), int(np.ceil((y0 + height) / d))
        out = self._window(level, lx0, ly0, lx1, ly1)
        return out if out.flags.writeable and out.base is None else out.copy()

    def fraction_outside(self, cx: float, cy: float, size_px: float) -> float:
        """Fraction of the square of side ``size_px`` centred on ``(cx, cy)`` that lies outside the image."""
        return float(_fraction_outside(np.array([[cx, cy]], float), size_px, self.shape)[0])

    def _patch_geometry(self, cx, cy, size_px_fullres: float, out_px: int):
        """Level, sub-pixel box origin, box side and integer read window (with the Lanczos margin) of patches."""
        if size_px_fullres <= 0 or out_px <= 0:
            raise ValueError(f"`size_px_fullres` and `out_px` must be positive, got {size_px_fullres}, {out_px}.")
        li = self.best_level(size_px_fullres / out_px)
        d = self._lv()[li].downsample
        half = size_px_fullres / 2.0
        bx0, by0 = (np.asarray(cx, float) - half) / d, (np.asarray(cy, float) - half) / d
        side = size_px_fullres / d
        margin = int(np.ceil(3 * max(side / out_px, 1.0))) + 1  # Lanczos support, so the kernel sees real neighbours
        wx0, wy0 = np.floor(bx0).astype(np.int64) - margin, np.floor(by0).astype(np.int64) - margin
        wx1, wy1 = np.ceil(bx0 + side).astype(np.int64) + margin, np.ceil(by0 + side).astype(np.int64) + margin
        return li, bx0, by0, side, (wx0, wy0, wx1, wy1)

    def read_patch(self, cx: float, cy: float, size_px_fullres: float, out_px: int) -> tuple[np.ndarray, float]:
        """Read a square centred on ``(cx, cy)`` and resample it to ``out_px`` x ``out_px``.

        The square covers ``size_px_fullres`` full-resolution pixels per side. It is read from the
        coarsest pyramid level that is still at least as fine as the output, then resampled with
        PIL's Lanczos filter (antialiased when downsampling) on the exact sub-pixel box, so every
        storage (JPEG, TIFF pyramid, array) gives the same patch up to resampling error.

        Returns
        -------
        patch
            ``uint8`` ``(out_px, out_px, 3)``; white where the square lies outside the image.
        fraction_outside
            Fraction of the square's area outside the image.
        """
        from PIL import Image

        li, bx0, by0, side, (wx0, wy0, wx1, wy1) = self._patch_geometry(cx, cy, size_px_fullres, out_px)
        bx0, by0, wx0, wy0, wx1, wy1 = (float(bx0), float(by0), int(wx0), int(wy0), int(wx1), int(wy1))
        win = self._window(li, wx0, wy0, wx1, wy1)
        box = (bx0 - wx0, by0 - wy0, bx0 - wx0 + side, by0 - wy0 + side)
        im = Image.fromarray(win).resize((out_px, out_px), Image.Resampling.LANCZOS, box=box)
        frac = _fraction_outside(np.array([[cx, cy]], float), size_px_fullres, self.shape)[0]
        return np.asarray(im), float(frac)

    def read_patches(
        self, centres: np.ndarray, size_px_fullres: float, out_px: int, *, window_px: int = READ_WINDOW_PX
    ) -> np.ndarray:
        """Read many patches (as :meth:`read_patch`, the same pixels) with one region read per group of neighbours.

        Patches are grouped by the cell of a ``window_px`` grid (level pixels) their corner falls in, and each
        group's bounding window is read once and cut: dense centres (Visium HD bins, tiles) cost a few region
        reads per batch instead of one per patch, and memory is one window of at most about
        ``(window_px + patch)^2`` pixels.

        Parameters
        ----------
        centres
            ``(n, 2)`` patch centres ``(x, y)`` in full-resolution pixels.
        size_px_fullres
            Patch side in full-resolution pixels.
        out_px
            Output side in pixels.
        window_px
            Side of the grid cells grouping the patches, in pixels of the level read.

        Returns
        -------
        ``uint8`` array ``(n, out_px, out_px, 3)``; white where a patch lies outside the image.
        """
        return self.read_patches_multiscale(centres, [size_px_fullres], out_px, window_px=window_px)[:, 0]

    def read_patches_multiscale(
        self, centres: np.ndarray, sizes_px_fullres, out_px: int, *, window_px: int = READ_WINDOW_PX
    ) -> np.ndarray:
        """Read several concentric patches per centre, all resampled to ``out_px``, from one read of the widest.

        ``out[:, j]`` is exactly :meth:`read_patches` ``(centres, sizes_px_fullres[j], out_px)``: each side is
        read from the pyramid level :meth:`read_patch` picks for it and resampled (Lanczos) from the same
        level pixels on the same sub-pixel box. The sides that share a level are cut from one window per group
        of neighbouring centres, the union of their read windows (the widest side's, with its resampling
        margin): a single-level image (JPEG, PNG, array) is read once per group whatever the number of sides.

        Parameters
        ----------
        centres
            ``(n, 2)`` patch centres ``(x, y)`` in full-resolution pixels.
        sizes_px_fullres
            Patch sides in full-resolution pixels, one per output patch of a centre.
        out_px
            Output side in pixels (the same for every side: wider patches get coarser pixels).
        window_px
            Side of the grid cells grouping the centres, in pixels of the level read.

        Returns
        -------
        ``uint8`` array ``(n, len(sizes_px_fullres), out_px, out_px, 3)``; white where a patch lies outside
        the image.
        """
        from PIL import Image

        centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
        sizes = [float(s) for s in sizes_px_fullres]
        out = np.empty((len(centres), len(sizes), out_px, out_px, 3), dtype=np.uint8)
        if not len(centres) or not sizes:
            return out
        geo = [self._patch_geometry(centres[:, 0], centres[:, 1], s, out_px) for s in sizes]
        cell = max(int(window_px), 1)
        for li in sorted({g[0] for g in geo}):
            js = [j for j, g in enumerate(geo) if g[0] == li]
            # per centre, the union of the read windows of the sides read from this level
            wx0, wy0 = (np.min([geo[j][4][k] for j in js], axis=0) for k in (0, 1))
            wx1, wy1 = (np.max([geo[j][4][k] for j in js], axis=0) for k in (2, 3))
            gx, gy = np.floor_divide(wx0, cell), np.floor_divide(wy0, cell)
            keys = (gy - gy.min()) * (int(gx.max() - gx.min()) + 1) + (gx - gx.min())
            order = np.argsort(keys, kind="stable")
            bounds = np.flatnonzero(np.diff(keys[order])) + 1
            for grp in np.split(order, bounds):
                x0, y0 = int(wx0[grp].min()), int(wy0[grp].min())
                win = self._window(li, x0, y0, int(wx1[grp].max()), int(wy1[grp].max()))
                for j in js:
                    _, bx0, by0, side, (ax0, ay0, ax1, ay1) = geo[j]
                    for i in grp:
                        # the patch's own read window, cut from the group's: the pixels read_patch resamples
                        sub = win[ay0[i] - y0 : ay1[i] - y0, ax0[i] - x0 : ax1[i] - x0]
                        ox, oy = float(bx0[i] - ax0[i]), float(by0[i] - ay0[i])
                        im = Image.fromarray(np.ascontiguousarray(sub)).resize(
                            (out_px, out_px), Image.Resampling.LANCZOS, box=(ox, oy, ox + side, oy + side)
                        )
                        out[i, j] = np.asarray(im)
        return out

    def thumbnail(self, max_px: int = HIRES_MAX_SIDE) -> tuple[np.ndarray, float]:
        """Return a downscaled copy (longer side <= ``max_px``) and its scale (thumbnail px per level-0 px)."""
        from PIL import Image

        h, w = self.shape
        scale = min(1.0, max_px / max(h, w))
        li = self.best_level(1.0 / scale)
        lv = self._lv()[li]
        if lv.height * lv.width <= THUMBNAIL_READ_MAX_PX or self._kind == "array":
            arr = self._window(li, 0, 0, lv.width, lv.height)
        else:  # a slide without a coarse enough level: strips of rows, box-reduced, never the level whole
            arr = _downscale_levels(self._lv()[li:], max_px)
        th, tw = max(1, round(h * scale)), max(1, round(w * scale))
        if (th, tw) != arr.shape[:2]:
            arr = np.asarray(Image.fromarray(arr).resize((tw, th), Image.Resampling.BOX))
        return arr, tw / w


def _backing_zarr_image(img: Any) -> str | None:
    """Path of the OME-Zarr directory a SpatialData image element was read from (``None``: in memory / unknown).

    Only when the element is exactly that image (same full-resolution shape), so reading the path gives the
    same pixels; the path is then read through zarr directly, which is cheaper than dask per region.
    """
    if not (_is_xarray(img, "DataArray") or _is_xarray(img, "DataTree")):
        return None
    try:
        from spatialdata import get_dask_backing_files

        files = get_dask_backing_files(img)
    except Exception:  # not dask-backed, or spatialdata missing
        return None
    if len(files) != 1:
        return None
    path = Path(files[0])
    try:
        if SlideImage.open(path).shape != SlideImage.open(img).shape:
            return None
    except (ValueError, OSError):
        return None
    return str(path.resolve())


def _suffix(path: Path) -> str:
    """Lower-case suffix of ``path``, double ones included (``'.ome.tif'``), as listed in IMAGE_SUFFIXES."""
    name = path.name.lower()
    for s in IMAGE_SUFFIXES:
        if s.count(".") > 1 and name.endswith(s):
            return s
    return path.suffix.lower()


def _fraction_outside(centres: np.ndarray, size_px: float, shape: tuple[int, int]) -> np.ndarray:
    """Vectorised fraction of each square (side ``size_px``, centred on ``centres`` (x, y)) outside ``shape``."""
    h, w = shape
    half = size_px / 2.0
    x0, x1 = centres[:, 0] - half, centres[:, 0] + half
    y0, y1 = centres[:, 1] - half, centres[:, 1] + half
    iw = np.clip(np.minimum(x1, w) - np.maximum(x0, 0), 0, None)
    ih = np.clip(np.minimum(y1, h) - np.maximum(y0, 0), 0, None)
    frac = 1.0 - (iw * ih) / (size_px * size_px)
    return np.where(frac < 1e-9, 0.0, np.minimum(frac, 1.0))


# ----------------------------------------------------------------------------------------------
# the image of one section of an AnnData
# ----------------------------------------------------------------------------------------------
def _platform_spot_um(adata: Any, entry: dict) -> tuple[float | None, str]:
    meta = entry.get("metadata", {}) or {}
    sf = entry.get("scalefactors", {}) or {}
    if meta.get("spot_diameter_um"):
        return float(meta["spot_diameter_um"]), "metadata['spot_diameter_um']"
    platform = str(meta.get("platform", "") or meta.get("technology", "")).lower()
    if "visium" in platform:
        return SPOT_DIAMETER_UM["visium"], f"platform {platform!r}"
    if platform in ("st", "legacy st", "legacy_st", "spatial transcriptomics"):
        return SPOT_DIAMETER_UM["st"], f"platform {platform!r}"
    if "fiducial_diameter_fullres" in sf or {"in_tissue", "array_row", "array_col"} <= set(adata.obs.columns):
        return SPOT_DIAMETER_UM["visium"], "Visium layout (fiducials / in_tissue, array_row, array_col)"
    return None, ""


def slide_for_library(
    adata: Any,
    library_id: str,
    *,
    image: Any = None,
    mpp: float | None = None,
) -> SlideImage:
    """Resolve the full-resolution image of one section and its µm per pixel.

    Image: ``image`` (path, array, SpatialData image or :class:`SlideImage`) >
    ``uns['spatial'][library_id]['metadata']['source_image_path']`` >
    ``uns['spatial'][library_id]['images']['hires']`` rescaled by ``tissue_hires_scalef`` (a WARNING
    is logged when that is below 1: patches then come from a downscaled image).

    µm/px: ``mpp`` > ``scalefactors['microns_per_pixel']`` > ``metadata['microns_per_pixel']`` >
    ``spot_diameter_fullres`` with the platform's spot size (legacy ST 100 µm, Visium 55 µm; from
    ``metadata['spot_diameter_um']``, ``metadata['platform']`` or a Visium layout) > the image's own
    TIFF metadata. The source used is logged and stored in :attr:`SlideImage.mpp_source`.

    Parameters
    ----------
    adata
        AnnData with ``uns['spatial'][library_id]``.
    library_id
        Section id.
    image
        Explicit image overriding what ``adata`` records.
    mpp
        Explicit µm per pixel of the full-resolution image.

    Returns
    -------
    A :class:`SlideImage` whose ``mpp`` is set.

    Raises
    ------
    KeyError
        ``library_id`` is not in ``uns['spatial']`` (and no ``image`` was given).
    ValueError
        No image can be found (pass ``image=``), or no µm/px information (pass ``mpp=``).
    """
    spatial = adata.uns.get("spatial", {}) or {}
    if library_id not in spatial:
        if image is None:
            raise KeyError(
                f"`library_id={library_id!r}` not found in adata.uns['spatial']; "
                f"available: {sorted(map(str, spatial))}."
            )
        entry: dict = {}
    else:
        entry = spatial[library_id] or {}
    meta = entry.get("metadata", {}) or {}
    sf = entry.get("scalefactors", {}) or {}
    images = entry.get("images", {}) or {}

    # --- image ---
    if image is not None:
        slide = SlideImage.open(image)
        img_src = "argument `image`"
    else:
        slide = None
        path = str(meta.get("source_image_path", "") or "")
        if path:
            if Path(path).exists():
                slide = SlideImage.open(path)
                img_src = f"source_image_path {path!r}"
            elif "hires" not in images:
                raise FileNotFoundError(
                    f"uns['spatial'][{library_id!r}]['metadata']['source_image_path'] = {path!r} does not exist; "
                    "pass `image=` with the full-resolution image."
                )
            else:
                logger.warning("source_image_path %r of %r does not exist; using the 'hires' image.", path, library_id)
        if slide is None:
            blank = []
            for key, sf_key in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
                if key in images:
                    scale = float(sf.get(sf_key, 1.0))
                    arr = np.asarray(images[key])
                    if arr.dtype != np.uint8 and arr.dtype.kind == "f" and arr.size and arr.max() <= 1.0:
                        arr = (arr * 255).round().astype(np.uint8)  # scanpy/squidpy store float [0, 1] images
                    if arr.ndim == 3 and arr.shape[2] == 4:
                        arr = np.ascontiguousarray(arr[..., :3])
                    _check_rgb_array(arr, f"uns['spatial'][{library_id!r}]['images'][{key!r}]")
                    if arr.size and (arr == arr[0, 0]).all():
                        # a placeholder (scanpy's Visium test fixture ships an all-black hires PNG): patches from
                        # it would be one colour and every prediction the same, so use the next image
                        blank.append(key)
                        logger.warning(
                            "Library %r: images[%r] is a single colour (a placeholder?); not used for patches.",
                            library_id,
                            key,
                        )
                        continue
                    slide = SlideImage.from_downscaled(arr, scale) if scale != 1.0 else SlideImage.open(arr)
                    img_src = f"images[{key!r}] (scale {scale:g})"
                    if scale < 1.0:
                        logger.warning(
                            "Library %r: no full-resolution image (source_image_path); patches come from the "
                            "downscaled %r image (scale %.3g), so they are blurrier than the slide.",
                            library_id,
                            key,
                            scale,
                        )
                    break
        if slide is None and blank:
            raise ValueError(
                f"No usable image for library {library_id!r}: images {blank} of uns['spatial'][{library_id!r}] are a "
                "single colour and there is no metadata['source_image_path']. Pass `image=` (a path, an RGB uint8 "
                "array or a SlideImage) with the H&E image."
            )
        if slide is None:
            raise ValueError(
                f"No image for library {library_id!r}: uns['spatial'][{library_id!r}] has no "
                "metadata['source_image_path'] and no images['hires']. Pass `image=` (a path, an RGB uint8 array or a "
                "SlideImage)."
            )

    # --- µm per pixel ---
    res, res_src = None, None
    if mpp is not None:
        res, res_src = float(mpp), "argument `mpp`"
    elif sf.get("microns_per_pixel"):
        res, res_src = float(sf["microns_per_pixel"]), "scalefactors['microns_per_pixel']"
    elif meta.get("microns_per_pixel"):
        res, res_src = float(meta["microns_per_pixel"]), "metadata['microns_per_pixel']"
    elif sf.get("spot_diameter_fullres"):
        spot_um, why = _platform_spot_um(adata, entry)
        if spot_um is not None:
            res = spot_um / float(sf["spot_diameter_fullres"])
            res_src = f"spot_diameter_fullres with {spot_um:g} µm spots ({why})"
    if res is None and slide.mpp is not None:
        res, res_src = slide.mpp, f"image ({slide.mpp_source})"
    if res is None:
        raise ValueError(
            f"No µm per pixel for library {library_id!r}: none of `mpp`, scalefactors['microns_per_pixel'], "
            "metadata['microns_per_pixel'], a known platform spot size or image metadata. Pass `mpp=`."
        )
    if not (np.isfinite(res) and res > 0):
        raise ValueError(f"µm per pixel for library {library_id!r} from {res_src} is {res!r}; expected > 0.")
    logger.info("Library %r: image from %s; %.4g µm/px from %s.", library_id, img_src, res, res_src)
    return slide.with_mpp(res, res_src)
