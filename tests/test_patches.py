"""extract_patches / get_patches / PatchSource on synthetic and real (her2st) sections."""

from __future__ import annotations

import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import histoexp as hx
from histoexp.image import SlideImage
from histoexp.pp import _patches as patches_mod


def _sat(p: np.ndarray) -> np.ndarray:
    """Mean HSV saturation per patch."""
    p = p.astype(np.float32)
    mx, mn = p.max(-1), p.min(-1)
    return ((mx - mn) / np.maximum(mx, 1)).reshape(len(p), -1).mean(1)


def _white(p: np.ndarray) -> np.ndarray:
    """Fraction of near-white pixels per patch."""
    return (p.min(-1) > 200).reshape(len(p), -1).mean(1)


def write_pyramid_tiff(path: Path, arr: np.ndarray, *, n_levels: int, mpp: float) -> None:
    """Tiled (256 x 256) zlib-compressed pyramidal BigTIFF (SubIFDs) with resolution tags."""
    import tifffile
    from PIL import Image

    opts = {"tile": (256, 256), "compression": "zlib", "compressionargs": {"level": 1}, "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(arr, subifds=n_levels - 1, resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **opts)
        lv = arr
        for _ in range(n_levels - 1):
            lv = np.asarray(Image.fromarray(lv).reduce(2))
            tw.write(lv, subfiletype=1, **opts)


# ------------------------------------------------------------------------------------------------ synthetic
@pytest.fixture(scope="module")
def _synth_once():
    return hx.datasets.synthetic(n_sections=2, random_state=0)


@pytest.fixture
def sy(_synth_once):
    """Two synthetic sections (generated once per module, a fresh copy per test)."""
    a = _synth_once.copy()
    a.uns = {"spatial": {k: {kk: dict(vv) for kk, vv in v.items()} for k, v in _synth_once.uns["spatial"].items()}}
    return a


def test_defaults_geometry_and_keys(sy):
    a = sy
    assert hx.pp.extract_patches(a, mpp=2.0) is None
    n = a.n_obs
    # spot: 32 px at 2 µm/px = 64 µm -> 32 px at 2 µm/px
    rec = a.uns["histoexp"]["patches"]
    assert rec["size_um"] == 64.0 and rec["patch_px"] == 32 and rec["mpp"] == 2.0 and rec["fov_um"] == 64.0
    assert rec["store"] == "memory" and rec["library_key"] == "library_id"
    assert set(rec["libraries"]) == {"S0", "S1"}
    assert a.obsm["patches"].shape == (n, 32, 32, 3) and a.obsm["patches"].dtype == np.uint8
    assert (a.obs["patches_outside"] == 0).all()
    # default mpp=0.5 -> 128 px; explicit patch_px wins and the effective µm/px is recorded
    b = hx.pp.extract_patches(a, key_added="p05", copy=True)
    assert b.uns["histoexp"]["p05"]["patch_px"] == 128 and "p05" not in a.uns["histoexp"]
    hx.pp.extract_patches(a, patch_px=16, key_added="p16", context=2.0)
    rec = a.uns["histoexp"]["p16"]
    assert rec["patch_px"] == 16 and rec["fov_um"] == 128.0 and rec["mpp"] == 8.0


def test_patch_pixels_match_image(sy):
    a = sy
    hx.pp.extract_patches(a, mpp=2.0)  # 1:1 with the image at 2 µm/px
    for i in (0, a.n_obs - 1):
        lib = a.obs["library_id"].iloc[i]
        img = a.uns["spatial"][lib]["images"]["hires"]
        x, y = a.obsm["spatial"][i].astype(int)
        crop = img[y - 16 : y + 16, x - 16 : x + 16]
        np.testing.assert_array_equal(a.obsm["patches"][i], crop)


def test_multi_section_reads_own_image(sy):
    a = sy
    hx.pp.extract_patches(a, mpp=2.0)
    s1 = np.flatnonzero(a.obs["library_id"] == "S1")[0]
    x, y = a.obsm["spatial"][s1].astype(int)
    own = a.uns["spatial"]["S1"]["images"]["hires"][y - 16 : y + 16, x - 16 : x + 16]
    other = a.uns["spatial"]["S0"]["images"]["hires"][y - 16 : y + 16, x - 16 : x + 16]
    np.testing.assert_array_equal(a.obsm["patches"][s1], own)
    assert np.abs(own.astype(int) - other.astype(int)).mean() > 5
    # one section alone gives the same patches
    sub = a[a.obs["library_id"] == "S1"].copy()
    del sub.uns["spatial"]["S0"]
    del sub.uns["histoexp"]
    del sub.obsm["patches"]
    del sub.obs["patches_outside"]
    hx.pp.extract_patches(sub, mpp=2.0)
    np.testing.assert_array_equal(sub.obsm["patches"], a.obsm["patches"][a.obs["library_id"] == "S1"])


def test_stores_give_same_pixels(sy, tmp_path):
    a = sy
    hx.pp.extract_patches(a, mpp=1.0, key_added="m", store="memory")
    hx.pp.extract_patches(a, mpp=1.0, key_added="z", store="zarr", path=tmp_path / "p.zarr")
    hx.pp.extract_patches(a, mpp=1.0, key_added="n", store="none")
    assert "z" not in a.obsm and "n" not in a.obsm
    assert a.uns["histoexp"]["z"]["path"] == str((tmp_path / "p.zarr").resolve())
    np.testing.assert_array_equal(a.obs["z_row"].to_numpy(), np.arange(a.n_obs))
    src = {k: hx.pp.get_patches(a, k) for k in "mzn"}
    idx = [5, 0, 17, 5, a.n_obs - 1]
    ref = src["m"].batch(idx)
    assert ref.shape == (5, 64, 64, 3)
    for k in "zn":
        s = src[k]
        assert len(s) == a.n_obs and s.patch_px == 64 and s.mpp == 1.0 and s.size_um == 64.0
        np.testing.assert_array_equal(s.batch(idx), ref)
        np.testing.assert_array_equal(s[-1], ref[-1])
        np.testing.assert_array_equal(s.batch(np.arange(0, a.n_obs, 9)), src["m"].batch(np.arange(0, a.n_obs, 9)))
        s2 = pickle.loads(pickle.dumps(s))  # DataLoader workers
        np.testing.assert_array_equal(s2[17], ref[2])
    assert len(pickle.dumps(src["n"])) < 5_000_000  # synthetic images are in memory; no patches pickled
    with pytest.raises(IndexError):
        src["z"][a.n_obs]
    # a subset keeps the right rows
    sub = a[::3].copy()
    for k in "mzn":
        np.testing.assert_array_equal(hx.pp.get_patches(sub, k).batch([0, 1, 2]), src["m"].batch([0, 3, 6]))


def test_auto_store_switches_to_zarr(sy, monkeypatch, tmp_path):
    monkeypatch.setattr(patches_mod, "AUTO_MEMORY_LIMIT", 1000)
    monkeypatch.setattr(patches_mod, "_BATCH", 7)  # several stream-write batches
    hx.pp.extract_patches(sy, mpp=2.0, path=tmp_path / "auto.zarr")
    rec = sy.uns["histoexp"]["patches"]
    assert rec["store"] == "zarr" and "patches" not in sy.obsm
    import zarr

    z = zarr.open_array(rec["path"], mode="r")
    assert z.shape == (sy.n_obs, 32, 32, 3) and z.chunks == (1, 32, 32, 3)
    monkeypatch.setattr(patches_mod, "AUTO_MEMORY_LIMIT", 10**12)
    b = hx.pp.extract_patches(sy, mpp=2.0, key_added="mem", copy=True)
    np.testing.assert_array_equal(hx.pp.get_patches(sy).batch(range(sy.n_obs)), b.obsm["mem"])


def test_default_zarr_path_is_temp(sy):
    hx.pp.extract_patches(sy, mpp=2.0, store="zarr")
    path = Path(sy.uns["histoexp"]["patches"]["path"])
    assert path.exists() and path.name.startswith("patches-") and path.suffix == ".zarr"


def test_h5ad_round_trip(sy, tmp_path):
    a = sy
    hx.pp.extract_patches(a, mpp=2.0)
    hx.pp.extract_patches(a, mpp=2.0, key_added="z", store="zarr", path=tmp_path / "z.zarr")
    hx.pp.extract_patches(a, mpp=2.0, key_added="n", store="none")
    a.write_h5ad(tmp_path / "a.h5ad")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    assert b.obsm["patches"].shape == a.obsm["patches"].shape  # 4-D obsm survives
    np.testing.assert_array_equal(b.obsm["patches"], a.obsm["patches"])
    for key in ("patches", "z", "n"):
        assert b.uns["histoexp"][key]["patch_px"] == 32
        np.testing.assert_array_equal(hx.pp.get_patches(b, key).batch([0, 9]), a.obsm["patches"][[0, 9]])
    np.testing.assert_array_equal(b.obs["z_row"], a.obs["z_row"])
    np.testing.assert_array_equal(b.obs["patches_outside"], a.obs["patches_outside"])


def test_edge_padding_and_outside(sy):
    a = sy[sy.obs["library_id"] == "S0"].copy()
    a.obsm["spatial"] = a.obsm["spatial"].copy()
    a.obsm["spatial"][0] = [0.0, 100.0]  # half outside on the left
    a.obsm["spatial"][1] = [0.0, 0.0]  # 3/4 outside
    hx.pp.extract_patches(a, mpp=2.0, library_id="S0")
    out = a.obs["patches_outside"].to_numpy()
    assert out[0] == pytest.approx(0.5) and out[1] == pytest.approx(0.75) and (out[2:] == 0).all()
    p = a.obsm["patches"]
    assert (p[0][:, :16] == 255).all() and (p[1][:16] == 255).all()
    a.obsm["spatial"][2] = [-500.0, -500.0]
    a.obsm["spatial"][3] = [5000.0, 10.0]
    with pytest.raises(ValueError, match=rf"2 spots.*{a.obs_names[2]}.*{a.obs_names[3]}"):
        hx.pp.extract_patches(a, mpp=2.0, key_added="bad")
    assert "bad" not in a.uns["histoexp"] and "bad_outside" not in a.obs  # nothing written


def test_errors(sy, tmp_path):
    a = sy
    hx.pp.extract_patches(a, mpp=2.0)
    before = a.obsm["patches"].copy()
    a.obsm["patches"] = before[:, ::-1].copy()  # the user's pixels under histoexp's key: kept
    with pytest.raises(KeyError, match="changed since histoexp wrote it.*overwrite"):
        hx.pp.extract_patches(a, mpp=1.0)
    np.testing.assert_array_equal(a.obsm["patches"], before[:, ::-1])
    hx.pp.extract_patches(a, mpp=4.0, overwrite=True, store="none")  # overwrite replaces keys, removes stale pixels
    assert "patches" not in a.obsm and a.uns["histoexp"]["patches"]["patch_px"] == 16
    with pytest.raises(KeyError, match="extract_patches"):
        hx.pp.get_patches(a, "nope")
    with pytest.raises(ValueError, match="store"):
        hx.pp.extract_patches(a, key_added="x", store="disk")
    with pytest.raises(KeyError, match="C9"):
        hx.pp.extract_patches(a[a.obs["library_id"] == "S0"].copy(), key_added="x", library_id="C9")
    with pytest.raises(ValueError, match="library_id"):
        hx.pp.extract_patches(a, key_added="x", library_id="S0", library_key="library_id")
    with pytest.raises(ValueError, match="`image`"):
        hx.pp.extract_patches(a, key_added="x", image=np.zeros((10, 10, 3), np.uint8))
    b = a.copy()
    del b.uns["spatial"]["S1"]["images"]
    with pytest.raises(ValueError, match="image="):
        hx.pp.extract_patches(b, key_added="x")
    c = a.copy()
    for entry in c.uns["spatial"].values():
        entry["scalefactors"].pop("microns_per_pixel")
        entry["metadata"].pop("microns_per_pixel")
    with pytest.raises(ValueError, match="mpp="):
        hx.pp.extract_patches(c, key_added="x")
    # explicit image per section, with its µm/px
    imgs = {lib: SlideImage.open(c.uns["spatial"][lib]["images"]["hires"], mpp=2.0) for lib in ("S0", "S1")}
    hx.pp.extract_patches(c, key_added="x", image=imgs, mpp=2.0, store="memory")
    np.testing.assert_array_equal(c.obsm["x"], before)
    with pytest.raises(ValueError, match="store='none'"):
        hx.pp.extract_patches(c, key_added="y", image=imgs, mpp=2.0, store="none")
    p = tmp_path / "exists.zarr"
    p.mkdir()
    with pytest.raises(FileExistsError, match="path"):
        hx.pp.extract_patches(a, key_added="z", store="zarr", path=p)
    with pytest.raises(ValueError, match="patch_px"):
        hx.pp.extract_patches(a, key_added="z", patch_px=0)


# ------------------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def c2_patches(her2st_c2):
    a = her2st_c2.copy()
    hx.pp.extract_patches(a)  # defaults: the spot diameter at 0.5 µm/px
    return a


def test_real_physical_size(c2_patches):
    a = c2_patches
    rec = a.uns["histoexp"]["patches"]
    assert rec["size_um"] == pytest.approx(100.0)  # legacy ST spot
    assert rec["patch_px"] == 200 and rec["mpp"] == pytest.approx(0.5)  # 100 µm at 0.5 µm/px
    lib = rec["libraries"]["C2"]
    assert lib["size_px_fullres"] == pytest.approx(100 / lib["mpp"]) and 140 < lib["size_px_fullres"] < 150
    assert a.obsm["patches"].shape == (a.n_obs, 200, 200, 3)
    # HEST / BLEEP convention
    b = hx.pp.extract_patches(a[:5].copy(), size_um=112, key_added="hest", copy=True)
    assert b.uns["histoexp"]["hest"]["patch_px"] == 224 and b.obsm["hest"].shape == (5, 224, 224, 3)


def test_real_spots_are_tissue_background_is_not(c2_patches):
    a = c2_patches
    spots = a.obsm["spatial"]
    rng = np.random.default_rng(0)
    h, w = a.uns["histoexp"]["patches"]["libraries"]["C2"]["shape"]
    cand = rng.uniform([200, 200], [w - 200, h - 200], size=(4000, 2))
    dist = np.sqrt(((cand[:, None, :] - spots[None]) ** 2).sum(-1)).min(1)
    bg = cand[dist > 1500][:60]
    assert len(bg) >= 30
    q = ad.AnnData(obs=a.obs.iloc[: len(bg)][["library_id"]].copy())
    q.obs_names = [f"bg{i}" for i in range(len(bg))]
    q.obsm["spatial"] = bg
    q.uns["spatial"] = a.uns["spatial"]
    hx.pp.extract_patches(q)
    fg, bgp = a.obsm["patches"], q.obsm["patches"]
    assert _white(fg).mean() < 0.15 and _white(bgp).mean() > 0.6
    assert _sat(fg).mean() > 2 * _sat(bgp).mean()
    assert np.median(_sat(fg)) > np.percentile(_sat(bgp), 90)


def test_real_pyramidal_tiff_matches_jpeg(c2_patches, tmp_path_factory):
    a = c2_patches
    slide = hx.image.slide_for_library(a, "C2")
    path = tmp_path_factory.mktemp("tiff") / "C2_pyramid.tif"
    full = slide.read_region(0, 0, slide.shape[1], slide.shape[0])
    write_pyramid_tiff(path, full, n_levels=4, mpp=slide.mpp)
    del full
    tif = SlideImage.open(path)
    assert tif.shape == slide.shape and tif.downsamples == pytest.approx([1, 2, 4, 8], rel=1e-3)
    assert tif.mpp == pytest.approx(slide.mpp, rel=1e-6)
    sub = a[:40].copy()
    # level 0 (0.5 µm/px is finer than the scan): identical pixels
    t = hx.pp.extract_patches(sub, image=path, key_added="tif", copy=True)
    np.testing.assert_array_equal(t.obsm["tif"], sub.obsm["patches"])
    # 2 µm/px: read from level 1 (2x) of the pyramid vs the full JPEG resampled; same within resampling tolerance
    j = hx.pp.extract_patches(sub, mpp=2.0, size_um=300, key_added="j", copy=True)
    t = hx.pp.extract_patches(sub, image=str(path), mpp=2.0, size_um=300, key_added="t", copy=True, store="none")
    assert t.uns["histoexp"]["t"]["libraries"]["C2"]["image"] == str(path.resolve())
    pt = hx.pp.get_patches(t, "t").batch(range(40))
    diff = np.abs(pt.astype(int) - j.obsm["j"].astype(int))
    assert diff.mean() < 3.0 and np.percentile(diff, 99) < 40
    assert np.abs(_sat(pt) - _sat(j.obsm["j"])).max() < 0.02


def test_real_multi_section(her2st_dir, c2_patches, tmp_path):
    a = hx.datasets.her2st(["C2", "C3"], data_dir=her2st_dir)
    hx.pp.extract_patches(a, mpp=1.0, store="zarr", path=tmp_path / "cc.zarr")
    rec = a.uns["histoexp"]["patches"]
    assert rec["library_key"] == "library_id" and set(rec["libraries"]) == {"C2", "C3"}
    assert rec["libraries"]["C3"]["image"] == "" and rec["libraries"]["C3"]["shape"] != rec["libraries"]["C2"]["shape"]
    src = hx.pp.get_patches(a)
    is_c3 = (a.obs["library_id"] == "C3").to_numpy()
    c3 = a[is_c3].copy()
    s3 = hx.image.slide_for_library(c3, "C3")
    i = int(np.flatnonzero(is_c3)[3])
    x, y = a.obsm["spatial"][i]
    own, _ = s3.read_patch(x, y, rec["libraries"]["C3"]["size_px_fullres"], 100)
    np.testing.assert_array_equal(src[i], own)
    other, _ = hx.image.slide_for_library(a, "C2").read_patch(x, y, 100 / rec["libraries"]["C2"]["mpp"], 100)
    assert np.abs(other.astype(int) - own.astype(int)).mean() > 10
    assert _white(src.batch(np.arange(a.n_obs))).mean() < 0.15


def test_real_h5ad_round_trip(c2_patches, tmp_path):
    a = c2_patches
    a.write_h5ad(tmp_path / "c2.h5ad")
    b = ad.read_h5ad(tmp_path / "c2.h5ad")
    np.testing.assert_array_equal(b.obsm["patches"], a.obsm["patches"])
    assert b.uns["histoexp"]["patches"]["libraries"]["C2"]["mpp_source"] == "scalefactors['microns_per_pixel']"
    src = hx.pp.get_patches(b)
    assert src.patch_px == 200 and src.mpp == pytest.approx(0.5) and src.size_um == pytest.approx(100)
