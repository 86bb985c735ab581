"""Whole slides: vendor formats through tiffslide, bounded thumbnails, H&E-only prediction on one slide and on many
(resumable, per-slide failures, shards)."""

from __future__ import annotations

import json
import os
import pickle
import sys

import numpy as np
import pandas as pd
import pytest

import histoexp as hx
from histoexp.image import _slide

APERIO = "Aperio Image Library v12.0.15\n{w}x{h} [0,100 {w}x{h}] (128x128) RGB|AppMag = 20|MPP = 0.5"


def _smooth_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [200 + 40 * np.sin(xx / 37.0), 120 + 60 * np.cos(yy / 23.0), 180 + 30 * np.sin((xx + yy) / 51.0)], -1
    )
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _write_svs(path, img: np.ndarray) -> None:
    """An Aperio-described tiled pyramid (deflate, lossless) that tiffslide reads as SVS."""
    tifffile = pytest.importorskip("tifffile")
    h, w = img.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            img, tile=(128, 128), photometric="rgb", compression="zlib", description=APERIO.format(w=w, h=h), subifds=2
        )
        tw.write(img[::2, ::2].copy(), tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=1)
        tw.write(img[::4, ::4].copy(), tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=1)


# --------------------------------------------------------------------------------------------- vendor formats
def test_svs_through_tiffslide_reads_regions_and_mpp(tmp_path):
    pytest.importorskip("tiffslide")
    img = _smooth_rgb(600, 700)
    path = tmp_path / "slide.svs"
    _write_svs(path, img)
    s = hx.image.SlideImage.open(path)
    assert s.shape == (600, 700)
    assert s.mpp == pytest.approx(0.5) and s.mpp_source == "slide metadata"
    assert s.downsamples == [1.0, 2.0, 4.0]
    np.testing.assert_array_equal(s.read_region(100, 50, 130, 70), img[50:120, 100:230])
    np.testing.assert_array_equal(s.read_region(0, 0, 40, 40, level=1), img[::2, ::2][:20, :20])
    # pickled (DataLoader workers) and reopened lazily
    s2 = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(s2.read_region(300, 300, 10, 10), img[300:310, 300:310])
    # an explicit mpp wins over the metadata
    assert hx.image.SlideImage.open(path, mpp=0.25).mpp == 0.25


def test_vendor_format_without_the_extra_names_it(tmp_path, monkeypatch):
    img = _smooth_rgb(200, 200)
    ndpi = tmp_path / "slide.ndpi"
    _write_svs(ndpi, img)
    monkeypatch.setitem(sys.modules, "tiffslide", None)  # import fails
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(ImportError, match=r"histoexp\[slide\]"):
        hx.image.SlideImage.open(ndpi)
    mrxs = tmp_path / "x.mrxs"
    mrxs.write_bytes(b"x")
    with pytest.raises(ImportError, match="openslide-python"):
        hx.image.SlideImage.open(mrxs)
    # .svs falls back to tifffile (the pixels, without the Aperio µm/px)
    svs = tmp_path / "slide.svs"
    _write_svs(svs, img)
    s = hx.image.SlideImage.open(svs)
    np.testing.assert_array_equal(s.read_region(10, 20, 30, 30), img[20:50, 10:40])


def test_thumbnail_of_a_level_too_large_to_read_whole_goes_by_strips(tmp_path, monkeypatch):
    img = _smooth_rgb(900, 1200, seed=1)
    s = hx.image.SlideImage.open(img)
    ref, scale = s.thumbnail(300)
    tifffile = pytest.importorskip("tifffile")
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, img, tile=(128, 128), photometric="rgb")  # one level: no pyramid to fall back on
    reads = []
    real = _slide._Level.read

    def spy(self, y0, y1, x0, x1):
        reads.append((y1 - y0) * (x1 - x0))
        return real(self, y0, y1, x0, x1)

    monkeypatch.setattr(_slide, "THUMBNAIL_READ_MAX_PX", 100_000)
    monkeypatch.setattr(_slide._Level, "read", spy)
    th, scale2 = hx.image.SlideImage.open(flat).thumbnail(300)
    assert th.shape == ref.shape and scale2 == scale
    assert max(reads) < img.shape[0] * img.shape[1] / 2  # never the whole level in one read
    assert np.abs(th.astype(float) - ref.astype(float)).mean() < 6  # the same picture, box- vs directly resampled


