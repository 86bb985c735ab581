"""Data safety: histoexp replaces only what it created, asks before overwriting, and writes atomically.

Every test hashes the user's files before and after: a refused call must leave them byte-identical.
The fault-injection tests SIGKILL real processes (forked from one helper subprocess, so torch is
imported once) in the middle of checkpoint, h5ad and model writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _helpers import snapshot

import histoexp as hx
from histoexp import _fs
from histoexp.cli import main

SRC = str(Path(hx.__file__).resolve().parents[1])


def user_folder(path: Path) -> Path:
    """A folder of the user's, with a file and a subfolder (what must never be deleted)."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "data.bin").write_bytes(os.urandom(256))
    return path


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name))


# ----------------------------------------------------------------------------------------------- _fs
def test_atomic_write_refuses_and_cleans_up(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="`path`.*overwrite"):
        _fs.atomic_write(target, lambda p: Path(p).write_text("new"))

    def interrupted(p):
        Path(p).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fs.atomic_write(target, interrupted, overwrite=True)
    assert snapshot(tmp_path) == before  # old file, and no temporary file left
    folder = user_folder(tmp_path / "folder")
    with pytest.raises(FileExistsError, match="folder"):
        _fs.atomic_write(folder, lambda p: Path(p).write_text("x"), overwrite=True)
    assert (folder / "notes.txt").read_text() == "my notes"
    _fs.atomic_write(target, lambda p: Path(p).write_text("new"), overwrite=True)
    assert target.read_text() == "new" and not hidden_leftovers(tmp_path)


def test_atomic_dir_replaces_only_its_own_folders(tmp_path):
    mine = tmp_path / "mine"
    with _fs.atomic_dir(mine, kind="thing") as tmp:
        (tmp / "a.txt").write_text("1")
    assert _fs.is_ours(mine, "thing") and not _fs.is_ours(mine, "model")
    with _fs.atomic_dir(mine, kind="thing", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("2")
    assert (mine / "a.txt").read_text() == "2"
    # an exception inside the block leaves the folder as it was
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt), _fs.atomic_dir(mine, kind="thing", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("3")
        raise KeyboardInterrupt
    assert snapshot(tmp_path) == before
    # a user's folder, and one of ours holding a user's file, are never replaced
    theirs = user_folder(tmp_path / "theirs")
    (mine / "added.txt").write_text("user file")
    before = snapshot(tmp_path)
    for target in (theirs, mine):
        with (
            pytest.raises(FileExistsError, match="refusing to replace"),
            _fs.atomic_dir(target, kind="thing", overwrite=True),
        ):
            pass
    assert snapshot(tmp_path) == before


def test_write_h5ad(tmp_path):
    a = hx.datasets.synthetic(n_sections=1, n_side=6)
    path = tmp_path / "a.h5ad"
    hx.io.write_h5ad(a, path)
    before = snapshot(path)
    with pytest.raises(FileExistsError, match="overwrite"):
        hx.io.write_h5ad(a[:3].copy(), path)
    assert snapshot(path) == before
    hx.io.write_h5ad(a[:3].copy(), path, overwrite=True)
    import anndata as ad

    assert ad.read_h5ad(path).n_obs == 3 and not hidden_leftovers(tmp_path)
    assert "write_h5ad" in hx.io.__all__


# ----------------------------------------------------------------------------------------------- patches
@pytest.fixture
def sy():
    return hx.datasets.synthetic(n_sections=2, n_side=6)


def test_zarr_store_never_replaces_a_users_path(sy, tmp_path):
    folder = user_folder(tmp_path / "mine.zarr")
    file = tmp_path / "file.zarr"
    file.write_bytes(b"precious")
    before = snapshot(tmp_path)
    for p in (folder, file):
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match="`path`"):
                hx.pp.extract_patches(sy, mpp=4.0, store="zarr", path=p, overwrite=overwrite)
    assert snapshot(tmp_path) == before
    assert "patches" not in sy.uns.get("histoexp", {})
    # a store histoexp created is replaced with overwrite=True, and only while it holds nothing else
    ours = tmp_path / "ours.zarr"
    hx.pp.extract_patches(sy, mpp=4.0, store="zarr", path=ours)
    assert _fs.is_ours(ours, "patches")
    hx.pp.extract_patches(sy, mpp=2.0, store="zarr", path=ours, overwrite=True)
    assert hx.pp.get_patches(sy)[0].shape == (32, 32, 3)
    (ours / "my_annotations.csv").write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="did not write"):
        hx.pp.extract_patches(sy, mpp=4.0, store="zarr", path=ours, overwrite=True)
    assert snapshot(tmp_path) == before


