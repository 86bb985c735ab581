"""Plotting: gene maps and spatial domains over the H&E image, metrics, benchmark comparisons, patches.

Every function reads AnnData keys only (never torch) and follows scanpy's contract: ``show``, ``save``
and ``return_fig``; it returns None unless ``return_fig=True``, so a notebook cell displays the figure once.
"""

from ._plots import correlation, method_comparison, patches, pcc_vs_expression, scatter_measured
from ._spatial import gene_map, match_labels, spatial_domains

__all__ = [
    "correlation",
    "gene_map",
    "match_labels",
    "method_comparison",
    "patches",
    "pcc_vs_expression",
    "scatter_measured",
    "spatial_domains",
]
