"""Dipole, Born effective charges and a uniform electric field from long-range models (float64).

References: finite differences of P and of the energy, the acoustic sum rule Σ_i Z*_i = Q I, O(3)
acting on positions (and cell), and a toy configuration whose charges cannot depend on the positions
(Z* = q I exactly).
"""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

import cartlorem
from cartlorem.graph import atoms_to_graph

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["multipole", "lorem"]


def lr_model(kind="multipole", species=(1, 6, 8), seed=0, lr_channels=2, long_range_options=None, **kw):
    torch.manual_seed(seed)
    options = {"lr_channels": lr_channels, **(long_range_options or {})}
    model = cartlorem.CartLorem(list(species), cutoff=4.0, long_range=kind, channels=8, num_layers=1,
                                correlation=2, num_basis=4, radial_hidden=8, readout_hidden=8,
                                long_range_options=options, **kw).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def methanol(charge=0.0):
    a = molecule("CH3OH")
    a.rattle(0.05, seed=1)
    a.positions += [0.3, -0.2, 0.5]  # off the origin: P of a charged molecule depends on it
    a.info["total_charge"] = charge
    return a


def nacl_crystal():
    a = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    a.rattle(0.1, seed=2)
    return a


def nacl_slab():
    a = nacl_crystal()
    a.center(vacuum=6.0, axis=2)
    a.pbc = [True, True, False]
    return a


def run(model, atoms, **kw):
    return model(atoms_to_graph(atoms, model.cutoff), create_graph=False, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("charge", [0.0, 1.0])
def test_born_charges_are_the_derivative_of_the_dipole(kind, charge):
    model = lr_model(kind)
    atoms = methanol(charge)
    out = run(model, atoms, compute_dipole=True, compute_born_charges=True)
    z = out["born_charges"].detach().numpy()
    p = out["dipole"].detach().numpy()[0]
    site = out["charges"].detach().numpy()[:, None] * atoms.positions + out["dipoles"].detach().numpy()
    assert np.allclose(p, site.sum(0), rtol=1e-12, atol=1e-14)  # P = Σ q r + μ of channel 0
    assert np.abs(z - out["charges"].detach().numpy()[:, None, None] * np.eye(3)).max() > 1e-3  # not just q I
    h = 1e-5
    for i, b in [(0, 0), (1, 2), (4, 1), (5, 2)]:
        ps = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[i, b] += sign * h
            ps.append(run(model, moved, compute_dipole=True)["dipole"].detach().numpy()[0])
        assert np.allclose((ps[0] - ps[1]) / (2 * h), z[i, :, b], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,make,charge", [("molecule", methanol, 0.0), ("cation", methanol, 1.0),
                                              ("crystal", nacl_crystal, 0.0), ("slab", nacl_slab, 0.0)])
def test_acoustic_sum_rule(kind, name, make, charge):
    species = (1, 6, 8) if make is methanol else (11, 17)
    model = lr_model(kind, species)
    atoms = make(charge) if make is methanol else make()
    out = run(model, atoms, compute_born_charges=True)
    z = out["born_charges"].detach().numpy()
    assert "dipole" not in out and np.abs(z).max() > 0.05
    total = float(out["charges"].detach().sum())
    assert total == pytest.approx(charge, abs=1e-12)  # charge correction
    assert np.allclose(z.sum(0), total * np.eye(3), rtol=0, atol=1e-12 * max(1.0, np.abs(z).max()))


