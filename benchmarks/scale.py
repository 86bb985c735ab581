"""Scale: H&E-only prediction on a whole slide (memory, throughput) and a many-slide run killed and resumed.

Model (both parts): ridge (``hx.tl.fit_ridge``, 785-gene her2st panel, log1p(normalize_total) targets) on the
``handcrafted`` features of 100 µm patches (``patch_px`` 112) of all spots of the her2st sections C2..C6, saved
to a model folder. Its accuracy is not the point here (see ``benchmarks/her2st.py`` for held-out numbers); the
parts measure memory, throughput and resumability of the prediction path.

(1) ``--part slide``. Section C2's H&E (JPEG, ~9,300 x 9,900 px, 0.69 µm/px) is tiled (repeated) into a mosaic
of ``--size`` x ``--size`` px (default 81,920), written tile by tile (a generator: the mosaic is never in memory)
as a JPEG-compressed (q90), 512 px tiled, pyramidal BigTIFF (SubIFDs, 2x levels) with the µm/px in its
resolution tags. A *separate process* runs the command line on it,
``histoexp impute MODEL mosaic.tif -o OUT --tile-um 200`` (tissue tiles on a 200 µm grid, the legacy ST pitch;
each tile's 100 µm patch is read from the slide by region at full resolution when it is embedded), and reports
its peak RSS (``VmHWM``) against the decoded slide (H x W x 3 bytes), tiles and tiles/s.

(2) ``--part many``. ``--n-slides`` (default 24) slides are cut from the five real sections (overlapping
crops of 6,000 x 6,000 px, written as small pyramidal TIFFs) and listed in a CSV manifest. The command line
``histoexp impute MODEL manifest.csv -o OUT`` runs in a subprocess that is killed (SIGKILL) once
``--kill-after`` slides are done (their ``.done.json`` markers exist); the same command then runs again. The
markers (``finished_at``, the writing process id, file modification times) before and after show what was
recomputed.

Usage::

    flock /tmp/histoexp-heavy.lock python benchmarks/scale.py --part all

Writes ``benchmarks/results/scale.json`` and ``scale.md``; the slides go to ``--tmp`` and are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
PATCH_PX, SIZE_UM = 112, 100.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _default_data_dir() -> str:
    env = os.environ.get("HISTOEXP_HER2ST_DIR")
    return env or str(HERE.parent.parent / "shared" / "data" / "her2st")


def train_model(data_dir: str, model_dir: Path) -> dict:
    """Ridge on handcrafted features of all C2..C6 spots, saved to ``model_dir``."""
    import histoexp as hx

    t0 = time.perf_counter()
    ref = hx.datasets.her2st(SECTIONS, data_dir=data_dir)
    hx.pp.extract_patches(ref, size_um=SIZE_UM, patch_px=PATCH_PX, store="memory")
    hx.tl.embed_patches(ref, encoder="handcrafted", weights=None)
    model = hx.tl.fit_ridge(ref, genes="her2st", use_rep="X_handcrafted")
    model.save(model_dir)
    return {"n_spots": int(ref.n_obs), "n_genes": len(model.genes), "train_s": time.perf_counter() - t0}


def section_image(data_dir: str, sec: str) -> tuple[np.ndarray, float, np.ndarray]:
    """The section's H&E as an array, its µm/px and its spot centres (x, y)."""
    import histoexp as hx
    from histoexp.image import SlideImage

    a = hx.datasets.her2st(sec, data_dir=data_dir)
    entry = a.uns["spatial"][sec]
    src = SlideImage.open(entry["metadata"]["source_image_path"])
    arr = src.read_region(0, 0, src.shape[1], src.shape[0])
    return arr, float(entry["scalefactors"]["microns_per_pixel"]), np.asarray(a.obsm["spatial"])


