"""H&E-only prediction on whole slides: one slide (:func:`impute_slide`) or many (:func:`impute_slides`).

One slide: ``tile_tissue`` -> patches read from the slide on demand (``store='none'``) -> ``embed_patches``
(streamed in batches) -> ``impute``. Nothing holds the decoded slide or all the patches at once: memory is the
tissue thumbnail, one batch of patches and the per-tile results.

Many slides: one output per slide in a folder, written atomically, with a completion marker next to it, so a
run that is killed can be started again and skips what is done; a failing slide is recorded and the others go
on. Across machines the slide list is split with ``shard=(i, n)``: any array-job runner (SLURM/SGE/LSF arrays,
Snakemake, Nextflow) starts ``n`` independent copies of the same command.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import IMAGE_SUFFIXES, ST_SPOT_DIAMETER_UM
from .._settings import logger, settings
from .._utils import jsonable, progress

__all__ = ["impute_slide", "impute_slides", "read_slide_list"]

#: the run record in an output folder of :func:`impute_slides` (model fingerprint and parameters)
RUN_RECORD = "histoexp_slides.json"
#: suffix of the per-slide completion marker (written after the slide's ``.h5ad``)
DONE_SUFFIX = ".done.json"
#: suffix of the per-slide failure record (removed when the slide later succeeds)
FAILED_SUFFIX = ".failed.json"


# --------------------------------------------------------------------------------------------- one slide
def impute_slide(
    image: Any,
    model,
    *,
    mpp: float | None = None,
    tile_um: float | None = None,
    min_tissue: float = 0.5,
    library_id: str = "slide",
    reference: AnnData | Sequence[AnnData] | None = None,
    genes: Sequence[str] | str | None = None,
    k: int | None = None,
    method: str | None = None,
    index: str = "exact",
    index_params: dict | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | None = None,
) -> AnnData:
    """Predict expression over the tissue of an H&E slide, with memory bounded by the batch, not the slide.

    Runs :func:`histoexp.pp.tile_tissue` (tissue detected on a thumbnail; a tile grid at ``tile_um``),
    :func:`histoexp.pp.extract_patches` with ``store='none'`` (each tile's patch is read from the slide by region
    when it is embedded, at the model's patch geometry), :func:`histoexp.tl.embed_query` (the model's encoder in
    batches of ``batch_size``, at the model's ``scales`` for multi-scale features, and NH2ST's neighbourhood
    windows) and :func:`histoexp.tl.impute`.

    Parameters
    ----------
    image
        Path of the slide (JPEG/PNG, TIFF/OME-TIFF pyramid, vendor format such as ``.svs``/``.ndpi`` with
        ``histoexp[slide]``), or an in-memory image :func:`~histoexp.pp.tile_tissue` accepts (a SpatialData image,
        an array: its patches are then extracted with ``store='auto'``, in memory or a temporary zarr store).
    model
        A model from a ``fit_*`` function or :func:`histoexp.tl.load_model`.
    mpp
        µm per pixel of the slide's full resolution; needed unless the file says it.
    tile_um
        Tile side in µm; default the model's patch size (``model.image_spec()['size_um']``), else 100 µm.
    min_tissue
        Minimum tissue fraction of a tile (see :func:`~histoexp.pp.tile_tissue`).
    library_id
        Section id of the result (``obs['library_id']``, ``uns['spatial']``).
    reference, genes, k, method, index, index_params
        Passed to :func:`~histoexp.tl.impute` (``reference``, ``k``, ``method``, ``index``, ``index_params``:
        retrieval models only). ``reference`` may be a :class:`~histoexp.tl.PreparedReference` of the model
        (:func:`~histoexp.tl.prepare_reference`; ``genes`` then ``None``) to reuse one bank across slides.
    batch_size
        Patches per forward pass of the encoder (the memory bound).
    num_workers
        DataLoader workers reading patches (default ``hx.settings.num_workers``).
    device
        Torch device (default ``hx.settings.device``).

    Returns
    -------
    The prediction AnnData of :func:`~histoexp.tl.impute` over the tissue tiles, with
    ``uns['histoexp']['slide']``: ``n_tiles``, ``seconds`` per step (``tiles``, ``embed``, ``predict``, ``total``)
    and ``tiles_per_s`` (tiles over the whole run).

    Raises
    ------
    ValueError
        No tissue tile was found (``min_tissue``, ``tile_um``, ``mpp``), or what the steps raise.
    """
    from ..pp import extract_patches, tile_tissue
    from ._embed import embed_query
    from ._predict import impute

    retrieval = _retrieval_kwargs(model, reference=reference, k=k, method=method, index=index, params=index_params)
    spec = model.image_spec()
    tile_um = float(tile_um or spec.get("size_um") or ST_SPOT_DIAMETER_UM)
    t0 = time.perf_counter()
    query = tile_tissue(image, tile_um=tile_um, mpp=mpp, min_tissue=min_tissue, library_id=library_id)
    if query.n_obs == 0:
        raise ValueError(
            f"`image`: no tile of {tile_um:g} µm has >= {100 * min_tissue:.0f}% tissue; check `mpp`, `tile_um` and "
            "`min_tissue`."
        )
    t1 = time.perf_counter()
    file_backed = isinstance(image, (str, os.PathLike)) or getattr(image, "source", None) is not None
    patch_kw = {"patch_px": spec.get("patch_px") or 224}
    extract_patches(query, size_um=spec.get("size_um") or tile_um, store="none" if file_backed else "auto", **patch_kw)
    # the spot features and any neighbourhood features (NH2ST) of the model's training records
    embed_query(query, model, batch_size=batch_size, num_workers=num_workers, device=device)
    t2 = time.perf_counter()
    pred = impute(query, model, genes=genes, device=device, **retrieval)
    t3 = time.perf_counter()
    n = int(query.n_obs)
    pred.uns.setdefault("histoexp", {})["slide"] = jsonable(
        {
            "n_tiles": n,
            "tile_um": tile_um,
            "seconds": {
                "tiles": round(t1 - t0, 3),
                "embed": round(t2 - t1, 3),
                "predict": round(t3 - t2, 3),
                "total": round(t3 - t0, 3),
            },
            "tiles_per_s": n / max(t3 - t0, 1e-9),
            "batch_size": int(batch_size),
        }
    )
    logger.info("impute_slide: %d tiles in %.1f s (%.1f tiles/s).", n, t3 - t0, n / max(t3 - t0, 1e-9))
    return pred


def _retrieval_kwargs(model, *, reference, k, method, index, params) -> dict:
    """Check and return the retrieval arguments of :func:`impute` before any slide is read (``{}``: regression)."""
    if model.kind != "retrieval":
        given = {"reference": reference, "k": k, "method": method, "index_params": params}
        given["index"] = None if index == "exact" else index
        wrong = [name for name, v in given.items() if v is not None]
        if wrong:
            raise ValueError(f"{wrong} apply to retrieval models; {model.method!r} predicts from the image alone.")
        return {}
    from ._retrieval import INDEXES, _import_faiss, _index_params

    if index not in INDEXES:
        raise ValueError(f"`index` must be one of {INDEXES}, got {index!r}.")
    if index == "exact":
        if params:
            raise ValueError("`index_params` apply to the faiss indexes, not to `index='exact'`.")
    else:
        _import_faiss()  # missing faiss: an error now, not after the slide was embedded
        _index_params(index, params, 1 << 20)  # unknown or bad parameters: likewise
    return {"reference": reference, "k": k, "method": method, "index": index, "index_params": params}


# --------------------------------------------------------------------------------------------- slide lists
def _stem(path: Path) -> str:
    name = path.name
    for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return path.stem


_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def read_slide_list(slides: Any, *, arg: str = "slides") -> pd.DataFrame:
    """Turn a folder, a manifest or a list of slide paths into a table of slides.

    Parameters
    ----------
    slides
        A folder (every image file directly inside it, sorted by name), a CSV manifest (a ``path`` column; optional
        ``slide_id`` and ``mpp`` columns; relative paths are relative to the manifest), a text file with one path a
        line (``.txt``/``.lst``; ``#`` comments), or a sequence of paths.
    arg
        Name of the argument for error messages.

    Returns
    -------
    DataFrame with columns ``slide_id`` (unique; default the file name without its image suffix), ``path``
    (absolute) and ``mpp`` (float, NaN where not given), in the given order.

    Raises
    ------
    ValueError
        No slide, duplicate ids, an id that is not a safe file name, a manifest without ``path``, a bad ``mpp``.
    FileNotFoundError
        The folder or manifest does not exist.
    """
    if isinstance(slides, (str, os.PathLike)):
        p = Path(slides).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"`{arg}`: {str(p)!r} does not exist.")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and _is_image(f))
            table = pd.DataFrame({"path": [str(f) for f in files]})
            where = f"folder {str(p)!r}"
        elif p.suffix.lower() == ".csv":
            table = pd.read_csv(p, dtype={"slide_id": str, "path": str})
            if "path" not in table.columns:
                raise ValueError(
                    f"`{arg}`: the manifest {str(p)!r} has no 'path' column (found {list(table.columns)})."
                )
            table["path"] = [str((p.parent / q).resolve()) if not Path(q).is_absolute() else q for q in table["path"]]
            where = f"manifest {str(p)!r}"
        elif p.suffix.lower() in (".txt", ".lst"):
            lines = [ln.strip() for ln in p.read_text().splitlines()]
            paths = [ln for ln in lines if ln and not ln.startswith("#")]
            table = pd.DataFrame(
                {"path": [str((p.parent / q).resolve()) if not Path(q).is_absolute() else q for q in paths]}
            )
            where = f"list {str(p)!r}"
        elif _is_image(p):
            table = pd.DataFrame({"path": [str(p)]})
            where = f"image {str(p)!r}"
        else:
            raise ValueError(
                f"`{arg}`: {str(p)!r} is not a folder, a .csv manifest, a .txt list or an image file "
                f"({', '.join(IMAGE_SUFFIXES)})."
            )
    else:
        table = pd.DataFrame({"path": [str(Path(q).expanduser()) for q in slides]})
        where = "the list"
    if table.empty:
        raise ValueError(f"`{arg}`: {where} holds no slide (image suffixes: {', '.join(IMAGE_SUFFIXES)}).")
    table["path"] = [str(Path(q).expanduser().absolute()) for q in table["path"]]
    if "slide_id" not in table.columns:
        table["slide_id"] = [_stem(Path(q)) for q in table["path"]]
    table["slide_id"] = [
        str(s) if not pd.isna(s) else _stem(Path(q)) for s, q in zip(table["slide_id"], table["path"], strict=True)
    ]
    bad = [s for s in table["slide_id"] if not _SAFE_ID.match(s)]
    if bad:
        raise ValueError(
            f"`{arg}`: slide ids {bad[:5]} are not safe file names (letters, digits, '.', '_', '+', '-'); give a "
            "'slide_id' column in a CSV manifest."
        )
    dup = table["slide_id"][table["slide_id"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(
            f"`{arg}`: slide ids {dup[:5]} occur more than once (one output per slide is named after its id); give a "
            "unique 'slide_id' column in a CSV manifest."
        )
    mpp = (
        pd.to_numeric(table["mpp"], errors="coerce") if "mpp" in table.columns else pd.Series(np.nan, index=table.index)
    )
    if "mpp" in table.columns:
        given = table["mpp"].notna() & (table["mpp"].astype(str).str.strip() != "")
        if (given & ~(mpp > 0)).any():
            raise ValueError(
                f"`{arg}`: the 'mpp' column holds values that are not positive numbers: "
                f"{table['mpp'][given & ~(mpp > 0)].tolist()[:5]}."
            )
    table["mpp"] = mpp.astype(float)
    return table[["slide_id", "path", "mpp"]].reset_index(drop=True)


def _is_image(p: Path) -> bool:
    name = p.name.lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES)


def parse_shard(shard: Any, *, arg: str = "shard") -> tuple[int, int] | None:
    """``None``, ``(i, n)`` or ``'i/n'`` (0 <= i < n) -> ``(i, n)``; a ValueError naming ``arg`` otherwise."""
    if shard is None:
        return None
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m:
            raise ValueError(f"`{arg}`: expected 'i/n' with 0 <= i < n (e.g. '0/4'), got {shard!r}.")
        shard = (int(m.group(1)), int(m.group(2)))
    try:
        i, n = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ValueError(f"`{arg}`: expected (i, n) or 'i/n' with 0 <= i < n, got {shard!r}.") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"`{arg}`: expected 0 <= i < n and n >= 1, got i={i}, n={n}.")
    return i, n


# --------------------------------------------------------------------------------------------- many slides
def _model_fingerprint(model) -> str:
    text = json.dumps(jsonable(model.config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _source_stamp(path: str) -> dict:
    st = Path(path).stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _read_json(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _write_json(path: Path, rec: dict, *, overwrite: bool = True) -> None:
    from .._fs import atomic_write

    atomic_write(path, lambda p: Path(p).write_text(json.dumps(rec, indent=1, default=str)), overwrite=overwrite)


def _run_record(path: Path) -> dict | None:
    """Return the run record of an output folder (``None``: none yet); raise a ValueError when it is not histoexp's.

    A truncated or foreign file is never taken for "no record": the model check would be off for good and the
    folder would mix models. It is never replaced either (histoexp cannot tell it wrote it).
    """
    if not (path.exists() or path.is_symlink()):
        return None
    rec = _read_json(path)
    if rec is None or rec.get("created_by") != "histoexp" or not isinstance(rec.get("run_id"), str):
        raise ValueError(
            f"`out_dir`: {str(path)!r} is not a run record of impute_slides (unreadable, truncated or another "
            "program's file), so histoexp cannot tell which model and parameters wrote this folder's outputs; it "
            "neither ignores nor replaces the file. Choose another `out_dir`, or move the file (and the outputs "
            "it described) away."
        )
    return rec


def _is_ours(path: Path, slide_id: str) -> bool:
    """Whether the JSON file ``path`` is a per-slide record impute_slides wrote for ``slide_id``."""
    rec = _read_json(path)
    return rec is not None and rec.get("created_by") == "histoexp" and rec.get("slide_id") == slide_id


def _h5ad_run_id(path: Path) -> str | None:
    """Return the run id an ``.h5ad`` of :func:`impute_slides` carries (``uns/histoexp/slide/run_id``), else None."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            ds = f.get("uns/histoexp/slide/run_id")
            if ds is None:
                return None
            val = ds[()]
            return val.decode() if isinstance(val, bytes) else str(val)
    except (OSError, ValueError):
        return None


def _remove_stale_tmp(out: Path, slide_id: str) -> None:
    # hidden temporaries of histoexp._fs.atomic_write left by a killed process: '.<stem>.tmp-<8 hex><suffix>'
    pat = re.compile(rf"^\.{re.escape(slide_id)}(\.done|\.failed)?\.tmp-[0-9a-f]{{8}}\.(h5ad|json)$")
    for f in out.iterdir():
        if pat.match(f.name):
            with contextlib.suppress(OSError):
                f.unlink()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def impute_slides(
    slides: Any,
    model,
    out_dir: str | os.PathLike,
    *,
    mpp: float | None = None,
    tile_um: float | None = None,
    min_tissue: float = 0.5,
    reference: AnnData | Sequence[AnnData] | None = None,
    genes: Sequence[str] | str | None = None,
    k: int | None = None,
    method: str | None = None,
    index: str = "exact",
    index_params: dict | None = None,
    shard: tuple[int, int] | str | None = None,
    keep_features: bool = False,
    overwrite: bool = False,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | None = None,
) -> pd.DataFrame:
    """Predict expression on many H&E slides: one ``.h5ad`` per slide, resumable, failures recorded per slide.

    Each slide runs through :func:`impute_slide`. Its prediction is written to ``out_dir/<slide_id>.h5ad``
    atomically (complete or absent), then a completion marker ``<slide_id>.done.json`` (model fingerprint, the
    slide file's size and modification time, the slide's own inputs: its path, µm/px (from the manifest row or
    ``mpp``) and tile settings, tiles, timings). Run again, the function skips every slide whose marker matches and
    computes the others: a slide whose manifest row changed (e.g. a corrected ``mpp``) is computed again, and so is
    a slide that was half done when the process was killed (it has no marker; a hidden temporary file it left is
    removed). A slide that raises is recorded in ``<slide_id>.failed.json`` (error and traceback) and the run goes
    on; the record is removed when the slide later succeeds. Files of these names that this function did not
    write (a ``.h5ad``, ``.done.json`` or ``.failed.json`` of the user's) are never replaced or removed: the slide
    fails with an error saying so.

    Parameters
    ----------
    slides
        A folder, a CSV manifest (``path``, optional ``slide_id``, ``mpp``), a text file of paths or a list of
        paths; see :func:`read_slide_list`.
    model
        A model from a ``fit_*`` function or :func:`histoexp.tl.load_model`.
    out_dir
        Output folder (created if needed). It holds :data:`RUN_RECORD` (the model fingerprint and parameters);
        a later run into the same folder must use the same model and parameters (else a ValueError), or pass
        ``overwrite=True`` to recompute every slide (replacing only outputs this function wrote). A
        :data:`RUN_RECORD` that is unreadable or not histoexp's raises a ValueError (it is never ignored or
        replaced).
    mpp
        µm per pixel for slides whose file and manifest do not say it (a manifest's ``mpp`` column wins).
    reference
        Retrieval models: the reference AnnData(s) of :func:`~histoexp.tl.impute` (``None``: the model's stored
        training spots). It is prepared once for the whole run (:func:`~histoexp.tl.prepare_reference`: the bank
        and its embeddings), not per slide. Its content hash (sha256 of the bank, values, genes and sections) is
        part of the run record and of every slide's completion marker: a later run into the same ``out_dir``
        with another reference raises a ValueError naming ``reference`` (pass ``overwrite=True`` to recompute
        every slide with the new one), so one folder never mixes predictions from two references.
    tile_um, min_tissue, genes, k, method, index, index_params, batch_size, num_workers, device
        As in :func:`impute_slide` (``index``, ``index_params``: the neighbour search, recorded in the run
        record as well).
    shard
        ``(i, n)`` or ``'i/n'``: process only slides ``i, i + n, i + 2n, ...`` of the list (0-based), so ``n``
        array-job tasks share the list without talking to each other. Every task writes its own slides' files;
        the run record is shared.
    keep_features
        Keep the image features (``obsm[model.use_rep]``) in the outputs (default: dropped, they can be large).
    overwrite
        Recompute slides that are done and replace their outputs (only files this function wrote).

    Returns
    -------
    DataFrame indexed by ``slide_id`` with ``path``, ``status`` (``'done'`` computed now, ``'skipped'`` done
    before, ``'failed'``), ``n_tiles``, ``seconds``, ``tiles_per_s``, ``output`` and ``error``. A summary is
    logged; failures are logged at ERROR level.

    Raises
    ------
    ValueError
        Bad ``slides``/``shard``, or ``out_dir`` holds a run with another model or other parameters.
    """
    from .._fs import write_h5ad
    from ..image._slide import clear_cache
    from ._predict import _as_model, prepare_reference

    if isinstance(model, (str, os.PathLike)):
        m, o = Path(model).expanduser().resolve(), Path(out_dir).expanduser().resolve()
        if o == m or m in o.parents:
            raise ValueError(
                f"`out_dir`: {str(out_dir)!r} is the model folder {str(model)!r} or inside it; predictions are never "
                "written into a model folder: choose another `out_dir`."
            )
    model = _as_model(model)
    retrieval = _retrieval_kwargs(model, reference=reference, k=k, method=method, index=index, params=index_params)
    table = read_slide_list(slides)
    sh = parse_shard(shard)
    if sh is not None:
        table = table.iloc[sh[0] :: sh[1]]
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out_dir`: {str(out)!r} is a file; expected a folder.")
    prepared = None
    if retrieval:  # the bank (and its embeddings) once for every slide; a bad reference fails before any output
        prepared = prepare_reference(model, reference, genes=genes)
        retrieval["reference"] = prepared
    out.mkdir(parents=True, exist_ok=True)

    params = jsonable(
        {
            "tile_um": tile_um,
            "min_tissue": float(min_tissue),
            "genes": genes if genes is None or isinstance(genes, str) else list(genes),
            "k": k,
            "method": method,
            "mpp": mpp,
            "keep_features": bool(keep_features),
            "reference": None if reference is None else {"sha256": prepared.fingerprint(), "n_spots": prepared.n_spots},
            "index": None if index == "exact" else index,  # None is left out: the default keeps older run ids
            "index_params": index_params or None,
        }
    )
    fingerprint = _model_fingerprint(model)
    run_id = hashlib.sha256(json.dumps([fingerprint, params], sort_keys=True).encode()).hexdigest()[:16]
    record = {"created_by": "histoexp", "run_id": run_id, "model_fingerprint": fingerprint, "params": params}
    rec_path = out / RUN_RECORD
    old = _run_record(rec_path)
    if old is None:
        try:
            _write_json(rec_path, {**record, "created_at": _now()}, overwrite=False)
        except FileExistsError:  # another shard wrote it meanwhile
            old = _run_record(rec_path)
    if old is not None and old.get("run_id") != run_id:
        if not overwrite:
            before = old.get("params") if isinstance(old.get("params"), dict) else {}
            names = [*params, *(n for n in before if n not in params)]  # jsonable leaves out None values
            changed = [name for name in names if before.get(name) != params.get(name)]
            if old.get("model_fingerprint") != fingerprint:
                changed.insert(0, "model")
            what = ", ".join(f"`{c}`" for c in changed) or "the run record"
            raise ValueError(
                f"`out_dir`: {str(out)!r} holds a run that differs in {what} "
                f"(recorded {old.get('params')}, model {old.get('model_fingerprint')}; now {params}, model "
                f"{fingerprint}). Its slides would mix with this run's: choose another `out_dir`, or pass "
                "overwrite=True to recompute every slide."
            )
        _write_json(rec_path, {**record, "created_at": _now()}, overwrite=True)

    rows = []
    n_done = n_skipped = 0
    old_progress = settings.progress
    bar = progress(total=len(table), desc="slides", unit="slide", disable=not old_progress, delay=0)
    try:
        settings.progress = False  # one progress view: the slides; per-slide loops stay quiet
        for slide_id, path, slide_mpp in table.itertuples(index=False):
            bar.set_postfix_str(slide_id, refresh=True)
            row = _one_slide(
                slide_id,
                path,
                model,
                out,
                run_id=run_id,
                mpp=float(slide_mpp) if np.isfinite(slide_mpp) else (None if mpp is None else float(mpp)),
                kw={
                    "tile_um": tile_um,
                    "min_tissue": min_tissue,
                    "genes": None if prepared is not None else genes,  # a prepared bank fixes the genes
                    **retrieval,
                    "batch_size": batch_size,
                    "num_workers": num_workers,
                    "device": device,
                },
                keep_features=keep_features,
                overwrite=overwrite,
                write_h5ad=write_h5ad,
            )
            clear_cache()  # a decoded JPEG/PNG slide is not needed again: memory stays one slide
            n_done += row["status"] == "done"
            n_skipped += row["status"] == "skipped"
            rows.append(row)
            bar.update(1)
    finally:
        settings.progress = old_progress
        bar.close()
    cols = ["path", "status", "n_tiles", "seconds", "tiles_per_s", "output", "error"]
    result = pd.DataFrame(rows).set_index("slide_id")[cols] if rows else pd.DataFrame(columns=cols)
    failed = result.index[result["status"] == "failed"].tolist() if rows else []
    msg = f"impute_slides: {n_done} computed, {n_skipped} already done, {len(failed)} failed of {len(table)} slides"
    if failed:
        logger.error("%s: %s", msg, "; ".join(f"{s}: {result.loc[s, 'error']}" for s in failed[:20]))
    else:
        logger.info("%s.", msg)
    return result


def _one_slide(slide_id, path, model, out: Path, *, run_id, mpp, kw, keep_features, overwrite, write_h5ad) -> dict:
    h5 = out / f"{slide_id}.h5ad"
    done = out / f"{slide_id}{DONE_SUFFIX}"
    failed = out / f"{slide_id}{FAILED_SUFFIX}"
    row = {
        "slide_id": slide_id,
        "path": path,
        "output": str(h5),
        "n_tiles": np.nan,
        "seconds": np.nan,
        "tiles_per_s": np.nan,
        "error": "",
    }
    # what this slide's output depends on besides the run's model and parameters: a manifest row that changes
    # (its µm/px, its path) makes the slide due again
    inputs = jsonable({"path": path, "mpp": mpp, "tile_um": kw.get("tile_um"), "min_tissue": kw.get("min_tissue")})
    try:
        stamp = _source_stamp(path)
    except OSError as e:
        stamp = None
        err = f"FileNotFoundError: slide {path!r} cannot be read ({e})"
    if stamp is not None:
        rec = _read_json(done)
        if (
            not overwrite
            and rec is not None
            and rec.get("run_id") == run_id
            and rec.get("source") == stamp
            and rec.get("inputs") == inputs
            and h5.is_file()
        ):
            return {
                **row,
                "status": "skipped",
                "n_tiles": rec.get("n_tiles"),
                "seconds": rec.get("seconds"),
                "tiles_per_s": rec.get("tiles_per_s"),
            }
        _remove_stale_tmp(out, slide_id)
        t0 = time.perf_counter()
        try:
            if h5.exists() and _h5ad_run_id(h5) is None:
                raise FileExistsError(
                    f"{str(h5)!r} exists and was not written by impute_slides; move it away (it is never replaced)."
                )
            if (done.exists() or done.is_symlink()) and not _is_ours(done, slide_id):
                raise FileExistsError(
                    f"{str(done)!r} exists and was not written by impute_slides; move it away (it is never replaced)."
                )
            pred = impute_slide(path, model, mpp=mpp, library_id=slide_id, **kw)
            if not keep_features and model.use_rep:
                for rep in (model.use_rep, *(model.config.get("extra_reps") or {})):
                    pred.obsm.pop(rep, None)
            info = dict(pred.uns["histoexp"]["slide"])
            pred.uns["histoexp"]["slide"] = {**info, "run_id": run_id, "slide_id": slide_id, "source": path}
            with contextlib.suppress(FileNotFoundError):
                done.unlink()  # a stale marker must not outlive the output it described
            write_h5ad(pred, h5, overwrite=True)
            secs = time.perf_counter() - t0
            _write_json(
                done,
                {
                    "created_by": "histoexp",
                    "run_id": run_id,
                    "slide_id": slide_id,
                    "source_path": path,
                    "source": stamp,
                    "inputs": inputs,
                    "n_tiles": info["n_tiles"],
                    "seconds": round(secs, 3),
                    "tiles_per_s": info["n_tiles"] / max(secs, 1e-9),
                    "steps": info["seconds"],
                    "finished_at": _now(),
                    "pid": os.getpid(),
                },
            )
            if _is_ours(failed, slide_id):  # a user's file of that name stays
                with contextlib.suppress(FileNotFoundError):
                    failed.unlink()
            return {
                **row,
                "status": "done",
                "n_tiles": info["n_tiles"],
                "seconds": secs,
                "tiles_per_s": info["n_tiles"] / max(secs, 1e-9),
            }
        except Exception as e:  # one slide's failure must not stop the others
            err = f"{type(e).__name__}: {e}"
            tb = traceback.format_exc()
    else:
        tb = ""
    logger.error("slide %s failed: %s", slide_id, err)
    if (failed.exists() or failed.is_symlink()) and not _is_ours(failed, slide_id):
        logger.error("slide %s: %s is not impute_slides' record; the failure is not written there.", slide_id, failed)
        return {**row, "status": "failed", "error": err}
    with contextlib.suppress(Exception):
        _write_json(
            failed,
            {
                "created_by": "histoexp",
                "slide_id": slide_id,
                "source_path": path,
                "error": err,
                "traceback": tb,
                "failed_at": _now(),
            },
        )
    return {**row, "status": "failed", "error": err}
