"""Worker of tests/test_distributed.py, started as ``torchrun --standalone --nproc_per_node=2 _ddp_worker.py OUT``.

Trains BLEEP (split batches, embeddings gathered across ranks), mclSTExp, zero-shot and NH2ST (split batches,
the sentence / the batch-level loss / the InfoNCE negatives gathered across ranks), a small regression net with a custom
batch sampler (whole batches per rank) on synthetic data, embeds rows with the sharded inference loop, and
saves what the test compares: per-rank weights and histories (the test's own files, under OUT/rank<r>/), a
model folder and checkpoints through histoexp's writers, which must appear for rank 0 only.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

import histoexp as hx
from histoexp import _distributed
from histoexp import train as hxt


@contextlib.contextmanager
def first_step(noise: float = 0.0, seed: int = 0):
    """Record the gradients of the first AdamW step in the block (one training), in parameter order.

    ``noise``: add ``noise * s * u`` to every gradient of every step (``u`` uniform in [-1, 1], seeded; ``s`` the
    largest gradient of the step), the size of the rounding of a reordered sum (``benchmarks/ddp_rounding.py``
    measures how training amplifies it).
    """
    grads: list[torch.Tensor] = []
    real = torch.optim.AdamW.step
    gen = torch.Generator().manual_seed(seed)

    def step(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"]]
        if not grads:
            grads.extend(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params)
        if noise:
            scale = max(float(p.grad.abs().max()) for p in params if p.grad is not None)
            for p in params:
                if p.grad is not None:
                    p.grad.add_(noise * scale * (2 * torch.rand(p.grad.shape, generator=gen) - 1))
        return real(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        yield grads
    finally:
        torch.optim.AdamW.step = real


def save_grads(grads: list, path: Path) -> None:
    save_file({f"{i:03d}": g.contiguous() for i, g in enumerate(grads)}, str(path))


def features(adata) -> np.ndarray:
    """Noisy image-like features: the synthetic sections' hidden drivers plus random directions."""
    rng = np.random.default_rng(1)
    drivers = adata.obs[["density", "tint"]].to_numpy(dtype=np.float32)
    return np.c_[drivers, rng.normal(size=(adata.n_obs, 4))].astype(np.float32)


def bleep(out: Path, tag: str):
    adata = hx.datasets.synthetic(n_sections=3, n_side=10, n_genes=12, random_state=0)
    adata.obsm["X_feat"] = features(adata)
    model = hx.tl.fit_bleep(
        adata,
        genes="all",
        use_rep="X_feat",
        projection_dim=16,
        dropout=0.0,
        n_ensemble=1,
        epochs=4,
        batch_size=32,
        patience=None,
        checkpoint_dir=out / f"ckpt_{tag}",
        random_state=0,
        device="cpu",
    )
    model.save(out / f"model_{tag}")
    return model.net.state_dict(), adata.uns["bleep"]["history"]


def mclstexp(tag: str):
    """mclSTExp on synthetic sections (sentence = global batch: split across the ranks, gathered in the loss)."""
    adata = hx.datasets.synthetic(n_sections=3, n_side=10, n_genes=12, random_state=0)
    adata.obsm["X_feat"] = features(adata)
    model = hx.tl.fit_mclstexp(
        adata,
        genes="all",
        use_rep="X_feat",
        projection_dim=16,
        n_layers=1,
        n_heads=2,
        head_dim=8,
        n_ensemble=1,
        epochs=3,
        batch_size=32,
        patience=None,
        random_state=0,
        device="cpu",
    )
    return model.net.state_dict(), adata.uns["mclstexp"]["history"]


def zeroshot(tag: str, genes_per_step: int | None = None):
    """Zero-shot (SGN form) on synthetic sections: the batch-level Pearson loss over the gathered rows."""
    adata = hx.datasets.synthetic(n_sections=3, n_side=10, n_genes=12, random_state=0)
    adata.obsm["X_feat"] = features(adata)
    table = pd.DataFrame(np.random.default_rng(3).normal(size=(12, 6)), index=adata.var_names.copy())
    model = hx.tl.fit_zeroshot(
        adata,
        gene_embeddings=table,
        genes="all",
        use_rep="X_feat",
        method="neural",
        dim=16,
        dropout=0.0,
        genes_per_step=genes_per_step,
        epochs=3,
        batch_size=32,
        patience=None,
        random_state=0,
        device="cpu",
    )
    return model.net.state_dict(), adata.uns["zeroshot"]["history"]


