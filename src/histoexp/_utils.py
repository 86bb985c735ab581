"""Small helpers shared across modules (no torch here)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ._settings import settings


def progress(iterable: Iterable | None = None, **kwargs):
    """``tqdm.auto`` progress bar that honours ``hx.settings.progress``.

    A bar appears only once its loop has run for a second (``delay``), so the many short loops of a run
    (one retrieval, one ensemble member's embeddings) print nothing.
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not settings.progress)
    kwargs.setdefault("delay", 1.0)
    return tqdm(iterable, **kwargs)


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
