"""mclSTExp: ``fit_mclstexp``, contrastive training of an image branch and a positional spot transformer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from anndata import AnnData

from .._utils import one_progress_bar
from ._crossfit import supports_crossfit
from ._fit import check_positive, prepare_fit, set_n_pcs, train_members, write_fit_keys

if TYPE_CHECKING:  # pragma: no cover
    from ..models.mclstexp import MclstexpModel

#: Defaults for training on frozen features (CPU). The paper's Adam lr 1e-4 is tuned for fine-tuning a
#: DenseNet; small heads on frozen features converge far faster at 1e-3 (as BLEEP's frozen defaults). The
#: paper's batch (= sentence length) 128, weight decay 1e-3; early stopping on the validation loss. Five members
#: as fit_bleep: a head on a few hundred spots is noisy and averaging the members' retrievals removes variance
#: (her2st LOSO, handcrafted: PCC 0.121 with one member, 0.128 with five; benchmarks/her2st_mclstexp.py).
FROZEN_DEFAULTS = {"epochs": 100, "batch_size": 128, "lr": 1e-3, "weight_decay": 1e-3, "patience": 10, "n_ensemble": 5}
#: Defaults for end-to-end fine-tuning of the image encoder (GPU): the paper's lr 1e-4, wd 1e-3, batch 128,
#: 90 epochs (with early stopping here).
FINETUNE_DEFAULTS = {"epochs": 90, "batch_size": 128, "lr": 1e-4, "weight_decay": 1e-3, "patience": 10, "n_ensemble": 1}

SENTENCES = ("spatial", "batch")


def spatial_sentences(coords: np.ndarray, sections: np.ndarray | None, size: int):
    """Build a ``batch_sampler`` for :func:`histoexp.train.fit` whose batches are spatial sentences.

    A batch takes a random seed spot (uniform over the spots, so sections are drawn by size) and its ``size``
    nearest spots of the same section (the whole section when it is smaller). ``len(coords) // size`` batches
    per epoch (at least one). The generator handed over by ``fit`` is the only source of randomness, so a
    resumed run draws the same sentences.

    Parameters
    ----------
    coords
        ``(n, 2)`` positions of the training spots (dataset order).
    sections
        ``(n,)`` section labels (``None``: one section).
    size
        Spots per sentence.
    """
    import torch
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    labels = np.zeros(n, dtype=int) if sections is None else np.asarray(sections)
    neighbours: list[np.ndarray | None] = [None] * n
    for lab in np.unique(labels):
        rows = np.flatnonzero(labels == lab)
        k = min(size, len(rows))
        _, idx = cKDTree(coords[rows]).query(coords[rows], k=k)
        idx = np.asarray(idx).reshape(len(rows), k)
        for i, r in enumerate(rows):
            neighbours[r] = rows[idx[i]]
    n_batches = max(1, n // size)

    def sampler(generator, epoch):
        seeds = torch.randint(n, (n_batches,), generator=generator).tolist()
        return [neighbours[s].tolist() for s in seeds]

    return sampler


@one_progress_bar("fit_mclstexp")
@supports_crossfit()
def fit_mclstexp(
    adata: AnnData,
    *,
    genes: Sequence[str] | str | int | None = None,
    layer: str | None = None,
    normalize: Literal["log1p", "none"] = "log1p",
    use_rep: str | None = None,
    encoder: str = "resnet50",
    weights: str | None = "default",
    encoder_kwargs: dict | None = None,
    finetune_encoder: bool | None = None,
    sentence: Literal["spatial", "batch"] = "batch",
    n_layers: int = 2,
    n_heads: int = 8,
    head_dim: int = 64,
    image_weight: float = 0.5,
    projection_dim: int = 256,
    grid_size: int = 128,
    n_pcs: int | None = None,
    n_ensemble: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    patience: int | None = None,
    val_fraction: float = 0.2,
    coords_key: str = "spatial",
    positions: Literal["auto", "array", "pixels"] = "auto",
    rank: int | Literal["auto"] | None = None,
    smooth_predictions: float | Literal["auto"] | None = None,
    crossfit: bool | None = None,
    library_key: str | None = None,
    patches_key: str = "patches",
    augment: bool = True,
    keep_reference: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    key_added: str = "mclstexp",
    overwrite: bool = False,
    random_state: int = 0,
    device: str | None = None,
) -> MclstexpModel:
    """Train mclSTExp: contrastive alignment of spot images with spots read as words of a spatial sentence.

    mclSTExp (Min, Shi et al., Briefings in Bioinformatics 2024; github.com/shizhiceng/mclSTExp) is a
    BLEEP-like retrieval method whose spot branch also reads where a spot is and what surrounds it:

    - image branch: an image encoder (the paper: DenseNet-121, fine-tuned) or frozen features -> projection head
      (BLEEP's, dropout 0) -> ``projection_dim``;
    - spot branch: log-normalised expression + learnable embeddings of the spot's grid x and y (two
      ``nn.Embedding`` tables of ``grid_size`` rows, added to the expression vector) -> a pre-norm transformer
      (``n_layers`` blocks, ``n_heads`` × ``head_dim`` attention, MLP width = number of genes, no dropout)
      over a *sentence* of spots -> projection head -> ``projection_dim``;
    - loss: symmetric CLIP with identity targets, temperature 1, ``image_weight · L_img + (1 − image_weight)
      · L_spot`` (:func:`~histoexp.models.mclstexp.mclstexp_loss`), embeddings not L2-normalised (as the code);
    - prediction (:func:`impute`): the query's image embedding retrieves the top 200 reference spots
      (cosine), weighted ``1/d²`` with ``d`` the L1 distance of the L2-normalised embeddings.

    Grid positions (``positions``): the platform's own spot grid in ``obs`` when present (Visium and
    :func:`histoexp.pp.tile_tissue` tiles: ``array_col``/``array_row``; legacy ST: ``array_x``/``array_y``),
    else the pixel positions ``obsm[coords_key]``; per section they become integer indices
    ``round((pos - min) / step)`` with the grid step along each axis (half the spot spacing in x on Visium's
    hexagonal grid, so every spot keeps its own cell), clipped to ``grid_size - 1``
    (:func:`~histoexp.models.mclstexp.grid_positions`). Every reference given to :func:`impute` is read the
    same way; count-only sections (no image) serve as references, since the spot branch reads expression and
    positions only. For Visium HD bins or dense tiles wider than ``grid_size`` cells, raise ``grid_size``.

    Sentences:

    - ``'batch'`` (default, the paper's code): a sentence is a shuffled minibatch of spots from all training
      sections; at inference a fixed random permutation of all reference spots is cut into sentences of
      ``batch_size`` (the code uses 32 consecutive spots in file order);
    - ``'spatial'``: a training sentence is a random seed spot and its ``batch_size`` nearest spots of the same
      section (:func:`spatial_sentences`), so attention runs over a tissue neighbourhood; at inference the
      reference spots are cut, per section along a Z-order curve of the grid, into compact sentences.

    ``'batch'`` is the default because it was better in an inner leave-one-section-out on her2st C3..C6
    (C2 never used; 785 genes, log1p targets, frozen features): mean PCC 0.112 vs 0.109 (handcrafted) and
    0.103 vs 0.096 (densenet121, random weights, ``n_pcs=8``); see ``benchmarks/her2st_mclstexp.py``.

    Deviations from the paper and its code, on purpose:

    - targets are log1p(normalize_total 1e4) per spot (the public evaluation code normalises genes × spots,
      i.e. each gene across spots, so spot depth is never corrected);
    - the reference (the training spots kept in the model, or ``reference=`` in :func:`impute`) is embedded
      without the query section, never with it (the public code embeds all sections together, so the spot
      transformer attends across the test section);
    - the default encoder is ResNet-50, as in every ``fit_<method>`` (so ``embed_patches(adata)`` followed by any
      fit reads the same ``obsm['X_resnet50']``, and methods are compared on the same features); the paper uses
      DenseNet-121 (its supplement ranks DenseNet-121 > ResNet-50 > ViT, fine-tuned from ImageNet):
      ``encoder='densenet121'`` follows it. Nothing measured here decides between them: the her2st benchmark
      (``benchmarks/her2st.py``) could only use random weights, with which DenseNet-121 features score higher
      for every method, ridge included;
    - frozen features (default on CPU) are standardised and only the heads and the spot branch train; the
      paper always fine-tunes its encoder. Frozen defaults: ``epochs=100, batch_size=128, lr=1e-3,
      weight_decay=1e-3, patience=10, n_ensemble=5`` (lr 1e-3 instead of 1e-4: heads on frozen features; five
      members whose retrievals are averaged, as ``fit_bleep``: the paper trains one);
      fine-tuning: the paper's ``epochs=90, batch_size=128, lr=1e-4, weight_decay=1e-3`` with ``patience=10``;
    - the validation split is by section with early stopping on the validation loss (the paper trains a fixed
      90 epochs);
    - positions: the platform's array grid (as the code, which reads the legacy ST array x/y into 65,536-row
      tables), or grid indices derived from pixel positions where there is none; ``grid_size=128`` rows;
    - fine-tuning augmentation: random flips and 90° rotations (the paper: colour jitter, flips, rotations
      up to 180°); patches normalised by the encoder's own transform;
    - ``sentence='spatial'`` is an addition (see above); optimiser AdamW (the paper: Adam with L2 weight decay).

    Parameters
    ----------
    adata
        Training spots with counts (``X`` or ``layers[layer]``), positions in ``obsm[coords_key]``, image
        features in ``obsm[use_rep]`` or patches under ``patches_key``; several sections in
        ``obs[library_key]``.
    genes
        Spot-branch genes, resolved by :func:`histoexp.pp.select_genes` (list, ``'her2st'``, ``'all'``,
        int = that many HVGs, ``None`` = 250 HVGs).
    layer
        Layer with counts instead of ``X``.
    normalize
        ``'log1p'`` (normalize_total 1e4 + log1p; default) or ``'none'`` (already log-normalised).
    use_rep
        ``obsm`` key of frozen image features (frozen mode; ``None``: ``obsm[f'X_{encoder}']``).
    encoder, weights, encoder_kwargs
        Image encoder (registry name; default ``'resnet50'`` as every ``fit_<method>``, the paper's is
        ``'densenet121'``), its weights and further arguments of :func:`histoexp.models.get_encoder` (finetune
        mode). With frozen features and no ``use_rep``, the features are read from ``obsm[f'X_{encoder}']``.
    finetune_encoder
        ``None``: ``True`` on CUDA, ``False`` otherwise.
    sentence
        ``'spatial'`` or ``'batch'`` (see above).
    n_layers, n_heads, head_dim
        Spot transformer size (paper: 2, 8, 64).
    image_weight
        λ of the loss (paper: 0.5).
    projection_dim
        Embedding dimension (paper: 256).
    grid_size
        Rows of each positional embedding table; grid indices beyond are clipped.
    n_pcs
        Frozen features only (not in the paper): project the standardised features onto their first ``n_pcs``
        principal components (whitened, fitted on the training spots) before the image head, as
        ``fit_bleep(n_pcs=)``: wide features (1024-2048-d CNN features) on a few hundred spots overfit the head.
        ``None``: the standardised features as they are.
    n_ensemble
        Independently trained members (seeds ``random_state + i``) whose retrieval predictions
        :func:`impute` averages; ``None``: 5 with frozen features, 1 when fine-tuning.
    epochs, batch_size, lr, weight_decay, patience
        Training settings (``batch_size`` is also the sentence length); ``None``: :data:`FROZEN_DEFAULTS` or
        :data:`FINETUNE_DEFAULTS`.
    val_fraction
        Fraction of sections (or of one section's spots, in a spatial stripe) used for validation and early
        stopping; ``0`` trains on everything for ``epochs`` epochs.
    coords_key
        ``obsm`` key of the spot positions in pixels (saved with the model: :func:`impute` reads the reference
        positions from the same key).
    positions
        ``'auto'`` (the ``obs`` array columns when present, else ``obsm[coords_key]``), ``'array'`` or
        ``'pixels'`` (:func:`~histoexp.models.mclstexp.spot_positions`).
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
    patches_key
        Key of :func:`histoexp.pp.extract_patches` (finetune mode).
    augment
        Random flips/rotations of patches during fine-tuning.
    keep_reference
        Keep the training spots (expression, positions, section codes) in the model as the default reference
        of :func:`impute`.
    checkpoint_dir, resume
        Checkpoint after every epoch and resume after an interruption (see :func:`histoexp.train.fit`).
    key_added
        Writes ``obsm[f'X_{key_added}_image']``, ``obsm[f'X_{key_added}_expression']`` (embeddings of every
        spot of ``adata``, the spot branch over its sections' inference sentences) and ``uns[key_added]``
        (``params``, ``genes``, ``history``).
    overwrite
        Replace those keys when histoexp did not write them (a re-run replaces the keys this function wrote without it).
    random_state
        Seed of the initialisation, split, sentences and shuffling: the same seed on the same device gives the
        same model.
    device
        Torch device (``None``: ``hx.settings.device``).

    Returns
    -------
    MclstexpModel
        The fitted retrieval model (:class:`~histoexp.models.mclstexp.MclstexpModel`; ``.save(dir)``,
        :func:`histoexp.tl.load_model`); predict with :func:`histoexp.tl.impute`.
    """
    from ..models.base import ReferenceSpots
    from ..models.bleep import augment_dihedral
    from ..models.mclstexp import MclstexpModel, grid_positions, mclstexp_loss, spot_positions
    from ..train import gather_batch

    if sentence not in SENTENCES:
        raise ValueError(f"`sentence` must be one of {SENTENCES}, got {sentence!r}.")
    for name, v in {"n_layers": n_layers, "n_heads": n_heads, "head_dim": head_dim, "grid_size": grid_size}.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if name == "n_layers" else 1):
            raise ValueError(f"`{name}` must be a {'non-negative' if name == 'n_layers' else 'positive'} integer, "
                             f"got {v!r}.")  # fmt: skip
    check_positive(projection_dim=projection_dim)
    if not isinstance(image_weight, (int, float)) or not 0 <= image_weight <= 1:
        raise ValueError(f"`image_weight` must be in [0, 1], got {image_weight!r}.")
    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
    positions, position_source = spot_positions(adata, coords_key, positions)

    img_key, expr_key = f"X_{key_added}_image", f"X_{key_added}_expression"
    hp = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
    hp.update(patience=patience, n_ensemble=n_ensemble)
    data = prepare_fit(
        adata,
        method="mclSTExp",
        key_added=key_added,
        out_obsm=(img_key, expr_key),
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
    sections = None if data.library_key is None else adata.obs[data.library_key].astype(str).to_numpy()
    codes = np.zeros(adata.n_obs, dtype=np.int64) if sections is None else np.unique(sections, return_inverse=True)[1]
    grid = grid_positions(positions, sections, size=grid_size)
    settings = {
        "sentence": sentence,
        "sentence_size": int(data.hp["batch_size"]),
        "n_layers": int(n_layers),
        "n_heads": int(n_heads),
        "head_dim": int(head_dim),
        "image_weight": float(image_weight),
        "projection_dim": int(projection_dim),
        "grid_size": int(grid_size),
        "coords_key": coords_key,
        "positions": position_source,
    }
    data.config.update(settings)
    data.config["augment"] = bool(augment) if not frozen else None  # a setting of the training (resume checks it)
    set_n_pcs(data, n_pcs)

    def make_net():
        net = MclstexpModel.build_net(data.config, None if frozen else data.new_encoder())
        if frozen:
            net.features.fit(data.images[data.train_idx], random_state=random_state)
        return net

    def loss_fn(net, batch):
        x = batch["image"]
        if not frozen:
            x = data.preprocess(augment_dihedral(x) if net.training and augment else x)
        # under DDP with split batches the sentence is the whole global batch: every rank runs the spot
        # transformer over all of it (attention spans the sentence) and contrasts against every rank's images,
        # so the averaged gradient is the one-process one; in one process gather_batch returns its input
        sentence = gather_batch(batch["expression"]), gather_batch(batch["coords"])
        spots = net.encode_spots(*sentence)
        return mclstexp_loss(gather_batch(net.encode_image(x)), spots, float(image_weight))

    sampler = None
    if sentence == "spatial":
        train_sections = None if sections is None else sections[data.train_idx]
        sampler = spatial_sentences(positions[data.train_idx], train_sections, data.hp["batch_size"])
    nets, history = train_members(
        data,
        make_net,
        loss_fn,
        desc="mclSTExp",
        random_state=random_state,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        datasets=data.datasets(coords=grid.astype(np.float32)),
        batch_sampler=sampler,
    )
    params = {**settings, "augment": bool(augment) if not frozen else None}
    data.config.update(params={**data.params, **params}, history=history)
    arrays = None
    if keep_reference:
        arrays = {
            "reference_expression": data.expr,
            "reference_coords": positions.astype(np.float32),
            "reference_sections": codes,
        }
    model = MclstexpModel(nets, data.config, preprocess=data.preprocess, arrays=arrays)
    obsm = {
        img_key: model.encode_images(data.images, batch_size=data.hp["batch_size"]),
        expr_key: model.encode_reference(ReferenceSpots(data.expr, positions, codes.astype(str))),
    }
    params["mode"] = data.mode
    params["n_pcs"] = data.config["n_pcs"]
    write_fit_keys(data, key_added, params=params, history=history, obsm=obsm)
    return model
