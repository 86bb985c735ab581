"""How much gene-specific skill can a zero-shot model reach on her2st? Gene inputs, ceilings, and the control.

The zero-shot benchmark (``her2st_zeroshot.py``) finds the default model ahead of its shuffled-embedding control by
0.044 PCC@M but behind it in gene-specific PCC@M. This script asks why, and whether better gene embeddings could
change it, with the model of ``fit_zeroshot(method='axes')`` at fixed ranks (its numpy core, so that many variants
run in minutes; one cell is checked against ``hx.tl.fit_zeroshot`` itself).

Protocol: as ``her2st_zeroshot.py`` (leave-one-section-out over C2..C6 × the same five gene folds of the 785 panel
genes with an embedding; targets log1p(normalize_total 1e4); the held-out genes' counts in C2..C6 enter nothing but
the two ceilings, which are labelled so). Each row has its **control**: the same model with its gene inputs permuted
among the panel genes (``hx.tl.shuffle_embedding_table``'s permutation). Rows:

- ``coexpression-64`` (the default inputs): ``hx.pp.gene_embeddings`` (64-d) of the 29 count-only sections of
  patients A, B, D-H; ``coexpression-128``: 128 dimensions; ``+level``: with each gene's log mean and detection
  rate in those sections; ``+bank loadings``: with each gene's regression on the *training axes* in those sections
  (the seen genes' bank expression projected on the axes; a seen gene left out of its own scores) — the quantity
  the map must predict, measured on other patients;
- ``CEILING own loadings``: the unseen genes' own loadings on the training axes and their means, from their
  counts in the training sections (what a perfect embedding would give; not zero-shot);
- ``CEILING supervised``: the same reduced-rank model trained on the unseen genes' own counts (axes of their own
  expression; not zero-shot);
- ``mean``, ``one-pattern (supervised)``, ``ridge (supervised)``: the protocol's reference rows, trained on the
  unseen genes' own counts (``hx.tl.fit_ridge``, ``rank=1`` for one-pattern), judged against the default's control;
- ``... no axis-1 term``: the same predictions without the first axis' term (a diagnostic, not a method): the
  gene-specific PCC partials out the *measured* first-axis score, so the error of the *predicted* one stays in
  the prediction's residual, in proportion to the gene's first-axis loading.

Metrics: PCC@M, gene-specific PCC@M (partial r given the measured score on the first training axis) and
``specific-2`` (given the first two), as in ``her2st_zeroshot.py``.

Usage::

    python benchmarks/her2st_zeroshot_ceiling.py [--data-dir ../shared/data/her2st] [--cache DIR] \
        [--features own ms] [--ranks 3 8 16]

Writes ``benchmarks/results/her2st_zeroshot_ceiling.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import histoexp as hx
from histoexp._stats import expression_axes, partial_pearson
from histoexp.tl._zeroshot import _features
from histoexp.tl._zeroshot_axes import embedding_inputs, fit_axes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from her2st_bleep import SECTIONS, embed  # noqa: E402
from her2st_zeroshot import (  # noqa: E402
    cached,
    common_args,
    log,
    machine,
    multiscale,
    residualise,
    supervised_baselines,
    write_results,
)

INPUTS = ("coexpression-64", "coexpression-128", "coexpression-64 +level", "coexpression-64 +bank loadings")
CEILINGS = ("CEILING own loadings", "CEILING supervised")
NO_AX1 = ("coexpression-64", "CEILING own loadings", "CEILING supervised")
KEYS = ("pcc", "specific", "specific2")


def bank_loadings(bank_c: np.ndarray, bank_sd: np.ndarray, axes: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Every gene's regression (per bank sd) on the bank scores of the training axes; seen genes left out of them.

    ``bank_c``: bank expression of the panel, centred within each bank section; ``axes``: (n_seen, k).
    """
    s = bank_c[:, seen] @ axes
    sts, stb = s.T @ s, s.T @ bank_c
    out = np.linalg.solve(sts, stb).T
    bb = (bank_c**2).sum(0)
    for j, g in enumerate(seen):
        # the scores without gene g's own term: S - b_g a_g^T (a rank-one update of S^T S and S^T b_g)
        a, sb = axes[j], stb[:, g]
        m = sts - np.outer(sb, a) - np.outer(a, sb) + bb[g] * np.outer(a, a)
        out[g] = np.linalg.solve(m, sb - bb[g] * a)
    return out / bank_sd[:, None]