def _orthogonal(seed, det):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) * det > 0 else q @ np.diag([1.0, 1.0, -1.0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("det", [1.0, -1.0])
def test_dipole_and_born_charges_rotate(kind, det):
    """P' = R P and Z*' = R Z* Rᵀ under rotations and reflections of a (charged) molecule and a crystal."""
    rot = _orthogonal(5, det)
    model = lr_model(kind)
    atoms = methanol(1.0)
    out0 = run(model, atoms, compute_dipole=True, compute_born_charges=True)
    turned = atoms.copy()
    turned.positions = atoms.positions @ rot.T
    out1 = run(model, turned, compute_dipole=True, compute_born_charges=True)
    p0, p1 = out0["dipole"].detach().numpy()[0], out1["dipole"].detach().numpy()[0]
    z0, z1 = out0["born_charges"].detach().numpy(), out1["born_charges"].detach().numpy()
    assert np.allclose(p1, rot @ p0, atol=1e-11)
    assert np.allclose(z1, rot @ z0 @ rot.T, atol=1e-11)

    crystal_model = lr_model(kind, (11, 17))
    crystal = nacl_crystal()
    z0 = run(crystal_model, crystal, compute_born_charges=True)["born_charges"].detach().numpy()
    turned = crystal.copy()
    turned.set_cell(crystal.cell.array @ rot.T, scale_atoms=False)
    turned.positions = crystal.positions @ rot.T
    z1 = run(crystal_model, turned, compute_born_charges=True)["born_charges"].detach().numpy()
    assert np.abs(z0).max() > 0.05 and np.allclose(z1, rot @ z0 @ rot.T, atol=1e-10)


def test_fixed_charges_give_born_charges_q_times_identity():
    """Ions farther apart than the cutoff: the features, hence q (and μ = 0), depend on the species only,
    so Z*_i = q_i I exactly, and the charges sum to the total charge (+1)."""
    model = lr_model("multipole", (11, 17))
    atoms = Atoms("NaClNaClNa", positions=[[0, 0, 0], [6.0, 0, 0], [0, 6.5, 0], [0, 0, 7.0], [6.0, 6.0, 6.0]])
    atoms.info["total_charge"] = 1.0
    out = run(model, atoms, compute_born_charges=True, compute_dipole=True)
    q = out["charges"].detach().numpy()
    assert np.abs(q).min() > 1e-3 and float(q.sum()) == pytest.approx(1.0, abs=1e-13)
    assert np.allclose(out["born_charges"].detach().numpy(), q[:, None, None] * np.eye(3), rtol=0, atol=1e-14)
    assert np.allclose(out["dipole"].detach().numpy()[0], q @ atoms.positions, atol=1e-13)


@pytest.mark.parametrize("make", [methanol, nacl_crystal, nacl_slab])
def test_zero_field_is_no_field_bit_for_bit(make):
    species = (1, 6, 8) if make is methanol else (11, 17)
    model = lr_model("multipole", species)
    atoms = make()
    periodic = bool(atoms.pbc.all())
    ref = run(model, atoms, compute_stress=periodic)
    out = run(model, atoms, compute_stress=periodic, electric_field=[0.0, 0.0, 0.0])
    for key in ("energy", "node_energy", "forces") + (("stress",) if periodic else ()):
        assert torch.equal(out[key], ref[key]), key


@pytest.mark.parametrize("kind", KINDS)
def test_field_on_a_molecule_is_minus_p_dot_e(kind):
    """Energy gets −P·E; forces are −∂/∂r of that energy (finite differences), i.e. F(E) − F(0) = Z*ᵀE."""
    field = np.array([0.3, -0.2, 0.5])  # V/Å
    model = lr_model(kind)
    atoms = methanol(1.0)
    ref = run(model, atoms, compute_dipole=True, compute_born_charges=True)
    out = run(model, atoms, electric_field=field)
    p = ref["dipole"].detach().numpy()[0]
    assert float(out["energy"].detach()) == pytest.approx(float(ref["energy"].detach()) - p @ field, rel=1e-12)
    assert float(out["node_energy"].detach().sum()) == pytest.approx(float(out["energy"].detach()), rel=1e-12)
    df = out["forces"].detach().numpy() - ref["forces"].detach().numpy()
    assert np.abs(df).max() > 1e-3
    assert np.allclose(df, np.einsum("iab,a->ib", ref["born_charges"].detach().numpy(), field), atol=1e-11)
    h = 1e-5
    forces = out["forces"].detach().numpy()
    for i, b in [(0, 1), (2, 2), (5, 0)]:
        es = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[i, b] += sign * h
            es.append(float(run(model, moved, electric_field=field)["energy"].detach()))
        assert -(es[0] - es[1]) / (2 * h) == pytest.approx(forces[i, b], rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("make", [nacl_crystal, nacl_slab])
@pytest.mark.parametrize("direction", [(0.2, 0.1, -0.4), (0.3, 0.0, 0.0)])  # along a cell vector: fewer passes
def test_field_on_a_periodic_cell_is_the_born_force(make, direction):
    """Periodic cells and slabs: F_i += Z*_iᵀE; energy and stress do not change."""
    field = torch.tensor([direction], dtype=torch.float64)
    model = lr_model("multipole", (11, 17))
    atoms = make()
    periodic = bool(atoms.pbc.all())
    ref = run(model, atoms, compute_born_charges=True, compute_stress=periodic)
    out = run(model, atoms, electric_field=field, compute_stress=periodic)
    assert torch.equal(out["energy"], ref["energy"])
    if periodic:
        assert torch.equal(out["stress"], ref["stress"])
    df = (out["forces"] - ref["forces"]).detach().numpy()
    assert np.abs(df).max() > 1e-3
    assert np.allclose(df, np.einsum("iab,a->ib", ref["born_charges"].detach().numpy(), field[0].numpy()),
                       atol=1e-11)


def test_bad_requests_are_clear_errors():
    local = cartlorem.CartLorem([1, 6, 8], cutoff=4.0, long_range=None, channels=8, num_layers=1,
                                correlation=2, num_basis=4, radial_hidden=8, readout_hidden=8).double()
    atoms = methanol()
    for kw in (dict(compute_born_charges=True), dict(compute_dipole=True), dict(electric_field=[0, 0, 0.1])):
        with pytest.raises(ValueError, match="no long range"):
            run(local, atoms, **kw)
    with pytest.raises(ValueError, match="no long range"):
        cartlorem.CartLoremCalculator(local, electric_field=[0, 0, 0.1])
    model = lr_model("multipole", (11, 17))
    with pytest.raises(ValueError, match="dipole is defined for open structures only"):
        run(model, nacl_crystal(), compute_dipole=True)
    with pytest.raises(ValueError, match=r"shape \[3\] or \[B, 3\]"):
        run(model, nacl_crystal(), electric_field=[0.1, 0.2])
    with pytest.raises(ValueError, match="NaN or inf"):
        run(model, nacl_crystal(), electric_field=[0.1, float("nan"), 0.0])
    with pytest.raises(ValueError, match="3 finite numbers"):
        cartlorem.CartLoremCalculator(model, electric_field=[1.0, 2.0])


@pytest.mark.parametrize("correction", ["uniform", None])
def test_calculator_dipole_born_charges_and_field(correction):
    """The calculator shifts positions in float64; its dipole, Born charges, field energy and forces are those of
    the positions ASE holds (a cation far from the origin, where the shift matters), equal to the model's. Without
    charge correction Q depends on the positions, and so do the terms Q o that the shift o brings into P."""
    from ase.calculators.calculator import PropertyNotImplementedError

    field = np.array([0.05, -0.1, 0.2])
    model = lr_model("multipole", long_range_options={"charge_correction": correction})
    atoms = methanol(1.0)
    atoms.positions += [120.0, -40.0, 75.0]
    atoms.calc = cartlorem.CartLoremCalculator(model)
    ref = run(model, atoms, compute_dipole=True, compute_born_charges=True)
    assert np.allclose(atoms.get_dipole_moment(), ref["dipole"].detach().numpy()[0], rtol=1e-10, atol=1e-9)
    z = atoms.calc.get_extra("born_charges")
    assert np.allclose(z, ref["born_charges"].detach().numpy(), atol=1e-10)

    atoms.calc = cartlorem.CartLoremCalculator(model, electric_field=field)
    out = run(model, atoms, electric_field=field)
    assert atoms.get_potential_energy() == pytest.approx(float(out["energy"].detach()), rel=1e-12)
    assert atoms.get_potential_energies().sum() == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
    assert np.allclose(atoms.get_forces(), out["forces"].detach().numpy(), atol=1e-9)

    if correction is None:  # the forces are those of the energy ASE reports (central differences)
        calc, h = cartlorem.CartLoremCalculator(model, electric_field=field, skin=0.0), 1e-4
        for i, k in ((0, 0), (3, 2)):
            e = []
            for step in (h, -h):
                moved = atoms.copy()
                moved.positions[i, k] += step
                e.append(calc.get_potential_energy(moved))
            assert atoms.get_forces()[i, k] == pytest.approx(-(e[0] - e[1]) / (2 * h), abs=1e-6)

    crystal = nacl_crystal()
    crystal.calc = cartlorem.CartLoremCalculator(lr_model("multipole", (11, 17)))
    with pytest.raises(PropertyNotImplementedError, match="molecules"):
        crystal.get_dipole_moment()
    assert crystal.calc.get_extra("born_charges").shape == (8, 3, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_dipole_origin(kind):
    """P about a point o is P − Q o; the field energy of a charged molecule about o is −(P − Q o)·E, and its forces
    and Born charges follow (Q depending on the positions without charge correction)."""
    model = lr_model(kind, long_range_options={"charge_correction": None})
    atoms = methanol(1.0)
    o = np.array([3.0, -7.0, 2.0])
    field = np.array([0.1, 0.05, -0.2])
    ref = run(model, atoms, compute_dipole=True)
    q = float(ref["charges"].detach().sum())
    out = run(model, atoms, compute_dipole=True, compute_born_charges=True, electric_field=field, dipole_origin=o)
    assert np.allclose(out["dipole"].detach().numpy()[0], ref["dipole"].detach().numpy()[0] - q * o, atol=1e-12)
    # the same as the positions moved by −o with the default origin: a translation of the whole molecule
    moved = atoms.copy()
    moved.positions -= o
    there = run(model, moved, compute_dipole=True, compute_born_charges=True, electric_field=field)
    for key in ("energy", "forces", "dipole", "born_charges"):
        assert np.allclose(out[key].detach().numpy(), there[key].detach().numpy(), atol=1e-10), key
    assert not np.allclose(out["forces"].detach().numpy(),
                           run(model, atoms, electric_field=field)["forces"].detach().numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="dipole_origin .*needs"):
        run(model, atoms, dipole_origin=o)
    with pytest.raises(ValueError, match=r"dipole_origin must have shape \[3\]"):
        run(model, atoms, compute_dipole=True, dipole_origin=[1.0, 2.0])


@pytest.mark.parametrize("ask", ["field", "born_charges"])
def test_calculator_images_of_a_reused_list_are_those_of_a_new_one(ask):
    """An atom that crossed into the next cell within the skin gives the field force Z*ᵀE and Z* of a new
    calculator (a new list, every atom in its home cell)."""
    field = [0.2, 0.0, 0.0] if ask == "field" else None
    model = lr_model("multipole", (11, 17), long_range_options={"charge_correction": None})
    atoms = nacl_crystal()
    atoms.wrap()
    atoms.positions[0] = atoms.cell.array[0] * 0.999 + [0.0, 1.0, 1.0]
    calc = cartlorem.CartLoremCalculator(model, electric_field=field, skin=0.5)

    def result(a, c):
        return c.get_forces(a) if ask == "field" else c.get_extra("born_charges", a)

    result(atoms, calc)
    atoms.positions[0] += atoms.cell.array[0] * 0.002  # 0.01 Å: into the next cell, well within the skin
    fresh = result(atoms.copy(), cartlorem.CartLoremCalculator(model, electric_field=field, skin=0.5))
    assert np.allclose(result(atoms, calc), fresh, atol=1e-10)


def test_born_charges_of_a_dataset_are_those_of_the_calculator(tmp_path):
    """A structure read from a file with atoms outside the cell (an unwrapped trajectory frame) gets, in training
    and evaluation, the Z* the ASE calculator gives it, that of its wrapped copy, and that of its positions as
    they are (Z* took the charge transfer at the positions' images, so those differed)."""
    from ase.io import write

    from cartlorem.data import read_dataset

    model = lr_model("multipole", (11, 17), long_range_options={"charge_correction": None})
    atoms = nacl_crystal()
    atoms.positions[[0, 3]] += atoms.cell.array[0] * 2 - atoms.cell.array[2]  # the same crystal, two atoms moved out
    atoms.positions[5] -= atoms.cell.array[1]
    write(tmp_path / "frame.xyz", atoms)
    graph = read_dataset(tmp_path / "frame.xyz", model.cutoff, energy_key=None, forces_key=None, stress_key=None,
                         require=())[0]
    from_data = model(graph, compute_born_charges=True)["born_charges"].detach().numpy()
    from_calc = cartlorem.CartLoremCalculator(model).get_extra("born_charges", atoms.copy())
    wrapped = atoms.copy()
    wrapped.wrap()
    from_wrapped = model(atoms_to_graph(wrapped, model.cutoff), compute_born_charges=True)["born_charges"]
    assert np.allclose(from_data, from_calc, atol=1e-6)  # extxyz keeps 8 decimals of the positions
    assert np.allclose(from_data, from_wrapped.detach().numpy(), atol=1e-6)
    raw = model(atoms_to_graph(atoms, model.cutoff, wrap=False), compute_born_charges=True)["born_charges"]
    assert np.allclose(from_data, raw.detach().numpy(), rtol=0, atol=1e-10)  # the images do not matter
    assert np.abs(from_data - model(graph)["charges"].detach().numpy()[:, None, None] * np.eye(3)).max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make", [nacl_crystal, nacl_slab])
@pytest.mark.parametrize("correction", ["uniform", None])
def test_periodic_born_charges_and_field_forces_do_not_depend_on_images_or_translations(kind, make, correction):
    """A rigid translation of a crystal, and atoms taken in other lattice images, are the same physical system:
    Z* and the field forces Z*ᵀE must not change. Z* counted the charge that flows to atom j at r_j in its home
    cell, which made it change by more than its own size under a translation of 0.3 Å (and jump where an atom
    crossed a cell face, in MD under a field)."""
    model = lr_model(kind, (11, 17), long_range_options={"charge_correction": correction})
    atoms = make().repeat((2, 1, 1))
    field = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)

    def born_and_forces(a, wrap=True):
        out = model(atoms_to_graph(a, model.cutoff, wrap=wrap), create_graph=False, compute_born_charges=True,
                    electric_field=field)
        plain = model(atoms_to_graph(a, model.cutoff, wrap=wrap), create_graph=False)["forces"]
        return out["born_charges"].detach().numpy(), (out["forces"] - plain).detach().numpy()

    z0, f0 = born_and_forces(atoms)
    q = run(model, atoms)["charges"].detach().numpy()
    assert np.abs(z0 - q[:, None, None] * np.eye(3)).max() > 1e-2  # a charge transfer to see
    np.testing.assert_allclose(f0, np.einsum("nab,a->nb", z0, field.numpy()), rtol=0, atol=1e-12)
    moved = atoms.copy()
    moved.translate([0.3, 1.1, 0.0 if make is nacl_slab else 2.5])
    moved.wrap()
    others = atoms.copy()
    others.positions[[0, 5]] += atoms.cell.array[0] - 2 * atoms.cell.array[1]
    for a, wrap in ((moved, True), (others, False)):
        z1, f1 = born_and_forces(a, wrap)
        np.testing.assert_allclose(z1, z0, rtol=0, atol=1e-10)
        np.testing.assert_allclose(f1, f0, rtol=0, atol=1e-10)
    assert np.allclose(z0.sum(0), q.sum() * np.eye(3), rtol=0, atol=1e-12)  # the acoustic sum rule


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False)])
def test_a_molecule_in_a_large_box_has_the_born_charges_of_the_open_molecule(pbc):
    """Reference: the open molecule's Z* = ∂P/∂r. The same molecule across a face of a periodic box (or a slab's
    cell) whose images are beyond the cutoff has the same charges, and its Z* must converge to the open one as
    the box grows: the periodic form of the charge-transfer displacement (three sines) is off by a relative
    O((r/L)⁶), so doubling L divides the error by ~64 (one sine: 4)."""
    model = lr_model("multipole")
    mol = methanol(0.0)
    open_out = run(model, mol, compute_born_charges=True)
    z_open, q = open_out["born_charges"].detach().numpy(), open_out["charges"].detach().numpy()
    transfer = np.abs(z_open - q[:, None, None] * np.eye(3)).max()
    errors = []
    for length in (15.0, 30.0):
        a = mol.copy()
        a.set_cell([length, 1.1 * length, 0.9 * length])
        a.pbc = pbc
        a.positions += [length - 2.0, 0.5, 0.45 * length - 1.0]  # across the face x = L
        z = run(model, a, compute_born_charges=True)["born_charges"].detach().numpy()
        errors.append(np.abs(z - z_open).max())
    assert transfer > 0.03
    assert errors[1] < 1e-5 * transfer and 50 < errors[0] / errors[1] < 70, errors