# --------------------------------------------------------------------------------------------- slides
@pytest.fixture(scope="module")
def slide_setup(tmp_path_factory):
    """A ridge model trained on synthetic sections and their images written as PNG files (2 µm/px)."""
    from PIL import Image

    old = hx.settings.progress
    hx.settings.progress = False
    ad = hx.datasets.synthetic(n_sections=3, random_state=0)
    hx.pp.extract_patches(ad, patch_px=32, store="memory")
    hx.tl.embed_patches(ad, encoder="handcrafted", weights=None)
    model = hx.tl.fit_ridge(ad, use_rep="X_handcrafted", genes=list(ad.var_names[:10]))
    hx.settings.progress = old
    folder = tmp_path_factory.mktemp("slides")
    paths = []
    for lib in ad.uns["spatial"]:
        p = folder / f"{lib}.png"
        Image.fromarray(np.asarray(ad.uns["spatial"][lib]["images"]["hires"])).save(p)
        paths.append(p)
    return model, paths


def test_impute_slide_matches_the_in_memory_pipeline(slide_setup):
    model, paths = slide_setup
    pred = hx.tl.impute_slide(paths[0], model, mpp=2.0)
    info = pred.uns["histoexp"]["slide"]
    assert info["n_tiles"] == pred.n_obs > 10 and info["tiles_per_s"] > 0
    assert "patches" not in pred.obsm  # patches were read on demand, never stored
    # the same tiles through the in-memory route give the same predictions
    q = hx.pp.tile_tissue(str(paths[0]), tile_um=model.image_spec()["size_um"], mpp=2.0, library_id="slide")
    hx.pp.extract_patches(q, size_um=model.image_spec()["size_um"], patch_px=32, store="memory")
    hx.tl.embed_patches(q, encoder="handcrafted", weights=None)
    ref = hx.tl.impute(q, model)
    np.testing.assert_allclose(pred.layers["ridge"], ref.layers["ridge"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="retrieval"):
        hx.tl.impute_slide(paths[0], model, mpp=2.0, k=5)


def _manifest(tmp_path, paths, extra=()):
    rows = [{"slide_id": p.stem, "path": str(p), "mpp": 2.0} for p in paths] + list(extra)
    csv = tmp_path / "slides.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_impute_slides_resumes_and_reports_failures(slide_setup, tmp_path):
    model, paths = slide_setup
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    csv = _manifest(tmp_path, paths, [{"slide_id": "broken", "path": str(bad), "mpp": 2.0}])
    out = tmp_path / "out"
    res = hx.tl.impute_slides(csv, model, out)
    assert res["status"].to_dict() == {"S0": "done", "S1": "done", "S2": "done", "broken": "failed"}
    assert "cannot read" in res.loc["broken", "error"]
    assert json.loads((out / "broken.failed.json").read_text())["error"] == res.loc["broken", "error"]
    import anndata as ad

    for sid in ("S0", "S1", "S2"):
        a = ad.read_h5ad(out / f"{sid}.h5ad")
        assert a.n_obs == res.loc[sid, "n_tiles"] and "ridge" in a.layers and "X_handcrafted" not in a.obsm
    stamps = {s: (out / f"{s}.done.json").stat().st_mtime_ns for s in ("S0", "S1", "S2")}

    # a kill while S1 was being written: no marker, a hidden temporary left behind
    (out / "S1.done.json").unlink()
    stale = out / ".S1.tmp-0123abcd.h5ad"
    stale.write_bytes(b"partial")
    res2 = hx.tl.impute_slides(csv, model, out)
    assert res2["status"].to_dict() == {"S0": "skipped", "S1": "done", "S2": "skipped", "broken": "failed"}
    assert not stale.exists()
    assert (out / "S0.done.json").stat().st_mtime_ns == stamps["S0"]  # nothing done was recomputed
    assert (out / "S2.done.json").stat().st_mtime_ns == stamps["S2"]

    # the broken slide fixed: retried, and its failure record goes away
    from PIL import Image

    bad.unlink()
    bad_png = tmp_path / "broken.png"
    Image.open(paths[0]).save(bad_png)
    res3 = hx.tl.impute_slides(csv, model, out)
    assert res3.loc["broken", "status"] == "done" and not (out / "broken.failed.json").exists()
    assert (res3.drop(index="broken")["status"] == "skipped").all()

    # other parameters into the same folder: refused; a file histoexp did not write: never replaced
    with pytest.raises(ValueError, match="differs in `min_tissue`"):
        hx.tl.impute_slides(csv, model, out, min_tissue=0.9)
    (out / "S0.done.json").unlink()
    (out / "S0.h5ad").write_bytes(b"user data")
    res4 = hx.tl.impute_slides(csv, model, out)
    assert res4.loc["S0", "status"] == "failed" and "not written by impute_slides" in res4.loc["S0", "error"]
    assert (out / "S0.h5ad").read_bytes() == b"user data"


def test_impute_slides_shards_split_the_list(slide_setup, tmp_path):
    model, paths = slide_setup
    out = tmp_path / "out"
    r0 = hx.tl.impute_slides([str(p) for p in paths], model, out, mpp=2.0, shard="0/2")
    r1 = hx.tl.impute_slides([str(p) for p in paths], model, out, mpp=2.0, shard=(1, 2))
    assert list(r0.index) == ["S0", "S2"] and list(r1.index) == ["S1"]
    assert (r0["status"] == "done").all() and (r1["status"] == "done").all()
    # the whole list afterwards: everything already done
    again = hx.tl.impute_slides([str(p) for p in paths], model, out, mpp=2.0)
    assert (again["status"] == "skipped").all()
    for bad in ("2/2", "1", (0, 0), "a/b"):
        with pytest.raises(ValueError, match="shard"):
            hx.tl.impute_slides([str(p) for p in paths], model, out, mpp=2.0, shard=bad)


def test_read_slide_list_checks_ids_and_sources(tmp_path, slide_setup):
    _, paths = slide_setup
    table = hx.tl.read_slide_list(paths[0].parent)
    assert list(table["slide_id"]) == ["S0", "S1", "S2"] and table["mpp"].isna().all()
    lst = tmp_path / "slides.txt"
    lst.write_text("# slides\n" + "\n".join(str(p) for p in paths) + "\n")
    assert list(hx.tl.read_slide_list(lst)["path"]) == [str(p) for p in paths]
    with pytest.raises(ValueError, match="more than once"):
        hx.tl.read_slide_list([str(paths[0]), str(paths[0])])
    with pytest.raises(ValueError, match="no 'path' column"):
        pd.DataFrame({"file": [str(paths[0])]}).to_csv(tmp_path / "m.csv", index=False)
        hx.tl.read_slide_list(tmp_path / "m.csv")
    with pytest.raises(ValueError, match="not positive"):
        pd.DataFrame({"path": [str(paths[0])], "mpp": [-1]}).to_csv(tmp_path / "m2.csv", index=False)
        hx.tl.read_slide_list(tmp_path / "m2.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no slide"):
        hx.tl.read_slide_list(empty)


def test_cli_impute_many_slides_resumes_and_fails_per_slide(slide_setup, tmp_path, capsys):
    from PIL import Image

    from histoexp.cli import main

    model, paths = slide_setup
    model_dir = tmp_path / "model"
    model.save(model_dir)
    bad = tmp_path / "zz_broken.png"
    bad.write_bytes(b"nope")
    csv = _manifest(tmp_path, paths, [{"slide_id": "zz_broken", "path": str(bad), "mpp": 2.0}])
    out = tmp_path / "out"
    assert main(["impute", str(model_dir), str(csv), "-o", str(out), "-q"]) == 1  # a slide failed
    err = capsys.readouterr().err
    assert "zz_broken" in err and "1 failed" in err
    assert sorted(p.name for p in out.glob("*.h5ad")) == ["S0.h5ad", "S1.h5ad", "S2.h5ad"]
    bad.unlink()
    Image.open(paths[0]).save(bad)  # fixed: only that slide is computed now
    assert main(["impute", str(model_dir), str(csv), "-o", str(out), "-q", "--shard", "0/1"]) == 0
    printed = capsys.readouterr().out
    assert "1 computed, 3 already done, 0 failed" in printed
    assert os.path.exists(out / "zz_broken.done.json")


# --------------------------------------------------------------------------------------------- retrieval references
@pytest.fixture(scope="module")
def bleep_setup(slide_setup):
    """A small BLEEP model on the synthetic sections of ``slide_setup`` and two count-only references."""
    _, paths = slide_setup
    old = hx.settings.progress
    hx.settings.progress = False
    ad = hx.datasets.synthetic(n_sections=3, random_state=0)
    hx.pp.extract_patches(ad, patch_px=32, store="memory")
    hx.tl.embed_patches(ad, encoder="handcrafted", weights=None)
    genes = list(ad.var_names[:10])
    model = hx.tl.fit_bleep(ad, use_rep="X_handcrafted", genes=genes, epochs=3, n_ensemble=2, random_state=0)
    hx.settings.progress = old
    ref_a = ad[ad.obs["library_id"] != "S2"].copy()
    del ref_a.obsm["patches"]
    ref_a.uns.pop("spatial", None)  # retrieval references need counts only
    ref_b = ref_a[ref_a.obs["library_id"] == "S0"].copy()  # same genes, fewer spots
    return model, paths, ref_a, ref_b


def test_impute_slides_reference_prepared_once_and_recorded(bleep_setup, tmp_path, monkeypatch):
    from histoexp.tl import _predict

    model, paths, ref_a, ref_b = bleep_setup
    banks, encodes = [], []
    real_bank, real_encode = _predict._reference_bank, type(model).encode_reference
    monkeypatch.setattr(_predict, "_reference_bank", lambda *a, **k: banks.append(1) or real_bank(*a, **k))
    monkeypatch.setattr(
        type(model), "encode_reference", lambda self, *a, **k: encodes.append(1) or real_encode(self, *a, **k)
    )
    out = tmp_path / "out"
    slides = [str(p) for p in paths]
    res = hx.tl.impute_slides(slides, model, out, mpp=2.0, reference=ref_a, genes="all", k=5)
    assert (res["status"] == "done").all()
    assert len(banks) == 1 and len(encodes) == model.n_ensemble  # once for the three slides, not per slide
    import anndata as ad

    got = ad.read_h5ad(out / "S1.h5ad")
    assert list(got.var_names) == list(ref_a.var_names)  # genes='all': every reference gene
    assert "prepared, sha256" in got.uns["bleep"]["params"]["reference"]
    monkeypatch.undo()
    # the prepared bank predicts what a plain impute_slide with the reference predicts
    one = hx.tl.impute_slide(paths[1], model, mpp=2.0, reference=ref_a, genes="all", k=5)
    np.testing.assert_allclose(np.asarray(got.layers["bleep"]), one.layers["bleep"], rtol=1e-5, atol=1e-6)
    rec = json.loads((out / "histoexp_slides.json").read_text())
    assert rec["params"]["reference"]["n_spots"] == ref_a.n_obs and len(rec["params"]["reference"]["sha256"]) == 16
    # the same reference again (another copy of the same data): everything skipped
    again = hx.tl.impute_slides(slides, model, out, mpp=2.0, reference=ref_a.copy(), genes="all", k=5)
    assert (again["status"] == "skipped").all()
    # another reference into the same folder: refused, naming it; nothing rewritten
    before = (out / "S1.h5ad").stat().st_mtime_ns
    with pytest.raises(ValueError, match="differs in `reference`"):
        hx.tl.impute_slides(slides, model, out, mpp=2.0, reference=ref_b, genes="all", k=5)
    with pytest.raises(ValueError, match="differs in `reference`"):  # the model's own reference is another one
        hx.tl.impute_slides(slides, model, out, mpp=2.0, genes="all", k=5)
    assert (out / "S1.h5ad").stat().st_mtime_ns == before
    # overwrite=True: every slide recomputed with the new reference
    redo = hx.tl.impute_slides(slides, model, out, mpp=2.0, reference=ref_b, genes="all", k=5, overwrite=True)
    assert (redo["status"] == "done").all()
    new = ad.read_h5ad(out / "S1.h5ad")
    assert not np.allclose(np.asarray(new.layers["bleep"]), np.asarray(got.layers["bleep"]))
    assert json.loads((out / "histoexp_slides.json").read_text())["run_id"] != rec["run_id"]


def test_impute_slides_index_checked_before_any_slide(bleep_setup, slide_setup, tmp_path, monkeypatch):
    model, paths, ref_a, _ = bleep_setup
    ridge, _ = slide_setup
    slides = [str(p) for p in paths]
    pytest.importorskip("faiss")
    out = tmp_path / "out"
    res = hx.tl.impute_slides(slides, model, out, mpp=2.0, reference=ref_a, k=5, index="faiss-hnsw")
    assert (res["status"] == "done").all()
    import anndata as ad

    assert ad.read_h5ad(out / "S0.h5ad").uns["bleep"]["params"]["index"] == "faiss-hnsw"
    assert json.loads((out / "histoexp_slides.json").read_text())["params"]["index"] == "faiss-hnsw"
    with pytest.raises(ValueError, match="differs in `index`"):  # resumed with the exact search: refused
        hx.tl.impute_slides(slides, model, out, mpp=2.0, reference=ref_a, k=5)
    with pytest.raises(ValueError, match="lacks"):  # a reference without the model genes: before any output
        hx.tl.impute_slides(slides, model, tmp_path / "o1", mpp=2.0, reference=ref_a[:, 20:].copy())
    with pytest.raises(ValueError, match="index_params"):
        hx.tl.impute_slides(slides, model, tmp_path / "o2", mpp=2.0, index="faiss-ivf", index_params={"nprob": 3})
    with pytest.raises(ValueError, match="retrieval"):
        hx.tl.impute_slides(slides, ridge, tmp_path / "o3", mpp=2.0, index="faiss-ivf")
    with pytest.raises(ValueError, match="retrieval"):
        hx.tl.impute_slides(slides, ridge, tmp_path / "o3", mpp=2.0, reference=ref_a)
    monkeypatch.setitem(sys.modules, "faiss", None)  # not installed
    with pytest.raises(ImportError, match=r"histoexp\[ann\]"):
        hx.tl.impute_slides(slides, model, tmp_path / "o4", mpp=2.0, index="faiss-ivf")
    with pytest.raises(ImportError, match=r"histoexp\[ann\]"):
        hx.tl.impute_slide(paths[0], model, mpp=2.0, index="faiss-ivf")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3, 4))  # refused before any work


