"""The benchmark harness: everything the studies share, in one module.

* machine stamp and timing: ``machine_info``, ``time_fn``, ``time_fns`` (interleaved), peak memory,
  ``write_results`` / ``markdown_table``;
* data: ``add_data_argument`` (``--data-dir``, default ``../shared/data`` next to the project),
  ``load_split`` (the fixed train/valid/test split every study uses), ``groups_for`` /
  ``group_errors`` (errors by group of structures), ``add_training_arguments``;
* structures: ``diamond``, ``water_box``, ``make_structure``;
* MACE at matched settings: ``build_mace``, ``mace_inputs``, ``MaceModel`` (MACE behind cartlorem's
  model contract, so that ``cartlorem.train.train`` trains it), ``peer_python`` (the venv made by
  ``setup_peers.sh``).

Each study is a script on top of this module: ``python benchmarks/<study>.py --help``.
"""


from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
PEER_PYTHON = Path(__file__).resolve().parent / ".venv-peers" / "bin" / "python"
MACE_MISSING = "MACE: not installed — run benchmarks/setup_peers.sh"


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


def command_line(script: str, argv: Optional[Sequence[str]] = None, *, prefix: str = "PYTHONPATH=$PWD python3") -> str:
    """The command that reruns a benchmark, for its results file: ``prefix benchmarks/<script> <argv>`` with
    the arguments shell-quoted (argv None: this process's), so that empty ones ('' of --placements) and ones
    with spaces or globs survive a copy into a shell."""
    args = sys.argv[1:] if argv is None else list(argv)
    return f"{prefix} benchmarks/{script}" + ("" if not args else " " + shlex.join(args))


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
        # a copy of the tree whose git folder is not its own (a GPU machine's) names its commit in CARTLOREM_GIT_COMMIT
        "git_commit": os.environ.get("CARTLOREM_GIT_COMMIT") or _git("rev-parse", "HEAD"),
        "git_dirty": None,
        "device": str(device) if device is not None else "cpu",
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    status = None if os.environ.get("CARTLOREM_GIT_COMMIT") else _git("status", "--porcelain", "--untracked-files=no")
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
    return write_json_md(stem, {"name": name, "meta": meta, "rows": list(rows)}, markdown)


#: ``--malloc tuned`` of the benchmarks: glibc keeps freed memory in its heap instead of returning every large
#: tensor to the kernel (each fresh mmap costs a page fault per 4 KiB when it is next written). The same
#: setting the README recommends for long runs; applied to every model of a comparison alike.
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def run_json_worker(cmd: Sequence[str], env: dict, timeout: float, *, skip_note: str = "",
                    tail_chars: int = 200) -> dict:
    """Run one benchmark point in a fresh process; its result is the last stdout line that starts with '{'.

    Returns {"status": "ok", **result}, or {"status": "skipped (...)"} past ``timeout`` seconds, or
    {"status": "failed (...)"} with the last stderr line (an exit by SIGKILL reads as out of memory).
    """
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"skipped ({skip_note}no result within {timeout:.0f} s)"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        if r.returncode in (-9, 137):
            return {"status": "failed (killed: out of memory?)"}
        return {"status": f"failed: {((r.stderr.strip().splitlines() or ['?'])[-1])[:tail_chars]}"}
    return {"status": "ok", **json.loads(lines[-1])}


