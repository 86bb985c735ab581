"""Tools: image embeddings, model fitting, imputation, evaluation, spatial domains."""

from ._bleep import fit_bleep, impute, load_model
from ._domains import spatial_domains
from ._embed import embed_patches
from ._evaluate import evaluate

__all__ = ["embed_patches", "evaluate", "fit_bleep", "impute", "load_model", "spatial_domains"]
