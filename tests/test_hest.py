"""HEST-1k in: read_hest on a HEST-format folder written from the real her2st section C2; hx.datasets.hest."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

import histoexp as hx

SID = "SPAC2"  # a HEST-style id for her2st C2 written by this test (not HEST's own numbering)
N_DROPPED = 5  # spots left out of the patches file, as HEST leaves out spots off the tissue


def _write_pyramid(path: Path, img: np.ndarray) -> None:
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(512, 512), photometric="rgb", subifds=2)
        for f in (2, 4):
            tw.write(img[::f, ::f], tile=(256, 256), photometric="rgb", subfiletype=1)


@pytest.fixture(scope="module")
def c2(her2st_dir):
    ad = hx.datasets.her2st("C2", data_dir=her2st_dir)
    hx.pp.extract_patches(ad, size_um=112, patch_px=224, key_added="p224")  # HEST geometry: 224 px at 0.5 µm/px
    return ad


@pytest.fixture(scope="module")
def hest_root(c2, tmp_path_factory):
    """A HEST-1k folder (st/, wsis/, metadata/, patches/) holding C2 as sample SPAC2."""
    import anndata as ad
    import h5py
    from PIL import Image

    root = tmp_path_factory.mktemp("hest")
    for d in ("st", "wsis", "metadata", "patches"):
        (root / d).mkdir()
    meta_c2 = c2.uns["spatial"]["C2"]["metadata"]
    mpp = meta_c2["microns_per_pixel"]
    st = ad.AnnData(X=sparse.csr_matrix(c2.X), obs=c2.obs[[]].copy(), var=c2.var[[]].copy())
    st.obsm["spatial"] = np.asarray(c2.obsm["spatial"])
    st.write_h5ad(root / "st" / f"{SID}.h5ad")
    with warnings.catch_warnings():  # the her2st JPEG (92 Mpx) is above PIL's decompression-bomb warning limit
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        rgb = np.asarray(Image.open(meta_c2["source_image_path"]).convert("RGB"))
    _write_pyramid(root / "wsis" / f"{SID}.tif", rgb)
    meta = {
        "id": SID,
        "pixel_size_um_estimated": mpp,
        "pixel_size_um_embedded": None,
        "magnification": "20x",
        "st_technology": "Spatial Transcriptomics",
        "spot_diameter": 100.0,
        "inter_spot_dist": 200.0,
        "patient": "C",
        "species": "Homo sapiens",
    }
    (root / "metadata" / f"{SID}.json").write_text(json.dumps(meta))
    # patches as HEST writes them: rows in its own order, top-left corners in full-resolution px, barcodes (n, 1)
    rng = np.random.default_rng(0)
    rows = rng.permutation(c2.n_obs)[: c2.n_obs - N_DROPPED]
    size_src = 224 * 0.5 / mpp
    topleft = (np.asarray(c2.obsm["spatial"])[rows] - size_src // 2).astype(int)
    with h5py.File(root / "patches" / f"{SID}.h5", "w") as f:
        f["img"] = c2.obsm["p224"][rows]
        f["coords"] = topleft
        f["barcode"] = np.array([n.encode() for n in c2.obs_names[rows]])[:, None]
    return root


def test_read_hest_same_spots_and_counts_as_her2st(c2, hest_root, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="histoexp"):
        ad = hx.io.read_hest(SID, root=hest_root)
    assert "source: HEST metadata pixel_size_um_estimated" in caplog.text
    assert ad.obs_names.equals(c2.obs_names) and ad.var_names.equals(c2.var_names)
    assert (ad.X != c2.X).nnz == 0 and ad.X.dtype == np.float32 and sparse.issparse(ad.X)
    assert np.array_equal(ad.obsm["spatial"], c2.obsm["spatial"])
    assert list(ad.obs["library_id"].cat.categories) == [SID]
    lib = ad.uns["spatial"][SID]
    c2lib = c2.uns["spatial"]["C2"]
    assert lib["metadata"]["source_image_path"] == str(hest_root / "wsis" / f"{SID}.tif")
    assert lib["metadata"]["microns_per_pixel"] == pytest.approx(c2lib["metadata"]["microns_per_pixel"])
    assert lib["metadata"]["fullres_shape"] == c2lib["metadata"]["fullres_shape"]
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(c2lib["scalefactors"]["spot_diameter_fullres"])
    assert lib["metadata"]["hest"]["st_technology"] == "Spatial Transcriptomics"
    hires = lib["images"]["hires"]
    assert hires.dtype == np.uint8 and max(hires.shape[:2]) <= 2000
    assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(
        c2lib["scalefactors"]["tissue_hires_scalef"], 1e-3
    )
    # the folder itself or the h5ad path work as `sample`
    assert hx.io.read_hest(hest_root / "st" / f"{SID}.h5ad", image=False).n_obs == c2.n_obs


def test_patches_cut_from_the_hest_wsi_equal_her2st(c2, hest_root):
    ad = hx.io.read_hest(SID, root=hest_root)[:48].copy()
    hx.pp.extract_patches(ad, size_um=112, patch_px=224, key_added="p224")
    assert ad.uns["histoexp"]["p224"]["mpp"] == pytest.approx(0.5)
    a = ad.obsm["p224"].astype(np.int16)
    b = c2.obsm["p224"][:48].astype(np.int16)
    # same pixels read from the pyramidal TIFF (level 0) as from the JPEG: same patches
    assert np.abs(a - b).max() <= 1


def test_read_hest_patches_record(c2, hest_root, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="histoexp"):
        ad = hx.io.read_hest(SID, root=hest_root, patches=True)
    assert f"{N_DROPPED} of {c2.n_obs} spots have no HEST patch" in caplog.text
    assert ad.n_obs == c2.n_obs - N_DROPPED
    idx = c2.obs_names.get_indexer(ad.obs_names)
    assert (idx >= 0).all() and (np.diff(idx) > 0).all()  # her2st order kept
    assert np.array_equal(ad.obsm["hest_patches"], c2.obsm["p224"][idx])
    assert (ad.X != c2.X[idx]).nnz == 0
    rec = ad.uns["histoexp"]["hest_patches"]
    assert rec["patch_px"] == 224 and rec["mpp"] == 0.5 and rec["size_um"] == 112 and rec["store"] == "memory"
    src = hx.pp.get_patches(ad, key="hest_patches")
    assert len(src) == ad.n_obs and np.array_equal(src.batch([0, 3]), ad.obsm["hest_patches"][[0, 3]])
    sub = ad[:16].copy()
    hx.tl.embed_patches(sub, encoder="handcrafted", patches_key="hest_patches")
    assert sub.obsm["X_handcrafted"].shape[0] == 16 and np.isfinite(sub.obsm["X_handcrafted"]).all()


def test_read_hest_refuses_patches_off_the_spots(hest_root):
    # a wrong µm/px puts HEST's patch corners away from the spot centres: refused, not silently misaligned
    with pytest.raises(ValueError, match="not centred on the spots"):
        hx.io.read_hest(SID, root=hest_root, patches=True, mpp=0.4, image=False)


def test_read_hest_mpp_sources_and_errors(hest_root, tmp_path):
    root = tmp_path / "h"
    shutil.copytree(hest_root, root, ignore=shutil.ignore_patterns("*.tif", "*.h5"))
    meta_path = root / "metadata" / f"{SID}.json"
    meta = json.loads(meta_path.read_text())
    meta["pixel_size_um_embedded"], meta["pixel_size_um_estimated"] = meta["pixel_size_um_estimated"], None
    meta_path.write_text(json.dumps(meta))
    ad = hx.io.read_hest(SID, root=root, image=False)
    assert ad.uns["spatial"][SID]["metadata"]["mpp_source"] == "HEST metadata pixel_size_um_embedded"
    assert hx.io.read_hest(SID, root=root, image=False, mpp=0.7).uns["spatial"][SID]["metadata"]["mpp_source"] == (
        "argument"
    )
    meta["pixel_size_um_embedded"] = None
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="pass `mpp=`"):
        hx.io.read_hest(SID, root=root, image=False)
    with pytest.raises(FileNotFoundError, match=r"hx.datasets.hest\('SPAC2'"):
        hx.io.read_hest(SID, root=root)  # no WSI in this copy
    with pytest.raises(ValueError, match="root="):
        hx.io.read_hest("NOT_A_PATH_OR_FOLDER")


def test_datasets_hest_local_folder_needs_no_download(hest_root, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    ad = hx.datasets.hest(SID, data_dir=hest_root)
    assert "hest_patches" in ad.obsm and ad.uns["spatial"][SID]["metadata"]["hest_id"] == SID


def test_datasets_hest_downloads_only_the_samples_asked_for(hest_root, tmp_path, monkeypatch):
    import fnmatch

    import huggingface_hub

    calls = []

    def fake_hub(repo_id, repo_type, local_dir, allow_patterns):  # serves the fixture folder as the hub would
        calls.append((repo_id, repo_type, allow_patterns))
        for f in hest_root.rglob("*"):
            rel = f.relative_to(hest_root).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, Path(local_dir) / rel)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub)
    ad = hx.datasets.hest(SID, data_dir=tmp_path / "cache", patches=False)
    assert calls == [
        ("MahmoodLab/hest", "dataset", [f"st/{SID}.h5ad", f"wsis/{SID}.tif", f"metadata/{SID}.json"]),
    ]
    assert ad.n_obs > 0 and "hest_patches" not in ad.obsm
    with pytest.raises(FileNotFoundError, match="download=False"):
        hx.datasets.hest("OTHER1", data_dir=tmp_path / "cache", download=False)


def test_datasets_hest_gated_error(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        raise GatedRepoError(
            "Access to dataset MahmoodLab/hest is restricted.",
            response=SimpleNamespace(headers={}, request=None, status_code=403),
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(hx.datasets.DatasetUnavailableError) as err:
        hx.datasets.hest("TENX95", data_dir=tmp_path)
    msg = str(err.value)
    assert "huggingface-cli login" in msg and "HF_TOKEN" in msg and "datasets/MahmoodLab/hest" in msg
    assert "hx.io.read_hest" in msg and not any(tmp_path.iterdir())


def test_datasets_hest_several_samples(c2, hest_root, tmp_path):
    # a second sample: the same files under another id (linked, not copied); barcodes repeat across the two
    root = tmp_path / "two"
    for sub, ext in (("st", "h5ad"), ("wsis", "tif"), ("metadata", "json"), ("patches", "h5")):
        (root / sub).mkdir(parents=True)
        for sid in (SID, "SPAC2B"):
            (root / sub / f"{sid}.{ext}").symlink_to(hest_root / sub / f"{SID}.{ext}")
    ad = hx.datasets.hest([SID, "SPAC2B"], data_dir=root, download=False)
    n = c2.n_obs - N_DROPPED
    assert ad.n_obs == 2 * n and ad.obs_names.is_unique
    assert list(ad.obs["library_id"].cat.categories) == [SID, "SPAC2B"]
    assert ad.obs_names[0].startswith(f"{SID}_") and set(ad.uns["spatial"]) == {SID, "SPAC2B"}
    rec = ad.uns["histoexp"]["hest_patches"]
    assert set(rec["libraries"]) == {SID, "SPAC2B"}
    src = hx.pp.get_patches(ad, key="hest_patches")
    assert np.array_equal(src.batch([0]), src.batch([n]))  # the same spot in both samples


def test_read_hest_output_round_trips_through_h5ad(hest_root, tmp_path):
    import anndata as ad

    a = hx.io.read_hest(SID, root=hest_root, patches=True)[:20].copy()
    hx.io.write_h5ad(a, tmp_path / "a.h5ad")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    assert b.uns["spatial"][SID]["metadata"]["hest"]["st_technology"] == "Spatial Transcriptomics"
    assert b.uns["spatial"][SID]["metadata"]["source_image_path"] == str(hest_root / "wsis" / f"{SID}.tif")
    assert np.array_equal(hx.pp.get_patches(b, key="hest_patches").batch([0, 19]), a.obsm["hest_patches"][[0, 19]])
