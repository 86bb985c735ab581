"""Patches around spots at a fixed physical resolution, kept in memory, on disk (zarr) or read on demand."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._fs import atomic_dir, check_output
from .._settings import logger
from .._utils import claim_keys, forget_written, jsonable, library_ids, mark_written, progress
from ..image._slide import SlideImage, _backing_zarr_image, _fraction_outside, slide_for_library

__all__ = ["PatchSource", "extract_patches", "get_patches"]

_STORES = ("auto", "memory", "zarr", "none")
#: ``store='auto'`` keeps patches in memory below this many bytes, else writes them to zarr
AUTO_MEMORY_LIMIT = 1_000_000_000
#: largest patch side in pixels: beyond it a request is a unit mistake (e.g. ``mpp`` in m, not µm)
MAX_PATCH_PX = 16384
_BATCH = 128
#: marker kind of the zarr stores extract_patches creates (only those are ever replaced)
_ZARR_KIND = "patches"
#: names in ``uns['histoexp']`` that are not patch records
_RESERVED = ("embeddings", "written", "X", "slide", "gene_embeddings")


def _default_zarr_path(key_added: str) -> Path:
    root = Path(tempfile.gettempdir()) / "histoexp"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{key_added}-{uuid.uuid4().hex[:12]}.zarr"


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``None`` when unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _free_disk(path: Path) -> int | None:
    """Free bytes on the file system that would hold ``path`` (its closest existing ancestor)."""
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _check_store_path(adata: AnnData, zp: Path, *, key_added: str, copy: bool) -> None:
    """Refuse a zarr ``path`` that ``adata`` (the caller's object) reads patches from.

    Under another key, or under any key with ``copy=True``, replacing that store would change the
    patches of an object the call must leave alone.
    """
    target = zp.expanduser().absolute()
    for key, rec in (adata.uns.get("histoexp", {}) or {}).items():
        if not (isinstance(rec, dict) and rec.get("store") == "zarr" and rec.get("path")):
            continue
        if Path(rec["path"]).expanduser().absolute() != target and not (
            target.exists() and Path(rec["path"]).exists() and Path(rec["path"]).samefile(target)
        ):
            continue
        if copy or key != key_added:
            who = "the original object (copy=True returns a new one)" if copy else f"key {key!r}"
            raise ValueError(
                f"`path={str(zp)!r}` is the zarr store that {who} reads its patches from "
                f"(adata.uns['histoexp'][{key!r}]['path']); replacing it would change those patches. "
                "Pass another `path` (or none, for a new temporary store)."
            )


def _image_for(image: Any, lib: str, multi: bool) -> Any:
    if isinstance(image, dict):
        return image.get(lib)
    if image is not None and multi:
        raise ValueError(
            "`image` is a single image but adata holds several sections; pass a dict {library_id: image} "
            "or leave `image=None` to use each section's own image."
        )
    return image


def _reopenable(img: Any) -> str | None:
    """Path to record for ``store='none'`` (``''``: resolve from ``uns['spatial']`` again; ``None``: impossible)."""
    if img is None:
        return ""
    if isinstance(img, (str, os.PathLike)):
        return str(Path(img).expanduser().resolve())
    if isinstance(img, SlideImage) and img.source:
        return str(Path(img.source).resolve())
    return _backing_zarr_image(img)


def _resolve_libraries(
    adata: AnnData, library_id: str | None, library_key: str | None, image: Any = None
) -> tuple[str | None, dict[str, np.ndarray]]:
    spatial = adata.uns.get("spatial", {}) or {}
    if library_key is None and library_id is None and "library_id" in adata.obs:
        named = library_ids(adata, "library_id")
        if len(spatial) > 1 or len(named) > 1:
            # every section from its own image, even when only one image is left in uns['spatial']
            library_key = "library_id"
        elif image is None and len(spatial) == 1 and named and named[0] not in spatial:
            only = next(iter(spatial))
            raise ValueError(
                f"obs['library_id'] names section {named[0]!r} but adata.uns['spatial'] holds only the image of "
                f"{only!r}: histoexp never cuts a section's spots from another section's image. Pass "
                f"`library_id={only!r}` if that image is section {named[0]!r}'s, or `image=` with its image."
            )
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(f"`library_key={library_key!r}` is not a column of adata.obs.")
        libs = library_ids(adata, library_key)
        col = adata.obs[library_key].astype(str).to_numpy()
        if library_id is not None:
            if str(library_id) not in libs:
                raise KeyError(f"`library_id={library_id!r}` not found in obs[{library_key!r}]; available: {libs}.")
            raise ValueError(
                f"`library_id={library_id!r}` was given for a multi-section object (library_key={library_key!r}): "
                "every section is read from its own image. Subset adata to one section instead."
            )
        return library_key, {lib: np.flatnonzero(col == lib) for lib in libs}
    if library_id is None:
        if len(spatial) > 1:
            raise ValueError(
                f"adata.uns['spatial'] holds several sections {sorted(spatial)} but no `library_key` column was "
                "found: pass `library_key=` (obs column naming each spot's section) or `library_id=`."
            )
        library_id = next(iter(spatial)) if spatial else "image"
    elif "library_id" in adata.obs and (adata.obs["library_id"].astype(str) != str(library_id)).any():
        logger.warning(
            "`library_id=%r`: every spot is read from this section's image although obs['library_id'] names other "
            "sections; pass `library_key='library_id'` to read each section from its own image.",
            library_id,
        )
    return None, {str(library_id): np.arange(adata.n_obs)}


def extract_patches(
    adata: AnnData,
    *,
    size_um: float | None = None,
    mpp: float | None = 0.5,
    patch_px: int | None = None,
    context: float = 1.0,
    library_id: str | None = None,
    library_key: str | None = None,
    image: Any = None,
    key_added: str = "patches",
    store: str = "auto",
    path: str | os.PathLike | None = None,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Extract one square image patch per spot, at a fixed physical resolution.

    Each patch is centred on the spot's ``obsm['spatial']`` (full-resolution pixels), covers
    ``size_um * context`` micrometres per side and is resampled to ``patch_px`` x ``patch_px``
    pixels. **Size rule**: by default the output is at ``mpp`` µm/px, i.e.
    ``patch_px = round(size_um * context / mpp)`` — a 100 µm her2st spot at 0.5 µm/px gives 200 px.
    If ``patch_px`` is given it wins and the effective µm/px ``size_um * context / patch_px`` is
    recorded (HEST / BLEEP convention: ``size_um=112, patch_px=224`` or ``size_um=112, mpp=0.5``).
    Parts of a patch beyond the image are white; the fraction is recorded per spot.

    Every section of a multi-section object (``obs[library_key]``) is read from its own image (see
    :func:`histoexp.image.slide_for_library` for how the image and its µm/px are found). Reading
    is by region: a pyramidal TIFF is never decoded whole, a JPEG/PNG is decoded once (cached).

    Parameters
    ----------
    adata
        AnnData with ``obsm['spatial']`` and ``uns['spatial'][library_id]``.
    size_um
        Side of the patch in µm before ``context``; default: the spot diameter
        (``spot_diameter_fullres`` x µm/px of the image). Required for binned data (Visium HD bins of 2/8/16 µm,
        ``metadata['bin_size_um']``): the patch size is then chosen independently of the bin size.
    mpp
        Output µm per pixel (default 0.5, HEST convention). Ignored when ``patch_px`` is given.
    patch_px
        Output side in pixels; default ``round(size_um * context / mpp)``.
    context
        Scale factor on ``size_um`` (as squidpy's ``spot_scale``): 2 reads twice the spot's width.
    library_id
        Read every spot from this section's image (single-section use; default: the only key of
        ``uns['spatial']``). Cannot be combined with ``library_key``.
    library_key
        obs column naming each spot's section; default ``'library_id'`` when that column exists,
        ``uns['spatial']`` has several sections and ``library_id`` is not given.
    image
        Override the image: a path (image file, or OME-Zarr image directory ``<sdata>.zarr/images/<name>``),
        RGB uint8 array, SpatialData image (one read from zarr is read through its path, so ``store='none'`` works)
        or :class:`~histoexp.image.SlideImage` (one section), or a dict ``{library_id: image}``. To
        override a section's µm/px, pass ``SlideImage.open(path, mpp=...)``.
    key_added
        Key for ``obsm``, ``uns['histoexp']`` and the ``obs`` columns ``f'{key_added}_outside'``
        and ``f'{key_added}_row'``.
    store
        ``'memory'``: ``obsm[key_added]`` uint8 ``(n_obs, patch_px, patch_px, 3)``.
        ``'zarr'``: an on-disk zarr array ``(n_obs, patch_px, patch_px, 3)`` at ``path``, one chunk
        per patch, written in batches (all patches are never in RAM); ``obs[f'{key_added}_row']``
        maps spots to rows, so subsetting adata keeps working.
        ``'none'``: geometry only; :func:`get_patches` reads the slide on demand.
        ``'auto'``: ``'memory'`` when the patches take less than 1 GB, else ``'zarr'``.
    path
        Zarr store for ``store='zarr'``; default a new ``<tempdir>/histoexp/<key_added>-<random>.zarr``
        (its path is recorded in ``uns['histoexp'][key_added]['path']``; move it somewhere
        permanent for long-lived data). An existing ``path`` is replaced only with ``overwrite=True``, or on a
        re-run with the same ``key_added`` whose record names that store, and only when it is a store
        ``extract_patches`` created (it writes a ``.histoexp.json`` marker into each store): a folder or file
        histoexp did not make is never removed. The store is built under a hidden name next to ``path`` and
        renamed into place when complete, so an interrupted extraction leaves the previous store (or none),
        never a partial one.
    overwrite
        Replace existing keys histoexp did not write, and a zarr store at ``path`` that histoexp created. Without
        it, a re-run replaces this function's own keys (recorded in ``uns['histoexp']['written']``) and, when
        ``path`` is the store those keys read, that store; anything else raises.
    copy
        Return a new AnnData instead of writing into ``adata``.

    Returns
    -------
    None or AnnData
        ``None`` (or the new AnnData if ``copy=True``). Writes ``obs[f'{key_added}_outside']``, the
        pixels (see ``store``) and ``uns['histoexp'][key_added]`` with the keys ``size_um``,
        ``context``, ``fov_um``, ``patch_px``, ``mpp`` (the effective output µm/px),
        ``mpp_requested``, ``store``, ``path``, ``library_key`` and ``libraries`` (per section:
        ``mpp`` (the slide's own), ``mpp_source``, ``size_px_fullres``, ``image``, ``reopenable`` (whether the
        slide can be read again later, e.g. for context: ``False`` for an in-memory ``image``), ``shape``).

    Raises
    ------
    KeyError
        A key exists that histoexp did not write (or that changed since) and ``overwrite=False``; unknown
        ``library_id``/``library_key``.
    FileExistsError
        ``path`` exists and ``overwrite=False`` (unless it is the store a re-run of ``key_added`` replaces), or it
        exists and histoexp did not create it.
    ValueError
        Spots entirely outside their image, bad arguments, no image or no µm/px information; patches
        larger than ``MAX_PATCH_PX`` (16384) px per side or larger in total than the available
        memory (``store='memory'``) or disk (``store='zarr'``); ``path`` is the store that ``adata``
        itself reads (``copy=True``, or under another key).
    """
    if store not in _STORES:
        raise ValueError(f"`store` must be one of {_STORES}, got {store!r}.")
    if not (np.isfinite(context) and context > 0):
        raise ValueError(f"`context` must be positive, got {context!r}.")
    if "spatial" not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] (spot centres in full-resolution pixels) is missing.")
    if key_added in _RESERVED:
        raise ValueError(f"`key_added={key_added!r}` names one of histoexp's own records {_RESERVED}; choose another.")
    # a re-run replaces this function's own keys (and its zarr store at the same path); a key the user made needs
    # overwrite=True
    own = [("histoexp", key_added), ("obsm", key_added), ("obs", f"{key_added}_outside"), ("obs", f"{key_added}_row")]
    rerun = ("histoexp", key_added) in claim_keys(adata, own, overwrite=overwrite)
    orig = adata
    if copy:
        adata = adata.copy()

    library_key, groups = _resolve_libraries(adata, library_id, library_key, image)
    multi = library_key is not None
    spatial = adata.uns.get("spatial", {}) or {}
    lost = [lib for lib in groups if multi and lib not in spatial and _image_for(image, lib, multi) is None]
    if lost:
        raise ValueError(
            f"Sections {lost[:5]} (obs[{library_key!r}]) have no image in adata.uns['spatial'] (which holds "
            f"{sorted(map(str, spatial))}): histoexp never cuts a section's spots from another section's image. "
            f"Restore uns['spatial'][{lost[0]!r}], pass `image={{{lost[0]!r}: <its image>, ...}}`, or subset adata "
            "to the sections that have images."
        )
    slides: dict[str, SlideImage] = {}
    img_records: dict[str, str | None] = {}
    for lib in groups:
        img = _image_for(image, lib, multi)
        on_disk = _backing_zarr_image(img)
        img = on_disk or img  # a SpatialData element read from zarr: read it through zarr, reopenable later
        override = img.mpp if isinstance(img, SlideImage) and img.mpp_source == "argument" else None
        slides[lib] = slide_for_library(adata, lib, image=img, mpp=override)
        img_records[lib] = _reopenable(img)

    # --- geometry ---
    if size_um is None:
        diam = {}
        for lib, slide in slides.items():
            meta = adata.uns.get("spatial", {}).get(lib, {}).get("metadata", {}) or {}
            if meta.get("bin_size_um"):
                raise ValueError(
                    f"`size_um` not given, and library {lib!r} holds {meta['bin_size_um']:g} µm bins "
                    f"({meta.get('platform', 'binned')}): a patch of one bin shows almost no tissue. Pass `size_um` "
                    "(the patch side in µm, independent of the bin size: e.g. 55 or 112)."
                )
            sf = adata.uns.get("spatial", {}).get(lib, {}).get("scalefactors", {})
            if not sf.get("spot_diameter_fullres"):
                raise ValueError(
                    f"`size_um` not given and uns['spatial'][{lib!r}]['scalefactors'] has no spot_diameter_fullres; "
                    "pass `size_um=` (patch side in µm)."
                )
            diam[lib] = float(sf["spot_diameter_fullres"]) * slide.mpp
        size_um = float(np.median(list(diam.values())))
        if max(diam.values()) > 1.01 * min(diam.values()):
            logger.warning("Spot diameters differ between sections %s; using the median %.4g µm.", diam, size_um)
    size_um = float(size_um)
    if not (np.isfinite(size_um) and size_um > 0):
        raise ValueError(f"`size_um` must be positive, got {size_um!r}.")
    fov_um = size_um * context
    if patch_px is None:
        if mpp is None or not (np.isfinite(mpp) and mpp > 0):
            raise ValueError(f"Pass a positive `mpp` (output µm/px) or `patch_px`; got mpp={mpp!r}.")
        side = fov_um / mpp
        if not side <= MAX_PATCH_PX:
            raise ValueError(
                f"`mpp={mpp!r}` gives patches of {side:.4g} px per side ({fov_um:.4g} µm at {mpp!r} µm/px); at most "
                f"{MAX_PATCH_PX} px are supported. `mpp` is micrometres per output pixel (HEST: 0.5): pass a "
                "larger `mpp`, or `patch_px`."
            )
        patch_px = max(1, round(side))
    patch_px = int(patch_px)
    if patch_px < 1:
        raise ValueError(f"`patch_px` must be >= 1, got {patch_px}.")
    if patch_px > MAX_PATCH_PX:
        raise ValueError(f"`patch_px={patch_px}` is larger than {MAX_PATCH_PX} px per side; pass a smaller `patch_px`.")
    eff_mpp = fov_um / patch_px

    centres = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    if not np.isfinite(centres).all():
        bad = adata.obs_names[~np.isfinite(centres).all(1)][:5].tolist()
        raise ValueError(f"obsm['spatial'] has non-finite coordinates for spots {bad}.")
    outside = np.zeros(adata.n_obs)
    size_px: dict[str, float] = {}
    for lib, idx in groups.items():
        size_px[lib] = fov_um / slides[lib].mpp
        outside[idx] = _fraction_outside(centres[idx], size_px[lib], slides[lib].shape)
    gone = outside >= 1.0 - 1e-9
    if gone.any():
        names = adata.obs_names[gone]
        raise ValueError(
            f"{gone.sum()} spots lie entirely outside their image (e.g. {names[:5].tolist()}): check "
            "obsm['spatial'] (full-resolution (x, y) pixels), the image and the library assignment."
        )

    n = adata.n_obs
    nbytes = n * patch_px * patch_px * 3
    if store == "auto":
        store = "memory" if nbytes < AUTO_MEMORY_LIMIT else "zarr"
        logger.info("store='auto' -> %r (%.2f GB of patches).", store, nbytes / 1e9)
    zp = None
    replace_store = overwrite
    if store == "zarr":
        zp = Path(path).expanduser() if path is not None else _default_zarr_path(key_added)
        _check_store_path(orig, zp, key_added=key_added, copy=copy)
        # the store this key's record names, re-extracted in place (still only if histoexp made it: check_output)
        replace_store = overwrite or (rerun and not copy and _is_recorded_store(orig, key_added, zp))
        check_output(zp, overwrite=replace_store, arg="path", kind=_ZARR_KIND, empty_ok=False)
    # refuse absurd totals before allocating anything (np.empty would "succeed" lazily, then swap or die)
    limit, where = (_available_memory(), "memory") if store == "memory" else (None, "")
    if store == "zarr":
        limit, where = _free_disk(zp), f"free disk space at {str(zp.parent)!r}"
    if limit is not None and nbytes > limit:
        raise ValueError(
            f"{n} patches of {patch_px} x {patch_px} px (`mpp`={eff_mpp:.4g} µm/px, `patch_px`={patch_px}) take "
            f"{nbytes / 1e9:.3g} GB but only {limit / 1e9:.3g} GB of {where} are available: pass a larger `mpp` or "
            "a smaller `patch_px`, or store='none' (patches read from the slide on demand)."
        )
    if store == "none":
        for lib, rec in img_records.items():
            if rec is None:
                raise ValueError(
                    f"store='none' reads the slide again later, but `image` for library {lib!r} is an in-memory "
                    "object; pass a path, store='memory' or store='zarr'."
                )

    order = np.concatenate([groups[lib] for lib in groups]) if groups else np.arange(0)
    rows = np.empty(n, dtype=np.int64)
    rows[order] = np.arange(order.size)

    def fill(arr) -> None:
        with progress(total=n, desc="extracting patches", unit="spot") as bar:
            for lib, idx in groups.items():
                slide = slides[lib]
                for start in range(0, idx.size, _BATCH):
                    chunk = idx[start : start + _BATCH]
                    buf = slide.read_patches(centres[chunk], size_px[lib], patch_px)
                    if store == "memory":
                        arr[chunk] = buf
                    else:
                        r0 = int(rows[chunk[0]])
                        arr[r0 : r0 + chunk.size] = buf
                    bar.update(chunk.size)

    zpath = ""
    arr = None
    if store == "memory":
        arr = np.empty((n, patch_px, patch_px, 3), dtype=np.uint8)
        fill(arr)
    elif store == "zarr":
        import zarr

        logger.info("Writing %d patches to %s", n, zp)
        # built next to `path` and renamed into place when complete; replaces only a store of ours
        with atomic_dir(zp, overwrite=replace_store, kind=_ZARR_KIND, arg="path", empty_ok=False) as tmp:
            fill(
                zarr.create_array(
                    store=str(tmp), shape=(n, patch_px, patch_px, 3), chunks=(1, patch_px, patch_px, 3), dtype="uint8"
                )
            )
        zpath = str(zp.resolve())

    # --- write keys (only after everything succeeded) ---
    if key_added in adata.obsm and store != "memory":
        del adata.obsm[key_added]
        forget_written(adata, "obsm", key_added)
    if f"{key_added}_row" in adata.obs and store != "zarr":
        del adata.obs[f"{key_added}_row"]
        forget_written(adata, "obs", f"{key_added}_row")
    adata.obs[f"{key_added}_outside"] = outside.astype(np.float32)
    mark_written(adata, "obs", f"{key_added}_outside", by="extract_patches")
    if store == "memory":
        adata.obsm[key_added] = arr
        mark_written(adata, "obsm", key_added, by="extract_patches")
    elif store == "zarr":
        adata.obs[f"{key_added}_row"] = rows
        mark_written(adata, "obs", f"{key_added}_row", by="extract_patches")
    adata.uns.setdefault("histoexp", {})
    adata.uns["histoexp"][key_added] = jsonable(
        {
            "size_um": size_um,
            "context": float(context),
            "fov_um": fov_um,
            "patch_px": patch_px,
            "mpp": eff_mpp,
            "mpp_requested": float(mpp) if mpp is not None else None,
            "store": store,
            "path": zpath,
            "library_key": library_key or "",
            "libraries": {
                lib: {
                    "mpp": slides[lib].mpp,
                    "mpp_source": slides[lib].mpp_source,
                    "size_px_fullres": size_px[lib],
                    "image": img_records[lib] or "",
                    # False: the image was an in-memory object; the slide cannot be read again from the record
                    "reopenable": img_records[lib] is not None,
                    "shape": list(slides[lib].shape),
                }
                for lib in groups
            },
        }
    )
    mark_written(adata, "histoexp", key_added, by="extract_patches")
    logger.info("Extracted %d patches of %d px (%.4g µm at %.4g µm/px), store=%r.", n, patch_px, fov_um, eff_mpp, store)
    return adata if copy else None