def scores3(pred: np.ndarray, truth: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """PCC@M, gene-specific PCC@M (given the first axis) and specific-2 PCC@M (given two), over non-constant genes."""
    r0, _ = partial_pearson(pred, truth, None)
    r1, _ = partial_pearson(pred, truth, s2[:, 0])
    r2, _ = partial_pearson(residualise(pred, s2), residualise(truth, s2), None)
    return np.array([np.nanmean(r0), np.nanmean(r1), np.nanmean(r2)])


def run(features: np.ndarray, truth: np.ndarray, lib: np.ndarray, tables: dict, bank, fold_of, perm, rank: int):
    """Every row x section x gene fold at one rank; returns {row: (sections, folds, 3)} and {row + control: ...}."""
    rows = [*INPUTS, *CEILINGS]
    rows += [f"{r} no axis-1 term" for r in NO_AX1]
    res = {r: np.zeros((len(SECTIONS), 5, 3)) for r in rows}
    ctrl = {r: np.zeros((len(SECTIONS), 5, 3)) for r in rows if not r.startswith("CEILING")}
    n_pcs = None if features.shape[1] <= 256 else 256
    for i, test in enumerate(SECTIONS):
        tr, te = lib != test, lib == test
        mean_tr, axes_tr = expression_axes(truth[tr], 2)
        s2 = (truth[te] - mean_tr) @ axes_tr
        _, transform = _features(features[tr], n_pcs, 0)
        z_tr, z_te = transform(features[tr]), transform(features[te])
        for f in range(5):
            seen, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
            y = truth[tr][:, seen]
            mean, axes = expression_axes(y, rank)
            loads = bank_loadings(bank[0], bank[1], axes, seen)
            variants = {
                "coexpression-64": tables["64"],
                "coexpression-128": tables["128"],
                "coexpression-64 +level": np.c_[embedding_inputs(tables["64"], seen), tables["level"]],
                "coexpression-64 +bank loadings": np.c_[
                    embedding_inputs(tables["64"], seen), embedding_inputs(loads, seen)
                ],
            }
            fits = {}
            for name, table in variants.items():
                for control in (False, True):
                    t = table[perm] if control else table
                    fit = fit_axes(z_tr, y, lib[tr], embedding_inputs(t, seen), seen, held, rank=rank)
                    fits[(name, control)] = fit
            base = fits[("coexpression-64", False)]
            # ceilings: the unseen genes' own loadings on the training axes, or a model of their own expression
            yh = truth[tr][:, held]
            sc_tr = (y - mean) @ axes
            own = np.linalg.lstsq(sc_tr - sc_tr.mean(0), yh - yh.mean(0), rcond=None)[0].T
            fits[("CEILING own loadings", False)] = type(base)(
                base.coef, base.intercept, base.image_alphas, own, yh.mean(0), base.map_alphas, base.mean, base.axes
            )
            fits[("CEILING supervised", False)] = fit_axes(z_tr, yh, lib[tr], None, None, None, rank=rank)
            for (name, control), fit in fits.items():
                sc = fit.scores(z_te)
                k = sc.shape[1]
                pred = fit.levels + sc @ fit.loadings[:, :k].T
                (ctrl if control else res)[name][i, f] = scores3(pred, truth[te][:, held], s2)
                if name in NO_AX1:
                    pred = fit.levels + sc[:, 1:] @ fit.loadings[:, 1:k].T
                    (ctrl if control else res)[f"{name} no axis-1 term"][i, f] = scores3(pred, truth[te][:, held], s2)
        log(f"rank {rank}: {test} done")
    return res, ctrl


def baselines(adata, features, truth, lib, panel, fold_of) -> dict[str, np.ndarray]:
    """Mean, one-pattern and ridge trained on each fold's genes (``hx.tl.fit_ridge``): {row: (sections, folds, 3)}."""
    out: dict[str, np.ndarray] = {}
    for i, test in enumerate(SECTIONS):
        tr, te = lib != test, lib == test
        train, query = adata[tr].copy(), adata[te].copy()
        train.obsm["X_f"], query.obsm["X_f"] = features[tr], features[te]
        mean_tr, axes_tr = expression_axes(truth[tr], 2)
        s2 = (truth[te] - mean_tr) @ axes_tr
        for f in range(5):
            held = np.flatnonzero(fold_of == f)
            preds = supervised_baselines(train, query, [panel[j] for j in held], "X_f")
            for name, pred in preds.items():
                out.setdefault(name, np.zeros((len(SECTIONS), 5, 3)))[i, f] = scores3(
                    np.asarray(pred, np.float64), truth[te][:, held], s2
                )
        log(f"baselines: {test} done")
    return out


def check_against_library(adata, features, panel, table64, fold_of, rank: int) -> float:
    """Largest |difference| between the numpy core and ``hx.tl.fit_zeroshot`` (C2 held out, gene fold 0)."""
    lib = adata.obs["library_id"].astype(str).to_numpy()
    train, query = adata[lib != "C2"].copy(), adata[lib == "C2"].copy()
    train.obsm["X_f"], query.obsm["X_f"] = features[lib != "C2"], features[lib == "C2"]
    seen = [g for g, f in zip(panel, fold_of, strict=True) if f != 0]
    unseen = [g for g, f in zip(panel, fold_of, strict=True) if f == 0]
    model = hx.tl.fit_zeroshot(
        train, gene_embeddings=table64, genes=seen, use_rep="X_f", rank=rank, crossfit=False, overwrite=True
    )
    lib_pred = hx.tl.impute(query, model, genes=unseen, interval=None).layers["zeroshot"]
    truth = hx.pp.expression_matrix(adata, panel).astype(np.float64)
    tr = lib != "C2"
    idx_seen = np.flatnonzero(fold_of != 0)
    _, transform = _features(features[tr], None if features.shape[1] <= 256 else 256, 0)
    t64 = table64.loc[panel].to_numpy(np.float64)
    fit = fit_axes(
        transform(features[tr]),
        truth[tr][:, idx_seen],
        lib[tr],
        embedding_inputs(t64, idx_seen),
        idx_seen,
        np.flatnonzero(fold_of == 0),
        rank=rank,
    )
    return float(np.abs(fit.predict(transform(features[~tr])) - lib_pred).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p, "her2st_zeroshot_ceiling")
    p.add_argument("--features", nargs="+", default=["own", "ms"], choices=["own", "ms"])
    p.add_argument("--ranks", type=int, nargs="+", default=[3, 8, 16])
    args = p.parse_args()
    hx.settings.progress = False
    hx.settings.device = "cpu"
    t0 = time.time()
    cache = Path(args.cache) if args.cache else None
    adata = hx.datasets.her2st(SECTIONS, data_dir=args.data_dir)
    others = [s for s in hx.datasets.her2st_sections() if not s.startswith("C")]
    bank_ad = hx.datasets.her2st(others, data_dir=args.data_dir)
    embs = {
        n: cached(cache, f"gene_embeddings_{n}.parquet", lambda n=n: hx.pp.gene_embeddings(bank_ad, n_components=n))
        for n in (64, 128)
    }
    panel = [g for g in hx.datasets.her2st_gene_panel() if g in adata.var_names and g in embs[64].index]
    truth = hx.pp.expression_matrix(adata, panel).astype(np.float64)
    lib = adata.obs["library_id"].astype(str).to_numpy()
    bank = hx.pp.expression_matrix(bank_ad, panel).astype(np.float64)
    blib = bank_ad.obs["library_id"].astype(str).to_numpy()
    level = np.c_[np.log(np.maximum(np.expm1(bank).mean(0), 1e-6)), (bank > 0).mean(0)]
    bank_c = bank.copy()
    for s in np.unique(blib):
        bank_c[blib == s] -= bank_c[blib == s].mean(0)
    bank_sd = np.maximum(bank_c.std(0), 1e-3)
    tables = {
        "64": embs[64].loc[panel].to_numpy(np.float64),
        "128": embs[128].loc[panel].to_numpy(np.float64),
        # each column standardised, then the pair weighed like one embedding dimension of average size
        "level": (level - level.mean(0)) / level.std(0) / np.sqrt(embs[64].shape[1]),
    }
    fold_of = np.random.default_rng(args.gene_seed).permutation(len(panel)) % 5
    perm = np.random.default_rng(args.seed).permutation(len(panel))  # hx.tl.shuffle_embedding_table's
    log(f"C2..C6 {adata.n_obs} spots, {len(panel)} panel genes; bank {bank_ad.n_obs} spots of {len(others)} sections")
    feats = {}
    for name in args.features:
        if name == "own":
            own = lambda: embed(adata, "handcrafted", patch_px=112, size_um=112)  # noqa: E731
            feats[name] = cached(cache, "handcrafted.npy", own)
        else:
            feats[name] = cached(cache, "handcrafted_ms.npy", lambda: multiscale(adata))
    check = check_against_library(adata, feats[args.features[0]], panel, embs[64], fold_of, args.ranks[0])
    log(f"numpy core vs hx.tl.fit_zeroshot (rank {args.ranks[0]}, C2, gene fold 0): max |diff| {check:.2e}")
    assert check < 1e-3, check
    results = {}
    for fname, x in feats.items():
        base = baselines(adata, x, truth, lib, panel, fold_of)
        for rank in args.ranks:
            res, ctrl = run(x, truth, lib, tables, (bank_c, bank_sd), fold_of, perm, rank)
            res = {**base, **res}
            default = ctrl["coexpression-64"]
            results[f"{fname}/{rank}"] = {}
            for r in res:
                # rows without a control of their own (the ceilings) are judged against the default's control
                c = ctrl.get(r, default)
                results[f"{fname}/{rank}"][r] = {
                    "mean": res[r].mean((0, 1)).tolist(),
                    "sections": res[r].mean(1).tolist(),
                    "folds": res[r].mean(0).tolist(),
                    "control": "own" if r in ctrl else "coexpression-64's",
                    "control_mean": c.mean((0, 1)).tolist(),
                    "margin_sections": (res[r] - c).mean(1).tolist(),
                    "margin_folds": (res[r] - c).mean(0).tolist(),
                }
    result = {
        "benchmark": "her2st zero-shot ceiling: gene inputs, perfect-embedding and supervised ceilings, controls",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python benchmarks/her2st_zeroshot_ceiling.py " + " ".join(sys.argv[1:]),
        "library_check_max_abs_diff": check,
        "n_panel_genes": len(panel),
        "seconds": round(time.time() - t0, 1),
        "results": results,
    }
    text = report(result)
    write_results(args.out, result, text)
    print(text)


def report(result: dict) -> str:
    mc = result["machine"]
    lines = [
        "# her2st zero-shot ceiling: what gene inputs can add, what a perfect embedding would reach",
        "",
        f"{result['date']} · {mc['platform']}, {mc['cpu_count']} CPU cores, histoexp {mc['histoexp']} · "
        f"`{result['command'].strip()}` · {result['seconds']:.0f} s",
        "",
        "LOSO over C2..C6 × the five gene folds of `her2st_zeroshot.py` (seed 0), "
        f"{result['n_panel_genes']} panel genes, targets log1p(normalize_total 1e4); features `own` = handcrafted "
        "112 µm at 112 px, `ms` = the same at scales 1, 2, 3, 5. The expression-axes model of "
        "`fit_zeroshot(method='axes')` at a fixed rank (its numpy core; checked against `hx.tl.fit_zeroshot` on one "
        f"cell: max |diff| {result['library_check_max_abs_diff']:.1e}). Control: the row's gene inputs permuted among "
        "the panel genes. CEILING rows use the unseen genes' counts in the training sections (not zero-shot). "
        "'no axis-1 term' rows drop the first axis from the prediction (a diagnostic). Columns: PCC@M / "
        "gene-specific PCC@M / specific-2 PCC@M, mean over the 25 cells; margin = row - its control; "
        "min = the smallest margin over the five held-out sections.",
        "",
    ]
    for key, rows in result["results"].items():
        fname, rank = key.split("/")
        lines += [
            f"## features {fname}, rank {rank}",
            "",
            "| row | PCC@M | gene-specific | specific-2 | control (PCC / specific / specific-2) | margin PCC (min) | "
            "margin gene-specific (min) | margin specific-2 (min) |",
            "| --- | ---: | ---: | ---: | --- | --- | --- | --- |",
        ]
        for name, r in rows.items():
            m, c = r["mean"], r["control_mean"]
            ms = np.asarray(r["margin_sections"])
            ctrl = f"{c[0]:.4f} / {c[1]:.4f} / {c[2]:.4f}" + ("" if r["control"] == "own" else " (default's)")
            cells = [f"| {name} | {m[0]:.4f} | {m[1]:.4f} | {m[2]:.4f} | {ctrl} |"]
            cells += [f" {ms[:, j].mean():+.4f} ({ms[:, j].min():+.4f}) |" for j in range(3)]
            lines.append("".join(cells))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
