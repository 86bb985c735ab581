"""Ridge regression on frozen image features: ``fit_ridge``, the baseline every method is compared with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from anndata import AnnData

from ._fit import prepare_fit, write_fit_keys

if TYPE_CHECKING:  # pragma: no cover
    from ..models.ridge import RidgeModel

#: Ridge penalties searched by the inner cross-validation.
ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))


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
    of a split), else efficient leave-one-out (one section; on 100,000 random training spots when there are more,
    e.g. Visium HD bins, as its memory grows as spots x genes several times over). All training spots are used
    for the final fit (no validation split). Deterministic; no torch training loop.

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
    alpha = fit_ridge_net(net, data.images, data.expr, groups=groups, alphas=alphas, random_state=random_state)
    by_section = groups is not None and len(np.unique(groups)) > 1
    cv = "leave-one-section-out" if by_section else "leave-one-out"
    if not by_section and n_spots > LOO_MAX_SPOTS:
        cv = f"leave-one-out on {LOO_MAX_SPOTS} random training spots (seed random_state)"
    params = {"n_pcs": n_pcs, "alpha": alpha, "alpha_cv": cv}
    data.config.update(alpha=alpha, params={**data.params, **params})
    model = RidgeModel(net, data.config)
    write_fit_keys(data, key_added, params=params)
    return model
