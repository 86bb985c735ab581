"""Generic model folder I/O: safetensors weights plus a JSON config (no pickle anywhere).

A model folder holds ``config.json`` (JSON-able config, always with ``'method'``, ``'format_version'``,
the ``'versions'`` of histoexp/torch/python that wrote it, the ``'files'`` and their ``'sha256'``),
one or more ``<name>.safetensors`` files (``model.safetensors`` for the weights; methods may add
others, e.g. a reference bank), each carrying the digest of the config in its metadata
(:func:`config_digest`), and histoexp's marker ``.histoexp.json`` (which also records the sha256 of
``config.json``). Reading verifies the hashes both ways (the config names the weights, the weights name the
config), so a folder whose files were edited or mixed with another model's fails loudly instead of loading a
different model, even when it was copied without its hidden marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from .._fs import MARKER, atomic_dir, mark_created, sha256_file
from .._settings import logger

FORMAT_VERSION = 1
CONFIG = "config.json"
KIND = "model"
#: safetensors metadata key holding the digest of the config saved with the weights (see :func:`config_digest`)
CONFIG_DIGEST = "histoexp_config_sha256"


def versions() -> dict:
    """Versions of the packages that matter for reading weights back."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        hx_version = version("histoexp")
    except PackageNotFoundError:  # pragma: no cover - not installed
        hx_version = "unknown"
    return {"histoexp": hx_version, "torch": torch.__version__, "python": platform.python_version()}


def _load_json(file: Path) -> dict:
    try:
        rec = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(
            f"{str(file)!r} is not readable JSON ({err}); the model folder is damaged: save the model again."
        ) from err
    if not isinstance(rec, dict):
        raise ValueError(f"{str(file)!r} holds {type(rec).__name__}, not a JSON object; save the model again.")
    return rec