def write_json_md(stem, data, markdown: Optional[str] = None) -> Path:
    """Write ``data`` to ``<stem>.json`` and ``markdown`` (if given) to ``<stem>.md``; returns the JSON path.

    ``stem`` is a path without extension (a ``.json`` / ``.md`` suffix is dropped); folders are created.
    """
    stem = Path(stem)
    if stem.suffix in (".json", ".md"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_name(stem.name + ".json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    if markdown is not None:
        with open(stem.with_name(stem.name + ".md"), "w") as f:
            f.write(markdown.rstrip("\n") + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# data


def add_data_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), metavar="DIR",
                   help="folder with the study's data sets (<set>.xyz; default: ../shared/data next to the "
                        "project, i.e. %(default)s)")


def data_file(data_dir, name: str) -> Path:
    """``data_dir/<name>.xyz``; SystemExit with a clear message when the folder or the file is missing. The
    name "demo" is the bundled demo set (cartlorem/datasets/demo.xyz) unless data_dir has its own."""
    folder = Path(data_dir)
    if name == "demo" and not (folder / "demo.xyz").is_file():
        from cartlorem.datasets import demo_path

        return Path(demo_path())
    if not folder.is_dir():
        raise SystemExit(f"error: data folder {folder} not found: pass --data-dir DIR (the folder holding "
                         f"{name}.xyz; by default ../shared/data next to the project)")
    path = folder / f"{name}.xyz"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.xyz"))
        raise SystemExit(f"error: no {name}.xyz in {folder} (it holds: {', '.join(have) or 'no .xyz files'})")
    return path


def groups_for(name: str, frames) -> dict[str, np.ndarray]:
    """Frame masks by group for the report: dimers by class and separation (< 5, 5–8, ≥ 8 Å), nacl by
    cluster, sn2 by |xi|, cumulene by torsion angle theta (0–30, 30–60, 60–90°); "all" for every set."""
    n = len(frames)
    out = {"all": np.ones(n, bool)}
    if name == "dimers":
        cls = np.array([a.info["classes"] for a in frames])
        sep = np.array([float(a.info["separation"]) for a in frames])
        for c in sorted(set(cls)):
            out[f"classes={c}"] = cls == c
        out["sep<5"] = sep < 5
        out["5<=sep<8"] = (sep >= 5) & (sep < 8)
        out["sep>=8"] = sep >= 8
    elif name == "nacl":
        cl = np.array([a.info["cluster"] for a in frames])
        for c in sorted(set(cl)):
            out[f"cluster={c}"] = cl == c
    elif name == "sn2":
        xi = np.abs(np.array([float(a.info["xi"]) for a in frames]))
        for lo, hi in [(0, 1), (1, 3), (3, 99)]:
            out[f"{lo}<=abs(xi)<{hi}"] = (xi >= lo) & (xi < hi)
    elif name == "cumulene":  # torsion ``theta`` (degrees, 0–90) between the two CH2 ends, ~9 Å apart
        theta = np.array([float(a.info["theta"]) for a in frames])
        for lo, hi, label in CUMULENE_THETA_BINS:
            out[label] = (theta >= lo) & (theta < hi)
    return out


#: torsion bins of the cumulene groups: (from, below, label), degrees
CUMULENE_THETA_BINS = [(0.0, 30.0, "theta<30"), (30.0, 60.0, "30<=theta<60"), (60.0, math.inf, "theta>=60")]


def group_errors(pred, masks) -> dict:
    """MAE per group of structures: energy meV/atom, force components meV/Å."""
    e_err = np.abs(pred.energy_pred - pred.energy_ref) / pred.n_atoms * 1000.0  # [M] meV/atom
    f_err = np.abs(pred.forces_pred - pred.forces_ref) * 1000.0  # [N, 3] meV/Å
    res = {}
    for g, m in masks.items():
        if m.sum() == 0:
            continue
        atoms_in = m[pred.structure]
        res[g] = {"n": int(m.sum()), "energy_mae_mev_per_atom": float(e_err[m].mean()),
                  "forces_mae_mev_per_a": float(f_err[atoms_in].mean())}
    return res


def _add_model_arguments(p, channels_help: Optional[str] = None) -> None:
    """--channels, --cutoff, --batch-size, --lr, --energy-weight, --dtype, --seed (every training study)."""
    p.add_argument("--channels", type=int, default=16, help=channels_help)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--energy-weight", type=float, default=10.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)


def add_training_arguments(p) -> None:
    """Model, data and optimiser options shared by long_range.py and accuracy.py (same defaults)."""
    _add_model_arguments(p, channels_help="C (for MACE too in accuracy.py)")
    p.add_argument("--correlation", type=int, default=2, help="body order of the products")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--max-frames", type=int, default=0, help="use only the first N frames (0: all)")


def add_study_arguments(p, *, variants: Sequence[str], out: str, epochs: int, budget: Optional[float] = None,
                        default_variants: Optional[Sequence[str]] = None, quick_help: str = "") -> None:
    """The options of the variant studies (charge_units, dipole_study, bec_study, charge_state): the model
    and optimiser options above plus --epochs, --budget (wall-clock cap per model, s), --threads,
    --variants (a comma list of ``variants``), --quick and --out. Check them with :func:`study_variants`."""
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--budget", type=float, default=budget, help="wall-clock cap per model in seconds")
    _add_model_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(default_variants or variants),
                   help=f"comma list of {', '.join(variants)}")
    p.add_argument("--quick", action="store_true", help=quick_help or "smoke test, results not written")
    p.add_argument("--out", default=out)


def study_variants(p, args, variants: Sequence[str]) -> list:
    """The --variants of a study as a list (p.error unless a non-empty subset of ``variants``); sets
    torch's thread count from --threads."""
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not chosen or not set(chosen) <= set(variants):
        p.error(f"--variants: a comma list of {', '.join(variants)}")
    torch.set_num_threads(args.threads)
    return chosen


