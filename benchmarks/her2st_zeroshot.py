"""Zero-shot genes on her2st: leave-one-section-out over C2..C6 × gene folds, every variant next to its control.

Protocol. The 785-gene panel (the genes with a co-expression embedding) is split into five random gene folds
(seed ``--gene-seed``). For each held-out section of C2..C6 and each gene fold, a zero-shot model trains on the other
four sections with the fold's genes removed entirely (their counts from C2..C6 enter no axis, mean, penalty, map or
embedding) and predicts the fold's genes on the held-out section. Gene embeddings: ``hx.pp.gene_embeddings`` (64-d
co-expression SVD) of the 29 count-only sections of patients A, B, D-H (C1, another section of patient C, is left
out: same patient). The models receive the embedding rows of the panel genes, so the control's shuffle permutes
embeddings among panel genes. Targets: log1p(normalize_total 1e4) (the library size counts every gene of a spot,
held-out ones included: a per-spot depth, no gene's pattern). Features: ``hx.tl.embed_patches(...,
encoder='handcrafted')`` on 112 µm patches at 112 px.

Rows (each zero-shot variant with its **control**: the same model trained with the embeddings shuffled among genes):

- ``mean``: each gene's training mean (uses the held-out genes' counts; PCC 0 by construction);
- ``one-pattern``: ``fit_ridge(rank=1)`` trained on the held-out genes (the image predicts the first expression
  axis' score; every gene = its training mean + loading × score);
- ``ridge-supervised``: ``fit_ridge`` (full rank) trained on the held-out genes' counts in the training sections,
  the ceiling the zero-shot figures are compared with; ``ridge-supervised[rank auto]``: ``fit_ridge(rank='auto')``;
- ``zeroshot-axes`` (the default of ``fit_zeroshot``): image → top-``rank`` expression axes of the training genes,
  embedding → a gene's loadings and mean (``rank='auto'``, chosen by gene-fold cross-fitting inside the training
  sections); ``zeroshot-axes[rank 1]``: the same with one axis;
- ``similarity-mix``: each held-out gene = the cosine-weighted mix of its 20 most similar training genes' ridge
  predictions (standardised);
- ``neural-*``: ``fit_zeroshot(method='neural')`` (SGN form; ``+prompter``, ``+graph``, ``+nuclei``,
  ``genes_per_step=128``).

Metrics (``hx.tl.gene_metrics``), per held-out section on the 785 genes (the five folds' predictions joined) and per
gene fold (mean over the five sections of that fold's genes): PCC@M and **gene-specific PCC@M** (partial
correlation given the section's shared axis ``s``, the score of its measured panel expression on the first
principal axis of the training sections' panel expression; ``hx.tl.shared_axis``). A third figure,
``specific-2``, removes the first *two* training axes: on this panel the first axis is a tumour/stroma contrast
(about a third of the genes load positively) and the second is the depth pattern most genes share (97 % of the
genes load with one sign; its score correlates −0.98 with the section's total log-expression), which the
one-axis definition leaves in: a predictor of that pattern alone, knowing no gene, scores a high one-axis
gene-specific PCC (the controls below). Expected accuracy of the unseen genes (``var['expected_pcc']`` that
``impute`` writes from the default model's cross-fitting): Spearman correlation with the realised PCC, per cell.

Usage::

    python benchmarks/her2st_zeroshot.py [--data-dir ../shared/data/her2st] [--cache DIR] [--no-neural]

Writes ``benchmarks/results/her2st_zeroshot.json`` and ``.md``.
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
import pandas as pd

import histoexp as hx
from histoexp._stats import expression_axes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from her2st_bleep import SECTIONS, embed  # noqa: E402

NUCLEI = ("h_mean", "h_std", "h_p90", "nuclei_fraction", "nuclei_count", "nuclei_mean_area")
NEURAL = {
    "neural-sgn": {},
    "neural+prompter": {"prompter_layers": 1},
    "neural+graph": {"graph_k": 16},
    "neural+nuclei": {"nuclei_rep": "X_nuclei", "nuclei_tokens": 4},
}
#: supervised rows: no cross-fitting (its expected-accuracy tables are not used here; predictions are the same)
RIDGE = {"use_rep": "X_handcrafted", "crossfit": False, "overwrite": True}
#: variants whose control is also run with the whole embedding table as the shuffle's pool
ALL_GENES_CONTROL = ("zeroshot-axes", "neural-sgn")
KEYS = ("pcc_mean", "pcc_specific_mean", "specific2_mean", "mse_mean")
LABELS = {
    "pcc_mean": "PCC@M",
    "pcc_specific_mean": "gene-specific PCC@M",
    "specific2_mean": "specific-2 PCC@M",
    "mse_mean": "MSE",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def nuclei_quadrants(adata) -> np.ndarray:
    """The handcrafted nuclei statistics of the four quadrants of each spot's 112 µm patch (n, 24)."""
    from histoexp.models.handcrafted import FEATURE_NAMES, handcrafted_features

    cols = [FEATURE_NAMES.index(n) for n in NUCLEI]
    tmp = adata.copy()
    hx.pp.extract_patches(tmp, size_um=112, patch_px=112, key_added="p")
    src = hx.pp.get_patches(tmp, key="p")
    out = []
    for start in range(0, tmp.n_obs, 256):
        batch = src.batch(np.arange(start, min(start + 256, tmp.n_obs)))
        h = batch.shape[1] // 2
        quads = [batch[:, :h, :h], batch[:, :h, h:], batch[:, h:, :h], batch[:, h:, h:]]
        out.append(np.concatenate([handcrafted_features(q)[:, cols] for q in quads], axis=1))
    return np.concatenate(out).astype(np.float32)


