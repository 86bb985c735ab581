"""Cross-fitting, reduced-rank outputs and prediction smoothing: what every ``fit_<method>`` shares after training.

:func:`supports_crossfit` wraps a ``fit_<method>`` that takes ``rank``, ``smooth_predictions`` and ``crossfit``. The
method trains as usual on all training spots; then

- the training expression's principal axes are kept with the model (``arrays['expression_axes']``): the first is the
  shared axis a measured query is scored on (:func:`histoexp.tl.evaluate`'s gene-specific PCC), the first ``rank``
  span the reduced-rank outputs;
- when cross-fitting (default for frozen features), each training section in turn is predicted by the same method
  trained on the other sections (spatial blocks stand in for sections when there is one); from these out-of-fold
  predictions the platform chooses ``rank='auto'`` and ``smooth_predictions='auto'`` (mean per-gene Pearson over the
  held-out sections: the held-out sections of this inner loop are training sections, never a query), and stores per
  gene the expected Pearson r and gene-specific r (mean and spread over folds) and the quantiles of the absolute
  out-of-fold residuals (split-conformal prediction intervals with sections as calibration units).

:func:`histoexp.tl.impute` reads all of it back: projection, smoothing, ``var['expected_*']`` and intervals.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from anndata import AnnData

from .._expected import SPECIFIC_MIN
from .._settings import logger, settings
from .._utils import jsonable, mark_written, progress, resolve_library_key, written_by

#: Ranks searched by ``rank='auto'`` (capped by the training spots and genes), besides full rank.
RANK_CANDIDATES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 30, 50)
#: Neighbour weights searched by ``smooth_predictions='auto'`` (0: no smoothing).
SMOOTH_CANDIDATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: Levels at which the absolute out-of-fold residuals' quantiles are kept (intervals interpolate between them).
INTERVAL_LEVELS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99)
#: Spatial blocks standing in for sections when the training data is one section.
N_BLOCKS = 4
#: Held-out groups with fewer spots are not scored (a correlation over 1-2 spots means nothing); they still train.
MIN_GROUP_SPOTS = 3


# -- arguments ---------------------------------------------------------------------------------------------------
def check_rank(rank) -> int | str | None:
    """Validate ``rank``: ``None`` (full), a positive integer, or ``'auto'``."""
    if rank is None or (isinstance(rank, str) and rank == "auto"):
        return rank
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"`rank` must be None (full rank), a positive integer or 'auto', got {rank!r}.")
    return int(rank)


def check_smooth(value, name: str = "smooth_predictions") -> float | str | None:
    """Validate a smoothing weight: ``None``, a number in [0, 1), or ``'auto'`` (where allowed)."""
    if value is None or (isinstance(value, str) and value == "auto" and name != "smooth"):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= float(value) < 1:
        allowed = "None or a number in [0, 1)" + ("" if name == "smooth" else ", or 'auto'")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return float(value)


def crossfit_groups(adata: AnnData, library_key: str | None, random_state: int = 0) -> tuple[np.ndarray, str] | None:
    """Group labels of the cross-fitting folds: sections, or ``N_BLOCKS`` spatial blocks of one section.

    Returns ``(labels, unit)`` or ``None`` when there is one section without spot positions.
    """
    if library_key is not None:
        labels = adata.obs[library_key].astype(str).to_numpy()
        if len(pd.unique(labels)) >= 2:
            return labels, "section"
    if "spatial" not in adata.obsm or adata.n_obs < 2 * N_BLOCKS * MIN_GROUP_SPOTS:
        return None
    from sklearn.cluster import KMeans

    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    km = KMeans(n_clusters=N_BLOCKS, n_init=4, random_state=random_state).fit(xy)
    return np.char.add("block", km.labels_.astype(str)), "spatial block"


# -- scoring -----------------------------------------------------------------------------------------------------
def mean_pcc(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-gene Pearson over the genes not constant in ``truth`` (a constant prediction counts as 0)."""
    from .._stats import partial_pearson

    r, _ = partial_pearson(pred, truth, None)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def _fold_axes(truth: np.ndarray, groups: np.ndarray, folds: list[str], n_axes: int):
    from .._stats import expression_axes

    return {g: expression_axes(truth[groups != g], n_axes) for g in folds}


def choose_rank(oof, truth, groups, folds, fold_axes, candidates) -> tuple[int | None, dict]:
    """Return the rank (or ``None``, full) maximising the mean over folds of the held-out PCC@M; also every score."""
    from .._stats import project

    scores: dict = {}
    for k in [None, *candidates]:
        per = []
        for g in folds:
            m = groups == g
            p = oof[m]
            if k is not None:
                mean, axes = fold_axes[g]
                if k > axes.shape[1]:
                    break
                p = project(p, mean, axes[:, :k])
            per.append(mean_pcc(p, truth[m]))
        else:
            scores["full" if k is None else str(k)] = float(np.mean(per))
    best = max(scores, key=lambda key: (scores[key], key == "full"))
    return (None if best == "full" else int(best)), scores


