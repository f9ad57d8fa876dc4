"""The ASE calculator against the model itself: same numbers, fresh state when the system changes,
neighbour-list reuse with a skin, models loaded from a path."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import cartlorem.calculator as calculator_module
from cartlorem import CartLorem, CartLoremCalculator, save_model
from cartlorem.graph import atoms_to_graph

CUTOFF = 3.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CartLorem(
        [1, 8, 29, 47],
        cutoff=CUTOFF,
        long_range=None,
        channels=8,
        num_layers=2,
        correlation=2,
        num_basis=4,
        radial_hidden=8,
        readout_hidden=8,
    ).double()
    m.set_statistics(
        atomic_energies={1: -0.5, 8: -2.0, 29: -3.0, 47: -2.5}, avg_num_neighbors=6.0, scale=0.7, shift=0.1
    )
    return m.eval()


def crystal(seed=0, repeat=(2, 1, 1)):
    rng = np.random.default_rng(seed)
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
    a.symbols[[1, 5]] = "Ag"
    a.set_cell(a.cell.array @ (np.eye(3) + 0.03 * rng.standard_normal((3, 3))), scale_atoms=True)
    a.positions += 0.1 * rng.standard_normal(a.positions.shape)
    return a


def cluster(n=5, seed=0, symbols="CuAgCuCuAgCuCu"):
    rng = np.random.default_rng(seed)
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    centre = int(np.argmin(np.linalg.norm(a.positions - 3.6, axis=1)))
    d = np.linalg.norm(a.positions - a.positions[centre], axis=1)
    pick = np.concatenate([[centre], np.flatnonzero((d > 0) & (d < 2.6))[: n - 1]])
    at = Atoms(Atoms(symbols).get_chemical_symbols()[:n], positions=a.positions[pick])
    at.positions += 0.1 * rng.standard_normal(at.positions.shape)
    return at


def reference(model, atoms):
    """Model output on a fresh graph: energy (eV), per-atom energies, forces, 3×3 stress or None."""
    g = atoms_to_graph(atoms, model.cutoff, dtype=torch.float64)
    out = model(g, compute_stress=bool(atoms.pbc.any()), create_graph=False)
    stress = out["stress"][0].detach().numpy() if "stress" in out else None
    return (
        float(out["energy"][0].detach()),
        out["node_energy"].detach().numpy(),
        out["forces"].detach().numpy(),
        stress,
    )


def check(atoms, model, tol=1e-10):
    e, ei, f, s = reference(model, atoms)
    assert atoms.get_potential_energy() == pytest.approx(e, rel=tol, abs=tol)
    assert np.allclose(atoms.get_potential_energies(), ei, rtol=tol, atol=tol)
    assert np.allclose(atoms.get_forces(), f, rtol=tol, atol=tol)
    if s is not None:
        assert np.allclose(atoms.get_stress(voigt=False), s, rtol=tol, atol=tol)


def test_calculator_equals_model(model):
    atoms = crystal()
    atoms.calc = CartLoremCalculator(model)
    check(atoms, model)
    voigt = atoms.get_stress()
    full = atoms.get_stress(voigt=False)
    assert np.allclose(voigt, full[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]])
    assert atoms.get_potential_energy(force_consistent=True) == pytest.approx(atoms.get_potential_energy())


def test_energies_sum_to_energy(model):
    for atoms in (crystal(seed=1), cluster(6, seed=1)):
        atoms.calc = CartLoremCalculator(model)
        assert atoms.get_potential_energies().sum() == pytest.approx(atoms.get_potential_energy(), rel=1e-12)


def test_changes_between_calls(model):
    calc = CartLoremCalculator(model, skin=0.5)
    # the same calculator sees: a cluster, more atoms, other species, a crystal, a new cell, other pbc
    systems = [
        cluster(4, seed=2),
        cluster(7, seed=2),
        cluster(7, seed=2, symbols="AgAgCuAgCuAgCu"),
        crystal(seed=3),
    ]
    strained = crystal(seed=3)
    strained.set_cell(strained.cell * 1.02, scale_atoms=False)
    slab = crystal(seed=3)
    slab.pbc = (True, True, False)
    open_ = crystal(seed=3)
    open_.pbc = False
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    for atoms in systems + [strained, slab, open_, water]:
        atoms.calc = calc
        check(atoms, model)
    # in-place changes of one Atoms object
    atoms = crystal(seed=4)
    atoms.calc = calc
    check(atoms, model)
    atoms.set_cell(atoms.cell * 0.98, scale_atoms=True)
    check(atoms, model)
    atoms.numbers[0] = 47
    check(atoms, model)
    atoms.pbc = (True, False, True)
    check(atoms, model)


def test_neighbour_list_reuse_along_md(model, monkeypatch):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    builds = []
    original = calculator_module.atoms_to_graph
    monkeypatch.setattr(
        calculator_module, "atoms_to_graph", lambda *a, **k: builds.append(1) or original(*a, **k)
    )

    atoms = crystal(seed=5)
    rng = np.random.default_rng(0)
    atoms.set_momenta(
        rng.normal(size=(len(atoms), 3)) * np.sqrt(atoms.get_masses()[:, None] * units.kB * 1500)
    )
    atoms.calc = CartLoremCalculator(model, skin=0.3)
    fresh_model_calc = dict(skin=0.0)
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    steps = 25
    for _ in range(steps):
        dyn.run(1)
        probe = atoms.copy()
        probe.calc = CartLoremCalculator(model, **fresh_model_calc)
        assert np.allclose(atoms.get_forces(), probe.get_forces(), rtol=1e-10, atol=1e-10)
        assert atoms.get_potential_energy() == pytest.approx(probe.get_potential_energy(), rel=1e-12)
        assert np.allclose(atoms.get_stress(), probe.get_stress(), rtol=1e-10, atol=1e-10)
    reuse_builds = len(builds) - steps  # every probe builds once
    assert 1 <= reuse_builds < steps // 2  # the list was reused most of the time (and rebuilt when needed)


def test_path_loaded_model_equals_in_memory(model, tmp_path):
    save_model(model, tmp_path / "model.pt")
    a, b = crystal(seed=6), crystal(seed=6)
    a.calc = CartLoremCalculator(model)
    b.calc = CartLoremCalculator(str(tmp_path / "model.pt"))
    assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), rel=1e-14)
    assert np.allclose(b.get_forces(), a.get_forces(), rtol=1e-12, atol=1e-14)
    assert np.allclose(b.get_stress(), a.get_stress(), rtol=1e-12, atol=1e-14)


def test_unknown_species_is_a_clear_error(model):
    atoms = Atoms("NaCl", positions=[[0, 0, 0], [2.5, 0, 0]])
    atoms.calc = CartLoremCalculator(model)
    with pytest.raises(ValueError, match="not known to the model: Na"):
        atoms.get_potential_energy()
