"""Multi-scale image features on her2st: cost next to single-scale and the 5 x 5 neighbourhood, and a ridge check.

**Timing** (one run, side by side, on the spots of C2..C5: the 732 spots of the training sections of the C6 fold,
the demo's held-out section; the 259 s figure of ``embed_neighbourhood`` in issue 20 is for 732 spots). Patches
of 112 µm at 112 px
(1 µm/px) read from the slide on demand (``store='none'``), handcrafted encoder (CPU, training-free):

- ``single``: ``hx.tl.embed_patches`` (one 112 µm crop a spot);
- ``multiscale``: ``hx.tl.embed_patches(scales=(1, 2, 3, 5))`` (crops of 112, 224, 336 and 560 µm, each at
  112 px; one read of the widest context a spot);
- ``per-scale``: the same four crops cut by hand, ``extract_patches(size_um=s * 112)`` then ``embed_patches``
  for each scale (four slide reads a spot): what ``multiscale`` replaces;
- ``crops only``: the multi-scale crops without the encoder (the read + resample part of ``multiscale``);
- ``neighbourhood``: ``hx.tl.embed_neighbourhood(grid=5)`` (25 windows of 112 µm a spot).

Ratios are seconds over the ``single`` seconds of the same round; ``--rounds N`` repeats the set, in turn, and
reports the median. The JPEGs are decoded once before timing (a warm-up), so no row pays the decoding.

**Accuracy check** (not a benchmark of methods): leave-one-section-out over C2..C6 (train on four, predict the
fifth), 785-gene her2st panel (``hx.datasets.her2st_gene_panel()``), targets log1p(normalize_total 1e4);
``hx.tl.fit_ridge`` defaults (standardise, PCA-256, alpha chosen by leave-one-section-out inside the training
sections); features ``own`` (the 112 µm crop, 37 handcrafted features) or ``ms`` (scales 1, 2, 3, 5: 148). The
scales are fixed (those of issue 20), not tuned. Rows: the training mean, the one-pattern baseline (ridge predicts
the score on the first principal axis of the training expression; every gene = its loading x that score,
EVALUATION.md), ridge. Metrics: PCC@M, HVG-50, and their gene-specific versions (Pearson after regressing
prediction and truth on ``[1, s]``, ``s`` the test truth's score on the training PC1: an evaluation device, never
an input), per fold and the mean; the paired comparison ``ridge[ms]`` vs ``ridge[own]`` (folds ahead, genes
ahead per fold).

Usage::

    flock /tmp/histoexp-cpu.lock python benchmarks/multiscale.py [--data-dir ../shared/data/her2st] [--rounds 1]

Writes ``benchmarks/results/multiscale.json`` and ``benchmarks/results/multiscale.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import histoexp as hx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from her2st import machine  # noqa: E402
from her2st_bleep import SECTIONS, load_sections  # noqa: E402

SCALES = (1, 2, 3, 5)
SIZE_UM, PATCH_PX, ENCODER = 112.0, 112, "handcrafted"
TIMED_SECTIONS = ["C2", "C3", "C4", "C5"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- timing
def _fresh(adata) -> ad.AnnData:
    """The spots of ``adata`` (no counts, no features) with 112 µm patches at 112 px read from the slide."""
    a = ad.AnnData(obs=adata.obs.copy(), obsm={"spatial": np.asarray(adata.obsm["spatial"])})
    a.uns["spatial"] = adata.uns["spatial"]
    hx.pp.extract_patches(a, size_um=SIZE_UM, patch_px=PATCH_PX, store="none")
    return a


def _crops_only(a) -> None:
    from histoexp.tl._embed import _scale_source

    src = _scale_source(a, "patches", tuple(float(s) for s in SCALES))
    n, step = len(src), 16 * len(SCALES)
    for start in range(0, n, step):
        src.batch(np.arange(start, min(n, start + step)))


def _per_scale(a) -> None:
    for s in SCALES:
        b = a.copy()
        hx.pp.extract_patches(b, size_um=s * SIZE_UM, patch_px=PATCH_PX, store="none", key_added="cut", overwrite=True)
        hx.tl.embed_patches(b, ENCODER, patches_key="cut", key_added=f"X_{s}")


JOBS = {
    "single": lambda a: hx.tl.embed_patches(a, ENCODER, key_added="X_t"),
    "multiscale": lambda a: hx.tl.embed_patches(a, ENCODER, scales=SCALES, key_added="X_t"),
    "per-scale": _per_scale,
    "crops only": _crops_only,
    "neighbourhood": lambda a: hx.tl.embed_neighbourhood(a, ENCODER, grid=5, key_added="X_t"),
}


def timing(adata, rounds: int) -> dict:
    sub = adata[adata.obs["library_id"].astype(str).isin(TIMED_SECTIONS)].copy()
    log(f"timing on {sub.n_obs} spots of {TIMED_SECTIONS}, {rounds} round(s)")
    warm = _fresh(sub[sub.obs.groupby("library_id", observed=True).head(2).index].copy())
    JOBS["multiscale"](warm)  # imports, and the JPEG of each section decoded once (histoexp keeps it cached)
    from histoexp.image import _slide

    _slide.CACHE_MAX_ITEMS = max(_slide.CACHE_MAX_ITEMS, len(TIMED_SECTIONS))  # no row pays a second decode
    JOBS["multiscale"](_fresh(sub[sub.obs.groupby("library_id", observed=True).head(2).index].copy()))
    secs: dict[str, list[float]] = {k: [] for k in JOBS}
    for r in range(rounds):
        for name, job in JOBS.items():
            a = _fresh(sub)
            t = time.perf_counter()
            job(a)
            secs[name].append(time.perf_counter() - t)
            log(f"round {r + 1}: {name:14s} {secs[name][-1]:7.1f} s")
    ratios = {k: [v / s for v, s in zip(secs[k], secs["single"], strict=True)] for k in JOBS}
    return {
        "n_spots": int(sub.n_obs),
        "sections": TIMED_SECTIONS,
        "rounds": rounds,
        "seconds": {k: v for k, v in secs.items()},
        "median_seconds": {k: float(np.median(v)) for k, v in secs.items()},
        "median_ratio_to_single": {k: float(np.median(v)) for k, v in ratios.items()},
    }


# --------------------------------------------------------------------------------------------- accuracy
def features(adata) -> None:
    a = _fresh(adata)
    hx.tl.embed_patches(a, ENCODER, key_added="X_own")
    hx.tl.embed_patches(a, ENCODER, scales=SCALES, key_added="X_ms")
    for key in ("X_own", "X_ms"):
        adata.obsm[key] = a.obsm[key]
        adata.uns.setdefault("histoexp", {}).setdefault("embeddings", {})[key] = a.uns["histoexp"]["embeddings"][key]
    d = adata.obsm["X_own"].shape[1]
    # the 1x block of the multi-scale features is the single-scale embedding (same crop, same encoder)
    np.testing.assert_allclose(adata.obsm["X_ms"][:, :d], adata.obsm["X_own"], rtol=1e-5, atol=1e-5)


def gene_specific(pred: np.ndarray, truth: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per-gene Pearson of prediction and truth after regressing each on ``[1, s]`` (0 for a constant residual)."""
    z = np.column_stack([np.ones_like(s), s])
    proj = z @ np.linalg.pinv(z)
    rp, rt = (x - proj @ x for x in (pred.astype(np.float64), truth.astype(np.float64)))
    norm_p, norm_t = np.sqrt((rp**2).sum(0)), np.sqrt((rt**2).sum(0))
    # a prediction whose residual is rounding noise (the mean predictor, a pure one-axis predictor) scores 0
    const = norm_p <= 1e-9 * np.maximum(np.abs(pred).max(0), 1.0) * np.sqrt(len(pred))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (rp * rt).sum(0) / (norm_p * norm_t)
    return np.where(const, 0.0, r)


