"""The ASE calculator against the model itself: same numbers, fresh state when the system changes,
neighbour-list reuse with a skin, models loaded from a path."""

import math

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
    out = model(g, compute_stress=bool(atoms.pbc.all()), create_graph=False)
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
    else:  # slabs, other mixed pbc and molecules: no stress, and ASE's error says so
        from ase.calculators.calculator import PropertyNotImplementedError

        with pytest.raises(PropertyNotImplementedError):
            atoms.get_stress()


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


def test_a_trajectory_of_periodic_md_records_every_frames_stress(model, tmp_path):
    """ASE's Trajectory (and loggers) read the stress with allow_calculation=False: a calculator that left the
    stress out of steps nobody had asked it for (a 5-10% saving of a long-range call, tried in session 36) wrote
    frames without it, and the pressure computed from the file was lost. Every frame has it."""
    from ase import units
    from ase.io import Trajectory, read
    from ase.md.verlet import VelocityVerlet

    atoms = crystal(seed=4)
    rng = np.random.default_rng(2)
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(atoms.get_masses()[:, None] * units.kB * 600))
    atoms.calc = CartLoremCalculator(model)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    with Trajectory(tmp_path / "md.traj", "w", atoms) as traj:
        dyn.attach(traj.write, interval=5)
        dyn.run(20)
    frames = read(tmp_path / "md.traj", ":")
    assert len(frames) == 5
    for frame in frames:
        probe = frame.copy()
        probe.calc = CartLoremCalculator(model)
        assert np.allclose(frame.get_stress(), probe.get_stress(), rtol=1e-8, atol=1e-10)


