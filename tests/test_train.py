"""Tests of the shared training loop (histoexp.train)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from histoexp.train import fit, split_by_library, torch_threads


def _data(n=120, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fit(model, **kw):
    x, y = _data()
    kw = {"loss_fn": _mse, "epochs": 4, "batch_size": 32, "lr": 1e-2, "device": "cpu", "progress": False} | kw
    return fit(model, (x[:90], y[:90]), (x[90:], y[90:]), **kw)


def test_split_several_sections_keeps_sections_whole():
    obs = pd.DataFrame({"lib": np.repeat(["A", "B", "C", "D", "E"], [10, 20, 30, 40, 50])})
    tr, va = split_by_library(obs, "lib", val_fraction=0.2, random_state=0)
    assert len(tr) + len(va) == len(obs) and not set(tr) & set(va)
    val_libs = set(obs["lib"].iloc[va])
    assert len(val_libs) == 1
    assert not val_libs & set(obs["lib"].iloc[tr])  # no section on both sides
    # reproducible, and another seed may pick another section
    assert np.array_equal(va, split_by_library(obs, "lib", val_fraction=0.2, random_state=0)[1])
    picks = {tuple(split_by_library(obs, "lib", val_fraction=0.2, random_state=s)[1][:1]) for s in range(10)}
    assert len(picks) > 1
    # two sections: one each side
    obs2 = obs[obs["lib"].isin(["A", "B"])]
    tr2, va2 = split_by_library(obs2, "lib", val_fraction=0.5)
    assert len(set(obs2["lib"].iloc[va2])) == 1 and len(set(obs2["lib"].iloc[tr2])) == 1


def test_split_single_section_is_a_spatial_stripe():
    yy, xx = np.mgrid[0:10, 0:30]
    coords = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    obs = pd.DataFrame(index=[str(i) for i in range(len(coords))])
    tr, va = split_by_library(obs, None, val_fraction=0.2, random_state=3, coords=coords)
    assert abs(len(va) / len(obs) - 0.2) < 0.02
    # a contiguous band along x (the longer axis): val x-range does not interleave with train
    vx, tx = coords[va, 0], coords[tr, 0]
    assert not ((tx > vx.min()) & (tx < vx.max())).any()
    assert np.ptp(coords[va, 1]) == 9  # spans the full height
    # array coordinates in obs are used when coords is None
    obs2 = pd.DataFrame({"array_col": coords[:, 0], "array_row": coords[:, 1]})
    assert np.array_equal(split_by_library(obs2, None, val_fraction=0.2, random_state=3)[1], va)
    with pytest.raises(ValueError, match="coords"):
        split_by_library(obs, None, val_fraction=0.2)
    tr0, va0 = split_by_library(obs, None, val_fraction=0.0)
    assert len(va0) == 0 and len(tr0) == len(obs)


def test_fit_learns_and_is_reproducible():
    m1, m2, m3 = _model(), _model(), _model()
    h1 = _fit(m1, patience=None)
    h2 = _fit(m2, patience=None)
    h3 = _fit(m3, patience=None, random_state=1)
    assert h1["train_loss"][-1] < h1["train_loss"][0]
    assert h1 == h2
    w1, w2 = _weights(m1), _weights(m2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert h3["train_loss"] != h1["train_loss"]  # the seed drives shuffling and dropout
    # the caller's global RNG is untouched by training
    m4 = _model()
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    _fit(m4, epochs=1)
    assert torch.equal(torch.rand(1), a)


def test_resume_equals_uninterrupted(tmp_path):
    full = _model()
    h_full = _fit(full, patience=None, checkpoint_dir=tmp_path / "full")
    part = _model()
    h_part = _fit(part, patience=None, epochs=2, checkpoint_dir=tmp_path / "run")
    assert h_part["epochs_run"] == 2
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["epoch"] == 1
    # "interrupt": a fresh process builds a fresh model and resumes from the checkpoint folder
    resumed = _model(seed=99)
    h_res = _fit(resumed, patience=None, epochs=4, checkpoint_dir=tmp_path / "run", resume=True)
    assert h_res["epochs_run"] == 4
    assert h_res["train_loss"] == h_full["train_loss"]
    assert h_res["val_loss"] == h_full["val_loss"]
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    # the optimizer state is tensors only: it loads with weights_only=True
    opt = torch.load(tmp_path / "run" / "optimizer.pt", weights_only=True)
    assert "state" in opt["optimizer"]
    with pytest.raises(ValueError, match="hyper-parameters differ"):
        _fit(_model(), epochs=4, lr=0.5, checkpoint_dir=tmp_path / "run", resume=True)


def test_early_stopping_restores_best_weights(tmp_path):
    x, y = _data()
    model = _model()
    # validation targets are the negated truth: the better the fit, the worse the validation loss
    hist = fit(
        model,
        (x[:90], y[:90]),
        (x[90:], -y[90:] * 3),
        loss_fn=_mse,
        epochs=40,
        batch_size=32,
        lr=1e-2,
        patience=2,
        device="cpu",
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert hist["stopped_early"] and hist["epochs_run"] < 40
    assert hist["epochs_run"] == hist["best_epoch"] + 3
    assert hist["best_val_loss"] == min(hist["val_loss"])
    from safetensors.torch import load_file

    best = load_file(str(tmp_path / "best.safetensors"))
    w = _weights(model)
    assert all(torch.equal(best[k], w[k]) for k in w)
    last = load_file(str(tmp_path / "last.safetensors"))
    assert not all(torch.equal(last[k], w[k]) for k in w)


def test_fit_errors():
    x, y = _data()
    with pytest.raises(ValueError, match="optimizer"):
        fit(_model(), (x, y), loss_fn=_mse, optimizer="lbfgs", device="cpu")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        fit(_model(), (x, y), loss_fn=_mse, resume=True, device="cpu")
    with pytest.raises(FloatingPointError):
        fit(_model(), (x, y * np.inf), loss_fn=_mse, device="cpu", epochs=1)


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_early_stopped_progress_bar_reports_the_stop(monkeypatch):
    import io

    from tqdm.std import tqdm

    import histoexp.train as train_mod

    out, bars = io.StringIO(), []

    def recording_progress(iterable=None, **kw):
        kw.update(file=out, delay=0, disable=False, mininterval=0)
        bars.append(tqdm(iterable, **kw))
        return bars[-1]

    monkeypatch.setattr(train_mod, "_progress", recording_progress)
    x, y = _data()
    hist = fit(
        _model(),
        (x[:90], y[:90]),
        (x[90:], -y[90:] * 3),  # validation gets worse as training improves: stops early
        loss_fn=_mse,
        epochs=40,
        batch_size=32,
        lr=1e-2,
        patience=2,
        device="cpu",
        desc="toy",
    )
    assert hist["stopped_early"] and hist["epochs_run"] < 40
    (bar,) = bars
    n = hist["epochs_run"]
    assert bar.n == bar.total == n  # ends full at the epochs run, not frozen at n/40
    final = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert f"toy: stopped early at epoch {n}/40 (best {hist['best_epoch'] + 1})" in final
    assert f"{n}/{n}" in final
