"""torch.distributed helpers: process group from ``torchrun``, rank-0 writes, gathers (torch imported lazily).

histoexp runs SPMD under ``torchrun``: every process runs the same script; :func:`histoexp.train.fit` and
:func:`histoexp.tl.embed_patches` are then collective calls (every rank must call them), and histoexp's
writers (:meth:`~histoexp.models.base.ExpressionModel.save`, :func:`histoexp.io.write_h5ad`, checkpoints)
write on rank 0 only. Nothing here is active unless a process group with more than one process is initialised.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import numpy as np

from ._settings import logger

__all__ = [
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "broadcast_batch",
    "gather_batch",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "rank",
    "world_size",
]

# set by histoexp.train.fit while a training epoch runs with each global batch split across the ranks
_GATHER: contextvars.ContextVar[bool] = contextvars.ContextVar("histoexp_gather_batch", default=False)


def _dist():
    """``torch.distributed`` when torch is already imported and it is available, else ``None``."""
    import sys

    if "torch" not in sys.modules:  # nothing can be initialised without torch: stay light
        return None
    import torch.distributed as dist

    return dist if dist.is_available() else None


def is_distributed() -> bool:
    """Whether a torch.distributed process group with more than one process is initialised."""
    dist = _dist()
    return dist is not None and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Return the rank of this process (0 without a process group)."""
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    """Return the number of processes (1 without a process group)."""
    return _dist().get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Return True on rank 0 and without a process group: the process that writes files."""
    return rank() == 0


def init_distributed(backend: str | None = None) -> bool:
    """Initialise torch.distributed from the environment ``torchrun`` sets, if there is more than one process.

    Call it at the top of a script started with ``torchrun --nproc_per_node=N script.py``; afterwards
    :func:`histoexp.train.fit` trains with DistributedDataParallel, :func:`histoexp.tl.embed_patches` embeds a
    shard per rank, and histoexp writes files on rank 0 only. Without ``WORLD_SIZE > 1`` in the environment it
    does nothing (the same script then runs as one process).

    Parameters
    ----------
    backend
        ``'gloo'`` (CPU) or ``'nccl'`` (CUDA); ``None``: ``'nccl'`` when CUDA and NCCL are available, else
        ``'gloo'``. With NCCL each process uses the GPU ``LOCAL_RANK``.

    Returns
    -------
    Whether a process group with more than one process is active.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size() > 1
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"`backend` must be 'gloo' or 'nccl', got {backend!r}.")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    logger.info("torch.distributed: rank %d of %d (%s).", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_world_size() > 1


def _comm_device():
    import torch

    dist = _dist()
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        _dist().barrier()


def all_reduce_sum(values) -> np.ndarray:
    """Sum float64 ``values`` over the ranks (the values themselves without a process group)."""
    values = np.asarray(values, dtype=np.float64)
    if not is_distributed():
        return values
    import torch

    t = torch.as_tensor(values, device=_comm_device())
    _dist().all_reduce(t)
    return t.cpu().numpy()


def _sizes(n: int) -> list[int]:
    import torch

    t = torch.tensor([n], dtype=torch.int64, device=_comm_device())
    out = [torch.zeros_like(t) for _ in range(world_size())]
    _dist().all_gather(out, t)
    return [int(x.item()) for x in out]


def _gather_padded(t, sizes: list[int]):
    """All ranks' ``t`` (rows padded to the largest), concatenated without the padding."""
    import torch

    dev = t.device
    pad = max(sizes)
    src = t.to(_comm_device())
    if len(t) < pad:
        src = torch.cat([src, src.new_zeros((pad - len(t), *t.shape[1:]))])
    parts = [torch.empty_like(src) for _ in sizes]
    _dist().all_gather(parts, src.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(dev)


def all_gather_rows(arr: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows of ``arr`` in rank order (``arr`` itself without a process group).

    Ranks may hold different numbers of rows; the other dimensions and the dtype must agree.
    """
    if not is_distributed():
        return arr
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr))
    return _gather_padded(t, _sizes(len(t))).cpu().numpy()


def _gather_autograd():
    import torch

    class _GatherRows(torch.autograd.Function):
        # all-gather with gradient: every rank computes the same loss on the gathered rows, so the gradient of
        # a rank's own rows is the sum over the ranks of the gradients of its copies (an all-reduce)

        @staticmethod
        def forward(ctx, t):
            sizes = _sizes(len(t))
            r = rank()
            ctx.span = (sum(sizes[:r]), sum(sizes[: r + 1]))
            return _gather_padded(t, sizes)

        @staticmethod
        def backward(ctx, grad):
            g = grad.contiguous().to(_comm_device())
            _dist().all_reduce(g)
            a, b = ctx.span
            return g[a:b].to(grad.device)

    return _GatherRows


def gather_batch(t):
    """Inside a loss function: the tensor ``t`` of the whole global batch when training is distributed.

    :func:`histoexp.train.fit` under torchrun splits each global batch across the ranks; a contrastive loss
    whose in-batch negatives should be the whole global batch (as in one process with the same
    ``batch_size``) calls ``gather_batch`` on its embeddings. It returns the rows of every rank in rank order
    (differentiable), and ``t`` unchanged in one process, in validation, and when whole batches go to each
    rank (a custom ``batch_sampler``). Every rank then computes the same loss, and the averaged gradient
    equals the one-process gradient of that global batch.
    """
    if not _GATHER.get() or not is_distributed():
        return t
    return _gather_autograd().apply(t)


def broadcast_batch(t):
    """Inside a loss function: rank 0's ``t`` on every rank when training splits each global batch.

    For random choices a loss makes per step (e.g. the genes a step trains on): with the batch split across the
    ranks, every rank must make rank 0's choice so that the gathered rows (:func:`gather_batch`) line up; the
    per-rank random streams of :func:`histoexp.train.fit` would otherwise differ. ``t`` unchanged where
    :func:`gather_batch` returns its input.
    """
    if not _GATHER.get() or not is_distributed():
        return t
    src = t.contiguous().to(_comm_device())
    _dist().broadcast(src, 0)
    return src.to(t.device)


@contextlib.contextmanager
def _gathering(on: bool):
    token = _GATHER.set(bool(on))
    try:
        yield
    finally:
        _GATHER.reset(token)
