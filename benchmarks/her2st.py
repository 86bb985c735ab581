"""The whole her2st leave-one-section-out table: every method x {own, multi-scale} x {full rank, inner-CV rank}.

Train on four of the five imaged sections of patient C (C2..C6), predict the fifth, for each fold. Targets:
log1p(normalize_total 1e4) of the her2st 785-gene panel. Every setting is chosen inside the four training sections
(ridge's penalty, the output rank, the smoothing weight: leave-one-section-out over the training sections, which is
the models' cross-fitting); the held-out section is only ever predicted and scored.

Features (frozen, the training-free ``handcrafted`` encoder on 112 px crops):

- ``own``: the spot's 112 µm patch (1 µm/px);
- ``ms``: multi-scale, ``hx.tl.embed_patches(scales=(1, 2, 3, 5))``: crops of 112, 224, 336 and 560 µm around the
  spot, each resized to 112 px (1, 2, 3, 5 µm/px), features concatenated;
- ``grid`` (NH2ST's neighbour branch only): the 5 x 5 windows of 112 µm around the spot (``embed_neighbourhood``).

NH2ST runs on ``own`` only: its neighbour branch reads the 5 x 5 windows in the spot features' own representation
(``fit_nh2st`` refuses windows of another width), so NH2ST on multi-scale features would need 5 x 5 windows of
multi-scale features (25 times the multi-scale embedding); its neighbour branch is its own form of context.

Rows, for each feature set ``F``:

- ``mean``: the training mean (correlation 0 by construction); ``one-pattern[F]``: ``fit_ridge(rank=1)``, one
  image-predicted pattern, every gene = its loading on the training expression's first axis x that pattern;
- ``ridge[F]``: ``hx.tl.fit_ridge`` as HEST (standardise, PCA-256, ridge, alpha by leave-one-section-out R²);
- ``<method>+rank[F]`` and ``<method>+rank+smooth[F]``, for ridge, BLEEP, mclSTExp and NH2ST: the method fitted with
  ``rank='auto', smooth_predictions='auto'`` (cross-fitted over the training sections), predicted without and with
  the chosen smoothing; ``<method>[F]`` for the three networks: the same trained networks without the projection
  (full rank), i.e. the method as it was;
- ``selected``: per fold, the cross-fitted configuration whose out-of-fold PCC@M over the *training* sections is best
  (nested: the choice never sees the held-out section), and its score on the held-out section.

Per row and fold: PCC@M, HVG-50, HEG-50, PCC@H, gene-specific PCC@M and HVG-50 (partial correlation given the
training expression's shared axis, ``../shared/EVALUATION.md``), the share of genes whose gene-specific PCC is
significantly positive (spatial effective sample size, BH q < 0.05), MSE, the domain ARI; the paired comparison with
``ridge[own]`` (folds ahead, share of genes ahead); for cross-fitted rows the calibration of the expected accuracy
(Spearman between expected and realised per-gene PCC and gene-specific PCC) and the coverage of the prediction
intervals at 0.8 and 0.9 (mean over genes, worst decile of genes, mean width).

Usage::

    python benchmarks/her2st.py [--data-dir ../shared/data/her2st] [--cache DIR] [--methods ridge bleep ...]
        [--members mclstexp=1 nh2st=1]

``--members`` sets the ensemble size of a network method (default: the method's own, five members for the frozen
networks); with cross-fitting each member is refitted once per training section, so five-member mclSTExp and NH2ST
rows cost about 25 network fits per fold and feature set.

Writes ``benchmarks/results/her2st.json`` and ``benchmarks/results/her2st.md`` (after every fold).
"""

from __future__ import annotations

import argparse
import copy
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
from her2st_bleep import SECTIONS, load_sections  # noqa: E402

