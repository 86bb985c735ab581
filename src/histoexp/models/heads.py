"""Building blocks shared by the methods: BLEEP's projection head and the frozen-feature input.

:class:`ProjectionHead` is BLEEP's head (mclSTExp reuses it); :class:`FeatureInput` standardises frozen
image features with training statistics and optionally projects them onto principal components (sklearn's
PCA), with everything stored as buffers so that it is saved with the weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["FeatureInput", "ProjectionHead"]


class ProjectionHead(nn.Module):
    """BLEEP's projection head: ``LayerNorm(W2 · GELU(W1 x) (dropout) + W1 x)``.

    Parameters
    ----------
    in_dim
        Input dimension (image feature dimension, or number of genes for the expression head).
    projection_dim
        Output dimension (BLEEP: 256).
    dropout
        Dropout after the second linear layer (BLEEP: 0.1; mclSTExp: 0).
    """

    def __init__(self, in_dim: int, projection_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, projection_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(projection_dim, projection_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        projected = self.projection(x)
        x = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(x + projected)


class FeatureInput(nn.Module):
    """Frozen image features -> standardised (optionally PCA-projected) model input.

    Parameters
    ----------
    feature_dim
        Dimension of the frozen features.
    n_pcs
        Project the standardised features onto their first ``n_pcs`` principal components (computed
        on the training spots by :meth:`fit`). ``None``: no projection.
    whiten
        Scale each component to unit variance (BLEEP's ``n_pcs``); ridge keeps the raw component
        scores, as HEST's ``StandardScaler -> PCA -> Ridge``.
    """

    def __init__(self, feature_dim: int, n_pcs: int | None = None, *, whiten: bool = True) -> None:
        super().__init__()
        if n_pcs is not None and not 1 <= n_pcs <= feature_dim:
            raise ValueError(f"`n_pcs` must be in [1, {feature_dim}], got {n_pcs}.")
        self.feature_dim, self.n_pcs, self.whiten = int(feature_dim), n_pcs, bool(whiten)
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        if n_pcs is not None:
            self.register_buffer("components", torch.zeros(feature_dim, n_pcs))
            self.register_buffer("pc_mean", torch.zeros(n_pcs))
            self.register_buffer("pc_std", torch.ones(n_pcs))

    @property
    def out_dim(self) -> int:
        """Dimension of the output."""
        return self.feature_dim if self.n_pcs is None else self.n_pcs

    @torch.no_grad()
    def fit(self, feats: np.ndarray, random_state: int = 0) -> FeatureInput:
        """Set the standardisation (and the PCA) from the training features; returns self."""
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(f"Features must have shape (n, {self.feature_dim}), got {feats.shape}.")
        mu, sd = feats.mean(0), feats.std(0)
        sd[sd < 1e-8] = 1.0  # constant features stay at 0 instead of dividing by zero
        self.mean.copy_(torch.from_numpy(mu))
        self.std.copy_(torch.from_numpy(sd))
        if self.n_pcs is not None:
            from sklearn.decomposition import PCA

            if self.n_pcs > len(feats):
                raise ValueError(f"`n_pcs={self.n_pcs}` exceeds the {len(feats)} training spots.")
            z = (feats - mu) / sd
            pca = PCA(n_components=self.n_pcs, svd_solver="full", random_state=random_state).fit(z)
            scores = pca.transform(z)
            pc_sd = scores.std(0)
            pc_sd[pc_sd < 1e-8] = 1.0
            self.components.copy_(torch.from_numpy(pca.components_.T.copy()))
            self.pc_mean.copy_(torch.from_numpy(pca.mean_ @ pca.components_.T))
            self.pc_std.copy_(torch.from_numpy(pc_sd if self.whiten else np.ones_like(pc_sd)))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = (x.float() - self.mean) / self.std
        if self.n_pcs is not None:
            x = (x @ self.components - self.pc_mean) / self.pc_std
        return x
