"""Memory of the local model: one energy + forces call with the edge messages chunked (recomputed in the
backward pass) against the unchunked path, and the time cost at 1000-atom diamond.

What is measured: cartlorem short-range (the local model: C = 64 channels, two layers, correlation 3,
lmax 2, radial MLP 3 × 64; benchmarks/speed.py's settings), float32, CPU, one thread, one energy +
forces call (eval mode, no stress, no graph kept) of a periodic structure whose graph is built
beforehand. Structures as in benchmarks/speed.py: diamond (n³ conventional cells, 8 n³ atoms, 5 Å
cutoff: 89 edges per atom) and water boxes (m³ molecules at 1 g/cm³, 3 m³ atoms).

Modes: ``chunked`` is the library's default (``cartlorem.nn.blocks.EDGE_CHUNK_ELEMENTS`` / C edges per
chunk); ``unchunked`` sets every layer's ``edge_chunk = 0``, which runs exactly the code of the unchunked message path
(the one main had before chunking, op for op); ``--baseline PATH`` adds ``baseline``: the same worker
with PYTHONPATH = PATH, another checkout (e.g. /work/main before the change).

Peak memory: every (mode, structure) point runs in a fresh subprocess. The model and graph are built,
the resident set size (VmRSS) is read, the peak (VmHWM) is reset through /proc/self/clear_refs, one call
runs, and the peak minus the resident size before it is the call's memory (what the allocator took from
the kernel for the call, including heap fragmentation; tracemalloc cannot see torch's allocations).
Unchunked points are skipped where their predicted memory (2.4 MB per atom) would not fit in half of
the available memory.

Time: the 1000-atom diamond (``--time-size``) in one process with the modes interleaved (repeat r runs
every mode once, order rotated), one warm-up call per mode, the median of ``--repeats`` process-CPU
times: A/B in the same run, robust to other load on the machine (its load average is stamped).

    python benchmarks/memory.py                       # all sizes (a few minutes on one core)
    python benchmarks/memory.py --quick               # 1000-atom diamond only, 3 repeats
    python benchmarks/memory.py --baseline /work/main # also the code of another checkout

Writes benchmarks/results/memory.json and .md (machine, load, git commit stamped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# the code under test: this checkout, or another one for the --baseline points
sys.path.insert(0, os.environ.get("MEMORY_BENCH_CODE", str(HERE.parent)))

TARGET_MB_PER_ATOM = 0.3  # issue 11: peak memory of energy + forces, C = 64, float32, 1000-10,000 atoms
TARGET_TIME_RATIO = 1.05  # issue 11: 1000-atom diamond energy + forces time within 5 % of the unchunked path
TARGET_TIME_ATOMS = 1000  # the timing point the time target is stated at (--time-size 5)
UNCHUNKED_MB_PER_ATOM = 2.4  # measured: to skip unchunked points that cannot fit
DEFAULT_SIZES = {"diamond": [5, 7, 9, 11], "water": [7, 10, 15]}  # 1000, 2744, 5832, 10648; 1029, 3000, 10125
ATOMS_PER = {"diamond": lambda n: 8 * n**3, "water": lambda m: 3 * m**3}


def _status(key: str) -> float:
    from _common import proc_kib_field

    return proc_kib_field("/proc/self/status", key) / 2**20


def _setup(spec: dict):
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    import cartlorem
    from cartlorem.graph import atoms_to_graph
    from speed import make_structure

    atoms = make_structure(spec["system"], int(spec["size"]))
    graph = atoms_to_graph(atoms, 5.0, dtype=torch.float32)
    torch.manual_seed(0)
    n_edges = int(graph.edge_index.shape[1])
    model = cartlorem.CartLorem(sorted(set(int(z) for z in atoms.numbers)), cutoff=5.0, long_range=None,
                                channels=int(spec["channels"]), num_layers=2, correlation=3, lmax=2, num_basis=8,
                                radial_hidden=64, readout_hidden=16, avg_num_neighbors=n_edges / len(atoms)).eval()

    def call():
        out = model(graph, compute_forces=True, compute_stress=False, create_graph=False)
        return out["energy"], out["forces"]

    return atoms, graph, model, call


def _set_chunk(model, chunk) -> None:
    """chunk None: the library's default; 0: the unchunked path (another checkout: left as it is)."""
    for layer in model.layers:
        if hasattr(layer, "edge_chunk"):
            layer.edge_chunk = chunk


