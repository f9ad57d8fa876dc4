"""torch-sim adapter: a batched SimState becomes one cartlorem batch whose energies, forces and
stresses equal the ASE calculator's, structure by structure; torch-sim's own model validation
passes; a batched NVT run ends on a state whose energies and forces are the calculator's.

The SimState → graph part needs no torch-sim (a plain object with SimState's attributes). The rest
is skipped where torch-sim is missing: torch-sim >= 0.4 needs Python >= 3.12, 0.3 installs on 3.11
(`pip install torch-sim-atomistic` picks the newest one the interpreter allows).
"""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from cartlorem import CartLorem, CartLoremCalculator
from cartlorem.graph import atoms_to_graph
from cartlorem.integrations.torchsim import state_to_graph

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10  # float64: only the summation order differs between the batch and the calculator
SPECIES = [1, 6, 11, 12, 14, 17, 26]  # torch-sim's validation uses Si, Fe (0.3) and Si, Mg, Fe, C, H (0.6)


def _skip_reason():
    return (f"torch-sim is not installed on Python {sys.version_info.major}.{sys.version_info.minor} "
            "(pip install torch-sim-atomistic; torch-sim >= 0.4 needs Python >= 3.12, 0.3 runs on 3.11)")


@pytest.fixture(scope="module")
def model():
    """A tiny untrained multipole model (random weights, seeded): non-trivial forces, long range on."""
    torch.manual_seed(0)
    m = CartLorem(SPECIES, cutoff=3.5, long_range="multipole", channels=8, num_layers=1, correlation=2,
                  num_basis=4, radial_hidden=8, readout_hidden=8).double()
    m.set_statistics(atomic_energies={11: -1.0, 17: -2.0}, avg_num_neighbors=8.0)
    return m.eval()


def nacl(repeat=(1, 1, 1), seed=0, strain=0.03):
    rng = np.random.default_rng(seed)
    a = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(repeat)
    a.set_cell(a.cell.array @ (np.eye(3) + strain * rng.standard_normal((3, 3))), scale_atoms=True)
    a.positions += 0.1 * rng.standard_normal(a.positions.shape)
    return a


def plain_state(atoms_list, order=None):
    """A SimState look-alike: concatenated atoms, column-vector cells (torch-sim's convention)."""
    pos = np.concatenate([a.positions for a in atoms_list])
    z = np.concatenate([a.numbers for a in atoms_list])
    idx = np.concatenate([np.full(len(a), k) for k, a in enumerate(atoms_list)])
    order = np.arange(len(pos)) if order is None else order
    return SimpleNamespace(
        positions=torch.tensor(pos[order]), atomic_numbers=torch.tensor(z[order]), system_idx=torch.tensor(idx[order]),
        cell=torch.tensor(np.stack([a.cell.array.T for a in atoms_list])),
        pbc=torch.tensor(np.stack([a.pbc for a in atoms_list])))


def calculator_reference(model, atoms):
    a = atoms.copy()
    a.calc = CartLoremCalculator(model, skin=0.0)
    stress = a.get_stress(voigt=False) if a.pbc.all() else np.zeros((3, 3))
    return a.get_potential_energy(), a.get_forces(), stress


def test_state_to_graph_equals_atoms_to_graph_and_calculator(model):
    systems = [nacl(seed=1), nacl(repeat=(2, 1, 1), seed=2),
               Atoms("NaCl2", positions=[[0, 0, 0], [2.4, 0.1, 0], [-2.3, 0.3, 0.2]])]
    rng = np.random.default_rng(0)
    n = sum(len(a) for a in systems)
    for order in (None, rng.permutation(n)):  # atoms of a system need not be contiguous
        state = plain_state(systems, order)
        g = state_to_graph(state, model.cutoff)
        assert g.num_graphs == 3 and g.positions.shape == (n, 3)
        out = model(g, compute_stress=True)
        order = np.arange(n) if order is None else order
        inverse = np.argsort(order)  # position in the state of each concatenated atom
        start = 0
        for k, atoms in enumerate(systems):
            rows = inverse[start:start + len(atoms)]
            start += len(atoms)
            # the same edges as the ASE path, as sets of (i, j, shift)
            ref = atoms_to_graph(atoms, model.cutoff)  # both take the atoms into their home cell first
            mine = g.edge_index[:, np.isin(g.edge_index[0].numpy(), rows)]
            to_local = {int(r): i for i, r in enumerate(rows)}
            shifts = g.edge_shift[np.isin(g.edge_index[0].numpy(), rows)]
            got = sorted((to_local[int(i)], to_local[int(j)], *map(int, s)) for (i, j), s in zip(mine.T, shifts))
            want = sorted((int(i), int(j), *map(int, s)) for (i, j), s in zip(ref.edge_index.T, ref.edge_shift))
            assert got == want
            e, f, s = calculator_reference(model, atoms)
            assert float(out["energy"][k].detach()) == pytest.approx(e, rel=TOL, abs=TOL)
            np.testing.assert_allclose(out["forces"][rows].detach().numpy(), f, rtol=0, atol=TOL)
            np.testing.assert_allclose(out["stress"][k].detach().numpy(), s, rtol=0, atol=TOL)
            assert np.abs(f).max() > 1e-2  # the forces checked are not trivially zero


