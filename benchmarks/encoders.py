"""Compare image encoders on her2st: frozen features -> ridge, leave-one-section-out over C2..C6.

Protocol (docs/encoders.md, /work/shared/EVALUATION.md): train on four of the five imaged sections of patient C,
predict the fifth, for each fold. Targets: log1p(normalize_total 1e4) of the her2st 785-gene panel. Patches:
112 µm around each spot, 224 px (0.5 µm/px, the HEST geometry the foundation models were trained at), 112 px for
``handcrafted``. Rows per encoder:

- ``mean``: the training mean (correlation 0 by convention);
- ``one-pattern``: ridge predicts the PC1 score of the training expression (centred on the training mean) from the
  features; every gene = training mean + its PC1 loading x that score (EVALUATION.md);
- ``ridge``: ``hx.tl.fit_ridge`` (standardise, PCA-256, ridge; alpha by leave-one-section-out inside the training
  sections).

Metrics per fold: PCC@M (mean Pearson over the panel) and gene-specific PCC@M (partial correlation of prediction
and truth given the shared axis s = truth projected on PC1 of the training expression, centred on the training
mean). The pipeline per feature set is :func:`pipeline` (swap it for another), the two metric helpers are local
until the library's ``hx.tl.evaluate`` offers them.

Usage (one command; weights for gated models from a folder holding ``<key>/`` or ``<key>.safetensors`` per
encoder, else the hub through huggingface_hub)::

    python benchmarks/encoders.py --encoders uni virchow2 h-optimus-0 --weights-dir ~/fm-weights
    python benchmarks/encoders.py --encoders handcrafted resnet50 densenet121 --random-init resnet50 densenet121

Writes ``benchmarks/results/encoders.json`` and ``.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

import histoexp as hx

HERE = Path(__file__).resolve().parent
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# metric helpers (EVALUATION.md); to be replaced by hx.tl.evaluate's gene-specific PCC
# --------------------------------------------------------------------------------------------------------------


def pc1(y_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training mean and first principal axis (unit loading vector) of the training expression."""
    mu = y_train.mean(0)
    _, _, vt = np.linalg.svd(y_train - mu, full_matrices=False)
    return mu, vt[0]


def pearson_per_gene(pred: np.ndarray, truth: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Pearson r per gene over spots; NaN for genes constant in the truth; 0 for a constant prediction.

    A column whose spread is below 1e-6 of ``scale`` (default: the column's mean absolute value) is constant up to
    float32 rounding (a mean predictor; what remains of a one-pattern predictor once the shared axis is removed).
    """
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    p = pred - pred.mean(0)
    t = truth - truth.mean(0)
    sp = 1 + (np.abs(pred).mean(0) if scale is None else scale[0])
    st = 1 + (np.abs(truth).mean(0) if scale is None else scale[1])
    flat_p = np.sqrt((p**2).mean(0)) <= 1e-6 * sp
    flat_t = np.sqrt((t**2).mean(0)) <= 1e-6 * st
    den = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    ok = ~flat_p & ~flat_t & (den > 0)
    r = np.zeros(pred.shape[1])
    r[ok] = (p * t).sum(0)[ok] / den[ok]
    r[flat_t] = np.nan
    return r


def gene_specific_pcc(pred: np.ndarray, truth: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Pearson r per gene between prediction and truth after regressing each on [1, s]."""
    pred, truth, s = np.asarray(pred, np.float64), np.asarray(truth, np.float64), np.asarray(s, np.float64)
    a = np.column_stack([np.ones_like(s), s])
    proj = a @ np.linalg.pinv(a)
    scale = (np.abs(pred).mean(0), np.abs(truth).mean(0))
    return pearson_per_gene(pred - proj @ pred, truth - proj @ truth, scale=scale)


def scores(pred: np.ndarray, truth: np.ndarray, mu: np.ndarray, v1: np.ndarray) -> dict:
    s = (truth - mu) @ v1
    return {
        "pcc_m": float(np.nanmean(pearson_per_gene(pred, truth))),
        "gene_specific_pcc_m": float(np.nanmean(gene_specific_pcc(pred, truth, s))),
    }


# --------------------------------------------------------------------------------------------------------------
# the pipeline per feature set
# --------------------------------------------------------------------------------------------------------------


def pipeline(train, query, panel: list[str], use_rep: str, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Predictions of every row for one feature set and one fold: ``{'mean', 'one-pattern', 'ridge'}``."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y_tr = hx.pp.expression_matrix(train, panel)
    mu, v1 = pc1(y_tr)
    out = {"mean": np.broadcast_to(mu, (query.n_obs, len(panel))).copy()}
    # one pattern: ridge on the PC1 score
    x_tr, x_te = np.asarray(train.obsm[use_rep]), np.asarray(query.obsm[use_rep])
    reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15)))
    reg.fit(x_tr, (y_tr - mu) @ v1)
    out["one-pattern"] = mu + np.outer(reg.predict(x_te), v1)
    model = hx.tl.fit_ridge(train, genes=panel, use_rep=use_rep, random_state=seed, overwrite=True)
    out["ridge"] = np.asarray(hx.tl.impute(query, model).layers["ridge"])
    return out


# --------------------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------------------


