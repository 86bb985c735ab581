"""NH2ST (Qu et al., MICCAI 2025): query and neighbourhood branches, hypergraph, cross-attention, contrast + MSE.

What is specific to NH2ST: :func:`info_nce` (its InfoNCE with down-weighted negatives), :class:`HypergraphConv`
(a small dense hypergraph convolution over the windows of one spot), :class:`CrossFusion` (cross-attention
between image and gene tokens), :class:`NH2STNet` and :class:`NH2STModel`, a regression model of the platform
(:mod:`histoexp.models.base`) returned by ``hx.tl.fit_nh2st``.

Frozen input layout: one row per spot holds the spot's own features (``window_dim``) followed by the
``grid**2`` window features of its neighbourhood (``grid**2 * window_dim``, row-major windows, from
``hx.tl.embed_neighbourhood``); the model's ``extra_reps`` config names that second ``obsm`` key (and
``feature_dim`` is the whole row), so ``hx.tl.impute`` hands the concatenation to :meth:`NH2STNet.predict`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._distributed import gather_batch
from .base import RegressionModel, register_model
from .heads import FeatureInput

__all__ = ["CrossFusion", "HypergraphConv", "NH2STModel", "NH2STNet", "cut_windows", "info_nce", "knn_hypergraph"]


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.05, negative_weight: float = 0.1):
    """InfoNCE between matched rows of ``a`` and ``b`` (L2-normalised), NH2ST's variant.

    ``logits = a @ b.T / temperature`` with the off-diagonal (negative) logits multiplied by
    ``negative_weight`` before the cross-entropy against the diagonal, as NH2ST's public code does.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature
    eye = torch.eye(len(a), device=a.device, dtype=torch.bool)
    logits = torch.where(eye, logits, logits * negative_weight)
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


@torch.no_grad()
def knn_hypergraph(x: torch.Tensor, mask: torch.Tensor | None = None, k: int = 3) -> torch.Tensor:
    """Incidence matrices ``(B, N, N)`` (node i, hyperedge j): node j and its ``k`` most cosine-similar nodes.

    NH2ST builds one hyperedge per window from the window and its 3 most similar windows (self loops
    included). Masked nodes (``mask`` False) belong to no hyperedge and have none.
    """
    b, n, _ = x.shape
    xn = F.normalize(x.float(), dim=-1)
    sim = xn @ xn.transpose(1, 2)
    eye = torch.eye(n, device=x.device, dtype=torch.bool)
    sim = sim.masked_fill(eye, float("-inf"))
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, :], float("-inf"))  # invalid nodes are never picked
    k = min(k, n - 1)
    edges = torch.zeros(b, n, n, device=x.device)  # (B, hyperedge j, node i)
    if k > 0:
        val, idx = sim.topk(k, dim=-1)  # idx[b, j]: the k members of hyperedge j besides j
        edges.scatter_(2, idx, torch.isfinite(val).float())
    inc = edges.transpose(1, 2) + eye.float()  # self loop: node j is in hyperedge j
    if mask is not None:
        m = mask.float()
        inc = inc * m[:, :, None] * m[:, None, :]
    return inc


