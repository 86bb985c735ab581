"""Gene embeddings: one vector per gene symbol, the second modality of zero-shot expression prediction.

Three sources, one output (a genes × dims :class:`pandas.DataFrame` with its provenance in ``df.attrs['histoexp']``):

- ``'coexpression'``: co-expression structure of any count matrix (other sections, a single-cell atlas);
- ``'table'``: a table the user brings (GenePT, scGPT, text-model embeddings; CSV / parquet / DataFrame / varm);
- ``'text'``: gene descriptions through a text model (a Hugging Face sentence-transformers model, a callable, or the
  local training-free ``'tfidf'`` featuriser).

No torch here: a hub text model is imported only when asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import DEFAULT_TARGET_SUM
from .._settings import logger
from .._utils import claim_key, jsonable, mark_written, resolve_library_key

__all__ = ["TextModelUnavailableError", "gene_embeddings", "match_genes"]

Method = Literal["coexpression", "table", "text"]

#: ``uns['histoexp'][...]`` entry holding the provenance of gene embeddings stored in ``varm``.
UNS_KEY = "gene_embeddings"


class TextModelUnavailableError(RuntimeError):
    """A text model for gene descriptions could not be obtained (offline, unknown id, missing package)."""


# --------------------------------------------------------------------------------------------------- matching
def _norm(name: str) -> str:
    return str(name).strip().upper()


def match_genes(
    requested: Sequence[str],
    available: Sequence[str],
    *,
    aliases: Mapping[str, str | Sequence[str]] | None = None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Match gene symbols to the names of a table: exactly, then ignoring case, then through ``aliases``.

    Parameters
    ----------
    requested
        Gene symbols wanted (e.g. the genes of a panel).
    available
        Names in the table (e.g. its index).
    aliases
        Synonyms: ``{'ERBB2': ['HER2', 'NEU']}``; a key and its values form one group and any name of a group
        matches any other (case-insensitive), in either direction.

    Returns
    -------
    ``(mapping, report)``: ``mapping[requested_gene] = table_name`` for the matched genes; ``report`` counts
    ``'exact'``, ``'case'``, ``'alias'`` and ``'unmatched'`` matches and lists the unmatched genes.
    """
    available = [str(a) for a in available]
    exact = set(available)
    by_upper: dict[str, list[str]] = {}
    for a in available:
        by_upper.setdefault(_norm(a), []).append(a)
    groups: dict[str, set[str]] = {}
    for key, values in (aliases or {}).items():
        names = {_norm(key)} | {_norm(v) for v in ([values] if isinstance(values, str) else values)}
        merged = set(names)
        for n in names:
            merged |= groups.get(n, set())
        for n in merged:
            groups[n] = merged
    mapping: dict[str, str] = {}
    counts = {"exact": 0, "case": 0, "alias": 0}
    unmatched: list[str] = []
    ambiguous: list[str] = []
    for g in dict.fromkeys(str(r) for r in requested):
        if g in exact:
            mapping[g], kind = g, "exact"
        elif len(by_upper.get(_norm(g), [])) == 1:
            mapping[g], kind = by_upper[_norm(g)][0], "case"
        elif len(by_upper.get(_norm(g), [])) > 1:
            ambiguous.append(g)
            unmatched.append(g)
            continue
        else:
            hits = sorted({a for n in groups.get(_norm(g), ()) for a in by_upper.get(n, [])})
            if len(hits) != 1:
                if len(hits) > 1:
                    ambiguous.append(g)
                unmatched.append(g)
                continue
            mapping[g], kind = hits[0], "alias"
        counts[kind] += 1
    report = {**counts, "unmatched": len(unmatched), "unmatched_genes": unmatched, "ambiguous_genes": ambiguous}
    return mapping, report


