"""Predict spatially resolved gene expression from H&E histology.

``import histoexp as hx`` gives :mod:`hx.pp <histoexp.pp>` (preprocessing), :mod:`hx.tl <histoexp.tl>`
(tools), :mod:`hx.pl <histoexp.pl>` (plotting), :mod:`hx.io <histoexp.io>`, :mod:`hx.datasets
<histoexp.datasets>` and :data:`hx.settings <histoexp.settings>`. Torch is imported only when a tool
that needs it runs, so importing the package stays fast.
"""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, io, pl, pp, tl
from ._settings import settings

try:
    __version__ = version("histoexp")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = ["datasets", "io", "pl", "pp", "settings", "tl", "__version__"]