SCALES = (1, 2, 3, 5)
METHODS = ("ridge", "bleep", "mclstexp", "nh2st")
KEYS = (
    "pcc_mean",
    "pcc_hvg",
    "pcc_heg",
    "pcc_at_h",
    "pcc_specific_mean",
    "pcc_specific_hvg",
    "frac_specific_significant",
    "mse_mean",
    "mae_mean",
    "spearman_mean",
)
LABELS = {
    "pcc_mean": "PCC@M",
    "pcc_hvg": "HVG-50",
    "pcc_heg": "HEG-50",
    "pcc_at_h": "PCC@H",
    "pcc_specific_mean": "specific PCC@M",
    "pcc_specific_hvg": "specific HVG-50",
    "frac_specific_significant": "specific signif.",
    "mse_mean": "MSE",
    "mae_mean": "MAE",
    "spearman_mean": "Spearman",
    "ari": "domain ARI",
}
TABLE = ("pcc_mean", "pcc_hvg", "pcc_specific_mean", "pcc_specific_hvg", "frac_specific_significant", "pcc_at_h")
TABLE = (*TABLE, "mse_mean", "ari")


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


def features(adata, cache: Path | None, methods) -> dict[str, float]:
    """``obsm['X_own']``, ``obsm['X_ms']`` and (NH2ST) ``obsm['X_grid']``, with their records, cached as npy + json."""
    timings = {}
    hx.pp.extract_patches(adata, size_um=112, patch_px=112, store="none", key_added="p")
    jobs = {
        "X_own": lambda: hx.tl.embed_patches(adata, "handcrafted", patches_key="p", key_added="X_own"),
        "X_ms": lambda: hx.tl.embed_patches(adata, "handcrafted", patches_key="p", key_added="X_ms", scales=SCALES),
    }
    if "nh2st" in methods:
        jobs["X_grid"] = lambda: hx.tl.embed_neighbourhood(
            adata, "handcrafted", grid=5, patches_key="p", key_added="X_grid"
        )
    for key, job in jobs.items():
        t = time.time()
        path = cache / f"{key}.npy" if cache else None
        if path is not None and path.is_file():
            adata.obsm[key] = np.load(path)
            rec = json.loads(path.with_suffix(".json").read_text())
            adata.uns.setdefault("histoexp", {}).setdefault("embeddings", {})[key] = rec
        else:
            job()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, adata.obsm[key])
                path.with_suffix(".json").write_text(json.dumps(adata.uns["histoexp"]["embeddings"][key]))
        timings[f"embed_{key}"] = round(time.time() - t, 1)
        log(f"{key}: {adata.obsm[key].shape} in {timings[f'embed_{key}']:.0f}s")
    return timings


def full_rank(model):
    """The same trained model without its reduced-rank projection and smoothing (the method as it was)."""
    out = copy.copy(model)
    out.config = dict(model.config, rank=None, smooth_predictions=0.0)
    return out


def fit(method: str, train, panel, feats: str, seed: int, **kw):
    """Fit ``method`` on the features ``feats`` with histoexp's defaults (plus ``kw``)."""
    common = {"genes": panel, "use_rep": f"X_{feats}", "random_state": seed, "overwrite": True, **kw}
    if method == "ridge":
        return hx.tl.fit_ridge(train, **common)
    if method == "bleep":
        return hx.tl.fit_bleep(train, finetune_encoder=False, **common)
    if method == "mclstexp":
        return hx.tl.fit_mclstexp(train, finetune_encoder=False, **common)
    if method == "nh2st":
        return hx.tl.fit_nh2st(train, context_rep="X_grid", finetune_encoder=False, **common)
    raise ValueError(method)


