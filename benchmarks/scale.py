"""The scale benchmark (issue 11): a multipole-long-range model on 10^3 - 10^5 atoms, one and two threads.

What is measured: ``cartlorem.CartLorem(species, long_range="multipole")`` with the default options
(C = 64 channels, two layers, correlation 3, lmax 2, r_c = 5 Å; long-range block: 4 channels of q, mu,
Theta, Gaussian sources sigma = 1 Å, accuracy 1e-5, ``method="auto"``, which is PME from a few hundred
atoms on), float32, CPU, eval mode, random weights (``torch.manual_seed(0)`` before construction: an
untrained model costs what a trained one does), one energy + forces call (no stress) of a periodic
structure whose graph (neighbour list) is built beforehand. Structures: water boxes (benchmarks/harness.py
``water_box``: m^3 molecules on a grid at 1 g/cm^3, random orientations) and an electrolyte, ~1 M NaCl in
water (the same box with one random molecule in 55 replaced by Na+ and one by Cl-, each ion at the
molecule's oxygen; zero net charge).

Per (system, size, threads), in a fresh process:

* ``full``: the model's energy + forces call, wall and process-CPU time (median of ``--repeats`` after the
  first call, which is the warm-up; at N >= ``--single-call`` atoms the first call is the only one);
* ``long-range``: the model's long-range block alone, on the inputs it got in that call (node features,
  positions, cell captured by a forward pre-hook): its forward (learned multipoles, PME fields, energy
  terms, feature update) + the backward to positions and features (what the forces need), timed the
  same way. The share is long-range / full (wall-time medians); local = full - long-range;
* ``--lr-only``: the long-range block alone (no full call, for the largest sizes), on random node
  features of the model's shapes (seeded; the block's cost does not depend on their values);
* ``local`` (N <= ``--local-max``): the same model without long range (``long_range=None``), as a check
  of local = full - long-range;
* peak memory: the process's resident set size is read after the model and graph are built, its peak
  (VmHWM) is reset through /proc/self/clear_refs, the first call runs, and the peak (VmHWM) is recorded
  as both the whole process's peak and the call's part (peak - resident before). This is the memory the
  process took from the kernel (torch's allocations included; tracemalloc cannot see those).

The log-log slopes of time against N are fitted per system and thread count over N >= 10^4 (the issue's
range for the long-range exponent; a fit there needs points spanning 5x in N) and over all sizes. The long
range is fitted as two series that are never mixed: inside the energy + forces calls (``lr_*``: the
process has run the local model, so the allocator's heap is warm, as in any simulation) and the block
alone in a fresh process (``lr_alone_*``, ``--lr-only``: with glibc's default allocator its large buffers
are page-faulted in afresh on every call). The target reads the calls' series where it spans 10^4 - 10^5.
Targets (issue 11): long-range exponent <= 1.1 over 10^4 - 10^5 atoms; long-range share <= 15 % of the
call at every size; a 100,000-atom water energy + forces call within the machine's 24 GiB.

    python benchmarks/scale.py                              # everything (long: ~1-2 h on 2 shared cores)
    python benchmarks/scale.py --water 7,10 --electrolyte 7 --threads 1   # quick look
    python benchmarks/scale.py --water 32 --electrolyte "" --threads 2 --merge   # add the 10^5 point

Writes benchmarks/results/scale.json and .md (command, commit, machine, load average per point).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the checkout under test

TARGET_LR_EXPONENT = 1.1
TARGET_LR_SHARE = 0.15
TARGET_MEMORY_GIB = 24.0
MB_PER_ATOM_GUESS = 0.25  # measured ~0.21-0.25 (benchmarks/results/memory.md): skip points that cannot fit
IONS_EVERY = 55  # one Na+ and one Cl- per 55 water molecules: ~1 mol/L
DEFAULT_SIZES = {"water": [7, 10, 15, 22, 32], "electrolyte": [7, 10, 15, 22]}  # 1029 ... 98304 atoms
LR_OPTIONS = dict(lr_channels=4, smearing=1.0, accuracy=1e-5)  # the long-range block's defaults, stated


def electrolyte_box(m: int, seed: int = 0):
    """``water_box(m)`` with ``m^3 // IONS_EVERY`` random molecules replaced by Na+ and as many by Cl-."""
    from harness import water_box

    atoms = water_box(m, seed=seed)
    n_mol = m**3
    n_pairs = max(1, n_mol // IONS_EVERY)
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(n_mol, size=2 * n_pairs, replace=False)
    ion_of = {int(k): ("Na" if i < n_pairs else "Cl") for i, k in enumerate(picked)}
    keep, symbols = [], []
    for k in range(n_mol):
        if k in ion_of:
            keep.append(3 * k)  # the oxygen's position
            symbols.append(ion_of[k])
        else:
            keep.extend([3 * k, 3 * k + 1, 3 * k + 2])
            symbols.extend(["O", "H", "H"])
    out = atoms[keep]
    out.set_chemical_symbols(symbols)
    return out


def make_system(system: str, size: int):
    from harness import water_box

    return water_box(size) if system == "water" else electrolyte_box(size)


def _status_mb(key: str) -> float:
    from harness import proc_kib_field

    return proc_kib_field("/proc/self/status", key) / 2**20  # bytes -> MiB


def worker(spec: dict) -> dict:
    """One (system, size, threads) point in a fresh process (see the module docstring)."""
    import torch

    threads = int(spec["threads"])
    torch.set_num_threads(threads)
    import cartlorem
    from cartlorem.graph import atoms_to_graph
    from harness import time_fn

    t0 = time.perf_counter()
    atoms = make_system(spec["system"], int(spec["size"]))
    n = len(atoms)
    graph = atoms_to_graph(atoms, 5.0, dtype=torch.float32)
    n_edges = int(graph.edge_index.shape[1])
    species = sorted(set(int(z) for z in atoms.numbers))
    setup_s = time.perf_counter() - t0

    def build(long_range):
        torch.manual_seed(0)
        return cartlorem.CartLorem(species, cutoff=5.0, long_range=long_range, channels=64, num_layers=2,
                                   correlation=3, lmax=2, avg_num_neighbors=n_edges / n,
                                   long_range_options=dict(LR_OPTIONS) if long_range else None).eval()

    model = build("multipole")
    captured = {}
    model.long_range_block.register_forward_pre_hook(lambda mod, args: captured.update(args=args))

    def full():
        out = model(graph, compute_forces=True, compute_stress=False, create_graph=False)
        return out["energy"], out["forces"]

    if spec.get("lr_only"):  # the long-range block alone on random node features of the model's shapes
        gen = torch.Generator().manual_seed(1)
        c = 64
        h2 = torch.randn(n, c, 3, 3, generator=gen)
        h2 = 0.5 * (h2 + h2.transpose(-1, -2))
        h2 = h2 - torch.diagonal(h2, dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(3)
        h = [torch.randn(n, c, generator=gen), torch.randn(n, c, 3, generator=gen), h2]
        captured["args"] = (h, graph, graph.positions, graph.cell)
        return {"N": n, "edges": n_edges, "threads": threads, "setup_s": setup_s, "lr_only": True,
                **_time_long_range(model, captured, int(spec["repeats"]), n >= int(spec["single_call"])),
                **_lr_parameters(atoms), "lr_process_peak_mb": _status_mb("VmHWM")}

    # the first call: peak memory (and the warm-up)
    base = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (Linux >= 4.0)
        f.write("5")
    c0, w0 = time.process_time(), time.perf_counter()
    energy, forces = full()
    first_wall, first_cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = _status_mb("VmHWM")
    single = n >= int(spec["single_call"])
    repeats = int(spec["repeats"])
    t_full = ({"median": first_wall, "cpu_median": first_cpu, "times": [first_wall], "repeats": 1, "warmup": 0}
              if single else time_fn(full, warmup=0, repeats=repeats))

    row = {"N": n, "edges": n_edges, "threads": threads, "setup_s": setup_s,
           "full_wall_s": t_full["median"], "full_cpu_s": t_full["cpu_median"], "full_times_s": t_full["times"],
           "first_call_wall_s": first_wall, "first_call_cpu_s": first_cpu,
           "rss_before_mb": base, "peak_rss_mb": peak, "call_peak_mb": peak - base,
           "energy": float(energy.detach().sum()), "max_force": float(forces.detach().abs().max()),
           **_time_long_range(model, captured, repeats, single), **_lr_parameters(atoms)}
    if n <= int(spec["local_max"]):
        local_model = build(None)

        def local():
            out = local_model(graph, compute_forces=True, compute_stress=False, create_graph=False)
            return out["energy"], out["forces"]

        t_loc = time_fn(local, warmup=1, repeats=repeats)
        row.update(local_wall_s=t_loc["median"], local_cpu_s=t_loc["cpu_median"], local_times_s=t_loc["times"])
    return row


def _time_long_range(model, captured, repeats: int, single: bool) -> dict:
    """The model's long-range block alone, on the inputs it got in the last call: forward + backward to the
    positions and the node features."""
    import torch

    from harness import time_fn

    block = model.long_range_block
    h, g, positions, cell = captured["args"]

    def long_range():
        hh = [t.detach().requires_grad_(True) if t is not None else None for t in h]
        pos = positions.detach().requires_grad_(True)
        out = block(hh, g, pos, cell.detach())
        e = out["readout"].sum() + out["electrostatic"].sum()
        return torch.autograd.grad(e, [pos] + [t for t in hh if t is not None])

    t = time_fn(long_range, warmup=0 if single else 1, repeats=1 if single else repeats)
    return {"lr_wall_s": t["median"], "lr_cpu_s": t["cpu_median"], "lr_times_s": t["times"]}


def _lr_parameters(atoms) -> dict:
    """What method="auto" chose for the block's sum (4 channels of q, mu, Theta; outputs phi, E, grad E)."""
    from cartlorem.ewald import pme
    from cartlorem.ewald.kernels import Layout

    layout = Layout((0, 1, 2))
    cell, n = atoms.cell.array, len(atoms)
    acc, sigma, c = LR_OPTIONS["accuracy"], LR_OPTIONS["smearing"], LR_OPTIONS["lr_channels"]
    out = {"lr_method": pme.choose_method(cell, n, acc, layout, layout, c, sigma)}
    if out["lr_method"] == "pme":
        p = pme.choose_parameters(cell, n, acc, 4, sigma, n_channels=c, n_rows=10, n_cols=10, derivatives=2)
        out.update(pme_alpha=p.alpha, pme_mesh="x".join(map(str, p.mesh)), pme_spline_order=p.spline_order)
    return out


def run_worker(spec: dict, timeout: float) -> dict:
    from harness import TUNED_MALLOC, run_json_worker

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(spec["threads"]))
    if spec.get("malloc") == "tuned":
        env.update(TUNED_MALLOC)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]

    return run_json_worker(cmd, env, timeout, tail_chars=300)


