"""Speed of the handcrafted encoder, before and after batching it, in one run: the encoder and embed_neighbourhood.

NH2ST's neighbourhood features (``hx.tl.embed_neighbourhood(adata, 'handcrafted', grid=5)``: the 5 x 5 windows of
112 µm at 112 px around every spot) were its slowest step (259 s for the 732 spots of C2..C5 on a 2-core machine).
The encoder computed the local binary patterns one patch at a time with ``skimage.feature.local_binary_pattern``
and its statistics over strided axes; it now runs every step on the whole batch (:mod:`histoexp.models.handcrafted`).
``previous_features`` below is the former implementation, kept verbatim as the reference.

On the her2st section(s) given, in the same process:

1. **encoder**: the windows of every spot, cut once into memory, through the previous and the current function in
   batches of 75 windows (embed_neighbourhood's batch: 3 spots x 25), alternating which goes first per round; the
   best of ``--rounds`` rounds each;
2. **embed_neighbourhood**: the whole call (context patches read from the slide, cut into windows, encoder), once
   with the previous encoder (an Encoder wrapping ``previous_features``) and once with ``'handcrafted'``.

Reported: seconds, the ratio previous / current, and the largest difference of the features per group (the LBP,
GLCM and nuclei features are equal; the means and standard deviations differ by the float32 rounding of the
previous strided sums, about 1e-4, the current ones being within 2e-7 of the float64 value).

Usage::

    python benchmarks/handcrafted.py --data-dir ../shared/data/her2st --sections C2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


# ------------------------------------------------------------------------------------------------------------------
# the previous implementation (histoexp up to commit 58cfacd), verbatim apart from names
# ------------------------------------------------------------------------------------------------------------------
def _previous_glcm_props(q, levels, distance):
    from histoexp.models.handcrafted import _props

    b = q.shape[0]
    base = (np.arange(b, dtype=np.int64) * levels * levels)[:, None]
    acc = np.zeros((b, 4))
    for a, c in ((q[:, :, :-distance], q[:, :, distance:]), (q[:, :-distance, :], q[:, distance:, :])):
        pair = base + (a.reshape(b, -1) * levels + c.reshape(b, -1))
        counts = np.bincount(pair.ravel(), minlength=b * levels * levels).reshape(b, levels, levels)
        counts = (counts + counts.transpose(0, 2, 1)).astype(np.float64)
        counts /= counts.sum(axis=(1, 2), keepdims=True)
        acc += _props(counts)
    return acc / 2.0


def previous_features(rgb):
    """The handcrafted features as computed before batching (per-patch LBP, strided statistics)."""
    from skimage.color import rgb2hed
    from skimage.feature import local_binary_pattern

    from histoexp.models import handcrafted as hc

    rgb = np.asarray(rgb)
    if rgb.ndim == 3:
        rgb = rgb[None]
    x = rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else np.clip(rgb.astype(np.float32), 0.0, 1.0)
    b = x.shape[0]
    flat = x.reshape(b, -1, 3)
    feats = [flat.mean(axis=1), flat.std(axis=1)]
    hed = rgb2hed(x).astype(np.float32).reshape(b, -1, 3)
    feats += [
        np.stack([hed[..., c].mean(axis=1), hed[..., c].std(axis=1), np.percentile(hed[..., c], 90, axis=1)], axis=1)
        for c in range(3)
    ]
    lum = x @ np.asarray([0.2125, 0.7154, 0.0721], dtype=np.float32)
    tissue = (lum < hc.TISSUE_LUMINANCE).reshape(b, -1).mean(axis=1)
    nuc_mask = hed[..., 0].reshape(lum.shape) > hc.NUCLEI_H_THRESHOLD
    count, mean_area = hc._nuclei(nuc_mask)
    feats.append(np.stack([tissue, nuc_mask.reshape(b, -1).mean(axis=1), count, mean_area], axis=1))
    q = np.minimum((lum * hc.GLCM_LEVELS).astype(np.int64), hc.GLCM_LEVELS - 1)
    feats += [_previous_glcm_props(q, hc.GLCM_LEVELS, d) for d in hc.GLCM_DISTANCES]
    gray8 = np.round(lum * 255).astype(np.uint8)
    n_bins = hc.LBP_P + 2
    lbp = np.empty((b, n_bins))
    for k in range(b):
        codes = local_binary_pattern(gray8[k], hc.LBP_P, hc.LBP_R, method="uniform").astype(np.int64)
        lbp[k] = np.bincount(codes.ravel(), minlength=n_bins)[:n_bins] / codes.size
    feats.append(lbp)
    out = np.concatenate([np.asarray(f, dtype=np.float64).reshape(b, -1) for f in feats], axis=1)
    return out.astype(np.float32)


def _previous_encoder():
    """The 'handcrafted' Encoder with its module computing ``previous_features``."""
    import torch
    from torch import nn

    from histoexp.models import get_encoder

    class Previous(nn.Module):
        input_size = 112

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            arr = x.detach().float().permute(0, 2, 3, 1).cpu().numpy()
            return torch.from_numpy(previous_features(arr)).to(x.device)

    enc = get_encoder("handcrafted")
    return dataclasses.replace(enc, module=Previous())


# ------------------------------------------------------------------------------------------------------------------
def _groups(names):
    return {
        "colour mean/std": [i for i, n in enumerate(names) if n.startswith("rgb_")],
        "stain mean/std/p90": [i for i, n in enumerate(names) if n[:2] in ("h_", "e_", "d_")],
        "tissue and nuclei": [i for i, n in enumerate(names) if n.startswith(("tissue", "nuclei"))],
        "GLCM": [i for i, n in enumerate(names) if n.startswith("glcm_")],
        "LBP": [i for i, n in enumerate(names) if n.startswith("lbp_")],
    }


def _diffs(a, b, names):
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {g: float(d[:, idx].max()) for g, idx in _groups(names).items()}


def main(argv=None):
    """Run the comparison and write benchmarks/results/handcrafted.json and .md."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("HISTOEXP_HER2ST_DIR", "../shared/data/her2st"))
    p.add_argument("--sections", nargs="+", default=["C2"])
    p.add_argument("--grid", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="encoder-only rounds (best of)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "handcrafted"))
    args = p.parse_args(argv)

    import torch

    import histoexp as hx
    from histoexp.models import handcrafted as hc
    from histoexp.tl._embed import _context_source, _GridWindows

    hx.settings.progress = False
    hx.settings.device = "cpu"
    adata = hx.datasets.her2st(args.sections, data_dir=args.data_dir)
    hx.pp.extract_patches(adata, size_um=112, patch_px=112, store="none", key_added="p")
    g2 = args.grid**2

    # 1. the encoder alone, on windows cut once into memory
    ctx, rec, _, _ = _context_source(adata, "p", args.grid)
    src = _GridWindows(ctx, args.grid, int(rec["patch_px"]))
    windows = src.batch(np.arange(len(src)))
    batches = [windows[i : i + 3 * g2] for i in range(0, len(windows), 3 * g2)]
    enc_time = {"previous": [], "current": []}
    outs = {}
    fns = {"previous": previous_features, "current": hc.handcrafted_features}
    for r in range(args.rounds):
        for name in ("previous", "current") if r % 2 == 0 else ("current", "previous"):
            t0 = time.perf_counter()
            outs[name] = np.concatenate([fns[name](b) for b in batches])
            enc_time[name].append(time.perf_counter() - t0)
    enc = {k: min(v) for k, v in enc_time.items()}
    enc_diff = _diffs(outs["previous"], outs["current"], hc.FEATURE_NAMES)
    print(
        f"encoder on {len(windows)} windows of {rec['patch_px']} px: previous {enc['previous']:.1f} s, current "
        f"{enc['current']:.1f} s, ratio {enc['previous'] / enc['current']:.2f}",
        flush=True,
    )

    # 2. embed_neighbourhood end to end
    e2e = {}
    for name, encoder in (("previous", _previous_encoder()), ("current", "handcrafted")):
        t0 = time.perf_counter()
        hx.tl.embed_neighbourhood(adata, encoder, grid=args.grid, patches_key="p", key_added=f"X_{name}_grid")
        e2e[name] = time.perf_counter() - t0
        print(f"embed_neighbourhood ({name} encoder): {e2e[name]:.1f} s", flush=True)
    d = len(hc.FEATURE_NAMES)
    e2e_diff = _diffs(
        adata.obsm["X_previous_grid"].reshape(-1, d), adata.obsm["X_current_grid"].reshape(-1, d), hc.FEATURE_NAMES
    )

    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "sections": args.sections,
        "n_spots": int(adata.n_obs),
        "grid": args.grid,
        "n_windows": int(len(windows)),
        "window": {"size_um": 112.0, "patch_px": int(rec["patch_px"])},
        "encoder_s": enc,
        "encoder_rounds_s": enc_time,
        "encoder_ratio": enc["previous"] / enc["current"],
        "encoder_max_abs_diff": enc_diff,
        "embed_neighbourhood_s": e2e,
        "embed_neighbourhood_ratio": e2e["previous"] / e2e["current"],
        "embed_neighbourhood_max_abs_diff": e2e_diff,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = [
        "# handcrafted encoder: previous (per-patch) vs current (batched), same run",
        "",
        f"`{out['command']}` on {out['date_utc']} ({out['cpu_count']} CPUs, {out['machine']}, torch {out['torch']}, "
        f"numpy {out['numpy']}).",
        f"her2st {', '.join(args.sections)}: {out['n_spots']} spots, {args.grid} x {args.grid} windows of 112 µm at "
        f"{rec['patch_px']} px ({out['n_windows']} windows).",
        "",
        "| step | previous (s) | current (s) | previous / current |",
        "| --- | ---: | ---: | ---: |",
        f"| encoder alone (best of {args.rounds}) | {enc['previous']:.1f} | {enc['current']:.1f} | "
        f"{out['encoder_ratio']:.2f} |",
        f"| embed_neighbourhood (reads + encoder) | {e2e['previous']:.1f} | {e2e['current']:.1f} | "
        f"{out['embed_neighbourhood_ratio']:.2f} |",
        "",
        "Largest |previous - current| per feature group (embed_neighbourhood outputs):",
        "",
        "| group | max abs diff |",
        "| --- | ---: |",
        *(f"| {g} | {v:.2e} |" for g, v in e2e_diff.items()),
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path.with_suffix('.json')} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
