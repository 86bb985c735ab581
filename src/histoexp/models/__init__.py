"""Models: the model platform (:mod:`~histoexp.models.base`), the methods, and the image-encoder registry.

Imports torch; nothing from tl/pp/pl.
"""

from .base import MODELS, ExpressionModel, ReferenceSpots, RegressionModel, RetrievalModel, load_model, register_model
from .bleep import BleepModel
from .encoders import (
    REGISTRY,
    Encoder,
    EncoderSpec,
    WeightsUnavailableError,
    check_patch_mpp,
    get_encoder,
    list_encoders,
    load_weights,
    register_encoder,
)
from .handcrafted import FEATURE_NAMES as HANDCRAFTED_FEATURES
from .handcrafted import handcrafted_features
from .mclstexp import MclstexpModel
from .nh2st import NH2STModel
from .ridge import RidgeModel
from .zeroshot import ZeroshotModel

__all__ = [
    "HANDCRAFTED_FEATURES",
    "MODELS",
    "REGISTRY",
    "BleepModel",
    "Encoder",
    "EncoderSpec",
    "ExpressionModel",
    "MclstexpModel",
    "NH2STModel",
    "ReferenceSpots",
    "RegressionModel",
    "RetrievalModel",
    "RidgeModel",
    "WeightsUnavailableError",
    "ZeroshotModel",
    "check_patch_mpp",
    "get_encoder",
    "handcrafted_features",
    "list_encoders",
    "load_model",
    "load_weights",
    "register_encoder",
    "register_model",
]