def write_pyramid(src: np.ndarray, path: Path, h: int, w: int, *, mpp: float, tile: int = 512, min_side: int = 1024):
    """Write an ``h`` x ``w`` mosaic of ``src`` (repeated) as a tiled pyramidal BigTIFF, tile by tile."""
    import tifffile
    from PIL import Image

    levels = 1
    while max(h, w) >> levels >= min_side:
        levels += 1
    pyramid = [src]
    for _ in range(levels - 1):
        pyramid.append(np.asarray(Image.fromarray(pyramid[-1]).reduce(2)))

    def tiles(lv: np.ndarray, nh: int, nw: int):
        hs, ws = lv.shape[:2]
        for y0 in range(0, nh, tile):
            rows = np.arange(y0, min(y0 + tile, nh)) % hs
            for x0 in range(0, nw, tile):
                cols = np.arange(x0, min(x0 + tile, nw)) % ws
                t = np.full((tile, tile, 3), 255, np.uint8)
                t[: rows.size, : cols.size] = lv[np.ix_(rows, cols)]
                yield t

    res = (1e4 / mpp, 1e4 / mpp)  # pixels per centimetre
    opts = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": 90}, "photometric": "rgb"}
    t0 = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(
            tiles(pyramid[0], h, w),
            shape=(h, w, 3),
            dtype=np.uint8,
            subifds=levels - 1,
            resolution=res,
            resolutionunit="CENTIMETER",
            **opts,
        )
        for lvl in range(1, levels):
            tw.write(
                tiles(pyramid[lvl], h >> lvl, w >> lvl),
                shape=(h >> lvl, w >> lvl, 3),
                dtype=np.uint8,
                subfiletype=1,
                **opts,
            )
    return {"write_s": time.perf_counter() - t0, "file_bytes": path.stat().st_size, "levels": levels, "tile": tile}


CHILD = r"""
import json, sys, time

def hwm_kb():
    # VmHWM: peak RSS of this process (ru_maxrss would report the parent's RSS at fork time)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

from histoexp.cli import main
import anndata, torch  # noqa: F401  (imports counted in the baseline)
before = hwm_kb()
t0 = time.perf_counter()
rc = main(sys.argv[1:])
dt = time.perf_counter() - t0
print(json.dumps({"rc": rc, "rss_before_kb": before, "peak_rss_kb": hwm_kb(), "seconds": dt}))
"""


def part_slide(args, model_dir: Path, tmp: Path) -> dict:
    img, mpp, _ = section_image(args.data_dir, "C2")
    size = args.size
    tiff = tmp / "mosaic.tif"
    log(f"(1) writing a {size} x {size} px pyramidal BigTIFF from C2 ({img.shape[1]} x {img.shape[0]} px) ...")
    info = write_pyramid(img, tiff, size, size, mpp=mpp)
    del img
    log(f"    written in {info['write_s']:.0f} s, {info['file_bytes'] / 1e9:.2f} GB, {info['levels']} levels")
    out = tmp / "slide_out"
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        "impute",
        str(model_dir),
        str(tiff),
        "-o",
        str(out),
        "--tile-um",
        str(args.tile_um),
        "--batch-size",
        "64",
        "-q",
    ]
    log(f"    histoexp impute on the slide in a subprocess (tile {args.tile_um:g} µm) ...")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    import anndata as ad

    pred = ad.read_h5ad(out / "predictions.h5ad", backed="r")
    slide = dict(pred.uns["histoexp"]["slide"])
    n = int(slide["n_tiles"])
    decoded = size * size * 3
    return {
        "image_px": [size, size],
        "slide_mpp": mpp,
        "decoded_image_bytes": decoded,
        "tiff": {"compression": "jpeg q90", **info},
        "tile_um": args.tile_um,
        "patch": {"size_um": SIZE_UM, "patch_px": PATCH_PX, "encoder": "handcrafted", "batch_size": 64},
        "n_tiles": n,
        "n_genes": int(pred.n_vars),
        "steps_s": slide["seconds"],
        "tiles_per_s_pipeline": slide["tiles_per_s"],
        "command_s": child["seconds"],
        "rss_before_bytes": child["rss_before_kb"] * 1024,
        "peak_rss_bytes": child["peak_rss_kb"] * 1024,
        "peak_rss_over_decoded": child["peak_rss_kb"] * 1024 / decoded,
        "all_patches_uint8_bytes": n * PATCH_PX * PATCH_PX * 3,
    }


