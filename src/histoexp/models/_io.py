"""Generic model folder I/O: safetensors weights plus a JSON config (no pickle anywhere).

A model folder holds ``config.json`` (JSON-able config, always with ``'method'``, ``'format_version'``
and the ``'versions'`` of histoexp/torch/python that wrote it) and one or more ``<name>.safetensors``
files (``model.safetensors`` for the weights; methods may add others, e.g. a reference bank).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

FORMAT_VERSION = 1
CONFIG = "config.json"


def versions() -> dict:
    """Versions of the packages that matter for reading weights back."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        hx_version = version("histoexp")
    except PackageNotFoundError:  # pragma: no cover - not installed
        hx_version = "unknown"
    return {"histoexp": hx_version, "torch": torch.__version__, "python": platform.python_version()}


def save_folder(
    path: str | os.PathLike,
    *,
    config: dict,
    tensors: dict[str, dict[str, torch.Tensor]],
    overwrite: bool = True,
) -> Path:
    """Write ``config.json`` and ``<name>.safetensors`` for each entry of ``tensors``.

    Parameters
    ----------
    path
        Folder (created if needed).
    config
        JSON-able dict; must contain ``'method'``.
    tensors
        ``{file name without extension: {tensor name: tensor}}``.
    overwrite
        Replace files of an existing model folder; ``False`` raises if ``config.json`` exists.
    """
    from safetensors.torch import save_file

    if "method" not in config:
        raise ValueError("A model config must name its 'method'.")
    path = Path(path)
    if (path / CONFIG).exists() and not overwrite:
        raise FileExistsError(f"{path} already holds a model; pass overwrite=True to replace it.")
    path.mkdir(parents=True, exist_ok=True)
    for name, tdict in tensors.items():
        clean = {k: v.detach().to("cpu").contiguous() for k, v in tdict.items()}
        save_file(clean, str(path / f"{name}.safetensors"))
    full = dict(config)
    full["format_version"] = FORMAT_VERSION
    full["versions"] = versions()
    full["files"] = sorted(f"{name}.safetensors" for name in tensors)
    (path / CONFIG).write_text(json.dumps(full, indent=1))
    return path


def read_config(path: str | os.PathLike) -> dict:
    """Read ``config.json`` of a model folder (clear error when it is not one)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not a histoexp model folder: no {CONFIG} in it.")
    config = json.loads((path / CONFIG).read_text())
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer histoexp (format {config.get('format_version')}, "
            f"this one reads up to {FORMAT_VERSION}); upgrade histoexp."
        )
    return config


def read_tensors(path: str | os.PathLike, name: str = "model", device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read ``<name>.safetensors`` of a model folder."""
    from safetensors.torch import load_file

    file = Path(path) / f"{name}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing from the model folder.")
    return load_file(str(file), device=device)
