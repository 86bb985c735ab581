"""Shared fixtures: the real her2st data (required in CI) and small synthetic sections."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

_REPO = Path(__file__).resolve().parents[1]
_DATA_DIR = os.environ.get("HISTOEXP_DATA_DIR")  # as histoexp reads it: a folder holding her2st/ or data/
_HER2ST_CANDIDATES = [
    os.environ.get("HISTOEXP_HER2ST_DIR"),
    Path(_DATA_DIR) / "her2st" if _DATA_DIR else None,
    _DATA_DIR,
    _REPO.parent / "shared" / "data" / "her2st",
    _REPO / "shared" / "data" / "her2st",
]


def _find_her2st() -> Path | None:
    for cand in _HER2ST_CANDIDATES:
        if cand and (Path(cand) / "data" / "ST-cnts").is_dir():
            return Path(cand)
    return None


@pytest.fixture(autouse=True)
def _quiet_settings():
    import histoexp as hx

    old = (hx.settings.progress, hx.settings.device, hx.settings.verbosity)
    hx.settings.progress = False
    hx.settings.device = "cpu"
    yield
    hx.settings.progress, hx.settings.device, hx.settings.verbosity = old


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """Root of the real her2st copy: ``$HISTOEXP_HER2ST_DIR``, ``$HISTOEXP_DATA_DIR`` (holding ``her2st/data`` or
    ``data/``), or ``../shared/data/her2st``.

    The data is part of the test contract: CI must find it, so its absence fails instead of skipping.
    """
    path = _find_her2st()
    if path is None:
        pytest.fail(
            "Real her2st data not found: expected ../shared/data/her2st next to the repository, "
            "HISTOEXP_HER2ST_DIR pointing to a copy (the folder holding data/ST-cnts), or HISTOEXP_DATA_DIR "
            "holding her2st/data/ST-cnts or data/ST-cnts."
        )
    return path


@pytest.fixture(scope="session")
def her2st_c2(her2st_dir):
    """Section C2 of her2st, loaded once per session (treat as read-only; copy before mutating)."""
    import histoexp as hx

    return hx.datasets.her2st("C2", data_dir=her2st_dir)


@pytest.fixture
def synth():
    """Two small synthetic sections (fresh object per test)."""
    import histoexp as hx

    return hx.datasets.synthetic(n_sections=2, random_state=0)