def test_calculator_field_is_a_parameter():
    """``calc.set(electric_field=...)`` and assigning ``calc.electric_field`` change the field and drop the old
    results; an unknown argument (a misspelled electric_field) is an error, not an ASE parameter left unused."""
    model = lr_model("multipole")
    atoms = methanol(0.0)
    field = [0.5, 0.0, 0.0]
    with_field = cartlorem.CartLoremCalculator(model, electric_field=field).get_potential_energy(atoms)
    without = cartlorem.CartLoremCalculator(model).get_potential_energy(atoms)
    assert abs(with_field - without) > 1e-3
    calc = cartlorem.CartLoremCalculator(model)
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(without, rel=1e-12)
    assert "electric_field" in calc.set(electric_field=field)
    assert atoms.get_potential_energy() == pytest.approx(with_field, rel=1e-12)
    assert calc.set(electric_field=field) == {}
    calc.electric_field = None
    assert atoms.get_potential_energy() == pytest.approx(without, rel=1e-12)
    calc.electric_field = np.array(field)
    assert atoms.get_potential_energy() == pytest.approx(with_field, rel=1e-12)
    with pytest.raises(TypeError, match="electric_feild"):
        cartlorem.CartLoremCalculator(model, electric_feild=field)
    with pytest.raises(TypeError, match="electric_field only"):
        calc.set(xc="PBE")
    with pytest.raises(ValueError, match="3 finite numbers"):
        calc.set(electric_field=[1.0, "a", 0.0])


