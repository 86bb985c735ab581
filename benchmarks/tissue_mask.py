"""Tissue detection (``hx.pp.tissue_mask`` as ``hx.pp.tile_tissue`` calls it) on the five real her2st sections.

Protocol. For each section with an image (C2..C6): the thumbnail ``tile_tissue`` uses (longest side 2000 px, about
3.4 µm per thumbnail pixel) and ``tissue_mask`` with the parameters ``tile_tissue`` derives for 100 µm tiles.

- **spot recall**: fraction of the section's spots (every spot in the spot file lies under tissue: the her2st
  authors selected them) whose centre's thumbnail pixel is masked as tissue; also with the parameters of 55 µm
  tiles (less smoothing);
- **tiles over spots**: fraction of spots that fall in a kept 100 µm tile of ``tile_tissue`` (``min_tissue=0.5``);
- **border strip masked**: fraction of a strip along the image border (5 % of the side) masked as tissue, over
  pixels of that strip that are at least 400 µm from every spot (glass or the slide's margin; the her2st images
  are cropped around the array, so the strip is the best "obvious background" available without annotation);
- **far-from-spots masked**: fraction of all pixels at least 400 µm from every spot masked as tissue (background
  besides any unsequenced tissue, so an upper bound on false positives);
- **crop inside tissue**: the same spot recall on a full-resolution crop inside the spot area (the bounding box of
  the middle 50 % of spots in x and y; about 2,000 px a side) given to ``tissue_mask`` alone with 55 µm tiles'
  parameters: a slide that is all tissue;
- **blank**: the mask of a white image (must be empty).

Run with the code under test on ``PYTHONPATH`` (``--label`` names it in the output), e.g. before and after a change::

    PYTHONPATH=src python benchmarks/tissue_mask.py --label after
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SECTIONS = ("C2", "C3", "C4", "C5", "C6")
FAR_UM = 400.0


def mask_kw(tile_um: float, px_per_um: float) -> dict:
    """``tissue_mask``'s parameters as ``tile_tissue`` derives them for tiles of ``tile_um``."""
    t = tile_um * px_per_um
    return {
        "sigma": max(1.0, t / 15),
        "min_object_px": max(16, int(0.25 * t**2)),
        "max_hole_px": max(64, int(4 * t**2)),
    }


