"""BLEEP: ``fit_bleep`` (contrastive training), ``impute`` (retrieval of reference expression), ``load_model``."""

from __future__ import annotations

import copy as _copy
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._settings import logger, settings
from .._utils import check_key_free, jsonable

if TYPE_CHECKING:  # pragma: no cover
    from ..models.bleep import BleepModel

#: Defaults for training on frozen features (CPU): BLEEP's lr / weight decay / batch size, with early stopping.
#: Checked by inner leave-one-section-out on C3..C6 of her2st (train 3, validate 1; C2 never used): temperature
#: 0.3/10/30, dropout 0.3, weight decay 1e-2, projection_dim 64, batch 128 and lr 1e-4 were not better.
#: ``n_ensemble=5``: five heads trained from seeds ``random_state + i``, predictions averaged (see ``fit_bleep``).
FROZEN_DEFAULTS = {"epochs": 100, "batch_size": 256, "lr": 1e-3, "weight_decay": 1e-3, "patience": 10, "n_ensemble": 5}
#: Defaults for end-to-end fine-tuning of the image encoder (GPU; BLEEP trains ResNet-50 with these).
FINETUNE_DEFAULTS = {"epochs": 30, "batch_size": 128, "lr": 1e-4, "weight_decay": 1e-3, "patience": 5, "n_ensemble": 1}


def _embedding_record(adata: AnnData, rep: str) -> dict | None:
    rec = adata.uns.get("histoexp", {}).get("embeddings", {}).get(rep)
    return dict(rec) if rec is not None else None


def _default_library_key(adata: AnnData, library_key: str | None) -> str | None:
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(f"`library_key={library_key!r}` is not a column of adata.obs.")
        return library_key
    return "library_id" if "library_id" in adata.obs else None