def test_ion_pair_aligns_with_the_field_in_md():
    """Example: a free Na-Cl pair (charges of opposite sign) in a field along z turns so that its
    dipole points along the field (ASE velocity Verlet through the calculator). The bond length is held
    (FixBondLength): the untrained model pulls the pair together, which the calculator refuses below 0.1 Å."""
    from ase import units
    from ase.constraints import FixBondLength
    from ase.md.verlet import VelocityVerlet

    model = lr_model("multipole", (11, 17), lr_channels=1)
    swing = {}
    for ez in (1.0, 0.0):  # V/Å; without the field the pair keeps its orientation (the control)
        atoms = Atoms("NaCl", positions=[[0, 0, 0], [2.6, 0.0, 0.4]])
        atoms.set_constraint(FixBondLength(0, 1))
        atoms.calc = cartlorem.CartLoremCalculator(model, electric_field=[0.0, 0.0, ez])
        assert abs(atoms.get_dipole_moment()[0]) > 0.05  # a sizeable dipole along x at the start
        cosines = []
        dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
        dyn.attach(lambda: cosines.append(atoms.get_dipole_moment()[2] / np.linalg.norm(atoms.get_dipole_moment())))
        dyn.run(150)
        swing[ez] = max(cosines) - cosines[0]
    assert swing[1.0] > 0.5 and swing[0.0] < 0.35  # the dipole turns towards +z in the field only


