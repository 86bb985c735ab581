"""The HER2-positive breast cancer legacy-ST dataset (her2st, Andersson et al. 2021)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Literal

from anndata import AnnData

from .._constants import ST_PITCH_UM, ST_SPOT_DIAMETER_UM
from .._settings import logger, settings
from . import _registry

_CNTS = "data/ST-cnts/{s}.tsv.gz"
_SPOTS = "data/ST-spotfiles/{s}_selection.tsv"
_IMG_DIR = "data/ST-imgs/{p}/{s}/"


def _sections() -> list[str]:
    out = [m.group(1) for k in _registry.REGISTRY if (m := re.fullmatch(r"data/ST-cnts/(\w+)\.tsv\.gz", k))]
    return sorted(out)


def her2st_sections(*, images: bool | None = None) -> list[str]:
    """Names of the her2st sections (``'A1'`` ... ``'H3'``).

    Parameters
    ----------
    images
        ``True``: only the sections with an H&E image (C2..C6); ``False``: only the count-only ones;
        ``None``: all.
    """
    names = _sections()
    if images is None:
        return names
    return [s for s in names if (_image_key(s) is not None) == bool(images)]


def _image_key(section: str) -> str | None:
    prefix = _IMG_DIR.format(p=section[0], s=section)
    keys = [k for k in _registry.REGISTRY if k.startswith(prefix)]
    return keys[0] if keys else None


def _cache_dir() -> Path:
    """Where missing files are downloaded: ``settings.data_dir / 'her2st'``, else the user cache."""
    if settings.data_dir is not None:
        return Path(settings.data_dir) / "her2st"
    import pooch

    return Path(pooch.os_cache("histoexp")) / "her2st"


def _as_root(path: str | os.PathLike | None) -> Path | None:
    """her2st root (the folder that contains ``data/``) for ``path``, accepting the root, ``data/`` or a parent."""
    if path is None:
        return None
    p = Path(path).expanduser()
    for cand in (p, p.parent if p.name == "data" else None, p / "her2st"):
        if cand is not None and (cand / "data").is_dir():
            return cand.resolve()
    return None


def _fetcher(path: Path):
    import pooch

    return pooch.create(
        path=path,
        base_url=_registry.BASE_URL,
        registry=dict(_registry.REGISTRY),
        retry_if_failed=2,
    )


def _fetch(rel: str, roots: list[Path]) -> Path:
    """Local file from the first root that has it, else a pooch download (sha256-checked) into the cache."""
    for root in roots:
        p = root / rel
        if p.is_file():
            return p
    cache = _cache_dir()
    logger.info("her2st: %s not found locally; fetching it into %s (sha256 checked).", rel, cache)
    fetcher = _fetcher(cache)
    try:
        return Path(fetcher.fetch(rel, progressbar=settings.progress))
    except _network_errors() as err:
        # one actionable message instead of the requests/urllib3 traceback chain
        cause = str(err).splitlines()[0] if str(err) else ""
        cause = cause if len(cause) <= 160 else cause[:157] + "..."
        searched = ", ".join(str(r) for r in roots) or "no local folder given"
        raise ConnectionError(
            f"her2st: could not download {rel!r} from {fetcher.get_url(rel)} ({type(err).__name__}: {cause}). "
            f"No local copy was found (searched: {searched}; download cache: {cache}). Without internet, point "
            "histoexp at a local copy of https://github.com/almaan/her2st (the folder holding data/ST-cnts): pass "
            "`data_dir=` to hx.datasets.her2st, set hx.settings.data_dir or the environment variable "
            "HISTOEXP_DATA_DIR, or use `--data-dir` on the command line."
        ) from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions pooch lets through when a download fails (no network, DNS, timeouts, HTTP errors)."""
    import socket
    import urllib.error

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError]
    try:
        import requests

        errors.append(requests.exceptions.RequestException)
    except ImportError:  # pragma: no cover - pooch depends on requests
        pass
    return tuple(errors)


def _expand(section: str | Sequence[str]) -> list[str]:
    valid = _sections()
    names = [section] if isinstance(section, str) else list(section)
    if not names:
        raise ValueError(f"`section`: got an empty list; expected one or more of {valid}.")
    out: list[str] = []
    for name in names:
        name = str(name)
        if name in valid:
            out.append(name)
        elif len(name) == 1 and any(v.startswith(name) for v in valid):  # a patient: all its sections
            out.extend(v for v in valid if v.startswith(name))
        else:
            raise ValueError(
                f"`section`: unknown her2st section {name!r}; expected one of {valid} "
                f"(or a patient letter {sorted({v[0] for v in valid})} for all its sections)."
            )
    if len(set(out)) != len(out):
        raise ValueError(f"`section`: duplicated sections in {out}.")
    return out


def _load_one(section: str, roots: list[Path]) -> AnnData:
    from ..io import read_st

    counts = _fetch(_CNTS.format(s=section), roots)
    spots = _fetch(_SPOTS.format(s=section), roots)
    img_key = _image_key(section)
    image = _fetch(img_key, roots) if img_key is not None else None
    if image is None:
        logger.info("her2st(%s): no H&E image is published for this section; counts and coordinates only.", section)
    adata = read_st(
        counts, spots, image, library_id=section, spot_diameter_um=ST_SPOT_DIAMETER_UM, pitch_um=ST_PITCH_UM
    )
    adata.uns["spatial"][section]["metadata"]["dataset"] = "her2st"
    return adata