def one_pattern(train, query, y_tr, rep: str, mean: np.ndarray, axis: np.ndarray, seed: int) -> np.ndarray:
    """Ridge predicts the PC1 score from the image; every gene = mean + loading x predicted score."""
    t = ad.AnnData(
        X=((y_tr - mean) @ axis)[:, None].astype(np.float32),
        obs=train.obs[["library_id"]].copy(),
        var=pd.DataFrame(index=["pc1_score"]),
        obsm={rep: train.obsm[rep]},
    )
    t.uns["histoexp"] = {"embeddings": {rep: train.uns["histoexp"]["embeddings"][rep]}}
    model = hx.tl.fit_ridge(t, genes="all", normalize="none", use_rep=rep, random_state=seed)
    q = ad.AnnData(obs=query.obs[["library_id"]].copy(), obsm={rep: query.obsm[rep]})
    q.uns["histoexp"] = {"embeddings": {rep: query.uns["histoexp"]["embeddings"][rep]}}
    score = np.asarray(hx.tl.impute(q, model).layers["ridge"])[:, 0]
    return mean[None, :] + score[:, None] * axis[None, :]


def accuracy(adata, panel: list[str], seed: int) -> list[dict]:
    truth_all = hx.pp.expression_matrix(adata, panel)
    lib = adata.obs["library_id"].astype(str).to_numpy()
    folds = []
    for test in SECTIONS:
        tr, te = lib != test, lib == test
        train, query = adata[tr].copy(), adata[te].copy()
        y_tr, y_te = truth_all[tr].astype(np.float64), truth_all[te].astype(np.float64)
        mean = y_tr.mean(0)
        axis = np.linalg.svd(y_tr - mean, full_matrices=False)[2][0]  # PC1 of the training expression
        s = (y_te - mean) @ axis  # the test truth's shared axis: for the gene-specific metric only
        preds = {"mean": np.repeat(mean[None], te.sum(), axis=0)}
        for rep in ("own", "ms"):
            preds[f"one-pattern[{rep}]"] = one_pattern(train, query, y_tr, f"X_{rep}", mean, axis, seed)
        alphas = {}
        for rep in ("own", "ms"):
            model = hx.tl.fit_ridge(train, genes=panel, use_rep=f"X_{rep}", random_state=seed, overwrite=True)
            alphas[rep] = float(model.config["alpha"])
            preds[f"ridge[{rep}]"] = np.asarray(hx.tl.impute(query, model).layers["ridge"], dtype=np.float64)
        fold = {"test": test, "n_test": int(te.sum()), "alpha": alphas, "methods": {}, "per_gene": {}}
        for name, pred in preds.items():
            table = hx.tl.gene_metrics(pred, y_te, panel)
            summ = hx.tl.summarize_metrics(table, n_top=50)
            ok = table["status"].isin(["ok", "constant_prediction"]).to_numpy()
            gs = pd.Series(gene_specific(pred, y_te, s), index=table.index)[ok]
            hvg = table[ok]["truth_var"].sort_values(ascending=False).index[:50]
            fold["methods"][name] = {
                "pcc_mean": float(summ["pcc_mean"]),
                "pcc_hvg": float(summ["pcc_hvg"]),
                "gs_pcc_mean": float(gs.mean()),
                "gs_pcc_hvg": float(gs[hvg].mean()),
                "n_genes": int(ok.sum()),
            }
            fold["per_gene"][name] = table["pcc"][ok]
        a, b = fold["per_gene"]["ridge[ms]"], fold["per_gene"]["ridge[own]"]
        fold["genes_ahead"] = int((a > b).sum())
        fold["n_genes"] = int(len(a))
        m = fold["methods"]
        log(
            f"{test}: "
            + ", ".join(f"{k} {v['pcc_mean']:.3f}/{v['gs_pcc_mean']:.3f}" for k, v in m.items())
            + f" (PCC@M / gene-specific); alpha {alphas}"
        )
        del fold["per_gene"]
        folds.append(fold)
    return folds


