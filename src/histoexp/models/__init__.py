"""Models: the image-encoder registry and :func:`get_encoder` (imports torch; nothing from tl/pp/pl)."""

from .encoders import (
    REGISTRY,
    Encoder,
    EncoderSpec,
    WeightsUnavailableError,
    get_encoder,
    list_encoders,
    load_weights,
    register_encoder,
)
from .handcrafted import FEATURE_NAMES as HANDCRAFTED_FEATURES
from .handcrafted import handcrafted_features

__all__ = [
    "HANDCRAFTED_FEATURES",
    "REGISTRY",
    "Encoder",
    "EncoderSpec",
    "WeightsUnavailableError",
    "get_encoder",
    "handcrafted_features",
    "list_encoders",
    "load_weights",
    "register_encoder",
]