def test_the_model_gets_the_edges_of_a_fresh_list(model, monkeypatch):
    """The list built with cutoff + skin went to the model whole: a 0.5 Å skin gave a water box 26% more edges to
    compute, each as costly as one within the cutoff though it adds nothing, and MD steps took 1.2-1.55x the time
    of a new list per step. Built or reused, the model now gets the edges within the cutoff only."""
    seen = []
    forward = type(model).forward

    def counting(self, graph, *args, **kwargs):
        seen.append(int(graph.edge_index.shape[1]))
        return forward(self, graph, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    atoms = crystal(seed=6)
    fresh = int(atoms_to_graph(atoms, model.cutoff).edge_index.shape[1])
    calc = CartLoremCalculator(model, skin=1.0)
    padded = int(atoms_to_graph(atoms, model.cutoff + 1.0).edge_index.shape[1])
    assert padded > fresh
    calc.get_forces(atoms)  # built
    atoms.positions[0] += 0.05
    calc.get_forces(atoms)  # reused
    fresh_moved = int(atoms_to_graph(atoms, model.cutoff).edge_index.shape[1])
    assert seen == [fresh, fresh_moved], (seen, fresh, fresh_moved, padded)
    assert np.allclose(calc.get_forces(atoms), CartLoremCalculator(model, skin=0.0).get_forces(atoms), atol=1e-10)


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


# --- long-range models in every ASE code path ------------------------------------------------------


@pytest.fixture(scope="module")
def lr_model():
    torch.manual_seed(1)
    # every long-range channel charged (the 0.1.0 default): the float32 test below needs its forces
    # above 0.1 eV/Å, which this random model reaches only with the other channels' charges too
    m = CartLorem([11, 17], cutoff=CUTOFF, long_range="multipole", channels=8, num_layers=1, correlation=2,
                  num_basis=4, radial_hidden=8, readout_hidden=8,
                  long_range_options={"charge_channels": None}).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.set_statistics(atomic_energies={11: -1.3, 17: -1.8}, avg_num_neighbors=6.0, scale=1.7, shift=0.05)
    return m.eval()


def nacl(seed=0, repeat=(1, 1, 1)):
    a = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(repeat)
    a.rattle(0.1, seed=seed)
    return a


def test_long_range_results_are_ase_properties(lr_model):
    """Calculator.get_properties (ASE's Atoms.get_properties → calculate_properties → Properties) failed
    with KeyError 'dipoles' on main: every entry of results must be an ASE property."""
    from ase.calculators.calculator import all_properties
    from ase.outputs import Properties

    atoms = nacl()
    calc = CartLoremCalculator(lr_model)
    atoms.calc = calc
    props = atoms.get_properties(["energy", "forces", "stress", "charges", "energies"])
    assert set(calc.results) <= set(all_properties)
    Properties(calc.results)  # what ASE builds from results (raised KeyError on main)
    g = atoms_to_graph(atoms, lr_model.cutoff)
    out = lr_model(g, create_graph=False)
    assert props["energy"] == pytest.approx(float(out["energy"].detach()), rel=1e-12)
    assert np.allclose(props["forces"], out["forces"].detach().numpy(), rtol=1e-10, atol=1e-12)
    assert np.allclose(props["charges"], out["charges"].detach().numpy(), atol=1e-14)
    assert np.allclose(atoms.get_charges(), out["charges"].detach().numpy(), atol=1e-14)
    assert "charges" in calc.implemented_properties
    assert "charges" not in CartLoremCalculator(lr_model.__class__([11, 17], cutoff=CUTOFF, long_range=None,
                                                                   channels=4, num_layers=1)).implemented_properties
    # the other model outputs stay accessible, and follow the structure
    assert np.allclose(calc.extra_results["dipoles"], out["dipoles"].detach().numpy(), atol=1e-14)
    assert np.allclose(calc.get_extra("quadrupoles"), out["quadrupoles"].detach().numpy(), atol=1e-14)
    assert calc.get_extra("energy_lr") == pytest.approx(float(out["energy_lr"].detach()), rel=1e-12)
    moved = atoms.copy()
    moved.positions[0] += 0.2
    out2 = lr_model(atoms_to_graph(moved, lr_model.cutoff), create_graph=False)
    assert np.allclose(calc.get_extra("dipoles", moved), out2["dipoles"].detach().numpy(), atol=1e-14)
    assert not np.allclose(out2["dipoles"].detach().numpy(), out["dipoles"].detach().numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="unknown extra output"):
        calc.get_extra("dipole_moment")


def test_long_range_results_copy_and_write(lr_model, tmp_path):
    """SinglePointCalculator copies and extxyz output with results (both refused 'dipoles' on main)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    frames = []
    for seed in range(2):
        atoms = nacl(seed=seed)
        atoms.calc = CartLoremCalculator(lr_model)
        atoms.get_stress()
        energy, forces, charges = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_charges()
        copy = atoms.copy()
        copy.calc = SinglePointCalculator(copy, **atoms.calc.results)
        assert copy.get_potential_energy() == energy and np.array_equal(copy.get_charges(), charges)
        frames.append(atoms)
    path = tmp_path / "results.xyz"
    write(path, frames, format="extxyz")
    back = read(path, index=":")
    for atoms, b in zip(frames, back):
        assert b.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
        # extxyz writes per-atom arrays with 8 decimals
        assert np.allclose(b.get_forces(), atoms.get_forces(), rtol=0, atol=1e-8)
        assert np.allclose(b.get_stress(), atoms.get_stress(), rtol=1e-8, atol=1e-12)
        assert np.allclose(b.get_charges(), atoms.get_charges(), rtol=0, atol=1e-8)


_SOCKET_CLIENT = """
import sys
from ase.io import read
from ase.calculators.socketio import SocketClient
from cartlorem import CartLoremCalculator
atoms = read(sys.argv[1])
atoms.calc = CartLoremCalculator(sys.argv[2])
SocketClient(unixsocket=sys.argv[3], timeout=60).run(atoms, use_stress=True)
"""


def test_socketio_md_with_a_long_range_model(lr_model, tmp_path):
    """20 velocity-Verlet steps driven through ase.calculators.socketio: the server's MD gets its forces
    from a SocketClient in another process running CartLoremCalculator on the saved model."""
    import os
    import subprocess
    import sys
    import uuid

    from ase import units
    from ase.calculators.socketio import SocketIOCalculator
    from ase.io import write
    from ase.md.verlet import VelocityVerlet

    import cartlorem

    model_path = tmp_path / "model.pt"
    save_model(lr_model, model_path)
    atoms = nacl(seed=3)
    rng = np.random.default_rng(1)
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(atoms.get_masses()[:, None] * units.kB * 600))
    write(tmp_path / "start.xyz", atoms, format="extxyz")
    (tmp_path / "client.py").write_text(_SOCKET_CLIENT)
    socket_name = f"cartlorem-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # ASE puts it at /tmp/ipi_<name>
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(cartlorem.__file__))]
                                          + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    procs = []

    def launch(atoms_, properties, port=None, unixsocket=None):
        proc = subprocess.Popen([sys.executable, str(tmp_path / "client.py"), str(tmp_path / "start.xyz"),
                                 str(model_path), unixsocket], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    direct = CartLoremCalculator(lr_model)
    try:
        with SocketIOCalculator(unixsocket=socket_name, timeout=120, launch_client=launch) as calc:
            atoms.calc = calc
            dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
            energies = []
            for _ in range(20):
                dyn.run(1)
                probe = atoms.copy()
                probe.calc = direct
                assert atoms.get_potential_energy() == pytest.approx(probe.get_potential_energy(), rel=1e-12)
                assert np.allclose(atoms.get_forces(), probe.get_forces(), rtol=1e-10, atol=1e-10)
                assert np.allclose(atoms.get_stress(), probe.get_stress(), rtol=1e-8, atol=1e-10)
                energies.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        assert dyn.nsteps == 20
        assert np.ptp(energies) < 1e-3 * len(atoms)  # a sane trajectory (1 fs steps)
        procs[0].wait(timeout=60)
        assert procs[0].returncode == 0, procs[0].stdout.read().decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def test_float32_far_from_the_origin_with_reused_neighbour_list(lr_model):
    """Issue 13 item 3, calculator level: a periodic long-range model in float32, the structure translated
    by ~3e4 Å (ASE MD never wraps) and moved in small steps that reuse the neighbour list, gives the forces
    of the untranslated structure to float32 accuracy."""
    builds = []
    original = calculator_module.atoms_to_graph

    def counting(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    atoms = nacl(seed=4, repeat=(2, 1, 1))
    reference = CartLoremCalculator(lr_model)  # float64
    near = CartLoremCalculator(lr_model, dtype="float32", skin=0.5)
    far = CartLoremCalculator(lr_model, dtype="float32", skin=0.5)
    translation = np.array([3.0e4, -2.1e4, 1.7e4])
    rng = np.random.default_rng(2)
    fmax = None
    for step in range(6):
        if step:
            atoms.positions += 0.03 * rng.standard_normal(atoms.positions.shape)  # < skin/2 in total
        moved = atoms.copy()
        moved.positions += translation
        f64 = reference.get_forces(atoms)
        fmax = np.abs(f64).max()
        err_near = np.abs(near.get_forces(atoms) - f64).max()
        calculator_module.atoms_to_graph = counting
        try:
            f_far = far.get_forces(moved)
        finally:
            calculator_module.atoms_to_graph = original
        err_far = np.abs(f_far - f64).max()
        assert err_far <= max(3 * err_near, 1e-5 * fmax), (step, err_far, err_near, fmax)
        assert far.get_potential_energy(moved) == pytest.approx(reference.get_potential_energy(atoms), rel=1e-6)
    assert fmax > 0.1
    assert len(builds) == 1  # the first step built the list; the five others reused it


def test_bad_positions_or_cell_are_clear_errors(lr_model):
    """The wrapping step must not turn bad input into a deep linear-algebra error."""
    calc = CartLoremCalculator(lr_model)
    atoms = nacl()
    atoms.positions[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        calc.get_potential_energy(atoms)
    atoms = nacl()
    atoms.cell[0, 0] = np.nan
    with pytest.raises(ValueError, match="cell contains NaN"):
        calc.get_potential_energy(atoms)


def test_a_new_total_charge_is_a_new_calculation(lr_model):
    """ASE's check_state does not compare atoms.info: the same Atoms with another total charge or multiplicity
    returned the cached results of the old charge state (the charges summed to the old total)."""
    calc = CartLoremCalculator(lr_model, skin=0.0)
    atoms = nacl()
    atoms.calc = calc
    neutral = atoms.get_potential_energy()
    assert abs(atoms.get_charges().sum()) < 1e-10
    for key in ("charge", "total_charge"):
        atoms.info.pop("charge", None)
        atoms.info[key] = 1.0
        charged = atoms.get_potential_energy()
        fresh = CartLoremCalculator(lr_model).get_potential_energy(atoms)
        assert charged == pytest.approx(fresh, abs=1e-10) and abs(charged - neutral) > 1e-6
        assert atoms.get_charges().sum() == pytest.approx(1.0, abs=1e-10)
        atoms.info.pop(key)
    assert atoms.get_potential_energy() == pytest.approx(neutral, abs=1e-12)


def test_the_callers_model_keeps_its_mode(model):
    """The calculator used to switch the model it was given to eval mode: a model being trained then no longer
    recorded the force graph (create_graph defaults to model.training), and force training stopped silently."""
    model.train()
    try:
        calc = CartLoremCalculator(model)
        assert model.training and calc.model is model
        calc.get_potential_energy(cluster())
        assert model.training
        out = model(atoms_to_graph(cluster(), CUTOFF, dtype=torch.float64), compute_forces=True)
        assert out["forces"].requires_grad  # the force loss still reaches the parameters
    finally:
        model.eval()
    assert CartLoremCalculator(model, dtype="float32").model.training is False  # its own copy: eval mode


@pytest.mark.parametrize("kwargs, message", [
    ({"skin": -1.0}, "skin must be a finite distance"),
    ({"skin": float("nan")}, "skin must be a finite distance"),
    ({"skin": "wide"}, "skin must be a finite distance"),
    ({"dtype": "foo"}, "dtype must be None"),
    ({"dtype": "int64"}, "dtype must be None"),
    ({"dtype": torch.float16}, "dtype must be None"),
    ({"device": "gpu"}, "device must be 'cpu' or 'cuda'"),
    ({"device": "meta"}, "device must be 'cpu' or 'cuda'"),  # built, then failed in torch's meta registrations
    ({"device": "mps"}, "device must be 'cpu' or 'cuda'"),
])
def test_bad_calculator_arguments_are_clear_errors(model, kwargs, message):
    """A negative skin shortened the neighbour list below the cutoff (a silently wrong energy); bad dtypes and
    devices failed inside torch."""
    with pytest.raises(ValueError, match=message):
        CartLoremCalculator(model, **kwargs)


def test_a_bad_total_charge_is_a_clear_error(lr_model):
    """The neighbour-list key converted info["charge"] with float() before atoms_to_graph could check it."""
    atoms = nacl()
    atoms.info["charge"] = "abc"
    with pytest.raises(ValueError, match="charge"):
        CartLoremCalculator(lr_model).get_potential_energy(atoms)


def test_md_that_cannot_start_names_the_problem(model):
    """A structure the calculator refuses at step 0 ended in an IndexError of run_nve's statistics (its error was
    caught as an early stop, and the record was empty)."""
    from cartlorem.md import run_nve

    atoms = Atoms("NH3", positions=[[0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    atoms.calc = CartLoremCalculator(model)
    with pytest.raises(ValueError, match="not known to the model: N"):
        run_nve(atoms, steps=3, timestep_fs=0.5, temperature_K=300.0)


def _shifted_emt(shift=-684.0, nan_after=None):
    """EMT with a constant added to the energy (the absolute energies of a real model, ~-684 eV for the demo's
    14-atom clusters) and, after ``nan_after`` calls, NaN energies and forces (a run that blows up)."""
    from ase.calculators.emt import EMT

    class Shifted(EMT):
        calls = 0

        def calculate(self, *args, **kwargs):
            super().calculate(*args, **kwargs)
            self.calls += 1
            self.results["energy"] += shift
            self.results["free_energy"] = self.results["energy"]
            if nan_after is not None and self.calls > nan_after:
                self.results["energy"] = float("nan")
                self.results["forces"] = np.full_like(self.results["forces"], np.nan)

    return Shifted()


def test_md_csv_holds_the_energies_the_drift_is_fitted_to(tmp_path):
    """md.csv wrote 8 significant digits: in a total energy of -684 eV, steps of 1e-5 eV, and a fit to the file gave
    -0.020 where the run reported -0.051 meV/atom/ps (20 steps). The file now holds the float64 values."""
    from ase.cluster import Icosahedron

    from cartlorem.md import run_nve, write_md_csv

    atoms = Icosahedron("Cu", 2)
    atoms.calc = _shifted_emt()
    md = run_nve(atoms, steps=20, timestep_fs=1.0, temperature_K=300.0, seed=0)
    write_md_csv(tmp_path / "md.csv", md)
    table = np.loadtxt(tmp_path / "md.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(table[:, 3], md["etot"])
    fit = np.polyfit(table[:, 0] / 1000.0, table[:, 3] / len(atoms), 1)[0] * 1000.0
    assert fit == pytest.approx(md["drift_mev_per_atom_per_ps"], rel=1e-9)


def test_md_that_goes_nan_stops_with_an_error():
    """A run whose energies turned NaN was reported as finished (error None, drift NaN); now it stops at the first
    non-finite energy and the summary is of the steps before it."""
    from ase.cluster import Icosahedron

    from cartlorem.md import run_nve

    atoms = Icosahedron("Cu", 2)
    atoms.calc = _shifted_emt(nan_after=10)
    md = run_nve(atoms, steps=50, timestep_fs=1.0, temperature_K=300.0, seed=0)
    assert md["error"] is not None and "not finite" in md["error"]
    assert 0 < md["steps_done"] < 50 and np.isfinite(md["etot"]).all()
    assert math.isfinite(md["drift_mev_per_atom_per_ps"]) and math.isfinite(md["max_abs_de_mev"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=2.7), "steps must be a whole number"), (dict(steps=True), "steps must be a whole number"),
    (dict(steps="3"), "steps must be a whole number"), (dict(steps=0), "steps must be a whole number"),
    (dict(timestep_fs=float("inf")), "timestep_fs must be a finite"), (dict(timestep_fs="0.5"), "timestep_fs must"),
    (dict(temperature_K="300"), "temperature_K must"), (dict(temperature_K=float("inf")), "temperature_K must")])
def test_md_settings_are_checked(model, kwargs, message):
    """run_nve(steps=2.7) ran 3 steps without a word; an infinite time step was reported as an early stop at step 0
    (NaN positions), and strings failed in a comparison inside (TypeError)."""
    from cartlorem.md import run_nve

    atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.calc = CartLoremCalculator(model)
    settings = dict(steps=3, timestep_fs=0.5, temperature_K=300.0) | kwargs
    with pytest.raises(ValueError, match=message):
        run_nve(atoms, **settings)


def test_no_atoms_is_a_clear_error_without_warnings(model):
    """Empty Atoms reached the ValueError only after numpy's "Mean of empty slice" warnings from the wrapping step."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="no atoms"):
            CartLoremCalculator(model).get_potential_energy(Atoms())


