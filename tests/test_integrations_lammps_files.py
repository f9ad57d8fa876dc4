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


class _RecordingLammps:
    """Stands in for a ``lammps`` instance: records the commands it is given."""

    def __init__(self):
        self.commands = []

    def commands_string(self, text):
        self.commands.append(text)


@pytest.mark.parametrize("fix", ["fix cartlorem all external pf/callback 2 1",
                                 "fix cartlorem all external pf/callback 1 5  # every 5th step",
                                 "fix cartlorem all external pf/array 1"])
def test_run_input_refuses_a_fix_that_does_not_call_the_model_every_step(tmp_path, fix):
    """run_input took any 'fix ID GROUP external ...' line. LAMMPS calls a 'pf/callback N M' fix every N steps
    and adds its stored forces every M steps (with N = 2 the forces of step 0 drove step 1 too), and never calls
    a 'pf/array' fix, whose callback it accepts without a word: MD on stale, missing or zero model forces."""
    path = tmp_path / "in.lmp"
    path.write_text(f"units metal\nread_data nacl.data\n{fix}\nfix nve all nve\nrun 10\n")
    lmp = _RecordingLammps()
    with pytest.raises(ValueError, match=r"line 3: the model's fix must be 'fix cartlorem all external "
                                         r"pf/callback 1 1'"):
        lammps_adapter.run_input(lmp, path, "model.pt", ["Na", "Cl"])
    assert lmp.commands == []  # refused before LAMMPS ran anything


def test_run_input_takes_a_fix_continued_with_an_ampersand(tmp_path, monkeypatch):
    """LAMMPS continues a line that ends in '&' on the next; run_input read the lines one by one, so a valid
    'fix ext all external &' + 'pf/callback 1 1' was refused with a message that it must be 'pf/callback 1 1', and
    a continued 'pf/callback 2 1' was not seen as the model's fix at all."""
    made = []

    class Fix:
        def __init__(self, lmp, model, elements, fix_id, define, **options):
            made.append((fix_id, list(lmp.commands)))

        def check(self):
            pass

    monkeypatch.setattr(lammps_adapter, "CartLoremFix", Fix)
    path = tmp_path / "in.lmp"
    path.write_text("units metal\nread_data nacl.data\nfix ext all external &\n    pf/callback 1 &\n 1  # the model\n"
                    "fix nve all nve\nrun 10\n")
    lmp = _RecordingLammps()
    lammps_adapter.run_input(lmp, path, "model.pt", ["Na", "Cl"])
    assert made == [("ext", ["units metal\nread_data nacl.data\nfix ext all external &\n    pf/callback 1 &\n"
                             " 1  # the model"])]
    assert lmp.commands[1] == "fix nve all nve\nrun 10"  # the rest, after the fix is attached
    path.write_text("units metal\nfix ext all external &\npf/callback 2 1\nrun 10\n")
    lmp = _RecordingLammps()
    with pytest.raises(ValueError, match=r"line 2: the model's fix must be 'fix ext all external pf/callback 1 1'.*"
                                         r"got 'fix ext all external pf/callback 2 1'"):
        lammps_adapter.run_input(lmp, path, "model.pt", ["Na", "Cl"])
    assert lmp.commands == []


def test_elements_as_atomic_numbers_from_the_command_line(tmp_path):
    """Elements may be symbols or atomic numbers (CartLoremFix, write_data); from the command line
    (--elements 11 17) they arrive as strings, and "11" was refused with "must be chemical symbols or atomic
    numbers ..., got '11'"."""
    np.testing.assert_array_equal(lammps_adapter._atomic_numbers(["11", "17"]), [11, 17])
    np.testing.assert_array_equal(lammps_adapter._atomic_numbers(["Na", 17, np.int64(1)]), [11, 17, 1])
    for bad in ("0", "119", "Xx", "-1", 2.5):
        with pytest.raises(ValueError, match="elements must be chemical symbols or atomic numbers"):
            lammps_adapter._atomic_numbers(["Na", bad])
    lammps_adapter.write_data(tmp_path / "nacl.data", _salt(), ["11", "17"])
    assert "Masses" in (tmp_path / "nacl.data").read_text()


