"""Preprocessing: patches around spots, tissue tiles, expression targets, gene embeddings (no torch here)."""

from ._gene_embeddings import TextModelUnavailableError, gene_embeddings, match_genes
from ._patches import PatchSource, extract_patches, get_patches
from ._targets import expression_matrix, select_genes
from ._tiles import tile_tissue

__all__ = [
    "PatchSource",
    "TextModelUnavailableError",
    "expression_matrix",
    "extract_patches",
    "gene_embeddings",
    "get_patches",
    "match_genes",
    "select_genes",
    "tile_tissue",
]
