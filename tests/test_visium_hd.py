"""Visium HD at scale: bins read from a SpatialData zarr store, patches read by region in groups, sparse counts
kept sparse, dense targets bounded, and a model trained on 16 µm bins predicting 8 µm bins end to end."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import histoexp as hx
from histoexp.image import SlideImage
from histoexp.image import _slide as slide_mod

pytest.importorskip("spatialdata")

MPP = 0.5  # µm per full-resolution pixel
SIDE = 480  # px: 240 µm, 30 x 30 bins of 8 µm, 15 x 15 of 16 µm
N_GENES = 10


def _smooth_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [200 + 40 * np.sin(xx / 37.0), 120 + 60 * np.cos(yy / 23.0), 180 + 30 * np.sin((xx + yy) / 51.0)], -1
    )
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _hd_zarr(path, seed: int = 0):
    """Write and read back a SpatialData laid out as spatialdata_io.visium_hd writes it.

    One dataset ``demo``: a multiscale full-resolution image (Identity), a hires image (Scale), square bins of
    8 and 16 µm (polygons) and tables ``square_008um`` / ``square_016um`` with CSR counts; the 16 µm counts are
    sums of 2 x 2 8 µm bins (as Space Ranger bins). Expression follows the red channel around each bin (55 µm).
    """
    import anndata as ad
    import spatialdata
    import xarray as xr
    from geopandas import GeoDataFrame
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    img = _smooth_rgb(SIDE, SIDE, seed)
    tf = {"demo": Identity()}
    full = Image2DModel.parse(
        xr.DataArray(img.transpose(2, 0, 1), dims=("c", "y", "x")), scale_factors=[2], transformations=tf
    )
    hires = Image2DModel.parse(
        img[::4, ::4].transpose(2, 0, 1).copy(),
        dims=("c", "y", "x"),
        transformations={"demo": Scale([4, 4], ("x", "y"))},
    )
    rng = np.random.default_rng(seed)
    coef = rng.normal(0, 1, N_GENES)
    red = img[..., 0].astype(float)
    k = int(round(27.5 / MPP))

    n8 = int(SIDE * MPP / 8)
    r8, c8 = np.divmod(np.arange(n8 * n8), n8)
    xy8 = np.stack([(c8 + 0.5) * 8 / MPP, (r8 + 0.5) * 8 / MPP], 1)
    drive = np.array([red[max(0, int(y) - k) : int(y) + k, max(0, int(x) - k) : int(x) + k].mean() for x, y in xy8])
    drive = (drive - drive.mean()) / drive.std()
    x8 = sp.csr_matrix(rng.poisson(np.exp(2.0 + 0.8 * np.outer(drive, coef))).astype(np.float32))
    n16 = n8 // 2
    agg = sp.csr_matrix((np.ones(n8 * n8), ((r8 // 2) * n16 + c8 // 2, np.arange(n8 * n8))), shape=(n16 * n16, n8 * n8))
    x16 = (agg @ x8).astype(np.float32).tocsr()

    shapes, tables = {}, {}
    for bs, n, x in ((8, n8, x8), (16, n16, x16)):
        key, name = f"square_{bs:03d}um", f"demo_square_{bs:03d}um"
        r, c = np.divmod(np.arange(n * n), n)
        centres = np.stack([(c + 0.5) * bs / MPP, (r + 0.5) * bs / MPP], 1)
        rad = bs / MPP / 2
        circles = ShapesModel.parse(
            centres, geometry=0, radius=np.full(n * n, rad), index=np.arange(n * n), transformations=tf
        )
        shapes[name] = ShapesModel.parse(GeoDataFrame(geometry=circles.buffer(rad, cap_style=3)), transformations=tf)
        obs = pd.DataFrame(
            {"in_tissue": 1, "array_row": r, "array_col": c, "location_id": np.arange(n * n)},
            index=[f"s_{bs:03d}um_{i:05d}_{j:05d}-1" for i, j in zip(r, c, strict=True)],
        )
        obs["region"] = pd.Categorical([name] * (n * n))
        table = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))
        tables[key] = TableModel.parse(table, region=name, region_key="region", instance_key="location_id")
    sdata = spatialdata.SpatialData(
        images={"demo_full_image": full, "demo_hires_image": hires}, shapes=shapes, tables=tables
    )
    sdata.write(path)
    return spatialdata.read_zarr(path), img


@pytest.fixture(scope="module")
def hd(tmp_path_factory):
    path = tmp_path_factory.mktemp("hd") / "hd.zarr"
    sdata, img = _hd_zarr(path)
    return sdata, img, path


def test_ome_zarr_image_is_read_by_region(hd):
    sdata, img, path = hd
    elem = path / "images" / "demo_full_image"
    s = SlideImage.open(elem)
    assert s.shape == img.shape[:2] and s.downsamples == [1.0, 2.0]
    np.testing.assert_array_equal(s.read_region(33, 47, 101, 89), img[47:136, 33:134])
    np.testing.assert_array_equal(s.read_region(-5, 10, 20, 30)[:, :5], 255)  # white outside
    s2 = pickle.loads(pickle.dumps(s))  # reopened lazily: no pixels in the pickle
    assert len(pickle.dumps(s)) < 10_000
    np.testing.assert_array_equal(s2.read_region(0, 0, 16, 16), img[:16, :16])
    # a SpatialData element read from zarr resolves to that directory; a plain folder is refused
    assert slide_mod._backing_zarr_image(sdata.images["demo_full_image"]) == str(elem.resolve())
    with pytest.raises(ValueError, match="OME-Zarr"):
        SlideImage.open(path / "tables")


@pytest.mark.parametrize("kind", ["array", "ome-zarr"])
def test_read_patches_equals_read_patch_with_few_region_reads(hd, kind, monkeypatch):
    _, img, path = hd
    s = SlideImage.open(img if kind == "array" else path / "images" / "demo_full_image")
    rng = np.random.default_rng(1)
    centres = np.r_[rng.uniform(-20, SIDE + 20, size=(40, 2)), [[0.0, 0.0], [SIDE - 0.5, 3.2]]]
    for size_px, out_px in ((110.0, 32), (24.0, 32), (55.3, 7)):  # down- and upsampling, level 1 and 0
        want = np.stack([s.read_patch(x, y, size_px, out_px)[0] for x, y in centres])
        np.testing.assert_array_equal(s.read_patches(centres, size_px, out_px), want)
        np.testing.assert_array_equal(s.read_patches(centres, size_px, out_px, window_px=64), want)
    assert s.read_patches(np.empty((0, 2)), 10.0, 8).shape == (0, 8, 8, 3)
    # a batch of neighbouring bins costs a few region reads, not one per bin
    calls = []
    orig = SlideImage._window
    monkeypatch.setattr(SlideImage, "_window", lambda self, *a: calls.append(a) or orig(self, *a))
    grid = np.stack(np.meshgrid(np.arange(8, 200, 16.0), np.arange(8, 200, 16.0)), -1).reshape(-1, 2)
    s.read_patches(grid, 110.0, 32)
    assert len(grid) == 144 and len(calls) <= 4


def test_bins_from_zarr_stay_sparse_and_patches_come_from_full_resolution(hd):
    sdata, img, path = hd
    a = hx.io.from_spatialdata(sdata, table_key="square_008um")
    assert sp.issparse(a.X) and a.X.dtype == np.float32
    assert a.X is not sdata.tables["square_008um"].X  # the caller's table is not shared
    meta = next(iter(a.uns["spatial"].values()))["metadata"]
    assert meta["source_image_path"] == str((path / "images" / "demo_full_image").resolve())
    assert meta["bin_size_um"] == 8
    # store='none' without `image=`: read by region from the full-resolution zarr image, not the hires copy
    hx.pp.extract_patches(a, size_um=20, patch_px=40, store="none")
    src = hx.pp.get_patches(a)
    want = SlideImage.open(img).read_patches(a.obsm["spatial"][:50], 40.0, 40)
    np.testing.assert_array_equal(src.batch(np.arange(50)), want)
    # the element itself works with store='none' too (its zarr path is recorded, so it can be reopened)
    b = hx.io.from_spatialdata(sdata, table_key="square_016um")
    hx.pp.extract_patches(b, size_um=20, patch_px=40, image=sdata.images["demo_full_image"], store="none")
    assert b.uns["histoexp"]["patches"]["libraries"]["demo_square_016um"]["image"].endswith("demo_full_image")


def test_train_on_16um_bins_predict_8um_bins(hd, tmp_path):
    import torch

    sdata, _, _ = hd
    a16 = hx.io.from_spatialdata(sdata, table_key="square_016um")
    a8 = hx.io.from_spatialdata(sdata, table_key="square_008um")
    enc = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())  # colour of a 4 x 4 grid
    for a in (a16, a8):
        hx.pp.extract_patches(a, size_um=55, patch_px=16, store="none")
        hx.tl.embed_patches(a, encoder=enc, key_added="X_pool")
    genes = [f"g{i}" for i in range(N_GENES)]
    model = hx.tl.fit_ridge(a16, genes=genes, use_rep="X_pool")
    model.save(tmp_path / "m")
    pred = hx.tl.impute(a8, hx.tl.load_model(tmp_path / "m"))
    assert pred.n_obs == a8.n_obs == 4 * a16.n_obs and pred.layers["ridge"].shape == (a8.n_obs, N_GENES)
    hx.tl.evaluate(pred, layer="ridge")
    pcc = pred.uns["ridge"]["metrics"]["pcc_mean"]
    # control: the same fit on shuffled 16 µm features
    ctrl = a16.copy()
    ctrl.obsm["X_pool"] = np.random.default_rng(0).permutation(ctrl.obsm["X_pool"])
    cpred = hx.tl.impute(a8, hx.tl.fit_ridge(ctrl, genes=genes, use_rep="X_pool", overwrite=True))
    hx.tl.evaluate(cpred, layer="ridge")
    assert pcc > 0.45 and cpred.uns["ridge"]["metrics"]["pcc_mean"] < 0.15  # measured: 0.55 and -0.30
    pred.write_h5ad(tmp_path / "pred.h5ad")


def test_expression_matrix_blocks_and_refuses_unbounded(monkeypatch):
    import anndata as ad

    from histoexp.pp import _patches, _targets

    rng = np.random.default_rng(0)
    x = sp.random(300, 50, density=0.1, format="csr", random_state=0, data_rvs=lambda n: rng.integers(1, 9, n))
    a = ad.AnnData(X=x.astype(np.float32))
    genes = [a.var_names[i] for i in (7, 3, 40)]
    whole = hx.pp.expression_matrix(a, genes)
    monkeypatch.setattr(_targets, "DENSE_BLOCK_VALUES", 10)  # blocks of 3 rows
    np.testing.assert_array_equal(hx.pp.expression_matrix(a, genes), whole)
    np.testing.assert_array_equal(
        hx.pp.expression_matrix(a, genes, normalize="none"), x[:, [7, 3, 40]].toarray().astype(np.float32)
    )
    assert sp.issparse(a.X)
    # all genes of many bins would not fit: refused with the argument named, before allocating
    monkeypatch.setattr(_patches, "_available_memory", lambda: 300 * 10 * 4)
    hx.pp.expression_matrix(a, genes)  # 3 genes fit
    with pytest.raises(ValueError, match="gene panel"):
        hx.pp.expression_matrix(a)


def test_ridge_chooses_alpha_on_a_subset_of_many_bins(monkeypatch):
    """Efficient leave-one-out holds several bins x genes float64 arrays: above LOO_MAX_SPOTS it runs on a subset."""
    import anndata as ad
    from sklearn.linear_model import RidgeCV

    from histoexp.models import ridge

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 6)).astype(np.float32)
    counts = rng.poisson(np.exp(1.5 + 0.5 * feats[:, :3] @ rng.normal(size=(3, 8)))).astype(np.float32)
    a = ad.AnnData(X=sp.csr_matrix(counts), obsm={"X_f": feats})
    seen = []
    orig = RidgeCV.fit
    monkeypatch.setattr(RidgeCV, "fit", lambda self, x, y, **kw: seen.append(len(x)) or orig(self, x, y, **kw))
    hx.tl.fit_ridge(a, genes="all", use_rep="X_f", n_pcs=None)
    assert seen == [400] and a.uns["ridge"]["params"]["alpha_cv"] == "leave-one-out"
    monkeypatch.setattr(ridge, "LOO_MAX_SPOTS", 150)
    m1 = hx.tl.fit_ridge(a, genes="all", use_rep="X_f", n_pcs=None, overwrite=True)
    m2 = hx.tl.fit_ridge(a, genes="all", use_rep="X_f", n_pcs=None, overwrite=True)
    assert seen[1:] == [150, 150] and m1.config["alpha"] == m2.config["alpha"]  # same subset for the same seed
    assert "150 random training spots" in a.uns["ridge"]["params"]["alpha_cv"]
    # the final fit uses every bin: the same weights as sklearn's Ridge on all of them
    import torch
    from sklearn.linear_model import Ridge

    net = m1.net
    with torch.no_grad():
        z = net.features(torch.as_tensor(feats)).double().numpy()
    ref = Ridge(alpha=m1.config["alpha"]).fit(z, hx.pp.expression_matrix(a))
    np.testing.assert_allclose(net.linear.weight.detach().numpy(), ref.coef_, rtol=1e-4, atol=1e-5)