def test_float32_model_in_a_box_far_from_the_origin():
    """The callback cast LAMMPS' raw coordinates to the model's dtype: a float32 model in a box whose corner is
    4000 Å from the origin saw positions to 2.4e-4 Å (forces off by 7.0e-4 eV/Å against 3e-6 through the ASE
    calculator). LAMMPS is not needed: the callback's evaluation runs on a stand-in for its box."""
    import copy
    import types

    import torch

    from cartlorem import CartLorem, CartLoremCalculator

    torch.manual_seed(0)
    model = CartLorem([11, 17], cutoff=3.0, long_range="multipole", channels=8, num_layers=1, correlation=2,
                      num_basis=4, radial_hidden=8, readout_hidden=8).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    atoms = _salt().repeat((2, 1, 1))
    atoms.wrap()
    reference = atoms.copy()
    reference.calc = CartLoremCalculator(model)  # float64
    forces, e = reference.get_forces(), reference.get_potential_energy()
    lo = np.full(3, 4000.0)
    lengths = atoms.cell.lengths()
    fix = types.SimpleNamespace(model=copy.deepcopy(model).float(), numbers=np.array([11, 17]), total_charge=0.0,
                                multiplicity=None, electric_field=None,
                                lmp=types.SimpleNamespace(extract_box=lambda: (list(lo), list(lo + lengths),
                                                                               0.0, 0.0, 0.0, [1, 1, 1], 0)))
    kinds = np.where(atoms.numbers == 11, 1, 2)
    chunks, energy, _ = lammps_adapter.CartLoremFix._evaluate(
        fix, [(np.arange(1, len(atoms) + 1), kinds, atoms.positions + lo)])
    assert np.abs(chunks[0] - forces).max() < 2e-5
    assert energy == pytest.approx(e, abs=1e-4)


def test_float32_energy_with_large_reference_energies():
    """LAMMPS' pe of a float32 model was the float32 running sum of per-atom energies near −2000 eV: 0.16 eV off the
    float64 model for a 192-atom water box. It is now summed in float64, as the ASE calculator sums it."""
    import copy
    import types

    import torch
    from ase import Atoms
    from ase.build import molecule

    from cartlorem import CartLorem, CartLoremCalculator

    torch.manual_seed(0)
    model = CartLorem([1, 8], cutoff=3.0, long_range=None, channels=4, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8).double()
    model.set_statistics(atomic_energies={1: -13.6, 8: -2041.8}, avg_num_neighbors=4.0, scale=1.0)
    atoms = Atoms()
    for x in range(4):
        for y in range(4):
            for z in range(4):
                w = molecule("H2O")
                w.positions += 3.1 * np.array([x, y, z])
                atoms += w
    atoms.cell, atoms.pbc = 12.4 * np.eye(3), True
    atoms.rattle(0.05, seed=1)
    atoms.wrap()
    e64 = CartLoremCalculator(model).get_potential_energy(atoms)
    fix = types.SimpleNamespace(model=copy.deepcopy(model).float(), numbers=np.array([1, 8]), total_charge=0.0,
                                multiplicity=None, electric_field=None,
                                lmp=types.SimpleNamespace(extract_box=lambda: ([0.0] * 3, [12.4] * 3, 0.0, 0.0, 0.0,
                                                                               [1, 1, 1], 0)))
    kinds = np.where(atoms.numbers == 1, 1, 2)
    _, energy, _ = lammps_adapter.CartLoremFix._evaluate(fix, [(np.arange(1, len(atoms) + 1), kinds, atoms.positions)])
    assert abs(e64) > 1e5
    assert abs(energy - e64) < 1e-2, energy - e64  # per-atom float32 rounding; the running sum: 0.15 eV
