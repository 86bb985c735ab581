"""Image encoders: a small registry and :func:`get_encoder`.

An encoder turns a batch of RGB patches into one feature vector per patch. :func:`get_encoder` resolves a
name, a timm / Hugging Face id or a user :class:`torch.nn.Module` into an :class:`Encoder`:

>>> enc = get_encoder("resnet18", weights=None)  # random initialisation (logged, recorded)
>>> x = enc.preprocess(uint8_batch)  # (B, H, W, 3) uint8 -> (B, 3, S, S) float, resized + normalised
>>> feats = enc.module(x)  # (B, enc.dim)

Resolution order of ``encoder`` (the registry is the table :data:`REGISTRY`, see :func:`list_encoders`):

1. an :class:`Encoder` (returned as is) or a :class:`torch.nn.Module` (wrapped; ``dim`` inferred by a dry run);
2. a registry key (``'resnet50'``, ``'resnet18'``, ``'densenet121'``, ``'handcrafted'``, ``'uni'``, ...);
3. ``'timm:<name>'`` or ``'hf-hub:<org>/<repo>'`` (timm, optional extra ``pip install histoexp[timm]``);
4. any other string that timm knows as a model name.

``weights``: ``'default'`` (the entry's published weights: ImageNet for torchvision, the hub checkpoint for
pathology models), ``None`` (random initialisation, only when asked; logged at WARNING and recorded as
``random_init``), a local file (``.safetensors`` or a ``torch.save`` state dict, loaded with
``weights_only=True``), or for torchvision entries a weights-enum name such as ``'IMAGENET1K_V1'``.
When weights cannot be had (no network, gated repository, no token) :class:`WeightsUnavailableError` is raised:
there is never a silent fallback to random weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._settings import logger

__all__ = [
    "REGISTRY",
    "Encoder",
    "EncoderSpec",
    "WeightsUnavailableError",
    "check_patch_mpp",
    "get_encoder",
    "list_encoders",
    "load_weights",
    "register_encoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (offline, gated repository, missing token, ...)."""


@dataclass(frozen=True)
class EncoderSpec:
    """One registry entry.

    Attributes
    ----------
    key
        Registry key (also the default name: embeddings go to ``obsm['X_<key>']``).
    source
        ``'torchvision'``, ``'timm'``, ``'transformers'`` (Hugging Face ``transformers`` architectures, optional
        extra ``histoexp[hf]``), ``'custom'`` (an architecture histoexp builds itself: CONCH's vision towers,
        CTransPath) or ``'handcrafted'``.
    arch
        Architecture: torchvision builder name (``'resnet50'``), timm model name (``'vit_large_patch16_224'``),
        ``transformers`` model class (``'Dinov2Model'``) or custom builder name (``'conch_v1'``).
    dim
        Output feature dimension (after the read-out, no classifier head).
    input_size
        Side of the square input the model expects (patches are resized to it).
    mean, std
        Per-channel normalisation applied after scaling pixels to [0, 1].
    weights
        Default weights: a torchvision weights-enum name, a ``'hf-hub:<id>'`` timm tag, or ``'hf:<org>/<repo>'``
        (a Hugging Face repository read through ``huggingface_hub``: ``transformers`` and custom entries).
    licence
        Licence of the weights and any access condition.
    gated
        True when the weights sit in a gated repository (accept the terms on the hub, then log in).
    timm_kwargs
        Keyword arguments of the architecture as the authors publish them: for timm entries the arguments of
        :func:`timm.create_model` (``'mlp_layer': 'SwiGLUPacked'``, ``'act_layer': 'silu'`` are resolved to the timm
        classes), for ``transformers`` entries the model config, for custom entries the builder's arguments.
    description
        One line for humans.
    mpp
        µm per pixel of the images the model was trained on (``None``: unknown or not applicable). It is the
        default patch geometry and is checked against the patches (:func:`check_patch_mpp`).
    mpp_range
        ``(low, high)`` µm/px when the authors trained on several magnifications (e.g. Virchow2: 0.25–2).
    readout
        How the token sequence becomes one vector: ``'pooled'`` (the module's own pooled output), ``'cls'``
        (the class token after the final norm), ``'cls+mean'`` (class token concatenated with the mean of the patch
        tokens, register tokens excluded), ``'pooler'`` (a ``transformers`` model's ``pooler_output``).
    hub_file
        For custom entries: the file of the Hugging Face repository that holds the weights.
    trust_remote_code
        ``transformers`` entries whose published loading code lives on the hub (``trust_remote_code=True``).
    """

    key: str
    source: str
    arch: str
    dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights: str | None = None
    licence: str = ""
    gated: bool = False
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    mpp: float | None = None
    mpp_range: tuple[float, float] | None = None
    readout: str = "pooled"
    hub_file: str | None = None
    trust_remote_code: bool = False


_SOURCES = ("torchvision", "timm", "transformers", "custom", "handcrafted")
_READOUTS = ("pooled", "cls", "cls+mean", "pooler")

REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec | None = None, /, *, overwrite: bool = False, **kwargs: Any) -> EncoderSpec:
    """Add an entry to the encoder registry.

    Parameters
    ----------
    spec
        A ready :class:`EncoderSpec`; or leave it out and pass its fields as keyword arguments
        (``key=..., source=..., arch=..., dim=..., ...``).
    overwrite
        Replace an existing entry of the same key.

    Returns
    -------
    The registered :class:`EncoderSpec`.
    """
    if spec is None:
        spec = EncoderSpec(**kwargs)
    elif kwargs:
        raise TypeError("Pass either an EncoderSpec or its fields as keyword arguments, not both.")
    if spec.source not in _SOURCES:
        raise ValueError(f"`source` must be one of {_SOURCES}, got {spec.source!r}.")
    if spec.readout not in _READOUTS:
        raise ValueError(f"`readout` must be one of {_READOUTS}, got {spec.readout!r}.")
    if spec.key in REGISTRY and not overwrite:
        raise KeyError(f"Encoder {spec.key!r} is already registered. Pass `overwrite=True` to replace it.")
    REGISTRY[spec.key] = spec
    return spec


def list_encoders():
    """Return the encoder registry as a table: one row per key accepted by :func:`get_encoder`.

    Besides these keys, :func:`get_encoder` accepts ``'timm:<name>'``, ``'hf-hub:<id>'`` and user modules.

    Returns
    -------
    :class:`pandas.DataFrame` indexed by ``key``, with columns ``dim`` (feature dimension), ``mpp`` (µm per pixel
    the model was trained at; a range for multi-magnification models), ``input_size``, ``readout``, ``source``,
    ``arch``, ``weights`` (default weights), ``licence``, ``gated`` and ``description``. In Jupyter it displays
    as a table; ``key in list_encoders().index`` tests membership.
    """
    import pandas as pd

    rows = []
    for key in sorted(REGISTRY):
        s = REGISTRY[key]
        mpp = f"{s.mpp_range[0]:g}-{s.mpp_range[1]:g}" if s.mpp_range else (f"{s.mpp:g}" if s.mpp else "")
        rows.append(
            {
                "key": key,
                "dim": s.dim,
                "mpp": mpp,
                "input_size": s.input_size,
                "readout": s.readout,
                "source": s.source,
                "arch": s.arch,
                "weights": s.weights or "",
                "licence": s.licence.split(",")[0],
                "gated": s.gated,
                "description": s.description,
            }
        )
    return pd.DataFrame(rows).set_index("key")


_TV_LICENCE = "BSD-3-Clause (torchvision); ImageNet weights: non-commercial research terms of ImageNet"
register_encoder(
    key="resnet50",
    source="torchvision",
    arch="resnet50",
    dim=2048,
    weights="IMAGENET1K_V2",
    licence=_TV_LICENCE,
    description="ResNet-50, ImageNet (the image encoder of BLEEP)",
)
register_encoder(
    key="resnet18",
    source="torchvision",
    arch="resnet18",
    dim=512,
    weights="IMAGENET1K_V1",
    licence=_TV_LICENCE,
    description="ResNet-18, ImageNet (small, fast)",
)
register_encoder(
    key="densenet121",
    source="torchvision",
    arch="densenet121",
    dim=1024,
    weights="IMAGENET1K_V1",
    licence=_TV_LICENCE,
    description="DenseNet-121, ImageNet (the image encoder of mclSTExp)",
)
register_encoder(
    key="handcrafted",
    source="handcrafted",
    arch="handcrafted",
    dim=0,  # filled in below from the feature list
    input_size=112,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    weights=None,
    licence="BSD-3-Clause (histoexp); training-free",
    description="Colour, H&E stain, texture (GLCM, LBP), nuclei-density and tissue-fraction statistics (CPU)",
)
register_encoder(
    key="uni",
    source="timm",
    arch="vit_large_patch16_224",
    dim=1024,
    weights="hf-hub:MahmoodLab/uni",
    licence="CC-BY-NC-ND-4.0, gated: accept the terms at https://huggingface.co/MahmoodLab/UNI, then log in",
    gated=True,
    timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    description="UNI (Chen et al. 2024), ViT-L/16 pathology foundation model",
    mpp=0.5,
    readout="cls",
)
register_encoder(
    key="h-optimus-0",
    source="timm",
    arch="vit_giant_patch14_reg4_dinov2",
    dim=1536,
    mean=(0.707223, 0.578729, 0.703617),
    std=(0.211883, 0.230117, 0.177517),
    weights="hf-hub:bioptimus/H-optimus-0",
    licence="Apache-2.0, gated: accept the terms at https://huggingface.co/bioptimus/H-optimus-0, then log in",
    gated=True,
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
    description="H-optimus-0 (Bioptimus), ViT-g/14 pathology foundation model",
    mpp=0.5,
    readout="cls",
)


def _fill_handcrafted_dim() -> None:
    from .handcrafted import FEATURE_NAMES

    REGISTRY["handcrafted"] = replace(REGISTRY["handcrafted"], dim=len(FEATURE_NAMES))


_fill_handcrafted_dim()


def _register_foundation_models() -> None:
    from ._foundation import register_all

    register_all(register_encoder)


_register_foundation_models()


# tolerance of the patch geometry check: within 25 % nothing is said, from 25 % a warning, from a factor 2 an error
MPP_WARN_RATIO = 1.25
MPP_ERROR_RATIO = 2.0


