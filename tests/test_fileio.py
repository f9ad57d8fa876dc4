"""Atomic writes: the rename that publishes a file is made durable too."""

import os
import stat

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
