"""DDP with 2 CPU processes (torchrun, gloo) against one process, on real her2st data.

Protocol: train on her2st C3..C6, predict C2 (held out, never seen in training); frozen handcrafted features of
112 µm patches at 112 px (``hx.tl.embed_patches(encoder='handcrafted')``), targets log1p(normalize_total 1e4)
of the 785-gene panel. Each model is trained by ``hx.tl.fit_bleep`` (``n_ensemble=1``; otherwise its frozen
defaults: epochs 100, patience 10, batch 256, lr 1e-3, weight decay 1e-3; validation = one whole training section)
in a fresh process: once as one process, once under ``torchrun --nproc_per_node=2`` (gloo, 1 torch thread per
process, both on this machine's 2 cores). Under DDP each global batch of 256 is split 128 + 128 and BLEEP's
loss gathers the embeddings of both ranks (``hx.train.gather_batch``), so each step's gradient is the one-process
gradient of the same 256 spots. Rows:

- ``dropout=0``: the only difference to one process is float rounding (summation order); reported: the largest
  absolute weight difference, the epochs run, and the predictions on C2 (mean absolute difference, mean
  per-gene Pearson of each model against the truth);
- ``DDP again``: the same DDP run repeated: same seed and world size give bitwise the same weights (sha256);
- ``dropout=0.1`` (BLEEP's default): dropout noise is drawn per rank, so the models differ; their accuracy on
  C2 is compared;
- mclSTExp (``fit_mclstexp`` frozen defaults but ``n_ensemble=1``: sentence = a shuffled batch of 128 spots, no
  dropout in the model): under DDP each rank holds 64 spots of the sentence; the loss gathers the sentence
  (the spot transformer attends over all 128, the contrastive loss spans every rank's images), so "same" is as
  for BLEEP with dropout 0; the DDP run is repeated for the bitwise check;
- zero-shot (``fit_zeroshot(method='neural')``, the SGN form, ``dropout=0``, other frozen defaults; all 785
  panel genes as seen genes, gene embeddings: ``hx.pp.gene_embeddings`` co-expression of the training sections
  C3..C6, 64 dimensions; the panel genes without one (no counts in C3..C6) are left out of its training and of its
  scores): its loss's Pearson term spans the gathered global batch; predicted on C2 as a supervised model (no zero-shot
  claim: this row checks DDP, not unseen genes).

Wall time: ``fit_*`` only (not the imports or data loading), from each process; the model file is written by
rank 0 (``model.save``). The machine is shared: times are indicative.

Usage (heavy: run under the shared lock)::

    python benchmarks/scale_ddp.py [--data-dir ../shared/data/her2st] [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def worker(args) -> None:
    """Train one model (one process, or one rank under torchrun) and save it (rank 0)."""
    import anndata as ad

    import histoexp as hx

    distributed = hx.train.init_distributed()
    hx.settings.progress = False
    hx.settings.device = "cpu"
    train = ad.read_h5ad(args.train)
    panel = json.loads(Path(args.panel).read_text())
    t0 = time.perf_counter()
    if args.method == "bleep":
        model = hx.tl.fit_bleep(
            train,
            genes=panel,
            use_rep="X_handcrafted",
            n_ensemble=1,
            dropout=args.dropout,
            finetune_encoder=False,
            random_state=0,
        )
    elif args.method == "mclstexp":
        model = hx.tl.fit_mclstexp(
            train, genes=panel, use_rep="X_handcrafted", n_ensemble=1, finetune_encoder=False, random_state=0
        )
    else:
        import pandas as pd

        table = pd.read_csv(args.gene_table, index_col=0)
        genes = [g for g in panel if g in table.index]  # co-expression leaves out genes without counts
        model = hx.tl.fit_zeroshot(
            train,
            gene_embeddings=table,
            genes=genes,
            use_rep="X_handcrafted",
            method="neural",
            dropout=args.dropout,
            random_state=0,
        )
    secs = time.perf_counter() - t0
    model.save(args.model_out)  # rank 0 writes; the others return at once
    if hx.train.is_main_process():
        hist = model.config["history"]
        info = {"fit_seconds": round(secs, 2), "epochs_run": hist["epochs_run"], "best_epoch": hist["best_epoch"]}
        info["world_size"] = hist.get("world_size", 1)
        Path(args.info_out).write_text(json.dumps(info))
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


def launch(tmp: Path, tag: str, *, nproc: int, method: str, dropout: float) -> dict:
    model_dir, info = tmp / f"model_{tag}", tmp / f"info_{tag}.json"
    script = [str(Path(__file__).resolve()), "--worker", "--train", str(tmp / "train.h5ad")]
    script += ["--panel", str(tmp / "panel.json"), "--method", method, "--dropout", str(dropout)]
    script += ["--model-out", str(model_dir), "--info-out", str(info), "--gene-table", str(tmp / "genes.csv")]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    out = json.loads(info.read_text())
    out.update(launch_seconds=round(wall, 1), model_dir=str(model_dir), nproc=nproc)
    return out


def weights(model_dir: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def sha(w: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(w):
        h.update(k.encode())
        h.update(np.ascontiguousarray(w[k]).tobytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    p.add_argument("--cache", default=None, help="folder caching the handcrafted features (npy)")
    p.add_argument("--no-mclstexp", action="store_true", help="BLEEP rows only")
    p.add_argument("--no-zeroshot", action="store_true", help="no zero-shot rows")
    p.add_argument("--out", default=str(HERE / "results" / "scale_ddp"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--train", "--panel", "--method", "--model-out", "--info-out", "--gene-table"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--dropout", type=float, default=0.1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from her2st_bleep import embed, load_sections, metrics

    import histoexp as hx

    hx.settings.progress = False
    hx.settings.device = "cpu"
    adata, panel, _ = load_sections(args.data_dir, bank=False)
    cache = Path(args.cache) / "handcrafted_112.npy" if args.cache else None
    if cache is not None and cache.is_file():
        feats = np.load(cache)
    else:
        t = time.time()
        feats = embed(adata, "handcrafted", patch_px=112, size_um=112)
        log(f"handcrafted features {feats.shape} in {time.time() - t:.0f}s")
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, feats)
    adata.obsm["X_handcrafted"] = feats
    lib = adata.obs["library_id"].astype(str).to_numpy()
    train, query = adata[lib != "C2"].copy(), adata[lib == "C2"].copy()
    for a in (train, query):
        a.uns.pop("spatial", None)  # the images are not needed: frozen features
    truth = hx.pp.expression_matrix(query, panel)
    rows, preds = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hx.io.write_h5ad(train, tmp / "train.h5ad")
        (tmp / "panel.json").write_text(json.dumps(panel))
        if not args.no_zeroshot:
            emb = hx.pp.gene_embeddings(train, method="coexpression", genes=panel, n_components=64, random_state=0)
            emb.to_csv(tmp / "genes.csv")
        runs = [
            ("bleep dropout=0, 1 process", 1, "bleep", 0.0),
            ("bleep dropout=0, DDP 2 processes", 2, "bleep", 0.0),
            ("bleep dropout=0, DDP 2 processes again", 2, "bleep", 0.0),
            ("bleep dropout=0.1, 1 process", 1, "bleep", 0.1),
            ("bleep dropout=0.1, DDP 2 processes", 2, "bleep", 0.1),
        ]
        if not args.no_mclstexp:
            runs += [
                ("mclstexp, 1 process", 1, "mclstexp", 0.0),
                ("mclstexp, DDP 2 processes", 2, "mclstexp", 0.0),
                ("mclstexp, DDP 2 processes again", 2, "mclstexp", 0.0),
            ]
        if not args.no_zeroshot:
            runs += [
                ("zeroshot dropout=0, 1 process", 1, "zeroshot", 0.0),
                ("zeroshot dropout=0, DDP 2 processes", 2, "zeroshot", 0.0),
            ]
        for i, (label, nproc, method, dropout) in enumerate(runs):
            log(f"{label} ...")
            rec = launch(tmp, f"run{i}", nproc=nproc, method=method, dropout=dropout)
            model = hx.tl.load_model(rec["model_dir"])
            pred = hx.tl.impute(query, model)
            pred = pred[:, [g for g in panel if g in pred.var_names]]
            m = metrics(
                pred.layers[model.method], truth[:, [panel.index(g) for g in pred.var_names]], list(pred.var_names)
            )
            pred = pred.layers[model.method]
            rec.update(label=label, method=method, dropout=dropout, pcc_panel=m["pcc_panel"], pcc_hvg50=m["pcc_hvg50"])
            rec["sha256"] = sha(weights(rec["model_dir"]))
            preds[label] = pred
            rec["weights"] = weights(rec["model_dir"])
            log(f"  { ({k: v for k, v in rec.items() if k not in ('weights', 'model_dir')}) }")
            rows.append(rec)
    by = {r["label"]: r for r in rows}

    def compare(a: str, b: str) -> dict:
        wa, wb = by[a]["weights"], by[b]["weights"]
        return {
            "a": a,
            "b": b,
            "max_abs_weight_diff": float(max(np.abs(wa[k] - wb[k]).max() for k in wa)),
            "max_abs_weight": float(max(np.abs(wa[k]).max() for k in wa)),
            "bitwise_equal": by[a]["sha256"] == by[b]["sha256"],
            "mean_abs_pred_diff": float(np.abs(preds[a] - preds[b]).mean()),
        }

    comparisons = [
        compare("bleep dropout=0, 1 process", "bleep dropout=0, DDP 2 processes"),
        compare("bleep dropout=0, DDP 2 processes", "bleep dropout=0, DDP 2 processes again"),
        compare("bleep dropout=0.1, 1 process", "bleep dropout=0.1, DDP 2 processes"),
    ]
    if not args.no_mclstexp:
        comparisons.append(compare("mclstexp, 1 process", "mclstexp, DDP 2 processes"))
        comparisons.append(compare("mclstexp, DDP 2 processes", "mclstexp, DDP 2 processes again"))
    if not args.no_zeroshot:
        comparisons.append(compare("zeroshot dropout=0, 1 process", "zeroshot dropout=0, DDP 2 processes"))
    for r in rows:
        r.pop("weights")
        r.pop("model_dir")
    out = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "protocol": (
            "train her2st C3..C6, test C2; handcrafted frozen features (112 µm, 112 px); 785-gene panel, log1p "
            "targets; fit_bleep n_ensemble=1 (other frozen defaults)"
            + ("" if args.no_mclstexp else " / fit_mclstexp n_ensemble=1 (other frozen defaults)")
            + ("" if args.no_zeroshot else " / fit_zeroshot dropout=0 (genes: the panel, co-expression embeddings)")
            + "; random_state=0; "
            "1 process vs torchrun 2 processes (gloo, 1 thread each); retrieval reference = the training spots"
        ),
        "n_train": int(train.n_obs),
        "n_test": int(query.n_obs),
        "n_genes": len(panel),
        "rows": rows,
        "comparisons": comparisons,
    }
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".json").write_text(json.dumps(out, indent=1))
    write_md(out, dest.with_suffix(".md"))
    log(f"wrote {dest.with_suffix('.json')} and .md")


def write_md(out: dict, path: Path) -> None:
    lines = [
        "# DDP (torchrun, 2 CPU processes) vs one process",
        "",
        f"Written by `benchmarks/scale_ddp.py` on {out['date']} ({out['machine']}).",
        "",
        f"Protocol: {out['protocol']} ({out['n_train']} training spots, {out['n_test']} test spots, "
        f"{out['n_genes']} genes).",
        "",
        "| run | processes | fit seconds | epochs run | best epoch | C2 PCC (panel) | C2 PCC (HVG-50) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['label']} | {r['nproc']} | {r['fit_seconds']:.1f} | {r['epochs_run']} | {r['best_epoch']} | "
            f"{r['pcc_panel']:.4f} | {r['pcc_hvg50']:.4f} |"
        )
    lines += [
        "",
        "| a | b | bitwise equal | max abs weight diff | max abs weight | mean abs prediction diff |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for c in out["comparisons"]:
        lines.append(
            f"| {c['a']} | {c['b']} | {c['bitwise_equal']} | {c['max_abs_weight_diff']:.3g} | "
            f"{c['max_abs_weight']:.3g} | {c['mean_abs_pred_diff']:.3g} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
