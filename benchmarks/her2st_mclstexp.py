"""mclSTExp on her2st: choice of the sentence, what the parts add, end to end on CPU, next to BLEEP and ridge.

Two parts, one run:

1. **Inner leave-one-section-out on C3..C6 (C2 never used)** to choose ``fit_mclstexp``'s default
   ``sentence`` without looking at any outer test section: train on three of C3..C6, predict the fourth,
   for ``sentence='spatial'`` and ``'batch'`` on frozen handcrafted and densenet121 (random weights, n_pcs=8)
   features. The same inner protocol chose BLEEP's ``n_pcs``.
2. **Outer leave-one-section-out over C2..C6** (the folds, targets and metrics of ``benchmarks/her2st.py``:
   785-gene panel, log1p(normalize_total 1e4), PCC over the panel, HVG-50, HEG-50, MSE, domain ARI, and
   fit + predict seconds), all in one run:

   - ``mean``, ``ridge[f]``, ``bleep[f]`` (fit_bleep defaults, 5 members, k=50 average);
   - ``mclstexp-spatial[f]``, ``mclstexp-batch[f]`` (fit_mclstexp defaults, one member, top-200
     1/d² retrieval);
   - ``mclstexp-batch-x5[handcrafted]``: five members (BLEEP's ensemble, averaged retrievals);
   - ``mclstexp-batch-notx[handcrafted]``: ``n_layers=0``, the spot branch without the transformer
     (expression + position embeddings -> projection head): what attention over the sentence adds;
   - ``mclstexp-batch-k50avg[handcrafted]``: the same model as ``mclstexp-batch``, retrieved as BLEEP
     (k=50, plain average): what the retrieval rule adds;
   - ``bleep-e2e[resnet18]``, ``mclstexp-e2e[resnet18]``: end to end on CPU, ResNet-18 with random
     weights on small patches (``--e2e-px``), ``--e2e-epochs`` epochs without early stopping.

Usage::

    python benchmarks/her2st_mclstexp.py [--data-dir ../shared/data/her2st] [--cache /tmp/hx-features]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from her2st import KEYS, LABELS, domain_ari, machine
from her2st_bleep import HERE, SECTIONS, fold_summary, log, prepare, run_bleep_frozen, run_ridge

import histoexp as hx


def fit_mcl(train, panel, name, *, n_pcs, seed, **kwargs):
    return hx.tl.fit_mclstexp(
        train, genes=panel, use_rep=f"X_{name}", n_pcs=n_pcs, random_state=seed, overwrite=True, **kwargs
    )


def inner_cv(adata, panel, features, n_pcs, seed) -> dict:
    """Mean PCC over the panel, inner LOSO on C3..C6, per feature and sentence."""
    inner = SECTIONS[1:]
    lib = adata.obs["library_id"].astype(str).to_numpy()
    out: dict = {}
    for name in features:
        for sentence in ("spatial", "batch"):
            scores = []
            for test in inner:
                tr = np.isin(lib, [s for s in inner if s != test])
                train, query = adata[tr].copy(), adata[lib == test].copy()
                model = fit_mcl(train, panel, name, n_pcs=n_pcs.get(name), seed=seed, sentence=sentence)
                pred = hx.tl.impute(query, model)
                s = hx.tl.summarize_metrics(hx.tl.gene_metrics(pred.layers["mclstexp"], pred.layers["measured"]))
                scores.append(s["pcc_mean"])
            out[f"{sentence}[{name}]"] = {"per_fold": dict(zip(inner, scores, strict=True)), "mean": np.mean(scores)}
            log(f"inner {sentence}[{name}]: " + " ".join(f"{v:.3f}" for v in scores) + f" mean {np.mean(scores):.3f}")
    return out


def e2e(train, query, panel, record, *, method, px, epochs, seed) -> None:
    t = time.time()
    common = dict(
        genes=panel,
        finetune_encoder=True,
        encoder="resnet18",
        weights=None,
        encoder_kwargs={"transform": {"input_size": px}},
        epochs=epochs,
        batch_size=128,
        lr=1e-3,
        patience=None,
        random_state=seed,
        overwrite=True,
    )
    if method == "bleep":
        model = hx.tl.fit_bleep(train, **common)
        pred = hx.tl.impute(query, model, k=50, method="average").layers["bleep"]
    else:
        model = hx.tl.fit_mclstexp(train, sentence="batch", **common)
        pred = hx.tl.impute(query, model).layers["mclstexp"]
    record(f"{method}-e2e[resnet18]", pred, time.time() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    p.add_argument("--features", nargs="+", default=["handcrafted", "densenet121"])
    p.add_argument("--n-pcs", nargs="+", default=["densenet121=8"])
    p.add_argument("--e2e-epochs", type=int, default=5)
    p.add_argument("--e2e-px", type=int, default=64)
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--no-inner", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="folder caching the frozen features (npy)")
    p.add_argument("--out", default=str(HERE / "results" / "her2st_mclstexp"))
    args = p.parse_args()
    args.no_bank, args.resnet_px = True, 224
    n_pcs = {k: int(v) for k, v in (item.split("=") for item in args.n_pcs)}
    hx.settings.progress = False
    hx.settings.device = "cpu"
    t_start = time.time()
    adata, panel, _, _, timings = prepare(args)
    if not args.no_e2e:
        hx.pp.extract_patches(adata, size_um=112, patch_px=args.e2e_px, key_added="patches")

    inner = {} if args.no_inner else inner_cv(adata, panel, args.features, n_pcs, args.seed)
    timings["inner_cv"] = time.time() - t_start - sum(timings.values())

    truth_all = hx.pp.expression_matrix(adata, panel)
    lib = adata.obs["library_id"].astype(str).to_numpy()
    folds: list[dict] = []
    for test in SECTIONS:
        tr, te = lib != test, lib == test
        train, query = adata[tr].copy(), adata[te].copy()
        y_tr, y_te = truth_all[tr], truth_all[te]
        fold = {"test": test, "n_test": int(te.sum()), "methods": {}}

        def record(method, pred, secs, fold=fold, query=query, y_te=y_te, y_tr=y_tr, test=test):
            s = fold_summary(pred, y_te, y_tr, panel, coords=np.asarray(query.obsm["spatial"], dtype=float))
            m = {k: s[k] for k in KEYS}
            m["ari"] = domain_ari(query, pred, y_te, panel, args.seed)
            m["seconds"] = round(secs, 1)
            fold["methods"][method] = m
            log(
                f"{test} {method:34s} PCC@M={m['pcc_mean']:.3f} spec={m['pcc_specific_mean']:.3f} "
                f"HVG={m['pcc_hvg']:.3f} ARI={m['ari']:.3f} {secs:.0f}s"
            )

        record("mean", np.repeat(y_tr.mean(0, keepdims=True), te.sum(), axis=0), 0.0)
        for name in args.features:
            run_ridge(train, query, panel, name, record, seed=args.seed)
            run_bleep_frozen(train, query, panel, name, record, n_pcs=n_pcs.get(name), seed=args.seed)
            for sentence in ("spatial", "batch"):
                t = time.time()
                model = fit_mcl(train, panel, name, n_pcs=n_pcs.get(name), seed=args.seed, sentence=sentence)
                fit_s = time.time() - t
                record(f"mclstexp-{sentence}[{name}]", hx.tl.impute(query, model).layers["mclstexp"], fit_s)
                if name == "handcrafted" and sentence == "batch":
                    t = time.time()
                    pred = hx.tl.impute(query, model, k=50, method="average").layers["mclstexp"]
                    record("mclstexp-batch-k50avg[handcrafted]", pred, fit_s + time.time() - t)
            if name == "handcrafted":
                for label, extra in (("x5", {"n_ensemble": 5}), ("notx", {"n_layers": 0})):
                    t = time.time()
                    model = fit_mcl(train, panel, name, n_pcs=None, seed=args.seed, sentence="batch", **extra)
                    pred = hx.tl.impute(query, model).layers["mclstexp"]
                    record(f"mclstexp-batch-{label}[handcrafted]", pred, time.time() - t)
        if not args.no_e2e:
            for method in ("bleep", "mclstexp"):
                e2e(train, query, panel, record, method=method, px=args.e2e_px, epochs=args.e2e_epochs, seed=args.seed)
        folds.append(fold)

    methods = list(folds[0]["methods"])
    cols = (*KEYS, "ari", "seconds")
    mean = {m: {k: float(np.mean([f["methods"][m][k] for f in folds])) for k in cols} for m in methods}
    timings["total"] = time.time() - t_start
    result = {
        "benchmark": "her2st mclSTExp: inner LOSO on C3..C6 for the sentence; outer LOSO over C2..C6",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python benchmarks/her2st_mclstexp.py " + " ".join(sys.argv[1:]),
        "settings": {
            "sections": SECTIONS,
            "n_panel_genes": len(panel),
            "targets": "log1p(normalize_total 1e4), her2st 785-gene panel",
            "features": {
                "handcrafted": "handcrafted encoder on 112 um patches at 112 px",
                "densenet121": "densenet121 weights=None (random init, seed 0) on 112 um patches at 224 px",
            },
            "n_pcs": n_pcs,
            "e2e": None
            if args.no_e2e
            else {"encoder": "resnet18, random", "patch": f"112 um at {args.e2e_px} px", "epochs": args.e2e_epochs},
        },
        "inner_cv": inner,
        "folds": folds,
        "mean": mean,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    mc = result["machine"]
    labels = {**LABELS, "seconds": "fit+predict s"}
    lines = [
        "# her2st: mclSTExp choices, next to BLEEP and ridge",
        "",
        f"{result['date']} · {mc['platform']}, {mc['cpu_count']} CPU cores, torch {mc['torch']} · "
        f"`{result['command'].strip()}` · {timings['total']:.0f} s",
        "",
    ]
    if inner:
        lines += [
            "Inner leave-one-section-out on C3..C6 (C2 never used), mean PCC over the 785-gene panel:",
            "",
            "| sentence[features] | " + " | ".join(SECTIONS[1:]) + " | mean |",
            "| --- | " + " | ".join("---:" for _ in SECTIONS) + " |",
        ]
        for k, v in inner.items():
            lines.append(f"| {k} | " + " | ".join(f"{x:.3f}" for x in v["per_fold"].values()) + f" | {v['mean']:.3f} |")
        lines.append("")
    lines += [
        f"Outer leave-one-section-out over C2..C6, {len(panel)}-gene panel, log1p targets; mean over the five folds:",
        "",
        "| method | " + " | ".join(labels[k] for k in cols) + " |",
        "| --- | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for m in methods:
        cells = (f"{mean[m][k]:.0f}" if k == "seconds" else f"{mean[m][k]:.3f}" for k in cols)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "PCC@M per fold:", "", "| method | " + " | ".join(SECTIONS) + " |", "| --- |" + " ---: |" * 5]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{f['methods'][m]['pcc_mean']:.3f}" for f in folds) + " |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
