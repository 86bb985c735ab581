"""The one training loop every histoexp method uses.

:func:`fit` trains any ``nn.Module`` with a user-supplied ``loss_fn(model, batch) -> scalar`` and takes
care of the parts every method needs: device and mixed precision, seeding, shuffling, validation
and early stopping with best-weights restore, a progress bar with the losses, and a checkpoint per
epoch that :func:`fit` can resume from after an interruption. :func:`split_by_library` makes the
validation split (whole sections, or spatial stripes when there is only one section).

Reproducibility: every epoch ``e`` draws its shuffling order and its dropout noise from the seed
``(random_state, e)`` inside :func:`torch.random.fork_rng`, so the caller's global RNG is untouched,
two runs with the same seed on the same device give the same numbers, and a run resumed from the
checkpoint of epoch ``e`` continues exactly as the uninterrupted run (same weights, same losses).

Checkpoints are written as one set: the files of an epoch are staged under hidden names, then
``state.json`` (listing their sha256) replaces the previous one, then the staged files are renamed.
A process killed at any point resumes from the last complete epoch (or finishes the renames), and a
checkpoint whose files do not match ``state.json`` refuses to resume instead of mixing models.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._distributed import gather_batch, init_distributed, is_main_process
from ._fs import _fsync_dir, _fsync_file, atomic_write
from ._settings import logger, settings
from ._utils import jsonable
from ._utils import progress as _progress

__all__ = [
    "SpotDataset",
    "data_fingerprint",
    "fit",
    "gather_batch",
    "infer",
    "init_distributed",
    "is_main_process",
    "split_by_library",
    "to_device",
    "torch_threads",
]

#: set while this thread's fit holds its checkpoint folder's lock
_LOCKED: contextvars.ContextVar[bool] = contextvars.ContextVar("histoexp_checkpoint_locked", default=False)
_STATE = "state.json"
_LAST = "last.safetensors"
_BEST = "best.safetensors"
_OPTIM = "optimizer.pt"
_FILES = (_LAST, _BEST, _OPTIM)
#: ``state.json['format']`` of histoexp checkpoints (with the sha256 of every file of the set)
_FORMAT = "histoexp-checkpoint-1"


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads (``None``: unchanged), then restore the setting.

    Small models (projection heads on frozen features) gain nothing from a second CPU thread, and when
    another process is busy the threads wait on each other: training is then several times slower.
    """
    import torch

    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def split_by_library(
    obs: pd.DataFrame,
    library_key: str | None = None,
    *,
    val_fraction: float = 0.2,
    random_state: int = 0,
    coords: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split spots into training and validation without neighbouring spots on both sides.

    - Several sections (``obs[library_key]`` has more than one value): whole sections go to
      validation, ``max(1, round(val_fraction * n_sections))`` of them chosen at random (at least one
      section always stays for training).
    - One section (or ``library_key=None``): a spatially blocked split. The spots are cut into
      ``round(1 / val_fraction)`` stripes of equal spot count along the longer axis of ``coords``
      and one stripe, chosen at random, is the validation set. Only the spots along the stripe's
      border(s) have a training neighbour; there is no buffer zone.

    Parameters
    ----------
    obs
        Spot annotations (``adata.obs``).
    library_key
        Column of ``obs`` with the section of each spot; ``None``: treat all spots as one section.
    val_fraction
        Target fraction of validation spots; ``0`` returns an empty validation set.
    random_state
        Seed for the choice of sections / stripe.
    coords
        ``(n_obs, 2)`` spot coordinates (e.g. ``obsm['spatial']``), needed for the single-section
        split; when ``None``, ``obs[['array_col', 'array_row']]`` or ``obs[['array_x', 'array_y']]``
        are used if present.

    Returns
    -------
    ``(train_idx, val_idx)``: sorted integer positions.
    """
    n = len(obs)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}.")
    all_idx = np.arange(n)
    if val_fraction == 0 or n < 2:
        return all_idx, np.array([], dtype=int)
    rng = np.random.default_rng(random_state)
    if library_key is not None:
        if library_key not in obs:
            raise KeyError(f"`library_key={library_key!r}` is not a column of obs (found {list(obs.columns)}).")
        labels = obs[library_key].astype(str).to_numpy()
        libs = list(pd.unique(labels))
        if len(libs) > 1:
            n_val = min(max(1, round(val_fraction * len(libs))), len(libs) - 1)
            val_libs = set(rng.choice(np.array(libs, dtype=object), size=n_val, replace=False).tolist())
            is_val = np.isin(labels, list(val_libs))
            logger.info("Validation sections: %s (%d spots).", sorted(val_libs), int(is_val.sum()))
            return all_idx[~is_val], all_idx[is_val]
    if coords is None:
        for cols in (("array_col", "array_row"), ("array_x", "array_y"), ("x", "y")):
            if all(c in obs for c in cols):
                coords = obs[list(cols)].to_numpy(dtype=float)
                break
    if coords is None:
        raise ValueError(
            "A single section needs spot coordinates for the spatially blocked validation split: "
            "pass `coords` (e.g. adata.obsm['spatial'])."
        )
    coords = np.asarray(coords, dtype=float)
    if coords.shape != (n, 2):
        raise ValueError(f"`coords` must have shape ({n}, 2), got {coords.shape}.")
    if not np.isfinite(coords).all():
        bad = list(obs.index[~np.isfinite(coords).all(1)][:5])
        raise ValueError(f"`coords` (spot positions) are NaN or infinite for spots {bad}: the split needs them.")
    axis = int(np.argmax(np.ptp(coords, axis=0)))
    n_blocks = max(2, round(1 / val_fraction))
    order = np.argsort(coords[:, axis], kind="stable")
    block = np.empty(n, dtype=int)
    block[order] = np.arange(n) * n_blocks // n
    chosen = int(rng.integers(n_blocks))
    is_val = block == chosen
    logger.info(
        "Single section: validation = stripe %d of %d along axis %d (%d spots).", chosen, n_blocks, axis, is_val.sum()
    )
    return all_idx[~is_val], all_idx[is_val]


def to_device(batch: Any, device) -> Any:
    """Move the tensors of a batch (tensor, tuple/list or dict of tensors) to ``device``."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _as_dataset(data):
    import torch
    from torch.utils.data import Dataset, TensorDataset

    if data is None or isinstance(data, Dataset):
        return data
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        return TensorDataset(*data)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (tuple, list)):
        return data  # any map-style dataset
    raise TypeError(f"Training data must be a torch Dataset, a tensor or a tuple of tensors, got {type(data)}.")