def _is_recorded_store(adata: AnnData, key_added: str, zp: Path) -> bool:
    """Whether ``zp`` is the zarr store that ``uns['histoexp'][key_added]`` (histoexp's record) reads from."""
    rec = (adata.uns.get("histoexp", {}) or {}).get(key_added)
    if not (isinstance(rec, dict) and rec.get("store") == "zarr" and rec.get("path")):
        return False
    recorded = Path(rec["path"]).expanduser()
    return recorded.absolute() == zp.expanduser().absolute() or (
        recorded.exists() and zp.exists() and recorded.samefile(zp)
    )


class PatchSource:
    """Torch-free, picklable sequence of patches, whatever the store.

    Get one with :func:`get_patches`. ``len(src)`` is the number of spots (in ``adata`` order),
    ``src[i]`` a ``uint8 (patch_px, patch_px, 3)`` array and ``src.batch(indices)`` a
    ``uint8 (B, patch_px, patch_px, 3)`` array. For ``store='none'`` the slide is read on demand.

    Attributes
    ----------
    patch_px
        Side of a patch in pixels.
    mpp
        Effective µm per pixel of the patches.
    size_um
        Patch side in µm before the context factor (as passed to :func:`extract_patches`).
    fov_um
        Field of view in µm (``size_um * context``).
    store
        ``'memory'``, ``'zarr'`` or ``'none'``.
    obs_names
        Spot names, in order.
    """

    def __init__(
        self,
        *,
        store: str,
        patch_px: int,
        mpp: float,
        size_um: float,
        fov_um: float,
        obs_names: list[str],
        array: np.ndarray | None = None,
        path: str | None = None,
        rows: np.ndarray | None = None,
        centres: np.ndarray | None = None,
        lib_codes: np.ndarray | None = None,
        slides: list[SlideImage] | None = None,
        size_px: list[float] | None = None,
    ):
        self.store = store
        self.patch_px = int(patch_px)
        self.mpp = float(mpp)
        self.size_um = float(size_um)
        self.fov_um = float(fov_um)
        self.obs_names = list(obs_names)
        self._array = array
        self._path = path
        self._rows = rows
        self._centres = centres
        self._lib_codes = lib_codes
        self._slides = slides
        self._size_px = size_px
        self._z = None

    def __len__(self) -> int:
        return len(self.obs_names)

    def __repr__(self) -> str:
        return (
            f"PatchSource(n={len(self)}, store={self.store!r}, patch_px={self.patch_px}, mpp={self.mpp:.4g}, "
            f"size_um={self.size_um:.4g})"
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_z"] = None  # reopened lazily in each worker
        return state

    def _zarr(self):
        if self._z is None:
            import zarr

            if not Path(self._path).exists():
                raise FileNotFoundError(f"Patch store {self._path!r} does not exist (moved or deleted?).")
            self._z = zarr.open_array(self._path, mode="r")
        return self._z

    def _index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < -n or i >= n:
            raise IndexError(f"patch index {i} out of range for {n} patches.")
        return i % n

    def __getitem__(self, i: int) -> np.ndarray:
        if not isinstance(i, (int, np.integer)):
            return self.batch(np.arange(len(self))[i])
        i = self._index(i)
        if self.store == "memory":
            return np.asarray(self._array[i])
        if self.store == "zarr":
            return np.asarray(self._zarr()[int(self._rows[i])])
        code = int(self._lib_codes[i])
        patch, _ = self._slides[code].read_patch(
            self._centres[i, 0], self._centres[i, 1], self._size_px[code], self.patch_px
        )
        return patch

    def batch(self, indices) -> np.ndarray:
        """Patches ``indices`` as one ``uint8 (B, patch_px, patch_px, 3)`` array."""
        idx = np.atleast_1d(np.asarray(indices)).astype(np.int64, copy=False)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"patch index {int(bad)} out of range for {n} patches.")
        idx = idx % n if n else idx
        if self.store == "memory":
            return np.asarray(self._array[idx])
        if self.store == "zarr":
            rows = np.asarray(self._rows)[idx]
            if rows.size == 0:
                return np.empty((0, self.patch_px, self.patch_px, 3), np.uint8)
            uniq, inv = np.unique(rows, return_inverse=True)
            z = self._zarr()
            if uniq[-1] - uniq[0] + 1 <= 2 * uniq.size:  # mostly contiguous: one slice read
                data = np.asarray(z[int(uniq[0]) : int(uniq[-1]) + 1])[uniq - uniq[0]]
            else:
                data = np.asarray(z.oindex[uniq])
            return data[inv]
        out = np.empty((idx.size, self.patch_px, self.patch_px, 3), dtype=np.uint8)
        codes = np.asarray(self._lib_codes)[idx]
        for code in np.unique(codes):  # neighbouring spots of a section share one region read
            sel = np.flatnonzero(codes == code)
            out[sel] = self._slides[int(code)].read_patches(
                self._centres[idx[sel]], self._size_px[int(code)], self.patch_px
            )
        return out

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _record_slides(adata: AnnData, rec: dict, key: str):
    """Sections of a patch record: ``(libraries, names, per-spot section codes, one slide per section)``."""
    libs = dict(rec["libraries"])
    names = list(libs)
    lib_key = rec.get("library_key") or None
    if lib_key:
        codes = pd.Categorical(adata.obs[lib_key].astype(str), categories=names).codes
        if (codes < 0).any():
            raise ValueError(f"obs[{lib_key!r}] holds sections not recorded in uns['histoexp'][{key!r}].")
    else:
        codes = np.zeros(adata.n_obs, dtype=np.int64)
    slides = [
        slide_for_library(adata, lib, image=libs[lib].get("image") or None, mpp=float(libs[lib]["mpp"]))
        for lib in names
    ]
    return libs, names, codes, slides


