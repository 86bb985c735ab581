"""HEST-1k samples (mahmoodlab/HEST) in histoexp's AnnData conventions.

A HEST-1k folder holds, per sample id: ``st/<id>.h5ad`` (counts, ``obsm['spatial']`` in full-resolution WSI pixels),
``wsis/<id>.tif`` (pyramidal H&E), ``metadata/<id>.json`` (``pixel_size_um_estimated``,
``pixel_size_um_embedded``, ``magnification``, ``st_technology``, ``spot_diameter``, ``inter_spot_dist``, ...),
and optionally ``patches/<id>.h5`` (224 x 224 px patches at 0.5 µm/px: datasets ``img``, ``coords`` = top-left
corner in full-resolution pixels, ``barcode``), ``spatial_plots/``, ``tissue_seg/``, ``cellvit_seg/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import HIRES_MAX_SIDE
from .._settings import logger
from .._utils import jsonable
from ..image._slide import image_file_shape, read_downscaled

__all__ = ["HEST_PATCH_MPP", "HEST_PATCH_PX", "hest_paths", "read_hest"]

HEST_PATCH_PX = 224
HEST_PATCH_MPP = 0.5

# HEST metadata values of st_technology -> spot diameter used when the metadata has none
_SPOT_DIAMETER_UM = {"visium": 55.0, "spatial transcriptomics": 100.0}


def hest_paths(root: str | os.PathLike, sample_id: str) -> dict[str, Path]:
    """Paths of one HEST sample's files under ``root`` (whether they exist or not)."""
    root = Path(root)
    return {
        "st": root / "st" / f"{sample_id}.h5ad",
        "wsi": root / "wsis" / f"{sample_id}.tif",
        "metadata": root / "metadata" / f"{sample_id}.json",
        "patches": root / "patches" / f"{sample_id}.h5",
    }


def _resolve(sample: str | os.PathLike, root: str | os.PathLike | None) -> tuple[Path, str]:
    """``(root, id)`` from an id (with ``root``), a HEST folder holding one sample, or a path to ``st/<id>.h5ad``."""
    p = Path(sample)
    if p.suffix == ".h5ad" and p.is_file():
        return p.resolve().parent.parent, p.stem
    if p.is_dir():
        ids = sorted(q.stem for q in (p / "st").glob("*.h5ad")) if (p / "st").is_dir() else []
        if len(ids) != 1:
            raise ValueError(
                f"`sample={str(sample)!r}` is a folder with {len(ids)} samples under st/ ({ids[:5]}); pass the id "
                "and the folder as `root=`."
            )
        return p.resolve(), ids[0]
    if root is None:
        raise ValueError(
            f"`sample={str(sample)!r}` is neither a HEST folder nor an st/<id>.h5ad file; pass the sample id with "
            "`root=` (the folder holding st/, wsis/, metadata/), or use hx.datasets.hest(...) to download it."
        )
    return Path(root).resolve(), str(sample)


def _mpp(meta: dict, mpp: float | None, sample_id: str) -> tuple[float, str]:
    if mpp is not None:
        mpp = float(mpp)
        if not np.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"`mpp` must be a positive number of µm per pixel, got {mpp!r}.")
        return mpp, "argument"
    for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):
        v = meta.get(key)
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if np.isfinite(v) and v > 0:
            return v, f"HEST metadata {key}"
    raise ValueError(
        f"read_hest({sample_id!r}): the metadata has neither pixel_size_um_estimated nor pixel_size_um_embedded; "
        "pass `mpp=` (µm per pixel of the WSI)."
    )


