"""Pathology foundation models: registry entries, read-outs and the architectures histoexp builds itself.

Every entry follows its authors' published loading code (model card, reference repository): architecture and
keyword arguments, input size, normalisation, read-out and the µm per pixel of the training tiles. What could not be
checked against the authors' files from here is said in the entry's ``description`` and in ``docs/encoders.md``.

Imports torch (through :mod:`histoexp.models`); timm / transformers / huggingface_hub only when a model is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
KAIKO_MEAN = (0.5, 0.5, 0.5)
KAIKO_STD = (0.5, 0.5, 0.5)

_NC = "non-commercial"


def _licence(name: str, url: str, gated: bool) -> str:
    return f"{name}{', gated: accept the terms at ' + url + ', then log in' if gated else ' (' + url + ')'}"


# --------------------------------------------------------------------------------------------------------------
# Read-out
# --------------------------------------------------------------------------------------------------------------


class TokenReadout(nn.Module):
    """Wrap a vision transformer so that it returns one vector per image, read out as its authors do.

    Parameters
    ----------
    backbone
        A timm ``VisionTransformer`` (tokens from ``forward_features``, after the final norm) or a
        ``transformers`` vision model (tokens from ``last_hidden_state``).
    readout
        ``'cls'``: the class token; ``'cls+mean'``: the class token concatenated with the mean of the patch tokens
        (class and register tokens excluded); ``'pooler'``: the ``transformers`` model's ``pooler_output``.
    num_prefix_tokens
        Class + register tokens at the start of the sequence.
    kind
        ``'timm'`` or ``'transformers'``.

    The weights live in ``backbone``: a published checkpoint loads into it unchanged.
    """

    def __init__(self, backbone: nn.Module, readout: str, num_prefix_tokens: int, kind: str) -> None:
        super().__init__()
        if readout not in ("cls", "cls+mean", "pooler"):
            raise ValueError(f"`readout` must be 'cls', 'cls+mean' or 'pooler', got {readout!r}.")
        if kind not in ("timm", "transformers"):
            raise ValueError(f"`kind` must be 'timm' or 'transformers', got {kind!r}.")
        self.backbone = backbone
        self.readout = readout
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.kind = kind

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens (B, N, D) after the final norm: class, registers, patches."""
        if self.kind == "timm":
            return self.backbone.forward_features(x)
        return self.backbone(pixel_values=x).last_hidden_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.readout == "pooler":
            return self.backbone(pixel_values=x).pooler_output
        t = self.tokens(x)
        cls = t[:, 0]
        if self.readout == "cls":
            return cls
        return torch.cat([cls, t[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)


# --------------------------------------------------------------------------------------------------------------
# CONCH vision towers (mahmoodlab/CONCH; CONCH v1.5 as distributed with TITAN / TRIDENT)
# --------------------------------------------------------------------------------------------------------------


class _MHAPooler(nn.Module):
    """CONCH v1's attentional pooler: learnt queries attend over the trunk's tokens (``nn.MultiheadAttention``)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(x).permute(1, 0, 2)  # (N, B, C): sequence first
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, kv.shape[1], -1)
        return self.attn(q, kv, kv, need_weights=False)[0].permute(1, 0, 2)  # (B, n_queries, d_model)


class _CrossAttnPooler(nn.Module):
    """CONCH v1.5's attentional pooler (to_q / to_kv / to_out projections without bias)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        dim_head = d_model // n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, dim_head * n_head, bias=False)
        self.to_kv = nn.Linear(context_dim, dim_head * n_head * 2, bias=False)
        self.to_out = nn.Linear(dim_head * n_head, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.heads
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)  # (B, Q, h*d)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # (B, N, h*d)

        def split(t):
            return t.reshape(b, t.shape[1], h, -1).transpose(1, 2)  # (B, h, L, d)

        # softmax(q k^T / sqrt(d)) v, as the reference's explicit einsum (max-subtraction does not change it)
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, q.shape[1], -1))  # (B, Q, d_model)


