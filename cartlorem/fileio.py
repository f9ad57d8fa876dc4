"""Atomic file writes: a crash or a full disk never leaves half a file where a good one was.

Every writer goes through :func:`atomic_write`: the content goes to a temporary file in the target's
folder, is flushed to disk, gets the permissions an ordinary ``open(path, "w")`` would give it
(0o666 minus the umask, usually 0644; ``tempfile.mkstemp`` alone gives 0600) and is renamed over
the target in one step; the folder is then synced too, so that the rename survives a power cut.

    atomic_write(path, lambda f: f.write(b"..."))
    atomic_torch_save({"state_dict": ...}, "model.pt")
    atomic_write_text("log.csv", text)
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_torch_save", "atomic_write_text", "default_file_mode"]


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 without the process umask bits."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then rename it to ``path``.

    The folder is created if needed. On any exception the temporary file is removed and ``path``
    keeps its previous content.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    """fsync the folder, so that the rename itself survives a power cut (POSIX); a no-op where folders
    cannot be opened or synced (Windows, some network file systems)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
