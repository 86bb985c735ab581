"""Small helpers shared across modules (no torch here)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import importlib.util
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ._settings import logger, settings

#: seconds a loop runs before its progress appears (the many short loops of a run print nothing)
PROGRESS_DELAY = 1.0
#: seconds between two plain progress lines when the output is not a terminal (a log file, a pipe)
LINE_INTERVAL = 30.0

_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("histoexp_progress_step", default=None)


def progress(iterable: Iterable | None = None, **kwargs):
    """``tqdm`` progress that honours ``hx.settings.progress``: one bar per user-visible step.

    - A bar appears only once its loop has run for :data:`PROGRESS_DELAY` seconds (``delay``), so the many short
      loops of a run (one retrieval, one ensemble member's embeddings) print nothing.
    - Inside a :func:`progress_step` (``impute``, the ``fit_*`` functions) a loop draws no bar of its own: it
      shows in the step's bar (``impute (mclSTExp): 45%|... [member 3/5 · reference embeddings 40%]``).
    - In a terminal or a notebook, tqdm's bar (``tqdm.auto`` with ipywidgets, else its text bar, which avoids
      ``IProgress not found`` in Jupyter). Elsewhere (stderr redirected to a log file or a pipe) plain lines with
      no carriage returns: one every :data:`LINE_INTERVAL` seconds while the loop runs, and one when it ends.

    Takes tqdm's arguments; the object returned has tqdm's iteration, ``update``, ``close``, ``set_description``,
    ``set_postfix`` and context-manager interface.
    """
    kwargs.setdefault("disable", not settings.progress)
    step = _STEP.get()
    if step is not None:
        return _Nested(step, iterable, **kwargs)
    kwargs.setdefault("delay", PROGRESS_DELAY)
    fp = kwargs.get("file") or sys.stderr
    if _interactive(fp):
        if _has_ipywidgets():
            from tqdm.auto import tqdm
        else:
            from tqdm.std import tqdm
        return tqdm(iterable, **kwargs)
    kwargs["file"] = _LineWriter(fp)
    kwargs["leave"] = True  # the last line says where the loop ended
    kwargs.setdefault("mininterval", 0)  # the bar spaces its lines itself
    kwargs.setdefault("ascii", True)
    return _line_bar()(iterable, **kwargs)


@contextlib.contextmanager
def progress_step(desc: str) -> Iterator[None]:
    """Show the loops run inside the block as one bar, ``desc``: a step the user sees as one (``impute``).

    The bar's fraction is that of the outermost loop (members done of an ensemble); its postfix names the loops
    running and how far each is (``members 2/5 · reference embeddings 3/10``). Inside another step it adds nothing.
    """
    if _STEP.get() is not None or not settings.progress:
        yield
        return
    kwargs = {"total": 1, "desc": desc, "miniters": 0}
    interactive = _interactive(sys.stderr)
    fmt = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
    bar = progress(**kwargs, bar_format=fmt if interactive else fmt.replace("|{bar}|", ""))
    step = _Step(bar)
    token = _STEP.set(step)
    try:
        yield
        step.finish()
    finally:
        _STEP.reset(token)
        bar.close()


def one_progress_bar(desc: str | Callable[..., str]) -> Callable:
    """Run the decorated function inside :func:`progress_step` (``desc``: a string, or a function of its arguments)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with progress_step(desc(*args, **kwargs) if callable(desc) else desc):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


class _Step:
    """The bar of a :func:`progress_step` and the loops open inside it (outermost first)."""

    def __init__(self, bar) -> None:
        self.bar, self.loops, self.done = bar, [], 0.0

    def show(self) -> None:
        # the outermost loop's fraction (the loops inside it come one after another and each restarts at 0; a
        # later top-level loop too): the bar never goes back
        outer = self.loops[0] if self.loops else None
        frac = min(1.0, outer.n / outer.total) if outer is not None and outer.total else 0.0
        frac = max(self.done, frac)
        text = " · ".join(loop.label() for loop in self.loops)
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(frac - self.done)
        self.done = frac

    def finish(self) -> None:
        self.loops.clear()
        self.bar.set_postfix_str("", refresh=False)
        self.bar.update(1.0 - self.done)
        self.done = 1.0


