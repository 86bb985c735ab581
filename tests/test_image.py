"""SlideImage: region reads from JPEG, pyramidal TIFF, OME-TIFF, SpatialData and arrays; slide_for_library."""

from __future__ import annotations

import copy
import logging
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import histoexp as hx
from histoexp.image import SlideImage, slide_for_library
from histoexp.image import _slide as slide_mod


def _c2_jpeg(her2st_dir: Path) -> Path:
    return next((her2st_dir / "data" / "ST-imgs" / "C" / "C2").glob("*.jpg"))


def _pyramid(arr: np.ndarray, n_levels: int) -> list[np.ndarray]:
    levels = [arr]
    for _ in range(n_levels - 1):
        im = Image.fromarray(levels[-1])
        levels.append(np.asarray(im.reduce(2)))
    return levels


def write_pyramid_tiff(path: Path, arr: np.ndarray, *, n_levels: int = 3, mpp: float | None = None, **kw) -> None:
    """Tiled pyramidal TIFF (SubIFDs), zlib-compressed, with the resolution tags when ``mpp`` is given."""
    import tifffile

    levels = _pyramid(arr, n_levels)
    res = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    opts = {"tile": (256, 256), "compression": "zlib", "compressionargs": {"level": 1}, "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(levels[0], subifds=n_levels - 1, **res, **opts, **kw)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)


@pytest.fixture(scope="module")
def c2_crop(her2st_dir):
    """A 2048 x 2048 crop of the real C2 slide (tissue in it), plus its offset (x0, y0)."""
    full = SlideImage.open(_c2_jpeg(her2st_dir)).read_region(5000, 3000, 2048, 2048)
    return full, (5000, 3000)


# ------------------------------------------------------------------------------------------------ JPEG / array
def test_jpeg_open_shape_and_cache(her2st_dir):
    path = _c2_jpeg(her2st_dir)
    s = SlideImage.open(path)
    assert s.shape == (9911, 9274)
    assert s.mpp is None and s.levels == 1 and s.downsamples == [1.0]
    t0 = time.perf_counter()
    s2 = SlideImage.open(path, mpp=0.689)
    assert time.perf_counter() - t0 < 0.1  # decoded once, then served from the cache
    assert s2._lv()[0].array is s._lv()[0].array
    assert s2.mpp == pytest.approx(0.689) and s2.mpp_source == "argument"
    # the cached pixels cannot be corrupted through a returned region
    r = s.read_region(100, 100, 8, 8)
    r[:] = 0
    assert s.read_region(100, 100, 8, 8).min() > 0


def test_read_region_padding_and_exact_pixels():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 200, (60, 80, 3), dtype=np.uint8)
    s = SlideImage.open(arr)
    np.testing.assert_array_equal(s.read_region(10, 5, 20, 30), arr[5:35, 10:30])
    r = s.read_region(-4, -3, 10, 10)
    assert r.shape == (10, 10, 3)
    assert (r[:3] == 255).all() and (r[:, :4] == 255).all()
    np.testing.assert_array_equal(r[3:, 4:], arr[:7, :6])
    r = s.read_region(1000, 1000, 5, 5)  # entirely outside -> all white
    assert (r == 255).all()
    with pytest.raises(ValueError, match="level"):
        s.read_region(0, 0, 5, 5, level=1)


def test_read_patch_geometry_and_outside():
    arr = np.zeros((100, 100, 3), np.uint8)
    arr[:, 50:] = 200
    s = SlideImage.open(arr, mpp=1.0)
    p, frac = s.read_patch(50, 50, 40, 20)  # 2x downsampling, left half dark, right half light
    assert p.shape == (20, 20, 3) and p.dtype == np.uint8 and frac == 0
    assert p[:, :8].mean() < 5 and p[:, 12:].mean() > 195
    p, frac = s.read_patch(0, 0, 40, 40)  # centred on the corner: 3/4 outside and white
    assert frac == pytest.approx(0.75)
    assert (p[:18, :18] == 255).all() and p[25:, 25:].max() < 5
    assert s.fraction_outside(50, 50, 100) == 0 and s.fraction_outside(-50, 50, 50) == 1


