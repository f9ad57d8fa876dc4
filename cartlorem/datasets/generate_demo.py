"""Generate the bundled demo dataset: small Na/Cl/water clusters labelled with GFN2-xTB (tblite).

    python -m cartlorem.datasets.generate_demo OUT.xyz --seed 0

Needs the ``data`` extra (``pip install tblite``). Systems (open boundaries):

- NaCl(H2O)4, total charge 0 (14 atoms): an ion pair with four waters (started 2.5 or 4.0 Å
  apart; with only four waters the pair ends up in contact, Na–Cl 2.0–2.9 Å),
- Na⁺(H2O)4, total charge +1, and Cl⁻(H2O)4, total charge −1 (13 atoms): a few charged frames.

Each trajectory starts from waters placed at random around the ions, relaxes for a few BFGS steps
and runs Langevin MD with GFN2-xTB at 300–700 K (0.5 fs steps); frames are taken every
``stride`` steps after an equilibration period, and some of them are copied with Gaussian
displacements (σ = 0.03 Å, "rattle") to widen the force distribution. Frames in which the cluster
has come apart (heavy atoms not connected within 4.5 Å) are dropped. Every frame is written with
its xTB energy (eV), forces (eV/Å) and dipole (e·Å, about the coordinate origin) as ASE single-point results and with
``total_charge``, ``system`` and ``config_type`` in ``atoms.info``.
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
    """One cluster type: ``ions`` ("NaCl", "Na" or "Cl") with N_WATER waters and a total charge (e)."""

    name: str
    ions: str
    charge: int
    n_traj: int
    frames_per_traj: int
    n_rattle: int


SYSTEMS = (
    System("nacl_w4", "NaCl", 0, 8, 40, 80),
    System("na_w4", "Na", +1, 2, 25, 0),
    System("cl_w4", "Cl", -1, 2, 25, 0),
)
N_WATER = 4
TEMPERATURES_K = (300.0, 400.0, 500.0, 700.0)
TIMESTEP_FS = 0.5
EQUILIBRATION_STEPS = 200
STRIDE = 30
RATTLE_SIGMA = 0.03  # Å
CONNECT_DISTANCE = 4.5  # Å between heavy atoms for the cluster to count as intact


def xtb_calculator(charge: int):
    """GFN2-xTB through tblite's ASE calculator (eV, Å)."""
    from tblite.ase import TBLite

    return TBLite(
        method="GFN2-xTB", charge=float(charge), accuracy=1.0, electronic_temperature=300.0, verbosity=0
    )


def build_cluster(ions: str, rng: np.random.Generator, ion_distance: float):
    """Ions on the x axis (``ion_distance`` Å apart if two) and N_WATER randomly placed waters."""
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    ion_pos = [[-ion_distance / 2, 0, 0], [ion_distance / 2, 0, 0]] if len(ions) > 2 else [[0.0, 0.0, 0.0]]
    atoms = Atoms(ions, positions=ion_pos)
    water = molecule("H2O")
    water.translate(-water.positions[0])  # oxygen at the origin
    centre = np.mean(ion_pos, axis=0)
    placed = 0
    while placed < N_WATER:
        u = rng.normal(size=3)
        o = centre + rng.uniform(2.6, 3.6) * u / np.linalg.norm(u)
        heavy = atoms.positions[[k for k, z in enumerate(atoms.numbers) if z != 1]]
        if np.min(np.linalg.norm(heavy - o, axis=1)) < 2.4:
            continue
        w = water.copy()
        w.positions = Rotation.random(random_state=int(rng.integers(2**31))).apply(w.positions) + o
        atoms += w
        placed += 1
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


