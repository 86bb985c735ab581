"""A small synthetic H&E-like dataset whose expression is a known function of the image."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

_EOSIN = np.array([236, 170, 200], dtype=np.float32)  # stroma / cytoplasm pink
_HAEMATOXYLIN = np.array([70, 40, 130], dtype=np.float32)  # nuclei purple
_WHITE = np.array([245, 245, 245], dtype=np.float32)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape), sigma)
    f -= f.min()
    return f / max(f.max(), 1e-12)


def _section(rng, n_side, spacing_px, spot_diameter_px, n_genes, coef, intercept, library_id):
    size = spacing_px * (n_side + 1)
    shape = (size, size)
    density = _smooth_field(rng, shape, sigma=spacing_px * 1.2)  # nuclei density (drives expression)
    tint = _smooth_field(rng, shape, sigma=spacing_px * 2.0)  # stroma colour (drives expression)

    img = _EOSIN[None, None, :] * (1 - 0.35 * tint[..., None]) + np.array([0, 30, 10], np.float32) * tint[..., None]
    # nuclei: small dark discs whose placement probability follows `density`
    n_nuclei = int(size * size / 60)
    ys = rng.integers(0, size, n_nuclei)
    xs = rng.integers(0, size, n_nuclei)
    keep = rng.random(n_nuclei) < density[ys, xs] ** 2
    yy, xx = np.mgrid[-3:4, -3:4]
    disc = (yy**2 + xx**2) <= 9
    for y, x in zip(ys[keep], xs[keep], strict=True):
        y0, y1 = max(y - 3, 0), min(y + 4, size)
        x0, x1 = max(x - 3, 0), min(x + 4, size)
        m = disc[y0 - y + 3 : y1 - y + 3, x0 - x + 3 : x1 - x + 3]
        img[y0:y1, x0:x1][m] = _HAEMATOXYLIN
    # tissue is an ellipse; outside is glass
    cy, cx = (size - 1) / 2, (size - 1) / 2
    gy, gx = np.mgrid[0:size, 0:size]
    tissue = ((gy - cy) / (0.48 * size)) ** 2 + ((gx - cx) / (0.46 * size)) ** 2 <= 1
    img[~tissue] = _WHITE
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)

    # spots on a grid, kept where they lie on tissue
    grid = (np.arange(n_side) + 1) * spacing_px
    px, py = np.meshgrid(grid, grid)
    px, py = px.ravel().astype(float), py.ravel().astype(float)
    on = tissue[py.astype(int), px.astype(int)]
    px, py = px[on], py[on]
    ax, ay = (px / spacing_px - 1).astype(int), (py / spacing_px - 1).astype(int)

    r = spot_diameter_px / 2
    feats = np.empty((px.size, 2))
    for i, (x, y) in enumerate(zip(px, py, strict=True)):
        sl = (slice(int(y - r), int(y + r)), slice(int(x - r), int(x + r)))
        feats[i] = density[sl].mean(), tint[sl].mean()
    feats = (feats - feats.mean(0)) / feats.std(0)
    depth = rng.uniform(0.7, 1.3, px.size)
    rate = np.exp(intercept[None, :] + feats @ coef) * depth[:, None]
    counts = rng.poisson(rate).astype(np.float32)

    obs = pd.DataFrame(
        {"array_x": ax, "array_y": ay, "library_id": library_id, "density": feats[:, 0], "tint": feats[:, 1]},
        index=[f"{library_id}_{x}x{y}" for x, y in zip(ax, ay, strict=True)],
    )
    return counts, obs, np.column_stack([px, py]), img


def synthetic(
    n_sections: int = 2,
    *,
    n_side: int = 14,
    spacing_px: int = 48,
    spot_diameter_px: int = 32,
    n_genes: int = 40,
    mpp: float = 2.0,
    random_state: int = 0,
) -> AnnData:
    """Small H&E-like sections with spots whose expression is a known function of the image.

    Each section is an eosin-pink tissue ellipse with purple nuclei. Two smooth hidden fields drive
    both the image (nuclei density, stroma tint) and the expression: per gene, the Poisson rate is
    ``exp(intercept + coef @ [density, tint])`` of the spot's standardised field means, so a model
    that reads the image well can predict expression. Useful for fast tests and examples.

    Parameters
    ----------
    n_sections
        Number of sections (libraries ``'S0'``, ``'S1'``, ...), each with its own image.
    n_side
        Spots per side of the square grid (spots off tissue are dropped).
    spacing_px
        Centre-to-centre spot distance in pixels.
    spot_diameter_px
        Spot diameter in pixels (``scalefactors['spot_diameter_fullres']``).
    n_genes
        Number of genes.
    mpp
        Micrometres per pixel of the image (recorded in the metadata).
    random_state
        Seed.

    Returns
    -------
    AnnData with counts in ``X`` (sparse), ``obs['library_id']``, ``obsm['spatial']``, the hidden
    drivers in ``obs['density']``/``obs['tint']``, and ``uns['spatial'][library_id]`` holding the
    full-resolution image as ``'hires'`` (``tissue_hires_scalef=1``).
    """
    rng = np.random.default_rng(random_state)
    coef = rng.normal(0, 0.8, (2, n_genes))
    intercept = rng.uniform(0.5, 3.0, n_genes)
    parts = [
        _section(rng, n_side, spacing_px, spot_diameter_px, n_genes, coef, intercept, f"S{i}")
        for i in range(n_sections)
    ]
    X = np.concatenate([p[0] for p in parts])
    obs = pd.concat([p[1] for p in parts])
    obs["library_id"] = pd.Categorical(obs["library_id"], categories=[f"S{i}" for i in range(n_sections)])
    adata = AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"gene{j:03d}" for j in range(n_genes)]))
    adata.obsm["spatial"] = np.concatenate([p[2] for p in parts])
    adata.uns["spatial"] = {
        f"S{i}": {
            "images": {"hires": p[3]},
            "scalefactors": {
                "tissue_hires_scalef": 1.0,
                "spot_diameter_fullres": float(spot_diameter_px),
                "microns_per_pixel": float(mpp),
            },
            "metadata": {"source_image_path": "", "microns_per_pixel": float(mpp), "mpp_source": "synthetic"},
        }
        for i, p in enumerate(parts)
    }
    adata.varm["true_coef"] = coef.T
    return adata
