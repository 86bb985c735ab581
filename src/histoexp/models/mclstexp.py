"""mclSTExp (Min, Shi et al., Briefings in Bioinformatics 2024): spots as words of a spatial "sentence".

What is specific to mclSTExp: the spot branch reads a spot's log-normalised expression plus learnable
embeddings of its grid position (one ``nn.Embedding`` table for x, one for y, added to the expression vector),
runs a small pre-norm transformer over a *sentence* of spots (the spots of one batch attend to each other) and
projects the result with BLEEP's :class:`~histoexp.models.heads.ProjectionHead`; the image branch is frozen
features (or a fine-tuned encoder) through a projection head. The loss is a symmetric CLIP loss with identity
targets (:func:`mclstexp_loss`). :class:`MclstexpModel` is a retrieval model of the platform
(:mod:`histoexp.models.base`) returned by ``hx.tl.fit_mclstexp``.

Grid positions (:func:`spot_positions`, :func:`grid_positions`): the platform's own spot grid when ``obs`` has
it (Visium and ``hx.pp.tile_tissue``: ``array_col``/``array_row``; legacy ST: ``array_x``/``array_y``), else the
pixel positions in ``obsm['spatial']``, turned into integer grid indices per section with the grid step
along each axis (so Visium's hexagonal grid keeps one cell per spot), clipped to the embedding tables.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import ReferenceSpots, RetrievalModel, register_model
from .heads import FeatureInput, ProjectionHead

__all__ = ["MclstexpModel", "MclstexpNet", "grid_positions", "mclstexp_loss", "sentence_order", "spot_positions"]


# ---------------------------------------------------------------------------------------------- positions
#: ``obs`` columns holding a platform's own integer spot grid, as (x, y): Visium / ``tile_tissue``
#: (``array_col`` is doubled on Visium's hexagonal grid, so every spot has its own column), legacy ST.
ARRAY_COLUMNS = (("array_col", "array_row"), ("array_x", "array_y"))


def _grid_units(pos: np.ndarray) -> np.ndarray:
    """Grid step along x and along y of spot positions ``pos`` (``(n, 2)``).

    The spacing is the median distance of a spot to its nearest other spot; along each axis the step is
    the typical smallest non-zero offset between spots at most 1.2 spacings apart (the median of the offsets
    below 1.5 × their 25th percentile). On a square grid both steps are the spacing; on Visium's hexagonal
    grid x steps by half a spacing (rows are offset) and y by 0.87 of it, so no two spots share a cell.
    """
    from scipy.spatial import cKDTree

    if len(pos) < 2:
        return np.ones(2)
    tree = cKDTree(pos)
    d = tree.query(pos, k=2)[0][:, 1]
    d = d[d > 0]
    if not len(d):
        return np.ones(2)
    spacing = float(np.median(d))
    pairs = tree.query_pairs(1.2 * spacing, output_type="ndarray")
    units = np.full(2, spacing)
    if len(pairs):
        delta = np.abs(pos[pairs[:, 0]] - pos[pairs[:, 1]])
        for a in range(2):
            step = delta[:, a][delta[:, a] > 0.25 * spacing]
            if len(step):
                units[a] = np.median(step[step < 1.5 * np.percentile(step, 25)])
    return units


def grid_positions(coords: np.ndarray, sections: np.ndarray | None = None, *, size: int = 128) -> np.ndarray:
    """Integer grid indices ``(n, 2)`` of spot positions, per section.

    Per section: ``round((pos - min) / step)`` with ``step`` the grid step along each axis
    (:func:`_grid_units`: the spot spacing on square grids, half of it in x and 0.87 of it in y on Visium's
    hexagonal grid), clipped to ``[0, size - 1]`` (the embedding table size). Pixel positions and a
    platform's array indices of the same spots give the same grid (up to distortions of the image).

    Parameters
    ----------
    coords
        ``(n, 2)`` positions (pixels, µm or array indices).
    sections
        ``(n,)`` section labels (``None``: one section).
    size
        Number of rows of each positional embedding table.
    """
    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    labels = np.zeros(len(coords), dtype=int) if sections is None else np.asarray(sections)
    out = np.zeros((len(coords), 2), dtype=np.int64)
    for lab in np.unique(labels):
        m = labels == lab
        pos = coords[m]
        out[m] = np.rint((pos - pos.min(0)) / _grid_units(pos)).astype(np.int64)
    return np.clip(out, 0, size - 1)


def spot_positions(adata, coords_key: str = "spatial", positions: str = "auto") -> tuple[np.ndarray, str]:
    """Positions of the spots of ``adata`` for the spot branch, and where they came from.

    ``positions='array'``: the platform's own grid in ``obs`` (:data:`ARRAY_COLUMNS`: Visium and
    ``tile_tissue`` ``array_col``/``array_row``, legacy ST ``array_x``/``array_y``); ``'pixels'``:
    ``obsm[coords_key]``; ``'auto'``: the array columns when present, else ``obsm[coords_key]``. Both go
    through :func:`grid_positions`, which maps either onto the same grid, so a model trained on array
    positions can read a reference that only has pixel positions.
    """
    if positions not in ("auto", "array", "pixels"):
        raise ValueError(f"`positions` must be 'auto', 'array' or 'pixels', got {positions!r}.")
    if positions != "pixels":
        for cols in ARRAY_COLUMNS:
            if all(c in adata.obs for c in cols):
                pos = adata.obs[list(cols)].to_numpy(dtype=np.float64)
                if not np.isfinite(pos).all():
                    raise ValueError(f"obs[{list(cols)}] has missing or infinite values.")
                return pos, "array"
        if positions == "array":
            raise KeyError(f"positions='array' needs obs columns {' or '.join(map(str, ARRAY_COLUMNS))}.")
    if coords_key not in adata.obsm:
        raise KeyError(
            f"mclSTExp needs spot positions: adata.obsm[{coords_key!r}] or obs columns "
            f"{' or '.join(map(str, ARRAY_COLUMNS))} (obsm has {list(adata.obsm)})."
        )
    pos = np.asarray(adata.obsm[coords_key], dtype=np.float64)[:, :2]
    if not np.isfinite(pos).all():
        raise ValueError(f"adata.obsm[{coords_key!r}] has NaN or infinite positions.")
    return pos, "pixels"


def _morton(grid: np.ndarray) -> np.ndarray:
    """Z-order (Morton) code of non-negative integer ``(n, 2)`` grid indices (up to 16 bits each)."""
    code = np.zeros(len(grid), dtype=np.int64)
    x, y = grid[:, 0].astype(np.int64), grid[:, 1].astype(np.int64)
    for bit in range(16):
        code |= ((x >> bit) & 1) << (2 * bit)
        code |= ((y >> bit) & 1) << (2 * bit + 1)
    return code


def sentence_order(grid: np.ndarray, sections: np.ndarray | None, sentence: str, random_state: int = 0) -> np.ndarray:
    """Order of reference spots whose consecutive chunks form the inference sentences.

    ``'spatial'``: by section, then along a Z-order curve of the grid (consecutive chunks are compact
    patches of one section, as the training sentences). ``'batch'``: a fixed random permutation (chunks mix
    spots of all sections, as the training minibatches).
    """
    n = len(grid)
    if sentence == "batch":
        return np.random.default_rng(random_state).permutation(n)
    labels = np.zeros(n, dtype=int) if sections is None else np.unique(np.asarray(sections), return_inverse=True)[1]
    return np.lexsort((_morton(grid), labels))


# ---------------------------------------------------------------------------------------------- network
def mclstexp_loss(image_emb: torch.Tensor, spot_emb: torch.Tensor, image_weight: float = 0.5) -> torch.Tensor:
    """Symmetric CLIP loss of mclSTExp with identity targets (temperature 1, no L2 normalisation).

    ``logits = spot @ image.T``; ``L_spot`` = cross-entropy of the rows (each spot's own image is the target),
    ``L_img`` = of the columns; loss = ``image_weight · L_img + (1 − image_weight) · L_spot``.
    """
    logits = spot_emb.float() @ image_emb.float().T
    target = torch.arange(len(logits), device=logits.device)
    spot_loss = F.cross_entropy(logits, target)
    image_loss = F.cross_entropy(logits.T, target)
    return image_weight * image_loss + (1 - image_weight) * spot_loss


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, dim)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim), dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class _Block(nn.Module):
    """Pre-norm transformer block (attention and a GELU MLP of width ``mlp_dim``, residuals, no dropout)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MclstexpNet(nn.Module):
    """Image branch and spot branch of mclSTExp.

    Parameters
    ----------
    feature_dim
        Dimension of the image features (frozen features, or the encoder output).
    n_genes
        Number of genes (width of the spot "words").
    projection_dim
        Output dimension of both projection heads (paper: 256).
    n_layers, n_heads, head_dim
        Spot transformer: blocks, attention heads and their width (paper: 2, 8, 64); the MLP width is
        ``n_genes`` (as the paper).
    grid_size
        Rows of the x and y positional embedding tables (grid indices are clipped to it).
    encoder
        Trainable image encoder, or ``None`` for frozen features (through
        :class:`~histoexp.models.heads.FeatureInput`, standardised with training statistics).
    """

    def __init__(
        self,
        feature_dim: int,
        n_genes: int,
        *,
        projection_dim: int = 256,
        n_layers: int = 2,
        n_heads: int = 8,
        head_dim: int = 64,
        grid_size: int = 128,
        encoder: nn.Module | None = None,
        n_pcs: int | None = None,
    ) -> None:
        super().__init__()
        if n_pcs is not None and encoder is not None:
            raise ValueError("`n_pcs` applies to frozen features only.")
        self.encoder = encoder
        self.features = None if encoder is not None else FeatureInput(feature_dim, n_pcs, whiten=True)
        in_dim = feature_dim if self.features is None else self.features.out_dim
        self.image_projection = ProjectionHead(in_dim, projection_dim, dropout=0.0)
        self.x_embed = nn.Embedding(grid_size, n_genes)
        self.y_embed = nn.Embedding(grid_size, n_genes)
        self.blocks = nn.Sequential(*[_Block(n_genes, n_heads, head_dim, n_genes) for _ in range(n_layers)])
        self.spot_projection = ProjectionHead(n_genes, projection_dim, dropout=0.0)
        self.grid_size = int(grid_size)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding from preprocessed patches (with an encoder) or raw frozen features."""
        x = self.encoder(x) if self.encoder is not None else self.features(x)
        return self.image_projection(x.float())

    def encode_spots(self, expr: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Spot embeddings of one sentence: ``(L, n_genes)`` expression and ``(L, 2)`` grid indices."""
        g = grid.long().clamp(0, self.grid_size - 1)
        words = expr.float() + self.x_embed(g[:, 0]) + self.y_embed(g[:, 1])
        return self.spot_projection(self.blocks(words.unsqueeze(0)).squeeze(0))

    def encode_reference(self, batch: dict) -> torch.Tensor:
        """Embed reference spots: the whole batch is one sentence (``coords`` hold grid indices)."""
        return self.encode_spots(batch["expression"], batch["coords"])


@register_model
class MclstexpModel(RetrievalModel):
    """A trained mclSTExp model: returned by :func:`histoexp.tl.fit_mclstexp`, used by :func:`histoexp.tl.impute`.

    A :class:`~histoexp.models.base.RetrievalModel` whose spot branch reads positions
    (``reference_fields = ('coords',)``). Retrieval defaults as the paper: top 200, weights ``1/d²`` with
    ``d`` the L1 distance of the L2-normalised embeddings (``'inverse_distance'``).

    At inference the reference spots' positions are turned into grid indices per section
    (:func:`grid_positions`) and the spots are cut into sentences of ``config['sentence_size']`` spots (the
    training batch size) in :func:`sentence_order`: compact patches of one section (``sentence='spatial'``)
    or a fixed random mixture of all reference spots (``sentence='batch'``). A reference spot's embedding
    therefore depends on the other spots of its sentence, as in the paper.
    """

    method = "mclstexp"
    reference_fields = ("coords",)
    retrieval_defaults = {"k": 200, "method": "inverse_distance"}

    @classmethod
    def build_net(cls, config: dict, encoder: nn.Module | None = None) -> MclstexpNet:  # noqa: D102
        return MclstexpNet(
            config["feature_dim"],
            len(config["genes"]),
            projection_dim=config["projection_dim"],
            n_layers=config["n_layers"],
            n_heads=config["n_heads"],
            head_dim=config["head_dim"],
            grid_size=config["grid_size"],
            encoder=encoder,
            n_pcs=config.get("n_pcs"),
        )

    @property
    def reference(self) -> ReferenceSpots | None:
        """The training spots kept with the model: expression, positions and section codes."""
        if "reference_expression" not in self.arrays:
            return None
        sections = self.arrays.get("reference_sections")
        return ReferenceSpots(
            self.arrays["reference_expression"],
            self.arrays.get("reference_coords"),
            None if sections is None else np.asarray(sections).astype(np.int64).astype(str),
        )

    def reference_positions(self, adata) -> np.ndarray:
        """Positions of a reference's spots as in training (:func:`spot_positions`, ``config['positions']``).

        A model trained on array positions reads a reference without array columns from its pixel positions
        (``'auto'``): :func:`grid_positions` maps both onto the same grid.
        """
        how = self.config.get("positions", "pixels")
        pos, _ = spot_positions(adata, self.config.get("coords_key", "spatial"), "auto" if how == "array" else how)
        return pos.astype(np.float32)

    def encode_reference(
        self, spots: ReferenceSpots | np.ndarray, *, batch_size: int | None = None, device=None, member=None
    ) -> np.ndarray:
        """Embeddings of reference spots, in sentences of ``batch_size`` (default ``config['sentence_size']``)."""
        if not isinstance(spots, ReferenceSpots):
            spots = ReferenceSpots(spots)
        if spots.coords is None:
            raise ValueError(f"The {self.method} spot branch needs the reference spots' coordinates.")
        size = int(self.config["sentence_size"] if batch_size is None else batch_size)
        grid = grid_positions(spots.coords, spots.sections, size=self.config["grid_size"])
        order = sentence_order(grid, spots.sections, self.config["sentence"])
        ordered = ReferenceSpots(spots.expression[order], grid[order].astype(np.float32))
        emb = super().encode_reference(ordered, batch_size=size, device=device, member=member)
        out = np.empty_like(emb)
        out[order] = emb
        return out
