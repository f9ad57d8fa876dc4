"""Inference speed and memory: cartlorem (short range, multipole) against MACE at matched settings.

What is timed: one energy + forces evaluation (the forward pass and the backward pass for −∂E/∂r, no
stress, eval mode, no graph kept) of a periodic structure whose neighbour list is already built. The
neighbour list (vesin, and the whole ``atoms_to_graph``) is timed separately and reported in its own
columns. Warm-up call first, then the median of ``--repeats`` calls (``time.perf_counter``; CUDA
synchronised before each clock read).

Memory: every (model, structure, dtype, device) point runs in a fresh subprocess. On CPU the peak
is the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs) during the first
call, minus the resident size just before it (model and inputs already built): the extra memory one
energy + forces call needs. On CUDA it is ``torch.cuda.max_memory_allocated`` minus the memory
allocated before the call.

Structures (periodic): diamond carbon, a = 3.567 Å, n×n×n conventional cells (8 n³ atoms), and water
boxes, m³ randomly oriented molecules on a cubic grid at 1.0 g/cm³ (3 m³ atoms).

Matched settings (5 Å cutoff, features up to rank / l = 2 with C channels each, correlation 3, two
interactions, edge harmonics up to l = 2, 8 Bessel functions with a p = 5 polynomial envelope, radial
MLP 3 × 64, readout MLP 16): cartlorem ``CartLorem(channels=C, num_layers=2, correlation=3, lmax=2,
num_basis=8, radial_hidden=64, readout_hidden=16)``, and MACE ``ScaleShiftMACE`` as ``mace_run_train``
builds it (``RealAgnosticInteractionBlock`` first, ``RealAgnosticResidualInteractionBlock`` after,
hidden_irreps "Cx0e+Cx1o+Cx2e", max_ell 2, MLP_irreps "16x0e", radial_MLP [64, 64, 64], gate silu,
use_reduced_cg False as in the mace command line). Both see the same graph (same edges).

MACE runs in benchmarks/.venv-peers (``bash benchmarks/setup_peers.sh``), because mace-torch pins
e3nn 0.4.4; without it the MACE rows say "not installed".

    python benchmarks/speed.py --quick                  # smoke test: smallest sizes, 1 repeat
    python benchmarks/speed.py                          # CPU float32, C = 64, all sizes in budget
    python benchmarks/speed.py --dtype float32,float64 --channels 64,128 --device cpu,cuda
    python benchmarks/speed.py --sizes diamond:3,5 --skip-mace

Writes benchmarks/results/speed.json, .md and .png (machine, versions, load and git commit stamped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: cartlorem and benchmarks
from benchmarks.harness import (ATOMS_PER, build_mace, build_matched_cartlorem, command_line,  # noqa: E402
                                machine_info, mace_inputs, make_structure,
                                markdown_table, mem_available_bytes, n_parameters, peak_memory_bytes,
                                peer_python, proc_kib_field, reset_peak_memory, resolve_device, resolve_devices, run_json_worker,
                                sync_fn, time_fn, write_results, TUNED_MALLOC)

MODELS = ("short", "multipole", "mace")  # "lorem" may be asked for with --models
MODEL_LABEL = {"short": "cartlorem short-range", "multipole": "cartlorem multipole", "lorem": "cartlorem lorem",
               "mace": "MACE"}
DEFAULT_SIZES = {"diamond": [3, 5, 7, 9], "water": [3, 4, 6, 8, 10]}
QUICK_SIZES = {"diamond": [2], "water": [3]}
TARGET_SPEEDUP = 2.0  # cartlorem short-range vs MACE, CPU float32, 1000–6000 atoms
TARGET_LR_SHARE = 0.30  # long-range block ≤ 30 % of the energy+forces time at N ≈ 1000, CPU


# --------------------------------------------------------------------------------------------------
# worker: one point in a fresh process

def _rss_bytes():

    return proc_kib_field("/proc/self/status", "VmRSS")


def worker(spec: dict) -> dict:
    """Build the structure and model of ``spec``, time energy + forces, measure the call's peak memory."""
    import torch

    from cartlorem.graph import atoms_to_graph, neighbour_list

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = resolve_device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    sync = sync_fn(device)
    model_name, cutoff = spec["model"], float(spec["cutoff"])
    atoms = make_structure(spec["system"], int(spec["size"]))
    species = sorted(set(int(z) for z in atoms.numbers))
    row = {"n_atoms": len(atoms), "threads": torch.get_num_threads()}

    # neighbour list, timed on its own (not part of the model time)
    pos, cell, pbc = atoms.get_positions(), atoms.cell.array, atoms.pbc
    nl = time_fn(lambda: neighbour_list(pos, cell, pbc, cutoff), warmup=1, repeats=3)
    g_t = time_fn(lambda: atoms_to_graph(atoms, cutoff, dtype=dtype), warmup=0, repeats=3)
    graph = atoms_to_graph(atoms, cutoff, dtype=dtype).to(device=device)
    n_edges = int(graph.edge_index.shape[1])
    row.update(nl_s=nl["median"], graph_s=g_t["median"], n_edges=n_edges,
               avg_neighbors=n_edges / len(atoms))

    torch.manual_seed(0)
    if model_name == "mace":
        torch.set_default_dtype(dtype)
        model = build_mace(species, spec["channels"], cutoff, avg_num_neighbors=n_edges / len(atoms))
        model = model.to(device=device, dtype=dtype).eval()
        data = mace_inputs(graph, species, dtype, device)

        def call():
            out = model(data, training=False, compute_force=True)
            return out["energy"], out["forces"]
    else:
        lr = {"short": None}.get(model_name, model_name)
        model = build_matched_cartlorem(species, spec["channels"], cutoff, lr, avg_num_neighbors=n_edges / len(atoms))
        model = model.to(device=device, dtype=dtype).eval()

        def call():
            out = model(graph, compute_forces=True, compute_stress=False, create_graph=False)
            return out["energy"], out["forces"]
    row["n_parameters"] = n_parameters(model)

    # first call = warm-up; its peak memory above the resident baseline is the call's memory
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    row["rss_before_mb"] = None if base is None else base / 2**20
    reset_peak_memory(device)
    t0 = time.perf_counter()
    energy, forces = call()
    if sync is not None:
        sync()
    row["first_call_s"] = time.perf_counter() - t0
    peak = peak_memory_bytes(device)
    row["peak_mem_mb"] = None if peak is None or base is None else max(peak - base, 0) / 2**20
    row["peak_total_mb"] = None if peak is None else peak / 2**20
    if not (torch.isfinite(energy).all() and torch.isfinite(forces).all()):
        raise RuntimeError("non-finite energy or forces")
    del energy, forces

    # repeats that fit the budget (at least one)
    budget = float(spec["budget_s"])
    repeats = max(1, min(int(spec["repeats"]), int((budget - row["first_call_s"]) // max(row["first_call_s"], 1e-9))))
    cpu_times = []

    def timed_call():  # process CPU time next to the wall clock: robust to other jobs on the cores
        c0 = time.process_time()
        call()
        cpu_times.append(time.process_time() - c0)

    t = time_fn(timed_call, warmup=0, repeats=repeats, sync=sync)
    row.update(time_s=t["median"], time_iqr_s=t["iqr"], times_s=t["times"], repeats=repeats,
               us_per_atom=t["median"] / len(atoms) * 1e6, cpu_time_s=float(np.median(cpu_times)),
               cpu_times_s=cpu_times)
    if spec.get("profile"):
        row["profile"] = profile_call(model, call, model_name)
    return row


def profile_call(model, call, model_name: str, row_limit: int = 18) -> dict:
    """torch.profiler of one call: op table (self CPU time) and forward time per top-level module."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    handles, ctx = [], {}
    top = [(name, m) for name, m in model.named_modules() if name and name.count(".") <= 1
           and not isinstance(m, (torch.nn.ModuleList, torch.nn.ParameterList))]

    def pre(name):
        def hook(module, args):
            ctx[name] = record_function(f"fwd::{name}")
            ctx[name].__enter__()
        return hook

    def post(name):
        def hook(module, args, out):
            ctx.pop(name).__exit__(None, None, None)
        return hook

    for name, m in top:
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post(name)))
    try:
        call()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("total::energy+forces"):
                call()
    finally:
        for h in handles:
            h.remove()
    events = prof.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=40)
    total = sum(e.cpu_time_total for e in events if e.key == "total::energy+forces") / 1e3
    modules = sorted(((e.key[5:], e.cpu_time_total / 1e3) for e in events if e.key.startswith("fwd::")),
                     key=lambda x: -x[1])
    # the autograd engine runs one evaluate_function per backward node, one after the other
    backward = sum(e.cpu_time_total for e in events if e.key.startswith("autograd::engine::evaluate_function")) / 1e3
    forward = total - backward  # the forward pass and the glue between the two passes
    return {"model": model_name, "total_cpu_ms": total, "forward_cpu_ms": forward, "backward_cpu_ms": backward,
            "forward_modules_ms": modules, "op_table": table}


# --------------------------------------------------------------------------------------------------
# driver

def run_point(spec: dict, python: str, timeout: float) -> dict:
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")
    if spec.get("malloc") == "tuned":
        env.update(TUNED_MALLOC)
    cmd = [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    return run_json_worker(cmd, env, timeout, skip_note="budget: ")


def fit_slope(ns, ts):
    """Least-squares slope of log t against log N (None with fewer than two points)."""
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def parse_sizes(text: str | None, quick: bool) -> dict:
    if not text:
        return dict(QUICK_SIZES if quick else DEFAULT_SIZES)
    out = {}
    for part in text.split(";"):
        name, _, vals = part.partition(":")
        name = name.strip()
        if name not in DEFAULT_SIZES:
            raise SystemExit(f"--sizes: unknown system {name!r} (diamond or water)")
        out[name] = [int(v) for v in vals.split(",") if v.strip()]
    return out


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: smallest sizes, 1 repeat, small budget")
    p.add_argument("--sizes", help='per system, e.g. "diamond:3,5,7,9;water:4,6,8,10" (cells / molecules per edge)')
    p.add_argument("--dtype", default="float32", help="comma list of float32, float64")
    p.add_argument("--device", default="cpu", help="comma list of cpu, cuda")
    p.add_argument("--channels", default="64", help="comma list, e.g. 64,128")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of short, multipole, lorem, mace")
    p.add_argument("--skip-mace", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=240.0,
                   help="seconds per point (warm-up + repeats); larger points predicted to exceed it are skipped")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--memory-fraction", type=float, default=0.7,
                   help="skip a point whose memory, extrapolated linearly from the last size, exceeds this "
                        "fraction of the available memory (a point that still runs out is reported as failed)")
    p.add_argument("--malloc", choices=["system", "tuned"], default="system",
                   help="tuned: run every worker (cartlorem and MACE alike) with glibc's MALLOC_MMAP_MAX_=0 and a "
                        "large MALLOC_TRIM_THRESHOLD_, so that freed tensors are reused instead of page-faulted in again")
    p.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                   help="torch.profiler table of cartlorem short-range at ~1000 atoms (auto: when the speed target is missed)")
    p.add_argument("--out", default=str(HERE / "results" / "speed"))
    p.add_argument("--update", action="store_true",
                   help="merge into the existing results: the points run now replace the same points, others are kept")
    p.add_argument("--render", action="store_true", help="only rewrite the .md and .png from the .json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        row = worker(json.loads(args.worker))
        print(json.dumps(row))
        return
    if args.render:  # rewrite speed.md / speed.png from speed.json, nothing is run
        old = json.loads(Path(args.out + ".json").read_text())
        summary = summarise(old["rows"], old["meta"].get("superseded_rows", []))
        prof = old["meta"].get("summary", {}).get("profile")
        if prof:
            if "total_cpu_ms" in prof and "backward_cpu_ms" in prof:
                prof["forward_cpu_ms"] = prof["total_cpu_ms"] - prof["backward_cpu_ms"]
            summary["profile"] = prof
        write_outputs(old["rows"], {k: v for k, v in old["meta"].items() if k != "summary"}, summary, args.out)
        print(Path(args.out + ".md").read_text())
        return


    if args.quick:
        args.repeats, args.budget = 1, min(args.budget, 60.0)
    sizes = parse_sizes(args.sizes, args.quick)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.skip_mace and "mace" in models:
        models.remove("mace")
    mace_python, mace_reason = peer_python() if "mace" in models else (None, None)

    dtypes = [d.strip() for d in args.dtype.split(",")]
    channels = [int(c) for c in args.channels.split(",")]
    load_start = os.getloadavg()[0]
    devices = resolve_devices(args.device)  # cuda → cpu without CUDA
    cuda = next((torch.device(d) for d in devices if d.startswith("cuda")), None)
    meta = {**machine_info(cuda), "command": command_line("speed.py", argv),
            "cutoff": args.cutoff, "repeats": args.repeats, "budget_s": args.budget,
            "quick": args.quick, "models": models, "mace": "ok" if mace_python else mace_reason,
            "mace_python": mace_python, "loadavg_1min_start": round(load_start, 2),
            "worker_threads": args.threads or "torch default", "malloc": args.malloc,
            "malloc_env": TUNED_MALLOC if args.malloc == "tuned" else None}
    if mace_python:
        r = subprocess.run([mace_python, "-c", "from importlib.metadata import version as v; import e3nn; "
                            "print(v('mace-torch'), e3nn.__version__)"], capture_output=True, text=True,
                           env=dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))
        if r.returncode == 0 and r.stdout.split():
            meta["mace_torch"], meta["mace_e3nn"] = r.stdout.split()[-2:]
    print(f"# load average {load_start:.2f} on {os.cpu_count()} CPUs; MACE: {meta['mace']}", flush=True)

    rows = []
    loads = [load_start]
    for device in devices:
        for dtype in dtypes:
            for C in channels:
                for system, sz in sizes.items():
                    # sizes outer, models inner: the models of one size run back to back, under the same load
                    last = {m: None for m in models}  # model -> (n_atoms, s per call or None, peak MB)
                    for size in sorted(sz):
                        for model in models:
                            row = run_model_point(args, rows, loads, last, device, dtype, C, system, size, model,
                                                  mace_python, mace_reason)
                            rows.append(row)
    meta["loadavg_1min_during"] = {"min": round(min(loads), 2), "max": round(max(loads), 2),
                                   "mean": round(float(np.mean(loads)), 2)}
    old_profile = None
    if args.update and Path(args.out + ".json").exists():
        # re-measured points replace the old ones; every other point of the previous run is kept
        old = json.loads(Path(args.out + ".json").read_text())
        key = lambda r: (r["device"], r["dtype"], r["channels"], r["system"], r["size"], r["model"])
        new_keys = {key(r) for r in rows}
        kept = [r for r in old["rows"] if key(r) not in new_keys]
        replaced = [r for r in old["rows"] if key(r) in new_keys]
        for r in rows:
            r["remeasured"] = meta["date"]
        rows = sorted(kept + rows, key=lambda r: (r["device"], r["dtype"], r["channels"], r["system"], r["size"],
                                                  list(MODEL_LABEL).index(r["model"])
                                                  if r["model"] in MODEL_LABEL else 9))
        prev = {k: v for k, v in old["meta"].items() if k != "summary"}
        old_profile = old["meta"].get("summary", {}).get("profile")
        prev["superseded_rows"] = prev.get("superseded_rows", []) + replaced  # earlier measurements, kept
        meta = {**prev, "updates": prev.get("updates", []) + [
            {k: meta[k] for k in ("date", "git_commit", "git_dirty", "command", "loadavg_1min_start",
                                  "loadavg_1min_during")}
            | {"points": [list(k) for k in sorted(new_keys)]}]}
        meta["models"] = sorted({r["model"] for r in rows}, key=lambda m: list(MODEL_LABEL).index(m))
    summary = summarise(rows, meta.get("superseded_rows", []))
    want_profile = args.profile == "always" or (args.profile == "auto" and summary["speed_target"]["met"] is False)
    if want_profile and "short" in models:
        spec = {"model": "short", "system": "diamond", "size": 5, "dtype": "float32", "device": devices[0],
                "channels": channels[0], "cutoff": args.cutoff, "repeats": 1, "budget_s": args.budget,
                "threads": args.threads, "profile": True, "malloc": args.malloc}
        res = run_point(spec, sys.executable, timeout=args.budget * 2 + 120)
        summary["profile"] = res.get("profile", {"status": res["status"]})
        if res.get("status") == "ok":
            summary["profile"]["time_s"], summary["profile"]["cpu_time_s"] = res["time_s"], res["cpu_time_s"]
    elif args.update and old_profile:
        summary["profile"] = old_profile
    write_outputs(rows, meta, summary, args.out)
    print(Path(args.out + ".md").read_text())


def run_model_point(args, rows, loads, last, device, dtype, C, system, size, model, mace_python, mace_reason):
    """One row: run the point in a fresh process, or say why it was skipped (budget, memory, no MACE)."""

    n_atoms = ATOMS_PER[system](size)
    row = {"device": device, "dtype": dtype, "channels": C, "system": system, "size": size, "n_atoms": n_atoms,
           "model": model}
    prev = last[model]
    if model == "mace" and mace_python is None:
        row["status"] = mace_reason
    elif prev is not None and prev[1] is None:
        row["status"] = "skipped (budget/memory: a smaller size already failed or exceeded it)"
    elif prev is not None:
        # predicted cost of warm-up + repeats: quadratic for the O(N²) Ewald real space of the
        # long-range models, N^1.3 (cache effects) for the local ones; memory linear in N
        expo = 1.3 if model in ("short", "mace") else 2.0
        predicted = prev[1] * (n_atoms / prev[0]) ** expo
        mem = prev[2] * n_atoms / prev[0] if prev[2] else None
        avail = mem_available_bytes(None if device == "cpu" else device)
        if predicted * (1 + args.repeats) > args.budget * 1.5:
            row["status"] = f"skipped (budget: predicted {predicted:.0f} s per call)"
            last[model] = (n_atoms, predicted, mem)
        elif mem is not None and avail is not None and mem * 2**20 > args.memory_fraction * avail:
            row["status"] = (f"skipped (memory: predicted {mem / 1024:.1f} GiB, "
                             f"{avail / 2**30:.1f} GiB available)")
            last[model] = (n_atoms, None, mem)
    if "status" in row:
        print(f"{system:8s} N={n_atoms:5d} {model:9s} {row['status']}", flush=True)
        return row
    spec = {"model": model, "system": system, "size": size, "dtype": dtype, "device": device, "channels": C,
            "cutoff": args.cutoff, "repeats": args.repeats, "budget_s": args.budget, "threads": args.threads,
            "malloc": args.malloc}
    python = mace_python if model == "mace" else sys.executable
    res = run_point(spec, python, timeout=args.budget * 1.5 + 120)
    row.update(res)
    loads.append(os.getloadavg()[0])
    if res["status"] == "ok":
        last[model] = (n_atoms, max(res["time_s"], res["first_call_s"] * 0.5), res.get("peak_mem_mb"))
        print(f"{system:8s} N={n_atoms:5d} {model:9s} {dtype} C={C}: {res['time_s'] * 1e3:9.1f} ms wall, "
              f"{res['cpu_time_s'] * 1e3:9.1f} ms CPU ({res['us_per_atom']:.1f} µs/atom, "
              f"peak +{res['peak_mem_mb']:.0f} MB, NL {res['nl_s'] * 1e3:.1f} ms)", flush=True)
    else:
        print(f"{system:8s} N={n_atoms:5d} {model:9s} {res['status']}", flush=True)
        last[model] = (n_atoms, None, None)
    return row


# --------------------------------------------------------------------------------------------------
# summary, tables, plot

def _ok(rows, **kw):
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in kw.items())]


def _t(r):
    """The time used for ratios, slopes and the plot: process CPU time when measured, else wall time."""
    return r.get("cpu_time_s") or r["time_s"]


def _ratio(a, b):
    """a / b by process CPU time when both have it (else wall time)."""
    if a.get("cpu_time_s") and b.get("cpu_time_s"):
        return a["cpu_time_s"] / b["cpu_time_s"]
    return a["time_s"] / b["time_s"]


def summarise(rows, superseded=()) -> dict:
    keys = sorted({(r["device"], r["dtype"], r["channels"], r["system"]) for r in rows})
    slopes, speedups, shares = [], [], []
    for dev, dt, C, system in keys:
        for model in sorted({r["model"] for r in rows}):
            pts = _ok(rows, device=dev, dtype=dt, channels=C, system=system, model=model)
            if pts:
                slopes.append({"device": dev, "dtype": dt, "channels": C, "system": system, "model": model,
                               "slope": fit_slope([r["n_atoms"] for r in pts], [_t(r) for r in pts]),
                               "sizes": [r["n_atoms"] for r in pts]})
        for n in sorted({r["n_atoms"] for r in rows if r["system"] == system}):
            # ratios only between points of the same run (measured back to back, under the same load):
            # the latest run that measured the models being compared, superseded rows included
            pool = _ok(list(rows) + list(superseded), device=dev, dtype=dt, channels=C, system=system, n_atoms=n)
            runs = {}
            for r in pool:
                runs.setdefault(r.get("remeasured") or "", {})[r["model"]] = r

            def pair(a, b):
                for tag in sorted(runs, reverse=True):
                    if a in runs[tag] and b in runs[tag]:
                        return runs[tag]
                return {}
            by = pair("short", "mace")
            # primary metric: process CPU time (robust to other jobs on a shared machine; with one thread
            # it equals the wall time of an idle machine); the wall-clock ratio is reported next to it
            if "short" in by and "mace" in by:
                speedups.append({"device": dev, "dtype": dt, "channels": C, "system": system, "n_atoms": n,
                                 "speedup": _ratio(by["mace"], by["short"]),
                                 "speedup_wall": by["mace"]["time_s"] / by["short"]["time_s"],
                                 "memory_ratio": (by["mace"]["peak_mem_mb"] / by["short"]["peak_mem_mb"]
                                                  if by["short"].get("peak_mem_mb") else None)})
            for lr in ("multipole", "lorem"):
                by = pair("short", lr)
                if "short" in by and lr in by:
                    shares.append({"device": dev, "dtype": dt, "channels": C, "system": system, "n_atoms": n,
                                   "long_range": lr, "share": _ratio(by[lr], by["short"]) - 1.0,
                                   "share_wall": by[lr]["time_s"] / by["short"]["time_s"] - 1.0})
    in_range = [s for s in speedups if s["device"] == "cpu" and s["dtype"] == "float32" and 1000 <= s["n_atoms"] <= 6000]
    speed_target = {"target": f"cartlorem short-range >= {TARGET_SPEEDUP:g}x faster than MACE, CPU float32, 1000-6000 atoms",
                    "points": len(in_range), "min_speedup": min((s["speedup"] for s in in_range), default=None),
                    "max_speedup": max((s["speedup"] for s in in_range), default=None),
                    "met": None if not in_range else all(s["speedup"] >= TARGET_SPEEDUP for s in in_range)}
    # the share at N = 1000 per system: the measured point, or linear in log N between the two around it
    near = []
    for system, dt in sorted({(s["system"], s["dtype"]) for s in shares}):
        pts = sorted((s["n_atoms"], s["share"]) for s in shares if s["device"] == "cpu" and s["system"] == system
                     and s["dtype"] == dt and s["long_range"] == "multipole")
        lo = [q for q in pts if q[0] <= 1000]
        hi = [q for q in pts if q[0] >= 1000]
        if lo and hi:
            (n0, s0), (n1, s1) = lo[-1], hi[0]
            x = 0.0 if n1 == n0 else math.log(1000 / n0) / math.log(n1 / n0)
            near.append((system, 1000 if n0 == n1 else f"{n0}-{n1} interpolated", dt, round(s0 + x * (s1 - s0), 3)))
    lr_target = {"target": f"multipole block <= {TARGET_LR_SHARE:.0%} of energy+forces time at N = 1000 periodic, CPU",
                 "points": near, "met": None if not near else all(x <= TARGET_LR_SHARE for *_, x in near)}
    return {"slopes": slopes, "speedups": speedups, "long_range_share": shares, "speed_target": speed_target,
            "long_range_target": lr_target}


def _fmt(x, spec):
    return None if x is None else format(x, spec)


def write_outputs(rows, meta, summary, out):

    table_rows = []
    for r in rows:
        ok = r.get("status") == "ok"
        table_rows.append({
            "system": r["system"], "N": r["n_atoms"],
            "model": MODEL_LABEL.get(r["model"], r["model"]),
            "dt": r["dtype"], "dev": r["device"], "C": r["channels"],
            "params": r.get("n_parameters"),
            "ms": _fmt(r.get("time_s", 0) * 1e3, ".0f") if ok else r.get("status"),
            "cpu": _fmt(r.get("cpu_time_s", 0) * 1e3, ".0f") if ok else None,
            "thr": r.get("threads"),
            "iqr": _fmt(r.get("time_iqr_s", 0) * 1e3, ".0f") if ok else None,
            "us_atom": _fmt(r.get("us_per_atom"), ".1f") if ok else None,
            "mem": _fmt(r.get("peak_mem_mb"), ".0f") if ok else None,
            "nl": _fmt(r.get("nl_s", 0) * 1e3, ".1f") if ok else None,
            "graph": _fmt(r.get("graph_s", 0) * 1e3, ".1f") if ok else None,
            "nb": _fmt(r.get("avg_neighbors"), ".1f") if ok else None,
            "rep": r.get("repeats"),
        })
    cols = [("system", "system"), ("N", "N"), ("model", "model"), ("dtype", "dt"), ("device", "dev"),
            ("C", "C"), ("parameters", "params"), ("threads", "thr"), ("E+F wall (ms, median)", "ms"),
            ("IQR (ms)", "iqr"), ("E+F CPU time (ms)", "cpu"), ("µs/atom (wall)", "us_atom"), ("peak extra mem (MB)", "mem"), ("NL vesin (ms)", "nl"),
            ("atoms_to_graph (ms)", "graph"), ("⟨neighbours⟩", "nb"), ("repeats", "rep")]
    m = meta
    lines = [f"# Inference speed: cartlorem vs MACE ({m['date']}, commit {(m['git_commit'] or '?')[:10]}"
             f"{', dirty tree' if m.get('git_dirty') else ''})", "",
             *([f"Command: `{m['command']}`", ""] if m.get("command") else []),
             f"Machine: {m['cpu_model']}, {m['cpu_affinity']} cores usable, torch {m['torch']} "
             f"(workers: {m['worker_threads']} threads), MACE: {m.get('mace_torch', m['mace'])}"
             f"{' with e3nn ' + m['mace_e3nn'] if m.get('mace_e3nn') else ''}. "
             f"Load average (1 min) {m['loadavg_1min_start']} at start, {m['loadavg_1min_during']['min']}–"
             f"{m['loadavg_1min_during']['max']} during the run on {m['cpu_count']} CPUs"
             + (" — the machine was shared, timings are pessimistic and noisy." if m['loadavg_1min_during']['max'] > (m['cpu_affinity'] or 1) else ".")
             + (" Allocator: glibc tuned for every model (`--malloc tuned`: "
                + ", ".join(f"{k}={v}" for k, v in m["malloc_env"].items())
                + "; freed tensors are reused instead of page-faulted in again)." if m.get("malloc") == "tuned"
                else " Allocator: the system default (glibc returns large freed tensors to the kernel; their "
                     "page faults are counted in the CPU time; see `--malloc tuned`)."),
             "", "Energy + forces of one periodic structure (forward + backward for forces, no stress, eval mode), "
             "neighbour list excluded (own columns). Median of the repeats after one warm-up call, as wall time "
             "and as process CPU time; ratios (speed-up, long-range share) use the CPU time, which other jobs on "
             "a shared machine do not inflate (with one thread it is the wall time of an idle machine). "
             "Diamond positions are rattled by 0.05 Å (seeded). "
             "peak extra memory = peak RSS of the first call above the RSS before it (fresh process per point; "
             "CUDA: max_memory_allocated above the allocated memory before it). Matched settings: cutoff "
             f"{m['cutoff']} Å, ranks / l ≤ 2 with C channels, correlation 3, 2 interactions, 8 Bessel, "
             "radial MLP 3×64, readout MLP 16.", ""]
    sup = [r for r in m.get("superseded_rows", []) if r.get("status") == "ok"]
    if sup:
        lines += ["Earlier measurements of re-measured points (kept in the JSON as `superseded_rows`): "
                  + "; ".join(f"{r['system']} N={r['n_atoms']} {MODEL_LABEL.get(r['model'], r['model'])}: "
                              f"{r['cpu_time_s']:.1f} s CPU / {r['time_s']:.1f} s wall" for r in sup) + ".", ""]
    for x in m.get("log_only_measurements", []):
        lines += [f"Also measured ({x['note']}): {x['system']} N={x['n_atoms']} CPU time "
                  + ", ".join(f"{MODEL_LABEL.get(k, k)} {v:.1f} s" for k, v in x["cpu_time_s"].items()) + ".", ""]
    for u in m.get("updates", []):
        pts = "; ".join(f"{sys_} N={ATOMS_PER[sys_](size)} {mod} {dt}" for dev, dt, C, sys_, size, mod in u["points"])
        lines += [f"Re-measured {u['date']} on commit {(u.get('git_commit') or '?')[:10]}"
                  f"{', dirty tree' if u.get('git_dirty') else ''}"
                  + (f" (`{u['command']}`)" if u.get("command") else "")
                  + f", load {u['loadavg_1min_during']['min']}–{u['loadavg_1min_during']['max']}: {pts}.", ""]
    st, lt = summary["speed_target"], summary["long_range_target"]
    verdict = {True: "**met**", False: "**missed**", None: "not measured"}
    lines += ["## Targets", "",
              f"- {st['target']}: {verdict[st['met']]}"
              + (f" (smallest speed-up {st['min_speedup']:.2f}× over {st['points']} points)" if st["min_speedup"] else ""),
              f"- {lt['target']}: {verdict[lt['met']]}"
              + (" (" + ", ".join(f"{s} N={n} {d}: {x:.0%}" for s, n, d, x in lt['points']) + ")" if lt["points"] else ""),
              ""]
    if summary["speedups"]:
        lines += ["## MACE time / cartlorem short-range time", "",
                  markdown_table([{**s, "speedup": f"{s['speedup']:.2f}×", "speedup_wall": f"{s['speedup_wall']:.2f}×",
                                   "memory_ratio": _fmt(s["memory_ratio"], ".2f")} for s in summary["speedups"]],
                                 [("system", "system"), ("N", "n_atoms"), ("dtype", "dtype"), ("device", "device"),
                                  ("C", "channels"), ("speed-up (CPU time)", "speedup"), ("speed-up (wall)", "speedup_wall"),
                                  ("memory ratio MACE/cartlorem", "memory_ratio")]), ""]
    if summary["long_range_share"]:
        lines += ["## Long-range share: time(long range) / time(short range) − 1", "",
                  markdown_table([{**s, "share": f"{s['share']:.0%}", "share_wall": f"{s['share_wall']:.0%}"}
                                  for s in summary["long_range_share"]],
                                 [("system", "system"), ("N", "n_atoms"), ("block", "long_range"), ("dtype", "dtype"),
                                  ("device", "device"), ("C", "channels"), ("share (CPU time)", "share"),
                                  ("share (wall)", "share_wall")]), ""]
    if summary["slopes"]:
        lines += ["## Fitted scaling exponents (log CPU time vs log N)", "",
                  markdown_table([{**s, "model": MODEL_LABEL.get(s["model"], s["model"]),
                                   "slope": _fmt(s["slope"], ".2f"), "sizes": ", ".join(map(str, s["sizes"]))}
                                  for s in summary["slopes"]],
                                 [("system", "system"), ("model", "model"), ("dtype", "dtype"), ("device", "device"),
                                  ("C", "channels"), ("slope", "slope"), ("N used", "sizes")]), ""]
    lines += ["## All points", "", markdown_table(table_rows, cols), ""]
    prof = summary.get("profile")
    if prof and "op_table" in prof and "total_cpu_ms" in prof:
        lines += ["## Profile: cartlorem short-range, diamond 1000 atoms, one energy+forces call", "",
                  f"One call under the profiler: {prof['total_cpu_ms']:.0f} ms CPU (profiler overhead included), "
                  f"of which the backward (autograd engine) {prof['backward_cpu_ms']:.0f} ms and the forward "
                  f"(with the glue) {prof['forward_cpu_ms']:.0f} ms. Forward time per module (inclusive):", "",
                  markdown_table([{"module": k, "ms": f"{v:.1f}"} for k, v in prof["forward_modules_ms"]],
                                 [("module", "module"), ("forward ms", "ms")]), "",
                  "Top operators by self CPU time:", "", "```", prof["op_table"].rstrip(), "```", ""]
    elif prof:
        lines += ["## Profile", "", f"profile run: {prof.get('status')}", ""]
    write_results("speed", rows, {**meta, "summary": summary}, markdown="\n".join(lines), out=out)
    plot(rows, summary, out + ".png")


def plot(rows, summary, path) -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    systems = sorted({r["system"] for r in rows})
    fig = Figure(figsize=(5.2 * (len(systems) + 1), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    slope_of = {(s["device"], s["dtype"], s["channels"], s["system"], s["model"]): s["slope"] for s in summary["slopes"]}
    styles = {"short": "o-", "multipole": "s-", "lorem": "^-", "mace": "D--"}
    for k, system in enumerate(systems):
        ax = fig.add_subplot(1, len(systems) + 1, k + 1)
        for key in sorted({(r["device"], r["dtype"], r["channels"], r["model"]) for r in rows if r["system"] == system}):
            dev, dt, C, model = key
            pts = _ok(rows, device=dev, dtype=dt, channels=C, system=system, model=model)
            if not pts:
                continue
            s = slope_of.get((dev, dt, C, system, model))
            label = f"{MODEL_LABEL.get(model, model)} {dt} C={C} {dev}" + (f" (slope {s:.2f})" if s is not None else "")
            ax.plot([r["n_atoms"] for r in pts], [_t(r) for r in pts], styles.get(model, "o-"), label=label, ms=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
        ax.set_xlabel("atoms N")
        ax.set_ylabel("energy + forces CPU time (s)")
        ax.set_title(f"{system} (periodic)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax = fig.add_subplot(1, len(systems) + 1, len(systems) + 1)
    for key in sorted({(s["system"], s["long_range"], s["dtype"], s["channels"], s["device"]) for s in summary["long_range_share"]}):
        pts = [s for s in summary["long_range_share"]
               if (s["system"], s["long_range"], s["dtype"], s["channels"], s["device"]) == key]
        ax.plot([s["n_atoms"] for s in pts], [100 * s["share"] for s in pts], "o-", ms=4, label=" ".join(map(str, key)))
    ax.axhline(100 * TARGET_LR_SHARE, color="0.5", ls=":", label="target 30 % (N ≈ 1000)")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("atoms N")
    ax.set_ylabel("long-range share of E+F time (%)")
    ax.set_title("time(long range)/time(short) − 1")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


if __name__ == "__main__":
    main()
