"""Zero-shot expression prediction: genes never trained on, predicted from gene embeddings.

Two forms of :class:`ZeroshotModel` (``config['form']``):

- ``'axes'`` (:class:`ZeroshotAxesNet`, the default of :func:`histoexp.tl.fit_zeroshot`): the image predicts the
  scores of the top ``k`` principal axes of the training expression; every gene of the embedding table has its
  loadings on those axes and a mean level (a training gene its own, any other gene read from its embedding by a
  map learned on the training genes), stored as buffers; ``y[s, g] = level_g + scores(x_s) · loadings_g``;
- ``'neural'`` (:class:`ZeroshotNet`), described below.

SGN (Yang et al., MICCAI 2024) predicts a gene at a spot as the dot product of the spot's image embedding
and a projection of the gene's embedding, so any gene with an embedding can be predicted. The Deep
Association Multimodal Learning paper (Zhou et al., MICCAI 2025) adds three parts, each an option here:

- a *pathology-guided gene prompter* (``prompter_layers``): each gene's token is refined by cross-attention
  to tokens of the spot's image features, iteratively (one residual attention block per layer);
- an *adaptive semantic interaction graph* (``graph_k``): each gene attends to the ``graph_k`` training genes
  whose embeddings are most similar (cosine), never to itself, so an unseen gene borrows from its seen
  neighbours in the same way a seen gene learned to;
- *nuclei-aware image features* (``nuclei_dim``): the global image features attend to tokens of nuclei
  statistics (e.g. the handcrafted encoder's nuclei/haematoxylin features, or any obsm) before the head.

Prediction ``y[s, g] = h(x_s) · t_g(s) + b(e_g)`` with ``t_g`` the (refined) gene token and ``b`` a bias read
from the embedding. :class:`ZeroshotModel` is a regression model of the platform that keeps the gene-embedding
table it may use, so :meth:`ZeroshotModel.predictable` accepts any gene with a stored embedding.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .base import RegressionModel, register_model
from .heads import FeatureInput

__all__ = ["ZeroshotAxesNet", "ZeroshotModel", "ZeroshotNet", "zeroshot_loss"]


def zeroshot_loss(pred: torch.Tensor, target: torch.Tensor, pcc_weight: float = 0.5) -> torch.Tensor:
    """SGN's loss: ``MSE + pcc_weight · (1 − mean per-gene Pearson correlation over the batch's spots)``."""
    pred, target = pred.float(), target.float()
    mse = F.mse_loss(pred, target)
    if pcc_weight == 0 or pred.shape[0] < 2:
        return mse
    p = pred - pred.mean(0, keepdim=True)
    t = target - target.mean(0, keepdim=True)
    r = (p * t).sum(0) / (p.norm(dim=0) * t.norm(dim=0) + 1e-8)
    return mse + pcc_weight * (1 - r.mean())


class _Mlp(nn.Sequential):
    def __init__(self, in_dim: int, out_dim: int, hidden: int, dropout: float) -> None:
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class _CrossAttention(nn.Module):
    """Residual single-head attention of queries ``(..., q, d)`` over keys ``(..., k, d)``.

    No normalisation after the residual: the prediction is a dot product of the image embedding and the gene
    token, and a LayerNorm on both sides (graph and nuclei parts together) started training from predictions
    about ``√dim`` times too large; on her2st that combination trained to half the correlation of either part.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.scale = 1 / math.sqrt(dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # the query and output maps are moved to the (few) context tokens: q(x)·k = x·(k W_q) + b_q·k, and
        # o(Σ a v) = Σ a o(v) as the weights sum to 1. Same result, but the many queries (every spot × gene
        # in the prompter) skip two d×d products.
        k = self.k(ctx)
        att = (x @ (k @ self.q.weight).transpose(-1, -2) + (k @ self.q.bias).unsqueeze(-2)) * self.scale
        if bias is not None:
            att = att + bias
        return x + att.softmax(-1) @ self.o(self.v(ctx))


class _Prompter(nn.Module):
    """Pathology-guided gene prompter: gene tokens refined by cross-attention to a spot's image tokens.

    Layer ``l`` updates every gene token at every spot, ``g_l = g_{l-1} + Σ_t a_l[t] · o(v(c_t))`` with
    ``a_l = softmax(q(g_{l-1}) · k(c) / √d)`` over the spot's image tokens ``c``. Without a normalisation between
    layers everything the prediction needs is linear in the tokens, so the per-spot tokens ``(spots, genes, d)``
    are never materialised: scores and the final dot product with the image embedding are computed from the
    ``(spots, genes, tokens)`` attention weights. Same function, a fraction of the memory and time.
    """

    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({n: nn.Linear(dim, dim) for n in ("q", "k", "v", "o")}) for _ in range(n_layers)
        )
        self.scale = 1 / math.sqrt(dim)

    def forward(self, t: torch.Tensor, ctx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``Σ_l Σ_t a_l · (o(v(c_t)) · h)``: the prompter's contribution ``(B, G)`` to ``h · g_L``."""
        attn, values = [], []  # a_l (B, G, m) and o(v(c)) (B, m, d) of the layers so far
        out = torch.zeros(len(h), len(t), device=h.device, dtype=h.dtype)
        for layer in self.layers:
            k = layer["k"](ctx)
            kq = k @ layer["q"].weight  # q(g)·k = g·(k W_q) + b_q·k
            score = torch.einsum("gd,bmd->bgm", t, kq) + (k @ layer["q"].bias)[:, None, :]
            for a, vo in zip(attn, values, strict=True):  # the earlier layers' updates of g
                score = score + a @ (vo @ kq.transpose(1, 2))
            a = (score * self.scale).softmax(-1)
            vo = layer["o"](layer["v"](ctx))  # o(Σ a v) = Σ a o(v): the weights sum to 1
            out = out + (a * (vo @ h[:, :, None]).transpose(1, 2)).sum(-1)
            attn.append(a)
            values.append(vo)
        return out


class ZeroshotNet(nn.Module):
    """Image branch, gene branch and the optional Deep-association parts (see the module docs).

    Parameters
    ----------
    feature_dim
        Width of the frozen image features.
    embedding_dim
        Width of the gene embeddings.
    seen_embeddings
        ``(n_seen, embedding_dim)`` embeddings of the training genes (a buffer: the graph's neighbour pool).
    dim
        Width of the joint space.
    n_pcs
        Whitened principal components of the frozen features (``None``: standardised features as they are).
    dropout
        Dropout in the MLPs.
    prompter_layers, image_tokens
        Gene prompter: cross-attention layers, and image tokens the spot's features are projected to.
    graph_k
        Gene-interaction graph: neighbours per gene (0: off).
    nuclei_dim, nuclei_tokens
        Nuclei-aware features: width of the nuclei features (0: off), split into ``nuclei_tokens`` tokens.
    """

    def __init__(
        self,
        feature_dim: int,
        embedding_dim: int,
        seen_embeddings: np.ndarray | torch.Tensor,
        *,
        dim: int = 64,
        n_pcs: int | None = None,
        dropout: float = 0.1,
        prompter_layers: int = 0,
        image_tokens: int = 4,
        graph_k: int = 0,
        nuclei_dim: int = 0,
        nuclei_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.dim = int(dim)
        self.features = FeatureInput(feature_dim, n_pcs, whiten=True)
        self.image_head = _Mlp(self.features.out_dim, dim, 2 * dim, dropout)
        self.register_buffer("emb_mean", torch.zeros(embedding_dim))
        self.register_buffer("emb_std", torch.ones(embedding_dim))
        self.register_buffer("seen", torch.as_tensor(np.asarray(seen_embeddings, dtype=np.float32)))
        self.gene_head = _Mlp(embedding_dim, dim, 2 * dim, dropout)
        self.gene_bias = nn.Linear(embedding_dim, 1)
        self.nuclei_dim, self.nuclei_tokens = int(nuclei_dim), int(nuclei_tokens)
        if self.nuclei_dim:
            if self.nuclei_dim % self.nuclei_tokens:
                raise ValueError(f"`nuclei_tokens` must divide the {nuclei_dim} nuclei features.")
            self.nuclei_input = FeatureInput(self.nuclei_dim, None)
            self.nuclei_embed = nn.Linear(self.nuclei_dim // self.nuclei_tokens, dim)
            self.nuclei_pos = nn.Parameter(torch.zeros(self.nuclei_tokens, dim))
            self.nuclei_attn = _CrossAttention(dim)
        self.graph_k = int(graph_k)
        if self.graph_k:
            self.graph_attn = _CrossAttention(dim)
            self.graph_sim_scale = nn.Parameter(torch.tensor(1.0))
        self.image_tokens = int(image_tokens)
        self.prompter_layers = int(prompter_layers)
        if self.prompter_layers:
            self.prompter = _Prompter(dim, self.prompter_layers)
            self.token_proj = nn.Linear(dim, self.image_tokens * dim)

    @torch.no_grad()
    def fit_inputs(self, feats: np.ndarray, table: np.ndarray, nuclei: np.ndarray | None = None, random_state=0):
        """Set the standardisation of image features (and PCA), nuclei features and gene embeddings."""
        self.features.fit(feats, random_state=random_state)
        if self.nuclei_dim:
            self.nuclei_input.fit(nuclei)
        table = np.asarray(table, dtype=np.float64)
        sd = table.std(0)
        sd[sd < 1e-8] = 1.0
        self.emb_mean.copy_(torch.from_numpy(table.mean(0)))
        self.emb_std.copy_(torch.from_numpy(sd))
        return self

    # -- branches ---------------------------------------------------------------------------------
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Spot embedding ``(B, dim)`` from frozen features ``(B, feature_dim [+ nuclei_dim])``."""
        if self.nuclei_dim:
            x, nuc = x[:, : -self.nuclei_dim], x[:, -self.nuclei_dim :]
        h = self.image_head(self.features(x))
        if self.nuclei_dim:
            z = self.nuclei_input(nuc).reshape(len(nuc), self.nuclei_tokens, -1)
            tokens = self.nuclei_embed(z) + self.nuclei_pos
            h = self.nuclei_attn(h[:, None], tokens)[:, 0]
        return h

    def gene_tokens(self, emb: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Gene tokens ``(G, dim)``; with the graph, refined by attention over similar training genes.

        ``exclude[i]``: the position of gene ``i`` among the training genes (``-1``: not one), never its own
        neighbour.
        """
        z = (emb.float() - self.emb_mean) / self.emb_std
        t = self.gene_head(z)
        if not self.graph_k:
            return t
        pool = self.gene_head((self.seen - self.emb_mean) / self.emb_std)
        sim = F.normalize(emb.float(), dim=1) @ F.normalize(self.seen, dim=1).T  # raw-embedding cosine
        if exclude is not None:
            rows = torch.nonzero(exclude >= 0).flatten()
            sim[rows, exclude[rows]] = -torch.inf
        k = min(self.graph_k, self.seen.shape[0] - 1)
        top, idx = sim.topk(k, dim=1)
        return self.graph_attn(t[:, None], pool[idx], bias=(self.graph_sim_scale * top)[:, None])[:, 0]

    def forward(self, x: torch.Tensor, emb: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted expression ``(B, G)`` of the genes with embeddings ``emb`` ``(G, embedding_dim)``."""
        h = self.encode_image(x)
        t = self.gene_tokens(emb, exclude)
        bias = self.gene_bias((emb.float() - self.emb_mean) / self.emb_std)[:, 0]
        out = h @ t.T + bias
        if self.prompter_layers:
            ctx = self.token_proj(h).reshape(len(h), self.image_tokens, self.dim)  # (B, m, d)
            out = out + self.prompter(t, ctx, h)
        return out


class ZeroshotAxesNet(nn.Module):
    """Expression-axes zero-shot network: image -> ``rank`` axis scores; per-gene loadings and levels as buffers.

    Parameters
    ----------
    feature_dim
        Width of the frozen image features.
    n_genes
        Rows of the gene tables (every gene of the model's embedding table).
    rank
        Number of expression axes.
    n_pcs
        Principal components of the standardised features the ridge reads (``None``: all features).
    """

    def __init__(self, feature_dim: int, n_genes: int, rank: int, n_pcs: int | None = None) -> None:
        super().__init__()
        self.features = FeatureInput(feature_dim, n_pcs, whiten=False)
        self.scores = nn.Linear(self.features.out_dim, rank)
        self.register_buffer("loadings", torch.zeros(n_genes, rank))
        self.register_buffer("levels", torch.zeros(n_genes))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted axis scores ``(B, rank)`` from frozen features ``(B, feature_dim)``."""
        return self.scores(self.features(x))

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Predicted expression ``(B, G)`` of the genes in table rows ``rows``."""
        return self.levels[rows] + self.encode_image(x) @ self.loadings[rows].T


@register_model
class ZeroshotModel(RegressionModel):
    """A zero-shot regression model (:func:`histoexp.tl.fit_zeroshot`): predicts any gene with a stored embedding.

    ``arrays['gene_embeddings']`` holds the gene-embedding table (genes in ``config['embedding_genes']``); the
    training genes are ``config['genes']``.
    """

    method = "zeroshot"

    @classmethod
    def build_net(cls, config: dict, encoder: nn.Module | None = None) -> ZeroshotNet | ZeroshotAxesNet:  # noqa: D102
        if encoder is not None:
            raise ValueError("The zero-shot model reads frozen features only.")
        if config.get("form", "neural") == "axes":
            return ZeroshotAxesNet(
                config["feature_dim"], len(config["embedding_genes"]), config["axes_rank"], config.get("n_pcs")
            )
        n_seen = len(config["genes"])
        return ZeroshotNet(
            config["feature_dim"] - config.get("nuclei_dim", 0),
            config["embedding_dim"],
            np.zeros((n_seen, config["embedding_dim"]), dtype=np.float32),  # the buffer is filled from the weights
            dim=config["dim"],
            n_pcs=config.get("n_pcs"),
            dropout=config["dropout"],
            prompter_layers=config["prompter_layers"],
            image_tokens=config["image_tokens"],
            graph_k=config["graph_k"],
            nuclei_dim=config.get("nuclei_dim", 0),
            nuclei_tokens=config.get("nuclei_tokens", 1),
        )

    # -- genes -------------------------------------------------------------------------------------
    @property
    def embedding_genes(self) -> list[str]:
        """Genes with an embedding in the model's table (the genes it can predict)."""
        return list(self.config["embedding_genes"])

    @property
    def gene_embeddings(self) -> pd.DataFrame:
        """The model's gene-embedding table (genes × dims)."""
        return pd.DataFrame(self.arrays["gene_embeddings"], index=pd.Index(self.embedding_genes, name="gene"))

    def predictable(self, genes: list[str]) -> list[str]:
        """Return the genes of ``genes`` without an embedding in the model's table (those cannot be predicted)."""
        known = set(self.embedding_genes)
        return [g for g in genes if g not in known]

    def _unpredictable(self) -> str:
        return (
            f"they have no embedding in the model's gene-embedding table ({len(self.embedding_genes)} genes, "
            "model.embedding_genes); fit with a table that embeds them (hx.pp.gene_embeddings)."
        )

    @property
    def form(self) -> str:
        """``'axes'`` (expression axes, the default of :func:`histoexp.tl.fit_zeroshot`) or ``'neural'`` (SGN)."""
        return str(self.config.get("form", "neural"))

    def _repr_extra(self) -> str:
        parts = [f"form={self.form!r}", f"{len(self.embedding_genes)} genes with embeddings"]
        if self.form == "axes":
            parts.append(f"rank={self.config['axes_rank']}")
        if self.config.get("shuffle_embeddings"):
            parts.append("SHUFFLED embeddings (control)")
        for name in ("prompter_layers", "graph_k", "nuclei_dim"):
            if self.config.get(name):
                parts.append(f"{name}={self.config[name]}")
        return ", " + ", ".join(parts)

    def expected_for(self, genes: list[str]):
        """Return the expected accuracy of ``genes``: training genes from section cross-fitting, others from zero-shot.

        A gene outside the training genes gets the mean, over its ``config['crossfit']['neighbours']`` nearest
        training genes in the embedding table (cosine), of their accuracy when they were held out of training
        (gene-fold cross-fitting, ``arrays['zeroshot_pcc']``, ``arrays['zeroshot_pcc_specific']``: genes x
        held-out sections). ``expected_pcc_control`` is the same mean for the shuffled-embedding control
        (``arrays['zeroshot_pcc_control']``): what the gene's map would score knowing nothing about the gene. Such
        a gene is ``expected_specific`` when its neighbours' PCC is ahead of the control's by at least
        ``specific_min`` on average and in every held-out section (a one-axis gene-specific r is not used here:
        the control keeps a high one from the patterns most genes share). Models saved without the control's
        table apply the training genes' rule to ``expected_pcc_specific``.
        """
        base = super().expected_for(genes)
        zs_pcc, zs_spec = self.arrays.get("zeroshot_pcc"), self.arrays.get("zeroshot_pcc_specific")
        zs_ctrl = self.arrays.get("zeroshot_pcc_control")
        if base is None or zs_pcc is None or zs_spec is None:
            return base
        if zs_ctrl is not None:
            base["expected_pcc_control"] = np.nan
        trained = set(self.genes)
        others = [g for g in genes if g not in trained and g in set(self.embedding_genes)]
        if not others:
            return base
        from .._expected import SPECIFIC_MIN

        table = self.gene_embeddings
        train = table.loc[self.genes].to_numpy(dtype=np.float64)
        query = table.loc[others].to_numpy(dtype=np.float64)
        train /= np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
        query /= np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
        k = int(min((self.config.get("crossfit") or {}).get("neighbours", 10), len(self.genes)))
        nearest = np.argsort(-(query @ train.T), axis=1, kind="stable")[:, :k]
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: neighbours constant in every fold
            pcc = np.nanmean(np.asarray(zs_pcc, dtype=np.float64)[nearest], axis=1)  # (genes, folds)
            spec = np.nanmean(np.asarray(zs_spec, dtype=np.float64)[nearest], axis=1)
            rule = (self.config.get("crossfit") or {}).get("specific_min", SPECIFIC_MIN)
            values = {
                "expected_pcc": np.nanmean(pcc, 1),
                "expected_pcc_sd": np.nanstd(pcc, 1),
                "expected_pcc_specific": np.nanmean(spec, 1),
                "expected_pcc_specific_sd": np.nanstd(spec, 1),
                "expected_specific": (np.nanmean(spec, 1) >= rule) & (np.nanmin(spec, 1) > 0),
            }
            if zs_ctrl is not None:
                ctrl = np.nanmean(np.asarray(zs_ctrl, dtype=np.float64)[nearest], axis=1)
                margin = pcc - ctrl
                values["expected_pcc_control"] = np.nanmean(ctrl, 1)
                values["expected_specific"] = (np.nanmean(margin, 1) >= rule) & (np.nanmin(margin, 1) > 0)
        out = base.copy()
        for col, v in values.items():
            if col in out:
                out.loc[others, col] = v
        return out

    def _check_loaded(self, path) -> None:
        table = self.arrays.get("gene_embeddings")
        if table is None or table.shape != (len(self.embedding_genes), self.config["embedding_dim"]):
            raise ValueError(f"{path}: the gene-embedding table does not match config.json.")

    # -- prediction --------------------------------------------------------------------------------
    def predict(
        self, images, *, genes: list[str] | None = None, batch_size: int = 256, device=None, member: int | None = None
    ) -> np.ndarray:
        """Predicted expression ``(n, len(genes))`` of any genes with a stored embedding (default: training genes).

        Raises
        ------
        KeyError
            A gene has no embedding in the model's table (it is never predicted from a zero vector).
        """
        genes = self.genes if genes is None else list(genes)
        unknown = self.predictable(genes)
        if unknown:
            raise KeyError(
                f"{len(unknown)} of {len(genes)} genes have no embedding in this zero-shot model's table "
                f"(e.g. {unknown[:5]}); refit with `gene_embeddings=` covering them (hx.pp.gene_embeddings)."
            )
        row = {g: i for i, g in enumerate(self.embedding_genes)}
        if self.form == "axes":
            rows = torch.as_tensor([row[g] for g in genes], dtype=torch.long)
            outs = self._run_images(
                lambda net, x: net(x, rows.to(x.device)),
                images,
                member=member,
                batch_size=batch_size,
                device=device,
                desc="prediction",
            )
            return outs[0] if len(outs) == 1 else np.mean(outs, axis=0).astype(np.float32)
        emb = torch.as_tensor(self.arrays["gene_embeddings"][[row[g] for g in genes]], dtype=torch.float32)
        seen = {g: i for i, g in enumerate(self.genes)}
        exclude = torch.as_tensor([seen.get(g, -1) for g in genes], dtype=torch.long)
        outs = self._run_images(
            lambda net, x: net(x, emb.to(x.device), exclude.to(x.device)),
            images,
            member=member,
            batch_size=batch_size,
            device=device,
            desc="prediction",
        )
        return np.mean(outs, axis=0).astype(np.float32) if len(outs) > 1 else outs[0]
