"""Slabs against the same atoms fully periodic: time and peak memory of energy + forces as the slab grows.

A NaCl(100) slab two cubic cells thick (r x r x 2 cells of rock salt, 16 r^2 atoms) with ``--vacuum`` Å of
vacuum along c (pbc = [True, True, False]), against the same atoms in their bulk cell (pbc all True). Per size,
each point in a fresh process (so that its peak resident set size is its own):

* ``model``: ``CartLorem(long_range="multipole")``, C = 16, two layers, correlation 2, r_c = 5 Å, default
  block (4 channels of q, mu, Theta, sigma = 1 Å, accuracy 1e-5, ``method="auto"``), random weights
  (seed 0), float64; one energy + forces call through ``CartLoremCalculator`` after a warm-up call, median of
  ``--repeats``;
* ``sum``: ``cartlorem.ewald.electrostatic_energy`` alone with its gradient to the positions, on random
  Gaussian q, mu, Theta (4 channels, sigma = 1 Å, accuracy 1e-5), for ``--methods`` (the slab's 3D sum by
  "ewald", "pme" or "auto").

Peak memory is the process's VmHWM after the calls (the model and graph included). Writes
``--out``.json and .md with the command and the commit.

    python benchmarks/slab_scale.py --sizes 8,11,14 --out benchmarks/results/slab_scale
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the checkout under test


def structure(r: int, vacuum: float, slab: bool):
    from ase.build import bulk

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((r, r, 2))
    atoms.rattle(0.02, seed=r)
    if slab:
        atoms.pbc = [True, True, False]
        atoms.center(vacuum=vacuum / 2, axis=2)
    return atoms


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def worker(spec: dict) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    atoms = structure(spec["r"], spec["vacuum"], spec["geometry"] == "slab")
    times = []
    if spec["what"] == "model":
        from cartlorem import CartLorem, CartLoremCalculator

        torch.manual_seed(0)
        model = CartLorem([11, 17], cutoff=5.0, channels=16, num_layers=2, correlation=2,
                          long_range="multipole").double()
        calc = CartLoremCalculator(model, skin=0.0)
        for k in range(spec["repeats"] + 1):
            calc.reset()
            t = time.perf_counter()
            calc.calculate(atoms, ["energy", "forces"])
            if k:
                times.append(time.perf_counter() - t)
    else:
        from cartlorem import ewald

        g = torch.Generator().manual_seed(0)
        n, c = len(atoms), 4
        pos = torch.as_tensor(atoms.positions, dtype=torch.float64)
        q = torch.randn(n, c, generator=g, dtype=torch.float64)
        q = q - q.mean(0)
        mu = 0.1 * torch.randn(n, c, 3, generator=g, dtype=torch.float64)
        th = 0.1 * torch.randn(n, c, 3, 3, generator=g, dtype=torch.float64)
        th = 0.5 * (th + th.transpose(-1, -2))
        th = th - th.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(3, dtype=torch.float64)
        cell = torch.as_tensor(atoms.cell.array, dtype=torch.float64)
        for k in range(spec["repeats"] + 1):
            x = pos.clone().requires_grad_(True)
            t = time.perf_counter()
            energy = ewald.electrostatic_energy(x, q, mu, th, cell, list(atoms.pbc), smearing=1.0, accuracy=1e-5,
                                                method=spec["method"])
            energy.backward()
            if k:
                times.append(time.perf_counter() - t)
    return {**spec, "n_atoms": len(atoms), "time_s": float(np.median(times)), "peak_rss_mb": peak_rss_mb()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="8,11,14", help="r of the r x r x 2 rock-salt cells (16 r^2 atoms)")
    p.add_argument("--vacuum", type=float, default=20.0)
    p.add_argument("--methods", default="ewald,pme,auto", help="the slab sum's methods in the 'sum' points")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "slab_scale"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from harness import command_line, machine_info

    specs = []
    for r in (int(s) for s in args.sizes.split(",")):
        base = dict(r=r, vacuum=args.vacuum, repeats=args.repeats)
        if not args.skip_model:
            specs += [dict(base, what="model", geometry=g, method="auto") for g in ("bulk", "slab")]
        specs += [dict(base, what="sum", geometry="slab", method=m) for m in args.methods.split(",")]
        specs.append(dict(base, what="sum", geometry="bulk", method="auto"))
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for spec in specs:
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                             text=True, env=env)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['what']:5s} {row['geometry']:4s} {row['method']:5s} N={row['n_atoms']:5d}  "
              f"{row['time_s']:8.3f} s  peak {row['peak_rss_mb']:7.0f} MB", flush=True)
    command = command_line("slab_scale.py", argv)
    record = {"command": command, "machine": machine_info(), "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(record, indent=1) + "\n")
    meta = record["machine"]
    lines = [f"# Slabs against bulk: energy + forces (commit {meta['git_commit']}"
             f"{', dirty tree' if meta['git_dirty'] else ''}, {meta['date']})", "",
             f"Command: `{command}`; {meta['cpu_model']}, one thread, float64, each point a fresh process; "
             f"load average {meta['loadavg_1min']} when written.", "",
             "| what | geometry | method | N | time (s) | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['geometry']} | {r['method']} | {r['n_atoms']} | {r['time_s']:.3f} | "
              f"{r['peak_rss_mb']:.0f} |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
