"""i-PI: a 20-step NVE run of periodic NaCl driven by a long-range (multipole) model served with
``python -m cartlorem.integrations.ipi``; i-PI's energies and forces are the ASE calculator's and
i-PI's conserved energy stays constant.

Server and client run in subprocesses over a unix socket with a unique name, each with a time limit
(and the client with socket timeouts), so a failure ends the test instead of hanging it.
Needs ``pip install ipi`` (skipped with that message otherwise).
"""

import importlib.util
import os
import secrets
import shutil
import subprocess
import sys

import ase.io
import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk

import cartlorem
from cartlorem import CartLorem, CartLoremCalculator, save_model

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("ipi") is None, reason="i-PI is not installed (pip install ipi)"),
    pytest.mark.usefixtures("one_thread"),
]

TIMEOUT = 180  # s for the whole run; it takes ~10 s here
REPO = os.path.dirname(os.path.dirname(os.path.abspath(cartlorem.__file__)))

SOCKET = """\
  <total_steps> {steps} </total_steps>
  <prng><seed> 31415 </seed></prng>
  <ffsocket name="cartlorem" mode="unix" pbc="false">
    <address> {address} </address>
    <latency> 1e-4 </latency>
  </ffsocket>
"""

INPUT = """\
<simulation verbosity="low" safe_stride="1000">
  <output prefix="sim">
    <properties stride="1" filename="out"> [ step, conserved{{electronvolt}}, potential{{electronvolt}} ] </properties>
    <trajectory filename="pos" stride="20" format="ase"> positions{{ase}} </trajectory>
    <trajectory filename="frc" stride="20" format="ase"> forces{{ase}} </trajectory>
  </output>
""" + SOCKET + """  <system>
    <initialize nbeads="1">
      <file mode="ase"> init.xyz </file>
      <velocities mode="thermal" units="kelvin"> 600 </velocities>
    </initialize>
    <forces><force forcefield="cartlorem"/></forces>
    <motion mode="dynamics">
      <dynamics mode="nve"><timestep units="femtosecond"> 1.0 </timestep></dynamics>
    </motion>
  </system>
</simulation>
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


def run_ipi(folder, address, client_args=()):
    """Run i-PI on folder/input.xml and the cartlorem client on folder/model.pt and init.xyz, each with a time limit;
    fails the test unless both end well."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    ipi = shutil.which("i-pi", path=os.path.dirname(sys.executable)) or shutil.which("i-pi")
    assert ipi is not None, "the 'ipi' package is installed but its 'i-pi' command is not on PATH"
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, ipi, "input.xml"], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            client = subprocess.run(
                [sys.executable, "-m", "cartlorem.integrations.ipi", "--model", "model.pt", "--structure", "init.xyz",
                 "--unix", address, "--connect-timeout", "60", "--timeout", "60", *client_args],
                cwd=folder, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
            server_rc = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"i-PI run did not finish within its time limit:\n{(folder / 'server.log').read_text()[-3000:]}")
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
            if os.path.exists(f"/tmp/ipi_{address}"):
                os.unlink(f"/tmp/ipi_{address}")
    server_log = (folder / "server.log").read_text()
    assert client.returncode == 0, client.stdout[-3000:] + client.stderr[-3000:] + server_log[-2000:]
    assert server_rc == 0 and "I-PI reports success" in server_log, server_log[-3000:]


@pytest.fixture(scope="module")
def ipi_run(tmp_path_factory):
    """Run i-PI and the cartlorem client; the run's folder."""
    folder = tmp_path_factory.mktemp("ipi")
    address = f"cartlorem-{os.getpid()}-{secrets.token_hex(4)}"  # ASE and i-PI use /tmp/ipi_<address>
    save_model(nacl_model(), folder / "model.pt")
    ase.io.write(folder / "init.xyz", nacl_crystal())
    (folder / "input.xml").write_text(INPUT.format(address=address, steps=20))
    run_ipi(folder, address)
    return folder


