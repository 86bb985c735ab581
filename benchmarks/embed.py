"""Throughput of ``hx.tl.embed_patches`` against the bare encoder forward pass, in the same run.

All spots of the five her2st sections with images (C2..C6) are cut once into 224 px patches at 0.5 µm/px
(``hx.pp.extract_patches(..., store='memory')``). For each encoder the spots are split into chunks; for every
chunk we time, interleaved (alternating which goes first, so background load hits both alike):

- **pipeline**: ``hx.tl.embed_patches`` on that chunk (DataLoader over the PatchSource, uint8 batches,
  resize + normalise in torch, forward, copy back to numpy, AnnData bookkeeping);
- **bare**: ``encoder.module(x)`` under ``torch.inference_mode`` on the same patches already preprocessed
  into float tensors in memory (preprocessing not timed).

Throughput = patches / summed seconds; ratio = pipeline / bare. The run also checks that both give the same
features.

Usage::

    python benchmarks/embed.py --data-dir ../shared/data/her2st --encoders handcrafted resnet50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _bare(enc, premade, torch):
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in premade:
            out.append(enc.module(x).float().numpy())
    return time.perf_counter() - t0, np.concatenate(out)


def bench_encoder(hx, adata, name, *, weights, batch_size, n_chunks, rounds, torch):
    """Interleave pipeline and bare forward over chunks of spots; return a results dict."""
    from histoexp.models import get_encoder

    enc = get_encoder(name, weights=weights)
    n = adata.n_obs
    chunks = np.array_split(np.arange(n), n_chunks)
    # warm-up both paths on one small batch (thread pools, lazy imports)
    warm = adata[: min(batch_size, n)].copy()
    hx.tl.embed_patches(warm, enc, batch_size=batch_size, key_added="X_warm", overwrite=True)
    src = hx.pp.get_patches(warm)
    _bare(enc, [enc.preprocess(torch.from_numpy(src.batch(np.arange(len(src)))))], torch)

    pipe_times, bare_times, max_diff = [], [], 0.0
    for r in range(rounds):
        for c, idx in enumerate(chunks):
            sub = adata[idx].copy()
            sub_src = hx.pp.get_patches(sub)
            premade = [
                enc.preprocess(torch.from_numpy(sub_src.batch(np.arange(s, min(s + batch_size, len(idx))))))
                for s in range(0, len(idx), batch_size)
            ]

            def pipe(sub=sub):
                t0 = time.perf_counter()
                hx.tl.embed_patches(sub, enc, batch_size=batch_size, key_added="X_bench", overwrite=True)
                return time.perf_counter() - t0

            if (r * len(chunks) + c) % 2 == 0:
                tp = pipe()
                tb, fb = _bare(enc, premade, torch)
            else:
                tb, fb = _bare(enc, premade, torch)
                tp = pipe()
            pipe_times.append(tp)
            bare_times.append(tb)
            max_diff = max(max_diff, float(np.abs(sub.obsm["X_bench"] - fb).max()))
            print(
                f"  {name} round {r} chunk {c}: {len(idx)} patches, pipeline {len(idx) / tp:.1f}/s, "
                f"bare {len(idx) / tb:.1f}/s",
                flush=True,
            )
            del premade
    total = n * rounds
    pipe_pps = total / sum(pipe_times)
    bare_pps = total / sum(bare_times)
    return {
        "encoder": name,
        "weights": weights if weights is None else str(weights),
        "random_init": enc.random_init,
        "dim": enc.dim,
        "input_size": enc.input_size,
        "n_patches": int(n),
        "rounds": rounds,
        "n_chunks": n_chunks,
        "batch_size": batch_size,
        "pipeline_s": float(sum(pipe_times)),
        "bare_s": float(sum(bare_times)),
        "pipeline_patches_per_s": float(pipe_pps),
        "bare_patches_per_s": float(bare_pps),
        "ratio": float(pipe_pps / bare_pps),
        # per-chunk ratios (bare time / pipeline time): their median is robust to load spikes from other processes
        "median_chunk_ratio": float(np.median(np.asarray(bare_times) / np.asarray(pipe_times))),
        "chunk_pipeline_s": [float(t) for t in pipe_times],
        "chunk_bare_s": [float(t) for t in bare_times],
        "max_abs_diff_pipeline_vs_bare": max_diff,
    }


def main(argv=None):
    """Run the benchmark and write benchmarks/results/embed.json and .md."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("HISTOEXP_HER2ST_DIR", "../shared/data/her2st"))
    p.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5", "C6"])
    p.add_argument("--encoders", nargs="+", default=["handcrafted", "resnet50"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, nargs="+", default=None, help="rounds per encoder (default 3 / 1)")
    p.add_argument("--chunks", type=int, default=10, help="interleaving chunks over all spots")
    p.add_argument("--max-spots", type=int, default=None, help="subsample spots (quick runs only)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "embed"))
    args = p.parse_args(argv)

    import torch

    import histoexp as hx

    if args.threads:
        torch.set_num_threads(args.threads)
    hx.settings.progress = False
    hx.settings.device = "cpu"

    t0 = time.perf_counter()
    adata = hx.datasets.her2st(args.sections, data_dir=args.data_dir)
    t_load = time.perf_counter() - t0
    if args.max_spots and args.max_spots < adata.n_obs:
        sel = np.random.default_rng(0).choice(adata.n_obs, args.max_spots, replace=False)
        adata = adata[np.sort(sel)].copy()
    t0 = time.perf_counter()
    hx.pp.extract_patches(adata, size_um=112.0, mpp=0.5, patch_px=224, store="memory")
    t_patches = time.perf_counter() - t0
    print(
        f"{adata.n_obs} spots from {args.sections}: load {t_load:.1f}s, extract_patches {t_patches:.1f}s "
        f"({adata.n_obs / t_patches:.0f} patches/s), torch threads {torch.get_num_threads()}",
        flush=True,
    )

    rounds = args.rounds or [3 if e == "handcrafted" else 1 for e in args.encoders]
    if len(rounds) == 1:
        rounds = rounds * len(args.encoders)
    results = []
    for name, r in zip(args.encoders, rounds, strict=True):
        weights = "default" if name == "handcrafted" else None  # random init: same compute as pretrained
        res = bench_encoder(
            hx, adata, name, weights=weights, batch_size=args.batch_size, n_chunks=args.chunks, rounds=r, torch=torch
        )
        results.append(res)
        print(
            f"{name}: embed_patches {res['pipeline_patches_per_s']:.2f} patches/s, bare forward "
            f"{res['bare_patches_per_s']:.2f} patches/s, ratio {res['ratio']:.3f} "
            f"(median per chunk {res['median_chunk_ratio']:.3f}) "
            f"({res['n_patches']} patches x {r} rounds; max |diff| {res['max_abs_diff_pipeline_vs_bare']:.2e})",
            flush=True,
        )

    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "sections": args.sections,
        "n_spots": int(adata.n_obs),
        "patch_px": 224,
        "mpp": 0.5,
        "extract_patches_s": t_patches,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = [
        "# embed_patches vs bare encoder forward",
        "",
        f"`{out['command']}` on {out['date_utc']} ({out['cpu_count']} CPUs, torch {out['torch']}, "
        f"{out['torch_threads']} threads, device cpu).",
        f"{out['n_spots']} spots of {', '.join(args.sections)}; 224 px patches at 0.5 µm/px in memory.",
        "Pipeline and bare forward timed interleaved per chunk of spots, same run; ratio = pipeline / bare",
        "throughput over all chunks, and the median of the per-chunk ratios (robust to load spikes from other",
        "processes on this shared machine; a ratio above 1 is such noise, the pipeline does strictly more work).",
        "",
        "| encoder | patches x rounds | embed_patches (patches/s) | bare forward (patches/s) | ratio "
        "| median chunk ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['encoder']} | {r['n_patches']} x {r['rounds']} | {r['pipeline_patches_per_s']:.2f} | "
            f"{r['bare_patches_per_s']:.2f} | {r['ratio']:.3f} | {r['median_chunk_ratio']:.3f} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path.with_suffix('.json')} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