# --------------------------------------------------------------------------------------------- report
def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    t, folds, mc = result["timing"], result["folds"], result["machine"]
    lines = [
        "# Multi-scale image features on her2st: cost and a ridge check",
        "",
        f"{result['date']} · {mc['platform']}, {mc['cpu_count']} CPU cores (shared), torch {mc['torch']} "
        f"({mc['torch_threads']} threads), histoexp {mc['histoexp']} · `{result['command']}` · "
        f"{result['seconds_total']:.0f} s",
        "",
        f"## Cost: {t['n_spots']} spots of {', '.join(t['sections'])}, handcrafted encoder, 112 µm patches at "
        f"112 px read from the slide (store='none'); median of {t['rounds']} round(s), rows run in turn",
        "",
        "| embedding | crops a spot | seconds | spots/s | × single |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    crops = {"single": 1, "multiscale": 4, "per-scale": 4, "crops only": 4, "neighbourhood": 25}
    what = {
        "single": "`embed_patches` (1x)",
        "multiscale": "`embed_patches(scales=(1, 2, 3, 5))`",
        "per-scale": "`extract_patches(size_um=s*112)` + `embed_patches`, s = 1, 2, 3, 5",
        "crops only": "the multi-scale crops without the encoder",
        "neighbourhood": "`embed_neighbourhood(grid=5)`",
    }
    for k in crops:
        sec = t["median_seconds"][k]
        lines.append(
            f"| {what[k]} | {crops[k]} | {sec:.1f} | {t['n_spots'] / sec:.1f} | {t['median_ratio_to_single'][k]:.2f} |"
        )
    lines += [
        "",
        f"multiscale / neighbourhood: {t['median_seconds']['multiscale'] / t['median_seconds']['neighbourhood']:.3f}"
        f"; multiscale / per-scale: {t['median_seconds']['multiscale'] / t['median_seconds']['per-scale']:.3f}.",
        "",
        "## Accuracy check: ridge on own vs multi-scale features",
        "",
        "Leave-one-section-out over C2..C6 (train on four, predict the fifth); "
        f"{result['settings']['n_panel_genes']}-gene her2st panel, log1p(normalize_total 1e4) targets; "
        "`hx.tl.fit_ridge` defaults (standardise, PCA-256, alpha by inner leave-one-section-out over the training "
        "sections); own = handcrafted features of the 112 µm crop at 112 px (37), ms = scales 1, 2, 3, 5 of it, each "
        "at 112 px (148; scales fixed, not tuned). gs = gene-specific (partial Pearson given the test truth's score "
        "on the training PC1, EVALUATION.md). Mean over the five folds:",
        "",
        "| predictor | PCC@M | HVG-50 | gs PCC@M | gs HVG-50 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    names = list(folds[0]["methods"])
    for n in names:
        v = {
            k: np.mean([f["methods"][n][k] for f in folds])
            for k in ("pcc_mean", "pcc_hvg", "gs_pcc_mean", "gs_pcc_hvg")
        }
        lines.append(
            f"| {n} | {v['pcc_mean']:.3f} | {v['pcc_hvg']:.3f} | {v['gs_pcc_mean']:.3f} | {v['gs_pcc_hvg']:.3f} |"
        )
    for key, label in (("pcc_mean", "PCC@M"), ("gs_pcc_mean", "gene-specific PCC@M")):
        lines += [
            "",
            f"{label} per fold (test section):",
            "",
            "| predictor | " + " | ".join(f["test"] for f in folds) + " |",
            "| --- | " + " | ".join("---:" for _ in folds) + " |",
        ]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{f['methods'][n][key]:.3f}" for f in folds) + " |")
    d = [f["methods"]["ridge[ms]"]["pcc_mean"] - f["methods"]["ridge[own]"]["pcc_mean"] for f in folds]
    dg = [f["methods"]["ridge[ms]"]["gs_pcc_mean"] - f["methods"]["ridge[own]"]["gs_pcc_mean"] for f in folds]
    lines += [
        "",
        f"Paired, ridge[ms] - ridge[own]: PCC@M {np.mean(d):+.3f} (ahead on {sum(x > 0 for x in d)} of "
        f"{len(d)} folds), gene-specific PCC@M {np.mean(dg):+.3f} (ahead on {sum(x > 0 for x in dg)} of {len(dg)}); "
        "genes ahead per fold: "
        + ", ".join(f"{f['test']} {f['genes_ahead']}/{f['n_genes']}" for f in folds)
        + ". Ridge alpha per fold (own / ms): "
        + ", ".join(f"{f['test']} {f['alpha']['own']:g} / {f['alpha']['ms']:g}" for f in folds)
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    p.add_argument("--rounds", type=int, default=1, help="timing rounds (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-accuracy", action="store_true", help="timing only")
    p.add_argument("--out", default=str(HERE / "results" / "multiscale"))
    args = p.parse_args()
    hx.settings.progress = False
    hx.settings.device = "cpu"
    t0 = time.time()
    adata, panel, _ = load_sections(args.data_dir, bank=False)
    log("spots per section: " + ", ".join(f"{k} {v}" for k, v in adata.obs["library_id"].value_counts().items()))
    result = {
        "benchmark": "multi-scale embedding: cost (C2..C5) and ridge leave-one-section-out (C2..C6)",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python benchmarks/multiscale.py " + " ".join(sys.argv[1:]),
        "settings": {
            "scales": list(SCALES),
            "size_um": SIZE_UM,
            "patch_px": PATCH_PX,
            "encoder": ENCODER,
            "store": "none",
            "n_panel_genes": len(panel),
            "targets": "log1p(normalize_total 1e4), her2st 785-gene panel",
            "spots_per_section": {str(k): int(v) for k, v in adata.obs["library_id"].value_counts().items()},
        },
    }
    result["timing"] = timing(adata, args.rounds)
    result["folds"] = []
    if not args.no_accuracy:
        features(adata)
        result["folds"] = accuracy(adata, panel, args.seed)
    result["seconds_total"] = time.time() - t0
    if result["folds"]:
        write(result, Path(args.out))
    else:
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result["timing"], indent=1))


if __name__ == "__main__":
    main()
