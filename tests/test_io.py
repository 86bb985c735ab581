"""Tests for histoexp.io: read_st, read_visium, SpatialData conversion (synthetic files and real her2st)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

import histoexp as hx

# --------------------------------------------------------------------------------------------------------------------
# small synthetic legacy-ST section written to disk
# --------------------------------------------------------------------------------------------------------------------
STEP_PX = 50.0  # pixels per array step -> mpp = 200 / 50 = 4.0 µm/px
W, H = 700, 600


def _write_st(tmp_path, *, extra_spot=True, extra_count=True, selected=True, image="jpg", size=(W, H)):
    rng = np.random.default_rng(0)
    ax, ay = np.meshgrid(np.arange(2, 12), np.arange(2, 10))
    ax, ay = ax.ravel(), ay.ravel()
    px = 10 + ax * STEP_PX + rng.normal(0, 0.5, ax.size)
    py = 15 + ay * STEP_PX + rng.normal(0, 0.5, ax.size)
    spots = pd.DataFrame(
        {"x": ax, "y": ay, "new_x": ax + 0.01, "new_y": ay - 0.01, "pixel_x": px, "pixel_y": py, "selected": 1}
    )
    if not selected:
        spots = spots.drop(columns="selected")
    else:
        spots.loc[0, "selected"] = 0  # one unselected spot
    names = [f"{x}x{y}" for x, y in zip(ax, ay, strict=True)]
    genes = [f"G{i}" for i in range(30)]
    counts = pd.DataFrame(rng.poisson(2.0, (len(names), len(genes))), index=names, columns=genes)
    if extra_spot:  # a spot only in the spot file
        spots.loc[len(spots)] = {"x": 30, "y": 30, "new_x": 30, "new_y": 30, "pixel_x": 5, "pixel_y": 5, "selected": 1}
    if extra_count:  # a spot only in the counts
        counts.loc["40x40"] = 1
    cpath, spath = tmp_path / "S1.tsv.gz", tmp_path / "S1_selection.tsv"
    counts.to_csv(cpath, sep="\t")
    spots.to_csv(spath, sep="\t", index=False)
    ipath = None
    if image:
        img = np.full((size[1], size[0], 3), 230, np.uint8)
        img[100:500, 100:600] = (200, 120, 180)
        ipath = tmp_path / f"S1.{image}"
        if image == "tif":
            import tifffile

            tifffile.imwrite(ipath, img, photometric="rgb")
        else:
            Image.fromarray(img).save(ipath, quality=95) if image == "jpg" else Image.fromarray(img).save(ipath)
    return cpath, spath, ipath, counts, spots


@pytest.fixture
def st_files(tmp_path):
    return _write_st(tmp_path)


def test_read_st_basic(st_files, caplog):
    cpath, spath, ipath, counts, spots = st_files
    with caplog.at_level(logging.INFO, logger="histoexp"):
        a = hx.io.read_st(cpath, spath, ipath)
    # 80 grid spots, 1 unselected dropped, 1 only-in-spots and 1 only-in-counts dropped
    assert a.n_obs == 79
    assert a.n_vars == 30
    assert sp.isspmatrix_csr(a.X) or sp.issparse(a.X)
    assert a.X.dtype == np.float32
    assert a.obs_names[0] == "S1_3x2"  # spot 2x2 is unselected
    assert list(a.obs.columns) == ["array_x", "array_y", "new_x", "new_y", "library_id"]
    assert isinstance(a.obs["library_id"].dtype, pd.CategoricalDtype)
    assert a.obs["library_id"].cat.categories.tolist() == ["S1"]
    # counts preserved exactly, in the joined order
    np.testing.assert_array_equal(a.X.toarray(), counts.loc[[n[3:] for n in a.obs_names]].to_numpy())
    xy = spots.set_index(spots["x"].astype(str) + "x" + spots["y"].astype(str)).loc[[n[3:] for n in a.obs_names]]
    np.testing.assert_allclose(a.obsm["spatial"], xy[["pixel_x", "pixel_y"]].to_numpy())
    lib = a.uns["spatial"]["S1"]
    assert lib["metadata"]["mpp_source"] == "spot grid"
    assert lib["metadata"]["microns_per_pixel"] == pytest.approx(4.0, rel=2e-3)
    assert lib["scalefactors"]["microns_per_pixel"] == pytest.approx(4.0, rel=2e-3)
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(25.0, rel=2e-3)
    assert lib["scalefactors"]["tissue_hires_scalef"] == 1.0
    assert lib["images"]["hires"].shape == (H, W, 3) and lib["images"]["hires"].dtype == np.uint8
    assert lib["metadata"]["source_image_path"] == str(ipath.resolve())
    assert lib["metadata"]["fullres_shape"] == [H, W]
    text = caplog.text
    assert "dropped 1 only in `spots` and 2 only in `counts`" in text  # 2x2 unselected + 40x40
    assert "source: spot grid" in text


def test_read_st_dataframes_mpp_argument_and_no_image(st_files, caplog):
    _, _, _, counts, spots = st_files
    with caplog.at_level(logging.INFO, logger="histoexp"):
        a = hx.io.read_st(counts, spots, mpp=0.5, library_id="L", spot_diameter_um=55)
    lib = a.uns["spatial"]["L"]
    assert lib["metadata"]["mpp_source"] == "argument"
    assert lib["metadata"]["microns_per_pixel"] == 0.5
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(110.0)
    assert "images" not in lib and lib["scalefactors"]["tissue_hires_scalef"] == 1.0
    assert lib["metadata"]["source_image_path"] == ""
    assert "no image" in caplog.text
    assert a.obs_names[0].startswith("L_")


def test_read_st_without_selected_column(tmp_path):
    cpath, spath, _, _, _ = _write_st(tmp_path, selected=False, extra_spot=False, image=None)
    a = hx.io.read_st(cpath, spath)
    assert a.n_obs == 80


def test_read_st_downscales_large_image(tmp_path):
    cpath, spath, ipath, _, _ = _write_st(tmp_path, size=(2600, 900))
    a = hx.io.read_st(cpath, spath, ipath)
    lib = a.uns["spatial"]["S1"]
    s = lib["scalefactors"]["tissue_hires_scalef"]
    assert s == pytest.approx(2000 / 2600)
    assert lib["images"]["hires"].shape == (round(900 * s), 2000, 3)
    # the pink tissue block lands where the scale factor says it does
    hires = lib["images"]["hires"].astype(int)
    y, x = int(300 * s), int(350 * s)
    assert abs(hires[y, x] - np.array([200, 120, 180])).max() < 12
    assert abs(hires[int(550 * s), int(2000 * s)] - 230).max() < 12


def test_read_st_tiff_matches_png(tmp_path):
    """A pyramidal (and a flat) TIFF give the same hires image as the PNG, within resampling tolerance."""
    import tifffile

    cpath, spath, ipath, _, _ = _write_st(tmp_path, image="png", size=(4400, 1000))
    img = np.asarray(Image.open(ipath))
    rng = np.random.default_rng(0)
    img = img.copy()
    img[(np.arange(img.shape[0]) % 40) < 6, :] = 90  # structure that resampling has to keep in place
    img[:, (np.arange(img.shape[1]) % 40) < 6] = 60
    img = np.clip(img.astype(int) + rng.integers(-5, 5, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(ipath)
    a = hx.io.read_st(cpath, spath, ipath)
    pyr, flat = tmp_path / "pyr.ome.tif", tmp_path / "flat.tif"
    with tifffile.TiffWriter(pyr) as tw:
        tw.write(img, subifds=2, photometric="rgb", tile=(256, 256))
        for f in (2, 4):  # pyramid levels by box averaging, as slide scanners write them
            level = np.asarray(Image.fromarray(img).reduce(f))
            tw.write(level, subfiletype=1, photometric="rgb", tile=(256, 256))
    tifffile.imwrite(flat, img, photometric="rgb", tile=(256, 256))
    ref = a.uns["spatial"]["S1"]["images"]["hires"].astype(float)
    assert ref.shape == (455, 2000, 3)
    for path in (pyr, flat):
        b = hx.io.read_st(cpath, spath, path)
        lib = b.uns["spatial"]["S1"]
        assert (
            lib["scalefactors"]["tissue_hires_scalef"] == a.uns["spatial"]["S1"]["scalefactors"]["tissue_hires_scalef"]
        )
        assert lib["metadata"]["fullres_shape"] == [1000, 4400]
        hires = lib["images"]["hires"].astype(float)
        assert hires.shape == ref.shape
        assert np.abs(hires - ref).mean() < 3, path.name
        assert np.corrcoef(hires.ravel(), ref.ravel())[0, 1] > 0.98, path.name


def test_read_st_planar_tiff_and_one_image_stack(tmp_path, monkeypatch):
    """read_st reads images through histoexp.image: a planar TIFF works as in SlideImage, a JPEG is never cached."""
    import tifffile

    from histoexp.image import _slide

    cpath, spath, ipath, _, _ = _write_st(tmp_path, image="png")
    img = np.asarray(Image.open(ipath))
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(hx.image.SlideImage.open(planar).read_region(0, 0, W, H), img)
    a = hx.io.read_st(cpath, spath, planar)
    np.testing.assert_array_equal(a.uns["spatial"]["S1"]["images"]["hires"], img)
    # the hires copy of a JPEG comes from a reduced-scale decode, not from the full-resolution decode cache
    (tmp_path / "jpg").mkdir()
    _, _, jpg, _, _ = _write_st(tmp_path / "jpg", size=(2600, 900))
    _slide.clear_cache()
    monkeypatch.setattr(_slide, "_decode_pil", lambda *a, **k: pytest.fail("full decode"))
    hx.io.read_st(cpath, spath, jpg)
    assert not _slide._CACHE


# --------------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------------
def test_read_st_missing_paths(st_files, tmp_path):
    cpath, spath, ipath, _, _ = st_files
    with pytest.raises(FileNotFoundError, match="`counts`"):
        hx.io.read_st(tmp_path / "nope.tsv.gz", spath)
    with pytest.raises(FileNotFoundError, match="`spots`"):
        hx.io.read_st(cpath, tmp_path / "nope.tsv")
    with pytest.raises(FileNotFoundError, match="`image`"):
        hx.io.read_st(cpath, spath, tmp_path / "nope.jpg")


def test_read_st_corrupted_jpeg(st_files, tmp_path):
    cpath, spath, ipath, _, _ = st_files
    raw = ipath.read_bytes()
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="`image`.*(corrupted|truncated)"):
        hx.io.read_st(cpath, spath, truncated)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg at all" * 100)
    with pytest.raises(ValueError, match="`image`"):
        hx.io.read_st(cpath, spath, garbage)


@pytest.mark.parametrize("kind", ["L", "RGBA", "I;16", "tiff16"])
def test_read_st_not_rgb_uint8(st_files, tmp_path, kind):
    cpath, spath, _, _, _ = st_files
    if kind == "tiff16":
        import tifffile

        path = tmp_path / "img16.tif"
        tifffile.imwrite(path, np.zeros((H, W, 3), np.uint16), photometric="rgb")
    else:
        path = tmp_path / f"img_{kind.replace(';', '')}.png"
        arr = {"L": np.zeros((H, W), np.uint8), "RGBA": np.zeros((H, W, 4), np.uint8)}.get(kind)
        im = Image.fromarray(arr) if arr is not None else Image.new("I;16", (W, H))
        im.save(path)
    with pytest.raises(ValueError, match="`image`: expected an RGB uint8 image"):
        hx.io.read_st(cpath, spath, path)


def test_read_st_spots_outside_image(tmp_path):
    cpath, spath, ipath, _, _ = _write_st(tmp_path, size=(400, 300))
    with pytest.raises(ValueError, match="outside `image`"):
        hx.io.read_st(cpath, spath, ipath)


def test_read_st_empty_intersection_and_no_mpp(st_files):
    _, _, _, counts, spots = st_files
    shifted = counts.copy()
    shifted.index = [f"{n}_b" for n in shifted.index]
    with pytest.raises(ValueError, match="share no spot"):
        hx.io.read_st(shifted, spots)
    with pytest.raises(ValueError, match="`mpp`"):
        hx.io.read_st(counts, spots.iloc[1:3])  # two spots: no grid to fit
    with pytest.raises(ValueError, match="`mpp`"):
        hx.io.read_st(counts, spots, mpp=-1)
    with pytest.raises(ValueError, match="missing column"):
        hx.io.read_st(counts, spots.drop(columns="pixel_x"))


# --------------------------------------------------------------------------------------------------------------------
# Visium (fake Space Ranger folder, read by squidpy)
# --------------------------------------------------------------------------------------------------------------------
def _write_visium(root, n_spots=20, n_genes=12, d_fullres=110.0):
    import h5py

    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    X = sp.csr_matrix(rng.poisson(1.0, (n_spots, n_genes)).astype(np.int32))
    Xt = X  # 10x stores the genes x barcodes matrix as CSC, i.e. the CSR arrays of barcodes x genes
    barcodes = [f"AAAC{i:04d}-1" for i in range(n_spots)]
    with h5py.File(root / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([b"lib1"])
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"] = Xt.data
        m["indices"] = Xt.indices
        m["indptr"] = Xt.indptr
        m["shape"] = np.array([n_genes, n_spots])
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSG{i:05d}" for i in range(n_genes)], dtype="S")
        feats["name"] = np.array([f"GENE{i}" for i in range(n_genes)], dtype="S")
        feats["feature_type"] = np.array([b"Gene Expression"] * n_genes)
        feats["genome"] = np.array([b"GRCh38"] * n_genes)
    sp_dir = root / "spatial"
    sp_dir.mkdir()
    Image.fromarray(np.full((200, 220, 3), 200, np.uint8)).save(sp_dir / "tissue_hires_image.png")
    Image.fromarray(np.full((60, 66, 3), 200, np.uint8)).save(sp_dir / "tissue_lowres_image.png")
    (sp_dir / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "spot_diameter_fullres": d_fullres,
                "tissue_hires_scalef": 0.1,
                "tissue_lowres_scalef": 0.03,
                "fiducial_diameter_fullres": 160.0,
            }
        )
    )
    pos = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": np.arange(n_spots) // 5,
            "array_col": np.arange(n_spots) % 5,
            "pxl_row_in_fullres": 100 + 200 * (np.arange(n_spots) // 5),
            "pxl_col_in_fullres": 100 + 200 * (np.arange(n_spots) % 5),
        }
    )
    pos.to_csv(sp_dir / "tissue_positions.csv", index=False)
    return X


def test_read_visium(tmp_path, caplog):
    root = tmp_path / "visium"
    X = _write_visium(root)
    src = tmp_path / "fullres.tif"
    src.write_bytes(b"")  # only the path matters here
    with caplog.at_level(logging.INFO, logger="histoexp"):
        a = hx.io.read_visium(root, source_image_path=src)
    assert a.shape == (20, 12)
    np.testing.assert_array_equal(a.X.toarray(), X.toarray())
    lib = a.uns["spatial"]["lib1"]
    assert lib["metadata"]["source_image_path"] == str(src.resolve())
    assert lib["scalefactors"]["microns_per_pixel"] == pytest.approx(0.5)
    assert lib["metadata"]["microns_per_pixel"] == pytest.approx(0.5)
    assert lib["metadata"]["mpp_source"] == "spot diameter (Visium 55 µm)"
    assert lib["images"]["hires"].shape == (200, 220, 3)
    np.testing.assert_allclose(
        a.obsm["spatial"][:6], [[100, 100], [300, 100], [500, 100], [700, 100], [900, 100], [100, 300]]
    )
    assert "Visium 55" in caplog.text
    # library_id override, image found next to the outputs, missing source image
    b = hx.io.read_visium(root, library_id="mine")
    assert list(b.uns["spatial"]) == ["mine"]
    assert b.uns["spatial"]["mine"]["metadata"]["source_image_path"] == ""
    (root / "image.tif").write_bytes(b"")
    c = hx.io.read_visium(root)
    assert c.uns["spatial"]["lib1"]["metadata"]["source_image_path"] == str((root / "image.tif").resolve())
    with pytest.raises(FileNotFoundError, match="`source_image_path`"):
        hx.io.read_visium(root, source_image_path=tmp_path / "missing.tif")
    with pytest.raises(FileNotFoundError, match="`path`"):
        hx.io.read_visium(tmp_path / "nothing")


def test_read_visium_hd_is_redirected(tmp_path):
    (tmp_path / "hd" / "binned_outputs").mkdir(parents=True)
    with pytest.raises(ValueError, match="visium_hd"):
        hx.io.read_visium(tmp_path / "hd")


# --------------------------------------------------------------------------------------------------------------------
# real data: h5ad and SpatialData round trips
# --------------------------------------------------------------------------------------------------------------------
def _assert_same(a, b, *, images=True):
    assert a.shape == b.shape
    assert (a.X != b.X).nnz == 0
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"])
    assert set(a.uns["spatial"]) == set(b.uns["spatial"])
    for lib, ea in a.uns["spatial"].items():
        eb = b.uns["spatial"][lib]
        for k, v in ea["scalefactors"].items():
            assert eb["scalefactors"][k] == pytest.approx(v), k
        for k, v in ea["metadata"].items():
            vb = eb["metadata"][k]
            assert (list(vb) if isinstance(vb, np.ndarray) else vb) == v, k
        if images and "images" in ea:
            np.testing.assert_array_equal(ea["images"]["hires"], eb["images"]["hires"])
        assert ("images" in ea) == ("images" in eb)


def test_read_st_real_c2_matches_dataset(her2st_dir, her2st_c2):
    d = her2st_dir / "data"
    a = hx.io.read_st(
        d / "ST-cnts" / "C2.tsv.gz", d / "ST-spotfiles" / "C2_selection.tsv", next((d / "ST-imgs/C/C2").glob("*.jpg"))
    )
    b = her2st_c2
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert a.uns["spatial"]["C2"]["scalefactors"] == b.uns["spatial"]["C2"]["scalefactors"]


def test_h5ad_round_trip_real(her2st_c2, tmp_path):
    import anndata as ad

    path = tmp_path / "c2.h5ad"
    her2st_c2.write_h5ad(path)
    back = ad.read_h5ad(path)
    _assert_same(her2st_c2, back)


def test_spatialdata_round_trip_real(her2st_c2, tmp_path):
    import spatialdata
    from spatialdata.transformations import get_transformation

    a = her2st_c2
    sdata = hx.io.to_spatialdata(a)
    assert set(sdata.images) == {"C2_hires_image"}
    assert set(sdata.shapes) == {"C2_spots"}
    circles = sdata.shapes["C2_spots"]
    assert len(circles) == a.n_obs
    r = a.uns["spatial"]["C2"]["scalefactors"]["spot_diameter_fullres"] / 2
    np.testing.assert_allclose(circles["radius"], r)
    np.testing.assert_allclose(np.c_[circles.geometry.x, circles.geometry.y], a.obsm["spatial"])
    # the image element maps hires pixels onto full-resolution pixels
    s = a.uns["spatial"]["C2"]["scalefactors"]["tissue_hires_scalef"]
    m = get_transformation(sdata.images["C2_hires_image"], "C2").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(np.diag(m)[:2], 1 / s)
    table = sdata.tables["table"]
    assert table.uns["spatialdata_attrs"]["region"] in ("C2_spots", ["C2_spots"])
    assert "images" not in table.uns["spatial"]["C2"]

    back = hx.io.from_spatialdata(sdata)
    _assert_same(a, back)
    # and through zarr on disk
    sdata.write(tmp_path / "c2.zarr")
    back2 = hx.io.from_spatialdata(spatialdata.read_zarr(tmp_path / "c2.zarr"))
    _assert_same(a, back2)
    with pytest.raises(KeyError, match="table_key"):
        hx.io.from_spatialdata(sdata, table_key="nope")


def test_spatialdata_round_trip_multi_library(synth):
    sdata = hx.io.to_spatialdata(synth)
    assert set(sdata.shapes) == {"S0_spots", "S1_spots"}
    assert set(sdata.images) == {"S0_hires_image", "S1_hires_image"}
    back = hx.io.from_spatialdata(sdata)
    pd.testing.assert_frame_equal(back.obs, synth.obs)
    np.testing.assert_allclose(back.obsm["spatial"], synth.obsm["spatial"])
    for lib in ("S0", "S1"):
        np.testing.assert_array_equal(
            back.uns["spatial"][lib]["images"]["hires"], synth.uns["spatial"][lib]["images"]["hires"]
        )
        assert back.uns["spatial"][lib]["scalefactors"]["tissue_hires_scalef"] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="library_key"):
        hx.io.to_spatialdata(synth, library_key="nope")


def test_from_spatialdata_of_spatialdata_io_visium(tmp_path):
    """A SpatialData made by spatialdata-io's own Visium reader converts to what squidpy reads."""
    spatialdata_io = pytest.importorskip("spatialdata_io")
    root = tmp_path / "visium"
    _write_visium(root)
    sdata = spatialdata_io.visium(root, dataset_id="lib1")
    a = hx.io.from_spatialdata(sdata)
    b = hx.io.read_visium(root)
    assert list(a.obs_names) == list(b.obs_names)
    assert (a.X != b.X).nnz == 0
    np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"])
    assert a.obs["library_id"].tolist() == ["lib1"] * a.n_obs
    sf = a.uns["spatial"]["lib1"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(110.0)
    assert sf["tissue_hires_scalef"] == pytest.approx(0.1)
    np.testing.assert_array_equal(
        a.uns["spatial"]["lib1"]["images"]["hires"], b.uns["spatial"]["lib1"]["images"]["hires"]
    )


def test_from_spatialdata_polygons():
    """Square bins (polygons, as in Visium HD) become centroids with an equal-area diameter."""
    import anndata as ad
    import geopandas as gpd
    from shapely.geometry import box
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    centres = np.array([[10.0, 10.0], [30.0, 10.0], [10.0, 30.0]])
    gdf = gpd.GeoDataFrame({"geometry": [box(x - 8, y - 8, x + 8, y + 8) for x, y in centres]})
    shapes = ShapesModel.parse(gdf, transformations={"global": Identity()})
    table = ad.AnnData(
        X=sp.csr_matrix(np.eye(3, dtype=np.float32)),
        obs=pd.DataFrame({"region": pd.Categorical(["bins"] * 3), "cell_id": np.arange(3)}, index=["a", "b", "c"]),
    )
    table = TableModel.parse(table, region="bins", region_key="region", instance_key="cell_id")
    a = hx.io.from_spatialdata(SpatialData(shapes={"bins": shapes}, tables={"table": table}))
    np.testing.assert_allclose(a.obsm["spatial"], centres)
    assert a.uns["spatial"]["bins"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(2 * np.sqrt(256 / np.pi))
    assert "images" not in a.uns["spatial"]["bins"]


def test_patches_after_spatialdata_round_trip(her2st_c2):
    """Patches extracted after AnnData -> SpatialData -> AnnData equal those of the original object."""
    a = her2st_c2[:12].copy()
    back = hx.io.from_spatialdata(hx.io.to_spatialdata(a))
    p1 = hx.pp.extract_patches(a, patch_px=32, mpp=4.0, store="memory", copy=True).obsm["patches"]
    p2 = hx.pp.extract_patches(back, patch_px=32, mpp=4.0, store="memory", copy=True).obsm["patches"]
    assert p1.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(p1, p2)
    assert p1.std() > 5  # real tissue, not padding


# --------------------------------------------------------------------------------------------------------------------
# a real Visium folder: scanpy's Space Ranger 1.0.0 test fixture (tests/data/README.md)
# --------------------------------------------------------------------------------------------------------------------
VISIUM_FIXTURE = Path(__file__).parent / "data" / "visium_1.0.0"


def test_read_visium_real_fixture(caplog):
    a = hx.io.read_visium(VISIUM_FIXTURE)
    assert a.shape == (100, 100) and a.var_names[0].startswith("ENSG")
    assert int(a.X.sum()) > 0 and (a.obs["in_tissue"] == 1).all()
    lib = a.uns["spatial"]["custom"]
    sf = json.loads((VISIUM_FIXTURE / "spatial" / "scalefactors_json.json").read_text())
    assert lib["scalefactors"]["microns_per_pixel"] == pytest.approx(55 / sf["spot_diameter_fullres"])
    # positions: full-resolution pixels of tissue_positions_list.csv (columns: barcode, in_tissue, row, col, y, x)
    pos = pd.read_csv(VISIUM_FIXTURE / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    np.testing.assert_array_equal(a.obsm["spatial"], pos.loc[a.obs_names, [5, 4]].to_numpy())
    hires, lowres = lib["images"]["hires"], lib["images"]["lowres"]
    assert (hires[..., :3] == hires[0, 0, :3]).all()  # the fixture's hires PNG is a black placeholder
    assert lowres.std() > 5  # the H&E is in the lowres PNG

    # patches: the placeholder is skipped (with a warning), the lowres H&E is used
    with caplog.at_level(logging.WARNING, logger="histoexp"):
        hx.pp.extract_patches(a, size_um=100, patch_px=32)
    assert "images['hires'] is a single colour" in caplog.text and "'lowres'" in caplog.text
    p = a.obsm["patches"].astype(float)
    assert p.std() > 5 and len({q.tobytes() for q in a.obsm["patches"]}) == a.n_obs  # one distinct patch per spot
    # a region of the lowres image, upsampled: the mean colour of a patch matches the lowres pixels it covers
    scal = sf["tissue_lowres_scalef"]
    x, y = (a.obsm["spatial"][0] * scal).round().astype(int)
    np.testing.assert_allclose(p[0].mean((0, 1)), lowres[y - 2 : y + 3, x - 2 : x + 3].mean((0, 1)), atol=25)

    # plots draw over the H&E, not the placeholder
    import matplotlib.pyplot as plt

    a.layers["p"] = hx.pp.expression_matrix(a)
    fig = hx.pl.gene_map(a, a.var_names[0], layer="p", return_fig=True)
    assert [im.get_array().shape for ax in fig.axes for im in ax.images] == [lowres.shape, lowres.shape]
    plt.close(fig)
    del a.layers["p"]

    # SpatialData round trip keeps the H&E (not the placeholder) with its scale, and gives the same patches
    sdata = hx.io.to_spatialdata(a)
    assert list(sdata.images) == ["custom_lowres_image"]
    # Space Ranger's byte strings become text (zarr v3 has no stable byte-string type)
    assert sdata.tables["table"].uns["spatial"]["custom"]["metadata"]["chemistry_description"] == "Single Cell 3' v3"
    back = hx.io.from_spatialdata(sdata)
    np.testing.assert_array_equal(back.obsm["spatial"], a.obsm["spatial"])
    assert back.uns["spatial"]["custom"]["scalefactors"]["tissue_hires_scalef"] == pytest.approx(scal)
    hx.pp.extract_patches(back, size_um=100, patch_px=32, overwrite=True)  # the table kept the first record
    np.testing.assert_array_equal(back.obsm["patches"], a.obsm["patches"])


def test_only_placeholder_images_is_an_error(synth):
    one = synth[synth.obs["library_id"] == "S0"].copy()
    one.uns["spatial"] = {"S0": dict(synth.uns["spatial"]["S0"])}
    img = one.uns["spatial"]["S0"]["images"]["hires"]
    one.uns["spatial"]["S0"]["images"] = {"hires": np.zeros_like(img)}
    one.uns["spatial"]["S0"]["metadata"] = {**one.uns["spatial"]["S0"].get("metadata", {}), "source_image_path": ""}
    with pytest.raises(ValueError, match="single colour.*Pass `image=`"):
        hx.pp.extract_patches(one, patch_px=16)
    hx.pp.extract_patches(one, patch_px=16, image=img)  # the way out the error names
    assert one.obsm["patches"].std() > 0