def check_patch_mpp(encoder: Encoder, mpp: float | None, *, what: str = "the patches") -> float | None:
    """Compare the µm per pixel of the patches with the µm per pixel the encoder was trained at.

    Foundation models see tissue at one magnification (UNI, Virchow, H-optimus: 20x, 0.5 µm/px); patches cut at
    another scale give features of another kind without any error. The rule:

    - within 25 % of the encoder's µm/px (or inside its training range, ``mpp_range``): nothing said;
    - 25 % to a factor 2 off: a warning through the ``histoexp`` logger;
    - a factor 2 or more off (another magnification): :class:`ValueError`, naming the remedies: cut the patches at
      the encoder's µm/px (``hx.pp.extract_patches(adata, mpp=...)``), or build the encoder with
      ``get_encoder(key, mpp=<your µm/px>)`` to state that this scale is intended (recorded), or ``mpp=None`` to
      switch the check off.

    Encoders without a training µm/px (ImageNet CNNs, handcrafted features, user modules) are not checked.

    Parameters
    ----------
    encoder
        The resolved encoder.
    mpp
        µm per pixel at which the patches were cut (``uns['histoexp'][patches_key]['mpp']``); ``None``: unknown.
    what
        How the message names the patches.

    Returns
    -------
    The ratio (patches' µm/px over the encoder's, 1 inside a training range), or None when nothing was checked.
    """
    ref = encoder.mpp
    if ref is None or mpp is None:
        return None
    mpp = float(mpp)
    lo, hi = encoder.mpp_range if encoder.mpp_range else (ref, ref)
    ratio = 1.0 if lo <= mpp <= hi else (mpp / lo if mpp < lo else mpp / hi)
    off = max(ratio, 1.0 / ratio)
    trained = f"{lo:g}-{hi:g}" if lo != hi else f"{ref:g}"
    msg = (
        f"Encoder {encoder.name!r} was trained on tiles at {trained} µm/px; {what} are at {mpp:.3g} µm/px "
        f"({off:.2f}x {'coarser' if ratio > 1 else 'finer'})."
    )
    if off >= MPP_ERROR_RATIO:
        raise ValueError(
            msg + f" That is another magnification, and the features would not be what the model was trained on. "
            f"Cut the patches at the encoder's scale: `hx.pp.extract_patches(adata, mpp={ref:g}, ...)`; or, if this "
            f"scale is intended, build the encoder with `hx.models.get_encoder({encoder.config.get('encoder')!r}, "
            f"mpp={mpp:.3g})` (recorded), or `mpp=None` to switch the check off."
        )
    if off > MPP_WARN_RATIO:
        logger.warning("%s Consider `hx.pp.extract_patches(adata, mpp=%g, ...)`.", msg, ref)
    return ratio


# --------------------------------------------------------------------------------------------------------------
# The Encoder object
# --------------------------------------------------------------------------------------------------------------