def get_patches(adata: AnnData, key: str = "patches") -> PatchSource:
    """Return the patches written by :func:`extract_patches` as a :class:`PatchSource`.

    Parameters
    ----------
    adata
        AnnData on which :func:`extract_patches` ran (possibly subset or reloaded from h5ad).
    key
        The ``key_added`` used there.

    Returns
    -------
    A torch-free, picklable :class:`PatchSource` over ``adata``'s spots, in order.

    Raises
    ------
    KeyError
        No patches under ``key`` (run :func:`histoexp.pp.extract_patches` first).
    """
    rec = adata.uns.get("histoexp", {}).get(key)
    if rec is None:
        raise KeyError(
            f"No patches under key {key!r} (adata.uns['histoexp'][{key!r}] missing); "
            f"run hx.pp.extract_patches(adata, key_added={key!r}) first."
        )
    store = str(rec["store"])
    common = {
        "store": store,
        "patch_px": int(rec["patch_px"]),
        "mpp": float(rec["mpp"]),
        "size_um": float(rec["size_um"]),
        "fov_um": float(rec.get("fov_um", float(rec["size_um"]) * float(rec.get("context", 1.0)))),
        "obs_names": adata.obs_names.tolist(),
    }
    if store == "memory":
        if key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{key!r}] (store='memory') is missing; run hx.pp.extract_patches(adata, key_added={key!r})."
            )
        return PatchSource(array=adata.obsm[key], **common)
    if store == "zarr":
        col = f"{key}_row"
        if col not in adata.obs:
            raise KeyError(f"adata.obs[{col!r}] (store='zarr') is missing; run hx.pp.extract_patches again.")
        if not Path(rec["path"]).exists():
            raise FileNotFoundError(f"Patch store {rec['path']!r} recorded in uns['histoexp'][{key!r}] does not exist.")
        return PatchSource(path=str(rec["path"]), rows=adata.obs[col].to_numpy(np.int64), **common)
    if store != "none":
        raise ValueError(f"uns['histoexp'][{key!r}]['store'] is {store!r}; expected 'memory', 'zarr' or 'none'.")
    libs, names, codes, slides = _record_slides(adata, rec, key)
    return PatchSource(
        centres=np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2],
        lib_codes=np.asarray(codes),
        slides=slides,
        size_px=[float(libs[lib]["size_px_fullres"]) for lib in names],
        **common,
    )
