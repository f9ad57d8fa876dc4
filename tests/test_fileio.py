"""Atomic writes: the rename that publishes a file is made durable too."""

import os
import stat

import pytest

from cartlorem import fileio


def test_atomic_write_syncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    """Without an fsync of the folder after os.replace, a power cut can undo the rename: the run folder
    would come back with the previous checkpoint (or none) next to a newer model.pt."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    fileio.atomic_write_text(tmp_path / "run" / "log.csv", "epoch\n1\n")
    assert (tmp_path / "run" / "log.csv").read_text() == "epoch\n1\n"
    assert synced == ["file", "dir"]
    assert os.listdir(tmp_path / "run") == ["log.csv"]  # no temporary file left


def test_a_failed_write_names_the_file_and_keeps_its_content(tmp_path):
    """torch.save turns a write that fails (EFBIG, ENOSPC) into a RuntimeError raised while handling the OSError; the
    caller got that chain, without the file's name. It is now one WriteError (an OSError) naming the file."""
    import errno

    import pytest

    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"the last good checkpoint")

    def write(f):
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    with pytest.raises(fileio.WriteError) as info:
        fileio.atomic_write(target, write)
    assert isinstance(info.value, OSError) and info.value.errno == errno.EFBIG
    assert info.value.filename == str(target) and info.value.strerror == "File too large"
    assert target.read_bytes() == b"the last good checkpoint" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_atomic_write_writes_through_a_symbolic_link(tmp_path):
    """The rename replaced the link itself with a regular file, and the file it pointed to kept its old content;
    open(path, "w"), which the module promises to behave like, writes the file the link points to."""
    real = tmp_path / "store" / "model.pt"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "model.pt"
    link.symlink_to(real)
    fileio.atomic_write(link, lambda f: f.write(b"new"))
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == b"new"
    assert os.listdir(tmp_path / "store") == ["model.pt"]  # no temporary file left
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "store"]


def test_a_fifo_or_device_is_written_into_not_replaced(tmp_path):
    """The temporary file was renamed over whatever the name was: as root, `cartlorem evaluate --json /dev/null`
    replaced the system's /dev/null by a regular file, and a FIFO (or /dev/stdout into a pipe) became a file or
    failed. open(path, "w") writes into them; so does atomic_write now. A name ending in a separator is refused
    (realpath dropped the slash and a file was made)."""
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = {}
    reader = threading.Thread(target=lambda: got.update(data=fifo.read_bytes()), daemon=True)
    reader.start()
    fileio.atomic_write_text(fifo, "through the pipe")
    reader.join(10)
    assert got.get("data") == b"through the pipe" and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["pipe"]  # no temporary file
    fileio.atomic_write_text(os.devnull, "nothing")  # (only once the FIFO passed: before, this replaced /dev/null)
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    for name in (str(tmp_path / "results") + os.sep, str(tmp_path / "results") + os.sep + "."):
        with pytest.raises(fileio.WriteError, match="names a folder, not a file"):
            fileio.atomic_write_text(name, "{}")
    assert sorted(os.listdir(tmp_path)) == ["pipe"]
    from cartlorem.config import parse_output_path, parse_path

    # the command line keeps an output's slash for the writer to refuse; an input's or a folder's is dropped
    assert parse_output_path("~/results/").endswith(os.sep) and not parse_path("~/data.xyz/").endswith(os.sep)


def test_a_broken_pipe_inside_torch_save_is_a_write_error(tmp_path):
    """torch.save into a FIFO whose reader stopped (save_model(m, "/dev/stdout") | head -c 10) wrapped the
    BrokenPipeError in its zip writer's RuntimeError, which the direct write for such files passed on: a traceback
    from the command line instead of "could not write"."""
    import threading

    import torch

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def read_a_little():
        with open(fifo, "rb") as f:
            f.read(10)

    reader = threading.Thread(target=read_a_little, daemon=True)
    reader.start()
    with pytest.raises(fileio.WriteError) as caught:
        fileio.atomic_torch_save({"weights": torch.zeros(2_000_000)}, fifo)
    assert caught.value.filename == str(fifo)
    reader.join(10)


def test_atomic_write_names_a_link_loop_as_a_write_error(tmp_path):
    """A symbolic-link loop (or a folder that cannot be made) escaped as a bare OSError from the mode lookup, not the
    WriteError naming the file that every other failed write raises."""
    loop = tmp_path / "a.json"
    loop.symlink_to(tmp_path / "b.json")
    (tmp_path / "b.json").symlink_to(loop)
    with pytest.raises(fileio.WriteError) as info:
        fileio.atomic_write_text(loop, "{}")
    assert info.value.filename == str(loop) and info.value.strerror


def test_atomic_write_keeps_the_permissions_of_an_existing_file(tmp_path):
    """An existing 0600 file (a private model or metrics file) came back 0644, readable by everyone; open(path, "w")
    keeps the mode. A new file still gets 0666 minus the umask."""
    private = tmp_path / "private.json"
    private.write_text("{}")
    os.chmod(private, 0o600)
    fileio.atomic_write_text(private, '{"a": 1}')
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600 and private.read_text() == '{"a": 1}'
    os.chmod(private, 0o640)
    fileio.atomic_write_text(private, "{}")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o640
    fresh = tmp_path / "fresh.json"
    fileio.atomic_write_text(fresh, "{}")
    assert stat.S_IMODE(os.stat(fresh).st_mode) == fileio.default_file_mode()


def test_ctrl_c_inside_torch_save_stays_an_interrupt(tmp_path):
    """A Ctrl-C while torch.save wrote a checkpoint came out as its zip writer's RuntimeError ('unexpected pos'):
    the command line printed a traceback instead of its 'interrupted ... --resume' message. The old file stays."""
    import torch

    class InterruptedFile:  # a real file, with a Ctrl-C during its fifth write
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += 1
            if self.n == 5:
                raise KeyboardInterrupt
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")
    obj = {k: torch.ones(1000) for k in "abcdef"}
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write(path, lambda f: torch.save(obj, InterruptedFile(f)))
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_failed_write_inside_an_interrupt_handler_is_its_own_error(tmp_path):
    """The Ctrl-C unwrapping followed the whole context chain: a write that failed inside an `except
    KeyboardInterrupt:` block (a save on Ctrl-C) was reported as the old interrupt, not as its own error."""
    def bad(f):
        raise TypeError("not writable data")

    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        with pytest.raises(TypeError, match="not writable data"):
            fileio.atomic_write(tmp_path / "saved.pt", bad)
    assert os.listdir(tmp_path) == []


def test_a_failed_write_inside_an_os_error_handler_is_its_own_error(tmp_path):
    """The OSError lookup also followed the whole context chain: a write that failed with a TypeError inside an
    `except OSError:` block was reported as that older OSError (its errno, the new path)."""
    import errno

    def bad(f):
        raise TypeError("not writable data")

    try:
        raise OSError(errno.ENOSPC, "No space left on device", "/elsewhere/log.csv")
    except OSError:
        with pytest.raises(TypeError, match="not writable data"):
            fileio.atomic_write(tmp_path / "saved.pt", bad)


def test_the_default_file_mode_is_read_without_changing_the_umask(monkeypatch):
    """default_file_mode() set the process umask to 0 for an instant to read it: a file that another thread of
    the program created in that instant was world-writable (5519 of 20000 in a review's threaded reproducer)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("the umask is read from /proc/self/status on Linux only")
    old = os.umask(0o027)
    try:
        def changed(mask):
            raise AssertionError(f"os.umask({mask:o}) called")

        monkeypatch.setattr(os, "umask", changed)
        assert fileio.default_file_mode() == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)