def load_split(name, args):
    """Frames, graphs, species and the fixed (train, valid, test) split of one data set."""
    from ase.io import read

    from cartlorem.data import read_dataset, split

    frames = read(data_file(args.data_dir, name), ":")
    if args.max_frames:
        frames = frames[: args.max_frames]
    graphs = read_dataset(frames, args.cutoff, require=("energy", "forces"))
    species = sorted({int(z) for a in frames for z in a.numbers})
    rest, test_idx = split(len(graphs), valid_fraction=args.test_fraction, seed=args.seed)
    tr_local, va_local = split(len(rest), valid_fraction=0.1, seed=args.seed + 1)
    train_idx, valid_idx = rest[tr_local], rest[va_local]
    return frames, graphs, species, train_idx, valid_idx, test_idx


# --------------------------------------------------------------------------------------------------
# structures

def diamond(n: int, rattle: float = 0.05, seed: int = 0):
    """Periodic diamond carbon, a = 3.567 Å, n×n×n conventional cells (8 n³ atoms), positions
    rattled by ``rattle`` Å (Gaussian, seeded) like a thermal snapshot; the neighbour count is that of
    the perfect crystal."""
    from ase.build import bulk

    atoms = bulk("C", "diamond", a=3.567, cubic=True).repeat((n, n, n))
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def water_box(m: int, density: float = 1.0, seed: int = 0):
    """Periodic box of m³ water molecules on a cubic grid at ``density`` g/cm³, random orientations."""
    from ase import Atoms
    from ase.units import _Nav

    rng = np.random.default_rng(seed)
    spacing = (18.015 / (density * _Nav) * 1e24) ** (1.0 / 3.0)  # Å per molecule (cube root of volume)
    angle = math.radians(104.52)
    local = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0],
                      [0.9572 * math.cos(angle), 0.9572 * math.sin(angle), 0.0]])  # O, H, H
    local -= local.mean(0)
    positions = []
    for idx in np.ndindex(m, m, m):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        w, x, y, z = q  # uniform random rotation from a unit quaternion
        rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        positions.append((np.array(idx) + 0.5) * spacing + local @ rot.T)
    L = m * spacing
    return Atoms("OH2" * m**3, positions=np.concatenate(positions), cell=np.eye(3) * L, pbc=True)


def make_structure(system: str, size: int):
    return diamond(size) if system == "diamond" else water_box(size)


ATOMS_PER = {"diamond": lambda n: 8 * n**3, "water": lambda m: 3 * m**3}


# --------------------------------------------------------------------------------------------------
# MACE at matched settings (needs the peers venv)

def build_matched_cartlorem(species, channels: int, cutoff: float, long_range=None,
                            avg_num_neighbors: Optional[float] = None):
    """cartlorem at the settings matched to :func:`build_mace` (speed.py, gpu_profile.py): two layers,
    correlation 3, lmax 2, 8 Bessel functions, radial MLP 3 × 64, readout MLP 16."""
    import cartlorem

    return cartlorem.CartLorem(species, cutoff=cutoff, long_range=long_range, channels=channels, num_layers=2,
                               correlation=3, lmax=2, num_basis=8, radial_hidden=64, readout_hidden=16,
                               avg_num_neighbors=avg_num_neighbors)


def resolve_devices(text: str) -> list[str]:
    """A comma list of devices resolved by :func:`resolve_device` (CUDA → CPU without CUDA), duplicates
    dropped: the devices a benchmark really runs on, and labels its rows with."""
    return list(dict.fromkeys(str(resolve_device(d.strip())) for d in text.split(",") if d.strip()))


def build_mace(species, channels: int = 64, cutoff: float = 5.0, *, atomic_energies=None,
               avg_num_neighbors: float = 10.0, scale: float = 1.0, shift: float = 0.0,
               correlation: int = 3, num_interactions: int = 2):
    """ScaleShiftMACE with the settings that match cartlorem's defaults: 5 Å cutoff, features up to
    l = 2 with ``channels`` each, 2 interactions (``RealAgnosticInteractionBlock`` first,
    ``RealAgnosticResidualInteractionBlock`` after, as ``mace_run_train`` builds it), max_ell 2,
    8 Bessel functions with a p = 5 envelope, radial MLP 3 × 64, readout MLP 16."""
    from e3nn import o3
    from mace import modules

    species = sorted(int(z) for z in species)
    e0 = np.array([float((atomic_energies or {}).get(z, 0.0)) for z in species])
    return modules.ScaleShiftMACE(
        r_max=float(cutoff), num_bessel=8, num_polynomial_cutoff=5, max_ell=2,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=num_interactions, num_elements=len(species),
        hidden_irreps=o3.Irreps(f"{channels}x0e+{channels}x1o+{channels}x2e"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=e0, avg_num_neighbors=float(avg_num_neighbors),
        atomic_numbers=species, correlation=correlation, gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64], use_reduced_cg=False,
        atomic_inter_scale=float(scale), atomic_inter_shift=float(shift),
    )