def _resize_normalise(
    batch: torch.Tensor, size: int | None, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """(B, H, W, 3) uint8 (or float in [0, 255]) -> (B, 3, size, size) float32, scaled to [0, 1] and normalised.

    Works on the batch's device. Resizing is antialiased bilinear interpolation, done on the uint8 pixels
    (torch's fast channels-last uint8 kernel, like torchvision's ``Resize`` on uint8 tensors) before the
    conversion to float, so that the float work happens at the (usually smaller) model input size. The result keeps
    the channels-last memory layout of the input (a (B, 3, S, S) tensor with NHWC strides, also the faster layout
    for convolutions on CPU).
    """
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"Expected a (B, H, W, 3) RGB batch, got shape {tuple(batch.shape)}.")
    x = batch.permute(0, 3, 1, 2)  # a view: NCHW shape, NHWC memory
    if x.dtype != torch.uint8:
        x = x.to(torch.float32)
    h, w = x.shape[-2:]
    if size is not None and (h != size or w != size):
        x = torch.nn.functional.interpolate(
            x.contiguous(memory_format=torch.channels_last),
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float64))
    shift = -np.asarray(mean, dtype=np.float64) / np.asarray(std, dtype=np.float64)
    if x.device.type == "cpu" and not x.requires_grad:
        # numpy on the NHWC view: a single pass, and no OpenMP parallel region (on a loaded machine each torch
        # elementwise op on CPU can wait milliseconds for its second thread; numpy does this in ~0.2 ms per batch)
        a = x.permute(0, 2, 3, 1).contiguous().numpy()
        b, h, w, _ = a.shape
        out = a.reshape(b * h, w * 3).astype(np.float32)  # rows of interleaved RGB: long inner loops
        out *= np.tile(scale.astype(np.float32), w)
        out += np.tile(shift.astype(np.float32), w)
        return torch.from_numpy(out.reshape(b, h, w, 3)).permute(0, 3, 1, 2)
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    shift_t = torch.as_tensor(shift, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = torch.addcmul(shift_t, x.to(torch.float32), scale_t)
    return x.contiguous(memory_format=torch.channels_last)


@dataclass
class Encoder:
    """A ready-to-use image encoder.

    Attributes
    ----------
    module
        :class:`torch.nn.Module` mapping a float tensor (B, 3, S, S) to pooled features (B, dim).
    dim
        Feature dimension.
    name
        Short name; embeddings go to ``obsm['X_<name>']``.
    input_size
        S, the side the patches are resized to (``None``: keep the patch size).
    mean, std
        Normalisation applied by :meth:`preprocess` (pixels scaled to [0, 1] first).
    config
        JSON-able description: registry key, architecture, weights source, input size, mean/std, ``random_init``,
        licence/gating note.
    trainable
        False for training-free encoders (``'handcrafted'``).
    transform
        Optional user transform replacing the default resize + normalise: a callable taking the uint8
        (B, H, W, 3) tensor and returning the float (B, 3, S, S) model input.
    mpp, mpp_range
        µm per pixel of the model's training tiles (a single value and, for multi-magnification models, a range);
        ``None`` when unknown or not checked. :func:`check_patch_mpp` compares the patches with it.
    """

    module: nn.Module
    dim: int
    name: str
    input_size: int | None = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    config: dict[str, Any] = field(default_factory=dict)
    trainable: bool = True
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    mpp: float | None = None
    mpp_range: tuple[float, float] | None = None

    def preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        """Turn a uint8 batch (B, H, W, 3) into the model input (B, 3, S, S) float32, on the batch's device."""
        if not isinstance(batch, torch.Tensor):
            batch = torch.as_tensor(batch)
        if self.transform is not None:
            return self.transform(batch)
        return _resize_normalise(batch, self.input_size, self.mean, self.std)

    @property
    def random_init(self) -> bool:
        """Whether the module carries randomly initialised weights."""
        return bool(self.config.get("random_init", False))

    def to(self, device: torch.device | str) -> Encoder:
        """Move the module to ``device`` (in place) and return self."""
        self.module.to(device)
        return self

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocess a uint8 batch and run the module in eval mode (convenience, no AMP)."""
        self.module.eval()
        dev = next(iter(self.module.parameters()), torch.empty(0)).device
        return self.module(self.preprocess(torch.as_tensor(batch).to(dev))).float()

    def __repr__(self) -> str:
        return (
            f"Encoder(name={self.name!r}, dim={self.dim}, input_size={self.input_size}, "
            f"weights={self.config.get('weights')!r}, random_init={self.random_init}, trainable={self.trainable})"
        )


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------


def _offline_message(what: str, err: BaseException | None, *, gated: bool = False) -> str:
    hint = (
        "This repository is gated: accept its terms on huggingface.co, then provide a token "
        "(`huggingface-cli login` or the HF_TOKEN environment variable).\n"
        if gated
        else ""
    )
    cause = f" ({type(err).__name__}: {err})" if err is not None else ""
    return (
        f"Could not obtain the pretrained weights for {what}{cause}.\n"
        f"{hint}"
        "Ways to proceed:\n"
        "  - `weights='/local/path/model.safetensors'` (or a state dict saved with torch.save) if you have a copy;\n"
        "  - a Hugging Face token (`huggingface-cli login` or HF_TOKEN) for gated repositories, and network access;\n"
        "  - `weights=None` for a randomly initialised encoder (explicit; recorded as random_init in uns).\n"
        "histoexp never falls back to random weights silently."
    )


def _is_download_error(err: BaseException) -> bool:
    if isinstance(err, (OSError, ConnectionError, TimeoutError)):
        return True
    mod = type(err).__module__ or ""
    return mod.startswith(("huggingface_hub", "requests", "httpx", "urllib", "urllib3", "http"))


def _looks_like_path(weights: str) -> bool:
    return weights.lower().endswith(_WEIGHT_SUFFIXES) or os.sep in weights or "/" in weights or Path(weights).exists()


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path`` safely.

    ``.safetensors`` files are read with :func:`safetensors.torch.load_file`; anything else with
    ``torch.load(path, weights_only=True, map_location='cpu')``. A pickle that carries code is refused
    (:class:`ValueError`). A checkpoint dict holding the weights under ``'state_dict'`` or ``'model'`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`weights={str(path)!r}`: no such file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"`weights={str(path)!r}` is not a plain state dict: torch.load(weights_only=True) refused it "
                f"({err}). histoexp never unpickles code. Save the weights with "
                "`torch.save(model.state_dict(), path)` or `safetensors.torch.save_file(model.state_dict(), path)`."
            ) from err
        if isinstance(state, dict):
            for k in ("state_dict", "model", "model_state_dict"):
                if k in state and isinstance(state[k], dict):
                    state = state[k]
                    break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"`weights={str(path)!r}` does not hold a state dict (mapping of names to tensors).")
    return state


_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "heads.", "head_drop.")


def _load_state_into(module: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    own = module.state_dict()
    # common wrappers: DataParallel 'module.', timm/lightning 'model.' / 'backbone.'
    for prefix in ("module.", "model.", "backbone.", "encoder."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    # drop a classifier head the pooled module no longer has
    state = {k: v for k, v in state.items() if not (k not in own and k.startswith(_HEAD_PREFIXES))}
    mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"`weights={path!r}` does not match the architecture: {len(mismatched)} tensors have other shapes "
            f"(e.g. {k!r}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model)."
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"`weights={path!r}` does not match the architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}) and {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
        )


# --------------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------------


def _build_torchvision(spec: EncoderSpec, weights: str | None) -> tuple[nn.Module, str | None]:
    import torchvision

    builder = getattr(torchvision.models, spec.arch)
    enum = None
    if weights is not None:
        enum_cls = torchvision.models.get_model_weights(spec.arch)
        name = spec.weights if weights == "default" else weights
        try:
            enum = enum_cls[name]
        except KeyError:
            raise ValueError(
                f"`weights={weights!r}` is not known for {spec.key!r}: expected 'default', None, a local file or "
                f"one of {[w.name for w in enum_cls]}."
            ) from None
    try:
        model = builder(weights=enum)
    except Exception as err:
        if enum is not None and _is_download_error(err):
            raise WeightsUnavailableError(_offline_message(f"{spec.key!r} ({enum})", err)) from err
        raise
    if hasattr(model, "fc"):
        model.fc = nn.Identity()
    elif hasattr(model, "classifier"):
        model.classifier = nn.Identity()
    elif hasattr(model, "heads"):
        model.heads = nn.Identity()
    else:  # pragma: no cover - registry entries are the ones above
        raise ValueError(f"Do not know how to remove the classifier head of torchvision {spec.arch!r}.")
    return model, (f"torchvision:{enum}" if enum is not None else None)


def _import_timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            "timm is needed for timm / Hugging Face encoders: `pip install histoexp[timm]` (or `pip install timm`)."
        ) from err
    return timm


def _build_timm(
    name: str, *, pretrained: bool, kwargs: Mapping[str, Any], gated: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    timm = _import_timm()
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **dict(kwargs))
    except RuntimeError as err:
        if "Unknown model" in str(err) or "not found" in str(err).lower():
            raise ValueError(_unknown_message(name)) from err
        if _is_download_error(err) or "hub" in str(err).lower():
            raise WeightsUnavailableError(_offline_message(repr(name), err, gated=gated)) from err
        raise
    except Exception as err:
        if _is_download_error(err):
            what = f"{name!r}" + ("" if pretrained else " (its config lives on the hub)")
            raise WeightsUnavailableError(_offline_message(what, err, gated=gated)) from err
        raise
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    return model, cfg


def _unknown_message(encoder: str) -> str:
    return (
        f"Unknown encoder {encoder!r}. Use a registry key {sorted(REGISTRY)} (hx.models.list_encoders()), "
        "'timm:<model name>' "
        "(any timm.list_models() name), 'hf-hub:<org>/<repo>' for timm models on the Hugging Face hub, "
        "or pass a torch.nn.Module / Encoder."
    )


@torch.no_grad()
def _infer_dim(module: nn.Module, size: int) -> int:
    was_training = module.training
    module.eval()
    dev = next(iter(module.parameters()), torch.empty(0)).device
    out = module(torch.zeros(1, 3, size, size, device=dev))
    module.train(was_training)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim != 2:
        raise ValueError(
            f"The encoder module must return pooled features of shape (B, dim); a dry run on a (1, 3, {size}, {size}) "
            f"input gave shape {tuple(out.shape)}. Wrap it so that it pools (e.g. add nn.AdaptiveAvgPool2d + Flatten)."
        )
    return int(out.shape[1])


def _transform_overrides(transform: Any) -> tuple[Callable | None, dict[str, Any]]:
    """``transform`` is a callable (used as is) or a mapping with ``input_size``/``mean``/``std``."""
    if transform is None:
        return None, {}
    if callable(transform):
        return transform, {}
    if isinstance(transform, Mapping):
        bad = set(transform) - {"input_size", "mean", "std"}
        if bad:
            raise ValueError(f"`transform` mapping accepts 'input_size', 'mean', 'std'; got unexpected {sorted(bad)}.")
        out = dict(transform)
        for k in ("mean", "std"):
            if k in out:
                out[k] = tuple(float(v) for v in out[k])
                if len(out[k]) != 3:
                    raise ValueError(f"`transform[{k!r}]` must have 3 values (RGB), got {out[k]}.")
        return None, out
    raise TypeError(f"`transform` must be a callable, a mapping or None, got {type(transform).__name__}.")


def get_encoder(
    encoder: str | nn.Module | Encoder,
    *,
    weights: str | os.PathLike | None = "default",
    transform: Callable[[torch.Tensor], torch.Tensor] | Mapping[str, Any] | None = None,
    dim: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    mpp: float | str | None = "default",
) -> Encoder:
    """Resolve ``encoder`` into a ready :class:`Encoder` (module in eval mode, on CPU).

    Parameters
    ----------
    encoder
        A registry key (:func:`list_encoders`), ``'timm:<name>'``, ``'hf-hub:<org>/<repo>'``, a bare timm model
        name, a :class:`torch.nn.Module` mapping (B, 3, S, S) to (B, dim), or an :class:`Encoder` (returned as is).
    weights
        ``'default'``: the entry's published weights (downloaded by torchvision / timm into their caches);
        ``None``: random initialisation (logged at WARNING, ``config['random_init'] = True``); a path to a local
        ``.safetensors`` file or a ``torch.save`` state dict (loaded with ``weights_only=True``; pickles with code
        are refused); for torchvision entries also a weights-enum name (``'IMAGENET1K_V1'``). For a user module,
        ``'default'`` and ``None`` keep its current weights (``random_init`` is recorded as False: histoexp cannot
        know how they were obtained) and a path loads into it.
    transform
        Replace the input transform: a callable (uint8 (B, H, W, 3) tensor -> float (B, 3, S, S)), or a mapping
        with any of ``input_size``, ``mean``, ``std``. For a user module without it, patches are scaled to [0, 1],
        normalised with ImageNet statistics and kept at their size unless ``input_size`` is given (or the
        module has an ``input_size`` attribute).
    dim
        Output dimension of a user module (inferred by a dry run when not given).
    model_kwargs
        Override the entry's architecture arguments (timm ``create_model`` keywords, ``transformers`` config
        fields, custom builder arguments), e.g. ``{'img_size': 448}`` to run a ViT with a dynamic image size at
        another input size (``input_size`` follows ``img_size``). Published weights still load when the shapes
        allow it; a change that alters shapes (``depth``) only makes sense with ``weights=None``.
    mpp
        µm per pixel the encoder is meant to see. ``'default'``: the entry's training µm/px (see
        :func:`list_encoders`); a number: your statement (recorded) that patches at that µm/px are intended;
        ``None``: no geometry check in :func:`histoexp.tl.embed_patches`.

    Returns
    -------
    :class:`Encoder`

    Raises
    ------
    WeightsUnavailableError
        Pretrained weights cannot be obtained (offline, gated repository, missing token); the message says how to
        proceed.
    ValueError
        Unknown encoder name; weights file that does not match; pickle carrying code.
    ImportError
        A timm / Hugging Face encoder was asked for but timm (or ``transformers`` for its entries) is not installed.
    """
    if isinstance(encoder, Encoder):
        if weights not in ("default", None) or transform is not None or model_kwargs or mpp != "default":
            raise ValueError("`encoder` is already an Encoder: pass `weights`/`transform` when building it instead.")
        return encoder
    user_tf, overrides = _transform_overrides(transform)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"`weights` must be 'default', None or a path, got {type(weights).__name__}.")
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)

    if mpp != "default" and mpp is not None and (isinstance(mpp, (str, bool)) or not float(mpp) > 0):
        raise ValueError(f"`mpp` must be 'default', None or a positive number, got {mpp!r}.")
    if isinstance(encoder, nn.Module):
        if model_kwargs:
            raise ValueError("`model_kwargs` applies to registry / timm encoders, not to a user module.")
        enc = _from_module(encoder, weights=weights, user_tf=user_tf, overrides=overrides, dim=dim)
        if mpp not in ("default", None):  # a user module has no training µm/px unless the user states one
            enc.mpp = enc.config["mpp"] = float(mpp)
        return enc
    if not isinstance(encoder, str):
        raise TypeError(f"`encoder` must be a string, a torch.nn.Module or an Encoder, got {type(encoder).__name__}.")

    if encoder in REGISTRY:
        spec = REGISTRY[encoder]
    elif encoder.startswith(("hf-hub:", "hf_hub:")):
        spec = EncoderSpec(
            key=encoder, source="timm", arch=encoder, dim=0, weights=encoder, gated=False, licence="see the model card"
        )
    elif encoder.startswith("timm:"):
        spec = EncoderSpec(key=encoder, source="timm", arch=encoder[5:], dim=0, weights="timm-default")
    else:
        try:
            timm = _import_timm()
        except ImportError:
            raise ValueError(_unknown_message(encoder) + " (timm is not installed.)") from None
        if not timm.is_model(encoder):
            raise ValueError(_unknown_message(encoder))
        spec = EncoderSpec(key=encoder, source="timm", arch=encoder, dim=0, weights="timm-default")

    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"`model_kwargs` must be a mapping or None, got {type(model_kwargs).__name__}.")
    model_kwargs = dict(model_kwargs or {})
    if model_kwargs and spec.source in ("handcrafted", "torchvision"):
        raise ValueError(f"`model_kwargs` is not supported for {spec.source} encoders ({spec.key!r}).")
    if mpp != "default":
        spec = replace(spec, mpp=None if mpp is None else float(mpp), mpp_range=None)

    if spec.source == "handcrafted":
        enc = _handcrafted(spec, weights=weights)
    elif spec.source == "torchvision":
        enc = _from_torchvision(spec, weights=weights, user_tf=user_tf, overrides=overrides)
    elif spec.source == "transformers":
        enc = _from_transformers(spec, weights=weights, user_tf=user_tf, overrides=overrides, kwargs=model_kwargs)
    elif spec.source == "custom":
        enc = _from_custom(spec, weights=weights, user_tf=user_tf, overrides=overrides, kwargs=model_kwargs)
    else:
        enc = _from_timm(spec, weights=weights, user_tf=user_tf, overrides=overrides, kwargs=model_kwargs)
    enc.mpp, enc.mpp_range = spec.mpp, spec.mpp_range
    enc.config["mpp"] = spec.mpp
    enc.config["mpp_range"] = list(spec.mpp_range) if spec.mpp_range else None
    if model_kwargs:
        enc.config["model_kwargs"] = {
            k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in model_kwargs.items()
        }
    return enc


def _name_of(key: str) -> str:
    name = key.split(":", 1)[-1].split("/")[-1]
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name).replace("-", "_").replace(".", "_")


def _finish(
    module: nn.Module,
    *,
    key: str,
    arch: str,
    dim: int,
    input_size: int | None,
    mean: tuple,
    std: tuple,
    weights_desc: str | None,
    random_init: bool,
    licence: str,
    gated: bool,
    user_tf: Callable | None,
    trainable: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> Encoder:
    module.eval()
    if random_init:
        logger.warning("Encoder %r: random initialisation (weights=None), as requested.", key)
    config = {
        "encoder": key,
        "arch": arch,
        "weights": weights_desc,
        "random_init": bool(random_init),
        "input_size": input_size,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "custom_transform": user_tf is not None,
        "dim": int(dim),
        "licence": licence,
        "gated": bool(gated),
    }
    if extra:
        config.update(extra)
    return Encoder(
        module=module,
        dim=int(dim),
        name=_name_of(key),
        input_size=input_size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        config=config,
        trainable=trainable,
        transform=user_tf,
    )


def _from_torchvision(spec: EncoderSpec, *, weights, user_tf, overrides) -> Encoder:
    local = weights is not None and weights != "default" and _looks_like_path(weights)
    module, desc = _build_torchvision(spec, None if (weights is None or local) else weights)
    if local:
        _load_state_into(module, load_weights(weights), weights)
        desc = os.path.abspath(weights)
    return _finish(
        module,
        key=spec.key,
        arch=f"torchvision.models.{spec.arch}",
        dim=spec.dim,
        input_size=overrides.get("input_size", spec.input_size),
        mean=overrides.get("mean", spec.mean),
        std=overrides.get("std", spec.std),
        weights_desc=desc,
        random_init=weights is None,
        licence=spec.licence,
        gated=spec.gated,
        user_tf=user_tf,
    )


def _resolve_timm_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Registry kwargs are JSON-like: turn ``'mlp_layer': 'SwiGLUPacked'`` into the timm class."""
    out = dict(kwargs)
    if isinstance(out.get("mlp_layer"), str):
        import timm.layers

        out["mlp_layer"] = getattr(timm.layers, out["mlp_layer"])
    return out


