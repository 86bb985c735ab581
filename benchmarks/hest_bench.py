"""The HEST-Benchmark recipe on any HEST-Benchmark task folder, with histoexp's methods next to it.

A task folder (HEST-Benchmark's ``bench_data/<TASK>/`` layout) holds ``splits/train_<k>.csv`` and
``splits/test_<k>.csv`` (columns ``sample_id``, ``patches_path``, ``expr_path``; folds are patients),
``patches/<id>.h5`` (224 px patches at 0.5 µm/px: ``img``, ``coords``, ``barcode``), ``adata/<id>.h5ad``
(counts) and ``var_50genes.json`` (``{"genes": [...]}``: the 50 most variable genes of the task).

Recipe (HEST-Benchmark, as its code does it): frozen features of HEST's own patches; targets log1p of the counts
of the 50 genes; features standardised and reduced by PCA to 256 components (fitted on the training split);
ridge (``solver='lsqr'``, ``alpha = 100 / (n_features * n_genes)``, no intercept); Pearson r per gene on the test
split, averaged over genes, then mean ± sd over the folds. Rows next to it:

- ``mean`` (training mean: correlation 0 by convention) and ``one-pattern`` (ridge on the PC1 score of the training
  expression, every gene = its loading x that score, EVALUATION.md), on the same features;
- ``hx ridge``: ``hx.tl.fit_ridge`` (standardise, PCA-256, alpha by leave-one-sample-out inside the training split)
  on the same features and targets;
- ``hx BLEEP``: ``hx.tl.fit_bleep`` on the same frozen features (its defaults) + ``hx.tl.impute`` (retrieval from the
  training spots);
- gene-specific PCC (partial correlation given the test split's score on PC1 of the training expression) for each.

``--build-her2st DIR`` writes such a task folder from the local her2st data (C2..C6, 224 px at 0.5 µm/px cut with
``hx.pp.extract_patches``). her2st has images for patient C only, so its folds are sections, not patients; the 50
genes are the most variable of log1p counts over the five sections (as HEST-Benchmark, which selects them on the
whole task: genes in >= 10 % of every section's spots, log1p counts, scanpy ``highly_variable_genes``).

Usage::

    python benchmarks/hest_bench.py --task-dir bench_data/IDC --encoders uni --weights-dir ~/fm-weights
    python benchmarks/hest_bench.py --build-her2st /tmp/her2st_task --encoders handcrafted resnet50 \\
        --random-init resnet50

Writes ``benchmarks/results/hest_bench_<task>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import histoexp as hx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from encoders import gene_specific_pcc, log, pc1, pearson_per_gene, weights_for  # noqa: E402


def build_her2st_task(dest: Path, data_dir=None) -> Path:
    """A HEST-Benchmark task folder from her2st C2..C6 (one fold per section)."""
    import h5py
    from anndata import AnnData

    sections = ["C2", "C3", "C4", "C5", "C6"]
    for d in ("splits", "patches", "adata"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    counts = []
    for sec in sections:
        ad = hx.datasets.her2st(sec, data_dir=data_dir)
        hx.pp.extract_patches(ad, size_um=112, patch_px=224, key_added="p")
        mpp = ad.uns["spatial"][sec]["metadata"]["microns_per_pixel"]
        size_src = 224 * 0.5 / mpp
        with h5py.File(dest / "patches" / f"{sec}.h5", "w") as f:
            f["img"] = ad.obsm["p"]
            f["coords"] = (np.asarray(ad.obsm["spatial"]) - size_src // 2).astype(int)
            f["barcode"] = np.array([n.encode() for n in ad.obs_names])[:, None]
        out = AnnData(X=ad.X, obs=ad.obs[[]].copy(), var=ad.var[[]].copy())
        out.obsm["spatial"] = np.asarray(ad.obsm["spatial"])
        out.write_h5ad(dest / "adata" / f"{sec}.h5ad")
        counts.append(out)
    (dest / "var_50genes.json").write_text(json.dumps({"genes": top_k_genes(counts, 50)}))

    def rows(ids):
        return pd.DataFrame(
            {
                "sample_id": ids,
                "patches_path": [f"patches/{i}.h5" for i in ids],
                "expr_path": [f"adata/{i}.h5ad" for i in ids],
            }
        )

    for k, test in enumerate(sections):
        rows([s for s in sections if s != test]).to_csv(dest / "splits" / f"train_{k}.csv", index=False)
        rows([test]).to_csv(dest / "splits" / f"test_{k}.csv", index=False)
    return dest


def top_k_genes(adatas, k: int, min_cells_pct: float = 0.10) -> list[str]:
    """HEST-Benchmark's gene choice (``get_k_genes(criteria='var')``): genes found in >= 10 % of the spots of every
    sample, counts stacked, log1p, scanpy's ``highly_variable_genes(n_top_genes=k)``, in the stacked gene order."""
    import anndata
    import scanpy as sc

    common = None
    for a in adatas:
        b = a.copy()
        sc.pp.filter_genes(b, min_cells=int(np.ceil(min_cells_pct * b.n_obs)))
        common = set(b.var_names) if common is None else common & set(b.var_names)
    genes = sorted(g for g in common if "BLANK" not in g and "Control" not in g)
    st = anndata.concat([a[:, genes] for a in adatas])
    st.X = st.X.astype(np.float32)
    sc.pp.log1p(st)
    sc.pp.highly_variable_genes(st, n_top_genes=k)
    return st.var_names[st.var["highly_variable"].to_numpy()][:k].tolist()