def test_overlapping_atoms_in_a_reused_list_are_the_error_of_a_new_list(model):
    """A reused neighbour list caught overlapping atoms only below 1e-3 Å, where a new list refuses them below
    0.1 Å: two atoms 0.05 Å apart got an energy when the list was reused, and an error from a new calculator."""
    atoms = Atoms("CuAg", positions=[[0.0, 0.0, 0.0], [0.25, 0.0, 0.0]])
    atoms.calc = CartLoremCalculator(model)
    atoms.get_potential_energy()
    atoms.positions[1, 0] = 0.05  # 0.2 Å: within half the skin, so the list is reused
    with pytest.raises(ValueError, match="AgCu: atoms 0 and 1 are 5.00e-02 Å apart"):
        atoms.get_potential_energy()
    with pytest.raises(ValueError, match="AgCu: atoms 0 and 1 are 5.00e-02 Å apart"):
        CartLoremCalculator(model).get_potential_energy(atoms.copy())


def test_md_of_one_atom(model):
    """One atom in a periodic cell has no motion left once the centre of mass is at rest: ASE's Stationary,
    asked to keep the temperature, divided by that zero, and the run stopped at once on NaN positions."""
    from cartlorem.md import run_nve

    atoms = Atoms("Cu", positions=[[0.0, 0.0, 0.0]], cell=np.eye(3) * 2.6, pbc=True)
    atoms.calc = CartLoremCalculator(model)
    md = run_nve(atoms, steps=3, timestep_fs=0.5, temperature_K=300.0)
    assert md["error"] is None and md["steps_done"] == 3
    assert np.all(atoms.get_momenta() == 0.0) and np.all(np.isfinite(md["etot"]))


