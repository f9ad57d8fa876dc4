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
