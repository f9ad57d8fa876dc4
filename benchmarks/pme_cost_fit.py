"""Refit the PME cost model of ``method="auto"`` (the COST_* constants of cartlorem/ewald/pme.py).

``auto`` picks Ewald or PME, and PME's splitting, mesh and spline order, from a cost model: seconds of
one call with gradients to the positions (one CPU thread, float64) =
``COST_PME_CALL + COST_PAIR x pairs x rows x cols x C + COST_STENCIL x N x n^3 x (rows + cols) x C
+ COST_MESH x K1 K2 K3 x log2(K1 K2 K3) x C``. This script times ``pme_sum`` (forward + backward to the
positions) over water boxes and a grid of explicit settings (splitting alpha, hence the real-space pair
count; mesh; spline order), point multipoles q, mu, Theta in C = 4 channels, fits the four constants by
non-negative least squares on relative errors, and reports the model/measured ratio of the constants in
the code and of the fitted ones. CPU times (process time), median of ``--repeats`` after a warm-up.

    python benchmarks/pme_cost_fit.py                     # results/pme_cost_fit.{json,md}
    python benchmarks/pme_cost_fit.py --sizes 3,4 --repeats 1 --out /tmp/fit   # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import machine_info  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def features(n_atoms, volume, real_cutoff, mesh, order, n_rows, n_cols, n_channels):
    """The four terms of the cost model (the same counts as ``pme.pme_cost``), without their constants."""
    pairs = 0.5 * n_atoms * n_atoms / volume * 4.0 / 3.0 * math.pi * real_cutoff**3
    n_mesh = float(math.prod(mesh))
    return [1.0, pairs * n_rows * n_cols * n_channels, n_atoms * order**3 * (n_rows + n_cols) * n_channels,
            n_mesh * max(1.0, math.log2(n_mesh)) * n_channels]


def time_point(atoms, alpha, real_cutoff, mesh, order, repeats, channels):
    import torch

    from cartlorem.ewald import pme
    from cartlorem.ewald.kernels import Layout

    rows = cols = Layout((0, 1, 2))
    pos0 = torch.tensor(atoms.positions, dtype=torch.float64)
    cell = torch.tensor(atoms.cell.array, dtype=torch.float64)
    v = torch.randn(len(atoms), len(cols), channels, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def call():
        pos = pos0.clone().requires_grad_(True)
        out = pme.pme_sum(pos, v, cell, rows, cols, smearing=None, accuracy=0.5, alpha=alpha, mesh=mesh,
                          spline_order=order, real_cutoff=real_cutoff)
        (out * v).sum().backward()

    call()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        call()
        times.append(time.process_time() - t0)
    return float(np.median(times)), len(rows), len(cols)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="3,4,6,8,10", help="water boxes of m^3 molecules, comma-separated m")
    p.add_argument("--cutoffs", default="4,6,8", help="real-space cutoffs (Å); alpha = 3.2 / r_c")
    p.add_argument("--orders", default="6,8,10")
    p.add_argument("--spacings", default="0.9,0.5", help="mesh spacings (Å)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(RESULTS, "pme_cost_fit"))
    args = p.parse_args(argv)

    import torch
    from scipy.optimize import nnls

    torch.set_num_threads(1)
    from cartlorem.ewald import pme
    from scale import make_system

    rows_out = []
    for m in [int(x) for x in args.sizes.split(",")]:
        atoms = make_system("water", m)
        n, volume = len(atoms), float(abs(np.linalg.det(atoms.cell.array)))
        lengths = np.linalg.norm(atoms.cell.array, axis=1)
        for rc in [float(x) for x in args.cutoffs.split(",")]:
            if rc > 0.5 * float(min(lengths)) + 1e-9 and m < 6:
                continue  # many images: the pair count is no longer what the model counts
            for order in [int(x) for x in args.orders.split(",")]:
                for h in [float(x) for x in args.spacings.split(",")]:
                    mesh = pme.mesh_for(atoms.cell.array, h, order)
                    t, nr, nc = time_point(atoms, 3.2 / rc, rc, mesh, order, args.repeats, args.channels)
                    row = {"N": n, "real_cutoff": rc, "alpha": 3.2 / rc, "mesh": list(mesh), "spline_order": order,
                           "cpu_s": t, "features": features(n, volume, rc, mesh, order, nr, nc, args.channels)}
                    rows_out.append(row)
                    print(f"N={n} rc={rc} order={order} mesh={mesh}: {t:.3f} s", flush=True)

    names = ["COST_PME_CALL", "COST_PAIR", "COST_STENCIL", "COST_MESH"]
    if len(rows_out) < len(names):  # nnls of an empty (or underdetermined) system: scipy aborts on an empty one
        p.error(f"{len(rows_out)} point(s) measured, fewer than the {len(names)} constants to fit (points whose "
                "--cutoffs exceed half the box are skipped below --sizes 6): give more --sizes, --cutoffs, "
                "--orders or --spacings")
    X = np.array([r["features"] for r in rows_out])
    y = np.array([r["cpu_s"] for r in rows_out])
    fitted, _ = nnls(X / y[:, None], np.ones_like(y))  # relative least squares
    current = np.array([pme.COST_PME_CALL, pme.COST_PAIR, pme.COST_STENCIL, pme.COST_MESH])
    for r, x in zip(rows_out, X):
        r["model_current"] = float(x @ current)
        r["model_fitted"] = float(x @ fitted)

    def spread(c):
        q = X @ c / y
        return float(q.min()), float(np.median(q)), float(q.max())

    meta = {**machine_info(), "command": "python benchmarks/pme_cost_fit.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    result = {"meta": meta, "rows": rows_out, "current": dict(zip(names, current.tolist())),
              "fitted": dict(zip(names, fitted.tolist())), "ratio_current": spread(current),
              "ratio_fitted": spread(fitted)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# PME cost model refit ({meta.get('date')}, commit {str(meta.get('git_commit'))[:10]}"
             f"{' (dirty tree)' if meta.get('git_dirty') else ''})", "",
             f"Command: `{meta['command']}`. Machine: {meta.get('cpu_model', '')}, 1 thread, load average "
             f"{meta.get('loadavg_1min')} at the start. Water boxes, point q, mu, Theta in {args.channels} "
             "channels, float64, `pme_sum` forward + backward to the positions with explicit alpha = 3.2/r_c, "
             f"mesh and spline order; process time, median of {args.repeats} after a warm-up.", "",
             "| constant | in the code | fitted |", "|---|---|---|"]
    lines += [f"| {n} | {c:.3g} | {f:.3g} |" for n, c, f in zip(names, current, fitted)]
    lines += ["", "Model / measured over the points (min / median / max): constants in the code "
              "{:.2f} / {:.2f} / {:.2f}; fitted {:.2f} / {:.2f} / {:.2f}.".format(*spread(current), *spread(fitted)), "",
              "| N | r_c Å | order | mesh | measured s | model (code) | model (fitted) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['N']} | {r['real_cutoff']:g} | {r['spline_order']} | {'x'.join(map(str, r['mesh']))} | "
              f"{r['cpu_s']:.3f} | {r['model_current']:.3f} | {r['model_fitted']:.3f} |" for r in rows_out]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
