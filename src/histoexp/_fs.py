"""Safe output: atomic writes, and replacing only what histoexp itself created (no torch here).

Rules every writer of histoexp follows:

- an existing output is replaced only with ``overwrite=True``;
- a *folder* is replaced only when it carries histoexp's marker (:data:`MARKER`, written by
  :func:`mark_created`) and holds nothing histoexp did not write: a user's folder is never removed;
- files and folders are built under a hidden temporary name next to the target and renamed into
  place, so an interrupted write leaves the old output (or none), never a partial one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "MARKER",
    "atomic_dir",
    "atomic_write",
    "check_output",
    "foreign_entries",
    "is_ours",
    "mark_created",
    "sha256_file",
    "stale_siblings",
    "write_h5ad",
]

#: file that marks a folder as created by histoexp (JSON: who, what kind, which entries)
MARKER = ".histoexp.json"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("histoexp")
    except PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_sibling(path: Path, tag: str) -> Path:
    # hidden, unique, same folder (so the final rename stays on one file system); files keep their
    # suffix, since writers such as matplotlib or anndata choose the format from it
    suffix = path.suffix if tag == "tmp" else ""
    stem = path.name[: -len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.{tag}-{uuid.uuid4().hex[:8]}{suffix}")


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def _read_marker(path: Path) -> dict | None:
    try:
        rec = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("created_by") == "histoexp" else None


def mark_created(path: str | os.PathLike, kind: str, **extra: Any) -> Path:
    """Write :data:`MARKER` into the folder ``path``: histoexp created it, as a ``kind``.

    The marker lists the folder's entries at this moment; a later :func:`is_ours` is false when
    anything else appeared in it (a user's file is then never deleted with the folder). ``extra``
    (JSON-able) is stored as well, e.g. file hashes.
    """
    path = Path(path)
    entries = sorted(e.name for e in path.iterdir() if e.name != MARKER)
    rec = {"created_by": "histoexp", "kind": kind, "version": _version(), "entries": entries, **extra}
    atomic_write(path / MARKER, lambda p: Path(p).write_text(json.dumps(rec, indent=1)), overwrite=True)
    return path / MARKER


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """Entries of folder ``path`` that histoexp's marker does not list (all of them without a marker)."""
    path = Path(path)
    rec = _read_marker(path)
    known = set(rec.get("entries", [])) if rec else set()
    return sorted(e.name for e in path.iterdir() if e.name != MARKER and e.name not in known)


def is_ours(path: str | os.PathLike, kind: str | None = None) -> bool:
    """Tell whether ``path`` is a folder histoexp created (of ``kind``, if given) holding only what it wrote."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    rec = _read_marker(path)
    if rec is None or (kind is not None and rec.get("kind") != kind):
        return False
    return not foreign_entries(path)


def check_output(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    arg: str = "path",
    kind: str | None = None,
    owned: Callable[[Path], bool] | None = None,
    empty_ok: bool = True,
) -> Path:
    """Raise unless ``path`` may be written: it is absent, or ``overwrite`` and replaceable.

    Parameters
    ----------
    path
        The output.
    overwrite
        Whether the caller asked to replace an existing output.
    arg
        Name of the argument (or command-line option) that gave ``path``, for the message.
    kind
        ``None``: ``path`` is a file (an existing file is replaced with ``overwrite``; a folder never).
        Otherwise ``path`` is a folder of this kind: an empty folder counts as absent (see
        ``empty_ok``), and a non-empty one is replaced only with ``overwrite`` and when histoexp
        created it (:func:`is_ours`, or ``owned``).
    owned
        For folders: ``owned(path) -> bool`` decides instead of :func:`is_ours`.
    empty_ok
        For folders: whether an existing empty folder may be used without ``overwrite``.

    Raises
    ------
    FileExistsError
        The output exists and may not be replaced; the message says why and what to do.
    """
    path = Path(path).expanduser()
    if not (path.exists() or path.is_symlink()):
        return path
    if kind is None:
        if path.is_dir():
            raise FileExistsError(
                f"`{arg}`: {str(path)!r} is a folder; a file is written there and histoexp never replaces a "
                "folder with a file. Choose another path."
            )
        if not overwrite:
            raise FileExistsError(
                f"`{arg}`: {str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it, "
                "or choose another path."
            )
        return path
    if not path.is_dir():
        raise FileExistsError(
            f"`{arg}`: {str(path)!r} is a file, not a folder; histoexp writes a {kind} folder there and "
            "does not replace the file. Choose another path."
        )
    empty = not any(path.iterdir())
    if empty and (empty_ok or overwrite):
        return path
    if not overwrite:
        raise FileExistsError(
            f"`{arg}`: {str(path)!r} already exists{'' if empty else ' and is not empty'}; pass overwrite=True "
            f"(--overwrite) to replace a {kind} that histoexp wrote there, or choose another path."
        )
    if not (owned(path) if owned is not None else is_ours(path, kind)):
        rec = _read_marker(path)
        why = (
            f"it holds files histoexp did not write ({foreign_entries(path)[:5]})"
            if rec is not None and rec.get("kind") == kind
            else f"it was not created by histoexp as a {kind} (no {MARKER} naming one)"
        )
        raise FileExistsError(
            f"`{arg}`: refusing to replace {str(path)!r}: {why}. histoexp replaces only folders it created; "
            "choose another path, or move the folder away yourself."
        )
    return path


def atomic_write(
    path: str | os.PathLike,
    write_fn: Callable[[str], Any],
    *,
    overwrite: bool = False,
    arg: str = "path",
) -> Path:
    """Write the file ``path`` atomically: ``write_fn(tmp)`` writes a hidden sibling, then it is renamed.

    The temporary file is in the same folder (same suffix), flushed to disk, then renamed over
    ``path``; it is removed on any exception, ``KeyboardInterrupt`` included. A killed process
    leaves ``path`` as it was (or absent) and at most a hidden ``.<name>.tmp-*`` file.

    Parameters
    ----------
    path
        Target file (its folder is created if needed).
    write_fn
        Called with the temporary path (a ``str``); must write the whole file there.
    overwrite
        Replace an existing file; without it an existing ``path`` raises :class:`FileExistsError`.
    arg
        Argument name for error messages.
    """
    path = check_output(path, overwrite=overwrite, arg=arg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    try:
        write_fn(str(tmp))
        if not tmp.is_file():
            raise RuntimeError(f"atomic_write: the writer did not create {str(tmp)!r}.")
        _fsync_file(tmp)
        if overwrite:
            check_output(path, overwrite=True, arg=arg)  # not turned into a folder meanwhile
            os.replace(tmp, path)
        else:
            try:  # a hard link fails if `path` appeared meanwhile: never clobbers
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(
                    f"`{arg}`: {str(path)!r} appeared while it was being written; pass overwrite=True to replace it."
                ) from None
            except OSError:  # no hard links on this file system
                check_output(path, overwrite=False, arg=arg)
                os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _remove(tmp)  # the hard link's other name
    _fsync_dir(path.parent)
    return path


def _swap_in(tmp: Path, path: Path, **check: Any) -> None:
    """Rename the finished folder ``tmp`` to ``path``, replacing (re-checked) histoexp output there."""
    check_output(path, **check)  # again: the folder may have changed while ``tmp`` was built
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists():
        os.rename(tmp, path)
    else:
        # two renames: a kill between them leaves ``path`` absent and the old folder hidden next to it
        old = _tmp_sibling(path, "old")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


#: an unfinished temporary folder (no marker) older than this is abandoned, not being written
STALE_TMP_SECONDS = 3600


def stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Hidden temporaries of :func:`atomic_dir` next to ``path``: ``.<name>.tmp-<hex>`` and ``.<name>.old-<hex>``.

    A save killed between its two renames leaves ``path`` absent, the previous folder as ``.<name>.old-*`` and the
    new, complete one as ``.<name>.tmp-*``; a save killed while building leaves an unfinished ``.tmp-*``.
    """
    import re

    path = Path(path).expanduser()
    pat = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-[0-9a-f]{{8}}$")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    return sorted(e for e in entries if pat.match(e.name) and e.is_dir() and not e.is_symlink())


def _clean_stale(path: Path, kind: str, owned: Callable[[Path], bool] | None) -> None:
    """Remove histoexp's own leftovers of interrupted writes of ``path`` (after a write of it succeeded).

    Complete folders of this kind (histoexp's marker, nothing else in them) go; an unfinished temporary folder only
    when it has not changed for :data:`STALE_TMP_SECONDS` (another process may be writing it).
    """
    import time

    for sib in stale_siblings(path):
        complete = is_ours(sib, kind) or (owned is not None and owned(sib))
        try:
            old = time.time() - sib.stat().st_mtime > STALE_TMP_SECONDS
        except OSError:
            continue
        if complete or (".tmp-" in sib.name and old and _read_marker(sib) is None):
            shutil.rmtree(sib, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    kind: str = "folder",
    arg: str = "path",
    owned: Callable[[Path], bool] | None = None,
    empty_ok: bool = True,
) -> Iterator[Path]:
    """Build the folder ``path`` under a hidden sibling name and swap it in when the block succeeds.

    Yields the temporary folder to fill. On success the folder is marked (:func:`mark_created`,
    unless the block wrote :data:`MARKER` itself) and renamed to ``path``; an existing ``path`` is
    replaced only when :func:`check_output` allows it (``overwrite`` and histoexp's own ``kind`` of
    folder). On any exception the temporary folder is removed and ``path`` is untouched.

    Parameters
    ----------
    path
        Target folder (its parent is created if needed).
    overwrite, kind, arg, owned, empty_ok
        As in :func:`check_output` (checked before the block and again before the swap).
    """
    path = Path(path).expanduser()
    check = {"overwrite": overwrite, "arg": arg, "kind": kind, "owned": owned, "empty_ok": empty_ok}
    check_output(path, **check)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MARKER).exists():
            mark_created(tmp, kind)
        _swap_in(tmp, path, **check)
    except BaseException:
        _remove(tmp)
        raise
    _clean_stale(path, kind, owned)


def write_h5ad(adata, path: str | os.PathLike, *, overwrite: bool = False, **kwargs: Any) -> Path:
    """Write ``adata`` to an ``.h5ad`` file atomically (never a half-written file at ``path``).

    The file is written under a hidden temporary name in the same folder and renamed over ``path``
    when complete, so an interrupted write leaves the previous file (or none).

    Parameters
    ----------
    adata
        The AnnData to write.
    path
        Target ``.h5ad`` file.
    overwrite
        Replace an existing file; default ``False`` raises :class:`FileExistsError` if ``path`` exists.
    **kwargs
        Passed to :meth:`anndata.AnnData.write_h5ad` (e.g. ``compression='gzip'``).

    Returns
    -------
    The path written.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite=False``, or ``path`` is a folder.

    Notes
    -----
    Under torch.distributed (``torchrun``) only rank 0 writes; the other ranks return ``path`` at once.
    """
    from ._distributed import is_main_process

    if not is_main_process():
        return Path(path)
    return atomic_write(path, lambda p: adata.write_h5ad(p, **kwargs), overwrite=overwrite, arg="path")