@pytest.mark.parametrize("charge", [0.0, 1.0])
def test_float32_dipole_far_from_the_origin(charge):
    """The calculator shifts a molecule to the origin and passes ASE's origin o; the model formed q_i (r_i − o) in
    float32, so a neutral water's P at 3e4 Å was 4e-3 e·Å off (its float32 charge sum ~1e-7 times o). With charge
    correction Q is the given total charge: P = Σ q_i r_i + μ_i − Q o is as accurate far away as at the origin, and so
    is the field energy −P·E."""
    model = lr_model("multipole")
    field = np.array([0.05, -0.1, 0.2])
    atoms = methanol(charge)
    translation = np.array([3.0e4, -2.0e4, 2.5e4])
    moved = atoms.copy()
    moved.positions += translation
    near = cartlorem.CartLoremCalculator(model, dtype="float32")
    far = cartlorem.CartLoremCalculator(model, dtype="float32")
    exact = cartlorem.CartLoremCalculator(model)  # float64
    p_near, p_far = near.get_dipole_moment(atoms), far.get_dipole_moment(moved)
    p_exact = exact.get_dipole_moment(atoms)
    scale = np.abs(p_exact).max()
    assert np.abs(p_near - p_exact).max() < 1e-5 * scale
    assert np.abs(p_far - charge * translation - p_exact).max() < 1e-5 * scale + 1e-7 * charge * 3e4
    on = [cartlorem.CartLoremCalculator(model, dtype="float32", electric_field=field) for _ in range(2)]
    e_near, e_far = on[0].get_potential_energy(atoms), on[1].get_potential_energy(moved)
    assert e_far == pytest.approx(e_near - charge * translation @ field, abs=2e-4 + 1e-6 * charge * 3e4)
    assert np.abs(on[1].get_forces(moved) - on[0].get_forces(atoms)).max() < 1e-4


