"""Memory and time of a training step on batches with many edges: eager (chunked, the library's default on the CPU),
eager unchunked, and the compiled step unchunked (issue 12, item 2).

On the CPU the interaction layers run their messages in chunks above ``MIN_CHUNKS × EDGE_CHUNK_ELEMENTS / C`` edges
(MIN_CHUNKS was 16 when this was measured: 32768 at C = 64, 65536 at C = 32; 12 since session 34;
:mod:`cartlorem.nn.blocks`). The compiled training step cannot trace the chunked
path; until session 30 it left such batches to the eager step. This measured what its traced forward, unchunked,
costs in memory and gains in time on them; on the CPU it now takes them
(:meth:`cartlorem.training.compiled.CompiledLossGradient.unsupported`).

What is measured: cartlorem short-range at speed.py's settings (C channels, two layers, correlation 3, lmax 2,
radial MLP 3 × 64), float32, CPU, one thread, one training step on one periodic structure with energy and force
labels (random, fixed seed): energy + forces with ``create_graph``, the loss (:func:`weighted_loss`, energy 10,
forces 1) and its gradient in the parameters (the double backward), AMSGrad and clipping, as
benchmarks/train_step.py's ``step_fn`` / ``compiled_step_fn`` do. Structures: diamond, n³ conventional cells
(8 n³ atoms, 5 Å cutoff, 89 edges per atom).

Modes: ``eager`` (library default: chunked above the threshold), ``eager-unchunked`` (every layer's
``edge_chunk = 0``), ``compiled`` (``edge_chunk = 0`` and the compiled step; the first call compiles).

Each (mode, size) point runs in a fresh process. Time: after one warm-up step (the compiled step's first call
compiles), the process-CPU median of ``--repeats`` steps (each mode in its own process, one after the other: the load
average is stamped). Peak memory: then glibc's mmap threshold is fixed at 128 KiB (freed tensors go back to the
kernel), one step runs, the heap is trimmed, the resident size (VmRSS) is read, the peak (VmHWM) reset through
/proc/self/clear_refs, one more step runs, and the peak minus the resident size before it is the step's memory.

    PYTHONPATH=$PWD python3 benchmarks/compiled_memory.py --sizes 3,4,5 --channels 64
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODES = ("eager", "eager-unchunked", "compiled")
#: predicted peak of an unchunked eager step, MB per atom of diamond at C = 64, scaled by C / 64, to skip points that
#: cannot fit (measured at 64 atoms: 1.3 KiB per edge and channel, 7.2 MB per atom; the compiled step's check against
#: the eager gradient runs one)
UNCHUNKED_MB_PER_ATOM_C64 = 8.0


#: mallopt parameter of glibc's mmap threshold (malloc.h)
M_MMAP_THRESHOLD = -3


def _status(key: str) -> float:
    from harness import proc_kib_field

    return proc_kib_field("/proc/self/status", key) / 2**20  # bytes → MiB


def _batch(size: int):
    import numpy as np
    import torch

    from cartlorem.graph import atoms_to_graph
    from harness import make_structure

    atoms = make_structure("diamond", size)
    graph = atoms_to_graph(atoms, 5.0, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    n = graph.positions.shape[0]
    import dataclasses

    graph = dataclasses.replace(
        graph, energy=torch.randn(1, generator=g) * n, forces=torch.randn(n, 3, generator=g),
        has_energy=torch.ones(1, dtype=torch.bool), has_forces=torch.ones(n, dtype=torch.bool))
    return atoms, graph, np


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    from harness import build_matched_cartlorem
    from train_step import compiled_step_fn, step_fn

    atoms, graph, _ = _batch(int(spec["size"]))
    torch.manual_seed(0)
    n_edges = int(graph.edge_index.shape[1])
    model = build_matched_cartlorem(sorted(set(int(z) for z in atoms.numbers)), int(spec["channels"]), 5.0,
                                    avg_num_neighbors=n_edges / len(atoms))
    mode = spec["mode"]
    chunk_rule = bool(model.layers[0].chunks(n_edges, torch.device("cpu")))
    if mode != "eager":
        for layer in model.layers:
            layer.edge_chunk = 0
    t0 = time.perf_counter()
    if mode == "compiled":
        step, compile_s, diff = compiled_step_fn(model, [graph], torch.float32)
    else:
        step, compile_s, diff = step_fn(model, [graph], torch.float32), None, None
        step()  # warm-up
    first_s = time.perf_counter() - t0
    cpu = []
    for _ in range(int(spec["repeats"])):
        c0 = time.process_time()
        step()
        cpu.append(time.process_time() - c0)
    # the memory of one more step: glibc's mmap threshold fixed at 128 KiB (by default it grows to 32 MB as large
    # blocks are freed, which then stay in the heap), so that every tensor above it is mapped when allocated and
    # unmapped when freed; the heap's free memory trimmed, the resident size then holds no freed memory that the step
    # could reuse unseen, and the peak above it is what the step needs. Timed steps run before: mapping every tensor
    # costs page faults.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 17)
    step()
    libc.malloc_trim(0)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (Linux >= 4.0)
        f.write("5")
    step()
    peak = _status("VmHWM") - base
    return {"n_atoms": len(atoms), "n_edges": n_edges, "chunked_by_default": chunk_rule, "rss_before_mib": base,
            "peak_mib": round(peak, 1), "kib_per_edge_channel": round(peak * 1024 / (n_edges * spec["channels"]), 3),
            "step_cpu_s": statistics.median(cpu), "step_cpu_times_s": cpu, "first_s": round(first_s, 1),
            "compile_s": None if compile_s is None else round(compile_s, 1), "check_vs_eager": diff}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="3,4,5", help="diamond cells per edge (3: 216 atoms, 4: 512, 5: 1000)")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per point")
    p.add_argument("--out", help="output stem (default benchmarks/results/compiled_memory)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch
    from harness import machine_info, mem_available_bytes, markdown_table, run_json_worker, write_results

    torch.set_num_threads(args.threads)  # what the workers run with (and what machine_info reports)
    meta = machine_info()
    meta.update(channels=args.channels, threads=args.threads, dtype="float32", model="cartlorem short-range",
                command="PYTHONPATH=$PWD python3 benchmarks/compiled_memory.py " + " ".join(
                    argv if argv is not None else sys.argv[1:]))
    rows = []
    for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
        n = 8 * size**3
        for mode in args.modes:
            row = {"size": size, "mode": mode}
            predicted = UNCHUNKED_MB_PER_ATOM_C64 * args.channels / 64 * n * 2**20
            avail = mem_available_bytes() or 0
            if mode != "eager" and predicted > 0.5 * avail:
                row.update(n_atoms=n, status=f"skipped (predicted {predicted / 2**30:.1f} GiB > half of the "
                                             f"{avail / 2**30:.1f} GiB available)")
            else:
                spec = {"size": size, "mode": mode, "channels": args.channels, "threads": args.threads,
                        "repeats": args.repeats}
                env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.threads))
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
                row.update(run_json_worker(cmd, env, args.timeout))
            print(row, flush=True)
            rows.append(row)
    meta["loadavg_1min_end"] = os.getloadavg()[0]
    for row in rows:  # the compiled step's time against the eager default's at the same size
        ref = next((r for r in rows if r["size"] == row["size"] and r["mode"] == "eager" and "step_cpu_s" in r), None)
        if ref and "step_cpu_s" in row:
            row["cpu_vs_eager"] = round(row["step_cpu_s"] / ref["step_cpu_s"], 3)
        if "step_cpu_s" in row:
            row["step_cpu_s"] = round(row["step_cpu_s"], 3)
    columns = [("diamond n", "size"), ("atoms", "n_atoms"), ("edges", "n_edges"), ("mode", "mode"),
               ("chunked by default", "chunked_by_default"), ("status", "status"), ("step peak MiB", "peak_mib"),
               ("KiB per edge·channel", "kib_per_edge_channel"), ("step CPU s", "step_cpu_s"),
               ("÷ eager", "cpu_vs_eager"), ("compile s", "compile_s")]
    md = (f"# Training step memory and time with many edges: eager chunked, eager unchunked, compiled\n\n{meta}\n\n"
          + markdown_table(rows, columns) + "\n")
    print(write_results("compiled_memory", rows, meta, md, out=args.out))


if __name__ == "__main__":
    main()
