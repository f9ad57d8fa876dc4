"""Does ``method="auto"`` pick the faster periodic sum, for the sources of both long-range kinds?

The long-range block calls ``batched_multipole_fields`` with its learned sources: ``multipole`` with q, mu,
Theta in C_lr = 4 channels (potential, field and traceless gradient), ``lorem`` with 4 x (1 + 3 + 5) = 36
charge channels (potential only). This script makes exactly those calls on periodic water boxes (random sources,
1 Å Gaussians and accuracy 1e-5, the block's defaults), with ``method`` "ewald", "pme" and "auto", and an energy
and its gradient to the positions and sources (forces). It reports what ``auto`` picked and how far its time is
from the faster method's. Process CPU time, median of ``--repeats`` after a warm-up, the methods interleaved.

    PYTHONPATH=$PWD python3 benchmarks/auto_check.py                  # results/auto_check.{json,md}
    PYTHONPATH=$PWD python3 benchmarks/auto_check.py --layouts lorem --sizes 4,8 --repeats 1 --out /tmp/ac
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import command_line, machine_info, markdown_table, time_fns, water_box, write_results  # noqa: E402

LAYOUTS = {"multipole": ((0, 1, 2), 4), "lorem": ((0,), 36)}


def block_call(atoms, layout: str, method: str, dtype, smearing: float, accuracy: float):
    """One call of the block's field sum on ``atoms`` (one periodic structure), energy and forces."""
    from cartlorem.ewald import batched_multipole_fields
    from cartlorem.tensors.harmonics import stf

    ranks, channels = LAYOUTS[layout]
    n = len(atoms)
    gen = torch.Generator().manual_seed(0)
    pos0 = torch.tensor(atoms.positions, dtype=dtype)
    cell = torch.tensor(atoms.cell.array, dtype=dtype)[None]
    batch = torch.zeros(n, dtype=torch.long)
    pbc = torch.ones(1, 3, dtype=torch.bool)
    q0 = torch.randn(n, channels, generator=gen, dtype=dtype)
    mu0 = theta0 = None
    if layout == "multipole":
        mu0 = 0.3 * torch.randn(n, channels, 3, generator=gen, dtype=dtype)
        theta0 = 0.1 * stf(torch.randn(n, channels, 3, 3, generator=gen, dtype=dtype))

    def call():
        pos = pos0.clone().requires_grad_(True)
        q = q0.clone().requires_grad_(True)
        f = batched_multipole_fields(pos, batch, cell, pbc, charges=q, dipoles=mu0, quadrupoles=theta0,
                                     smearing=smearing, accuracy=accuracy, ranks=ranks, method=method,
                                     traceless_gradient=True)
        e = (q * f.potential).sum()
        if mu0 is not None:
            e = e - (mu0 * f.field).sum() - 0.5 * (theta0 * f.field_gradient).sum()
        e.backward()

    return call


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="multipole,lorem", help="comma-separated: multipole, lorem")
    p.add_argument("--sizes", default="3,4,5,6,8,10", help="water boxes of m^3 molecules (3 m^3 atoms)")
    p.add_argument("--lorem-sizes", default="4,6,8,10,12,14,16",
                   help="the sizes for the lorem layout (its crossover lies at larger N)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--smearing", type=float, default=1.0)
    p.add_argument("--accuracy", type=float, default=1e-5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "auto_check"))
    args = p.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts or set(layouts) - set(LAYOUTS):
        p.error(f"--layouts takes {', '.join(LAYOUTS)}, got {args.layouts!r}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    torch.set_num_threads(1)
    from cartlorem.ewald.kernels import Layout
    from cartlorem.ewald.pme import choose_method

    dtype = getattr(torch, args.dtype)
    rows = []
    for layout in layouts:
        ranks, channels = LAYOUTS[layout]
        for m in [int(x) for x in (args.lorem_sizes if layout == "lorem" else args.sizes).split(",")]:
            atoms = water_box(m)
            picked = choose_method(atoms.cell.array, len(atoms), args.accuracy, Layout(ranks), Layout(ranks), channels,
                                   args.smearing)
            fns = {method: block_call(atoms, layout, method, dtype, args.smearing, args.accuracy)
                   for method in ("ewald", "pme")}
            t = {k: v["cpu_median"] for k, v in time_fns(fns, warmup=1, repeats=args.repeats).items()}
            best = min(t, key=t.get)
            rows.append({"layout": layout, "N": len(atoms), "ewald_s": round(t["ewald"], 4),
                         "pme_s": round(t["pme"], 4), "auto": picked, "faster": best,
                         "auto_over_best": round(t[picked] / t[best], 2)})
            print(rows[-1], flush=True)
    meta = {**machine_info(), "command": command_line("auto_check.py", argv), "dtype": args.dtype,
            "smearing": args.smearing, "accuracy": args.accuracy, "repeats": args.repeats}
    table = markdown_table(rows, [("layout", "layout"), ("N", "N"), ("Ewald CPU s", "ewald_s"),
                                  ("PME CPU s", "pme_s"), ("auto picks", "auto"), ("faster", "faster"),
                                  ("auto ÷ faster", "auto_over_best")])
    md = (f"# Does method=\"auto\" pick the faster sum? ({meta['date']}, commit {str(meta.get('git_commit'))[:10]}"
          f"{' (dirty tree)' if meta.get('git_dirty') else ''})\n\nCommand: `{meta['command']}`. Machine: "
          f"{meta.get('cpu_model', '')}, one thread, load average {meta.get('loadavg_1min')} at the end. Water boxes; "
          "the long-range block's calls of `batched_multipole_fields` (multipole: q, mu, Theta in 4 channels; lorem: "
          f"36 charge channels), {args.dtype}, smearing {args.smearing} Å, accuracy {args.accuracy:g}; energy and "
          f"forces; process CPU time, median of {args.repeats} after a warm-up, the methods interleaved.\n\n"
          + table + "\n")
    write_results("auto_check", rows, meta, md, out=args.out)
    print(md)


if __name__ == "__main__":
    main()