def test_a_state_dict_is_a_state(model):
    """torch-sim's ModelInterface.forward takes a SimState or a StateDict (a dict of its tensors); a dict failed with
    "'dict' object has no attribute 'cell'"."""
    state = plain_state([nacl(seed=1), nacl(repeat=(2, 1, 1), seed=2)])
    a, b = state_to_graph(state, model.cutoff), state_to_graph(dict(vars(state)), model.cutoff)
    for name in ("positions", "species", "batch", "cell", "pbc", "edge_index", "edge_shift", "total_charge"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_a_total_charge_above_the_nuclear_charge_is_refused(model):
    """atoms_to_graph refuses a negative electron count; the engines' graphs (torch-sim, LAMMPS) took H2 at +3."""
    state = plain_state([Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])])
    state.charge = torch.tensor([3.0])
    with pytest.raises(ValueError, match=r"structure 0: total_charge 3 exceeds the nuclear charge 2.*state\.charge"):
        state_to_graph(state, model.cutoff)
    state.charge = torch.tensor([-1.0])  # an anion is fine
    assert float(state_to_graph(state, model.cutoff).total_charge[0]) == -1.0


def test_torch_sim_06_total_charge_and_total_spin_are_read():
    """torch-sim 0.6 keeps a system's charge and spin as extras named charge / total_charge and spin / total_spin.
    The adapter read only state.charge and state.spin: a state built with system_extras_map={"total_charge": ...}
    gave NaCl+ the energy of neutral NaCl (0.665 eV off in a reviewer's multipole model), without a word."""
    cs = _charge_state_model()
    systems = [nacl(seed=1), nacl(seed=2)]
    want = []
    for atoms, (q, m) in zip(systems, ((1.0, 2.0), (-1.0, 4.0))):
        a = atoms.copy()
        a.info.update(charge=q, multiplicity=m)
        want.append(calculator_reference(cs, a)[0])
    for names in (("total_charge", "total_spin"), ("charge", "spin")):
        state = plain_state(systems)
        setattr(state, names[0], torch.tensor([1.0, -1.0]))
        setattr(state, names[1], torch.tensor([2.0, 4.0]))
        graph = state_to_graph(state, cs.cutoff)
        assert graph.total_charge.tolist() == [1.0, -1.0] and graph.multiplicity.tolist() == [2.0, 4.0], names
        np.testing.assert_allclose(cs(graph)["energy"].detach().numpy(), want, rtol=0, atol=TOL)
    state.total_charge = torch.tensor([1.0, -1.0])  # both names, the same values: fine
    assert state_to_graph(state, cs.cutoff).total_charge.tolist() == [1.0, -1.0]
    state.total_spin = torch.tensor([2.0, 2.0])  # both names, two values: which one was meant?
    with pytest.raises(ValueError, match=r"state\.spin = \[2\.0, 4\.0\] and state\.total_spin = \[2\.0, 2\.0\]"):
        state_to_graph(state, cs.cutoff)
    state_to_graph(state, cs.cutoff, read_spin=False)  # a model that does not read the spin is not asked
    del state.charge, state.spin
    state.total_charge = torch.tensor([3.0, 0.0])
    state.total_spin = torch.tensor([1.0, 1.0])  # a charge the electrons cannot have: named as the user set it
    with pytest.raises(ValueError, match=r"multiplicity 1 does not match.*state\.total_spin"):
        state_to_graph(state, cs.cutoff)