def _epoch_seed(random_state: int, epoch: int, *more: int) -> int:
    entropy = [int(random_state), int(epoch), *map(int, more)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def _state_dict_cpu(model) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _update_hash(h, a) -> None:
    if a is None:
        h.update(b"None;")
        return
    if hasattr(a, "tocsr") and not isinstance(a, np.ndarray):  # scipy sparse: its parts
        a = a.tocsr()
        h.update(f"csr{tuple(a.shape)};".encode())
        for part in (a.data, a.indices, a.indptr):
            _update_hash(h, part)
        return
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        t = a.detach().cpu().contiguous()
        try:
            a = t.numpy()  # same fingerprint as the equal numpy array
        except TypeError:  # bfloat16 and other dtypes numpy lacks: hash the raw bytes
            import torch

            h.update(f"{tuple(t.shape)}{t.dtype};".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))
            return
    arr = np.ascontiguousarray(np.asarray(a))
    if arr.dtype == object:
        raise TypeError(f"data_fingerprint: cannot hash an object array of shape {arr.shape}.")
    h.update(f"{arr.shape}{arr.dtype.str};".encode())
    h.update(memoryview(arr).cast("B"))


def data_fingerprint(*arrays) -> str:
    """Fingerprint of training data: sha256 over the shapes, dtypes and bytes of ``arrays``.

    Pass the result to :func:`fit` as ``fingerprint=``: a resume on other data of the same shape
    then fails instead of silently continuing another model. Accepts numpy arrays, torch tensors
    (any device), scipy sparse matrices and ``None``; order matters. Hashing runs at memory speed
    (about a second per GB).
    """
    h = hashlib.sha256()
    h.update(f"{len(arrays)};".encode())
    for a in arrays:
        _update_hash(h, a)
    return h.hexdigest()


def _staged(ckpt: Path, name: str) -> Path:
    return ckpt / f".{name}.new"


def _save_checkpoint(ckpt: Path, model, optimizer, scaler, state: dict, best_weights: dict | None) -> None:
    import torch
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    opt = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {}}
    writers = {_LAST: lambda p: save_file(_state_dict_cpu(model), p)}
    if best_weights is not None:
        writers[_BEST] = lambda p: save_file(best_weights, p)
    writers[_OPTIM] = lambda p: torch.save(opt, p)
    files = {}
    for name, write in writers.items():
        write(str(_staged(ckpt, name)))
        _fsync_file(_staged(ckpt, name))
        files[name] = hashlib.sha256(_staged(ckpt, name).read_bytes()).hexdigest()
    # commit point: before it a resume sees the previous complete set, after it the staged files
    record = json.dumps(state | {"format": _FORMAT, "files": files}, indent=1)
    atomic_write(ckpt / _STATE, lambda p: Path(p).write_text(record), overwrite=True, arg="checkpoint_dir")
    for name in files:
        os.replace(_staged(ckpt, name), ckpt / name)
    _fsync_dir(ckpt)


