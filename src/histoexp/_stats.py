"""Expression axes, gene-specific correlation and spatial statistics (numpy / scipy only; no torch).

Shared by evaluation (:mod:`histoexp.tl._evaluate`), the models' reduced-rank outputs and cross-fitting. The
definitions follow the project's evaluation protocol:

- the **expression axes** of training expression ``Y`` (spots x genes) are its principal axes after centring on
  the training mean; the first one is the **shared axis** most genes co-vary along;
- the **shared-axis score** of a section is its measured expression, centred on the training mean, projected on
  the first training axis (an evaluation device computed from the truth, never an input to a prediction);
- the **gene-specific PCC** of a gene is the partial correlation of prediction and truth given ``[1, s]``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "benjamini_hochberg",
    "expression_axes",
    "neighbour_matrix",
    "partial_pearson",
    "project",
    "shared_axis_scores",
    "spatial_effective_n",
    "specific_pvalues",
]

_EPS = 1e-12


def expression_axes(expr: np.ndarray, n_axes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and principal axes of expression ``expr`` (spots x genes).

    Returns ``(mean, axes)``: ``mean`` of shape ``(genes,)``, ``axes`` of shape ``(genes, k)`` with orthonormal
    columns ordered by explained variance, ``k = min(n_axes, spots - 1, genes)`` (``None``: all). Each axis is
    oriented so that its loadings sum to a non-negative number (the first one then points to more expression),
    so the result does not depend on the SVD solver's sign choice.
    """
    y = np.asarray(expr, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 2:
        raise ValueError(f"Expression axes need a 2-d array of at least 2 spots, got shape {y.shape}.")
    mean = y.mean(0)
    yc = y - mean
    _, sv, vt = np.linalg.svd(yc, full_matrices=False)
    k_max = int(min(y.shape[0] - 1, y.shape[1], (sv > _EPS * max(sv[0], 1.0)).sum() if len(sv) else 0))
    k = k_max if n_axes is None else int(min(n_axes, k_max))
    axes = vt[:k].T.copy()
    signs = np.where(axes.sum(0) < 0, -1.0, 1.0)
    return mean, axes * signs


def project(pred: np.ndarray, mean: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Project predictions onto the span of ``axes`` around ``mean``: ``mean + (pred - mean) A Aᵀ``."""
    p = np.asarray(pred, dtype=np.float64)
    a = np.asarray(axes, dtype=np.float64)
    return mean + ((p - mean) @ a) @ a.T


def shared_axis_scores(truth: np.ndarray, mean: np.ndarray, loading: np.ndarray) -> np.ndarray:
    """Score of each spot of ``truth`` on the shared axis: ``(truth - mean) · loading``."""
    return (np.asarray(truth, dtype=np.float64) - mean) @ np.asarray(loading, dtype=np.float64).ravel()


def _residualise(x: np.ndarray, s: np.ndarray | None) -> np.ndarray:
    """Columns of ``x`` minus their least-squares fit on ``[1, s]`` (only the mean when ``s`` is None/constant).

    ``s`` is one covariate ``(n,)`` or several ``(n, k)`` (e.g. the scores on the first ``k`` shared axes).
    """
    xc = x - x.mean(0)
    if s is None:
        return xc
    sc = np.asarray(s, dtype=np.float64)
    if sc.ndim == 2 and sc.shape[1] > 1:
        sc = sc - sc.mean(0)
        # an orthonormal basis of the covariates' span; directions that are (numerically) constant add nothing
        u, sv, _ = np.linalg.svd(sc, full_matrices=False)
        q = u[:, sv > np.sqrt(_EPS) * max(1.0, float(np.abs(sc).max(initial=0.0))) * np.sqrt(len(sc))]
        return xc - q @ (q.T @ xc)
    sc = sc.ravel()
    sc = sc - sc.mean()
    ss = float(sc @ sc)
    if ss <= _EPS * max(1.0, float(np.abs(sc).max(initial=0.0)) ** 2):
        return xc
    return xc - np.outer(sc, (sc @ xc) / ss)


def partial_pearson(pred: np.ndarray, truth: np.ndarray, s: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-column partial correlation of ``pred`` and ``truth`` given ``[1, s]`` (``s``: ``(n,)`` or ``(n, k)``).

    Returns ``(r, constant)``: ``r`` (NaN where the truth residual is constant, 0 where only the prediction's
    residual is) and a boolean mask of columns whose prediction residual is constant. With ``s=None`` this is
    the ordinary Pearson correlation.
    """
    p = _residualise(np.asarray(pred, dtype=np.float64), s)
    t = _residualise(np.asarray(truth, dtype=np.float64), s)
    npn = np.sqrt((p * p).sum(0))
    ntn = np.sqrt((t * t).sum(0))
    scale_p = np.maximum(np.abs(pred).max(0), 1.0) * np.sqrt(len(p))
    scale_t = np.maximum(np.abs(truth).max(0), 1.0) * np.sqrt(len(t))
    const_p = npn <= 1e-9 * scale_p
    const_t = ntn <= 1e-9 * scale_t
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / (npn * ntn)
    r = np.clip(r, -1.0, 1.0)
    r[const_p] = 0.0
    r[const_t] = np.nan
    return r, const_p & ~const_t


def _distance_classes(coords: np.ndarray, n_classes: int):
    from scipy.spatial.distance import pdist

    n = len(coords)
    d = pdist(coords)
    i, j = np.triu_indices(n, 1)
    top = float(d.max()) if d.size else 0.0
    if top <= 0:
        return []
    edges = np.linspace(0.0, top, n_classes + 1)
    cls = np.clip(np.searchsorted(edges, d, side="left") - 1, 0, n_classes - 1)
    return [(i[cls == k], j[cls == k]) for k in range(n_classes)]


def spatial_effective_n(
    x: np.ndarray,
    y: np.ndarray,
    coords: np.ndarray,
    *,
    n_classes: int = 13,
    max_spots: int = 2000,
    random_state: int = 0,
) -> np.ndarray:
    """Effective sample size of the correlation of each column pair of ``x`` and ``y`` under spatial autocorrelation.

    Clifford, Richardson & Hémon (1989) / Dutilleul (1993): the variance of Pearson's r between two spatially
    autocorrelated variables is ``(n + Σ_k W_k I_x(k) I_y(k)) / n²``, with ``W_k`` the ordered spot pairs in
    distance class ``k`` and ``I(k)`` Moran's autocorrelation of each (centred) variable in that class;
    ``n_eff = 1 + 1 / var``, clipped to ``[3, n]``. Distance classes: ``n_classes`` equal-width classes up to the
    largest distance (13 as SpatialPack's ``modified.ttest``). Sections of more than ``max_spots`` spots are
    evaluated on a seeded random subset of ``max_spots`` spots (pairs grow as n²), and the ratio ``n_eff / n`` of
    the subset is applied to all spots.

    Parameters
    ----------
    x, y
        ``(n, m)`` arrays (or ``(n,)``), e.g. the residuals of prediction and truth after the shared axis.
    coords
        ``(n, 2)`` spot positions.
    """
    from scipy import sparse

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    one = x.ndim == 1
    x, y = np.atleast_2d(x.T).T, np.atleast_2d(y.T).T
    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    n_all = len(x)
    if not (len(y) == len(coords) == n_all):
        raise ValueError("`x`, `y` and `coords` must have one row per spot.")
    rows = np.arange(n_all)
    if n_all > max_spots:
        rows = np.sort(np.random.default_rng(random_state).choice(n_all, max_spots, replace=False))
    xs, ys, cs = x[rows] - x[rows].mean(0), y[rows] - y[rows].mean(0), coords[rows]
    n = len(rows)
    var = np.full(x.shape[1], float(n))
    sxx, syy = (xs * xs).sum(0), (ys * ys).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        for i, j in _distance_classes(cs, n_classes):
            if not len(i):
                continue
            a = sparse.coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)).tocsr()
            a = a + a.T
            w = 2.0 * len(i)
            ix = (n / w) * (xs * (a @ xs)).sum(0) / sxx
            iy = (n / w) * (ys * (a @ ys)).sum(0) / syy
            var += w * np.nan_to_num(ix * iy)
    var /= float(n) ** 2
    with np.errstate(divide="ignore"):
        ratio = np.clip((1.0 + 1.0 / np.maximum(var, _EPS)) / n, 0.0, 1.0)
    n_eff = np.clip(ratio * n_all, 3.0, float(n_all))
    return n_eff[0] if one else n_eff