def similarity_mix(pred_seen: np.ndarray, emb_seen: np.ndarray, emb_unseen: np.ndarray, k: int = 20) -> np.ndarray:
    """Unseen genes as the similarity-weighted mix of the seen genes' standardised predictions (top-k, sim > 0)."""
    z = (pred_seen - pred_seen.mean(0)) / np.maximum(pred_seen.std(0), 1e-8)
    a = emb_unseen / np.linalg.norm(emb_unseen, axis=1, keepdims=True)
    b = emb_seen / np.linalg.norm(emb_seen, axis=1, keepdims=True)
    sim = a @ b.T
    w = np.zeros_like(sim)
    top = np.argsort(-sim, axis=1)[:, :k]
    rows = np.arange(len(sim))[:, None]
    w[rows, top] = np.clip(sim[rows, top], 0, None)
    w /= np.maximum(w.sum(1, keepdims=True), 1e-12)
    return (z @ w.T).astype(np.float32)


def residualise(x: np.ndarray, covariates: np.ndarray) -> np.ndarray:
    a = np.c_[np.ones(len(covariates)), covariates]
    coef, *_ = np.linalg.lstsq(a, x, rcond=None)
    return x - a @ coef


def gene_table(pred: np.ndarray, truth: np.ndarray, genes: list[str], s: np.ndarray, s2: np.ndarray) -> pd.DataFrame:
    """Per gene: hx.tl.gene_metrics (PCC, gene-specific PCC given ``s``, MSE) and the partial r given two axes."""
    table = hx.tl.gene_metrics(pred, truth, genes, shared_axis=s)
    from histoexp._stats import partial_pearson

    r2, _ = partial_pearson(residualise(pred.astype(np.float64), s2), residualise(truth.astype(np.float64), s2), None)
    table["specific2"] = np.where(table["status"] == "constant_truth", np.nan, r2)
    return table


def summary(table: pd.DataFrame) -> dict:
    ev = table[table["status"].isin(["ok", "constant_prediction"])]
    return {
        "pcc_mean": float(ev["pcc"].mean()),
        "pcc_specific_mean": float(ev["pcc_specific"].fillna(0).mean()),
        "specific2_mean": float(ev["specific2"].fillna(0).mean()),
        "mse_mean": float(ev["mse"].mean()),
        "n_genes": len(ev),
    }


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "histoexp": hx.__version__,
    }


