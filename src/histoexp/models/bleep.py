"""BLEEP (Xie et al. 2023): bi-modal contrastive learning of H&E images and spot expression.

What is specific to BLEEP: :func:`bleep_loss` (its soft-target symmetric cross-entropy), :class:`BleepNet`
(image encoder or frozen features -> image head; expression -> expression head, both
:class:`~histoexp.models.heads.ProjectionHead`) and :class:`BleepModel`, a retrieval model of the platform
(:mod:`histoexp.models.base`) returned by ``hx.tl.fit_bleep``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import RetrievalModel, register_model
from .heads import FeatureInput, ProjectionHead

__all__ = ["BleepModel", "BleepNet", "ProjectionHead", "augment_dihedral", "bleep_loss"]


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def bleep_loss(image_emb: torch.Tensor, spot_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BLEEP's contrastive loss with soft targets.

    ``logits = spot @ image.T / temperature``; ``targets = softmax((image @ image.T + spot @ spot.T) / 2
    * temperature)`` (row-wise); loss = mean over the batch of the average of the row-wise
    cross-entropies of ``(logits, targets)`` and ``(logits.T, targets.T)``. The embeddings are used
    as they come out of the heads (LayerNorm output, not L2-normalised), exactly as the reference
    implementation does; the temperature multiplies inside the target softmax, also as there.
    """
    image_emb = image_emb.float()
    spot_emb = spot_emb.float()
    logits = spot_emb @ image_emb.T / temperature
    sim = (image_emb @ image_emb.T + spot_emb @ spot_emb.T) / 2
    targets = F.softmax(sim * temperature, dim=-1)
    spots_loss = _soft_cross_entropy(logits, targets)
    images_loss = _soft_cross_entropy(logits.T, targets.T)
    return ((spots_loss + images_loss) / 2).mean()


def augment_dihedral(patches: torch.Tensor) -> torch.Tensor:
    """Random flips and 90° rotations per patch of a ``(B, H, W, C)`` batch (BLEEP's augmentation).

    Uses the global torch RNG (seeded per epoch by :func:`histoexp.train.fit`). Patches must be square.
    """
    out = patches.clone()
    code = torch.randint(0, 8, (patches.shape[0],))
    for c in range(1, 8):
        sel = (code == c).nonzero().flatten().to(patches.device)
        if sel.numel() == 0:
            continue
        x = patches.index_select(0, sel)
        if c >= 4:
            x = x.flip(2)
        x = torch.rot90(x, c % 4, dims=(1, 2))
        out[sel] = x
    return out


class BleepNet(nn.Module):
    """Image branch and expression branch of BLEEP.

    Parameters
    ----------
    feature_dim
        Dimension of the image features (frozen features, or the encoder output).
    n_genes
        Number of genes of the expression input.
    projection_dim, dropout
        Projection head settings (BLEEP: 256, 0.1).
    temperature
        Contrastive temperature (BLEEP: 1.0).
    encoder
        Trainable image encoder ``(B, 3, S, S) -> (B, feature_dim)``; ``None`` for frozen features, which
        go through :class:`~histoexp.models.heads.FeatureInput` (standardisation with training
        statistics, and ``n_pcs`` whitened principal components when given).
    n_pcs
        Frozen features only: number of principal components (``None``: none).
    """

    def __init__(
        self,
        feature_dim: int,
        n_genes: int,
        *,
        projection_dim: int = 256,
        dropout: float = 0.1,
        temperature: float = 1.0,
        encoder: nn.Module | None = None,
        n_pcs: int | None = None,
    ) -> None:
        super().__init__()
        if n_pcs is not None and encoder is not None:
            raise ValueError("`n_pcs` applies to frozen features only.")
        self.encoder = encoder
        self.features = None if encoder is not None else FeatureInput(feature_dim, n_pcs, whiten=True)
        in_dim = feature_dim if self.features is None else self.features.out_dim
        self.image_projection = ProjectionHead(in_dim, projection_dim, dropout)
        self.spot_projection = ProjectionHead(n_genes, projection_dim, dropout)
        self.temperature = float(temperature)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding from preprocessed patches (with an encoder) or raw frozen features."""
        x = self.encoder(x) if self.encoder is not None else self.features(x)
        return self.image_projection(x.float())

    def encode_expression(self, expr: torch.Tensor) -> torch.Tensor:
        """Expression embedding from log-normalised expression of the model genes."""
        return self.spot_projection(expr)

    def encode_reference(self, batch: dict) -> torch.Tensor:
        """Embed reference spots: BLEEP's spot branch reads expression only."""
        return self.encode_expression(batch["expression"])

    def forward(self, image: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        """BLEEP loss of a batch."""
        return bleep_loss(self.encode_image(image), self.encode_expression(expr), self.temperature)


@register_model
class BleepModel(RetrievalModel):
    """A trained BLEEP model: returned by :func:`histoexp.tl.fit_bleep`, used by :func:`histoexp.tl.impute`.

    A :class:`~histoexp.models.base.RetrievalModel`: ``nets`` are :class:`BleepNet` members,
    ``reference`` the training spots' expression (when kept), ``encode_images`` /
    ``encode_expression`` the two branches. Retrieval defaults as the paper: top 50, plain average.
    """

    method = "bleep"

    @classmethod
    def build_net(cls, config: dict, encoder: nn.Module | None = None) -> BleepNet:  # noqa: D102
        return BleepNet(
            config["feature_dim"],
            len(config["genes"]),
            projection_dim=config["projection_dim"],
            dropout=config["dropout"],
            temperature=config["temperature"],
            encoder=encoder,
            n_pcs=config.get("n_pcs"),
        )
