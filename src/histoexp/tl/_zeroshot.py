"""Zero-shot gene prediction: ``fit_zeroshot``, image embedding · projected gene embedding (SGN) and its options."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

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


@one_progress_bar("fit_zeroshot")
def fit_zeroshot(
    adata: AnnData,
    *,
    gene_embeddings: pd.DataFrame | str,
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
) -> ZeroshotModel:
    """Train a zero-shot model: it predicts genes it never trained on, from their gene embeddings.

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

    On her2st (``benchmarks/her2st_zeroshot.py``: leave-one-section-out over C2..C6 × five gene folds of the
    785-gene panel, handcrafted features, embeddings from the co-expression of the 29 count-only sections of
    the other patients, ``genes_per_step=128``), unseen genes reach PCC@M 0.122 / PCC@H 0.385 with the SGN form,
    98 % of ridge trained on those very genes (0.124 / 0.391); graph 0.125, nuclei 0.123, prompter 0.120, all
    three 0.123: the parts change little on frozen handcrafted features. The simple baseline (each unseen gene
    as the similarity-weighted mix of 20 seen genes' ridge predictions) reaches 0.132. MSE stays higher than the
    supervised model's (0.384 vs 0.244): a co-expression embedding carries no expression level.

    Deviations from the papers, on purpose: frozen image features only (SGN trains a ResNet-18 and a graph over
    windows; the nuclei branch of the paper segments nuclei); the gene embeddings are whatever the user brings
    (SGN embeds LLM-written gene descriptions); all training genes are used in every step unless
    ``genes_per_step`` (SGN samples 64).

    Parameters
    ----------
    adata
        Training spots with counts and image features in ``obsm[use_rep]``.
    gene_embeddings
        Genes × dims DataFrame (:func:`histoexp.pp.gene_embeddings`) or a key of ``adata.varm`` written by it.
        Every training gene needs an embedding; the model keeps the whole table and can predict any gene in it.
    genes
        Training genes, resolved by :func:`histoexp.pp.select_genes` (list, ``'her2st'``, ``'all'``, int = that
        many HVGs, ``None`` = 250 HVGs); each needs an embedding.
    layer, normalize
        Counts layer and normalisation of the targets (as :func:`histoexp.tl.fit_bleep`).
    use_rep, encoder
        ``obsm`` key of the frozen image features (``None``: ``f'X_{encoder}'``).
    n_pcs
        Whitened principal components of the image features (``None``: standardised features as they are).
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
        Validation sections for early stopping (see :func:`histoexp.train.split_by_library`).
    checkpoint_dir, resume
        Per-epoch checkpoints and resume (see :func:`histoexp.train.fit`).
    key_added
        Writes ``obsm[f'X_{key_added}_image']`` (spot embeddings; an ensemble's first member) and
        ``uns[key_added]`` (``params``, ``genes``, ``history``).
    overwrite
        Replace those keys when histoexp did not write them (a re-run replaces the keys this function wrote without it).
    random_state
        Seed: the same seed on the same device gives the same model.
    device
        Torch device (``None``: ``hx.settings.device``).

    Returns
    -------
    ZeroshotModel
        A regression model (:class:`~histoexp.models.zeroshot.ZeroshotModel`; ``.save(dir)``,
        :func:`histoexp.tl.load_model`); predict with ``hx.tl.impute(query, model, genes=[...])``.
    """
    import torch

    from .._distributed import broadcast_batch
    from ..models.zeroshot import ZeroshotModel, zeroshot_loss
    from ..pp import select_genes
    from ..pp._gene_embeddings import match_genes
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

    table = _embedding_table(adata, gene_embeddings)
    gene_list = select_genes(adata, genes, layer=layer)
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
    if graph_k and graph_k >= len(gene_list):
        raise ValueError(f"`graph_k={graph_k}` must be below the number of training genes ({len(gene_list)}).")
    # the stored table is indexed by the training data's names for matched training genes
    rename = {mapping[g]: g for g in gene_list if mapping[g] != g}
    table = table.rename(index=rename)
    if not table.index.is_unique:
        raise ValueError("`aliases` map two genes of the embedding table onto one training gene name.")

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
    data.config.update(params={**data.params, **params}, history=history)
    model = ZeroshotModel(nets, data.config, arrays={"gene_embeddings": table.to_numpy(dtype=np.float32)})
    h = model._run_images(lambda net, x: net.encode_image(x), data.images, member=0, desc="image embeddings")[0]
    write_fit_keys(data, key_added, params=params, history=history, obsm={img_key: h})
    return model
