"""Ridge regression on frozen image features: ``fit_ridge``, the baseline every method is compared with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from anndata import AnnData

from .._cv import leave_one_section_out
from .._utils import one_progress_bar
from ._crossfit import RANK_CANDIDATES, crossfit_groups, mean_pcc, supports_crossfit
from ._fit import prepare_fit, write_fit_keys

if TYPE_CHECKING:  # pragma: no cover
    from ..models.ridge import RidgeModel

#: Ridge penalties searched by the inner cross-validation.
ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))


def select_alpha_rank(
    z: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    alphas: np.ndarray,
    ranks: list[int | None],
) -> tuple[float, int | None, dict]:
    """Choose ridge's penalty and the output rank jointly by leave-one-group-out, on mean per-gene Pearson.

    For each held-out group: ridge on the other groups' features ``z`` (closed form over every alpha from one SVD)
    predicts the held-out spots; each prediction is projected onto the first ``k`` principal axes of the other
    groups' expression ``y`` (``None``: not projected); the score is the held-out mean per-gene Pearson. Returns
    ``(alpha, rank, scores)`` maximising the mean score over groups (``scores``: ``'alpha|rank'`` -> mean).
    """
    from .._stats import expression_axes

    labels = [g for g in dict.fromkeys(groups.tolist()) if (groups == g).sum() >= 3]
    k_max = max([r for r in ranks if r is not None] + [1])
    total: dict[tuple[float, int | None], list[float]] = {}
    for g in labels:
        tr, te = groups != g, groups == g
        zm, ym = z[tr].mean(0), y[tr].mean(0)
        u, sv, vt = np.linalg.svd(z[tr] - zm, full_matrices=False)
        uty = u.T @ (y[tr] - ym)
        zte = (z[te] - zm) @ vt.T
        mean, axes = expression_axes(y[tr], k_max)
        for alpha in alphas:
            pred = ym + zte @ ((sv / (sv**2 + alpha))[:, None] * uty)
            scores = (pred - mean) @ axes
            for r in ranks:
                if r is not None and r > axes.shape[1]:
                    continue
                p = pred if r is None else mean + scores[:, :r] @ axes[:, :r].T
                total.setdefault((float(alpha), r), []).append(mean_pcc(p, y[te]))
    full = {key: np.mean(v) for key, v in total.items() if len(v) == len(labels)}
    if not full:
        raise ValueError("No held-out group could be scored to choose the ridge penalty and rank.")
    best = max(full, key=lambda key: (full[key], key[1] is None, key[0]))
    return best[0], best[1], {f"{a:g}|{r if r is not None else 'full'}": float(v) for (a, r), v in full.items()}


@one_progress_bar("fit_ridge")
@supports_crossfit(handles_rank=True, inner=lambda model: {"alphas": [model.config["alpha"]]})
def fit_ridge(
    adata: AnnData,
    *,
    genes: Sequence[str] | str | int | None = None,
    layer: str | None = None,
    normalize: Literal["log1p", "none"] = "log1p",
    use_rep: str | None = None,
    encoder: str = "resnet50",
    n_pcs: int | None = 256,
    alphas: Sequence[float] = ALPHAS,
    rank: int | Literal["auto"] | None = None,
    smooth_predictions: float | Literal["auto"] | None = None,
    crossfit: bool | None = None,
    library_key: str | None = None,
    key_added: str = "ridge",
    overwrite: bool = False,
    random_state: int = 0,
) -> RidgeModel:
    """Fit ridge regression of expression on frozen image features (HEST's baseline recipe).

    Standardise the features, project them onto at most ``n_pcs`` principal components (fitted on the
    training spots), then ridge regression to the log-normalised expression of ``genes``. The penalty is
    chosen among ``alphas`` by cross-validation *inside* the training data: leave-one-section-out over
    ``obs[library_key]`` when there are two or more sections (spots of one section are never on both sides
    of a split; sections of fewer than 10 spots, which cannot be scored alone, are held out together or stay
    in training, with a warning), else efficient leave-one-out (one section; on 100,000 random training spots
    when there are more, e.g. Visium HD bins, as its memory grows as spots x genes several times over). All
    training spots are used for the final fit (no validation split). Deterministic; no torch training loop.

    Parameters
    ----------
    adata
        Training spots with counts and frozen image features in ``obsm[use_rep]``.
    genes
        Target genes, resolved by :func:`histoexp.pp.select_genes`.
    layer
        Layer with counts instead of ``X``.
    normalize
        ``'log1p'`` (normalize_total 1e4 + log1p; default) or ``'none'`` (already log-normalised).
    use_rep
        ``obsm`` key of the frozen features (``None``: ``f'X_{encoder}'``).
    encoder
        Encoder name whose ``X_<encoder>`` features are used when ``use_rep`` is ``None``.
    n_pcs
        Maximum number of principal components (HEST: 256), capped by the feature dimension and the
        number of training spots minus one; ``None``: no PCA.
    alphas
        Ridge penalties searched.
    rank
        Reduced-rank outputs: the predictions are projected onto the first ``rank`` principal axes of the training
        expression (the image-predictable part of expression lies on a few axes; predicting every gene freely fits
        noise). ``None``: full rank (HEST's recipe; alpha by ``RidgeCV``'s R²). An integer: that rank. ``'auto'``:
        rank and ``alpha`` chosen jointly by leave-one-section-out inside the training data (spatial blocks of a
        single section), scored on the mean per-gene Pearson of the held-out section, among
        :data:`~histoexp.tl._crossfit.RANK_CANDIDATES` and full rank. ``rank=1`` is the **one-pattern baseline**:
        one image-predicted pattern, every gene = its loading on the training expression's first axis × that
        pattern — put it next to any method to see how much of its accuracy is gene-specific. With an integer
        rank alpha is chosen on the same Pearson score.
    smooth_predictions
        Post-processing weight of each spot's neighbours in :func:`histoexp.tl.impute` (see its ``smooth``):
        ``None`` (off), a number in [0, 1), or ``'auto'`` (chosen on the cross-fitted predictions, 0 included).
    crossfit
        Cross-fit: predict each training section from a ridge fitted on the others (same ``alpha`` and ``rank``),
        and keep in the model each gene's expected Pearson r and gene-specific r on a new section (mean and
        spread over folds) and its out-of-fold residual quantiles (prediction intervals), which
        :func:`histoexp.tl.impute` writes to ``var`` and ``layers``. ``None``: on (for ridge it costs one more
        closed-form fit per section: about a second on her2st). One section: spatial blocks stand in for sections
        (optimistic: no section-to-section batch effect), recorded as the ``unit``.
    library_key
        ``obs`` column of the sections (``None``: ``'library_id'`` when present).
    key_added
        ``uns[key_added]`` receives ``params`` (incl. the chosen ``alpha``) and ``genes``.
    overwrite
        Replace ``uns[key_added]`` when histoexp did not write it (a re-run replaces the keys this function wrote
        without it).
    random_state
        Seed of the PCA solver.

    Returns
    -------
    RidgeModel
        A regression model (:class:`~histoexp.models.ridge.RidgeModel`; ``.save(dir)``,
        :func:`histoexp.tl.load_model`); predict with :func:`histoexp.tl.impute`.
    """
    from ..models.ridge import LOO_MAX_SPOTS, RidgeModel, fit_ridge_net

    alphas = np.asarray(alphas, dtype=float)
    if alphas.ndim != 1 or not len(alphas) or not np.isfinite(alphas).all() or (alphas <= 0).any():
        raise ValueError(f"`alphas` must be a non-empty list of positive numbers, got {alphas!r}.")
    data = prepare_fit(
        adata,
        method="ridge",
        key_added=key_added,
        overwrite=overwrite,
        genes=genes,
        layer=layer,
        normalize=normalize,
        use_rep=use_rep,
        encoder=encoder,
        finetune_encoder=False,
        library_key=library_key,
        val_fraction=0,
        random_state=random_state,
        device="cpu",
        defaults=({}, None),
        hparams={},
    )
    n_feat, n_spots = data.images.shape[1], len(data.train_idx)
    if n_pcs is not None:
        if not isinstance(n_pcs, (int, np.integer)) or n_pcs < 1:
            raise ValueError(f"`n_pcs` must be a positive integer or None, got {n_pcs!r}.")
        n_pcs = int(min(n_pcs, n_feat, n_spots - 1))
    groups = None
    if data.library_key is not None:
        groups = adata.obs[data.library_key].astype(str).to_numpy()
    data.config.update(n_pcs=n_pcs, alphas=alphas.tolist())
    net = RidgeModel.build_net(data.config)
    rank_scores = None
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool) and rank >= len(data.genes):
        rank = None  # as many axes as genes: full rank
    if rank is None or len(alphas) == 1 and rank != "auto":
        alpha = fit_ridge_net(net, data.images, data.expr, groups=groups, alphas=alphas, random_state=random_state)
        splits = leave_one_section_out(groups, warn=False) if groups is not None else None  # what fit_ridge_net used
        by_section = splits is not None and splits.folds is not None
        cv = splits.description if by_section else "leave-one-out"
        if not by_section and n_spots > LOO_MAX_SPOTS:
            cv = f"leave-one-out on {LOO_MAX_SPOTS} random training spots (seed random_state)"
        if len(alphas) == 1:
            cv = "given"
    else:
        folds = crossfit_groups(adata, data.library_key, random_state)
        if folds is None:
            raise ValueError(
                "Choosing alpha for a reduced rank needs two or more sections or spot positions (spatial blocks); "
                "pass one `alphas` value."
            )
        import torch

        net.features.fit(data.images, random_state=random_state)
        with torch.no_grad():
            z = net.features(torch.as_tensor(data.images, dtype=torch.float32)).double().numpy()
        ranks = [None, *RANK_CANDIDATES] if rank == "auto" else [int(rank)]
        ranks = [r for r in ranks if r is None or r < len(data.genes)] or [None]
        alpha, chosen, rank_scores = select_alpha_rank(z, data.expr, folds[0], alphas, ranks)
        fit_ridge_net(net, data.images, data.expr, groups=None, alphas=np.array([alpha]), random_state=random_state)
        cv = f"leave-one-{folds[1]}-out, mean per-gene Pearson" + (", jointly with rank" if rank == "auto" else "")
        rank = chosen
    if rank is not None and not isinstance(rank, str) and rank >= len(data.genes):
        rank = None
    params = {"n_pcs": n_pcs, "alpha": alpha, "alpha_cv": cv}
    if rank_scores is not None:
        params["alpha_rank_scores"] = rank_scores
    data.config.update(alpha=alpha, rank=rank, params={**data.params, **params})
    model = RidgeModel(net, data.config)
    write_fit_keys(data, key_added, params=params)
    return model