# --------------------------------------------------------------------------------------------------- co-expression
def _log_normalised(adata: AnnData, layer: str | None, target_sum: float) -> sp.csr_matrix:
    from ._targets import _check_values, _matrix

    X = _matrix(adata, layer)
    _check_values(X, layer, counts=True)
    X = sp.csr_matrix(X, dtype=np.float64)
    size = np.asarray(X.sum(axis=1)).ravel()
    size[size == 0] = 1.0
    X = sp.csr_matrix(sp.diags(target_sum / size) @ X)
    X.data = np.log1p(X.data)
    return X


def _coexpression(
    adatas: list[AnnData],
    *,
    n_components: int,
    layer: str | None,
    library_key: str | None,
    min_spots: int,
    random_state: int,
) -> tuple[pd.DataFrame, dict]:
    """Embed genes by truncated SVD of the section-centred, standardised log-expression."""
    from scipy.sparse.linalg import LinearOperator, svds

    for i, a in enumerate(adatas):
        if not isinstance(a, AnnData):
            raise TypeError(f"`source`: item {i} is a {type(a).__name__}, expected AnnData with counts.")
        if not a.var_names.is_unique:
            raise ValueError(f"`source`: AnnData {i} has duplicated var_names; call `var_names_make_unique()` first.")
    common = list(adatas[0].var_names)
    for a in adatas[1:]:
        keep = set(a.var_names)
        common = [g for g in common if g in keep]
    if not common:
        raise ValueError("`source`: the AnnData objects share no gene names.")
    blocks, labels = [], []
    for i, a in enumerate(adatas):
        X = _log_normalised(a, layer, DEFAULT_TARGET_SUM)[:, a.var_names.get_indexer(common)]
        key = resolve_library_key(a, library_key)
        lab = a.obs[key].astype(str).to_numpy() if key is not None else np.full(a.n_obs, "")
        blocks.append(X)
        labels.append(np.char.add(f"{i}:", lab.astype(str)))
    X = sp.vstack(blocks).tocsc()
    sections, sec = np.unique(np.concatenate(labels), return_inverse=True)
    n = X.shape[0]
    detected = np.diff(X.indptr)  # spots with a count, per gene (CSC)
    keep = detected >= min_spots
    # per-section centring removes depth and batch offsets between sections, keeping within-section co-variation
    onehot = sp.csr_matrix((np.ones(n), (sec, np.arange(n))), shape=(len(sections), n))
    n_sec = np.asarray(onehot.sum(1)).ravel()
    mu = (onehot @ X).toarray() / n_sec[:, None]  # (sections, genes)
    sq = np.asarray(X.multiply(X).sum(0)).ravel()
    var = (sq - (n_sec[:, None] * mu**2).sum(0)) / n
    keep &= var > 1e-12
    if keep.sum() <= n_components:
        raise ValueError(
            f"`n_components={n_components}` needs more than that many genes detected in >= {min_spots} spots; "
            f"found {int(keep.sum())}. Lower `n_components` or `min_spots`."
        )
    if n <= n_components:
        raise ValueError(f"`n_components={n_components}` must be below the number of spots/cells ({n}).")
    genes = [g for g, k in zip(common, keep, strict=True) if k]
    sd = np.sqrt(var[keep])
    Xs = (X[:, keep] @ sp.diags(1.0 / sd)).tocsr()
    mus = mu[:, keep] / sd

    def matmat(v):
        v = np.asarray(v).reshape(Xs.shape[1], -1)
        return Xs @ v - (mus @ v)[sec]

    def rmatmat(u):
        u = np.asarray(u).reshape(n, -1)
        return Xs.T @ u - mus.T @ (onehot @ u)

    op = LinearOperator(
        Xs.shape,
        matvec=matmat,
        rmatvec=rmatmat,
        matmat=matmat,
        rmatmat=rmatmat,
        dtype=np.float64,
    )
    _, s, vt = svds(op, k=n_components, random_state=random_state)
    order = np.argsort(-s)
    s, vt = s[order], vt[order]
    vt *= np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]  # deterministic signs
    emb = (vt.T * s) / np.sqrt(n)  # rows: genes; emb_g . emb_h ~ correlation of g and h within sections
    explained = float((s**2).sum() / n / len(genes))
    df = pd.DataFrame(emb.astype(np.float32), index=pd.Index(genes, name="gene"))
    params = {
        "n_spots": int(n),
        "n_sections": len(sections),
        "n_genes_embedded": len(genes),
        "n_genes_dropped": int((~keep).sum()),
        "min_spots": int(min_spots),
        "variance_explained": round(explained, 4),
        "recipe": "log1p(normalize_total 1e4); per-section centring; per-gene scaling to unit variance; truncated "
        "SVD (ARPACK) of the spots x genes matrix; gene embedding = right singular vectors x singular values / "
        "sqrt(n_spots), so dot products approximate within-section gene-gene correlations",
    }
    return df, params


