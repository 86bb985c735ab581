"""The expression-axes zero-shot model in numpy: what ``fit_zeroshot(method='axes')`` and its cross-fitting share.

The image predicts the scores of the top ``k`` principal axes of the training genes' expression (ridge, one penalty
per axis chosen by leave-one-section-out); a gene's loadings on those axes (per unit of its standard deviation), its
mean level and its standard deviation are read from its embedding by a ridge map learned on the training genes (one
penalty per output, by efficient leave-one-gene-out). A gene is predicted as ``level + scores · loadings``. Every
function works on arrays; no torch, no AnnData.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._stats import expression_axes

#: Penalties of the image ridge (standardised features; as :data:`histoexp.tl._ridge.ALPHAS`).
IMAGE_ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))
#: Penalties of the embedding -> loadings map (embeddings centred and scaled to unit mean squared norm).
MAP_ALPHAS = tuple(float(a) for a in np.logspace(-4, 4, 17))
#: Ranks searched by ``rank='auto'`` (capped by the training genes and spots).
RANK_CANDIDATES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20)
#: Held-out groups with fewer spots do not choose penalties (they still train).
MIN_GROUP_SPOTS = 3
#: Floor of a training gene's standard deviation (log-expression units) in the map's targets.
SD_FLOOR = 1e-3
#: Above this many spots without sections, the image penalty is chosen on a random subset (memory of GCV).
GCV_MAX_SPOTS = 100_000


def ridge_per_output(
    z: np.ndarray, y: np.ndarray, groups: np.ndarray | None, alphas=IMAGE_ALPHAS, random_state: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge of every column of ``y`` on ``z`` with its own penalty; returns ``(coef (d, m), intercept (m,), alphas)``.

    The penalty of each output minimises its squared error on held-out groups (leave-one-group-out, closed form
    over every alpha from one SVD per fold) when ``groups`` has two or more groups of ``MIN_GROUP_SPOTS`` spots,
    else sklearn's efficient leave-one-out (``RidgeCV(alpha_per_target=True)``), on a random subset of
    ``GCV_MAX_SPOTS`` spots when there are more.
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64)
    labels = []
    if groups is not None:
        groups = np.asarray(groups)
        labels = [g for g in dict.fromkeys(groups.tolist()) if (groups == g).sum() >= MIN_GROUP_SPOTS]
    if len(labels) >= 2:
        err = np.zeros((len(alphas), y.shape[1]))
        for g in labels:
            tr, te = groups != g, groups == g
            zm, ym = z[tr].mean(0), y[tr].mean(0)
            u, sv, vt = np.linalg.svd(z[tr] - zm, full_matrices=False)
            uty = u.T @ (y[tr] - ym)
            zte = (z[te] - zm) @ vt.T
            for i, a in enumerate(alphas):
                pred = ym + zte @ ((sv / (sv**2 + a))[:, None] * uty)
                err[i] += ((pred - y[te]) ** 2).sum(0)
        chosen = alphas[err.argmin(0)]
    else:
        from sklearn.linear_model import RidgeCV

        zs, ys = z, y
        if len(z) > GCV_MAX_SPOTS:
            keep = np.sort(np.random.default_rng(random_state).choice(len(z), GCV_MAX_SPOTS, replace=False))
            zs, ys = z[keep], y[keep]
        chosen = np.atleast_1d(RidgeCV(alphas=alphas, alpha_per_target=True).fit(zs, ys).alpha_).astype(np.float64)
        chosen = np.broadcast_to(chosen, (y.shape[1],)).copy()
    zm, ym = z.mean(0), y.mean(0)
    u, sv, vt = np.linalg.svd(z - zm, full_matrices=False)
    uty = u.T @ (y - ym)
    coef = vt.T @ ((sv[:, None] / (sv[:, None] ** 2 + chosen[None, :])) * uty)
    return coef, ym - zm @ coef, chosen


def embedding_inputs(table: np.ndarray, seen_rows: np.ndarray) -> np.ndarray:
    """Centre an embedding table on its training genes and scale it to unit mean squared norm over them.

    One scale for all dimensions keeps their relative weight (a co-expression embedding's leading dimensions carry
    its singular values), and makes the penalties of the map comparable across tables.
    """
    table = np.asarray(table, dtype=np.float64)
    seen = table[seen_rows]
    mu = seen.mean(0)
    scale = np.sqrt(((seen - mu) ** 2).sum(1).mean())
    return (table - mu) / (scale if scale > 1e-12 else 1.0)


def embedding_map(x_seen: np.ndarray, targets: np.ndarray, x_new: np.ndarray, alphas=MAP_ALPHAS):
    """Ridge from gene inputs to per-gene targets, learned on the training genes; returns ``(pred, alphas)``.

    One penalty per target, chosen by efficient leave-one-gene-out (sklearn's ``RidgeCV``, GCV).
    """
    from sklearn.linear_model import RidgeCV

    m = RidgeCV(alphas=np.asarray(alphas), alpha_per_target=True).fit(x_seen, targets)
    return m.predict(x_new).reshape(len(x_new), -1), np.atleast_1d(m.alpha_).astype(float)


@dataclass
class AxesFit:
    """One fitted expression-axes model (numpy): image ridge to ``k`` axis scores, gene loadings and levels."""

    coef: np.ndarray  # (d, k) on the standardised (PCA) features
    intercept: np.ndarray  # (k,)
    image_alphas: np.ndarray  # (k,)
    loadings: np.ndarray  # (n_target_genes, k)
    levels: np.ndarray  # (n_target_genes,)
    map_alphas: np.ndarray  # (k + 2,) loadings per sd, level, log sd (empty when no gene is mapped)
    mean: np.ndarray  # (n_seen,) training mean of the training genes
    axes: np.ndarray  # (n_seen, k)

    def scores(self, z: np.ndarray) -> np.ndarray:
        """Image-predicted axis scores ``(n, k)``."""
        return np.asarray(z, dtype=np.float64) @ self.coef + self.intercept

    def predict(self, z: np.ndarray, rank: int | None = None) -> np.ndarray:
        """Predicted expression of the target genes ``(n, n_target_genes)`` with the first ``rank`` axes."""
        k = self.coef.shape[1] if rank is None else int(rank)
        return self.levels + self.scores(z)[:, :k] @ self.loadings[:, :k].T


def fit_axes(
    z: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None,
    inputs: np.ndarray | None,
    seen_rows: np.ndarray | None,
    target_rows: np.ndarray | None,
    *,
    rank: int,
    image_alphas=IMAGE_ALPHAS,
    map_alphas=MAP_ALPHAS,
    random_state: int = 0,
) -> AxesFit:
    """Fit the model on training spots: features ``z``, expression ``y`` of the training genes, sections ``groups``.

    ``inputs`` are the gene inputs (:func:`embedding_inputs`) of a table whose rows ``seen_rows`` are the training
    genes (in ``y``'s column order) and ``target_rows`` the genes to predict through the map. ``inputs=None``:
    the targets are the training genes with their own loadings and means (no map).
    """
    y = np.asarray(y, dtype=np.float64)
    mean, axes = expression_axes(y, rank)
    scores = (y - mean) @ axes
    coef, intercept, a_img = ridge_per_output(z, scores, groups, image_alphas, random_state)
    if inputs is None:
        return AxesFit(coef, intercept, a_img, axes, mean, np.zeros(0), mean, axes)
    loadings, levels, a_map = map_genes(axes, mean, y.std(0), inputs, seen_rows, target_rows, map_alphas)
    return AxesFit(coef, intercept, a_img, loadings, levels, a_map, mean, axes)


def map_genes(axes, mean, sd, inputs, seen_rows, target_rows, map_alphas=MAP_ALPHAS):
    """Map gene inputs to loadings ``(n_target, k)``, levels and the map's penalties (:func:`fit_axes`' gene side).

    The map learns each training gene's loadings per unit of its standard deviation ``sd`` (every gene weighs the
    same, as in a mean per-gene Pearson), its mean and its log standard deviation (the scale, for the level).
    """
    sd = np.maximum(np.asarray(sd, dtype=np.float64), SD_FLOOR)
    targets = np.concatenate([axes / sd[:, None], mean[:, None], np.log(sd)[:, None]], axis=1)
    pred, a_map = embedding_map(inputs[seen_rows], targets, inputs[target_rows], map_alphas)
    k = axes.shape[1]
    return pred[:, :k] * np.exp(pred[:, k + 1])[:, None], pred[:, k], a_map


def max_rank(n_spots: int, n_genes: int) -> int:
    """Return the largest rank the data allow (axes of ``n_spots`` spots and ``n_genes`` genes)."""
    return int(max(1, min(n_spots - 1, n_genes - 1)))
