"""Energy + forces of an exported (TorchScript) long-range model on open water clusters: what an MD engine
(LAMMPS, i-PI, ASE with the exported model) pays per step without periodic boundaries, where the block's field
sum runs over every pair of the cluster (cartlorem.export: ``_open_fields``), beside the eager model's call
(``model(graph, compute_forces=True)``: the pair-list sum of cartlorem.ewald.direct) on the same cluster.

    PYTHONPATH=$PWD python3 benchmarks/export_cluster.py --sizes 4 6 --out benchmarks/results/export_cluster

Water clusters of m³ molecules (``harness.water_box`` without its cell: open boundaries), a C = 16 `multipole`
model with random weights (the cost does not depend on them), one thread, medians after warm-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def markdown(rows, meta) -> str:
    """The results table, with where and on what it ran."""
    return (f"# Exported `{meta['kind']}` model, energy + forces of open water clusters\n\n"
            f"Command: `{meta['command']}`\n\n"
            f"Commit {meta['git_commit']} (dirty: {meta['git_dirty']}), {meta['date']}, {meta['cpu_model']}, "
            f"torch {meta['torch']}, {meta['threads']} thread(s), {meta['dtype']}, C = {meta['channels']}.\n\n"
            + harness.markdown_table(rows, [("atoms", "atoms"), ("pairs", "pairs"), ("exported (ms)", "median_ms"),
                                            ("IQR (ms)", "iqr_ms"), ("eager model (ms)", "eager_ms"),
                                            ("exported ÷ eager", "ratio")]) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 6], help="clusters of m³ water molecules")
    p.add_argument("--kind", default="multipole", choices=["multipole", "lorem"])
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from cartlorem import CartLorem
    from cartlorem.export import export_model
    from cartlorem.graph import atoms_to_graph, collate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = CartLorem([1, 8], cutoff=5.0, long_range=args.kind, channels=args.channels).to(dtype).eval()
    exported = export_model(model)
    rows = []
    for m in args.sizes:
        atoms = harness.water_box(m)
        atoms.pbc, atoms.cell = False, None
        g = collate([atoms_to_graph(atoms, 5.0)]).to(dtype=dtype)
        inputs = (g.positions, g.species, g.cell, g.pbc, g.edge_index, g.edge_shift, g.batch, g.total_charge)
        stats = harness.time_fn(lambda: exported(*inputs), warmup=args.warmup, repeats=args.repeats)
        eager = harness.time_fn(lambda: model(g, compute_forces=True), warmup=args.warmup, repeats=args.repeats)
        rows.append({"atoms": len(atoms), "pairs": len(atoms) * (len(atoms) - 1),
                     "median_ms": round(1e3 * stats["median"], 2), "iqr_ms": round(1e3 * stats["iqr"], 2),
                     "eager_ms": round(1e3 * eager["median"], 2),
                     "ratio": round(stats["median"] / eager["median"], 2)})
        print(rows[-1], flush=True)
    meta = {**harness.machine_info(), "command": harness.command_line("export_cluster.py", argv), **vars(args)}
    print(harness.write_results("export_cluster", rows, meta, markdown(rows, meta), args.out))


if __name__ == "__main__":
    main()