def slope(rows, key, n_min=0):
    by_n = {}
    for r in rows:  # one point per N
        if r.get(key) and r["N"] >= n_min:
            by_n.setdefault(r["N"], r)
    sel = list(by_n.values())
    span = 5.0 if n_min else 1.5  # a fit over 10^4 - 10^5 needs points across that range
    if len(sel) < 2 or max(r["N"] for r in sel) < span * min(r["N"] for r in sel):
        return None
    return float(np.polyfit(np.log([r["N"] for r in sel]), np.log([r[key] for r in sel]), 1)[0])


def summarise(rows) -> dict:
    ok = [r for r in rows if r.get("status") == "ok"]
    for r in ok:
        if "full_wall_s" not in r:
            continue
        r["lr_share"] = r["lr_wall_s"] / r["full_wall_s"]
        r["lr_share_cpu"] = r["lr_cpu_s"] / r["full_cpu_s"]
        r["local_est_wall_s"] = r["full_wall_s"] - r["lr_wall_s"]
        r["local_est_cpu_s"] = r["full_cpu_s"] - r["lr_cpu_s"]
    fits = {}
    for system in sorted({r["system"] for r in ok}):
        for threads in sorted({r["threads"] for r in ok}):
            sel = [r for r in ok if r["system"] == system and r["threads"] == threads]
            in_call = [r for r in sel if not r.get("lr_only")]
            alone = [r for r in sel if r.get("lr_only")]
            # the long range as part of energy + forces calls (the process has run the local model: its heap
            # is warm) and the block alone in a fresh process (--lr-only: its buffers page-faulted in afresh
            # with glibc's default allocator), fitted as two series, never mixed
            for key, series, name in (("full_wall_s", in_call, "full_wall"), ("full_cpu_s", in_call, "full_cpu"),
                                      ("lr_wall_s", in_call, "lr_wall"), ("lr_cpu_s", in_call, "lr_cpu"),
                                      ("local_est_cpu_s", in_call, "local_est_cpu"),
                                      ("lr_wall_s", alone, "lr_alone_wall"), ("lr_cpu_s", alone, "lr_alone_cpu")):
                for label, n_min in (("N>=1e4", 10_000), ("all", 0)):
                    k = slope(series, key, n_min)
                    if k is not None:
                        fits[f"{system} {threads}t {name} {label}"] = round(k, 3)
    # the target: the long range of the calls where they span 10^4 - 10^5 (otherwise the block alone)
    in_calls = [v for k, v in fits.items() if " lr_" in k and " lr_alone_" not in k and "N>=1e4" in k]
    alone = [v for k, v in fits.items() if " lr_alone_" in k and "N>=1e4" in k]
    lr_exp = in_calls or alone
    shares = [r["lr_share"] for r in ok if "lr_share" in r]
    shares_cpu = [r["lr_share_cpu"] for r in ok if "lr_share_cpu" in r]
    big_water = [r for r in ok if r["system"] == "water" and r["N"] >= 90_000 and "peak_rss_mb" in r]
    return {
        "fits": fits,
        "lr_exponent_max_N>=1e4": max(lr_exp) if lr_exp else None,
        "lr_exponent_target_met": (max(lr_exp) <= TARGET_LR_EXPONENT) if lr_exp else None,
        "lr_exponent_from": "the calls" if in_calls else ("the block alone" if alone else None),
        "lr_alone_exponent_max_N>=1e4": max(alone) if alone else None,
        "lr_share_max": max(shares) if shares else None,
        "lr_share_target_met": (max(shares) <= TARGET_LR_SHARE) if shares else None,
        "lr_share_cpu_max": max(shares_cpu) if shares_cpu else None,
        "water_1e5_peak_gib": max(r["peak_rss_mb"] for r in big_water) / 1024 if big_water else None,
        "memory_target_met": (max(r["peak_rss_mb"] for r in big_water) / 1024 <= TARGET_MEMORY_GIB)
        if big_water else None,
    }


