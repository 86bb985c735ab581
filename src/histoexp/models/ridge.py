"""Ridge regression on frozen image features (HEST's baseline), as a regression model of the platform.

The fitted pipeline (standardise -> PCA -> ridge) is held as torch buffers and one linear layer, so it
saves, loads, ensembles and predicts through the same code as every other model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import RegressionModel, register_model
from .heads import FeatureInput

__all__ = ["RidgeModel", "RidgeNet", "fit_ridge_net"]

#: above this many training spots (one section), alpha is chosen by leave-one-out on this many random ones
LOO_MAX_SPOTS = 100_000


class RidgeNet(nn.Module):
    """``Linear(PCA(standardise(features)))``: HEST's ``StandardScaler -> PCA -> Ridge`` as a module."""

    def __init__(self, feature_dim: int, n_genes: int, n_pcs: int | None) -> None:
        super().__init__()
        self.features = FeatureInput(feature_dim, n_pcs, whiten=False)
        self.linear = nn.Linear(self.features.out_dim, n_genes)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted expression of the training genes."""
        return self.linear(self.features(x))


def fit_ridge_net(
    net: RidgeNet,
    x: np.ndarray,
    y: np.ndarray,
    *,
    groups: np.ndarray | None,
    alphas: np.ndarray,
    random_state: int = 0,
) -> float:
    """Fit ``net`` in closed form on training features ``x`` and targets ``y``; returns the chosen alpha.

    The standardisation and the PCA are fitted on ``x``. ``alpha`` is chosen by sklearn's ``RidgeCV``: with
    two or more ``groups`` (sections) by leave-one-group-out cross-validation (R², averaged over genes), so
    neighbouring spots of one section never sit on both sides of a split (sections of fewer than
    :data:`histoexp._cv.MIN_FOLD_SPOTS` spots are held out together, or stay in training: see
    :func:`histoexp._cv.leave_one_section_out`); otherwise by efficient
    leave-one-out, on a random subset of ``LOO_MAX_SPOTS`` training spots when there are more (its memory grows
    as spots x genes several times over). The inner folds reuse the PCA fitted on all training spots (training
    data only).
    """
    from sklearn.linear_model import Ridge, RidgeCV

    from .._cv import leave_one_section_out

    net.features.fit(x, random_state=random_state)
    with torch.no_grad():
        z = net.features(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    cv = None
    zs, ys = z, y
    # sections too small to be scored alone (one spot: NaN R²) are pooled or kept in training, never NaN folds
    splits = leave_one_section_out(groups, purpose="fit_ridge (alpha)") if groups is not None else None
    if splits is not None and splits.folds is not None:
        cv = splits.folds
    elif len(z) > LOO_MAX_SPOTS:
        # efficient leave-one-out holds several spots x genes float64 arrays (~2.6 GB for 500,000 Visium HD bins
        # x 100 genes): choose alpha on a random subset, fit on all
        keep = np.sort(np.random.default_rng(random_state).choice(len(z), LOO_MAX_SPOTS, replace=False))
        zs, ys = z[keep], y[keep]
    alpha = float(RidgeCV(alphas=alphas, cv=cv).fit(zs, ys).alpha_)
    ridge = Ridge(alpha=alpha).fit(z, y)
    with torch.no_grad():
        net.linear.weight.copy_(torch.as_tensor(np.atleast_2d(ridge.coef_), dtype=torch.float32))
        net.linear.bias.copy_(torch.as_tensor(np.atleast_1d(ridge.intercept_), dtype=torch.float32))
    return alpha


@register_model
class RidgeModel(RegressionModel):
    """Ridge regression of expression on frozen image features (see :func:`histoexp.tl.fit_ridge`)."""

    method = "ridge"

    @classmethod
    def build_net(cls, config: dict, encoder: nn.Module | None = None) -> RidgeNet:  # noqa: D102
        if encoder is not None:
            raise ValueError("Ridge regression reads frozen features only.")
        return RidgeNet(config["feature_dim"], len(config["genes"]), config.get("n_pcs"))

    def _repr_extra(self) -> str:
        return f", alpha={self.config.get('alpha')}, n_pcs={self.config.get('n_pcs')}"
