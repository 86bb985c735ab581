"""Global settings: device, mixed precision, progress bars, data directory."""

from __future__ import annotations

import logging
import numbers
import os
from pathlib import Path

logger = logging.getLogger("histoexp")
if not logger.handlers:
    # histoexp's own handler (as scanpy's), so info/debug messages show at verbosity 2/3: Python's fallback
    # handler shows warnings only
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)

_DEVICES = ("auto", "cpu", "cuda", "mps")
#: default of ``hx.settings.max_image_pixels``: the largest JPEG/PNG decoded whole
MAX_IMAGE_PIXELS = 300_000_000
#: ``hx.settings.verbosity`` -> logging level (the index is the verbosity)
_VERBOSITY_LEVELS = (logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)
_VERBOSITY_NAMES = ("error", "warning", "info", "debug")


class Settings:
    """Package-wide settings, available as ``hx.settings``.

    Attributes
    ----------
    device
        ``'auto'`` (default: cuda, then mps, then cpu) or an explicit torch device string
        such as ``'cpu'``, ``'cuda'`` or ``'cuda:1'``.
    amp
        Use automatic mixed precision (bfloat16/float16 autocast) on GPU for encoders and training.
    progress
        Show progress of long loops: one ``tqdm`` bar per call (an ensemble's members and their loops show inside
        the one bar of ``impute`` or ``fit_*``), in a terminal or notebook; when stderr is a file or a pipe, plain
        lines instead (no carriage returns), one every 30 s and one at the end.
    verbosity
        How much histoexp and the libraries it calls (scanpy, squidpy, anndata) report: ``0`` errors only,
        ``1`` warnings (default), ``2`` info (e.g. which µm/px source was used), ``3`` debug (per-epoch
        losses). Also accepts ``'error'``, ``'warning'``, ``'info'``, ``'debug'``. It sets the level of the
        ``'histoexp'`` logger; scanpy's ``sc.settings.verbosity`` and the squidpy and anndata loggers take the
        same level for the duration of each histoexp call into them (their own settings are restored after).
    num_workers
        Default number of DataLoader worker processes reading patches (``hx.tl.embed_patches``); ``0`` (default)
        reads them in the main process. A non-negative integer.
    data_dir
        Where datasets are looked up and downloaded; defaults to ``$HISTOEXP_DATA_DIR`` or the
        user cache (``pooch.os_cache('histoexp')``).
    max_image_pixels
        Largest JPEG/PNG, in pixels, that histoexp decodes (a JPEG/PNG is decoded whole, unlike a tiled TIFF):
        default 300 million (about 0.9 GB as RGB, several times that while decoding). A file whose header
        declares more raises a ``ValueError`` before anything is decoded (a small PNG can declare a huge image);
        raise the limit for a genuinely large image, or ``None`` for no limit.
    """

    def __init__(self) -> None:
        self._device = "auto"
        self.amp = True
        self.progress = True
        self._num_workers = 0
        self._data_dir: Path | None = None
        self._verbosity = 1
        self._max_image_pixels: int | None = MAX_IMAGE_PIXELS
        logger.setLevel(_VERBOSITY_LEVELS[self._verbosity])

    @property
    def max_image_pixels(self) -> int | None:
        return self._max_image_pixels

    @max_image_pixels.setter
    def max_image_pixels(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"`max_image_pixels` must be a positive integer or None (no limit), got {value!r}.")
        self._max_image_pixels = None if value is None else int(value)

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        if not isinstance(value, str) or value.split(":")[0] not in _DEVICES:
            raise ValueError(f"`device` must be one of {_DEVICES} (optionally 'cuda:N'), got {value!r}.")
        self._device = value

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @num_workers.setter
    def num_workers(self, value: int) -> None:
        # bool is an Integral: True would silently mean one worker
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(
                f"`num_workers` must be a non-negative integer (DataLoader worker processes; 0 reads in the main "
                f"process), got {value!r}."
            )
        self._num_workers = int(value)

    @property
    def data_dir(self) -> Path | None:
        if self._data_dir is not None:
            return self._data_dir
        env = os.environ.get("HISTOEXP_DATA_DIR")
        return Path(env) if env else None

    @data_dir.setter
    def data_dir(self, value: str | os.PathLike | None) -> None:
        self._data_dir = None if value is None else Path(value)

    @property
    def verbosity(self) -> int:
        """0 errors, 1 warnings (default), 2 info, 3 debug: histoexp's logger and the libraries it calls."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int | str) -> None:
        if isinstance(value, str) and value.lower() in _VERBOSITY_NAMES:
            value = _VERBOSITY_NAMES.index(value.lower())
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= 3:
            raise ValueError(
                f"`verbosity` must be 0 (errors), 1 (warnings), 2 (info) or 3 (debug), or one of {_VERBOSITY_NAMES}, "
                f"got {value!r}."
            )
        self._verbosity = int(value)
        logger.setLevel(self.log_level)

    @property
    def log_level(self) -> int:
        """The :mod:`logging` level that :attr:`verbosity` stands for."""
        return _VERBOSITY_LEVELS[self._verbosity]

    def resolve_device(self, device: str | None = None):
        """Return a :class:`torch.device` for ``device`` (``None``: the setting; ``'auto'``: best available)."""
        import torch

        choice = self._device if device is None else str(device)
        if choice.split(":")[0] not in _DEVICES:
            raise ValueError(f"`device` must be one of {_DEVICES} (optionally 'cuda:N'), got {device!r}.")
        if choice == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                return torch.device("mps")
            return torch.device("cpu")
        if choice.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"`device={choice!r}` was requested but CUDA is not available.")
        return torch.device(choice)

    def __repr__(self) -> str:
        return (
            f"histoexp settings: device={self.device!r}, amp={self.amp}, progress={self.progress}, "
            f"num_workers={self.num_workers}, verbosity={self.verbosity}, data_dir={self.data_dir}"
        )


settings = Settings()
