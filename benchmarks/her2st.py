"""The whole her2st leave-one-section-out table: every method and baseline histoexp has, in one run.

Train on four of the five imaged sections of patient C (C2..C6), predict the fifth, for each fold.
Targets: log1p(normalize_total 1e4) of the her2st 785-gene panel. Metrics per fold and averaged
(``hx.tl.gene_metrics`` / ``hx.tl.summarize_metrics``, the same code as ``hx.tl.evaluate``): mean Pearson over
the panel (PCC@M), over the 50 most variable (HVG-50) and 50 most expressed (HEG-50) genes of the test
section, PCC@H (mean of the 50 best-predicted genes), mean Spearman, MSE, MAE; plus the adjusted Rand
index between spatial domains found on the prediction and on the measurement (``hx.tl.spatial_domains``).

Methods:

- ``mean``: training mean per gene (a constant prediction: correlation 0 by convention);
- ``ridge[<features>]``: ``hx.tl.fit_ridge`` on the frozen features (standardise, PCA-256, ridge with alpha by
  leave-one-section-out inside the training sections; HEST recipe);
- ``bleep[<features>]``: ``hx.tl.fit_bleep`` on the same frozen features (defaults: an ensemble of five heads;
  resnet50 features PCA-reduced with ``n_pcs=8``) + ``hx.tl.impute`` (k=50, average);
- ``bleep+bank[<features>]``: the same model, reference bank extended with the 30 count-only her2st sections;
- ``bleep+bank-centred[<features>]``: the same, each reference section centred on the training mean
  (``impute(center_reference='library_id')``: the count-only sections are shallower and from other patients);
- ``mclstexp-spatial[<features>]``, ``mclstexp-batch[<features>]``: ``hx.tl.fit_mclstexp`` defaults on the same
  frozen features with spatial-window or shuffled-minibatch sentences + ``hx.tl.impute`` (its defaults: top-200,
  1/L1-distance² weights; reference = the training spots);
- ``bleep-e2e[resnet18]`` (``--e2e``): BLEEP trained end to end on CPU (ResNet-18 random init, 64 px patches;
  about 4 min per fold on 2 cores, so off by default: the default run takes about 5 min).

Features: ``handcrafted``, and ``resnet50`` and ``densenet121`` with ``weights=None`` (random init; ImageNet weights
need internet).
The feature extraction and ridge recipe are imported from ``benchmarks/her2st_bleep.py`` (the BLEEP benchmark),
so both scripts measure the same thing.

Usage::

    python benchmarks/her2st.py [--data-dir ../shared/data/her2st] [--features handcrafted resnet50] [--e2e]

Writes ``benchmarks/results/her2st.json`` and ``benchmarks/results/her2st.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import histoexp as hx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from her2st_bleep import (  # noqa: E402
    SECTIONS,
    add_common_arguments,
    prepare,
    run_bleep_e2e,
    run_bleep_frozen,
    run_mclstexp,
    run_ridge,
)

KEYS = ("pcc_mean", "pcc_hvg", "pcc_heg", "pcc_at_h", "spearman_mean", "mse_mean", "mae_mean")
LABELS = {
    "pcc_mean": "PCC@M",
    "pcc_hvg": "PCC HVG-50",
    "pcc_heg": "PCC HEG-50",
    "pcc_at_h": "PCC@H",
    "spearman_mean": "Spearman",
    "mse_mean": "MSE",
    "mae_mean": "MAE",
    "ari": "domain ARI",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or "",
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "histoexp": hx.__version__,
    }


def domain_ari(query, pred: np.ndarray, truth: np.ndarray, panel: list[str], seed: int) -> float:
    """ARI between leiden domains of the prediction and of the measurement (same panel, same settings)."""
    import anndata as ad
    import pandas as pd

    q = ad.AnnData(obs=query.obs.copy(), var=pd.DataFrame(index=panel), obsm={"spatial": query.obsm["spatial"]})
    q.layers["pred"], q.layers["measured"] = pred, truth
    hx.tl.spatial_domains(q, layer="measured", random_state=seed)
    if np.all(np.ptp(pred, axis=0) == 0):
        return 0.0  # a constant prediction has no domains
    hx.tl.spatial_domains(q, layer="pred", compare="measured_domains", random_state=seed)
    return float(q.uns["pred_domains"]["ari"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.add_argument("--e2e", action="store_true", help="also train BLEEP end to end (slow on CPU)")
    p.add_argument("--no-mclstexp", action="store_true", help="skip the mclSTExp rows")
    p.add_argument("--out", default=str(HERE / "results" / "her2st"))
    args = p.parse_args()
    n_pcs = {k: int(v) for k, v in (item.split("=") for item in args.n_pcs)}
    hx.settings.progress = False
    hx.settings.device = "cpu"
    t_start = time.time()
    adata, panel, bank, feats, timings = prepare(args)
    if args.e2e:
        hx.pp.extract_patches(adata, size_um=112, patch_px=args.e2e_px, key_added="patches")

    truth_all = hx.pp.expression_matrix(adata, panel)
    lib = adata.obs["library_id"].astype(str).to_numpy()
    folds: list[dict] = []
    for test in SECTIONS:
        tr, te = lib != test, lib == test
        train, query = adata[tr].copy(), adata[te].copy()
        y_tr, y_te = truth_all[tr], truth_all[te]
        fold = {"test": test, "train": [s for s in SECTIONS if s != test], "n_test": int(te.sum()), "methods": {}}

        def record(method, pred, secs, fold=fold, query=query, y_te=y_te, test=test):
            s = hx.tl.summarize_metrics(hx.tl.gene_metrics(pred, y_te, panel), n_top=50)
            m = {k: s[k] for k in KEYS}
            m.update({k: s[k] for k in ("n_genes", "n_constant_excluded", "n_constant_prediction")})
            m["ari"] = domain_ari(query, pred, y_te, panel, args.seed)
            m["seconds"] = round(secs, 1)
            fold["methods"][method] = m
            log(
                f"{test} {method:24s} PCC@M={m['pcc_mean']:.3f} HVG={m['pcc_hvg']:.3f} HEG={m['pcc_heg']:.3f} "
                f"PCC@H={m['pcc_at_h']:.3f} MSE={m['mse_mean']:.4f} ARI={m['ari']:.3f} ({secs:.0f}s)"
            )

        t = time.time()
        record("mean", np.repeat(y_tr.mean(0, keepdims=True), te.sum(), axis=0), time.time() - t)
        for name in args.features:
            run_ridge(train, query, panel, name, record, seed=args.seed)
            run_bleep_frozen(
                train,
                query,
                panel,
                name,
                record,
                bank=bank,
                n_pcs=n_pcs.get(name),
                epochs=args.epochs,
                k=args.k,
                method=args.method,
                seed=args.seed,
            )
            if not args.no_mclstexp:
                run_mclstexp(train, query, panel, name, record, n_pcs=n_pcs.get(name), seed=args.seed)
        if args.e2e:
            run_bleep_e2e(
                train,
                query,
                panel,
                record,
                px=args.e2e_px,
                epochs=args.e2e_epochs,
                k=args.k,
                method=args.method,
                seed=args.seed,
            )
        folds.append(fold)

    methods = list(folds[0]["methods"])
    cols = (*KEYS, "ari")
    mean = {m: {k: float(np.mean([f["methods"][m][k] for f in folds])) for k in cols} for m in methods}
    timings["total"] = time.time() - t_start
    result = {
        "benchmark": "her2st leave-one-section-out (C2..C6)",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python benchmarks/her2st.py " + " ".join(sys.argv[1:]),
        "settings": {
            "sections": SECTIONS,
            "n_panel_genes": len(panel),
            "targets": "log1p(normalize_total 1e4), her2st 785-gene panel",
            "features": {
                "handcrafted": "handcrafted encoder on 112 um patches at 112 px",
                "resnet50": "resnet50 weights=None (random init, seed 0) on 112 um patches at 224 px",
                "densenet121": "densenet121 weights=None (random init, seed 0) on 112 um patches at 224 px",
            },
            "bleep": {
                "epochs": args.epochs or "fit_bleep default",
                "n_ensemble": "fit_bleep default (5)",
                "n_pcs": n_pcs,
                "k": args.k,
                "method": args.method,
            },
            "bank": None if bank is None else f"{bank.n_obs} spots of 30 count-only sections (incl. C1)",
            "metrics": "hx.tl.evaluate definitions: PCC@H = mean of the 50 best-predicted genes; HVG/HEG-50 = "
            "highest variance / mean of the test truth; constant predictions count as r=0",
            "domains": "hx.tl.spatial_domains defaults (PCA-30, 15 expression + 6 spatial neighbours, leiden 0.5)",
        },
        "folds": folds,
        "mean": mean,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    mc = result["machine"]
    lines = [
        "# her2st: leave-one-section-out, every method",
        "",
        f"{result['date']} · {mc['platform']}, {mc['cpu_count']} CPU cores, torch {mc['torch']}, "
        f"histoexp {mc['histoexp']} · `{result['command'].strip()}` · {timings['total']:.0f} s",
        "",
        f"Train on four of C2..C6, predict the fifth; {len(panel)}-gene panel, log1p(normalize_total 1e4). "
        "Mean over the five folds:",
        "",
        "| method | " + " | ".join(LABELS[k] for k in cols) + " |",
        "| --- | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{mean[m][k]:.3f}" for k in cols) + " |")
    lines += [
        "",
        "PCC@M per fold (test section):",
        "",
        "| method | " + " | ".join(SECTIONS) + " |",
        "| --- | " + " | ".join("---:" for _ in SECTIONS) + " |",
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{f['methods'][m]['pcc_mean']:.3f}" for f in folds) + " |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
