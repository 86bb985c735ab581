"""Retrieval against large references: exact chunked top-k vs the faiss indexes (time, peak memory, recall).

What is measured, for reference sizes 10^4 ... 10^7 at 10^5 query spots (``hx.tl._retrieval.retrieve``, the
function behind ``hx.tl.impute`` for retrieval models; k = 50, weighting ``'average'``):

- wall time of one ``retrieve`` call (for the faiss indexes it includes building the index);
- peak memory of that call above the process' memory before it (``VmHWM`` reset through
  ``/proc/self/clear_refs`` before the call, minus ``VmRSS`` before it), each measurement in a fresh process;
  the inputs themselves (reference embeddings, reference values, queries) are reported apart;
- recall@50 of the approximate neighbours against the exact ones on 2,000 of the queries, and for sizes where
  the exact search ran in full, the mean absolute difference of the predictions.

Data (real her2st structure, synthetic size): the 785-gene panel's log1p(normalize_total 1e4) expression of all
35 her2st sections with counts is standardised and projected on its first 64 principal components (fitted on
the spots of the 34 sections other than C2): these are the "real embeddings" (a linear stand-in for an expression
encoder; 64 dimensions rather than BLEEP's 256 so that 10^7 references fit in memory: 2.56 GB). A reference of
n spots draws n real spots of those 34 sections with replacement and adds Gaussian noise with half the
standard deviation of each component; its values are the drawn spots' expression of the 16 most variable
panel genes. Queries are C2's spots drawn the same way (never in the reference). The same seed gives the same
data for every index at one size. The exact search runs up to 10^6 references (10^7 would take ~10x the
10^6 time); HNSW up to 10^6 (its graph build is the slow part on 2 cores).

Usage (heavy: run under the shared lock)::

    python benchmarks/scale_retrieval.py [--data-dir ../shared/data/her2st] [--sizes 1e4 1e5 1e6 1e7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
K = 50
N_VALUES = 16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def real_embeddings(data_dir: str, dim: int, out: Path) -> dict:
    """PCA embeddings and values of the real her2st spots, saved to ``out`` (npz) for the measuring processes."""
    from sklearn.decomposition import PCA

    import histoexp as hx

    panel = hx.datasets.her2st_gene_panel()
    sections = hx.datasets.her2st_sections()
    adata = hx.datasets.her2st(sections, data_dir=data_dir)
    genes = [g for g in panel if g in adata.var_names]
    expr = hx.pp.expression_matrix(adata, genes)
    is_query = (adata.obs["library_id"].astype(str) == "C2").to_numpy()
    mu, sd = expr[~is_query].mean(0), expr[~is_query].std(0) + 1e-6
    z = (expr - mu) / sd
    pca = PCA(dim, random_state=0).fit(z[~is_query])
    emb = pca.transform(z).astype(np.float32)
    top = np.argsort(-expr[~is_query].var(0))[:N_VALUES]
    np.savez(
        out,
        ref_emb=emb[~is_query],
        ref_val=expr[~is_query][:, top].astype(np.float32),
        query_emb=emb[is_query],
        noise_sd=(0.5 * emb[~is_query].std(0)).astype(np.float32),
    )
    return {
        "n_sections": len(sections),
        "n_real_reference_spots": int((~is_query).sum()),
        "n_real_query_spots": int(is_query.sum()),
        "n_genes_panel": len(genes),
        "dim": dim,
        "explained_variance": float(pca.explained_variance_ratio_.sum()),
    }


def make_data(base: Path, n_ref: int, n_query: int, seed: int = 0):
    d = np.load(base)
    rng = np.random.default_rng([seed, n_ref])
    ref_emb, ref_val, q_emb, sd = d["ref_emb"], d["ref_val"], d["query_emb"], d["noise_sd"]
    dim = ref_emb.shape[1]
    bank = np.empty((n_ref, dim), dtype=np.float32)
    values = np.empty((n_ref, ref_val.shape[1]), dtype=np.float32)
    step = 1 << 20
    for a in range(0, n_ref, step):  # in blocks: no float64 copy of the whole reference
        b = min(a + step, n_ref)
        rows = rng.integers(0, len(ref_emb), b - a)
        bank[a:b] = ref_emb[rows] + rng.standard_normal((b - a, dim), dtype=np.float32) * sd
        values[a:b] = ref_val[rows]
    rows = rng.integers(0, len(q_emb), n_query)
    query = q_emb[rows] + rng.standard_normal((n_query, dim), dtype=np.float32) * sd
    return bank, values, query.astype(np.float32)


def measure(args) -> dict:
    """One (size, index) measurement in this process; prints a JSON line."""
    import torch

    from histoexp.tl._retrieval import nearest_neighbours, retrieve

    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:  # pragma: no cover - the exact rows need no faiss
        pass
    bank, values, query = make_data(Path(args.base), args.n_ref, args.n_query)
    rec = {"n_reference": args.n_ref, "n_query": args.n_query, "index": args.index, "k": K, "dim": bank.shape[1]}
    rec["inputs_mb"] = round((bank.nbytes + values.nbytes + query.nbytes) / 2**20, 1)
    kw = {} if args.index == "exact" else {"index": args.index}
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    t0 = time.perf_counter()
    pred, _ = retrieve(query, bank, values, k=K, method="average", **kw)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec["peak_mb_above_inputs"] = round((_status("VmHWM") - before) / 2**20, 1)
    if args.index != "exact":
        from histoexp.tl._retrieval import _index_params

        rec["index_params"] = _index_params(args.index, None, args.n_ref)
    sub = query[: args.recall_queries]
    _, exact = nearest_neighbours(sub, bank, K)
    if args.index != "exact":
        t0 = time.perf_counter()
        _, approx = nearest_neighbours(sub, bank, K, **kw)
        rec["recall_seconds_with_build"] = round(time.perf_counter() - t0, 2)
        rec["recall_at_k"] = round(
            float(np.mean([len(set(a) & set(b)) / K for a, b in zip(approx, exact, strict=True)])), 4
        )
    else:
        rec["recall_at_k"] = 1.0
    np.save(args.pred_out, pred[: args.recall_queries * 5])
    return rec


def run_one(base: Path, n_ref: int, index: str, args, tmp: Path) -> dict:
    pred_out = tmp / f"pred_{n_ref}_{index}.npy"
    cmd = [
        sys.executable,
        __file__,
        "--one",
        "--base",
        str(base),
        "--n-ref",
        str(n_ref),
        "--index",
        index,
        "--n-query",
        str(args.n_query),
        "--threads",
        str(args.threads),
        "--recall-queries",
        str(args.recall_queries),
        "--pred-out",
        str(pred_out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        log(f"n={n_ref} {index}: failed\n{res.stderr[-3000:]}")
        return {"n_reference": n_ref, "index": index, "error": res.stderr.strip().splitlines()[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_md(out: dict, path: Path) -> None:
    lines = [
        "# Retrieval against large references: exact vs approximate (faiss)",
        "",
        f"Written by `benchmarks/scale_retrieval.py` on {out['date']} ({out['machine']}, {out['threads']} threads).",
        "",
        f"{out['protocol']}",
        "",
        "| reference spots | index | seconds | peak MB above inputs | inputs MB | recall@50 | mean abs diff vs exact |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['n_reference']:,} | {r['index']} | failed: {r['error']} | | | | |")
            continue
        diff = r.get("mean_abs_diff_vs_exact")
        lines.append(
            f"| {r['n_reference']:,} | {r['index']} | {r['seconds']:.1f} | {r['peak_mb_above_inputs']:.0f} | "
            f"{r['inputs_mb']:.0f} | {r['recall_at_k']:.3f} | {'-' if diff is None else f'{diff:.4f}'} |"
        )
    lines += ["", "Index parameters (defaults of `hx.tl.nearest_neighbours` for each size):", ""]
    for r in out["rows"]:
        if r.get("index_params"):
            lines.append(f"- {r['n_reference']:,} {r['index']}: `{r['index_params']}`")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    p.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7])
    p.add_argument("--n-query", type=int, default=100_000)
    p.add_argument("--exact-max", type=float, default=1e6)
    p.add_argument("--hnsw-max", type=float, default=1e6)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recall-queries", type=int, default=2000)
    p.add_argument("--out", default=str(HERE / "results" / "scale_retrieval"))
    # one measurement (internal: run in a fresh process by main)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--n-ref", type=int, help=argparse.SUPPRESS)
    p.add_argument("--index", help=argparse.SUPPRESS)
    p.add_argument("--pred-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base.npz"
        log("real embeddings: her2st panel expression -> PCA")
        data = real_embeddings(args.data_dir, args.dim, base)
        log(f"{data}")
        out = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "threads": args.threads,
            "data": data,
            "protocol": (
                f"{args.n_query:,} queries, k={K}, weighting 'average', {args.dim}-d embeddings: PCA of the "
                f"standardised log1p 785-gene panel expression of {data['n_sections']} her2st sections, reference = "
                f"real spots of the {data['n_sections'] - 1} sections other than C2 "
                f"({data['n_real_reference_spots']:,}) drawn with replacement + Gaussian noise (half the std of each "
                "component), queries = C2 spots drawn the same way; values = 16 genes. Time and peak memory of one "
                "`retrieve` call (index build included) in a fresh process; recall@50 against the exact search on "
                f"the first {args.recall_queries:,} queries; mean abs difference of the predictions of the first "
                f"{5 * args.recall_queries:,} queries (log1p scale) where the exact search ran in full."
            ),
            "rows": [],
        }
        jobs = []
        for n in (int(s) for s in args.sizes):
            jobs += (
                [(n, "exact")] * (n <= args.exact_max) + [(n, "faiss-ivf")] + [(n, "faiss-hnsw")] * (n <= args.hnsw_max)
            )
        # the slowest measurement (the largest exact search) last: an interrupted run keeps the others
        largest_exact = max((j for j in jobs if j[1] == "exact"), default=None)
        jobs = [j for j in jobs if j != largest_exact] + ([largest_exact] if largest_exact else [])
        for n, index in jobs:
            log(f"n_reference={n:,} index={index} ...")
            rec = run_one(base, n, index, args, tmp)
            log(f"  {rec}")
            out["rows"].append(rec)
            for r in out["rows"]:
                exact_pred, own = (
                    tmp / f"pred_{r['n_reference']}_exact.npy",
                    tmp / f"pred_{r['n_reference']}_{r['index']}.npy",
                )
                if r["index"] != "exact" and exact_pred.exists() and own.exists():
                    r["mean_abs_diff_vs_exact"] = round(float(np.abs(np.load(own) - np.load(exact_pred)).mean()), 5)
            out["rows"].sort(key=lambda r: (r["n_reference"], ["exact", "faiss-ivf", "faiss-hnsw"].index(r["index"])))
            # written after every measurement: an interrupted run keeps what it measured
            dest.with_suffix(".json").write_text(json.dumps(out, indent=1))
            write_md(out, dest.with_suffix(".md"))
    log(f"wrote {dest.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
