"""HEST-1k (Jaume et al. 2024): 1,229 spatial transcriptomics profiles with H&E, on the Hugging Face hub."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from anndata import AnnData

from .._settings import logger, settings

__all__ = ["HEST_REPO", "DatasetUnavailableError", "hest"]

HEST_REPO = "MahmoodLab/hest"


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be obtained (offline, gated repository, missing token)."""


def _default_dir() -> Path:
    if settings.data_dir is not None:
        return Path(settings.data_dir) / "hest"
    import pooch

    return Path(pooch.os_cache("histoexp")) / "hest"


def _patterns(sample_id: str, patches: bool) -> list[str]:
    pats = [f"st/{sample_id}.h5ad", f"wsis/{sample_id}.tif", f"metadata/{sample_id}.json"]
    if patches:
        pats.append(f"patches/{sample_id}.h5")
    return pats


def hest(
    ids: str | Sequence[str],
    *,
    data_dir: str | os.PathLike | None = None,
    patches: bool = True,
    download: bool = True,
    mpp: float | None = None,
    join: str = "inner",
) -> AnnData:
    """HEST-1k samples as AnnData (:func:`histoexp.io.read_hest`), downloaded from the Hugging Face hub if missing.

    HEST-1k (Jaume et al., *HEST-1k: A Dataset for Spatial Transcriptomics and Histology Image Analysis*, NeurIPS
    2024) pairs 1,229 spatial transcriptomics profiles with their whole-slide H&E images, all in one layout
    (``st/``, ``wsis/``, ``metadata/``, ``patches/``); her2st is part of it as ``SPA119`` ... ``SPA154``. The dataset
    is gated: accept its terms at https://huggingface.co/datasets/MahmoodLab/hest, then log in
    (``huggingface-cli login`` or the ``HF_TOKEN`` environment variable).

    Parameters
    ----------
    ids
        A sample id (``'TENX95'``, ``'SPA119'``, ...) or a list of them.
    data_dir
        Local HEST folder (holding ``st/``, ``wsis/``, ``metadata/``). Default: ``hx.settings.data_dir / 'hest'``
        (``$HISTOEXP_DATA_DIR``), else the user cache. Files already there are used as they are; only missing
        files are downloaded, with :func:`huggingface_hub.snapshot_download` (``repo_type='dataset'``,
        ``allow_patterns`` restricted to the samples asked for).
    patches
        Also fetch and read HEST's patches (``patches/<id>.h5``, 224 px at 0.5 µm/px) into
        ``obsm['hest_patches']`` (see :func:`histoexp.io.read_hest`).
    download
        ``False``: never download; missing files are an error.
    mpp
        Override the WSI's µm/px (default from the metadata).
    join
        How genes are combined for several samples (:func:`anndata.concat`).

    Returns
    -------
    One AnnData; several samples are concatenated (``obs['library_id']`` = sample id, one ``uns['spatial']``
    entry and one patch-record library per sample; when barcodes repeat across samples, ``obs_names`` become
    ``'<sample id>_<barcode>'``).

    Raises
    ------
    DatasetUnavailableError
        The files are missing and cannot be downloaded (offline, gated access not granted, no token).
    """
    from ..io._hest import hest_paths, read_hest

    ids = [ids] if isinstance(ids, str) else list(ids)
    if not ids or not all(isinstance(i, str) and i for i in ids):
        raise ValueError(f"`ids` must be a sample id or a list of sample ids, got {ids!r}.")
    root = Path(data_dir) if data_dir is not None else _default_dir()
    wanted = ["st", "wsi", "metadata"] + (["patches"] if patches else [])
    missing = [i for i in ids if not all(hest_paths(root, i)[k].is_file() for k in wanted)]
    if missing:
        if not download:
            raise FileNotFoundError(
                f"HEST samples {missing} are not complete in {str(root)!r} and `download=False`. Expected "
                f"{[str(hest_paths(root, missing[0])[k]) for k in wanted]}."
            )
        _download(missing, root, patches)
    adatas = [read_hest(i, root=root, mpp=mpp, patches=patches) for i in ids]
    return adatas[0] if len(adatas) == 1 else _concat(adatas, join)


def _download(ids: list[str], root: Path, patches: bool) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ImportError("Downloading HEST-1k needs huggingface_hub: `pip install histoexp[hf]`.") from err
    patterns = [p for i in ids for p in _patterns(i, patches)]
    logger.info("Downloading HEST-1k samples %s from %s into %s.", ids, HEST_REPO, root)
    try:
        snapshot_download(repo_id=HEST_REPO, repo_type="dataset", local_dir=str(root), allow_patterns=patterns)
    except Exception as err:
        mod = type(err).__module__ or ""
        if isinstance(err, (OSError, ConnectionError, TimeoutError)) or mod.startswith(("huggingface_hub", "httpx")):
            raise DatasetUnavailableError(
                f"Could not download HEST-1k samples {ids} ({type(err).__name__}: {err}).\n"
                "HEST-1k is gated: accept its terms at https://huggingface.co/datasets/MahmoodLab/hest, then provide "
                "a token (`huggingface-cli login` or the HF_TOKEN environment variable), with network access.\n"
                f"Or place the files yourself under `data_dir` ({str(root)!r}): st/<id>.h5ad, wsis/<id>.tif, "
                "metadata/<id>.json (and patches/<id>.h5), then call again (or hx.io.read_hest(id, root=...))."
            ) from err
        raise


def _concat(adatas: list[AnnData], join: str) -> AnnData:
    import anndata as ad
    import pandas as pd

    libs = [a.obs["library_id"].cat.categories[0] for a in adatas]
    names = [n for a in adatas for n in a.obs_names]
    if len(set(names)) < len(names):  # barcodes repeat across samples (Visium): prefix the sample id
        logger.info("hest: barcodes repeat across samples; obs_names are '<sample id>_<barcode>'.")
        adatas = [a.copy() for a in adatas]
        for a, lib in zip(adatas, libs, strict=True):
            a.obs_names = [f"{lib}_{n}" for n in a.obs_names]
    out = ad.concat(adatas, join=join, merge="same")
    out.obs["library_id"] = pd.Categorical(out.obs["library_id"].astype(str), categories=libs)
    out.uns["spatial"] = {k: v for a in adatas for k, v in a.uns["spatial"].items()}
    recs = [a.uns.get("histoexp", {}).get("hest_patches") for a in adatas]
    if all(r is not None for r in recs):
        rec = dict(recs[0])
        rec["libraries"] = {k: v for r in recs for k, v in r["libraries"].items()}
        rec["source"] = "HEST patches files"
        out.uns["histoexp"] = {"hest_patches": rec}
    return out
