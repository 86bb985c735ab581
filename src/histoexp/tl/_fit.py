"""The fitting scaffolding every ``fit_<method>`` shares.

:func:`prepare_fit` does once what every method needs before training: check the output keys, resolve the
hyper-parameters (method defaults for frozen features or fine-tuning, user overrides, validation), the
genes and the log-normalised targets, the validation split by section, and the image inputs (frozen
features from ``obsm`` or patches through a trainable encoder). :func:`train_members` trains the ensemble
members through :func:`histoexp.train.fit`; :func:`write_fit_keys` writes ``obsm`` outputs and
``uns[key]`` (``params``, ``genes``, ``history``) in one JSON-able form. A ``fit_<method>`` then holds
only what is specific to it: its network, its loss and its settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from anndata import AnnData

from .._constants import DEFAULT_TARGET_SUM
from .._settings import logger, settings
from .._utils import claim_keys, jsonable, mark_written, progress, resolve_library_key


def _embedding_record(adata: AnnData, rep: str) -> dict | None:
    rec = adata.uns.get("histoexp", {}).get("embeddings", {}).get(rep)
    return dict(rec) if rec is not None else None


_HP_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: isinstance(v, (int, np.integer)) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: isinstance(v, (int, np.integer)) and v >= 2, "an integer >= 2 (in-batch negatives)"),
    "lr": (lambda v: np.isfinite(v) and v > 0, "a positive number"),
    "weight_decay": (lambda v: np.isfinite(v) and v >= 0, "a non-negative number"),
    "patience": (lambda v: v is None or (isinstance(v, (int, np.integer)) and v >= 0), "None or an integer >= 0"),
    "n_ensemble": (lambda v: isinstance(v, (int, np.integer)) and v >= 1, "an integer >= 1"),
}


def check_positive(**values) -> None:
    """Raise a ``ValueError`` naming the argument unless every value is a finite number > 0."""
    for name, v in values.items():
        number = isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
        if not number or not np.isfinite(v) or v <= 0:
            raise ValueError(f"`{name}` must be a positive number, got {v!r}.")


def set_n_pcs(data: FitData, n_pcs: int | None) -> None:
    """Validate ``n_pcs`` (frozen features only, at most the feature and training-spot counts) into the config."""
    if n_pcs is not None:
        if data.mode != "frozen":
            raise ValueError("`n_pcs` applies to frozen features only (finetune_encoder=False).")
        max_pcs = min(data.images.shape[1], len(data.train_idx))
        if isinstance(n_pcs, bool) or not isinstance(n_pcs, (int, np.integer)) or not 1 <= n_pcs <= max_pcs:
            raise ValueError(f"`n_pcs` must be an integer in [1, {max_pcs}] (features, training spots), got {n_pcs}.")
    data.config["n_pcs"] = None if n_pcs is None else int(n_pcs)


def resolve_hparams(defaults: dict, overrides: dict) -> dict:
    """Return the method defaults updated with the user's non-``None`` values, each validated (clear errors)."""
    hp = dict(defaults)
    hp.update({k: v for k, v in overrides.items() if v is not None})
    for name, value in hp.items():
        rule = _HP_RULES.get(name)
        if rule is not None:
            ok = False
            try:
                ok = bool(rule[0](value))
            except TypeError:
                pass
            if not ok or isinstance(value, bool):
                raise ValueError(f"`{name}` must be {rule[1]}, got {value!r}.")
    return hp


@dataclass
class FitData:
    """What :func:`prepare_fit` resolved: targets, split, image inputs, settings and the base config."""

    adata: AnnData
    genes: list[str]
    expr: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    library_key: str | None
    mode: str
    images: Any  # frozen features (n, d) or a patch source
    hp: dict
    device: Any
    config: dict
    coords: np.ndarray | None = None
    params: dict = field(default_factory=dict)
    _encoder_args: tuple | None = None
    preprocess: Any = None
    method: str = ""

    def datasets(self, **kwargs):
        """Training and validation :class:`histoexp.train.SpotDataset` (validation ``None`` when empty)."""
        from ..train import SpotDataset

        def make(rows):
            return SpotDataset(self.images, self.expr, rows=rows, **kwargs)

        return make(self.train_idx), (make(self.val_idx) if len(self.val_idx) else None)

    def new_encoder(self):
        """Build a trainable image encoder (fine-tuning); its config and preprocessing are recorded."""
        from ..models.encoders import get_encoder

        name, weights, kwargs = self._encoder_args
        enc = get_encoder(name, weights=weights, **kwargs)
        if not enc.trainable:
            raise ValueError(f"Encoder {name!r} is not trainable: use finetune_encoder=False (frozen features).")
        for p in enc.module.parameters():
            p.requires_grad_(True)
        self.preprocess = enc.preprocess
        self.config.update(
            feature_dim=int(enc.dim),
            encoder={
                "name": enc.name,
                "key": enc.config.get("encoder", name),
                "weights": weights if isinstance(weights, str) or weights is None else "custom",
                "kwargs": dict(kwargs),
                "config": enc.config,
            },
        )
        return enc.module