def test_cli_impute_reference_and_index(bleep_setup, tmp_path, capsys, monkeypatch):
    from histoexp.cli import main

    model, paths, ref_a, ref_b = bleep_setup
    model_dir = tmp_path / "model"
    model.save(model_dir)
    ra, rb = tmp_path / "ref_a.h5ad", tmp_path / "ref_b.h5ad"
    ref_a.write_h5ad(ra)
    ref_b.write_h5ad(rb)
    csv = _manifest(tmp_path, paths)
    out = tmp_path / "out"
    reads = []
    import anndata as ad

    real_read = ad.read_h5ad
    monkeypatch.setattr(ad, "read_h5ad", lambda p, *a, **k: reads.append(str(p)) or real_read(p, *a, **k))
    base = ["impute", str(model_dir), str(csv), "-o", str(out), "-q", "--k", "5"]
    assert main([*base, "--reference", str(ra), "--index", "faiss-ivf", "--index-params", "nprobe=2,nlist=4"]) == 0
    assert reads == [str(ra)]  # the reference read once for the three slides
    monkeypatch.undo()
    pred = ad.read_h5ad(out / "S0.h5ad")
    params = pred.uns["bleep"]["params"]
    assert params["index"] == "faiss-ivf"
    assert params["index_params"]["nprobe"] == 2 and params["index_params"]["nlist"] == 4
    capsys.readouterr()
    # resumed with another reference: a clear error, the outputs untouched
    assert main([*base, "--reference", str(rb), "--index", "faiss-ivf", "--index-params", "nprobe=2,nlist=4"]) == 1
    assert "differs in `reference`" in capsys.readouterr().err
    # bad --index-params / a regression model / no faiss: errors naming the option, before any work
    assert main([*base, "--index", "faiss-ivf", "--index-params", "nprobe"]) == 1
    assert "--index-params 'nprobe'" in capsys.readouterr().err
    assert main([*base, "--index-params", "nprobe=3"]) == 1
    assert "not to the exact search" in capsys.readouterr().err
    assert main([*base, "--index", "faiss-hnsw", "--index-params", "nprobe=3"]) == 1
    assert "--index-params" in capsys.readouterr().err
    # a single .h5ad query: the index reaches impute and is recorded
    q = tmp_path / "q.h5ad"
    hx.datasets.synthetic(n_sections=1, random_state=4).write_h5ad(q)
    assert main(["impute", str(model_dir), str(q), "-o", str(tmp_path / "o4"), "--index", "faiss-hnsw", "-q"]) == 0
    assert ad.read_h5ad(tmp_path / "o4" / "predictions.h5ad").uns["bleep"]["params"]["index"] == "faiss-hnsw"
    monkeypatch.setitem(sys.modules, "faiss", None)  # not installed
    assert main(["impute", str(model_dir), str(q), "-o", str(tmp_path / "o5"), "--index", "faiss-hnsw", "-q"]) == 1
    assert "pip install 'histoexp[ann]'" in capsys.readouterr().err
    assert main([*base[:3], "-o", str(tmp_path / "o6"), "-q", "--index", "faiss-ivf"]) == 1
    assert "pip install 'histoexp[ann]'" in capsys.readouterr().err
    assert not (tmp_path / "o5").exists() and not (tmp_path / "o6").exists()


