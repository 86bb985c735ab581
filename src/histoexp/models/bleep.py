"""BLEEP (Xie et al. 2023): bi-modal contrastive learning of H&E images and spot expression.

Modules: :class:`ProjectionHead` (BLEEP's head), :func:`bleep_loss` (BLEEP's soft-target symmetric
cross-entropy), :class:`BleepNet` (image encoder or frozen features -> image head; expression ->
expression head) and :class:`BleepModel`, the handle returned by ``hx.tl.fit_bleep`` with
``save``/``load`` (safetensors + JSON) and the encoders used by ``hx.tl.impute``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _io

__all__ = ["BleepModel", "BleepNet", "ProjectionHead", "augment_dihedral", "bleep_loss"]


class ProjectionHead(nn.Module):
    """BLEEP's projection head: ``LayerNorm(W2 · GELU(W1 x) (dropout) + W1 x)``.

    Parameters
    ----------
    in_dim
        Input dimension (image feature dimension, or number of genes for the expression head).
    projection_dim
        Output dimension (BLEEP: 256).
    dropout
        Dropout after the second linear layer (BLEEP: 0.1).
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
        Trainable image encoder ``(B, 3, S, S) -> (B, feature_dim)``; ``None`` for frozen features.
        With frozen features the input is standardised with the buffers ``feature_mean`` /
        ``feature_std`` (set from the training spots by ``fit_bleep``; saved with the weights).
    n_pcs
        Frozen features only: after standardisation, project onto ``n_pcs`` principal components
        (buffer ``feature_components``, ``(feature_dim, n_pcs)``) and scale each to unit variance
        (buffer ``pc_std``); the image head then reads ``n_pcs`` inputs. ``None``: no projection.
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
        if n_pcs is not None and (encoder is not None or not 1 <= n_pcs <= feature_dim):
            raise ValueError(f"`n_pcs` must be in [1, {feature_dim}] and needs frozen features, got {n_pcs}.")
        self.encoder = encoder
        self.n_pcs = n_pcs
        self.image_projection = ProjectionHead(feature_dim if n_pcs is None else n_pcs, projection_dim, dropout)
        self.spot_projection = ProjectionHead(n_genes, projection_dim, dropout)
        self.temperature = float(temperature)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        if n_pcs is not None:
            self.register_buffer("feature_components", torch.zeros(feature_dim, n_pcs))
            self.register_buffer("pc_std", torch.ones(n_pcs))

    @torch.no_grad()
    def set_feature_statistics(self, feats: np.ndarray) -> None:
        """Set the input standardisation (and the PCA projection when ``n_pcs``) from training features."""
        feats = np.asarray(feats, dtype=np.float64)
        mu, sd = feats.mean(0), feats.std(0)
        sd[sd < 1e-8] = 1.0
        self.feature_mean.copy_(torch.from_numpy(mu))
        self.feature_std.copy_(torch.from_numpy(sd))
        if self.n_pcs is not None:
            z = (feats - mu) / sd
            # PCA: eigenvectors of the covariance of the standardised training features (largest first),
            # signs fixed by the largest loading so that the projection is deterministic
            _, evecs = np.linalg.eigh(z.T @ z / max(len(z) - 1, 1))
            comps = evecs[:, ::-1][:, : self.n_pcs].copy()
            comps *= np.sign(comps[np.abs(comps).argmax(0), np.arange(self.n_pcs)])
            pc_sd = (z @ comps).std(0)
            pc_sd[pc_sd < 1e-8] = 1.0
            self.feature_components.copy_(torch.from_numpy(comps))
            self.pc_std.copy_(torch.from_numpy(pc_sd))

    def image_input(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen features -> standardised (and PCA-projected) input of the image head."""
        x = (x - self.feature_mean) / self.feature_std
        if self.n_pcs is not None:
            x = (x @ self.feature_components) / self.pc_std
        return x

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding from preprocessed patches (with an encoder) or raw frozen features."""
        if self.encoder is not None:
            x = self.encoder(x)
        else:
            x = self.image_input(x)
        return self.image_projection(x.float())

    def encode_expression(self, expr: torch.Tensor) -> torch.Tensor:
        """Expression embedding from log-normalised expression of the model genes."""
        return self.spot_projection(expr)

    def forward(self, image: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        """BLEEP loss of a batch."""
        return bleep_loss(self.encode_image(image), self.encode_expression(expr), self.temperature)


def _iter_batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


class BleepModel:
    """A trained BLEEP model: returned by :func:`histoexp.tl.fit_bleep`, consumed by :func:`histoexp.tl.impute`.

    Attributes
    ----------
    nets
        The :class:`BleepNet` members (in eval mode): one, or several for an ensemble
        (``fit_bleep(n_ensemble=...)``); :attr:`net` is the first.
    config
        JSON-able description: ``method='bleep'``, ``genes``, ``normalize``, ``target_sum``, ``mode``
        (``'frozen'`` or ``'finetune'``), ``use_rep`` and the ``embedding`` record it was computed with,
        ``encoder`` (registry name, weights, encoder config), ``patches`` (geometry), dims,
        ``temperature``, training ``params`` and ``history``.
    reference
        The training expression bank: log-normalised expression of the model genes of every
        training spot, ``(n_spots, n_genes)`` float32 (``None`` when not kept). It is the default
        reference of ``impute`` and is saved as ``reference.safetensors`` (``4 * n_spots * n_genes``
        bytes, e.g. 7.5 MiB for 2,500 spots × 785 genes).
    """

    method = "bleep"

    def __init__(
        self,
        net: BleepNet | list[BleepNet],
        config: dict,
        *,
        reference: np.ndarray | None = None,
        preprocess=None,
    ) -> None:
        nets = [net] if isinstance(net, BleepNet) else list(net)
        if not nets:
            raise ValueError("A BleepModel needs at least one BleepNet.")
        self.nets = [n.eval() for n in nets]
        self.config = dict(config)
        self.config["method"] = self.method
        self.config["n_ensemble"] = len(self.nets)
        self.reference = None if reference is None else np.asarray(reference, dtype=np.float32)
        self.preprocess = preprocess

    # -- description -------------------------------------------------------------------------
    @property
    def net(self) -> BleepNet:
        """The (first) :class:`BleepNet`."""
        return self.nets[0]

    @property
    def n_ensemble(self) -> int:
        """Number of independently trained members (1: plain BLEEP)."""
        return len(self.nets)

    @property
    def genes(self) -> list[str]:
        """Genes of the expression encoder input, in order."""
        return list(self.config["genes"])

    @property
    def mode(self) -> str:
        """``'frozen'`` (features from ``obsm[use_rep]``) or ``'finetune'`` (patches through the encoder)."""
        return self.config["mode"]

    @property
    def use_rep(self) -> str | None:
        """``obsm`` key of the frozen image features (``None`` in finetune mode)."""
        return self.config.get("use_rep")

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(self.net.parameters()).device

    def to(self, device) -> BleepModel:
        """Move the network(s) to ``device`` (in place); returns self."""
        for net in self.nets:
            net.to(device)
        return self

    def __repr__(self) -> str:
        c = self.config
        src = f"obsm[{c.get('use_rep')!r}]" if self.mode == "frozen" else f"patches via {c['encoder'].get('name')!r}"
        return (
            f"BleepModel(mode={self.mode!r}, images from {src}, {len(self.genes)} genes, "
            f"projection_dim={c['projection_dim']}, temperature={c['temperature']}, "
            f"n_ensemble={self.n_ensemble}, "
            f"reference={'none' if self.reference is None else self.reference.shape[0]} spots)"
        )

    # -- encoders ----------------------------------------------------------------------------
    def _members(self, member: int | None) -> list[BleepNet]:
        if member is None:
            return self.nets
        if not -self.n_ensemble <= member < self.n_ensemble:
            raise IndexError(f"`member` must be in [0, {self.n_ensemble}), got {member}.")
        return [self.nets[member]]

    @staticmethod
    def _join(parts: list[np.ndarray]) -> np.ndarray:
        """Join member embeddings: one member as it is, several L2-normalised, concatenated, / sqrt(n).

        The cosine similarity of two joined embeddings is then the mean of the members' cosines.
        """
        if len(parts) == 1:
            return parts[0]
        scale = np.sqrt(len(parts))
        normed = [p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) / scale for p in parts]
        return np.concatenate(normed, axis=1).astype(np.float32)

    def encode_images(
        self, images: Any, *, batch_size: int = 256, device=None, member: int | None = None
    ) -> np.ndarray:
        """Image embeddings ``(n, projection_dim)`` (not L2-normalised).

        An ensemble gives ``(n, n_ensemble * projection_dim)``: the members' L2-normalised embeddings,
        concatenated and divided by ``sqrt(n_ensemble)`` (cosine = mean of the members' cosines);
        ``member=i`` gives member ``i``'s raw embedding.

        Parameters
        ----------
        images
            Frozen mode: features ``(n, feature_dim)`` as computed for ``obsm[use_rep]``.
            Finetune mode: uint8 patches ``(n, px, px, 3)`` or a ``PatchSource`` (anything with
            ``len`` and ``.batch(indices)``).
        batch_size
            Spots per forward pass.
        device
            Device for the computation (``None``: where the weights are).
        member
            Ensemble member (``None``: all, joined as above).
        """
        nets = self._members(member)
        device = self.device if device is None else torch.device(device)
        n = len(images)
        outs = [np.empty((n, self.config["projection_dim"]), dtype=np.float32) for _ in nets]
        with torch.no_grad():
            for net in nets:
                net.to(device).eval()
            for a, b in _iter_batches(n, batch_size):
                if self.mode == "frozen":
                    x = torch.as_tensor(np.asarray(images[a:b], dtype=np.float32), device=device)
                else:
                    idx = np.arange(a, b)
                    raw = images.batch(idx) if hasattr(images, "batch") else np.asarray(images[a:b])
                    x = self._preprocess(torch.as_tensor(np.ascontiguousarray(raw), device=device))
                for net, out in zip(nets, outs, strict=True):
                    out[a:b] = net.encode_image(x).float().cpu().numpy()
        return self._join(outs)

    def encode_expression(
        self, expr: np.ndarray, *, batch_size: int = 4096, device=None, member: int | None = None
    ) -> np.ndarray:
        """Expression embeddings ``(n, projection_dim)`` of log-normalised expression of :attr:`genes`.

        Ensembles and ``member`` as in :meth:`encode_images`.
        """
        expr = np.asarray(expr, dtype=np.float32)
        if expr.ndim != 2 or expr.shape[1] != len(self.genes):
            raise ValueError(f"`expr` must have shape (n, {len(self.genes)}) (the model genes), got {expr.shape}.")
        nets = self._members(member)
        device = self.device if device is None else torch.device(device)
        outs = [np.empty((expr.shape[0], self.config["projection_dim"]), dtype=np.float32) for _ in nets]
        with torch.no_grad():
            for net, out in zip(nets, outs, strict=True):
                net.to(device).eval()
                for a, b in _iter_batches(expr.shape[0], batch_size):
                    out[a:b] = net.encode_expression(torch.as_tensor(expr[a:b], device=device)).float().cpu().numpy()
        return self._join(outs)

    def _preprocess(self, patches: torch.Tensor) -> torch.Tensor:
        if self.preprocess is None:
            raise RuntimeError("This model has no image preprocessing (frozen-feature model).")
        return self.preprocess(patches)

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the model folder: ``config.json``, ``model.safetensors`` and ``reference.safetensors``.

        No pickle: weights and the reference bank are safetensors, everything else JSON.
        """
        if self.n_ensemble == 1:
            tensors = {"model": self.net.state_dict()}
        else:
            tensors = {
                "model": {f"member{i}.{k}": v for i, net in enumerate(self.nets) for k, v in net.state_dict().items()}
            }
        if self.reference is not None:
            tensors["reference"] = {"expression": torch.from_numpy(self.reference)}
        return _io.save_folder(path, config=self.config, tensors=tensors, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device=None) -> BleepModel:
        """Read a model folder written by :meth:`save` (weights read with safetensors only)."""
        config = _io.read_config(path)
        if config.get("method") != cls.method:
            raise ValueError(f"{path} holds a {config.get('method')!r} model, not a BLEEP model.")
        n_members = int(config.get("n_ensemble", 1))
        state = _io.read_tensors(path, "model")
        nets, preprocess = [], None
        for i in range(n_members):
            encoder = None
            if config["mode"] == "finetune":
                from .encoders import get_encoder

                spec = config["encoder"]
                enc = get_encoder(spec.get("key", spec["name"]), weights=None, **spec.get("kwargs", {}))
                encoder, preprocess = enc.module, enc.preprocess
            net = BleepNet(
                config["feature_dim"],
                len(config["genes"]),
                projection_dim=config["projection_dim"],
                dropout=config["dropout"],
                temperature=config["temperature"],
                encoder=encoder,
                n_pcs=config.get("n_pcs"),
            )
            if n_members == 1:
                net.load_state_dict(state)
            else:
                prefix = f"member{i}."
                net.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            nets.append(net)
        reference = None
        if "reference.safetensors" in config.get("files", []):
            reference = _io.read_tensors(path, "reference")["expression"].numpy()
        model = cls(nets, config, reference=reference, preprocess=preprocess)
        if device is not None:
            model.to(device)
        return model
