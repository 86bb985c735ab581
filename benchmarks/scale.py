"""Scale: H&E-only prediction on a whole slide, a many-slide run killed and resumed, Visium HD bins.

Model (parts 1 and 2): ridge (``hx.tl.fit_ridge``, 785-gene her2st panel, log1p(normalize_total) targets) on the
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

(3) ``--part visiumhd`` (not in ``all``; no model above). A Visium HD-like SpatialData in
``spatialdata_io.visium_hd``'s layout is built from the REAL section C2 and written to zarr: the tissue of C2 (the
spots' bounding box) tiled over ``--hd-bins`` x ``--hd-bins`` 8 µm bins (default 714: 509,796 bins, 5.7 mm square)
and resampled (nearest pixel) to ``--hd-mpp`` µm/px (default 0.2737, about a 40x scan),
multiscale (2x levels, 256 px chunks), plus a 6000 px hires image; square bins of 8 and 16 µm
(polygons) with tables ``square_008um`` / ``square_016um``. Counts: each 8 µm bin takes the counts of the real
spot nearest its position in the tiled section, Poisson-thinned to the bin's share of the spot's area (8² / (π 50²)),
drawn sparsely (a Poisson total per bin, genes from the spot's composition); 16 µm bins sum 2 x 2 of them. A
*separate process* then runs ``spatialdata.read_zarr`` -> ``hx.io.from_spatialdata`` (16 and 8 µm) ->
``hx.pp.extract_patches(size_um=55, patch_px=32, store='none')`` -> ``hx.tl.embed_patches`` -> ``hx.pp.select_genes``
(100 HVG of the 16 µm bins) -> ``hx.tl.fit_ridge`` (16 µm and 8 µm bins) -> ``hx.tl.impute`` (8 µm bins, 16 µm
model) -> ``write_h5ad``, with seconds, bins/s and the peak RSS of each step (``VmHWM`` reset through
``/proc/self/clear_refs`` at the step's start), and samples of 5,000 bins read one patch per bin (through dask and
zarr) against the grouped reads. Encoder: a fixed average pooling (colour of a 4 x 4 grid) passed as a torch module,
because ``'handcrafted'`` (measured on 2,000 bins in the same run) would take most of an hour for 637,000 bins
on one core; patches of 32 px because the pooling needs no more and reading cost grows with the pixels.

Usage::

    flock /tmp/histoexp-heavy.lock python benchmarks/scale.py --part all
    flock /tmp/histoexp-heavy.lock python benchmarks/scale.py --part visiumhd

Writes ``benchmarks/results/scale.json`` and ``scale.md`` (a part not run keeps its earlier result); the slides and
the SpatialData go to ``--tmp`` and are deleted.
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


# --------------------------------------------------------------------------------------------- (3) Visium HD
HD_CHILD = r"""
import json, sys, time

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

def reset_peak():
    # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0): a peak per step
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False

cfg = json.loads(sys.argv[1])
import anndata, numpy as np, torch, spatialdata  # noqa: F401  (imports counted in the baseline)
import histoexp as hx
hx.settings.progress = False
steps = {}
per_step = reset_peak()

def step(name, n, fn):
    reset_peak()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    steps[name] = {"seconds": dt, "n": n, "per_s": n / dt if n else None,
                   "peak_rss_kb": status_kb("VmHWM"), "rss_after_kb": status_kb("VmRSS")}
    print(name, json.dumps(steps[name]), file=sys.stderr, flush=True)
    return out

