"""A small periodic bulk-water training set labelled by GFN1-xTB (tblite), for the NVE benchmark.

The water model of ``benchmarks/nve.py`` must be stable in bulk water; a model trained on small
clusters is not (it heats up and atoms collide within 0.2 ps). This script makes the bulk data:

* start: ``m³`` water molecules (default 27, 81 atoms) on a cubic grid at 1 g/cm³ with random
  orientations (``benchmarks.nve.water_box``, a 9.31 Å box), one start per trajectory (its own seed);
* ``md`` frames: a Langevin MD with GFN1-xTB itself (ASE ``Langevin``, ``--temperature`` K,
  ``--timestep-fs``, friction ``--friction`` 1/fs, Maxwell–Boltzmann start at the same temperature)
  from the grid into the liquid; every ``--every``-th step is kept with the energy, forces and stress
  of that very step (no extra calculation);
* ``rattled`` frames: MD frames with every atom displaced by a Gaussian of σ ``--rattle`` Å and the
  cell strained isotropically by up to ±``--strain`` (positions scaled with it), labelled by one more
  single point each: forces far from equilibrium and other densities, so that the model knows the
  repulsive walls it meets in a long run.

Each labelled frame is an extended-XYZ structure with energy (eV), forces (eV/Å) and stress (eV/Å³)
as ASE single-point results, ``info`` holding ``kind`` (md / rattled), ``trajectory``, ``step``,
``temperature_k`` and ``total_charge`` 0, and ``arrays["xtb_charges"]``. Trajectories run in
parallel processes (``--workers``); each appends its frames to ``OUT.part<k>`` as soon as they are
labelled (a run cut short keeps what it made) and the parts are joined into ``OUT`` at the end.
Cost here (shared 2-core machine): about 2–5 s per 81-atom single point.

    python benchmarks/water_data.py benchmarks/data/water_pbc.xyz                 # the committed set
    python benchmarks/water_data.py /tmp/w.xyz --trajectories 1 --steps 8 --every 4 --rattled 1   # smoke test
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.nve import water_box  # noqa: E402


def _calculator(accuracy: float):
    from tblite.ase import TBLite

    return TBLite(method="GFN1-xTB", verbosity=0, accuracy=accuracy, max_iterations=300)


def _labelled(atoms, energy, forces, stress, charges, **info):
    """A copy of ``atoms`` carrying the given results as a single-point calculator."""
    from ase.calculators.singlepoint import SinglePointCalculator

    out = atoms.copy()
    out.arrays.pop("momenta", None)  # not needed for training; keeps the file small
    out.info.update({"total_charge": 0.0, **info})
    out.arrays["xtb_charges"] = np.asarray(charges, dtype=float)
    out.calc = SinglePointCalculator(out, energy=float(energy), forces=np.array(forces), stress=np.array(stress))
    return out


def trajectory(job: dict) -> int:
    """One trajectory: xTB Langevin MD frames, then rattled and strained copies. Returns frames written."""
    from ase import units
    from ase.io import write
    from ase.md.langevin import Langevin

    k, part = job["trajectory"], Path(job["part"])
    rng = np.random.default_rng(job["seed"])
    if job.get("rattle_from"):  # no MD: rattle the MD frames of an earlier run
        from ase.io import read

        kept = [f for f in read(job["rattle_from"], ":") if f.info.get("kind") == "md"]
        return _rattled(kept, job, rng, part, k)
    atoms = water_box(job["molecules"], seed=int(job["seed"]))
    atoms.calc = _calculator(job["accuracy"])
    masses = atoms.get_masses()[:, None]
    p = rng.standard_normal((len(atoms), 3)) * np.sqrt(masses * units.kB * job["temperature"])
    atoms.set_momenta(p - masses * p.sum(0) / masses.sum())
    dyn = Langevin(atoms, job["timestep_fs"] * units.fs, temperature_K=job["temperature"],
                   friction=job["friction"] / units.fs, rng=rng)
    kept, written, t0 = [], 0, time.perf_counter()
    for step in range(job["steps"] + 1):
        if step:
            dyn.run(1)  # the forces of the new positions are computed here, once
        if step % job["every"] == 0:
            frame = _labelled(atoms, atoms.get_potential_energy(),
                              atoms.get_forces(), atoms.get_stress(), atoms.get_charges(), kind="md",
                              trajectory=k, step=step, temperature_k=float(atoms.get_temperature()))
            kept.append(frame)
            write(part, frame, format="extxyz", append=True)
            written += 1
            print(f"[traj {k}] md step {step}/{job['steps']}, T {atoms.get_temperature():.0f} K, "
                  f"{(time.perf_counter() - t0) / max(step, 1):.1f} s/step", flush=True)
    return written + _rattled(kept, job, rng, part, k)


def _rattled(kept: list, job: dict, rng, part: Path, k: int) -> int:
    """``job["rattled"]`` rattled and strained copies of random frames of ``kept``, labelled and appended to ``part``."""
    from ase.io import write

    written = 0
    for r in range(job["rattled"]):
        base = kept[int(rng.integers(len(kept)))]
        a = base.copy()
        a.calc = None
        s = 1.0 + rng.uniform(-job["strain"], job["strain"])
        a.set_cell(a.cell * s, scale_atoms=True)
        a.positions = a.positions + rng.normal(scale=job["rattle"], size=a.positions.shape)
        a.calc = _calculator(job["accuracy"])
        try:
            frame = _labelled(a, a.get_potential_energy(), a.get_forces(), a.get_stress(), a.get_charges(),
                              kind="rattled", trajectory=k, step=int(base.info["step"]), strain=float(s - 1.0),
                              temperature_k=float(base.info["temperature_k"]))
        except Exception as exc:  # an SCF that does not converge: skip the frame, say so
            print(f"[traj {k}] rattled frame {r} skipped: {exc}", flush=True)
            continue
        write(part, frame, format="extxyz", append=True)
        written += 1
        print(f"[traj {k}] rattled {r + 1}/{job['rattled']}", flush=True)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="extended-XYZ file to write")
    p.add_argument("--molecules-per-side", type=int, default=3, help="m: m³ water molecules per box (default 3)")
    p.add_argument("--trajectories", type=int, default=2)
    p.add_argument("--steps", type=int, default=200, help="MD steps per trajectory")
    p.add_argument("--every", type=int, default=4, help="keep every n-th MD step")
    p.add_argument("--rattled", type=int, default=30, help="rattled + strained frames per trajectory")
    p.add_argument("--rattle", type=float, default=0.06, help="Gaussian σ of the rattle, Å")
    p.add_argument("--strain", type=float, default=0.03, help="largest isotropic strain (fraction)")
    p.add_argument("--temperature", type=float, default=350.0, help="K")
    p.add_argument("--timestep-fs", type=float, default=1.0)
    p.add_argument("--friction", type=float, default=0.02, help="Langevin friction, 1/fs")
    p.add_argument("--accuracy", type=float, default=1.0, help="tblite accuracy (SCF tolerance multiplier)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rattle-from", default=None, help="no MD: make the rattled frames from the md frames of "
                   "this file (e.g. of a run cut short), --trajectories processes of --rattled frames each")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.molecules_per_side, args.trajectories, args.every, args.workers) < 1 or args.steps < 0 or args.rattled < 0:
        p.error("--molecules-per-side, --trajectories, --every and --workers must be >= 1; --steps, --rattled >= 0")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = []
    for k in range(args.trajectories):
        part = out.with_name(f"{out.name}.part{k}")
        part.unlink(missing_ok=True)
        jobs.append({"trajectory": k, "part": str(part), "seed": args.seed * 1000 + k, "molecules": args.molecules_per_side,
                     "steps": args.steps, "every": args.every, "rattled": args.rattled, "rattle": args.rattle,
                     "strain": args.strain, "temperature": args.temperature, "timestep_fs": args.timestep_fs,
                     "friction": args.friction, "accuracy": args.accuracy, "rattle_from": args.rattle_from})
    if args.workers == 1:  # in this process: no fork of a process whose OpenMP pool already runs
        counts = [trajectory(job) for job in jobs]
    else:  # spawn, not fork: a forked child of a process that has used OpenMP (torch) can hang in tblite
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            counts = list(pool.map(trajectory, jobs))
    with open(out, "w") as f:
        for job in jobs:
            f.write(Path(job["part"]).read_text())
            Path(job["part"]).unlink()
    print(f"wrote {sum(counts)} frames to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