class HypergraphConv(nn.Module):
    """Dense hypergraph convolution ``D_v^-1 H W D_e^-1 H^T X Θ`` (Feng et al., HGNN; unit hyperedge weights W).

    The few windows of one spot make a dense ``(N, N)`` incidence matrix cheap, so no graph library is needed.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.theta = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor, inc: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.theta(x)
        d_e = inc.sum(1).clamp_min(1.0)  # (B, E) nodes per hyperedge
        d_v = inc.sum(2).clamp_min(1.0)  # (B, N) hyperedges per node
        edge = (inc.transpose(1, 2) @ x) / d_e[..., None]
        return (inc @ edge) / d_v[..., None]


class HGNN(nn.Module):
    """Two hypergraph convolutions with a GELU between and a residual connection (keeps each window's own token)."""

    def __init__(self, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv1, self.conv2 = HypergraphConv(dim, dim), HypergraphConv(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, inc: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.dropout(F.gelu(self.conv1(x, inc))), inc)
        return self.norm(x + h)


class CrossFusion(nn.Module):
    """Cross-attention of one token set on another (multi-head, residual, LayerNorm, MLP), one layer."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``q`` (B, Nq, D) attends to ``kv`` (B, Nk, D); ``kv_mask`` (B, Nk) True where a token exists."""
        pad = None if kv_mask is None else ~kv_mask
        h, _ = self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)
        x = self.norm1(q + h)
        return self.norm2(x + self.mlp(x))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def cut_windows(context: torch.Tensor, grid: int) -> torch.Tensor:
    """Cut ``(B, grid*px, grid*px, C)`` context patches into ``(B, grid**2, px, px, C)`` windows (row-major)."""
    b, h, w, c = context.shape
    if h != w or h % grid:
        raise ValueError(f"Context patches must be square with a side divisible by {grid}, got {tuple(context.shape)}.")
    px = h // grid
    x = context.reshape(b, grid, px, grid, px, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * grid, px, px, c)


def patch_input(patches: torch.Tensor, preprocess, grid: int | None) -> torch.Tensor:
    """uint8 patches -> the input of a fine-tuned :class:`NH2STNet`.

    ``grid`` ``None``: spot patches ``(B, px, px, 3)`` -> ``(B, 3, S, S)``. Otherwise context patches
    ``(B, grid*px, grid*px, 3)`` -> windows ``(B, grid**2, 3, S, S)``, each preprocessed as one patch.
    """
    if grid is None:
        return preprocess(patches)
    win = cut_windows(patches, grid)
    x = preprocess(win.flatten(0, 1))
    return x.reshape(*win.shape[:2], *x.shape[1:])


class NH2STNet(nn.Module):
    """NH2ST's two branches, on frozen features or on patches through a trainable encoder.

    - Image encoder (shared by the spot and its windows): frozen features through
      :class:`~histoexp.models.heads.FeatureInput` (standardised, optionally whitened PCA), or patches through
      the trainable ``encoder``; then Linear -> GELU -> Linear, ``dim`` wide.
    - Gene encoder (spot and neighbour expression): Linear -> GELU -> Linear (the paper: two linear layers).
    - Neighbour branch: the ``grid**2`` window tokens (with ``pool='attention'`` plus a learned embedding of
      each window's place in the grid) -> hypergraph from each window's ``k`` most similar windows plus self
      loops -> :class:`HGNN`;
      the neighbours' expression tokens go through the gene encoder and an HGNN over the same hypergraph,
      restricted to windows holding a spot.
    - Cross-attention (:class:`CrossFusion`) image->gene and gene->image in both branches, for the
      contrastive terms only: on the spot's tokens, and on one token per neighbourhood (the pooled window
      tokens; the mean of the tokens of the windows holding a spot).
    - Pooling of the window tokens into one neighbourhood token: ``'mean'``, or ``'attention'`` (the spot's
      token attends over its window tokens, multi-head attention read-out + LayerNorm, so the spot chooses
      which surroundings matter; without a residual to the spot's token, which drowned the surroundings).
    - Decoder: MLP on the image features only, before any fusion with genes: the spot token concatenated
      with the neighbourhood token (``neighbours=True``), or the spot token alone.

    Parameters
    ----------
    feature_dim
        Width of one window's (and the spot's) features: frozen features, or the encoder's output.
    n_genes
        Number of genes.
    grid
        Windows per side of the neighbourhood (``grid**2`` windows).
    dim, heads, dropout, k
        Token width, attention heads, dropout, hypergraph neighbours.
    n_pcs
        Whitened principal components of the frozen features (``None``: standardised features).
    neighbours, cross_attention
        Switches of the ablation: without the neighbour branch the input is the spot's features only.
    pool
        ``'mean'`` or ``'attention'`` (see above).
    encoder
        Trainable image encoder ``(N, 3, S, S) -> (N, feature_dim)`` (end to end); ``None``: frozen features.
    """

    def __init__(
        self,
        feature_dim: int,
        n_genes: int,
        *,
        grid: int = 5,
        dim: int = 64,
        heads: int = 4,
        dropout: float = 0.1,
        k: int = 3,
        n_pcs: int | None = None,
        neighbours: bool = True,
        cross_attention: bool = True,
        pool: str = "mean",
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if pool not in ("mean", "attention"):
            raise ValueError(f"`pool` must be 'mean' or 'attention', got {pool!r}.")
        if n_pcs is not None and encoder is not None:
            raise ValueError("`n_pcs` applies to frozen features only.")
        self.feature_dim, self.grid, self.k, self.pool = int(feature_dim), int(grid), int(k), pool
        self.use_neighbours, self.use_cross = bool(neighbours), bool(cross_attention)
        self.encoder = encoder
        self.features = None if encoder is not None else FeatureInput(feature_dim, n_pcs, whiten=True)
        in_dim = self.feature_dim if encoder is not None else self.features.out_dim
        self.image_encoder = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.gene_encoder = nn.Sequential(nn.Linear(n_genes, dim), nn.GELU(), nn.Linear(dim, dim))
        if self.use_neighbours:
            self.image_graph, self.gene_graph = HGNN(dim, dropout), HGNN(dim, dropout)
            if pool == "attention":  # the spot attends over its windows, knowing where each lies
                self.window_position = nn.Parameter(torch.zeros(self.grid**2, dim))
                self.pooling = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
                self.pool_norm = nn.LayerNorm(dim)
        if self.use_cross:
            self.cross = CrossFusion(dim, heads, dropout)
        in_dec = 2 * dim if self.use_neighbours else dim
        self.decoder = nn.Sequential(
            nn.LayerNorm(in_dec), nn.Linear(in_dec, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, n_genes)
        )

    @property
    def input_dim(self) -> int:
        """Width of a frozen input row (the spot's features, then the windows' when ``neighbours``)."""
        return self.feature_dim * (1 + self.grid**2 if self.use_neighbours else 1)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.encoder is not None:
            # preprocessed patches: (B, 3, S, S), or with neighbours the windows (B, grid**2, 3, S, S)
            if not self.use_neighbours:
                return self.encoder(x), None
            b, n = x.shape[:2]
            feats = self.encoder(x.flatten(0, 1)).reshape(b, n, -1)
            return feats[:, n // 2], feats  # the centre window is the spot's own patch
        d = self.feature_dim
        own = x[:, :d].float()
        if not self.use_neighbours:
            return own, None
        return own, x[:, d:].float().reshape(len(x), self.grid**2, d)

    def _tokens(self, feats: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(feats if self.features is None else self.features(feats))

    def encode_image(self, x: torch.Tensor):
        """Spot token ``(B, dim)`` and (with neighbours) window tokens ``(B, grid**2, dim)`` after the HGNN."""
        own, win = self._split(x)
        q = self._tokens(own)
        if win is None:
            return q, None, None
        b, n, d = win.shape
        tokens = self._tokens(win.reshape(b * n, d)).reshape(b, n, -1)
        inc = knn_hypergraph(tokens, k=self.k)  # similarity of the windows' content, not of their place
        if self.pool == "attention":
            tokens = tokens + self.window_position
        return q, self.image_graph(tokens, inc), inc

    def _neighbourhood(self, q: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
        if self.pool == "attention":
            # a read-out of the windows only: no residual to the spot's token, which the decoder has already
            h, _ = self.pooling(q[:, None], nb, nb, need_weights=False)
            return self.pool_norm(h[:, 0])
        return nb.mean(1)

    def _decode(self, q: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        return self.decoder(q if ctx is None else torch.cat([q, ctx], dim=-1))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted expression from the image inputs (frozen rows or preprocessed patches)."""
        q, nb, _ = self.encode_image(x)
        return self._decode(q, None if nb is None else self._neighbourhood(q, nb))

    def losses(
        self,
        batch: dict,
        *,
        contrastive: bool = True,
        temperature: float = 0.05,
        negative_weight: float = 0.1,
        neighbour_weight: float = 0.5,
    ) -> dict:
        """Return the terms of a batch: ``mse``, ``query`` and ``neighbour`` InfoNCE, their weighted ``total``."""
        x, expr = batch["image"], batch["expression"]
        q, nb, inc = self.encode_image(x)
        ctx = None if nb is None else self._neighbourhood(q, nb)
        pred = self._decode(q, ctx)
        out = {"mse": F.mse_loss(pred.float(), expr.float())}
        total = out["mse"]
        if contrastive:
            g = self.gene_encoder(expr)
            qi, qg = q[:, None], g[:, None]
            if self.use_cross:
                qi, qg = self.cross(qi, qg), self.cross(qg, qi)
            # under torchrun: the whole global batch as negatives (as one process with the same batch)
            out["query"] = info_nce(gather_batch(qi[:, 0]), gather_batch(qg[:, 0]), temperature, negative_weight)
            total = total + out["query"]
            if nb is not None:
                mask = batch["neighbour_mask"]
                # encode only the windows that hold a spot (about a third on a 200 µm legacy ST grid)
                nexpr = batch["neighbour_expression"]
                ng = q.new_zeros(*mask.shape, q.shape[-1])
                ng[mask] = self.gene_encoder(nexpr[mask]).to(ng.dtype)
                ng = self.gene_graph(ng, inc * mask.float()[:, :, None] * mask.float()[:, None, :])
                # one token per neighbourhood (as the public code, which flattens the graph output before fusing)
                ni, ng = ctx[:, None], _masked_mean(ng, mask)[:, None]
                if self.use_cross:
                    ni, ng = self.cross(ni, ng), self.cross(ng, ni)
                out["neighbour"] = info_nce(
                    gather_batch(ni[:, 0]), gather_batch(ng[:, 0]), temperature, negative_weight
                )
                total = total + neighbour_weight * out["neighbour"]
        out["total"] = total
        return out


@register_model
class NH2STModel(RegressionModel):
    """A trained NH2ST model: returned by :func:`histoexp.tl.fit_nh2st`, used by :func:`histoexp.tl.impute`.

    A :class:`~histoexp.models.base.RegressionModel` whose frozen input is the spot's features
    (``obsm[use_rep]``) followed by its neighbourhood's window features (``obsm[extra_reps[0]]``, from
    :func:`histoexp.tl.embed_neighbourhood`) when trained with the neighbour branch. Fine-tuned end to end, it
    reads each spot's context patch (:meth:`patch_source`) and cuts it into the windows.
    """

    method = "nh2st"

    @classmethod
    def build_net(cls, config: dict, encoder: nn.Module | None = None) -> NH2STNet:  # noqa: D102
        return NH2STNet(
            config["window_dim"],
            len(config["genes"]),
            grid=config["grid"],
            dim=config["dim"],
            heads=config["heads"],
            dropout=config["dropout"],
            k=config["k"],
            n_pcs=config.get("n_pcs"),
            neighbours=config["neighbours"],
            cross_attention=config["cross_attention"],
            pool=config.get("pool", "mean"),
            encoder=encoder,
        )

    def _image_batch(self, batch: dict) -> torch.Tensor:
        if self.mode != "finetune":
            return batch["image"]
        if self.preprocess is None:
            raise RuntimeError("This fine-tuned model has no image preprocessing.")
        return patch_input(batch["image"], self.preprocess, self.config["grid"] if self.config["neighbours"] else None)

    def patch_source(self, adata, patches_key: str | None = None):
        """Return what a fine-tuned model reads of ``adata``: each spot's context patch (``grid`` windows wide).

        The context takes the geometry of the spot patches under ``patches_key`` (default: the training key);
        without the neighbour branch, the spot patches themselves.
        """
        if not self.config["neighbours"]:
            return super().patch_source(adata, patches_key)
        from ..tl._embed import _context_source

        key = patches_key or (self.config.get("patches") or {}).get("key", "patches")
        return _context_source(adata, key, int(self.config["grid"]))[0]

    def _repr_extra(self) -> str:
        c = self.config
        return f", neighbours={c.get('neighbours')}, grid={c.get('grid')}, contrastive={c.get('contrastive')}"
