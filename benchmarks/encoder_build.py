"""Build time and peak memory of every foundation-model entry at full size, random weights (no download).

Each entry is built in a fresh process (``python benchmarks/encoder_build.py --one KEY``), so its peak resident
memory (``ru_maxrss``) is its own; the forward pass is one 28-32 px image (the build dominates). Decides which
entries the CI test suite builds at full depth (see docs/encoders.md and ``large_encoder`` in the tests).

    python benchmarks/encoder_build.py            # all entries -> benchmarks/results/encoder_build.{json,md}
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"


def one(key: str) -> dict:
    import torch

    from histoexp.models import REGISTRY, get_encoder

    s = REGISTRY[key]
    kw = {}
    if s.source == "timm":
        kw = {"img_size": 28 if s.timm_kwargs.get("patch_size", 14) == 14 else 32}
    elif s.source == "transformers":
        kw = {"image_size": 28 if s.timm_kwargs["patch_size"] == 14 else 32}
    elif s.arch.startswith("conch"):
        kw = {"img_size": 64}
    t0 = time.perf_counter()
    enc = get_encoder(key, weights=None, model_kwargs=kw)
    build = time.perf_counter() - t0
    size = enc.input_size
    with torch.inference_mode():
        out = enc.module(torch.zeros(1, 3, size, size))
    n = sum(p.numel() for p in enc.module.parameters())
    return {
        "key": key,
        "params_M": round(n / 1e6, 1),
        "build_s": round(build, 1),
        "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "dim": int(out.shape[1]),
        "documented_dim": s.dim,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one")
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one)))
        return
    from histoexp.models import REGISTRY

    keys = sorted(k for k, s in REGISTRY.items() if s.source in ("timm", "transformers", "custom"))
    rows = []
    for k in keys:
        r = subprocess.run([sys.executable, __file__, "--one", k], capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "encoder_build.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| key | parameters (M) | build (s) | peak RSS (GB) | dim | documented |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['key']} | {r['params_M']} | {r['build_s']} | {r['peak_rss_GB']} | {r['dim']} | {r['documented_dim']} |"
        for r in rows
    ]
    (OUT / "encoder_build.md").write_text(
        "Full-size random-weight builds, one process per entry, 2-core CPU shared with other jobs "
        "(`python benchmarks/encoder_build.py`).\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
