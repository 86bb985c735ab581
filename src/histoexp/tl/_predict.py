"""The one prediction entry point for every model: :func:`impute` (and :func:`load_model`)."""

from __future__ import annotations

import copy as _copy
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import DEFAULT_TARGET_SUM
from .._geometry import check_query_record, describe, geometry_differences
from .._settings import logger, settings
from .._utils import jsonable, one_progress_bar, progress, resolve_library_key
from ._embed import recorded_scales
from ._evaluate import MEASURED
from ._fit import _embedding_record


def load_model(path: str | os.PathLike, *, device: str | None = None):
    """Load any histoexp model folder (BLEEP, ridge, ...), dispatching on ``config.json``'s ``'method'``.

    Parameters
    ----------
    path
        Folder written by a model's ``.save``.
    device
        Move the weights there (``None``: CPU).
    """
    from ..models.base import load_model as _load

    return _load(path, device=device)


def _as_model(model):
    from ..models.base import ExpressionModel

    if isinstance(model, ExpressionModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise TypeError(f"`model` must be a histoexp model or a model folder, got {type(model).__name__}.")


def _query_images(query: AnnData, model, patches_key: str | None):
    """Return what the model's image branch reads from the query (features or patches), with clear errors."""
    cfg = model.config
    if model.mode == "frozen":
        # a model may read more than one obsm (e.g. zero-shot nuclei features), concatenated in this order
        extra = dict(cfg.get("extra_reps") or {})  # obsm key -> (width, embedding record)
        parts = []
        for rep in [model.use_rep, *extra]:
            width, m_rec = (extra[rep]["dim"], extra[rep].get("embedding")) if rep in extra else (None, None)
            if rep == model.use_rep:
                width = cfg["feature_dim"] - sum(int(v["dim"]) for v in extra.values())
                m_rec = cfg.get("embedding")
            parts.append(_query_rep(query, rep, int(width), m_rec, (cfg.get("encoder") or {}).get("name")))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    geo = cfg.get("patches") or {}
    key = patches_key or geo.get("key", "patches")
    try:
        src = model.patch_source(query, key)
    except (KeyError, ValueError) as err:
        raise KeyError(
            f"The model was fine-tuned end to end and reads patches, but the query has none under {key!r} ({err}). "
            f"Run hx.pp.extract_patches(query, size_um={geo.get('size_um')}, mpp={geo.get('mpp')}, "
            f"patch_px={geo.get('patch_px')}) first."
        ) from err
    # a model reading context patches (NH2ST's windows) records their side as context_px
    want = {"patch_px": geo.get("context_px", geo.get("patch_px")), "mpp": geo.get("mpp")}
    diffs = geometry_differences({f: getattr(src, f, None) for f in want}, want)
    if diffs:
        raise ValueError(
            f"The query's patches under {key!r} differ from the model's training patches: {describe(diffs)}. "
            f"Extract them at the model's geometry: hx.pp.extract_patches(query, size_um={geo.get('size_um')}, "
            f"patch_px={geo.get('patch_px')}, context={geo.get('context', 1.0)}, overwrite=True)."
        )
    return src


def _query_rep(query: AnnData, rep: str, width: int, m_rec: dict | None, enc: str | None) -> np.ndarray:
    """``query.obsm[rep]`` as float32, checked against the model's width and embedding record."""
    m_scales = recorded_scales(m_rec)
    if rep not in query.obsm:
        how = f"hx.tl.embed_patches(query, encoder={enc!r}, weights=...)" if enc else "the training's method"
        if m_rec and m_rec.get("grid"):  # a neighbourhood embedding (NH2ST)
            how = f"hx.tl.embed_neighbourhood(query, encoder={enc!r}, grid={m_rec['grid']})"
        if m_scales is not None and m_scales != (1.0,):
            how = f"hx.tl.embed_query(query, model) (embed_patches with scales={_fmt_scales(m_scales)})"
        raise KeyError(
            f"The model reads image features from obsm[{rep!r}], which the query lacks "
            f"(query obsm: {list(query.obsm)}). Compute them with {how} as for the training data."
        )
    q_scales = recorded_scales(_embedding_record(query, rep))
    if m_scales is not None and q_scales is not None and m_scales != q_scales:
        raise ValueError(
            f"query.obsm[{rep!r}] was computed at scales={_fmt_scales(q_scales)} but the model was trained on "
            f"features at scales={_fmt_scales(m_scales)} (multiples of the patch side, in this order): recompute "
            "them with hx.tl.embed_query(query, model, overwrite=True)."
        )
    feats = np.asarray(query.obsm[rep], dtype=np.float32)
    if feats.ndim != 2 or feats.shape[1] != width:
        raise ValueError(f"query.obsm[{rep!r}] has shape {feats.shape}; the model expects {width} features a spot.")
    if not np.isfinite(feats).all():
        raise ValueError(f"query.obsm[{rep!r}] contains NaN or infinite values.")
    # encoder and weights exactly; patch and window sizes with a tolerance (they are computed: 99.99999999999999 µm)
    check_query_record(rep, _embedding_record(query, rep), m_rec)
    return feats


def _fmt_scales(scales: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in scales) + ("," if len(scales) == 1 else "") + ")"


def _center_sections(x: np.ndarray, labels: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per section (label): subtract the section's per-gene mean, add ``target``."""
    out = np.empty_like(x)
    for lab in np.unique(labels):
        m = labels == lab
        out[m] = x[m] - x[m].mean(0) + target
    return out


def _reference_bank(model, reference, genes, layer, center=None):
    """(ReferenceSpots of the model genes, values of the output genes, output gene names)."""
    from ..models.base import ReferenceSpots
    from ..pp import expression_matrix

    mgenes = model.genes
    if reference is None:
        stored = model.reference
        if stored is None:
            raise ValueError("The model keeps no reference spots (fit with keep_reference=False): pass `reference=`.")
        out = mgenes if genes is None or (isinstance(genes, str) and genes == "all") else _as_list(genes)
        miss = [g for g in out if g not in mgenes]
        if miss:
            raise KeyError(
                f"{len(miss)} of {len(out)} requested genes are not in the model's stored reference "
                f"(e.g. {miss[:5]}); pass `reference=` AnnData(s) that contain them."
            )
        cols = [mgenes.index(g) for g in out]
        return stored, stored.expression[:, cols], list(out)
    refs = _as_refs(reference)
    if not refs or not all(isinstance(r, AnnData) for r in refs):
        raise TypeError("`reference` must be an AnnData or a list of AnnData.")
    for i, r in enumerate(refs):
        miss = [g for g in mgenes if g not in r.var_names]
        if miss:
            raise ValueError(
                f"Reference {i} lacks {len(miss)} of the model's {len(mgenes)} genes (e.g. {miss[:5]}); "
                "the spot branch needs all of them."
            )
    common = [g for g in refs[0].var_names if all(g in r.var_names for r in refs[1:])]
    if genes is None:
        out = mgenes
    elif isinstance(genes, str) and genes == "all":
        out = common
    else:
        out = list(dict.fromkeys(_as_list(genes)))
        miss = [g for g in out if g not in common]
        if miss:
            raise KeyError(f"{len(miss)} of {len(out)} requested genes are not in every reference (e.g. {miss[:5]}).")
    norm, ts = model.config.get("normalize", "log1p"), model.config.get("target_sum", DEFAULT_TARGET_SUM)
    bank = np.concatenate([expression_matrix(r, mgenes, layer=layer, normalize=norm, target_sum=ts) for r in refs])
    same = list(out) == list(mgenes)
    if same:
        values = bank
    else:
        values = np.concatenate([expression_matrix(r, out, layer=layer, normalize=norm, target_sum=ts) for r in refs])
    sections = np.concatenate([_section_labels(r, i, resolve_library_key(r)) for i, r in enumerate(refs)])
    if center:
        column = center if isinstance(center, str) else None
        labels = np.concatenate(
            [_section_labels(r, i, column if column in r.obs else None) for i, r in enumerate(refs)]
        )
        train_mean = model.config.get("expression_mean")
        if train_mean is None:
            raise ValueError("`center_reference` needs the model's training mean (models fitted by histoexp >= 0.2).")
        train_mean = np.asarray(train_mean, dtype=np.float32)
        bank = _center_sections(bank, labels, train_mean)
        if same:
            values = bank
        else:
            pos = {g: i for i, g in enumerate(mgenes)}
            target = values.mean(0)
            for j, g in enumerate(out):
                if g in pos:
                    target[j] = train_mean[pos[g]]
            values = _center_sections(values, labels, target)
    coords = None
    if "coords" in model.reference_fields:
        coords = np.concatenate([model.reference_positions(r) for r in refs])
    return ReferenceSpots(bank, coords, sections), values, list(out)


class PreparedReference:
    """A retrieval reference prepared once for many :func:`impute` calls with one model (many slides).

    Built by :func:`prepare_reference`: the reference AnnData(s) are normalised into the model's bank once, and
    each ensemble member's reference embeddings are computed on first use and kept, so predicting slide after
    slide does not redo them (memory: ``n_ensemble × n_spots × embedding width`` float32 besides the bank).
    Pass it as ``reference=`` to :func:`impute` with the same model and ``genes=None`` (the genes were fixed here).

    Attributes
    ----------
    genes
        The output genes.
    n_spots
        Reference spots in the bank.
    n_references
        AnnData objects the bank was built from (``None``: the model's stored reference).
    """

    def __init__(self, model, reference, genes, layer, center) -> None:
        self.model = model
        self.spots, self.values, self.genes = _reference_bank(model, reference, genes, layer, center=center)
        self.n_spots = len(self.spots)
        self.n_references = None if reference is None else len(_as_refs(reference))
        self.center = center
        self._emb: dict[int, np.ndarray] = {}
        self._fingerprint: str | None = None

    def embeddings(self, member: int) -> np.ndarray:
        """Return the reference embeddings of ensemble member ``member`` (computed once)."""
        if member not in self._emb:
            self._emb[member] = self.model.encode_reference(self.spots, member=member)
        return self._emb[member]

    def fingerprint(self) -> str:
        """Return a sha256 (16 hex digits) of what retrieval reads: spot inputs, predicted values, genes, sections."""
        if self._fingerprint is None:
            import hashlib

            h = hashlib.sha256()
            for a in (self.spots.expression, self.values, self.spots.coords, self.spots.sections):
                if a is None:
                    h.update(b"none")
                    continue
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update("\n".join(map(str, a)).encode() if a.dtype.kind in "OU" else memoryview(a).cast("B"))
            h.update("\n".join(self.genes).encode())
            h.update(repr(self.center).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def prepare_reference(
    model,
    reference: AnnData | Sequence[AnnData] | None = None,
    *,
    genes: Sequence[str] | str | None = None,
    layer: str | None = None,
    center_reference: str | bool | None = None,
) -> PreparedReference:
    """Prepare a retrieval model's reference once for many :func:`impute` calls (e.g. many slides).

    Parameters
    ----------
    model
        A retrieval model (BLEEP, mclSTExp) or its folder.
    reference, genes, layer, center_reference
        As in :func:`impute`.

    Returns
    -------
    A :class:`PreparedReference` to pass as ``impute(..., reference=prepared)`` with the same model.
    """
    model = _as_model(model)
    if model.kind != "retrieval":
        raise ValueError(f"`reference` applies to retrieval models; {model.method!r} predicts from the image alone.")
    if center_reference and reference is None:
        raise ValueError("`center_reference` applies to an explicit `reference=`, not to the model's stored one.")
    return PreparedReference(model, reference, genes, layer, center_reference)


def _section_labels(adata: AnnData, i: int, column: str | None) -> np.ndarray:
    """Label each spot ``'<reference number>:<section>'`` (one section per AnnData without ``column``)."""
    if column is None:
        return np.full(adata.n_obs, f"{i}:")
    return np.char.add(f"{i}:", adata.obs[column].astype(str).to_numpy().astype(str))


def _as_refs(reference) -> list:
    return [reference] if isinstance(reference, AnnData) else list(reference)


def _as_list(genes) -> list[str]:
    return [genes] if isinstance(genes, str) else list(genes)


def _measurement(query: AnnData, genes: list[str], layer: str | None, model) -> tuple[np.ndarray | None, np.ndarray]:
    """Return the query's log-normalised measurement of ``genes`` (NaN where unmeasured) and the measured mask."""
    from ..pp import expression_matrix
    from ._evaluate import _x_is_empty

    measured = pd.Index(query.var_names).get_indexer(genes) >= 0
    x_tag = str(query.uns.get("histoexp", {}).get("X", ""))
    has_counts = (layer is not None and layer in query.layers) or (
        layer is None and query.n_vars > 0 and not _x_is_empty(query) and not x_tag.startswith("prediction:")
    )
    if not measured.any() or not has_counts:
        return None, np.zeros(len(genes), dtype=bool)
    norm, ts = model.config.get("normalize", "log1p"), model.config.get("target_sum", DEFAULT_TARGET_SUM)
    present = [g for g, m in zip(genes, measured, strict=True) if m]
    sub = expression_matrix(query, present, layer=layer, normalize=norm, target_sum=ts)
    full = np.full((query.n_obs, len(genes)), np.nan, dtype=np.float32)
    full[:, measured] = sub
    return full, measured


def _impute_desc(query=None, model=None, *args, **kwargs) -> str:
    return f"impute ({getattr(model, 'method', None) or 'model'})"


@one_progress_bar(_impute_desc)
def impute(
    query: AnnData,
    model,
    *,
    reference: AnnData | Sequence[AnnData] | None = None,
    genes: Sequence[str] | str | None = None,
    k: int | None = None,
    method: str | None = None,
    key_added: str | None = None,
    layer: str | None = None,
    center_reference: str | bool | None = None,
    patches_key: str | None = None,
    batch_size: int = 256,
    chunk_size: int | None = None,
    index: str = "exact",
    index_params: dict | None = None,
    smooth: float | None = None,
    interval: float | None = 0.9,
    to_X: bool = False,
    device: str | None = None,
) -> AnnData:
    """Predict the expression of query spots from their images, with any histoexp model.

    The one prediction entry point. It dispatches on the model's kind:

    - **retrieval** models (BLEEP, mclSTExp): each query spot's image embedding is matched (cosine
      similarity) against the embeddings of the reference spots; the prediction aggregates the
      expression of the ``k`` best matches with the weighting ``method`` (an ensemble retrieves with
      each member and averages). The reference needs no image: count-only sections can extend it.
      Retrieval is chunked: memory per block of query spots is bounded, so a million query spots fit in RAM.
    - **regression** models (ridge, NH2ST, zero-shot): the model maps the image to expression directly;
      ``reference``, ``k``, ``method`` and ``center_reference`` do not apply (an error says so).

    The output is the same for every model and every query (see the table in the docs): a **new**
    AnnData over the query's spots whose ``var`` are the predicted genes only,

    ====================================  ========================================================================
    ``layers[key_added]``                 predictions, float32, log1p(normalize_total 1e4) scale, no NaN
    ``layers['measured']``                the query's own measurement of those genes on the same scale (library
                                          size over all the query's genes), when the query measured any of them;
                                          columns of unmeasured genes are NaN and ``var['measured']`` is False
    ``var['measured']``                   the query measured the gene
    ``var['seen_in_training']``           the gene is one of the model's training genes
    ``X``                                 ``None``; the predictions with ``to_X=True`` (then
                                          ``uns['histoexp']['X'] == 'prediction:<key_added>'``)
    ``obs``, ``obsm``, ``obsp``           the query's, copied; ``obs[f'{key_added}_confidence']`` for retrieval
                                          models (mean cosine similarity of the neighbours used, in [-1, 1])
    ``uns``                               the query's (images, scalefactors), copied; ``uns[key_added]['params']``
                                          the prediction's parameters and the model's description
    ``obs['<key_added>_spread']``         ensembles: mean over genes of the members' standard deviation (in
                                          log-expression units; lower = the members agree)
    ``obs['<key_added>_shared_axis']``    when the query measured every model gene: its measurement, centred
                                          on the training mean, projected on the training expression's first axis
                                          (the shared spatial pattern; :func:`histoexp.tl.evaluate` reads it for the
                                          gene-specific PCC; computed from the truth, it never enters a prediction)
    ``var['expected_pcc']`` ...           cross-fitted models: the expected accuracy of each model gene on a new
                                          section (``expected_pcc``, ``expected_pcc_sd``, ``expected_pcc_specific``,
                                          ``expected_pcc_specific_sd``, ``expected_specific``; NaN / False for
                                          genes outside the model's genes), from held-out training sections;
                                          zero-shot models also cover unseen genes and add
                                          ``expected_pcc_control`` (the shuffled-embedding control's)
    ``layers['<key_added>_lower']``       cross-fitted models with ``interval`` set: the lower bound of each spot's
                                          split-conformal prediction interval (NaN outside the model's genes);
                                          ``layers['<key_added>_upper']`` the upper bound
    ====================================  ========================================================================

    Post-processing of models that have them (recorded in ``uns[key_added]['params']``): the model genes'
    predictions are projected onto the model's ``rank`` expression axes (the leading principal axes of its
    training expression; genes outside the model's genes are not projected), then smoothed over each spot's
    spatial neighbours with the model's ``smooth_predictions`` weight (``smooth=`` overrides it).

    The query is never modified. :func:`histoexp.tl.evaluate` scores ``layers[key_added]`` against
    ``layers['measured']`` and refuses when there is no measurement.

    Parameters
    ----------
    query
        Spots to predict. Frozen-feature model: ``obsm[model.use_rep]`` computed with the same encoder
        and weights as the training data (checked against ``uns['histoexp']['embeddings']``);
        fine-tuned model: patches (``hx.pp.extract_patches``) with the training geometry.
    model
        A histoexp model (``hx.tl.fit_*``) or a model folder.
    reference
        Retrieval models: AnnData or list of AnnData with counts (``X`` or ``layers[layer]``) holding
        every model gene. ``None``: the training spots kept in the model (only model genes can then be
        predicted). For an honest evaluation the query section must not be in the reference. A
        :class:`PreparedReference` from :func:`prepare_reference` (same model; then ``genes``, ``layer`` and
        ``center_reference`` stay ``None``) reuses a bank and its embeddings across calls.
    genes
        Output genes. ``None``: the model genes; ``'all'`` (retrieval): every reference gene; a list:
        those genes (retrieval: in the reference; regression: ones the model can predict).
    k
        Retrieval neighbours (``None``: the method's default, BLEEP 50).
    method
        Retrieval weighting of the ``k`` neighbours (``None``: the method's default, BLEEP ``'average'``):
        ``'average'`` (their mean), ``'simple'`` (the nearest spot only), ``'weighted'`` (BLEEP's
        ``weighted_average``, ``exp(-(d² - min d²))`` with ``d`` the Euclidean distance of the raw embeddings),
        ``'inverse_distance'`` (mclSTExp: ``1/d²``, ``d`` the L1 distance of the normalised embeddings),
        ``'inverse_distance_l2'`` (the same with the Euclidean distance), or one added with
        :func:`histoexp.tl.register_weighting`; :func:`histoexp.tl.retrieval_weightings` lists them.
    key_added
        Layer / ``uns`` key of the predictions (``None``: the model's method name, e.g. ``'bleep'``).
    layer
        Layer with counts of the references and of the query's measurement (``None``: ``X``).
    center_reference
        Retrieval only: linear batch correction of ``reference`` (not in the BLEEP paper, which
        Harmony-corrects its training data): each reference section's log-expression is centred per gene
        and shifted to the model's training mean, both as spot-branch input and as predicted values
        (output genes outside the model's genes are shifted to the pooled reference mean). A string names
        the ``obs`` column of the sections (an AnnData without it counts as one section); ``True``: each
        reference AnnData is one section (or its ``library_id`` sections). Use it when the reference holds
        other patients or sequencing depths (e.g. count-only sections).
    patches_key
        Patches key of the query (fine-tuned model; ``None``: the model's).
    batch_size
        Spots per forward pass of the image branch.
    chunk_size
        Query spots per retrieval block (``None``: automatic, ~256 MiB of similarities).
    index
        Retrieval neighbour search: ``'exact'`` (default; chunked, memory bounded per block of queries), or an
        approximate faiss index for references of millions of spots (optional dependency,
        ``pip install histoexp[ann]``): ``'faiss-ivf'`` (inverted lists) or ``'faiss-hnsw'`` (graph). Both rank
        by the same cosine similarity as the exact search; see
        :func:`histoexp.tl.nearest_neighbours` for their parameters and ``docs/distributed.md``
        for recall and speed measured against the exact search.
    index_params
        Parameters of the faiss index, e.g. ``{'nprobe': 64}`` (``None``: the defaults); recorded in
        ``uns[key_added]['params']`` with the index.
    smooth
        Weight in ``[0, 1)`` of the mean of each spot's neighbours (same section, within 1.5 spot spacings) in a
        post-processing of the predictions: ``(1 - smooth) * prediction + smooth * neighbours' mean``. ``None``:
        the model's ``smooth_predictions`` (chosen by cross-fitting when fitted with ``'auto'``; 0 otherwise).
    interval
        Level of the prediction intervals of a cross-fitted model (``None``: no interval layers). Split-conformal
        with sections as calibration units: half-width = the ``interval`` quantile of the gene's absolute
        out-of-fold residuals on held-out training sections (the same for every spot of a gene), lower bound at
        least 0 for log-normalised targets. Memory: two more layers of the prediction's size; for whole slides pass
        ``None`` and call :func:`histoexp.tl.prediction_intervals` for the genes you need.
    to_X
        Also put the predictions in ``X`` (for scanpy functions that read ``X`` only).
    device
        Torch device (``None``: ``hx.settings.device``).

    Returns
    -------
    AnnData
        The prediction object described above.
    """
    from ._retrieval import WEIGHTINGS, retrieve

    if not isinstance(query, AnnData):
        raise TypeError(f"`query` must be an AnnData, got {type(query).__name__}.")
    model = _as_model(model)
    if genes is not None and not isinstance(genes, str) and len(list(genes)) == 0:
        raise ValueError("`genes` is an empty list: name at least one gene, or pass None for the model genes.")
    key = key_added or model.method
    if key == MEASURED:
        raise ValueError(f"`key_added={key!r}` is reserved for the query's measurement.")
    smooth = _check_smooth_arg(smooth, model)
    if interval is not None and (
        isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval < 1
    ):
        raise ValueError(f"`interval` must be None or a level in (0, 1), e.g. 0.9; got {interval!r}.")
    images = _query_images(query, model, patches_key)
    dev = settings.resolve_device(device)
    model.to(dev)
    params: dict = {"model": {k: model.config.get(k) for k in ("method", "kind", "mode", "use_rep", "n_ensemble")}}
    params["model"]["n_genes"] = len(model.genes)
    conf = None
    if model.kind == "retrieval":
        k = model.retrieval_defaults["k"] if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:  # before the images are encoded
            raise ValueError(f"`k` must be an integer >= 1 (neighbours), got {k!r}.")
        method = model.retrieval_defaults["method"] if method is None else method
        if method not in WEIGHTINGS:
            raise ValueError(f"`method` must be one of {tuple(WEIGHTINGS)}, got {method!r}.")
        prepared = reference if isinstance(reference, PreparedReference) else None
        if prepared is not None:
            if prepared.model is not model:
                raise ValueError("`reference`: this PreparedReference was prepared for another model.")
            if genes is not None or center_reference is not None or layer is not None:
                raise ValueError(
                    "`genes`, `layer` and `center_reference` are fixed by the PreparedReference passed as `reference`."
                )
            spots, values, out_genes = prepared.spots, prepared.values, list(prepared.genes)
        else:
            if center_reference and reference is None:
                raise ValueError(
                    "`center_reference` applies to an explicit `reference=`, not to the model's stored one."
                )
            spots, values, out_genes = _reference_bank(model, reference, genes, layer, center=center_reference)
        # a reduced-rank model projects all its genes: retrieve the model genes the output lacks too
        extra = [g for g in model.genes if g not in set(out_genes)] if model.rank is not None else []
        if extra:
            pos = {g: i for i, g in enumerate(model.genes)}
            values = np.concatenate([values, spots.expression[:, [pos[g] for g in extra]]], axis=1)
        all_genes = [*out_genes, *extra]
        acc, conf = _MemberMean(), None
        for member in progress(range(model.n_ensemble), desc="members"):  # one bar: the step's
            q_emb = model.encode_images(images, batch_size=batch_size, member=member)
            if prepared is not None:
                bank_emb = prepared.embeddings(member)
            else:
                bank_emb = model.encode_reference(spots, member=member)
            p, c = retrieve(
                q_emb,
                bank_emb,
                values,
                k=k,
                method=method,
                chunk_size=chunk_size,
                device=dev,
                index=index,
                index_params=index_params,
            )
            acc.add(model.project_outputs(p, all_genes))
            conf = c if conf is None else conf + c
        pred, spread = acc.result()
        pred = pred[:, : len(out_genes)]
        if model.n_ensemble > 1:
            conf /= model.n_ensemble
        params.update(
            method=method,
            k=1 if method == "simple" else min(k, len(spots)),
            n_reference=len(spots),
            center_reference=prepared.center if prepared is not None else center_reference,
            reference=_reference_label(reference),
            index=index,
        )
        if index != "exact":
            from ._retrieval import _index_params

            params["index_params"] = _index_params(index, index_params, len(spots))
    else:
        given = {"reference": reference, "k": k, "method": method, "center_reference": center_reference}
        given["index"] = None if index == "exact" else index
        given["index_params"] = index_params
        wrong = [name for name, v in given.items() if v is not None]
        if wrong:
            raise ValueError(
                f"{wrong} apply to retrieval models; {model.method!r} is a regression model that predicts from "
                "the image alone."
            )
        out_genes = model.genes if genes is None else list(dict.fromkeys(_as_list(genes)))
        need = list(dict.fromkeys([*out_genes, *model.genes])) if model.rank is not None else out_genes
        acc = _MemberMean()
        members = [None] if model.n_ensemble == 1 else range(model.n_ensemble)
        for member in members:
            p = model.predict(images, genes=need, batch_size=batch_size, device=dev, member=member)
            acc.add(model.project_outputs(p, need))
        pred, spread = acc.result()
        pred = pred[:, : len(out_genes)]
    pred = _smooth_query(query, pred, smooth)
    params.update(n_genes=len(out_genes), n_spots=query.n_obs, to_X=bool(to_X))
    params.update(rank=model.rank, smooth=smooth)
    out = _prediction_anndata(query, pred, out_genes, key, conf, params, model, layer, to_X)
    _add_trust(out, query, model, key, out_genes, spread, interval, layer)
    return out


def _check_smooth_arg(smooth, model) -> float:
    from ._crossfit import check_smooth

    if smooth is None:
        return float(model.config.get("smooth_predictions") or 0.0)
    return float(check_smooth(smooth, "smooth"))


class _MemberMean:
    """Running mean of ensemble members' predictions and the mean over genes of their standard deviation."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, p: np.ndarray) -> None:
        p = np.asarray(p, dtype=np.float64)
        self.n += 1
        if self.mean is None:
            self.mean, self.m2 = p.copy(), np.zeros_like(p)
            return
        delta = p - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (p - self.mean)

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        spread = None
        if self.n > 1:
            spread = np.sqrt(np.maximum(self.m2 / self.n, 0)).mean(1).astype(np.float32)
        return self.mean.astype(np.float32), spread


def _smooth_query(query: AnnData, pred: np.ndarray, weight: float) -> np.ndarray:
    """Post-processing: blend each spot's prediction with its spatial neighbours' mean (same section)."""
    if not weight:
        return pred
    if "spatial" not in query.obsm:
        raise KeyError(
            f"Smoothing the predictions (smooth={weight}) needs spot positions in query.obsm['spatial']; "
            "pass `smooth=0` to predict without it."
        )
    from .._stats import neighbour_matrix
    from ._crossfit import smooth

    lib = resolve_library_key(query, None)
    groups = query.obs[lib].astype(str).to_numpy() if lib is not None else None
    nb = neighbour_matrix(np.asarray(query.obsm["spatial"], dtype=np.float64)[:, :2], groups)
    return smooth(pred, nb, weight).astype(np.float32)


def _add_trust(out: AnnData, query: AnnData, model, key: str, genes: list[str], spread, interval, layer) -> None:
    """Write the shared axis, the spread, the expected accuracy and the intervals of a prediction."""
    if spread is not None:
        out.obs[f"{key}_spread"] = spread
    axes = model.expression_axes
    if axes is not None and MEASURED in out.layers:
        measured, mask = _measurement(query, model.genes, layer, model)
        if measured is not None and mask.all():
            from .._stats import shared_axis_scores

            out.obs[f"{key}_shared_axis"] = shared_axis_scores(measured, axes[0], axes[1][:, 0]).astype(np.float32)
    pos = {g: i for i, g in enumerate(model.genes)}
    rows = np.array([pos.get(g, -1) for g in genes])
    inside = rows >= 0
    table = model.expected_for(genes)
    if table is not None:
        for col in table.columns:
            values = table[col].to_numpy()
            out.var[col] = values.astype(bool) if values.dtype == bool else values.astype(np.float32)
        out.uns[key]["params"]["expected"] = jsonable(
            {
                "source": f"cross-fitting over {len((model.config.get('crossfit') or {}).get('folds', []))} "
                f"held-out training {(model.config.get('crossfit') or {}).get('unit', 'section')}s",
                "specific_rule": "expected_pcc_specific >= "
                f"{(model.config.get('crossfit') or {}).get('specific_min')} and > 0 in every fold",
                **(
                    {"genes_outside_training": (model.config.get("crossfit") or {})["unseen"]}
                    if "unseen" in (model.config.get("crossfit") or {})
                    else {}
                ),
            }
        )
    quant = model.arrays.get("residual_quantiles")
    levels = (model.config.get("crossfit") or {}).get("levels")
    if quant is not None and levels:
        table = np.full((len(genes), quant.shape[1]), np.nan, dtype=np.float32)
        table[inside] = np.asarray(quant)[rows[inside]]
        out.varm[f"{key}_residual_quantiles"] = table
        out.uns[key]["params"]["intervals"] = {
            "levels": [float(v) for v in levels],
            "method": "split-conformal: quantiles of the gene's absolute out-of-fold residuals on held-out training "
            f"{(model.config.get('crossfit') or {}).get('unit', 'section')}s (varm['{key}_residual_quantiles'])",
            "lower_bound": 0.0 if model.config.get("normalize", "log1p") == "log1p" else None,
        }
        if interval is not None:
            prediction_intervals(out, level=float(interval), key=key)


def prediction_intervals(
    pred: AnnData, *, level: float = 0.9, key: str | None = None, genes: Sequence[str] | None = None
) -> None:
    """Write the ``level`` prediction intervals of a cross-fitted model's prediction into ``pred.layers``.

    :func:`impute` does this at its ``interval`` level; call it for another level, or after ``interval=None`` to
    materialise the intervals of a whole slide for a few ``genes`` only (the other genes' columns are NaN).

    Parameters
    ----------
    pred
        The output of :func:`impute` for a cross-fitted model (``varm[f'{key}_residual_quantiles']``).
    level
        Nominal coverage in (0, 1), within the stored levels (0.5 to 0.99).
    key
        The prediction key (``None``: the only one with residual quantiles).
    genes
        Genes to compute (``None``: all with residual quantiles).

    Writes ``layers[f'{key}_lower']`` and ``layers[f'{key}_upper']``: ``prediction ∓ q``, ``q`` the ``level``
    quantile of the gene's absolute out-of-fold residuals (linear between stored levels), the lower bound clipped
    at 0 for log-normalised targets; and ``uns[key]['params']['interval']['level']``.
    """
    keys = [k[: -len("_residual_quantiles")] for k in pred.varm if k.endswith("_residual_quantiles")]
    if key is None:
        if len(keys) != 1:
            raise KeyError(f"Pass `key=`: predictions with residual quantiles in varm: {keys}.")
        key = keys[0]
    if key not in keys or key not in pred.layers:
        raise KeyError(
            f"No prediction {key!r} with residual quantiles (varm[{key + '_residual_quantiles'!r}]); predictions "
            f"with them: {keys}. Intervals need a cross-fitted model (fit with crossfit=True)."
        )
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"`level` must be in (0, 1), e.g. 0.9; got {level!r}.")
    info = pred.uns[key]["params"]["intervals"]
    levels = np.asarray(info["levels"], dtype=np.float64)
    if not levels[0] <= level <= levels[-1]:
        raise ValueError(f"`level={level}` is outside the stored levels [{levels[0]}, {levels[-1]}].")
    q = np.asarray(pred.varm[f"{key}_residual_quantiles"], dtype=np.float64)
    j = int(np.clip(np.searchsorted(levels, level), 1, len(levels) - 1))
    w = (level - levels[j - 1]) / (levels[j] - levels[j - 1])
    hw = ((1 - w) * q[:, j - 1] + w * q[:, j]).astype(np.float32)
    if genes is not None:
        genes = _as_list(genes)
        unknown = [g for g in genes if g not in pred.var_names]
        if unknown:
            raise KeyError(f"{len(unknown)} `genes` are not predicted (e.g. {unknown[:5]}).")
        keep = pred.var_names.isin(genes)
        hw = np.where(keep, hw, np.nan).astype(np.float32)
    p = np.asarray(pred.layers[key], dtype=np.float32)
    lower = p - hw
    if info.get("lower_bound") is not None:
        lower = np.where(np.isfinite(lower), np.maximum(lower, info["lower_bound"]), lower)
    pred.layers[f"{key}_lower"] = lower.astype(np.float32)
    pred.layers[f"{key}_upper"] = (p + hw).astype(np.float32)
    pred.uns[key]["params"]["interval"] = {"level": float(level), "genes": None if genes is None else len(genes)}


def _reference_label(reference) -> str:
    if isinstance(reference, PreparedReference):
        if reference.n_references is None:
            return "model"
        return f"{reference.n_references} AnnData (prepared, sha256 {reference.fingerprint()})"
    return "model" if reference is None else f"{len(_as_refs(reference))} AnnData"


def _prediction_anndata(query, pred, genes, key, conf, params, model, layer, to_X) -> AnnData:
    measured, mask = _measurement(query, genes, layer, model)
    trained = set(model.genes)
    var = pd.DataFrame(
        {"measured": mask, "seen_in_training": [g in trained for g in genes]}, index=pd.Index(genes, dtype=str)
    )
    uns = _copy.deepcopy(dict(query.uns))
    for stale in (key, MEASURED):  # results of an earlier prediction on the query do not describe this one
        uns.pop(stale, None)
    out = AnnData(
        X=pred.copy() if to_X else None,
        obs=query.obs.copy(),
        var=var,
        obsm={k: v.copy() for k, v in query.obsm.items()},
        obsp={k: v.copy() for k, v in query.obsp.items()},
        uns=uns,
    )
    out.layers[key] = pred
    if measured is not None:
        out.layers[MEASURED] = measured
    if conf is not None:
        out.obs[f"{key}_confidence"] = conf
    hist = dict(out.uns.get("histoexp", {}))
    hist.pop("X", None)
    if to_X:
        hist["X"] = f"prediction:{key}"
    out.uns["histoexp"] = hist
    out.uns[key] = {"params": jsonable(params)}
    if measured is None:
        logger.info("impute: the query has no measurement of the predicted genes; no layers['measured'].")
    elif not mask.all():
        logger.warning(
            "impute: the query does not measure %d of the %d predicted genes (var['measured'] is False).",
            int((~mask).sum()),
            len(genes),
        )
    return out