# ------------------------------------------------------------------------------------------------ TIFF
def test_pyramidal_tiff_levels_mpp_and_regions(tmp_path, c2_crop):
    arr, _ = c2_crop
    path = tmp_path / "crop.tif"
    write_pyramid_tiff(path, arr, n_levels=3, mpp=0.689)
    s = SlideImage.open(path)
    assert s.shape == (2048, 2048)
    assert s.levels == 3 and s.downsamples == pytest.approx([1, 2, 4])
    assert s.mpp == pytest.approx(0.689, rel=1e-6) and s.mpp_source == "tiff metadata"
    assert type(s._lv()[0].array).__module__.startswith("zarr")  # read by region, never decoded as a whole
    np.testing.assert_array_equal(s.read_region(300, 500, 256, 128), arr[500:628, 300:556])
    lv2 = _pyramid(arr, 3)[2]
    np.testing.assert_array_equal(s.read_region(400, 800, 400, 200, level=2), lv2[200:250, 100:200])
    # level choice: just finer than requested
    assert s.best_level(1.0) == 0 and s.best_level(1.9) == 0 and s.best_level(2.0) == 1
    assert s.best_level(3.5) == 1 and s.best_level(10) == 2 and s.best_level(0.5) == 0
    # patches from the TIFF equal the ones from the array at level 0, and are close at level 1/2
    a = SlideImage.open(arr)
    for size, out in [(145.1, 200), (300, 100), (900, 200)]:
        pt, _ = s.read_patch(1000.3, 900.7, size, out)
        pa, _ = a.read_patch(1000.3, 900.7, size, out)
        diff = np.abs(pt.astype(int) - pa.astype(int)).mean()
        assert diff < (1e-9 if size / out < 2 else 6.0), (size, out, diff)
    # picklable: reopened lazily, same pixels
    s2 = pickle.loads(pickle.dumps(s))
    assert s2._levels is None
    np.testing.assert_array_equal(s2.read_region(0, 0, 64, 64), arr[:64, :64])


def test_ome_tiff_mpp(tmp_path):
    import tifffile

    arr = np.full((64, 64, 3), 128, np.uint8)
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(path, arr, ome=True, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.25})
    s = SlideImage.open(path)
    assert s.mpp == pytest.approx(0.25) and s.shape == (64, 64)
    assert SlideImage.open(path, mpp=0.5).mpp == 0.5  # the argument wins


def test_planar_tiff(tmp_path):
    import tifffile

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(arr, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(SlideImage.open(path).read_region(5, 6, 30, 20), arr[6:26, 5:35])


# ------------------------------------------------------------------------------------------------ SpatialData
def test_spatialdata_image_multiscale(c2_crop):
    from spatialdata.models import Image2DModel

    arr = c2_crop[0][:1024, :1024]
    tree = Image2DModel.parse(np.moveaxis(arr, -1, 0), dims=("c", "y", "x"), scale_factors=[2, 2])
    s = SlideImage.open(tree, mpp=0.689)
    assert s.shape == (1024, 1024) and s.downsamples == pytest.approx([1, 2, 4])
    np.testing.assert_array_equal(s.read_region(100, 200, 50, 40), arr[200:240, 100:150])
    single = SlideImage.open(Image2DModel.parse(np.moveaxis(arr, -1, 0), dims=("c", "y", "x")))
    p1, _ = single.read_patch(500, 500, 145, 200)
    p2, _ = SlideImage.open(arr).read_patch(500, 500, 145, 200)
    np.testing.assert_array_equal(p1, p2)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_path():
    with pytest.raises(FileNotFoundError, match="source.*/no/such/slide.jpg"):
        SlideImage.open("/no/such/slide.jpg")


def test_corrupted_jpeg(tmp_path, her2st_dir):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_c2_jpeg(her2st_dir).read_bytes()[:50_000])
    with pytest.raises(ValueError, match="truncated.jpg"):
        SlideImage.open(truncated)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="garbage.jpg"):
        SlideImage.open(garbage)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((10, 10), np.uint8),  # grayscale
        np.zeros((10, 10, 4), np.uint8),  # RGBA
        np.zeros((10, 10, 3), np.uint16),  # 16 bit
        np.zeros((10, 10, 3), np.float32),
    ],
)
def test_not_rgb_uint8_array(arr):
    with pytest.raises(ValueError, match="RGB uint8 expected"):
        SlideImage.open(arr)


def test_not_rgb_files(tmp_path):
    import tifffile

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.zeros((10, 10, 4), np.uint8)).save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "u16.tif", np.zeros((10, 10, 3), np.uint16), photometric="rgb")
    for name in ("grey.png", "rgba.png", "u16.tif"):
        with pytest.raises(ValueError, match="RGB uint8 expected"):
            SlideImage.open(tmp_path / name)


def test_unsupported_source():
    with pytest.raises(ValueError, match="source"):
        SlideImage.open(42)
    with pytest.raises(ValueError, match="mpp"):
        SlideImage.open(np.zeros((4, 4, 3), np.uint8), mpp=-1)


