"""Readers and converters: legacy ST, Visium / Visium HD, HEST-1k, SpatialData; atomic h5ad writing."""

from .._fs import write_h5ad
from ._hest import read_hest
from ._read import read_st, read_visium
from ._spatialdata import from_spatialdata, to_spatialdata

__all__ = ["from_spatialdata", "read_hest", "read_st", "read_visium", "to_spatialdata", "write_h5ad"]