def labelled_copy(atoms, calc_results: dict, info: dict):
    """A copy of ``atoms`` with single-point energy, forces and dipole attached."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    frame.arrays.pop("momenta", None)
    frame.info = dict(info)
    keep = {k: np.array(calc_results[k], copy=True) for k in ("forces", "dipole") if k in calc_results}
    frame.calc = SinglePointCalculator(frame, energy=float(calc_results["energy"]), **keep)
    return frame


def run_trajectory(system: System, temperature: float, ion_distance: float, rng: np.random.Generator):
    """Relax briefly, run Langevin MD and return the sampled, labelled, intact frames."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation
    from ase.optimize import BFGS

    atoms = build_cluster(system.ions, rng, ion_distance)
    atoms.calc = xtb_calculator(system.charge)
    BFGS(atoms, logfile=None).run(fmax=0.5, steps=30)
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * temperature))
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = Langevin(
        atoms,
        TIMESTEP_FS * units.fs,
        temperature_K=temperature,
        friction=0.02 / units.fs,
        fixcm=False,
        rng=rng,
    )
    info = {"total_charge": system.charge, "system": system.name, "config_type": f"md_{int(temperature)}K"}
    frames, dropped = [], 0

    def sample():
        nonlocal dropped
        if dyn.nsteps < EQUILIBRATION_STEPS:
            return
        atoms.get_forces()  # cached: computed at these positions by the integrator
        if is_intact(atoms):
            frames.append(labelled_copy(atoms, atoms.calc.results, info))
        else:
            dropped += 1

    dyn.attach(sample, interval=STRIDE)
    dyn.run(EQUILIBRATION_STEPS + STRIDE * system.frames_per_traj)
    return frames[: system.frames_per_traj], dropped


def rattle_frames(frames, system: System, rng: np.random.Generator):
    """Copies of randomly chosen frames with Gaussian displacements, relabelled with xTB."""
    out = []
    calc = xtb_calculator(system.charge)
    while len(out) < system.n_rattle:
        src = frames[int(rng.integers(len(frames)))]
        atoms = src.copy()
        atoms.positions += rng.normal(scale=RATTLE_SIGMA, size=atoms.positions.shape)
        atoms.calc = calc
        atoms.get_potential_energy()
        info = dict(src.info, config_type="rattle")
        out.append(labelled_copy(atoms, calc.results, info))
    return out


def generate(seed: int = 0, verbose: bool = True):
    """All frames of the demo dataset (list of ase.Atoms with single-point results)."""
    rng = np.random.default_rng(seed)
    frames = []
    for system in SYSTEMS:
        sys_frames = []
        for t in range(system.n_traj):
            temperature = TEMPERATURES_K[t % len(TEMPERATURES_K)]
            ion_distance = (2.5, 4.0)[(t // len(TEMPERATURES_K)) % 2]  # contact / solvent-separated start
            start = time.perf_counter()
            got, dropped = run_trajectory(system, temperature, ion_distance, rng)
            if verbose:
                print(
                    f"{system.name}: trajectory {t} at {temperature:.0f} K: {len(got)} frames, "
                    f"{dropped} dropped (cluster broke up), {time.perf_counter() - start:.1f} s",
                    flush=True,
                )
            sys_frames += got
        if system.n_rattle:
            sys_frames += rattle_frames(sys_frames, system, rng)
        frames += sys_frames
    return frames


def write_compact(path: str, frames, decimals: int = 6) -> None:
    """Write extxyz with ``ase.io.write``, then print the per-atom columns with ``decimals`` decimals.

    ASE writes every per-atom float as %16.8f; 1e-6 Å and 1e-6 eV/Å are far below what a model
    resolves, and the shorter columns keep the bundled file well under 1 MB. The comment lines
    (energy, dipole, info) are kept exactly as ASE wrote them.
    """
    import io

    import ase.io

    buf = io.StringIO()
    ase.io.write(buf, frames, format="extxyz", columns=["symbols", "positions", "forces"])
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

    # one OpenMP thread per xTB calculation: 14 atoms are too few to share, and oversubscribed
    # threads on a busy machine are much slower than one
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    frames = generate(args.seed)
    write_compact(args.out, frames)
    print(f"wrote {len(frames)} frames to {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