def smooth(pred: np.ndarray, neighbours, weight: float) -> np.ndarray:
    """``(1 - weight) * pred + weight * (mean of each spot's neighbours)``; spots without neighbours unchanged."""
    if not weight:
        return pred
    has = np.asarray(neighbours.sum(1)).ravel() > 0
    avg = neighbours @ pred
    out = np.array(pred, dtype=np.float64, copy=True)
    out[has] = (1 - weight) * pred[has] + weight * avg[has]
    return out


def choose_smooth(oof, truth, groups, folds, neighbours, candidates) -> tuple[float, dict]:
    """Return the neighbour weight maximising the mean over folds of the held-out PCC@M; also every score."""
    scores = {}
    for w in candidates:
        sm = smooth(oof, neighbours, w)
        scores[f"{w:g}"] = float(np.mean([mean_pcc(sm[groups == g], truth[groups == g]) for g in folds]))
    best = max(scores, key=lambda key: (scores[key], -float(key)))
    return float(best), scores


# -- the wrapper -------------------------------------------------------------------------------------------------
def supports_crossfit(*, handles_rank: bool = False, inner: Callable[[object], dict] | None = None):
    """Decorate a ``fit_<method>`` taking ``rank``, ``smooth_predictions`` and ``crossfit`` (see the module docs).

    ``handles_rank``: the method chooses ``rank`` itself (ridge: jointly with its penalty) and records it in
    ``model.config['rank']``. ``inner(model)``: extra arguments of the refits on the cross-fitting folds (e.g.
    ridge's chosen penalty), so that they train the model that was chosen.
    """

    def decorate(fit_fn):
        sig = inspect.signature(fit_fn)
        for name in ("rank", "smooth_predictions", "crossfit", "key_added", "random_state"):
            if name not in sig.parameters:
                raise TypeError(f"{fit_fn.__name__} must take `{name}` to support cross-fitting.")

        @functools.wraps(fit_fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            call = dict(bound.arguments)
            rank = check_rank(call["rank"])
            smooth_w = check_smooth(call["smooth_predictions"])
            crossfit = call["crossfit"]
            if crossfit is not None and not isinstance(crossfit, (bool, np.bool_)):
                raise ValueError(f"`crossfit` must be None, True or False, got {crossfit!r}.")
            first = dict(call, smooth_predictions=None, crossfit=False)
            if not handles_rank:
                first["rank"] = None
            adata = call["adata"]
            # one bar for the fit and its cross-fitting refits (1 + folds steps), so it never shows 100 % early
            steps = 1 + _planned_folds(adata, call, rank, smooth_w, crossfit, handles_rank)
            with progress(total=steps, desc="fit" if steps == 1 else "fit + cross-fitting") as outer:
                t0 = time.time()
                model = fit_fn(**first)
                outer.update(1)
                finish_fit(
                    model,
                    adata,
                    fit_fn=fit_fn,
                    call=call,
                    rank=rank,
                    smooth_w=smooth_w,
                    crossfit=crossfit,
                    handles_rank=handles_rank,
                    inner=inner,
                    seconds_fit=time.time() - t0,
                    outer=outer,
                )
            return model

        return wrapper

    return decorate


def _planned_folds(adata, call, rank, smooth_w, crossfit, handles_rank) -> int:
    """How many cross-fitting refits a fit will run (for its progress bar only; 0 when none is expected)."""
    need_oof = rank == "auto" and not handles_rank or smooth_w == "auto"
    if crossfit is False and not need_oof or (crossfit is None and call.get("finetune_encoder") and not need_oof):
        return 0
    try:
        grouping = crossfit_groups(adata, resolve_library_key(adata, call.get("library_key")), call["random_state"])
    except (KeyError, ValueError):
        return 0
    if grouping is None:
        return 0
    groups = grouping[0]
    return sum(int((groups == g).sum() >= MIN_GROUP_SPOTS) for g in pd.unique(groups))


def finish_fit(
    model, adata, *, fit_fn, call, rank, smooth_w, crossfit, handles_rank, inner, seconds_fit, outer=None
) -> None:
    """Attach the expression axes, cross-fit when asked (or by default), choose rank / smoothing, record it all."""
    from ..pp import expression_matrix

    layer, normalize = call.get("layer"), call.get("normalize", "log1p")
    truth = expression_matrix(adata, model.genes, layer=layer, normalize=normalize).astype(np.float64)
    final_rank = model.config.get("rank") if handles_rank else (rank if isinstance(rank, int) else None)
    if final_rank is not None and final_rank >= len(model.genes):
        final_rank = None  # as many axes as genes: the projection is the identity
    library_key = resolve_library_key(adata, call.get("library_key"))
    need_oof = rank == "auto" and not handles_rank or smooth_w == "auto"
    if crossfit is None:
        crossfit = model.mode == "frozen"
    grouping = crossfit_groups(adata, library_key, call["random_state"]) if (crossfit or need_oof) else None
    if grouping is None and (need_oof or call["crossfit"]):
        raise ValueError(
            "Cross-fitting (`crossfit=True`, `rank='auto'` or `smooth_predictions='auto'`) needs two or more sections "
            f"in obs[library_key] or spot positions in obsm['spatial'] with at least {2 * N_BLOCKS * MIN_GROUP_SPOTS} "
            "spots (spatial blocks); pass a fixed `rank` / `smooth_predictions` or `crossfit=False`."
        )
    record: dict = {"rank": final_rank, "smooth_predictions": 0.0 if smooth_w in (None, "auto") else smooth_w}
    if grouping is None:
        _attach(model, truth, final_rank, None)
        _record(model, adata, call["key_added"], record, None)
        return
    groups, unit = grouping
    folds = [g for g in pd.unique(groups) if (groups == g).sum() >= MIN_GROUP_SPOTS]
    skipped = sorted(set(pd.unique(groups)) - set(folds))
    if skipped:
        logger.warning(
            "Cross-fitting: %s %s have fewer than %d spots; they train but are not predicted or scored.",
            unit,
            skipped,
            MIN_GROUP_SPOTS,
        )
    if len(folds) < 2:
        raise ValueError(f"Cross-fitting needs two {unit}s of at least {MIN_GROUP_SPOTS} spots, got {len(folds)}.")
    t0 = time.time()
    inner_rank = final_rank if handles_rank else None
    oof = _out_of_fold(model, adata, fit_fn, call, groups, folds, unit, inner_rank, inner, outer)
    k_max = max([c for c in RANK_CANDIDATES if c < len(model.genes)] + [1])
    fold_axes = _fold_axes(truth, groups, folds, k_max)
    if rank == "auto" and not handles_rank:
        cands = [c for c in RANK_CANDIDATES if c < len(model.genes)]
        final_rank, record["rank_scores"] = choose_rank(oof, truth, groups, folds, fold_axes, cands)
        logger.info("rank chosen by cross-fitting: %s (%s)", final_rank or "full", record["rank_scores"])
    if final_rank is not None and not handles_rank:
        from .._stats import project

        for g in folds:
            m = groups == g
            mean, axes = fold_axes[g]
            oof[m] = project(oof[m], mean, axes[:, :final_rank])
    record["rank"] = final_rank
    neighbours = None
    if smooth_w == "auto" or (smooth_w or 0) > 0:
        if "spatial" not in adata.obsm:
            raise KeyError("`smooth_predictions` needs spot positions in adata.obsm['spatial'].")
        from .._stats import neighbour_matrix

        neighbours = neighbour_matrix(np.asarray(adata.obsm["spatial"])[:, :2], groups)
    if smooth_w == "auto":
        w, record["smooth_scores"] = choose_smooth(oof, truth, groups, folds, neighbours, SMOOTH_CANDIDATES)
        record["smooth_predictions"] = w
        logger.info("prediction smoothing chosen by cross-fitting: %g (%s)", w, record["smooth_scores"])
    if neighbours is not None and record["smooth_predictions"]:
        oof = smooth(oof, neighbours, record["smooth_predictions"])
    tables = _expected_tables(oof, truth, groups, folds, fold_axes)
    record["crossfit"] = {
        "unit": unit,
        "folds": [str(g) for g in folds],
        "n_spots": int(np.isin(groups, folds).sum()),
        "levels": list(INTERVAL_LEVELS),
        "specific_min": SPECIFIC_MIN,
        "seconds": round(time.time() - t0, 1),
        "seconds_fit": round(seconds_fit, 1),
        "oof_pcc_mean": float(np.nanmean(tables["crossfit_pcc"])),
        "oof_pcc_specific_mean": float(np.nanmean(tables["crossfit_pcc_specific"])),
    }
    logger.info(
        "Cross-fitted %s over %d %ss in %.0f s (fit %.0f s): held-out PCC@M %.3f, gene-specific %.3f.",
        model.method,
        len(folds),
        unit,
        record["crossfit"]["seconds"],
        seconds_fit,
        record["crossfit"]["oof_pcc_mean"],
        record["crossfit"]["oof_pcc_specific_mean"],
    )
    _attach(model, truth, final_rank, tables)
    _record(model, adata, call["key_added"], record, record["crossfit"])


def _out_of_fold(model, adata, fit_fn, call, groups, folds, unit, inner_rank, inner, outer=None) -> np.ndarray:
    """Predictions of every scored group's spots by the method trained on the other groups (raw, model genes)."""
    from ._predict import impute

    oof = np.full((adata.n_obs, len(model.genes)), np.nan)
    extra = inner(model) if inner is not None else {}
    old = settings.progress
    bar = progress(folds, desc=f"cross-fitting {model.method}", total=len(folds), disable=not old, delay=0)
    try:
        for g in bar:
            train = adata[groups != g].copy()
            held = adata[groups == g].copy()
            args = dict(call, adata=train, genes=list(model.genes), rank=inner_rank, smooth_predictions=None)
            args.update(crossfit=False, overwrite=True, **extra)
            for name in ("checkpoint_dir", "resume"):
                if name in args:
                    args[name] = None if name == "checkpoint_dir" else False
            if unit == "spatial block" and "library_key" in args:
                args["library_key"] = None
            settings.progress = False
            try:
                sub = fit_fn(**args)
                if inner_rank is not None:
                    _attach(sub, _truth(train, sub, call), inner_rank, None)
                kw = {"reference": train} if sub.kind == "retrieval" else {}
                pred = impute(held, sub, genes=list(model.genes), smooth=0.0, interval=None, key_added="oof", **kw)
            finally:
                settings.progress = old
            oof[groups == g] = np.asarray(pred.layers["oof"], dtype=np.float64)
            if outer is not None:
                outer.update(1)
    finally:
        settings.progress = old
    return oof


def _truth(adata, model, call) -> np.ndarray:
    from ..pp import expression_matrix

    return expression_matrix(adata, model.genes, layer=call.get("layer"), normalize=call.get("normalize", "log1p"))


def _expected_tables(oof, truth, groups, folds, fold_axes) -> dict[str, np.ndarray]:
    """Per gene and fold: Pearson r and gene-specific r of the out-of-fold predictions; residual quantiles."""
    from .._stats import partial_pearson, shared_axis_scores

    pcc = np.full((truth.shape[1], len(folds)), np.nan)
    spec = np.full_like(pcc, np.nan)
    for j, g in enumerate(folds):
        m = groups == g
        mean, axes = fold_axes[g]
        s = shared_axis_scores(truth[m], mean, axes[:, 0])
        pcc[:, j] = partial_pearson(oof[m], truth[m], None)[0]
        spec[:, j] = partial_pearson(oof[m], truth[m], s)[0]
    rows = np.isin(groups, folds)
    res = np.abs(truth[rows] - oof[rows])
    n = len(res)
    # split-conformal: the ceil((n + 1) level) / n empirical quantile covers a new exchangeable spot at `level`
    probs = np.minimum(np.ceil((n + 1) * np.asarray(INTERVAL_LEVELS)) / n, 1.0)
    quant = np.quantile(res, probs, axis=0, method="higher").T
    return {"crossfit_pcc": pcc, "crossfit_pcc_specific": spec, "residual_quantiles": quant}


def _attach(model, truth: np.ndarray, rank: int | None, tables: dict | None) -> None:
    """Keep the expression axes (at least the shared one, up to ``rank``) and the cross-fitted tables."""
    from .._stats import expression_axes

    mean, axes = expression_axes(truth, max(rank or 1, 1))
    model.config["expression_mean"] = mean.round(6).tolist()
    model.config["rank"] = rank
    model.arrays["expression_axes"] = axes.astype(np.float32)
    for name in ("crossfit_pcc", "crossfit_pcc_specific", "residual_quantiles"):
        model.arrays.pop(name, None)
    if tables is not None:
        model.arrays.update({k: np.asarray(v, dtype=np.float32) for k, v in tables.items()})


def _record(model, adata, key_added, record, crossfit) -> None:
    model.config["smooth_predictions"] = record["smooth_predictions"]
    model.config["crossfit"] = crossfit
    params = {k: v for k, v in record.items() if k != "crossfit"}
    if crossfit is not None:
        params["crossfit"] = {k: v for k, v in crossfit.items() if k != "levels"}
    model.config.setdefault("params", {}).update(jsonable(params))
    entry = adata.uns.get(key_added)
    if isinstance(entry, dict) and isinstance(entry.get("params"), dict):
        by = written_by(adata, "uns", key_added)
        entry["params"].update(jsonable(params))
        if by is not None:  # still the fit's own key: a re-run may replace it
            mark_written(adata, "uns", key_added, by=by)