def measure(data_dir: str, tile_um: float = 100.0) -> dict:
    from scipy.ndimage import distance_transform_edt

    import histoexp as hx
    from histoexp.image import SlideImage
    from histoexp.pp._tiles import THUMBNAIL_PX, tissue_mask

    hx.settings.progress = False
    rows = {}
    for sec in SECTIONS:
        a = hx.datasets.her2st(sec, data_dir=data_dir)
        sp = a.uns["spatial"][sec]
        path = sp["metadata"]["source_image_path"]
        mpp = float(sp["scalefactors"]["microns_per_pixel"])
        slide = SlideImage.open(path, mpp=mpp)
        thumb, scale = slide.thumbnail(THUMBNAIL_PX)
        kw = mask_kw(tile_um, scale / mpp)
        t0 = time.perf_counter()
        mask, thr = tissue_mask(thumb, **kw)
        secs = time.perf_counter() - t0
        h, w = mask.shape
        xy = np.asarray(a.obsm["spatial"], dtype=float) * scale
        cols = np.clip(np.round(xy[:, 0]).astype(int), 0, w - 1)
        rws = np.clip(np.round(xy[:, 1]).astype(int), 0, h - 1)
        recall = float(mask[rws, cols].mean())
        mask55, _ = tissue_mask(thumb, **mask_kw(55.0, scale / mpp))
        recall55 = float(mask55[rws, cols].mean())
        # distance (µm) of every thumbnail pixel to the nearest spot centre
        seeds = np.ones((h, w), dtype=bool)
        seeds[rws, cols] = False
        dist_um = distance_transform_edt(seeds) * (mpp / scale)
        far = dist_um >= FAR_UM
        bw = max(1, int(0.05 * min(h, w)))
        border = np.zeros((h, w), dtype=bool)
        border[:bw], border[-bw:], border[:, :bw], border[:, -bw:] = True, True, True, True
        strip = border & far
        # tiles: the whole tile_tissue step
        tiles = hx.pp.tile_tissue(path, tile_um=tile_um, mpp=mpp)
        tile_px = tiles.uns["histoexp"]["tiles"]["tile_px"]
        kept = set(zip(tiles.obs["array_row"], tiles.obs["array_col"], strict=True))
        full = np.asarray(a.obsm["spatial"], dtype=float)
        cells = zip((full[:, 1] // tile_px).astype(int), (full[:, 0] // tile_px).astype(int), strict=True)
        tile_hit = float(np.mean([c in kept for c in cells]))
        # a full-resolution crop inside the tissue (the middle half of the spots): a slide that is all tissue
        (x0, x1), (y0, y1) = (np.quantile(full[:, i], [0.25, 0.75]).astype(int) for i in (0, 1))
        crop = np.ascontiguousarray(slide.read_region(x0, y0, x1 - x0, y1 - y0))
        crop_mask, _ = tissue_mask(crop, **mask_kw(55.0, 1 / mpp))
        inside = (full[:, 0] >= x0) & (full[:, 0] < x1) & (full[:, 1] >= y0) & (full[:, 1] < y1)
        pc = np.round(full[inside] - [x0, y0]).astype(int)
        pc = np.clip(pc, 0, [crop.shape[1] - 1, crop.shape[0] - 1])
        crop_recall = float(crop_mask[pc[:, 1], pc[:, 0]].mean())
        rows[sec] = {
            "n_spots": int(a.n_obs),
            "thumbnail": [h, w],
            "threshold": {k: round(float(v), 4) for k, v in thr.items()} if isinstance(thr, dict) else round(thr, 4),
            "spot_recall": round(recall, 4),
            "spot_recall_55um": round(recall55, 4),
            "tiles_over_spots": round(tile_hit, 4),
            "n_tiles": int(tiles.n_obs),
            "border_strip_masked": round(float(mask[strip].mean()), 4) if strip.any() else None,
            "border_strip_px": int(strip.sum()),
            "far_from_spots_masked": round(float(mask[far].mean()), 4),
            "mask_fraction": round(float(mask.mean()), 4),
            "crop_spot_recall": round(crop_recall, 4),
            "crop_spots": int(inside.sum()),
            "seconds": round(secs, 3),
        }
        print(sec, rows[sec], flush=True)
    blank = np.full((800, 1000, 3), 245, dtype=np.uint8)
    blank_mask, _ = tissue_mask(blank)
    return {"sections": rows, "blank_masked_px": int(blank_mask.sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    p.add_argument("--label", required=True, help="name of the code measured, e.g. before / after")
    p.add_argument("--out", default=str(HERE / "results" / "tissue_mask.json"))
    args = p.parse_args()
    import histoexp as hx

    res = measure(args.data_dir)
    res.update(date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), histoexp=str(Path(hx.__file__).parent))
    out = Path(args.out)
    allres = json.loads(out.read_text()) if out.is_file() else {}
    allres[args.label] = res
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(allres, indent=1))
    write_md(allres, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def write_md(allres: dict, path: Path) -> None:
    lines = [
        "# Tissue detection on the five her2st sections",
        "",
        "Written by `benchmarks/tissue_mask.py` (protocol in its docstring): 100 µm tiles' parameters, thumbnail of "
        "2000 px; spot recall = spots whose centre is masked as tissue; border / far = fraction masked as tissue of "
        f"the border strip / of all pixels >= {FAR_UM:g} µm from every spot; crop = spot recall on a full-resolution "
        "crop inside the spot area given alone (55 µm tiles' parameters).",
        "",
        "| code | section | spot recall | spot recall (55 µm) | tiles over spots | border strip masked | "
        "far from spots masked | mask fraction | crop spot recall |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, res in allres.items():
        for sec, r in res["sections"].items():
            border = "n/a" if r["border_strip_masked"] is None else f"{r['border_strip_masked']:.3f}"
            lines.append(
                f"| {label} | {sec} | {r['spot_recall']:.3f} | {r['spot_recall_55um']:.3f} | "
                f"{r['tiles_over_spots']:.3f} | {border} | {r['far_from_spots_masked']:.3f} | "
                f"{r['mask_fraction']:.3f} | {r['crop_spot_recall']:.3f} |"
            )
    lines.append("")
    for label, res in allres.items():
        lines.append(f"- {label} ({res['date']}, {res['histoexp']}): blank white image -> {res['blank_masked_px']} px "
                     "masked.")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