def test_zarr_copy_refuses_the_originals_store(sy, tmp_path):
    store = tmp_path / "p.zarr"
    hx.pp.extract_patches(sy, mpp=4.0, store="zarr", path=store)
    first = hx.pp.get_patches(sy).batch([0, 1])
    before = snapshot(store)
    with pytest.raises(ValueError, match="`path=.*original object"):
        hx.pp.extract_patches(sy, mpp=2.0, store="zarr", path=store, overwrite=True, copy=True)
    with pytest.raises(ValueError, match="`path=.*key 'patches'"):  # another key of the same object
        hx.pp.extract_patches(sy, mpp=2.0, store="zarr", path=store, overwrite=True, key_added="other")
    assert snapshot(store) == before
    np.testing.assert_array_equal(hx.pp.get_patches(sy).batch([0, 1]), first)
    # a copy with its own store is fine
    b = hx.pp.extract_patches(sy, mpp=2.0, store="zarr", path=tmp_path / "q.zarr", overwrite=True, copy=True)
    assert hx.pp.get_patches(b).patch_px == 32 and hx.pp.get_patches(sy).patch_px == 16


def test_interrupted_extraction_leaves_no_partial_store(sy, tmp_path, monkeypatch):
    from histoexp.image import SlideImage

    real, calls = SlideImage.read_patches, []  # one call per batch of patches (here: per section)

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the extraction, one batch written
        return real(self, *args, **kwargs)

    fresh, old = tmp_path / "fresh.zarr", tmp_path / "old.zarr"
    hx.pp.extract_patches(sy, mpp=4.0, store="zarr", path=old, key_added="old")
    before = snapshot(tmp_path)
    monkeypatch.setattr(SlideImage, "read_patches", flaky)
    with pytest.raises(KeyboardInterrupt):
        hx.pp.extract_patches(sy, mpp=4.0, store="zarr", path=fresh)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        hx.pp.extract_patches(sy, mpp=2.0, store="zarr", path=old, key_added="old", overwrite=True)
    assert snapshot(tmp_path) == before  # no store at `fresh`, the old one intact, no temporary folder
    assert hx.pp.get_patches(sy, "old").patch_px == 16 and "patches" not in sy.uns["histoexp"]


def test_absurd_patch_geometry_is_refused(sy, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"`mpp=0\.0001`"):
        hx.pp.extract_patches(sy, mpp=1e-4)
    with pytest.raises(ValueError, match="`patch_px=20000`"):
        hx.pp.extract_patches(sy, patch_px=20000)
    from histoexp.pp import _patches

    # totals beyond what the machine has: memory for store='memory', disk for store='zarr'
    monkeypatch.setattr(_patches, "_available_memory", lambda: 1000)
    with pytest.raises(ValueError, match="`mpp`.*`patch_px`.*memory"):
        hx.pp.extract_patches(sy, mpp=2.0, store="memory")
    monkeypatch.setattr(_patches, "_free_disk", lambda path: 1000)
    with pytest.raises(ValueError, match="`mpp`.*`patch_px`.*disk"):
        hx.pp.extract_patches(sy, mpp=2.0, store="zarr", path=tmp_path / "z.zarr")
    assert not (tmp_path / "z.zarr").exists() and "patches" not in sy.obsm


