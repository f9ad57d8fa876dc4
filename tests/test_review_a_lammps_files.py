"""LAMMPS adapter pieces that need no LAMMPS: the data file written by ``write_data`` and the checks
``run_input`` makes of the input file before it hands anything to LAMMPS."""

import numpy as np
import pytest
from ase.build import bulk

from cartlorem.integrations import lammps as lammps_adapter


def _salt():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.05, seed=0)
    return atoms


def test_write_data_writes_what_ase_writes(tmp_path):
    from ase.io.lammpsdata import read_lammps_data

    path = tmp_path / "new" / "nacl.data"
    lammps_adapter.write_data(path, _salt(), ["Na", "Cl"])
    back = read_lammps_data(str(path), atom_style="atomic", units="metal")
    assert back.get_chemical_symbols() == _salt().get_chemical_symbols()
    np.testing.assert_allclose(back.positions, _salt().positions, atol=1e-8)
    assert [p.name for p in path.parent.iterdir()] == ["nacl.data"]


def test_write_data_is_atomic(tmp_path, monkeypatch):
    """write_data opened the target for writing before ASE wrote into it: a failure while writing (a full disk,
    a crash, an error inside ASE) left a truncated data file where the previous one was."""
    import ase.io.lammpsdata

    path = tmp_path / "nacl.data"
    lammps_adapter.write_data(path, _salt(), ["Na", "Cl"])
    before = path.read_text()

    def failing_writer(fd, atoms, **kwargs):
        fd.write("nacl.data (written by ASE)\n\n8 atoms\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ase.io.lammpsdata, "write_lammps_data", failing_writer)
    with pytest.raises(OSError, match="No space left"):
        lammps_adapter.write_data(path, _salt(), ["Na", "Cl"])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["nacl.data"]