def specific_pvalues(r: np.ndarray, n_eff: np.ndarray, n_covariates: int = 1) -> np.ndarray:
    """One-sided p-values of partial correlations ``r > 0`` with ``n_eff`` effective spots (Student t).

    ``t = r sqrt(df / (1 - r²))`` with ``df = n_eff - 2 - n_covariates``; NaN where ``r`` is NaN.
    """
    from scipy.stats import t as student

    r = np.asarray(r, dtype=np.float64)
    df = np.maximum(np.asarray(n_eff, dtype=np.float64) - 2.0 - n_covariates, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tstat = r * np.sqrt(df / np.maximum(1.0 - r * r, _EPS))
    return student.sf(tstat, df)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaN entries stay NaN and are not counted."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if not m:
        return q
    order = np.argsort(p[ok], kind="stable")
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


def neighbour_matrix(coords: np.ndarray, groups: np.ndarray | None = None, *, radius: float = 1.5):
    """Row-normalised sparse matrix averaging each spot's spatial neighbours (the spot itself excluded).

    Neighbours: spots of the same group (section) within ``radius`` times the group's median nearest-neighbour
    distance (1.5: the ring of adjacent spots of a legacy ST, Visium or tile grid). A spot without neighbours
    keeps a zero row (smoothing leaves it as it is).
    """
    from scipy import sparse
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    n = len(coords)
    groups = np.zeros(n, dtype=int) if groups is None else np.asarray(groups)
    rows, cols = [], []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) < 2:
            continue
        tree = cKDTree(coords[idx])
        dist, _ = tree.query(coords[idx], k=2)
        spacing = float(np.median(dist[:, 1]))
        if not np.isfinite(spacing) or spacing <= 0:
            continue
        pairs = tree.query_pairs(radius * spacing, output_type="ndarray")
        if len(pairs):
            rows += [idx[pairs[:, 0]], idx[pairs[:, 1]]]
            cols += [idx[pairs[:, 1]], idx[pairs[:, 0]]]
    if not rows:
        return sparse.csr_matrix((n, n))
    r, c = np.concatenate(rows), np.concatenate(cols)
    a = sparse.coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n)).tocsr()
    deg = np.asarray(a.sum(1)).ravel()
    inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)
    return sparse.diags(inv) @ a
