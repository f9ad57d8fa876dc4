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
  repulsive walls it meets in a long run;
* close-contact frames (``--contacts-from FILE``: no MD, single points made from the ``md`` frames of
  an earlier file; ``--contacts`` frames per job): the MD never brings two molecules closer than
  2.34 Å O–O, so a model trained on it alone has no wall there (in a 1029-atom NVE run two oxygen
  atoms of different molecules fell together within 0.1 ps). Three kinds, in turn:
  ``compressed`` (the molecules' centres of mass scaled to a density drawn from ``--density``
  g/cm³, each molecule kept rigid, then rattled by ``--rattle``), ``pushed_oo`` (``--pushes``
  molecules each moved rigidly towards its nearest neighbour until their O–O distance is drawn from
  ``--oo`` Å) and ``pushed_xh`` (the same, for an intermolecular O–H or H–H pair, distance drawn from
  ``--oh`` resp. ``--hh`` Å). A push that would bring any other intermolecular pair closer than
  ``--floor`` Å is drawn again. ``info`` records ``density``, ``pushed`` (the pairs, as
  ``"i-j:d"``) and ``pushed_min_a`` (the smallest pushed distance).

Each labelled frame is an extended-XYZ structure with energy (eV), forces (eV/Å) and stress (eV/Å³)
as ASE single-point results, ``info`` holding ``kind`` (md / rattled), ``trajectory``, ``step``,
``temperature_k`` and ``total_charge`` 0, and ``arrays["xtb_charges"]``. Trajectories run in
parallel processes (``--workers``); each appends its frames to ``OUT.part<k>`` as soon as they are
labelled (a run cut short keeps what it made) and the parts are joined into ``OUT`` at the end.
Cost here (shared 2-core machine): about 2–5 s per 81-atom single point.

    python benchmarks/water_data.py benchmarks/data/water_pbc.xyz                 # the committed set
    python benchmarks/water_data.py /tmp/w.xyz --trajectories 1 --steps 8 --every 4 --rattled 1   # smoke test

The close-contact set ``benchmarks/data/water_contacts.xyz`` (read by ``benchmarks/nve.py`` next to
``water_pbc.xyz``) is two runs joined, close contacts from the committed MD frames and a hot MD:

    python benchmarks/water_data.py /tmp/c.xyz --contacts-from benchmarks/data/water_pbc.xyz --trajectories 2 --contacts 45 --seed 1
    python benchmarks/water_data.py /tmp/h.xyz --trajectories 1 --temperature 600 --steps 40 --every 4 --rattled 0 --seed 2
    cat /tmp/c.xyz /tmp/h.xyz > benchmarks/data/water_contacts.xyz
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
    if job.get("contacts_from"):  # no MD: close-contact frames from the MD frames of an earlier run
        from ase.io import read

        kept = [f for f in read(job["contacts_from"], ":") if f.info.get("kind") == "md"]
        return _contacts(kept, job, rng, part, k)
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