def test_cli_index_and_reference_refused_for_regression_models(slide_setup, tmp_path, capsys):
    from histoexp.cli import main

    ridge, paths = slide_setup
    model_dir = tmp_path / "ridge"
    ridge.save(model_dir)
    csv = _manifest(tmp_path, paths)
    out = tmp_path / "out"
    assert main(["impute", str(model_dir), str(csv), "-o", str(out), "-q", "--index", "faiss-ivf"]) == 1
    assert "--index applies to retrieval models" in capsys.readouterr().err
    assert main(["impute", str(model_dir), str(csv), "-o", str(out), "-q", "--reference", str(csv)]) == 1
    assert "--reference applies to retrieval models" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------------------------- Visium HD bins
def _hd_sdata(bin_um: float, *, mpp: float = 0.5, side: int = 640, hires: bool = True, seed: int = 0):
    """A SpatialData laid out as spatialdata_io.visium_hd writes it: bins as squares, full + hires images."""
    import anndata as ad
    from geopandas import GeoDataFrame
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    img = _smooth_rgb(side, side, seed)
    step = bin_um / mpp
    centres = np.array([(x, y) for y in np.arange(step / 2, side, step) for x in np.arange(step / 2, side, step)])
    r = step / 2
    name = f"demo_square_{int(bin_um):03d}um"
    tf = {"demo": Identity()}
    circles = ShapesModel.parse(centres, geometry=0, radius=np.full(len(centres), r), transformations=tf)
    shapes = ShapesModel.parse(GeoDataFrame(geometry=circles.buffer(r, cap_style=3)), transformations=tf)
    # expression follows the red channel around each bin (55 µm): learnable from patches with context
    k = int(round(27.5 / mpp))
    red = img[..., 0].astype(float)
    drive = np.array([red[max(0, int(y) - k) : int(y) + k, max(0, int(x) - k) : int(x) + k].mean() for x, y in centres])
    drive = (drive - drive.mean()) / drive.std()
    rng = np.random.default_rng(seed)
    coef = rng.normal(0, 1, 12)
    counts = rng.poisson(np.exp(2.5 + 0.8 * np.outer(drive, coef)))
    table = ad.AnnData(counts.astype(np.float32))
    table.var_names = [f"g{i}" for i in range(12)]
    table.obs_names = [f"b{i}" for i in range(len(centres))]
    table.obs["region"] = pd.Categorical([name] * len(centres))
    table.obs["location_id"] = np.arange(len(centres))
    n_side = int(np.ceil(side / step))
    table.obs["array_row"] = np.arange(len(centres)) // n_side
    table.obs["array_col"] = np.arange(len(centres)) % n_side
    table.obs["in_tissue"] = 1
    table = TableModel.parse(table, region=name, region_key="region", instance_key="location_id")
    images = {"demo_full_image": Image2DModel.parse(img.transpose(2, 0, 1), dims=("c", "y", "x"), transformations=tf)}
    if hires:
        images["demo_hires_image"] = Image2DModel.parse(
            img[::2, ::2].transpose(2, 0, 1).copy(),
            dims=("c", "y", "x"),
            transformations={"demo": Scale([2, 2], ("x", "y"))},
        )
    key = f"square_{int(bin_um):03d}um"
    return SpatialData(images=images, shapes={name: shapes}, tables={key: table}), key, centres