def load_sample(task: Path, row) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """HEST patches (uint8) and the barcodes, in the patches file's order, and the sample id."""
    import h5py

    with h5py.File(task / row["patches_path"], "r") as f:
        img = np.asarray(f["img"][()])
        bc = [b.decode() if isinstance(b, bytes) else str(b) for b in np.asarray(f["barcode"][()]).reshape(-1)]
    return img, np.asarray(bc), row["sample_id"]


def embed_array(img: np.ndarray, enc, batch: int) -> np.ndarray:
    import torch

    out = []
    enc.module.eval()
    with torch.inference_mode():
        for i in range(0, len(img), batch):
            out.append(enc.module(enc.preprocess(torch.from_numpy(img[i : i + batch]))).float().numpy())
    return np.concatenate(out)


def split_data(task: Path, csv: Path, genes: list[str], enc, cache: dict, batch: int):
    import anndata as ad

    xs, ys, ids = [], [], []
    for _, row in pd.read_csv(csv).iterrows():
        sid = row["sample_id"]
        if sid not in cache:
            img, bc, _ = load_sample(task, row)
            a = ad.read_h5ad(task / row["expr_path"])
            a.var_names_make_unique()
            y = np.log1p(np.asarray(a[bc, genes].X.toarray() if hasattr(a.X, "toarray") else a[bc, genes].X))
            cache[sid] = (embed_array(img, enc, batch), y.astype(np.float64))
        x, y = cache[sid]
        xs.append(x)
        ys.append(y)
        ids += [sid] * len(x)
    return np.concatenate(xs), np.concatenate(ys), np.asarray(ids)


def hest_ridge(x_tr, y_tr, x_te):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    red = make_pipeline(StandardScaler(), PCA(n_components=min(256, *x_tr.shape), random_state=1))
    z_tr, z_te = red.fit_transform(x_tr), red.transform(x_te)
    reg = Ridge(solver="lsqr", alpha=100 / (z_tr.shape[1] * y_tr.shape[1]), fit_intercept=False, max_iter=1000)
    return reg.fit(z_tr, y_tr).predict(z_te)


def _as_adata(x, y, genes, ids=None):
    from anndata import AnnData

    a = AnnData(X=y.astype(np.float32))  # already log1p counts: the methods get normalize="none"
    a.var_names = genes
    if ids is not None:
        a.obs["library_id"] = pd.Categorical(ids)
    a.obsm["X_f"] = x
    return a


def hx_ridge(x_tr, y_tr, ids_tr, x_te, genes):
    tr, te = _as_adata(x_tr, y_tr, genes, ids_tr), _as_adata(x_te, np.zeros((len(x_te), len(genes))), genes)
    model = hx.tl.fit_ridge(tr, genes=genes, use_rep="X_f", normalize="none", library_key="library_id", random_state=0)
    return np.asarray(hx.tl.impute(te, model).layers["ridge"])