# ----------------------------------------------------------------------------------------------- models
def _save(path, value=0.0, **kw):
    import torch

    from histoexp.models import _io

    tensors = {"model": {"w": torch.full((4, 4), float(value))}, "reference": {"e": torch.arange(6.0)}}
    return _io.save_folder(path, config={"method": "test", "value": value}, tensors=tensors, **kw)


def test_model_save_never_replaces_a_users_folder(tmp_path):
    from histoexp.models import _io

    theirs = user_folder(tmp_path / "theirs")
    file = tmp_path / "file"
    file.write_text("x")
    model = tmp_path / "model"
    _save(model, 1)
    before = snapshot(tmp_path)
    for target in (theirs, file, model):
        with pytest.raises(FileExistsError, match="`path`"):
            _save(target, 2)  # overwrite=False by default
    for target in (theirs, file):
        with pytest.raises(FileExistsError, match="`path`"):
            _save(target, 2, overwrite=True)
    assert snapshot(tmp_path) == before
    _save(model, 2, overwrite=True)  # a histoexp model folder is replaced when asked
    assert _io.read_config(model)["value"] == 2 and not hidden_leftovers(tmp_path)
    (model / "README.md").write_text("my notes on this model")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="refusing to replace"):
        _save(model, 3, overwrite=True)
    assert snapshot(tmp_path) == before


def test_edited_or_mixed_model_folder_fails_to_load(tmp_path):
    import shutil

    from histoexp.models import _io

    a, b = _save(tmp_path / "a", 1), _save(tmp_path / "b", 2)
    assert _io.verify_folder(a)["value"] == 1
    assert float(_io.read_tensors(a)["w"][0, 0]) == 1
    shutil.copy(b / "model.safetensors", a / "model.safetensors")  # weights of another model
    with pytest.raises(ValueError, match="model.safetensors.*sha256"):
        _io.read_tensors(a)
    with pytest.raises(ValueError, match="sha256"):
        _io.verify_folder(a)
    cfg = json.loads((b / "config.json").read_text())
    cfg["value"] = 5  # an edited config
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json.*differs"):
        _io.read_config(b)
    c = _save(tmp_path / "c", 3)
    (c / "config.json").write_text("{not json")
    (c / ".histoexp.json").unlink()
    with pytest.raises(ValueError, match="config.json.*not readable JSON"):
        _io.read_config(c)


# ----------------------------------------------------------------------------------------------- training
def _train_setup():
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 1))
    return model, x, y


def _train(x, y, model=None, **kw):
    from histoexp.train import fit

    model = model if model is not None else _train_setup()[0]
    kw = {"epochs": 3, "batch_size": 16, "lr": 1e-2, "device": "cpu", "progress": False, "patience": None} | kw
    hist = fit(model, (x[:45], y[:45]), (x[45:], y[45:]), loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), **kw)
    return hist, model


def test_resume_checks_fingerprint_and_files(tmp_path):
    import shutil

    from histoexp.train import data_fingerprint

    _, x, y = _train_setup()
    fp = data_fingerprint(x, y)
    assert fp == data_fingerprint(x.clone(), y.numpy().copy())
    assert fp != data_fingerprint(x + 1e-3, y)  # other data of the same shape
    assert fp != data_fingerprint(y, x)
    _train(x, y, epochs=2, checkpoint_dir=tmp_path / "run", fingerprint=fp)
    with pytest.raises(ValueError, match="`fingerprint` differs"):
        _train(x + 1, y, checkpoint_dir=tmp_path / "run", resume=True, fingerprint=data_fingerprint(x + 1, y))
    # a fresh run over an existing checkpoint, or over files histoexp did not write, is refused
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "state.json").write_text('{"mine": 1}')
    before = snapshot(tmp_path)
    for ckpt in ("run", "theirs"):
        with pytest.raises(FileExistsError, match="`checkpoint_dir`"):
            _train(x, y, checkpoint_dir=tmp_path / ckpt, fingerprint=fp)
    with pytest.raises(ValueError, match="not a histoexp checkpoint"):
        _train(x, y, checkpoint_dir=tmp_path / "theirs", resume=True)
    assert snapshot(tmp_path) == before
    # weights of another run dropped into the checkpoint: refused, not mixed
    _train(x, y, epochs=1, checkpoint_dir=tmp_path / "other", fingerprint=fp, random_state=5)
    shutil.copy(tmp_path / "other" / "last.safetensors", tmp_path / "run" / "last.safetensors")
    with pytest.raises(ValueError, match="last.safetensors.*sha256"):
        _train(x, y, checkpoint_dir=tmp_path / "run", resume=True, fingerprint=fp)


