"""Patch extraction: throughput against squidpy, and peak memory on a large pyramidal TIFF.

(a) Throughput. All spots of the her2st sections with images (C2..C6) are cut into 224 px patches at
0.5 µm/px (112 µm, the HEST/BLEEP convention), in one run, by

- **histoexp**: ``hx.pp.extract_patches(adata, size_um=112, mpp=0.5, store='memory')``;
- **squidpy**: ``sq.im.ImageContainer(<JPEG>, lazy=False)`` then ``generate_spot_crops(adata,
  spot_scale=112/100, as_array='image')`` (crop of 1.12 spot diameters = 112 µm), each crop resized to
  224 x 224 with the same PIL Lanczos filter, stacked into one uint8 array (same output as histoexp).

Each is timed cold (image decoded inside the timing; histoexp's decode cache cleared) and warm (image
already in memory). Sections alternate which tool goes first.

(b) Peak memory. The C2 section is tiled into a mosaic of at least 40,000 x 40,000 px, written tile by tile
(a generator: the mosaic is never in RAM) as a JPEG-compressed, 512 px tiled, pyramidal BigTIFF (SubIFDs,
2x levels). The C2 spots are replicated on every copy of the section in the mosaic, and a *separate
process* extracts them all with ``store='zarr'`` (224 px at 0.5 µm/px); its peak RSS
(``VmHWM`` of ``/proc/self/status``, Linux) is compared with the decoded image size
(H x W x 3 bytes) and with the process's RSS right before the extraction (imports, AnnData).

Usage::

    python benchmarks/patches.py --data-dir ../shared/data/her2st
    python benchmarks/patches.py --skip-big            # throughput only

Writes ``benchmarks/results/patches.json`` and ``patches.md``; the big TIFF goes to ``--tmp`` and is deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def _default_data_dir() -> str:
    env = os.environ.get("HISTOEXP_HER2ST_DIR")
    return env or str(HERE.parent.parent / "shared" / "data" / "her2st")


# ------------------------------------------------------------------------------------------------ (a) throughput
def run_histoexp(adata, *, cold: bool, patch_px: int, mpp: float, size_um: float) -> tuple[float, np.ndarray]:
    import histoexp as hx
    from histoexp.image import _slide

    if cold:
        _slide.clear_cache()
    t0 = time.perf_counter()
    out = hx.pp.extract_patches(
        adata, size_um=size_um, mpp=mpp, store="memory", key_added="bench", overwrite=True, copy=True
    )
    dt = time.perf_counter() - t0
    assert out.uns["histoexp"]["bench"]["patch_px"] == patch_px
    return dt, out.obsm["bench"]


def run_squidpy(adata, lib: str, path: str, *, img=None, patch_px: int, spot_scale: float):
    import squidpy as sq
    from PIL import Image

    t0 = time.perf_counter()
    if img is None:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # the her2st JPEGs are ~92 Mpx
        try:
            img = sq.im.ImageContainer(path, layer="image", library_id=lib, lazy=False)
        finally:
            Image.MAX_IMAGE_PIXELS = old
    out = np.empty((adata.n_obs, patch_px, patch_px, 3), np.uint8)
    crops = img.generate_spot_crops(adata, library_id=lib, spot_scale=spot_scale, as_array="image", squeeze=True)
    for i, crop in enumerate(crops):
        crop = np.asarray(crop)
        crop = crop.reshape(crop.shape[0], crop.shape[1], -1)[..., :3].astype(np.uint8)
        out[i] = np.asarray(Image.fromarray(crop).resize((patch_px, patch_px), Image.Resampling.LANCZOS))
    return time.perf_counter() - t0, out, img


def bench_throughput(args) -> dict:
    import histoexp as hx

    size_um, mpp, patch_px = 112.0, args.mpp, args.patch_px
    rows = []
    for k, sec in enumerate(args.sections):
        a = hx.datasets.her2st(sec, data_dir=args.data_dir)
        lib = str(a.obs["library_id"].iloc[0]) if "library_id" in a.obs else sec
        entry = a.uns["spatial"][lib]
        path = entry["metadata"]["source_image_path"]
        spot_scale = size_um / (
            entry["scalefactors"]["spot_diameter_fullres"] * entry["scalefactors"]["microns_per_pixel"]
        )
        r = {"section": sec, "n_spots": int(a.n_obs)}
        order = ["histoexp", "squidpy"] if k % 2 == 0 else ["squidpy", "histoexp"]
        for tool in order:
            if tool == "histoexp":
                r["histoexp_cold_s"], ph = run_histoexp(a, cold=True, patch_px=patch_px, mpp=mpp, size_um=size_um)
                r["histoexp_warm_s"], ph = run_histoexp(a, cold=False, patch_px=patch_px, mpp=mpp, size_um=size_um)
            else:
                r["squidpy_cold_s"], ps, img = run_squidpy(a, lib, path, patch_px=patch_px, spot_scale=spot_scale)
                r["squidpy_warm_s"], ps, _ = run_squidpy(
                    a, lib, path, img=img, patch_px=patch_px, spot_scale=spot_scale
                )
                del img
        diff = np.abs(ph.astype(np.int16) - ps.astype(np.int16))
        r["mean_abs_diff_vs_squidpy"] = float(diff.mean())
        rows.append(r)
        print(
            f"  {sec}: {a.n_obs} spots  histoexp cold {r['histoexp_cold_s']:.2f}s warm {r['histoexp_warm_s']:.2f}s | "
            f"squidpy cold {r['squidpy_cold_s']:.2f}s warm {r['squidpy_warm_s']:.2f}s | "
            f"mean |diff| {r['mean_abs_diff_vs_squidpy']:.2f}",
            flush=True,
        )
    n = sum(r["n_spots"] for r in rows)
    tot = {key: sum(r[key] for r in rows) for key in rows[0] if key.endswith("_s")}
    summary = {
        "n_spots": n,
        "patch_px": patch_px,
        "mpp": mpp,
        "size_um": size_um,
        **{f"{key[:-2]}_patches_per_s": n / v for key, v in tot.items()},
        **{f"{key}_total": v for key, v in tot.items()},
    }
    summary["speedup_cold"] = summary["histoexp_cold_patches_per_s"] / summary["squidpy_cold_patches_per_s"]
    summary["speedup_warm"] = summary["histoexp_warm_patches_per_s"] / summary["squidpy_warm_patches_per_s"]
    return {"per_section": rows, "summary": summary}


# ------------------------------------------------------------------------------------------------ (b) big TIFF
def write_mosaic_tiff(src: np.ndarray, path: Path, size: int, *, tile: int = 512, levels: int = 6) -> dict:
    """Write a ``size`` x ``size`` mosaic of ``src`` as a tiled pyramidal BigTIFF, tile by tile."""
    import tifffile
    from PIL import Image

    pyramid = [src]
    for _ in range(levels - 1):
        pyramid.append(np.asarray(Image.fromarray(pyramid[-1]).reduce(2)))

    def tiles(lv: np.ndarray, n: int):
        hs, ws = lv.shape[:2]
        for y0 in range(0, n, tile):
            rows = np.arange(y0, min(y0 + tile, n)) % hs
            for x0 in range(0, n, tile):
                cols = np.arange(x0, min(x0 + tile, n)) % ws
                t = np.full((tile, tile, 3), 255, np.uint8)
                t[: rows.size, : cols.size] = lv[np.ix_(rows, cols)]
                yield t

    opts = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": 90}, "photometric": "rgb"}
    t0 = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(pyramid[0], size), shape=(size, size, 3), dtype=np.uint8, subifds=levels - 1, **opts)
        for lvl in range(1, levels):
            n = size >> lvl
            tw.write(tiles(pyramid[lvl], n), shape=(n, n, 3), dtype=np.uint8, subfiletype=1, **opts)
    return {"write_s": time.perf_counter() - t0, "file_bytes": path.stat().st_size}


CHILD = r"""
import json, sys, time

