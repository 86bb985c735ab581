"""Helpers shared by the plots: scanpy's show/save/return_fig contract, colour limits, what is measured."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from anndata import AnnData

from .._settings import logger
from .._utils import prediction_key

#: What the colour of an expression map means (the prediction contract of :func:`histoexp.tl.impute`).
EXPRESSION_LABEL = "log1p normalised counts"

VBound = float | str | Callable[[np.ndarray], float] | None


# ----------------------------------------------------------------------------------------------
# show / save / return_fig
# ----------------------------------------------------------------------------------------------
def savefig(fig, path: str | os.PathLike, *, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file in the same folder, then :func:`os.replace`).

    The format comes from the suffix (``rcParams['savefig.format']`` is appended when there is none). An
    existing file is replaced, as scanpy does with its figures; a reader never sees a half-written file.
    """
    import matplotlib as mpl

    path = Path(path).expanduser()
    fmt = path.suffix[1:].lower()
    if not fmt:
        fmt = str(mpl.rcParams["savefig.format"])
        path = path.with_name(f"{path.name}.{fmt}")
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"`save={str(path)!r}`: unknown figure format {fmt!r}; expected one of {sorted(supported)}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"`save={str(path)!r}`: the folder {str(path.parent)!r} does not exist.")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    kw = {} if dpi is None else {"dpi": dpi}
    try:
        with open(tmp, "xb") as fh:  # 'x': created with the user's umask, never an existing file
            fig.savefig(fh, format=fmt, bbox_inches="tight", **kw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("Saved figure to %s", path)
    return path


def finish(fig, *, show: bool | None, save, return_fig: bool, own: bool = True, dpi: float | None = None):
    """End a plot the scanpy way: save (atomically), show, close; return the figure only if asked.

    ``show=None`` shows the figure unless it is returned (``return_fig``), saved (``save``) or drawn into the
    caller's axes (``own=False``). A figure this function does not return and that the plot created is
    closed, so a notebook cell displays it exactly once (by ``plt.show``) and a script leaks no figures.
    """
    import matplotlib.pyplot as plt

    if save is not None:
        savefig(fig, save, dpi=dpi)
    if show is None:
        show = own and not return_fig and save is None
    if show:
        plt.show()
    if return_fig:
        return fig
    if own:
        plt.close(fig)
    return None


def new_or_given_ax(ax, figsize: tuple[float, float]):
    """Return ``(fig, ax, own)``: a new figure and axes when ``ax`` is None, else the caller's."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        return fig, ax, True
    return ax.figure, ax, False


# ----------------------------------------------------------------------------------------------
# colour limits
# ----------------------------------------------------------------------------------------------
_PCT = re.compile(r"^p(\d+(?:\.\d*)?)$")


def bound(v: VBound, values: np.ndarray, name: str) -> float:
    """Resolve ``vmin``/``vmax`` like scanpy: a number, ``'pN'`` (the N-th percentile), a callable or None."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if v is None:
        if not finite.size:
            return 0.0 if name == "vmin" else 1.0
        return float(finite.min() if name == "vmin" else finite.max())
    if isinstance(v, str):
        m = _PCT.match(v.strip())
        if m is None or not 0 <= float(m.group(1)) <= 100:
            raise ValueError(f"`{name}={v!r}`: a percentile string must look like 'p99' or 'p1.5' (0 to 100).")
        return float(np.percentile(finite, float(m.group(1)))) if finite.size else (0.0 if name == "vmin" else 1.0)
    if callable(v):
        return float(v(finite))
    if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        return float(v)
    raise ValueError(f"`{name}={v!r}` must be a number, a percentile string such as 'p99', a callable or None.")


def clim(values: np.ndarray, vmin: VBound, vmax: VBound) -> tuple[float, float]:
    lo, hi = bound(vmin, values, "vmin"), bound(vmax, values, "vmax")
    if not hi > lo:
        hi = lo + 1e-6
    return lo, hi


# ----------------------------------------------------------------------------------------------
# what is a prediction and what is a measurement
# ----------------------------------------------------------------------------------------------
def x_role(adata: AnnData) -> str | None:
    """``uns['histoexp']['X']`` (e.g. ``'prediction:bleep'``) or None."""
    h = adata.uns.get("histoexp", {})
    v = h.get("X") if isinstance(h, Mapping) else None
    return None if v is None else str(v)


def x_is_prediction(adata: AnnData) -> bool:
    role = x_role(adata)
    return role is not None and role.startswith("prediction:")


def x_has_measurement(adata: AnnData) -> bool:
    """``X`` holds counts: not None, not empty, not all zero, and not marked as a prediction."""
    X = adata.X
    if X is None or adata.n_vars == 0 or adata.n_obs == 0 or x_is_prediction(adata):
        return False
    if hasattr(X, "nnz"):
        data = np.asarray(X.data)
        return bool(np.any((data != 0) & np.isfinite(data)))
    for start in range(0, adata.n_obs, 4096):  # row blocks: no full-size temporary for a large dense X
        block = np.asarray(X[start : start + 4096])
        if np.any((block != 0) & np.isfinite(block)):
            return True
    return False


def resolve_prediction(adata: AnnData, layer: str | None) -> tuple[str, str]:
    """Return ``(source, key)``: where the predictions are (a layer name or ``'X'``) and the method's key.

    ``layer=None`` picks the only layer that is not ``'measured'``, else ``X`` when
    ``uns['histoexp']['X']`` says it holds ``'prediction:<key>'``.
    """
    others = [k for k in adata.layers if k != "measured"]
    if layer is None:
        if not others and x_is_prediction(adata):
            return "X", x_role(adata).split(":", 1)[1]
        key = prediction_key(adata)
        return key, key
    if layer == "X":
        if not x_is_prediction(adata):
            raise ValueError(
                "`layer='X'`: adata.X is not marked as a prediction (uns['histoexp']['X'] = "
                f"{x_role(adata)!r}, expected 'prediction:<key>'); pass the prediction layer instead."
            )
        return "X", x_role(adata).split(":", 1)[1]
    key = prediction_key(adata, layer)
    return key, key


def resolve_compare(adata: AnnData, compare: str | None) -> str | None:
    """Return the measurement to compare with: ``'measured'``/another layer, ``'X'`` or None.

    ``'auto'``: ``layers['measured']`` if present, else ``X`` when it holds counts (never when
    ``uns['histoexp']['X']`` marks it as a prediction), else None.
    """
    if compare is None:
        return None
    if compare == "auto":
        if "measured" in adata.layers:
            return "measured"
        if x_has_measurement(adata):
            return "X"
        logger.debug("no measurement (layers['measured'] or counts in X): showing the prediction only.")
        return None
    if compare == "X":
        if x_is_prediction(adata):
            raise ValueError(
                f"`compare='X'`: adata.X holds predictions (uns['histoexp']['X'] = {x_role(adata)!r}), "
                "not a measurement; use compare='auto' or the 'measured' layer."
            )
        if not x_has_measurement(adata):
            raise ValueError("`compare='X'`: adata.X holds no measurement (None, no genes or all zero).")
        return "X"
    if compare not in adata.layers:
        raise KeyError(f"`compare={compare!r}` is not in adata.layers (found {list(adata.layers)}) nor 'X'/'auto'.")
    return compare


def compare_label(compare: str) -> str:
    return "measured" if compare in ("measured", "X") else compare


def matrix(adata: AnnData, source: str, genes: Sequence[str], *, normalize: str = "log1p", measured=False):
    """Dense float64 values of ``genes`` from a layer or ``X`` (counts in ``X`` are normalised with ``normalize``)."""
    if source == "X" and measured:
        from ..pp import expression_matrix

        return expression_matrix(adata, list(genes), normalize=normalize).astype(np.float64)
    idx = adata.var_names.get_indexer(list(genes))
    M = adata.X if source == "X" else adata.layers[source]
    M = M[:, idx]
    return np.asarray(M.toarray() if hasattr(M, "toarray") else M, dtype=np.float64)


def check_genes(adata: AnnData, genes: Sequence[str]) -> None:
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"{len(missing)} of {len(genes)} genes are not in adata.var_names (e.g. {missing[:5]}).")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the spots where both are finite (NaN when fewer than 3 or one side is constant)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def fmt_r(r: float) -> str:
    return f"r = {r:.2f}" if np.isfinite(r) else "r undefined (constant)"
