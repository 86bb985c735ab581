"""Training-free colour, stain and texture features of H&E patches (the baseline that needs no weights).

:func:`handcrafted_features` works in numpy on a whole batch at once (no per-patch Python loop except the LBP
histogram), is deterministic and runs on CPU. Patches are expected already resized (the ``'handcrafted'``
encoder resizes them to 112 px in :meth:`~histoexp.models.encoders.Encoder.preprocess`). Features, in order
(:data:`FEATURE_NAMES`):

- ``rgb_mean_{r,g,b}``, ``rgb_std_{r,g,b}``: colour statistics on [0, 1];
- ``{h,e,d}_{mean,std,p90}``: haematoxylin, eosin and DAB optical densities (:func:`skimage.color.rgb2hed`);
- ``tissue_fraction``: fraction of non-white pixels (luminance < 0.85);
- ``nuclei_fraction``: fraction of pixels with haematoxylin density above :data:`NUCLEI_H_THRESHOLD`;
  ``nuclei_count``: number of connected blobs (8-connectivity, at least :data:`NUCLEI_MIN_AREA` pixels) in that
  mask, per 10,000 pixels; ``nuclei_mean_area``: their mean area in pixels (0 without blobs);
- ``glcm_{contrast,homogeneity,energy,correlation}_d{1,2}``: grey-level co-occurrence statistics of the
  luminance quantised to 32 levels, symmetric and normalised, averaged over the 0° and 90° directions
  (same definitions as :func:`skimage.feature.graycoprops`);
- ``lbp_0`` ... ``lbp_9``: histogram of rotation-invariant uniform local binary patterns (P=8, R=1,
  :func:`skimage.feature.local_binary_pattern`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["FEATURE_NAMES", "NUCLEI_H_THRESHOLD", "NUCLEI_MIN_AREA", "TISSUE_LUMINANCE", "handcrafted_features"]

TISSUE_LUMINANCE = 0.85
"""Pixels darker than this luminance (0-1) count as tissue (the slide background is about 0.94)."""
NUCLEI_H_THRESHOLD = 0.10
"""Haematoxylin optical density (rgb2hed units) above which a pixel counts as nuclear."""
NUCLEI_MIN_AREA = 6
"""Smallest blob (pixels, at the 112 px working size, about 1 µm/px for 224 px at 0.5 µm/px) counted as a nucleus."""
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2)
LBP_P, LBP_R = 8, 1

FEATURE_NAMES: tuple[str, ...] = (
    *(f"rgb_{s}_{c}" for s in ("mean", "std") for c in "rgb"),
    *(f"{c}_{s}" for c in "hed" for s in ("mean", "std", "p90")),
    "tissue_fraction",
    "nuclei_fraction",
    "nuclei_count",
    "nuclei_mean_area",
    *(f"glcm_{p}_d{d}" for d in GLCM_DISTANCES for p in ("contrast", "homogeneity", "energy", "correlation")),
    *(f"lbp_{i}" for i in range(LBP_P + 2)),
)


def _glcm_props(q: np.ndarray, levels: int, distance: int) -> np.ndarray:
    """GLCM props of a batch of quantised images q (B, H, W), averaged over 0° and 90°; (B, 4).

    The co-occurrence matrices of the whole batch come from one ``np.bincount`` per direction.
    """
    b = q.shape[0]
    base = (np.arange(b, dtype=np.int64) * levels * levels)[:, None]
    acc = np.zeros((b, 4))
    for a, c in ((q[:, :, :-distance], q[:, :, distance:]), (q[:, :-distance, :], q[:, distance:, :])):
        pair = base + (a.reshape(b, -1) * levels + c.reshape(b, -1))
        counts = np.bincount(pair.ravel(), minlength=b * levels * levels).reshape(b, levels, levels)
        counts = (counts + counts.transpose(0, 2, 1)).astype(np.float64)  # symmetric
        counts /= counts.sum(axis=(1, 2), keepdims=True)
        acc += _props(counts)
    return acc / 2.0


def _props(p: np.ndarray) -> np.ndarray:
    """contrast, homogeneity, energy, correlation of normalised GLCMs p (B, L, L); (B, 4)."""
    levels = p.shape[-1]
    i = np.arange(levels, dtype=np.float64)[:, None]
    j = np.arange(levels, dtype=np.float64)[None, :]
    contrast = (p * (i - j) ** 2).sum(axis=(1, 2))
    homogeneity = (p / (1.0 + (i - j) ** 2)).sum(axis=(1, 2))
    energy = np.sqrt((p**2).sum(axis=(1, 2)))
    mu_i = (p * i).sum(axis=(1, 2))
    mu_j = (p * j).sum(axis=(1, 2))
    sd_i = np.sqrt((p * (i - mu_i[:, None, None]) ** 2).sum(axis=(1, 2)))
    sd_j = np.sqrt((p * (j - mu_j[:, None, None]) ** 2).sum(axis=(1, 2)))
    cov = (p * (i - mu_i[:, None, None]) * (j - mu_j[:, None, None])).sum(axis=(1, 2))
    denom = sd_i * sd_j
    # skimage: correlation is 1 for a constant image (zero variance)
    correlation = np.where(denom < 1e-15, 1.0, cov / np.where(denom < 1e-15, 1.0, denom))
    return np.stack([contrast, homogeneity, energy, correlation], axis=1)


def _nuclei(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blob count (per 10,000 px) and mean blob area of a batch of binary masks (B, H, W), in one labelling pass."""
    from scipy import ndimage

    b, h, w = mask.shape
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity within a patch, never across patches
    labels, n = ndimage.label(mask, structure=structure)
    count = np.zeros(b)
    mean_area = np.zeros(b)
    if n == 0:
        return count, mean_area
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    # labels are numbered in raster order, so each patch owns a contiguous range of them
    last = np.maximum.accumulate(labels.reshape(b, -1).max(axis=1))
    patch_of = np.searchsorted(last, np.arange(1, n + 1), side="left")
    keep = sizes >= NUCLEI_MIN_AREA
    count = np.bincount(patch_of[keep], minlength=b).astype(np.float64)
    area = np.bincount(patch_of[keep], weights=sizes[keep], minlength=b)
    mean_area = np.divide(area, count, out=np.zeros(b), where=count > 0)
    return count * (1e4 / (h * w)), mean_area


