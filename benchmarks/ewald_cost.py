"""Direct cost of the long-range block's Ewald fields against N, next to the local model's time.

speed.py reports the long-range share as time(multipole model) / time(short-range model) − 1, a
difference of two whole-model timings that is noisy on a shared machine (±15 % between runs). This
script times the part that grows differently with N on its own: the Ewald fields (potential,
field, gradient) of C_lr = 4 channels of Gaussian (σ = 1 Å) charges, dipoles and quadrupoles, forward
and backward to the positions, in periodic water boxes and diamond supercells, as the model calls
it (``batched_multipole_fields``, accuracy 1e-5). Process CPU time, median of ``--repeats`` after a
warm-up. With the local model's energy + forces CPU time from ``results/speed.json`` (same
structures, the same local-model C as ``--channels`` and the same thread count as ``--threads``) it gives
the block's share directly.

    python benchmarks/ewald_cost.py            # results/ewald_cost.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: cartlorem and benchmarks

from benchmarks.harness import (ATOMS_PER, command_line, machine_info, make_structure, markdown_table,  # noqa: E402
                                write_results)


def ewald_cpu_seconds(atoms, dtype, repeats: int, channels: int = 4) -> tuple[float, dict]:
    from cartlorem.ewald import batched_multipole_fields
    from cartlorem.ewald.ewald import choose_parameters, kvector_indices

    gen = torch.Generator().manual_seed(0)
    n = len(atoms)
    pos = torch.tensor(atoms.positions, dtype=dtype, requires_grad=True)
    cell = torch.tensor(atoms.cell.array, dtype=dtype)[None]
    q = torch.randn(n, channels, generator=gen, dtype=dtype)
    mu = torch.randn(n, channels, 3, generator=gen, dtype=dtype)
    th = torch.randn(n, channels, 3, 3, generator=gen, dtype=dtype)
    th = th + th.transpose(-1, -2)
    th = th - torch.diagonal(th, dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(3, dtype=dtype)
    batch = torch.zeros(n, dtype=torch.long)
    pbc = torch.ones(1, 3, dtype=torch.bool)

    def call():
        f = batched_multipole_fields(pos, batch, cell, pbc, q, mu, th, smearing=1.0, accuracy=1e-5)
        e = (f.potential * q).sum() + (f.field * mu).sum() + (f.field_gradient * th).sum()
        torch.autograd.grad(e, [pos])

    call()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        call()
        times.append(time.process_time() - t0)
    p = choose_parameters(atoms.cell.array, n, 1e-5, 4, 1.0)
    info = {"alpha": round(p.alpha, 4), "real_cutoff": round(p.real_cutoff, 3),
            "k_vectors": int(len(kvector_indices(atoms.cell.array, p.k_cutoff)))}
    return float(np.median(times)), info


def local_model_seconds(speed_rows, system: str, n_atoms: int, dtype: str, channels: int, threads: int):
    """The local model's energy + forces CPU time of one structure in speed.py's rows: its short-range CPU row
    of the same C and thread count. None where speed.json has no row of the structure at all; SystemExit where
    it has some but none, or more than one, of this C and thread count (another model size or thread count
    would give a wrong share)."""
    same = [r for r in speed_rows if r.get("status") == "ok" and r.get("model") == "short" and r.get("device") == "cpu"
            and (r.get("system"), r.get("n_atoms"), r.get("dtype")) == (system, n_atoms, dtype)]
    match = [r for r in same if r.get("channels") == channels and r.get("threads") == threads]
    if same and not match:
        have = sorted({f"C = {r.get('channels')}, {r.get('threads')} thread(s)" for r in same}, key=str)
        raise SystemExit(f"error: --speed has no local-model row of {system} {n_atoms} atoms {dtype} at "
                         f"C = {channels}, {threads} thread(s) (it has: {'; '.join(have)}): pass --channels / "
                         "--threads to match")
    if len(match) > 1:
        raise SystemExit(f"error: --speed has {len(match)} local-model rows of {system} {n_atoms} atoms {dtype} at "
                         f"C = {channels}, {threads} thread(s): which one to compare with is ambiguous")
    return match[0]["cpu_time_s"] if match else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="water:3,4,6,8,10,12;diamond:3,5,7")
    p.add_argument("--dtype", default="float32,float64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the speed.json rows compared with must match)")
    p.add_argument("--channels", type=int, default=64,
                   help="C of the local model whose speed.json time is compared with (speed.py --channels)")
    p.add_argument("--speed", default=str(HERE / "results" / "speed.json"), help="local-model times to compare with")
    p.add_argument("--out", default=str(HERE / "results" / "ewald_cost"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    speed_rows = json.loads(Path(args.speed).read_text()).get("rows", []) if Path(args.speed).exists() else []
    points = []
    for part in args.sizes.split(";"):
        system, sizes = part.split(":")
        points.append((system, [int(s) for s in sizes.split(",")]))
    dtypes = args.dtype.split(",")
    # every point's local-model time first: a mismatch stops the run before anything is timed
    local = {(system, n, dt): local_model_seconds(speed_rows, system, n, dt, args.channels, args.threads)
             for system, sizes in points for n in (ATOMS_PER[system](size) for size in sizes) for dt in dtypes}
    rows = []
    for system, sizes in points:
        for size in sizes:
            atoms = make_structure(system, size)
            for dt in dtypes:
                t, info = ewald_cpu_seconds(atoms, getattr(torch, dt), args.repeats)
                n = ATOMS_PER[system](size)
                t_local = local[(system, n, dt)]
                rows.append({"system": system, "N": n, "dtype": dt, **info, "ewald_cpu_s": round(t, 3),
                             "local_model_cpu_s": None if t_local is None else round(t_local, 2),
                             "share": None if t_local is None else f"{100 * t / t_local:.1f}%"})
                print(rows[-1], flush=True)
    slopes = []
    for system in sorted({r["system"] for r in rows}):
        for dt in sorted({r["dtype"] for r in rows}):
            sel = [r for r in rows if r["system"] == system and r["dtype"] == dt and r["N"] >= 500]
            if len(sel) >= 2:
                k = np.polyfit(np.log([r["N"] for r in sel]), np.log([r["ewald_cpu_s"] for r in sel]), 1)[0]
                slopes.append(f"{system} {dt}: {k:.2f} (N ≥ 500)")
    meta = {**machine_info(), "command": command_line("ewald_cost.py", argv)}
    md = [f"# Cost of the Ewald fields in the long-range block ({meta['date']}, commit "
          f"{(meta.get('git_commit') or '?')[:10]})", "",
          f"Machine: {meta['cpu_model']}, {args.threads} thread(s), load average {meta['loadavg_1min']}. "
          "Fields of 4 channels of Gaussian (σ = 1 Å) q, μ, Θ, forward + backward to positions, process CPU "
          f"time, median of {args.repeats} after a warm-up; local model = cartlorem short-range energy + forces "
          f"CPU time from {Path(args.speed).name} (C = {args.channels}, {args.threads} thread(s)). "
          f"`{meta['command']}`.", "",
          markdown_table(rows, [("system", "system"), ("N", "N"), ("dtype", "dtype"), ("alpha (1/Å)", "alpha"),
                                ("r_c (Å)", "real_cutoff"), ("k-vectors", "k_vectors"),
                                ("Ewald CPU s", "ewald_cpu_s"), ("local model CPU s", "local_model_cpu_s"),
                                ("Ewald / local", "share")]), "",
          "Fitted log–log slopes of the Ewald time: " + "; ".join(slopes) + ".", "",
          "With smeared sources the splitting is α = 1/(√2 σ), where the real-space kernel vanishes: the "
          "sum is all reciprocal space, N atoms × K k-vectors with K ∝ volume ∝ N, so O(N²) with a small "
          "constant. A real-space neighbour list with a smaller α, or a particle-mesh method, would bring it "
          "to O(N^1.5) or O(N log N); at these sizes the local model dominates."]
    write_results("ewald_cost", rows, {**meta, **vars(args)}, "\n".join(md), out=args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
