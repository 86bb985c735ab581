"""Plotting: gene maps over the H&E image, metric distributions, patches (reads AnnData keys only, never torch).

Every function follows scanpy's contract: ``show``, ``save`` and ``return_fig``; it returns None unless
``return_fig=True``, so a notebook cell displays the figure once.
"""

from ._plots import correlation, patches
from ._spatial import gene_map

__all__ = ["correlation", "gene_map", "patches"]
