"""The ``histoexp`` command: ``demo`` (the main job), ``fit``, ``impute`` and ``evaluate``.

Run ``histoexp --help`` or ``histoexp <command> --help``. The console script calls :func:`main`, which
returns the exit status (0 on success, 1 on bad input or a failed step with a one-line message, 2 on
a usage error).

Outputs: every command checks all its outputs before doing any work. An existing output is replaced
only with ``--overwrite`` (a folder only when histoexp wrote it), an output may not be one of the
inputs, and each file is written once, atomically (complete, or not at all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

DEMO_SECTIONS = ("C2", "C3", "C4", "C5", "C6")
DEMO_GENES = ("ERBB2", "GNAS")
#: patch side per encoder: the handcrafted encoder works at 112 px, torchvision CNNs at 224 px.
DEFAULT_PATCH_PX = {"handcrafted": 112}
_SCALES_HELP = (
    "multi-scale image features, e.g. 1,2,3,5: crops of 1x, 2x, ... the patch side around each spot, each at "
    "--patch-px pixels, encoded and concatenated (default: the patch alone)"
)
#: the demo's default scales (``--scales 1``: the patch alone)
DEMO_SCALES = "1,2,3,5"


class CLIError(Exception):
    """Bad input detected by the command line (printed as ``histoexp: error: ...``, exit status 1)."""


class _Steps:
    """Numbered progress lines with elapsed time, on stderr."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.i, self.quiet, self.t0 = total, 0, quiet, time.perf_counter()

    def __call__(self, msg: str) -> None:
        self.i += 1
        if not self.quiet:
            print(f"[{self.i}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def note(self, msg: str) -> None:
        if not self.quiet:
            print(f"    {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- helpers
def _positive(option: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise CLIError(f"{option} {value}: expected an integer >= {minimum}.")


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
    except OSError:
        pass
    return a.expanduser().resolve() == b.expanduser().resolve()


def _weighting_arg(value: str | None) -> str | None:
    """Check ``--method``: any registered retrieval weighting (``None``: the model's default)."""
    from histoexp.tl._retrieval import WEIGHTINGS

    if value is not None and value not in WEIGHTINGS:
        raise CLIError(f"--method {value!r}: expected one of {sorted(WEIGHTINGS)} (retrieval weightings).")
    return value


def _same_geometry(parts: Sequence, rep: str, paths: Sequence[str]) -> None:
    """Refuse references whose features come from patches of different geometries (one model, one patch scale)."""
    from histoexp._geometry import describe, geometry_differences

    recs = [a.uns.get("histoexp", {}).get("embeddings", {}).get(rep) or {} for a in parts]
    for path, rec in zip(paths[1:], recs[1:], strict=True):
        diffs = geometry_differences(rec, recs[0], ("size_um", "mpp", "patch_px"))
        if diffs:
            raise CLIError(
                f"reference {path!r} was embedded from patches of another geometry than {paths[0]!r}: "
                f"{describe(diffs, paths[0])}; one model reads one patch scale: fit on references of one spot size "
                "(or give them the same patches with hx.pp.extract_patches(size_um=..., patch_px=...) first)."
            )


def _retrieval_only(args, model) -> None:
    """``--k`` and ``--method`` apply to retrieval models (None: the model's defaults)."""
    given = [opt for opt, v in (("--k", args.k), ("--method", args.method)) if v is not None]
    if given and model.kind != "retrieval":
        opts = " and ".join(given)
        raise CLIError(f"{opts} apply to retrieval models; {model.method!r} predicts from the image alone.")


def _check_not_in_model(out: Path, model_dir: Path, opt: str = "--output") -> None:
    """Refuse an output folder that is the model folder or inside it (predictions never go into a model)."""
    o, m = out.expanduser().absolute().resolve(), model_dir.expanduser().absolute().resolve()
    if _same_path(out, model_dir) or m in o.parents:
        raise CLIError(
            f"{opt} {str(out)!r} is {'the model folder' if o == m else 'inside the model folder'} MODEL_DIR "
            f"{str(model_dir)!r}; predictions are never written into a model folder: choose another output folder."
        )


def _check_outputs(
    *,
    overwrite: bool,
    inputs: Sequence[tuple[str, str | os.PathLike]] = (),
    files: Sequence[tuple[str, Path]] = (),
    folders: Sequence[tuple[str, Path]] = (),
    models: Sequence[tuple[str, Path]] = (),
    patterns: Sequence[tuple[str, Path, str]] = (),
) -> None:
    """Check every output of a command before any work (CLIError naming the option).

    An output fails when it exists (without --overwrite), may not be replaced (a folder histoexp did
    not write), or is one of the inputs. ``files``: (option, file); ``folders``: (option, folder
    receiving files, may exist); ``models``: (option, model folder); ``patterns``: (option, folder,
    glob) for outputs named after results.
    """
    from histoexp._fs import check_output

    for opt, out in [*files, *folders, *models]:
        for in_opt, inp in inputs:
            if _same_path(Path(out), Path(inp)):
                raise CLIError(f"{opt} {str(out)!r} is also the input {in_opt}; choose another output.")
    for opt, folder in folders:
        if folder.exists() and not folder.is_dir():
            raise CLIError(f"{opt} {str(folder)!r} is a file, not a folder; choose another output folder.")
    try:
        for opt, file in files:
            check_output(file, overwrite=overwrite, arg=opt)
        if models:  # imports torch: only for commands that write a model
            from histoexp.models._io import is_model_folder

        for opt, folder in models:
            check_output(folder, overwrite=overwrite, arg=opt, kind="model", owned=is_model_folder)
    except FileExistsError as err:
        raise CLIError(str(err).replace("overwrite=True (--overwrite)", "--overwrite")) from None
    for opt, folder, glob in patterns:
        found = sorted(p.name for p in folder.glob(glob)) if folder.is_dir() else []
        if found and not overwrite:
            raise CLIError(
                f"{opt} {str(folder)!r} already holds {found[:3]}{' ...' if len(found) > 3 else ''}; pass "
                "--overwrite to replace them, or choose another output folder."
            )


def _write_csv(df: pd.DataFrame, path: Path, *, overwrite: bool, **kwargs) -> None:
    from histoexp._fs import atomic_write

    atomic_write(path, lambda p: df.to_csv(p, **kwargs), overwrite=overwrite, arg=str(path))


def _write_text(text: str, path: Path, *, overwrite: bool) -> None:
    from histoexp._fs import atomic_write

    atomic_write(path, lambda p: Path(p).write_text(text), overwrite=overwrite, arg=str(path))


def _write_fig(fig, path: Path, *, overwrite: bool) -> None:
    from histoexp._fs import atomic_write

    atomic_write(path, lambda p: fig.savefig(p, dpi=100, bbox_inches="tight"), overwrite=overwrite, arg=str(path))


def _check_her2st_dir(data_dir: str, sections: Sequence[str]) -> None:
    """Fail before any work when --data-dir is not a her2st copy holding the demo sections' files."""
    from histoexp.datasets import _her2st

    if not Path(data_dir).expanduser().is_dir():
        raise CLIError(f"--data-dir {data_dir!r} is not a folder.")
    what = (
        "pass the root of a her2st copy (the folder holding data/ST-cnts, data/ST-spotfiles and data/ST-imgs, "
        "as in https://github.com/almaan/her2st), or leave --data-dir out to download the files"
    )
    root = _her2st._as_root(data_dir)
    if root is None:
        raise CLIError(f"--data-dir {data_dir!r} holds no her2st data/ folder: {what}.")
    missing = [
        rel
        for sec in sections
        for rel in (_her2st._CNTS.format(s=sec), _her2st._SPOTS.format(s=sec), _her2st._image_key(sec))
        if rel is not None and not (root / rel).is_file()
    ]
    if missing:
        kinds = sorted({"images" if "ST-imgs" in m else "counts" if "ST-cnts" in m else "spot files" for m in missing})
        raise CLIError(
            f"--data-dir {data_dir!r} lacks the her2st {' and '.join(kinds)} of sections {list(sections)} "
            f"(missing {missing[:3]}{' ...' if len(missing) > 3 else ''}): {what}."
        )


def _weights_arg(value: str | None) -> str | None:
    if value is None or value.lower() == "default":
        return "default"
    if value.lower() == "none":
        return None
    if not Path(value).exists():
        raise CLIError(f"--weights {value!r}: expected 'default', 'none' or an existing weights file.")
    return value


def _rank_arg(value: str):
    """``--rank auto | full | N`` -> ``'auto'``, ``None`` or ``N`` (``fit_*``'s ``rank``)."""
    if value == "auto":
        return "auto"
    if value in ("full", "none"):
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise CLIError(f"--rank {value!r}: expected auto, full or a positive integer (expression axes kept).")


def _smooth_arg(value: str):
    """``--smooth auto | none | W`` -> ``'auto'``, ``None`` or ``W`` in [0, 1) (``fit_*``'s ``smooth_predictions``)."""
    if value == "auto":
        return "auto"
    if value == "none":
        return None
    try:
        w = float(value)
    except ValueError:
        w = -1.0
    if not 0 <= w < 1:
        raise CLIError(f"--smooth {value!r}: expected auto, none or a weight in [0, 1).")
    return w or None


def _scales_arg(value: str | None) -> tuple[float, ...] | None:
    """``--scales 1,2,3,5`` -> ``(1.0, 2.0, 3.0, 5.0)`` (checked as ``hx.tl.embed_patches`` checks them)."""
    if value is None:
        return None
    from histoexp.tl._embed import check_scales

    try:
        return check_scales([float(v) for v in value.split(",")])
    except ValueError:
        raise CLIError(
            f"--scales {value!r}: expected distinct positive numbers separated by commas, e.g. 1,2,3,5 (multiples "
            "of the patch side)."
        ) from None


def _genes_arg(value: str | None):
    """``her2st`` | ``all`` | an integer (that many HVGs) | a file (one gene per line) | a comma-separated list."""
    if value is None:
        return None
    if value in ("her2st", "all"):
        return value
    if value.isdigit():
        return int(value)
    p = Path(value)
    if p.is_file():
        genes = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if not genes:
            raise CLIError(f"--genes {value!r}: the file holds no gene name.")
        return genes
    if "," in value or value.isidentifier() or value.replace("-", "").replace(".", "").isalnum():
        return [g.strip() for g in value.split(",") if g.strip()]
    raise CLIError(f"--genes {value!r}: expected 'her2st', 'all', a number, a file or a comma-separated list.")


def _index_args(args, model) -> dict:
    """``--index`` / ``--index-params`` -> impute's ``index``/``index_params``; checked before any work."""
    params: dict = {}
    if args.index_params:
        for item in args.index_params.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip().isdigit():
                raise CLIError(
                    f"--index-params {args.index_params!r}: expected KEY=N pairs, e.g. nprobe=64,nlist=1024."
                )
            params[key.strip()] = int(value)
        if args.index == "exact":
            raise CLIError("--index-params apply to --index faiss-ivf or faiss-hnsw, not to the exact search.")
    if args.index == "exact":
        return {}
    if model.kind != "retrieval":
        raise CLIError(f"--index applies to retrieval models; {model.method!r} predicts from the image alone.")
    from histoexp.tl._retrieval import _import_faiss, _index_params

    try:
        _import_faiss()
    except ImportError:
        raise CLIError(
            f"--index {args.index} needs faiss: pip install 'histoexp[ann]' (or pip install faiss-cpu); "
            "--index exact (the default) needs nothing more."
        ) from None
    try:
        _index_params(args.index, params, 1 << 20)
    except ValueError as err:
        raise CLIError(f"--index-params: {str(err).replace('`index_params`', 'the parameters')}") from None
    return {"index": args.index, "index_params": params or None}


def _read_h5ad(path: str | os.PathLike):
    import anndata as ad

    p = Path(path)
    if not p.exists():
        raise CLIError(f"{str(p)!r} does not exist.")
    if p.is_dir() or p.suffix != ".h5ad":
        raise CLIError(f"{str(p)!r} is not an .h5ad file.")
    try:
        return ad.read_h5ad(p)
    except Exception as err:
        raise CLIError(f"could not read {str(p)!r} as AnnData: {err}") from err


def prepare_features(
    adata,
    *,
    encoder: str = "handcrafted",
    weights: str | None = "default",
    patch_px: int | None = None,
    size_um: float | None = None,
    mpp: float | None = None,
    scales: Sequence[float] | None = None,
    device: str | None = None,
) -> str:
    """Extract patches and embed them unless already done; return the ``obsm`` key of the features.

    Used by the CLI and the benchmarks: ``hx.pp.extract_patches`` (memory store; ``patch_px`` default
    112 for ``'handcrafted'``, else 224) then ``hx.tl.embed_patches`` into ``obsm[f'X_{encoder}']``, or with
    ``scales`` (multi-scale features, each scale's crop read from the slide) into ``obsm[f'X_{encoder}_ms']``.
    """
    import histoexp as hx

    rep = f"X_{encoder}" if scales is None else f"X_{encoder}_ms"
    if rep in adata.obsm:
        return rep
    if "patches" not in adata.obsm and "patches" not in adata.uns.get("histoexp", {}):
        px = patch_px or DEFAULT_PATCH_PX.get(encoder, 224)
        kw = {"patch_px": px} if mpp is None else {"mpp": mpp, "patch_px": patch_px}
        hx.pp.extract_patches(adata, size_um=size_um, store="memory", **kw)
    hx.tl.embed_patches(adata, encoder=encoder, scales=scales, weights=weights, device=device)
    if rep not in adata.obsm:  # pragma: no cover - embed_patches contract
        raise CLIError(f"embed_patches did not write obsm[{rep!r}] (found {list(adata.obsm)}).")
    return rep


def _mpp_hint(image: Path, slide_mpp: dict) -> str:
    """Error for an image query without µm/px: what to pass, and the training slides' µm/px when known."""
    msg = f"the image {image.name!r} records no µm per pixel: pass --mpp (µm per pixel of the image)"
    vals = sorted({round(v, 3) for v in slide_mpp.values()})
    if vals:
        rng = f"{vals[0]:g}" if len(vals) == 1 else f"{vals[0]:g} to {vals[-1]:g}"
        msg += (
            f". The model was trained on slides at {rng} µm/px ({', '.join(sorted(slide_mpp))}); if this slide "
            f"was scanned the same way, pass --mpp {float(np.median(list(slide_mpp.values()))):.3g}"
        )
    return msg + "."


def _mean_baseline(train_expr: np.ndarray, n_spots: int) -> np.ndarray:
    return np.repeat(train_expr.mean(axis=0, keepdims=True), n_spots, axis=0)


def _summary_table(columns: dict[str, dict]) -> pd.DataFrame:
    rows = [
        ("pcc_mean", "Pearson, mean over genes (PCC@M)"),
        ("pcc_hvg", "Pearson, HVG-50"),
        ("pcc_heg", "Pearson, HEG-50"),
        ("pcc_at_h", "Pearson, best 50 genes (PCC@H)"),
        ("pcc_at_s", "Pearson, median"),
        ("pcc_specific_mean", "gene-specific Pearson, mean (PCC@M)"),
        ("frac_specific_significant", "share of genes gene-specific significant"),
        ("spearman_mean", "Spearman, mean"),
        ("mse_mean", "MSE"),
        ("mae_mean", "MAE"),
        ("n_genes", "genes evaluated"),
        ("n_constant_excluded", "genes constant in truth (excluded)"),
        ("n_spots", "spots"),
    ]
    data = {name: [m.get(k, np.nan) for k, _ in rows] for name, m in columns.items()}
    return pd.DataFrame(data, index=[label for _, label in rows])


_COUNT_ROWS = ("genes evaluated", "genes constant in truth (excluded)", "spots")


def _format_table(df: pd.DataFrame) -> str:
    out = df.astype(object).copy()
    for idx in df.index:
        is_count = idx in _COUNT_ROWS
        out.loc[idx] = [
            "nan" if pd.isna(v) else (f"{int(v)}" if is_count else f"{float(v):.3f}") for v in df.loc[idx].to_numpy()
        ]
    return out.to_string()


def _save_gene_maps(
    adata, genes, out: Path, *, layer: str = "bleep", compare="auto", prefix="gene_map", overwrite: bool = False
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    import histoexp as hx

    paths = []
    for g in dict.fromkeys(genes):  # each file once
        path = out / f"{prefix}_{g}.png"
        fig = hx.pl.gene_map(adata, [g], layer=layer, compare=compare, return_fig=True)
        _write_fig(fig, path, overwrite=overwrite)
        plt.close(fig)
        paths.append(path)
    return paths


def _strip_patches(adata):
    """Copy ``adata`` without patch pixels (they are large and can be re-extracted from the slide)."""
    out = adata.copy()
    for k in [k for k in out.obsm if k == "patches"]:
        del out.obsm[k]
    hist = out.uns.get("histoexp")
    if isinstance(hist, dict) and "patches" in hist and hist["patches"].get("store") == "memory":
        hist = dict(hist)
        hist["patches"] = {**hist["patches"], "store": "none"}
        out.uns["histoexp"] = hist
    return out


# --------------------------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    """Train BLEEP on four HER2ST sections, predict the fifth, evaluate, plot, find domains."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    import histoexp as hx

    test = args.test_section
    if test not in DEMO_SECTIONS:
        raise CLIError(f"--test-section {test!r}: expected one of {list(DEMO_SECTIONS)} (the sections with an image).")
    if args.train_sections:
        train = [s.strip() for s in args.train_sections.split(",") if s.strip()]
        bad = [s for s in train if s not in DEMO_SECTIONS or s == test]
        if bad:
            raise CLIError(
                f"--train-sections: {bad} must be sections of {list(DEMO_SECTIONS)} other than the test one."
            )
    else:
        train = [s for s in DEMO_SECTIONS if s != test]
        if args.quick:
            train = train[:2]
    _positive("--patch-px", args.patch_px)
    _positive("--epochs", args.epochs)
    _positive("--k", args.k)
    _positive("--n-maps", args.n_maps, 0)
    _weighting_arg(args.method)
    epochs = args.epochs if args.epochs is not None else (10 if args.quick else None)
    genes = _genes_arg(args.genes) if args.genes else (100 if args.quick else "her2st")
    patch_px = args.patch_px or (64 if args.quick and args.encoder == "handcrafted" else None)
    weights = _weights_arg(args.weights)
    # multi-scale features by default (inner CV prefers them on her2st); --quick and --scales 1: the patch alone
    scales = _scales_arg(args.scales if args.scales is not None else (None if args.quick else DEMO_SCALES))
    if scales == (1.0,):
        scales = None
    out = Path(args.out)
    if args.data_dir is not None:
        _check_her2st_dir(args.data_dir, [*train, test])
    names = ("metrics_per_gene.csv", "metrics.csv", "domains.png", "correlation.png", "predictions.h5ad")
    _check_outputs(
        overwrite=args.overwrite,
        inputs=[("--data-dir", args.data_dir)] if args.data_dir is not None else [],
        folders=[("--out", out)],
        files=[("--out", out / name) for name in (*names, "summary.json")],
        models=[("--out", out / "model")],
        patterns=[("--out", out, "gene_map_*.png")],
    )
    ow = args.overwrite  # the folder is created by the first write, after every check passed

    step = _Steps(7, quiet=args.quiet)
    gene_metrics, summarize = hx.tl.gene_metrics, hx.tl.summarize_metrics
    if not args.quiet:  # -q: only the results on stdout
        print(
            f"histoexp demo: BLEEP on HER2ST, train {','.join(train)} -> predict {test}; encoder={args.encoder} "
            f"(weights={weights}{f', scales {args.scales}' if scales else ''}), "
            f"genes={genes if not isinstance(genes, list) else f'{len(genes)} listed'}, "
            f"epochs={epochs or 'default (early stopping)'}, output {out}",
            file=sys.stderr,
            flush=True,
        )
    if args.encoder != "handcrafted" and weights == "default":
        step.note(
            f"{args.encoder} with ImageNet weights needs them downloaded once (internet) or cached; "
            "use --encoder handcrafted (fast, no weights) or --weights none/PATH otherwise."
        )
    step(f"loading HER2ST sections {train + [test]} (data dir: {args.data_dir or hx.settings.data_dir or 'download'})")
    ref = hx.datasets.her2st(train, data_dir=args.data_dir)
    query = hx.datasets.her2st(test, data_dir=args.data_dir)
    step.note(f"reference: {ref.n_obs} spots x {ref.n_vars} genes; query {test}: {query.n_obs} spots")

    step(f"extracting patches and {args.encoder} image features")
    feat_kw = {"encoder": args.encoder, "weights": weights, "patch_px": patch_px, "scales": scales}
    rep = prepare_features(ref, device=args.device, **feat_kw)
    prepare_features(query, device=args.device, **feat_kw)
    step.note(f"features obsm[{rep!r}]: {ref.obsm[rep].shape[1]} dims")

    step(
        "training BLEEP (frozen image features -> projection heads, contrastive loss), ridge and the one-pattern "
        "baseline; output rank and smoothing chosen by leave-one-section-out inside the training sections"
    )
    fit_kw = {"genes": genes, "use_rep": rep, "encoder": args.encoder, "random_state": args.seed, "device": args.device}
    fit_kw.update(rank="auto", smooth_predictions="auto")
    if epochs is not None:
        fit_kw["epochs"] = epochs
    model = hx.tl.fit_bleep(ref, **fit_kw)
    model.save(out / "model", overwrite=ow)
    ridge_kw = {"genes": model.genes, "use_rep": rep, "random_state": args.seed}
    ridge = hx.tl.fit_ridge(ref, rank="auto", smooth_predictions="auto", **ridge_kw)
    one = hx.tl.fit_ridge(ref, rank=1, crossfit=False, key_added="one_pattern", **ridge_kw)
    chosen = ", ".join(
        f"{name} rank {m.config.get('rank') or 'full'}, smoothing {m.config.get('smooth_predictions') or 0:g}"
        for name, m in (("BLEEP", model), ("ridge", ridge))
    )
    step.note(f"{len(model.genes)} genes; model saved to {out / 'model'}; inner CV chose {chosen}")

    # genes outside the training panel (ERBB2 is not in the 785-gene panel) are predicted from the
    # reference bank's counts: retrieval works for any gene the reference spots have.
    extra = [g for g in DEMO_GENES if g not in model.genes and g in ref.var_names and g in query.var_names]
    step(f"predicting {test} (retrieval of the k={args.k} nearest reference spots, method={args.method})")
    pred = hx.tl.impute(
        query,
        model,
        reference=ref if extra else None,
        genes=model.genes + extra,
        k=args.k,
        method=args.method,
        device=args.device,
    )
    rpred = hx.tl.impute(query, ridge, device=args.device)
    opred = hx.tl.impute(query, one, key_added="one_pattern", device=args.device)
    if extra:
        step.note(f"also predicted from the reference counts (not in the training panel): {', '.join(extra)}")

    step("evaluating against the measured expression")
    # training genes the held-out section does not measure have no measurement to compare with
    measured = set(pred.var_names[pred.var["measured"].to_numpy(bool)])
    panel = [g for g in model.genes if g in measured]
    if len(panel) < len(model.genes):
        unmeasured = [g for g in model.genes if g not in measured]
        step.note(f"{len(unmeasured)} training genes are not measured in {test} and not evaluated: {unmeasured[:5]}")
    hx.tl.evaluate(pred, layer="bleep", genes=panel)
    hx.tl.evaluate(rpred, layer="ridge", genes=panel)
    hx.tl.evaluate(opred, layer="one_pattern", genes=panel)
    table = hx.tl.evaluate(pred, layer="bleep", genes=panel, copy=True)
    extra_tab = hx.tl.evaluate(pred, layer="bleep", genes=extra, copy=True) if extra else None
    ev_genes = list(table.index[table["status"].isin(["ok", "constant_prediction"])])
    truth = pred[:, ev_genes].layers["measured"]
    base = gene_metrics(_mean_baseline(hx.pp.expression_matrix(ref, ev_genes), query.n_obs), truth, ev_genes)
    columns = {"BLEEP": pred.uns["bleep"]["metrics"], "ridge": rpred.uns["ridge"]["metrics"]}
    columns["one-pattern"] = opred.uns["one_pattern"]["metrics"]
    summary = _summary_table({**columns, "mean baseline": summarize(base)})
    per_gene = table.drop(columns=["truth_var"]).sort_values("pcc", ascending=False)
    _write_csv(per_gene, out / "metrics_per_gene.csv", overwrite=ow, index_label="gene")
    _write_csv(summary, out / "metrics.csv", overwrite=ow, index_label="metric")

    step("spatial domains on measured and on predicted expression (PCA + spatial kNN + leiden)")
    hx.tl.spatial_domains(pred, layer="measured", genes=ev_genes, random_state=args.seed)  # -> measured_domains
    hx.tl.spatial_domains(pred, layer="bleep", genes=ev_genes, compare="measured_domains", random_state=args.seed)
    ari = pred.uns["bleep_domains"]["ari"]
    fig = hx.pl.spatial_domains(pred, "bleep_domains", "measured_domains", return_fig=True)
    _write_fig(fig, out / "domains.png", overwrite=ow)
    plt.close(fig)

    step("writing predictions.h5ad, metrics and gene maps")
    best = [g for g in per_gene.index if g not in DEMO_GENES][: args.n_maps]
    map_genes = [g for g in DEMO_GENES if g in ev_genes or g in extra] + best
    _save_gene_maps(pred, map_genes, out, overwrite=ow)
    fig = hx.pl.correlation(pred, "bleep", return_fig=True)
    _write_fig(fig, out / "correlation.png", overwrite=ow)
    plt.close(fig)
    hx.io.write_h5ad(_strip_patches(pred), out / "predictions.h5ad", overwrite=ow)
    _write_text(
        json.dumps(
            {
                "train": train,
                "test": test,
                "encoder": args.encoder,
                "weights": weights,
                "scales": None if scales is None else list(scales),
                "epochs": epochs,
                "bleep": pred.uns["bleep"]["metrics"],
                "ridge": rpred.uns["ridge"]["metrics"],
                "one_pattern": opred.uns["one_pattern"]["metrics"],
                "mean_baseline": summarize(base),
                "chosen": {
                    name: {k: m.config.get(k) for k in ("rank", "smooth_predictions")}
                    for name, m in (("bleep", model), ("ridge", ridge))
                },
                "extra_genes": {} if extra_tab is None else extra_tab[["pcc", "spearman", "mse"]].to_dict("index"),
                "ari_domains": ari,
                "seconds": round(time.perf_counter() - step.t0, 1),
            },
            indent=2,
            default=str,
        ),
        out / "summary.json",
        overwrite=ow,
    )
    feats = f"{args.encoder} features" + (f" at scales {','.join(f'{v:g}' for v in scales)}" if scales else "")
    print(f"\nHER2ST {test} predicted from {', '.join(train)} ({feats}; rank and smoothing by inner CV):")
    print(_format_table(summary))
    oof = {
        name: (m.config.get("crossfit") or {}).get("oof_pcc_mean") for name, m in (("BLEEP", model), ("ridge", ridge))
    }
    if all(v is not None for v in oof.values()):
        best = max(oof, key=oof.get)
        print(
            "inner CV (training sections held out in turn, PCC@M): "
            + ", ".join(f"{k} {v:.3f}" for k, v in oof.items())
            + f" -> {best} is the configuration to use on an unmeasured slide"
        )
    print(f"spatial domains ARI (predicted vs measured): {ari:.3f}")
    print("best-predicted genes: " + ", ".join(f"{g} {v:.2f}" for g, v in per_gene["pcc"].head(10).items()))
    for g in DEMO_GENES:
        if g in per_gene.index:
            print(f"{g}: Pearson {per_gene.loc[g, 'pcc']:.3f}")
        elif extra_tab is not None and g in extra_tab.index:
            print(f"{g}: Pearson {extra_tab.loc[g, 'pcc']:.3f} (outside the training panel, from the reference counts)")
    print(f"outputs in {out.resolve()} ({time.perf_counter() - step.t0:.0f} s)")
    return 0


def cmd_fit(args) -> int:
    """Fit a model (BLEEP, mclSTExp, NH2ST or ridge) on reference .h5ad files and save the model folder."""
    import anndata as ad

    import histoexp as hx

    # under torchrun (WORLD_SIZE > 1): DDP training and sharded embedding; rank 0 writes the model and reports
    if hx.train.init_distributed() and not hx.train.is_main_process():
        args.quiet = True
    _positive("--patch-px", args.patch_px)
    _positive("--epochs", args.epochs)
    weights = _weights_arg(args.weights)
    genes = _genes_arg(args.genes)
    scales = _scales_arg(args.scales)
    rank, smooth_w = _rank_arg(args.rank), _smooth_arg(args.smooth)
    if scales is not None and args.method == "nh2st":
        raise CLIError(
            "--scales applies to bleep, mclstexp and ridge: NH2ST reads the spot's surroundings itself (its 5 x 5 "
            "windows of the spot patch's size)."
        )
    for path in args.references:
        if not Path(path).exists():
            raise CLIError(f"{str(path)!r} does not exist.")
    output = Path(args.output)
    _check_outputs(
        overwrite=args.overwrite,
        inputs=[("REF.h5ad", p) for p in args.references],
        models=[("--output", output)],
    )
    step = _Steps(3, quiet=args.quiet)
    step(f"reading {len(args.references)} reference file(s)")
    parts = []
    for i, path in enumerate(args.references):
        a = _read_h5ad(path)
        if "library_id" not in a.obs:
            libs = list(a.uns.get("spatial", {})) or [Path(path).stem]
            a.obs["library_id"] = pd.Categorical([libs[0] if len(libs) == 1 else f"ref{i}"] * a.n_obs)
        a.obs_names = [f"{n}" for n in a.obs_names]
        step.note(f"{path}: {a.n_obs} spots x {a.n_vars} genes")
        parts.append(a)
    nbhd = args.method == "nh2st"
    step(f"patches and {args.encoder} features" + (" (spots and their 5 x 5 windows)" if nbhd else ""))
    rep = f"X_{args.encoder}"
    for a in parts:
        rep = prepare_features(
            a, encoder=args.encoder, weights=weights, patch_px=args.patch_px, scales=scales, device=args.device
        )
        if nbhd and f"{rep}_grid" not in a.obsm:
            hx.tl.embed_neighbourhood(a, args.encoder, weights=weights, grid=5, device=args.device)
    _same_geometry(parts, rep, args.references)
    if len(parts) == 1:
        ref = parts[0]
    else:
        for a in parts:
            a.obsm.pop("patches", None)
        ref = ad.concat(parts, join="inner", merge="same", uns_merge="first", index_unique=None)
        ref.obs_names_make_unique()
        ref.obs["library_id"] = pd.Categorical(ref.obs["library_id"].astype(str))
        if nbhd:  # the window size of every section (uns_merge='first' kept the first file's record only)
            rec = ref.uns["histoexp"]["embeddings"][f"{rep}_grid"]
            recs = [a.uns["histoexp"]["embeddings"][f"{rep}_grid"]["window_px_fullres"] for a in parts]
            rec["window_px_fullres"] = {k: v for r in recs for k, v in r.items()}
    step(f"training {args.method} on {ref.n_obs} spots")
    fit_kw = {"genes": genes, "use_rep": rep, "encoder": args.encoder, "random_state": args.seed}
    fit_kw.update(rank=rank, smooth_predictions=smooth_w)
    if args.method == "ridge":
        model = hx.tl.fit_ridge(ref, **fit_kw)
    else:
        if args.epochs is not None:
            fit_kw["epochs"] = args.epochs
        fit = {"bleep": hx.tl.fit_bleep, "mclstexp": hx.tl.fit_mclstexp, "nh2st": hx.tl.fit_nh2st}[args.method]
        model = fit(ref, device=args.device, **fit_kw)
    model.save(output, overwrite=args.overwrite)
    if hx.train.is_main_process():
        print(f"{args.method} model ({len(model.genes)} genes, encoder {args.encoder}) saved to {args.output}")
    return 0


def _many_slides(queries: Sequence[str]) -> bool:
    """Whether the QUERY arguments name many slides: several paths, a folder, or a manifest / list file."""
    if len(queries) > 1:
        return True
    q = Path(queries[0])
    return q.is_dir() or q.suffix.lower() in (".csv", ".txt", ".lst")


def cmd_impute_slides(args, model_dir: Path) -> int:
    """Predict many H&E slides: one .h5ad per slide in --output, resumable, failures reported per slide."""
    import histoexp as hx

    out = Path(args.output)
    slides = args.query if len(args.query) > 1 else args.query[0]
    try:
        table = hx.tl.read_slide_list(slides, arg="QUERY")
        shard = hx.tl._slides.parse_shard(args.shard, arg="--shard")
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err).replace("`QUERY`", "QUERY").replace("`--shard`", "--shard")) from None
    _check_not_in_model(out, model_dir)
    for opt, path in [("--output", out)]:
        for q in table["path"]:
            if _same_path(path, Path(q)):
                raise CLIError(f"{opt} {str(path)!r} is also a slide; choose another output folder.")
        if path.exists() and not path.is_dir():
            raise CLIError(f"{opt} {str(path)!r} is a file, not a folder; choose another output folder.")
    for path in args.reference or []:
        if not Path(path).exists():
            raise CLIError(f"--reference {str(path)!r} does not exist.")
        if _same_path(out, Path(path)):
            raise CLIError(f"--output {str(out)!r} is also the input --reference; choose another output folder.")
    model = hx.tl.load_model(model_dir)
    if model.kind != "retrieval" and args.reference:
        raise CLIError(f"--reference applies to retrieval models; {model.method!r} predicts from the image alone.")
    index_kw = _index_args(args, model)  # a regression model with --index, or no faiss: an error before any slide
    _retrieval_only(args, model)
    retrieval = {"k": args.k, "method": args.method, **index_kw} if model.kind == "retrieval" else {}
    if args.reference:  # read once for every slide (impute_slides prepares the bank once, too)
        refs = [_read_h5ad(p) for p in args.reference]
        retrieval["reference"] = refs[0] if len(refs) == 1 else refs
    n = len(table) if shard is None else len(table.iloc[shard[0] :: shard[1]])
    print(
        f"histoexp impute: {n} of {len(table)} slides"
        + (f" (shard {shard[0]}/{shard[1]})" if shard else "")
        + f" -> {out}",
        file=sys.stderr,
        flush=True,
    )
    res = hx.tl.impute_slides(
        slides,
        model,
        out,
        mpp=args.mpp,
        tile_um=args.tile_um,
        min_tissue=args.min_tissue,
        genes=_genes_arg(args.genes),
        shard=shard,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        **retrieval,
    )
    counts = res["status"].value_counts() if len(res) else {}
    failed = res.index[res["status"] == "failed"].tolist() if len(res) else []
    for sid in failed:
        print(f"histoexp impute: slide {sid} failed: {res.loc[sid, 'error']}", file=sys.stderr)
    done = res[res["status"] == "done"]
    rate = f"; {done['n_tiles'].sum() / done['seconds'].sum():.1f} tiles/s" if len(done) else ""
    print(
        f"{counts.get('done', 0)} computed, {counts.get('skipped', 0)} already done, {len(failed)} failed "
        f"of {len(res)} slides{rate}; outputs in {out.resolve()}"
    )
    if failed:
        print(
            f"histoexp impute: {len(failed)} failed slide(s); run the same command again to retry them.",
            file=sys.stderr,
        )
    return 1 if failed else 0


def cmd_impute(args) -> int:
    """Predict expression for a query .h5ad, an H&E image or many slides with a saved model."""
    import matplotlib.pyplot as plt

    import histoexp as hx

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise CLIError(f"model folder {str(model_dir)!r} does not exist (create it with `histoexp fit`).")
    for q in args.query:
        if not Path(q).exists():
            raise CLIError(f"query {str(q)!r} does not exist.")
    _positive("--k", args.k)
    _positive("--n-maps", args.n_maps, 0)
    _weighting_arg(args.method)
    _positive("--batch-size", args.batch_size)
    _positive("--num-workers", args.num_workers, 0)
    if not 0 <= args.min_tissue <= 1:
        raise CLIError(f"--min-tissue {args.min_tissue}: expected a fraction in [0, 1].")
    if _many_slides(args.query):
        return cmd_impute_slides(args, model_dir)
    if args.shard is not None:
        raise CLIError("--shard applies to many slides (a folder, a manifest or several QUERY paths).")
    qpath = Path(args.query[0])
    out = Path(args.output)
    _check_not_in_model(out, model_dir)
    for path in args.reference or []:
        if not Path(path).exists():
            raise CLIError(f"--reference {str(path)!r} does not exist.")
    _check_outputs(
        overwrite=args.overwrite,
        inputs=[("MODEL_DIR", model_dir), ("QUERY", qpath), *(("--reference", p) for p in args.reference or [])],
        folders=[("--output", out)],
        files=[
            ("--output", out / "predictions.h5ad"),
            ("--output", out / "metrics_per_gene.csv"),
            ("--output", out / "genes.csv"),
        ],
        patterns=[("--output", out, "gene_map_*.png")],
    )
    ow = args.overwrite
    step = _Steps(4, quiet=args.quiet)
    step(f"loading model {model_dir}")
    model = hx.tl.load_model(model_dir)
    index_kw = _index_args(args, model)  # before reading anything large
    _retrieval_only(args, model)
    emb = model.image_spec()
    if qpath.suffix == ".h5ad" and model.mode != "frozen":
        raise CLIError("the CLI imputes .h5ad queries with frozen-feature models only; use hx.tl.impute from Python.")
    step(f"preparing query {qpath.name}")
    if qpath.suffix != ".h5ad":
        references = [_read_h5ad(p) for p in args.reference] if args.reference else None
        if model.kind != "retrieval" and references is not None:
            raise CLIError(f"--reference applies to retrieval models; {model.method!r} predicts from the image alone.")
        if references is not None and len(references) == 1:
            references = references[0]
        retrieval = {"k": args.k, "method": args.method, "reference": references} if model.kind == "retrieval" else {}
        retrieval.update(index_kw)
        key = model.method
        step(f"tiles over the tissue -> patches read from the slide -> {emb['encoder']} -> {key}")
        try:
            pred = hx.tl.impute_slide(
                str(qpath),
                model,
                mpp=args.mpp,
                tile_um=args.tile_um,
                min_tissue=args.min_tissue,
                library_id=qpath.stem,
                genes=_genes_arg(args.genes),
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                device=args.device,
                **retrieval,
            )
        except ValueError as err:
            if args.mpp is not None or "µm per pixel" not in str(err):
                raise CLIError(str(err)) from err
            raise CLIError(_mpp_hint(qpath, emb.get("slide_mpp") or {})) from err
        info = pred.uns["histoexp"]["slide"]
        step.note(f"{info['n_tiles']} tissue tiles of {info['tile_um']:g} µm, {info['tiles_per_s']:.1f} tiles/s")
        for rep in (model.use_rep, *(model.config.get("extra_reps") or {})) if model.use_rep else ():
            pred.obsm.pop(rep, None)
        return _write_prediction(pred, key, out, args, step, ow, plt)
    query = _read_h5ad(qpath)
    prepare_features(
        query,
        encoder=emb["encoder"],
        weights=emb["weights"],
        patch_px=emb.get("patch_px"),
        size_um=emb.get("size_um"),
        scales=emb.get("scales"),  # the model's: multi-scale features at its scales
        device=args.device,
    )
    hx.tl.embed_query(query, model, device=args.device)  # e.g. NH2ST's neighbourhood windows
    references = [_read_h5ad(p) for p in args.reference] if args.reference else None
    if references is not None and len(references) == 1:
        references = references[0]
    key = model.method
    retrieval = {"k": args.k, "method": args.method, "reference": references}
    if model.kind != "retrieval":
        if references is not None:
            raise CLIError(f"--reference applies to retrieval models; {key!r} predicts from the image alone.")
        retrieval = {}
    retrieval.update(index_kw)
    index_note = f", index {args.index}" if args.index != "exact" else ""
    if retrieval:
        k = args.k if args.k is not None else model.retrieval_defaults["k"]
        how = f", {args.method or model.retrieval_defaults['method']}, k={k}{index_note})"
    step(f"predicting ({key}" + (how if retrieval else ")"))
    pred = hx.tl.impute(query, model, genes=_genes_arg(args.genes), device=args.device, **retrieval)
    return _write_prediction(pred, key, out, args, step, args.overwrite, plt)


def _write_prediction(pred, key: str, out: Path, args, step: _Steps, ow: bool, plt) -> int:
    """Evaluate (when measured), draw gene maps and write predictions.h5ad for one query."""
    import histoexp as hx

    measured = "measured" in pred.layers
    step(f"writing {out / 'predictions.h5ad'} and gene maps")
    if measured:
        hx.tl.evaluate(pred, layer=key)
        ranking = pred.var[f"{key}_pcc"].dropna().sort_values(ascending=False)
        _write_csv(ranking.to_frame("pearson"), out / "metrics_per_gene.csv", overwrite=ow, index_label="gene")
        top = list(ranking.index[: args.n_maps])
        print(f"mean Pearson over {ranking.size} genes: {pred.uns[key]['metrics']['pcc_mean']:.3f}")
    elif "expected_pcc" in pred.var:
        top = list(pred.var["expected_pcc"].dropna().sort_values(ascending=False).index[: args.n_maps])
    else:
        order = np.argsort(-np.asarray(pred.layers[key]).var(axis=0))
        top = [pred.var_names[i] for i in order[: args.n_maps]]
    genes = gene_table(pred, key)
    _write_csv(genes, out / "genes.csv", overwrite=ow, index_label="gene")
    if "expected_specific" in pred.var:
        n_spec = int(pred.var["expected_specific"].sum())
        print(f"genes expected to carry gene-specific signal: {n_spec} of {pred.n_vars} (genes.csv)")
    _save_gene_maps(pred, top, out, layer=key, overwrite=ow)
    plt.close("all")
    hx.io.write_h5ad(_strip_patches(pred), out / "predictions.h5ad", overwrite=ow)
    print(f"predicted {pred.n_vars} genes for {pred.n_obs} spots")
    print(f"outputs in {out.resolve()} (gene maps: {', '.join(top)})")
    return 0


def gene_table(pred, key: str):
    """One row per predicted gene, best expected first: what a person sorts to decide which maps to trust.

    Columns: expected accuracy of a cross-fitted model (``expected_pcc``, its spread over folds, the gene-specific
    expectation and ``expected_specific``), the prediction's mean and spread over spots, the half-width of the
    stored prediction interval, whether the gene was measured / trained on, and with a measurement the realised
    Pearson and gene-specific Pearson.
    """
    import pandas as pd

    values = np.asarray(pred.layers[key], dtype=np.float64)
    table = pd.DataFrame(index=pred.var_names)
    for col in (
        "expected_pcc",
        "expected_pcc_sd",
        "expected_pcc_specific",
        "expected_pcc_specific_sd",
        "expected_pcc_control",
        "expected_specific",
    ):
        if col in pred.var:
            table[col] = pred.var[col].to_numpy()
    for col, name in ((f"{key}_pcc", "pearson"), (f"{key}_pcc_specific", "pearson_specific")):
        if col in pred.var:
            table[name] = pred.var[col].to_numpy()
    table["mean_predicted"] = values.mean(0)
    table["sd_predicted"] = values.std(0)
    if f"{key}_upper" in pred.layers:
        level = pred.uns[key]["params"].get("interval", {}).get("level")
        half = (np.asarray(pred.layers[f"{key}_upper"]) - values).mean(0)
        table[f"interval_halfwidth_{level:g}" if level else "interval_halfwidth"] = half
    for col in ("seen_in_training", "measured"):
        if col in pred.var:
            table[col] = pred.var[col].to_numpy()
    order = "expected_pcc" if "expected_pcc" in table else ("pearson" if "pearson" in table else "sd_predicted")
    return table.sort_values(order, ascending=False, na_position="last", kind="stable")


def cmd_evaluate(args) -> int:
    """Evaluate predictions stored in an .h5ad (layers[LAYER] vs the measurement)."""
    import histoexp as hx

    csv = json_out = None
    if args.output:
        csv = Path(args.output)
        json_out = csv.with_suffix(".json")
        if _same_path(csv, json_out):
            raise CLIError(
                f"--output {args.output!r}: the per-gene table is CSV and the summary goes to a .json file next to "
                "it; pass a name ending in .csv."
            )
        _check_outputs(
            overwrite=args.overwrite,
            inputs=[("PRED.h5ad", args.predictions)],
            files=[("--output", csv), ("--output", json_out)],
        )
    adata = _read_h5ad(args.predictions)
    if args.layer not in adata.layers:
        raise CLIError(f"--layer {args.layer!r} is not in the file's layers {list(adata.layers)}.")
    table = hx.tl.evaluate(adata, layer=args.layer, truth=args.truth, n_top=args.n_top, copy=True)
    metrics = table.attrs["metrics"]
    print(_format_table(_summary_table({args.layer: metrics})))
    best = table["pcc"].dropna().sort_values(ascending=False).head(10)
    print("best-predicted genes: " + ", ".join(f"{g} {v:.2f}" for g, v in best.items()))
    if csv is not None:
        _write_csv(table, csv, overwrite=args.overwrite, index_label="gene")
        _write_text(json.dumps(metrics, indent=2, default=str), json_out, overwrite=args.overwrite)
        print(f"per-gene metrics written to {csv} (summary: {json_out})")
    return 0


# --------------------------------------------------------------------------------------------- parser
def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs that already exist (only files and model folders histoexp wrote)",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, mps (default: hx.settings.device, auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output; errors only (verbosity 0)")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``histoexp`` command."""
    from histoexp import __version__

    parser = argparse.ArgumentParser(
        prog="histoexp",
        description="Predict spatially resolved gene expression from H&E histology (BLEEP). "
        "Start with `histoexp demo`: trains on four HER2ST sections and predicts the fifth.",
        epilog="Data: HER2ST is read from --data-dir, $HISTOEXP_DATA_DIR, or downloaded once.",
    )
    parser.add_argument("--version", action="version", version=f"histoexp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="main job: train BLEEP on 4 HER2ST sections, predict the 5th, evaluate against ridge and baselines, plot",
        description="Load HER2ST sections C2-C6, train BLEEP on four, predict the held-out one, and write "
        "predictions.h5ad, metrics.csv, metrics_per_gene.csv, gene maps, correlation and domain plots to --out.",
    )
    p.add_argument("--data-dir", default=None, help="local her2st copy (default: $HISTOEXP_DATA_DIR or download)")
    p.add_argument("--out", "-o", default="histoexp-demo", help="output folder (default ./histoexp-demo)")
    p.add_argument("--test-section", default="C6", help="held-out section, one of C2..C6 (default C6)")
    p.add_argument("--train-sections", default=None, help="comma-separated training sections (default: the other four)")
    p.add_argument(
        "--encoder", default="handcrafted", help="image encoder (default handcrafted: fast, no weights; or resnet50)"
    )
    p.add_argument("--weights", default="default", help="encoder weights: default | none (random) | PATH")
    p.add_argument("--genes", default=None, help="gene panel: her2st (default) | all | N (HVGs) | file | A,B,C")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: fit_bleep's, early stopping)")
    p.add_argument("--patch-px", type=int, default=None, help="patch side in pixels (default 112 handcrafted, 224 CNN)")
    p.add_argument("--k", type=int, default=50, help="reference spots averaged per prediction (default 50)")
    p.add_argument(
        "--method",
        default="average",
        help="retrieval weighting: average (default), simple, weighted, inverse_distance, inverse_distance_l2",
    )
    p.add_argument("--n-maps", type=int, default=4, help="best genes drawn besides ERBB2 and GNAS (default 4)")
    p.add_argument("--quick", action="store_true", help="small run: 2 training sections, 100 genes, 10 epochs")
    p.add_argument(
        "--scales",
        default=None,
        help=f"multi-scale image features (default {DEMO_SCALES}: the patch and its 2x, 3x, 5x wider context; "
        "--quick: the patch alone; 1: the patch alone)",
    )
    _add_overwrite(p)
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fit", help="train BLEEP, mclSTExp, NH2ST or ridge on reference .h5ad files -> model folder")
    p.add_argument("references", nargs="+", metavar="REF.h5ad", help="reference sections (counts + image)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--encoder", default="handcrafted", help="image encoder (default handcrafted)")
    p.add_argument("--weights", default="default", help="encoder weights: default | none | PATH")
    p.add_argument("--genes", default=None, help="her2st | all | N (HVGs, default 250) | file | A,B,C")
    p.add_argument(
        "--method",
        default="bleep",
        choices=["bleep", "mclstexp", "nh2st", "ridge"],
        help="model to fit on frozen features (default bleep)",
    )
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: fit_bleep's)")
    p.add_argument("--scales", default=None, help=_SCALES_HELP + "; not with nh2st")
    p.add_argument(
        "--rank",
        default="auto",
        help="expression axes the predictions are projected on: auto (default, chosen by leave-one-section-out "
        "inside the references) | full | N",
    )
    p.add_argument(
        "--smooth",
        default="auto",
        help="weight of smoothing predictions over neighbouring spots: auto (default, chosen likewise) | none | W",
    )
    p.add_argument("--patch-px", type=int, default=None, help="patch side in pixels (default 112 handcrafted, 224 CNN)")
    _add_overwrite(p)
    _add_common(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("impute", help="predict a query .h5ad or H&E image with a model folder")
    p.add_argument("model", metavar="MODEL_DIR", help="folder written by `histoexp fit`")
    p.add_argument(
        "query",
        nargs="+",
        metavar="QUERY",
        help="query .h5ad (spots + image), an H&E slide (JPEG/PNG/TIFF, .svs/.ndpi with histoexp[slide]), or many "
        "slides: several paths, a folder, a .csv manifest (path[,slide_id][,mpp]) or a .txt list -> one "
        "<slide_id>.h5ad each in OUT_DIR, resumable",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel of an image query")
    p.add_argument("--tile-um", type=float, default=None, help="tile side for an image query (default: patch size)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a tile (default 0.5)")
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="many slides: process slides I, I+N, ... only (0 <= I < N), e.g. "
        "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
    )
    p.add_argument("--batch-size", type=int, default=64, help="patches per encoder batch (default 64)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers reading patches")
    p.add_argument(
        "--reference", nargs="+", default=None, metavar="REF.h5ad", help="reference bank (default: training)"
    )
    p.add_argument("--genes", default=None, help="genes to predict: all | A,B,C | file (default: model genes)")
    p.add_argument(
        "--k", type=int, default=None, help="retrieval neighbours (default: the model's, BLEEP 50, mclSTExp 200)"
    )
    p.add_argument(
        "--method",
        default=None,
        help="retrieval weighting: average, simple, weighted, inverse_distance, inverse_distance_l2 (default: the "
        "model's, BLEEP average, mclSTExp inverse_distance)",
    )
    p.add_argument(
        "--index",
        default="exact",
        choices=["exact", "faiss-ivf", "faiss-hnsw"],
        help="retrieval neighbour search: exact (default) or an approximate faiss index for references of millions "
        "of spots (needs histoexp[ann])",
    )
    p.add_argument(
        "--index-params",
        default=None,
        metavar="KEY=N,...",
        help="faiss index parameters, e.g. nprobe=64 (faiss-ivf: nlist, nprobe, train_size; faiss-hnsw: M, "
        "ef_construction, ef_search); default: chosen from the reference size",
    )
    p.add_argument("--n-maps", type=int, default=4, help="gene maps to draw (best or most variable genes)")
    _add_overwrite(p)
    _add_common(p)
    p.set_defaults(func=cmd_impute)

    p = sub.add_parser("evaluate", help="per-gene and summary metrics of predictions in an .h5ad")
    p.add_argument(
        "predictions",
        metavar="PRED.h5ad",
        help="file with predictions in layers[--layer] and the measurement in layers['measured'] (or counts in X)",
    )
    p.add_argument("--layer", default="bleep", help="layer with predictions (default bleep)")
    p.add_argument(
        "--truth", default=None, help="layer with the truth, used as is (default: layers['measured'], else log1p X)"
    )
    p.add_argument("--n-top", type=int, default=50, help="size of HVG/HEG/best selections (default 50)")
    p.add_argument("-o", "--output", default=None, metavar="metrics.csv", help="write the per-gene table (+ .json)")
    _add_overwrite(p)
    p.set_defaults(func=cmd_evaluate, quiet=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``histoexp`` command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version / usage errors
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    import histoexp as hx

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("    %(message)s"))
    hx_logger = logging.getLogger("histoexp")
    old_verbosity, old_progress = hx.settings.verbosity, hx.settings.progress
    saved_handlers = hx_logger.handlers[:]
    hx_logger.handlers = [handler]  # the CLI's indented format replaces the package's handler
    # -q: errors only (histoexp and the libraries it calls); -v: info
    quiet = getattr(args, "quiet", False)
    hx.settings.verbosity = 0 if quiet else 2 if args.verbose else 1
    if quiet:
        hx.settings.progress = False
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"histoexp {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, KeyError, ValueError, NotImplementedError, OSError, ImportError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        what = "not implemented yet" if isinstance(err, NotImplementedError) else type(err).__name__
        print(f"histoexp {args.command}: error ({what}): {msg}", file=sys.stderr)
        if args.verbose:
            raise
        return 1
    finally:
        hx_logger.handlers = saved_handlers
        hx.settings.verbosity = old_verbosity
        hx.settings.progress = old_progress


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