def her2st(
    section: str | Sequence[str] = "C2",
    *,
    data_dir: str | os.PathLike | None = None,
    library_key: str = "library_id",
    join: Literal["inner", "outer"] = "inner",
) -> AnnData:
    """HER2-positive breast cancer legacy Spatial Transcriptomics sections (her2st).

    Andersson et al., *Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated cell
    type interactions*, Nature Communications 12, 6012 (2021); files from https://github.com/almaan/her2st.
    100 µm spots at 200 µm centre-to-centre; H&E images (about 9,300 x 9,900 px, about 0.69 µm/px) are
    published for the five sections of patient C (``'C2'`` ... ``'C6'``); every other section loads with
    counts and coordinates only (logged at INFO level).

    Files are looked up in `data_dir`, then in ``hx.settings.data_dir`` (``$HISTOEXP_DATA_DIR``), each either
    the her2st root (holding ``data/``), ``data/`` itself, or a folder holding ``her2st/data``. Missing files
    are downloaded with :mod:`pooch` from ``https://github.com/almaan/her2st/raw/master/<path>`` into
    ``hx.settings.data_dir / 'her2st'`` (or ``pooch.os_cache('histoexp') / 'her2st'``) and checked against
    sha256 hashes pinned in the package.

    Parameters
    ----------
    section
        A section name (``'A1'`` ... ``'H3'``; 35 sections, B4 is not offered), a patient letter (``'C'`` =
        ``'C1'`` ... ``'C6'``), or a list of these.
    data_dir
        Local copy of the data (see above).
    library_key
        Column of ``obs`` holding the section name (categorical, categories in the requested order).
    join
        How genes are combined for several sections (:func:`anndata.concat`): ``'inner'`` keeps the genes
        present in every section's count file, ``'outer'`` keeps all, with zero counts where absent.

    Returns
    -------
    AnnData (one object for several sections), read by :func:`histoexp.io.read_st`:

    - ``X``: raw counts, CSR ``float32``; ``var_names``: gene symbols (about 15,000 per section).
    - ``obs_names``: ``f"{section}_{x}x{y}"``; ``obs['array_x']``, ``obs['array_y']``, ``obs['new_x']``,
      ``obs['new_y']``, ``obs[library_key]`` (categorical).
    - ``obsm['spatial']``: ``(pixel_x, pixel_y)`` in full-resolution image pixels.
    - ``uns['spatial'][section]`` for each section:

      - ``'images'``: ``{'hires': uint8 (h, w, 3)}`` (longest side 2000 px), sections with an image only;
      - ``'scalefactors'``: ``'spot_diameter_fullres'`` (100 µm / µm-per-px, about 145 px),
        ``'microns_per_pixel'`` and ``'tissue_hires_scalef'`` (``1.0`` for sections without an image);
      - ``'metadata'``: ``'source_image_path'`` (absolute path of the full-resolution JPEG, ``''`` without
        image), ``'microns_per_pixel'``, ``'mpp_source'`` (``'spot grid'``: fitted from the 200 µm array
        pitch), ``'px_per_array_step'``, ``'platform'`` (``'legacy ST'``), ``'spot_diameter_um'``,
        ``'pitch_um'``, ``'dataset'`` (``'her2st'``) and, with an image, ``'fullres_shape'`` (``[h, w]``).

    Raises
    ------
    ConnectionError
        A file is neither local nor downloadable (e.g. offline on a first run); the message says where it
        looked, the URL it tried, and how to point histoexp at a local copy.

    Examples
    --------
    >>> import histoexp as hx
    >>> adata = hx.datasets.her2st(["C2", "C3"])  # doctest: +SKIP
    >>> adata.obs["library_id"].cat.categories.tolist()  # doctest: +SKIP
    ['C2', 'C3']
    """
    import anndata as ad
    import pandas as pd

    if join not in ("inner", "outer"):
        raise ValueError(f"`join` must be 'inner' or 'outer', got {join!r}.")
    if not isinstance(library_key, str) or not library_key:
        raise ValueError(f"`library_key` must be a non-empty string, got {library_key!r}.")
    sections = _expand(section)
    roots: list[Path] = []
    if data_dir is not None:
        if not Path(data_dir).expanduser().exists():
            raise FileNotFoundError(f"`data_dir`: no such directory: {str(data_dir)!r}.")
        root = _as_root(data_dir)
        if root is None:
            logger.warning("her2st: `data_dir=%s` holds no her2st `data/` folder; files will be fetched.", data_dir)
        else:
            roots.append(root)
    if settings.data_dir is not None and (root := _as_root(settings.data_dir)) is not None:
        roots.append(root)
    cache_root = _as_root(_cache_dir())
    if cache_root is not None and cache_root not in roots:
        roots.append(cache_root)

    parts = [_load_one(s, roots) for s in sections]
    for a, s in zip(parts, sections, strict=True):
        if library_key != "library_id":
            a.obs[library_key] = a.obs.pop("library_id")
        a.obs[library_key] = pd.Categorical([s] * a.n_obs, categories=sections)
    if len(parts) == 1:
        return parts[0]
    spatial = {s: a.uns["spatial"][s] for a, s in zip(parts, sections, strict=True)}
    fill = 0 if join == "outer" else None
    adata = ad.concat(parts, join=join, merge="same", fill_value=fill)
    adata.obs[library_key] = pd.Categorical(adata.obs[library_key].astype(str), categories=sections)
    adata.uns["spatial"] = spatial
    logger.info("her2st: %d sections, %d spots x %d genes (join=%r).", len(parts), adata.n_obs, adata.n_vars, join)
    return adata


def her2st_gene_panel() -> list[str]:
    """Return the 785-gene panel used for her2st by HisToGene, Hist2ST and later papers.

    Returns
    -------
    Gene symbols, in the published order (shipped as ``histoexp/datasets/her2st_genes_785.txt``).
    """
    text = files("histoexp.datasets").joinpath("her2st_genes_785.txt").read_text(encoding="utf-8")
    return [g.strip() for g in text.splitlines() if g.strip()]