def cached(cache: Path | None, name: str, fn):
    f = cache / name if cache else None
    if f is not None and f.is_file():
        return np.load(f) if f.suffix == ".npy" else pd.read_parquet(f)
    x = fn()
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp{f.suffix}")
        np.save(tmp, x) if f.suffix == ".npy" else x.to_parquet(tmp)
        os.replace(tmp, f)
    return x


def common_args(p: argparse.ArgumentParser, out_name: str) -> None:
    """The arguments every her2st zero-shot script shares: data, cache, seeds, output path."""
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    p.add_argument("--cache", default=None, help="folder caching features and gene embeddings")
    p.add_argument("--gene-seed", type=int, default=0, help="seed of the five gene folds")
    p.add_argument("--seed", type=int, default=0, help="model seed and the controls' shuffle seed")
    p.add_argument("--out", default=str(HERE / "results" / out_name), help="results path without suffix")


def write_results(out: str | Path, result: dict, text: str) -> None:
    """Write ``out``.json and ``out``.md, each through a temporary file (no half-written result on a kill)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, body in ((".json", json.dumps(result, indent=1, default=str)), (".md", text + "\n")):
        tmp = out.with_name(f".{out.name}{suffix}.tmp")
        tmp.write_text(body)
        os.replace(tmp, out.with_suffix(suffix))


def supervised_baselines(train, query, genes: list[str], rep: str) -> dict[str, np.ndarray]:
    """The protocol's reference rows on ``genes`` (trained on their counts): mean, one-pattern, ridge (predictions)."""
    kw = {"genes": genes, "use_rep": rep, "crossfit": False, "overwrite": True}
    ridge = hx.tl.fit_ridge(train, **kw)
    one = hx.tl.fit_ridge(train, rank=1, **kw)
    out = {
        "ridge (supervised)": hx.tl.impute(query, ridge, interval=None).layers["ridge"],
        "one-pattern (supervised)": hx.tl.impute(query, one, interval=None).layers["ridge"],
    }
    level = np.asarray(ridge.config["expression_mean"], np.float32)
    out["mean"] = np.broadcast_to(level, out["ridge (supervised)"].shape)
    return out


