"""Shared helpers for the benchmark scripts: machine stamp, timing, peak memory, result files.

    from _common import machine_info, time_fn, write_results

``machine_info()`` is a flat JSON-able dict (merge it into a script's own metadata),
``time_fn(fn, warmup, repeats, sync)`` times a callable with ``time.perf_counter`` (median and
inter-quartile range in seconds), ``time_fns`` times several callables interleaved (fair on a
shared machine whose load drifts), ``write_results(name, rows, meta)`` writes
``results/<name>.json`` (and ``.md`` when given a Markdown table).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]

__all__ = [
    "RESULTS_DIR", "machine_info", "resolve_device", "sync_fn", "time_fn", "time_fns", "write_results",
    "markdown_table", "mem_available_bytes", "reset_peak_memory", "peak_memory_bytes",
]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def mem_available_bytes(device: Optional[torch.device] = None) -> Optional[int]:
    """Free memory on ``device``: MemAvailable from /proc/meminfo on CPU, free GPU memory on CUDA."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def proc_kib_field(path: str, key: str) -> Optional[int]:
    """A ``key:  <n> kB`` line of a /proc file in bytes (None where /proc or the key is missing)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(device: Optional[torch.device] = None) -> dict:
    """Where and with what a benchmark ran: CPU model, cores, threads, memory, versions, git, date.

    ``loadavg_1min`` is the machine's load when this is called: on a shared machine, a load above the
    core count means other processes competed for the cores and the timings are pessimistic.
    """
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_num_threads": torch.get_num_threads(),
        "mem_total_gib": None,
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None,
        "device": str(device) if device is not None else "cpu",
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = None if status is None else bool(status)
    for name in ("e3nn", "opt_einsum", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, falling back to CPU (with a message) when CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"# --device {name}: CUDA is not available, running on CPU")
        return torch.device("cpu")
    return device


def sync_fn(device: torch.device) -> Optional[Callable[[], None]]:
    """The synchronisation a timer needs on ``device`` (None on CPU)."""
    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def time_fn(fn: Callable[[], object], warmup: int = 1, repeats: int = 5,
            sync: Optional[Callable[[], None]] = None) -> dict:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` calls one by one.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before starting and before stopping each clock,
    so asynchronous devices are timed honestly. Returns seconds: ``median``, ``iqr`` (75th − 25th
    percentile), ``mean``, ``min``, ``max``, ``times`` (every repeat), ``cpu_median`` (process CPU
    time, all threads: wall ≫ cpu / threads means the cores were shared), ``warmup``, ``repeats``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        if sync is not None:
            sync()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {**_stats(times), "cpu_median": statistics.median(cpu), "warmup": warmup, "repeats": repeats}


def _stats(times: list[float]) -> dict:
    if len(times) >= 2:
        q = statistics.quantiles(times, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return {"median": statistics.median(times), "iqr": iqr, "mean": statistics.fmean(times),
            "min": min(times), "max": max(times), "times": times}


def time_fns(fns: dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 5,
             sync: Optional[Callable[[], None]] = None) -> dict[str, dict]:
    """Time several callables interleaved: repeat r runs each once, in an order rotated by r.

    On a shared machine the load drifts; interleaving lets every contender see the same drift, so
    their ratio stays meaningful. Warm-up runs each ``warmup`` times first. Returns, per name, what
    ``time_fn`` returns.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            if sync is not None:
                sync()
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: {**_stats(times[name]), "cpu_median": statistics.median(cpu[name]), "warmup": warmup,
                   "repeats": repeats, "interleaved": True} for name in names}


def reset_peak_memory(device: Optional[torch.device] = None) -> None:
    """Restart peak-memory tracking (CUDA allocator stats, or the process's peak RSS on Linux)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # writing 5 to clear_refs resets VmHWM (Linux ≥ 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: Optional[torch.device] = None) -> Optional[int]:
    """Peak memory since ``reset_peak_memory``: CUDA allocator peak, or the process's peak RSS."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` are (header, key) pairs, missing keys print as '—'."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key in columns:
            v = row.get(key)
            cells.append("—" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[dict], meta: dict, markdown: Optional[str] = None,
                  out: Optional[str | os.PathLike] = None) -> Path:
    """Write ``{"meta": meta, "rows": rows}`` to ``<out>.json`` (and ``markdown`` to ``<out>.md``).

    ``out`` is a path stem (an extension, if given, is dropped); default ``results/<name>``.
    Returns the JSON path.
    """
    stem = Path(out) if out is not None else RESULTS_DIR / name
    if stem.suffix in (".json", ".md"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_name(stem.name + ".json")
    with open(path, "w") as f:
        json.dump({"name": name, "meta": meta, "rows": list(rows)}, f, indent=1)
        f.write("\n")
    if markdown is not None:
        with open(stem.with_name(stem.name + ".md"), "w") as f:
            f.write(markdown.rstrip("\n") + "\n")
    return path
