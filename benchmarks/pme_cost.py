"""Cost of the periodic multipole fields: Ewald against particle-mesh Ewald (PME) as N grows.

Periodic water boxes (speed.water_box, 1 g/cm³, random orientations), C = 4 channels of random
charges, dipoles and traceless quadrupoles on every atom (Gaussian sources of width ``--smearing``,
the long-range block's default 1 Å; ``--smearing none`` for point multipoles), accuracy ``--accuracy``
(1e-6). One call = ``multipole_fields(..., method=M)`` (potential, field, gradient) + the energy
``1/2 sum (q phi - mu.E - 1/2 Theta:G)`` + its gradient to the positions (forces). Wall time, median
of ``--repeats`` after one warm-up, methods interleaved. The log-log slope of time against N is
fitted over N >= 1000. The parameters PME chose (alpha, r_c, mesh, spline order) and the method
``auto`` picks are reported next to each row.

With nvalchemiops importable (``pip install nvalchemi-toolkit-ops warp-lang``; benchmark only, not a
cartlorem dependency), its ``multipole_particle_mesh_ewald`` (energy + forces, one call per channel,
its own parameter estimate at the same accuracy, spline order 5, vesin neighbour list outside the
timing) is timed as an outside reference.

    python benchmarks/pme_cost.py                       # results/pme_cost.{json,md}
    python benchmarks/pme_cost.py --sizes 4,6 --dtype float64 --repeats 1   # quick look
    python benchmarks/pme_cost.py --device cuda --sizes 32,48,70 --dtype float32 --ewald-max 0 --no-nvalchemi
                                                        # GPU, 10^5 - 10^6 atoms (peak GPU memory reported)

On CUDA the clocks are read after a synchronisation, and the peak memory of one PME call
(``torch.cuda.max_memory_allocated`` above the memory allocated before it) is reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine_info, markdown_table, time_fns, write_results  # noqa: E402
from harness import peak_memory_bytes, reset_peak_memory, resolve_device, sync_fn, water_box  # noqa: E402


def random_multipoles(n: int, channels: int, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, channels, generator=gen, dtype=dtype)
    mu = 0.3 * torch.randn(n, channels, 3, generator=gen, dtype=dtype)
    th = 0.1 * torch.randn(n, channels, 3, 3, generator=gen, dtype=dtype)
    th = th + th.transpose(-1, -2)
    th = th - torch.diagonal(th, dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(3, dtype=dtype)
    return q, mu, th


def cartlorem_call(atoms, dtype, method: str, smearing, accuracy: float, channels: int, device="cpu"):
    from cartlorem.ewald import multipole_fields

    pos = torch.tensor(atoms.positions, dtype=dtype, device=device, requires_grad=True)
    cell = torch.tensor(atoms.cell.array, dtype=dtype, device=device)
    q, mu, th = (t.to(device) for t in random_multipoles(len(atoms), channels, dtype))

    def call():
        f = multipole_fields(pos, q, mu, th, cell, [True] * 3, smearing=smearing, accuracy=accuracy, method=method)
        e = 0.5 * ((q * f.potential).sum() - (mu * f.field).sum() - 0.5 * (th * f.field_gradient).sum())
        torch.autograd.grad(e, [pos])

    return call


def nvalchemi_call(atoms, dtype, smearing, accuracy: float, channels: int):
    """Energy + forces of C channels through nvalchemiops' multipole PME, or a reason it cannot run."""
    try:
        from nvalchemiops.torch.interactions.electrostatics import (
            estimate_multipole_pme_parameters,
            multipole_particle_mesh_ewald,
        )
    except Exception as exc:  # noqa: BLE001 -- any import failure is reported, not raised
        return None, f"nvalchemiops not importable: {type(exc).__name__}: {exc}"
    import inspect

    import vesin

    pos = torch.tensor(atoms.positions, dtype=dtype, requires_grad=True)
    cell = torch.tensor(atoms.cell.array, dtype=dtype)
    sigma = 1.0 if smearing is None else float(smearing)
    try:
        est_args = inspect.signature(estimate_multipole_pme_parameters).parameters
        kwargs = {k: v for k, v in dict(positions=pos.detach(), cell=cell, accuracy=accuracy, sigma=sigma).items()
                  if k in est_args}
        params = estimate_multipole_pme_parameters(**kwargs)
        cutoff = float(getattr(params, "real_space_cutoff", getattr(params, "cutoff", 0.0)))
        cutoff = float(cutoff.item()) if hasattr(cutoff, "item") else cutoff
        alpha = getattr(params, "alpha", None)
        alpha = float(alpha.item()) if hasattr(alpha, "item") else alpha
        mesh = getattr(params, "mesh_dimensions", None)
        mesh = tuple(int(m) for m in mesh) if mesh is not None else None
        nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
        i, j, s = nl.compute(points=atoms.positions, box=atoms.cell.array, periodic=True, quantities="ijS")
        order = np.argsort(i, kind="stable")
        i, j, s = i[order], j[order], s[order]
        ptr = np.zeros(len(atoms) + 1, dtype=np.int64)
        np.add.at(ptr, i.astype(np.int64) + 1, 1)
        ptr = torch.tensor(np.cumsum(ptr), dtype=torch.int32)
        idx_j = torch.tensor(j.astype(np.int64), dtype=torch.int32)
        shifts = torch.tensor(s.astype(np.int64), dtype=torch.int32)
        q, mu, th = random_multipoles(len(atoms), channels, dtype)
        # e3nn packing [q, mu_y, mu_z, mu_x, five l = 2 components]: values are random, so the
        # quadrupole components are taken from Θ without a basis change (timing only)
        quad5 = torch.stack([th[..., 0, 1], th[..., 1, 2], th[..., 2, 2], th[..., 0, 2],
                             th[..., 0, 0] - th[..., 1, 1]], -1)
        packed = torch.cat([q[..., None], mu[..., [1, 2, 0]], quad5], -1)  # [N, C, 9]
    except Exception as exc:  # noqa: BLE001
        return None, f"nvalchemiops setup failed: {type(exc).__name__}: {exc}"

    def call():
        e = 0.0
        for c in range(channels):
            e = e + multipole_particle_mesh_ewald(pos, packed[:, c].contiguous(), cell, idx_j, ptr, shifts,
                                                  sigma=sigma, alpha=alpha, mesh_dimensions=mesh,
                                                  accuracy=accuracy).sum()
        torch.autograd.grad(e, [pos])

    try:
        call()
    except Exception as exc:  # noqa: BLE001
        return None, f"nvalchemiops call failed: {type(exc).__name__}: {exc}"
    return call, {"alpha": alpha, "real_cutoff": cutoff, "mesh": mesh}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4,6,8,10,12,14", help="water boxes of m^3 molecules (3 m^3 atoms)")
    p.add_argument("--ewald-max", type=int, default=3000, help="largest N timed with Ewald")
    p.add_argument("--dtype", default="float64,float32")
    p.add_argument("--smearing", default="1.0")
    p.add_argument("--accuracy", type=float, default=1e-6)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-nvalchemi", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (falls back to CPU with a message)")
    p.add_argument("--out", default=str(HERE / "results" / "pme_cost"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.device = str(device)
    sync = sync_fn(device)
    smearing = None if args.smearing.lower() == "none" else float(args.smearing)
    from cartlorem.ewald import pme
    from cartlorem.ewald.kernels import Layout

    rows, nval_note = [], None
    for m in [int(s) for s in args.sizes.split(",")]:
        atoms = water_box(m)
        n = len(atoms)
        cell = atoms.cell.array
        for dt in args.dtype.split(","):
            dtype = getattr(torch, dt)
            layout = Layout((0, 1, 2))
            params = pme.choose_parameters(cell, n, args.accuracy, 4, smearing, n_channels=args.channels)
            auto = pme.choose_method(cell, n, args.accuracy, layout, layout, args.channels, smearing)
            fns = {"pme": cartlorem_call(atoms, dtype, "pme", smearing, args.accuracy, args.channels, device)}
            peak_mb = None
            if device.type == "cuda":  # one PME call's peak above what its inputs already hold
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                reset_peak_memory(device)
                try:
                    fns["pme"]()
                except torch.cuda.OutOfMemoryError:
                    del fns
                    torch.cuda.empty_cache()
                    row = {"N": n, "dtype": dt, "device": args.device, "note": "out of GPU memory"}
                    rows.append(row)
                    print(row, flush=True)
                    continue
                torch.cuda.synchronize(device)
                peak_mb = round((peak_memory_bytes(device) - before) / 2**20, 1)
            if n <= args.ewald_max:
                fns["ewald"] = cartlorem_call(atoms, dtype, "ewald", smearing, args.accuracy, args.channels, device)
            if not args.no_nvalchemi:
                call, info = nvalchemi_call(atoms, dtype, smearing, args.accuracy, args.channels)
                if call is None:
                    nval_note = info
                else:
                    fns["nvalchemiops"] = call
                    nval_note = "measured"
            t = time_fns(fns, warmup=1, repeats=args.repeats, sync=sync)
            row = {"N": n, "dtype": dt, "alpha": round(params.alpha, 4), "real_cutoff": round(params.real_cutoff, 3),
                   "mesh": "x".join(map(str, params.mesh)), "spline_order": params.spline_order, "auto": auto,
                   "pme_s": round(t["pme"]["median"], 4), "pme_cpu_s": round(t["pme"]["cpu_median"], 4),
                   "ewald_s": round(t["ewald"]["median"], 4) if "ewald" in t else None,
                   "ewald_cpu_s": round(t["ewald"]["cpu_median"], 4) if "ewald" in t else None,
                   "nvalchemiops_s": round(t["nvalchemiops"]["median"], 4) if "nvalchemiops" in t else None,
                   "device": args.device, "pme_peak_mb": peak_mb}
            rows.append(row)
            print(row, flush=True)
    slopes = []
    for dt in args.dtype.split(","):
        for key in ("pme_s", "pme_cpu_s", "ewald_s", "ewald_cpu_s", "nvalchemiops_s"):
            sel = [r for r in rows if r["dtype"] == dt and r.get(key) is not None and r["N"] >= 1000]
            if len(sel) >= 2:
                k = np.polyfit(np.log([r["N"] for r in sel]), np.log([r[key] for r in sel]), 1)[0]
                slopes.append(f"{key[:-2].replace('_', ' ')} {dt}: {k:.2f}")
    meta = machine_info(device)
    sm = "point multipoles" if smearing is None else f"Gaussian sources σ = {smearing} Å"
    md = [f"# Ewald against particle-mesh Ewald: fields + forces ({meta['date']}, commit "
          f"{(meta.get('git_commit') or '?')[:10]}{' (dirty tree)' if meta.get('git_dirty') else ''})", "",
          f"Machine: {meta['cpu_model']}, {args.threads} thread(s)"
          + (f", GPU {meta['gpu']} (CUDA {meta['cuda']}; synchronised before each clock read; PME peak: one call's "
             "peak GPU memory above its inputs)" if meta.get("gpu") else "") + f", load average {meta['loadavg_1min']} when "
          "the table was written (the machine was shared with other jobs: absolute times are pessimistic, "
          "the methods were interleaved so their ratios hold). Water boxes, "
          f"{args.channels} channels of random q, μ, Θ on every atom, {sm}, accuracy {args.accuracy:g}; "
          "`multipole_fields` (potential, field, gradient) + energy + forces, wall time, median of "
          f"{args.repeats} after a warm-up (process CPU time next to it: robust to the load). `auto`: the method "
          "`method=\"auto\"` picks. Code: `" + str(Path(pme.__file__).resolve().parent.parent.parent) + "`. "
          f"Command: `python benchmarks/pme_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
          markdown_table(rows, [("N", "N"), ("dtype", "dtype"), ("PME α (1/Å)", "alpha"), ("r_c (Å)", "real_cutoff"),
                                ("mesh", "mesh"), ("spline", "spline_order"), ("auto", "auto"),
                                ("PME s", "pme_s"), ("PME CPU s", "pme_cpu_s"), ("Ewald s", "ewald_s"),
                                ("Ewald CPU s", "ewald_cpu_s"), ("nvalchemiops s", "nvalchemiops_s")]
                                + ([("PME peak (MB)", "pme_peak_mb")] if device.type == "cuda" else [])
                                + ([("note", "note")] if any("note" in r for r in rows) else [])),
          "", "Fitted log–log slopes (N ≥ 1000): " + ("; ".join(slopes) or "too few sizes") + ".", "",
          f"nvalchemiops: {nval_note or 'not tried (--no-nvalchemi)'}."]
    write_results("pme_cost", rows, {**meta, **vars(args)}, "\n".join(md), out=args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
