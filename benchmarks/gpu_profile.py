"""Where an energy + forces call goes on a GPU: edge-chunk sizes A/B and a torch.profiler table.

speed.py --device cuda times cartlorem against MACE; this script says why a point is as fast as it is. For one
structure (speed.py's diamond or water boxes, its matched model settings, float32, eval mode, no stress) it
times the call with the message kernel's edge chunks as the library sets them on CUDA (``default``), with
chunking off (``0``: every edge at once, the most memory) and with chunks ``k``× larger (``x4``, ...), each with
its peak GPU memory above the memory allocated before the call, then profiles one call of the default
(CPU and CUDA activities): the top operators by GPU time and by host time.

    PYTHONPATH=$PWD python3 benchmarks/gpu_profile.py --system diamond --size 13 --model short --chunks default,0,x4
    PYTHONPATH=$PWD python3 benchmarks/gpu_profile.py --system diamond --size 5 --model multipole --chunks default

Falls back to the CPU without CUDA (then memory and GPU columns are empty); writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (build_matched_cartlorem, machine_info, make_structure, markdown_table, peak_memory_bytes,  # noqa: E402
                     reset_peak_memory, resolve_device, sync_fn, time_fn, write_results)


def build(system, size, model_name, channels, cutoff, device, dtype):
    from cartlorem.graph import atoms_to_graph

    atoms = make_structure(system, size)
    species = sorted(set(int(z) for z in atoms.numbers))
    graph = atoms_to_graph(atoms, cutoff, dtype=dtype).to(device=device)
    n_edges = int(graph.edge_index.shape[1])
    torch.manual_seed(0)
    lr = {"short": None}.get(model_name, model_name)
    model = build_matched_cartlorem(species, channels, cutoff, lr, avg_num_neighbors=n_edges / len(atoms))
    return model.to(device=device, dtype=dtype).eval(), graph, len(atoms), n_edges


def set_chunks(model, setting):
    """'default': the library's choice; '0': no chunking; 'xK': K times the default chunk."""
    for layer in model.layers:
        layer.edge_chunk = None
    if setting == "default":
        return None
    if setting == "0":
        chunk = 0
    elif setting.startswith("x"):
        chunk = int(setting[1:]) * model.layers[0].chunk_edges(next(model.parameters()).device)
    else:
        raise SystemExit(f"--chunks: unknown setting {setting!r} (default, 0, xK)")
    for layer in model.layers:
        layer.edge_chunk = chunk
    return chunk


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", default="diamond", choices=["diamond", "water"])
    p.add_argument("--size", type=int, default=13, help="cells (diamond) or molecules (water) per edge")
    p.add_argument("--model", default="short", choices=["short", "multipole", "lorem"])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--chunks", default="default,0,x4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=str(HERE / "results" / "gpu_profile"))
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    sync = sync_fn(device)
    model, graph, n_atoms, n_edges = build(args.system, args.size, args.model, args.channels, args.cutoff, device,
                                           torch.float32)

    def call():
        out = model(graph, compute_forces=True, compute_stress=False, create_graph=False)
        return out["energy"], out["forces"]

    rows, first = [], None
    for setting in args.chunks.split(","):
        chunk = set_chunks(model, setting)
        row = {"chunks": setting, "edges_per_chunk": chunk if chunk is not None else
               model.layers[0].chunk_edges(device), "n_atoms": n_atoms, "n_edges": n_edges}
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                reset_peak_memory(device)
            t0 = time.perf_counter()
            energy, forces = call()
            if sync is not None:
                sync()
            row["first_call_s"] = round(time.perf_counter() - t0, 4)
            if first is None:  # the same numbers whatever the chunks (to float32 rounding)
                first = (energy.detach().clone(), forces.detach().clone())
            row["max_dF_vs_first"] = float((forces - first[1]).abs().max())
            row["dE_vs_first"] = float((energy - first[0]).abs().max())
            del energy, forces
            if device.type == "cuda":
                row["peak_mb"] = round((peak_memory_bytes(device) - before) / 2**20, 1)
            t = time_fn(call, warmup=1, repeats=args.repeats, sync=sync)
            row.update(median_ms=round(t["median"] * 1e3, 2), iqr_ms=round(t["iqr"] * 1e3, 2),
                       cpu_ms=round(t["cpu_median"] * 1e3, 2))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            row["note"] = "out of GPU memory"
        rows.append(row)
        print(json.dumps(row), flush=True)

    set_chunks(model, "default")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    call()
    with profile(activities=activities) as prof:
        call()
        if sync is not None:
            sync()
    events = prof.key_averages()

    def dev_time(e):
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))

    total_dev = sum(dev_time(e) for e in events) or 1.0
    total_cpu = sum(e.self_cpu_time_total for e in events) or 1.0
    by_dev = [{"op": e.key[:80], "gpu_ms": round(dev_time(e) / 1e3, 3), "gpu_share": round(dev_time(e) / total_dev, 3),
               "calls": e.count} for e in sorted(events, key=dev_time, reverse=True)[:args.top] if dev_time(e) > 0]
    by_cpu = [{"op": e.key[:80], "cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
               "cpu_share": round(e.self_cpu_time_total / total_cpu, 3), "calls": e.count}
              for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]]
    meta = machine_info(device)
    meta.update(vars(args), gpu_total_ms=round(total_dev / 1e3, 2), cpu_total_ms=round(total_cpu / 1e3, 2),
                kernel_launches=sum(e.count for e in events if dev_time(e) > 0 and not e.key.startswith("aten::")),
                top_gpu=by_dev, top_cpu=by_cpu)
    md = [f"# Energy + forces on {meta.get('gpu', 'the CPU')}: {args.model}, {args.system} N = {n_atoms} "
          f"({n_edges} edges), C = {args.channels}, float32", "",
          f"Commit {meta['git_commit']} (dirty: {meta['git_dirty']}), {meta['date']}, torch {meta['torch']}. "
          f"Command: `PYTHONPATH=$PWD python3 benchmarks/gpu_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
          "Edge chunks of the message kernel (wall time, median of the repeats after a warm-up; peak: GPU memory "
          "above what was allocated before the call):", "",
          markdown_table(rows, [("chunks", "chunks"), ("edges/chunk", "edges_per_chunk"), ("first call (s)", "first_call_s"),
                                ("median (ms)", "median_ms"), ("IQR (ms)", "iqr_ms"), ("host CPU (ms)", "cpu_ms"),
                                ("peak (MB)", "peak_mb"), ("max |ΔF| vs first (eV/Å)", "max_dF_vs_first"),
                                ("|ΔE| vs first (eV)", "dE_vs_first"), ("note", "note")]), "",
          f"One profiled call (default chunks): GPU time {meta['gpu_total_ms']} ms summed over the rows below (an "
          "operator's row and its kernels' rows count the same time twice), host time "
          f"{meta['cpu_total_ms']} ms in operators.", "", "Top operators and kernels by GPU time:", "",
          markdown_table(by_dev, [("op", "op"), ("GPU ms", "gpu_ms"), ("share", "gpu_share"), ("calls", "calls")]), "",
          "Top operators by host time:", "",
          markdown_table(by_cpu, [("op", "op"), ("CPU ms", "cpu_ms"), ("share", "cpu_share"), ("calls", "calls")])]
    write_results("gpu_profile", rows, meta, "\n".join(md), out=args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