def test_visium_hd_bins_mpp_context_patches_and_training(monkeypatch):
    pytest.importorskip("spatialdata")
    sdata, key, centres = _hd_sdata(8)
    a = hx.io.from_spatialdata(sdata, table_key=key)
    lib = next(iter(a.uns["spatial"]))
    sf, meta = a.uns["spatial"][lib]["scalefactors"], a.uns["spatial"][lib]["metadata"]
    # 8 µm bins of 16 px: 0.5 µm/px (the Visium 55 µm spot rule would give 3.4)
    assert sf["microns_per_pixel"] == pytest.approx(0.5) and sf["spot_diameter_fullres"] == pytest.approx(16)
    assert meta["platform"] == "visium_hd" and meta["bin_size_um"] == 8
    np.testing.assert_allclose(a.obsm["spatial"], centres, atol=1e-6)
    assert sf["tissue_hires_scalef"] == pytest.approx(0.5)
    # a patch of one bin is refused; the patch size is given in µm, independent of the bin
    with pytest.raises(ValueError, match="bins"):
        hx.pp.extract_patches(a, patch_px=32)
    hx.pp.extract_patches(a, size_um=55, patch_px=32, image=sdata.images["demo_full_image"], store="memory")
    assert a.obsm["patches"].shape == (a.n_obs, 32, 32, 3) and a.uns["histoexp"]["patches"]["size_um"] == 55
    hx.tl.embed_patches(a, encoder="handcrafted", weights=None)
    # training on 8 µm bins learns the image-driven genes: held-out half, against a shuffled-image control
    train = a.obs["array_col"].to_numpy() < a.obs["array_col"].max() / 2
    a.obs["split"] = np.where(train, "train", "test")
    fit_on = a[train].copy()
    model = hx.tl.fit_ridge(fit_on, use_rep="X_handcrafted", genes=list(a.var_names))
    test = a[~train].copy()
    pred = hx.tl.impute(test, model)
    hx.tl.evaluate(pred, layer="ridge")
    ctrl = a[train].copy()
    ctrl.obsm["X_handcrafted"] = np.random.default_rng(0).permutation(ctrl.obsm["X_handcrafted"])
    cpred = hx.tl.impute(test, hx.tl.fit_ridge(ctrl, use_rep="X_handcrafted", genes=list(a.var_names)))
    hx.tl.evaluate(cpred, layer="ridge")
    assert pred.uns["ridge"]["metrics"]["pcc_mean"] > 0.4 > cpred.uns["ridge"]["metrics"]["pcc_mean"] + 0.2

    # 16 µm bins of the same slide
    sd16, key16, _ = _hd_sdata(16)
    a16 = hx.io.from_spatialdata(sd16, table_key=key16)
    assert next(iter(a16.uns["spatial"].values()))["scalefactors"]["microns_per_pixel"] == pytest.approx(0.5)

    # only a full-resolution image: its hires copy is read by region (pyramid level / strips), not whole
    from histoexp.io import _spatialdata

    monkeypatch.setattr(_spatialdata, "_MAX_DENSE_IMAGE_PX", 10_000)
    monkeypatch.setattr(_spatialdata, "_MAX_HIRES_SIDE", 200)
    sd_full, key_full, _ = _hd_sdata(8, hires=False)
    af = hx.io.from_spatialdata(sd_full, table_key=key_full)
    entry = next(iter(af.uns["spatial"].values()))
    assert max(entry["images"]["hires"].shape[:2]) == 200
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(200 / 640)