def trust(pred, key: str, table) -> dict:
    """Calibration of the expected accuracy and coverage of the intervals of one prediction (cross-fitted)."""
    from scipy.stats import spearmanr

    out = {}
    if "expected_pcc" not in pred.var:
        return out
    ok = table["status"].eq("ok").to_numpy()
    e = pred.var.loc[table.index]
    out["calibration_pcc"] = float(spearmanr(e["expected_pcc"][ok], table["pcc"][ok]).statistic)
    out["calibration_specific"] = float(spearmanr(e["expected_pcc_specific"][ok], table["pcc_specific"][ok]).statistic)
    out["n_expected_specific"] = int(e["expected_specific"].sum())
    truth = np.asarray(pred.layers["measured"])
    for level in (0.8, 0.9):
        hx.tl.prediction_intervals(pred, level=level, key=key)
        lo, hi = np.asarray(pred.layers[f"{key}_lower"]), np.asarray(pred.layers[f"{key}_upper"])
        per_gene = ((truth >= lo) & (truth <= hi)).mean(0)
        tag = f"{int(level * 100)}"
        out[f"coverage_{tag}"] = float(per_gene.mean())
        out[f"coverage_{tag}_worst_decile"] = float(np.quantile(per_gene, 0.1))
        out[f"width_{tag}"] = float((hi - lo).mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    p.add_argument("--cache", default=None, help="folder where the features are also saved (npy + json)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--features", nargs="+", default=["own", "ms"], choices=["own", "ms"])
    p.add_argument("--sections", nargs="+", default=SECTIONS, help="test sections (folds) to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ari", action="store_true", help="skip the spatial-domain ARI")
    p.add_argument(
        "--members",
        nargs="+",
        default=[],
        metavar="METHOD=N",
        help="ensemble size of a network method (e.g. mclstexp=1 nh2st=1; default: the method's own default)",
    )
    p.add_argument("--out", default=str(HERE / "results" / "her2st"))
    args = p.parse_args()
    members = {}
    for item in args.members:
        name, _, n = item.partition("=")
        if name not in METHODS or name == "ridge" or not n.isdigit() or int(n) < 1:
            p.error(f"--members {item!r}: expected METHOD=N with a network method and N >= 1")
        members[name] = int(n)
    hx.settings.progress = False
    hx.settings.device = "cpu"
    t_start = time.time()
    adata, panel, _ = load_sections(args.data_dir, bank=False)
    timings = features(adata, Path(args.cache) if args.cache else None, args.methods)
    truth_all = hx.pp.expression_matrix(adata, panel)
    lib = adata.obs["library_id"].astype(str).to_numpy()
    folds: list[dict] = []
    for test in args.sections:
        tr, te = lib != test, lib == test
        train, query = adata[tr].copy(), adata[te].copy()
        y_tr, y_te = truth_all[tr], truth_all[te]
        axis = hx.tl.shared_axis(y_te, y_tr)
        fold = {"test": test, "train": [s for s in SECTIONS if s != test], "n_test": int(te.sum()), "methods": {}}
        fold["per_gene_pcc"] = {}

        def record(
            label, values, secs, pred=None, key=None, model=None, *, fold=fold, y_te=y_te, q=query, ax=axis, t=test
        ):
            table = hx.tl.gene_metrics(values, y_te, panel, shared_axis=ax, coords=np.asarray(q.obsm["spatial"]))
            s = hx.tl.summarize_metrics(table, n_top=50)
            m = {k: s[k] for k in KEYS}
            m.update({k: s[k] for k in ("n_genes", "n_constant_excluded", "n_constant_prediction")})
            if not args.no_ari:
                m["ari"] = domain_ari(q, values, y_te, panel, args.seed)
            m["seconds"] = round(secs, 1)
            if model is not None:
                m["rank"] = model.rank
                m["smooth"] = model.config.get("smooth_predictions")
                cf = model.config.get("crossfit") or {}
                if cf:
                    m["inner_oof_pcc"] = cf["oof_pcc_mean"]
                    m["crossfit_seconds"] = cf["seconds"]
            if pred is not None:
                m.update(trust(pred, key, table))
            fold["methods"][label] = m
            fold["per_gene_pcc"][label] = table["pcc"].round(4).tolist()
            extra = f" rank={m.get('rank')} smooth={m.get('smooth')}" if model is not None else ""
            cal = f" cal={m['calibration_pcc']:.2f} cov90={m['coverage_90']:.3f}" if "coverage_90" in m else ""
            log(
                f"{t} {label:28s} PCC@M={m['pcc_mean']:.3f} spec={m['pcc_specific_mean']:.3f} "
                f"HVG={m['pcc_hvg']:.3f} MSE={m['mse_mean']:.4f}{extra}{cal} ({secs:.0f}s)"
            )

        record("mean", np.repeat(y_tr.mean(0, keepdims=True), te.sum(), axis=0), 0.0)
        for feats in args.features:
            t = time.time()
            one = fit("ridge", train, panel, feats, args.seed, rank=1, key_added="one")
            pred = hx.tl.impute(query, one, key_added="one")
            record(f"one-pattern[{feats}]", pred.layers["one"], time.time() - t, pred, "one", one)
            if "ridge" in args.methods:
                t = time.time()
                ridge = fit("ridge", train, panel, feats, args.seed, crossfit=False)
                record(f"ridge[{feats}]", hx.tl.impute(query, ridge).layers["ridge"], time.time() - t)
            for method in args.methods:
                if method == "nh2st" and feats != "own":
                    continue  # its neighbour branch reads 5 x 5 windows of the spot features (see the docstring)
                t = time.time()
                size = {"n_ensemble": members[method]} if method in members else {}
                model = fit(method, train, panel, feats, args.seed, rank="auto", smooth_predictions="auto", **size)
                secs = time.time() - t
                key = model.method
                if method != "ridge":
                    record(f"{method}[{feats}]", hx.tl.impute(query, full_rank(model)).layers[key], secs)
                pred = hx.tl.impute(query, model, smooth=0.0)
                record(f"{method}+rank[{feats}]", pred.layers[key], secs, pred, key, model)
                pred = hx.tl.impute(query, model)
                record(f"{method}+rank+smooth[{feats}]", pred.layers[key], secs, pred, key, model)
        # nested choice: the cross-fitted configuration with the best out-of-fold PCC@M on the training sections
        cands = {k: v for k, v in fold["methods"].items() if "+rank+smooth" in k and "inner_oof_pcc" in v}
        if cands:
            best = max(cands, key=lambda k: cands[k]["inner_oof_pcc"])
            fold["methods"]["selected"] = dict(cands[best], chosen=best)
            fold["per_gene_pcc"]["selected"] = fold["per_gene_pcc"][best]
            log(f"{test} selected (inner CV): {best}")
        folds.append(fold)
        write(folds, args, panel, timings, t_start)
    write(folds, args, panel, timings, t_start)


def paired(folds, method: str, base: str = "ridge[own]") -> dict:
    """Per fold: PCC@M and gene-specific PCC@M differences with ``base``; folds ahead; share of genes ahead."""
    d_pcc = [f["methods"][method]["pcc_mean"] - f["methods"][base]["pcc_mean"] for f in folds]
    d_spec = [f["methods"][method]["pcc_specific_mean"] - f["methods"][base]["pcc_specific_mean"] for f in folds]
    genes = []
    for f in folds:
        a, b = np.asarray(f["per_gene_pcc"][method], float), np.asarray(f["per_gene_pcc"][base], float)
        ok = np.isfinite(a) & np.isfinite(b)
        genes.append(float((a[ok] > b[ok]).mean()))
    return {
        "delta_pcc": [round(x, 4) for x in d_pcc],
        "delta_specific": [round(x, 4) for x in d_spec],
        "folds_ahead_pcc": int(sum(x > 0 for x in d_pcc)),
        "folds_ahead_specific": int(sum(x > 0 for x in d_spec)),
        "genes_ahead": float(np.mean(genes)),
    }


def write(folds, args, panel, timings, t_start) -> None:
    """JSON and Markdown of the folds so far."""
    methods = list(dict.fromkeys(m for f in folds for m in f["methods"]))
    methods = [m for m in methods if all(m in f["methods"] for f in folds)]
    cols = [*KEYS, "ari", "calibration_pcc", "calibration_specific", "n_expected_specific"]
    cols += [f"{c}_{lv}" for lv in ("80", "90") for c in ("coverage", "width")]
    cols += ["coverage_80_worst_decile", "coverage_90_worst_decile"]
    mean = {}
    for m in methods:
        mean[m] = {}
        for k in cols:
            vals = [f["methods"][m].get(k) for f in folds]
            if all(v is not None for v in vals):
                mean[m][k] = float(np.mean(vals))
    base = "ridge[own]" if "ridge[own]" in methods else None
    pairs = {m: paired(folds, m, base) for m in methods if base and m not in ("mean", base)}
    result = {
        "benchmark": "her2st leave-one-section-out (C2..C6), every method x {own, multi-scale} x {full, inner-CV rank}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python benchmarks/her2st.py " + " ".join(sys.argv[1:]),
        "complete": len(folds) == len(args.sections),
        "settings": {
            "sections": SECTIONS,
            "n_panel_genes": len(panel),
            "targets": "log1p(normalize_total 1e4), her2st 785-gene panel",
            "features": {
                "own": "handcrafted on the 112 um patch at 112 px",
                "ms": f"handcrafted on crops of {[112 * s for s in SCALES]} um each at 112 px (embed_patches scales)",
                "grid": "NH2ST neighbour branch: handcrafted on the 5 x 5 windows of 112 um (embed_neighbourhood)",
            },
            "tuning": "alpha, rank, smoothing chosen inside the training sections (leave-one-section-out / "
            "cross-fitting); the held-out section is never used to choose",
            "metrics": "hx.tl.gene_metrics with the training shared axis and the spots' positions; PCC@H = mean of "
            "the 50 best-predicted genes; HVG/HEG-50 = highest variance / mean of the test truth",
        },
        "folds": folds,
        "mean": mean,
        "paired_vs_ridge_own": pairs,
        "timings_s": {**timings, "total": round(time.time() - t_start, 1)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    mc = result["machine"]
    shown = [c for c in TABLE if any(c in mean[m] for m in methods)]
    lines = [
        "# her2st: leave-one-section-out, every method x features x rank",
        "",
        f"{result['date']} · {mc['platform']}, {mc['cpu_count']} CPU cores, torch {mc['torch']}, "
        f"histoexp {mc['histoexp']} · `{result['command'].strip()}` · {result['timings_s']['total']:.0f} s"
        + ("" if result["complete"] else f" · **partial: {len(folds)} folds**"),
        "",
        f"Train on four of C2..C6, predict the fifth; {len(panel)}-gene panel, log1p(normalize_total 1e4); handcrafted "
        "features (`own`: 112 µm patch; `ms`: 112/224/336/560 µm crops at 112 px). Everything tuned inside the "
        "training sections. Mean over the folds:",
        "",
        "| method | " + " | ".join(LABELS[k] for k in shown) + " |",
        "| --- | " + " | ".join("---:" for _ in shown) + " |",
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{mean[m][k]:.3f}" if k in mean[m] else "" for k in shown) + " |")
    secs = [f["test"] for f in folds]
    lines += ["", "PCC@M / gene-specific PCC@M per fold (test section):", ""]
    lines += ["| method | " + " | ".join(secs) + " |", "| --- | " + " | ".join("---:" for _ in secs) + " |"]
    for m in methods:
        vals = [f"{f['methods'][m]['pcc_mean']:.3f} / {f['methods'][m]['pcc_specific_mean']:.3f}" for f in folds]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    if any("chosen" in f["methods"].get("selected", {}) for f in folds):
        lines += [
            "",
            "Inner-CV choice per fold (`selected`): "
            + ", ".join(
                f"{f['test']}: {f['methods']['selected']['chosen']}" for f in folds if "selected" in f["methods"]
            ),
        ]
    if pairs:
        lines += ["", "Paired with ridge[own] (per fold ΔPCC@M; folds ahead on PCC@M / gene-specific; genes ahead):"]
        lines += [""]
        lines += ["| method | ΔPCC@M per fold | folds ahead | folds ahead (specific) | genes ahead |"]
        lines += ["| --- | --- | ---: | ---: | ---: |"]
        for m, pr in pairs.items():
            lines.append(
                f"| {m} | {' '.join(f'{x:+.3f}' for x in pr['delta_pcc'])} | {pr['folds_ahead_pcc']}/{len(folds)} | "
                f"{pr['folds_ahead_specific']}/{len(folds)} | {pr['genes_ahead']:.2f} |"
            )
    trust_rows = [m for m in methods if "coverage_90" in mean[m]]
    if trust_rows:
        lines += [
            "",
            "Trust (cross-fitted rows): Spearman between expected and realised per-gene PCC / gene-specific PCC, "
            "genes expected to carry gene-specific signal, interval coverage (mean over genes, worst decile) and "
            "mean width at 0.8 and 0.9:",
            "",
            "| method | calib. PCC | calib. specific | expected specific | cov 0.8 | worst 10% | width 0.8 | cov 0.9 "
            "| worst 10% | width 0.9 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for m in trust_rows:
            r = mean[m]
            lines.append(
                f"| {m} | {r['calibration_pcc']:.2f} | {r['calibration_specific']:.2f} "
                f"| {r['n_expected_specific']:.0f} "
                f"| {r['coverage_80']:.3f} | {r['coverage_80_worst_decile']:.3f} | {r['width_80']:.2f} "
                f"| {r['coverage_90']:.3f} | {r['coverage_90_worst_decile']:.3f} | {r['width_90']:.2f} |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:60]))


if __name__ == "__main__":
    main()