def test_state_to_graph_rejects_bad_states(model):
    good = plain_state([nacl(), nacl(seed=3)])
    with pytest.raises(ValueError, match="system_idx"):
        state_to_graph(SimpleNamespace(**{**vars(good), "system_idx": good.system_idx + 1}), model.cutoff)
    bad_pos = good.positions.clone()
    bad_pos[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        state_to_graph(SimpleNamespace(**{**vars(good), "positions": bad_pos}), model.cutoff)
    close = good.positions.clone()
    close[1] = close[0] + 0.01
    with pytest.raises(ValueError, match="overlapping"):
        state_to_graph(SimpleNamespace(**{**vars(good), "positions": close}), model.cutoff)
    with pytest.raises(ValueError, match="cells"):
        state_to_graph(SimpleNamespace(**{**vars(good), "cell": good.cell[:, :2]}), model.cutoff)


def test_torchsim_validate_model_outputs(model):
    pytest.importorskip("torch_sim", reason=_skip_reason())
    from torch_sim.models.interface import validate_model_outputs

    from cartlorem.integrations.torchsim import CartLoremModel

    validate_model_outputs(CartLoremModel(model), torch.device("cpu"), torch.float64)


def test_torchsim_batched_nvt_matches_calculator(model):
    ts = pytest.importorskip("torch_sim", reason=_skip_reason())
    from cartlorem.integrations.torchsim import CartLoremModel

    systems = [nacl(seed=4), nacl(repeat=(1, 1, 2), seed=5)]
    integrator = ts.Integrator.nvt_langevin if hasattr(ts, "Integrator") else ts.nvt_langevin
    ts_model = CartLoremModel(model)
    assert ts_model.dtype == torch.float64
    torch.manual_seed(0)  # Langevin noise
    final = ts.integrate(system=systems, model=ts_model, integrator=integrator, n_steps=8,
                         temperature=600.0, timestep=0.002)  # ps
    final_atoms = ts.io.state_to_atoms(final)
    assert len(final_atoms) == 2 and final.energy.shape == (2,)
    start = 0
    for k, (before, after) in enumerate(zip(systems, final_atoms)):
        assert np.abs(after.positions - before.positions).max() > 1e-3  # the atoms moved
        e, f, s = calculator_reference(model, after)
        assert float(final.energy[k]) == pytest.approx(e, rel=TOL, abs=TOL)
        np.testing.assert_allclose(final.forces[start:start + len(after)].numpy(), f, rtol=0, atol=TOL)
        start += len(after)
        stress = ts_model(ts.io.atoms_to_state([after], torch.device("cpu"), torch.float64))["stress"][0]
        np.testing.assert_allclose(stress.numpy(), s, rtol=0, atol=TOL)


def _charge_state_model():
    torch.manual_seed(1)
    m = CartLorem(SPECIES, cutoff=3.5, long_range=None, channels=8, num_layers=1, correlation=2, num_basis=4,
                  radial_hidden=8, readout_hidden=8, charge_state=True).double()
    with torch.no_grad():  # the modulation starts at zero; a trained model's is not
        for name, p in m.named_parameters():
            if name.startswith("conditioning"):
                p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def test_an_external_field_in_the_state_is_applied(model):
    """torch-sim 0.6 carries a uniform field as the system extra external_E_field [B, 3]; the adapter ran every
    structure without it. Energies and forces must be the calculator's with that field: −P·E for a molecule,
    the forces Z*ᵀE for a cell (whose energy the field leaves alone)."""
    pytest.importorskip("torch_sim", reason=_skip_reason())
    from cartlorem.integrations.torchsim import CartLoremModel

    molecule = Atoms("NaCl2", positions=[[0, 0, 0], [2.4, 0.1, 0], [-2.3, 0.3, 0.2]])
    systems = [nacl(seed=1), molecule]
    fields = np.array([[0.3, -0.1, 0.2], [0.0, 0.5, -0.4]])  # V/Å
    state = plain_state(systems)
    state.charge = torch.tensor([0.0, -1.0])
    state.external_E_field = torch.tensor(fields)
    got = CartLoremModel(model).forward(state)
    start = 0
    for k, (atoms, q) in enumerate(zip(systems, (0.0, -1.0))):
        a = atoms.copy()
        a.info["charge"] = q
        a.calc = CartLoremCalculator(model, skin=0.0, electric_field=fields[k])
        n = len(a)
        np.testing.assert_allclose(got["energy"][k].item(), a.get_potential_energy(), rtol=0, atol=TOL)
        np.testing.assert_allclose(got["forces"][start:start + n].numpy(), a.get_forces(), rtol=0, atol=TOL)
        a.calc = CartLoremCalculator(model, skin=0.0)
        moved = np.abs(got["forces"][start:start + n].numpy() - a.get_forces()).max()
        assert moved > 1e-3, k  # the field changes these forces
        start += n
    state.external_E_field = torch.zeros(2, 3)  # all zero: no field, and a local model takes it
    local = CartLorem(SPECIES, cutoff=3.5, long_range=None, channels=8, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8).double().eval()
    np.testing.assert_allclose(CartLoremModel(local).forward(state)["energy"].numpy(),
                               [calculator_reference(local, a)[0] for a in systems], rtol=0, atol=TOL)
    state.external_E_field = torch.tensor(fields)  # a field a local model cannot answer: said, not ignored
    with pytest.raises(ValueError, match=r"state\.external_E_field needs learned charges"):
        CartLoremModel(local).forward(state)
    for bad, shape in ((torch.zeros(2, 2), r"\[2, 2\]$"), (torch.zeros(1, 3), r"\[1, 3\]$"),
                       (torch.tensor([[0.1, float("nan"), 0.0], [0.0, 0.0, 0.0]]), r"\[2, 3\] with NaN or inf")):
        state.external_E_field = bad  # named as the state holds it, not as the model's argument
        with pytest.raises(ValueError, match=r"state\.external_E_field must hold one finite field .* per system, "
                                             r"\[2, 3\]; got shape " + shape):
            CartLoremModel(model).forward(state)


def test_the_spin_of_a_state_reaches_a_charge_state_model(model):
    """The adapter read state.charge but not state.spin: a charge-state model computed every open-shell structure
    as a singlet, without a word."""
    pytest.importorskip("torch_sim", reason=_skip_reason())
    from cartlorem.integrations.torchsim import CartLoremModel

    cs = _charge_state_model()
    systems = [nacl(seed=1), nacl(seed=2)]  # 112 electrons each: odd multiplicities
    state = plain_state(systems)
    state.spin = torch.tensor([3.0, 1.0])
    got = CartLoremModel(cs).forward(state)["energy"]
    want = []
    for atoms, m in zip(systems, (3, 1)):
        a = atoms.copy()
        a.info["multiplicity"] = m
        want.append(calculator_reference(cs, a)[0])
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=TOL)
    singlet = calculator_reference(cs, systems[0])[0]
    assert abs(want[0] - singlet) > 1e-3  # the spin changes this model's energy
    state.spin = torch.tensor([2.0, 1.0])  # an even multiplicity for an even electron count
    with pytest.raises(ValueError, match="multiplicity 2 does not match the electron count") as err:
        CartLoremModel(cs).forward(state)
    assert "state.spin" in str(err.value) and "atoms.info" not in str(err.value)  # what a torch-sim user set
    # torch-sim's default (all zero) is singlets; a model without conditioning does not read the spin at all
    state.spin = torch.zeros(2)
    np.testing.assert_allclose(CartLoremModel(cs).forward(state)["energy"][0].item(), singlet, rtol=0, atol=TOL)
    state.spin = torch.tensor([2.0, 1.0])
    CartLoremModel(model).forward(state)
    # a batch that mixes a given spin with torch-sim's default 0 (not given: a singlet) was refused whole
    state.spin = torch.tensor([3.0, 0.0])
    np.testing.assert_allclose(CartLoremModel(cs).forward(state)["energy"].numpy(), want, rtol=0, atol=TOL)