@pytest.mark.parametrize("correction", ["uniform", None])  # None: Q depends on the positions, o matters
def test_a_batch_of_open_and_periodic_structures_gives_each_its_own_born_charges_and_field_forces(correction):
    """In a batch with a periodic cell the open structures go through the periodic cells' form of Z* (the
    Cartesian axes, d = r_j − o): each structure gets what it gets alone, with and without a field."""
    from cartlorem.graph import collate

    model = lr_model("multipole", (1, 6, 8, 11, 17), long_range_options={"charge_correction": correction})
    frames = [methanol(1.0), nacl_crystal(), nacl_slab(), methanol(0.0)]
    field = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64)
    origin = torch.tensor([0.4, 0.1, -0.2], dtype=torch.float64)
    batch = collate([atoms_to_graph(a, model.cutoff) for a in frames])
    together = model(batch, create_graph=False, compute_born_charges=True, dipole_origin=origin)["born_charges"]
    forces = model(batch, create_graph=False, electric_field=field, dipole_origin=origin)["forces"]
    start = 0
    for a in frames:
        alone = run(model, a, compute_born_charges=True, dipole_origin=origin)["born_charges"]
        alone_forces = run(model, a, electric_field=field, dipole_origin=origin)["forces"]
        n = len(a)
        torch.testing.assert_close(together[start:start + n], alone, rtol=0, atol=1e-11)
        torch.testing.assert_close(forces[start:start + n], alone_forces, rtol=0, atol=1e-11)
        start += n