# ----------------------------------------------------------------------------------------------- SIGKILL
#: h5ad writes and model saves killed at random moments, each
N_KILLS = 4
_KILL_SCRIPT = textwrap.dedent(
    r"""
    import json, os, random, signal, sys, time
    import numpy as np
    import torch
    torch.set_num_threads(1)  # no thread pool before fork()
    import anndata as ad
    import histoexp as hx
    from histoexp.models import _io
    sys.path.insert(0, sys.argv[2])
    from test_robustness import N_KILLS, _train, _train_setup

    root = sys.argv[1]
    results = {}

    def child(fn):
        pid = os.fork()
        if pid == 0:
            try:
                fn()
            finally:
                os._exit(0)
        return pid

    # (a) checkpoints: SIGKILL just before the k-th os.replace of the run (epoch 1 starts at k = 5:
    # state.json, then last, best, optimizer)
    _, x, y = _train_setup()
    _train(x, y, epochs=1, checkpoint_dir=f"{root}/warm")  # lazy imports done once, before the forks

    def killed_run(k):
        calls, real = [0], os.replace

        def replace(src, dst):
            calls[0] += 1
            if calls[0] == k:
                open(f"{root}/k{k}.where", "w").write(os.path.basename(dst))
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)

        os.replace = replace
        _train(x, y, checkpoint_dir=f"{root}/k{k}", fingerprint="fp")

    for k in (1, 2, 5, 6, 7, 8):
        os.waitpid(child(lambda: killed_run(k)), 0)

    # (b) loops of h5ad writes / model saves, each killed at a random moment
    def versions(kind, target, v0):
        def loop():
            v = v0
            while True:
                v += 1
                write(kind, target, v)
        return loop

    def write(kind, target, v):
        if kind == "h5ad":
            a = ad.AnnData(X=np.full((3000, 100), v, dtype=np.float32))
            a.uns["v"] = v
            hx.io.write_h5ad(a, target, overwrite=True)
        else:
            big = torch.full((300, 300), float(v))
            tensors = {"model": {"w": big}, "reference": {"e": big}}
            _io.save_folder(target, config={"method": "test", "v": v}, tensors=tensors, overwrite=True)

    rng = random.Random(0)
    for kind in ("h5ad", "model"):
        for i in range(N_KILLS):
            target = f"{root}/{kind}{i}" + (".h5ad" if kind == "h5ad" else "")
            write(kind, target, 0)
            pid = child(versions(kind, target, 0))
            time.sleep(rng.uniform(0.05, 0.3))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    print("done")
    """
)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Run the SIGKILL scenarios once (one subprocess; the victims are its forked children)."""
    root = tmp_path_factory.mktemp("killed")
    script = root / "kill.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": SRC}
    res = subprocess.run(
        [sys.executable, str(script), str(root), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0 and "done" in res.stdout, res.stderr[-3000:]
    return root


def test_checkpoint_killed_between_file_writes_resumes_exactly(killed, tmp_path):
    import torch

    _, x, y = _train_setup()
    h_full, m_full = _train(x, y, checkpoint_dir=tmp_path / "full", fingerprint="fp")
    where = {}
    for k in (1, 2, 5, 6, 7, 8):
        where[k] = (killed / f"k{k}.where").read_text()
        h, m = _train(x, y, checkpoint_dir=killed / f"k{k}", resume=True, fingerprint="fp")
        assert h == h_full, k
        w_full, w = m_full.state_dict(), m.state_dict()
        assert all(torch.equal(w_full[n], w[n]) for n in w_full), k
    # the kills hit every stage: before the commit (state.json) and between the renames of the set
    assert where[5] == "state.json" and where[6] == "last.safetensors" and where[7] == "best.safetensors"
    assert where[8] == "optimizer.pt"


def test_h5ad_killed_mid_write_is_old_or_new_never_partial(killed):
    import anndata as ad

    mid_write = 0
    for i in range(N_KILLS):
        target = killed / f"h5ad{i}.h5ad"
        a = ad.read_h5ad(target)  # always present: the old file until the new one is complete
        v = a.uns["v"]
        assert a.shape == (3000, 100) and (np.asarray(a.X) == v).all()
        mid_write += any(p.name.startswith(f".h5ad{i}.tmp-") for p in killed.iterdir())
    assert mid_write > 0  # at least one kill landed while a temporary file was being written


def test_model_save_killed_is_old_or_absent_never_mixed(killed):
    from histoexp.models import _io

    for i in range(N_KILLS):
        target = killed / f"model{i}"
        if not target.exists():  # killed between the two renames of a replacement: the old folder is kept
            olds = [p for p in killed.iterdir() if p.name.startswith(f".model{i}.old-")]
            assert olds, f"model{i} absent and no previous folder kept"
            target = olds[0]
        cfg = _io.verify_folder(target)
        w = _io.read_tensors(target)["w"]
        assert (w == cfg["v"]).all() and (_io.read_tensors(target, "reference")["e"] == cfg["v"]).all()


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def pred_h5ad(tmp_path):
    a = hx.datasets.synthetic(n_sections=1, n_side=8)
    truth = hx.pp.expression_matrix(a, list(a.var_names))
    a.layers["bleep"] = truth + np.random.default_rng(0).normal(0, 0.5, truth.shape).astype(np.float32)
    path = tmp_path / "p.h5ad"
    a.write_h5ad(path)
    return path


def test_cli_evaluate_outputs(pred_h5ad, tmp_path, capsys):
    before = snapshot(tmp_path)
    assert main(["evaluate", str(pred_h5ad), "-o", str(pred_h5ad)]) == 1
    assert "--output" in capsys.readouterr().err
    assert main(["evaluate", str(pred_h5ad), "-o", str(tmp_path / "my.json")]) == 1  # csv and json: same file
    assert ".csv" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    csv = tmp_path / "m.csv"
    assert main(["evaluate", str(pred_h5ad), "-o", str(csv)]) == 0
    assert (tmp_path / "m.json").is_file() and len(csv.read_text().splitlines()) > 10
    written = snapshot(tmp_path)
    assert main(["evaluate", str(pred_h5ad), "-o", str(csv)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(tmp_path) == written
    assert main(["evaluate", str(pred_h5ad), "-o", str(csv), "--overwrite"]) == 0
    assert not hidden_leftovers(tmp_path)


@pytest.fixture
def no_work(monkeypatch):
    """Make any real work fail loudly: an output check must stop the command before it."""
    import histoexp.cli as cli

    def boom(*a, **k):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(cli, "prepare_features", boom)
    monkeypatch.setattr(hx.tl, "fit_bleep", boom)
    monkeypatch.setattr(hx.tl, "load_model", boom)
    monkeypatch.setattr(hx.datasets, "her2st", boom)


def test_cli_fit_checks_output_before_training(pred_h5ad, tmp_path, capsys, no_work):
    file = tmp_path / "model.txt"
    file.write_text("not a model")
    theirs = user_folder(tmp_path / "theirs")
    mine = _save(tmp_path / "mine", 1)
    before = snapshot(tmp_path)
    for out, extra, msg in [
        (file, [], "is a file"),
        (theirs, [], "--overwrite"),
        (theirs, ["--overwrite"], "refusing to replace"),
        (mine, [], "--overwrite"),
        (pred_h5ad, [], "input"),
    ]:
        assert main(["fit", str(pred_h5ad), "-o", str(out), "-q", *extra]) == 1
        assert msg in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_cli_fit_overwrite_replaces_a_model_folder(pred_h5ad, tmp_path, monkeypatch):
    import histoexp.cli as cli
    from histoexp.models import _io

    class Fake:
        genes = ["g"]

        def save(self, path, overwrite=False):
            return _save(path, 7, overwrite=overwrite)

    monkeypatch.setattr(
        cli, "prepare_features", lambda a, **k: a.obsm.__setitem__("X_handcrafted", np.zeros((a.n_obs, 2)))
    )
    monkeypatch.setattr(hx.tl, "fit_bleep", lambda *a, **k: Fake())
    mine = _save(tmp_path / "mine", 1)
    assert main(["fit", str(pred_h5ad), "-o", str(mine), "-q", "--overwrite"]) == 0
    assert _io.verify_folder(mine)["value"] == 7


def test_cli_impute_checks_outputs(pred_h5ad, tmp_path, capsys, no_work):
    model = _save(tmp_path / "model", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.h5ad").write_bytes(b"earlier predictions")
    before = snapshot(tmp_path)
    assert main(["impute", str(model), str(pred_h5ad), "-o", str(out), "-q"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["impute", str(model), str(pred_h5ad), "-o", str(model), "-q", "--overwrite"]) == 1
    assert "MODEL_DIR" in capsys.readouterr().err
    assert main(["impute", str(model), str(out / "predictions.h5ad"), "-o", str(out), "-q", "--overwrite"]) == 1
    assert "QUERY" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_cli_demo_checks_before_creating_anything(her2st_dir, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    assert main(["demo", "--data-dir", str(tmp_path / "nonexistent"), "--out", str(out), "-q"]) == 1
    assert "--data-dir" in capsys.readouterr().err and not out.exists()
    # a her2st layout without the images: say so before any download is tried
    fake = tmp_path / "fake"
    for sec in ("C2", "C3", "C4", "C5", "C6"):
        for rel in (f"data/ST-cnts/{sec}.tsv.gz", f"data/ST-spotfiles/{sec}_selection.tsv"):
            (fake / rel).parent.mkdir(parents=True, exist_ok=True)
            (fake / rel).write_bytes(b"")
    assert main(["demo", "--data-dir", str(fake), "--out", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "lacks the her2st images" in err and "--data-dir" in err and not out.exists()
    assert main(["demo", "--data-dir", str(her2st_dir), "--patch-px", "0", "--out", str(out), "-q"]) == 1
    assert "--patch-px 0" in capsys.readouterr().err and not out.exists()
    # an earlier run's outputs, or a foreign model/ folder, are not replaced
    out.mkdir()
    user_folder(out / "model")
    before = snapshot(tmp_path)
    assert main(["demo", "--data-dir", str(her2st_dir), "--out", str(out), "-q"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--data-dir", str(her2st_dir), "--out", str(out), "-q", "--overwrite"]) == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert main(["demo", "--data-dir", str(her2st_dir), "--out", str(her2st_dir), "-q", "--overwrite"]) == 1
    assert "input --data-dir" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_cli_demo_test_section_c2(her2st_dir, tmp_path):
    # C2 does not measure every gene of the panel chosen on C3: the demo used to crash in evaluate
    out = tmp_path / "demo"
    args = ["demo", "--data-dir", str(her2st_dir), "--quick", "--train-sections", "C3", "--test-section", "C2"]
    assert main([*args, "--out", str(out), "--epochs", "1", "--n-maps", "0", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"] == "C2" and 50 < summary["bleep"]["n_genes"] <= 100
    written = snapshot(out)
    assert main([*args, "--out", str(out), "--epochs", "1", "--n-maps", "0", "-q"]) == 1  # no --overwrite
    assert snapshot(out) == written


# ---------------------------------------------------------------------------------------------- silent wrong answers
@pytest.fixture(scope="module")
def split():
    """Two training sections and a held-out one, with features that carry the expression."""
    adata = hx.datasets.synthetic(n_sections=3, random_state=0)
    proj = np.random.default_rng(0).normal(size=(adata.n_vars, 12))
    adata.obsm["X_feat"] = (hx.pp.expression_matrix(adata) @ proj).astype(np.float32)
    lib = adata.obs["library_id"].astype(str).to_numpy()
    return adata[lib != "S2"].copy(), adata[lib == "S2"].copy()


def test_fit_bleep_hyperparameter_errors(split):
    train, _ = split
    kw = {"genes": "all", "use_rep": "X_feat", "key_added": "x"}
    for bad, match in (
        ({"temperature": 0}, "temperature"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1e-3}, "lr"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"epochs": 0}, "epochs"),
        ({"dropout": 1.0}, "dropout"),
    ):
        with pytest.raises(ValueError, match=match):
            hx.tl.fit_bleep(train, **kw, **bad)
    assert "x" not in train.uns and "X_x_image" not in train.obsm


def test_bad_counts_are_refused_not_learned(split):
    train, test = split
    for value, match in ((np.nan, "NaN or infinite"), (-3.0, "negative")):
        bad = train.copy()
        X = np.asarray(bad.X.toarray() if hasattr(bad.X, "toarray") else bad.X, dtype=np.float32)
        X[5, 3] = value
        bad.X = X
        with pytest.raises(ValueError, match=match):
            hx.tl.fit_bleep(bad, genes="all", use_rep="X_feat", epochs=1, key_added="bad_bleep")
        with pytest.raises(ValueError, match=match):
            hx.tl.fit_ridge(bad, genes="all", use_rep="X_feat", key_added="bad_ridge")
        assert "bad_bleep" not in bad.uns and "bad_ridge" not in bad.uns
    model = hx.tl.fit_ridge(train.copy(), genes="all", use_rep="X_feat", key_added="clean")
    q = test.copy()
    q.obsm["X_feat"] = q.obsm["X_feat"].copy()
    q.obsm["X_feat"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        hx.tl.impute(q, model)


def test_non_finite_positions_refused_for_the_spatial_split():
    ad1 = hx.datasets.synthetic(n_sections=1, random_state=0)
    ad1.obsm["spatial"] = ad1.obsm["spatial"].astype(float)
    ad1.obsm["spatial"][3, 0] = np.nan
    ad1.obsm["X_f"] = np.random.default_rng(0).normal(size=(ad1.n_obs, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="NaN or infinite for spots"):
        hx.tl.fit_bleep(ad1, genes="all", use_rep="X_f", epochs=1)


def test_unclear_inputs_get_clear_errors(split, tmp_path):
    from histoexp.tl._retrieval import retrieve

    train, test = split
    model = hx.tl.fit_ridge(train.copy(), genes="all", use_rep="X_feat")
    pred = hx.tl.impute(test, model)
    for n_top in (0, -1, 2.5):
        with pytest.raises(ValueError, match="n_top"):
            hx.tl.evaluate(pred, layer="ridge", n_top=n_top)
    with pytest.raises(ValueError, match="prediction layer itself"):
        hx.tl.evaluate(pred, layer="ridge", truth="ridge")
    with pytest.raises(ValueError, match="reserved"):
        hx.tl.impute(test, model, key_added="measured")
    with pytest.raises(ValueError, match="empty list"):
        hx.tl.impute(test, model, genes=[])
    with pytest.raises(ValueError, match="batch_size"):
        hx.tl.impute(test, model, batch_size=0)
    # a NaN similarity would rank first in top-k: refused, not retrieved
    emb = np.ones((4, 3), np.float32)
    bank = emb.copy()
    bank[1, 0] = np.nan
    with pytest.raises(ValueError, match="reference embeddings contain NaN"):
        retrieve(emb, bank, np.ones((4, 2), np.float32), k=2)
    # a model folder missing what a model needs: a clear error, not a KeyError deep inside
    model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["genes"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError):
        hx.tl.load_model(tmp_path / "m")
