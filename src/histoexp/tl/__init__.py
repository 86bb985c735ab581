"""Tools: image embeddings, model fitting, prediction, evaluation, spatial domains."""

from ._bleep import fit_bleep
from ._domains import spatial_domains
from ._embed import embed_patches
from ._evaluate import evaluate, gene_metrics
from ._evaluate import summarize as summarize_metrics
from ._mclstexp import fit_mclstexp
from ._predict import impute, load_model
from ._retrieval import nearest_neighbours, register_weighting, retrieval_weightings
from ._ridge import fit_ridge

__all__ = [
    "embed_patches",
    "evaluate",
    "fit_bleep",
    "fit_mclstexp",
    "fit_ridge",
    "gene_metrics",
    "impute",
    "load_model",
    "nearest_neighbours",
    "register_weighting",
    "retrieval_weightings",
    "spatial_domains",
    "summarize_metrics",
]
