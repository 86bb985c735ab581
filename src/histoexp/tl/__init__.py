"""Tools: image embeddings, model fitting, prediction, evaluation, spatial domains."""

from ._bleep import fit_bleep
from ._domains import spatial_domains
from ._embed import embed_neighbourhood, embed_patches, embed_query
from ._evaluate import evaluate, gene_metrics, shared_axis
from ._evaluate import summarize as summarize_metrics
from ._mclstexp import fit_mclstexp
from ._nh2st import fit_nh2st
from ._predict import PreparedReference, impute, load_model, prediction_intervals, prepare_reference
from ._retrieval import nearest_neighbours, register_weighting, retrieval_weightings
from ._ridge import fit_ridge
from ._slides import impute_slide, impute_slides, read_slide_list
from ._zeroshot import fit_zeroshot, shuffle_embedding_table, zeroshot_crossfit

__all__ = [
    "PreparedReference",
    "embed_neighbourhood",
    "embed_patches",
    "embed_query",
    "evaluate",
    "fit_bleep",
    "fit_mclstexp",
    "fit_nh2st",
    "fit_ridge",
    "fit_zeroshot",
    "gene_metrics",
    "impute",
    "impute_slide",
    "impute_slides",
    "load_model",
    "nearest_neighbours",
    "prediction_intervals",
    "prepare_reference",
    "read_slide_list",
    "register_weighting",
    "retrieval_weightings",
    "shared_axis",
    "spatial_domains",
    "shuffle_embedding_table",
    "summarize_metrics",
    "zeroshot_crossfit",
]