base = status_kb("VmRSS")
sdata = step("read_zarr", 0, lambda: spatialdata.read_zarr(cfg["zarr"]))
n8, n16 = (sdata.tables[k].n_obs for k in ("square_008um", "square_016um"))
a16 = step("from_spatialdata_16um", n16, lambda: hx.io.from_spatialdata(sdata, table_key="square_016um"))
a8 = step("from_spatialdata_8um", n8, lambda: hx.io.from_spatialdata(sdata, table_key="square_008um"))
# the read path before grouped reads, on a sample: one read_patch per bin through the dask-backed element
from histoexp.image import SlideImage
elem = next(v for k, v in sdata.images.items() if k.endswith("_full_image"))
mpp = next(iter(a8.uns["spatial"].values()))["scalefactors"]["microns_per_pixel"]
size_px, ns = cfg["size_um"] / mpp, cfg["n_sample"]
xy = a8.obsm["spatial"][:ns]
dask_slide = SlideImage.open(elem)
step("sample_per_bin_reads_dask", ns, lambda: [dask_slide.read_patch(x, y, size_px, cfg["patch_px"]) for x, y in xy])
zarr_slide = SlideImage.open(next(iter(a8.uns["spatial"].values()))["metadata"]["source_image_path"])
step("sample_per_bin_reads_zarr", ns, lambda: [zarr_slide.read_patch(x, y, size_px, cfg["patch_px"]) for x, y in xy])
step("sample_grouped_reads_zarr", ns, lambda: zarr_slide.read_patches(xy, size_px, cfg["patch_px"]))
del sdata, elem, dask_slide, zarr_slide  # the tables were copied into a16 / a8
geo = {"size_um": cfg["size_um"], "patch_px": cfg["patch_px"], "store": "none"}
step("extract_patches_16um", n16, lambda: hx.pp.extract_patches(a16, **geo))
step("extract_patches_8um", n8, lambda: hx.pp.extract_patches(a8, **geo))
# the encoder: fixed average pooling (colour of a 4 x 4 grid, 48 features), see the module docstring
enc = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
emb = {"encoder": enc, "batch_size": cfg["batch_size"], "key_added": "X_pool"}
step("embed_16um", n16, lambda: hx.tl.embed_patches(a16, **emb))
step("embed_8um", n8, lambda: hx.tl.embed_patches(a8, **emb))
hc = a8[: cfg["n_handcrafted"]].copy()
step("embed_handcrafted_sample_8um", hc.n_obs,
     lambda: hx.tl.embed_patches(hc, encoder="handcrafted", weights=None, batch_size=cfg["batch_size"]))
del hc
genes = step("select_genes_16um", n16, lambda: hx.pp.select_genes(a16, cfg["n_genes"]))
m16 = step("fit_ridge_16um", n16, lambda: hx.tl.fit_ridge(a16, genes=genes, use_rep="X_pool"))
m8 = step("fit_ridge_8um", n8, lambda: hx.tl.fit_ridge(a8, genes=genes, use_rep="X_pool"))
pred = step("impute_8um_with_16um_model", n8, lambda: hx.tl.impute(a8, m16))
step("write_h5ad_8um", n8, lambda: pred.write_h5ad(cfg["h5ad"]))
print(json.dumps({"steps": steps, "per_step_peak": per_step, "rss_baseline_kb": base, "n8": n8, "n16": n16,
                  "n_genes_all": int(a8.n_vars), "nnz_8um": int(a8.X.nnz), "x_type": type(a8.X).__name__,
                  "x_dtype": str(a8.X.dtype), "pred_shape": list(pred.layers["ridge"].shape),
                  "alpha16": m16.config.get("alpha"), "alpha8": m8.config.get("alpha"),
                  "patch_libraries": a8.uns["histoexp"]["patches"]["libraries"],
                  "source_image_path": next(iter(a8.uns["spatial"].values()))["metadata"]["source_image_path"],
                  "peak_rss_kb": max(v["peak_rss_kb"] for v in steps.values())}))
