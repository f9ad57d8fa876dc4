"""Refit the cost models behind ``method="auto"`` (the COST_* constants of cartlorem/ewald/pme.py) and a slab's
vacuum gap (the COST_REPLICA_* constants of cartlorem/ewald/slab.py).

``auto`` picks Ewald or PME, and PME's splitting, mesh and spline order, from two cost models: seconds of one
call with gradients to the positions and the sources (one CPU thread, float64), a constant per term of
``pme.pme_cost_terms`` and ``pme.ewald_cost_terms`` (real-space pairs and pair entries, spline stencil points,
mesh points, k-vector terms; see their docstrings). This script times ``pme_sum`` over water boxes and a grid of
explicit settings (splitting alpha, hence the real-space pair count; mesh; spline order), and ``ewald_sum`` at
the parameters it chooses for a grid of accuracies, forward and backward to the positions and the sources (as
the long-range block takes them), in the source layouts of both long-range kinds (``--layouts``:
ranks:channels, "012:4" for q, mu, Theta in 4 channels as the ``multipole`` block sums them, "0:36" for the 36
charge channels of ``lorem``), point and Gaussian sources (``--smearings``). It fits each model's constants by
non-negative least squares on relative errors and reports the model/measured ratio of the constants in the code
and of the fitted ones. CPU times (process time), median of ``--repeats`` after a warm-up.

``--methods replica`` times the slab's replica correction (``slab.replica_sum``) on NaCl(100) slabs for a few
vacuum gaps, the layouts above, and fits ``slab.replica_cost_terms`` (``slab.choose_gap`` weighs it against the 3D
sum in the cell the gap elongates).

    python benchmarks/pme_cost_fit.py --methods pme       # results/pme_cost_fit.pme.{json,md}
    python benchmarks/pme_cost_fit.py --methods replica   # results/pme_cost_fit.replica.{json,md}
    python benchmarks/pme_cost_fit.py --methods pme --sizes 3,4 --repeats 1 --out /tmp/fit   # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import machine_info, time_fn  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_layout(text: str) -> tuple:
    """"012:4" -> ((0, 1, 2), 4): the source (and output) ranks and the channel count."""
    ranks, _, channels = text.partition(":")
    if not ranks or not set(ranks) <= set("012") or not channels.isdigit() or int(channels) < 1:
        raise argparse.ArgumentTypeError(f"a layout is ranks:channels, e.g. 012:4 or 0:36; got {text!r}")
    return tuple(sorted({int(r) for r in ranks})), int(channels)


def sources(n: int, ranks: tuple, channels: int, dtype):
    """Random packed sources [N, len(Layout(ranks)), C] and their Layout (the sums take any values)."""
    import torch

    from cartlorem.ewald.kernels import Layout

    layout = Layout(ranks)
    return torch.randn(n, len(layout), channels, dtype=dtype, generator=torch.Generator().manual_seed(0)), layout


def time_sum(atoms, v, repeats, fn):
    """CPU time of ``fn(positions, sources, cell)`` with gradients to the positions and the sources, as the long-range
    block takes them (float64)."""
    import torch

    pos0 = torch.tensor(atoms.positions, dtype=torch.float64)
    cell = torch.tensor(atoms.cell.array, dtype=torch.float64)

    def call():
        pos = pos0.clone().requires_grad_(True)
        src = v.clone().requires_grad_(True)
        (fn(pos, src, cell) * src).sum().backward()

    return time_fn(call, warmup=1, repeats=repeats)["cpu_median"]


def time_pme(atoms, layout, v, smearing, alpha, real_cutoff, mesh, order, repeats):
    from cartlorem.ewald import pme

    return time_sum(atoms, v, repeats, lambda pos, src, cell: pme.pme_sum(
        pos, src, cell, layout, layout, smearing=smearing, accuracy=0.5, alpha=alpha, mesh=mesh, spline_order=order,
        real_cutoff=real_cutoff))


def time_ewald(atoms, layout, v, smearing, accuracy, repeats):
    from cartlorem.ewald import ewald

    return time_sum(atoms, v, repeats, lambda pos, src, cell: ewald.ewald_sum(
        pos, src, cell, layout, layout, smearing=smearing, accuracy=accuracy))


def time_replica(atoms, layout, v, gap, accuracy, repeats):
    """The replica correction of a slab (``slab.replica_sum``) for the vacuum ``gap``."""
    from cartlorem.ewald import slab

    def replica(pos, src, cell):
        box = cell.clone()
        box[2] = cell[2] * (1.0 + gap / float(cell[2].norm()))
        return slab.replica_sum(pos, src, box, layout, layout, gap=gap, accuracy=accuracy)

    return time_sum(atoms, v, repeats, replica)


def fit(rows_out, names, current):
    """nnls on relative errors; the model/measured spread of the constants in the code and of the fit."""
    from scipy.optimize import nnls

    X = np.array([r["features"] for r in rows_out])
    y = np.array([r["cpu_s"] for r in rows_out])
    fitted, _ = nnls(X / y[:, None], np.ones_like(y))
    for r, x in zip(rows_out, X):
        r["model_current"] = float(x @ current)
        r["model_fitted"] = float(x @ fitted)

    def spread(c):
        q = X @ c / y
        return float(q.min()), float(np.median(q)), float(q.max())

    return {"current": dict(zip(names, current.tolist())), "fitted": dict(zip(names, fitted.tolist())),
            "ratio_current": spread(current), "ratio_fitted": spread(fitted)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="pme,ewald", help="comma-separated: pme, ewald, replica (the slab's replica "
                   "correction, slab.replica_sum)")
    p.add_argument("--layouts", default="012:4,0:36,0:4", help="comma-separated ranks:channels")
    p.add_argument("--smearings", default="none,1.0", help="Gaussian widths (Å) of the sources, none for points")
    p.add_argument("--sizes", default="4,5,6,8,10", help="water boxes of m^3 molecules, comma-separated m")
    p.add_argument("--cutoffs", default="5,8", help="PME real-space cutoffs (Å); alpha = 3.2 / r_c (at most the "
                   "smeared sources' 1/(sqrt(2) sigma); then also a point without real space)")
    p.add_argument("--orders", default="6,10", help="PME spline orders")
    p.add_argument("--spacings", default="0.9,0.5", help="PME mesh spacings (Å)")
    p.add_argument("--accuracies", default="1e-4,1e-5,1e-6", help="Ewald accuracies (its own parameters)")
    p.add_argument("--slab-sizes", default="4,6,8,11", help="replica: NaCl(100) slabs of r x r x 2 cubic cells "
                   "(16 r^2 atoms, 20 Å of vacuum; benchmarks/slab_scale.py), comma-separated r")
    p.add_argument("--gaps", default="6,10,16", help="replica: vacuum gaps (Å), at accuracy 1e-5")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="path stem of the .json and .md (default results/pme_cost_fit.<methods>, e.g. "
                   "results/pme_cost_fit.pme; results/pme_cost_fit.{json,md} are the PME-only fit of 27cda9d)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - {"pme", "ewald", "replica"}:
        p.error(f"--methods takes pme, ewald and/or replica, got {args.methods!r}")
    try:
        layouts = [parse_layout(x) for x in args.layouts.split(",")]
        smearings = [None if x.strip().lower() == "none" else float(x) for x in args.smearings.split(",")]
    except (argparse.ArgumentTypeError, ValueError) as err:
        p.error(f"--layouts / --smearings: {err}")
    if any(s is not None and not 0 < s < math.inf for s in smearings):
        p.error(f"--smearings takes positive widths (Å) or none, got {args.smearings!r}")
    out = args.out or os.path.join(RESULTS, "pme_cost_fit." + "_".join(methods))

    import torch

    torch.set_num_threads(1)
    from cartlorem.ewald import pme
    from cartlorem.ewald.pme import smearing_beta
    from scale import make_system

    rows = {m: [] for m in methods}
    if "replica" in methods:
        from cartlorem.ewald import slab
        from slab_scale import structure

        try:
            slab_sizes = [int(x) for x in args.slab_sizes.split(",")]
            gaps = [float(x) for x in args.gaps.split(",")]
        except ValueError as err:
            p.error(f"--slab-sizes / --gaps: {err}")
        if min(slab_sizes) < 1:
            p.error(f"--slab-sizes takes whole numbers >= 1 of cubic cells along a and b, got {args.slab_sizes!r}")
        if not all(slab.GAP_FLOOR <= g < math.inf for g in gaps):
            p.error(f"--gaps takes vacuum gaps of at least {slab.GAP_FLOOR:g} Å (slab.GAP_FLOOR; the replica "
                    f"correction is exact from there), got {args.gaps!r}")
        for r in slab_sizes:
            atoms = structure(r, 20.0, True)
            n = len(atoms)
            for ranks, channels in layouts:
                v, layout = sources(n, ranks, channels, torch.float64)
                order = 2 * max(ranks)
                for gap in gaps:
                    box = atoms.cell.array.copy()
                    box[2] *= 1.0 + gap / np.linalg.norm(box[2])
                    n_k = len(slab.plane_kvector_indices(box, slab.replica_k_cutoff(gap, 1e-5, order)))
                    t = time_replica(atoms, layout, v, gap, 1e-5, args.repeats)
                    rows["replica"].append({"N": n, "ranks": "".join(map(str, ranks)), "channels": channels,
                                            "gap": gap, "vectors": n_k, "cpu_s": t,
                                            "features": list(slab.replica_cost_terms(n, n_k, len(layout),
                                                                                     len(layout), channels))})
                    print(f"replica N={n} {''.join(map(str, ranks))}:{channels} gap={gap:g} vectors={n_k}: "
                          f"{t:.3f} s", flush=True)
    for m in [int(x) for x in args.sizes.split(",")] if set(methods) & {"pme", "ewald"} else []:
        atoms = make_system("water", m)
        n, volume = len(atoms), float(abs(np.linalg.det(atoms.cell.array)))
        lengths = np.linalg.norm(atoms.cell.array, axis=1)
        for ranks, channels in layouts:
            v, layout = sources(n, ranks, channels, torch.float64)
            nr = nc = len(layout)
            order_max = 2 * max(ranks)
            for smearing in smearings:
                beta = math.inf if smearing is None else smearing_beta(smearing)
                base = {"N": n, "ranks": "".join(map(str, ranks)), "channels": channels, "smearing": smearing}
                if "pme" in methods:
                    # alpha = 3.2 / r_c, or the sources' own (no real space) where that is below; r_c beyond half
                    # a small box: many images, not the model's pair count
                    settings = {(3.2 / rc, rc) if 3.2 / rc < beta else (beta, 0.0)
                                for rc in (float(x) for x in args.cutoffs.split(","))
                                if not (rc > 0.5 * float(min(lengths)) + 1e-9 and m < 6)}
                    if math.isfinite(beta):
                        settings.add((beta, 0.0))
                    for alpha, rc in sorted(settings):
                        real_space = alpha < beta
                        for order in [int(x) for x in args.orders.split(",")]:
                            if order < max(ranks) + 4:
                                continue
                            for h in [float(x) for x in args.spacings.split(",")]:
                                mesh = pme.mesh_for(atoms.cell.array, h, order)
                                try:  # the sum's own check (a mesh too coarse for these sources at any accuracy)
                                    pme.choose_parameters(atoms.cell.array, n, 0.5, order_max, smearing,
                                                          n_rows=nr, n_cols=nc, n_channels=channels, alpha=alpha,
                                                          mesh=mesh, spline_order=order,
                                                          real_cutoff=rc if real_space else None,
                                                          derivatives=max(ranks))
                                except ValueError as err:
                                    print(f"pme N={n} {base['ranks']}:{channels} smearing={smearing} rc={rc} "
                                          f"order={order} mesh={mesh}: skipped ({err})", flush=True)
                                    continue
                                t = time_pme(atoms, layout, v, smearing, alpha, rc if real_space else None, mesh,
                                             order, args.repeats)
                                rows["pme"].append({**base, "real_cutoff": rc if real_space else None,
                                                    "alpha": alpha, "mesh": list(mesh), "spline_order": order,
                                                    "cpu_s": t,
                                                    "features": list(pme.pme_cost_terms(
                                                        n, volume, rc, mesh, order, nr, nc, channels, real_space))})
                                print(f"pme N={n} {base['ranks']}:{channels} smearing={smearing} rc={rc} "
                                      f"order={order} mesh={mesh}: {t:.3f} s", flush=True)
                if "ewald" in methods:
                    for accuracy in [float(x) for x in args.accuracies.split(",")]:
                        t = time_ewald(atoms, layout, v, smearing, accuracy, args.repeats)
                        rows["ewald"].append({**base, "accuracy": accuracy, "cpu_s": t,
                                              "features": list(pme.ewald_cost_terms(
                                                  atoms.cell.array, n, accuracy, order_max, smearing, nr, nc,
                                                  channels))})
                        print(f"ewald N={n} {base['ranks']}:{channels} smearing={smearing} accuracy={accuracy:g}: "
                              f"{t:.3f} s", flush=True)

    from cartlorem.ewald import slab

    names = {"pme": pme.PME_COST_CONSTANTS, "ewald": pme.EWALD_COST_CONSTANTS, "replica": slab.REPLICA_COST_CONSTANTS}
    modules = {"pme": pme, "ewald": pme, "replica": slab}
    for method in methods:
        if len(rows[method]) < len(names[method]):  # nnls of an empty (or underdetermined) system: scipy aborts
            more = ("--slab-sizes, --gaps or --layouts" if method == "replica" else
                    "--sizes, --cutoffs, --orders, --spacings or --accuracies (PME points whose --cutoffs exceed half "
                    "the box are skipped below --sizes 6, and meshes too coarse for the sources)")
            p.error(f"{len(rows[method])} {method} point(s) measured, fewer than the {len(names[method])} constants "
                    f"to fit: give more {more}")
    meta = {**machine_info(),
            "command": "python benchmarks/pme_cost_fit.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    result = {"meta": meta}
    for method in methods:
        current = np.array([getattr(modules[method], name) for name in names[method]])
        result[method] = {"rows": rows[method], **fit(rows[method], names[method], current)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# Cost models of method=\"auto\", refit ({meta.get('date')}, commit {str(meta.get('git_commit'))[:10]}"
             f"{' (dirty tree)' if meta.get('git_dirty') else ''})", "",
             f"Command: `{meta['command']}`. Machine: {meta.get('cpu_model', '')}, 1 thread, load average "
             f"{meta.get('loadavg_1min')} at the start. Float64, forward + backward to the positions and sources, "
             f"layouts (ranks:channels) {args.layouts}"
             + (f"; water boxes, smearing {args.smearings}: `pme_sum` with explicit alpha = 3.2/r_c (or the smeared "
                "sources' own, without real space), mesh and spline order, `ewald_sum` at its own parameters"
                if set(methods) & {"pme", "ewald"} else "")
             + (f"; `slab.replica_sum` on NaCl slabs r = {args.slab_sizes} (16 r^2 atoms), gaps {args.gaps} Å, "
                "accuracy 1e-5" if "replica" in methods else "")
             + f"; process time, median of {args.repeats} after a warm-up.", ""]
    for method in methods:
        r = result[method]
        lines += [f"## {method}", "", "| constant | in the code | fitted |", "|---|---|---|"]
        lines += [f"| {k} | {r['current'][k]:.3g} | {r['fitted'][k]:.3g} |" for k in names[method]]
        lines += ["", "Model / measured over the points (min / median / max): constants in the code "
                  "{:.2f} / {:.2f} / {:.2f}; fitted {:.2f} / {:.2f} / {:.2f}.".format(*r["ratio_current"],
                                                                                     *r["ratio_fitted"]), ""]
        if method == "pme":
            lines += ["| N | layout | smearing | r_c Å | order | mesh | measured s | model (code) | model (fitted) |",
                      "|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {x['N']} | {x['ranks']}:{x['channels']} | {x['smearing']} | {x['real_cutoff']} | "
                      f"{x['spline_order']} | {'x'.join(map(str, x['mesh']))} | {x['cpu_s']:.3f} | "
                      f"{x['model_current']:.3f} | {x['model_fitted']:.3f} |" for x in r["rows"]]
        elif method == "replica":
            lines += ["| N | layout | gap Å | in-plane vectors | measured s | model (code) | model (fitted) |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {x['N']} | {x['ranks']}:{x['channels']} | {x['gap']:g} | {x['vectors']} | "
                      f"{x['cpu_s']:.3f} | {x['model_current']:.3f} | {x['model_fitted']:.3f} |" for x in r["rows"]]
        else:
            lines += ["| N | layout | smearing | accuracy | measured s | model (code) | model (fitted) |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {x['N']} | {x['ranks']}:{x['channels']} | {x['smearing']} | {x['accuracy']:g} | "
                      f"{x['cpu_s']:.3f} | {x['model_current']:.3f} | {x['model_fitted']:.3f} |" for x in r["rows"]]
        lines.append("")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[:40]))


if __name__ == "__main__":
    main()