def prepare_fit(
    adata: AnnData,
    *,
    method: str,
    key_added: str,
    out_obsm: Sequence[str] = (),
    overwrite: bool = False,
    genes=None,
    layer: str | None = None,
    normalize: str = "log1p",
    use_rep: str | None = None,
    encoder: str = "resnet50",
    weights: str | None = "default",
    encoder_kwargs: dict | None = None,
    finetune_encoder: bool | None = None,
    patches_key: str = "patches",
    library_key: str | None = None,
    val_fraction: float = 0.2,
    random_state: int = 0,
    device: str | None = None,
    defaults: tuple[dict, dict | None],
    hparams: dict,
) -> FitData:
    """Validate and resolve everything a ``fit_<method>`` needs (see the module docs).

    ``defaults`` are the method's hyper-parameters for frozen features and for fine-tuning (``None``: the
    method reads frozen features only); ``hparams`` the user's values (``None`` = default).
    """
    from ..pp import expression_matrix, select_genes
    from ..train import data_fingerprint, split_by_library

    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
    # a re-run replaces the keys a fit wrote; others need overwrite=True
    claim_keys(adata, [*(("obsm", key) for key in out_obsm), ("uns", key_added)], overwrite=overwrite)
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}.")
    if adata.n_obs < 2:
        raise ValueError(f"Training needs at least 2 spots, got {adata.n_obs}.")
    dev = settings.resolve_device(device)
    frozen_defaults, finetune_defaults = defaults
    if finetune_encoder is None:
        finetune_encoder = dev.type == "cuda" and finetune_defaults is not None
    if finetune_encoder and finetune_defaults is None:
        raise ValueError(f"{method} reads frozen features only: finetune_encoder must be False.")
    hp = resolve_hparams(finetune_defaults if finetune_encoder else frozen_defaults, hparams)
    library_key = resolve_library_key(adata, library_key)

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
        "target_sum": DEFAULT_TARGET_SUM,
        # training mean of the model genes (target of impute(center_reference=...))
        "expression_mean": expr.mean(0).astype(float).round(6).tolist(),
    }
    data = FitData(
        adata=adata,
        genes=gene_list,
        expr=expr,
        train_idx=train_idx,
        val_idx=val_idx,
        library_key=library_key,
        mode="finetune" if finetune_encoder else "frozen",
        images=None,
        hp=hp,
        device=dev,
        config=config,
        coords=coords,
        method=method,
    )
    if not finetune_encoder:
        rep = use_rep if use_rep is not None else f"X_{encoder}"
        if rep not in adata.obsm:
            hint = (
                f"run hx.tl.embed_patches(adata, encoder={encoder!r}) first, "
                if use_rep is None
                else "compute the features first, "
            )
            alt = ", or `finetune_encoder=True`" if finetune_defaults is not None else ""
            raise KeyError(
                f"{method} on frozen features needs image features in adata.obsm[{rep!r}], which is missing "
                f"(obsm has {list(adata.obsm)}): {hint}pass `use_rep=`{alt}."
            )
        feats = np.asarray(adata.obsm[rep], dtype=np.float32)
        if feats.ndim != 2 or not np.isfinite(feats).all():
            raise ValueError(f"adata.obsm[{rep!r}] must be a finite 2-d array, got shape {feats.shape}.")
        data.images = feats
        embedding = _embedding_record(adata, rep)
        config.update(mode="frozen", use_rep=rep, feature_dim=int(feats.shape[1]), embedding=embedding)
        config["encoder"] = {"name": (embedding or {}).get("encoder", encoder if use_rep is None else None)}
        config["data_fingerprint"] = data_fingerprint(feats, expr, train_idx, val_idx)
    else:
        from ..pp import get_patches

        data.images = get_patches(adata, key=patches_key)
        data._encoder_args = (encoder, weights, dict(encoder_kwargs or {}))
        geometry = dict(adata.uns.get("histoexp", {}).get(patches_key, {}))
        geometry.pop("libraries", None)
        config.update(mode="finetune", use_rep=None, embedding=None, patches={"key": patches_key, **geometry})
        config["data_fingerprint"] = data_fingerprint(expr, np.asarray(adata.obs_names, dtype=str), train_idx, val_idx)
    data.params = {
        **hp,
        "finetune_encoder": bool(finetune_encoder),
        "val_fraction": val_fraction,
        "library_key": library_key,
        "random_state": random_state,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "device": str(dev),
        "layer": layer,
        "normalize": normalize,
        "use_rep": config.get("use_rep"),
    }
    if library_key is not None:
        labels = adata.obs[library_key].astype(str).to_numpy()
        data.params["val_libraries"] = sorted(set(labels[val_idx].tolist()))
    return data