# --------------------------------------------------------------------------------------------------- table
def _read_table(source: Any, *, varm_key: str | None, gene_column: str | None) -> pd.DataFrame:
    if isinstance(source, AnnData):
        if varm_key is None:
            raise ValueError("`varm_key`: name the adata.varm entry holding the gene embeddings (method='table').")
        if varm_key not in source.varm:
            raise KeyError(f"`varm_key={varm_key!r}` is not in adata.varm (found {list(source.varm)}).")
        values = source.varm[varm_key]
        values = values.to_numpy() if isinstance(values, pd.DataFrame) else np.asarray(values)
        return pd.DataFrame(values, index=source.var_names.copy())
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"`source`: no such file {str(path)!r}.")
        suffix = "".join(path.suffixes[-2:]).lower()
        if suffix.endswith(".parquet"):
            table = pd.read_parquet(path)
        elif suffix.endswith(".h5ad"):
            import anndata as ad

            return _read_table(ad.read_h5ad(path), varm_key=varm_key, gene_column=gene_column)
        elif any(suffix.endswith(s) for s in (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")):
            sep = "\t" if ".tsv" in suffix or ".txt" in suffix else ","
            table = pd.read_csv(path, sep=sep, index_col=None if gene_column else 0)
            _check_header(table, path)
        else:
            raise ValueError(f"`source`: cannot read {path.name!r}; expected .csv, .tsv, .parquet or .h5ad.")
    elif isinstance(source, pd.DataFrame):
        table = source
    else:
        raise TypeError(
            f"`source` for method='table' must be a DataFrame, a CSV/TSV/parquet/h5ad path or an AnnData with "
            f"`varm_key`, got {type(source).__name__}."
        )
    if gene_column is not None:
        if gene_column not in table.columns:
            raise KeyError(f"`gene_column={gene_column!r}` is not a column of the table (found {list(table.columns)}).")
        table = table.set_index(gene_column)
    return table


def _is_number(value: Any) -> bool:
    try:
        float(str(value).strip())
    except ValueError:
        return False
    return True


def _check_header(table: pd.DataFrame, path: Path) -> None:
    """Refuse a text table whose first line is data: its values became column names (and its gene was lost)."""
    cols = [str(c) for c in table.columns]
    if cols and all(_is_number(c) for c in cols) and not all(float(c).is_integer() for c in cols):
        raise ValueError(
            f"`source`: the first line of {str(path)!r} looks like data, not a header (column names {cols[:4]}): read "
            "as a header, its gene's row would be lost. Add a header line (e.g. 'gene,dim0,dim1,...') or pass a "
            "DataFrame: pd.read_csv(path, header=None, index_col=0)."
        )


def _clean_table(table: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    nonnum = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if nonnum:
        raise ValueError(
            f"`source`: the table has non-numeric columns {nonnum[:5]}; expected genes as the index (or "
            "`gene_column=`) and numeric embedding dimensions as columns."
        )
    if table.shape[1] == 0:
        raise ValueError("`source`: the table has no embedding columns.")
    values = table.to_numpy(dtype=np.float64)
    names = pd.Series(table.index, dtype=object)
    blank = names.isna() | (names.astype(str).str.strip() == "")
    if blank.any():
        raise ValueError(
            f"`source`: {int(blank.sum())} rows of the table have no gene name (NaN or empty; rows "
            f"{np.flatnonzero(blank.to_numpy())[:5].tolist()}); every row must name its gene. Drop or name them."
        )
    if len(names) and all(_is_number(g) for g in names):
        raise ValueError(
            f"`source`: the gene names of the table are numbers (e.g. {names.astype(str).tolist()[:5]}): the genes "
            "are in another column (pass `gene_column=`), the table has no header line, or its index was not set to "
            "the gene symbols."
        )
    index = pd.Index([str(g).strip() for g in table.index], name="gene")
    if not index.is_unique:
        dup = index[index.duplicated()].unique().tolist()
        raise ValueError(f"`source`: duplicated gene names in the table (e.g. {dup[:5]}); expected one row per gene.")
    finite = np.isfinite(values).all(1)
    dropped = index[~finite].tolist()
    if dropped:  # a missing embedding is never turned into zeros
        logger.warning(
            "gene_embeddings: %d genes have NaN/inf values and are left out (e.g. %s).", len(dropped), dropped[:5]
        )
    df = pd.DataFrame(values[finite].astype(np.float32), index=index[finite])
    df.columns = [f"dim{i}" for i in range(df.shape[1])]
    return df, {"n_rows_nonfinite": len(dropped)}


# --------------------------------------------------------------------------------------------------- text
def _offline_text_message(name: str, err: BaseException | None) -> str:
    cause = f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})" if err is not None else ""
    return (
        f"Could not obtain the text model {name!r}{cause}.\n"
        "Ways to proceed:\n"
        "  - `text_model='/local/folder'`: a sentence-transformers model folder you downloaded elsewhere "
        "(e.g. `huggingface-cli download <id> --local-dir <folder>`);\n"
        "  - network access to the Hugging Face hub (and a token for gated models) for `text_model='<org>/<id>'`;\n"
        "  - `text_model=callable`: any function mapping a list of descriptions to an (n, d) array;\n"
        "  - `text_model='tfidf'`: the local, training-free TF-IDF + SVD featuriser (no language model);\n"
        "  - precomputed embeddings as a table: `hx.pp.gene_embeddings(table, method='table')`.\n"
        "histoexp never falls back to another model silently."
    )


def load_text_model(name: str, *, device: str | None = None):
    """Load a sentence-transformers model from a local folder or the Hugging Face hub.

    Parameters
    ----------
    name
        A local model folder, or a hub id such as ``'sentence-transformers/all-MiniLM-L6-v2'``.
    device
        Torch device for the model (``None``: its default).

    Raises
    ------
    TextModelUnavailableError
        The model cannot be downloaded (offline, unknown id, gated) and is not in the local cache; the message
        says what to pass instead.
    ImportError
        ``huggingface_hub`` / ``sentence-transformers`` are missing (``pip install histoexp[text]``).
    """
    path = Path(str(name)).expanduser()
    if path.is_dir():
        local = str(path)
    else:
        try:
            from huggingface_hub import snapshot_download
        except ImportError as err:
            raise ImportError(
                f"`text_model={name!r}` needs huggingface_hub and sentence-transformers: `pip install histoexp[text]`."
            ) from err
        try:
            local = snapshot_download(repo_id=str(name))
        except Exception as err:  # offline, unknown or gated repository, invalid id
            raise TextModelUnavailableError(_offline_text_message(str(name), err)) from err
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"`text_model={name!r}` needs sentence-transformers: `pip install histoexp[text]`.") from err
    return SentenceTransformer(local, device=device)


