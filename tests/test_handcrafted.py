"""The batched handcrafted features equal the per-patch scikit-image definitions, on real her2st windows."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

import histoexp as hx
from histoexp.models import handcrafted as hc

_IDX = {n: i for i, n in enumerate(hc.FEATURE_NAMES)}
_STATS = [n for n in hc.FEATURE_NAMES if n.startswith(("rgb_", "h_", "e_", "d_"))]
_MASKS = ["tissue_fraction", "nuclei_fraction", "nuclei_count", "nuclei_mean_area"]
_GLCM = [n for n in hc.FEATURE_NAMES if n.startswith("glcm_")]
_LBP = [n for n in hc.FEATURE_NAMES if n.startswith("lbp_")]


def _reference(rgb: np.ndarray) -> np.ndarray:
    """One patch at a time, straight from the documented definitions (scikit-image, scipy, float64 statistics).

    This is how the features were computed before they were batched: the per-patch LBP of
    ``skimage.feature.local_binary_pattern``, ``rgb2hed`` on the patch, and GLCMs from ``graycomatrix``.
    """
    out = []
    for patch in rgb:
        x = patch.astype(np.float32) / 255.0 if patch.dtype == np.uint8 else np.clip(patch.astype(np.float32), 0, 1)
        f = {}
        flat = x.reshape(-1, 3).astype(np.float64)
        for c, ch in enumerate("rgb"):
            f[f"rgb_mean_{ch}"], f[f"rgb_std_{ch}"] = flat[:, c].mean(), flat[:, c].std()
        hed = rgb2hed(x).astype(np.float32)
        for c, ch in enumerate("hed"):
            v = hed[..., c].ravel()
            f[f"{ch}_mean"], f[f"{ch}_std"] = v.astype(np.float64).mean(), v.astype(np.float64).std()
            f[f"{ch}_p90"] = np.percentile(v, 90)
        lum = x @ np.asarray([0.2125, 0.7154, 0.0721], dtype=np.float32)
        f["tissue_fraction"] = (lum < hc.TISSUE_LUMINANCE).mean()
        mask = hed[..., 0] > hc.NUCLEI_H_THRESHOLD
        f["nuclei_fraction"] = mask.mean()
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        kept = sizes[sizes >= hc.NUCLEI_MIN_AREA]
        f["nuclei_count"] = kept.size * 1e4 / mask.size
        f["nuclei_mean_area"] = kept.mean() if kept.size else 0.0
        q = np.minimum((lum * hc.GLCM_LEVELS).astype(np.int64), hc.GLCM_LEVELS - 1).astype(np.uint8)
        for d in hc.GLCM_DISTANCES:
            glcm = graycomatrix(q, [d], [0, np.pi / 2], levels=hc.GLCM_LEVELS, symmetric=True, normed=True)
            for prop in ("contrast", "homogeneity", "energy", "correlation"):
                f[f"glcm_{prop}_d{d}"] = graycoprops(glcm, prop).mean()
        gray8 = np.round(lum * 255).astype(np.uint8)
        codes = local_binary_pattern(gray8, hc.LBP_P, hc.LBP_R, method="uniform").astype(np.int64)
        hist = np.bincount(codes.ravel(), minlength=hc.LBP_P + 2) / codes.size
        f.update({f"lbp_{i}": hist[i] for i in range(hc.LBP_P + 2)})
        out.append([f[n] for n in hc.FEATURE_NAMES])
    return np.asarray(out, dtype=np.float64)


@pytest.fixture(scope="module")
def her2st_windows(her2st_c2):
    """The 5 x 5 windows of 112 µm (112 px) around 8 C2 spots, tissue edge and glass included: (200, 112, 112, 3)."""
    ad = her2st_c2[np.linspace(0, her2st_c2.n_obs - 1, 8).astype(int)].copy()
    hx.pp.extract_patches(ad, size_um=560, patch_px=560, store="memory", key_added="ctx")
    ctx = ad.obsm["ctx"]
    return ctx.reshape(len(ctx), 5, 112, 5, 112, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 112, 112, 3)


def _check(new: np.ndarray, ref: np.ndarray) -> None:
    cols = lambda names: [_IDX[n] for n in names]  # noqa: E731
    # statistics: float32 rounding of sums over ~12,500 pixels
    np.testing.assert_allclose(new[:, cols(_STATS)], ref[:, cols(_STATS)], rtol=1e-5, atol=1e-6)
    # counts of pixels and blobs: the same pixels (a rounding flip could move one at a threshold)
    np.testing.assert_allclose(new[:, cols(_MASKS)], ref[:, cols(_MASKS)], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new[:, cols(_GLCM)], ref[:, cols(_GLCM)], rtol=1e-5, atol=1e-6)
    # LBP: the same thresholds bit for bit on x86-64 (equal here); a few pixels of slack for other FPUs
    np.testing.assert_allclose(new[:, cols(_LBP)], ref[:, cols(_LBP)], atol=5e-4)


def test_batched_features_equal_per_patch_reference_on_real_windows(her2st_windows):
    win = her2st_windows
    new = hc.handcrafted_features(win).astype(np.float64)
    ref = _reference(win)
    assert new.shape == ref.shape == (200, len(hc.FEATURE_NAMES))
    # the windows span tissue and glass: the comparison covers both regimes (flat background decides LBP ties)
    tissue = ref[:, _IDX["tissue_fraction"]]
    assert (tissue > 0.9).sum() >= 20 and (tissue < 0.1).sum() >= 5
    _check(new, ref)
    # float input in [0, 1] (the encoder's path) gives the same features as uint8
    as_float = hc.handcrafted_features(win[:30].astype(np.float32) / 255.0)
    np.testing.assert_allclose(as_float, new[:30], rtol=1e-6, atol=1e-7)


def test_features_on_edge_cases_equal_reference():
    rng = np.random.default_rng(0)
    cases = [
        np.full((2, 112, 112, 3), 255, np.uint8),  # glass: every LBP comparison a tie
        np.full((1, 50, 60, 3), 120, np.uint8),  # constant, not square
        rng.integers(0, 256, (3, 37, 41, 3)).astype(np.uint8),  # noise, odd sizes
        (rng.integers(0, 3, (2, 64, 64, 3)) + 100).astype(np.uint8),  # near-flat: many ties
        np.zeros((1, 16, 16, 3), np.uint8),  # black
    ]
    for rgb in cases:
        _check(hc.handcrafted_features(rgb).astype(np.float64), _reference(rgb))
    float_rgb = rng.random((3, 33, 33, 3)).astype(np.float32)  # off the 1/255 grid
    _check(hc.handcrafted_features(float_rgb).astype(np.float64), _reference(float_rgb))


def test_percentile_rows_is_numpy_percentile():
    rng = np.random.default_rng(1)
    for shape in [(4, 3, 12544), (5, 1), (3, 2), (2, 999)]:
        x = rng.random(shape).astype(np.float32)
        for q in (90, 10, 50, 37.5):
            np.testing.assert_array_equal(hc._percentile_rows(x, q), np.percentile(x, q, axis=-1))


def test_lbp_codes_match_skimage_bits(her2st_windows):
    """The bit-packed patterns (not only their histogram) are skimage's: its 'default' LBP is the sum of the bits."""
    lum = (her2st_windows[:12].astype(np.float32) / 255) @ np.asarray([0.2125, 0.7154, 0.0721], np.float32)
    gray = np.round(lum * 255).astype(np.uint8)
    ours = hc._lbp_codes(gray)
    theirs = np.stack([local_binary_pattern(g, hc.LBP_P, hc.LBP_R, method="default") for g in gray])
    mismatch = (ours.astype(np.int64) != theirs.astype(np.int64)).mean()
    assert mismatch <= 1e-4  # 0 on x86-64
