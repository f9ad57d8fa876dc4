"""Generate the bundled Born-effective-charge set: small water and ion–water clusters at GFN2-xTB.

    python -m cartlorem.datasets.generate_bec cartlorem/datasets/bec_water.xyz --seed 0

Needs the ``data`` extra (``pip install tblite``). Systems (open boundaries): (H2O)2, (H2O)3, (H2O)4
(neutral), Na⁺(H2O)2 (+1) and Cl⁻(H2O)2 (−1). For each, a few trajectories start from waters placed at
random around the centre (or the ion), relax for ≤ 30 BFGS steps and run a short Langevin MD at
300–500 K; frames are taken every ``STRIDE`` steps after ``EQUILIBRATION_STEPS``. Every frame gets

- the GFN2-xTB energy (eV), forces (eV/Å) and dipole P (e·Å, about the coordinate origin, as tblite
  reports it: P = Σ_A Z_A r_A − ∫ρ r) as ASE single-point results;
- Born effective charges Z*_i,ab = ∂P_a/∂r_ib (e) by central finite differences of the xTB dipole,
  step ``FD_STEP`` Å, in ``atoms.arrays["born_charges"]`` [N, 9] (row-major: a is the row);
- ``atoms.info``: ``total_charge`` (e), ``system``, ``config_type`` and ``bec_asr_error`` (e), the
  largest entry of |Σ_i Z*_i − Q I|, which is zero for exact derivatives (a rigid translation t
  changes P by Q t) and measures the finite-difference and SCF error.

Why in ``cartlorem/datasets`` (next to ``generate_demo.py``) and not ``benchmarks/``: the file it writes
ships with the package (package data ``datasets/*.xyz``) because a test and a benchmark read it, and
the recipe should sit next to the data it made.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np

from . import require_tblite


@dataclass(frozen=True)
class System:
    """One cluster type: ``ion`` ("", "Na" or "Cl") with ``n_water`` waters and a total charge (e)."""

    name: str
    ion: str
    n_water: int
    charge: int


SYSTEMS = (
    System("w2", "", 2, 0),
    System("w3", "", 3, 0),
    System("w4", "", 4, 0),
    System("na_w2", "Na", 2, +1),
    System("cl_w2", "Cl", 2, -1),
)
N_TRAJ = 3  # trajectories per system
FRAMES_PER_TRAJ = 10
TEMPERATURES_K = (300.0, 400.0, 500.0)
TIMESTEP_FS = 0.5
EQUILIBRATION_STEPS = 100
STRIDE = 20
FD_STEP = 0.005  # Å, central differences of the dipole
SCF_ACCURACY = 0.01  # tblite accuracy (1.0 is its default; smaller converges the SCF tighter)
CONNECT_DISTANCE = 4.5  # Å between heavy atoms for the cluster to count as intact


def xtb_calculator(charge: int):
    """GFN2-xTB through tblite's ASE calculator (eV, Å, e·Å)."""
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", charge=float(charge), accuracy=SCF_ACCURACY,
                  electronic_temperature=300.0, verbosity=0)


def build_cluster(system: System, rng: np.random.Generator):
    """The ion (if any) at the origin and ``n_water`` randomly oriented waters 2.6–3.6 Å around it."""
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    atoms = Atoms(system.ion, positions=[[0.0, 0.0, 0.0]]) if system.ion else Atoms()
    water = molecule("H2O")
    water.translate(-water.positions[0])  # oxygen at the origin
    while sum(atoms.numbers == 8) < system.n_water:
        u = rng.normal(size=3)
        o = rng.uniform(2.6, 3.6) * u / np.linalg.norm(u) if len(atoms) else np.zeros(3)
        heavy = atoms.positions[atoms.numbers != 1]
        if len(heavy) and np.min(np.linalg.norm(heavy - o, axis=1)) < 2.6:
            continue
        w = water.copy()
        w.positions = Rotation.random(random_state=int(rng.integers(2**31))).apply(w.positions) + o
        atoms += w
    return atoms


def is_intact(atoms) -> bool:
    """True if the heavy atoms (Na, Cl, O) form one connected cluster at CONNECT_DISTANCE."""
    heavy = atoms.positions[atoms.numbers != 1]
    d = np.linalg.norm(heavy[:, None] - heavy[None], axis=-1)
    seen, todo = {0}, [0]
    while todo:
        k = todo.pop()
        for m in np.nonzero(d[k] < CONNECT_DISTANCE)[0]:
            if int(m) not in seen:
                seen.add(int(m))
                todo.append(int(m))
    return len(seen) == len(heavy)