def _tfidf(texts: list[str], n_components: int, random_state: int) -> tuple[np.ndarray, dict]:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(sublinear_tf=True, stop_words="english", token_pattern=r"(?u)\b[\w-]{2,}\b")
    m = tfidf.fit_transform(texts)
    k = min(n_components, m.shape[0] - 1, m.shape[1] - 1)
    if k < 1:
        raise ValueError("`text_model='tfidf'` needs at least two distinct descriptions with words.")
    z = TruncatedSVD(n_components=k, random_state=random_state).fit_transform(m)
    return z, {"vocabulary": len(tfidf.vocabulary_), "n_components": int(k)}


def _text(
    descriptions: Mapping[str, str] | pd.Series,
    *,
    text_model: str | Callable,
    n_components: int,
    batch_size: int,
    device: str | None,
    random_state: int,
) -> tuple[pd.DataFrame, dict]:
    series = pd.Series(descriptions) if not isinstance(descriptions, pd.Series) else descriptions
    if series.empty:
        raise ValueError("`source`: no gene descriptions given (method='text').")
    bad = [g for g, t in series.items() if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"`source`: {len(bad)} genes have no description text (e.g. {bad[:5]}).")
    index = pd.Index([str(g).strip() for g in series.index], name="gene")
    if not index.is_unique:
        raise ValueError("`source`: duplicated gene names among the descriptions.")
    texts = series.astype(str).tolist()
    if callable(text_model):
        z = np.asarray(text_model(texts), dtype=np.float64)
        params = {"text_model": getattr(text_model, "__name__", type(text_model).__name__)}
    elif text_model == "tfidf":
        z, extra = _tfidf(texts, n_components, random_state)
        params = {"text_model": "tfidf", **extra}
    elif isinstance(text_model, str):
        model = load_text_model(text_model, device=device)
        z = np.asarray(model.encode(texts, batch_size=batch_size, convert_to_numpy=True), dtype=np.float64)
        params = {"text_model": text_model}
    else:
        raise TypeError(f"`text_model` must be 'tfidf', a model id/folder or a callable, got {type(text_model)}.")
    if z.ndim != 2 or len(z) != len(texts) or not np.isfinite(z).all():
        raise ValueError(f"`text_model` returned {z.shape} (or non-finite values); expected ({len(texts)}, d).")
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    df = pd.DataFrame(z.astype(np.float32), index=index)
    return df, params


