"""The metatomic wrapper (cartlorem.integrations.metatomic): a model saved as a metatomic
AtomisticModel and run through metatomic's own ASE calculator gives cartlorem's ASE calculator's
energy, per-atom energies, forces and stress (float64), for a local and a long-range model."""

import pytest
import torch
from ase.build import bulk, molecule

pytest.importorskip("metatomic.torch", reason="metatomic-torch is not installed (pip install metatomic-torch)")
metatomic_ase = pytest.importorskip("metatomic_ase",
                                    reason="metatomic-ase is not installed (pip install metatomic-ase)")

from cartlorem import CartLorem, CartLoremCalculator, cli, save_model  # noqa: E402
from cartlorem.integrations.metatomic import save_metatomic  # noqa: E402

SPECIES = [1, 6, 8, 11, 17]


def _model(long_range):
    torch.manual_seed(1)
    model = CartLorem(SPECIES, cutoff=4.0, long_range=long_range, channels=8, radial_hidden=8,
                      readout_hidden=8).double().eval()
    with torch.no_grad():
        model.set_statistics(atomic_energies={1: -13.6, 6: -1020.0, 8: -2040.0, 11: -4400.0, 17: -12500.0},
                             avg_num_neighbors=6.0, scale=0.7)
    return model


def _check(model, path, atoms):
    ours, theirs = atoms.copy(), atoms.copy()
    ours.calc = CartLoremCalculator(model)
    theirs.calc = metatomic_ase.MetatomicCalculator(str(path))
    e = ours.get_potential_energy()
    assert abs(theirs.get_potential_energy() - e) <= 1e-10 * max(1.0, abs(e))
    f = ours.get_forces()
    assert abs(theirs.get_forces() - f).max() <= 1e-10 * max(1.0, abs(f).max())
    assert abs(theirs.get_potential_energies() - ours.get_potential_energies()).max() <= 1e-10 * max(1.0, abs(e))
    if atoms.pbc.all():
        s = ours.get_stress()
        assert abs(s).max() > 1e-6
        assert abs(theirs.get_stress() - s).max() <= 1e-10 * max(1.0, abs(s).max())


@pytest.mark.parametrize("long_range", [None, "multipole"])
def test_metatomic_calculator_matches_cartlorem(tmp_path, long_range):
    model = _model(long_range)
    path = tmp_path / "model-mta.pt"
    save_metatomic(model, path)
    ethanol = molecule("CH3CH2OH")
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    for k, atoms in enumerate((ethanol, salt)):
        atoms.rattle(0.05, seed=k)
        _check(model, path, atoms)


def test_cli_writes_a_metatomic_model(tmp_path):
    from metatomic.torch import load_atomistic_model

    model = _model(None)
    save_model(model, tmp_path / "model.pt")
    out = tmp_path / "model-mta.pt"
    assert cli.main(["export", str(tmp_path / "model.pt"), str(out), "--metatomic"]) == 0
    loaded = load_atomistic_model(str(out))
    capabilities = loaded.capabilities()
    assert list(capabilities.atomic_types) == SPECIES
    assert capabilities.length_unit == "angstrom" and capabilities.dtype == "float64"
    assert capabilities.outputs["energy"].unit == "eV"
    assert capabilities.interaction_range == pytest.approx(4.0 * len(model.layers))
    water = molecule("H2O")
    _check(model, out, water)


def test_save_metatomic_is_atomic_and_names_a_folder_target(tmp_path, monkeypatch):
    """save_metatomic wrote straight into the target: a failure while writing (a full disk, a crash) left a
    truncated file where the previous model was; a folder as the target failed inside torch ("enforce fail at
    inline_container.cc ... Is a directory") and a file in a folder not made yet with "Parent directory ... does
    not exist" (save_exported, the plain export, handles all three)."""
    from metatomic.torch import load_atomistic_model

    model = _model(None)
    target = tmp_path / "model-mta.pt"
    save_metatomic(model, target)
    before = target.read_bytes()
    real_save = torch.jit.save

    def failing_save(module, f, *args, **kwargs):  # writes part of the file, then the disk is full
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.jit, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_metatomic(model, target)
    monkeypatch.setattr(torch.jit, "save", real_save)
    assert target.read_bytes() == before  # the previous model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-mta.pt"]  # and nothing else left behind

    with pytest.raises(ValueError, match="is a folder: give the metatomic model a file name"):
        save_metatomic(model, tmp_path)
    nested = tmp_path / "new" / "sub" / "model-mta.pt"
    save_metatomic(model, nested)
    assert [p.name for p in nested.parent.iterdir()] == ["model-mta.pt"]
    assert list(load_atomistic_model(str(nested)).capabilities().atomic_types) == SPECIES


@pytest.mark.parametrize("long_range", [None, "multipole"])
def test_selected_atoms_naming_every_atom(tmp_path, long_range):
    """LAMMPS' metatomic pair style passes selected_atoms at every step, naming the atoms of its domain: on one
    MPI rank, every atom. The model refused any selected_atoms, so it could not run in LAMMPS at all (the module
    docstring lists LAMMPS). A selection of every atom (in any order) now gives the energies without one; a part
    of the atoms is still refused, with an error that says so."""
    from metatensor.torch import Labels
    from metatomic.torch import ModelOutput

    model = _model(long_range)
    path = tmp_path / "model-mta.pt"
    save_metatomic(model, path)
    calc = metatomic_ase.MetatomicCalculator(str(path))
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    salt.rattle(0.05, seed=3)
    water = molecule("H2O")
    systems = [salt, water]
    every = torch.tensor([[k, a] for k, atoms in enumerate(systems) for a in range(len(atoms))], dtype=torch.int32)
    shuffled = every[torch.randperm(len(every), generator=torch.Generator().manual_seed(0))]
    for per_atom in (False, True):
        outputs = {"energy": ModelOutput(unit="eV", per_atom=per_atom)}
        want = calc.run_model(systems, outputs)["energy"].block()
        got = calc.run_model(systems, outputs, selected_atoms=Labels(["system", "atom"], shuffled))["energy"].block()
        assert got.samples == want.samples
        torch.testing.assert_close(got.values, want.values, rtol=1e-12, atol=1e-12)
    ours = salt.copy()
    ours.calc = CartLoremCalculator(model)
    e = calc.run_model(salt, {"energy": ModelOutput(unit="eV", per_atom=False)},
                       selected_atoms=Labels(["system", "atom"], every[: len(salt)]))["energy"].block().values
    assert float(e) == pytest.approx(ours.get_potential_energy(), rel=1e-12, abs=1e-10)
    with pytest.raises(Exception, match=r"selected_atoms names 5 of the 11 atoms: cartlorem models compute every "
                                        r"atom of each system"):
        calc.run_model(systems, {"energy": ModelOutput(unit="eV", per_atom=False)},
                       selected_atoms=Labels(["system", "atom"], every[3:8]))