class _PatchExpr:
    """Dataset of (uint8 patch, expression) pairs read from a PatchSource."""

    def __init__(self, src, expr: np.ndarray, rows: np.ndarray):
        self.src, self.expr, self.rows = src, expr, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        import torch

        r = int(self.rows[i])
        return torch.from_numpy(np.ascontiguousarray(self.src[r])), torch.from_numpy(self.expr[r])


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
    projection head (:class:`~histoexp.models.bleep.ProjectionHead`: Linear -> GELU -> Linear ->
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
    - optional PCA of frozen features (``n_pcs``, default off; not in the paper): high-dimensional
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
        see :meth:`~histoexp.models.bleep.BleepModel.encode_images`) and ``uns[key_added]``
        (``params``, ``genes``, ``history``; an ensemble's history is member 0's, with all members'
        under ``'members'``).
    overwrite
        Replace those keys if they exist.
    random_state
        Seed of the initialisation, split, shuffling and dropout: the same seed on the same device
        gives the same model.
    device
        Torch device (``None``: ``hx.settings.device``).

    Returns
    -------
    BleepModel
        The fitted model (:class:`~histoexp.models.bleep.BleepModel`; ``.save(dir)``,
        ``BleepModel.load(dir)``).
    """
    import torch

    from ..models.bleep import BleepModel, BleepNet, augment_dihedral
    from ..pp import expression_matrix, select_genes
    from ..train import fit, split_by_library, torch_threads

    img_key, expr_key = f"X_{key_added}_image", f"X_{key_added}_expression"
    for key in (img_key, expr_key):
        check_key_free(adata.obsm, key, where="adata.obsm", overwrite=overwrite)
    check_key_free(adata.uns, key_added, where="adata.uns", overwrite=overwrite)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}.")
    dev = settings.resolve_device(device)
    if finetune_encoder is None:
        finetune_encoder = dev.type == "cuda"
    hp = dict(FINETUNE_DEFAULTS if finetune_encoder else FROZEN_DEFAULTS)
    for name, val in (
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("lr", lr),
        ("weight_decay", weight_decay),
        ("patience", patience),
        ("n_ensemble", n_ensemble),
    ):
        if val is not None:
            hp[name] = val
    if int(hp["n_ensemble"]) < 1:
        raise ValueError(f"`n_ensemble` must be >= 1, got {hp['n_ensemble']}.")
    hp["n_ensemble"] = int(hp["n_ensemble"])
    if n_pcs is not None and finetune_encoder:
        raise ValueError("`n_pcs` applies to frozen features only (finetune_encoder=False).")
    library_key = _default_library_key(adata, library_key)

    gene_list = select_genes(adata, genes, layer=layer)
    expr = expression_matrix(adata, gene_list, layer=layer, normalize=normalize)
    coords = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2] if "spatial" in adata.obsm else None
    train_idx, val_idx = split_by_library(
        adata.obs, library_key, val_fraction=val_fraction, random_state=random_state, coords=coords
    )

    config: dict = {
        "genes": gene_list,
        "layer": layer,
        "normalize": normalize,
        "target_sum": 1e4,
        "projection_dim": int(projection_dim),
        "dropout": float(dropout),
        "temperature": float(temperature),
        "n_pcs": None if n_pcs is None else int(n_pcs),
        # training mean of the model genes (target of impute(center_reference=...))
        "expression_mean": expr.mean(0).astype(float).round(6).tolist(),
    }
    preprocess = None
    if not finetune_encoder:
        rep = use_rep if use_rep is not None else f"X_{encoder}"
        if rep not in adata.obsm:
            hint = (
                f"run hx.tl.embed_patches(adata, encoder={encoder!r}) first, "
                if use_rep is None
                else "compute the features first, "
            )
            raise KeyError(
                f"Frozen-feature BLEEP needs image features in adata.obsm[{rep!r}], which is missing "
                f"(obsm has {list(adata.obsm)}): {hint}pass `use_rep=`, or `finetune_encoder=True`."
            )
        feats = np.asarray(adata.obsm[rep], dtype=np.float32)
        if feats.ndim != 2 or not np.isfinite(feats).all():
            raise ValueError(f"adata.obsm[{rep!r}] must be a finite 2-d array, got shape {feats.shape}.")
        max_pcs = min(feats.shape[1], len(train_idx))
        if n_pcs is not None and not 1 <= n_pcs <= max_pcs:
            raise ValueError(f"`n_pcs` must be in [1, {max_pcs}] (features, training spots), got {n_pcs}.")

        def make_net():
            net = BleepNet(
                feats.shape[1],
                len(gene_list),
                projection_dim=projection_dim,
                dropout=dropout,
                temperature=temperature,
                n_pcs=n_pcs,
            )
            net.set_feature_statistics(feats[train_idx])
            return net

        x_all = torch.from_numpy(feats)
        e_all = torch.from_numpy(expr)
        train_ds = (x_all[train_idx], e_all[train_idx])
        val_ds = (x_all[val_idx], e_all[val_idx]) if len(val_idx) else None
        config.update(
            mode="frozen", use_rep=rep, feature_dim=int(feats.shape[1]), embedding=_embedding_record(adata, rep)
        )
        config["encoder"] = {"name": (config["embedding"] or {}).get("encoder", encoder if use_rep is None else None)}

        def loss_fn(model, batch):
            return model(batch[0], batch[1])

        images_for_embedding = feats
    else:
        from ..models.encoders import get_encoder
        from ..pp import get_patches

        src = get_patches(adata, key=patches_key)
        enc_info: dict = {}

        def make_net():
            enc = get_encoder(encoder, weights=weights, **(encoder_kwargs or {}))
            if not enc.trainable:
                raise ValueError(f"Encoder {encoder!r} is not trainable: use finetune_encoder=False (frozen features).")
            for p in enc.module.parameters():
                p.requires_grad_(True)
            enc_info.update(enc=enc)
            return BleepNet(
                int(enc.dim),
                len(gene_list),
                projection_dim=projection_dim,
                dropout=dropout,
                temperature=temperature,
                encoder=enc.module,
            )

        train_ds = _PatchExpr(src, expr, train_idx)
        val_ds = _PatchExpr(src, expr, val_idx) if len(val_idx) else None

        def loss_fn(model, batch):
            x = batch[0]
            if model.training and augment:
                x = augment_dihedral(x)
            return model(preprocess(x), batch[1])

        images_for_embedding = src

    # ensemble members: member i is initialised, shuffled and dropped out from seed random_state + i
    # (member 0 is exactly the single model of the same seed); same split and data for all members
    # the heads on frozen features are small: one CPU thread is as fast as two, and far faster when
    # another process is busy (see train.torch_threads)
    with torch_threads(1 if not finetune_encoder and dev.type == "cpu" else None):
        nets, histories = [], []
        for member in range(hp["n_ensemble"]):
            seed = random_state + member
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = make_net()
            if finetune_encoder and member == 0:
                enc = enc_info["enc"]
                preprocess = enc.preprocess
                geometry = dict(adata.uns.get("histoexp", {}).get(patches_key, {}))
                geometry.pop("libraries", None)
                config.update(
                    mode="finetune",
                    use_rep=None,
                    feature_dim=int(enc.dim),
                    embedding=None,
                    encoder={
                        "name": enc.name,
                        "key": enc.config.get("encoder", encoder),
                        "weights": weights if isinstance(weights, str) or weights is None else "custom",
                        "kwargs": dict(encoder_kwargs or {}),
                        "config": enc.config,
                    },
                    patches={"key": patches_key, **geometry},
                )
            ckpt = checkpoint_dir
            if checkpoint_dir is not None and hp["n_ensemble"] > 1:
                ckpt = os.path.join(os.fspath(checkpoint_dir), f"member{member}")
            histories.append(
                fit(
                    net,
                    train_ds,
                    val_ds,
                    loss_fn=loss_fn,
                    epochs=hp["epochs"],
                    batch_size=hp["batch_size"],
                    lr=hp["lr"],
                    weight_decay=hp["weight_decay"],
                    patience=hp["patience"],
                    device=dev,
                    random_state=seed,
                    checkpoint_dir=ckpt,
                    resume=resume,
                    desc="BLEEP" if hp["n_ensemble"] == 1 else f"BLEEP {member + 1}/{hp['n_ensemble']}",
                )
            )
            nets.append(net)
    history = dict(histories[0])
    if len(histories) > 1:
        history["members"] = histories
    params = {
        **hp,
        "finetune_encoder": bool(finetune_encoder),
        "val_fraction": val_fraction,
        "library_key": library_key,
        "random_state": random_state,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "augment": bool(augment) if finetune_encoder else None,
        "device": str(dev),
    }
    if library_key is not None:
        labels = adata.obs[library_key].astype(str).to_numpy()
        params["val_libraries"] = sorted(set(labels[val_idx].tolist()))
    config["params"] = params
    config["history"] = history
    config = jsonable(config)
    model = BleepModel(nets, config, reference=expr if keep_reference else None, preprocess=preprocess)

    adata.obsm[img_key] = model.encode_images(images_for_embedding, batch_size=hp["batch_size"])
    adata.obsm[expr_key] = model.encode_expression(expr)
    adata.uns[key_added] = jsonable(
        {
            "params": {
                **params,
                **{
                    k: config.get(k)
                    for k in ("mode", "use_rep", "normalize", "projection_dim", "temperature", "dropout", "n_pcs")
                },
                "layer": layer,
            },
            "genes": gene_list,
            "history": history,
        }
    )
    logger.info(
        "BLEEP trained for %d epochs (best %s, val loss %s).",
        history["epochs_run"],
        history["best_epoch"],
        history["best_val_loss"],
    )
    return model


def load_model(path: str | os.PathLike, *, device: str | None = None):
    """Load any histoexp model folder, dispatching on ``config.json``'s ``'method'``.

    Parameters
    ----------
    path
        Folder written by a model's ``.save``.
    device
        Move the weights there (``None``: CPU).
    """
    from ..models import _io
    from ..models.bleep import BleepModel

    registry = {"bleep": BleepModel}
    method = _io.read_config(path).get("method")
    if method not in registry:
        raise ValueError(f"{path}: unknown model method {method!r} (known: {sorted(registry)}).")
    return registry[method].load(path, device=device)


def _query_images(query: AnnData, model: BleepModel, patches_key: str | None):
    """Return what the model's image branch reads from the query (features or patches), with clear errors."""
    cfg = model.config
    if model.mode == "frozen":
        rep = model.use_rep
        enc = (cfg.get("encoder") or {}).get("name")
        if rep not in query.obsm:
            how = f"hx.tl.embed_patches(query, encoder={enc!r}, weights=...)" if enc else "the same feature extraction"
            raise KeyError(
                f"The model reads image features from obsm[{rep!r}], which the query lacks "
                f"(query obsm: {list(query.obsm)}). Compute them with {how} as for the training data."
            )
        feats = np.asarray(query.obsm[rep], dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != cfg["feature_dim"]:
            raise ValueError(
                f"query.obsm[{rep!r}] has shape {feats.shape}; "
                f"the model expects {cfg['feature_dim']} features per spot."
            )
        q_rec, m_rec = _embedding_record(query, rep), cfg.get("embedding")
        if q_rec and m_rec:
            for field in ("encoder", "weights", "random_init"):
                if field in q_rec and field in m_rec and str(q_rec[field]) != str(m_rec[field]):
                    raise ValueError(
                        f"query.obsm[{rep!r}] was computed with {field}={q_rec[field]!r} but the model was trained on "
                        f"{field}={m_rec[field]!r}: re-embed the query with the model's encoder."
                    )
        return feats
    from ..pp import get_patches

    key = patches_key or (cfg.get("patches") or {}).get("key", "patches")
    try:
        src = get_patches(query, key=key)
    except (KeyError, ValueError) as err:
        geo = cfg.get("patches") or {}
        raise KeyError(
            f"The model was fine-tuned end to end and reads patches, but the query has none under {key!r} ({err}). "
            f"Run hx.pp.extract_patches(query, size_um={geo.get('size_um')}, mpp={geo.get('mpp')}, "
            f"patch_px={geo.get('patch_px')}) first."
        ) from err
    geo = cfg.get("patches") or {}
    for field in ("patch_px", "mpp"):
        want, got = geo.get(field), getattr(src, field, None)
        if want is not None and got is not None and not np.isclose(float(want), float(got)):
            logger.warning("Query patches have %s=%s but the model was trained with %s.", field, got, want)
    return src


def _center_sections(x: np.ndarray, labels: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per section (label): subtract the section's per-gene mean, add ``target``."""
    out = np.empty_like(x)
    for lab in np.unique(labels):
        m = labels == lab
        out[m] = x[m] - x[m].mean(0) + target
    return out


def _reference_bank(model, reference, genes, layer, center=None):
    """(bank expression of the model genes, output values, output gene names) from the reference(s)."""
    from ..pp import expression_matrix

    mgenes = model.genes
    if reference is None:
        if model.reference is None:
            raise ValueError(
                "The model keeps no reference expression (fit_bleep(keep_reference=False)): pass `reference=`."
            )
        if genes is None or (isinstance(genes, str) and genes == "all"):
            out = mgenes
        else:
            out = [genes] if isinstance(genes, str) else list(genes)
            miss = [g for g in out if g not in mgenes]
            if miss:
                raise KeyError(
                    f"{len(miss)} of {len(out)} requested genes are not in the model's stored reference "
                    f"(e.g. {miss[:5]}); pass `reference=` AnnData(s) that contain them."
                )
        cols = [mgenes.index(g) for g in out]
        return model.reference, model.reference[:, cols], list(out)
    refs = [reference] if isinstance(reference, AnnData) else list(reference)
    if not refs or not all(isinstance(r, AnnData) for r in refs):
        raise TypeError("`reference` must be an AnnData or a list of AnnData.")
    for i, r in enumerate(refs):
        miss = [g for g in mgenes if g not in r.var_names]
        if miss:
            raise ValueError(
                f"Reference {i} lacks {len(miss)} of the model's {len(mgenes)} genes (e.g. {miss[:5]}); "
                "the expression encoder needs all of them."
            )
    common = [g for g in refs[0].var_names if all(g in r.var_names for r in refs[1:])]
    if genes is None:
        out = mgenes
    elif isinstance(genes, str) and genes == "all":
        out = common
    else:
        out = [genes] if isinstance(genes, str) else list(dict.fromkeys(genes))
        miss = [g for g in out if g not in common]
        if miss:
            raise KeyError(f"{len(miss)} of {len(out)} requested genes are not in every reference (e.g. {miss[:5]}).")
    norm, ts = model.config.get("normalize", "log1p"), model.config.get("target_sum", 1e4)
    bank = np.concatenate([expression_matrix(r, mgenes, layer=layer, normalize=norm, target_sum=ts) for r in refs])
    if list(out) == list(mgenes):
        values = bank
    else:
        values = np.concatenate([expression_matrix(r, out, layer=layer, normalize=norm, target_sum=ts) for r in refs])
    if center:
        labels = np.concatenate(
            [
                np.char.add(f"{i}:", r.obs[center].astype(str).to_numpy().astype(str))
                if isinstance(center, str) and center in r.obs
                else np.full(r.n_obs, f"{i}:")
                for i, r in enumerate(refs)
            ]
        )
        train_mean = model.config.get("expression_mean")
        if train_mean is None:
            raise ValueError("`center_reference` needs the model's training mean (models fitted by histoexp >= 0.2).")
        train_mean = np.asarray(train_mean, dtype=np.float32)
        same = list(out) == list(mgenes)
        bank = _center_sections(bank, labels, train_mean)
        if same:
            values = bank
        else:
            pos = {g: i for i, g in enumerate(mgenes)}
            target = values.mean(0)
            for j, g in enumerate(out):
                if g in pos:
                    target[j] = train_mean[pos[g]]
            values = _center_sections(values, labels, target)
    return bank, values, list(out)


def impute(
    query: AnnData,
    model: BleepModel | str | os.PathLike,
    *,
    reference: AnnData | Sequence[AnnData] | None = None,
    genes: Sequence[str] | str | None = None,
    k: int = 50,
    method: Literal["simple", "average", "weighted"] = "average",
    key_added: str = "bleep",
    layer: str | None = None,
    center_reference: str | bool | None = None,
    patches_key: str | None = None,
    batch_size: int = 256,
    chunk_size: int | None = None,
    overwrite: bool = False,
    copy: bool = False,
    device: str | None = None,
) -> AnnData | None:
    """Predict expression of query spots from their images by retrieval of reference expression (BLEEP).

    Each query spot's image embedding is matched (cosine similarity) against the expression
    embeddings of the reference spots; the prediction aggregates the expression of the ``k`` best
    matches (an ensemble model retrieves with each member and averages the predictions). The reference
    needs no image: count-only sections can extend it (see ``center_reference``). Retrieval is chunked
    (see :func:`histoexp.tl._retrieval.retrieve`): memory per chunk is bounded (256 MiB of similarities
    by default), so a million query spots fit in RAM (the output itself is ``4 × n_spots × n_genes`` bytes).

    Parameters
    ----------
    query
        Spots to predict. Frozen-feature model: ``obsm[model.use_rep]`` computed with the same encoder
        and weights as the training data (checked against ``uns['histoexp']['embeddings']``);
        fine-tuned model: patches (``hx.pp.extract_patches``) with the training geometry.
    model
        A :class:`~histoexp.models.bleep.BleepModel` or a model folder.
    reference
        AnnData or list of AnnData with counts (``X`` or ``layers[layer]``) holding every model gene
        (an error says how many are missing). ``None``: the training spots kept in the model
        (then only model genes can be predicted). For an honest evaluation the query section must not
        be in the reference.
    genes
        Output genes. ``None``: the model genes; ``'all'``: every reference gene (for a list, those
        common to all references); a list: those genes (must be in the reference).
    k
        Neighbours for ``'average'``/``'weighted'`` (BLEEP: 50).
    method
        ``'simple'`` (nearest reference spot), ``'average'`` (mean of the top ``k``) or ``'weighted'``
        (top ``k`` weighted by ``softmax(-squared Euclidean distance)`` of the unnormalised
        embeddings, as BLEEP's ``weighted_average``).
    key_added
        Predictions in ``layers[key_added]``, confidence in ``obs[f'{key_added}_confidence']`` = mean
        cosine similarity between the query image embedding and the expression embeddings of the
        neighbours used (in [-1, 1]; higher = closer matches), parameters in
        ``uns[key_added]['impute']``.
    layer
        Layer with the references' counts.
    center_reference
        Linear batch correction of ``reference`` (not in the BLEEP paper, which Harmony-corrects its
        training data instead): each reference section's log-expression is centred per gene and
        shifted to the model's training mean, both as encoder input and as predicted values
        (output genes outside the model's genes are shifted to the pooled reference mean).
        A string names the ``obs`` column of the sections (an AnnData without it counts as one
        section); ``True``: each reference AnnData is one section; ``None``: off. Use it when
        the reference holds other patients or sequencing depths (e.g. count-only sections): on
        her2st it removes the MSE inflation of a 30-section bank (``benchmarks/her2st_bleep.py``).
    patches_key
        Patches key of the query (fine-tuned model; ``None``: the model's).
    batch_size
        Spots per forward pass of the image encoder.
    chunk_size
        Query spots per retrieval block (``None``: automatic, ~256 MiB of similarities).
    overwrite
        Replace existing ``layers[key_added]`` / ``obs`` confidence.
    copy
        Return a modified copy instead of writing into ``query``.
    device
        Torch device (``None``: ``hx.settings.device``).

    Returns
    -------
    None or AnnData
        If the query has (some of) the predicted genes in ``var``: ``layers[key_added]`` is aligned
        to ``query.var`` (NaN for query genes not predicted; predicted genes absent from the query
        are dropped with a warning) and ``None`` is returned (the copy with ``copy=True``).

        If the query has none of them (e.g. an H&E-only query with ``n_vars == 0`` from
        :func:`histoexp.pp.tile_tissue`): a **new** AnnData whose ``var`` are the predicted genes,
        with the predictions in ``X`` and ``layers[key_added]`` and ``obs``, ``obsm``, ``obsp`` and
        ``uns`` carried over; ``query`` is not modified.
    """
    from ..models.bleep import BleepModel
    from ._retrieval import METHODS, retrieve

    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if not isinstance(model, BleepModel):
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model)
        else:
            raise TypeError(f"`model` must be a BleepModel or a model folder, got {type(model).__name__}.")
    conf_key = f"{key_added}_confidence"
    images = _query_images(query, model, patches_key)
    if center_reference and reference is None:
        raise ValueError("`center_reference` applies to an explicit `reference=`, not to the model's stored one.")
    bank_in, values, out_genes = _reference_bank(model, reference, genes, layer, center=center_reference)
    qgenes = pd.Index(query.var_names)
    cols = qgenes.get_indexer(out_genes)
    in_place = query.n_vars > 0 and (cols >= 0).any()
    if in_place:
        target = query.copy() if copy else query
        check_key_free(target.layers, key_added, where="query.layers", overwrite=overwrite)
        check_key_free(target.obs, conf_key, where="query.obs", overwrite=overwrite)

    dev = settings.resolve_device(device)
    model.to(dev)
    # an ensemble retrieves with every member and averages the predictions (and confidences)
    pred, conf = None, None
    for member in range(model.n_ensemble):
        q_emb = model.encode_images(images, batch_size=batch_size, member=member)
        bank_emb = model.encode_expression(bank_in, member=member)
        p, c = retrieve(q_emb, bank_emb, values, k=k, method=method, chunk_size=chunk_size, device=dev)
        if pred is None:
            pred, conf = p, c
        else:
            pred += p
            conf += c
    if model.n_ensemble > 1:
        pred /= model.n_ensemble
        conf /= model.n_ensemble
    params = jsonable(
        {
            "method": method,
            "k": 1 if method == "simple" else min(k, bank_in.shape[0]),
            "n_reference": int(bank_in.shape[0]),
            "n_ensemble": model.n_ensemble,
            "center_reference": center_reference,
            "reference": "model"
            if reference is None
            else f"{1 if isinstance(reference, AnnData) else len(reference)} AnnData",
            "n_genes": len(out_genes),
            "model_mode": model.mode,
            "use_rep": model.use_rep,
        }
    )

    if in_place:
        keep = cols >= 0
        if (~keep).any():
            logger.warning(
                "%d of %d predicted genes are not in query.var and are dropped (pass a query without var, "
                "or genes=, to get them).",
                int((~keep).sum()),
                len(out_genes),
            )
        full = np.full((target.n_obs, target.n_vars), np.nan, dtype=np.float32)
        full[:, cols[keep]] = pred[:, keep]
        target.layers[key_added] = full
        target.obs[conf_key] = conf
        entry = dict(target.uns.get(key_added, {}))
        entry["impute"] = params
        target.uns[key_added] = entry
        return target if copy else None

    out = AnnData(
        X=pred,
        obs=query.obs.copy(),
        var=pd.DataFrame(index=pd.Index(out_genes, name=None)),
        obsm={k_: np.array(v, copy=True) if isinstance(v, np.ndarray) else v.copy() for k_, v in query.obsm.items()},
        obsp={k_: v.copy() for k_, v in query.obsp.items()},
        uns=_copy.deepcopy(dict(query.uns)),
    )
    out.layers[key_added] = pred
    out.obs[conf_key] = conf
    entry = dict(out.uns.get(key_added, {}))
    entry["impute"] = params
    out.uns[key_added] = entry
    return out