def test_openslide_backend_reads_regions(tmp_path, monkeypatch):
    """The OpenSlide path (MRXS etc.), exercised with a stand-in module over tiffslide's OpenSlide-compatible API."""
    tiffslide = pytest.importorskip("tiffslide")
    import types

    class FakeOpenSlide:
        def __init__(self, path):
            self._s = tiffslide.TiffSlide(path)
            self.level_dimensions, self.level_downsamples = self._s.level_dimensions, self._s.level_downsamples
            self.properties = {k.replace("tiffslide.", "openslide."): v for k, v in self._s.properties.items()}

        def read_region(self, location, level, size):  # PIL RGBA, corner in level-0 pixels, as OpenSlide
            return self._s.read_region(location, level, size).convert("RGBA")

        def close(self):
            self._s.close()

    monkeypatch.setitem(sys.modules, "openslide", types.SimpleNamespace(OpenSlide=FakeOpenSlide))
    img = _smooth_rgb(520, 600, seed=3)
    path = tmp_path / "slide.mrxs"
    _write_svs(path, img)
    s = hx.image.SlideImage.open(path)
    assert s.mpp == pytest.approx(0.5) and s.downsamples == [1.0, 2.0, 4.0]
    np.testing.assert_array_equal(s.read_region(33, 47, 101, 89), img[47:136, 33:134])
    np.testing.assert_array_equal(s.read_region(40, 60, 80, 40, level=1), img[::2, ::2][30:50, 20:60])
