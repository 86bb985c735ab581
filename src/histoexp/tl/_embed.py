"""Patch embeddings: :func:`embed_patches`, :func:`embed_neighbourhood`, :func:`embed_query`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any

import numpy as np
from anndata import AnnData

from .._settings import logger, settings
from .._utils import claim_key, jsonable, mark_written

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..models.encoders import Encoder


def run_encoder(
    encoder: Encoder,
    src,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    num_workers: int | None = None,
    amp: bool | None = None,
    desc: str | None = None,
    distributed: bool = False,
) -> np.ndarray:
    """Embed every patch of a PatchSource with ``encoder``; float32 array (len(src), encoder.dim).

    Patches stream through the one inference loop (:func:`histoexp.train.infer`: a DataLoader of uint8
    batches, AMP autocast on CUDA when ``amp``); resizing and normalisation run on ``device`` in torch; the
    module runs in eval mode. ``distributed``: a collective call under torch.distributed, each rank embeds a
    block of the patches and every rank returns all of them (see :func:`histoexp.train.infer`).
    """
    from ..train import infer

    module = encoder.module.eval()

    def forward(batch):
        feats = module(encoder.preprocess(batch["image"]))
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        if feats.ndim != 2 or feats.shape[1] != encoder.dim:
            raise ValueError(
                f"Encoder {encoder.name!r} returned features of shape {tuple(feats.shape)}; "
                f"expected (batch, {encoder.dim})."
            )
        return feats

    module.to(settings.resolve_device(device) if not hasattr(device, "type") else device)
    return infer(
        forward,
        src,
        batch_size=batch_size,
        device=device,
        amp=amp,
        num_workers=num_workers,
        desc=desc or f"embedding ({encoder.name})",
        distributed=distributed,
    )


def embed_patches(
    adata: AnnData,
    encoder: Any = "resnet50",
    *,
    scales: Sequence[float] | None = None,
    weights: str | os.PathLike | None = "default",
    patches_key: str = "patches",
    batch_size: int = 64,
    device: str | None = None,
    num_workers: int | None = None,
    amp: bool | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    copy: bool = False,
    distributed: bool | None = None,
) -> AnnData | None:
    """Embed the patch of every spot with an image encoder, at one scale or several.

    Streams the patches stored by :func:`histoexp.pp.extract_patches` (in memory, in a zarr store, or read from
    the slide on the fly) through a DataLoader, resizes and normalises them on ``device`` and runs the encoder in
    eval mode under :func:`torch.inference_mode`. Deterministic on CPU.

    **Multi-scale** (``scales=(1, 2, 3, 5)``): scale ``s`` is the square centred on the spot whose side is ``s``
    times the patches' field of view (``fov_um`` of the patch record), resampled to the same ``patch_px``, so
    wider scales have coarser µm/px and show the tissue architecture around the spot. Each scale's crop is
    exactly the patch ``hx.pp.extract_patches(adata, size_um=s * fov_um, patch_px=patch_px)`` would cut (same
    full-resolution region, same pyramid level, same Lanczos resampling). Each spot's widest context is read from
    the slide once (once per pyramid level used) and cut and resampled for every scale; memory holds one batch
    of contexts. Parts beyond the image are white. The crops go through the same encoder and the features of the
    scales are concatenated in the order given. The slide must be readable again (the stored patches hold the
    1x crop only): any patch store works, but not patches extracted from an in-memory ``image=``. It costs
    ``len(scales)`` times the encoder work of one scale plus the resampling of each crop; the single read saves
    little on a JPEG (decoded once anyway) and the repeated region reads of a tiled slide (not measured here).
    ``benchmarks/multiscale.py`` (732 her2st spots, JPEG, handcrafted, scales 1, 2, 3, 5): 5.9x one scale, 1.0x
    the four scales embedded one by one, 0.28x :func:`embed_neighbourhood` with ``grid=5``.

    Parameters
    ----------
    adata
        Annotated data with patches under ``uns['histoexp'][patches_key]``.
    encoder
        A registry key (see :func:`histoexp.models.list_encoders`: ``'resnet50'``, ``'handcrafted'``, the
        pathology foundation models ``'uni'``, ``'virchow2'``, ``'h-optimus-0'``, ...), ``'timm:<name>'``,
        ``'hf-hub:<org>/<repo>'``, a :class:`torch.nn.Module` returning (B, dim) features, or an
        :class:`~histoexp.models.encoders.Encoder` from :func:`histoexp.models.get_encoder`. A foundation model
        knows the µm/px it was trained at: patches cut at another scale give a warning from 25 % off and an error
        from a factor 2 (another magnification), see :func:`histoexp.models.check_patch_mpp`.
    scales
        ``None`` (default): the stored patch of each spot, one scale. A sequence of distinct positive numbers
        (e.g. ``(1, 2, 3, 5)``): the crops at these multiples of the patch side, in this order (see above); a
        scale below 1 zooms in.
    weights
        ``'default'`` (published weights; an error, never a silent fallback, when they cannot be downloaded),
        ``None`` (random initialisation, recorded as ``random_init``) or a local ``.safetensors`` / state-dict
        file. See :func:`histoexp.models.get_encoder`.
    patches_key
        ``key_added`` used with :func:`histoexp.pp.extract_patches`.
    batch_size
        Patches per forward pass (with ``scales``: rounded up to a multiple of ``len(scales)``, whole spots).
    device
        ``'cpu'``, ``'cuda'``, ``'mps'``, ... (default: ``hx.settings.device``: cuda > mps > cpu).
    num_workers
        DataLoader workers reading patches (useful when patches are read from the slide on the fly); default
        ``hx.settings.num_workers`` (``0``: read in the main process).
    amp
        Mixed-precision autocast on CUDA (default: ``hx.settings.amp``). Ignored on CPU.
    key_added
        Embeddings go to ``obsm[key_added]`` (default ``'X_<encoder name>'``, e.g. ``'X_resnet50'``; with
        ``scales``: ``'X_<encoder name>_ms'``, e.g. ``'X_handcrafted_ms'``).
    overwrite
        Replace an existing ``obsm[key_added]`` that histoexp did not write. Without it, a key this function (or
        another of histoexp's) wrote and nobody changed since is replaced (a re-run), anything else raises.
    copy
        Return a modified copy instead of writing in place.
    distributed
        Under ``torchrun`` (a torch.distributed process group of more than one process, see
        :func:`histoexp.train.init_distributed`) each rank embeds one contiguous block of the spots and the
        blocks are gathered, so every rank ends with the whole ``obsm[key_added]`` (write files from rank 0: the
        writers of histoexp do so by themselves). A collective call: every rank must call it on the same data.
        ``None``: when such a process group is initialised; ``False``: every rank embeds everything.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets

    - ``obsm[key_added]``: float32 (n_obs, dim); with ``scales``, ``dim = len(scales) * scale_dim`` and scale
      ``scales[j]`` in columns ``j * scale_dim : (j + 1) * scale_dim``;
    - ``uns['histoexp']['embeddings'][key_added]``: ``encoder``, ``weights``, ``dim``, ``patches_key``,
      ``patch_px``, ``mpp``, ``size_um``, ``random_init``, ``input_size``, ``batch_size``, ``device``, ``amp``,
      and the encoder's ``config`` (architecture, normalisation, licence); with ``scales`` also ``scales``,
      ``scale_dim``, ``scales_um`` (side of each scale's crop in µm), ``scales_mpp`` (its µm/px) and ``layout``.
      A model trained on these features records them: :func:`embed_query` computes the same scales for a query
      and :func:`histoexp.tl.impute` refuses features computed with other scales.
    """
    from ..models.encoders import Encoder, _name_of, check_patch_mpp, get_encoder

    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
    scales = check_scales(scales)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    num_workers = settings.num_workers if num_workers is None else num_workers
    if num_workers < 0:
        raise ValueError(f"`num_workers` must be >= 0, got {num_workers}.")
    geometry = adata.uns.get("histoexp", {}).get(patches_key)
    if geometry is None:
        raise KeyError(
            f"No patches found under uns['histoexp'][{patches_key!r}] (`patches_key={patches_key!r}`). "
            f"Run `hx.pp.extract_patches(adata, key_added={patches_key!r})` first."
        )
    suffix = "" if scales is None else "_ms"
    # fail fast on an occupied key before loading any weights
    if key_added is None and isinstance(encoder, str):
        key_added = f"X_{_name_of(encoder)}{suffix}"
    if key_added is not None:
        claim_key(adata, "obsm", key_added, overwrite=overwrite)

    import histoexp.pp as pp

    if scales is None:
        src = pp.get_patches(adata, key=patches_key)
        n_items = adata.n_obs
    else:
        src = _scale_source(adata, patches_key, scales)
        n_items = adata.n_obs * len(scales)
        batch_size = -(-int(batch_size) // len(scales)) * len(scales)  # whole spots: each context read once
    if len(src) != n_items:
        raise ValueError(f"The patch source has {len(src)} patches but adata has {adata.n_obs} observations.")

    enc = encoder if isinstance(encoder, Encoder) else get_encoder(encoder, weights=weights)
    check_patch_mpp(enc, getattr(src, "mpp", geometry.get("mpp")))
    if key_added is None:
        key_added = f"X_{enc.name}{suffix}"
        claim_key(adata, "obsm", key_added, overwrite=overwrite)

    dev = settings.resolve_device(device)
    use_amp = bool(settings.amp if amp is None else amp) and dev.type == "cuda"
    logger.info(
        "Embedding %d patches%s with %r (dim %d) on %s%s.",
        adata.n_obs,
        "" if scales is None else f" at scales {[f'{x:g}' for x in scales]}",
        enc.name,
        enc.dim,
        dev,
        " with AMP" if use_amp else "",
    )
    from .._distributed import is_distributed, world_size

    distributed = is_distributed() if distributed is None else bool(distributed) and is_distributed()
    feats = run_encoder(
        enc,
        src,
        batch_size=int(batch_size),
        device=dev,
        num_workers=num_workers,
        amp=use_amp,
        desc=None if scales is None else f"embedding {len(scales)} scales ({enc.name})",
        distributed=distributed,
    )
    if not np.isfinite(feats).all():
        logger.warning("Encoder %r produced %d non-finite values.", enc.name, int((~np.isfinite(feats)).sum()))
    if scales is not None:  # item i * S + j is scale j of spot i: rows of blocks, scale j in block j
        feats = feats.reshape(adata.n_obs, len(scales) * feats.shape[1])

    if copy:
        adata = adata.copy()
    adata.obsm[key_added] = feats
    cfg = dict(enc.config)
    params = {
        "encoder": cfg.get("encoder", enc.name),
        "weights": cfg.get("weights") or ("random_init" if enc.random_init else "none"),
        "dim": int(feats.shape[1]),
        "patches_key": patches_key,
        "patch_px": getattr(src, "patch_px", geometry.get("patch_px")),
        "mpp": getattr(src, "mpp", geometry.get("mpp")),
        "size_um": getattr(src, "size_um", geometry.get("size_um")),
        # µm/px of each section's slide the patches were cut from: tells a user of a model trained on these
        # features how the training scans were resolved (an image query without µm/px metadata needs one)
        "slide_mpp": {str(lib): v.get("mpp") for lib, v in (geometry.get("libraries") or {}).items()},
        "random_init": bool(enc.random_init),
        "input_size": enc.input_size if enc.input_size is not None else "patch size",
        "batch_size": int(batch_size),
        "device": str(dev),
        "amp": use_amp,
        "world_size": world_size() if distributed else 1,
        "config": cfg,
    }
    if scales is not None:
        params.update(
            scales=list(scales),
            scale_dim=int(enc.dim),
            scales_um=[float(x * src.fov_um) for x in scales],
            scales_mpp=[float(x * src.fov_um / src.patch_px) for x in scales],
            layout="scale blocks x dim (block j: scales[j])",
        )
    hx_uns = adata.uns.setdefault("histoexp", {})
    hx_uns.setdefault("embeddings", {})[key_added] = jsonable(params)
    mark_written(adata, "obsm", key_added, by="embed_patches")
    return adata if copy else None


def check_scales(scales: Any) -> tuple[float, ...] | None:
    """Validate ``scales`` of :func:`embed_patches`: ``None``, or a tuple of distinct positive finite floats."""
    if scales is None:
        return None
    what = "`scales` must be a non-empty sequence of distinct positive numbers, e.g. (1, 2, 3, 5)"
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Iterable):
        raise ValueError(f"{what}; got {scales!r} (one scale s: pass (s,)).")
    values = list(scales)
    if not values:
        raise ValueError(f"{what}; got an empty {type(scales).__name__} (no scale: pass scales=None).")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (Real, np.integer, np.floating)):
            raise ValueError(f"{what}; got {scales!r}, whose element {v!r} is not a number.")
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{what}; got {scales!r}, whose element {v!r} is not positive and finite.")
        out.append(float(v))
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise ValueError(f"{what}; got {scales!r}, which repeats {[f'{v:g}' for v in dup]}.")
    return tuple(out)


def recorded_scales(record: dict | None) -> tuple[float, ...] | None:
    """Scales of an embedding record (``(1.0,)`` for a single-scale one; ``None`` without a record)."""
    if record is None:
        return None
    sc = record.get("scales")
    return (1.0,) if sc is None else tuple(float(v) for v in np.asarray(sc, dtype=float).ravel())


class _ScaleCrops:
    """Patch source of every spot's crop at each scale (torch-free, picklable).

    Item ``i`` is scale ``i % S`` of spot ``i // S``. A batch reads each of its spots' widest context once per
    pyramid level (:meth:`~histoexp.image.SlideImage.read_patches_multiscale`, which groups neighbouring spots
    into one region read) and resamples it to ``patch_px`` for every scale, so memory holds one batch of
    contexts.
    """

    def __init__(self, centres, lib_codes, slides, sizes_px, *, n_scales: int, rec: dict) -> None:
        self.centres, self.lib_codes, self.slides = centres, np.asarray(lib_codes), slides
        self.sizes_px = [list(map(float, s)) for s in sizes_px]  # per section, the side of each scale (full res)
        self.n_scales = int(n_scales)
        # the geometry of the 1x patches (as a PatchSource of them describes it)
        self.patch_px, self.mpp, self.size_um = int(rec["patch_px"]), float(rec["mpp"]), float(rec["size_um"])
        self.fov_um = float(rec.get("fov_um", self.size_um * float(rec.get("context", 1.0))))

    def __len__(self) -> int:
        return len(self.centres) * self.n_scales

    def batch(self, indices) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        spots, scale = np.divmod(idx, self.n_scales)
        uniq, inv = np.unique(spots, return_inverse=True)
        px = self.patch_px
        crops = np.empty((len(uniq), self.n_scales, px, px, 3), dtype=np.uint8)
        codes = self.lib_codes[uniq]
        for code in np.unique(codes):
            sel = np.flatnonzero(codes == code)
            crops[sel] = self.slides[int(code)].read_patches_multiscale(
                self.centres[uniq[sel]], self.sizes_px[int(code)], px
            )
        return np.ascontiguousarray(crops[inv.ravel(), scale])


def _scale_source(adata: AnnData, patches_key: str, scales: tuple[float, ...]) -> _ScaleCrops:
    """Return the source of every spot's crops at ``scales`` x the field of view of ``patches_key`` (slide reads)."""
    from ..pp._patches import _record_slides

    rec = adata.uns["histoexp"][patches_key]
    fov = float(rec.get("fov_um", float(rec["size_um"]) * float(rec.get("context", 1.0))))
    widest = f"{max(scales) * fov:.4g} µm"
    why = (
        f"`scales`: multi-scale embedding reads each spot's context (up to {widest}) from the slide, as the patches "
        f"under uns['histoexp'][{patches_key!r}] hold the {fov:.4g} µm crop only"
    )
    libs = dict(rec["libraries"])
    fixed = [lib for lib, v in libs.items() if not bool(v.get("reopenable", True))]
    if fixed:
        raise ValueError(
            f"{why}; but the patches of sections {fixed} were extracted from an in-memory `image`, which histoexp "
            "cannot read again. Re-run hx.pp.extract_patches(adata, image=<path of the slide>, ...) (or with the "
            "image in uns['spatial']), then embed."
        )
    if "spatial" not in adata.obsm:
        raise KeyError(f"{why}; adata.obsm['spatial'] (spot centres in full-resolution pixels) is missing.")
    try:
        libs, names, codes, slides = _record_slides(adata, rec, patches_key)
    except (KeyError, ValueError, FileNotFoundError, OSError) as err:
        raise ValueError(
            f"{why}; but the slides cannot be read again: {err} Make the image readable where the record says "
            "(uns['spatial'][<section>]['metadata']['source_image_path'] or the recorded path), or re-run "
            "hx.pp.extract_patches(adata, image=<path of the slide>, ...)."
        ) from err
    for lib, slide in zip(names, slides, strict=True):
        shape = libs[lib].get("shape")
        if shape is not None and tuple(int(v) for v in np.asarray(shape).ravel()) != tuple(slide.shape):
            raise ValueError(
                f"{why}; but the image now found for section {lib!r} has shape {tuple(slide.shape)}, not the "
                f"{tuple(int(v) for v in np.asarray(shape).ravel())} the patches were cut from. Re-run "
                "hx.pp.extract_patches(adata, image=<path of the slide>, ...)."
            )
    # as extract_patches(size_um=s * fov_um, patch_px=...) computes the side: (s * fov_um) / the slide's µm/px
    sizes = [[(s * fov) / float(libs[lib]["mpp"]) for s in scales] for lib in names]
    centres = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    return _ScaleCrops(centres, np.asarray(codes), slides, sizes, n_scales=len(scales), rec=rec)


class _GridWindows:
    """Patch source of the ``grid`` x ``grid`` patch-sized windows around every spot (torch-free, picklable).

    Item ``i`` is window ``i % grid**2`` (row-major, top-left first) of spot ``i // grid**2``. A batch reads
    each spot's whole context patch once from ``context`` (a :class:`~histoexp.pp.PatchSource` of side
    ``grid * patch_px``) and cuts it, so memory holds one batch of context patches at a time.
    """

    def __init__(self, context, grid: int, patch_px: int) -> None:
        self.context, self.grid, self.patch_px = context, int(grid), int(patch_px)
        self.mpp, self.size_um = context.mpp, context.size_um

    def __len__(self) -> int:
        return len(self.context) * self.grid**2

    def batch(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        g, px = self.grid, self.patch_px
        spots, win = np.divmod(idx, g * g)
        uniq, inv = np.unique(spots, return_inverse=True)
        ctx = np.asarray(self.context.batch(uniq))  # (U, g*px, g*px, 3)
        windows = ctx.reshape(len(uniq), g, px, g, px, 3).transpose(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(len(uniq), g * g, px, px, 3)
        return np.ascontiguousarray(windows[inv.ravel(), win])


def _context_source(adata: AnnData, patches_key: str, grid: int):
    """On-demand source of the ``grid``-times wider patches around each spot, with the geometry of ``patches_key``."""
    from ..pp._patches import PatchSource, _record_slides

    rec = adata.uns.get("histoexp", {}).get(patches_key)
    if rec is None:
        raise KeyError(
            f"No patches under uns['histoexp'][{patches_key!r}] (`patches_key={patches_key!r}`): run "
            f"hx.pp.extract_patches(adata, key_added={patches_key!r}) first; its geometry defines the windows."
        )
    libs, names, codes, slides = _record_slides(adata, rec, patches_key)
    px, fov = int(rec["patch_px"]), float(rec.get("fov_um", rec["size_um"]))
    src = PatchSource(
        store="none",
        patch_px=grid * px,
        mpp=float(rec["mpp"]),
        size_um=grid * fov,
        fov_um=grid * fov,
        obs_names=adata.obs_names.tolist(),
        centres=np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2],
        lib_codes=np.asarray(codes),
        slides=slides,
        size_px=[grid * float(libs[lib]["size_px_fullres"]) for lib in names],
    )
    window_px = {lib: float(libs[lib]["size_px_fullres"]) for lib in names}
    return src, rec, rec.get("library_key") or None, window_px


def embed_neighbourhood(
    adata: AnnData,
    encoder: Any = "resnet50",
    *,
    grid: int = 5,
    weights: str | os.PathLike | None = "default",
    patches_key: str = "patches",
    batch_size: int = 64,
    device: str | None = None,
    num_workers: int | None = None,
    amp: bool | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Embed the ``grid`` x ``grid`` patch-sized windows around every spot (NH2ST's neighbourhood).

    The windows have the geometry of the spot patches under ``patches_key`` (same side in µm, same µm/px,
    same ``patch_px``); the centre window is the spot's own patch. Each spot's context patch (``grid`` times
    wider) is read once from the slide, on demand, and cut into the windows, which stream in batches through
    the encoder (:func:`histoexp.train.infer`): memory holds one batch of context patches, whatever the slide
    or the number of spots. Parts beyond the image are white, as in :func:`histoexp.pp.extract_patches`.
    It costs ``grid**2`` times the encoder work of :func:`embed_patches`.

    Works for any spot layout (legacy ST, Visium, tiles from :func:`histoexp.pp.tile_tissue`): windows are
    read from the image, not from neighbouring spots, so a spot at the tissue edge or in a sparse layout
    still has all its windows.

    Parameters
    ----------
    adata
        Annotated data with spot patches under ``uns['histoexp'][patches_key]`` (any store).
    encoder
        As in :func:`embed_patches` (use the encoder of the spot features ``obsm['X_<encoder>']``).
    grid
        Windows per side (NH2ST: 5); odd, so that the spot is the centre window.
    weights
        As in :func:`embed_patches`.
    patches_key
        Key of the spot patches whose geometry the windows take.
    batch_size
        Windows per forward pass (rounded up to a multiple of ``grid**2``).
    device, num_workers, amp
        As in :func:`embed_patches`.
    key_added
        ``obsm`` key (default ``'X_<encoder name>_grid'``).
    overwrite
        As in :func:`embed_patches`: needed only to replace a key histoexp did not write.
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets

    - ``obsm[key_added]``: float32 ``(n_obs, grid**2 * dim)``, window ``w`` (row-major from the top-left
      window, rows along image y) in columns ``w * dim : (w + 1) * dim``;
    - ``uns['histoexp']['embeddings'][key_added]``: as :func:`embed_patches`, plus ``grid``,
      ``layout='row-major windows x dim'``, ``window_dim``, ``window_um`` and ``window_px_fullres`` (per
      section: the window side in full-resolution pixels).
    """
    from ..models.encoders import Encoder, _name_of, get_encoder

    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1 or grid % 2 == 0:
        raise ValueError(f"`grid` must be an odd positive integer (the spot is the centre window), got {grid!r}.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if "spatial" not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] (spot centres in full-resolution pixels) is missing.")
    if key_added is None and isinstance(encoder, str):
        key_added = f"X_{_name_of(encoder)}_grid"
    if key_added is not None:
        claim_key(adata, "obsm", key_added, overwrite=overwrite)
    grid = int(grid)
    ctx, rec, _, window_px = _context_source(adata, patches_key, grid)
    windows = _GridWindows(ctx, grid, int(rec["patch_px"]))
    enc = encoder if isinstance(encoder, Encoder) else get_encoder(encoder, weights=weights)
    if key_added is None:
        key_added = f"X_{enc.name}_grid"
        claim_key(adata, "obsm", key_added, overwrite=overwrite)
    dev = settings.resolve_device(device)
    use_amp = bool(settings.amp if amp is None else amp) and dev.type == "cuda"
    g2 = grid * grid
    per_batch = max(1, -(-int(batch_size) // g2)) * g2  # whole spots per batch: each context read once
    logger.info("Embedding %d x %d windows around %d spots with %r on %s.", grid, grid, adata.n_obs, enc.name, dev)
    workers = settings.num_workers if num_workers is None else int(num_workers)
    feats = run_encoder(
        enc, windows, batch_size=per_batch, device=dev, num_workers=workers, amp=use_amp, desc="neighbourhood windows"
    )
    if not np.isfinite(feats).all():
        logger.warning("Encoder %r produced %d non-finite values.", enc.name, int((~np.isfinite(feats)).sum()))
    dim = feats.shape[1]
    if copy:
        adata = adata.copy()
    adata.obsm[key_added] = feats.reshape(adata.n_obs, g2 * dim)
    cfg = dict(enc.config)
    params = {
        "encoder": cfg.get("encoder", enc.name),
        "weights": cfg.get("weights") or ("random_init" if enc.random_init else "none"),
        "dim": int(g2 * dim),
        "window_dim": int(dim),
        "grid": grid,
        "layout": "row-major windows x dim",
        "patches_key": patches_key,
        "patch_px": int(rec["patch_px"]),
        "mpp": float(rec["mpp"]),
        "size_um": float(rec["size_um"]),
        "window_um": float(rec.get("fov_um", rec["size_um"])),
        "window_px_fullres": window_px,
        "random_init": bool(enc.random_init),
        "input_size": enc.input_size if enc.input_size is not None else "patch size",
        "batch_size": int(per_batch),
        "device": str(dev),
        "amp": use_amp,
        "config": cfg,
    }
    hx_uns = adata.uns.setdefault("histoexp", {})
    hx_uns.setdefault("embeddings", {})[key_added] = jsonable(params)
    mark_written(adata, "obsm", key_added, by="embed_neighbourhood")
    return adata if copy else None


def embed_query(
    query: AnnData,
    model,
    *,
    batch_size: int = 64,
    device: str | None = None,
    num_workers: int | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Compute the image features a frozen-feature model reads, as it was trained on (missing ones only).

    ``obsm[model.use_rep]`` with :func:`embed_patches` (at the training ``scales`` for multi-scale features) and
    each neighbourhood input of the model (NH2ST's windows) with :func:`embed_neighbourhood`, with the encoder,
    weights, scales and grid of the training records. Features already in ``obsm`` whose records match the model's
    (encoder, weights and scales exactly, patch geometry within 1 %) are kept; ones that differ raise a
    ``ValueError``, or are computed again with ``overwrite=True``. The query's patches must have the model's
    geometry (``model.image_spec()``). A fine-tuned model reads patches:
    nothing to compute.

    Parameters
    ----------
    query
        Spots or tiles with patches (:func:`histoexp.pp.extract_patches` at the model's geometry,
        ``model.image_spec()``).
    model
        A histoexp model.
    batch_size, device, num_workers
        As in :func:`embed_patches`.
    overwrite
        Compute again the features whose records differ from the model's, e.g. features computed at other scales
        (default: an error says so).

    Returns
    -------
    The ``obsm`` keys computed.
    """
    from .._geometry import check_query_record, describe, geometry_differences
    from ._fit import _embedding_record

    if model.mode != "frozen":
        return []
    spec = model.image_spec()
    extra = dict(model.config.get("extra_reps") or {})
    other = [rep for rep, info in extra.items() if "grid" not in (info.get("embedding") or {})]
    if other:
        raise ValueError(
            f"The model also reads obsm {other}, which histoexp cannot compute from patches here: add them to the "
            "query as for the training data."
        )
    kw = {"weights": spec["weights"], "batch_size": batch_size, "device": device, "num_workers": num_workers}
    records = {model.use_rep: model.config.get("embedding"), **{r: info.get("embedding") for r, info in extra.items()}}
    todo = []
    for rep, m_rec in records.items():
        if rep in query.obsm:
            try:
                check_query_record(rep, _embedding_record(query, rep), m_rec)
                q_scales, m_scales = recorded_scales(_embedding_record(query, rep)), recorded_scales(m_rec)
                if q_scales is not None and m_scales is not None and q_scales != m_scales:
                    raise ValueError(
                        f"query.obsm[{rep!r}] was computed at scales {q_scales}, the model's features at {m_scales}; "
                        "pass overwrite=True to compute them again."
                    )
                continue
            except ValueError:
                if not overwrite:
                    raise
        todo.append(rep)
    patches = query.uns.get("histoexp", {}).get("patches")
    diffs = geometry_differences(patches or {}, records[model.use_rep] or {}, ("size_um", "mpp", "patch_px"))
    if todo and diffs:
        raise ValueError(
            f"The query's patches (uns['histoexp']['patches']) differ from the model's training patches: "
            f"{describe(diffs)}; features from them would be silently wrong. Extract them at the model's geometry: "
            f"hx.pp.extract_patches(query, size_um={spec['size_um']}, patch_px={spec['patch_px']}, overwrite=True)."
        )
    for rep in todo:
        if rep == model.use_rep:
            embed_patches(query, spec["encoder"], scales=spec.get("scales"), key_added=rep, overwrite=overwrite, **kw)
        else:
            grid = int(extra[rep]["embedding"]["grid"])
            embed_neighbourhood(query, spec["encoder"], grid=grid, key_added=rep, overwrite=overwrite, **kw)
    return todo
