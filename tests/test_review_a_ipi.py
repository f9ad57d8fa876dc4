"""The i-PI client's command line reads the species and boundary conditions from a structure file; these
checks need no i-PI server (nothing listens on the socket, so a client that gets that far times out)."""

import os
import secrets

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk

from cartlorem import CartLorem, save_model
from cartlorem.integrations import ipi


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = CartLorem([11, 17], cutoff=3.0, long_range=None, channels=4, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8)
    save_model(model, tmp_path / "model.pt")
    return tmp_path / "model.pt"


def _client(model_file, structure):
    socket = f"cartlorem-test-{os.getpid()}-{secrets.token_hex(4)}"  # nothing listens there
    return ipi.main(["--model", str(model_file), "--structure", str(structure), "--unix", socket,
                     "--connect-timeout", "0"])


def test_structure_in_ipi_xyz_format_is_refused(tmp_path, model_file):
    """i-PI's own xyz format (the usual <file mode='xyz'> init file, which the --structure help suggested) keeps
    the cell in the comment line, which ASE reads as a plain comment: pbc all False, no cell. The client then
    served open-cluster energies and forces (and no virial) to i-PI's periodic simulation."""
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    lines = [str(len(salt)), "# CELL(abcABC):    5.64000     5.64000     5.64000    90.00000    90.00000    90.00000"
             "  Step:           0  Bead:       0 positions{angstrom}  cell{angstrom}"]
    lines += [f"{s:2s} {x:12.6f} {y:12.6f} {z:12.6f}" for s, (x, y, z) in zip(salt.get_chemical_symbols(),
                                                                                salt.positions)]
    path = tmp_path / "init.xyz"
    path.write_text("\n".join(lines) + "\n")
    read = ase.io.read(path)  # what the client got from it
    assert read.get_chemical_symbols() == salt.get_chemical_symbols() and not read.pbc.any()
    np.testing.assert_allclose(read.positions, salt.positions, atol=1e-6)
    with pytest.raises(ValueError, match=r"init.xyz is in i-PI's xyz format, whose cell and boundary conditions "
                                         r"ASE does not read"):
        _client(model_file, path)


def test_structure_written_by_ase_reaches_the_connection(tmp_path, model_file):
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    ase.io.write(tmp_path / "init.xyz", salt)  # extxyz: cell and pbc in the comment line
    assert ase.io.read(tmp_path / "init.xyz").pbc.all()
    with pytest.raises(TimeoutError, match="no i-PI server"):
        _client(model_file, tmp_path / "init.xyz")
