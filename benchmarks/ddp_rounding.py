"""How much training amplifies float rounding: the tolerance of the DDP-vs-one-process test, measured.

Under DDP the gradient of a step is the one-process gradient up to rounding (another summation order); another CPU
rounds differently again. AdamW then amplifies those differences: a parameter whose gradient is (nearly) zero in
exact arithmetic takes a step of up to ``lr`` whose sign is set by the rounding noise. So the final weights of two
runs that differ only in rounding agree to a tolerance that depends on the training, not to ``1e-5``.

This script trains the configurations of ``tests/_ddp_worker.py`` (BLEEP, mclSTExp, zero-shot, NH2ST on synthetic
sections, one process) once as they are and ``--repeats`` times with ``2**-22 * s * u`` added to every gradient of
every step (``u`` uniform in [-1, 1], seeded; ``s`` the step's largest gradient): about two float32 ulps of the
largest gradient, the size of the rounding of a reordered sum, also where terms cancel (a gradient that is zero in
exact arithmetic, such as the key bias of attention, is pure rounding). It reports, per method, the largest
difference of any final weight (for NH2ST also without the key bias, which changes no output) and the largest
relative difference of the per-epoch training and validation losses. ``tests/test_distributed.py`` asserts the
first step's gradients tightly (computed from the same weights, only one step's rounding separates them) and the
final weights and losses to tolerances of ten times the largest differences measured here.

Run: ``python benchmarks/ddp_rounding.py [--repeats 8]``; writes ``benchmarks/results/ddp_rounding.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import _ddp_worker as worker  # noqa: E402

import histoexp as hx  # noqa: E402
from histoexp import train as hxt  # noqa: E402

#: relative size of the gradient noise (about two float32 ulps)
NOISE = 2.0**-22


def run(method: str, noise: float = 0.0, seed: int = 0):
    with hxt.torch_threads(1), worker.first_step(noise=noise, seed=seed):
        if method == "bleep":
            with tempfile.TemporaryDirectory() as tmp:
                weights, hist = worker.bleep(Path(tmp), f"n{seed}")
        else:
            weights, hist = getattr(worker, method)("single")
    return {k: v.detach().clone() for k, v in weights.items()}, hist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ddp_rounding"))
    args = parser.parse_args()
    hx.settings.progress = False
    torch.set_num_threads(1)
    rows = {}
    for method in ("bleep", "mclstexp", "zeroshot", "nh2st"):
        t0 = time.perf_counter()
        base_w, base_h = run(method)
        dw, dloss, dw_out = [], [], []
        for seed in range(args.repeats):
            w, h = run(method, NOISE, seed)
            dw.append(max(float((w[k] - base_w[k]).abs().max()) for k in base_w))
            if method == "nh2st":  # without the key bias (zero gradient in exact arithmetic, no effect on outputs)
                a, b = ({k: t.clone() for k, t in v.items()} for v in (w, base_w))
                for v in (a, b):
                    dim = v["pooling.out_proj.weight"].shape[0]
                    v["pooling.in_proj_bias"][dim : 2 * dim] = 0
                dw_out.append(max(float((a[k] - b[k]).abs().max()) for k in b))
            rel = [
                abs(a - b) / abs(b)
                for key in ("train_loss", "val_loss")
                for a, b in zip(h[key], base_h[key], strict=True)
            ]
            dloss.append(max(rel))
        rows[method] = {
            "max_weight_diff": max(dw),
            "max_weight_diff_without_key_bias": max(dw_out) if dw_out else max(dw),
            "median_weight_diff": float(np.median(dw)),
            "max_rel_loss_diff": max(dloss),
            "max_abs_weight": max(float(v.abs().max()) for v in base_w.values()),
            "epochs": len(base_h["train_loss"]),
            "repeats": args.repeats,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(method, rows[method], flush=True)
    result = {"noise": NOISE, "torch": torch.__version__, "methods": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Rounding amplified by training (tolerance of tests/test_distributed.py)",
        "",
        f"{NOISE:.3g} s u added to every gradient of every step (s the step's largest gradient, u uniform in [-1, 1], "
        f"{args.repeats} seeds), one process, the configurations of tests/_ddp_worker.py; differences from the run "
        "without noise.",
        "",
        "| method | max weight diff | without key bias | median weight diff | max rel. loss diff | largest weight |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m, r in rows.items():
        lines.append(
            f"| {m} | {r['max_weight_diff']:.3g} | {r['max_weight_diff_without_key_bias']:.3g} | "
            f"{r['median_weight_diff']:.3g} | {r['max_rel_loss_diff']:.3g} | {r['max_abs_weight']:.3g} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