def test_float32_energy_is_summed_in_float64():
    """A float32 model's total energy is the sum of per-atom energies of ~ −2000 eV (all-electron-like references):
    summed in float32 its steps are ~4e-3 eV, and it came out tens of meV from the float64 model of the same
    weights. The calculator sums the per-atom energies in float64."""
    from ase.build import molecule

    torch.manual_seed(0)
    model = CartLorem([1, 8], cutoff=3.0, long_range=None, channels=4, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8)
    model.set_statistics(atomic_energies={1: -13.6, 8: -2041.8}, avg_num_neighbors=4.0, scale=1.0)
    water = molecule("H2O")
    atoms = Atoms()
    for x in range(4):
        for y in range(4):
            for z in range(4):
                w = water.copy()
                w.positions += 3.1 * np.array([x, y, z])
                atoms += w
    atoms.cell, atoms.pbc = 12.4 * np.eye(3), True
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(3):
        atoms.positions += 0.05 * rng.standard_normal(atoms.positions.shape)
        e64 = CartLoremCalculator(model.double()).get_potential_energy(atoms)
        e32 = CartLoremCalculator(model.float()).get_potential_energy(atoms)
        worst = max(worst, abs(e32 - e64))
    assert abs(e64) > 1e5
    assert worst < 1e-2, worst  # per-atom float32 rounding; the float32 running sum: 0.16 eV
    # the model's own float32 total (and the export's, which the engines run) is the float64 sum, cast: within one
    # float32 step (7.8e-3 eV here), not the float32 running sum's 0.16 eV
    from cartlorem.export import export_model

    graph = atoms_to_graph(atoms, model.cutoff, dtype=torch.float32)
    step = abs(float(np.spacing(np.float32(e64))))
    assert abs(float(model.float()(graph)["energy"][0]) - e64) <= step
    exported = export_model(model.float())
    inputs = (graph.positions, graph.species, graph.cell, graph.pbc, graph.edge_index, graph.edge_shift, graph.batch,
              graph.total_charge)
    assert abs(float(exported(*inputs)["energy"][0]) - e64) <= step