def _f(x, spec):
    return "—" if x is None else format(x, spec)


def markdown(rows, meta, summary) -> str:
    s = summary

    def verdict(v):
        return "not measured" if v is None else ("**met**" if v else "**missed**")

    lines = ["# Scale: multipole long range at 10^3 - 10^5 atoms", "",
             f"{meta['date']}, commit {(meta.get('git_commit') or '?')[:10]}{' (dirty)' if meta.get('git_dirty') else ''}, "
             f"{meta['cpu_model']}, {meta['cpu_count']} cores, {meta['mem_total_gib']} GiB, torch {meta['torch']}; "
             f"load average {meta['loadavg_1min']} at the start (the machine was shared with other jobs: wall "
             "times are pessimistic, CPU times are given next to them; the load at each point is in the table).",
             "", f"Command(s): `{meta['command']}`" + (" (separate runs, one after the other or in parallel, combined with `--combine`; commits "
             + ", ".join(sorted({c['commit'][:10] for c in meta['combined_from']})) + ")" if meta.get("combined_from") else "")
             + ".", "",
             "Model: `CartLorem(species, long_range=\"multipole\")`, C = 64, 2 layers, correlation 3, lmax 2, "
             "r_c = 5 Å, long-range block with 4 channels of q, μ, Θ, σ = 1 Å, accuracy 1e-5, `method=\"auto\"`; "
             "float32, CPU, random weights (`torch.manual_seed(0)`), one energy + forces call (no stress). "
             "Long range = the model's long-range block alone on the inputs of the call (forward + backward to "
             "positions and features); local = full − long range (checked against a model without long range "
             "where `local` is given). Peak = the process's peak resident set size during the first call "
             "(VmHWM after a reset), `call` = peak − resident size before the call.", "",
             "glibc allocator: " + ("tuned (`MALLOC_MMAP_MAX_=0`, `MALLOC_TRIM_THRESHOLD_=1099511627776`: freed tensors "
                                    "stay in the heap, `--malloc tuned`)" if meta.get("malloc") == "tuned" else
                                    "default (every tensor above the mmap threshold is page-faulted in afresh)") + ".", "",
             "## Targets", "",
             f"- long-range exponent ≤ {TARGET_LR_EXPONENT} over 10^4 - 10^5 atoms: {verdict(s['lr_exponent_target_met'])} "
             f"(largest fitted {_f(s['lr_exponent_max_N>=1e4'], '.2f')}, from {s.get('lr_exponent_from')}; the "
             f"block alone in fresh processes: {_f(s.get('lr_alone_exponent_max_N>=1e4'), '.2f')})",
             f"- long-range share ≤ {TARGET_LR_SHARE:.0%} of the call at every size: {verdict(s['lr_share_target_met'])} "
             f"(largest {_f(s['lr_share_max'], '.1%')} of the wall time, {_f(s['lr_share_cpu_max'], '.1%')} of the CPU time)",
             f"- 100,000-atom water energy + forces within {TARGET_MEMORY_GIB:.0f} GiB: {verdict(s['memory_target_met'])} "
             f"(peak {_f(s['water_1e5_peak_gib'], '.1f')} GiB)", "",
             "## Time and memory per call", "",
             "| system | N | threads | full wall s | full CPU s | long-range wall s | long-range CPU s | share (wall / CPU) | "
             "local CPU s (full − LR) | local CPU s (measured) | peak GiB | call MB/atom | PME mesh, order | load | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mesh = f"{r['pme_mesh']}, {r['pme_spline_order']}" if r.get("pme_mesh") else r.get("lr_method", "—")
        lines.append(
            f"| {r['system']}{' (long range only)' if r.get('lr_only') else ''} | {r.get('N', '—')} | {r['threads']} | {_f(r.get('full_wall_s'), '.2f')} | "
            f"{_f(r.get('full_cpu_s'), '.2f')} | {_f(r.get('lr_wall_s'), '.2f')} | {_f(r.get('lr_cpu_s'), '.2f')} | "
            f"{_f(r.get('lr_share'), '.1%')} / {_f(r.get('lr_share_cpu'), '.1%')} | {_f(r.get('local_est_cpu_s'), '.2f')} | "
            f"{_f(r.get('local_cpu_s'), '.2f')} | "
            f"{_f(r.get('peak_rss_mb') and r['peak_rss_mb'] / 1024, '.2f')} | "
            f"{_f(r.get('call_peak_mb') and r['call_peak_mb'] / r['N'], '.3f')} | {mesh} | {r.get('loadavg_1min', '—')} | "
            f"{r['status']} |")
    lines += ["", "## Fitted log-log slopes of time against N", "",
              "| fit | slope |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in s["fits"].items()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--water", default=",".join(map(str, DEFAULT_SIZES["water"])),
                   help="water boxes of m^3 molecules (3 m^3 atoms), comma-separated m")
    p.add_argument("--electrolyte", default=",".join(map(str, DEFAULT_SIZES["electrolyte"])),
                   help="NaCl in water, the same m (empty: none)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--lr-only", action="store_true",
                   help="time the long-range block alone (its inputs from a forward without forces): no full call")
    p.add_argument("--malloc", choices=("default", "tuned"), default="default",
                   help="tuned: run the workers with glibc's MALLOC_MMAP_MAX_=0 and a 1 TiB MALLOC_TRIM_THRESHOLD_ (freed "
                        "tensors reused instead of page-faulted in again; the README's advice for long runs)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the first (below --single-call)")
    p.add_argument("--single-call", type=int, default=50_000, help="from this N on, one call per point")
    p.add_argument("--local-max", type=int, default=11_000, help="largest N timed without long range too")
    p.add_argument("--timeout", type=float, default=5400.0, help="seconds per point")
    p.add_argument("--no-memory-guard", action="store_true",
                   help="run points whose predicted memory exceeds 90%% of the available memory")
    p.add_argument("--merge", action="store_true", help="add to / replace rows of an existing results file")
    p.add_argument("--out", default=str(HERE / "results" / "scale"))
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="write --out from the rows of earlier result files (runs made in parallel), nothing timed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from harness import machine_info, mem_available_bytes, write_results

    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        meta = dict(parts[0]["meta"])
        meta["command"] = "; ".join(part["meta"]["command"] for part in parts)
        meta["loadavg_1min"] = "/".join(str(part["meta"]["loadavg_1min"]) for part in parts)
        meta["combined_from"] = [dict(date=part["meta"]["date"], commit=part["meta"]["git_commit"],
                                      command=part["meta"]["command"]) for part in parts]
        rows = [r for part in parts for r in part["rows"]]
        rows.sort(key=lambda r: (r["system"] != "water", r["system"], r["N"], r["threads"], bool(r.get("lr_only"))))
        meta["summary"] = summarise(rows)
        write_results("scale", rows, meta, markdown(rows, meta, meta["summary"]), out=args.out)
        print(json.dumps(meta["summary"], indent=1))
        return

    meta = machine_info()
    meta["command"] = "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta["long_range_options"] = LR_OPTIONS
    meta["malloc"] = args.malloc
    sizes = {"water": [int(x) for x in args.water.split(",") if x.strip()],
             "electrolyte": [int(x) for x in args.electrolyte.split(",") if x.strip()]}
    out_json = Path(args.out + ".json")
    old = json.loads(out_json.read_text())["rows"] if args.merge and out_json.exists() else []
    rows = []
    for system, vals in sizes.items():
        for size in vals:
            for threads in [int(t) for t in args.threads.split(",")]:
                spec = {"system": system, "size": size, "threads": threads, "repeats": args.repeats,
                        "single_call": args.single_call, "local_max": args.local_max, "lr_only": args.lr_only, "malloc": args.malloc}
                n_guess = 3 * size**3
                avail = mem_available_bytes() or 0
                t0 = time.time()
                if not args.lr_only and not args.no_memory_guard and MB_PER_ATOM_GUESS * n_guess * 2**20 > 0.9 * avail:
                    r = {"status": f"skipped (predicted {MB_PER_ATOM_GUESS * n_guess / 1024:.1f} GiB > 90% of the "
                                   f"{avail / 2**30:.1f} GiB available)"}
                else:
                    r = run_worker(spec, args.timeout)
                row = {"system": system, "size": size, "threads": threads, **r, "point_wall_s": round(time.time() - t0, 1),
                       "loadavg_1min": round(os.getloadavg()[0], 2), "commit": (meta.get("git_commit") or "")[:10]}
                row.setdefault("N", len(make_system(system, size)))
                rows.append(row)
                print(f"# {system} N={row['N']} {threads}t: {r.get('status')} full {r.get('full_wall_s', float('nan')):.2f} s "
                      f"(CPU {r.get('full_cpu_s', float('nan')):.2f}), LR {r.get('lr_wall_s', float('nan')):.2f} s, "
                      f"peak {r.get('peak_rss_mb', float('nan')) / 1024:.2f} GiB", flush=True)
    key = lambda r: (r["system"], r["size"], r["threads"], bool(r.get("lr_only")))  # noqa: E731
    keys = {key(r) for r in rows}
    rows = [r for r in old if key(r) not in keys] + rows
    rows.sort(key=lambda r: (r["system"] != "water", r["system"], r["N"], r["threads"]))
    summary = summarise(rows)
    meta["summary"] = summary
    write_results("scale", rows, meta, markdown(rows, meta, summary), out=args.out)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