# ------------------------------------------------------------------------------------------------ slide_for_library
def test_slide_for_library_real(her2st_c2):
    s = slide_for_library(her2st_c2, "C2")
    assert s.shape == (9911, 9274)
    sf = her2st_c2.uns["spatial"]["C2"]["scalefactors"]
    assert s.mpp == pytest.approx(sf["microns_per_pixel"]) and "microns_per_pixel" in s.mpp_source
    assert 0.68 < s.mpp < 0.70  # 200 µm pitch over ~290 px
    assert slide_for_library(her2st_c2, "C2", mpp=0.5).mpp == 0.5
    with pytest.raises(KeyError, match="C2"):
        slide_for_library(her2st_c2, "C9")


def test_slide_for_library_hires_fallback(her2st_c2, caplog):
    a = her2st_c2.copy()
    a.uns["spatial"]["C2"]["metadata"]["source_image_path"] = ""
    scalef = a.uns["spatial"]["C2"]["scalefactors"]["tissue_hires_scalef"]
    with caplog.at_level(logging.WARNING, logger="histoexp"):
        s = slide_for_library(a, "C2")
    assert "downscaled" in caplog.text
    assert s.shape == pytest.approx((9911, 9274), abs=6)
    assert s.downsamples == pytest.approx([1 / scalef])
    # a patch from the downscaled image still looks like the full-resolution one (blurrier)
    full = slide_for_library(her2st_c2, "C2")
    x, y = her2st_c2.obsm["spatial"][0]
    pa, _ = s.read_patch(x, y, 600, 64)
    pb, _ = full.read_patch(x, y, 600, 64)
    assert np.abs(pa.astype(int) - pb.astype(int)).mean() < 12


def test_slide_for_library_mpp_sources(her2st_c2):
    a = her2st_c2.copy()
    entry = a.uns["spatial"]["C2"]
    entry["scalefactors"].pop("microns_per_pixel")
    entry["metadata"].pop("microns_per_pixel")
    s = slide_for_library(a, "C2")  # legacy ST: 100 µm spots
    assert s.mpp == pytest.approx(100 / entry["scalefactors"]["spot_diameter_fullres"])
    assert "100 µm" in s.mpp_source
    entry["metadata"].pop("platform")
    entry["metadata"].pop("spot_diameter_um")
    with pytest.raises(ValueError, match="mpp="):
        slide_for_library(a, "C2")
    entry["scalefactors"]["fiducial_diameter_fullres"] = 200.0  # Visium layout: 55 µm spots
    s = slide_for_library(a, "C2")
    assert s.mpp == pytest.approx(55 / entry["scalefactors"]["spot_diameter_fullres"])


def test_slide_for_library_missing_image(synth):
    a = synth
    del a.uns["spatial"]["S0"]["images"]
    with pytest.raises(ValueError, match="`image="):
        slide_for_library(a, "S0")
    arr = synth.uns["spatial"]["S1"]["images"]["hires"]
    s = slide_for_library(a, "S0", image=arr)
    assert s.mpp == 2.0 and s.shape == arr.shape[:2]
    a.uns["spatial"]["S0"]["metadata"]["source_image_path"] = "/no/such.jpg"
    with pytest.raises(FileNotFoundError, match="image="):
        slide_for_library(a, "S0")


def test_slidefile_pickle_small(her2st_dir):
    s = SlideImage.open(_c2_jpeg(her2st_dir), mpp=0.689)
    blob = pickle.dumps(s)
    assert len(blob) < 10_000  # the path travels, not the pixels
    s2 = pickle.loads(blob)
    np.testing.assert_array_equal(s2.read_region(4000, 4000, 32, 32), s.read_region(4000, 4000, 32, 32))
    assert copy.copy(s2).mpp == 0.689


def test_cache_bounded(tmp_path):
    slide_mod.clear_cache()
    paths = []
    for i in range(slide_mod.CACHE_MAX_ITEMS + 2):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(p)
        paths.append(p)
        SlideImage.open(p)
    assert len(slide_mod._CACHE) == slide_mod.CACHE_MAX_ITEMS
    # a modified file is decoded again (key includes mtime)
    time.sleep(0.01)
    Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(paths[-1])
    assert SlideImage.open(paths[-1]).read_region(0, 0, 1, 1)[0, 0, 0] == 99
    slide_mod.clear_cache()


def test_no_torch_imported():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, histoexp as hx; from histoexp.image import SlideImage; "
        "a = hx.datasets.synthetic(1); hx.pp.extract_patches(a, mpp=2.0); "
        "hx.pp.tile_tissue(a.uns['spatial']['S0']['images']['hires'], mpp=2.0, tile_um=64); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hx_image_namespace():
    assert hx.image.SlideImage is SlideImage