def test_inference_mode_is_a_clear_error_for_the_calculator(model):
    """Under torch.inference_mode() the calculator passed on the model's advice to 'ask for the energy only
    (compute_forces=False)', which a calculator user cannot do; it now says what to do instead."""
    atoms = crystal()
    calc = CartLoremCalculator(model)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"CartLoremCalculator computes forces by autograd.*outside inference"):
            calc.get_potential_energy(atoms)
    with torch.no_grad():
        assert np.isfinite(calc.get_potential_energy(atoms))


def test_the_settings_are_recorded_for_ase(lr_model, tmp_path):
    """todict() and parameters were empty, so an ase.db row of an energy that included a field's −P·E did not say
    there was a field; the field, dtype, device, skin and a model file are recorded now."""
    from ase.db import connect

    calc = CartLoremCalculator(lr_model, electric_field=[0.0, 0.0, 0.1], skin=0.3)
    assert calc.todict() == {"device": "cpu", "dtype": "float64", "skin": 0.3, "electric_field": [0.0, 0.0, 0.1]}
    calc.set(electric_field=None)
    assert calc.todict()["electric_field"] is None
    calc.electric_field = [0.2, 0.0, 0.0]
    atoms = nacl()
    atoms.calc = calc
    atoms.get_potential_energy()
    with connect(tmp_path / "rows.db") as db:
        db.write(atoms)
    row = connect(tmp_path / "rows.db").get(id=1)
    assert row.calculator_parameters["electric_field"] == [0.2, 0.0, 0.0]
    save_model(lr_model, tmp_path / "model.pt")
    assert CartLoremCalculator(tmp_path / "model.pt").todict()["model"] == str(tmp_path / "model.pt")


