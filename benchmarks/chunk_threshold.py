"""Where chunking the edge messages starts to pay on the CPU: energy + forces time, chunked against unchunked.

``cartlorem.nn.blocks.MIN_CHUNKS`` sets how many chunks of ``EDGE_CHUNK_ELEMENTS / C`` edges a structure must
have before an interaction layer runs its messages in chunks on the CPU (below it, the unchunked path). This
script times one energy + forces call (eval mode, no stress, no graph kept; the local model of
benchmarks/speed.py: two layers, correlation 3, lmax 2, radial MLP 3 × 64) of periodic structures of growing size
in both modes: ``chunked`` (every layer's ``edge_chunk`` set to the default chunk, so it chunks above one chunk)
and ``unchunked`` (``edge_chunk = 0``). The modes run interleaved in one process (``harness.time_fns``: one
warm-up each, then ``--repeats`` rounds in rotated order), process-CPU medians, one thread; the structures and
graphs are built beforehand. The ratio chunked / unchunked against the number of chunks gives the crossover.

    PYTHONPATH=$PWD python3 benchmarks/chunk_threshold.py            # results/chunk_threshold.{json,md}

Structures as in speed.py: water boxes (m³ molecules at 1 g/cm³, 3 m³ atoms) and diamond (8 n³ atoms).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: cartlorem and benchmarks

from benchmarks.harness import (command_line, machine_info, make_structure, markdown_table, time_fns,  # noqa: E402
                                write_results)


def time_modes(system: str, size: int, channels: int, dtype: torch.dtype, repeats: int) -> dict:
    """One row: edges, chunks of the default size, CPU medians of both modes and their ratio, agreement."""
    import cartlorem
    from cartlorem.graph import atoms_to_graph
    from cartlorem.nn import blocks

    atoms = make_structure(system, size)
    graph = atoms_to_graph(atoms, 5.0, dtype=dtype)
    n_edges = int(graph.edge_index.shape[1])
    torch.manual_seed(0)
    model = cartlorem.CartLorem(sorted(set(int(z) for z in atoms.numbers)), cutoff=5.0, long_range=None,
                                channels=channels, num_layers=2, correlation=3, lmax=2, num_basis=8, radial_hidden=64,
                                readout_hidden=16, avg_num_neighbors=n_edges / len(atoms)).to(dtype).eval()
    chunk = blocks.EDGE_CHUNK_ELEMENTS // channels
    layers = [m for m in model.modules() if isinstance(m, blocks.Interaction)]
    results = {}

    def mode(edge_chunk):
        def call():
            for layer in layers:
                layer.edge_chunk = edge_chunk
            out = model(graph, compute_forces=True, compute_stress=False, create_graph=False)
            results[edge_chunk] = (float(out["energy"].detach()), out["forces"].detach())
        return call

    timing = time_fns({"chunked": mode(chunk), "unchunked": mode(0)}, warmup=1, repeats=repeats)
    (e_c, f_c), (e_u, f_u) = results[chunk], results[0]
    return {"system": system, "atoms": len(atoms), "C": channels, "dtype": str(dtype).replace("torch.", ""),
            "edges": n_edges, "chunk": chunk, "chunks": round(n_edges / chunk, 1),
            "chunked_cpu_s": round(timing["chunked"]["cpu_median"], 4),
            "unchunked_cpu_s": round(timing["unchunked"]["cpu_median"], 4),
            "ratio": round(timing["chunked"]["cpu_median"] / timing["unchunked"]["cpu_median"], 3),
            "max_force_diff": float((f_c - f_u).abs().max()), "energy_diff": abs(e_c - e_u)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="water:4,5,6,7;diamond:3,4", help="system:size,...;... (speed.py's sizes)")
    p.add_argument("--channels", default="32,64", help="C values, comma-separated")
    p.add_argument("--dtype", default="float32", help="float32 and/or float64, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "chunk_threshold"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from cartlorem.nn import blocks

    rows = []
    for part in args.sizes.split(";"):
        system, sizes = part.split(":")
        for size in (int(s) for s in sizes.split(",")):
            for c in (int(x) for x in args.channels.split(",")):
                for dt in args.dtype.split(","):
                    row = time_modes(system, size, c, getattr(torch, dt), args.repeats)
                    print(row, flush=True)
                    rows.append(row)
    rows.sort(key=lambda r: (r["C"], r["dtype"], r["chunks"]))
    meta = {**machine_info(), "command": command_line("chunk_threshold.py", argv), "repeats": args.repeats,
            "threads": 1, "min_chunks": blocks.MIN_CHUNKS, "edge_chunk_elements": blocks.EDGE_CHUNK_ELEMENTS}
    md = [f"# Chunked against unchunked edge messages on the CPU ({meta['date']}, commit "
          f"{(meta.get('git_commit') or '?')[:10]}{' (dirty)' if meta.get('git_dirty') else ''})", "",
          f"Machine: {meta['cpu_model']}, 1 thread, load average {meta['loadavg_1min']}. Energy + forces of the "
          f"local model (two layers, correlation 3, lmax 2), process-CPU medians of {args.repeats} interleaved "
          f"repeats after a warm-up; chunks of {blocks.EDGE_CHUNK_ELEMENTS} / C edges; the library chunks above "
          f"MIN_CHUNKS = {blocks.MIN_CHUNKS} chunks when this ran. `{meta['command']}`", "",
          markdown_table(rows, [("system", "system"), ("atoms", "atoms"), ("C", "C"), ("dtype", "dtype"),
                                ("edges", "edges"), ("chunks", "chunks"), ("chunked CPU s", "chunked_cpu_s"),
                                ("unchunked CPU s", "unchunked_cpu_s"), ("chunked / unchunked", "ratio"),
                                ("max |ΔF| (eV/Å)", "max_force_diff")]), ""]
    path = write_results("chunk_threshold", rows, meta, "\n".join(md), out=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
