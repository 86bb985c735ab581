"""Patch embeddings: :func:`embed_patches`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
from anndata import AnnData

from .._settings import logger, settings
from .._utils import check_key_free, jsonable

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
    """Embed the patch of every spot with an image encoder.

    Streams the patches stored by :func:`histoexp.pp.extract_patches` (in memory, in a zarr store, or read from
    the slide on the fly) through a DataLoader, resizes and normalises them on ``device`` and runs the encoder in
    eval mode under :func:`torch.inference_mode`. Deterministic on CPU.

    Parameters
    ----------
    adata
        Annotated data with patches under ``uns['histoexp'][patches_key]``.
    encoder
        A registry key (see :func:`histoexp.models.list_encoders`: ``'resnet50'``, ``'resnet18'``,
        ``'densenet121'``, ``'handcrafted'``, ``'uni'``, ``'h-optimus-0'``), ``'timm:<name>'``,
        ``'hf-hub:<org>/<repo>'``, a :class:`torch.nn.Module` returning (B, dim) features, or an
        :class:`~histoexp.models.encoders.Encoder` from :func:`histoexp.models.get_encoder`.
    weights
        ``'default'`` (published weights; an error, never a silent fallback, when they cannot be downloaded),
        ``None`` (random initialisation, recorded as ``random_init``) or a local ``.safetensors`` / state-dict
        file. See :func:`histoexp.models.get_encoder`.
    patches_key
        ``key_added`` used with :func:`histoexp.pp.extract_patches`.
    batch_size
        Patches per forward pass.
    device
        ``'cpu'``, ``'cuda'``, ``'mps'``, ... (default: ``hx.settings.device``: cuda > mps > cpu).
    num_workers
        DataLoader workers reading patches (useful when patches are read from the slide on the fly); default
        ``hx.settings.num_workers`` (``0``: read in the main process).
    amp
        Mixed-precision autocast on CUDA (default: ``hx.settings.amp``). Ignored on CPU.
    key_added
        Embeddings go to ``obsm[key_added]`` (default ``'X_<encoder name>'``, e.g. ``'X_resnet50'``).
    overwrite
        Replace an existing ``obsm[key_added]``.
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

    - ``obsm[key_added]``: float32 (n_obs, dim);
    - ``uns['histoexp']['embeddings'][key_added]``: ``encoder``, ``weights``, ``dim``, ``patches_key``,
      ``patch_px``, ``mpp``, ``size_um``, ``random_init``, ``input_size``, ``batch_size``, ``device``, ``amp``,
      and the encoder's ``config`` (architecture, normalisation, licence).
    """
    from ..models.encoders import Encoder, _name_of, get_encoder

    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
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
    # fail fast on an occupied key before loading any weights
    if key_added is None and isinstance(encoder, str):
        key_added = f"X_{_name_of(encoder)}"
    if key_added is not None:
        check_key_free(adata.obsm, key_added, where="adata.obsm", overwrite=overwrite)

    import histoexp.pp as pp

    src = pp.get_patches(adata, key=patches_key)
    if len(src) != adata.n_obs:
        raise ValueError(f"The patch source has {len(src)} patches but adata has {adata.n_obs} observations.")

    enc = encoder if isinstance(encoder, Encoder) else get_encoder(encoder, weights=weights)
    if key_added is None:
        key_added = f"X_{enc.name}"
        check_key_free(adata.obsm, key_added, where="adata.obsm", overwrite=overwrite)

    dev = settings.resolve_device(device)
    use_amp = bool(settings.amp if amp is None else amp) and dev.type == "cuda"
    logger.info(
        "Embedding %d patches with %r (dim %d) on %s%s.",
        adata.n_obs,
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
        distributed=distributed,
    )
    if not np.isfinite(feats).all():
        logger.warning("Encoder %r produced %d non-finite values.", enc.name, int((~np.isfinite(feats)).sum()))

    if copy:
        adata = adata.copy()
    adata.obsm[key_added] = feats
    cfg = dict(enc.config)
    params = {
        "encoder": cfg.get("encoder", enc.name),
        "weights": cfg.get("weights") or ("random_init" if enc.random_init else "none"),
        "dim": int(enc.dim),
        "patches_key": patches_key,
        "patch_px": getattr(src, "patch_px", geometry.get("patch_px")),
        "mpp": getattr(src, "mpp", geometry.get("mpp")),
        "size_um": getattr(src, "size_um", geometry.get("size_um")),
        "random_init": bool(enc.random_init),
        "input_size": enc.input_size if enc.input_size is not None else "patch size",
        "batch_size": int(batch_size),
        "device": str(dev),
        "amp": use_amp,
        "world_size": world_size() if distributed else 1,
        "config": cfg,
    }
    hx_uns = adata.uns.setdefault("histoexp", {})
    hx_uns.setdefault("embeddings", {})[key_added] = jsonable(params)
    return adata if copy else None