def _read_patches(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        for name in ("img", "coords", "barcode"):
            if name not in f:
                raise ValueError(f"HEST patches file {str(path)!r} has no dataset {name!r} (found {sorted(f)}).")
        barcodes = np.asarray(f["barcode"][()]).reshape(-1)
        barcodes = np.array([b.decode() if isinstance(b, bytes) else str(b) for b in barcodes])
        return np.asarray(f["img"][()]), np.asarray(f["coords"][()]), barcodes


def read_hest(
    sample: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    mpp: float | None = None,
    patches: bool = False,
    patches_key: str = "hest_patches",
    library_id: str | None = None,
    image: bool = True,
) -> AnnData:
    """Read a HEST-1k sample into histoexp's AnnData conventions.

    Parameters
    ----------
    sample
        A sample id (with ``root``), a HEST folder holding one sample, or the path of its ``st/<id>.h5ad``.
    root
        The HEST folder holding ``st/``, ``wsis/``, ``metadata/`` (and optionally ``patches/``).
    mpp
        µm per pixel of the WSI; default from the metadata: ``pixel_size_um_estimated``, else
        ``pixel_size_um_embedded`` (the source is logged and recorded as ``metadata['mpp_source']``).
    patches
        Also read HEST's own patches (``patches/<id>.h5``: 224 px at 0.5 µm/px, 112 µm) into ``obsm[patches_key]``
        with the record of :func:`histoexp.pp.extract_patches` (``store='memory'``), so that
        :func:`histoexp.tl.embed_patches` can use them (``patches_key=...``). Spots without a HEST patch (HEST
        leaves out spots off the tissue or off the slide) are dropped, with a warning giving their number.
    patches_key
        Key of that patch record.
    library_id
        Section name in ``obs['library_id']`` and ``uns['spatial']`` (default: the sample id).
    image
        Attach the WSI (``metadata['source_image_path']``) and a downscaled copy for plots. ``False``: counts and
        coordinates only.

    Returns
    -------
    AnnData as :func:`histoexp.io.read_st` gives it:

    - ``X``: the counts of ``st/<id>.h5ad`` (float32 CSR), ``var``/``obs`` columns kept, ``obs['library_id']``;
    - ``obsm['spatial']``: spot centres in full-resolution WSI pixels (HEST's own coordinates);
    - ``uns['spatial'][library_id]``: ``images['hires']`` (longest side about 2000 px, read from the WSI pyramid),
      ``scalefactors`` (``tissue_hires_scalef``, ``spot_diameter_fullres``, ``microns_per_pixel``) and
      ``metadata`` (``source_image_path`` = the WSI, ``microns_per_pixel``, ``mpp_source``, ``platform``,
      ``spot_diameter_um``, ``pitch_um``, ``fullres_shape``, and ``hest`` = the sample's HEST metadata).

    Raises
    ------
    FileNotFoundError
        A file the sample needs is missing (the message names it and how to download it).
    ValueError
        No µm/px; a patches file whose coordinates do not match the spots.
    """
    import anndata as ad
    from scipy import sparse

    root_dir, sid = _resolve(sample, root)
    paths = hest_paths(root_dir, sid)
    need = ["st", "metadata"] + (["wsi"] if image else []) + (["patches"] if patches else [])
    missing = [str(paths[k]) for k in need if not paths[k].is_file()]
    if missing:
        raise FileNotFoundError(
            f"read_hest({sid!r}): missing {missing}. Download the sample with `hx.datasets.hest({sid!r}, "
            "data_dir=...)` (HEST-1k on the Hugging Face hub, gated: accept the terms at "
            "https://huggingface.co/datasets/MahmoodLab/hest and log in)."
        )
    meta = json.loads(paths["metadata"].read_text())
    lib = str(library_id or sid)
    mpp_val, mpp_source = _mpp(meta, mpp, sid)
    logger.info("read_hest(%s): %.4f µm/px (source: %s).", sid, mpp_val, mpp_source)

    src = ad.read_h5ad(paths["st"])
    if "spatial" not in src.obsm:
        raise ValueError(f"read_hest({sid!r}): {str(paths['st'])!r} has no obsm['spatial'] (spot pixel coordinates).")
    X = src.X if sparse.issparse(src.X) else sparse.csr_matrix(np.asarray(src.X))
    obs = src.obs.copy()
    obs.index = obs.index.astype(str)
    adata = AnnData(X=sparse.csr_matrix(X, dtype=np.float32), obs=obs, var=src.var.copy())
    adata.var_names_make_unique()
    adata.obs["library_id"] = pd.Categorical([lib] * adata.n_obs, categories=[lib])
    adata.obsm["spatial"] = np.asarray(src.obsm["spatial"], dtype=np.float64)[:, :2]

    tech = str(meta.get("st_technology") or "")
    spot_um = meta.get("spot_diameter")
    if spot_um is None or not np.isfinite(float(spot_um)):
        spot_um = _SPOT_DIAMETER_UM.get(tech.lower())
    metadata: dict[str, Any] = {
        "microns_per_pixel": mpp_val,
        "mpp_source": mpp_source,
        "platform": tech,
        "spot_diameter_um": float(spot_um) if spot_um is not None else None,
        "pitch_um": float(meta["inter_spot_dist"]) if meta.get("inter_spot_dist") is not None else None,
        "hest_id": sid,
        "hest": jsonable(meta),
        "source_image_path": "",
    }
    scalefactors: dict[str, float] = {"microns_per_pixel": mpp_val, "tissue_hires_scalef": 1.0}
    if spot_um is not None:
        scalefactors["spot_diameter_fullres"] = float(spot_um) / mpp_val
    entry: dict[str, Any] = {"scalefactors": scalefactors, "metadata": metadata}
    if image:
        H, W = image_file_shape(paths["wsi"], arg="sample")
        hires, scalef, _ = read_downscaled(paths["wsi"], HIRES_MAX_SIDE, arg="sample")
        entry["images"] = {"hires": hires}
        scalefactors["tissue_hires_scalef"] = float(scalef)
        metadata["source_image_path"] = str(paths["wsi"])
        metadata["fullres_shape"] = [int(H), int(W)]
        xy = adata.obsm["spatial"]
        outside = (xy[:, 0] < 0) | (xy[:, 0] > W - 1) | (xy[:, 1] < 0) | (xy[:, 1] > H - 1)
        if outside.any():
            logger.warning("read_hest(%s): %d spot centres lie outside the WSI (%d x %d px).", sid, outside.sum(), W, H)
    adata.uns["spatial"] = {lib: entry}

    if patches:
        adata = _attach_patches(adata, paths["patches"], key=patches_key, mpp=mpp_val, lib=lib, sid=sid)
    return adata


def _attach_patches(adata: AnnData, path: Path, *, key: str, mpp: float, lib: str, sid: str) -> AnnData:
    img, coords, barcodes = _read_patches(path)
    if img.ndim != 4 or img.shape[-1] != 3 or img.shape[1] != img.shape[2] or img.dtype != np.uint8:
        raise ValueError(
            f"HEST patches {str(path)!r}: expected uint8 (n, px, px, 3) images, got {img.dtype} {img.shape}."
        )
    if len(coords) != len(img) or len(barcodes) != len(img):
        raise ValueError(
            f"HEST patches {str(path)!r}: {len(img)} images, {len(coords)} coords, {len(barcodes)} barcodes."
        )
    pos = pd.Index(adata.obs_names).get_indexer(barcodes)
    if (pos < 0).any():
        raise ValueError(
            f"HEST patches {str(path)!r}: {int((pos < 0).sum())} barcodes are not spots of the sample "
            f"(e.g. {barcodes[pos < 0][:3].tolist()})."
        )
    px = int(img.shape[1])
    # the patch's centre in full-resolution pixels must be the spot's centre (HEST: top-left = centre - size // 2)
    size_src = px * HEST_PATCH_MPP / mpp
    centre = coords[:, :2].astype(np.float64) + size_src // 2
    err = np.abs(centre - adata.obsm["spatial"][pos]).max(initial=0.0)
    if err > max(2.0, 0.02 * size_src):
        raise ValueError(
            f"HEST patches {str(path)!r} are not centred on the spots: up to {err:.1f} px off at {mpp:.4g} µm/px "
            f"(expected patches of {px} px at {HEST_PATCH_MPP} µm/px). Check `mpp=`."
        )
    keep = np.zeros(adata.n_obs, dtype=bool)
    keep[pos] = True
    if not keep.all():
        logger.warning(
            "read_hest(%s): %d of %d spots have no HEST patch (off tissue or slide) and are dropped.",
            sid,
            int((~keep).sum()),
            adata.n_obs,
        )
    adata = adata[keep].copy()
    arr = img[np.argsort(pos)]  # the kept spots in adata order: the file rows sorted by spot position
    fov = px * HEST_PATCH_MPP
    adata.obsm[key] = arr
    adata.obs[f"{key}_outside"] = np.zeros(adata.n_obs, dtype=np.float32)
    meta = adata.uns["spatial"][lib]["metadata"]
    adata.uns.setdefault("histoexp", {})[key] = jsonable(
        {
            "size_um": fov,
            "context": 1.0,
            "fov_um": fov,
            "patch_px": px,
            "mpp": HEST_PATCH_MPP,
            "mpp_requested": HEST_PATCH_MPP,
            "store": "memory",
            "path": "",
            "library_key": "library_id",
            "source": f"HEST patches file {path}",
            "libraries": {
                lib: {
                    "mpp": mpp,
                    "mpp_source": meta["mpp_source"],
                    "size_px_fullres": size_src,
                    "image": meta.get("source_image_path", ""),
                    "shape": list(meta.get("fullres_shape", [])),
                }
            },
        }
    )
    logger.info(
        "read_hest(%s): %d HEST patches of %d px (%.0f µm at %.2f µm/px) in obsm[%r].",
        sid,
        len(arr),
        px,
        fov,
        HEST_PATCH_MPP,
        key,
    )
    return adata
