"""An exclusive lock on a folder (one training per checkpoint folder), created atomically, stale locks taken over.

The lock is a file in the folder holding who took it (pid, host, time). It appears atomically, already locked: it
is written under a unique name, locked with ``fcntl.flock`` and hard-linked to the lock name (the link fails when
the name exists). While its process lives the kernel keeps it locked; when the process dies (killed, crashed, the
machine rebooted) the kernel drops it, so the next process finds the file unlocked, knows it is stale and takes it
over. Where ``flock`` is missing (Windows, some network file systems) a lock is stale when its process, on this host,
no longer exists.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from ._settings import logger

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_NAME", "folder_lock"]

#: name of the lock file in a locked folder
LOCK_NAME = "training.lock"


def _read(path: Path) -> dict:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _flock(fd: int) -> bool | None:
    """Take the exclusive lock on ``fd`` without waiting.

    Returns ``True``, ``False`` when another process holds it, ``None`` when this platform or file system has no
    ``flock`` (then a lock is stale when its process is gone).
    """
    if fcntl is None:  # pragma: no cover - Windows
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # pragma: no cover - e.g. a network file system without locks
        return None
    return True


def _pid_alive(pid: int) -> bool:  # pragma: no cover - Windows fallback only
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _held_by_other(path: Path) -> tuple[bool, int | None]:
    """Whether the existing lock file is held by a live process; else its descriptor, locked by us (stale)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False, None  # released meanwhile: try again
    locked = _flock(fd)
    if locked is None:  # pragma: no cover - no flock: the recorded process, on this host, must be gone
        rec = _read(path)
        same_host = rec.get("host") == socket.gethostname()
        if not same_host or _pid_alive(int(rec.get("pid", -1))):
            os.close(fd)
            return True, None
        return False, fd
    if not locked:
        os.close(fd)
        return True, None
    try:  # locked by us: still the file at `path` (not one that was released and unlinked meanwhile)?
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return False, None
    return False, fd


def _message(folder: Path, path: Path, arg: str, what: str) -> str:
    rec = _read(path)
    who = f"pid {rec.get('pid', '?')} on {rec.get('host', '?')} since {rec.get('since', '?')}"
    return (
        f"`{arg}`: {str(folder)!r} is in use by another {what} ({who}; lock file {str(path)!r}). Two of them on one "
        f"folder would overwrite each other's files: wait until it ends, or use another `{arg}`. If no {what} runs "
        f"there any more, delete {str(path)!r}."
    )


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, arg: str = "checkpoint_dir", what: str = "training") -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if needed) for the block; :class:`FileExistsError` when it is taken.

    Parameters
    ----------
    folder
        The folder to lock.
    arg
        Argument that named the folder (for the message).
    what
        What holds the lock (for the message).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {
        "created_by": "histoexp",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    fd = None
    for _ in range(8):
        tmp = folder / f".{LOCK_NAME}.{uuid.uuid4().hex[:8]}"
        new = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        _flock(new)  # locked before it can be seen under the lock name
        os.write(new, json.dumps(me).encode())
        try:
            os.link(tmp, path)  # atomic: fails when the lock exists
            fd = new
        except FileExistsError:
            os.close(new)
        except OSError:  # pragma: no cover - no hard links here: exclusive create instead
            os.close(new)
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
                _flock(fd)
                os.write(fd, json.dumps(me).encode())
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if fd is not None:
            break
        held, stale = _held_by_other(path)
        if held:
            raise FileExistsError(_message(folder, path, arg, what))
        if stale is not None:
            was = _read(path) or "unreadable"
            logger.warning("%s: taking over the stale lock %s (%s); its process is gone.", folder, path, was)
            os.ftruncate(stale, 0)
            os.lseek(stale, 0, os.SEEK_SET)
            os.write(stale, json.dumps(me).encode())
            fd = stale
            break
    if fd is None:  # pragma: no cover - the lock kept appearing and vanishing
        raise FileExistsError(_message(folder, path, arg, what))
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink()  # while still locked: nobody takes a lock that is being released
        os.close(fd)