#: config entries that do not shape a member's training: the data (its own fingerprint), records, results
_NOT_SETTINGS = ("data_fingerprint", "expression_mean", "embedding", "params", "history")
#: hyper-parameters a resume may change: how long to train, and how many members (each has its own checkpoint)
_RESUMABLE_HP = ("epochs", "patience", "n_ensemble")


def training_settings(data: FitData) -> dict:
    """Return what shapes a member's model besides the data: the method's config and the hyper-parameters.

    The config holds the architecture, loss settings (a temperature, a loss weight, ...), genes, normalisation,
    mode and encoder. Stored with each checkpoint by :func:`histoexp.train.fit` (``model_settings``): a resume
    with any of them changed is refused. Generic on purpose: a setting a ``fit_<method>`` writes into
    ``data.config`` before training is covered without listing it here.
    """
    cfg = {k: v for k, v in data.config.items() if k not in _NOT_SETTINGS}
    if isinstance(cfg.get("extra_reps"), dict):  # their features are in the data fingerprint; keep their widths
        cfg["extra_reps"] = {rep: {"dim": (v or {}).get("dim")} for rep, v in cfg["extra_reps"].items()}
    hp = {k: v for k, v in data.hp.items() if k not in _RESUMABLE_HP}
    return jsonable({**cfg, **hp})


def train_members(
    data: FitData,
    make_net: Callable[[], Any],
    loss_fn: Callable[[Any, dict], Any],
    *,
    desc: str,
    random_state: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    datasets: tuple | None = None,
    **fit_kwargs,
) -> tuple[list, dict]:
    """Train ``data.hp['n_ensemble']`` members through :func:`histoexp.train.fit`.

    Member ``i`` is initialised, shuffled and dropped out from seed ``random_state + i`` (member 0 is
    exactly the single model of the same seed), on the same data and split. Checkpoints of an ensemble go
    to ``checkpoint_dir/member{i}``; they record the data fingerprint, so a resume on other data is refused.
    On CPU, frozen-feature training runs with one torch thread (small
    heads gain nothing from a second, and it stalls when another process is busy).

    Returns the trained networks and the history (member 0's, with every member's under ``'members'``
    keyed by member number, so it stays storable in ``uns``).
    """
    import contextlib

    import torch

    from .._distributed import is_main_process
    from .._lock import folder_lock
    from ..train import fit, torch_threads

    hp = data.hp
    train_ds, val_ds = datasets if datasets is not None else data.datasets()
    n = int(hp.get("n_ensemble", 1))
    nets, histories = [], []
    # an ensemble's folder is locked as a whole (each member's fit locks its own subfolder too)
    whole = checkpoint_dir is not None and n > 1 and is_main_process()
    lock = folder_lock(checkpoint_dir, arg="checkpoint_dir") if whole else contextlib.nullcontext()
    with lock, torch_threads(1 if data.mode == "frozen" and data.device.type == "cpu" else None):
        for member in progress(range(n), desc="members") if n > 1 else range(n):  # in the fit's one bar
            seed = random_state + member
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = make_net()
            ckpt = checkpoint_dir
            if checkpoint_dir is not None and n > 1:
                ckpt = os.path.join(os.fspath(checkpoint_dir), f"member{member}")
            hist = fit(
                net,
                train_ds,
                val_ds,
                loss_fn=loss_fn,
                epochs=hp["epochs"],
                batch_size=hp["batch_size"],
                lr=hp["lr"],
                weight_decay=hp["weight_decay"],
                patience=hp["patience"],
                device=data.device,
                random_state=seed,
                checkpoint_dir=ckpt,
                resume=resume,
                fingerprint=data.config.get("data_fingerprint"),
                model_settings=training_settings(data),  # after make_net, which records a fine-tuned encoder
                desc=desc if n == 1 else f"{desc} {member + 1}/{n}",
                **fit_kwargs,
            )
            histories.append(hist)
            nets.append(net)
    history = dict(histories[0])
    if n > 1:
        history["members"] = {str(i): h for i, h in enumerate(histories)}
    logger.info(
        "%s trained for %d epochs (best %s, val loss %s).",
        desc,
        history["epochs_run"],
        history["best_epoch"],
        history["best_val_loss"],
    )
    return nets, history


def write_fit_keys(
    data: FitData,
    key_added: str,
    *,
    params: dict,
    history: dict | None = None,
    obsm: dict[str, np.ndarray] | None = None,
) -> None:
    """Write the fit's ``obsm`` outputs and ``uns[key_added]`` = ``{'params', 'genes', 'history'}`` (JSON-able)."""
    by = f"fit ({data.method})"
    for key, value in (obsm or {}).items():
        data.adata.obsm[key] = value
        mark_written(data.adata, "obsm", key, by=by)
    entry = {"params": {**data.params, **params}, "genes": data.genes}
    if history is not None:
        entry["history"] = history
    data.adata.uns[key_added] = jsonable(entry)
    mark_written(data.adata, "uns", key_added, by=by)