def mace_for_training_set(species, train_graphs, channels: int, cutoff: float, correlation: int, dtype):
    """:func:`build_mace` as the accuracy studies train it: reference energies and scale / shift from the
    training graphs (cartlorem's own statistics), behind :class:`MaceModel`, in ``dtype`` (also made the
    default dtype, as MACE builds some of its buffers in it)."""
    from cartlorem.data import training_statistics

    stats = training_statistics(train_graphs, species)  # as cartlorem's
    refs = stats["reference_energies"]
    torch.set_default_dtype(dtype)
    mace = build_mace(species, channels, cutoff, atomic_energies=refs, avg_num_neighbors=stats["avg_num_neighbors"],
                      scale=stats["forces_rms"] or stats["residual_energy_per_atom_std"] or 1.0,
                      shift=stats["residual_energy_per_atom_mean"], correlation=correlation)
    return MaceModel(mace, species).to(dtype)


def mace_inputs(graph, species, dtype=None, device=None) -> dict:
    """cartlorem Graph → MACE's input dict (same edges: sender = centre i, receiver = neighbour j).

    MACE's edge vector is positions[receiver] − positions[sender] + shifts, cartlorem's r_ij =
    positions[j] − positions[i] + edge_shift @ cell: the same vector with edge_index unchanged. The
    neighbour list is full (both directions), so every atom receives the messages of all neighbours.
    """
    g = graph.to(device=device, dtype=dtype)
    species = sorted(int(z) for z in species)
    index = torch.full((119,), -1, dtype=torch.long, device=g.species.device)
    index[species] = torch.arange(len(species), device=g.species.device)
    one_hot = torch.nn.functional.one_hot(index[g.species], len(species)).to(g.positions.dtype)
    i = g.edge_index[0]
    shifts = torch.einsum("ek,ekx->ex", g.edge_shift, g.cell[g.batch[i]])
    counts = torch.bincount(g.batch, minlength=g.num_graphs)
    ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return {"positions": g.positions.clone(), "node_attrs": one_hot, "edge_index": g.edge_index,
            "shifts": shifts, "unit_shifts": g.edge_shift, "cell": g.cell.reshape(-1, 3),
            "batch": g.batch, "ptr": ptr, "pbc": g.pbc}


def n_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


class MaceModel(torch.nn.Module):
    """MACE behind cartlorem's model interface: forward(graph, compute_forces, compute_stress,
    create_graph) → {"energy" [B], "forces" [N, 3], "stress" [B, 3, 3]}; trained by
    cartlorem.train.train and scored by cartlorem.evaluate.predict."""

    def __init__(self, mace, species):
        super().__init__()
        self.mace, self.species = mace, sorted(species)

    def forward(self, graph, compute_forces=True, compute_stress=None, create_graph=None):
        p = next(self.parameters())
        if compute_stress is None:
            compute_stress = bool(graph.pbc.any())
        create_graph = self.training if create_graph is None else create_graph
        data = mace_inputs(graph, self.species, p.dtype, p.device)
        with torch.enable_grad():
            out = self.mace(data, training=create_graph, compute_force=compute_forces,
                            compute_stress=compute_stress)
        res = {"energy": out["energy"], "forces": out["forces"]}
        if compute_stress and out.get("stress") is not None:
            res["stress"] = out["stress"]
        if not create_graph:
            res = {k: v.detach() for k, v in res.items()}
        return res


def peer_python() -> tuple[str | None, str | None]:
    """(interpreter that can import mace, None) or (None, reason).

    The peers venv (``setup_peers.sh``), or the interpreter named by the environment variable
    ``CARTLOREM_PEER_PYTHON`` (a machine whose own Python has mace-torch and e3nn 0.4.4 installed, such as
    a GPU machine set up by ``benchmarks/gpu.sh``)."""
    python = os.environ.get("CARTLOREM_PEER_PYTHON") or str(PEER_PYTHON)
    if not Path(python).exists():
        return None, MACE_MISSING
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    r = subprocess.run([python, "-c", "import mace.modules"], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return None, f"{MACE_MISSING} (import failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})"
    return python, None