def handcrafted_features(rgb: np.ndarray) -> np.ndarray:
    """Colour, stain, texture, nuclei and tissue features of a batch of RGB patches.

    Parameters
    ----------
    rgb
        (B, H, W, 3) array: uint8, or float in [0, 1]. Resize first (e.g. to 112 px) for speed.

    Returns
    -------
    float32 array (B, len(FEATURE_NAMES)); see :data:`FEATURE_NAMES`.
    """
    from skimage.color import rgb2hed
    from skimage.feature import local_binary_pattern

    rgb = np.asarray(rgb)
    if rgb.ndim == 3:
        rgb = rgb[None]
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"`rgb` must be a (B, H, W, 3) batch, got shape {rgb.shape}.")
    x = rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else np.clip(rgb.astype(np.float32), 0.0, 1.0)
    b = x.shape[0]
    if b == 0:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
    flat = x.reshape(b, -1, 3)
    feats = [flat.mean(axis=1), flat.std(axis=1)]

    hed = rgb2hed(x).astype(np.float32).reshape(b, -1, 3)
    feats += [
        np.stack([hed[..., c].mean(axis=1), hed[..., c].std(axis=1), np.percentile(hed[..., c], 90, axis=1)], axis=1)
        for c in range(3)
    ]

    lum = x @ np.asarray([0.2125, 0.7154, 0.0721], dtype=np.float32)  # skimage.color.rgb2gray weights
    tissue = (lum < TISSUE_LUMINANCE).reshape(b, -1).mean(axis=1)
    nuc_mask = hed[..., 0].reshape(lum.shape) > NUCLEI_H_THRESHOLD
    count, mean_area = _nuclei(nuc_mask)
    feats.append(np.stack([tissue, nuc_mask.reshape(b, -1).mean(axis=1), count, mean_area], axis=1))

    q = np.minimum((lum * GLCM_LEVELS).astype(np.int64), GLCM_LEVELS - 1)
    feats += [_glcm_props(q, GLCM_LEVELS, d) for d in GLCM_DISTANCES]

    gray8 = np.round(lum * 255).astype(np.uint8)
    n_bins = LBP_P + 2
    lbp = np.empty((b, n_bins))
    for k in range(b):
        codes = local_binary_pattern(gray8[k], LBP_P, LBP_R, method="uniform").astype(np.int64)
        lbp[k] = np.bincount(codes.ravel(), minlength=n_bins)[:n_bins] / codes.size
    feats.append(lbp)

    out = np.concatenate([np.asarray(f, dtype=np.float64).reshape(b, -1) for f in feats], axis=1)
    return out.astype(np.float32)


def _module_class():
    import torch
    from torch import nn

    class HandcraftedModule(nn.Module):
        """Wraps :func:`handcrafted_features` as an ``nn.Module``: (B, 3, S, S) float in [0, 1] -> (B, D) float32.

        No parameters, not trainable; computed in numpy on CPU (the input is moved to CPU).
        """

        input_size = 112

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            arr = x.detach().float().permute(0, 2, 3, 1).cpu().numpy()
            return torch.from_numpy(handcrafted_features(arr)).to(x.device)

    return HandcraftedModule


def __getattr__(name: str):
    # the nn.Module wrapper is built lazily so that the numpy features stay usable without torch
    if name == "HandcraftedModule":
        cls = _module_class()
        globals()["HandcraftedModule"] = cls
        return cls
    raise AttributeError(name)
