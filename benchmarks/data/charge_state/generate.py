"""Na8Cl8 / Na9Cl8 clusters in other charge states, at the geometries of ../shared/data/nacl.xyz.

``nacl.xyz`` (the project's shared long-range set) holds cations only: Na9Cl8⁺ (singlet) and Na8Cl8⁺
(doublet). This script takes frames of it, keeps their positions exactly, and relabels them with
GFN2-xTB (tblite) in other charge and spin states:

    Na8Cl8⁺ geometries → Na8Cl8  (Q = 0, singlet)  and  Na8Cl8⁻ (Q = −1, doublet)
    Na9Cl8⁺ geometries → Na9Cl8  (Q = 0, doublet)

so that the same geometry appears with two (Na9Cl8) or three (Na8Cl8) charge states once the cation
frames are mixed back in (benchmarks/charge_state.py does that). Each output frame carries energy (eV)
and forces (eV/Å) as single-point results, ``info``: total_charge, multiplicity, cluster (e.g.
"Na8Cl8-"), source_frame (the index of the frame of nacl.xyz it was made from), displacement and
moving_atom copied from it, xtb_dipole (e·Å); ``arrays``: xtb_charges (e).

Usage (one thread; ~0.2 s per single point):

    OMP_NUM_THREADS=1 python benchmarks/data/charge_state/generate.py \
        --source ../shared/data/nacl.xyz --out benchmarks/data/charge_state/nacl_charge_states.xyz \
        --per-state 100 --seed 0

Frames whose SCF does not converge are skipped (and reported).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

# (cluster of the source frames, new total charge, new multiplicity, new name)
STATES = (("Na8Cl8+", 0, 1, "Na8Cl8"), ("Na8Cl8+", -1, 2, "Na8Cl8-"), ("Na9Cl8+", 0, 2, "Na9Cl8"))


def single_point(atoms, charge: int, multiplicity: int):
    """A copy of ``atoms`` labelled by GFN2-xTB (energy, forces, charges, dipole); None if the SCF fails."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from tblite.ase import TBLite

    a = atoms.copy()
    a.info = {k: v for k, v in atoms.info.items() if k in ("displacement", "moving_atom")}
    for key in list(a.arrays):
        if key not in ("numbers", "positions"):
            del a.arrays[key]
    a.calc = TBLite(method="GFN2-xTB", charge=charge, multiplicity=multiplicity, verbosity=0,
                    max_iterations=500, accuracy=0.1)
    try:
        energy, forces = a.get_potential_energy(), a.get_forces()
        charges, dipole = a.get_charges(), a.get_dipole_moment()
    except Exception as exc:  # SCF failure: skip the frame
        print(f"skip: {exc}", file=sys.stderr)
        return None
    a.calc = None
    a.info.update(total_charge=float(charge), multiplicity=int(multiplicity))
    a.info["xtb_dipole"] = np.asarray(dipole, dtype=float)
    a.arrays["xtb_charges"] = np.asarray(charges, dtype=float)
    a.calc = SinglePointCalculator(a, energy=float(energy), forces=np.asarray(forces, dtype=float))
    return a


def main(argv=None) -> int:
    import ase.io

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="../shared/data/nacl.xyz", help="the cation frames (nacl.xyz)")
    p.add_argument("--out", default="benchmarks/data/charge_state/nacl_charge_states.xyz")
    p.add_argument("--per-state", type=int, default=100, help="frames per new charge state")
    p.add_argument("--seed", type=int, default=0, help="which source frames are drawn")
    args = p.parse_args(argv)

    frames = ase.io.read(args.source, index=":")
    rng = np.random.default_rng(args.seed)
    by_cluster = {}
    for k, a in enumerate(frames):
        by_cluster.setdefault(a.info["cluster"], []).append(k)
    # the same source geometries for every new state of one cluster (Na8Cl8 and Na8Cl8- share them)
    chosen = {c: sorted(rng.choice(ks, size=min(args.per_state, len(ks)), replace=False).tolist())
              for c, ks in sorted(by_cluster.items())}
    out, t0 = [], time.perf_counter()
    for source, charge, mult, name in STATES:
        done = 0
        for k in chosen[source]:
            a = single_point(frames[k], charge, mult)
            if a is None:
                continue
            a.info.update(cluster=name, source_frame=int(k))
            out.append(a)
            done += 1
        print(f"{name}: Q = {charge:+d}, multiplicity {mult}: {done} frames "
              f"({time.perf_counter() - t0:.0f} s so far)", flush=True)
    ase.io.write(args.out, out, format="extxyz")
    print(f"wrote {len(out)} frames to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
