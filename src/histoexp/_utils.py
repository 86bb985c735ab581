"""Small helpers shared across modules (no torch here)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ._settings import settings


def progress(iterable: Iterable | None = None, **kwargs):
    """``tqdm.auto`` progress bar that honours ``hx.settings.progress``.

    A bar appears only once its loop has run for a second (``delay``), so the many short loops of a run
    (one retrieval, one ensemble member's embeddings) print nothing. Without ipywidgets (where ``tqdm.auto``
    would warn ``IProgress not found`` in Jupyter) it is tqdm's plain text bar.
    """
    if _has_ipywidgets():
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm

    kwargs.setdefault("disable", not settings.progress)
    kwargs.setdefault("delay", 1.0)
    return tqdm(iterable, **kwargs)


def _has_ipywidgets() -> bool:
    return "ipywidgets" in sys.modules or importlib.util.find_spec("ipywidgets") is not None


# loggers of the libraries histoexp calls; squidpy logs through spatialdata's logger and scanpy's logging
_LIBRARY_LOGGERS = ("squidpy", "spatialdata._logging", "anndata")


@contextlib.contextmanager
def library_verbosity() -> Iterator[None]:
    """Give scanpy, squidpy and anndata the level of ``hx.settings.verbosity`` for the duration of a call.

    Import scanpy before entering (its ``settings.verbosity`` is set only when it is imported).

    Their own levels (and ``sc.settings.verbosity``) are restored afterwards, so a user's settings for
    direct calls to those libraries are left alone.
    """
    level = settings.log_level
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    old_levels = [lg.level for lg in loggers]
    sc_settings = getattr(sys.modules.get("scanpy"), "settings", None)
    old_sc = sc_settings.verbosity if sc_settings is not None else None
    try:
        for lg in loggers:
            lg.setLevel(level)
        if sc_settings is not None:  # scanpy's scale: 0 error, 1 warning, 2 info, 3 hint, 4 debug
            sc_settings.verbosity = (0, 1, 2, 4)[settings.verbosity]
        yield
    finally:
        for lg, old in zip(loggers, old_levels, strict=True):
            lg.setLevel(old)
        if sc_settings is not None:
            sc_settings.verbosity = old_sc


# Import-time notices of dependencies that say nothing about the user's data: docrep's SyntaxWarning on squidpy's
# docstrings, and tqdm.auto's "IProgress not found" in Jupyter without ipywidgets (scanpy and squidpy import
# tqdm.auto; histoexp's own bars fall back to plain tqdm there, see progress()).
_IMPORT_NOISE = (
    (r".* is not a valid key!", SyntaxWarning, r"docrep(\..*)?"),
    (r"IProgress not found", Warning, r"tqdm(\..*)?"),
)


def quiet_import_noise(*, append: bool = False) -> None:
    """Install warning filters for :data:`_IMPORT_NOISE` (each matches one message from one module only)."""
    for message, category, module in _IMPORT_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module, append=append)


def import_squidpy():
    """``import squidpy`` without its dependencies' import-time notices (see :data:`_IMPORT_NOISE`)."""
    with warnings.catch_warnings():
        quiet_import_noise()
        import squidpy

    return squidpy


def import_scanpy():
    """``import scanpy`` without its dependencies' import-time notices (see :data:`_IMPORT_NOISE`)."""
    with warnings.catch_warnings():
        quiet_import_noise()
        import scanpy

    return scanpy


def check_key_free(mapping: Mapping, key: str, *, where: str, overwrite: bool, arg: str = "key_added") -> None:
    """Raise if ``key`` already exists in ``mapping`` and ``overwrite`` is False."""
    if key in mapping and not overwrite:
        raise KeyError(
            f"{where}[{key!r}] already exists. Pass `overwrite=True` to replace it, or choose another `{arg}`."
        )


def resolve_library_key(adata: AnnData, library_key: str | None = None, *, default: str = "library_id") -> str | None:
    """Return the ``obs`` column naming each spot's section (the one way every function resolves it).

    ``library_key`` if given (it must exist), else ``default`` (``'library_id'``, as
    :func:`histoexp.datasets.her2st` and squidpy write it) when present, else ``None``.
    """
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(
                f"`library_key={library_key!r}` is not a column of adata.obs (found {list(adata.obs.columns)})."
            )
        return library_key
    return default if default in adata.obs else None


def library_ids(adata: AnnData, library_key: str | None = None) -> list[str]:
    """Library ids of ``adata``: categories of ``obs[library_key]``, else the keys of ``uns['spatial']``."""
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(f"`library_key={library_key!r}` is not a column of adata.obs.")
        col = adata.obs[library_key]
        cats = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.unique(col)
        return [str(c) for c in cats if (col == c).any()]
    spatial = adata.uns.get("spatial", {})
    return [str(k) for k in spatial.keys()]


def jsonable(obj: Any) -> Any:
    """Convert ``obj`` to something ``write_h5ad`` stores losslessly (dicts, lists, str, numbers)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