def test_a_left_handed_cell_has_the_stress_of_its_lattice(model):
    """The same lattice given by left-handed rows (two swapped, or one negated: det(cell) < 0) must give the same
    stress, the strain derivative of the energy over the volume; and the virial of a periodic cell is −V σ. (Taking
    the volume without its absolute value made such a cell 'not periodic', with zero stress, and no test saw it.)"""
    atoms = crystal(seed=2)
    atoms.calc = CartLoremCalculator(model)
    stress = atoms.get_stress(voigt=False)
    energy = atoms.get_potential_energy()
    assert np.abs(stress).max() > 1e-4
    volume = atoms.get_volume()
    assert np.allclose(atoms.calc.get_extra("virial"), -volume * stress, rtol=1e-10, atol=1e-12)
    # the strain derivative by central differences, xy component (symmetric strain)
    h, cell0, pos0 = 1e-5, atoms.cell.array.copy(), atoms.positions.copy()
    energies = []
    for sign in (1, -1):
        eps = np.zeros((3, 3))
        eps[0, 1] = eps[1, 0] = sign * h / 2
        strained = atoms.copy()
        strained.set_cell(cell0 @ (np.eye(3) + eps), scale_atoms=False)
        strained.positions = pos0 @ (np.eye(3) + eps)
        strained.calc = CartLoremCalculator(model)
        energies.append(strained.get_potential_energy())
    assert stress[0, 1] == pytest.approx((energies[0] - energies[1]) / (2 * h) / volume, rel=1e-5, abs=1e-10)
    for rows in ([1, 0, 2], None):
        left = atoms.copy()
        cell = cell0[rows] if rows else cell0 * np.array([[1.0], [1.0], [-1.0]])
        left.set_cell(cell, scale_atoms=False)
        assert np.linalg.det(left.cell.array) < 0
        left.calc = CartLoremCalculator(model)
        assert left.get_potential_energy() == pytest.approx(energy, rel=1e-12, abs=1e-12)
        assert np.allclose(left.get_stress(voigt=False), stress, rtol=1e-9, atol=1e-12)
        assert np.allclose(left.calc.get_extra("virial"), -volume * stress, rtol=1e-9, atol=1e-12)