def test_ipi_energies_and_forces_are_the_calculators(ipi_run):
    from ipi.utils.units import UnitMap

    table = np.loadtxt(ipi_run / "sim.out")  # step, conserved, potential (eV)
    positions = ase.io.read(ipi_run / "sim.pos_0.extxyz", index=":")
    forces = ase.io.read(ipi_run / "sim.frc_0.extxyz", index=":")
    assert len(positions) == len(forces) == 2  # steps 0 and 20
    template = nacl_crystal()
    model = nacl_model()
    for frame, (pos, frc) in enumerate(zip(positions, forces)):
        a = template.copy()
        a.positions = pos.positions
        a.calc = CartLoremCalculator(model, skin=0.0)
        f = a.get_forces()
        assert np.abs(f).max() > 0.1  # non-trivial forces
        np.testing.assert_allclose(frc.get_forces(), f, rtol=0, atol=1e-6)  # extxyz: 8 decimals
        # ASE sends Hartree (its constant), i-PI converts back with its own eV: they differ by 1e-7
        expected = a.get_potential_energy() / (units.Ha * UnitMap["energy"]["electronvolt"])
        assert table[20 * frame, 2] == pytest.approx(expected, rel=5e-9)  # sim.out has 9 digits


def test_ipi_nve_conserves_energy(ipi_run):
    table = np.loadtxt(ipi_run / "sim.out")
    assert list(table[:, 0]) == list(range(21))
    conserved, potential = table[:, 1], table[:, 2]
    assert np.ptp(potential) > 0.1  # the atoms do move on the model's surface
    assert np.abs(conserved - conserved[0]).max() < 1e-2 * np.ptp(potential)


EDA_INPUT = """\
<simulation verbosity="low" safe_stride="1000">
  <output prefix="sim">
    <properties stride="1" filename="out"> [ step, potential{{electronvolt}} ] </properties>
    <trajectory filename="pos" stride="{steps}" format="ase"> positions{{ase}} </trajectory>
  </output>
""" + SOCKET + """  <system>
    <initialize nbeads="1"><file mode="ase"> init.xyz </file></initialize>
    <forces><force forcefield="cartlorem"/></forces>
    <motion mode="driven_dynamics">
      <driven_dynamics mode="eda-nve">
        <timestep units="femtosecond"> {dt} </timestep>
        <efield><amp units="v/ang"> [ {ex}, {ey}, {ez} ] </amp></efield>
        <bec mode="driver"/>
      </driven_dynamics>
    </motion>
  </system>
</simulation>
"""


def test_ipi_driven_dynamics_in_a_field_follows_the_calculators_field(tmp_path):
    """i-PI's electric dipole approximation (eda-nve) adds the forces Z*ᵀE of the Born charges the client sends
    with --born-charges. From rest, a neutral Na2Cl2 cluster in a 0.5 V/Å field must follow velocity Verlet on the
    calculator with that electric_field (the forces of −P·E) step for step, and not the field-free path."""
    from ase import Atoms
    from ase.md.verlet import VelocityVerlet

    steps, dt, field = 20, 1.0, np.array([0.5, -0.2, 0.1])
    cluster = Atoms("NaClNaCl", positions=[[0, 0, 0], [2.5, 0.2, 0], [2.6, 2.4, 0.3], [0.1, 2.5, -0.2]],
                    cell=[20.0, 20.0, 20.0], pbc=False)
    cluster.positions += 8.0
    address = f"cartlorem-{os.getpid()}-{secrets.token_hex(4)}"
    save_model(nacl_model(), tmp_path / "model.pt")
    ase.io.write(tmp_path / "init.xyz", cluster)
    (tmp_path / "input.xml").write_text(EDA_INPUT.format(address=address, steps=steps, dt=dt, ex=field[0],
                                                         ey=field[1], ez=field[2]))
    run_ipi(tmp_path, address, ["--born-charges"])
    got = ase.io.read(tmp_path / "sim.pos_0.extxyz", index=-1).positions

    def verlet(electric_field):
        a = cluster.copy()
        a.calc = CartLoremCalculator(nacl_model(), skin=0.0, electric_field=electric_field)
        VelocityVerlet(a, timestep=dt * units.fs).run(steps)
        return a.positions

    with_field, without = verlet(field), verlet(None)
    assert np.abs(with_field - without).max() > 1e-3  # the field moves the ions
    np.testing.assert_allclose(got, with_field, rtol=0, atol=1e-6)  # 1e-8 Å here; the field alone moved 0.016 Å
