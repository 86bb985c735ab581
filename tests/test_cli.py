import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import histoexp as hx
from histoexp.cli import main


def test_help_via_console_script():
    exe = Path(sys.executable).parent / "histoexp"
    cmd = [str(exe)] if exe.exists() else [shutil.which("histoexp") or "histoexp"]
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for word in ("demo", "fit", "impute", "evaluate", "--version"):
        assert word in res.stdout
    res = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and hx.__version__ in res.stdout


def test_no_command_and_bad_input(tmp_path, capsys):
    assert main([]) == 0
    assert "usage" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "missing.h5ad")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["impute", str(tmp_path / "nomodel"), str(tmp_path / "q.h5ad"), "-o", str(tmp_path / "o")]) == 1
    assert "model folder" in capsys.readouterr().err
    assert main(["demo", "--test-section", "A1", "--out", str(tmp_path / "d")]) == 1
    assert "--test-section" in capsys.readouterr().err
    assert main(["fit", "--bogus"]) == 2  # argparse usage error


@pytest.mark.slow
def test_demo_quick_on_real_data(her2st_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        ["demo", "--data-dir", str(her2st_dir), "--quick", "--train-sections", "C2,C3", "--test-section", "C4"]
        + ["--out", str(out), "--epochs", "5", "--n-maps", "2", "-q"]
    )
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert captured.err == ""  # -q: no banner, no steps, no progress: only the results on stdout
    assert "Pearson, mean over genes (PCC@M)" in printed and "mean baseline" in printed
    for name in ("predictions.h5ad", "metrics.csv", "metrics_per_gene.csv", "correlation.png", "domains.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list(out.glob("gene_map_*.png"))) >= 2
    assert (out / "model" / "config.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"] == ["C2", "C3"] and summary["test"] == "C4"
    assert summary["bleep"]["n_genes"] > 50
    assert -1 <= summary["bleep"]["pcc_mean"] <= 1
    assert summary["mean_baseline"]["pcc_mean"] == 0  # a constant prediction carries no correlation
    import anndata as ad

    pred = ad.read_h5ad(out / "predictions.h5ad")
    assert "bleep" in pred.layers and "bleep_pcc" in pred.var and "bleep_domains" in pred.obs
    table = pd.read_csv(out / "metrics.csv", index_col=0)
    assert table.loc["Pearson, mean over genes (PCC@M)", "BLEEP"] == pytest.approx(
        summary["bleep"]["pcc_mean"], abs=1e-3
    )


@pytest.fixture
def synth_files(tmp_path):
    a = hx.datasets.synthetic(n_sections=2, random_state=0)
    paths = []
    for lib in ("S0", "S1"):
        s = a[a.obs["library_id"] == lib].copy()
        s.obs["library_id"] = s.obs["library_id"].cat.remove_unused_categories()
        s.uns["spatial"] = {lib: a.uns["spatial"][lib]}
        p = tmp_path / f"{lib}.h5ad"
        s.write_h5ad(p)
        paths.append(p)
    return a, paths


def test_fit_impute_evaluate_round_trip(synth_files, tmp_path, capsys):
    a, (s0, s1) = synth_files
    model = tmp_path / "model"
    assert main(["fit", str(s0), "-o", str(model), "--epochs", "5", "--genes", "20", "--patch-px", "32", "-q"]) == 0
    assert (model / "config.json").exists()
    out = tmp_path / "pred"
    assert main(["impute", str(model), str(s1), "-o", str(out), "--n-maps", "2", "-q"]) == 0
    import anndata as ad

    pred = ad.read_h5ad(out / "predictions.h5ad")
    P = np.asarray(pred.layers["bleep"])
    assert (~np.isnan(P).all(0)).sum() == 20
    assert len(list(out.glob("gene_map_*.png"))) == 2
    capsys.readouterr()
    csv = tmp_path / "m.csv"
    assert main(["evaluate", str(out / "predictions.h5ad"), "-o", str(csv)]) == 0
    printed = capsys.readouterr().out
    assert "HVG-50" in printed
    table = pd.read_csv(csv, index_col=0)
    assert len(table) == 20 and table["pcc"].notna().all()
    # expression is a function of the image in the synthetic data: BLEEP must find some of it
    assert table["pcc"].mean() > 0.2
    assert main(["evaluate", str(out / "predictions.h5ad"), "--layer", "nope"]) == 1


def test_impute_image_query(synth_files, tmp_path, capsys):
    from PIL import Image

    a, (s0, _) = synth_files
    model = tmp_path / "model"
    assert main(["fit", str(s0), "-o", str(model), "--epochs", "3", "--genes", "10", "--patch-px", "32", "-q"]) == 0
    img = tmp_path / "slide.png"
    Image.fromarray(a.uns["spatial"]["S1"]["images"]["hires"]).save(img)
    out = tmp_path / "img_pred"
    assert main(["impute", str(model), str(img), "-o", str(out), "-q"]) == 1  # no --mpp for a PNG
    err = capsys.readouterr().err
    # the error names the option and the training slides' µm/px (recorded at fit time), never applies it silently
    train_mpp = a.uns["spatial"]["S0"]["scalefactors"]["microns_per_pixel"]
    assert "pass --mpp" in err and f"trained on slides at {train_mpp:g} µm/px (S0)" in err, err
    assert not out.exists()
    assert main(["impute", str(model), str(img), "--mpp", "2.0", "-o", str(out), "--n-maps", "1", "-q"]) == 0
    import anndata as ad

    pred = ad.read_h5ad(out / "predictions.h5ad")
    assert pred.n_vars == 10 and pred.n_obs > 20
    assert np.isfinite(np.asarray(pred.layers["bleep"])).all()
    assert len(list(out.glob("gene_map_*.png"))) == 1


@pytest.mark.parametrize(("flags", "expected"), [(["-q"], 0), ([], 1), (["-v"], 2)])
def test_quiet_and_verbose_set_verbosity(monkeypatch, flags, expected):
    import histoexp.cli as cli

    seen = {}

    def fake_fit(args):
        seen.update(verbosity=hx.settings.verbosity, progress=hx.settings.progress)
        return 0

    monkeypatch.setattr(cli, "cmd_fit", fake_fit)
    hx.settings.verbosity, hx.settings.progress = 3, True
    verbose = ["-v"] if "-v" in flags else []
    quiet = ["-q"] if "-q" in flags else []
    assert main([*verbose, "fit", "ref.h5ad", "-o", "model", *quiet]) == 0
    assert seen == {"verbosity": expected, "progress": expected != 0}
    assert hx.settings.verbosity == 3 and hx.settings.progress  # restored after the command


def test_quiet_run_prints_only_results(synth_files, tmp_path):
    """-q (verbosity 0): a fit and an impute in a fresh process write nothing to stderr, only results to stdout."""
    a, (s0, s1) = synth_files
    model, out = tmp_path / "model", tmp_path / "pred"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONWARNINGS"}
    runs = [
        ["fit", str(s0), "-o", str(model), "--epochs", "3", "--genes", "10", "--patch-px", "32", "-q"],
        ["impute", str(model), str(s1), "-o", str(out), "--n-maps", "1", "-q"],
    ]
    printed = []
    for argv in runs:
        res = subprocess.run(
            [sys.executable, "-c", "import sys; from histoexp.cli import main; sys.exit(main(sys.argv[1:]))", *argv],
            capture_output=True,
            text=True,
            env=env,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stderr == "", res.stderr[-3000:]
        lines = res.stdout.strip().splitlines()
        assert 1 <= len(lines) <= 4 and all("\x1b[" not in ln for ln in lines), res.stdout
        printed.append(res.stdout)
    assert "model (10 genes, encoder handcrafted) saved to" in printed[0]
    assert "predicted 10 genes for" in printed[1]
    assert "genes expected to carry gene-specific signal:" in printed[1]
    assert (out / "predictions.h5ad").is_file()


@pytest.mark.parametrize("method", ["nh2st"])
def test_fit_nh2st_and_impute(synth_files, tmp_path, method):
    """`fit --method nh2st` on two files (the window sizes of both), impute an .h5ad and an image."""
    from PIL import Image

    a, (s0, s1) = synth_files
    model = tmp_path / "model"
    args = ["fit", str(s0), str(s1), "-o", str(model), "--method", method, "--epochs", "2", "--genes", "10"]
    assert main([*args, "--patch-px", "32", "-q"]) == 0
    m = hx.tl.load_model(model)
    assert m.method == method and m.n_ensemble == 5
    if method == "nh2st":
        assert set(m.config["extra_reps"]["X_handcrafted_grid"]["embedding"]["window_px_fullres"]) == {"S0", "S1"}
    out = tmp_path / "pred"
    assert main(["impute", str(model), str(s1), "-o", str(out), "--n-maps", "1", "-q"]) == 0
    import anndata as ad

    pred = ad.read_h5ad(out / "predictions.h5ad")
    assert np.isfinite(np.asarray(pred.layers[method])).all() and pred.n_vars == 10
    img = tmp_path / "slide.png"
    Image.fromarray(a.uns["spatial"]["S1"]["images"]["hires"]).save(img)
    mpp = a.uns["spatial"]["S1"]["scalefactors"]["microns_per_pixel"]
    out = tmp_path / "img_pred"
    assert main(["impute", str(model), str(img), "-o", str(out), "--mpp", str(mpp), "--min-tissue", "0", "-q"]) == 0
    pred = ad.read_h5ad(out / "predictions.h5ad")
    assert np.isfinite(np.asarray(pred.layers[method])).all()
    assert not any(k.startswith("X_handcrafted") for k in pred.obsm)  # features dropped from the output


def test_fit_rank_and_smoothing_options(synth_files, tmp_path, capsys):
    """`fit --rank/--smooth` reach fit_*; the default chooses both by inner cross-validation; bad values refused."""
    _, (s0, s1) = synth_files
    base = ["fit", str(s0), str(s1), "--method", "ridge", "--genes", "10", "--patch-px", "32", "-q"]
    assert main([*base, "-o", str(tmp_path / "fixed"), "--rank", "2", "--smooth", "none"]) == 0
    fixed = hx.tl.load_model(tmp_path / "fixed")
    assert fixed.config["rank"] == 2 and not fixed.config["smooth_predictions"]
    assert main([*base, "-o", str(tmp_path / "auto")]) == 0
    auto = hx.tl.load_model(tmp_path / "auto")
    assert "smooth_scores" in auto.config["params"]  # chosen on the out-of-fold predictions
    capsys.readouterr()
    for bad in (["--rank", "0"], ["--rank", "two"], ["--smooth", "1.5"]):
        assert main([*base, "-o", str(tmp_path / "bad"), *bad]) == 1
        assert bad[0] in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