class ConchVisionTower(nn.Module):
    """CONCH's image embedding before the contrastive projection: trunk tokens -> attentional pooler -> LayerNorm.

    ``encode_image(x, proj_contrast=False, normalize=False)`` of the authors' model.
    """

    def __init__(self, trunk: nn.Module, pooler: nn.Module, dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = pooler
        self.ln_contrast = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def _vit(**kwargs: Any) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=0, **kwargs)


def build_conch_v1(*, img_size: int = 448, depth: int = 12) -> nn.Module:
    """CONCH v1 vision tower: ViT-B/16 trunk at 448 px, one-query attentional pooler to 512, LayerNorm."""
    trunk = _vit(
        embed_dim=768, depth=depth, num_heads=12, mlp_ratio=4, img_size=img_size, patch_size=16, dynamic_img_size=True
    )
    return ConchVisionTower(trunk, _MHAPooler(512, 768, 8, 1), 512)


def build_conch_v15(*, img_size: int = 448, depth: int = 24) -> nn.Module:
    """CONCH v1.5 vision tower: ViT-L/16 trunk (LayerScale 1.0) at 448 px, attentional pooler to 768, LayerNorm."""
    trunk = _vit(
        embed_dim=1024,
        depth=depth,
        num_heads=16,
        mlp_ratio=4,
        qkv_bias=True,
        init_values=1.0,
        img_size=img_size,
        patch_size=16,
        dynamic_img_size=True,
    )
    return ConchVisionTower(trunk, _CrossAttnPooler(768, 1024, 8, 1), 768)