def part_many(args, model_dir: Path, tmp: Path) -> dict:
    import pandas as pd

    folder = tmp / "slides"
    folder.mkdir()
    rows = []
    crop = args.crop
    log(f"(2) cutting {args.n_slides} slides of {crop} x {crop} px from {', '.join(SECTIONS)} ...")
    per = -(-args.n_slides // len(SECTIONS))
    for sec in SECTIONS:
        img, mpp, xy = section_image(args.data_dir, sec)
        h, w = img.shape[:2]
        # crops centred on a 2 x 3 grid over the spots' bounding box (the tissue), inside the image
        (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
        offs = [
            (int(np.clip(cy - crop / 2, 0, h - crop)), int(np.clip(cx - crop / 2, 0, w - crop)))
            for cy in np.linspace(y0 + crop / 4, y1 - crop / 4, 2)
            for cx in np.linspace(x0 + crop / 4, x1 - crop / 4, 3)
        ]
        for k, (y0, x0) in enumerate(offs[:per]):
            if len(rows) >= args.n_slides:
                break
            sid = f"{sec}_{k}"
            path = folder / f"{sid}.tif"
            write_pyramid(np.ascontiguousarray(img[y0 : y0 + crop, x0 : x0 + crop]), path, crop, crop, mpp=mpp)
            rows.append({"slide_id": sid, "path": str(path), "mpp": mpp})
        del img
    manifest = tmp / "slides.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    out = tmp / "many_out"
    cmd = [sys.executable, "-m", "histoexp.cli", "impute", str(model_dir), str(manifest), "-o", str(out), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def markers() -> dict:
        return {p.name[: -len(".done.json")]: json.loads(p.read_text()) for p in out.glob("*.done.json")}

    log(f"    run 1: {len(rows)} slides, killed (SIGKILL) once {args.kill_after} are done ...")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and (not out.is_dir() or len(list(out.glob("*.done.json"))) < args.kill_after):
        time.sleep(0.2)
    if proc.poll() is not None:
        raise RuntimeError("run 1 ended before it could be killed: " + proc.stderr.read()[-3000:])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run1_s = time.perf_counter() - t0
    before = markers()
    mtimes = {s: (out / f"{s}.h5ad").stat().st_mtime_ns for s in before}
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    log(f"    killed after {run1_s:.1f} s: {len(before)} done, hidden leftovers {leftovers}")

    log("    run 2: the same command ...")
    t0 = time.perf_counter()
    proc2 = subprocess.run(cmd, env=env, capture_output=True, text=True)
    run2_s = time.perf_counter() - t0
    if proc2.returncode not in (0, 1):  # 1: some slide failed (reported below), the others are done
        raise RuntimeError(proc2.stdout[-2000:] + proc2.stderr[-4000:])
    after = markers()
    unchanged = [s for s in before if after[s] == before[s] and (out / f"{s}.h5ad").stat().st_mtime_ns == mtimes[s]]
    pids = {m["pid"] for m in after.values()}
    summary = proc2.stdout.strip().splitlines()[-1]
    log(f"    {summary}")
    return {
        "n_slides": len(rows),
        "crop_px": crop,
        "kill_after": args.kill_after,
        "run1_s_until_kill": run1_s,
        "done_at_kill": len(before),
        "hidden_leftovers_after_kill": leftovers,
        "run2_s": run2_s,
        "run2_summary": summary,
        "done_after_run2": len(after),
        "run2_exit_status": proc2.returncode,
        "failed_after_run2": {
            p.name[: -len(".failed.json")]: json.loads(p.read_text())["error"] for p in out.glob("*.failed.json")
        },
        "done_before_kill_unchanged_after_run2": len(unchanged),
        "recomputed_of_done_before_kill": len(before) - len(unchanged),
        "computed_in_run2": sum(m["pid"] != next(iter(before.values()))["pid"] for m in after.values()),
        "writer_pids": len(pids),
        "hidden_leftovers_after_run2": sorted(p.name for p in out.iterdir() if p.name.startswith(".")),
        "tiles_total": int(sum(m["n_tiles"] for m in after.values())),
        "tiles_per_s_run2": sum(m["n_tiles"] for s, m in after.items() if s not in before)
        / max(sum(m["seconds"] for s, m in after.items() if s not in before), 1e-9),
    }


def _markdown(res: dict) -> str:
    lines = [
        "# Scale: whole-slide prediction and a resumed many-slide run",
        "",
        f"`{res['command']}` on {res['machine']}; histoexp {res['versions']['histoexp']}.",
        f"Model: ridge on handcrafted features of {PATCH_PX} px / {SIZE_UM:g} µm patches, "
        f"{res['model']['n_genes']} genes, trained on all {res['model']['n_spots']} spots of her2st C2..C6 "
        "(memory/throughput benchmark: no accuracy is claimed here).",
    ]
    if "slide" in res:
        s = res["slide"]
        gb = 1e9
        lines += [
            "",
            f"## (1) H&E-only prediction on a {s['image_px'][0]:,} x {s['image_px'][1]:,} px pyramidal BigTIFF",
            "",
            f"Built from section C2 (tiled), {s['tiff']['file_bytes'] / gb:.2f} GB on disk "
            f"({s['tiff']['compression']}, {s['tiff']['tile']} px tiles, {s['tiff']['levels']} levels, "
            f"{s['slide_mpp']:.3f} µm/px). Command: "
            f"`histoexp impute MODEL mosaic.tif -o OUT --tile-um {s['tile_um']:g}` in a subprocess.",
            "",
            "| quantity | value |",
            "| --- | ---: |",
            f"| decoded slide (H x W x 3) | {s['decoded_image_bytes'] / gb:.1f} GB |",
            f"| tissue tiles predicted ({s['tile_um']:g} µm grid, {SIZE_UM:g} µm patches) | {s['n_tiles']:,} |",
            f"| genes per tile | {s['n_genes']} |",
            f"| all patches as uint8 (never held) | {s['all_patches_uint8_bytes'] / gb:.2f} GB |",
            f"| tiling (thumbnail + tissue mask) | {s['steps_s']['tiles']:.1f} s |",
            f"| read + embed (handcrafted) | {s['steps_s']['embed']:.1f} s |",
            f"| predict | {s['steps_s']['predict']:.1f} s |",
            f"| **tiles/s (tiling to prediction)** | **{s['tiles_per_s_pipeline']:.0f}** |",
            f"| whole command (incl. writing outputs) | {s['command_s']:.0f} s |",
            f"| RSS before the command (imports) | {s['rss_before_bytes'] / gb:.3f} GB |",
            f"| **peak RSS of the process** | **{s['peak_rss_bytes'] / gb:.3f} GB** |",
            f"| peak RSS / decoded slide | {100 * s['peak_rss_over_decoded']:.2f} % |",
        ]
    if "many" in res:
        m = res["many"]
        lines += [
            "",
            f"## (2) {m['n_slides']} slides, killed and resumed",
            "",
            f"{m['n_slides']} crops of {m['crop_px']:,} x {m['crop_px']:,} px from C2..C6 (pyramidal TIFFs) in a CSV "
            "manifest; `histoexp impute MODEL manifest.csv -o OUT` killed with SIGKILL once "
            f"{m['kill_after']} slides were done, then the same command again.",
            "",
            "| quantity | value |",
            "| --- | ---: |",
            f"| run 1: slides done when killed | {m['done_at_kill']} (after {m['run1_s_until_kill']:.1f} s) |",
            f"| hidden temporaries left by the kill | {len(m['hidden_leftovers_after_kill'])} |",
            f"| run 2 output | `{m['run2_summary'].split(';')[0]}` |",
            f"| slides done after run 2 | {m['done_after_run2']} of {m['n_slides']} "
            f"(failed: {len(m['failed_after_run2'])}) |",
            f"| **done before the kill and recomputed in run 2** | **{m['recomputed_of_done_before_kill']}** |",
            f"| slides computed by run 2 | {m['computed_in_run2']} |",
            f"| hidden temporaries after run 2 | {len(m['hidden_leftovers_after_run2'])} |",
            f"| run 2 time | {m['run2_s']:.1f} s ({m['tiles_per_s_run2']:.0f} tiles/s inside slides) |",
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["slide", "many", "all"], default="all")
    p.add_argument("--data-dir", default=_default_data_dir(), help="her2st root (holds data/)")
    p.add_argument("--size", type=int, default=81920, help="side of the whole-slide mosaic in px (>= 80,000)")
    p.add_argument("--tile-um", type=float, default=200.0, help="tile grid of the whole slide in µm")
    p.add_argument("--n-slides", type=int, default=24)
    p.add_argument("--crop", type=int, default=6000, help="side of each many-slide crop in px")
    p.add_argument("--kill-after", type=int, default=9, help="kill run 1 once this many slides are done")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the slides are written (then deleted)")
    p.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = p.parse_args(argv)

    import histoexp as hx

    hx.settings.progress = False
    res = {
        "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "versions": {"histoexp": hx.__version__},
    }
    out = Path(args.out)
    if out.exists():  # keep the other part's result when only one part runs
        old = json.loads(out.read_text())
        res.update({k: old[k] for k in ("slide", "many") if k in old})
    tmp = Path(tempfile.mkdtemp(prefix="histoexp-scale-", dir=args.tmp))
    try:
        log("training the model ...")
        res["model"] = train_model(args.data_dir, tmp / "model")
        if args.part in ("slide", "all"):
            res["slide"] = part_slide(args, tmp / "model", tmp)
        if args.part in ("many", "all"):
            res["many"] = part_many(args, tmp / "model", tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    md = _markdown(res)
    out.with_suffix(".md").write_text(md + "\n")
    print()
    print(md)
    return res


if __name__ == "__main__":
    main()