def _local_weights_file(weights: str, spec: EncoderSpec) -> str:
    """Resolve a weights path: a file as is, or the published weights file inside a folder."""
    if not os.path.isdir(weights):
        return weights
    names = [Path(spec.hub_file).name] if spec.hub_file else []
    names += ["model.safetensors", "pytorch_model.bin", "pytorch_model.pt", "model.pth"]
    for name in names:
        if os.path.isfile(os.path.join(weights, name)):
            return os.path.join(weights, name)
    raise FileNotFoundError(
        f"`weights={weights!r}` is a folder without a weights file: expected one of {names} "
        f"(found {sorted(os.listdir(weights))[:10]})."
    )


def _wrap_readout(module: nn.Module, spec: EncoderSpec, kind: str) -> nn.Module:
    if spec.readout in ("pooled",):
        return module
    from ._foundation import TokenReadout

    if kind == "timm":
        n_prefix = int(getattr(module, "num_prefix_tokens", 1))
    else:
        n_prefix = 1 + int(getattr(module.config, "num_register_tokens", 0) or 0)
    return TokenReadout(module, spec.readout, n_prefix, kind)


def _backbone(module: nn.Module) -> nn.Module:
    return getattr(module, "backbone", module)


def _from_timm(spec: EncoderSpec, *, weights, user_tf, overrides, kwargs=None) -> Encoder:
    kwargs = dict(kwargs or {})
    local = weights is not None and weights != "default" and _looks_like_path(weights)
    if weights is not None and weights != "default" and not local:
        raise ValueError(
            f"`weights={weights!r}` for {spec.key!r}: expected 'default', None or a path to a local weights file."
        )
    pretrained = weights == "default"
    if spec.key in REGISTRY and spec.weights and spec.weights.startswith("hf-hub:"):
        # registry alias: the architecture is known, so random init / local weights need no network
        name = spec.weights if pretrained else spec.arch
    else:
        name = spec.arch
    timm_kwargs = {**spec.timm_kwargs, **kwargs}
    if spec.readout != "pooled":
        timm_kwargs["global_pool"] = ""  # the read-out works on the tokens
    if "mlp_layer" in timm_kwargs:
        _import_timm()
    module, cfg = _build_timm(name, pretrained=pretrained, kwargs=_resolve_timm_kwargs(timm_kwargs), gated=spec.gated)
    desc = None
    if pretrained:
        desc = spec.weights if spec.weights != "timm-default" else f"timm:{cfg.get('tag') or name}"
    if local:
        path = _local_weights_file(weights, spec)
        _load_state_into(module, load_weights(path), path)
        desc = os.path.abspath(path)
    module = _wrap_readout(module, spec, "timm")
    if spec.key in REGISTRY:
        size, mean, std = int(timm_kwargs.get("img_size", spec.input_size)), spec.mean, spec.std
    else:
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
    nf = int(getattr(_backbone(module), "num_features", 0) or 0)
    dim = (2 * nf if spec.readout == "cls+mean" else nf) or _infer_dim(module, size)
    return _finish(
        module,
        key=spec.key,
        arch=f"timm:{spec.arch}" if not spec.arch.startswith(("hf-hub:", "hf_hub:")) else spec.arch,
        dim=dim,
        input_size=overrides.get("input_size", size),
        mean=overrides.get("mean", mean),
        std=overrides.get("std", std),
        weights_desc=desc,
        random_init=weights is None,
        licence=spec.licence,
        gated=spec.gated,
        user_tf=user_tf,
        extra={"readout": spec.readout},
    )