def weights_for(key: str, weights_dir: str | None, random_init: set[str]):
    if key in random_init:
        return None
    if key == "handcrafted" or weights_dir is None:
        return "default"
    base = Path(weights_dir).expanduser()
    for cand in (base / key, base / f"{key}.safetensors", base / f"{key}.bin", base / f"{key}.pth"):
        if cand.exists():
            return str(cand)
    return "default"


def features(adata, key: str, weights, *, seed: int, batch: int) -> tuple[np.ndarray, dict]:
    import torch

    px = 112 if key == "handcrafted" else 224
    tmp = adata.copy()
    hx.pp.extract_patches(tmp, size_um=112, patch_px=px, key_added="p")
    torch.manual_seed(seed)  # random-init weights are the same in every run
    enc = hx.models.get_encoder(key, weights=weights)
    hx.tl.embed_patches(tmp, encoder=enc, patches_key="p", batch_size=batch, key_added="X")
    rec = tmp.uns["histoexp"]["embeddings"]["X"]
    info = {"weights": rec["weights"], "random_init": rec["random_init"], "dim": rec["dim"], "patch_px": px}
    return np.asarray(tmp.obsm["X"], dtype=np.float32), info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", default=["handcrafted", "resnet50", "densenet121"])
    p.add_argument("--weights-dir", default=None, help="folder with <key>/ or <key>.safetensors per encoder")
    p.add_argument("--random-init", nargs="*", default=[], help="encoders to run with random weights (labelled)")
    p.add_argument("--data-dir", default=None, help="her2st copy (default: hx.settings.data_dir / download)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "encoders"))
    args = p.parse_args()
    hx.settings.progress = False
    hx.settings.device = "cpu" if not __import__("torch").cuda.is_available() else "cuda"

    adata = hx.datasets.her2st(SECTIONS, data_dir=args.data_dir)
    panel = [g for g in hx.datasets.her2st_gene_panel() if g in adata.var_names]
    lib = adata.obs["library_id"].astype(str).to_numpy()
    log(f"{adata.n_obs} spots of {SECTIONS}, panel of {len(panel)} genes")
    result = {
        "protocol": "her2st C2..C6 leave-one-section-out; targets log1p(normalize_total 1e4) of the 785-gene panel; "
        "112 um patches (224 px, 112 px for handcrafted); rows mean / one-pattern (ridge on the PC1 score) / "
        "ridge (hx.tl.fit_ridge: standardise, PCA-256, alpha by inner leave-one-section-out)",
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "encoders": {},
    }
    for key in args.encoders:
        w = weights_for(key, args.weights_dir, set(args.random_init))
        t = time.time()
        feats, info = features(adata, key, w, seed=args.seed, batch=args.batch_size)
        info["embed_seconds"] = round(time.time() - t, 1)
        log(f"{key}: features {feats.shape} in {info['embed_seconds']}s (weights: {info['weights']})")
        adata.obsm[f"X_{key}"] = feats
        folds = []
        for test in SECTIONS:
            tr, te = lib != test, lib == test
            train, query = adata[tr].copy(), adata[te].copy()
            preds = pipeline(train, query, panel, f"X_{key}", seed=args.seed)
            mu, v1 = pc1(hx.pp.expression_matrix(train, panel))
            truth = hx.pp.expression_matrix(query, panel)
            fold = {"test": test, **{row: scores(pr, truth, mu, v1) for row, pr in preds.items()}}
            folds.append(fold)
            log(
                f"{key} {test}: "
                + "  ".join(f"{r} {fold[r]['pcc_m']:.3f}/{fold[r]['gene_specific_pcc_m']:.3f}" for r in preds)
            )
        rows = {
            r: {m: float(np.mean([f[r][m] for f in folds])) for m in ("pcc_m", "gene_specific_pcc_m")}
            for r in ("mean", "one-pattern", "ridge")
        }
        result["encoders"][key] = {"features": info, "folds": folds, "mean": rows}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        "Encoders on her2st, leave-one-section-out over C2..C6 (`python benchmarks/encoders.py "
        + " ".join(f"--encoders {' '.join(args.encoders)}".split())
        + (f" --random-init {' '.join(args.random_init)}" if args.random_init else "")
        + "`).",
        "",
        result["protocol"] + ". Mean over the five folds; PCC@M / gene-specific PCC@M.",
        "",
        "| encoder | weights | dim | mean | one-pattern | ridge | ridge gene-specific | one-pattern gene-specific |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in result["encoders"].items():
        w = "random init" if r["features"]["random_init"] else str(r["features"]["weights"])
        m = r["mean"]
        lines.append(
            f"| {key} | {w} | {r['features']['dim']} | {m['mean']['pcc_m']:.3f} | {m['one-pattern']['pcc_m']:.3f} | "
            f"{m['ridge']['pcc_m']:.3f} | {m['ridge']['gene_specific_pcc_m']:.3f} | "
            f"{m['one-pattern']['gene_specific_pcc_m']:.3f} |"
        )
    lines += ["", "Per fold (ridge PCC@M / gene-specific PCC@M):", ""]
    lines += ["| encoder | " + " | ".join(SECTIONS) + " |", "|---|" + "---:|" * len(SECTIONS)]
    for key, r in result["encoders"].items():
        cells = [f"{f['ridge']['pcc_m']:.3f} / {f['ridge']['gene_specific_pcc_m']:.3f}" for f in r["folds"]]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