def _conch_state(state: Mapping[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Keep the vision tower of a full CONCH checkpoint (``visual.`` prefix) and fit the position embedding."""
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    keep = ("trunk.", "attn_pool_contrast.", "ln_contrast.")
    state = {k: v for k, v in state.items() if k.startswith(keep)}
    pe = state.get("trunk.pos_embed")
    own = module.trunk.pos_embed
    if pe is not None and pe.shape != own.shape:
        from timm.layers import resample_abs_pos_embed

        state["trunk.pos_embed"] = resample_abs_pos_embed(
            pe, new_size=module.trunk.patch_embed.grid_size, num_prefix_tokens=1, verbose=False
        )
    return state


# --------------------------------------------------------------------------------------------------------------
# CTransPath (Wang et al. 2022): Swin-T/4 whose patch embedding is a small convolutional stem
# --------------------------------------------------------------------------------------------------------------


class _ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 conv-BN-ReLU blocks and a 1x1 conv to ``embed_dim``.

    Accepts the arguments timm's ``SwinTransformer`` passes to its ``embed_layer`` and returns NHWC tokens.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Any = None,
        strict_img_size: bool = True,
        output_fmt: str = "NHWC",
        **_: Any,
    ) -> None:
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("CTransPath's stem needs patch_size=4 and embed_dim divisible by 8.")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = size
        self.patch_size = (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        c1, c2 = embed_dim // 8, embed_dim // 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, c1, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c2, embed_dim, kernel_size=1),
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def build_ctranspath(*, img_size: int = 224) -> nn.Module:
    """CTransPath: timm ``swin_tiny_patch4_window7_224`` with the convolutional stem; average-pooled 768 features."""
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=_ConvStem, img_size=img_size
    )


def _ctranspath_state(state: Mapping[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Map a TransPath-format checkpoint (timm 0.5 Swin layout) onto the current timm Swin layout."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(dict(state), module)
    return {k: v for k, v in state.items() if not k.startswith("head.")}


CUSTOM_BUILDERS = {
    "conch_v1": (build_conch_v1, _conch_state),
    "conch_v15": (build_conch_v15, _conch_state),
    "ctranspath": (build_ctranspath, _ctranspath_state),
}


# --------------------------------------------------------------------------------------------------------------
# Registry entries
# --------------------------------------------------------------------------------------------------------------

_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"}


def register_all(register) -> None:
    """Register the foundation-model entries through ``register`` (:func:`~histoexp.models.register_encoder`)."""
    hf = "https://huggingface.co/"
    register(
        key="uni2-h",
        source="timm",
        arch="vit_giant_patch14_224",
        dim=1536,
        weights="hf-hub:MahmoodLab/UNI2-h",
        licence=_licence("CC-BY-NC-ND-4.0", hf + "MahmoodLab/UNI2-h", True),
        gated=True,
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        description="UNI2-h (Mahmood lab), ViT-H/14 with 8 registers and SwiGLU; class token",
        mpp=0.5,
        readout="cls",
    )
    register(
        key="virchow",
        source="timm",
        arch="vit_huge_patch14_224",
        dim=2560,
        weights="hf-hub:paige-ai/Virchow",
        licence=_licence("Apache-2.0 (" + _NC + " use terms on the card)", hf + "paige-ai/Virchow", True),
        gated=True,
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True, **_SWIGLU},
        description="Virchow (Paige), ViT-H/14 with SwiGLU; class token + mean of patch tokens",
        mpp=0.5,
        readout="cls+mean",
    )
    register(
        key="virchow2",
        source="timm",
        arch="vit_huge_patch14_224",
        dim=2560,
        weights="hf-hub:paige-ai/Virchow2",
        licence=_licence("CC-BY-NC-ND-4.0", hf + "paige-ai/Virchow2", True),
        gated=True,
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        description="Virchow2 (Paige), ViT-H/14 with 4 registers and SwiGLU, mixed magnification (5x-40x); "
        "class token + mean of patch tokens (registers excluded)",
        mpp=0.5,
        mpp_range=(0.25, 2.0),
        readout="cls+mean",
    )
    register(
        key="h-optimus-1",
        source="timm",
        arch="vit_giant_patch14_reg4_dinov2",
        dim=1536,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        weights="hf-hub:bioptimus/H-optimus-1",
        licence=_licence("CC-BY-NC-ND-4.0", hf + "bioptimus/H-optimus-1", True),
        gated=True,
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        description="H-optimus-1 (Bioptimus), ViT-g/14 with 4 registers; class token",
        mpp=0.5,
        readout="cls",
    )
    register(
        key="h0-mini",
        source="timm",
        arch="vit_base_patch14_reg4_dinov2",
        dim=1536,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        weights="hf-hub:bioptimus/H0-mini",
        licence=_licence("CC-BY-NC-ND-4.0", hf + "bioptimus/H0-mini", True),
        gated=True,
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True, **_SWIGLU},
        description="H0-mini (Bioptimus), ViT-B/14 with 4 registers and SwiGLU, distilled from H-optimus-0; "
        "class token + mean of patch tokens (registers excluded)",
        mpp=0.5,
        readout="cls+mean",
    )
    register(
        key="prov-gigapath",
        source="timm",
        arch="vit_giant_patch14_dinov2",
        dim=1536,
        weights="hf-hub:prov-gigapath/prov-gigapath",
        licence=_licence("Apache-2.0 (research use per the card)", hf + "prov-gigapath/prov-gigapath", True),
        gated=True,
        timm_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "dynamic_img_size": True,
        },
        description="Prov-GigaPath tile encoder (Microsoft / Providence), ViT-g/16; class token",
        mpp=0.5,
        readout="cls",
    )
    register(
        key="conch",
        source="custom",
        arch="conch_v1",
        dim=512,
        input_size=448,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        weights="hf:MahmoodLab/conch",
        hub_file="pytorch_model.bin",
        licence=_licence("CC-BY-NC-ND-4.0", hf + "MahmoodLab/CONCH", True),
        gated=True,
        timm_kwargs={"img_size": 448},
        description="CONCH v1 vision tower (Mahmood lab), ViT-B/16 at 448 px + attentional pooler; the "
        "embedding before the contrastive projection (encode_image(proj_contrast=False, normalize=False))",
        mpp=0.5,
    )
    register(
        key="conch-v1.5",
        source="custom",
        arch="conch_v15",
        dim=768,
        input_size=448,
        weights="hf:MahmoodLab/conchv1_5",
        hub_file="pytorch_model_vision.bin",
        licence=_licence("CC-BY-NC-ND-4.0", hf + "MahmoodLab/conchv1_5", True),
        gated=True,
        timm_kwargs={"img_size": 448},
        description="CONCH v1.5 vision tower (Mahmood lab, TITAN's patch encoder), ViT-L/16 at 448 px + "
        "attentional pooler",
        mpp=0.5,
    )
    register(
        key="ctranspath",
        source="custom",
        arch="ctranspath",
        dim=768,
        weights="hf-dataset:MahmoodLab/hest-bench",
        hub_file="fm_v1/ctranspath/CHIEF_CTransPath.pth",
        licence="GPL-3.0 (TransPath code); weights as distributed with HEST-Benchmark (" + hf + "datasets/"
        "MahmoodLab/hest-bench), gated: accept its terms, then log in",
        gated=True,
        timm_kwargs={"img_size": 224},
        description="CTransPath (Wang et al. 2022), Swin-T/4 with a convolutional stem; average-pooled tokens "
        "(20x / 10x training tiles)",
        mpp=0.5,
        mpp_range=(0.5, 1.0),
    )
    register(
        key="phikon",
        source="transformers",
        arch="ViTModel",
        dim=768,
        weights="hf:owkin/phikon",
        licence=_licence("Owkin non-commercial licence", hf + "owkin/phikon", False),
        timm_kwargs={
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "image_size": 224,
            "patch_size": 16,
            "qkv_bias": True,
        },
        description="Phikon (Owkin), iBOT ViT-B/16 (transformers ViTModel); class token",
        mpp=0.5,
        readout="cls",
    )
    register(
        key="phikon-v2",
        source="transformers",
        arch="Dinov2Model",
        dim=1024,
        weights="hf:owkin/phikon-v2",
        licence=_licence("Owkin non-commercial licence", hf + "owkin/phikon-v2", False),
        timm_kwargs={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "mlp_ratio": 4,
            "image_size": 224,
            "patch_size": 16,
            "layer_norm_eps": 1e-6,
        },
        description="Phikon-v2 (Owkin), DINOv2 ViT-L/16 (transformers Dinov2Model); class token",
        mpp=0.5,
        readout="cls",
    )
    register(
        key="hibou-b",
        source="transformers",
        arch="Dinov2WithRegistersModel",
        dim=768,
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        weights="hf:histai/hibou-b",
        trust_remote_code=True,
        licence=_licence("Apache-2.0", hf + "histai/hibou-b", False),
        timm_kwargs={
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "mlp_ratio": 4,
            "image_size": 224,
            "patch_size": 14,
            "num_register_tokens": 4,
        },
        description="Hibou-B (HistAI), DINOv2 ViT-B/14 with 4 registers; pooler output (normed class token)",
        mpp=0.5,
        readout="pooler",
    )
    register(
        key="hibou-l",
        source="transformers",
        arch="Dinov2WithRegistersModel",
        dim=1024,
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        weights="hf:histai/hibou-L",
        trust_remote_code=True,
        licence=_licence("Apache-2.0", hf + "histai/hibou-L", False),
        timm_kwargs={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "mlp_ratio": 4,
            "image_size": 224,
            "patch_size": 14,
            "num_register_tokens": 4,
        },
        description="Hibou-L (HistAI), DINOv2 ViT-L/14 with 4 registers; pooler output (normed class token)",
        mpp=0.5,
        readout="pooler",
    )
    register(
        key="midnight",
        source="transformers",
        arch="Dinov2Model",
        dim=3072,
        mean=KAIKO_MEAN,
        std=KAIKO_STD,
        weights="hf:kaiko-ai/midnight",
        licence=_licence("MIT", hf + "kaiko-ai/midnight", True),
        gated=True,
        timm_kwargs={
            "hidden_size": 1536,
            "num_hidden_layers": 40,
            "num_attention_heads": 24,
            "mlp_ratio": 4,
            "use_swiglu_ffn": True,
            "image_size": 224,
            "patch_size": 14,
            "layer_norm_eps": 1e-6,
        },
        description="Midnight-12k (kaiko.ai), DINOv2 ViT-g/14; class token + mean of patch tokens",
        mpp=0.5,
        mpp_range=(0.25, 2.0),
        readout="cls+mean",
    )