def _hub_download(spec: EncoderSpec) -> str:
    """Download the entry's weights file through ``huggingface_hub`` (its cache, token, offline settings)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise ImportError(
            f"huggingface_hub is needed to download the weights of {spec.key!r}: `pip install histoexp[hf]` "
            "(or pass `weights='/local/path'`)."
        ) from err
    kind, repo = spec.weights.split(":", 1)
    try:
        return hf_hub_download(
            repo_id=repo, filename=spec.hub_file, repo_type="dataset" if kind == "hf-dataset" else None
        )
    except Exception as err:
        if _is_download_error(err):
            raise WeightsUnavailableError(
                _offline_message(f"{spec.key!r} ({repo}, file {spec.hub_file!r})", err, gated=spec.gated)
            ) from err
        raise


def _from_custom(spec: EncoderSpec, *, weights, user_tf, overrides, kwargs=None) -> Encoder:
    from ._foundation import CUSTOM_BUILDERS

    _import_timm()
    build, remap = CUSTOM_BUILDERS[spec.arch]
    build_kwargs = {**spec.timm_kwargs, **(kwargs or {})}
    local = weights is not None and weights != "default"
    if local and not _looks_like_path(weights):
        raise ValueError(f"`weights={weights!r}` for {spec.key!r}: expected 'default', None or a local path.")
    path = _local_weights_file(weights, spec) if local else (_hub_download(spec) if weights == "default" else None)
    module = build(**build_kwargs)
    desc = None
    if path is not None:
        state = load_weights(path)
        _load_state_into(module, remap(state, module), path)
        desc = os.path.abspath(path) if local else f"{spec.weights}/{spec.hub_file}"
    size = int(build_kwargs.get("img_size", spec.input_size))
    return _finish(
        module,
        key=spec.key,
        arch=f"histoexp.models._foundation.build_{spec.arch}",
        dim=spec.dim,
        input_size=overrides.get("input_size", size),
        mean=overrides.get("mean", spec.mean),
        std=overrides.get("std", spec.std),
        weights_desc=desc,
        random_init=weights is None,
        licence=spec.licence,
        gated=spec.gated,
        user_tf=user_tf,
        extra={"readout": spec.readout},
    )


def _import_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "This encoder is a Hugging Face `transformers` model: `pip install histoexp[hf]` "
            "(or `pip install transformers`)."
        ) from err
    return transformers


def _from_transformers(spec: EncoderSpec, *, weights, user_tf, overrides, kwargs=None) -> Encoder:
    transformers = _import_transformers()
    cls = getattr(transformers, spec.arch)
    init_kwargs = {"add_pooling_layer": False} if spec.arch == "ViTModel" and spec.readout != "pooler" else {}
    local = weights is not None and weights != "default"
    if local and not _looks_like_path(weights):
        raise ValueError(f"`weights={weights!r}` for {spec.key!r}: expected 'default', None or a local path.")
    repo = spec.weights.split(":", 1)[1]
    desc = None
    if weights == "default" or (local and os.path.isfile(os.path.join(weights, "config.json"))):
        # the published loading code: from_pretrained on the hub repository (or a local copy of it)
        source = repo if weights == "default" else weights
        loader = transformers.AutoModel if spec.trust_remote_code else cls
        try:
            module = loader.from_pretrained(
                source,
                **({"trust_remote_code": True} if spec.trust_remote_code else {}),
                local_files_only=weights != "default",
                **(kwargs or {}),
                **init_kwargs,
            )
        except Exception as err:
            if weights == "default" and (_is_download_error(err) or "huggingface.co" in str(err)):
                what = f"{spec.key!r} ({repo})"
                raise WeightsUnavailableError(_offline_message(what, err, gated=spec.gated)) from err
            raise
        desc = f"hf:{repo}" if weights == "default" else os.path.abspath(weights)
    else:
        config = cls.config_class(**{**spec.timm_kwargs, **(kwargs or {})})
        module = cls(config, **init_kwargs)
        if local:
            path = _local_weights_file(weights, spec)
            _load_state_into(module, load_weights(path), path)
            desc = os.path.abspath(path)
    module = _wrap_readout(module, spec, "transformers")
    hidden = int(_backbone(module).config.hidden_size)
    size = int(getattr(_backbone(module).config, "image_size", spec.input_size))
    return _finish(
        module,
        key=spec.key,
        arch=f"transformers.{spec.arch}",
        dim=2 * hidden if spec.readout == "cls+mean" else hidden,
        input_size=overrides.get("input_size", size if "image_size" in (kwargs or {}) else spec.input_size),
        mean=overrides.get("mean", spec.mean),
        std=overrides.get("std", spec.std),
        weights_desc=desc,
        random_init=weights is None,
        licence=spec.licence,
        gated=spec.gated,
        user_tf=user_tf,
        extra={"readout": spec.readout},
    )


def _from_module(module: nn.Module, *, weights, user_tf, overrides, dim) -> Encoder:
    if weights is not None and weights != "default":
        _load_state_into(module, load_weights(weights), weights)
        desc = os.path.abspath(weights)
    else:
        desc = "user module"
    size = overrides.get("input_size", getattr(module, "input_size", None))
    if dim is None:
        dim = _infer_dim(module, size or 224)
    return _finish(
        module,
        key=type(module).__name__.lower(),
        arch=f"{type(module).__module__}.{type(module).__qualname__}",
        dim=dim,
        input_size=size,
        mean=overrides.get("mean", IMAGENET_MEAN),
        std=overrides.get("std", IMAGENET_STD),
        weights_desc=desc,
        random_init=False,
        licence="user-provided",
        gated=False,
        user_tf=user_tf,
    )


def _handcrafted(spec: EncoderSpec, *, weights) -> Encoder:
    if weights not in ("default", None):
        raise ValueError(f"The 'handcrafted' encoder has no weights; got `weights={weights!r}`.")
    from .handcrafted import FEATURE_NAMES, HandcraftedModule

    module = HandcraftedModule()
    return _finish(
        module,
        key=spec.key,
        arch="histoexp.models.handcrafted",
        dim=len(FEATURE_NAMES),
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        weights_desc=None,
        random_init=False,
        licence=spec.licence,
        gated=False,
        user_tf=None,
        trainable=False,
        extra={"features": list(FEATURE_NAMES), "training_free": True},
    )
