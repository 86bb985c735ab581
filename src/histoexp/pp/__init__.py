"""Preprocessing: patches around spots, tissue tiles, expression targets (no torch here)."""

from ._patches import PatchSource, extract_patches, get_patches
from ._targets import expression_matrix, select_genes
from ._tiles import tile_tissue

__all__ = ["PatchSource", "expression_matrix", "extract_patches", "get_patches", "select_genes", "tile_tissue"]