"""


def _poisson_thin(counts, spot_of_bin: np.ndarray, fraction: float, rng):
    """Counts of each bin: independent Poisson(fraction x count) per gene of its spot, drawn sparsely.

    Equivalent draw: total ~ Poisson(fraction x spot total), then that many genes from the spot's
    gene distribution (a Poisson vector is a Poisson total with multinomial composition).
    """
    import scipy.sparse as sp

    counts = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(counts.sum(1)).ravel()
    n_bins, n_genes = spot_of_bin.size, counts.shape[1]
    per_bin = rng.poisson(fraction * totals[spot_of_bin])
    rows, cols = [], []
    for s in np.unique(spot_of_bin):
        bins = np.flatnonzero(spot_of_bin == s)
        k = per_bin[bins]
        if not k.sum():
            continue
        row = counts.getrow(s)
        cdf = np.cumsum(row.data) / row.data.sum()
        draw = row.indices[np.minimum(np.searchsorted(cdf, rng.random(int(k.sum())), side="right"), cdf.size - 1)]
        rows.append(np.repeat(bins, k))
        cols.append(draw)
    r, c = np.concatenate(rows), np.concatenate(cols)
    m = sp.csr_matrix((np.ones(r.size, np.float32), (r, c)), shape=(n_bins, n_genes))
    m.sum_duplicates()
    return m


def build_visium_hd(args, path: Path) -> dict:
    """Write a Visium HD-like SpatialData (spatialdata_io.visium_hd's layout) made from her2st C2 to ``path``."""
    import anndata as ad
    import dask.array as da
    import pandas as pd
    import scipy.sparse as sp
    import xarray as xr
    from geopandas import GeoDataFrame
    from scipy.spatial import cKDTree
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    import histoexp as hx

    t0 = time.perf_counter()
    sec = "C2"
    img, mpp_s, xy = section_image(args.data_dir, sec)
    counts = hx.datasets.her2st(sec, data_dir=args.data_dir)
    # the tissue: bounding box of the spots, half a spot (50 µm) around them
    pad = 50 / mpp_s
    ox0, oy0 = np.floor(xy.min(0) - pad).astype(int)
    ox1, oy1 = np.ceil(xy.max(0) + pad).astype(int)
    ox0, oy0, ox1, oy1 = max(ox0, 0), max(oy0, 0), min(ox1, img.shape[1]), min(oy1, img.shape[0])
    period_um = np.array([ox1 - ox0, oy1 - oy0]) * mpp_s  # (x, y) period of the tiling in µm

    def to_source_px(um: np.ndarray, axis: int) -> np.ndarray:
        """Source pixel (column for axis 0, row for axis 1) of target positions in µm (tiling, nearest pixel)."""
        o0, o1 = (ox0, ox1) if axis == 0 else (oy0, oy1)
        return np.clip(o0 + np.floor((um % period_um[axis]) / mpp_s).astype(np.int64), o0, o1 - 1)

    n8 = args.hd_bins
    bin_um, mpp = 8.0, args.hd_mpp
    side_um = n8 * bin_um
    side = int(np.ceil(side_um / mpp))
    src_cols = to_source_px((np.arange(side) + 0.5) * mpp, 0)
    src_rows = to_source_px((np.arange(side) + 0.5) * mpp, 1)

    def block(block_info=None):
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return np.moveaxis(img[np.ix_(src_rows[y0:y1], src_cols[x0:x1])], -1, 0)

    ch = 2048
    full = da.map_blocks(
        block, dtype=np.uint8, chunks=((3,), *(tuple(min(ch, side - i) for i in range(0, side, ch)),) * 2)
    )
    ds = "hd"
    cs = {ds: Identity()}
    images = {
        f"{ds}_full_image": Image2DModel.parse(
            xr.DataArray(full, dims=("c", "y", "x")), scale_factors=[2, 2, 2, 2], transformations=cs
        )
    }
    hires_side = 6000  # Space Ranger's tissue_hires_image.png
    f = side / hires_side
    hc = to_source_px((np.arange(hires_side) + 0.5) * side_um / hires_side, 0)
    hr = to_source_px((np.arange(hires_side) + 0.5) * side_um / hires_side, 1)
    images[f"{ds}_hires_image"] = Image2DModel.parse(
        np.moveaxis(img[np.ix_(hr, hc)], -1, 0), dims=("c", "y", "x"), transformations={ds: Scale([f, f], ("y", "x"))}
    )

    # nearest real spot of each 8 µm bin (in the tiled source), its counts thinned to the bin's area
    tree = cKDTree(xy * mpp_s)
    rr, cc = np.divmod(np.arange(n8 * n8), n8)
    centre_um = np.stack([(cc + 0.5) * bin_um, (rr + 0.5) * bin_um], 1)
    src_um = np.stack([to_source_px(centre_um[:, 0], 0), to_source_px(centre_um[:, 1], 1)], 1) * mpp_s
    spot_of_bin = tree.query(src_um)[1]
    fraction = bin_um**2 / (np.pi * 50.0**2)  # bin area / legacy ST spot area (100 µm diameter)
    x8 = _poisson_thin(counts.X, spot_of_bin, fraction, np.random.default_rng(0))
    # 16 µm bins sum 2 x 2 blocks of 8 µm bins, as Space Ranger sums 2 µm bins
    n16 = n8 // 2
    keep = (rr < 2 * n16) & (cc < 2 * n16)
    agg = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), ((rr[keep] // 2) * n16 + cc[keep] // 2, np.flatnonzero(keep))),
        shape=(n16 * n16, n8 * n8),
    )
    x16 = (agg @ x8).tocsr()
    genes = pd.DataFrame(index=pd.Index(counts.var_names.astype(str), name=None))
    shapes, tables = {}, {}
    for bs, n, x in ((8, n8, x8), (16, n16, x16)):
        key = f"square_{bs:03d}um"
        name = f"{ds}_{key}"
        r, c = np.divmod(np.arange(n * n), n)
        centres = np.stack([(c + 0.5) * bs / mpp, (r + 0.5) * bs / mpp], 1)
        radius = bs / mpp / 2
        circles = ShapesModel.parse(
            centres, geometry=0, radius=np.full(n * n, radius), index=np.arange(n * n), transformations=cs
        )
        shapes[name] = ShapesModel.parse(GeoDataFrame(geometry=circles.buffer(radius, cap_style=3)), transformations=cs)
        obs = pd.DataFrame(
            {"in_tissue": np.ones(n * n, np.int32), "array_row": r, "array_col": c, "location_id": np.arange(n * n)},
            index=pd.Index([f"s_{bs:03d}um_{i:05d}_{j:05d}-1" for i, j in zip(r, c, strict=True)]),
        )
        obs["region"] = pd.Categorical([name] * (n * n))
        tables[key] = TableModel.parse(
            ad.AnnData(X=x, obs=obs, var=genes.copy()), region=name, region_key="region", instance_key="location_id"
        )
    sdata = SpatialData(images=images, shapes=shapes, tables=tables)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sdata.write(path)  # the full-resolution image is computed chunk by chunk from the source here
    write_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {
        "source_section": sec,
        "source_mpp": mpp_s,
        "tissue_crop_px": [int(ox0), int(oy0), int(ox1), int(oy1)],
        "mpp": mpp,
        "side_um": side_um,
        "image_px": [side, side],
        "hires_px": hires_side,
        "n_bins_8um": int(n8 * n8),
        "n_bins_16um": int(n16 * n16),
        "n_genes": int(counts.n_vars),
        "thinning_fraction": fraction,
        "umis_per_8um_bin": float(x8.sum() / x8.shape[0]),
        "nnz_per_8um_bin": float(x8.nnz / x8.shape[0]),
        "umis_per_source_spot": float(np.asarray(counts.X.sum(1)).mean()),
        "n_source_spots": int(counts.n_obs),
        "build_s": build_s,
        "write_s": write_s,
        "zarr_bytes": size,
    }


def part_visiumhd(args, tmp: Path) -> dict:
    zarr_path = tmp / "visium_hd.zarr"
    log(f"(3) building a Visium HD-like SpatialData: {args.hd_bins}^2 8 µm bins at {args.hd_mpp} µm/px ...")
    info = build_visium_hd(args, zarr_path)
    log(f"    built in {info['build_s']:.0f} s, written in {info['write_s']:.0f} s ({info['zarr_bytes'] / 1e9:.2f} GB)")
    cfg = {
        "zarr": str(zarr_path),
        "h5ad": str(tmp / "pred_8um.h5ad"),
        "size_um": args.hd_size_um,
        "patch_px": args.hd_patch_px,
        "batch_size": 256,
        "n_genes": args.hd_genes,
        "n_handcrafted": 2000,
        "n_sample": 5000,
    }
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log("    the pipeline in a subprocess ...")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", HD_CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-6000:])
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    n8, n_all = child["n8"], child["n_genes_all"]
    side = info["image_px"][0]
    return {
        **info,
        "patch": {"size_um": args.hd_size_um, "patch_px": args.hd_patch_px, "store": "none", "batch_size": 256},
        "encoder": "AdaptiveAvgPool2d(4) + Flatten (48 colour features), passed as a torch module",
        "n_panel_genes": args.hd_genes,
        "child_s": time.perf_counter() - t0,
        "h5ad_bytes": (tmp / "pred_8um.h5ad").stat().st_size,
        "decoded_image_bytes": side * side * 3,
        "dense_8um_all_genes_float32_bytes": n8 * n_all * 4,
        "dense_8um_panel_float32_bytes": n8 * args.hd_genes * 4,
        **child,
    }


def _markdown(res: dict) -> str:
    lines = ["# Scale: whole-slide prediction, a resumed many-slide run, Visium HD bins"]
    if "model" in res and ("slide" in res or "many" in res):
        lines += [
            "",
            f"Parts (1) and (2): `{res['command']}` on {res['machine']}; histoexp {res['versions']['histoexp']}.",
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
    if "visiumhd" in res:
        lines += _markdown_hd(res["visiumhd"])
    return "\n".join(lines)


def _markdown_hd(h: dict) -> list[str]:
    gb = 1e9
    st = h["steps"]
    names = {
        "read_zarr": "`spatialdata.read_zarr` (tables in memory, images lazy)",
        "from_spatialdata_16um": "`hx.io.from_spatialdata(table_key='square_016um')`",
        "from_spatialdata_8um": "`hx.io.from_spatialdata(table_key='square_008um')`",
        "extract_patches_16um": "`hx.pp.extract_patches(store='none')`, 16 µm",
        "extract_patches_8um": "`hx.pp.extract_patches(store='none')`, 8 µm",
        "embed_16um": "`hx.tl.embed_patches` (read + pool), 16 µm",
        "embed_8um": "`hx.tl.embed_patches` (read + pool), 8 µm",
        "embed_handcrafted_sample_8um": "`embed_patches(encoder='handcrafted')`, sample of 8 µm bins",
        "sample_per_bin_reads_dask": "sample: one `read_patch` per bin, dask-backed element (the old path)",
        "sample_per_bin_reads_zarr": "sample: one `read_patch` per bin, zarr directly",
        "sample_grouped_reads_zarr": "sample: `read_patches` (grouped region reads), zarr",
        "select_genes_16um": f"`hx.pp.select_genes({h['n_panel_genes']})` (seurat_v3 HVG), 16 µm",
        "fit_ridge_16um": "`hx.tl.fit_ridge` on 16 µm bins",
        "fit_ridge_8um": "`hx.tl.fit_ridge` on 8 µm bins",
        "impute_8um_with_16um_model": "`hx.tl.impute` of the 8 µm bins (16 µm model)",
        "write_h5ad_8um": "`write_h5ad` of the 8 µm predictions",
    }
    rows = []
    for k, v in st.items():
        rate = f"{v['per_s']:,.0f}" if v["per_s"] else ""
        rows.append(
            f"| {names.get(k, k)} | {v['n']:,} | {v['seconds']:.1f} | {rate} | "
            f"{v['peak_rss_kb'] * 1024 / gb:.2f} | {v['rss_after_kb'] * 1024 / gb:.2f} |"
        )
    peak = h["peak_rss_kb"] * 1024
    return [
        "",
        f"## (3) Visium HD: {h['n_bins_8um']:,} bins of 8 µm and {h['n_bins_16um']:,} of 16 µm",
        "",
        f"`{h['command']}` on {h['machine']}. A SpatialData in `spatialdata_io.visium_hd`'s layout "
        f"({h['side_um'] / 1000:.2f} mm x {h['side_um'] / 1000:.2f} mm, zarr, {h['zarr_bytes'] / gb:.2f} GB on disk) "
        f"built from her2st {h['source_section']}: full-resolution H&E of {h['image_px'][0]:,} x {h['image_px'][1]:,} "
        f"px at {h['mpp']} µm/px (multiscale, 256 px chunks; the section's tissue, tiled and resampled from "
        f"{h['source_mpp']:.3f} µm/px, nearest pixel), a {h['hires_px']} px hires image, square bins as polygons, "
        f"tables `square_008um` / `square_016um` with CSR counts of {h['n_genes']:,} genes. Each 8 µm bin takes "
        f"Poisson-thinned counts (fraction {h['thinning_fraction']:.4f} = bin area / 100 µm spot area) of the real "
        f"spot nearest its position in the tiled section: {h['umis_per_8um_bin']:.0f} UMIs and "
        f"{h['nnz_per_8um_bin']:.0f} genes per bin on average (source spots: {h['umis_per_source_spot']:,.0f} UMIs); "
        "16 µm bins sum 2 x 2 of them. The pipeline ran in a subprocess; peak RSS per step is `VmHWM` after "
        "resetting it (`/proc/self/clear_refs`) at the step's start. Patches: "
        f"{h['patch']['size_um']:g} µm around each bin centre at {h['patch']['patch_px']} px, `store='none'` "
        f"(read by region from the zarr image when embedded), batches of {h['patch']['batch_size']}. Encoder: "
        f"{h['encoder']}. Genes: the {h['n_panel_genes']} most variable of the 16 µm bins. No accuracy is claimed "
        f"(the bins' counts come from {h.get('n_source_spots', 'the')} real spots).",
        "",
        "| step | bins | s | bins/s | peak RSS (GB) | RSS after (GB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "| quantity | value |",
        "| --- | ---: |",
        f"| RSS after imports | {h['rss_baseline_kb'] * 1024 / gb:.2f} GB |",
        f"| **peak RSS of the process (largest step peak)** | **{peak / gb:.2f} GB** |",
        f"| decoded full-resolution image (H x W x 3) | {h['decoded_image_bytes'] / gb:.2f} GB |",
        f"| dense 8 µm bins x all genes, float32 | {h['dense_8um_all_genes_float32_bytes'] / gb:.1f} GB |",
        f"| dense 8 µm bins x panel, float32 | {h['dense_8um_panel_float32_bytes'] / gb:.2f} GB |",
        f"| counts of the 8 µm bins in memory | {h['x_type']} {h['x_dtype']}, {h['nnz_8um']:,} non-zeros |",
        f"| predictions written | {h['pred_shape'][0]:,} x {h['pred_shape'][1]} ({h['h5ad_bytes'] / gb:.2f} GB h5ad) |",
        f"| whole subprocess | {h['child_s']:.0f} s |",
        f"| building + writing the SpatialData (not in the subprocess) | {h['build_s']:.0f} s + {h['write_s']:.0f} s |",
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["slide", "many", "all", "visiumhd"], default="all", help="all: slide and many")
    p.add_argument("--data-dir", default=_default_data_dir(), help="her2st root (holds data/)")
    p.add_argument("--size", type=int, default=81920, help="side of the whole-slide mosaic in px (>= 80,000)")
    p.add_argument("--tile-um", type=float, default=200.0, help="tile grid of the whole slide in µm")
    p.add_argument("--n-slides", type=int, default=24)
    p.add_argument("--crop", type=int, default=6000, help="side of each many-slide crop in px")
    p.add_argument("--kill-after", type=int, default=9, help="kill run 1 once this many slides are done")
    p.add_argument("--hd-bins", type=int, default=714, help="Visium HD: 8 µm bins per side (714: 509,796 bins)")
    p.add_argument("--hd-mpp", type=float, default=0.2737, help="Visium HD: µm/px of the full-resolution image")
    p.add_argument("--hd-size-um", type=float, default=55.0, help="Visium HD: patch side in µm around each bin")
    p.add_argument("--hd-patch-px", type=int, default=32, help="Visium HD: patch side in pixels")
    p.add_argument("--hd-genes", type=int, default=100, help="Visium HD: panel of highly variable genes")
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
        res.update({k: old[k] for k in ("model", "slide", "many", "visiumhd") if k in old})
        if args.part == "visiumhd":  # the heading's command and machine describe the slide / many parts
            res.update({k: old[k] for k in ("command", "machine", "versions") if k in old})
    tmp = Path(tempfile.mkdtemp(prefix="histoexp-scale-", dir=args.tmp))
    try:
        if args.part in ("slide", "many", "all"):
            log("training the model ...")
            res["model"] = train_model(args.data_dir, tmp / "model")
        if args.part == "visiumhd":
            res["visiumhd"] = {
                "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                **part_visiumhd(args, tmp),
            }
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
