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
