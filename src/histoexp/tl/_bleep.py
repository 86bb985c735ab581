"""BLEEP: ``fit_bleep``, contrastive training of an image and an expression projection head."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from anndata import AnnData

from .._utils import one_progress_bar
from ._crossfit import supports_crossfit
from ._fit import check_positive, prepare_fit, set_n_pcs, train_members, write_fit_keys

if TYPE_CHECKING:  # pragma: no cover
    from ..models.bleep import BleepModel

#: Defaults for training on frozen features (CPU): BLEEP's lr / weight decay / batch size, with early stopping.
#: Checked by inner leave-one-section-out on C3..C6 of her2st (train 3, validate 1; C2 never used): temperature
#: 0.3/10/30, dropout 0.3, weight decay 1e-2, projection_dim 64, batch 128 and lr 1e-4 were not better.
#: ``n_ensemble=5``: five heads trained from seeds ``random_state + i``, predictions averaged (see ``fit_bleep``).
FROZEN_DEFAULTS = {"epochs": 100, "batch_size": 256, "lr": 1e-3, "weight_decay": 1e-3, "patience": 10, "n_ensemble": 5}
#: Defaults for end-to-end fine-tuning of the image encoder (GPU; BLEEP trains ResNet-50 with these).
FINETUNE_DEFAULTS = {"epochs": 30, "batch_size": 128, "lr": 1e-4, "weight_decay": 1e-3, "patience": 5, "n_ensemble": 1}


@one_progress_bar("fit_bleep")
@supports_crossfit()
def fit_bleep(
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
    projection_dim: int = 256,
    temperature: float = 1.0,
    dropout: float = 0.1,
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
    patches_key: str = "patches",
    augment: bool = True,
    keep_reference: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    key_added: str = "bleep",
    overwrite: bool = False,
    random_state: int = 0,
    device: str | None = None,
) -> BleepModel:
    """Train BLEEP: contrastive alignment of spot images and spot expression.

    BLEEP (Xie et al., NeurIPS 2023; github.com/bowang-lab/BLEEP) maps an image patch and the
    expression of the same spot into one space: image encoder -> projection head, expression ->
    projection head (:class:`~histoexp.models.heads.ProjectionHead`: Linear -> GELU -> Linear ->
    dropout, residual, LayerNorm; 256 dims). The loss is BLEEP's symmetric cross-entropy with *soft*
    targets: ``logits = spot @ image.T / temperature``, ``targets = softmax((image @ image.T + spot @
    spot.T) / 2 * temperature)``, mean of the cross-entropies of ``(logits, targets)`` and
    ``(logits.T, targets.T)`` (:func:`~histoexp.models.bleep.bleep_loss`). Embeddings are not
    L2-normalised in the loss (as the reference); retrieval in :func:`impute` uses cosine similarity
    (as the reference's ``find_matches``).

    Two modes:

    - frozen features (``finetune_encoder=False``, default on CPU): the image branch reads
      ``obsm[use_rep]`` (``None``: ``obsm[f'X_{encoder}']`` from :func:`histoexp.tl.embed_patches`),
      standardised per feature with the training spots' mean and std; only the heads train.
    - end to end (``finetune_encoder=True``, default on GPU): patches from
      :func:`histoexp.pp.get_patches` go through ``get_encoder(encoder, weights=weights)``, trained with
      the heads, with BLEEP's augmentation (random flips and 90° rotations).

    Deviations from the reference implementation, on purpose:

    - targets are log1p(normalize_total 1e4) expression of ``genes`` (default: highly variable genes)
      without Harmony batch correction (the reference trains on Harmony-corrected HVG expression);
    - the validation split is by section (or spatial stripes for one section, see
      :func:`histoexp.train.split_by_library`), not a random 80/20 split of spots; training stops
      early on the validation loss (``patience``) and the best epoch's weights are kept (the reference
      keeps the best epoch too, without stopping);
    - frozen features are standardised (the reference always fine-tunes, with no frozen mode);
    - patches are normalised by the encoder's own transform (ImageNet statistics for torchvision
      models; the reference feeds raw 0-255 BGR pixels);
    - defaults for frozen features (CPU) are ``epochs=100, batch_size=256, lr=1e-3,
      weight_decay=1e-3, patience=10, n_ensemble=5`` (lr/wd/batch as the reference); for fine-tuning
      ``epochs=30, batch_size=128, lr=1e-4, weight_decay=1e-3, patience=5, n_ensemble=1``;
    - ensembles (``n_ensemble``; frozen default 5, not in the paper): members are trained
      independently from seeds ``random_state + i`` on the same data and split, and :func:`impute`
      averages their retrieval predictions. On her2st (leave-one-section-out over C2..C6, handcrafted
      features) one model is on par with ridge regression (mean PCC 0.120 vs 0.122); five members
      lift it to 0.129, because a single contrastive head trained on ~550 spots is noisy and
      averaging removes that variance (``benchmarks/her2st_bleep.py``);
    - optional PCA of frozen features (``n_pcs``, default off; not in the paper; sklearn's PCA of the
      standardised training features, whitened): high-dimensional
      features (e.g. 2048-d ResNet-50) with few training spots overfit the image head; on her2st
      ResNet-50 (random weights) ``n_pcs=8`` (chosen by inner leave-one-section-out on C3..C6)
      raises the mean PCC from 0.079 to above ridge. It does not help the 37 handcrafted features.

    On CPU, frozen-feature training runs with one torch thread (restored afterwards): the heads are
    small, a second thread brings nothing, and when another process is busy it makes training
    several times slower.

    Parameters
    ----------
    adata
        Training spots with counts (``X`` or ``layers[layer]``), and image features in
        ``obsm[use_rep]`` or patches under ``patches_key``. Several sections in ``obs[library_key]``.
    genes
        Expression encoder input genes, resolved by :func:`histoexp.pp.select_genes` (list,
        ``'her2st'``, ``'all'``, int = that many HVGs, ``None`` = 250 HVGs).
    layer
        Layer with counts instead of ``X``.
    normalize
        ``'log1p'`` (normalize_total 1e4 + log1p; default) or ``'none'`` (already log-normalised).
    use_rep
        ``obsm`` key of frozen image features (frozen mode).
    encoder, weights
        Image encoder registry name and weights (finetune mode), or the name whose ``X_<encoder>``
        embeddings are used when ``use_rep`` is ``None`` (frozen mode).
    encoder_kwargs
        More arguments of :func:`histoexp.models.get_encoder` for finetune mode, JSON-able (saved with
        the model), e.g. ``{'transform': {'input_size': 64}}`` to train at low resolution on CPU.
    finetune_encoder
        ``None``: ``True`` on CUDA, ``False`` otherwise.
    projection_dim, temperature, dropout
        BLEEP settings (256, 1.0, 0.1 as the reference).
    n_pcs
        Frozen features only: project the standardised features onto their first ``n_pcs``
        principal components (computed on the training spots, scaled to unit variance, saved with
        the model) before the image head. ``None``: use the standardised features as they are.
    n_ensemble
        Number of independently trained models (seeds ``random_state + i``) whose retrieval
        predictions :func:`impute` averages; ``None``: 5 with frozen features, 1 for fine-tuning.
        Training time grows linearly with it.
    epochs, batch_size, lr, weight_decay, patience
        Training settings; ``None``: :data:`FROZEN_DEFAULTS` or :data:`FINETUNE_DEFAULTS`.
    val_fraction
        Fraction of sections (or of one section's spots, in a spatial stripe) used for validation
        and early stopping; ``0`` trains on everything for ``epochs`` epochs.
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
        Keep the training expression of the model genes in the model as the default reference
        of :func:`impute` (saved with it; 4 bytes × spots × genes).
    checkpoint_dir, resume
        Checkpoint after every epoch and resume after an interruption (see :func:`histoexp.train.fit`);
        ensemble members use the subfolders ``member0``, ``member1``, ...
    key_added
        Writes ``obsm[f'X_{key_added}_image']``, ``obsm[f'X_{key_added}_expression']`` (embeddings of
        every spot of ``adata``; for an ensemble the members' L2-normalised embeddings concatenated,
        see :meth:`~histoexp.models.base.RetrievalModel.join`) and ``uns[key_added]``
        (``params``, ``genes``, ``history``; an ensemble's history is member 0's, with all members'
        under ``'members'`` keyed ``'0'``, ``'1'``, ...).
    overwrite
        Replace those keys when histoexp did not write them (a re-run replaces the keys this function wrote without it).
    random_state
        Seed of the initialisation, split, shuffling and dropout: the same seed on the same device
        gives the same model.
    device
        Torch device (``None``: ``hx.settings.device``).

    Returns
    -------
    BleepModel
        The fitted retrieval model (:class:`~histoexp.models.bleep.BleepModel`; ``.save(dir)``,
        :func:`histoexp.tl.load_model`); predict with :func:`histoexp.tl.impute`.
    """
    from ..models.bleep import BleepModel, augment_dihedral, bleep_loss
    from ..train import gather_batch

    check_positive(projection_dim=projection_dim, temperature=temperature)
    if not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
    img_key, expr_key = f"X_{key_added}_image", f"X_{key_added}_expression"
    hp = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
    hp.update(patience=patience, n_ensemble=n_ensemble)
    data = prepare_fit(
        adata,
        method="BLEEP",
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
    set_n_pcs(data, n_pcs)
    data.config.update(projection_dim=int(projection_dim), dropout=float(dropout), temperature=float(temperature))
    data.config["augment"] = bool(augment) if not frozen else None  # a setting of the training (resume checks it)

    def make_net():
        net = BleepModel.build_net(data.config, None if frozen else data.new_encoder())
        if frozen:
            net.features.fit(data.images[data.train_idx], random_state=random_state)
        return net

    def loss_fn(net, batch):
        x = batch["image"]
        if not frozen:
            x = data.preprocess(augment_dihedral(x) if net.training and augment else x)
        # under torchrun: the whole global batch as in-batch negatives (identity in one process)
        img, spot = gather_batch(net.encode_image(x)), gather_batch(net.encode_expression(batch["expression"]))
        return bleep_loss(img, spot, net.temperature)

    nets, history = train_members(
        data, make_net, loss_fn, desc="BLEEP", random_state=random_state, checkpoint_dir=checkpoint_dir, resume=resume
    )
    params = {"augment": bool(augment) if not frozen else None}
    data.config.update(params={**data.params, **params}, history=history)
    arrays = {"reference_expression": data.expr} if keep_reference else None
    model = BleepModel(nets, data.config, preprocess=data.preprocess, arrays=arrays)
    obsm = {
        img_key: model.encode_images(data.images, batch_size=data.hp["batch_size"]),
        expr_key: model.encode_expression(data.expr),
    }
    params.update({k: data.config[k] for k in ("mode", "projection_dim", "temperature", "dropout", "n_pcs")})
    write_fit_keys(data, key_added, params=params, history=history, obsm=obsm)
    return model