def born_charges(atoms, charge: int, step: float = FD_STEP) -> np.ndarray:
    """Z* [N, 3, 3] (e), Z*_i,ab = ∂P_a/∂r_ib by central differences of the xTB dipole (step Å)."""
    calc = xtb_calculator(charge)
    probe = atoms.copy()
    probe.calc = calc
    z = np.zeros((len(atoms), 3, 3))
    for i in range(len(atoms)):
        for b in range(3):
            moved = []
            for sign in (+1, -1):
                probe.positions = atoms.positions.copy()
                probe.positions[i, b] += sign * step
                moved.append(np.asarray(probe.get_dipole_moment(), dtype=float))
            z[i, :, b] = (moved[0] - moved[1]) / (2 * step)
    return z


def label(atoms, system: System, config_type: str):
    """A copy of ``atoms`` with xTB energy, forces, dipole (single-point results) and Born charges."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    frame.arrays.pop("momenta", None)
    calc = xtb_calculator(system.charge)
    frame.calc = calc
    energy, forces = frame.get_potential_energy(), frame.get_forces()
    dipole = np.asarray(frame.get_dipole_moment(), dtype=float)
    z = born_charges(frame, system.charge)
    asr = np.abs(z.sum(axis=0) - system.charge * np.eye(3)).max()
    frame.calc = SinglePointCalculator(frame, energy=float(energy), forces=np.array(forces), dipole=dipole)
    frame.arrays["born_charges"] = z.reshape(len(frame), 9)
    frame.info = {"total_charge": system.charge, "system": system.name, "config_type": config_type,
                  "bec_asr_error": float(asr)}
    return frame


def run_trajectory(system: System, temperature: float, rng: np.random.Generator):
    """Relax briefly, run Langevin MD and return the sampled, intact geometries (unlabelled)."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation
    from ase.optimize import BFGS

    atoms = build_cluster(system, rng)
    atoms.calc = xtb_calculator(system.charge)
    BFGS(atoms, logfile=None).run(fmax=0.5, steps=30)
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * temperature))
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = Langevin(atoms, TIMESTEP_FS * units.fs, temperature_K=temperature, friction=0.02 / units.fs,
                   fixcm=False, rng=rng)
    frames, dropped = [], 0

    def sample():
        nonlocal dropped
        if dyn.nsteps < EQUILIBRATION_STEPS:
            return
        if is_intact(atoms):
            frames.append(atoms.copy())
        else:
            dropped += 1

    dyn.attach(sample, interval=STRIDE)
    dyn.run(EQUILIBRATION_STEPS + STRIDE * FRAMES_PER_TRAJ)
    return frames[:FRAMES_PER_TRAJ], dropped


def generate(seed: int = 0, verbose: bool = True):
    """All frames of the set (list of ase.Atoms with single-point results and Born charges)."""
    rng = np.random.default_rng(seed)
    frames = []
    for system in SYSTEMS:
        for t in range(N_TRAJ):
            temperature = TEMPERATURES_K[t % len(TEMPERATURES_K)]
            start = time.perf_counter()
            got, dropped = run_trajectory(system, temperature, rng)
            labelled = [label(a, system, f"md_{int(temperature)}K") for a in got]
            frames += labelled
            if verbose:
                worst = max(f.info["bec_asr_error"] for f in labelled) if labelled else float("nan")
                print(f"{system.name}: trajectory {t} at {temperature:.0f} K: {len(got)} frames, {dropped} "
                      f"dropped, max |sum Z* - Q I| {worst:.1e} e, {time.perf_counter() - start:.1f} s", flush=True)
    return frames


def write_compact(path: str, frames, decimals: int = 6) -> None:
    """extxyz via ``ase.io.write``, per-atom columns reprinted with ``decimals`` decimals (smaller file)."""
    import io

    import ase.io

    buf = io.StringIO()
    ase.io.write(buf, frames, format="extxyz", columns=["symbols", "positions", "forces", "born_charges"])
    lines = buf.getvalue().splitlines()
    out, k = [], 0
    while k < len(lines):
        n = int(lines[k])
        out += [lines[k], lines[k + 1]]
        for line in lines[k + 2 : k + 2 + n]:
            symbol, *numbers = line.split()
            out.append(" ".join([symbol] + [f"{float(x):.{decimals}f}" for x in numbers]))
        k += 2 + n
    with open(path, "w") as fh:
        fh.write("\n".join(out) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output extxyz file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    require_tblite(parser)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per tiny xTB calculation
    start = time.perf_counter()
    frames = generate(args.seed)
    write_compact(args.out, frames)
    asr = np.array([f.info["bec_asr_error"] for f in frames])
    print(f"wrote {len(frames)} frames to {args.out} in {time.perf_counter() - start:.0f} s; acoustic sum rule "
          f"max |sum_i Z*_i - Q I| = {asr.max():.2e} e (median {np.median(asr):.2e} e)")


if __name__ == "__main__":
    main()