def test_a_slabs_born_charges_do_not_depend_on_the_tilt_of_its_open_row():
    """The in-plane part of a slab's third cell row is a convention (energy, forces and charges do not change);
    Z* and the field forces took their in-plane fractional coordinates from the full cell and moved with it (a3 →
    a3 + a1, an equivalent basis of the same slab, by a third of the charge transfer)."""
    model = lr_model("multipole", (11, 17))
    slab = nacl_crystal().repeat((2, 2, 1))
    slab.center(vacuum=8.0, axis=2)
    slab.pbc = [True, True, False]
    field = torch.tensor([0.2, 0.1, 0.3], dtype=torch.float64)
    ref = run(model, slab, compute_born_charges=True)["born_charges"].detach().numpy()
    ref_f = run(model, slab, electric_field=field)["forces"].detach().numpy()
    for tilt in (1.5, slab.cell.array[0, 0]):
        tilted = slab.copy()
        cell = tilted.cell.array.copy()
        cell[2] += [tilt, 0.0, 0.0]
        tilted.set_cell(cell)
        z = run(model, tilted, compute_born_charges=True)["born_charges"].detach().numpy()
        np.testing.assert_allclose(z, ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(run(model, tilted, electric_field=field)["forces"].detach().numpy(), ref_f,
                                   rtol=0, atol=1e-12)


def test_born_charges_of_a_cell_smaller_than_the_models_reach_are_warned_about():
    """In a small cell the periodic form of the charge transfer is far off (in a two-atom NaCl cell every neighbour
    is half a cell away, where it is zero): said, with the supercell that avoids it; a large cell is not."""
    model = lr_model("multipole", (11, 17))  # reach: 1 layer × 4 Å
    with pytest.warns(UserWarning, match=r"lattice planes 5.6 Å apart.*supercell.*≥ 8 Å apart"):
        run(model, nacl_crystal(), compute_born_charges=True)
    with pytest.warns(UserWarning, match="lattice planes"):
        run(model, nacl_crystal(), electric_field=torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, nacl_crystal().repeat(2), compute_born_charges=True)  # planes 11.3 Å apart
        run(model, nacl_crystal(), electric_field=None)