class _Nested:
    """A loop inside a :func:`progress_step`: no bar of its own, it moves the step's bar."""

    def __init__(self, step: _Step, iterable=None, *, desc=None, total=None, initial=0, disable=False, **_) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.step, self.iterable, self.desc, self.total = step, iterable, desc, total
        self.n, self.disable = initial, disable
        if not disable:
            step.loops.append(self)
            step.show()

    def label(self) -> str:
        done = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        return f"{self.desc or 'loop'} {done}"

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return len(self.iterable) if self.iterable is not None else int(self.total or 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.disable and self in self.step.loops:
            self.step.show()

    def close(self) -> None:
        if self in self.step.loops:
            self.step.loops.remove(self)
            self.step.show()

    def set_description(self, desc=None, refresh=True) -> None:
        self.desc = desc

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def refresh(self, *args, **kwargs) -> None:
        pass


def _interactive(fp) -> bool:
    """Whether ``fp`` shows a live bar: a terminal, or a Jupyter kernel's output."""
    try:
        if fp.isatty():
            return True
    except (AttributeError, ValueError):
        pass
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
    except Exception:  # pragma: no cover - a broken IPython
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class _LineWriter:
    """File for the line bar: passes whole lines, drops tqdm's bare carriage returns and newlines."""

    def __init__(self, fp) -> None:
        self.fp = fp

    def write(self, s: str) -> None:
        if s.strip("\r\n "):
            self.fp.write(s)

    def flush(self) -> None:
        getattr(self.fp, "flush", lambda: None)()


_LINE_BAR: list = []


def _line_bar() -> type:
    """Tqdm's text bar writing its status as whole lines (log files): one per LINE_INTERVAL, and the last."""
    if _LINE_BAR:
        return _LINE_BAR[0]
    from tqdm.std import tqdm

    class LineBar(tqdm):
        _hx_closing = False
        _hx_last_line = -float("inf")
        _hx_last_text = ""

        def display(self, msg=None, pos=None):
            if msg == "":  # tqdm clearing its line
                return True
            now = time.monotonic()
            if not self._hx_closing and now - self._hx_last_line < LINE_INTERVAL:
                return True
            text = (self.__str__() if msg is None else msg).strip()
            if text and text != self._hx_last_text:
                self.fp.write(text + "\n")
                self.fp.flush()
                self._hx_last_line, self._hx_last_text = now, text
            return True

        def close(self):
            self._hx_closing = True
            super().close()

    _LINE_BAR.append(LineBar)
    return LineBar


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
    """Raise if ``key`` already exists in ``mapping`` and ``overwrite`` is False.

    For mappings outside an AnnData. Keys of an AnnData go through :func:`claim_key`, which also lets a re-run
    replace what histoexp itself wrote.
    """
    if key in mapping and not overwrite:
        raise KeyError(
            f"{where}[{key!r}] already exists. Pass `overwrite=True` to replace it, or choose another `{arg}`."
        )


# --------------------------------------------------------------------------------------------------------------
# Keys histoexp wrote: a re-run replaces them (as scanpy does); anything else needs overwrite=True
# --------------------------------------------------------------------------------------------------------------

#: ``uns['histoexp'][WRITTEN][attr][key] = {'by': function, 'fingerprint': content hash}`` for every key histoexp wrote
WRITTEN = "written"
#: the AnnData attributes :func:`claim_key` manages; ``'histoexp'`` is histoexp's own records in ``uns['histoexp']``
_ATTRS = ("obs", "obsm", "varm", "uns", "histoexp")


def _where(attr: str, key: str) -> str:
    return f"adata.uns['histoexp'][{key!r}]" if attr == "histoexp" else f"adata.{attr}[{key!r}]"


def _container(adata: AnnData, attr: str):
    if attr not in _ATTRS:
        raise ValueError(f"attr must be one of {_ATTRS}, got {attr!r}.")
    if attr == "histoexp":
        hist = adata.uns.get("histoexp")
        return hist if isinstance(hist, Mapping) else {}
    return adata.obs.columns if attr == "obs" else getattr(adata, attr)


def _canonical(obj: Any) -> Any:
    """Return a JSON-able form of an ``uns`` record that survives ``write_h5ad`` / ``read_h5ad`` unchanged.

    h5ad turns lists into arrays (ints and floats into one dtype), tuples into lists and Python scalars into
    numpy scalars: numbers become floats, arrays lists, mappings sorted dicts.
    """
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return _canonical(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, float, np.integer, np.floating)):
        return float(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def fingerprint(value: Any) -> str | None:
    """Return a content hash of an AnnData value (array, column, data frame, sparse matrix or ``uns`` record).

    Equal for equal contents, whatever the memory layout, and after an h5ad round trip; ``None`` for a value it
    cannot hash (such a key is never taken for histoexp's).
    """
    import scipy.sparse as sp

    h = hashlib.blake2b(digest_size=16)
    if isinstance(value, (pd.Series, pd.Index)):
        series = pd.Series(value)
        h.update(f"series{series.dtype}".encode())
        h.update(pd.util.hash_pandas_object(series, index=False).to_numpy().tobytes())
    elif isinstance(value, pd.DataFrame):
        h.update(b"frame" + json.dumps([str(c) for c in value.columns]).encode())
        h.update(pd.util.hash_pandas_object(value, index=False).to_numpy().tobytes())
    elif sp.issparse(value):
        m = sp.csr_matrix(value, copy=True)  # sorting the copy's indices leaves the user's matrix as it was
        m.sort_indices()
        h.update(f"csr{m.shape}{m.dtype}".encode())
        for part in (m.data, m.indices, m.indptr.astype(np.int64)):
            h.update(np.ascontiguousarray(part).tobytes())
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            return None
        h.update(f"array{value.shape}{value.dtype.str}".encode())
        rows = value.reshape(len(value), -1) if value.ndim else value.reshape(1, 1)
        step = max(1, (64 << 20) // max(1, rows.itemsize * rows.shape[1]))  # blocks of ~64 MB: no full copy
        for start in range(0, len(rows), step):
            h.update(np.ascontiguousarray(rows[start : start + step]).tobytes())
    elif isinstance(value, Mapping):
        h.update(b"record" + json.dumps(_canonical(value), sort_keys=True).encode())
    else:
        return None
    return h.hexdigest()


def _value(adata: AnnData, attr: str, key: str) -> Any:
    return adata.obs[key] if attr == "obs" else _container(adata, attr)[key]


def _ledger(adata: AnnData, attr: str) -> Mapping:
    hist = adata.uns.get("histoexp")
    written = hist.get(WRITTEN) if isinstance(hist, Mapping) else None
    entries = written.get(attr) if isinstance(written, Mapping) else None
    return entries if isinstance(entries, Mapping) else {}


def written_by(adata: AnnData, attr: str, key: str) -> str | None:
    """Return the histoexp function that wrote ``adata.<attr>[key]`` if it still holds that (else ``None``)."""
    entry = _ledger(adata, attr).get(key)
    if not isinstance(entry, Mapping) or key not in _container(adata, attr):
        return None
    fp = fingerprint(_value(adata, attr, key))
    return str(entry.get("by", "histoexp")) if fp is not None and fp == entry.get("fingerprint") else None


def claim_keys(
    adata: AnnData, keys: Iterable[tuple[str, str]], *, overwrite: bool, arg: str = "key_added"
) -> list[tuple[str, str]]:
    """Check that a histoexp function may write the ``(attr, key)`` pairs of ``adata``; return those it replaces.

    A key is free when absent. An existing key is replaced when ``overwrite=True``, or when histoexp wrote it and
    it still holds what histoexp wrote (:func:`mark_written` recorded its fingerprint): re-running a notebook cell
    replaces the function's own results, as scanpy does, with a message at info level. A key the user made, or
    one changed since histoexp wrote it (edited, subset, concatenated), raises a ``KeyError`` naming the remedy;
    every key is checked before anything is reported, so a refusal leaves nothing half-claimed.

    Parameters
    ----------
    adata
        The object written to.
    keys
        ``(attr, key)`` pairs; ``attr`` is ``'obs'`` (a column), ``'obsm'``, ``'varm'``, ``'uns'`` or
        ``'histoexp'`` (a record in ``uns['histoexp']``).
    overwrite
        Replace whatever is there.
    arg
        The argument naming the keys, for the message.
    """
    replaced = []
    for attr, key in keys:
        if key not in _container(adata, attr):
            continue
        by = None if overwrite else written_by(adata, attr, key)
        if not overwrite and by is None:
            why = (
                "has changed since histoexp wrote it (edited, subset or concatenated)"
                if key in _ledger(adata, attr)
                else "was not written by histoexp"
            )
            raise KeyError(
                f"{_where(attr, key)} already exists and {why}; histoexp replaces only its own results. Pass "
                f"`overwrite=True` to replace it, or choose another `{arg}`."
            )
        replaced.append((attr, key, by))
    for attr, key, by in replaced:  # said once every key is known to be free
        how = f"written by an earlier {by} call" if by is not None else "overwrite=True"
        logger.info("Replacing %s (%s).", _where(attr, key), how)
    return [(attr, key) for attr, key, _ in replaced]


def claim_key(adata: AnnData, attr: str, key: str, *, overwrite: bool, arg: str = "key_added") -> bool:
    """:func:`claim_keys` for one key; return whether it replaces a value."""
    return bool(claim_keys(adata, [(attr, key)], overwrite=overwrite, arg=arg))


def mark_written(adata: AnnData, attr: str, key: str, *, by: str) -> None:
    """Record that histoexp's ``by`` wrote ``adata.<attr>[key]`` (its fingerprint), so a re-run may replace it."""
    fp = fingerprint(_value(adata, attr, key))
    hist = adata.uns.setdefault("histoexp", {})
    entries = hist.setdefault(WRITTEN, {}).setdefault(attr, {})
    if fp is None:
        entries.pop(key, None)
    else:
        entries[key] = {"by": by, "fingerprint": fp}


def forget_written(adata: AnnData, attr: str, key: str) -> None:
    """Drop the record of ``adata.<attr>[key]`` (histoexp removed the key)."""
    entries = _ledger(adata, attr)
    if key in entries:
        del entries[key]


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


# --------------------------------------------------------------------------------------------------------------
# Which layer holds the predictions
# --------------------------------------------------------------------------------------------------------------

#: the layer of :func:`histoexp.tl.impute`'s output holding the query's own measurement
MEASURED_LAYER = "measured"


def prediction_key(adata: AnnData, layer: str | None = None, *, exclude: Iterable[str] = (), arg: str = "layer") -> str:
    """Return the layer holding the predictions of ``adata`` (the one way ``evaluate`` and the plots resolve it).

    ``layer`` given: that layer (it must exist and must not be the measurement). ``None``: the only layer other
    than ``'measured'``, the interval bounds ``'<key>_lower'`` / ``'<key>_upper'`` of another layer (and
    ``exclude``), as in the output of :func:`histoexp.tl.impute`, whatever the model
    (``'bleep'``, ``'ridge'``, ``'nh2st'``, ...). None or several raise an error that lists the layers and says
    what to pass: several layers are never guessed between.
    """
    found = list(adata.layers)
    if layer is not None:
        if layer == MEASURED_LAYER:
            raise ValueError(f"`{arg}='measured'` is the measurement, not a prediction; pass the prediction layer.")
        if layer not in adata.layers:
            raise KeyError(
                f"`{arg}={layer!r}` is not in adata.layers (found {found}): pass the layer hx.tl.impute wrote "
                "(its `key_added`; by default the model's method, e.g. 'bleep' or 'ridge')."
            )
        return layer
    skip = {MEASURED_LAYER, *exclude}
    # a prediction's interval bounds (impute's `<key>_lower` / `<key>_upper`) are not predictions
    bounds = {f"{k}_{side}" for k in found for side in ("lower", "upper")}
    candidates = [k for k in found if k not in skip and k not in bounds]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise KeyError(
            f"adata holds no prediction layer (layers: {found}): pass the output of hx.tl.impute (it holds "
            f"layers[key_added]), or `{arg}=` naming the layer with the predictions."
        )
    raise ValueError(
        f"Pass `{arg}=` to choose the predictions: adata holds several layers besides 'measured' {candidates} "
        f"(e.g. {arg}={candidates[0]!r})."
    )