def multiscale(adata) -> np.ndarray:
    """Handcrafted features of the 112 µm patch and its 2x, 3x, 5x context, each at 112 px, concatenated."""
    tmp = adata.copy()
    hx.pp.extract_patches(tmp, size_um=112, patch_px=112, store="none", key_added="p")
    hx.tl.embed_patches(tmp, "handcrafted", patches_key="p", key_added="X", scales=(1, 2, 3, 5))
    return np.asarray(tmp.obsm["X"], dtype=np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    p.add_argument("--sections", nargs="+", default=SECTIONS)
    p.add_argument("--folds", type=int, nargs="+", default=None, help="gene folds to run (default all five)")
    p.add_argument("--n-components", type=int, default=64)
    p.add_argument("--gene-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="model seed and the controls' shuffle seed")
    p.add_argument("--no-neural", action="store_true", help="skip the neural (SGN) rows")
    p.add_argument("--neural", nargs="+", default=list(NEURAL), help="neural variants to run")
    p.add_argument("--cache", default=None, help="folder caching features and gene embeddings")
    p.add_argument(
        "--features",
        default="own",
        choices=["own", "ms"],
        help="image features: own (the 112 µm patch) or ms (scales 1, 2, 3, 5 of it, embed_patches(scales=...))",
    )
    p.add_argument("--out", default=None, help="results path without suffix (default results/her2st_zeroshot[_ms])")
    args = p.parse_args()
    if args.out is None:
        args.out = str(HERE / "results" / ("her2st_zeroshot" if args.features == "own" else "her2st_zeroshot_ms"))
    hx.settings.progress = False
    hx.settings.device = "cpu"
    t_start = time.time()
    timings: dict[str, float] = {}

    t = time.time()
    adata = hx.datasets.her2st(SECTIONS, data_dir=args.data_dir)
    panel = [g for g in hx.datasets.her2st_gene_panel() if g in adata.var_names]
    others = [s for s in hx.datasets.her2st_sections() if not s.startswith("C")]
    timings["load"] = time.time() - t
    cache = Path(args.cache) if args.cache else None

    def coexpression():
        bank = hx.datasets.her2st(others, data_dir=args.data_dir)
        log(f"count-only bank: {len(others)} sections, {bank.n_obs} spots")
        return hx.pp.gene_embeddings(bank, n_components=args.n_components, random_state=args.seed)

    t = time.time()
    emb = cached(cache, f"gene_embeddings_{args.n_components}.parquet", coexpression)
    timings["gene_embeddings"] = time.time() - t
    missing = [g for g in panel if g not in emb.index]
    panel = [g for g in panel if g in emb.index]
    table = emb.loc[panel]
    log(f"C2..C6 {adata.n_obs} spots; panel {len(panel)} genes with embeddings (without: {missing})")
    for name, fn in (
        ("handcrafted", lambda: embed(adata, "handcrafted", patch_px=112, size_um=112))
        if args.features == "own"
        else ("handcrafted_ms", lambda: multiscale(adata)),
        ("nuclei", lambda: nuclei_quadrants(adata)),
    ):
        t = time.time()
        # every model reads obsm['X_handcrafted']: the chosen features
        adata.obsm["X_handcrafted" if name.startswith("handcrafted") else f"X_{name}"] = cached(
            cache, f"{name}.npy", fn
        )
        timings[f"features_{name}"] = time.time() - t
    neural = [] if args.no_neural else list(args.neural)

    rng = np.random.default_rng(args.gene_seed)
    fold_of = dict(zip(panel, rng.permutation(len(panel)) % 5, strict=True))
    folds = args.folds if args.folds is not None else list(range(5))
    lib = adata.obs["library_id"].astype(str).to_numpy()
    truth_all = hx.pp.expression_matrix(adata, panel)
    eval_genes = [g for g in panel if fold_of[g] in folds]
    col = {g: i for i, g in enumerate(eval_genes)}
    zs_rows = ["zeroshot-axes", "zeroshot-axes[rank 1]", "similarity-mix", *neural]
    methods = ["mean", "one-pattern", "ridge-supervised", "ridge-supervised[rank auto]"]
    for m in zs_rows:
        methods += [m, f"{m} CONTROL"] + ([f"{m} CONTROL[all genes]"] if m in ALL_GENES_CONTROL else [])
    pairs = [(m, m, f"{m} CONTROL") for m in zs_rows]
    pairs += [(f"{m} vs CONTROL[all genes]", m, f"{m} CONTROL[all genes]") for m in zs_rows if m in ALL_GENES_CONTROL]
    secs = dict.fromkeys(methods, 0.0)
    per_section, per_cell, calibration, ranks = [], [], [], []
    for test in args.sections:
        tr, te = lib != test, lib == test
        train, query = adata[tr].copy(), adata[te].copy()
        truth = truth_all[te][:, [panel.index(g) for g in eval_genes]]
        s = hx.tl.shared_axis(truth_all[te], truth_all[tr])
        mean_tr, axes_tr = expression_axes(truth_all[tr], 2)
        s2 = (truth_all[te] - mean_tr) @ axes_tr
        preds = {m: np.zeros((te.sum(), len(eval_genes)), np.float32) for m in methods}

        def run(name, fn, *a, **kw):
            t0 = time.time()
            out = fn(*a, **kw)
            secs[name] += time.time() - t0
            return out

        # supervised rows: trained on the evaluated genes' own counts
        ridge = run("ridge-supervised", hx.tl.fit_ridge, train, genes=eval_genes, **RIDGE)
        preds["ridge-supervised"] = hx.tl.impute(query, ridge, interval=None).layers["ridge"]
        preds["mean"][:] = np.asarray(ridge.config["expression_mean"], dtype=np.float32)
        for name, rank in (("one-pattern", 1), ("ridge-supervised[rank auto]", "auto")):
            model = run(name, hx.tl.fit_ridge, train, genes=eval_genes, rank=rank, **RIDGE)
            preds[name] = hx.tl.impute(query, model, interval=None).layers["ridge"]
        for fold in folds:
            seen = [g for g in panel if fold_of[g] != fold]
            unseen = [g for g in panel if fold_of[g] == fold]
            cols = [col[g] for g in unseen]
            for shuffle in (False, True):
                tag = " CONTROL" if shuffle else ""
                common = {"gene_embeddings": table, "genes": seen, "use_rep": "X_handcrafted"}
                common.update(shuffle_embeddings=shuffle, random_state=args.seed, overwrite=True)
                for name, extra in (("zeroshot-axes", {}), ("zeroshot-axes[rank 1]", {"rank": 1, "crossfit": False})):
                    model = run(name + tag, hx.tl.fit_zeroshot, train, **common, **extra)
                    assert model.form == "axes" and bool(model.config.get("shuffle_embeddings")) == shuffle
                    out = hx.tl.impute(query, model, genes=unseen, interval=None)
                    assert not out.var["seen_in_training"].any()
                    preds[name + tag][:, cols] = out.layers["zeroshot"]
                    if name == "zeroshot-axes":
                        k = model.config["axes_rank"]
                        ranks.append({"test": test, "fold": fold, "control": shuffle, "rank": k})
                        if not shuffle:
                            realised = hx.tl.gene_metrics(out.layers["zeroshot"], truth[:, cols], unseen)["pcc"]
                            expected = out.var["expected_pcc"].to_numpy()
                            ok = np.isfinite(realised.to_numpy()) & np.isfinite(expected)
                            rho = pd.Series(expected[ok]).corr(pd.Series(realised.to_numpy()[ok]), method="spearman")
                            calibration.append({"test": test, "fold": fold, "spearman": float(rho)})
                for name in neural:
                    kw = {"method": "neural", "genes_per_step": 128, **NEURAL[name]}
                    model = run(name + tag, hx.tl.fit_zeroshot, train, **common, **kw)
                    out = hx.tl.impute(query, model, genes=unseen, interval=None)
                    preds[name + tag][:, cols] = out.layers["zeroshot"]
                t0 = time.time()
                e = hx.tl.shuffle_embedding_table(table, args.seed) if shuffle else table
                sub = hx.tl.fit_ridge(train, genes=seen, **RIDGE)
                pred_seen = hx.tl.impute(query, sub, interval=None).layers["ridge"]
                mix = similarity_mix(pred_seen, e.loc[seen].to_numpy(), e.loc[unseen].to_numpy())
                preds["similarity-mix" + tag][:, cols] = mix
                secs["similarity-mix" + tag] += time.time() - t0
            # the same controls with the whole embedding table (11,927 genes) as the shuffle's pool
            for name in [m for m in zs_rows if m in ALL_GENES_CONTROL]:
                kw = {"method": "neural", "genes_per_step": 128, **NEURAL[name]} if name in NEURAL else {}
                tag = " CONTROL[all genes]"
                model = run(
                    name + tag,
                    hx.tl.fit_zeroshot,
                    train,
                    gene_embeddings=emb,
                    genes=seen,
                    use_rep="X_handcrafted",
                    shuffle_embeddings=True,
                    random_state=args.seed,
                    overwrite=True,
                    **kw,
                )
                preds[name + tag][:, cols] = hx.tl.impute(query, model, genes=unseen, interval=None).layers["zeroshot"]
            log(f"{test} fold {fold} done ({time.time() - t_start:.0f} s)")
        res = {"test": test, "n_test": int(te.sum()), "methods": {}}
        for m in methods:
            gt = gene_table(preds[m], truth, eval_genes, s, s2)
            res["methods"][m] = summary(gt)
            for fold in folds:
                sub = gt.loc[[g for g in eval_genes if fold_of[g] == fold]]
                per_cell.append({"test": test, "fold": fold, "method": m, **summary(sub)})
            r = res["methods"][m]
            log(
                f"{test} {m:34s} PCC@M {r['pcc_mean']:.3f} specific {r['pcc_specific_mean']:.3f} "
                f"specific-2 {r['specific2_mean']:.3f}"
            )
        per_section.append(res)

    cells = pd.DataFrame(per_cell)
    mean = {m: {k: float(np.mean([s["methods"][m][k] for s in per_section])) for k in KEYS} for m in methods}
    by_fold = cells.groupby(["method", "fold"])[list(KEYS)].mean()
    sup = mean["ridge-supervised"]
    paired = {}
    for label, m, c in pairs:
        d_sec = {k: [s["methods"][m][k] - s["methods"][c][k] for s in per_section] for k in KEYS[:3]}
        d_fold = {k: [by_fold.loc[(m, f), k] - by_fold.loc[(c, f), k] for f in folds] for k in KEYS[:3]}
        paired[label] = {
            "control": c,
            "margin_over_control": {k: float(np.mean(v)) for k, v in d_sec.items()},
            "min_margin_over_sections": {k: float(np.min(v)) for k, v in d_sec.items()},
            "sections_ahead_by_0.02": {k: int(np.sum(np.asarray(v) >= 0.02)) for k, v in d_sec.items()},
            "min_margin_over_gene_folds": {k: float(np.min(v)) for k, v in d_fold.items()},
            "gene_folds_ahead_by_0.02": {k: int(np.sum(np.asarray(v) >= 0.02)) for k, v in d_fold.items()},
            "fraction_of_supervised_ridge": {
                k: mean[m][k] / sup[k] for k in ("pcc_mean", "pcc_specific_mean", "specific2_mean")
            },
        }
    timings["total"] = time.time() - t_start
    result = {
        "benchmark": "her2st zero-shot: leave-one-section-out (C2..C6) x 5 gene folds, each variant and its control",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python benchmarks/her2st_zeroshot.py " + " ".join(sys.argv[1:]),
        "settings": {
            "sections": args.sections,
            "folds": folds,
            "gene_seed": args.gene_seed,
            "seed": args.seed,
            "n_panel_genes": len(panel),
            "panel_genes_without_embedding": missing,
            "targets": "log1p(normalize_total 1e4) of the her2st 785-gene panel",
            "gene_embeddings": emb.attrs.get("histoexp") or f"coexpression, {args.n_components} dims (cached)",
            "embedding_sections": others,
            "features": (
                "handcrafted encoder, 112 um patches at 112 px"
                if args.features == "own"
                else "handcrafted encoder on 112/224/336/560 um crops at 112 px (embed_patches scales 1, 2, 3, 5)"
            )
            + "; nuclei: 6 nuclei stats x 4 quadrants",
            "neural_variants": {n: {"genes_per_step": 128, **NEURAL[n]} for n in neural},
        },
        "sections": per_section,
        "cells": per_cell,
        "mean": mean,
        "paired": paired,
        "expected_accuracy_calibration": {
            "cells": calibration,
            "mean_spearman": float(np.mean([c["spearman"] for c in calibration])) if calibration else None,
        },
        "ranks": ranks,
        "seconds": {k: round(v, 1) for k, v in secs.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    text = report(result, methods, [p[0] for p in pairs], by_fold, folds)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


def report(result: dict, methods: list[str], zs_rows: list[str], by_fold, folds: list[int]) -> str:
    mc, st, mean = result["machine"], result["settings"], result["mean"]
    secs = result["sections"]
    lines = [
        "# her2st zero-shot: leave-one-section-out × gene folds, each variant next to its control",
        "",
        f"{result['date']} · {mc['platform']}, {mc['cpu_count']} CPU cores, torch {mc['torch']}, "
        f"histoexp {mc['histoexp']} · `{result['command'].strip()}` · {result['timings_s']['total']:.0f} s",
        "",
        f"Sections {', '.join(st['sections'])} held out in turn × {len(folds)} gene folds of the {st['n_panel_genes']} "
        "panel genes with an embedding (seed "
        f"{st['gene_seed']}). Each gene is predicted on the held-out section by a model that never saw its counts in "
        "C2..C6 (zero-shot rows) or by the supervised rows trained on them. Gene embeddings: 64-d co-expression of "
        f"{len(st['embedding_sections'])} count-only sections of patients A, B, D-H. Features: {st['features']}. "
        "CONTROL = the same model with the embeddings shuffled among the panel genes (CONTROL[all genes]: "
        "among the whole table's 11,927 genes). Gene-specific PCC: "
        "partial r given the section's score on the first training axis (EVALUATION.md); specific-2: given its scores "
        "on the first two training axes (see the script's docstring). Mean over the held-out sections:",
        "",
        "| method | " + " | ".join(LABELS[k] for k in KEYS) + " |",
        "| --- | " + " | ".join("---:" for _ in KEYS) + " |",
    ]
    for m in methods:
        lines.append(
            f"| {m} | "
            + " | ".join(f"{mean[m][k]:.4f}" if k != "mse_mean" else f"{mean[m][k]:.3f}" for k in KEYS)
            + " |"
        )
    lines += [
        "",
        "Margin over the control (mean over sections; min over sections; min over gene folds) and share of "
        "the supervised ridge:",
        "",
        "| variant | Δ PCC@M | Δ gene-specific | Δ specific-2 | sections ≥ 0.02 (PCC / specific / specific-2) | "
        "gene folds ≥ 0.02 | % of ridge (PCC / specific / specific-2) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in zs_rows:
        pr = result["paired"][m]
        d, lo, fl = pr["margin_over_control"], pr["min_margin_over_sections"], pr["min_margin_over_gene_folds"]
        cells = [f"{d[k]:+.4f} (min {lo[k]:+.4f}; folds min {fl[k]:+.4f})" for k in KEYS[:3]]
        ahead = pr["sections_ahead_by_0.02"]
        fa = pr["gene_folds_ahead_by_0.02"]
        fr = pr["fraction_of_supervised_ridge"]
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | {ahead['pcc_mean']}/{ahead['pcc_specific_mean']}/"
            f"{ahead['specific2_mean']} of {len(secs)} | {fa['pcc_mean']}/{fa['pcc_specific_mean']}/"
            f"{fa['specific2_mean']} of {len(folds)} | {100 * fr['pcc_mean']:.0f} / {100 * fr['pcc_specific_mean']:.0f}"
            f" / {100 * fr['specific2_mean']:.0f} |"
        )
    for k in KEYS[:3]:
        lines += [
            "",
            f"{LABELS[k]} per held-out section:",
            "",
            "| method | " + " | ".join(s["test"] for s in secs) + " |",
            "| --- | " + " | ".join("---:" for _ in secs) + " |",
        ]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(f"{s['methods'][m][k]:.4f}" for s in secs) + " |")
        lines += [
            "",
            f"{LABELS[k]} per gene fold (mean over sections):",
            "",
            "| method | " + " | ".join(f"fold {f}" for f in folds) + " |",
            "| --- | " + " | ".join("---:" for _ in folds) + " |",
        ]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(f"{by_fold.loc[(m, f), k]:.4f}" for f in folds) + " |")
    cal = result["expected_accuracy_calibration"]
    rk = pd.DataFrame(result["ranks"])
    lines += [
        "",
        f"Expected accuracy of unseen genes (zeroshot-axes, `var['expected_pcc']`): Spearman with the realised PCC, "
        f"mean over {len(cal['cells'])} cells: {cal['mean_spearman']:.3f}. Ranks chosen (zeroshot-axes): "
        + ", ".join(f"{k}×{v}" for k, v in rk[~rk.control]["rank"].value_counts().sort_index().items())
        + "; controls: "
        + ", ".join(f"{k}×{v}" for k, v in rk[rk.control]["rank"].value_counts().sort_index().items())
        + ".",
        "",
        "Fit seconds over all cells: " + ", ".join(f"{m} {v:.0f}" for m, v in result["seconds"].items()) + ".",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