def _check_settings(ckpt: Path, saved: dict, now: dict | None) -> None:
    """Refuse a resume whose model settings differ from the checkpoint's (they change the model it continues)."""
    before = saved.get("model_settings")
    if before == now:
        return
    if before is None or now is None:
        raise ValueError(
            f"Cannot resume from {ckpt}: the checkpoint was written "
            f"{'without' if before is None else 'with'} the model's settings and this run passes "
            f"{'some' if before is None else 'none'}, so it cannot be told that it continues this model (a checkpoint "
            "of an older histoexp, or of another caller). Start again in another `checkpoint_dir`."
        )

    def short(v) -> str:
        text = json.dumps(v)
        return text if len(text) <= 60 else text[:57] + "..."

    names = [k for k in dict.fromkeys([*before, *now]) if before.get(k) != now.get(k)]
    diff = ", ".join(f"{k}: {short(before.get(k))} -> {short(now.get(k))}" for k in names)
    raise ValueError(
        f"Cannot resume from {ckpt}: the model's settings differ from the checkpoint's (saved -> now) {diff}. A "
        "checkpoint continues the model it was trained as: resume with its settings, or start again in another "
        "`checkpoint_dir`."
    )


def _is_checkpoint(ckpt: Path) -> bool:
    try:
        saved = json.loads((ckpt / _STATE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("format") == _FORMAT


def _check_checkpoint_dir(ckpt: Path) -> None:
    """Refuse to start a fresh run over files histoexp did not write, or over a checkpoint (resume it)."""
    found = [n for n in (_STATE, *_FILES) if (ckpt / n).exists()]
    if not found:
        return
    if _is_checkpoint(ckpt):
        raise FileExistsError(
            f"`checkpoint_dir`: {str(ckpt)!r} holds a histoexp checkpoint; pass `resume=True` to continue it, or "
            "another (or empty) `checkpoint_dir` to start again (histoexp does not replace it silently)."
        )
    raise FileExistsError(
        f"`checkpoint_dir`: {str(ckpt)!r} holds {found}, which are not a histoexp checkpoint; histoexp does not "
        "overwrite files it did not write: choose another `checkpoint_dir`."
    )


def _read_checkpoint(ckpt: Path) -> tuple[dict, dict[str, bytes]]:
    """``state.json`` and the verified bytes of the files it lists (finishing an interrupted save)."""
    try:
        saved = json.loads((ckpt / _STATE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(
            f"`checkpoint_dir`: {str(ckpt / _STATE)!r} is not readable JSON ({err}); pass `resume=False` with "
            "another `checkpoint_dir` to start again."
        ) from err
    if not (isinstance(saved, dict) and saved.get("format") == _FORMAT and isinstance(saved.get("files"), dict)):
        raise ValueError(
            f"`checkpoint_dir`: {str(ckpt)!r} holds a state.json that is not a histoexp checkpoint with file hashes "
            "(another program's, or an older histoexp's); it cannot be verified: start again in another "
            "`checkpoint_dir`."
        )
    names = set(saved["files"])
    if not ({_LAST, _OPTIM} <= names <= set(_FILES)):
        raise ValueError(f"`checkpoint_dir`: state.json in {str(ckpt)!r} lists unexpected files {sorted(names)}.")
    blobs = {}
    for name, sha in saved["files"].items():
        final, staged = ckpt / name, _staged(ckpt, name)
        data = final.read_bytes() if final.is_file() else None
        if data is None or hashlib.sha256(data).hexdigest() != sha:
            data = staged.read_bytes() if staged.is_file() else None
            if data is None or hashlib.sha256(data).hexdigest() != sha:
                raise ValueError(
                    f"`checkpoint_dir`: {str(final)!r} does not match the sha256 recorded in state.json (edited, "
                    "damaged, or from another run): resuming would mix models. Start again with `resume=False` "
                    "in another `checkpoint_dir`."
                )
            os.replace(staged, final)  # the interrupted save had committed to these files: finish it
        blobs[name] = data
    return saved, blobs


def fit(
    model,
    train_data,
    val_data=None,
    *,
    loss_fn: Callable[[Any, Any], Any],
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    optimizer: str = "adamw",
    patience: int | None = 5,
    device=None,
    amp: bool | None = None,
    random_state: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    drop_last: bool | None = None,
    num_workers: int | None = None,
    collate_fn: Callable | None = None,
    batch_sampler: Callable[[Any, int], Any] | None = None,
    progress: bool = True,
    desc: str = "training",
    fingerprint: str | None = None,
    distributed: bool | None = None,
    model_settings: Mapping | None = None,
) -> dict:
    """Train ``model`` by minimising ``loss_fn`` with early stopping on the validation loss.

    Parameters
    ----------
    model
        The ``torch.nn.Module`` to train (in place). Only parameters with ``requires_grad`` are optimised.
    train_data
        A map-style dataset (``torch.utils.data.Dataset`` or any object with ``__len__`` and
        ``__getitem__``), a tensor, or a tuple of tensors (same first dimension).
    val_data
        Same kinds, or ``None`` (no validation: no early stopping, the last weights are kept).
    loss_fn
        ``loss_fn(model, batch) -> scalar tensor``; ``batch`` is what the DataLoader yields, already on
        the device. It is called in ``model.train()`` mode for training and under ``torch.no_grad()`` in
        ``model.eval()`` mode for validation.
    epochs
        Maximum number of epochs.
    batch_size
        Spots per batch (also the number of in-batch negatives of contrastive losses).
    lr, weight_decay
        Optimiser learning rate and weight decay.
    optimizer
        ``'adamw'``, ``'adam'`` or ``'sgd'`` (momentum 0.9).
    patience
        Stop after this many epochs without a lower validation loss; ``None``: never stop early.
        The weights of the best epoch are restored at the end when there is validation data.
    device
        Device (``None``: ``hx.settings``).
    amp
        Mixed precision (CUDA only; ``None``: ``hx.settings.amp``). Ignored on CPU/MPS.
    random_state
        Seed of the shuffling and dropout noise (per epoch, see module docs). Seed the model
        initialisation yourself before building the model.
    checkpoint_dir
        Folder receiving a checkpoint after every epoch: ``last.safetensors`` (weights),
        ``best.safetensors`` (best weights so far), ``optimizer.pt`` (optimizer/AMP state, tensors
        only, read back with ``weights_only=True``) and ``state.json`` (epoch, losses, early-stopping
        state, hyper-parameters, data fingerprint, the sha256 of the other files). Written as one set
        (see the module notes). Without ``resume``, a folder already holding a checkpoint (or files of
        these names) raises :class:`FileExistsError`: nothing is overwritten silently.
        One training at a time per folder: it is locked (``training.lock``, created atomically) while ``fit``
        runs, and a second ``fit`` on it raises :class:`FileExistsError` before any work; the lock of a process
        that died is stale and taken over.
    resume
        Continue from the checkpoint in ``checkpoint_dir`` (if there is one): the result equals the
        uninterrupted run. The hyper-parameters, ``fingerprint`` and ``model_settings`` must match those of the
        checkpoint, and its files their recorded sha256.
    drop_last
        Drop the last incomplete training batch (``None``: when there are more training samples than
        ``batch_size``, as BLEEP does: in-batch contrastive losses degrade on tiny batches).
    num_workers
        DataLoader workers (``None``: ``hx.settings.num_workers``).
    collate_fn
        DataLoader collate function (``None``: the dataset's ``collate_fn`` attribute if it has one, as
        :class:`SpotDataset`, else torch's default).
    batch_sampler
        Hook for methods whose batches are not random subsets of spots: ``batch_sampler(generator,
        epoch)`` returns an iterable of index lists for one epoch, drawing its randomness from
        ``generator`` (seeded per epoch, so resumes stay exact); e.g. spots of one section in a
        spatial window (mclSTExp's "sentences"). Validation batches stay sequential.
    progress
        Show a progress bar over epochs with the losses (also subject to ``hx.settings.progress``).
    desc
        Progress bar label.
    fingerprint
        Identifies the training data (e.g. :func:`data_fingerprint` of the inputs and targets); stored
        in the checkpoint, and a resume with another fingerprint raises :class:`ValueError`.
    distributed
        Train with DistributedDataParallel over the ranks of the torch.distributed process group (see
        *Distributed training* below); ``None``: when one with more than one process is initialised (e.g.
        :func:`init_distributed` under ``torchrun``). ``False`` trains in this process alone.
    model_settings
        JSON-able settings that shape the model besides the optimiser's hyper-parameters (architecture, loss
        settings such as a temperature, ...); stored in the checkpoint, and a resume with other settings raises
        :class:`ValueError` naming the ones that differ (``fit_*`` functions pass their whole model config).

    Returns
    -------
    History dict (JSON-able): ``train_loss`` and ``val_loss`` per epoch, ``best_epoch`` (0-based, or
    ``None``), ``best_val_loss``, ``epochs_run``, ``stopped_early``; and ``world_size`` when distributed.

    Notes
    -----
    **Distributed training** (every rank calls :func:`fit` with the same arguments and data):

    - ``batch_size`` is the *global* batch. Without ``batch_sampler`` every rank draws the same shuffled
      batches as one process would (same seed) and takes its share of each (``numpy.array_split``); a
      contrastive loss calls :func:`gather_batch` on its embeddings to use the whole global batch as
      negatives. A loss that is a mean over the rank's own spots is averaged over the ranks: the one-process
      mean when the shares are equal (a global batch not divisible by the world size weighs the ranks
      equally). With ``batch_sampler`` the batches are kept whole (e.g. mclSTExp's spatial sentences) and
      dealt round-robin, padded by repeating the first ones to a multiple of the world size: one step then
      trains ``world_size`` batches (as gradient accumulation over them in one process).
    - gradients are averaged by DistributedDataParallel; the validation batches are dealt round-robin and the
      validation loss is summed over the ranks, so every rank sees the same loss and stops at the same epoch;
    - dropout and augmentation noise come from the seed ``(random_state, epoch, rank)`` (shuffling from the
      shared ``(random_state, epoch)``);
    - checkpoints are written by rank 0; a resume needs the same world size.

    "Same model": for the same seed, data and world size, runs give bitwise the same weights on every rank.
    Against one process with the same ``batch_size`` the gradient of each step is the same up to float
    rounding (summation order), so without dropout the weights agree to rounding, amplified by training;
    dropout draws other masks per rank.
    """
    call = dict(locals())  # every argument, to run again under the checkpoint folder's lock
    if checkpoint_dir is not None and not _LOCKED.get() and is_main_process():
        from ._lock import folder_lock

        token = _LOCKED.set(True)
        try:
            with folder_lock(checkpoint_dir, arg="checkpoint_dir", what="training"):
                return fit(**call)
        finally:
            _LOCKED.reset(token)

    import torch
    from torch.utils.data import DataLoader

    from . import _distributed as _dist

    if epochs < 1:
        raise ValueError(f"`epochs` must be >= 1, got {epochs}.")
    if distributed is None:
        distributed = _dist.is_distributed()
    elif distributed and not _dist.is_distributed():
        raise ValueError(
            "`distributed=True` needs an initialised torch.distributed process group with more than one process "
            "(start with torchrun and call histoexp.train.init_distributed())."
        )
    world, rank = (_dist.world_size(), _dist.rank()) if distributed else (1, 0)
    device = settings.resolve_device(device) if not isinstance(device, torch.device) else device
    train_ds, val_ds = _as_dataset(train_data), _as_dataset(val_data)
    if val_ds is not None and len(val_ds) == 0:
        val_ds = None
    if len(train_ds) == 0:
        raise ValueError("`train_data` is empty.")
    if collate_fn is None:
        collate_fn = getattr(train_ds, "collate_fn", None)
    num_workers = settings.num_workers if num_workers is None else int(num_workers)
    use_amp = (settings.amp if amp is None else amp) and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
    else:
        raise ValueError(f"`optimizer` must be 'adamw', 'adam' or 'sgd', got {optimizer!r}.")
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    if drop_last is None:
        drop_last = len(train_ds) > batch_size
    hparams = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "optimizer": optimizer,
        "patience": patience,
        "random_state": random_state,
        "drop_last": bool(drop_last),
        "n_train": len(train_ds),
        "n_val": 0 if val_ds is None else len(val_ds),
        "world_size": world,
    }
    state = {
        "epoch": -1,
        "train_loss": [],
        "val_loss": [],
        "best_epoch": None,
        "best_val_loss": None,
        "bad_epochs": 0,
        "stopped_early": False,
        "hparams": hparams,
    }
    best_weights = None
    settings_now = None if model_settings is None else json.loads(json.dumps(jsonable(dict(model_settings))))
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and ckpt is None:
        raise ValueError("`resume=True` needs `checkpoint_dir`.")
    if rank != 0:
        _dist.barrier()  # rank 0 first: it may finish an interrupted save (renames) before the others read
    if resume and (ckpt / _STATE).is_file():
        saved, blobs = _read_checkpoint(ckpt)
        old = {"world_size": 1, **saved["hparams"]}  # checkpoints from before distributed training
        diff = {k: (old.get(k), v) for k, v in hparams.items() if k not in ("epochs", "patience") and old.get(k) != v}
        if diff:
            raise ValueError(f"Cannot resume from {ckpt}: hyper-parameters differ (saved, now): {diff}.")
        if saved.get("fingerprint") != fingerprint:
            raise ValueError(
                f"Cannot resume from {ckpt}: `fingerprint` differs (saved {saved.get('fingerprint')!r}, now "
                f"{fingerprint!r}): the checkpoint was trained on other data. Start again in another `checkpoint_dir`."
            )
        _check_settings(ckpt, saved, settings_now)
        state.update({k: v for k, v in saved.items() if k in state and k != "hparams"})
        state["stopped_early"] = False
        from safetensors.torch import load

        model.load_state_dict(load(blobs[_LAST]))
        extra = torch.load(io.BytesIO(blobs[_OPTIM]), map_location=device, weights_only=True)
        opt.load_state_dict(extra["optimizer"])
        if scaler is not None and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        if _BEST in blobs:
            best_weights = load(blobs[_BEST])
        logger.info("Resuming %s from %s after epoch %d.", desc, ckpt, state["epoch"] + 1)
    elif ckpt is not None:
        _check_checkpoint_dir(ckpt)
        if resume:
            logger.info("No checkpoint in %s: training from scratch.", ckpt)
    if distributed and rank == 0:
        _dist.barrier()
    # under DDP the loss is computed in the wrapper's forward, so gradients are averaged over the ranks
    step_module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        dev_ids = None
        if device.type == "cuda":
            dev_ids = [device.index if device.index is not None else torch.cuda.current_device()]
        step_module = DistributedDataParallel(_LossModule(model, loss_fn), device_ids=dev_ids)

    def run_epoch(loader, train: bool) -> float:
        total, count = 0.0, 0
        model.train(train)
        for batch in loader:
            batch = to_device(batch, device)
            with torch.set_grad_enabled(train), torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = step_module(batch) if train and distributed else loss_fn(model, batch)
            if train:
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
            n = _batch_len(batch)
            total += float(loss.detach()) * n
            count += n
        if distributed:  # the mean over every rank's spots: the same number on all ranks
            total, count = _dist.all_reduce_sum([total, count])
        return total / max(count, 1)

    fork_devices = [device] if device.type == "cuda" else []
    start = state["epoch"] + 1
    bar = _progress(
        range(start, epochs),
        desc=desc,
        total=epochs,
        initial=start,
        disable=not progress or not settings.progress or rank != 0,
    )
    for epoch in bar:
        if patience is not None and val_ds is not None and state["bad_epochs"] >= patience:
            state["stopped_early"] = True
            if hasattr(bar, "set_description"):
                # breaking closes the bar: end it at the epochs run (not frozen at N/epochs), saying why
                bar.total = epoch
                best = state["best_epoch"]
                best_txt = f" (best {best + 1})" if best is not None else ""
                bar.set_description(f"{desc}: stopped early at epoch {epoch}/{epochs}{best_txt}", refresh=False)
            break
        seed = _epoch_seed(random_state, epoch)
        with torch.random.fork_rng(devices=fork_devices):
            # noise (dropout, augmentation) differs per rank; the shuffling generator is shared
            torch.manual_seed(seed if not distributed else _epoch_seed(random_state, epoch, rank))
            gen = torch.Generator().manual_seed(seed)
            if distributed:
                mine = _rank_batches(len(train_ds), batch_size, drop_last, gen, batch_sampler, epoch, world, rank)
                train_loader = DataLoader(train_ds, batch_sampler=mine, num_workers=num_workers, collate_fn=collate_fn)
            elif batch_sampler is None:
                train_loader = DataLoader(
                    train_ds,
                    batch_size=batch_size,
                    shuffle=True,
                    generator=gen,
                    drop_last=drop_last,
                    num_workers=num_workers,
                    collate_fn=collate_fn,
                )
            else:
                train_loader = DataLoader(
                    train_ds,
                    batch_sampler=list(batch_sampler(gen, epoch)),
                    num_workers=num_workers,
                    collate_fn=collate_fn,
                )
            with _dist._gathering(distributed and batch_sampler is None):
                train_loss = run_epoch(train_loader, True)
            val_loss = None
            if val_ds is not None:
                if distributed:  # the one-process validation batches, dealt round-robin
                    starts = range(0, len(val_ds), batch_size)
                    val_batches = [list(range(a, min(a + batch_size, len(val_ds)))) for a in starts][rank::world]
                    val_loader = DataLoader(
                        val_ds, batch_sampler=val_batches, num_workers=num_workers, collate_fn=collate_fn
                    )
                else:
                    val_loader = DataLoader(
                        val_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn
                    )
                val_loss = run_epoch(val_loader, False)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"Training loss is {train_loss} at epoch {epoch}; lower `lr`.")
        state["epoch"] = epoch
        state["train_loss"].append(train_loss)
        if val_loss is not None:
            state["val_loss"].append(val_loss)
            if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
                state.update(best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0)
                best_weights = _state_dict_cpu(model)
            else:
                state["bad_epochs"] += 1
        postfix = {"train_loss": f"{train_loss:.4f}"}
        if val_loss is not None:
            postfix["val_loss"] = f"{val_loss:.4f}"
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(postfix)
        logger.debug("%s epoch %d: %s", desc, epoch, postfix)
        if ckpt is not None and rank == 0:
            record = state | {"hparams": hparams, "fingerprint": fingerprint}
            if settings_now is not None:
                record["model_settings"] = settings_now
            _save_checkpoint(ckpt, model, opt, scaler, record, best_weights)
    if patience is not None and val_ds is not None and state["bad_epochs"] >= patience and state["epoch"] + 1 < epochs:
        state["stopped_early"] = True
    if state["stopped_early"]:
        best = state["best_epoch"]
        logger.info(
            "%s: stopped early after epoch %d/%d (best %s).",
            desc,
            state["epoch"] + 1,
            epochs,
            "-" if best is None else best + 1,
        )
    if hasattr(bar, "close"):
        bar.close()
    if best_weights is not None:
        model.load_state_dict({k: v.to(device) for k, v in best_weights.items()})
    model.eval()
    history = {
        "train_loss": [float(x) for x in state["train_loss"]],
        "val_loss": [float(x) for x in state["val_loss"]],
        "best_epoch": state["best_epoch"],
        "best_val_loss": state["best_val_loss"],
        "epochs_run": state["epoch"] + 1,
        "stopped_early": bool(state["stopped_early"]),
    }
    if distributed:
        history["world_size"] = world
    return history


def _LossModule(net, loss_fn):
    """``forward(batch) = loss_fn(net, batch)``: what DistributedDataParallel wraps (built lazily: torch)."""
    from torch import nn

    class LossModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, batch):
            return loss_fn(self.net, batch)

    return LossModule()


def _rank_batches(n, batch_size, drop_last, gen, batch_sampler, epoch, world, rank) -> list[list[int]]:
    """Return the training batches of rank ``rank`` for one epoch (see :func:`fit`, *Distributed training*)."""
    from torch.utils.data import DataLoader

    if batch_sampler is None:
        # the batches one process draws: an index-only DataLoader consumes the generator the same way
        loader = DataLoader(range(n), batch_size=batch_size, shuffle=True, generator=gen, drop_last=drop_last)
        full = [b.numpy() for b in loader]
        if full and len(full[-1]) < world:  # a rank would get an empty share
            full = full[:-1]
        if not full:
            raise ValueError(f"{n} training spots cannot be split across {world} processes.")
        return [np.array_split(b, world)[rank].tolist() for b in full]
    full = [[int(i) for i in b] for b in batch_sampler(gen, epoch)]
    if not full:
        raise ValueError("`batch_sampler` returned no batches.")
    n_full = len(full)
    while len(full) % world:  # every rank must run the same number of steps: repeat the first batches
        full.append(full[(len(full) - n_full) % n_full])
    return full[rank::world]


def _batch_len(batch) -> int:
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_len(batch[0])
    return 1


# --------------------------------------------------------------------------------------------- data and inference
def _identity(batch):
    return batch


class SpotDataset:
    """Spots as dict batches: the one dataset every method trains and predicts on.

    Indexing by a list of positions (``__getitems__``, used by the DataLoader) reads a whole batch at once,
    so a patch store is read with one ``batch`` call per batch and frozen features with one gather.

    Parameters
    ----------
    images
        Frozen features ``(n, d)`` (array or tensor), a patch source (anything with ``len`` and
        ``.batch(indices) -> uint8 (B, px, px, 3)``, e.g. :func:`histoexp.pp.get_patches`), or ``None``.
    expression
        ``(n, n_genes)`` log-normalised targets, or ``None`` (prediction of H&E-only spots).
    coords
        ``(n, 2)`` positions (e.g. array coordinates), or ``None``.
    rows
        Positions (into the arrays above) of the spots of this dataset (``None``: all): training and
        validation subsets share the arrays.
    neighbours
        ``(n, m)`` positions of each spot's neighbours (``-1``: none), e.g. NH2ST's surrounding windows;
        each batch then also holds the neighbours' ``neighbour_image``/``neighbour_expression`` and a
        boolean ``neighbour_mask``.
    neighbour_images
        With ``neighbours``: also gather the neighbours' images (``False``: expression only, for methods
        that read the surroundings' images from another input).

    Batches are dicts of tensors: ``index`` (positions), and ``image``, ``expression``, ``coords``,
    ``neighbour_*`` where given.
    """

    collate_fn = staticmethod(_identity)

    def __init__(
        self, images=None, expression=None, coords=None, *, rows=None, neighbours=None, neighbour_images=True
    ) -> None:
        import torch

        given = {"images": images, "expression": expression, "coords": coords, "neighbours": neighbours}
        sizes = {name: len(x) for name, x in given.items() if x is not None}
        if not sizes:
            raise ValueError("A SpotDataset needs at least one of images, expression, coords.")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"SpotDataset inputs differ in length: {sizes}.")
        n = next(iter(sizes.values()))
        self._patches = images is not None and hasattr(images, "batch")
        if images is not None and not self._patches:
            images = torch.as_tensor(np.asarray(images, dtype=np.float32))
        self.images = images
        self.expression = None if expression is None else torch.as_tensor(np.asarray(expression, dtype=np.float32))
        self.coords = None if coords is None else torch.as_tensor(np.asarray(coords, dtype=np.float32))
        self.neighbours = None if neighbours is None else np.asarray(neighbours, dtype=np.int64)
        self.rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        self.neighbour_images = bool(neighbour_images)

    def __len__(self) -> int:
        return len(self.rows)

    def _images(self, pos: np.ndarray):
        import torch

        if self._patches:
            return torch.from_numpy(np.ascontiguousarray(self.images.batch(pos)))
        return self.images[torch.from_numpy(pos)]

    def __getitems__(self, indices) -> dict:
        import torch

        pos = self.rows[np.asarray(indices, dtype=np.int64)]
        out = {"index": torch.from_numpy(pos)}
        if self.images is not None:
            out["image"] = self._images(pos)
        if self.expression is not None:
            out["expression"] = self.expression[torch.from_numpy(pos)]
        if self.coords is not None:
            out["coords"] = self.coords[torch.from_numpy(pos)]
        if self.neighbours is not None:
            nb = self.neighbours[pos]  # (B, m)
            mask = nb >= 0
            flat = np.where(mask, nb, pos[:, None]).ravel()  # missing neighbours read the spot itself, masked
            out["neighbour_index"] = torch.from_numpy(nb)
            out["neighbour_mask"] = torch.from_numpy(mask)
            if self.images is not None and self.neighbour_images:
                img = self._images(flat)
                out["neighbour_image"] = img.reshape(*nb.shape, *img.shape[1:])
            if self.expression is not None:
                ex = self.expression[torch.from_numpy(flat)]
                out["neighbour_expression"] = ex.reshape(*nb.shape, ex.shape[-1])
        return out

    def __getitem__(self, i) -> dict:
        if isinstance(i, (list, tuple, np.ndarray)):  # a whole batch (DataLoader with a batch sampler)
            return self.__getitems__(i)
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def _autocast(device, amp: bool):
    import torch

    if not amp or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def infer(
    fn: Callable[[dict], Any],
    data,
    *,
    batch_size: int = 256,
    device=None,
    amp: bool | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "inference",
    distributed: bool = False,
) -> np.ndarray:
    """Run the one inference loop: ``fn`` over the batches of ``data``, in order, results concatenated.

    Used by :func:`histoexp.tl.embed_patches`, the models' encoders and predictions, and the benchmarks.
    Batches stream through a DataLoader (one ``batch`` read per batch for patch stores; pinned memory
    on CUDA), ``fn`` runs under :func:`torch.inference_mode` with AMP autocast on CUDA when ``amp``.

    Parameters
    ----------
    fn
        ``fn(batch) -> tensor (B, ...)`` (a tuple/list: its first element); ``batch`` is a
        :class:`SpotDataset` dict already on ``device``.
    data
        A :class:`SpotDataset`, frozen features ``(n, d)``, or a patch source (``len`` + ``batch``).
    batch_size
        Spots per batch.
    device
        Torch device (``None``: ``hx.settings``).
    amp
        Mixed precision on CUDA (``None``: ``hx.settings.amp``); ignored elsewhere.
    num_workers
        DataLoader workers (``None``: ``hx.settings.num_workers``).
    progress
        Show a progress bar (also subject to ``hx.settings.progress``).
    desc
        Progress bar label.
    distributed
        A collective call under torch.distributed (every rank calls it with the same data): each rank runs
        ``fn`` on one contiguous block of the rows and every rank returns all the rows, gathered in order.
        Ignored without a process group of more than one process.

    Returns
    -------
    float32 array ``(n, ...)``.
    """
    import torch
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    from . import _distributed as _dist

    ds = data if isinstance(data, SpotDataset) else SpotDataset(images=data)
    if distributed and _dist.is_distributed() and len(ds) >= _dist.world_size():  # (fewer rows: each rank all)
        world, rank = _dist.world_size(), _dist.rank()
        bounds = np.linspace(0, len(ds), world + 1).astype(int)
        shard = copy.copy(ds)  # shares the arrays; only the rows differ
        shard.rows = ds.rows[bounds[rank] : bounds[rank + 1]]
        local = infer(
            fn,
            shard,
            batch_size=batch_size,
            device=device,
            amp=amp,
            num_workers=num_workers,
            progress=progress and rank == 0,
            desc=f"{desc} (rank 0 of {world})",
        )
        return _dist.all_gather_rows(local)
    dev = settings.resolve_device(device) if not isinstance(device, torch.device) else device
    use_amp = bool(settings.amp if amp is None else amp) and dev.type == "cuda"
    workers = settings.num_workers if num_workers is None else int(num_workers)
    n = len(ds)
    sampler = BatchSampler(SequentialSampler(range(n)), batch_size=int(batch_size), drop_last=False)
    loader = DataLoader(
        ds, batch_size=None, sampler=sampler, num_workers=workers, pin_memory=dev.type == "cuda", collate_fn=None
    )
    out = None
    start = 0
    bar = _progress(
        loader, desc=desc, total=len(sampler), unit="batch", disable=not progress or not settings.progress, leave=False
    )
    with torch.inference_mode():
        for batch in bar:
            with _autocast(dev, use_amp):
                res = fn(to_device(batch, dev))
            if isinstance(res, (tuple, list)):
                res = res[0]
            res = res.float().cpu().numpy()
            if out is None:
                out = np.empty((n, *res.shape[1:]), dtype=np.float32)
            out[start : start + len(res)] = res
            start += len(res)
    if start != n:
        raise RuntimeError(f"Inference produced {start} rows for {n} spots.")
    return np.empty((0,), dtype=np.float32) if out is None else out
