"""Predict spatially resolved gene expression from H&E histology.

``import histoexp as hx`` gives :mod:`hx.pp <histoexp.pp>` (preprocessing), :mod:`hx.tl <histoexp.tl>`
(tools), :mod:`hx.pl <histoexp.pl>` (plotting), :mod:`hx.io <histoexp.io>`, :mod:`hx.datasets
<histoexp.datasets>`, :mod:`hx.image <histoexp.image>` and :data:`hx.settings <histoexp.settings>`;
:mod:`hx.models <histoexp.models>` and :mod:`hx.train <histoexp.train>` are imported on first use. Torch is
imported only when a tool that needs it runs, so importing the package stays fast.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

from . import datasets, image, io, pl, pp, tl
from ._settings import settings
from ._utils import quiet_import_noise

# after `import histoexp`, importing scanpy/squidpy (by histoexp or the user) prints none of their dependencies'
# import-time notices; appended, so a user's own warning filters still take precedence
quiet_import_noise(append=True)

try:
    __version__ = version("histoexp")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

# submodules that import torch: loaded on first attribute access (``hx.models``), not at ``import histoexp``
_LAZY_SUBMODULES = ("models", "train")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


__all__ = ["datasets", "image", "io", "models", "pl", "pp", "settings", "tl", "train", "__version__"]