def hwm_kb():
    # VmHWM: peak RSS of this process image. (ru_maxrss would report the parent's RSS at fork time:
    # Linux carries it over exec.)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

import numpy as np, anndata as ad, pandas as pd
import histoexp as hx
hx.settings.progress = False
cfg = json.loads(sys.argv[1])
xy = np.load(cfg["spots"])
a = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]))
a.obsm["spatial"] = xy
a.uns["spatial"] = {"big": {"images": {}, "metadata": {"source_image_path": cfg["tiff"]},
    "scalefactors": {"spot_diameter_fullres": 100 / cfg["slide_mpp"], "microns_per_pixel": cfg["slide_mpp"]}}}
before = hwm_kb()
t0 = time.perf_counter()
hx.pp.extract_patches(a, size_um=112, mpp=cfg["mpp"], store="zarr", path=cfg["zarr"])
dt = time.perf_counter() - t0
peak = hwm_kb()
src = hx.pp.get_patches(a)
sample = src.batch(np.arange(0, len(src), max(1, len(src) // 50)))
white = float((sample.min(-1) > 200).mean())
print(json.dumps({"rss_before_kb": before, "peak_rss_kb": peak, "extract_s": dt, "n": len(src),
                  "patch_px": src.patch_px, "white_fraction_sample": white}))
"""


def bench_big(args) -> dict:
    import histoexp as hx
    from histoexp.image import SlideImage

    a = hx.datasets.her2st("C2", data_dir=args.data_dir)
    entry = a.uns["spatial"]["C2"]
    slide_mpp = float(entry["scalefactors"]["microns_per_pixel"])
    src = SlideImage.open(entry["metadata"]["source_image_path"])
    arr = src.read_region(0, 0, src.shape[1], src.shape[0])
    h, w = arr.shape[:2]
    size = args.big_size
    tmp = Path(tempfile.mkdtemp(prefix="histoexp-bench-", dir=args.tmp))
    try:
        tiff = tmp / "mosaic.tif"
        print(f"  writing {size} x {size} pyramidal BigTIFF to {tiff} ...", flush=True)
        info = write_mosaic_tiff(arr, tiff, size)
        del arr, src
        from histoexp.image import _slide

        _slide.clear_cache()
        print(f"  written in {info['write_s']:.1f}s, {info['file_bytes'] / 1e9:.2f} GB", flush=True)
        xy = a.obsm["spatial"]
        spots = [xy + [j * w, i * h] for i in range(size // h + 1) for j in range(size // w + 1)]
        spots = np.concatenate(spots)
        spots = spots[(spots[:, 0] < size - 80) & (spots[:, 1] < size - 80)]
        if args.big_spots and len(spots) > args.big_spots:
            spots = spots[np.random.default_rng(0).choice(len(spots), args.big_spots, replace=False)]
        np.save(tmp / "spots.npy", spots)
        cfg = {
            "spots": str(tmp / "spots.npy"),
            "tiff": str(tiff),
            "slide_mpp": slide_mpp,
            "mpp": args.mpp,
            "zarr": str(tmp / "patches.zarr"),
        }
        print(f"  extracting {len(spots)} patches in a subprocess ...", flush=True)
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-4000:])
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        store_bytes = sum(f.stat().st_size for f in (tmp / "patches.zarr").rglob("*") if f.is_file())
        decoded = size * size * 3
        res = {
            "image_px": [size, size],
            "decoded_image_bytes": decoded,
            "tiff": {"tile": 512, "compression": "jpeg q90", "levels": 6, **info},
            "n_spots": child["n"],
            "patch_px": child["patch_px"],
            "mpp": args.mpp,
            "extract_s": child["extract_s"],
            "patches_per_s": child["n"] / child["extract_s"],
            "rss_before_extract_bytes": child["rss_before_kb"] * 1024,
            "peak_rss_bytes": child["peak_rss_kb"] * 1024,
            "peak_rss_over_decoded": child["peak_rss_kb"] * 1024 / decoded,
            "zarr_store_bytes": store_bytes,
            "all_patches_uint8_bytes": child["n"] * child["patch_px"] ** 2 * 3,
            "white_fraction_sample": child["white_fraction_sample"],
        }
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ main
def _markdown(res: dict) -> str:
    lines = ["# Patch extraction benchmark", "", f"Command: `{res['command']}`", "", f"Machine: {res['machine']}", ""]
    if "throughput" in res:
        s = res["throughput"]["summary"]
        lines += [
            f"## (a) Throughput: {s['n_spots']} spots of {', '.join(res['sections'])}, "
            f"{s['patch_px']} px at {s['mpp']} µm/px ({s['size_um']:g} µm)",
            "",
            "| tool | cold (incl. JPEG decode) patches/s | warm (image in memory) patches/s |",
            "| --- | ---: | ---: |",
            f"| histoexp `extract_patches` | {s['histoexp_cold_patches_per_s']:.1f} | "
            f"{s['histoexp_warm_patches_per_s']:.1f} |",
            f"| squidpy `generate_spot_crops` + resize | {s['squidpy_cold_patches_per_s']:.1f} | "
            f"{s['squidpy_warm_patches_per_s']:.1f} |",
            f"| ratio histoexp / squidpy | {s['speedup_cold']:.2f}x | {s['speedup_warm']:.2f}x |",
            "",
            "| section | spots | histoexp cold s | histoexp warm s | squidpy cold s | squidpy warm s | mean abs diff |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in res["throughput"]["per_section"]:
            lines.append(
                f"| {r['section']} | {r['n_spots']} | {r['histoexp_cold_s']:.2f} | {r['histoexp_warm_s']:.2f} | "
                f"{r['squidpy_cold_s']:.2f} | {r['squidpy_warm_s']:.2f} | {r['mean_abs_diff_vs_squidpy']:.2f} |"
            )
        lines.append("")
    if "big_tiff" in res:
        b = res["big_tiff"]
        gb = 1e9
        lines += [
            f"## (b) Peak memory: {b['image_px'][0]} x {b['image_px'][1]} px pyramidal BigTIFF "
            f"({b['tiff']['file_bytes'] / gb:.2f} GB on disk, {b['tiff']['compression']}, "
            f"{b['tiff']['tile']} px tiles, {b['tiff']['levels']} levels)",
            "",
            "| quantity | value |",
            "| --- | ---: |",
            f"| decoded image size (H x W x 3) | {b['decoded_image_bytes'] / gb:.2f} GB |",
            f"| spots extracted (store='zarr') | {b['n_spots']} x {b['patch_px']} px |",
            f"| all patches as uint8 | {b['all_patches_uint8_bytes'] / gb:.3f} GB |",
            f"| extraction time | {b['extract_s']:.1f} s ({b['patches_per_s']:.0f} patches/s) |",
            f"| RSS before extraction (imports, AnnData) | {b['rss_before_extract_bytes'] / gb:.3f} GB |",
            f"| **peak RSS of the extracting process** | **{b['peak_rss_bytes'] / gb:.3f} GB** |",
            f"| peak RSS / decoded image | {100 * b['peak_rss_over_decoded']:.1f} % |",
            f"| zarr store on disk | {b['zarr_store_bytes'] / gb:.3f} GB |",
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=_default_data_dir(), help="her2st root (holds data/)")
    p.add_argument("--sections", nargs="+", default=SECTIONS)
    p.add_argument("--patch-px", type=int, default=224)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--big-size", type=int, default=40960, help="side of the mosaic TIFF in px (>= 40000)")
    p.add_argument("--big-spots", type=int, default=0, help="cap on spots in the big TIFF (0: all)")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the big TIFF is written (then deleted)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "patches.json"))
    args = p.parse_args(argv)
    if args.patch_px != round(112 / args.mpp):
        p.error("--patch-px must equal 112 µm / --mpp (the comparison is at a fixed physical size of 112 µm)")

    import histoexp as hx

    hx.settings.progress = False
    res = {
        "command": "python benchmarks/patches.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "sections": args.sections,
    }
    import squidpy

    res["versions"] = {"histoexp": hx.__version__, "squidpy": squidpy.__version__}
    if not args.skip_throughput:
        print("(a) throughput", flush=True)
        res["throughput"] = bench_throughput(args)
    if not args.skip_big:
        print("(b) peak memory on a large pyramidal TIFF", flush=True)
        res["big_tiff"] = bench_big(args)
    res["parent_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    md = _markdown(res)
    out.with_suffix(".md").write_text(md + "\n")
    print()
    print(md)
    return res


if __name__ == "__main__":
    main()
