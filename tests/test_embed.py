"""hx.tl.embed_patches on real her2st patches: handcrafted, torchvision (random init), user modules, bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import histoexp as hx
from histoexp.models import HANDCRAFTED_FEATURES, get_encoder

_FEAT = {n: i for i, n in enumerate(HANDCRAFTED_FEATURES)}


@pytest.fixture(scope="module")
def c2_patches(her2st_c2):
    """C2 with 224 px patches at 0.5 µm/px in memory (module-scoped: copy before mutating)."""
    adata = her2st_c2.copy()
    hx.pp.extract_patches(adata, size_um=112.0, mpp=0.5, patch_px=224, store="memory")
    return adata


@pytest.fixture(scope="module")
def background_patches(her2st_c2):
    """Patches at positions on the glass, away from the tissue (same section, same image)."""
    adata = her2st_c2[:8].copy()
    lib = adata.obs["library_id"].iloc[0] if "library_id" in adata.obs else next(iter(adata.uns["spatial"]))
    meta = adata.uns["spatial"][str(lib)]
    shape = meta.get("metadata", {}).get("fullres_shape")
    spots = her2st_c2.obsm["spatial"]
    hmax = float(spots[:, 1].max()) + 1500 if shape is None else float(shape[0])
    wmax = float(spots[:, 0].max()) + 1500 if shape is None else float(shape[1])
    # corners of the slide and a strip along the top edge: the her2st C2 tissue sits in the middle
    pts = [(300, 300), (wmax - 300, 300), (300, hmax - 300), (wmax - 300, hmax - 300)]
    pts += [(wmax * f, 300) for f in (0.2, 0.4, 0.6, 0.8)]
    adata.obsm["spatial"] = np.asarray(pts, dtype=float)
    hx.pp.extract_patches(adata, size_um=112.0, mpp=0.5, patch_px=224, store="memory")
    return adata


def test_handcrafted_real_patches(c2_patches, tmp_path):
    adata = c2_patches.copy()
    hx.tl.embed_patches(adata, "handcrafted", batch_size=64)
    x = adata.obsm["X_handcrafted"]
    assert x.dtype == np.float32 and x.shape == (adata.n_obs, len(HANDCRAFTED_FEATURES))
    assert np.isfinite(x).all()
    # spots lie on tissue: most of each patch is tissue and nuclei are found
    assert np.median(x[:, _FEAT["tissue_fraction"]]) > 0.7
    assert np.median(x[:, _FEAT["nuclei_count"]]) > 1
    # features vary across spots (not constant)
    assert (x.std(axis=0)[[_FEAT["h_mean"], _FEAT["rgb_mean_r"], _FEAT["glcm_contrast_d1"]]] > 1e-3).all()

    params = adata.uns["histoexp"]["embeddings"]["X_handcrafted"]
    assert params["encoder"] == "handcrafted" and params["dim"] == x.shape[1]
    assert params["patches_key"] == "patches" and params["patch_px"] == 224
    assert params["mpp"] == pytest.approx(0.5) and params["size_um"] == pytest.approx(112.0)
    assert params["random_init"] is False or params["random_init"] == 0

    # deterministic; a re-run replaces histoexp's own key (as scanpy), a key the user made needs overwrite=True
    before = x.copy()
    hx.tl.embed_patches(adata, "handcrafted", batch_size=17)  # other batching, same numbers
    np.testing.assert_array_equal(adata.obsm["X_handcrafted"], before)
    mine = adata.copy()
    mine.obsm["X_handcrafted"] = np.zeros_like(before)
    with pytest.raises(KeyError, match="changed since histoexp wrote it.*overwrite=True"):
        hx.tl.embed_patches(mine, "handcrafted")
    hx.tl.embed_patches(mine, "handcrafted", overwrite=True)
    np.testing.assert_array_equal(mine.obsm["X_handcrafted"], before)

    # h5ad round trip of obsm + uns
    path = tmp_path / "emb.h5ad"
    adata.write_h5ad(path)
    back = __import__("anndata").read_h5ad(path)
    np.testing.assert_array_equal(back.obsm["X_handcrafted"], before)
    p2 = back.uns["histoexp"]["embeddings"]["X_handcrafted"]
    assert p2["encoder"] == "handcrafted" and int(p2["dim"]) == before.shape[1]
    assert bool(p2["random_init"]) is False and list(p2["config"]["features"]) == list(HANDCRAFTED_FEATURES)


def test_handcrafted_tissue_vs_background(c2_patches, background_patches):
    tissue = c2_patches[:40].copy()
    hx.tl.embed_patches(tissue, "handcrafted")
    bg = background_patches.copy()
    hx.tl.embed_patches(bg, "handcrafted")
    t, b = tissue.obsm["X_handcrafted"], bg.obsm["X_handcrafted"]
    assert np.isfinite(b).all()
    # a clear margin on tissue fraction, haematoxylin density and nuclei
    assert t[:, _FEAT["tissue_fraction"]].mean() > b[:, _FEAT["tissue_fraction"]].mean() + 0.5
    assert b[:, _FEAT["tissue_fraction"]].max() < 0.2
    assert t[:, _FEAT["h_mean"]].mean() > 2 * b[:, _FEAT["h_mean"]].mean()
    assert t[:, _FEAT["nuclei_fraction"]].mean() > b[:, _FEAT["nuclei_fraction"]].mean() + 0.05
    assert t[:, _FEAT["rgb_mean_g"]].mean() < b[:, _FEAT["rgb_mean_g"]].mean() - 0.15


def test_resnet18_random_init_matches_bare_forward(c2_patches, caplog):
    sub = c2_patches[:12].copy()
    torch.manual_seed(0)
    enc = get_encoder("resnet18", weights=None)
    hx.tl.embed_patches(sub, enc, batch_size=5)
    feats = sub.obsm["X_resnet18"]
    assert feats.shape == (12, 512) and feats.dtype == np.float32 and np.isfinite(feats).all()
    params = sub.uns["histoexp"]["embeddings"]["X_resnet18"]
    assert params["random_init"] is True and params["weights"] == "random_init" and params["device"] == "cpu"
    # same numbers as the encoder applied by hand to the stored patches
    src = hx.pp.get_patches(sub)
    with torch.inference_mode():
        ref = enc.module(enc.preprocess(torch.from_numpy(src.batch(np.arange(12))))).numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)
    # deterministic on CPU
    hx.tl.embed_patches(sub, enc, batch_size=12, overwrite=True)
    np.testing.assert_allclose(sub.obsm["X_resnet18"], feats, rtol=1e-5, atol=1e-6)


def test_embed_by_name_weights_none_records_random_init(c2_patches):
    sub = c2_patches[:4].copy()
    out = hx.tl.embed_patches(sub, "timm:test_vit", weights=None, key_added="X_tiny", copy=True)
    assert out is not sub and "X_tiny" not in sub.obsm
    assert out.obsm["X_tiny"].shape == (4, 64)
    p = out.uns["histoexp"]["embeddings"]["X_tiny"]
    assert p["random_init"] is True and p["encoder"] == "timm:test_vit"


def test_custom_module_and_transform(c2_patches):
    sub = c2_patches[:6].copy()

    class MeanColour(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    hx.tl.embed_patches(sub, MeanColour(), key_added="X_colour")
    f = sub.obsm["X_colour"]
    assert f.shape == (6, 3)
    # ImageNet-normalised channel means of the stored patches, computed independently in numpy
    patches = hx.pp.get_patches(sub).batch(np.arange(6)).astype(np.float64) / 255
    expected = (patches.mean(axis=(1, 2)) - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(f, expected, atol=1e-4)
    assert sub.uns["histoexp"]["embeddings"]["X_colour"]["encoder"] == "meancolour"


def test_store_zarr_and_none_give_same_features(her2st_c2, c2_patches, tmp_path):
    ref = c2_patches[:6].copy()
    hx.tl.embed_patches(ref, "handcrafted")
    for store in ("zarr", "none"):
        sub = her2st_c2[:6].copy()
        kw = {"path": str(tmp_path / "p.zarr")} if store == "zarr" else {}
        hx.pp.extract_patches(sub, size_um=112.0, mpp=0.5, patch_px=224, store=store, **kw)
        # store='none' reads the slide on the fly, here inside a DataLoader worker process
        hx.tl.embed_patches(sub, "handcrafted", batch_size=4, num_workers=1 if store == "none" else 0)
        np.testing.assert_allclose(sub.obsm["X_handcrafted"], ref.obsm["X_handcrafted"], atol=1e-5)


def test_errors(c2_patches, her2st_c2):
    no_patches = her2st_c2[:3].copy()
    with pytest.raises(KeyError, match="extract_patches"):
        hx.tl.embed_patches(no_patches, "handcrafted")
    sub = c2_patches[:3].copy()
    with pytest.raises(KeyError, match="extract_patches"):
        hx.tl.embed_patches(sub, "handcrafted", patches_key="other")
    with pytest.raises(ValueError, match="hf-hub:"):
        hx.tl.embed_patches(sub, "no-such-encoder-xyz")
    with pytest.raises(ValueError, match="batch_size"):
        hx.tl.embed_patches(sub, "handcrafted", batch_size=0)
    sub.obsm["X_resnet50"] = np.zeros((3, 2048), dtype=np.float32)
    # the occupied key is detected before any weights are fetched
    with pytest.raises(KeyError, match="X_resnet50"):
        hx.tl.embed_patches(sub, "resnet50")
    assert not sub.obsm["X_resnet50"].any()


def test_synthetic_patches(synth):
    hx.pp.extract_patches(synth, patch_px=32, store="memory")
    hx.tl.embed_patches(synth, "handcrafted")
    x = synth.obsm["X_handcrafted"]
    assert x.shape == (synth.n_obs, len(HANDCRAFTED_FEATURES)) and np.isfinite(x).all()
    # the synthetic image's hidden driver (nuclear density) shows up in the haematoxylin features
    r = np.corrcoef(synth.obs["density"], x[:, _FEAT["h_mean"]])[0, 1]
    assert r > 0.3