def worker_memory(spec: dict) -> dict:
    """One call's peak memory above the resident size before it (fresh process)."""
    atoms, graph, model, call = _setup(spec)
    _set_chunk(model, 0 if spec["mode"] == "unchunked" else None)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (Linux >= 4.0)
        f.write("5")
    c0, t0 = time.process_time(), time.perf_counter()
    energy, forces = call()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    peak = _status("VmHWM")
    import cartlorem
    import cartlorem.nn.blocks as blocks

    return {"code": str(Path(cartlorem.__file__).parent.parent), "n_atoms": len(atoms), "n_edges": int(graph.edge_index.shape[1]), "rss_before_mb": base,
            "peak_mb": peak - base, "mb_per_atom": (peak - base) / len(atoms), "first_call_cpu_s": cpu,
            "first_call_wall_s": wall, "energy": float(energy.detach().sum()),
            "edge_chunk": (model.layers[0].chunk_edges("cpu") if spec["mode"] == "chunked" else 0)
            if hasattr(model.layers[0], "chunk_edges") else None,
            "edge_chunk_elements": getattr(blocks, "EDGE_CHUNK_ELEMENTS", None)}


def worker_time(spec: dict) -> dict:
    """Interleaved CPU-time medians of the chunked and unchunked paths in one process, and how far
    their energies and forces differ (float32 rounding)."""
    import torch

    from _common import time_fns

    atoms, graph, model, call = _setup(spec)

    def run(chunk):
        def f():
            _set_chunk(model, chunk)
            return call()
        return f

    chunk = model.layers[0].chunk_edges("cpu")
    fns = {"chunked": run(None), "unchunked": run(0)}
    (e_c, f_c), (e_u, f_u) = fns["chunked"](), fns["unchunked"]()
    res = time_fns(fns, warmup=1, repeats=int(spec["repeats"]))
    return {"n_atoms": len(atoms), "n_edges": int(graph.edge_index.shape[1]),
            "edge_chunk": chunk,
            "threads": torch.get_num_threads(),
            **{f"{k}_cpu_s": v["cpu_median"] for k, v in res.items()},
            **{f"{k}_wall_s": v["median"] for k, v in res.items()},
            **{f"{k}_times_s": v["times"] for k, v in res.items()},
            "energy_rel_diff": float((e_c - e_u).abs().max() / e_u.abs().max()),
            "force_max_abs_diff": float((f_c - f_u).abs().max()), "force_max_abs": float(f_u.abs().max())}


