"""NH2ST on her2st: leave-one-section-out over C2..C6 next to the other methods, with an ablation, in one run.

Same folds, targets and metrics as ``benchmarks/her2st.py``: train on four of C2..C6, predict the fifth;
log1p(normalize_total 1e4) of the her2st 785-gene panel; per fold and averaged: mean Pearson over the panel
(PCC@M), over the 50 most variable (HVG-50) and 50 most expressed (HEG-50) genes of the test section, PCC@H,
Spearman, MSE, MAE (``hx.tl.gene_metrics`` / ``hx.tl.summarize_metrics``), and the seconds to fit and predict.

Features (all frozen, handcrafted encoder, training-free):

- ``own``: the spot's 112 µm patch at 112 px (as ``benchmarks/her2st.py``);
- ``ctx3``: one 336 µm patch (3x wider) around the spot at 336 px (same µm/px);
- ``grid``: the 5 x 5 windows of 112 µm around the spot (``hx.tl.embed_neighbourhood``, 25 x 37 features).

Methods:

- ``mean``: the training mean of each gene;
- ``ridge[own]``, ``ridge[own+ctx3]``, ``ridge[own+grid]``: ``hx.tl.fit_ridge`` (standardise, PCA-256, ridge with
  alpha by leave-one-section-out inside the training sections) on those features concatenated;
- ``bleep[own]``: ``hx.tl.fit_bleep`` defaults (five heads) + ``impute`` (k=50, average);
- ``mclstexp[own]``: ``hx.tl.fit_mclstexp`` defaults + ``impute`` (its defaults);
- ``nh2st``: ``hx.tl.fit_nh2st`` on ``own`` + ``grid`` with its defaults (five members averaged;
  ``--n-ensemble`` changes that for every NH2ST row);
- the ablation, the same call with one switch changed: ``nh2st-pool-mean`` / ``nh2st-pool-attention`` (the
  pooling that is not the default), ``nh2st-no-neighbours`` (``neighbours=False``), ``nh2st-no-contrastive``
  (``contrastive=False``), ``nh2st-no-cross-attention`` (``cross_attention=False``), ``nh2st-smooth``
  (``smooth=True``: trained on NH2ST's smoothed targets, evaluated on the measured spots as every row);
- ``nh2st-e2e[resnet18]`` (``--e2e-epochs N``, on the folds of ``--e2e-folds``): end to end, a randomly
  initialised ResNet-18 (no weights can be downloaded here) on 56 px windows (112 µm), ``grid=5``, ``N``
  epochs on CPU; a check that the path runs on real data, far from the paper's regime.

``--inner`` runs the model selection instead: leave-one-section-out over C3..C6 only (C2 is never seen),
NH2ST with ``pool='mean'`` and ``pool='attention'``, with and without the contrastive terms; it writes
``her2st_nh2st_inner.{json,md}``. The defaults of ``fit_nh2st`` were chosen on that table.

Usage::

    python benchmarks/her2st_nh2st.py [--data-dir ../shared/data/her2st] [--cache DIR]

Writes ``benchmarks/results/her2st_nh2st.json`` and ``benchmarks/results/her2st_nh2st.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import histoexp as hx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from her2st import KEYS, LABELS, machine  # noqa: E402
from her2st_bleep import SECTIONS, fold_summary, load_sections  # noqa: E402


def ablation() -> dict[str, dict]:
    """The NH2ST rows: the defaults, then one switch changed each."""
    import inspect

    pool = inspect.signature(hx.tl.fit_nh2st).parameters["pool"].default
    other = "mean" if pool == "attention" else "attention"
    return {
        "nh2st": {},
        f"nh2st-pool-{other}": {"pool": other},
        "nh2st-no-neighbours": {"neighbours": False},
        "nh2st-no-contrastive": {"contrastive": False},
        "nh2st-no-cross-attention": {"cross_attention": False},
        "nh2st-smooth": {"smooth": True},  # NH2ST's ring-smoothed training targets (evaluation unchanged)
    }


#: the model selection (``--inner``): pooling x contrastive terms
INNER = {
    "pool-mean": {"pool": "mean"},
    "pool-mean-no-contrastive": {"pool": "mean", "contrastive": False},
    "pool-attention": {"pool": "attention"},
    "pool-attention-no-contrastive": {"pool": "attention", "contrastive": False},
    "no-neighbours": {"neighbours": False},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def features(adata, cache: Path | None) -> dict[str, float]:
    """``obsm['X_own']``, ``obsm['X_own_grid']`` (5 x 5 windows) and ``obsm['X_ctx3']``, cached as npy."""
    timings = {}
    hx.pp.extract_patches(adata, size_um=112, patch_px=112, store="none", key_added="p")
    jobs = {
        "X_own": lambda: hx.tl.embed_patches(adata, "handcrafted", patches_key="p", key_added="X_own"),
        "X_own_grid": lambda: hx.tl.embed_neighbourhood(
            adata, "handcrafted", grid=5, patches_key="p", key_added="X_own_grid"
        ),
    }
    for key, job in jobs.items():
        t = time.time()
        path = cache / f"{key}.npy" if cache else None
        if path is not None and path.is_file():  # the features and their embedding record (grid, window size)
            adata.obsm[key] = np.load(path)
            rec = json.loads(path.with_suffix(".json").read_text())
            adata.uns.setdefault("histoexp", {}).setdefault("embeddings", {})[key] = rec
        else:
            job()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, adata.obsm[key])
                path.with_suffix(".json").write_text(json.dumps(adata.uns["histoexp"]["embeddings"][key]))
        timings[f"embed_{key}"] = time.time() - t
        log(f"{key}: {adata.obsm[key].shape} in {timings[f'embed_{key}']:.0f}s")
    t = time.time()
    path = cache / "X_ctx3.npy" if cache else None
    if path is not None and path.is_file():
        adata.obsm["X_ctx3"] = np.load(path)
    else:
        tmp = adata.copy()
        hx.pp.extract_patches(tmp, size_um=336, patch_px=336, store="none", key_added="c3", overwrite=True)
        hx.tl.embed_patches(tmp, "handcrafted", patches_key="c3", key_added="X_ctx3")
        adata.obsm["X_ctx3"] = tmp.obsm["X_ctx3"]
        if path is not None:
            np.save(path, adata.obsm["X_ctx3"])
    timings["embed_X_ctx3"] = time.time() - t
    log(f"X_ctx3: {adata.obsm['X_ctx3'].shape} in {timings['embed_X_ctx3']:.0f}s")
    return timings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="NH2ST epochs (default: fit_nh2st's, early stopping)")
    p.add_argument("--n-ensemble", type=int, default=5, help="NH2ST members of every NH2ST row (default 5)")
    p.add_argument("--inner", action="store_true", help="model selection over C3..C6 only (C2 never seen)")
    p.add_argument("--e2e-epochs", type=int, default=0, help="epochs of the end-to-end row (0: no such row)")
    p.add_argument("--e2e-folds", default="C2", help="comma-separated test sections of the end-to-end row")
    p.add_argument("--cache", default=None, help="folder where the features are also saved (npy)")
    p.add_argument("--no-ablation", action="store_true", help="only the full NH2ST")
    p.add_argument("--out", default=None, help="results path without suffix (default results/her2st_nh2st[_inner])")
    args = p.parse_args()
    if args.out is None:
        args.out = str(HERE / "results" / ("her2st_nh2st_inner" if args.inner else "her2st_nh2st"))
    hx.settings.progress = False
    hx.settings.device = "cpu"
    t_start = time.time()
    adata, panel, _ = load_sections(args.data_dir, bank=False)
    timings = features(adata, Path(args.cache) if args.cache else None)
    sections = SECTIONS
    if args.inner:
        sections = [s for s in SECTIONS if s != "C2"]
        adata = adata[adata.obs["library_id"].astype(str) != "C2"].copy()
    adata.obsm["X_own+ctx3"] = np.hstack([adata.obsm["X_own"], adata.obsm["X_ctx3"]])
    adata.obsm["X_own+grid"] = np.hstack([adata.obsm["X_own"], adata.obsm["X_own_grid"]])
    truth_all = hx.pp.expression_matrix(adata, panel)
    lib = adata.obs["library_id"].astype(str).to_numpy()
    nh2st_kw = {"epochs": args.epochs, "random_state": args.seed}
    variants = INNER if args.inner else {"nh2st": {}} if args.no_ablation else ablation()
    folds: list[dict] = []
    for test in sections:
        tr, te = lib != test, lib == test
        train, query = adata[tr].copy(), adata[te].copy()
        y_tr, y_te = truth_all[tr], truth_all[te]
        fold = {"test": test, "train": [s for s in sections if s != test], "n_test": int(te.sum()), "methods": {}}

        def record(method, pred, fit_s, predict_s, fold=fold, y_te=y_te, y_tr=y_tr, q=query, test=test, **extra):
            s = fold_summary(pred, y_te, y_tr, panel, coords=np.asarray(q.obsm["spatial"], dtype=float))
            m = {k: s[k] for k in KEYS}
            m.update({k: s[k] for k in ("n_genes", "n_constant_excluded", "n_constant_prediction")})
            m.update(fit_s=round(fit_s, 1), predict_s=round(predict_s, 2), **extra)
            fold["methods"][method] = m
            log(
                f"{test} {method:26s} PCC@M={m['pcc_mean']:.3f} spec={m['pcc_specific_mean']:.3f} "
                f"HVG={m['pcc_hvg']:.3f} MSE={m['mse_mean']:.4f} (fit {fit_s:.0f}s)"
            )

        def timed(fit, key, label, train=train, query=query):
            t = time.time()
            model = fit(train)
            fit_s = time.time() - t
            t = time.time()
            pred = hx.tl.impute(query, model).layers[key]
            record(label, pred, fit_s, time.time() - t)
            return model

        if not args.inner:
            record("mean", np.repeat(y_tr.mean(0, keepdims=True), te.sum(), axis=0), 0.0, 0.0)
            timed(
                lambda tr: hx.tl.fit_ridge(
                    tr, genes=panel, use_rep="X_own", rank=1, crossfit=False, random_state=args.seed, overwrite=True
                ),
                "ridge",
                "one-pattern[own]",
            )
            train.uns.pop("ridge", None)
            for rep in ("own", "own+ctx3", "own+grid"):
                timed(
                    lambda tr, rep=rep: hx.tl.fit_ridge(
                        tr, genes=panel, use_rep=f"X_{rep}", random_state=args.seed, crossfit=False
                    ),
                    "ridge",
                    f"ridge[{rep}]",
                )
                train.uns.pop("ridge", None)
            timed(
                lambda tr: hx.tl.fit_bleep(
                    tr, genes=panel, use_rep="X_own", random_state=args.seed, finetune_encoder=False, crossfit=False
                ),
                "bleep",
                "bleep[own]",
            )
            timed(
                lambda tr: hx.tl.fit_mclstexp(tr, genes=panel, use_rep="X_own", random_state=args.seed, crossfit=False),
                "mclstexp",
                "mclstexp[own]",
            )
        for label, kw in variants.items():
            model = timed(
                lambda tr, kw=kw: hx.tl.fit_nh2st(
                    tr,
                    genes=panel,
                    use_rep="X_own",
                    context_rep="X_own_grid",
                    overwrite=True,
                    crossfit=False,
                    **nh2st_kw,
                    n_ensemble=args.n_ensemble,
                    **kw,
                ),
                "nh2st",
                label,
            )
            h = model.config["history"]
            fold["methods"][label].update(epochs_run=h["epochs_run"], best_epoch=h["best_epoch"])
        if args.e2e_epochs and test in args.e2e_folds.split(",") and not args.inner:
            e2e = {"finetune_encoder": True, "encoder": "resnet18", "weights": None, "epochs": args.e2e_epochs}
            e2e["encoder_kwargs"] = {"transform": {"input_size": 56}}  # no upsampling to 224 px on CPU
            e2e.update(patches_key="p56", patience=args.e2e_epochs, n_ensemble=1, random_state=args.seed)
            for ad_ in (train, query):  # 112 µm windows at 56 px: 25 windows a spot through the CNN on CPU
                hx.pp.extract_patches(ad_, size_um=112, patch_px=56, store="none", key_added="p56", overwrite=True)
            timed(
                lambda tr, e2e=e2e: hx.tl.fit_nh2st(tr, genes=panel, overwrite=True, **e2e),
                "nh2st",
                "nh2st-e2e[resnet18]",
            )
        folds.append(fold)
        write(folds, args, panel, nh2st_kw, timings, t_start, final=False)

    write(folds, args, panel, nh2st_kw, timings, t_start, final=True)


def write(folds, args, panel, nh2st_kw, timings, t_start, *, final: bool) -> None:
    """Write the JSON and Markdown results of the folds so far (after every fold: an interrupted run keeps them)."""
    methods = list(dict.fromkeys(m for f in folds for m in f["methods"]))  # a row may run on some folds only
    cols = (*KEYS, "fit_s")
    mean = {
        m: {k: float(np.mean([f["methods"][m][k] for f in folds if m in f["methods"]])) for k in cols} for m in methods
    }
    n_folds = {m: sum(m in f["methods"] for f in folds) for m in methods}
    timings = {**timings, "total": time.time() - t_start}
    result = {
        "benchmark": "her2st NH2ST leave-one-section-out (C2..C6)",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python benchmarks/her2st_nh2st.py " + " ".join(sys.argv[1:]),
        "settings": {
            "sections": [f["test"] for f in folds],
            "n_panel_genes": len(panel),
            "targets": "log1p(normalize_total 1e4), her2st 785-gene panel, unsmoothed",
            "features": {
                "own": "handcrafted on the spot's 112 um patch at 112 px",
                "ctx3": "handcrafted on one 336 um patch around the spot at 336 px",
                "grid": "handcrafted on the 5x5 windows of 112 um (112 px) around the spot (embed_neighbourhood)",
            },
            "nh2st": {
                **{k: v if v is not None else "fit_nh2st default" for k, v in nh2st_kw.items()},
                "n_ensemble": args.n_ensemble,
                "e2e": {"epochs": args.e2e_epochs, "folds": args.e2e_folds} if args.e2e_epochs else None,
            },
            "metrics": "hx.tl.evaluate definitions: PCC@H = mean of the 50 best-predicted genes; HVG/HEG-50 = "
            "highest variance / mean of the test truth; constant predictions count as r=0",
        },
        "complete": final,
        "folds": folds,
        "mean": mean,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    mc = result["machine"]
    labels = {**LABELS, "fit_s": "fit s"}
    lines = [
        "# her2st: NH2ST, leave-one-section-out, "
        + ("model selection on C3..C6 (C2 never seen)" if args.inner else "with the other methods and an ablation"),
        "",
        f"{result['date']} · {mc['platform']}, {mc['cpu_count']} CPU cores, torch {mc['torch']}, "
        f"histoexp {mc['histoexp']} · `{result['command'].strip()}` · {timings['total']:.0f} s",
        "",
        f"Train on all but one of {', '.join(f['test'] for f in folds)}, predict it; "
        f"{len(panel)}-gene panel, log1p(normalize_total 1e4), unsmoothed "
        f"targets; frozen handcrafted features. Mean over {len(folds)} fold(s)"
        + ("" if final else " (run incomplete)")
        + ":",
        "",
        "| method | " + " | ".join(labels[k] for k in cols) + " |",
        "| --- | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for m in methods:
        label = m if n_folds[m] == len(folds) else f"{m} ({n_folds[m]} fold{'s' if n_folds[m] > 1 else ''})"
        lines.append(f"| {label} | " + " | ".join(f"{mean[m][k]:.3f}" for k in cols) + " |")
    lines += [
        "",
        "PCC@M per fold (test section):",
        "",
        "| method | " + " | ".join(f["test"] for f in folds) + " |",
        "| --- | " + " | ".join("---:" for _ in folds) + " |",
    ]
    for m in methods:
        cells = (f"{f['methods'][m]['pcc_mean']:.3f}" if m in f["methods"] else "–" for f in folds)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    if final:
        print(table)


if __name__ == "__main__":
    main()
