"""Evaluation of predicted expression against measured expression (per gene and summarised)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from .._settings import logger
from .._utils import jsonable, prediction_key, resolve_library_key

#: Status values of :func:`gene_metrics` rows. Only ``'ok'`` and ``'constant_prediction'`` rows are evaluated.
STATUS = ("ok", "constant_prediction", "constant_truth", "not_predicted")
_EPS = 1e-12
#: Layer of the query's own measurement in the output of :func:`histoexp.tl.impute`.
MEASURED = "measured"


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-wise Pearson correlation; also returns the two centred norms (0 for a constant column)."""
    a = a - a.mean(axis=0, keepdims=True)
    b = b - b.mean(axis=0, keepdims=True)
    na = np.sqrt((a * a).sum(axis=0))
    nb = np.sqrt((b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / (na * nb)
    return np.clip(r, -1.0, 1.0), na, nb


def gene_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    genes: Sequence[str] | None = None,
    *,
    shared_axis: np.ndarray | str | None = "truth",
    coords: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per-gene agreement between a prediction and the truth, on plain arrays.

    Parameters
    ----------
    pred
        Predicted expression, shape ``(n_spots, n_genes)``. A gene whose prediction is NaN in every
        spot counts as *not predicted*; spots where any predicted gene is NaN are dropped (logged).
    truth
        Measured expression on the same scale (e.g. ``log1p`` of normalised counts), same shape.
    genes
        Gene names (the table's index); default ``'0'``, ``'1'``, ....
    shared_axis
        The shared axis ``s`` of the spots for the gene-specific PCC: an array ``(n_spots,)`` (the measured
        expression, centred on the *training* mean, projected on the first principal axis of the training
        expression: :func:`histoexp.tl.shared_axis`), ``'truth'`` (default: the first principal component of
        ``truth`` itself, the fallback when the training axis is not known) or ``None`` (no gene-specific columns).
        An array ``(n_spots, k)`` (``hx.tl.shared_axis(..., n_axes=k)``) partials out the scores on the first
        ``k`` training axes together: a stricter figure where a second pattern is shared by most genes (on her2st
        the first axis is a tumour/stroma contrast and the second the sequencing-depth pattern; see the zero-shot
        page of the docs).
    coords
        ``(n_spots, 2)`` spot positions: adds the spatial significance of the gene-specific PCC (below).
    groups
        Section of each spot when ``coords`` span several sections (their coordinate frames are kept apart).

    Returns
    -------
    DataFrame indexed by gene with columns

    ``pcc``, ``spearman``
        Pearson / Spearman correlation across spots. A gene whose **prediction is constant** (the
        correlation is undefined) gets ``0`` for both and ``status='constant_prediction'``: it stays in
        every mean, as a prediction that carries no information (excluding it would reward a model for
        giving up on hard genes).
    ``mse``, ``mae``
        Mean squared / absolute error across spots.
    ``truth_mean``, ``truth_var``
        Mean and (population) variance of the truth, used for the HEG / HVG selections.
    ``status``
        ``'ok'``, ``'constant_prediction'``, ``'constant_truth'`` (truth has zero variance: the gene is
        excluded, all metrics NaN) or ``'not_predicted'`` (prediction all NaN: excluded, NaN).
    ``pcc_specific``
        Gene-specific PCC (unless ``shared_axis=None``): the partial correlation of prediction and truth given
        ``[1, s]`` (both regressed on the shared axis, residuals correlated). A predictor that only knows the
        shared spatial pattern scores about 0. ``0`` when the prediction's residual is constant.
    ``pcc_specific_pval``, ``pcc_specific_qval``
        With ``coords``: one-sided p-value of ``pcc_specific > 0`` under spatial autocorrelation, by the
        effective sample size of Clifford, Richardson & Hémon (1989) / Dutilleul (1993)
        (:func:`histoexp._stats.spatial_effective_n`: Moran autocorrelation of both residuals in 13 distance
        classes; a naive Pearson p-value would treat neighbouring spots as independent and be far too small), and
        its Benjamini–Hochberg q-value over the evaluated genes. ``n_eff`` is the effective number of spots.
    """
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.ndim != 2 or pred.shape != truth.shape:
        raise ValueError(f"`pred` and `truth` must be 2-D arrays of one shape, got {pred.shape} and {truth.shape}.")
    n_spots, n_genes = pred.shape
    if genes is None:
        genes = [str(i) for i in range(n_genes)]
    genes = pd.Index([str(g) for g in genes])
    if len(genes) != n_genes:
        raise ValueError(f"`genes` has {len(genes)} names but the arrays have {n_genes} columns.")
    if not np.isfinite(truth).all():
        raise ValueError("`truth` contains NaN or infinite values.")

    nan_pred = np.isnan(pred)
    predicted = ~nan_pred.all(axis=0)
    bad_spots = nan_pred[:, predicted].any(axis=1)
    if bad_spots.any():
        logger.warning("evaluate: %d of %d spots have NaN predictions and are left out.", bad_spots.sum(), n_spots)
    keep = ~bad_spots
    if keep.sum() < 2:
        raise ValueError(f"At least 2 spots with finite predictions are needed, found {int(keep.sum())}.")
    p, t = pred[keep][:, predicted], truth[keep][:, predicted]

    from scipy.stats import rankdata

    pcc, _, _ = _pearson_columns(p, t)
    scc, _, _ = _pearson_columns(rankdata(p, axis=0), rankdata(t, axis=0))
    t_var = t.var(axis=0)
    const_truth = t_var <= (_EPS * np.maximum(np.abs(t).max(axis=0), 1.0)) ** 2
    const_pred = (p.var(axis=0) <= (_EPS * np.maximum(np.abs(p).max(axis=0), 1.0)) ** 2) & ~const_truth
    pcc[const_pred] = 0.0
    scc[const_pred] = 0.0

    out = pd.DataFrame(
        np.nan,
        index=genes,
        columns=["pcc", "spearman", "mse", "mae", "truth_mean", "truth_var"],
    )
    out["status"] = "not_predicted"
    idx = np.flatnonzero(predicted)
    out.iloc[idx, 0] = pcc
    out.iloc[idx, 1] = scc
    out.iloc[idx, 2] = ((p - t) ** 2).mean(axis=0)
    out.iloc[idx, 3] = np.abs(p - t).mean(axis=0)
    out.iloc[idx, 4] = t.mean(axis=0)
    out.iloc[idx, 5] = t_var
    status = np.where(const_truth, "constant_truth", np.where(const_pred, "constant_prediction", "ok"))
    out.iloc[idx, out.columns.get_loc("status")] = status
    out.loc[out["status"] == "constant_truth", ["pcc", "spearman", "mse", "mae"]] = np.nan
    out.attrs["n_spots"] = int(keep.sum())
    if shared_axis is not None:
        _specific_columns(out, idx, p, t, shared_axis, keep, coords, groups)
    return out


def _specific_columns(out, idx, p, t, shared_axis, keep, coords, groups) -> None:
    """Add ``pcc_specific`` (and with ``coords`` its spatial p / q values) to a :func:`gene_metrics` table."""
    from .._stats import benjamini_hochberg, partial_pearson, spatial_effective_n, specific_pvalues

    if isinstance(shared_axis, str):
        if shared_axis != "truth":
            raise ValueError(f"`shared_axis` must be an array, 'truth' or None, got {shared_axis!r}.")
        s = _truth_pc1(t)
        out.attrs["shared_axis"] = "PC1 of the evaluated truth (no training axis given)"
    else:
        s_all = np.asarray(shared_axis, dtype=np.float64)
        if s_all.ndim == 2 and s_all.shape[1] == 1:
            s_all = s_all[:, 0]
        if s_all.ndim not in (1, 2) or len(s_all) != len(keep) or s_all.size == 0 or not np.isfinite(s_all).all():
            raise ValueError(
                f"`shared_axis` must be {len(keep)} finite numbers (one per spot), or an array ({len(keep)}, k) of "
                f"scores on k shared axes, got shape {s_all.shape}."
            )
        s = s_all[keep]
        out.attrs["shared_axis"] = "given" if s.ndim == 1 else f"given ({s.shape[1]} axes)"
    r, _ = partial_pearson(p, t, s)
    ok = out["status"].iloc[idx].to_numpy() != "constant_truth"
    r[~ok] = np.nan
    out["pcc_specific"] = np.nan
    out.iloc[idx, out.columns.get_loc("pcc_specific")] = r
    if coords is None:
        return
    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    if len(xy) != len(keep) or not np.isfinite(xy).all():
        raise ValueError(f"`coords` must be {len(keep)} finite (x, y) positions, one per spot.")
    xy = _separate_groups(xy, groups)[keep]
    from .._stats import _residualise

    n_eff = spatial_effective_n(_residualise(p, s), _residualise(t, s), xy)
    pval = specific_pvalues(r, n_eff, n_covariates=1 if s.ndim == 1 else s.shape[1])
    pval[~ok] = np.nan
    out["pcc_specific_pval"] = np.nan
    out["pcc_specific_qval"] = np.nan
    out["n_eff"] = np.nan
    out.iloc[idx, out.columns.get_loc("pcc_specific_pval")] = pval
    out.iloc[idx, out.columns.get_loc("pcc_specific_qval")] = benjamini_hochberg(pval)
    out.iloc[idx, out.columns.get_loc("n_eff")] = n_eff


def _truth_pc1(t: np.ndarray) -> np.ndarray:
    """Scores of the spots on the first principal component of ``t`` (the fallback shared axis)."""
    from .._stats import expression_axes, shared_axis_scores

    mean, axes = expression_axes(t, 1)
    if axes.shape[1] == 0:
        return np.zeros(len(t))
    return shared_axis_scores(t, mean, axes[:, 0])


def _separate_groups(xy: np.ndarray, groups) -> np.ndarray:
    """Shift each group's coordinates far from the others (sections have their own pixel frames)."""
    if groups is None:
        return xy
    groups = np.asarray(groups)
    if len(groups) != len(xy):
        raise ValueError(f"`groups` must have one label per spot ({len(xy)}), got {len(groups)}.")
    out = xy.copy()
    span = float(np.ptp(xy, axis=0).max()) if len(xy) else 0.0
    for i, g in enumerate(pd.unique(groups)):
        m = groups == g
        out[m] -= xy[m].min(0)
        out[m, 0] += i * 10.0 * (span + 1.0)
    return out


def shared_axis(truth: np.ndarray, train_expression: np.ndarray, n_axes: int = 1) -> np.ndarray:
    """Scores of a section's spots on the shared axis of the training expression (an evaluation device).

    The first principal axis of ``train_expression`` (spots x genes, log-normalised, centred on its mean) is the
    spatial pattern most genes share (cellularity, depth); the score of a spot is its measured expression
    ``truth`` (same genes, same scale), centred on the training mean, projected on that axis. It is computed
    from the truth, so it only ever serves to evaluate (:func:`gene_metrics` ``shared_axis=``), never to predict.

    Parameters
    ----------
    truth
        ``(n_spots, n_genes)`` measured expression of the evaluated section.
    train_expression
        ``(n_train_spots, n_genes)`` expression of the training spots, same genes and normalisation.
    n_axes
        Number of leading training axes: ``1`` (default, the definition of the gene-specific PCC) returns
        ``(n_spots,)``; ``k > 1`` returns the scores on the first ``k`` axes, ``(n_spots, k)``, for the stricter
        figure that partials them out together (:func:`gene_metrics`).
    """
    from .._stats import expression_axes, shared_axis_scores

    if isinstance(n_axes, bool) or not isinstance(n_axes, (int, np.integer)) or n_axes < 1:
        raise ValueError(f"`n_axes` must be a positive integer, got {n_axes!r}.")
    truth = np.asarray(truth, dtype=np.float64)
    train = np.asarray(train_expression, dtype=np.float64)
    if truth.ndim != 2 or train.ndim != 2 or truth.shape[1] != train.shape[1]:
        raise ValueError(
            f"`truth` and `train_expression` must be 2-d with the same genes, got {truth.shape} and {train.shape}."
        )
    mean, axes = expression_axes(train, n_axes)
    if axes.shape[1] == 0:
        raise ValueError("`train_expression` is constant: it has no shared axis.")
    if axes.shape[1] < n_axes:
        raise ValueError(f"`train_expression` has {axes.shape[1]} principal axes, fewer than n_axes={n_axes}.")
    if n_axes == 1:
        return shared_axis_scores(truth, mean, axes[:, 0])
    return (truth - mean) @ axes


def summarize(table: pd.DataFrame, *, n_top: int = 50, n_spots: int | None = None, fdr: float = 0.05) -> dict:
    """Summary metrics of a :func:`gene_metrics` table.

    Evaluated genes are those with ``status`` ``'ok'`` or ``'constant_prediction'``.

    Parameters
    ----------
    table
        Output of :func:`gene_metrics`.
    n_top
        Size of the HVG / HEG / best-gene selections (all evaluated genes when fewer).
    n_spots
        Number of spots (default: ``table.attrs['n_spots']``).
    fdr
        False discovery rate of the gene-specific significance.

    Returns
    -------
    A JSON-able dict with

    ``pcc_mean`` (= ``pcc_at_m``)
        Mean Pearson over all evaluated genes (PCC@M).
    ``pcc_at_h``
        PCC@H: mean Pearson of the ``n_top`` best-predicted genes (the top ``n_top`` by Pearson among the
        evaluated genes). This selects on the evaluated data itself, so it is optimistic by construction;
        it is what the zero-shot / retrieval literature calls the highly predictive genes.
    ``pcc_at_f``, ``pcc_at_s``
        First quartile and median of the per-gene Pearson (EGN's PCC@F / PCC@S).
    ``pcc_hvg``
        Mean Pearson over the ``n_top`` most variable genes of the truth (highest variance of the
        log-normalised truth among the evaluated genes) (HVG-50 with the default).
    ``pcc_heg``
        Mean Pearson over the ``n_top`` most expressed genes (highest mean truth) (HEG-50).
    ``spearman_mean``, ``mse_mean``, ``mae_mean``
        Means over the evaluated genes.
    ``pcc_specific_mean``, ``pcc_specific_hvg``
        Gene-specific PCC@M and HVG-50 (when the table has ``pcc_specific``): the skill left after the shared
        spatial pattern most genes follow is removed (a one-pattern predictor scores about 0).
    ``frac_specific_significant``, ``n_specific_significant``
        Share and number of evaluated genes whose gene-specific PCC is significantly positive under spatial
        autocorrelation (Benjamini–Hochberg q < ``fdr``; when the table has ``pcc_specific_qval``).
    ``n_genes``, ``n_spots``, ``n_top``, ``n_constant_excluded`` (constant truth),
    ``n_constant_prediction`` (kept, with correlation 0), ``n_not_predicted``.
    """
    ev = table[table["status"].isin(["ok", "constant_prediction"])]
    n = len(ev)
    counts = table["status"].value_counts()
    res: dict = {
        "n_genes": n,
        "n_spots": int(n_spots if n_spots is not None else table.attrs.get("n_spots", -1)),
        "n_top": int(min(n_top, n)),
        "n_constant_excluded": int(counts.get("constant_truth", 0)),
        "n_constant_prediction": int(counts.get("constant_prediction", 0)),
        "n_not_predicted": int(counts.get("not_predicted", 0)),
    }
    if n == 0:
        raise ValueError("No gene can be evaluated (all genes are constant in the truth or not predicted).")
    pcc = ev["pcc"].to_numpy()
    k = min(n_top, n)
    hvg = ev["truth_var"].sort_values(ascending=False, kind="stable").index[:k]
    heg = ev["truth_mean"].sort_values(ascending=False, kind="stable").index[:k]
    res.update(
        {
            "pcc_mean": float(pcc.mean()),
            "pcc_at_m": float(pcc.mean()),
            "pcc_at_h": float(np.sort(pcc)[::-1][:k].mean()),
            "pcc_at_f": float(np.quantile(pcc, 0.25)),
            "pcc_at_s": float(np.median(pcc)),
            "pcc_hvg": float(ev.loc[hvg, "pcc"].mean()),
            "pcc_heg": float(ev.loc[heg, "pcc"].mean()),
            "spearman_mean": float(ev["spearman"].mean()),
            "mse_mean": float(ev["mse"].mean()),
            "mae_mean": float(ev["mae"].mean()),
        }
    )
    if "pcc_specific" in ev:
        spec = ev["pcc_specific"].fillna(0.0)
        res["pcc_specific_mean"] = float(spec.mean())
        res["pcc_specific_hvg"] = float(spec.loc[hvg].mean())
    if "pcc_specific_qval" in ev:
        sig = (ev["pcc_specific_qval"] < fdr).to_numpy()
        res["n_specific_significant"] = int(sig.sum())
        res["frac_specific_significant"] = float(sig.mean())
        res["specific_fdr"] = float(fdr)
    if "shared_axis" in table.attrs:
        res["shared_axis"] = table.attrs["shared_axis"]
    return res


def _truth_matrix(adata: AnnData, truth, genes: list[str], normalize: str) -> tuple[np.ndarray, str]:
    if truth is None:
        from ..pp import expression_matrix

        return expression_matrix(adata, genes, normalize=normalize), f"X ({normalize})"
    if isinstance(truth, str):
        if truth not in adata.layers:
            raise KeyError(f"`truth={truth!r}` is not in adata.layers (found {list(adata.layers)}).")
        M = adata.layers[truth]
        idx = adata.var_names.get_indexer(genes)
        M = M[:, idx]
        M = M.toarray() if hasattr(M, "toarray") else np.asarray(M)
        return M.astype(np.float64), f"layers[{truth!r}]"
    if isinstance(truth, pd.DataFrame):
        missing = [g for g in genes if g not in truth.columns]
        if missing:
            raise KeyError(f"`truth` lacks {len(missing)} of the evaluated genes (e.g. {missing[:5]}).")
        if len(truth) != adata.n_obs:
            raise ValueError(f"`truth` has {len(truth)} rows, expected adata.n_obs={adata.n_obs}.")
        return truth[genes].to_numpy(np.float64), "DataFrame"
    M = truth.toarray() if hasattr(truth, "toarray") else np.asarray(truth)
    if M.shape != (adata.n_obs, adata.n_vars):
        raise ValueError(f"`truth` as an array must have shape (n_obs, n_vars)={adata.shape}, got {M.shape}.")
    return M[:, adata.var_names.get_indexer(genes)].astype(np.float64), "array"


def evaluate(
    adata: AnnData,
    *,
    layer: str | None = None,
    truth: str | np.ndarray | pd.DataFrame | None = None,
    genes: Sequence[str] | None = None,
    normalize: str = "log1p",
    n_top: int = 50,
    shared_axis: np.ndarray | str | None = None,
    significance: bool = True,
    key_added: str | None = None,
    copy: bool = False,
) -> pd.DataFrame | None:
    """Compare predicted with measured expression, per gene and summarised.

    Per gene: Pearson and Spearman correlation across spots, mean squared error and mean absolute
    error between ``adata.layers[layer]`` and the measured log-normalised expression (see
    :func:`gene_metrics` for the exact rules). Summaries (see :func:`summarize`): mean Pearson over all
    evaluated genes (PCC@M), over the ``n_top`` most variable (HVG-50) and most expressed (HEG-50)
    genes of the truth, PCC@H (mean of the ``n_top`` best-predicted genes), quartiles, mean Spearman,
    MSE and MAE.

    Gene-specific skill (see the project's evaluation page): most genes of a tissue co-vary along one spatial
    axis (cellularity, depth), so a prediction that knows nothing about individual genes can reach a good mean
    Pearson. The **gene-specific PCC** of a gene is the partial correlation of prediction and measurement given
    the shared axis ``s`` of the spots (the measurement of the model's genes, centred on the training mean,
    projected on the first principal axis of the training expression: :func:`histoexp.tl.impute` writes it to
    ``obs[f'{layer}_shared_axis']`` when the query has a measurement). Its significance accounts for spatial
    autocorrelation (effective sample size, see :func:`gene_metrics`); the summary gives gene-specific PCC@M,
    HVG-50 and the share of genes with a significantly positive gene-specific PCC (BH q < 0.05). When the
    prediction holds genes the model was trained on and genes it was not (``var['seen_in_training']``, e.g.
    zero-shot or retrieval of reference genes outside the panel), the summary of each group is added under
    ``'seen'`` and ``'unseen'``.

    Genes evaluated: the genes with a prediction and a measurement, intersected with ``genes``. Genes
    constant in the truth are excluded and counted (``n_constant_excluded``). Genes whose prediction is
    constant get correlation ``0`` and are kept (``n_constant_prediction``). A prediction is never scored
    against itself: without a measurement (an H&E-only query, or ``X`` holding the predictions) it raises.

    Parameters
    ----------
    adata
        The output of :func:`histoexp.tl.impute` (predictions in ``layers[layer]``, the query's
        measurement in ``layers['measured']``), or any AnnData with predictions in a layer and counts in
        ``X``.
    layer
        Layer holding the predictions. ``None``: the one prediction layer of ``adata`` (the layer
        :func:`histoexp.tl.impute` wrote, whatever the model: ``'bleep'``, ``'ridge'``, ``'nh2st'``, ...); an
        error lists the layers when there are several.
    truth
        ``None``: ``layers['measured']`` (genes with ``var['measured']``) when present, else
        :func:`histoexp.pp.expression_matrix` of the counts in ``X`` with ``normalize`` (``log1p`` of counts
        normalised to 10,000 per spot). A layer name: that layer as it is. An array of shape
        ``(n_obs, n_vars)`` or a DataFrame with gene columns: used as it is.
    genes
        Restrict to these genes (default: every predicted and measured gene).
    normalize
        Normalisation of ``X`` when it is the truth (``'log1p'`` or ``'none'``).
    n_top
        Size of the HVG / HEG / best-gene selections (>= 1).
    shared_axis
        The shared axis of the spots: ``None`` (default) reads ``obs[f'{layer}_shared_axis']`` (written by
        :func:`histoexp.tl.impute`), else the first principal component of the measurement itself (recorded in
        the summary's ``shared_axis``); an array of one value per spot (or ``(n_obs, k)``: scores on ``k`` axes,
        partialled out together, see :func:`gene_metrics`); ``'truth'`` forces the fallback.
    significance
        Compute the spatial significance of the gene-specific PCC (needs ``obsm['spatial']``; spots of several
        sections in ``obs['library_id']`` are kept apart).
    key_added
        Prefix of the results (default: ``layer``).
    copy
        Return the per-gene table instead of writing to ``adata``.

    Returns
    -------
    With ``copy=True`` the per-gene DataFrame (:func:`gene_metrics` columns), with the summary in
    ``table.attrs['metrics']``. Otherwise ``None`` and writes

    - ``var[f'{key}_pcc']``, ``var[f'{key}_spearman']``, ``var[f'{key}_mse']``, ``var[f'{key}_mae']``,
      ``var[f'{key}_pcc_specific']`` and ``var[f'{key}_pcc_specific_qval']`` (NaN for genes not evaluated),
    - ``uns[key]['metrics']``: the summary dict (with ``truth`` saying what was compared). Evaluation is
      a recomputation: an existing ``metrics`` entry and existing metric columns are replaced (logged);
      other entries of ``uns[key]`` such as ``'params'`` are kept.
    """
    if not isinstance(n_top, (int, np.integer)) or n_top < 1:
        raise ValueError(f"`n_top` must be an integer >= 1, got {n_top!r}.")
    layer = prediction_key(adata, layer, exclude=[truth] if isinstance(truth, str) else [])
    key = key_added or layer
    if truth is not None and isinstance(truth, str) and truth == layer:
        raise ValueError(f"`truth={truth!r}` is the prediction layer itself.")
    P = adata.layers[layer]
    P = P.toarray() if hasattr(P, "toarray") else np.asarray(P)
    P = P.astype(np.float64)
    usable = ~np.isnan(P).all(axis=0)
    x_tag = str(adata.uns.get("histoexp", {}).get("X", ""))
    if truth is None and MEASURED in adata.layers:
        truth = MEASURED
        if "measured" in adata.var:
            usable &= adata.var["measured"].to_numpy(bool)
    elif truth is None:
        if x_tag.startswith("prediction:"):
            raise ValueError(
                f"adata.X holds predictions ({x_tag!r}), not a measurement: pass `truth=` to evaluate against one."
            )
        if adata.n_vars == 0 or _x_is_empty(adata):
            raise ValueError(
                "There is no measurement to evaluate against: no layers['measured'] and adata.X holds no counts "
                "(e.g. an H&E-only query). Pass `truth=`, or predict a query that has measured counts."
            )
    cand = [g for g, ok in zip(adata.var_names, usable, strict=True) if ok]
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        unknown = [g for g in genes if g not in adata.var_names]
        if unknown:
            raise KeyError(f"{len(unknown)} of {len(genes)} `genes` are not in adata.var_names (e.g. {unknown[:5]}).")
        wanted = set(genes)
        cand = [g for g in cand if g in wanted]
    if not cand:
        raise ValueError(
            f"No gene has both a prediction in layers[{layer!r}] and a measurement among the requested genes."
        )
    T, truth_desc = _truth_matrix(adata, truth, cand, normalize)
    idx = adata.var_names.get_indexer(cand)
    axis, axis_desc = _shared_axis_of(adata, layer, shared_axis)
    coords, groups = (None, None)
    if significance and "spatial" in adata.obsm:
        coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
        lib = resolve_library_key(adata, None)
        groups = adata.obs[lib].astype(str).to_numpy() if lib is not None else None
    table = gene_metrics(P[:, idx], T, cand, shared_axis=axis, coords=coords, groups=groups)
    metrics = summarize(table, n_top=n_top)
    if axis_desc is not None:
        metrics["shared_axis"] = axis_desc
    if "seen_in_training" in adata.var:
        seen = adata.var["seen_in_training"].reindex(table.index).fillna(False).to_numpy(bool)
        evaluated = table["status"].isin(["ok", "constant_prediction"]).to_numpy()
        if (seen & evaluated).any() and (~seen & evaluated).any():
            metrics["seen"] = summarize(table[seen], n_top=n_top)
            metrics["unseen"] = summarize(table[~seen], n_top=n_top)
    metrics.update({"layer": layer, "truth": truth_desc})
    metrics = jsonable(metrics)
    table.attrs["metrics"] = metrics
    logger.info(
        "evaluate %s: %d genes, %d spots, mean Pearson %.3f (HVG-%d %.3f), %d constant genes excluded.",
        layer,
        metrics["n_genes"],
        metrics["n_spots"],
        metrics["pcc_mean"],
        metrics["n_top"],
        metrics["pcc_hvg"],
        metrics["n_constant_excluded"],
    )
    if copy:
        return table
    for col in ("pcc", "spearman", "mse", "mae", "pcc_specific", "pcc_specific_qval"):
        if col not in table:
            continue
        name = f"{key}_{col}"
        if name in adata.var:
            logger.info("evaluate: replacing var[%r].", name)
        values = pd.Series(np.nan, index=adata.var_names, dtype=np.float64)
        values.loc[table.index] = table[col].to_numpy()
        adata.var[name] = values.to_numpy()
    entry = adata.uns.get(key)
    entry = dict(entry) if isinstance(entry, dict) else {}
    if "metrics" in entry:
        logger.info("evaluate: replacing uns[%r]['metrics'].", key)
    entry["metrics"] = metrics
    adata.uns[key] = entry
    return None


def _shared_axis_of(adata: AnnData, layer: str, given) -> tuple[np.ndarray | str, str | None]:
    """Return the shared axis to evaluate ``layer`` with, and how it was obtained (see :func:`evaluate`)."""
    if given is not None:
        if isinstance(given, str):
            return given, None
        return np.asarray(given, dtype=np.float64), "given"
    col = f"{layer}_shared_axis"
    if col in adata.obs:
        values = adata.obs[col].to_numpy(dtype=np.float64)
        if np.isfinite(values).all():
            return values, f"obs[{col!r}] (training PC1, from the measurement)"
    return "truth", None


def _x_is_empty(adata: AnnData) -> bool:
    X = adata.X
    if X is None:
        return True
    data = X.data if hasattr(X, "nnz") else np.asarray(X)
    data = np.asarray(data)
    return data.size == 0 or not np.any(np.nan_to_num(data) != 0)