def test_threads_sharing_a_calculator_get_their_own_results(model):
    """ASE's get_property sets the calculator's atoms, computes and reads its results: two threads sharing one
    calculator (a thread pool scoring structures) got each other's forces, with no error, or a broadcast error from
    the neighbour list. Each result is checked against a calculator of its own; a copy and a pickle still work."""
    import copy
    import pickle
    import threading

    structures = [crystal(seed=s, repeat=(2, 1, 1) if s % 2 else (1, 2, 2)) for s in range(4)]
    expected = [CartLoremCalculator(model).get_forces(a) for a in structures]
    shared = CartLoremCalculator(model)
    wrong, errors = [], []

    def score(first):
        for step in range(24):
            k = (first + step) % len(structures)
            try:
                forces = shared.get_forces(structures[k].copy())
            except Exception as err:  # noqa: BLE001 (a thread's exception would otherwise be lost)
                errors.append(repr(err))
                continue
            if forces.shape != expected[k].shape or not np.allclose(forces, expected[k], rtol=1e-12, atol=1e-12):
                wrong.append((first, step))

    threads = [threading.Thread(target=score, args=(first,)) for first in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong, f"{len(wrong)} wrong results, errors {errors[:2]}"
    for other in (copy.deepcopy(shared), pickle.loads(pickle.dumps(shared))):
        assert np.allclose(other.get_forces(structures[1].copy()), expected[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("boundaries", ["periodic", "slab"])
def test_a_float32_long_range_model_under_a_float64_default_dtype(lr_model, boundaries):
    """MACE's calculator sets torch's default dtype to float64. torch 2.13's backward of det of a float32 cell builds
    its LU in that dtype, so every periodic float32 long-range call with forces and stress (and a slab's virial, and
    the training step's double backward) failed with a RuntimeError from linalg.lu_solve. The results must be
    those of a float64 default."""
    import copy

    from cartlorem.ewald import electrostatic_energy

    atoms = nacl(seed=3)
    if boundaries == "slab":
        atoms.pbc = (True, True, False)
        atoms.center(vacuum=6.0, axis=2)
    asked = ("stress",) if boundaries == "periodic" else ()

    def results():
        atoms.calc = CartLoremCalculator(lr_model, dtype="float32")
        out = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
               "virial": atoms.calc.get_extra("virial")}
        for name in asked:
            out[name] = atoms.get_stress()
        model = copy.deepcopy(lr_model).float().train()  # the training step's double backward
        pred = model(atoms_to_graph(atoms, CUTOFF, dtype=torch.float32), compute_forces=True, compute_stress=True,
                     create_graph=True)
        loss = (pred["forces"] ** 2).sum() + (pred["energy"] ** 2).sum() + (pred["stress"] ** 2).sum()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        out["loss_grad"] = torch.cat([g.flatten() for g in grads if g is not None]).double().numpy()
        cell = torch.tensor(atoms.cell.array, dtype=torch.float32, requires_grad=True)
        rng = np.random.default_rng(0)
        q = torch.tensor(rng.standard_normal((len(atoms), 1)), dtype=torch.float32)
        for method in ("ewald", "pme"):
            energy = electrostatic_energy(torch.tensor(atoms.positions, dtype=torch.float32), q - q.mean(),
                                          cell=cell, pbc=[True] * 3, smearing=1.0, accuracy=1e-5, method=method)
            out[method] = torch.autograd.grad(energy, cell)[0].double().numpy()
        return out

    expected = results()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = results()
    finally:
        torch.set_default_dtype(before)
    for name, value in expected.items():
        assert np.allclose(got[name], value, rtol=1e-5, atol=1e-6), name


def test_atoms_get_properties_under_threads_gets_its_own_results(model, monkeypatch):
    """Atoms.get_properties runs ASE's calculate_properties: calculate, then export_properties reads the results. The
    lock covered calculate only, so another thread's calculation in between gave this thread its results. Here the
    first thread is held between the two until the second has started."""
    import threading

    first, second = crystal(seed=0, repeat=(2, 1, 1)), crystal(seed=1, repeat=(1, 2, 2))
    expected = CartLoremCalculator(model).get_forces(first)
    shared = CartLoremCalculator(model)
    started, got = threading.Event(), {}
    export = type(shared).export_properties

    def held_export(self):
        if threading.current_thread().name == "first":
            started.set()
            threading.Event().wait(0.3)  # the other thread's calculation would run now
        return export(self)

    monkeypatch.setattr(type(shared), "export_properties", held_export)

    def run_first():
        got["forces"] = first.get_properties(["energy", "forces"])["forces"]

    def run_second():
        started.wait(5.0)
        shared.get_forces(second.copy())

    first.calc = shared
    threads = [threading.Thread(target=run_first, name="first"), threading.Thread(target=run_second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got["forces"].shape == expected.shape and np.allclose(got["forces"], expected, rtol=1e-12, atol=1e-12)
