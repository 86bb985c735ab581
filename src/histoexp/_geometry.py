"""Comparing the image geometry and encoder of two records (training vs query), with a tolerance (no torch here).

An embedding record (``uns['histoexp']['embeddings'][rep]``, kept in a model's ``config['embedding']``) says how
the features were made: the encoder and its weights, the patch geometry (side in µm, µm per output pixel, side in
pixels) and, for neighbourhood windows, the grid and the window side in µm. Physical sizes are computed (a spot
diameter in full-resolution pixels times the slide's µm/px), so two sections of one protocol give 100.0 and
99.99999999999999 µm: they are compared with a relative tolerance, never as text.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["GEOMETRY_RTOL", "geometry_differences", "record_differences", "same_size"]

#: relative tolerance on physical sizes (µm, µm/px, px): floating-point noise and sub-percent differences of
#: scanners are the same geometry; a patch of 32 vs 64 px or 100 vs 200 µm is not
GEOMETRY_RTOL = 0.01
#: physical fields of a record (compared with :data:`GEOMETRY_RTOL`)
GEOMETRY_FIELDS = ("size_um", "mpp", "patch_px", "window_um")
#: fields that name what made the features (compared exactly)
IDENTITY_FIELDS = ("encoder", "weights", "random_init", "grid")


def same_size(a: Any, b: Any, *, rtol: float = GEOMETRY_RTOL) -> bool:
    """Tell whether two physical sizes are the same up to ``rtol`` (relative); non-numbers compare as text."""
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)
    if not (math.isfinite(x) and math.isfinite(y)):
        return x == y
    return math.isclose(x, y, rel_tol=rtol, abs_tol=0.0)


def geometry_differences(found: dict, expected: dict, fields=GEOMETRY_FIELDS) -> list[tuple[str, Any, Any]]:
    """``(field, found, expected)`` for every physical field both records hold and that differ beyond the tolerance."""
    return [
        (f, found[f], expected[f])
        for f in fields
        if found.get(f) is not None and expected.get(f) is not None and not same_size(found[f], expected[f])
    ]


def _same_identity(field: str, a: Any, b: Any) -> bool:
    if field == "grid":
        try:
            return int(a) == int(b)
        except (TypeError, ValueError):
            pass
    return str(a) == str(b)


def record_differences(found: dict | None, expected: dict | None) -> list[tuple[str, Any, Any]]:
    """Differences between two embedding records: identity fields exactly, physical sizes with a tolerance.

    Returns ``(field, found, expected)`` for each field both records hold and that differs; ``[]`` when either
    record is missing (features a user computed without histoexp carry none).
    """
    if not found or not expected:
        return []
    out = [
        (f, found[f], expected[f])
        for f in IDENTITY_FIELDS
        if f in found and f in expected and not _same_identity(f, found[f], expected[f])
    ]
    return out + geometry_differences(found, expected)


def describe(diffs: list[tuple[str, Any, Any]], other: str = "model") -> str:
    """``'patch_px=32 (model: 64), size_um=200.0 (model: 100.0)'``."""
    return ", ".join(f"{f}={_fmt(a)} ({other}: {_fmt(b)})" for f, a, b in diffs)


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else repr(v)


def check_query_record(rep: str, found: dict | None, expected: dict | None) -> None:
    """Raise a ``ValueError`` naming the remedy when ``query.obsm[rep]``'s record differs from the model's.

    ``found``: the query's embedding record of ``rep``; ``expected``: the one the model was trained on.
    """
    diffs = record_differences(found, expected)
    if not diffs:
        return
    geometry = [d for d in diffs if d[0] in GEOMETRY_FIELDS]
    what = "from patches of another geometry" if geometry else "with another encoder"
    fix = "re-embed the query: hx.tl.embed_query(query, model, overwrite=True)"
    if geometry:
        size, px = expected.get("size_um"), expected.get("patch_px")
        fix = (
            f"extract the query's patches at the model's geometry, hx.pp.extract_patches(query, size_um={_fmt(size)}, "
            f"patch_px={_fmt(px)}, overwrite=True) (model.image_spec() gives it), then {fix}"
        )
    raise ValueError(
        f"query.obsm[{rep!r}] was computed {what} than the model's training features: {describe(diffs)}. "
        f"Predicting from it would be silently wrong: {fix}."
    )
