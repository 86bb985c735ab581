"""Plotting: gene maps over the H&E image, metric distributions, patches (reads AnnData keys only)."""

from ._plots import correlation, gene_map, patches

__all__ = ["correlation", "gene_map", "patches"]
