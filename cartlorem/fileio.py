"""Atomic file writes: a crash or a full disk never leaves half a file where a good one was.

Every writer goes through :func:`atomic_write`: the content goes to a temporary file in the target's
folder, is flushed to disk, gets the permissions an ordinary ``open(path, "w")`` would give it
(an existing file's permission bits; for a new file 0o666 minus the umask, usually 0644;
``tempfile.mkstemp`` alone gives 0600) and is renamed over the target in one step; the folder is
then synced too, so that the rename survives a power cut. As with ``open``, a symbolic link is
written through: its target gets the new content and the link stays.

    atomic_write(path, lambda f: f.write(b"..."))
    atomic_torch_save({"state_dict": ...}, "model.pt")
    atomic_write_text("log.csv", text)
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import tempfile
from typing import BinaryIO, Callable, Optional

__all__ = ["atomic_write", "atomic_torch_save", "atomic_write_text", "default_file_mode", "file_sha256", "WriteError",
           "damaged_record", "file_problem", "require_file", "same_file"]


class WriteError(OSError):
    """A write that failed (a full disk, a file-size limit, ...): ``errno``, ``strerror`` and, as ``filename``, the
    file that was being written, which keeps its previous content."""


def _umask() -> int:
    """The process umask, read where the system shows it (Linux: /proc/self/status); elsewhere by setting and
    restoring it, which for an instant gives files that other threads create the mode 0o666."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 without the process umask bits."""
    return 0o666 & ~_umask()


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then rename it to ``path``.

    A device, FIFO or other file that is not a regular file (``/dev/null``, ``/dev/stdout``) is written into as
    ``open`` does, not replaced (as root, ``--json /dev/null`` replaced the system's /dev/null by a file); a name
    ending in a path separator is refused.

    The folder is created if needed. As ``open(path, "w")``, a symbolic link is followed (the file it points to
    is written, in that file's folder, and the link stays) and an existing file keeps its permission bits (a new
    one gets :func:`default_file_mode`); unlike it, the file is a new one (another hard link to the old file
    keeps the old content; the owner is whoever writes). On any exception the temporary file is removed and
    ``path`` keeps its previous content; an operating-system error of the write (also one that a library wrapped
    in another exception, as torch.save does) is raised as a :class:`WriteError` naming ``path``.
    """
    path = os.fspath(path)
    handling = sys.exc_info()[1]  # an exception being handled already (a save in an except: or finally: block)
    if (path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep))
            or os.path.basename(path) in ("", ".", "..")):  # realpath drops the slash: a file
        raise WriteError(errno.EISDIR, "this name (empty, '.', '..' or ending in a path separator) names a folder, "
                         "not a file", path)
    try:
        kind = os.stat(path).st_mode
        special = not stat.S_ISREG(kind) and not stat.S_ISDIR(kind)
    except OSError:  # not there yet (or unreadable: the steps below say why)
        special = False
    if special:  # /dev/null, /dev/stdout, a FIFO, a device: written into, as open() does, never replaced by a file
        try:
            with open(path, "wb") as f:
                write(f)
        except Exception as err:
            _raise_as_write_error(err, path, handling)
            raise
        return
    target = os.path.realpath(path)  # through symbolic links, as open() writes
    folder = os.path.dirname(target)
    try:
        os.makedirs(folder, exist_ok=True)
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode) & 0o777  # kept, as open(path, "w") keeps them
        except FileNotFoundError:
            mode = default_file_mode()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(target)[1], dir=folder)
    except OSError as err:  # a link loop (ELOOP), a folder that cannot be made or written, ...: named as a write's
        raise WriteError(err.errno, err.strerror, path) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, Exception):
            _raise_as_write_error(err, path, handling)
        raise
    _sync_folder(folder)


def _raise_as_write_error(err: Exception, path: str, handling: Optional[BaseException]) -> None:
    """Raise what a failed write should: a Ctrl-C inside torch.save (its zip writer's RuntimeError) as the
    KeyboardInterrupt, an operating-system error anywhere in the chain (torch.save wraps them) as a WriteError
    naming ``path``; return for anything else (the caller re-raises it)."""
    interrupt = _in_chain(err, lambda e: isinstance(e, KeyboardInterrupt), handling)
    if interrupt is not None:
        raise interrupt
    cause = _in_chain(err, lambda e: isinstance(e, OSError) and e.errno is not None, handling)
    if cause is not None and not isinstance(err, WriteError):
        raise WriteError(cause.errno, cause.strerror, path) from err


def _in_chain(err: BaseException, wanted, before: Optional[BaseException] = None):
    """The first exception in ``err``'s chain (itself, then what it was raised from or while handling: torch.save
    turns a failed write, or a Ctrl-C inside it, into a RuntimeError raised while handling it) for which
    ``wanted(exc)`` holds; None if there is none. The chain is followed back to ``before`` only: an exception being
    handled when the write began (a save in an ``except`` block) is not the write's."""
    seen = 0
    while err is not None and err is not before and seen < 8:
        if wanted(err):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


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


def file_problem(path) -> Optional[str]:
    """None when ``path`` names a regular file, else what is wrong with it: "is a folder, not a file", "is not a
    regular file" or "does not exist" (an empty name is no file: Path("") is the working folder)."""
    if path and os.path.isfile(path):
        return None
    if path and os.path.isdir(path):
        return "is a folder, not a file"
    if path and os.path.exists(path):
        return "is not a regular file"
    return "does not exist"


def same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name one file: the same path through symbolic links, or (both existing) the
    same file by another name (a hard link, another mount of the folder)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def require_file(path, what: str) -> None:
    """ValueError ``"<what> file '<path>' <problem>"`` unless ``path`` names a regular file (:func:`file_problem`)."""
    problem = file_problem(path)
    if problem is not None:
        raise ValueError(f"{what} file {path if path is None else os.fspath(path)!r} {problem}")


def file_sha256(path, block: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, as hex (read in blocks: any size)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def damaged_record(path):
    """The name of the first record of a ``torch.save`` file whose CRC-32 does not match its data, else None.

    ``torch.save`` writes a zip archive with a checksum per record, but ``torch.load`` does not check them: a
    flipped bit in a stored weight loads as a wrong number. Reading the file once (as ``torch.load`` does) finds
    it. Records stored without a checksum (CRC 0, what ``torch.utils.serialization.config.save.compute_crc32 =
    False`` writes) are not judged. None also for a file that is not a zip archive (the legacy format;
    ``torch.load`` judges it).
    """
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile):
        return None
    with archive:
        for info in archive.infolist():
            if info.CRC == 0 and info.file_size:  # no checksum written
                continue
            try:
                with archive.open(info) as f:  # zipfile compares the CRC-32 once the record is read to its end
                    while f.read(1 << 20):
                        pass
            except Exception:  # noqa: BLE001 - BadZipFile ("Bad CRC-32"), or a record that cannot be decompressed
                return info.filename
    return None
