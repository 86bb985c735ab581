"""Progress output: one bar per user-visible step; plain lines (no carriage returns) when stderr is not a terminal."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

import histoexp as hx
from histoexp import _utils


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def ensemble():
    """A three-member mclSTExp on two synthetic sections (a few epochs), and a third section to predict."""
    ad = hx.datasets.synthetic(n_sections=3, random_state=0)
    ad.obsm["X_feat"] = np.random.default_rng(0).normal(size=(ad.n_obs, 8)).astype(np.float32)
    lib = ad.obs["library_id"].astype(str).to_numpy()
    train, query = ad[lib != "S2"].copy(), ad[lib == "S2"].copy()
    model = hx.tl.fit_mclstexp(
        train, genes="all", use_rep="X_feat", epochs=2, batch_size=32, n_heads=2, head_dim=8, n_ensemble=3
    )
    return train, query, model


@pytest.fixture
def stderr(monkeypatch):
    """Progress on, bars from the first second (delay 0); returns a function installing a captured stderr."""
    monkeypatch.setattr(hx.settings, "progress", True)
    monkeypatch.setattr(_utils, "PROGRESS_DELAY", 0.0)

    def install(stream):
        monkeypatch.setattr(sys, "stderr", stream)
        return stream

    return install


def test_ensemble_impute_writes_plain_lines_to_a_log(ensemble, stderr, monkeypatch):
    train, query, model = ensemble
    monkeypatch.setattr(_utils, "LINE_INTERVAL", 0.0)  # a line at every update: the most a log can get
    log = stderr(io.StringIO())
    hx.tl.impute(query, model, reference=train)
    out = log.getvalue()
    lines = out.splitlines()
    assert "\r" not in out and "\x1b" not in out  # no carriage returns, no cursor moves
    assert len(lines) > 10 and all(line.startswith("impute (mclstexp): ") for line in lines)  # one bar, 3 members
    assert "members 1/3" in out and "reference embeddings" in out  # the inner loops show inside it
    assert lines[-1].startswith("impute (mclstexp): 100%")


def test_log_lines_are_spaced(ensemble, stderr, monkeypatch):
    """With the default spacing (30 s) a short call writes its first line and its last, nothing between."""
    train, query, model = ensemble
    monkeypatch.setattr(_utils, "LINE_INTERVAL", 3600.0)
    log = stderr(io.StringIO())
    hx.tl.impute(query, model, reference=train)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("impute (mclstexp):   0%") and "100%" in lines[1]


def test_ensemble_impute_draws_one_bar_in_a_terminal(ensemble, stderr):
    train, query, model = ensemble
    term = stderr(_Terminal())
    hx.tl.impute(query, model, reference=train)
    out = term.getvalue()
    frames = [f.strip() for f in out.replace("\n", "\r").split("\r") if f.strip()]
    assert out.count("\n") == 1 and out.endswith("\n")  # one bar, closed once
    assert frames and {f.split(":")[0] for f in frames} == {"impute (mclstexp)"}
    assert "100%" in frames[-1]


def test_fit_of_an_ensemble_draws_one_bar(ensemble, stderr):
    train, _, _ = ensemble
    term = stderr(_Terminal())
    hx.tl.fit_mclstexp(
        train.copy(), genes="all", use_rep="X_feat", epochs=2, batch_size=32, n_heads=2, head_dim=8, n_ensemble=3
    )
    out = term.getvalue()
    frames = [f.strip() for f in out.replace("\n", "\r").split("\r") if f.strip()]
    assert out.count("\n") == 1 and {f.split(":")[0] for f in frames} == {"fit_mclstexp"}
    assert any("members 2/3" in f for f in frames)


def test_progress_off_prints_nothing(ensemble, stderr, monkeypatch):
    train, query, model = ensemble
    monkeypatch.setattr(hx.settings, "progress", False)
    log = stderr(io.StringIO())
    hx.tl.impute(query, model, reference=train)
    assert log.getvalue() == ""


def test_plain_loop_outside_a_step(stderr, monkeypatch):
    """A loop outside any step is its own bar; in a log it writes whole lines, the last one at 100%."""
    monkeypatch.setattr(_utils, "LINE_INTERVAL", 3600.0)
    log = stderr(io.StringIO())
    assert sum(_utils.progress(range(50), desc="loop")) == sum(range(50))
    with _utils.progress(total=10, desc="manual") as bar:
        for _ in range(10):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(":")[0] for line in lines] == ["loop", "loop", "manual", "manual"]
    assert "50/50" in lines[1] and "10/10" in lines[3]
