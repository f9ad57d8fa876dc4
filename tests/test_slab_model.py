"""Slabs, pbc = [True, True, False], in the long-range model and the ASE calculator (float64).

References: finite differences of the energy (forces); the same slab with another vacuum (c length);
the slab energy of cartlorem.ewald.electrostatic_energy (checked against converged vacuum and brute-force
2D lattice sums in test_slab.py) for the reported multipoles; O(3) acting on cell and positions together;
translations and lattice images.
"""

import numpy as np
import pytest
import torch
from ase.build import bulk

import cartlorem
from cartlorem.ewald import electrostatic_energy
from cartlorem.graph import atoms_to_graph
from cartlorem.units import COULOMB

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["multipole", "lorem"]


def lr_model(kind, seed=0, lr_channels=2, **kw):
    torch.manual_seed(seed)
    model = cartlorem.CartLorem([11, 17], cutoff=4.0, long_range=kind, channels=8, num_layers=1, correlation=2,
                                num_basis=4, radial_hidden=8, readout_hidden=8,
                                long_range_options={"lr_channels": lr_channels}, **kw).double()
    with torch.no_grad():  # off the symmetric initial values, charges of a sizeable magnitude
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def nacl_slab(vacuum=6.0, seed=1, rattle=0.1):
    """NaCl(001), two layers (8 atoms, 5.64 Å square cell), vacuum along z, rattled."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.center(vacuum=vacuum, axis=2)
    atoms.pbc = [True, True, False]
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def predict(model, atoms, **kw):
    out = model(atoms_to_graph(atoms, model.cutoff), create_graph=False, **kw)
    return float(out["energy"].detach()), out["forces"].detach().numpy(), out


@pytest.mark.parametrize("kind", KINDS)
def test_forces_are_minus_the_energy_gradient(kind):
    model = lr_model(kind)
    atoms = nacl_slab()
    _, forces, _ = predict(model, atoms)
    assert np.abs(forces).max() > 1e-2
    h = 1e-4
    for i, a in [(0, 2), (3, 0), (6, 1), (7, 2)]:
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[i, a] += sign * h
            energies.append(predict(model, moved)[0])
        assert -(energies[0] - energies[1]) / (2 * h) == pytest.approx(forces[i, a], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_energy_does_not_depend_on_the_vacuum(kind):
    """c = 17.6, 23.6 and 45.6 Å: the same slab to the Ewald accuracy (1e-5); the long-range energy is
    sizeable, so a vacuum-dependent (e.g. plain 3D periodic) sum would fail."""
    model = lr_model(kind)
    results = [predict(model, nacl_slab(vacuum)) for vacuum in (6.0, 9.0, 20.0)]
    e_lr = float(results[0][2]["energy_lr"].detach())
    assert abs(e_lr) > 0.1
    for e, f, _ in results[1:]:
        assert e == pytest.approx(results[0][0], abs=1e-5 * max(1.0, abs(e_lr)))
        assert np.allclose(f, results[0][1], atol=1e-5)


def test_channel_zero_energy_is_the_slab_coulomb_energy():
    """One learned channel, no learned long-range readout: energy_lr = COULOMB × U_slab(reported q, μ, Θ)
    of cartlorem.ewald.electrostatic_energy with pbc [T, T, F], for atoms inside the region it needs."""
    model = lr_model("multipole", lr_channels=1)
    block = model.long_range_block
    with torch.no_grad():
        block.readout[-1].weight.zero_()
        block.readout[-1].bias.zero_()
    atoms = nacl_slab()
    g = atoms_to_graph(atoms, model.cutoff)
    out = model(g, create_graph=False)
    u = electrostatic_energy(g.positions, out["charges"][:, None], out["dipoles"][:, None],
                             out["quadrupoles"][:, None], cell=g.cell[0], pbc=[True, True, False],
                             smearing=block.smearing, accuracy=block.accuracy, prefactor=COULOMB)
    assert abs(float(u)) > 0.1
    assert float(out["energy_lr"].detach()) == pytest.approx(float(u.detach()), rel=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_translations_and_lattice_images(kind):
    """In-plane and normal translations (atoms outside 0 <= z <= |c| too), and atoms moved by in-plane
    lattice vectors: same energy and forces."""
    model = lr_model(kind)
    atoms = nacl_slab()
    e0, f0, _ = predict(model, atoms)
    moved = atoms.copy()
    moved.positions += [3.1, -7.3, 0.0]
    e1, f1, _ = predict(model, moved)
    moved.positions += [0.0, 0.0, -40.0]  # far below the plane of a and b: the model centres the slab
    e2, f2, _ = predict(model, moved)
    imaged = atoms.copy()
    imaged.positions[[1, 4]] += atoms.cell[0] - 2 * atoms.cell[1]
    imaged.positions[6] += 3 * atoms.cell[1]
    e3, f3, _ = predict(model, imaged)
    for e, f in ((e1, f1), (e2, f2), (e3, f3)):
        assert e == pytest.approx(e0, rel=1e-11, abs=1e-11)
        assert np.allclose(f, f0, rtol=1e-9, atol=1e-10)


def _orthogonal(seed, reflect):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q @ np.diag([1.0, 1.0, -1.0]) if reflect else q


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["z_mirror", "in_plane_rotation", "random_rotation", "random_reflection"])
def test_o3_on_cell_and_positions(kind, name):
    """O(3) acting on positions and cell together: invariant energy, forces rotate (F' = F R^T)."""
    model = lr_model(kind)
    atoms = nacl_slab()
    if name == "z_mirror":
        rot = np.diag([1.0, 1.0, -1.0])  # c now points to -z: atoms at z < 0
    elif name == "in_plane_rotation":
        t = 0.7
        rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    else:
        rot = _orthogonal(3, name == "random_reflection")
    e0, f0, out0 = predict(model, atoms)
    turned = atoms.copy()
    turned.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
    turned.positions = atoms.positions @ rot.T
    e1, f1, out1 = predict(model, turned)
    assert e1 == pytest.approx(e0, rel=1e-10, abs=1e-10)
    assert np.allclose(f1, f0 @ rot.T, rtol=1e-8, atol=1e-9)
    if kind == "multipole":  # the reported multipoles are equivariant too
        assert np.allclose(out1["charges"].detach(), out0["charges"].detach(), atol=1e-10)
        assert np.allclose(out1["dipoles"].detach(), out0["dipoles"].detach().numpy() @ rot.T, atol=1e-10)


def test_no_stress_for_slabs():
    model = lr_model("multipole")
    _, _, out = predict(model, nacl_slab())
    assert "stress" not in out  # not computed by default for slabs
    _, _, out = predict(model, nacl_slab(), compute_stress=True)
    assert torch.equal(out["stress"], torch.zeros_like(out["stress"]))  # documented zero row


def strained(atoms, eps):
    """atoms under the homogeneous strain r → r (I + ε), cell → cell (I + ε)."""
    out = atoms.copy()
    out.positions = atoms.positions @ (np.eye(3) + eps)
    out.cell = atoms.cell.array @ (np.eye(3) + eps)
    return out


@pytest.mark.parametrize("kind", KINDS + [None])
@pytest.mark.parametrize("boundary", ["slab", "open", "periodic"])
def test_virial_is_minus_the_strain_derivative(kind, boundary):
    """"virial" = −∂E/∂ε (eV) by central finite differences of the energy under strain, all nine components, for
    slabs and open structures too (no volume needed; the stress rows there stay zero), and −V σ for a cell. What
    an MD engine's barostat divides by its box volume (cartlorem.integrations.lammps; before, LAMMPS got a zero
    virial for a slab)."""
    if kind is None:  # a local model: any boundary, and its own strain derivative
        torch.manual_seed(0)
        model = cartlorem.CartLorem([11, 17], cutoff=4.0, long_range=None, channels=8, num_layers=1, correlation=2,
                                    num_basis=4, radial_hidden=8, readout_hidden=8).double().eval()
    else:
        model = lr_model(kind)
    atoms = nacl_slab()
    if boundary == "open":
        atoms.pbc = False
    elif boundary == "periodic":
        atoms.pbc = True
    _, _, out = predict(model, atoms, compute_stress=True)
    virial = out["virial"][0].detach().numpy()
    assert np.abs(virial).max() > 1e-3
    h = 1e-5
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h
            up, down = predict(model, strained(atoms, eps))[0], predict(model, strained(atoms, -eps))[0]
            assert virial[a, b] == pytest.approx(-(up - down) / (2 * h), rel=1e-5, abs=1e-6)
    stress = out["stress"][0].detach().numpy()
    if boundary == "periodic":
        np.testing.assert_allclose(virial, -atoms.get_volume() * stress, rtol=1e-12, atol=1e-12)
    else:
        assert not stress.any()


@pytest.mark.parametrize("pbc", [[True, False, True], [False, True, True], [True, False, False],
                                 [False, False, True]])
def test_unsupported_boundaries_are_clear_errors(pbc):
    model = lr_model("multipole")
    atoms = nacl_slab()
    atoms.pbc = pbc
    with pytest.raises(ValueError, match=r"long-range models support open .* slabs, pbc = \[True, True, False\]"):
        predict(model, atoms)
    # a local model takes any pattern: its neighbour list does
    local = cartlorem.CartLorem([11, 17], cutoff=4.0, long_range=None, channels=8, num_layers=1,
                                correlation=2, num_basis=4, radial_hidden=8, readout_hidden=8).double()
    assert np.isfinite(predict(local, atoms)[0])


def test_slab_without_height_or_too_thin_is_a_clear_error():
    model = lr_model("multipole")
    atoms = nacl_slab()
    flat = atoms.copy()
    flat.cell[2] = [0.0, 0.0, 0.0]  # ase.build.fcc111(..., vacuum=None) gives this
    with pytest.raises(ValueError, match="no height above the plane"):
        predict(model, flat)
    thin = atoms.copy()
    thin.cell[2] = [0.0, 0.0, 2.0]  # the two layers span ~2.8 Å
    with pytest.raises(ValueError, match="more than the height of the third cell row"):
        predict(model, thin)
    slanted = atoms.copy()  # a c that is not orthogonal to the plane: only its height counts
    slanted.cell[2] = [2.0, -1.0, atoms.cell[2, 2]]
    e_slanted, f_slanted, _ = predict(model, slanted)
    e, f, _ = predict(model, atoms)
    assert e_slanted == pytest.approx(e, rel=1e-11) and np.allclose(f_slanted, f, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_calculator_md_on_a_slab(kind):
    """ASE velocity Verlet on the NaCl slab through the calculator (neighbour lists reused, positions
    shifted in float64): the atoms move, every step equals a fresh model call, the total energy is
    conserved, and stress is refused. The slab sits at z ~ 20 Å in a 40 Å cell, so the calculator's
    centroid shift alone would put half the atoms below the plane of a and b."""
    from ase import units
    from ase.calculators.calculator import PropertyNotImplementedError
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    model = lr_model(kind)
    atoms = nacl_slab(vacuum=17.0, rattle=0.05)
    calc = cartlorem.CartLoremCalculator(model, skin=0.5)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    start = atoms.positions.copy()
    total = []
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.attach(lambda: total.append(atoms.get_potential_energy() + atoms.get_kinetic_energy()))
    dyn.run(20)
    assert np.linalg.norm(atoms.positions - start, axis=1).max() > 0.02
    e, f, _ = predict(model, atoms)
    assert atoms.get_potential_energy() == pytest.approx(e, rel=1e-10, abs=1e-10)
    assert np.allclose(atoms.get_forces(), f, rtol=1e-8, atol=1e-9)
    assert np.ptp(total) < 2e-3
    with pytest.raises(PropertyNotImplementedError, match="fully periodic"):
        atoms.get_stress()


@pytest.mark.parametrize("kind", KINDS)
def test_compact_slab_cells(kind):
    """The trainer's compact_slab_cells: a slab with 20 Å of vacuum in c gets the height ceil(extent) + 1 Å along its
    normal, the periodic cell and the molecule beside it keep theirs exactly, and the model's energies and forces
    stay those of the original cells to the Ewald accuracy."""
    from ase.build import molecule

    from cartlorem.graph import collate
    from cartlorem.nn.long_range import compact_slab_cells

    model = lr_model(kind)
    slab = nacl_slab(20.0)
    cell_atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    cell_atoms.rattle(0.05, seed=3)
    mol = molecule("NaCl")
    batch = collate([atoms_to_graph(a, model.cutoff) for a in (slab, cell_atoms, mol)])
    compact = compact_slab_cells(batch)
    extent = np.ptp(slab.positions[:, 2])
    assert float(compact.cell[0, 2, 2]) == np.ceil(extent) + 1.0 < slab.cell[2, 2]
    assert torch.equal(compact.cell[0, :2], batch.cell[0, :2]) and torch.equal(compact.cell[1:], batch.cell[1:])
    a, b = model(batch, create_graph=False), model(compact, create_graph=False)
    e_lr = abs(float(a["energy_lr"][0].detach()))
    assert e_lr > 0.1
    assert torch.allclose(a["energy"], b["energy"], rtol=0, atol=1e-5 * max(1.0, e_lr))
    assert torch.allclose(a["forces"], b["forces"], rtol=0, atol=1e-5)
    no_slab = collate([atoms_to_graph(cell_atoms, model.cutoff), atoms_to_graph(mol, model.cutoff)])
    assert compact_slab_cells(no_slab) is no_slab


def test_compact_slab_cells_keeps_the_cell_of_a_slab_without_atoms():
    """A batch with a slab that has no atoms (a hand-built graph: the model takes it, energy 0): its third cell row
    became -inf * n (the extent of no atoms is -inf..inf), and the model then refused the batch."""
    from cartlorem.nn.long_range import compact_slab_cells

    model = lr_model("multipole")
    g = atoms_to_graph(nacl_slab(20.0), model.cutoff)
    two = g.replace(cell=g.cell.repeat(2, 1, 1), pbc=g.pbc.repeat(2, 1), total_charge=g.total_charge.repeat(2),
                    multiplicity=None)
    compact = compact_slab_cells(two)
    assert torch.isfinite(compact.cell).all() and torch.equal(compact.cell[1], two.cell[1])
    assert float(compact.cell[0, 2, 2]) < float(two.cell[0, 2, 2])
    energy = model(compact, create_graph=False)["energy"].detach()
    assert float(energy[1]) == 0.0 and torch.isfinite(energy).all()


def test_training_batches_take_compact_slab_cells(monkeypatch):
    """train() hands the model each slab in its compact cell (fewer k-vectors for the same fields)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from cartlorem.data import read_dataset
    from cartlorem.nn.long_range import LongRangeBlock
    from cartlorem.training import train

    structures = []
    for seed in range(4):
        s = nacl_slab(20.0, seed=seed)
        s.calc = SinglePointCalculator(s, energy=-float(seed), forces=np.zeros((len(s), 3)))
        structures.append(s)
    heights = []
    forward = LongRangeBlock.forward

    def spy(self, h, graph, positions, cell, pairs=None):
        if self.training:  # the training steps (validation predicts on the cells as given)
            heights.extend(float(c[2].norm()) for c in cell.detach())
        return forward(self, h, graph, positions, cell, pairs)

    monkeypatch.setattr(LongRangeBlock, "forward", spy)
    model = lr_model("multipole").train()
    train(model, read_dataset(structures, cutoff=model.cutoff, require=()), epochs=1, batch_size=2, progress=False)
    extent = max(np.ptp(s.positions[:, 2]) for s in structures)
    assert heights and max(heights) <= np.ceil(extent) + 1.0 < 20.0