# --------------------------------------------------------------------------------------------------- entry point
def _infer_method(source: Any, varm_key: str | None) -> str:
    if isinstance(source, AnnData):
        return "table" if varm_key is not None else "coexpression"
    if isinstance(source, (list, tuple)) and source and all(isinstance(a, AnnData) for a in source):
        return "coexpression"
    if isinstance(source, pd.Series) or (isinstance(source, Mapping) and not isinstance(source, pd.DataFrame)):
        return "text"
    return "table"


def gene_embeddings(
    source: Any,
    *,
    method: Method | None = None,
    genes: Sequence[str] | None = None,
    n_components: int = 64,
    layer: str | None = None,
    library_key: str | None = None,
    min_spots: int = 10,
    aliases: Mapping[str, str | Sequence[str]] | None = None,
    varm_key: str | None = None,
    gene_column: str | None = None,
    text_model: str | Callable = "tfidf",
    batch_size: int = 64,
    device: str | None = None,
    adata: AnnData | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    random_state: int = 0,
) -> pd.DataFrame:
    """Embed genes: one vector per gene symbol, from co-expression, a user table, or gene descriptions.

    Zero-shot models (:func:`histoexp.tl.fit_zeroshot`) predict any gene with an embedding; genes that share
    an embedding neighbourhood with the training genes are the ones they can predict.

    Methods (``method=None`` infers it: AnnData / list of AnnData -> ``'coexpression'`` (or ``'table'`` with
    ``varm_key``), a mapping / Series of strings -> ``'text'``, anything else -> ``'table'``):

    - ``'coexpression'``: from counts of any expression data the user has: other sections (e.g. the
      count-only her2st sections), another platform, a single-cell atlas. Each spot/cell is normalised to
      10,000 counts and log1p-transformed; genes detected in fewer than ``min_spots`` spots are dropped;
      each section (``obs[library_key]``; each AnnData is at least its own section) is centred per gene, so
      depth and batch offsets between sections do not count as co-expression; each gene is scaled to unit
      variance; the spots × genes matrix is factorised by truncated SVD (ARPACK, sparse, never densified).
      The embedding of a gene is its right singular vector row × singular values / sqrt(n_spots): the dot
      product of two genes' embeddings approximates their within-section correlation (PCA loadings).
    - ``'table'``: a table the user brings (GenePT, scGPT, text-model embeddings): a DataFrame (genes as the
      index or in ``gene_column``), a ``.csv``/``.tsv``/``.parquet`` file (first column = gene), or an AnnData
      (or ``.h5ad``) with the embeddings in ``varm[varm_key]``. Rows with NaN are dropped (never zero-filled).
    - ``'text'``: ``source`` maps gene symbols to description texts, embedded by ``text_model``: a Hugging
      Face sentence-transformers id (downloaded through ``huggingface_hub``, optional extra ``pip install
      histoexp[text]``), a local model folder, a callable (list of texts -> ``(n, d)`` array), or
      ``'tfidf'`` (default): a local, training-free TF-IDF + truncated SVD featuriser of the given texts (no
      language model; for tests and offline use). Embeddings are L2-normalised. Offline, a hub id raises
      :class:`TextModelUnavailableError` naming what to pass instead.

    With ``genes``, the output is restricted to those genes, matched to the source's names exactly, then
    case-insensitively, then through ``aliases``; the output is indexed by the requested names and the
    provenance counts the genes that did not match (they are absent, never zero vectors).

    Parameters
    ----------
    source
        Counts (AnnData or list of AnnData), a table, or gene descriptions (see above).
    method
        ``'coexpression'``, ``'table'`` or ``'text'`` (``None``: inferred).
    genes
        Genes wanted (``None``: every gene the source embeds).
    n_components
        Dimensions of co-expression / ``'tfidf'`` embeddings.
    layer
        Co-expression: layer with counts instead of ``X``.
    library_key
        Co-expression: ``obs`` column of the sections (``None``: ``'library_id'`` when present).
    min_spots
        Co-expression: genes detected in fewer spots are not embedded.
    aliases
        Synonyms used when matching ``genes``: ``{'ERBB2': ['HER2']}`` (either direction, case-insensitive).
    varm_key
        Table from an AnnData: its ``varm`` key.
    gene_column
        Table: the column holding gene names (``None``: the index / first column).
    text_model
        Text: ``'tfidf'``, a hub id, a local folder, or a callable.
    batch_size, device
        Text: batch size and torch device of a hub model.
    adata
        Also store the embeddings in ``adata.varm[key_added]`` (rows of genes without an embedding are NaN)
        and the provenance in ``adata.uns['histoexp']['gene_embeddings'][key_added]``.
    key_added
        ``varm`` key when ``adata`` is given (``None``: ``f'X_gene_{method}'``).
    overwrite
        Replace an existing ``varm``/``uns`` entry that histoexp did not write (its own are replaced on a re-run).
    random_state
        Seed of the SVD solvers.

    Returns
    -------
    pandas.DataFrame
        Genes × dims (float32, index name ``'gene'``, columns ``dim0`` ...), provenance (JSON-able) in
        ``.attrs['histoexp']``: ``method``, ``params``, ``match`` (with ``genes``).
    """
    if method is None:
        method = _infer_method(source, varm_key)
    if method not in ("coexpression", "table", "text"):
        raise ValueError(f"`method` must be 'coexpression', 'table' or 'text', got {method!r}.")
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise ValueError(f"`n_components` must be a positive integer, got {n_components!r}.")
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        if not genes:
            raise ValueError("`genes`: got an empty list; pass gene names or None.")
        unique = list(dict.fromkeys(genes))
        if len(unique) < len(genes):  # one row per gene: a repeated name is asked once
            dup = sorted({g for g in genes if genes.count(g) > 1})
            logger.warning("gene_embeddings: `genes` names %s more than once; each gene is embedded once.", dup[:5])
            genes = unique
    if adata is not None:
        key_added = key_added or f"X_gene_{method}"
        claim_key(adata, "varm", key_added, overwrite=overwrite)
    if method == "coexpression":
        adatas = [source] if isinstance(source, AnnData) else list(source) if isinstance(source, (list, tuple)) else []
        if not adatas:
            raise TypeError(
                f"`source` for method='coexpression' must be an AnnData or a list of AnnData with counts, "
                f"got {type(source).__name__}."
            )
        if isinstance(min_spots, bool) or not isinstance(min_spots, (int, np.integer)) or min_spots < 1:
            raise ValueError(f"`min_spots` must be a positive integer, got {min_spots!r}.")
        df, params = _coexpression(
            adatas,
            n_components=int(n_components),
            layer=layer,
            library_key=library_key,
            min_spots=int(min_spots),
            random_state=random_state,
        )
    elif method == "table":
        df, params = _clean_table(_read_table(source, varm_key=varm_key, gene_column=gene_column))
        params["source"] = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    else:
        df, params = _text(
            source,
            text_model=text_model,
            n_components=int(n_components),
            batch_size=batch_size,
            device=device,
            random_state=random_state,
        )
    df.columns = [f"dim{i}" for i in range(df.shape[1])]
    df.index.name = "gene"
    prov: dict[str, Any] = {"method": method, "params": params, "n_genes": int(len(df)), "dims": int(df.shape[1])}
    if genes is not None:
        mapping, report = match_genes(genes, df.index, aliases=aliases)
        if not mapping:
            raise KeyError(
                f"`genes`: none of the {len(genes)} requested genes has an embedding in this source "
                f"(e.g. {genes[:5]}; the source embeds {len(df)} genes, e.g. {df.index[:5].tolist()})."
            )
        if report["unmatched"]:
            logger.warning(
                "gene_embeddings: %d of %d genes have no embedding in this source and are left out (e.g. %s).",
                report["unmatched"],
                len(genes),
                report["unmatched_genes"][:5],
            )
        kept = [g for g in genes if g in mapping]
        df = df.loc[[mapping[g] for g in kept]].copy()
        df.index = pd.Index(kept, name="gene")
        prov["match"] = report
        prov["n_genes"] = len(df)
    df.attrs["histoexp"] = jsonable(prov)
    if adata is not None:
        store_gene_embeddings(adata, df, key_added=key_added, overwrite=overwrite)
    logger.info("gene_embeddings (%s): %d genes x %d dims.", method, len(df), df.shape[1])
    return df