def run_worker(kind: str, spec: dict, timeout: float, pythonpath: str | None = None) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(spec.get("threads", 1)))
    if pythonpath:
        env["MEMORY_BENCH_CODE"] = pythonpath
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker-{kind}", json.dumps(spec)]
    from harness import run_json_worker

    return run_json_worker(cmd, env, timeout)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", help='e.g. "diamond:5,7,9,11;water:7,10,15" (cells / molecules per edge)')
    p.add_argument("--quick", action="store_true", help="1000-atom diamond only, 3 repeats")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per mode at --time-size")
    p.add_argument("--time-size", type=int, default=5, help="diamond cells per edge of the timing point (5: 1000 atoms)")
    p.add_argument("--baseline", help="another checkout to run the memory points with (PYTHONPATH), e.g. /work/main")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per point")
    p.add_argument("--out", help="output stem (default benchmarks/results/memory)")
    p.add_argument("--worker-memory", help=argparse.SUPPRESS)
    p.add_argument("--worker-time", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_memory:
        print(json.dumps(worker_memory(json.loads(args.worker_memory))))
        return
    if args.worker_time:
        print(json.dumps(worker_time(json.loads(args.worker_time))))
        return

    import torch

    torch.set_num_threads(args.threads)
    from _common import command_line, machine_info, mem_available_bytes, write_results

    sizes = {"diamond": [5]} if args.quick else dict(DEFAULT_SIZES)
    if args.sizes:
        sizes = {}
        for part in args.sizes.split(";"):
            name, _, vals = part.partition(":")
            if name.strip() not in ATOMS_PER:
                raise SystemExit(f"--sizes: unknown system {name!r} (diamond or water)")
            sizes[name.strip()] = [int(v) for v in vals.split(",") if v.strip()]
    repeats = 3 if args.quick else args.repeats
    meta = machine_info()
    meta.update(command=command_line("memory.py", argv), channels=args.channels, threads=args.threads,
                dtype="float32", model="cartlorem short-range", sizes=sizes, time_size=args.time_size,
                time_atoms=ATOMS_PER["diamond"](args.time_size), repeats=repeats, quick=args.quick,
                timeout_s=args.timeout, baseline=args.baseline,
                shared_machine_note="machine shared with other jobs: see loadavg_1min")
    common = {"channels": args.channels, "threads": args.threads}
    rows = []
    modes = ["chunked", "unchunked"] + (["baseline"] if args.baseline else [])
    for system, vals in sizes.items():
        for size in vals:
            n = ATOMS_PER[system](size)
            for mode in modes:
                avail = mem_available_bytes() or 0
                if mode != "chunked" and UNCHUNKED_MB_PER_ATOM * n * 2**20 > 0.5 * avail:
                    rows.append({"system": system, "size": size, "n_atoms": n, "mode": mode,
                                 "status": f"skipped (predicted {UNCHUNKED_MB_PER_ATOM * n / 1024:.1f} GiB > half "
                                           f"of the {avail / 2**30:.1f} GiB available)"})
                    continue
                spec = {**common, "system": system, "size": size, "mode": "unchunked" if mode == "unchunked" else "chunked"}
                t0 = time.time()
                r = run_worker("memory", spec, args.timeout, args.baseline if mode == "baseline" else None)
                row = {"system": system, "size": size, "mode": mode, **r, "point_wall_s": time.time() - t0,
                       "loadavg_1min": round(os.getloadavg()[0], 2)}
                row.setdefault("n_atoms", n)
                rows.append(row)
                print(f"# {system} N={n} {mode}: {r.get('status')} "
                      f"{r.get('mb_per_atom', float('nan')):.3f} MB/atom, first call {r.get('first_call_cpu_s', float('nan')):.1f} s CPU",
                      flush=True)
    t_spec = {**common, "system": "diamond", "size": args.time_size, "repeats": repeats}
    timing = run_worker("time", t_spec, args.timeout * 3)
    timing["loadavg_1min"] = round(os.getloadavg()[0], 2)
    if timing.get("status") == "ok":
        timing["ratio_cpu"] = timing["chunked_cpu_s"] / timing["unchunked_cpu_s"]
        print(f"# time diamond N={timing['n_atoms']}: chunked {timing['chunked_cpu_s']:.2f} s, "
              f"unchunked {timing['unchunked_cpu_s']:.2f} s CPU (x{timing['ratio_cpu']:.3f})", flush=True)
    summary = summarise(rows, timing)
    meta["summary"] = summary
    write_results("memory", rows + [{"mode": "time", **timing}], meta, markdown(rows, timing, meta, summary), out=args.out)


def summarise(rows, timing) -> dict:
    ok = [r for r in rows if r.get("status") == "ok" and r["mode"] == "chunked" and 1000 <= r["n_atoms"] <= 11000]
    worst = max((r["mb_per_atom"] for r in ok), default=None)
    ratio = timing.get("ratio_cpu")
    at_target = ratio is not None and timing.get("n_atoms") == TARGET_TIME_ATOMS  # another --time-size: not measured
    return {"max_chunked_mb_per_atom_1000_to_10000": worst,
            "memory_target_met": None if worst is None else bool(worst <= TARGET_MB_PER_ATOM),
            "time_ratio_chunked_over_unchunked": ratio,
            "time_target_met": bool(ratio <= TARGET_TIME_RATIO) if at_target else None}


def _f(x, spec):
    return "—" if x is None else format(x, spec)


def _verdict(met) -> str:
    """A target's verdict: met, missed, or not measured (None: no point of the run answers it)."""
    return "not measured" if met is None else "met" if met else "missed"


def markdown(rows, timing, meta, summary) -> str:
    time_n = meta["time_atoms"]
    lines = ["# Memory of the local model: chunked edge messages", "",
             f"{meta['date']}, commit {meta['git_commit']}{' (dirty)' if meta.get('git_dirty') else ''}, "
             f"{meta['cpu_model']}, {meta['cpu_count']} cores, {meta['mem_total_gib']} GiB, torch {meta['torch']}, "
             f"{meta['threads']} thread(s), load average at start {meta['loadavg_1min']} "
             "(the machine was shared with other jobs; CPU times, not wall times, are compared).", "",
             f"cartlorem short-range, C = {meta['channels']}, float32, CPU, one energy + forces call; sizes "
             + "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in meta["sizes"].items())
             + f", timing point {time_n}-atom diamond (--time-size {meta['time_size']}), {meta['repeats']} repeat(s). "
             f"Command: `{meta['command']}`.", "",
             "## Targets", "",
             f"- peak memory <= {TARGET_MB_PER_ATOM} MB per atom, 1000-10,000-atom diamond and water: "
             f"**{_verdict(summary['memory_target_met'])}** (worst "
             f"{_f(summary['max_chunked_mb_per_atom_1000_to_10000'], '.3f')} MB/atom)",
             f"- 1000-atom diamond time within 5% of the unchunked path: "
             f"**{_verdict(summary['time_target_met'])}** (chunked / unchunked CPU time "
             f"{_f(summary['time_ratio_chunked_over_unchunked'], '.3f')} at {time_n} atoms)", "",
             "## Peak memory of one energy + forces call (fresh process per point)", "",
             "| system | atoms | edges | mode | peak MB | MB / atom | first call CPU s | load | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['n_atoms']} | {r.get('n_edges', '—')} | {r['mode']} | "
                     f"{_f(r.get('peak_mb'), '.0f')} | {_f(r.get('mb_per_atom'), '.3f')} | "
                     f"{_f(r.get('first_call_cpu_s'), '.1f')} | {r.get('loadavg_1min', '—')} | {r['status']} |")
    lines += ["", f"## Time, {time_n}-atom diamond (modes interleaved in one process, CPU-time medians)", ""]
    if timing.get("status") == "ok":
        lines += ["| mode | CPU s (median) | wall s (median) | wall s of each repeat |", "|---|---|---|---|"]
        for k in ("chunked", "unchunked"):
            lines.append(f"| {k} | {timing[f'{k}_cpu_s']:.3f} | {timing[f'{k}_wall_s']:.3f} | "
                         f"{', '.join(format(t, '.2f') for t in timing[f'{k}_times_s'])} |")
        lines += ["", f"Ratio chunked / unchunked (CPU): {timing['ratio_cpu']:.3f}; edges per chunk "
                      f"{timing['edge_chunk']}; load average after {timing['loadavg_1min']}. Agreement (float32): "
                      f"energy relative difference {timing['energy_rel_diff']:.1e}, largest force difference "
                      f"{timing['force_max_abs_diff']:.1e} eV/Å (largest force {timing['force_max_abs']:.1e} eV/Å, untrained model)."]
    else:
        lines.append(f"timing point: {timing.get('status')}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