def hx_bleep(x_tr, y_tr, ids_tr, x_te, genes):
    tr, te = _as_adata(x_tr, y_tr, genes, ids_tr), _as_adata(x_te, np.zeros((len(x_te), len(genes))), genes)
    model = hx.tl.fit_bleep(
        tr,
        genes=genes,
        use_rep="X_f",
        normalize="none",
        library_key="library_id",
        random_state=0,
        finetune_encoder=False,
    )
    return np.asarray(hx.tl.impute(te, model).layers["bleep"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task-dir")
    p.add_argument("--build-her2st", help="write a task folder from the local her2st data here and run on it")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--encoders", nargs="+", default=["handcrafted"])
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--random-init", nargs="*", default=[])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    hx.settings.progress = False
    if args.build_her2st:
        task = build_her2st_task(Path(args.build_her2st), args.data_dir)
        name = "her2st"
    elif args.task_dir:
        task, name = Path(args.task_dir), Path(args.task_dir).name
    else:
        p.error("give --task-dir or --build-her2st")
    genes = json.loads((task / "var_50genes.json").read_text())["genes"]
    n_folds = len(list((task / "splits").glob("train_*.csv")))
    log(f"task {name}: {n_folds} folds, {len(genes)} genes")
    result = {"task": name, "n_folds": n_folds, "genes": genes, "encoders": {}}
    for key in args.encoders:
        import torch

        torch.manual_seed(0)
        w = weights_for(key, args.weights_dir, set(args.random_init))
        enc = hx.models.get_encoder(key, weights=w)
        cache: dict = {}
        folds = []
        for k in range(n_folds):
            x_tr, y_tr, ids_tr = split_data(
                task, task / "splits" / f"train_{k}.csv", genes, enc, cache, args.batch_size
            )
            x_te, y_te, _ = split_data(task, task / "splits" / f"test_{k}.csv", genes, enc, cache, args.batch_size)
            mu, v1 = pc1(y_tr)
            s = (y_te - mu) @ v1
            from sklearn.linear_model import RidgeCV
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            one = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15))).fit(x_tr, (y_tr - mu) @ v1)
            preds = {
                "mean": np.broadcast_to(mu, y_te.shape).copy(),
                "one-pattern": mu + np.outer(one.predict(x_te), v1),
                "HEST recipe (PCA-256 + ridge)": hest_ridge(x_tr, y_tr, x_te),
                "hx ridge": hx_ridge(x_tr, y_tr, ids_tr, x_te, genes),
                "hx BLEEP": hx_bleep(x_tr, y_tr, ids_tr, x_te, genes),
            }
            fold = {
                row: {
                    "pcc": float(np.nanmean(pearson_per_gene(pr, y_te))),
                    "gene_specific_pcc": float(np.nanmean(gene_specific_pcc(pr, y_te, s))),
                }
                for row, pr in preds.items()
            }
            folds.append(fold)
            log(f"{key} fold {k}: " + "  ".join(f"{r} {v['pcc']:.3f}" for r, v in fold.items()))
        summary = {
            row: {
                m: [float(np.mean([f[row][m] for f in folds])), float(np.std([f[row][m] for f in folds]))]
                for m in ("pcc", "gene_specific_pcc")
            }
            for row in folds[0]
        }
        result["encoders"][key] = {
            "weights": enc.config.get("weights"),
            "random_init": enc.random_init,
            "dim": enc.dim,
            "folds": folds,
            "summary": summary,
        }
    out = Path(args.out) if args.out else HERE / "results" / f"hest_bench_{name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    note = "; her2st: folds are sections of patient C, the only patient with images" if name == "her2st" else ""
    lines = [
        f"HEST-Benchmark recipe on task `{name}` ({n_folds} folds{note}), top-{len(genes)} variable genes, log1p "
        "counts, 224 px patches at 0.5 µm/px. Pearson r mean ± sd over folds (gene-specific PCC in brackets). "
        f"Command: `python benchmarks/hest_bench.py {' '.join(sys.argv[1:])}`.",
        "",
        "| encoder | weights | " + " | ".join(folds[0]) + " |",
        "|---|---|" + "---:|" * len(folds[0]),
    ]
    for key, r in result["encoders"].items():
        w = "random init" if r["random_init"] else str(r["weights"])
        cells = [
            f"{v['pcc'][0]:.3f} ± {v['pcc'][1]:.3f} ({v['gene_specific_pcc'][0]:.3f})" for v in r["summary"].values()
        ]
        lines.append(f"| {key} | {w} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