def store_gene_embeddings(adata: AnnData, df: pd.DataFrame, *, key_added: str, overwrite: bool = False) -> None:
    """Write ``df`` into ``adata.varm[key_added]`` (NaN rows for genes it lacks) with its provenance in ``uns``."""
    claim_key(adata, "varm", key_added, overwrite=overwrite)
    rows = df.reindex(adata.var_names.astype(str)).to_numpy(dtype=np.float32)
    adata.varm[key_added] = rows
    mark_written(adata, "varm", key_added, by="gene_embeddings")
    hist = adata.uns.setdefault("histoexp", {})
    entry = dict(df.attrs.get("histoexp", {}))
    entry["n_genes_in_adata"] = int(np.isfinite(rows).all(1).sum())
    hist.setdefault(UNS_KEY, {})[key_added] = jsonable(entry)


def embeddings_from_varm(adata: AnnData, key: str) -> pd.DataFrame:
    """Return the genes × dims table stored by :func:`gene_embeddings` in ``adata.varm[key]`` (NaN rows left out)."""
    if key not in adata.varm:
        raise KeyError(f"`gene_embeddings={key!r}` is not in adata.varm (found {list(adata.varm)}).")
    values = adata.varm[key]
    values = values.to_numpy() if isinstance(values, pd.DataFrame) else np.asarray(values, dtype=np.float32)
    ok = np.isfinite(values).all(1)
    df = pd.DataFrame(values[ok], index=pd.Index(adata.var_names[ok].astype(str), name="gene"))
    df.columns = [f"dim{i}" for i in range(df.shape[1])]
    df.attrs["histoexp"] = dict(adata.uns.get("histoexp", {}).get(UNS_KEY, {}).get(key, {}))
    return df
