"""NH2ST: ``fit_nh2st``, a spot and its neighbourhood, hypergraph, cross-attention, contrast plus regression."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from anndata import AnnData

from .._geometry import describe, geometry_differences
from .._utils import one_progress_bar
from ._crossfit import supports_crossfit
from ._fit import _embedding_record, check_positive, prepare_fit, set_n_pcs, train_members, write_fit_keys

if TYPE_CHECKING:  # pragma: no cover
    from ..models.nh2st import NH2STModel

#: Defaults for frozen features (CPU): BLEEP's lr / weight decay with a batch of 128 and early stopping; five members
#: averaged (as ``fit_bleep``: one network trained on a few thousand spots is noisy). Not tuned on her2st
#: (``benchmarks/her2st_nh2st.py`` reports what they give there).
FROZEN_DEFAULTS = {"epochs": 100, "batch_size": 128, "lr": 1e-3, "weight_decay": 1e-3, "patience": 10, "n_ensemble": 5}
#: Defaults for end-to-end fine-tuning (GPU): BLEEP's fine-tuning settings with a batch of 32 spots, each with
#: ``grid**2`` windows through the encoder (800 patches a step at grid 5); one member.
FINETUNE_DEFAULTS = {"epochs": 30, "batch_size": 32, "lr": 1e-4, "weight_decay": 1e-3, "patience": 5, "n_ensemble": 1}


def grid_neighbours(coords: np.ndarray, sections: np.ndarray, window_px: dict[str, float], grid: int) -> np.ndarray:
    """Which spot lies in each window of each spot's ``grid`` x ``grid`` neighbourhood.

    Window ``w`` (row-major from the top-left, rows along image y) of spot ``i`` is the square of side
    ``window_px[section]`` whose centre is offset from spot ``i`` by ``(col - grid // 2, row - grid // 2)``
    windows. A spot of the same section lies in the window when its centre does; of several, the one
    nearest the window centre. The centre window holds the spot itself.

    Returns
    -------
    int64 ``(n, grid**2)`` positions into ``coords`` (``-1``: no spot in that window).
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    sections = np.asarray(sections).astype(str)
    out = np.full((len(coords), grid * grid), -1, dtype=np.int64)
    best = np.full(out.shape, np.inf)
    half = grid / 2
    for lib in np.unique(sections):
        idx = np.flatnonzero(sections == lib)
        w = float(window_px[lib])
        tree = cKDTree(coords[idx])
        for a, near in enumerate(tree.query_ball_point(coords[idx], r=half * w * np.sqrt(2))):
            near = np.asarray(near, dtype=np.int64)
            d = (coords[idx[near]] - coords[idx[a]]) / w + half  # position in window units, grid corner at 0
            cell = np.floor(d).astype(np.int64)
            ok = ((cell >= 0) & (cell < grid)).all(1)
            dist = np.linalg.norm(d - cell - 0.5, axis=1)
            for j, (cx, cy), dd, good in zip(near, cell, dist, ok, strict=True):
                slot = cy * grid + cx
                if good and dd < best[idx[a], slot]:
                    best[idx[a], slot], out[idx[a], slot] = dd, idx[j]
    return out


def smooth_targets(expr: np.ndarray, coords: np.ndarray, sections: np.ndarray) -> np.ndarray:
    """Each spot's targets averaged with its ring of nearest spots of the same section (NH2ST's 3x3 smoothing).

    The ring is every spot within 1.5 times the section's median nearest-spot distance: the 8 around a spot
    of a square grid (legacy ST), the 6 of a hexagonal one (Visium); fewer at the tissue edge.
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    sections = np.asarray(sections)
    if not len(expr) == len(coords) == len(sections):
        raise ValueError(f"expr, coords and sections differ in rows: {len(expr)}, {len(coords)}, {len(sections)}.")
    out = np.empty_like(expr)
    for lib in np.unique(sections):
        idx = np.flatnonzero(sections == lib)
        if len(idx) < 2:
            out[idx] = expr[idx]
            continue
        tree = cKDTree(coords[idx])
        pitch = float(np.median(tree.query(coords[idx], k=2)[0][:, 1]))
        for a, near in enumerate(tree.query_ball_point(coords[idx], r=1.5 * pitch)):
            out[idx[a]] = expr[idx[np.asarray(near)]].mean(0)
    return out


@one_progress_bar("fit_nh2st")
@supports_crossfit()
def fit_nh2st(
    adata: AnnData,
    *,
    genes: Sequence[str] | str | int | None = None,
    layer: str | None = None,
    normalize: Literal["log1p", "none"] = "log1p",
    use_rep: str | None = None,
    context_rep: str | None = None,
    encoder: str = "resnet50",
    weights: str | None = "default",
    encoder_kwargs: dict | None = None,
    finetune_encoder: bool | None = None,
    patches_key: str = "patches",
    grid: int | None = None,
    augment: bool = True,
    neighbours: bool = True,
    contrastive: bool = True,
    cross_attention: bool = True,
    dim: int = 64,
    heads: int = 4,
    dropout: float = 0.1,
    k: int = 3,
    temperature: float = 0.05,
    negative_weight: float = 0.1,
    neighbour_weight: float = 0.5,
    pool: Literal["mean", "attention"] = "attention",
    smooth: bool = False,
    n_pcs: int | None = None,
    n_ensemble: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    patience: int | None = None,
    val_fraction: float = 0.2,
    rank: int | Literal["auto"] | None = None,
    smooth_predictions: float | Literal["auto"] | None = None,
    crossfit: bool | None = None,
    library_key: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    key_added: str = "nh2st",
    overwrite: bool = False,
    random_state: int = 0,
    device: str | None = None,
) -> NH2STModel:
    """Train NH2ST: a spot and its neighbourhood, aligned with expression, decoded from the image.

    NH2ST (Qu et al., MICCAI 2025, arXiv 2506.23827; github.com/MCPathology/NH2ST) has two branches.
    **Query**: the spot's image features -> image encoder; the spot's expression -> gene encoder.
    **Neighbour**: the ``grid`` x ``grid`` patch-sized windows around the spot (:func:`embed_neighbourhood`)
    -> the same image encoder -> a hypergraph (each window with its ``k`` most cosine-similar windows, plus self
    loops) and two hypergraph convolutions; the expression of the spots lying in those windows -> the gene
    encoder -> hypergraph convolutions on the same hypergraph. Cross-attention fuses image and gene tokens
    (image->gene and gene->image) in both branches. Loss: ``MSE(decoded, expression) + InfoNCE(query image,
    query gene) + neighbour_weight * InfoNCE(neighbour image, neighbour gene)`` (InfoNCE on L2-normalised
    tokens, ``temperature`` 0.05, negative logits scaled by ``negative_weight`` 0.1, as the public code).
    Prediction (:func:`impute`) decodes image features only: expression is used to align during training.
    The network is :class:`~histoexp.models.nh2st.NH2STNet`.

    Deviations from the paper and its code, on purpose:

    - **two modes**. Frozen features (``finetune_encoder=False``, the default on CPU): the image encoder is an
      MLP on standardised frozen features (optionally ``n_pcs`` whitened PCs), and the windows' features are
      computed once per spot by :func:`embed_neighbourhood`. End to end (``finetune_encoder=True``, the default
      on GPU; the original fine-tunes a self-supervised ResNet-18): each spot's context patch (``grid``
      windows wide, the geometry of the patches under ``patches_key``) is read once per batch, flipped and
      rotated as a whole (``augment``), cut into its ``grid**2`` windows, and every window goes through the
      one trainable ``encoder`` (the centre window is the spot's patch), then the same MLP;
    - **what the decoder reads**: the public code decodes the target patch's features alone, so the
      neighbours act only through the encoder they share with it, trained end to end. With frozen features
      that path carries no information about the surroundings, so the decoder here reads the spot's image
      token concatenated with the mean of its hypergraph-convolved window tokens (image only, no expression;
      ``neighbours=False``: the spot token alone);
    - the neighbour branch is fused and contrasted as one token per spot: the mean of the window tokens
      (image) and the mean of the tokens of the windows that hold a spot (expression), with the other spots
      of the batch as negatives (the public code also flattens the graph output into one vector before its
      fusion); windows without a spot (tissue edge, the gaps of a 200 µm legacy ST grid) are masked out of the
      gene hypergraph and of that mean. With one token on each side, cross-attention reduces to adding a
      projection of the other modality (as in the public code, whose tokens are single vectors too);
    - **targets are not smoothed**: the original averages each spot's targets over its 3x3 neighbours for
      training and evaluation. Smoothing removes counting noise and adds neighbourhood signal to the target,
      which inflates correlations and favours context models; we evaluate on the measured spot
      (log1p(normalize_total 1e4)), as every other histoexp method, and train on it by default (``smooth=True``
      trains on the smoothed targets, :func:`smooth_targets`; predictions are still of the measured spot);
    - sizes for CPU: ``dim=64`` tokens, ``heads=4``, one cross-attention layer shared by all four fusions
      (the paper: 512, 8); AdamW (``lr`` 1e-3, ``weight_decay`` 1e-3, batch 128, up to 100 epochs with early
      stopping on whole validation sections, ``patience`` 10) instead of Adam 5e-4 / StepLR / batch 8 /
      200 epochs / fp16;
    - an ensemble (``n_ensemble=5`` by default, not in the paper): five members from seeds ``random_state + i``,
      predictions averaged;
    - a dense hypergraph convolution (``D_v^-1 H D_e^-1 H^T X Θ``, unit hyperedge weights) on the 25 windows
      of each spot instead of torch_geometric's ``HypergraphConv`` (the same operator; no extra dependency).

    What it gives on her2st (``benchmarks/her2st_nh2st.py``: leave-one-section-out over C2..C6, 785 genes,
    log1p targets, frozen handcrafted features, five members; mean PCC@M over the five folds): NH2ST 0.123;
    with ``pool='mean'`` 0.112, without the neighbour branch 0.123, without the contrastive terms 0.125, without
    cross-attention 0.129, trained on smoothed targets 0.107; ridge on the spot's features 0.124, on the spot + one
    3x wider context patch 0.139 (the best row). ``pool='attention'`` was chosen over ``'mean'`` by a
    leave-one-section-out on C3..C6 (C2 never seen; 0.113 vs 0.100, no neighbour branch 0.108). Spatial context
    is a real lever (ridge), but on ~550 training spots a fold this network turns little of it into accuracy.

    The ablation switches are real arguments: ``neighbours=False`` (no neighbour branch: spot features only,
    no neighbour InfoNCE), ``contrastive=False`` (MSE only) and ``cross_attention=False`` (InfoNCE on the
    unfused tokens).

    Parameters
    ----------
    adata
        Training spots with counts, spot features in ``obsm[use_rep]`` and, with ``neighbours``, window
        features in ``obsm[context_rep]`` from :func:`embed_neighbourhood` with the same encoder.
    genes
        Target genes, resolved by :func:`histoexp.pp.select_genes` (``None``: 250 HVGs).
    layer
        Layer with counts instead of ``X``.
    normalize
        ``'log1p'`` (normalize_total 1e4 + log1p; default) or ``'none'`` (already log-normalised).
    use_rep
        ``obsm`` key of the spot features (``None``: ``f'X_{encoder}'``).
    context_rep
        ``obsm`` key of the neighbourhood windows' features (``None``: ``f'{use_rep}_grid'``, the default key
        of :func:`embed_neighbourhood`); its record gives the grid and the window size.
    encoder, weights, encoder_kwargs
        Image encoder registry name, weights and more arguments of :func:`histoexp.models.get_encoder`,
        fine-tuned end to end (finetune mode); in frozen mode the name whose ``X_<encoder>`` features are used
        when ``use_rep`` is ``None``.
    finetune_encoder
        Train the image encoder end to end on patches (``None``: when the device is a GPU).
    patches_key
        Key of :func:`histoexp.pp.extract_patches` whose geometry the windows take (finetune mode).
    grid
        Windows per side of the neighbourhood in finetune mode (odd; ``None``: 5, NH2ST's). Frozen features
        carry their own grid (the record of ``context_rep``); a ``grid`` that differs from it is an error.
    augment
        Random flips and 90° rotations of each context patch while fine-tuning.
    neighbours, contrastive, cross_attention
        The neighbour branch, the two InfoNCE terms, and the cross-attention fusion (all on by default).
    dim, heads, dropout
        Token width, attention heads and dropout.
    k
        Hyperedge size: each window with its ``k`` most similar windows (NH2ST: 3).
    temperature, negative_weight
        InfoNCE temperature and the factor on the negative logits (NH2ST: 0.05, 0.1).
    neighbour_weight
        Weight of the neighbour InfoNCE (NH2ST: 0.5; the query InfoNCE and the MSE weigh 1).
    pool
        How the window tokens become the one neighbourhood token the decoder reads: ``'mean'``, or
        ``'attention'`` (the spot's token attends over its windows, which carry a learned embedding of their
        place in the grid).
    smooth
        Train on targets averaged over each spot and its ring of nearest spots (NH2ST's smoothing; the 8 around
        a legacy ST spot, the 6 around a Visium spot). Evaluation is not affected.
    n_pcs
        Whitened principal components of the frozen features (fitted on the training spots' windows and own
        features); ``None``: standardised features.
    n_ensemble
        Independently trained members (seeds ``random_state + i``) whose predictions are averaged
        (``None``: 5). Training time grows linearly with it.
    epochs, batch_size, lr, weight_decay, patience
        Training settings; ``None``: :data:`FROZEN_DEFAULTS` or :data:`FINETUNE_DEFAULTS`.
    val_fraction
        Fraction of sections (or of one section's spots, in a spatial stripe) for early stopping.
    rank
        Reduced-rank outputs (post-processing in :func:`histoexp.tl.impute`): the predictions of the model genes are
        projected onto the first ``rank`` principal axes of the training expression. ``None``: full rank; an
        integer; ``'auto'``: chosen on the cross-fitted predictions (mean per-gene Pearson of held-out training
        sections) among :data:`~histoexp.tl._crossfit.RANK_CANDIDATES` and full rank.
    smooth_predictions
        Post-processing weight of each spot's neighbours in :func:`histoexp.tl.impute` (see its ``smooth``):
        ``None`` (off), a number in [0, 1), or ``'auto'`` (chosen on the cross-fitted predictions, 0 included).
    crossfit
        Cross-fit: train the same method on all training sections but one, predict that one, for each section;
        keep each gene's expected Pearson r and gene-specific r on a new section (mean and spread over folds) and
        its out-of-fold residual quantiles (prediction intervals), which :func:`histoexp.tl.impute` writes to
        ``var`` and ``layers``. ``None``: on for frozen features, off for fine-tuning. Cost: one more fit per
        section (``uns[key_added]['params']['crossfit']['seconds']`` records it). One section: spatial blocks
        stand in for sections (optimistic: no section-to-section batch effect).
    library_key
        ``obs`` column of the sections (``None``: ``'library_id'`` when present).
    checkpoint_dir, resume
        Checkpoint after every epoch and resume (see :func:`histoexp.train.fit`).
    key_added
        ``uns[key_added]`` receives ``params``, ``genes`` and ``history``.
    overwrite
        Replace ``uns[key_added]`` when histoexp did not write it (a re-run replaces the keys this function wrote
        without it).
    random_state
        Seed of the initialisation, split, shuffling and dropout.
    device
        Torch device (``None``: ``hx.settings.device``).

    Returns
    -------
    NH2STModel
        A regression model (:class:`~histoexp.models.nh2st.NH2STModel`; ``.save(dir)``,
        :func:`histoexp.tl.load_model`); predict with :func:`histoexp.tl.impute` (the query needs
        ``obsm[use_rep]`` and, with ``neighbours``, ``obsm[context_rep]``).
    """
    from ..models.bleep import augment_dihedral
    from ..models.nh2st import NH2STModel, patch_input
    from ..train import SpotDataset, data_fingerprint

    check_positive(dim=dim, heads=heads, temperature=temperature, neighbour_weight=neighbour_weight)
    switches = {"neighbours": neighbours, "contrastive": contrastive, "cross_attention": cross_attention}
    for name, v in {**switches, "smooth": smooth}.items():
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"`{name}` must be True or False, got {v!r}.")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim % heads:
        raise ValueError(f"`dim` must be an integer multiple of `heads` ({heads}), got {dim!r}.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"`k` must be a non-negative integer, got {k!r}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
    if not 0 <= negative_weight <= 1:
        raise ValueError(f"`negative_weight` must be in [0, 1], got {negative_weight!r}.")
    if pool not in ("mean", "attention"):
        raise ValueError(f"`pool` must be 'mean' or 'attention', got {pool!r}.")
    hp = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
    hp.update(patience=patience, n_ensemble=n_ensemble)
    data = prepare_fit(
        adata,
        method="NH2ST",
        key_added=key_added,
        overwrite=overwrite,
        genes=genes,
        layer=layer,
        normalize=normalize,
        use_rep=use_rep,
        encoder=encoder,
        weights=weights,
        encoder_kwargs=encoder_kwargs,
        finetune_encoder=finetune_encoder,
        patches_key=patches_key,
        library_key=library_key,
        val_fraction=val_fraction,
        random_state=random_state,
        device=device,
        defaults=(FROZEN_DEFAULTS, FINETUNE_DEFAULTS),
        hparams=hp,
    )
    frozen = data.mode == "frozen"
    if frozen:
        d = data.images.shape[1]
        rec_grid, window_px = _frozen_neighbourhood(adata, data, context_rep) if neighbours else (1, None)
        if neighbours and grid is not None and grid != rec_grid:
            raise ValueError(
                f"`grid={grid!r}` differs from the {rec_grid} x {rec_grid} windows of `context_rep`: frozen features "
                "carry their grid; leave `grid` unset or embed the neighbourhood again."
            )
        grid = rec_grid
    else:
        grid = 5 if grid is None else grid  # NH2ST's 5 x 5 windows
        if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1 or grid % 2 == 0:
            raise ValueError(f"`grid` must be an odd positive integer (the spot is the centre window), got {grid!r}.")
        grid, d, window_px = (int(grid), None, None) if neighbours else (1, None, None)
        if neighbours:
            from ._embed import _context_source

            # each spot's context patch (grid windows wide) read once a batch and cut into windows in the net
            data.images, _, _, window_px = _context_source(adata, patches_key, grid)
            data.config["patches"]["context_px"] = int(data.images.patch_px)
    if (neighbours or smooth) and "spatial" in adata.obsm:
        pos = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2]
        bad = ~np.isfinite(pos).all(1)
        if bad.any():
            raise ValueError(
                f"adata.obsm['spatial'] has NaN or infinite positions for {int(bad.sum())} spots (e.g. "
                f"{adata.obs_names[bad][:5].tolist()}): NH2ST's neighbours (and `smooth`) need every spot's position. "
                "Fix or drop those spots, or pass `neighbours=False, smooth=False`."
            )
    if smooth:  # training targets only: what impute predicts is still compared with the measured spot
        if data.coords is None:
            raise KeyError("adata.obsm['spatial'] (spot centres) is missing: `smooth=True` needs it.")
        labels = (
            adata.obs[data.library_key].astype(str).to_numpy()
            if data.library_key is not None
            else np.zeros(adata.n_obs, dtype=str)
        )
        data.expr = smooth_targets(data.expr, data.coords, labels).astype(np.float32)
        fp = np.frombuffer(str(data.config["data_fingerprint"]).encode(), dtype=np.uint8)
        data.config["data_fingerprint"] = data_fingerprint(fp, data.expr)  # no resume across smoothing
    nb = None
    if neighbours:
        if "spatial" not in adata.obsm:
            raise KeyError("adata.obsm['spatial'] (spot centres) is missing: the neighbour branch needs it.")
        sections = (
            adata.obs[data.library_key].astype(str).to_numpy()
            if data.library_key is not None
            else np.full(adata.n_obs, next(iter(window_px)))
        )
        missing = sorted(set(sections) - set(window_px))
        if missing:
            raise ValueError(f"No window size is recorded for sections {missing}.")
        nb = grid_neighbours(adata.obsm["spatial"], sections, window_px, grid)
        split = np.zeros(adata.n_obs, dtype=np.int8)
        split[data.val_idx] = 1
        nb[(nb >= 0) & (split[np.maximum(nb, 0)] != split[:, None])] = -1  # no expression across the split
    if frozen:
        set_n_pcs(data, n_pcs)
        if n_pcs is not None and n_pcs > d:
            raise ValueError(f"`n_pcs` must be at most the {d} features of `use_rep`, got {n_pcs}.")
    elif n_pcs is not None:
        raise ValueError("`n_pcs` applies to frozen features only (finetune_encoder=False).")
    data.config.update(
        window_dim=None if d is None else int(d),
        grid=grid,
        dim=int(dim),
        heads=int(heads),
        dropout=float(dropout),
        k=int(k),
        neighbours=bool(neighbours),
        contrastive=bool(contrastive),
        cross_attention=bool(cross_attention),
        pool=pool,
        smooth=bool(smooth),
        temperature=float(temperature),
        negative_weight=float(negative_weight),
        neighbour_weight=float(neighbour_weight),
        augment=bool(augment) if not frozen else None,  # a setting of the training (resume checks it)
    )

    def make_net():
        if frozen:
            net = NH2STModel.build_net(data.config)
            tr = data.images[data.train_idx]
            net.features.fit(tr.reshape(-1, d) if neighbours else tr, random_state=random_state)  # own + windows
            return net
        enc = data.new_encoder()
        data.config["window_dim"] = data.config["feature_dim"]
        return NH2STModel.build_net(data.config, enc)

    def loss_fn(net, batch):
        if not frozen:
            x = batch["image"]
            x = augment_dihedral(x) if net.training and augment else x  # the whole context: windows stay in place
            batch = {**batch, "image": patch_input(x, data.preprocess, grid if neighbours else None)}
        return net.losses(
            batch,
            contrastive=contrastive,
            temperature=temperature,
            negative_weight=negative_weight,
            neighbour_weight=neighbour_weight,
        )["total"]

    def make(rows):
        return SpotDataset(data.images, data.expr, rows=rows, neighbours=nb, neighbour_images=False)

    datasets = (make(data.train_idx), make(data.val_idx) if len(data.val_idx) else None)
    nets, history = train_members(
        data,
        make_net,
        loss_fn,
        desc="NH2ST",
        random_state=random_state,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        datasets=datasets,
    )
    keys = ("grid", "dim", "heads", "dropout", "k", "neighbours", "contrastive", "cross_attention", "pool", "smooth")
    params = {k_: data.config[k_] for k_ in keys}
    params.update(
        n_pcs=data.config.get("n_pcs"),
        temperature=temperature,
        negative_weight=negative_weight,
        neighbour_weight=neighbour_weight,
        mode=data.mode,
        augment=bool(augment) if not frozen else None,
    )
    params["context_rep"] = next(iter(data.config["extra_reps"])) if neighbours and frozen else None
    if nb is not None:
        params["mean_neighbour_spots"] = float((nb >= 0).sum(1).mean())
    data.config.update(params={**data.params, **params}, history=history)
    model = NH2STModel(nets, data.config, preprocess=data.preprocess)
    write_fit_keys(data, key_added, params=params, history=history)
    return model


def _frozen_neighbourhood(adata: AnnData, data, context_rep: str | None) -> tuple[int, dict]:
    """Append the windows' frozen features to ``data.images``; return the grid and the window sizes."""
    from ..train import data_fingerprint

    d = data.images.shape[1]
    ctx = context_rep if context_rep is not None else f"{data.config['use_rep']}_grid"
    if ctx not in adata.obsm:
        raise KeyError(
            f"NH2ST's neighbour branch reads window features from adata.obsm[{ctx!r}] (`context_rep`), which is "
            f"missing (obsm has {list(adata.obsm)}): run hx.tl.embed_neighbourhood(adata, encoder=...) with the "
            "encoder of `use_rep`, pass `context_rep=`, or `neighbours=False`."
        )
    rec = _embedding_record(adata, ctx) or {}
    if "grid" not in rec or "window_px_fullres" not in rec:
        raise ValueError(
            f"adata.obsm[{ctx!r}] has no neighbourhood record in uns['histoexp']['embeddings'] (grid, window "
            "size): compute it with hx.tl.embed_neighbourhood."
        )
    grid = int(rec["grid"])
    win = np.asarray(adata.obsm[ctx], dtype=np.float32)
    if win.shape != (adata.n_obs, grid * grid * d) or not np.isfinite(win).all():
        raise ValueError(
            f"adata.obsm[{ctx!r}] must be finite with shape ({adata.n_obs}, {grid * grid * d}) "
            f"({grid}x{grid} windows of the {d} features of `use_rep`), got {win.shape}."
        )
    sp_rec = data.config.get("embedding") or {}
    for field in ("encoder", "weights"):
        if field in sp_rec and field in rec and str(sp_rec[field]) != str(rec[field]):
            raise ValueError(
                f"`use_rep` and `context_rep` come from different encoders ({field} {sp_rec[field]!r} vs "
                f"{rec[field]!r}): the windows must go through the spot's image encoder."
            )
    diffs = geometry_differences(rec, sp_rec, ("size_um", "mpp", "patch_px"))
    if diffs:
        raise ValueError(
            f"`context_rep` ({ctx!r}) was computed from patches of another geometry than `use_rep`: "
            f"{describe(diffs, 'use_rep')}; embed both from the same patches (the centre window is the spot's patch)."
        )
    data.images = np.concatenate([data.images, win], axis=1)
    # the platform's convention: feature_dim is the whole input row, extra_reps the obsm read after use_rep
    data.config.update(
        feature_dim=int(data.images.shape[1]), extra_reps={ctx: {"dim": int(win.shape[1]), "embedding": rec}}
    )
    data.config["data_fingerprint"] = data_fingerprint(data.images, data.expr, data.train_idx, data.val_idx)
    return grid, {str(k): float(v) for k, v in rec["window_px_fullres"].items()}