def config_digest(config: dict) -> str:
    """sha256 of a model config as JSON (sorted keys), without its ``'sha256'`` entry.

    Written into the metadata of every safetensors file of the folder: the weights name the config they were saved
    with, so an edited ``config.json`` (genes swapped, another method) is detected whatever else was copied or not
    (the hidden marker is lost by ``cp model/* copy/``). ``'sha256'`` is left out: it holds the files' own hashes.
    """
    body = {k: v for k, v in config.items() if k != "sha256"}
    text = json.dumps(json.loads(json.dumps(body)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _safetensors_metadata(data: bytes) -> dict:
    """Return the ``__metadata__`` of a safetensors file's header (``{}`` when there is none or it is unreadable)."""
    try:
        n = int.from_bytes(data[:8], "little")
        if not 0 < n <= len(data) - 8:
            return {}
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def interrupted_save_hint(path: str | os.PathLike) -> str:
    """Where a save of ``path`` killed between its two renames left the models (``''``: no such leftovers)."""
    from .._fs import stale_siblings

    found = []
    for sib in stale_siblings(path):
        try:
            verify_folder(sib)
        except (OSError, ValueError):
            continue  # unfinished, or not a model
        found.append(("the previous model" if ".old-" in sib.name else "the new model, complete,", sib))
    if not found:
        return ""
    where = "; ".join(f"{what} is at {str(sib)!r}" for what, sib in found)
    return (
        f" A save into it was interrupted between its two renames: {where}. Rename the one you want to "
        f"{str(Path(path))!r} (the next save into that path removes these leftovers)."
    )


def is_model_folder(path: str | os.PathLike) -> bool:
    """Tell whether ``path`` is a model folder histoexp wrote, holding nothing else (safe to replace)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        return False
    try:
        config = _load_json(path / CONFIG)
    except ValueError:
        return False
    if "method" not in config or "format_version" not in config:
        return False
    # folders written before the marker existed are recognised by their config's file list
    allowed = {CONFIG, MARKER, *config.get("files", [])}
    return all(e.name in allowed for e in path.iterdir())


def save_folder(
    path: str | os.PathLike,
    *,
    config: dict,
    tensors: dict[str, dict[str, torch.Tensor]],
    overwrite: bool = False,
) -> Path:
    """Write ``config.json`` and ``<name>.safetensors`` for each entry of ``tensors``, atomically.

    The folder is built under a hidden name next to ``path`` and renamed into place when complete;
    an interrupted save leaves the previous folder (or none), never a mixed one.

    Parameters
    ----------
    path
        Folder to create. An existing empty folder is filled.
    config
        JSON-able dict; must contain ``'method'``.
    tensors
        ``{file name without extension: {tensor name: tensor}}``.
    overwrite
        Replace an existing model folder. Only a folder histoexp wrote as a model, holding nothing
        else, is ever replaced; anything else at ``path`` raises :class:`FileExistsError`.
    """
    from safetensors.torch import save_file

    if "method" not in config:
        raise ValueError("A model config must name its 'method'.")
    with atomic_dir(path, overwrite=overwrite, kind=KIND, arg="path", owned=is_model_folder) as tmp:
        full = {k: v for k, v in config.items() if k != "sha256"}
        full["format_version"] = FORMAT_VERSION
        full["versions"] = versions()
        full["files"] = sorted(f"{name}.safetensors" for name in tensors)
        digest = config_digest(full)  # the config as it will read back, named inside every weights file
        sha = {}
        for name, tdict in tensors.items():
            clean = {k: v.detach().to("cpu").contiguous() for k, v in tdict.items()}
            file = f"{name}.safetensors"
            save_file(clean, str(tmp / file), metadata={CONFIG_DIGEST: digest})
            sha[file] = sha256_file(tmp / file)
        full["sha256"] = dict(sorted(sha.items()))
        (tmp / CONFIG).write_text(json.dumps(full, indent=1))
        mark_created(tmp, KIND, sha256={CONFIG: sha256_file(tmp / CONFIG)})
    return Path(path)


def read_config(path: str | os.PathLike) -> dict:
    """Read ``config.json`` of a model folder (clear error when it is not one, or was edited)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        what = "does not exist" if not path.exists() else f"is not a histoexp model folder: no {CONFIG} in it"
        raise FileNotFoundError(f"{path} {what}.{interrupted_save_hint(path)}")
    raw = (path / CONFIG).read_bytes()
    marker = path / MARKER
    if marker.is_file():
        expected = _load_json(marker).get("sha256", {}).get(CONFIG)
        if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
            raise ValueError(
                f"{str(path / CONFIG)!r} differs from the one histoexp saved (sha256 recorded in {MARKER}): "
                "the model folder was edited or mixed with another model's files; save the model again."
            )
    config = _load_json(path / CONFIG)
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer histoexp (format {config.get('format_version')}, "
            f"this one reads up to {FORMAT_VERSION}); upgrade histoexp."
        )
    return config


def _checked_bytes(path: Path, file: str, config: dict) -> bytes:
    target = path / file
    if not target.is_file():
        raise FileNotFoundError(f"{target} is missing from the model folder.")
    data = target.read_bytes()
    expected = (config.get("sha256") or {}).get(file)
    if expected is None:
        logger.warning("%s: no sha256 recorded for %s (saved by an older histoexp); not verified.", path, file)
    elif hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(
            f"{str(target)!r} does not match the sha256 recorded in {CONFIG}: the weights were edited, "
            "damaged or mixed with another model's files; save the model again."
        )
    saved = _safetensors_metadata(data).get(CONFIG_DIGEST)
    if saved is None:
        logger.debug("%s: %s names no config (saved by an older histoexp); config.json not verified.", path, file)
    elif saved != config_digest(config):
        raise ValueError(
            f"{str(path / CONFIG)!r} differs from the config saved with the weights (its digest is in the metadata "
            f"of {file}): the model folder was edited (genes, method, settings) or mixed with another model's files. "
            "Loading it would mislabel or misbuild the model: save the model again."
        )
    return data


def verify_folder(path: str | os.PathLike) -> dict:
    """Check a model folder: its config and every file it lists match the recorded sha256.

    Returns
    -------
    The config.

    Raises
    ------
    FileNotFoundError
        Not a model folder, or a listed file is missing.
    ValueError
        A file or the config differs from what histoexp saved.
    """
    path = Path(path)
    config = read_config(path)
    for file in config.get("files", []):
        _checked_bytes(path, file, config)
    return config


def read_tensors(path: str | os.PathLike, name: str = "model", device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read ``<name>.safetensors`` of a model folder, verified against the sha256 in ``config.json``."""
    from safetensors.torch import load

    path = Path(path)
    data = _checked_bytes(path, f"{name}.safetensors", read_config(path))
    tensors = load(data)  # the verified bytes themselves: no second read of the file
    return tensors if str(device) == "cpu" else {k: v.to(device) for k, v in tensors.items()}