def _mic(d: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Minimum-image vectors of ``d`` [..., 3] in an orthorhombic ``cell`` (3×3, Å)."""
    L = np.diag(cell)
    return d - L * np.round(d / L)


def whole_molecules(atoms, size: int = 3):
    """A copy of ``atoms`` with every molecule (consecutive blocks of ``size`` atoms, the first its
    centre, e.g. O of OH2) made whole: its other atoms moved to the minimum image of the first."""
    a = atoms.copy()
    cell = a.cell.array
    if not np.allclose(cell, np.diag(np.diag(cell))):
        raise ValueError("whole_molecules needs an orthorhombic cell")
    p = a.positions.reshape(-1, size, 3)
    p[:, 1:] = p[:, :1] + _mic(p[:, 1:] - p[:, :1], cell)
    a.positions = p.reshape(-1, 3)
    return a


def intermolecular_distances(atoms, size: int = 3) -> np.ndarray:
    """[N, N] minimum-image distances (Å) with the pairs inside one molecule set to inf."""
    d = atoms.get_all_distances(mic=True)
    mol = np.arange(len(atoms)) // size
    d[mol[:, None] == mol[None, :]] = np.inf
    return d


def compress(atoms, density: float, size: int = 3):
    """``atoms`` (whole molecules) in a cubic cell shrunk or grown to ``density`` g/cm³, each molecule
    moved rigidly with its centre of mass (scaled with the cell), so that bonds keep their length."""
    from ase.units import _amu

    a = whole_molecules(atoms, size)
    mass = a.get_masses().sum() * _amu * 1e3  # g
    factor = (mass / (density * 1e-24) / a.get_volume()) ** (1.0 / 3.0)
    m = a.get_masses().reshape(-1, size, 1)
    p = a.positions.reshape(-1, size, 3)
    com = (m * p).sum(1, keepdims=True) / m.sum(1, keepdims=True)
    a.set_cell(a.cell * factor, scale_atoms=False)
    a.positions = (p + (factor - 1.0) * com).reshape(-1, 3)
    return a


def push_pair(atoms, rng, kinds: tuple, ranges: dict, floor: float, busy: set, size: int = 3, tries: int = 50):
    """Move one molecule of ``atoms`` (in place, rigidly) so that an intermolecular pair of element
    kinds drawn from ``kinds`` (``"OO"``, ``"OH"``, ``"HH"``) is at a distance drawn from
    ``ranges[kind]`` (Å), every other intermolecular pair staying >= ``floor`` Å. The pair is the
    closest such pair of a random molecule not in ``busy`` (molecules already moved or pushed
    against; both are added). Returns ``(i, j, d)`` (atom indices, the new distance) or None."""
    n_mol = len(atoms) // size
    sym = np.array(atoms.get_chemical_symbols())
    for _ in range(tries):
        kind = kinds[int(rng.integers(len(kinds)))]
        target = float(rng.uniform(*ranges[kind]))
        a_mol = int(rng.integers(n_mol))
        if a_mol in busy:
            continue
        d = intermolecular_distances(atoms, size)
        rows = [i for i in range(a_mol * size, (a_mol + 1) * size) if sym[i] == kind[0]]
        cols = np.flatnonzero(sym == kind[1])
        sub = d[np.ix_(rows, cols)]
        r, c = np.unravel_index(np.argmin(sub), sub.shape)
        i, j = rows[r], int(cols[c])
        b_mol = j // size
        if b_mol in busy or not np.isfinite(sub[r, c]):
            continue
        v = _mic(atoms.positions[j] - atoms.positions[i], atoms.cell.array)
        shift = v / np.linalg.norm(v) * (target - np.linalg.norm(v))  # move molecule b along i→j
        trial = atoms.copy()
        trial.positions[b_mol * size:(b_mol + 1) * size] += shift
        dt = intermolecular_distances(trial, size)
        dt[i, j] = dt[j, i] = np.inf
        if dt.min() < floor:
            continue
        atoms.positions[:] = trial.positions
        busy.update({a_mol, b_mol})
        return i, j, target
    return None


def _contacts(kept: list, job: dict, rng, part: Path, k: int) -> int:
    """``job["contacts"]`` close-contact frames (compressed, pushed_oo, pushed_xh in turn) made from
    random frames of ``kept``, labelled by a single point each and appended to ``part``."""
    from ase.io import write
    from ase.units import _amu

    kinds_cycle = ("compressed", "pushed_oo", "pushed_xh")
    ranges = {"OO": tuple(job["oo"]), "OH": tuple(job["oh"]), "HO": tuple(job["oh"]), "HH": tuple(job["hh"])}
    written = 0
    for r in range(job["contacts"]):
        kind = kinds_cycle[r % 3]
        base = kept[int(rng.integers(len(kept)))]
        a = whole_molecules(base)
        a.calc = None
        info = {"kind": kind, "trajectory": k, "step": int(base.info["step"]),
                "temperature_k": float(base.info["temperature_k"])}
        if kind == "compressed":
            rho = float(rng.uniform(*job["density"]))
            a = compress(a, rho)
            a.positions = a.positions + rng.normal(scale=job["rattle"], size=a.positions.shape)
            info["density"] = rho
        else:
            busy, pushed = set(), []
            for _ in range(job["pushes"]):
                got = push_pair(a, rng, ("OO",) if kind == "pushed_oo" else ("OH", "HO", "HH"), ranges,
                                job["floor"], busy)
                if got is not None:
                    pushed.append(got)
            if not pushed:
                print(f"[traj {k}] contact frame {r}: no push possible, skipped", flush=True)
                continue
            info["pushed"] = " ".join(f"{i}-{j}:{d:.3f}" for i, j, d in pushed)
            info["pushed_min_a"] = float(min(d for _, _, d in pushed))
            info["density"] = float(a.get_masses().sum() * _amu * 1e27 / a.get_volume())  # g/cm³
        a.calc = _calculator(job["accuracy"])
        try:
            frame = _labelled(a, a.get_potential_energy(), a.get_forces(), a.get_stress(), a.get_charges(), **info)
        except Exception as exc:  # an SCF that does not converge: skip the frame, say so
            print(f"[traj {k}] contact frame {r} skipped: {exc}", flush=True)
            continue
        write(part, frame, format="extxyz", append=True)
        written += 1
        print(f"[traj {k}] contact {r + 1}/{job['contacts']} ({kind}, {info.get('pushed', '')} "
              f"{info['density']:.2f} g/cm3), max |F| {np.abs(frame.get_forces()).max():.1f} eV/A", flush=True)
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
    p.add_argument("--contacts-from", default=None, help="no MD: make close-contact frames from the md frames "
                   "of this file, --trajectories processes of --contacts frames each")
    p.add_argument("--contacts", type=int, default=30, help="close-contact frames per process (with --contacts-from)")
    p.add_argument("--density", type=float, nargs=2, default=(1.2, 1.6), help="range of the compressed frames' "
                   "density, g/cm³")
    p.add_argument("--pushes", type=int, default=3, help="pairs pushed together per pushed frame")
    p.add_argument("--oo", type=float, nargs=2, default=(1.8, 2.3), help="range of a pushed O–O distance, Å")
    p.add_argument("--oh", type=float, nargs=2, default=(1.1, 1.5), help="range of a pushed O–H distance, Å")
    p.add_argument("--hh", type=float, nargs=2, default=(1.1, 1.6), help="range of a pushed H–H distance, Å")
    p.add_argument("--floor", type=float, default=1.0, help="smallest distance of any other intermolecular pair "
                   "after a push, Å")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.molecules_per_side, args.trajectories, args.every, args.workers) < 1 or args.steps < 0 or args.rattled < 0:
        p.error("--molecules-per-side, --trajectories, --every and --workers must be >= 1; --steps, --rattled >= 0")
    for name in ("density", "oo", "oh", "hh"):
        lo, hi = getattr(args, name)
        if not 0 < lo <= hi:
            p.error(f"--{name} needs 0 < low <= high, got {lo} {hi}")
    if args.contacts < 0 or args.pushes < 1 or not args.floor > 0:
        p.error("--contacts must be >= 0, --pushes >= 1 and --floor > 0")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = []
    for k in range(args.trajectories):
        part = out.with_name(f"{out.name}.part{k}")
        part.unlink(missing_ok=True)
        jobs.append({"trajectory": k, "part": str(part), "seed": args.seed * 1000 + k, "molecules": args.molecules_per_side,
                     "steps": args.steps, "every": args.every, "rattled": args.rattled, "rattle": args.rattle,
                     "strain": args.strain, "temperature": args.temperature, "timestep_fs": args.timestep_fs,
                     "friction": args.friction, "accuracy": args.accuracy, "rattle_from": args.rattle_from,
                     "contacts_from": args.contacts_from, "contacts": args.contacts, "density": args.density,
                     "pushes": args.pushes, "oo": args.oo, "oh": args.oh, "hh": args.hh, "floor": args.floor})
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