def test_a_float32_model_keeps_its_resolution_far_from_the_origin(model):
    """The state's positions were cast to the model's dtype as they came: a float32 model given a cell 1000 lattice
    vectors out (an unwrapped trajectory) saw its atoms to ~5e-4 Å."""
    atoms = nacl(seed=4)
    m32 = CartLorem(SPECIES, cutoff=3.5, long_range=None, channels=8, num_layers=1, correlation=2, num_basis=4,
                    radial_hidden=8, readout_hidden=8)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in m32.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m32.set_statistics(atomic_energies={11: -1.0, 17: -2.0}, avg_num_neighbors=8.0, scale=30.0)  # forces ~ eV/Å
    ref = m32.double()(state_to_graph(plain_state([atoms]), model.cutoff))["forces"].detach()
    m32 = m32.float()
    far = atoms.copy()
    far.positions += 1000 * atoms.cell.array.sum(axis=0)
    near = m32(state_to_graph(plain_state([atoms]), model.cutoff, dtype=torch.float32))["forces"].detach().double()
    got = m32(state_to_graph(plain_state([far]), model.cutoff, dtype=torch.float32))["forces"].detach().double()
    assert ref.abs().max() > 0.1
    scale = float((near - ref).abs().max())  # float32 rounding near the origin
    assert float((got - ref).abs().max()) <= 2 * scale + 1e-6, (float((got - ref).abs().max()), scale)
