"""Datasets: the real HER2+ breast cancer ST data (her2st), HEST-1k samples and a small synthetic H&E dataset."""

from ._her2st import her2st, her2st_gene_panel, her2st_sections
from ._hest import DatasetUnavailableError, hest
from ._synthetic import synthetic

__all__ = ["DatasetUnavailableError", "her2st", "her2st_gene_panel", "her2st_sections", "hest", "synthetic"]