def nh2st(tag: str):
    """NH2ST with its neighbour branch (windows embedded under DDP too): both InfoNCE terms over the global batch."""
    adata = hx.datasets.synthetic(n_sections=3, n_side=8, n_genes=12, random_state=0)
    hx.pp.extract_patches(adata, patch_px=8, store="memory")
    hx.tl.embed_patches(adata, MeanColour(), key_added="X_c", batch_size=64, device="cpu")
    hx.tl.embed_neighbourhood(adata, MeanColour(), grid=3, key_added="X_c_grid", batch_size=63, device="cpu")
    model = hx.tl.fit_nh2st(
        adata,
        genes="all",
        use_rep="X_c",
        dim=16,
        heads=2,
        dropout=0.0,
        n_ensemble=1,
        epochs=3,
        batch_size=32,
        patience=None,
        random_state=0,
        device="cpu",
    )
    return model.net.state_dict(), adata.uns["nh2st"]["history"]


def sampler_fit(out: Path, tag: str):
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.normal(size=(90, 5)).astype(np.float32))
    y = x @ torch.from_numpy(g.normal(size=(5, 3)).astype(np.float32))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))

    def batches(gen, epoch):  # 7 whole batches of 10 spots (a multiple of neither the world size nor n)
        perm = torch.randperm(90, generator=gen).tolist()
        return [perm[i : i + 10] for i in range(0, 70, 10)]

    def loss_fn(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    hist = hxt.fit(
        net,
        (x, y),
        (x[:20], y[:20]),
        loss_fn=loss_fn,
        epochs=3,
        patience=None,
        batch_sampler=batches,
        device="cpu",
        random_state=3,
        progress=False,
    )
    return net.state_dict(), hist


class MeanColour(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def embedded(scales=None) -> tuple[np.ndarray, dict]:
    """``hx.tl.embed_patches`` of small synthetic patches (sharded across the ranks under torchrun)."""
    adata = hx.datasets.synthetic(n_sections=1, n_side=7, random_state=2)
    hx.pp.extract_patches(adata, patch_px=16, store="memory")
    hx.tl.embed_patches(adata, MeanColour(), scales=scales, key_added="X_colour", batch_size=5, device="cpu")
    return adata.obsm["X_colour"], dict(adata.uns["histoexp"]["embeddings"]["X_colour"])


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    hx.settings.progress = False
    assert hxt.init_distributed() is True
    rank = torch.distributed.get_rank()
    mine = out / f"rank{rank}"
    mine.mkdir(parents=True, exist_ok=True)
    with first_step() as g_bleep:
        w_bleep, h_bleep = bleep(out, f"rank{rank}")
    w_again, _ = bleep(out, f"again_rank{rank}")  # the same seed once more in the same process group
    w_samp, h_samp = sampler_fit(out, f"rank{rank}")
    with first_step() as g_mcl:
        w_mcl, h_mcl = mclstexp(f"rank{rank}")
    with first_step() as g_zs:
        w_zs, h_zs = zeroshot(f"rank{rank}")
    with first_step() as g_nh:
        w_nh, h_nh = nh2st(f"rank{rank}")
    for name, grads in (("bleep", g_bleep), ("mclstexp", g_mcl), ("zeroshot", g_zs), ("nh2st", g_nh)):
        save_grads(grads, mine / f"{name}_grad0.safetensors")  # the first step's gradients (DDP-averaged)
    zeroshot(f"draws_rank{rank}", genes_per_step=5)  # genes drawn per step: rank 0's draw on every rank
    with _distributed._gathering(True):
        drawn = _distributed.broadcast_batch(torch.tensor([10 + rank]))
    x = np.arange(45 * 3, dtype=np.float32).reshape(45, 3)
    emb = hxt.infer(lambda b: b["image"] * 2 + b["index"][:, None], x, batch_size=4, device="cpu", distributed=True)
    colour, record = embedded()
    np.save(mine / "colour.npy", colour)
    # multi-scale: 3 crops a spot, the ranks' blocks of crops need not hold whole spots
    np.save(mine / "colour_ms.npy", embedded(scales=(1, 2.5, 4))[0])
    save_file({f"bleep.{k}": v.contiguous() for k, v in w_bleep.items()}, str(mine / "weights.safetensors"))
    save_file({f"bleep.{k}": v.contiguous() for k, v in w_again.items()}, str(mine / "weights_again.safetensors"))
    save_file({f"sampler.{k}": v.contiguous() for k, v in w_samp.items()}, str(mine / "sampler.safetensors"))
    save_file({f"mclstexp.{k}": v.contiguous() for k, v in w_mcl.items()}, str(mine / "mclstexp.safetensors"))
    save_file({f"zeroshot.{k}": v.contiguous() for k, v in w_zs.items()}, str(mine / "zeroshot.safetensors"))
    save_file({f"nh2st.{k}": v.contiguous() for k, v in w_nh.items()}, str(mine / "nh2st.safetensors"))
    np.save(mine / "infer.npy", emb)
    hist = {"bleep": h_bleep, "sampler": h_samp, "mclstexp": h_mcl, "zeroshot": h_zs, "nh2st": h_nh}
    hist["broadcast"] = drawn.tolist()
    (mine / "history.json").write_text(json.dumps({**hist, "embed_world_size": record["world_size"]}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
