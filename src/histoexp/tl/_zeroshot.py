"""Zero-shot gene prediction: ``fit_zeroshot`` (expression axes or SGN's neural form), its control, cross-fitting."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._settings import logger
from .._utils import one_progress_bar
from ._fit import _embedding_record, check_positive, prepare_fit, set_n_pcs, train_members, write_fit_keys

if TYPE_CHECKING:  # pragma: no cover
    from ..models.zeroshot import ZeroshotModel

#: Defaults on frozen features (CPU). lr / weight decay / batch as BLEEP's frozen defaults; early stopping on the
#: validation sections' loss (training genes).
FROZEN_DEFAULTS = {"epochs": 100, "batch_size": 256, "lr": 1e-3, "weight_decay": 1e-3, "patience": 10, "n_ensemble": 1}


def _is_int(v, low: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= low


def _embedding_table(adata: AnnData, gene_embeddings) -> pd.DataFrame:
    from ..pp._gene_embeddings import embeddings_from_varm

    if isinstance(gene_embeddings, str):
        return embeddings_from_varm(adata, gene_embeddings)
    if not isinstance(gene_embeddings, pd.DataFrame):
        raise TypeError(
            "`gene_embeddings` must be a genes x dims DataFrame (hx.pp.gene_embeddings) or an adata.varm key, "
            f"got {type(gene_embeddings).__name__}."
        )
    table = gene_embeddings
    values = table.to_numpy(dtype=np.float32) if table.shape[1] else np.zeros((len(table), 0), np.float32)
    if values.shape[1] == 0 or len(table) == 0:
        raise ValueError(f"`gene_embeddings` is empty (shape {table.shape}).")
    if not np.isfinite(values).all():
        bad = table.index[~np.isfinite(values).all(1)].tolist()
        raise ValueError(
            f"`gene_embeddings` has NaN/inf rows for {len(bad)} genes (e.g. {bad[:5]}); drop them: a gene without "
            "an embedding is never predicted from a made-up vector."
        )
    index = pd.Index([str(g) for g in table.index], name="gene")
    if not index.is_unique:
        raise ValueError(f"`gene_embeddings` has duplicated genes (e.g. {index[index.duplicated()][:5].tolist()}).")
    out = pd.DataFrame(values, index=index)
    out.attrs = dict(table.attrs)
    return out


#: ``rank="auto"``: the smallest rank whose cross-fitted PCC@M is within this of the best one (rounding level).
RANK_TOLERANCE = 1e-4

NEURAL_DEFAULTS = {
    "dim": 64,
    "dropout": 0.1,
    "pcc_weight": 0.5,
    "genes_per_step": None,
    "prompter_layers": 0,
    "image_tokens": 4,
    "graph_k": 0,
    "nuclei_rep": None,
    "nuclei_tokens": 1,
    "n_ensemble": None,
    "epochs": None,
    "batch_size": None,
    "lr": None,
    "weight_decay": None,
    "patience": None,
    "val_fraction": 0.2,
    "checkpoint_dir": None,
    "resume": False,
}


@one_progress_bar("fit_zeroshot")
def fit_zeroshot(
    adata: AnnData,
    *,
    gene_embeddings: pd.DataFrame | str,
    genes: Sequence[str] | str | int | None = None,
    method: Literal["axes", "neural"] = "axes",
    rank: int | Literal["auto"] = "auto",
    shuffle_embeddings: bool = False,
    crossfit: bool | None = None,
    gene_folds: int = 5,
    layer: str | None = None,
    normalize: Literal["log1p", "none"] = "log1p",
    use_rep: str | None = None,
    encoder: str = "resnet50",
    n_pcs: int | None = None,
    aliases: Mapping[str, str | Sequence[str]] | None = None,
    dim: int = 64,
    dropout: float = 0.1,
    pcc_weight: float = 0.5,
    genes_per_step: int | None = None,
    prompter_layers: int = 0,
    image_tokens: int = 4,
    graph_k: int = 0,
    nuclei_rep: str | None = None,
    nuclei_tokens: int = 1,
    n_ensemble: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    patience: int | None = None,
    val_fraction: float = 0.2,
    library_key: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    key_added: str = "zeroshot",
    overwrite: bool = False,
    random_state: int = 0,
    device: str | None = None,
) -> ZeroshotModel:
    """Train a zero-shot model: it predicts genes it never trained on, from their gene embeddings.

    Any gene with an embedding can be predicted: :func:`histoexp.tl.impute` accepts ``genes=`` outside the training
    genes and marks them in ``var['seen_in_training']``; :func:`histoexp.tl.evaluate` then summarises seen and
    unseen genes apart. An unseen-gene figure means something only next to the **zero-shot control**, the same
    model trained with the embeddings shuffled among the genes (``shuffle_embeddings=True``): on tissue where most
    genes share a few spatial patterns, a model that ignores which gene it predicts still scores well.

    ``method='axes'`` (default): expression axes. The training genes' log-expression is summarised by its top
    ``rank`` principal axes (centred on the training mean); ridge regression on the standardised (PCA) image
    features predicts each axis' score (one penalty per axis, by leave-one-section-out). A gene is predicted as
    ``level + scores · loadings``: a training gene with its own mean and loadings (reduced-rank ridge), any other
    gene with the loadings (per unit of its standard deviation), the mean and the log standard deviation that a
    ridge map reads from its embedding, learned on the training genes (the table centred on the training genes and
    scaled to unit mean squared norm; one penalty per output, by leave-one-gene-out). Closed form, deterministic,
    seconds on a CPU. ``rank='auto'`` and the expected accuracy come from :func:`zeroshot_crossfit` (held-out
    sections x held-out gene folds).

    On her2st (``benchmarks/her2st_zeroshot.py``: leave-one-section-out over C2..C6 x five gene folds of the
    785-gene panel, every unseen gene's counts kept out of everything in C2..C6; handcrafted features; 64-d
    co-expression embeddings of the 29 count-only sections of patients A, B, D-H), unseen genes reach PCC@M 0.140
    against 0.096 for the shuffled control (ahead by at least 0.023 on every held-out section), 113 % of ridge
    trained on those very genes (0.124). The **gene-specific** PCC@M (given the first training axis) does not
    beat the control (0.089 vs 0.099): the control learns nothing from shuffled embeddings and gives every gene the
    average gene's loadings, whose second-axis depth pattern the one-axis figure leaves in, while the model's
    first-axis loadings carry the image's error on that axis into each gene's residual. Given the first two axes
    the model keeps 0.018 against 0.007 (ahead on every section and gene fold, by less than 0.02 on each). A perfect
    embedding (the unseen genes' own loadings) would score 0.087 / 0.023, and no richer gene input moves the model
    by more than 0.001 (``benchmarks/her2st_zeroshot_ceiling.py``): on these features the image, not the
    embedding, limits what a zero-shot map says about a gene beyond the shared axes.

    ``method='neural'``: SGN's form and the Deep Association parts, each measured against its control there:

    SGN's form (Yang et al., MICCAI 2024): a spot's frozen image features go through an MLP to a
    ``dim``-dimensional embedding ``h``; a gene's embedding (:func:`histoexp.pp.gene_embeddings`, standardised per
    dimension with the training genes' statistics) goes through another MLP to a token ``t`` and a linear bias
    ``b``; the prediction is ``h · t + b`` (log1p(normalize_total 1e4) scale). Any gene with an embedding can be
    predicted, so :func:`histoexp.tl.impute` accepts ``genes=`` outside the training genes and marks them in
    ``var['seen_in_training']``. Loss as SGN: ``MSE + pcc_weight · (1 − mean per-gene Pearson over the batch)``.

    The Deep Association Multimodal Learning parts (Zhou et al., MICCAI 2025), each optional and off by default:

    - ``prompter_layers > 0``: pathology-guided gene prompter: gene tokens refined by cross-attention to
      ``image_tokens`` tokens projected from the spot's image embedding (one residual attention block per layer,
      applied in turn), so a gene's token depends on the spot;
    - ``graph_k > 0``: gene-interaction graph: each gene attends to its ``graph_k`` most similar training genes
      (cosine of the embeddings; never itself, so training teaches what unseen genes do at prediction), with
      the similarity as an attention bias;
    - ``nuclei_rep``: nuclei-aware features: ``obsm[nuclei_rep]`` (e.g. nuclei and haematoxylin statistics of
      the handcrafted encoder, per patch or per sub-region), split into ``nuclei_tokens`` tokens that the global
      image embedding attends to. The query needs the same obsm.

    On the same protocol (``genes_per_step=128``) the SGN form reaches PCC@M 0.122 against 0.069 for its shuffled
    control, gene-specific 0.076 against 0.070; graph 0.125 (control 0.068), nuclei 0.123, prompter 0.120: the
    parts change little on frozen handcrafted features, and no neural variant beats its control by 0.02 in
    gene-specific PCC@M. The simple baseline (each unseen gene as the similarity-weighted mix of 20 seen genes'
    ridge predictions) reaches 0.132 (control 0.087). The neural form's MSE stays higher than the supervised
    model's (0.384 vs 0.244).

    Deviations from the papers, on purpose: frozen image features only (SGN trains a ResNet-18 and a graph over
    windows; the nuclei branch of the paper segments nuclei); the gene embeddings are whatever the user brings
    (SGN embeds LLM-written gene descriptions); all training genes are used in every step unless
    ``genes_per_step`` (SGN samples 64).

    Parameters
    ----------
    adata
        Training spots with counts, sections in ``obs[library_key]`` and frozen image features in
        ``obsm[use_rep]``.
    gene_embeddings
        Genes x dims DataFrame (:func:`histoexp.pp.gene_embeddings`) or a key of ``adata.varm`` written by it.
        Every training gene needs an embedding; the model keeps the whole table and can predict any gene in it.
    genes
        Training genes, resolved by :func:`histoexp.pp.select_genes` (list, ``'her2st'``, ``'all'``, int = that
        many HVGs, ``None`` = 250 HVGs); each needs an embedding.
    method
        ``'axes'`` (expression axes, above) or ``'neural'`` (SGN form).
    rank
        ``method='axes'``: number of expression axes; ``'auto'``: chosen by :func:`zeroshot_crossfit` among
        :data:`~histoexp.tl._zeroshot_axes.RANK_CANDIDATES`: the smallest rank whose held-out genes on held-out
        training sections reach, in mean per-gene Pearson, the best rank's score minus 0.0001.
    shuffle_embeddings
        The zero-shot control: permute the embedding table's rows among its genes (seed ``random_state``) before
        anything else; recorded in the model (its ``repr`` says so). Compare its unseen-gene accuracy with the
        real model's on the same data.
    crossfit
        ``method='axes'``: store the expected accuracy per gene (``None``: when the data allow it, i.e. two
        sections or spot positions). Training genes: held-out sections predicted by the model trained on the
        others (``var['expected_*']`` and prediction intervals in :func:`histoexp.tl.impute`). Other genes: the
        mean over their 10 nearest training genes (cosine of the embeddings) of the accuracy those reached when
        held out of training (``gene_folds`` x held-out sections; no intervals).
    gene_folds
        Gene folds of the cross-fitting.
    layer, normalize
        Counts layer and normalisation of the targets (as :func:`histoexp.tl.fit_bleep`).
    use_rep, encoder
        ``obsm`` key of the frozen image features (``None``: ``f'X_{encoder}'``).
    n_pcs
        Principal components of the standardised image features. ``'axes'``: ``None`` = 256, capped by the
        features and spots (HEST's ridge recipe); ``'neural'``: ``None`` = the standardised features, whitened
        components otherwise.
    aliases
        Synonyms used to find training genes in the embedding table (``{'ERBB2': ['HER2']}``).
    dim, dropout
        Width of the joint space; dropout of the MLPs.
    pcc_weight
        Weight of the correlation term of the loss (SGN: 0.5).
    genes_per_step
        Train each step on this many training genes drawn at random (``None``: all).
    prompter_layers, image_tokens
        Gene prompter (see above); 0 layers: off.
    graph_k
        Gene-interaction graph neighbours (0: off).
    nuclei_rep, nuclei_tokens
        Nuclei-aware features (see above).
    aliases
        Synonyms used to find training genes in the embedding table (``{'ERBB2': ['HER2']}``).
    n_ensemble, epochs, batch_size, lr, weight_decay, patience
        Training settings (``None``: :data:`FROZEN_DEFAULTS`).
    val_fraction, library_key
        Validation sections for early stopping (neural; see :func:`histoexp.train.split_by_library`); ``obs``
        column of the sections.
    checkpoint_dir, resume
        Neural: per-epoch checkpoints and resume (see :func:`histoexp.train.fit`).
    key_added
        Writes ``obsm[f'X_{key_added}_image']`` (the spot's predicted axis scores, or the neural spot embedding)
        and ``uns[key_added]`` (``params``, ``genes``; neural: ``history``).
    overwrite
        Replace those keys.
    random_state
        Seed: the same seed on the same machine gives the same model (gene folds, shuffle, solvers, training).
    device
        Torch device of the neural form (``None``: ``hx.settings.device``); the axes form runs on the CPU.

    Returns
    -------
    ZeroshotModel
        A regression model (:class:`~histoexp.models.zeroshot.ZeroshotModel`; ``.save(dir)``,
        :func:`histoexp.tl.load_model`); predict with ``hx.tl.impute(query, model, genes=[...])``.
    """
    _check_choice("method", method, ("axes", "neural"))
    if not isinstance(shuffle_embeddings, (bool, np.bool_)):
        raise ValueError(f"`shuffle_embeddings` must be True or False, got {shuffle_embeddings!r}.")
    table = _embedding_table(adata, gene_embeddings)
    shuffled = None
    if shuffle_embeddings:
        table = shuffle_embedding_table(table, random_state)
        shuffled = {"random_state": int(random_state), "n_genes": len(table)}
        logger.warning("fit_zeroshot: gene embeddings shuffled among %d genes (the zero-shot control).", len(table))
    common = {
        "genes": genes,
        "layer": layer,
        "normalize": normalize,
        "use_rep": use_rep,
        "encoder": encoder,
        "n_pcs": n_pcs,
        "aliases": aliases,
        "library_key": library_key,
        "key_added": key_added,
        "overwrite": overwrite,
        "random_state": random_state,
        "shuffled": shuffled,
    }
    neural = {
        "dim": dim,
        "dropout": dropout,
        "pcc_weight": pcc_weight,
        "genes_per_step": genes_per_step,
        "prompter_layers": prompter_layers,
        "image_tokens": image_tokens,
        "graph_k": graph_k,
        "nuclei_rep": nuclei_rep,
        "nuclei_tokens": nuclei_tokens,
        "n_ensemble": n_ensemble,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "patience": patience,
        "val_fraction": val_fraction,
        "checkpoint_dir": checkpoint_dir,
        "resume": resume,
    }
    if method == "neural":
        if rank != "auto" or crossfit or gene_folds != 5:
            raise ValueError(
                "`rank`, `crossfit` and `gene_folds` belong to method='axes'; the neural form has none of them."
            )
        return _fit_neural(adata, table=table, device=device, **common, **neural)
    given = sorted(k for k, v in neural.items() if v != NEURAL_DEFAULTS[k] or type(v) is not type(NEURAL_DEFAULTS[k]))
    if given:
        raise ValueError(f"{given} belong to method='neural' (the SGN form); method='axes' has no such setting.")
    return _fit_axes(adata, table=table, rank=rank, crossfit=crossfit, gene_folds=gene_folds, **common)


def _fit_neural(
    adata: AnnData,
    *,
    table: pd.DataFrame,
    genes: Sequence[str] | str | int | None = None,
    layer: str | None = None,
    normalize: Literal["log1p", "none"] = "log1p",
    use_rep: str | None = None,
    encoder: str = "resnet50",
    n_pcs: int | None = None,
    dim: int = 64,
    dropout: float = 0.1,
    pcc_weight: float = 0.5,
    genes_per_step: int | None = None,
    prompter_layers: int = 0,
    image_tokens: int = 4,
    graph_k: int = 0,
    nuclei_rep: str | None = None,
    nuclei_tokens: int = 1,
    aliases: Mapping[str, str | Sequence[str]] | None = None,
    n_ensemble: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    patience: int | None = None,
    val_fraction: float = 0.2,
    library_key: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    key_added: str = "zeroshot",
    overwrite: bool = False,
    random_state: int = 0,
    device: str | None = None,
    shuffled: dict | None = None,
) -> ZeroshotModel:
    """Fit the neural (SGN) form of :func:`fit_zeroshot` (``method='neural'``); arguments as there."""
    import torch

    from .._distributed import broadcast_batch
    from ..models.zeroshot import ZeroshotModel, zeroshot_loss
    from ..pp import select_genes
    from ..train import data_fingerprint, gather_batch

    check_positive(dim=dim)
    if not _is_int(dim, 1):
        raise ValueError(f"`dim` must be a positive integer, got {dim!r}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
    if isinstance(pcc_weight, bool) or not isinstance(pcc_weight, (int, float)) or not pcc_weight >= 0:
        raise ValueError(f"`pcc_weight` must be a number >= 0, got {pcc_weight!r}.")
    for name, value, low in (
        ("prompter_layers", prompter_layers, 0),
        ("image_tokens", image_tokens, 1),
        ("graph_k", graph_k, 0),
        ("nuclei_tokens", nuclei_tokens, 1),
    ):
        if not _is_int(value, low):
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    if genes_per_step is not None and not _is_int(genes_per_step, 2):
        raise ValueError(f"`genes_per_step` must be None or an integer >= 2, got {genes_per_step!r}.")

    gene_list = select_genes(adata, genes, layer=layer)
    table, report = _match_training_genes(table, gene_list, aliases)
    if graph_k and graph_k >= len(gene_list):
        raise ValueError(f"`graph_k={graph_k}` must be below the number of training genes ({len(gene_list)}).")

    hp = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
    hp.update(patience=patience, n_ensemble=n_ensemble)
    img_key = f"X_{key_added}_image"
    data = prepare_fit(
        adata,
        method="zero-shot",
        key_added=key_added,
        out_obsm=(img_key,),
        overwrite=overwrite,
        genes=gene_list,
        layer=layer,
        normalize=normalize,
        use_rep=use_rep,
        encoder=encoder,
        finetune_encoder=False,
        library_key=library_key,
        val_fraction=val_fraction,
        random_state=random_state,
        device=device,
        defaults=(FROZEN_DEFAULTS, None),
        hparams=hp,
    )
    set_n_pcs(data, n_pcs)
    image_dim = data.images.shape[1]
    nuclei = None
    extra = {}
    if nuclei_rep is not None:
        if nuclei_rep not in adata.obsm:
            raise KeyError(f"`nuclei_rep={nuclei_rep!r}` is not in adata.obsm (found {list(adata.obsm)}).")
        nuclei = np.asarray(adata.obsm[nuclei_rep], dtype=np.float32)
        if nuclei.ndim != 2 or not np.isfinite(nuclei).all():
            raise ValueError(f"adata.obsm[{nuclei_rep!r}] must be a finite 2-d array, got shape {nuclei.shape}.")
        if nuclei.shape[1] % nuclei_tokens:
            raise ValueError(f"`nuclei_tokens={nuclei_tokens}` must divide the {nuclei.shape[1]} nuclei features.")
        extra = {nuclei_rep: {"dim": int(nuclei.shape[1]), "embedding": _embedding_record(adata, nuclei_rep)}}
        data.images = np.concatenate([data.images, nuclei], axis=1)
        data.config["data_fingerprint"] = data_fingerprint(data.images, data.expr, data.train_idx, data.val_idx)
    seen = table.loc[gene_list].to_numpy(dtype=np.float32)
    data.config.update(
        form="neural",
        shuffle_embeddings=shuffled,
        feature_dim=int(data.images.shape[1]),
        extra_reps=extra,
        nuclei_dim=0 if nuclei is None else int(nuclei.shape[1]),
        nuclei_tokens=int(nuclei_tokens),
        embedding_dim=int(table.shape[1]),
        embedding_genes=[str(g) for g in table.index],
        gene_embeddings_provenance=dict(table.attrs.get("histoexp", {})),
        dim=int(dim),
        dropout=float(dropout),
        pcc_weight=float(pcc_weight),
        genes_per_step=genes_per_step,
        prompter_layers=int(prompter_layers),
        image_tokens=int(image_tokens),
        graph_k=int(graph_k),
        # the training genes' embeddings shape the model: another table with the same genes is another model
        gene_embeddings_sha256=data_fingerprint(seen)[:16],
    )
    seen_t = torch.as_tensor(seen)
    tr = data.train_idx

    def make_net():
        net = ZeroshotModel.build_net(data.config)
        net.seen.copy_(seen_t)
        net.fit_inputs(data.images[tr, :image_dim], seen, None if nuclei is None else nuclei[tr], random_state)
        return net

    all_cols = torch.arange(len(gene_list))

    def loss_fn(net, batch):
        cols = all_cols
        if net.training and genes_per_step is not None and genes_per_step < len(gene_list):
            cols = torch.randperm(len(gene_list))[:genes_per_step]  # global RNG: seeded per epoch by train.fit
            cols = broadcast_batch(cols)  # DDP: every rank trains rank 0's genes (the rows are gathered below)
        cols = cols.to(batch["image"].device)
        emb = net.seen[cols]
        pred = net(batch["image"], emb, cols)
        # the loss's Pearson term is over the batch's spots: under DDP over the whole global batch (every rank's
        # rows gathered), as in one process; gather_batch returns its input in one process
        return zeroshot_loss(gather_batch(pred), gather_batch(batch["expression"][:, cols]), pcc_weight)

    nets, history = train_members(
        data,
        make_net,
        loss_fn,
        desc="zero-shot",
        random_state=random_state,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )
    params = {
        k: data.config[k]
        for k in (
            "dim",
            "dropout",
            "pcc_weight",
            "genes_per_step",
            "prompter_layers",
            "image_tokens",
            "graph_k",
            "nuclei_dim",
            "nuclei_tokens",
            "n_pcs",
            "embedding_dim",
        )
    }
    params.update(nuclei_rep=nuclei_rep, n_embedding_genes=len(table), gene_match=report)
    params.update(method="neural", shuffle_embeddings=shuffled)
    data.config.update(params={**data.params, **params}, history=history)
    model = ZeroshotModel(nets, data.config, arrays={"gene_embeddings": table.to_numpy(dtype=np.float32)})
    h = model._run_images(lambda net, x: net.encode_image(x), data.images, member=0, desc="image embeddings")[0]
    write_fit_keys(data, key_added, params=params, history=history, obsm={img_key: h})
    return model


# ------------------------------------------------------------------------------------------------ shared helpers
def _match_training_genes(table: pd.DataFrame, gene_list: list[str], aliases) -> tuple[pd.DataFrame, dict]:
    """Index the table by the training data's names for its matched training genes; every training gene needed."""
    from ..pp._gene_embeddings import match_genes

    mapping, report = match_genes(gene_list, table.index, aliases=aliases)
    missing = report["unmatched_genes"]
    if missing:
        raise KeyError(
            f"`gene_embeddings` lacks {len(missing)} of the {len(gene_list)} training genes (e.g. {missing[:5]}); "
            "pass `genes=` with the genes that have embeddings, or `aliases=` for renamed genes."
        )
    shared: dict[str, list[str]] = {}
    for g in gene_list:
        shared.setdefault(mapping[g], []).append(g)
    clash = {row: names for row, names in shared.items() if len(names) > 1}
    if clash:
        row, names = next(iter(clash.items()))
        raise ValueError(
            f"Training genes {names} all match the embedding of {row!r} (equal up to case or through `aliases`), "
            f"and {len(clash)} such group(s) in all: one embedding cannot stand for two genes. Keep one name of each "
            "(`genes=`, or adata.var_names), or fix `aliases`."
        )
    rename = {mapping[g]: g for g in gene_list if mapping[g] != g}
    out = table.rename(index=rename)
    if not out.index.is_unique:
        raise ValueError("`aliases` map two genes of the embedding table onto one training gene name.")
    out.attrs = dict(table.attrs)
    return out, report


def shuffle_embedding_table(table: pd.DataFrame, random_state: int = 0) -> pd.DataFrame:
    """Return the zero-shot control's table: the same embedding vectors, permuted among the genes (seeded).

    A model trained and applied with it keeps everything that does not depend on which gene is which (the image
    side, the training genes' own expression); what it loses is exactly what the embeddings say about each gene.
    """
    perm = np.random.default_rng(random_state).permutation(len(table))
    out = pd.DataFrame(table.to_numpy()[perm], index=table.index.copy(), columns=table.columns)
    out.attrs = dict(table.attrs)
    return out


def _check_choice(name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}.")


def _check_rank_arg(rank) -> int | str:
    if isinstance(rank, str) and rank == "auto":
        return rank
    if not _is_int(rank, 1):
        raise ValueError(f"`rank` must be a positive integer or 'auto', got {rank!r}.")
    return int(rank)


def _resolve_n_pcs(n_pcs, n_features: int, n_spots: int) -> int | None:
    if n_pcs is None:
        n_pcs = 256
    if not _is_int(n_pcs, 1):
        raise ValueError(f"`n_pcs` must be a positive integer or None, got {n_pcs!r}.")
    k = int(min(n_pcs, n_features, max(n_spots - 1, 1)))
    return None if k >= n_features else k


def _features(feats_tr: np.ndarray, n_pcs: int | None, random_state: int):
    """Fit the model's feature standardisation (and PCA) on training features; returns (module, transform)."""
    import torch

    from ..models.heads import FeatureInput

    module = FeatureInput(feats_tr.shape[1], n_pcs, whiten=False).fit(feats_tr, random_state=random_state)

    def transform(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.as_tensor(np.asarray(x), dtype=torch.float32)).double().numpy()

    return module, transform


def _gene_folds(n_genes: int, gene_folds: int, random_state: int) -> np.ndarray:
    if not _is_int(gene_folds, 2) or gene_folds > n_genes:
        raise ValueError(f"`gene_folds` must be an integer in [2, {n_genes}] (the training genes), got {gene_folds!r}.")
    return np.random.default_rng(random_state).permutation(n_genes) % gene_folds


def _axes_oof(
    feats, expr, groups, folds, inputs_table, train_rows, fold_of, k_max, n_pcs, random_state, control_table=None
):
    """Zero-shot out-of-fold pieces: for each held-out group and gene fold, scores, loadings and levels.

    The model of (group ``g``, fold ``f``) trains on the other groups' spots and the other folds' genes (axes,
    means, penalties, the gene map and its embedding centring see neither); it predicts fold ``f``'s genes on
    ``g``'s spots. Returns ``([(spot_mask, gene_idx, scores, loadings, levels)], control_pieces)``:
    ``control_pieces`` (``None`` without ``control_table``) are the same models with the gene map learned from
    ``control_table`` (the shuffled embeddings; the axes and the image side do not depend on the embeddings, so
    the control costs one more map per piece).
    """
    from ._zeroshot_axes import embedding_inputs, fit_axes, map_genes

    pieces, control = [], ([] if control_table is not None else None)
    for g in folds:
        tr, te = groups != g, groups == g
        _, transform = _features(feats[tr], n_pcs, random_state)
        z_tr, z_te = transform(feats[tr]), transform(feats[te])
        for f in np.unique(fold_of):
            seen, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
            inputs = embedding_inputs(inputs_table, train_rows[seen])
            y = expr[tr][:, seen]
            fit = fit_axes(
                z_tr, y, groups[tr], inputs, train_rows[seen], train_rows[held], rank=k_max, random_state=random_state
            )
            scores = fit.scores(z_te)
            pieces.append((te, held, scores, fit.loadings, fit.levels))
            if control is not None:
                c_inputs = embedding_inputs(control_table, train_rows[seen])
                c_load, c_level, _ = map_genes(
                    fit.axes, fit.mean, y.std(0), c_inputs, train_rows[seen], train_rows[held]
                )
                control.append((te, held, scores, c_load, c_level))
    return pieces, control


def _oof_matrix(pieces, shape, rank) -> np.ndarray:
    oof = np.full(shape, np.nan)
    for te, held, scores, loadings, levels in pieces:
        k = min(rank, scores.shape[1])
        oof[np.ix_(te, held)] = levels + scores[:, :k] @ loadings[:, :k].T
    return oof


def _axes_data(adata, table, genes, layer, normalize, use_rep, encoder, library_key, aliases):
    """Features, training-gene expression and the table rows of the training genes (no AnnData written)."""
    from .._utils import resolve_library_key
    from ..pp import expression_matrix, select_genes

    gene_list = select_genes(adata, genes, layer=layer)
    table, report = _match_training_genes(table, gene_list, aliases)
    rep = use_rep if use_rep is not None else f"X_{encoder}"
    if rep not in adata.obsm:
        raise KeyError(
            f"fit_zeroshot needs frozen image features in adata.obsm[{rep!r}], which is missing (obsm has "
            f"{list(adata.obsm)}): run hx.tl.embed_patches first or pass `use_rep=`."
        )
    feats = np.asarray(adata.obsm[rep], dtype=np.float32)
    if feats.ndim != 2 or not np.isfinite(feats).all():
        raise ValueError(f"adata.obsm[{rep!r}] must be a finite 2-d array, got shape {feats.shape}.")
    expr = expression_matrix(adata, gene_list, layer=layer, normalize=normalize).astype(np.float64)
    rows = pd.Index(table.index).get_indexer(gene_list)
    return feats, expr, gene_list, table, rows, report, resolve_library_key(adata, library_key)


def _rank_candidates(n_spots: int, n_genes: int) -> list[int]:
    from ._zeroshot_axes import RANK_CANDIDATES, max_rank

    top = max_rank(n_spots, n_genes)
    return [k for k in RANK_CANDIDATES if k <= top] or [1]


def _crossfit_axes(
    feats, expr, groups, folds, table_values, rows, fold_of, rank, n_pcs, random_state, control_values=None
):
    """Zero-shot out-of-fold predictions ``(spots, genes)`` at ``rank`` (``'auto'``: chosen).

    Returns ``(oof, rank, scores, oof_control)``; ``oof_control`` (``None`` without ``control_values``): the same
    cross-fitting with the gene map learned from ``control_values`` (the shuffled table), at the same rank.
    """
    from ._crossfit import mean_pcc

    n_seen = len(fold_of) - int(np.bincount(fold_of).max())
    cands = _rank_candidates(int(min((groups != g).sum() for g in folds)), n_seen)
    k_max = max(cands) if rank == "auto" else rank
    pieces, control = _axes_oof(
        feats, expr, groups, folds, table_values, rows, fold_of, k_max, n_pcs, random_state, control_values
    )
    scores = None
    if rank == "auto":
        scores = {}
        for k in cands:
            oof = _oof_matrix(pieces, expr.shape, k)
            scores[str(k)] = float(np.mean([mean_pcc(oof[groups == g], expr[groups == g]) for g in folds]))
        # differences below RANK_TOLERANCE are rounding: the smaller rank wins
        best = max(scores.values())
        rank = min(int(key) for key, v in scores.items() if v >= best - RANK_TOLERANCE)
    oof_control = None if control is None else _oof_matrix(control, expr.shape, rank)
    return _oof_matrix(pieces, expr.shape, rank), int(rank), scores, oof_control


def zeroshot_crossfit(
    adata: AnnData,
    *,
    gene_embeddings: pd.DataFrame | str,
    genes: Sequence[str] | str | int | None = None,
    rank: int | Literal["auto"] = 8,
    gene_folds: int = 5,
    layer: str | None = None,
    normalize: Literal["log1p", "none"] = "log1p",
    use_rep: str | None = None,
    encoder: str = "resnet50",
    n_pcs: int | None = None,
    library_key: str | None = None,
    aliases: Mapping[str, str | Sequence[str]] | None = None,
    shuffle_embeddings: bool = False,
    random_state: int = 0,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Out-of-fold zero-shot predictions of every training gene on every training section (``method='axes'``).

    The training genes are split into ``gene_folds`` random folds and the spots into their sections (or four
    spatial blocks of a single section with ``obsm['spatial']``). For each section ``s`` and gene fold ``f``, the
    expression-axes zero-shot model (:func:`fit_zeroshot`) is trained on the other sections with fold ``f``'s
    genes removed (their counts enter no axis, mean, penalty or map) and predicts fold ``f``'s genes on ``s``. Each
    (spot, gene) is thus predicted once, by a model that saw neither the spot's section nor the gene. This is what
    :func:`fit_zeroshot` uses to choose ``rank='auto'`` and to store the expected accuracy of genes outside its
    training genes; it is cheap (closed-form ridge fits).

    Parameters
    ----------
    adata
        Training spots with counts, sections in ``obs[library_key]`` and frozen features in ``obsm[use_rep]``.
    gene_embeddings, genes, layer, normalize, use_rep, encoder, n_pcs, library_key, aliases, shuffle_embeddings
        As :func:`fit_zeroshot`.
    rank
        Expression axes of the models; ``'auto'``: the smallest rank of
        :data:`~histoexp.tl._zeroshot_axes.RANK_CANDIDATES` whose out-of-fold predictions reach, in mean per-gene
        Pearson averaged over the held-out sections, the best rank's score minus 0.0001 (then recorded in
        ``oof.attrs['rank']``, every score in ``oof.attrs['rank_scores']``).
    gene_folds
        Number of gene folds (>= 2).
    random_state
        Seed of the gene folds, the shuffle and the solvers.

    Returns
    -------
    ``(oof, groups)``: ``oof`` a spots x genes DataFrame (``adata.obs_names`` x the training genes; NaN rows for
    spots of groups too small to be held out), ``groups`` the held-out group of each spot.
    """
    from ._crossfit import crossfit_groups

    rank = _check_rank_arg(rank)
    table = _embedding_table(adata, gene_embeddings)
    if shuffle_embeddings:
        table = shuffle_embedding_table(table, random_state)
    feats, expr, gene_list, table, rows, _, lib = _axes_data(
        adata, table, genes, layer, normalize, use_rep, encoder, library_key, aliases
    )
    grouping = crossfit_groups(adata, lib, random_state)
    if grouping is None:
        raise ValueError(
            "zeroshot_crossfit needs two or more sections in obs[library_key] or spot positions in obsm['spatial'] "
            "(spatial blocks of one section)."
        )
    groups, _ = grouping
    folds = [g for g in pd.unique(groups) if (groups == g).sum() >= 3]
    if len(folds) < 2:
        raise ValueError(f"Cross-fitting needs two groups of at least 3 spots, got {len(folds)}.")
    fold_of = _gene_folds(len(gene_list), gene_folds, random_state)
    n_pcs = _resolve_n_pcs(n_pcs, feats.shape[1], int(min((groups != g).sum() for g in folds)))
    oof, rank, scores, _ = _crossfit_axes(
        feats, expr, groups, folds, table.to_numpy(np.float64), rows, fold_of, rank, n_pcs, random_state
    )
    oof = pd.DataFrame(oof, index=adata.obs_names.copy(), columns=gene_list)
    oof.attrs.update(rank=int(rank), gene_folds=int(gene_folds), folds=[str(g) for g in folds])
    if scores is not None:
        oof.attrs["rank_scores"] = scores
    return oof, groups


def _fit_axes(
    adata: AnnData,
    *,
    table: pd.DataFrame,
    genes,
    rank,
    crossfit,
    gene_folds: int,
    layer,
    normalize,
    use_rep,
    encoder,
    n_pcs,
    aliases,
    library_key,
    key_added: str,
    overwrite: bool,
    random_state: int,
    shuffled: dict | None,
) -> ZeroshotModel:
    """Fit the expression-axes form of :func:`fit_zeroshot` (``method='axes'``); arguments as there."""
    import time

    import torch

    from .._expected import SPECIFIC_MIN
    from .._stats import expression_axes
    from ..models.zeroshot import ZeroshotAxesNet, ZeroshotModel
    from ..pp import select_genes
    from ._crossfit import INTERVAL_LEVELS, _attach, _expected_tables, crossfit_groups
    from ._zeroshot_axes import embedding_inputs, fit_axes

    rank = _check_rank_arg(rank)
    if crossfit is not None and not isinstance(crossfit, (bool, np.bool_)):
        raise ValueError(f"`crossfit` must be None, True or False, got {crossfit!r}.")
    gene_list = select_genes(adata, genes, layer=layer)
    table, report = _match_training_genes(table, gene_list, aliases)
    img_key = f"X_{key_added}_image"
    data = prepare_fit(
        adata,
        method="zero-shot",
        key_added=key_added,
        out_obsm=(img_key,),
        overwrite=overwrite,
        genes=gene_list,
        layer=layer,
        normalize=normalize,
        use_rep=use_rep,
        encoder=encoder,
        finetune_encoder=False,
        library_key=library_key,
        val_fraction=0,
        random_state=random_state,
        device="cpu",
        defaults=({}, None),
        hparams={},
    )
    feats, expr = data.images, data.expr.astype(np.float64)
    rows = pd.Index(table.index).get_indexer(gene_list)
    values = table.to_numpy(np.float64)
    fold_of = _gene_folds(len(gene_list), gene_folds, random_state)
    need_oof = rank == "auto" or bool(crossfit)
    grouping = None
    if need_oof or crossfit is None:
        grouping = crossfit_groups(adata, data.library_key, random_state)
    if grouping is None and need_oof:
        raise ValueError(
            "`rank='auto'` and `crossfit=True` cross-fit over held-out sections and gene folds: they need two or "
            "more sections in obs[library_key] or spot positions in obsm['spatial'] (spatial blocks of one section); "
            "pass an integer `rank` and `crossfit=False`."
        )
    sections = None
    if data.library_key is not None and adata.obs[data.library_key].nunique() >= 2:
        sections = adata.obs[data.library_key].astype(str).to_numpy()
    record: dict = {}
    tables = zs_tables = None
    n_pcs_final = _resolve_n_pcs(n_pcs, feats.shape[1], adata.n_obs)
    if grouping is not None and (need_oof or crossfit is None):
        t0 = time.time()
        groups, unit = grouping
        folds = [g for g in pd.unique(groups) if (groups == g).sum() >= 3]
        if len(folds) < 2:
            raise ValueError(f"Cross-fitting needs two {unit}s of at least 3 spots, got {len(folds)}.")
        n_pcs_cv = _resolve_n_pcs(n_pcs, feats.shape[1], int(min((groups != g).sum() for g in folds)))
        # the control's cross-fitting (the table's rows permuted as shuffle_embedding_table does): what an unseen
        # gene's map would score knowing nothing about the gene, to judge which unseen genes to believe
        control_values = values[np.random.default_rng(random_state).permutation(len(values))]
        zs_oof, rank, scores, zs_control = _crossfit_axes(
            feats, expr, groups, folds, values, rows, fold_of, rank, n_pcs_cv, random_state, control_values
        )
        if scores is not None:
            record["rank_scores"] = scores
        # the training genes with their own loadings, each held-out section predicted by the others' fit
        oof = np.full(expr.shape, np.nan)
        for g in folds:
            tr, te = groups != g, groups == g
            _, transform = _features(feats[tr], n_pcs_cv, random_state)
            fit = fit_axes(transform(feats[tr]), expr[tr], groups[tr], None, None, None, rank=rank)
            oof[te] = fit.predict(transform(feats[te]))
        fold_axes = {g: expression_axes(expr[groups != g], 1) for g in folds}
        tables = _expected_tables(oof, expr, groups, folds, fold_axes)
        zs = _expected_tables(zs_oof, expr, groups, folds, fold_axes)
        zs_tables = {
            "zeroshot_pcc": zs["crossfit_pcc"],
            "zeroshot_pcc_specific": zs["crossfit_pcc_specific"],
            "zeroshot_pcc_control": _expected_tables(zs_control, expr, groups, folds, fold_axes)["crossfit_pcc"],
        }
        record["crossfit"] = {
            "unit": unit,
            "folds": [str(g) for g in folds],
            "gene_folds": int(gene_folds),
            "n_spots": int(np.isin(groups, folds).sum()),
            "levels": list(INTERVAL_LEVELS),
            "specific_min": SPECIFIC_MIN,
            "neighbours": 10,
            "unseen": f"genes outside the training genes: mean of their 10 nearest training genes (cosine of the "
            f"embeddings) held out of training ({gene_folds} gene folds x held-out {unit}s); expected_specific: "
            f"their PCC ahead of the shuffled-embedding control's by >= {SPECIFIC_MIN} on average and > 0 in "
            "every fold",
            "seconds": round(time.time() - t0, 1),
            "oof_pcc_mean": float(np.nanmean(tables["crossfit_pcc"])),
            "oof_pcc_specific_mean": float(np.nanmean(tables["crossfit_pcc_specific"])),
            "zeroshot_oof_pcc_mean": float(np.nanmean(zs_tables["zeroshot_pcc"])),
            "zeroshot_oof_pcc_specific_mean": float(np.nanmean(zs_tables["zeroshot_pcc_specific"])),
            "zeroshot_oof_pcc_control_mean": float(np.nanmean(zs_tables["zeroshot_pcc_control"])),
        }
        logger.info(
            "zero-shot cross-fitting (%d %ss x %d gene folds, %.0f s): rank %d; held-out genes PCC@M %.3f, "
            "gene-specific %.3f.",
            len(folds),
            unit,
            gene_folds,
            record["crossfit"]["seconds"],
            rank,
            record["crossfit"]["zeroshot_oof_pcc_mean"],
            record["crossfit"]["zeroshot_oof_pcc_specific_mean"],
        )
        if sections is None:
            sections = groups
    # the model: every training spot and gene
    module, transform = _features(feats, n_pcs_final, random_state)
    z = transform(feats)
    inputs = embedding_inputs(values, rows)
    fit = fit_axes(z, expr, sections, inputs, rows, np.arange(len(values)), rank=rank, random_state=random_state)
    k = fit.axes.shape[1]
    loadings, levels = fit.loadings[:, :k].copy(), fit.levels.copy()
    loadings[rows], levels[rows] = fit.axes, fit.mean  # a training gene keeps its own loadings and mean
    net = ZeroshotAxesNet(feats.shape[1], len(values), k, n_pcs_final)
    with torch.no_grad():
        net.features.load_state_dict(module.state_dict())
        net.scores.weight.copy_(torch.as_tensor(fit.coef[:, :k].T, dtype=torch.float32))
        net.scores.bias.copy_(torch.as_tensor(fit.intercept[:k], dtype=torch.float32))
        net.loadings.copy_(torch.as_tensor(loadings, dtype=torch.float32))
        net.levels.copy_(torch.as_tensor(levels, dtype=torch.float32))
    params = {
        "method": "axes",
        "rank": int(k),
        "n_pcs": n_pcs_final,
        "embedding_dim": int(values.shape[1]),
        "n_embedding_genes": len(values),
        "gene_match": report,
        "shuffle_embeddings": shuffled,
        "image_alphas": [float(a) for a in fit.image_alphas[:k]],
        "map_alphas": [float(a) for a in fit.map_alphas],
        **record,
    }
    params.pop("crossfit", None)
    data.config.update(
        form="axes",
        axes_rank=int(k),
        n_pcs=n_pcs_final,
        embedding_dim=int(values.shape[1]),
        embedding_genes=[str(g) for g in table.index],
        gene_embeddings_provenance=dict(table.attrs.get("histoexp", {})),
        shuffle_embeddings=shuffled,
        params={**data.params, **params},
    )
    model = ZeroshotModel([net], data.config, arrays={"gene_embeddings": values.astype(np.float32)})
    _attach(model, expr, None, tables)
    if zs_tables is not None:
        model.arrays.update({n: np.asarray(v, dtype=np.float32) for n, v in zs_tables.items()})
    model.config["crossfit"] = record.get("crossfit")
    model.config["smooth_predictions"] = 0.0
    if record.get("crossfit"):
        params["crossfit"] = {n: v for n, v in record["crossfit"].items() if n != "levels"}
    write_fit_keys(data, key_added, params=params, obsm={img_key: fit.scores(z)[:, :k].astype(np.float32)})
    return model
