"""Energy conservation in NVE molecular dynamics: a measurement, not a promise.

Velocity Verlet (ASE's ``VelocityVerlet``) through ``cartlorem.CartLoremCalculator``, positions never
wrapped back into the cell (ASE's MD does not wrap; the calculator sees the raw, growing
coordinates). For every run the total energy E = E_pot + E_kin is recorded at every step and

* drift: the slope of a least-squares line through E(t), in meV/atom/ps (with its standard error
  from the fit residuals, which treats them as independent and so understates the uncertainty);
* fluctuation: the RMS of E(t) about that line, in meV/atom (the integrator's bounded oscillation
  and float rounding, with the drift taken out); also the standard deviation about the mean and
  the largest |E(t) − E(0)|;
* ms/step: wall-clock and process-CPU time of one MD step (one energy + forces call plus the
  integrator), median over the run.

Runs (``--runs``):

* ``nacl-float64`` / ``nacl-float32``: 64-atom periodic rocksalt NaCl (2×2×2 conventional cell,
  lattice constant from the training data), Maxwell–Boltzmann start at 300 K, 10 ps at 1 fs.
* ``water-float32``: a periodic box of 7³ = 343 water molecules (1029 atoms) at 1 g/cm³ on a cubic
  grid with random orientations (each the farthest from its neighbours out of 60 tries; 1.93 Å
  closest intermolecular distance), Maxwell–Boltzmann start at 300 K, then 0.05 ps of Langevin MD
  with the model at 300 K (``--equilibrate-ps``, ``--friction``; same dtype and timestep, positions
  not wrapped either) to melt the grid, then 2 ps of NVE at 1 fs from where it ended, velocities
  kept. The row reports whether every molecule is still whole at the end (largest intramolecular
  and smallest intermolecular distance).

Models (trained here, nothing committed): ``long_range="multipole"``, 16 channels, correlation 2,
otherwise the defaults (2 layers, rank ≤ 2, 5 Å, 4 long-range channels, smearing 1 Å), trained in
float32. NaCl: trained on ``nacl_pbc.xyz`` (64-atom periodic NaCl, GFN1-xTB, with stress) from
``--data-dir``; water: trained on the periodic bulk-water sets ``benchmarks/data/water_pbc.xyz`` and
``benchmarks/data/water_contacts.xyz`` (``--water-data``; 27-molecule boxes, GFN1-xTB, with stress:
Langevin MD from the grid into the liquid, rattled and strained frames, and close contacts —
boxes compressed to 1.2–1.6 g/cm³, intermolecular O–O pairs pushed to 1.8–2.3 Å, O–H and H–H
pairs to 1.1–1.6 Å, a 600 K MD; made by ``benchmarks/water_data.py``: without the close contacts
the model had no repulsive wall below 2.34 Å O–O and two oxygen atoms fell together within
0.1 ps), with ``--batch-size``, ``--lr``, ``--water-channels`` and ``--water-cutoff`` (the
committed row: 8 channels, 4 Å, a cheaper model: this measures conservation, not accuracy).
``--check M:STEPS:T,...`` only trains (or loads) the water model and runs short Langevin
stability checks on boxes of M³ molecules, reporting the smallest intermolecular O–O distance. (A model trained on the 4-water clusters of the bundled demo set was
unstable in bulk water: it heated to 2500 K and two atoms collided within 0.17 ps.) Few epochs
only: the benchmark measures conservation — whether the forces are the exact negative gradient of
the energy the model reports, the integrator's error and float32 rounding — not accuracy, so the
training quality matters only in so far as the dynamics must stay stable. The float32 runs cast
the same trained model to float32 (``CartLoremCalculator(dtype=...)``).

    python benchmarks/nve.py --quick                                    # smoke test (~2 min)
    python benchmarks/nve.py                                            # all three runs, full length
    python benchmarks/nve.py --runs water-float32 --epochs 12 --merge --deadline 06:05   # one run, stopped in time
    python benchmarks/nve.py --render                                   # rewrite nve.md from nve.json
    python benchmarks/nve.py --runs water-float32 --water-channels 8 --water-cutoff 4 --check 4:300:400,7:100:300

``--merge`` keeps the rows of other runs already in the results file (several processes can run
different ``--runs`` in parallel: writes are serialised by a lock, and ``--model-dir`` lets them
share one trained model). ``--max-time`` stops a run's MD after that many seconds of wall time and
reports the simulated time it reached (flagged in the table); ``--deadline HH:MM`` (UTC) does the
same at a time of day, so that a run cut short still writes its row. Writes ``benchmarks/results/nve.json``,
``nve.md`` and ``nve.png`` (energy traces; needs matplotlib), stamped with the git commit, machine,
load average and library versions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: cartlorem and benchmarks
from benchmarks.harness import REPO_ROOT, RESULTS_DIR, add_data_argument, data_file, machine_info  # noqa: E402

DEFAULT_OUT = RESULTS_DIR / "nve"

RUNS = ("nacl-float64", "nacl-float32", "water-float32")
TARGETS = {"float64": 0.01, "float32": 0.05}  # |drift| in meV/atom/ps
DEFAULTS = {  # per system: simulated ps, timestep fs, start temperature K, thermostatted equilibration ps
    "nacl": {"ps": 10.0, "timestep_fs": 1.0, "temperature_k": 300.0, "equilibrate_ps": 0.0},
    "water": {"ps": 2.0, "timestep_fs": 1.0, "temperature_k": 300.0, "equilibrate_ps": 0.05},
}
_DATA = Path(__file__).resolve().parent / "data"
WATER_DATA = (_DATA / "water_pbc.xyz", _DATA / "water_contacts.xyz")  # made by benchmarks/water_data.py
MODEL_OPTIONS = {"long_range": "multipole", "channels": 16, "correlation": 2}  # NaCl; water: --water-channels, --water-cutoff
UNSTABLE_EV_PER_ATOM = 1.0  # |E(t) − E(0)| per atom beyond which a run is called unstable and stopped
WATER_OH, WATER_HOH = 0.9572, 104.52  # Å, degrees (the geometry of the grid's molecules)


# --------------------------------------------------------------------------------------------------
# the metric


def conservation_metrics(time_ps: Sequence[float], total_energy_ev: Sequence[float], n_atoms: int) -> dict:
    """Drift and fluctuation of a total-energy series.

    Args:
        time_ps: [T] times in ps (at least 3, not all equal).
        total_energy_ev: [T] total energy of the whole system in eV.
        n_atoms: number of atoms (the per-atom normalisation).

    Returns a dict (meV/atom and meV/atom/ps):
        ``drift_mev_per_atom_per_ps``: slope of the least-squares line E(t) = a + b t, per atom;
        ``drift_stderr_mev_per_atom_per_ps``: its standard error from the residuals (assumes
        independent residuals, so it understates the uncertainty of a correlated series);
        ``rms_fluctuation_mev_per_atom``: RMS of the residuals about that line;
        ``std_mev_per_atom``: standard deviation about the mean (drift included);
        ``max_deviation_mev_per_atom``: max |E(t) − E(t0)|; ``duration_ps``; ``points``.

    Raises ValueError for mismatched lengths, fewer than 3 points, non-finite values, times that
    do not span an interval, or n_atoms < 1.
    """
    t = np.asarray(time_ps, dtype=np.float64)
    e = np.asarray(total_energy_ev, dtype=np.float64)
    if t.ndim != 1 or e.ndim != 1 or t.shape != e.shape:
        raise ValueError(f"time_ps and total_energy_ev must be 1-D of the same length, got {t.shape} and {e.shape}")
    if len(t) < 3:
        raise ValueError(f"need at least 3 points to fit a drift and its spread, got {len(t)}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(e))):
        raise ValueError("time_ps and total_energy_ev must be finite (a NaN energy means the run failed)")
    if int(n_atoms) != n_atoms or n_atoms < 1:
        raise ValueError(f"n_atoms must be a positive integer, got {n_atoms}")
    tc = t - t.mean()
    stt = float(tc @ tc)
    if not stt > 0:
        raise ValueError("time_ps must span an interval (all times are equal)")
    scale = 1000.0 / n_atoms  # eV → meV/atom
    ec = (e - e[0]) * scale  # subtract E(t0) first: a large total energy must not cost precision
    slope = float(tc @ (ec - ec.mean())) / stt
    resid = ec - ec.mean() - slope * tc
    dof = len(t) - 2
    stderr = math.sqrt(float(resid @ resid) / dof / stt) if dof > 0 else float("nan")
    return {
        "drift_mev_per_atom_per_ps": slope,
        "drift_stderr_mev_per_atom_per_ps": stderr,
        "rms_fluctuation_mev_per_atom": float(np.sqrt(np.mean(resid**2))),
        "std_mev_per_atom": float(np.std(ec)),
        "max_deviation_mev_per_atom": float(np.max(np.abs(ec))),
        "duration_ps": float(t[-1] - t[0]),
        "points": int(len(t)),
    }


# --------------------------------------------------------------------------------------------------
# structures


def nacl_crystal(a: float, repeat: int = 2):
    """Rocksalt NaCl, ``repeat``³ conventional cells of lattice constant ``a`` Å (8 repeat³ atoms), periodic."""
    from ase import Atoms

    if not a > 0 or int(repeat) < 1:
        raise ValueError(f"lattice constant must be positive and repeat >= 1, got a={a}, repeat={repeat}")
    fcc = np.array([[0.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
    cell = Atoms("Na4Cl4", scaled_positions=np.concatenate([fcc, fcc + [0.5, 0.0, 0.0]]) % 1.0,
                 cell=np.eye(3) * float(a), pbc=True)
    return cell.repeat((int(repeat),) * 3)


def lattice_constant_from(frames) -> float:
    """Rocksalt lattice constant (Å) of a set of NaCl cells: median of (8 V / N)^(1/3)."""
    a = [(8.0 * atoms.get_volume() / len(atoms)) ** (1.0 / 3.0) for atoms in frames if atoms.pbc.all()]
    if not a:
        raise ValueError("no periodic frames to take a lattice constant from")
    return float(np.median(a))


def water_box(m: int, density: float = 1.0, seed: int = 0, tries: int = 60):
    """Periodic cubic box of m³ water molecules (3 m³ atoms) on a grid at ``density`` g/cm³.

    Each molecule (O–H 0.9572 Å, H–O–H 104.52°) sits at its grid point with the random orientation,
    out of ``tries``, that keeps it farthest from the atoms already placed (minimum-image distances),
    so that no two molecules start in contact. Returns an ``ase.Atoms`` (O, H, H per molecule).
    """
    from ase import Atoms
    from ase.units import _Nav

    if int(m) < 1 or not density > 0:
        raise ValueError(f"need m >= 1 molecules per side and a positive density, got m={m}, density={density}")
    m = int(m)
    rng = np.random.default_rng(seed)
    spacing = (18.015 / (density * _Nav) * 1e24) ** (1.0 / 3.0)  # Å: cube root of the volume per molecule
    L = m * spacing
    ang = math.radians(WATER_HOH)
    local = np.array([[0.0, 0.0, 0.0], [WATER_OH, 0.0, 0.0], [WATER_OH * math.cos(ang), WATER_OH * math.sin(ang), 0.0]])
    local -= local.mean(0)
    placed = np.zeros((0, 3))
    for idx in np.ndindex(m, m, m):
        centre = (np.array(idx) + 0.5) * spacing
        mols = centre + np.einsum("ab,tcb->tac", local, np.stack([_random_rotation(rng) for _ in range(tries)]))
        near = placed[np.linalg.norm(_minimum_image(placed - centre, L), axis=1) < 4.0]
        if len(near):  # [tries, 3, near] distances; keep the orientation whose closest contact is farthest
            d = np.linalg.norm(_minimum_image(mols[:, :, None, :] - near[None, None], L), axis=-1)
            mols = mols[[int(np.argmax(d.min(axis=(1, 2))))]]
        placed = np.concatenate([placed, mols[0]])
    return Atoms("OH2" * m**3, positions=placed, cell=np.eye(3) * L, pbc=True)


def _minimum_image(d: np.ndarray, L: float) -> np.ndarray:
    return d - L * np.round(d / L)


def _random_rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)  # a uniform random rotation from a unit quaternion
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def min_intermolecular_distance(atoms, atoms_per_molecule: int = 3) -> float:
    """Smallest distance (Å, minimum image) between atoms of different molecules, molecules being
    consecutive blocks of ``atoms_per_molecule`` atoms (O(N²) memory: for checks and reports)."""
    d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    mol = np.arange(len(atoms)) // atoms_per_molecule
    d[mol[:, None] == mol[None, :]] = np.inf
    return float(d.min())


# --------------------------------------------------------------------------------------------------
# machine stamp, locks, results


def _machine_info() -> dict:
    """The harness's machine stamp plus the ASE and cartlorem versions."""
    info = machine_info()
    import ase

    import cartlorem

    info["ase"] = ase.__version__
    info["cartlorem"] = getattr(cartlorem, "__version__", None)
    return info


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock (fcntl) on a file in the temp folder named after ``path``: parallel runs of
    this script serialise their read-modify-write of one results file or one trained model."""
    import fcntl

    tag = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"cartlorem_nve_{tag}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _git_commit() -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------------
# training (or loading the model trained by a parallel run)


def _training_frames(system: str, data_dir: Path, quick: bool, water_data=WATER_DATA):
    """(frames, where they came from) for ``system``; ``water_data``: one path or several (their
    frames joined, in order; the ``source`` is the paths joined by commas)."""
    from ase.io import read

    if system == "nacl":
        path = data_file(data_dir, "nacl_pbc")  # SystemExit with a clear message when missing
        frames = read(path, ":")
        source = str(path)
    else:
        paths = [Path(water_data)] if isinstance(water_data, (str, Path)) else [Path(x) for x in water_data]
        frames = []
        for path in paths:
            if not path.is_file():
                raise SystemExit(f"error: no water training set at {path}: make it with "
                                 f"`python benchmarks/water_data.py {path}` (see its docstring) or pass --water-data FILE[,FILE]")
            frames += read(path, ":")
        source = ",".join(str(x) for x in paths)
    if quick:
        frames = frames[: (24 if system == "nacl" else 60)]
    return frames, source


def get_model(system: str, args, log) -> tuple:
    """Train (or load from ``--model-dir``) the multipole model of ``system``. Returns (model, info)."""
    import torch

    import cartlorem
    from cartlorem.data import read_dataset, split
    from cartlorem.train import train

    frames, source = _training_frames(system, args.data_dir, args.quick, args.water_data)
    options = water_model_options(args) if system == "water" else MODEL_OPTIONS
    if args.train_frames and len(frames) > args.train_frames:
        idx = np.random.default_rng(args.seed).permutation(len(frames))[: args.train_frames]
        frames = [frames[k] for k in np.sort(idx)]
    settings = {"system": system, "source": source, "frames": len(frames), "epochs": args.epochs,
                "train_time_s": args.train_time, "seed": args.seed, "model": options,
                "train_dtype": args.train_dtype, "source_size": sum(os.path.getsize(x) for x in source.split(",")),
                "quick": bool(args.quick),
                "cartlorem": getattr(cartlorem, "__version__", None)}
    if system == "water":  # the NaCl key stays as it was, so that its trained model is found again
        settings.update({"batch_size": args.batch_size, "lr": args.lr})
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    model_dir = Path(args.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / f"nve_{system}_{key}.pt"
    info_path = path.with_suffix(".json")
    with _locked(path):
        if path.is_file() and info_path.is_file():
            try:
                model = cartlorem.load_model(path)
            except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # written by an incompatible version
                log(f"[{system}] cannot load {path} ({exc}); training a new model")
            else:
                info = json.loads(info_path.read_text())
                log(f"[{system}] loading the model trained earlier (commit {str(info.get('trained_at_commit'))[:10]}): {path}")
                return model, info
        species = sorted({int(z) for a in frames for z in a.numbers})
        model = cartlorem.CartLorem(species, **options)
        model = model.to(getattr(torch, args.train_dtype))
        graphs = read_dataset(frames, cutoff=model.cutoff, dtype=getattr(torch, args.train_dtype))
        tr, va = split(graphs, 0.1, seed=args.seed)
        log(f"[{system}] training {options} on {len(tr)} structures ({len(va)} validation) of {source}, "
            f"at most {args.epochs} epochs / {args.train_time:.0f} s, {args.train_dtype}")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            extra = {"batch_size": args.batch_size, "lr": args.lr} if system == "water" else {}
            res = train(model, [graphs[k] for k in tr], [graphs[k] for k in va], epochs=args.epochs,
                        out_dir=run_dir, progress=False, seed=args.seed, max_time=args.train_time, **extra)
        info = {"source": source, "train_structures": int(len(tr)), "valid_structures": int(len(va)),
                "species": species, "options": options, "train_dtype": args.train_dtype,
                "epochs_run": res.epochs_completed, "stopped_by": res.stop_reason,
                "train_wall_s": round(time.perf_counter() - t0, 1),
                "valid_energy_mae_mev_per_atom": res.best_metrics.get("energy_mae_mev_per_atom"),
                "valid_forces_mae_mev_per_a": res.best_metrics.get("forces_mae_mev_per_a"),
                "scale": float(model.scale), **({"batch_size": args.batch_size, "lr": args.lr} if system == "water" else {}), "parameters": int(sum(p.numel() for p in model.parameters())),
                "key": key, "trained_at_commit": _git_commit(),
                "trained_on": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        log(f"[{system}] trained: {info}")
        cartlorem.save_model(model, path)
        info_path.write_text(json.dumps(info, indent=1))
        return model, info


def water_model_options(args) -> dict:
    """The water model's constructor options: ``MODEL_OPTIONS`` with ``--water-channels`` and
    ``--water-cutoff`` (Å); the defaults (16, 5 Å) give exactly ``MODEL_OPTIONS``."""
    opts = dict(MODEL_OPTIONS, channels=int(args.water_channels))
    if args.water_cutoff != 5.0:
        opts["cutoff"] = float(args.water_cutoff)
    return opts


# --------------------------------------------------------------------------------------------------
# one NVE run


def run_nve(atoms, model, dtype: str, timestep_fs: float, steps: int, temperature_k: float, *, seed: int = 0,
            max_time: Optional[float] = None, log=print, label: str = "", equilibrate_steps: int = 0,
            friction_per_fs: float = 0.05, molecule_size: Optional[int] = None) -> dict:
    """Velocity Verlet from a Maxwell–Boltzmann start (zero total momentum); positions never wrapped.

    atoms: the start structure (copied). model: a CartLorem. dtype: "float32" or "float64".
    timestep_fs: fs. steps: MD steps. temperature_k: K of the initial velocities (and of the
    thermostat). equilibrate_steps: first run this many Langevin steps (ASE ``Langevin`` at
    temperature_k, friction ``friction_per_fs`` 1/fs, same timestep, same model and dtype, positions
    not wrapped either), then start the NVE run from where it ended, velocities kept.
    molecule_size: atoms per molecule (consecutive blocks, e.g. 3 for water): the row then reports
    the largest intramolecular and smallest intermolecular distance at the end (is every molecule
    still whole?). max_time: stop after this many seconds of wall time, equilibration included (the
    result says so). Returns the metrics of :func:`conservation_metrics`, timings and thinned
    energy and temperature traces.
    """
    from ase import units
    from ase.md.verlet import VelocityVerlet

    import cartlorem

    atoms = atoms.copy()
    n = len(atoms)
    atoms.calc = cartlorem.CartLoremCalculator(model, dtype=dtype)
    masses = atoms.get_masses()[:, None]
    momenta = np.random.default_rng(seed).standard_normal((n, 3)) * np.sqrt(masses * units.kB * temperature_k)
    atoms.set_momenta(momenta - masses * (momenta.sum(0) / masses.sum()))  # Maxwell–Boltzmann, zero total momentum
    start_positions = atoms.get_positions().copy()
    load_start = os.getloadavg()[0]
    t_run = time.perf_counter()
    equilibration = None
    if equilibrate_steps > 0:
        equilibration = _equilibrate(atoms, timestep_fs, int(equilibrate_steps), temperature_k, friction_per_fs,
                                     seed, max_time, log, label)
        if max_time is not None:
            max_time = max(1.0, max_time - (time.perf_counter() - t_run))
    t_first = time.perf_counter()
    epot = [atoms.get_potential_energy()]  # the first call builds the neighbour list
    first_call_s = time.perf_counter() - t_first
    ekin = [atoms.get_kinetic_energy()]
    wall, cpu = [], []
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    status, t_md = "completed", time.perf_counter()
    if equilibration is not None and equilibration["status"] != "completed":  # no NVE run from a failed start
        status, steps = f"equilibration {equilibration['status']}", 0
    e0 = epot[0] + ekin[0]
    report_every, last_report = max(1, steps // 40), time.perf_counter()
    for k in range(1, steps + 1):
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            dyn.run(1)
            ep = atoms.get_potential_energy()
        except ValueError as exc:  # e.g. overlapping atoms refused by the graph builder
            status = f"unstable at step {k}: {exc}"
            break
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        epot.append(ep)
        ekin.append(atoms.get_kinetic_energy())
        e = epot[-1] + ekin[-1]
        if not math.isfinite(e) or abs(e - e0) / n > UNSTABLE_EV_PER_ATOM:
            status = f"unstable at step {k}: |E - E0| = {abs(e - e0) / n:.3g} eV/atom"
            epot.pop(), ekin.pop()
            break
        if k % report_every == 0 or time.perf_counter() - last_report > 60:  # at least every minute
            last_report = time.perf_counter()
            log(f"[{label}] step {k}/{steps} ({k * timestep_fs / 1000:.3f} ps), E-E0 {1000 * (e - e0) / n:+.4f} "
                f"meV/atom, T {atoms.get_temperature():.0f} K, {1000 * np.median(wall):.0f} ms/step, "
                f"load {os.getloadavg()[0]:.1f}")
        if max_time is not None and time.perf_counter() - t_md > max_time:
            status = f"stopped by --max-time {max_time:.0f} s at step {k}"
            break
    epot, ekin = np.array(epot), np.array(ekin)
    etot = epot + ekin
    t = np.arange(len(etot)) * timestep_fs / 1000.0
    row = {"atoms": n, "dtype": dtype, "timestep_fs": timestep_fs, "steps_requested": steps,
           "steps_run": len(etot) - 1, "ps_requested": steps * timestep_fs / 1000.0, "status": status,
           "temperature_start_k": temperature_k}
    if len(etot) >= 3:
        row.update(conservation_metrics(t, etot, n))
    temps = 2.0 * ekin / (3.0 * n * units.kB)
    disp = np.linalg.norm(atoms.get_positions() - start_positions, axis=1)
    frac = atoms.cell.scaled_positions(atoms.get_positions())  # not wrapped: outside [0, 1) where atoms left the cell
    row.update({
        "ms_per_step_wall": 1000 * float(np.median(wall)) if wall else None,
        "ms_per_step_wall_mean": 1000 * float(np.mean(wall)) if wall else None,
        "ms_per_step_cpu": 1000 * float(np.median(cpu)) if cpu else None,
        "first_call_s": round(first_call_s, 3),
        "md_wall_s": round(time.perf_counter() - t_md, 1),
        "temperature_mean_k": float(temps[len(temps) // 5:].mean()) if len(temps) else None,
        "temperature_end_k": float(temps[-1]),
        "max_displacement_a": float(disp.max()),
        "fractional_range": [float(frac.min()), float(frac.max())],  # outside [0, 1): not wrapped
        "epot_mean_ev_per_atom": float(epot.mean() / n),
        # resolution of the reported energy: one unit in the last place of E_pot in the model's dtype
        "energy_ulp_mev_per_atom": 1000 * float(np.spacing(np.abs(epot[0]).astype(dtype))) / n,
        "loadavg_start": round(load_start, 2), "loadavg_end": round(os.getloadavg()[0], 2),
        "equilibration": equilibration,
    })
    if molecule_size:
        row["molecules_end"] = molecule_check(atoms, molecule_size)
    stride = max(1, len(etot) // 500)
    row["trace"] = {"time_ps": t[::stride].round(6).tolist(),
                    "etot_minus_e0_mev_per_atom": (1000 * (etot[::stride] - etot[0]) / n).round(6).tolist(),
                    "epot_minus_e0_mev_per_atom": (1000 * (epot[::stride] - epot[0]) / n).round(4).tolist(),
                    "temperature_k": temps[::stride].round(1).tolist()}
    target = TARGETS.get(dtype)
    row["target_mev_per_atom_per_ps"] = target
    drift = row.get("drift_mev_per_atom_per_ps")
    row["target_met"] = None if drift is None or status.startswith("unstable") else bool(abs(drift) <= target)
    return row


def _equilibrate(atoms, timestep_fs: float, steps: int, temperature_k: float, friction_per_fs: float, seed: int,
                 max_time: Optional[float], log, label: str) -> dict:
    """Langevin MD of ``atoms`` in place (its calculator, never wrapped). Returns a summary with a
    temperature trace; status "completed", "unstable at step k: ..." or "stopped by --max-time ..."."""
    from ase import units
    from ase.md.langevin import Langevin

    dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_k, friction=friction_per_fs / units.fs,
                   rng=np.random.default_rng(seed + 1))
    t0, temps, status = time.perf_counter(), [float(atoms.get_temperature())], "completed"
    every = max(1, steps // 20)
    for k in range(1, steps + 1):
        try:
            dyn.run(1)
        except ValueError as exc:
            status = f"unstable at step {k}: {exc}"
            break
        temps.append(float(atoms.get_temperature()))
        if k % every == 0:
            log(f"[{label}] equilibration step {k}/{steps}: T {temps[-1]:.0f} K, E_pot "
                f"{atoms.get_potential_energy() / len(atoms):.4f} eV/atom, "
                f"{(time.perf_counter() - t0) / k:.2f} s/step, load {os.getloadavg()[0]:.1f}")
        if max_time is not None and time.perf_counter() - t0 > max_time:
            status = f"stopped by --max-time {max_time:.0f} s at step {k}"
            break
    return {"thermostat": "ASE Langevin", "temperature_k": temperature_k, "friction_per_fs": friction_per_fs,
            "timestep_fs": timestep_fs, "steps": len(temps) - 1, "ps": (len(temps) - 1) * timestep_fs / 1000.0,
            "status": status, "wall_s": round(time.perf_counter() - t0, 1),
            "temperature_end_k": temps[-1], "temperature_trace_k": [round(x, 1) for x in temps[:: max(1, len(temps) // 50)]]}


def stability_check(atoms, model, dtype: str, steps: int, temperature_k: float, *, timestep_fs: float = 1.0,
                    friction_per_fs: float = 0.01, seed: int = 0, every: int = 10, log=print) -> dict:
    """A cheap look at whether a water model holds bulk water together: ASE Langevin MD of ``atoms``
    (copied; molecules = consecutive O, H, H) at ``temperature_k`` K for ``steps`` steps, recording
    every ``every`` steps the smallest intermolecular O–O distance (Å, minimum image), the smallest
    intermolecular distance of any pair, the largest intramolecular distance and the temperature.
    Returns those traces, their extremes and a status ("completed" or "unstable at step k: ...")."""
    from ase import units
    from ase.md.langevin import Langevin

    import cartlorem

    atoms = atoms.copy()
    atoms.calc = cartlorem.CartLoremCalculator(model, dtype=dtype)
    masses = atoms.get_masses()[:, None]
    p = np.random.default_rng(seed).standard_normal((len(atoms), 3)) * np.sqrt(masses * units.kB * temperature_k)
    atoms.set_momenta(p - masses * (p.sum(0) / masses.sum()))
    dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_k, friction=friction_per_fs / units.fs,
                   rng=np.random.default_rng(seed + 1))
    oxygen = np.flatnonzero(atoms.numbers == 8)
    trace = {"step": [], "min_oo_a": [], "min_inter_a": [], "max_intra_a": [], "temperature_k": []}
    status, t0 = "completed", time.perf_counter()
    for k in range(steps + 1):
        if k:
            try:
                dyn.run(1)
            except ValueError as exc:
                status = f"unstable at step {k}: {exc}"
                break
        if k % every == 0 or k == steps:
            m = molecule_check(atoms, 3)
            oo = atoms.get_all_distances(mic=True)[np.ix_(oxygen, oxygen)]
            np.fill_diagonal(oo, np.inf)
            for key, v in (("step", k), ("min_oo_a", float(oo.min())), ("min_inter_a", m["min_intermolecular_a"]),
                           ("max_intra_a", m["max_intramolecular_a"]), ("temperature_k", float(atoms.get_temperature()))):
                trace[key].append(round(v, 4) if isinstance(v, float) else v)
            log(f"[check {len(atoms)} atoms, {temperature_k:.0f} K] step {k}: min O-O {trace['min_oo_a'][-1]:.3f} A, "
                f"min intermolecular {trace['min_inter_a'][-1]:.3f} A, max intramolecular {trace['max_intra_a'][-1]:.3f} A, "
                f"T {trace['temperature_k'][-1]:.0f} K, {(time.perf_counter() - t0) / max(k, 1):.2f} s/step")
    return {"atoms": len(atoms), "steps": trace["step"][-1] if trace["step"] else 0, "temperature_k": temperature_k,
            "friction_per_fs": friction_per_fs, "dtype": dtype, "status": status,
            "min_oo_a": min(trace["min_oo_a"]), "min_intermolecular_a": min(trace["min_inter_a"]),
            "max_intramolecular_a": max(trace["max_intra_a"]), "wall_s": round(time.perf_counter() - t0, 1), "trace": trace}


def molecule_check(atoms, size: int) -> dict:
    """Largest distance (Å, minimum image) between atoms of one molecule and smallest between atoms of
    different molecules, molecules being consecutive blocks of ``size`` atoms."""
    d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    mol = np.arange(len(atoms)) // size
    same = mol[:, None] == mol[None, :]
    return {"atoms_per_molecule": size, "max_intramolecular_a": float(d[same].max()),
            "min_intermolecular_a": float(d[~same].min())}


# --------------------------------------------------------------------------------------------------
# report


def render(payload: dict) -> str:
    meta, rows = payload["meta"], payload["rows"]
    lines = ["# NVE energy conservation (`benchmarks/nve.py`)", "",
             "Velocity Verlet (ASE `VelocityVerlet`) through `cartlorem.CartLoremCalculator`, positions never "
             "wrapped. Drift: slope of a least-squares line through the total energy E(t) = E_pot + E_kin "
             "(± its standard error, which assumes independent residuals and so understates the uncertainty); "
             "fluctuation: RMS of E(t) about that line; ms/step: median wall (and process CPU) time of one MD step "
             "(one energy + forces call and the integrator). Models were trained for a few epochs only: this "
             "measures conservation — forces that are the exact negative gradient of the reported energy, the "
             "integrator's error and float32 rounding — not accuracy.", ""]
    lines.append("| run | atoms | dtype | dt (fs) | simulated (ps) | drift (meV/atom/ps) | target | met | "
                 "RMS fluct. (meV/atom) | max abs(E−E0) (meV/atom) | ⟨T⟩ (K) | ms/step wall (CPU) | load | status |")
    lines.append("|" + "---|" * 14)
    for r in rows:
        drift = r.get("drift_mev_per_atom_per_ps")
        dtxt = "—" if drift is None else f"{_sig(drift, sign=True)} ± {_sig(r['drift_stderr_mev_per_atom_per_ps'], 2)}"
        met = {True: "**met**", False: "**missed**", None: "—"}[r.get("target_met")]
        sim = f"{r['steps_run'] * r['timestep_fs'] / 1000:.3f} of {r['ps_requested']:g}"
        ms = "—" if r.get("ms_per_step_wall") is None else f"{r['ms_per_step_wall']:.0f} ({r['ms_per_step_cpu']:.0f})"
        fl = r.get("rms_fluctuation_mev_per_atom")
        mx = r.get("max_deviation_mev_per_atom")
        tm = r.get("temperature_mean_k")
        lines.append(f"| {r['run']} | {r['atoms']} | {r['dtype']} | {r['timestep_fs']:g} | {sim} | {dtxt} | "
                     f"≤ {r['target_mev_per_atom_per_ps']} | {met} | {_sig(fl)} | {_sig(mx)} | {'—' if tm is None else f'{tm:.0f}'} | {ms} | "
                     f"{r['loadavg_start']:.1f}–{r['loadavg_end']:.1f} | {r['status']} |")
    if meta.get("reading"):
        lines += ["", meta["reading"]]
    lines += ["", "Per run: the start structure, the model and the command.", ""]
    for r in rows:
        m = r.get("model", {})
        lines.append(f"- **{r['run']}** (`{r.get('command', '')}`; {r.get('date', '')}, commit "
                     f"{str(r.get('git_commit'))[:10]}): {r.get('structure', '')}. Model: {m.get('options')}, "
                     f"{m.get('parameters')} parameters, trained in {m.get('train_dtype')} on "
                     f"{m.get('train_structures')} structures of {' + '.join(f'`{Path(x).name}`' for x in str(m.get('source')).split(','))} for "
                     f"{m.get('epochs_run')} epochs ({m.get('train_wall_s')} s wall), validation MAE "
                     f"{_fmt(m.get('valid_energy_mae_mev_per_atom'))} meV/atom / {_fmt(m.get('valid_forces_mae_mev_per_a'))} "
                     f"meV/Å. Positions at the end span fractional coordinates {r['fractional_range'][0]:.3f} … "
                     f"{r['fractional_range'][1]:.3f} (never wrapped); largest displacement "
                     f"{r['max_displacement_a']:.2f} Å; first call (neighbour list, set-up) {r['first_call_s']} s; one unit in "
                     f"the last place of the reported E_pot in {r['dtype']}: {_sig(r.get('energy_ulp_mev_per_atom'), 2)} "
                     f"meV/atom." + _extras(r))
    lines += ["", "Machine: " + ", ".join(f"{k} {meta.get(k)}" for k in (
        "cpu_model", "cpu_count", "mem_total_gib", "torch", "ase", "e3nn", "numpy", "python", "git_commit",
        "git_dirty", "date") if k in meta) + f"; torch threads {meta.get('threads')}.",
        "The machine was shared with other jobs (the load average at the start and end of every run is in the "
        "table; with a load above the 2 cores, wall times are pessimistic and the CPU column is the better "
        "measure of cost).", ""]
    if meta.get("notes"):
        lines += [meta["notes"], ""]
    return "\n".join(lines)


def _extras(r: dict) -> str:
    """The equilibration and molecule-check sentences of a row (empty when it has neither)."""
    out = ""
    eq = r.get("equilibration")
    if eq:
        trace = eq.get("temperature_trace_k") or []
        out += (f" Equilibration: {eq['steps']} steps ({eq['ps']:g} ps) of {eq['thermostat']} at {eq['temperature_k']:.0f} K, "
                f"friction {eq['friction_per_fs']:g}/fs, {eq['wall_s']} s wall ({eq['status']}); temperature "
                f"{' → '.join(f'{t:.0f}' for t in trace[:: max(1, len(trace) // 6)])} K, {eq['temperature_end_k']:.0f} K at the end.")
    tr = (r.get("trace") or {}).get("temperature_k")
    if tr:
        out += (f" NVE temperature: start {tr[0]:.0f} K, min {min(tr):.0f} K, max {max(tr):.0f} K, end {tr[-1]:.0f} K.")
    m = r.get("molecules_end")
    if m:
        out += (f" Molecules at the end: largest intramolecular distance {m['max_intramolecular_a']:.2f} Å, smallest "
                f"intermolecular {m['min_intermolecular_a']:.2f} Å ({'every molecule whole' if m['max_intramolecular_a'] < 2.0 else 'some molecule broken'}).")
    return out


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.1f}"


def _sig(x, digits: int = 3, sign: bool = False) -> str:
    """``x`` with ``digits`` significant digits (fixed notation down to 1e-4, then scientific)."""
    if x is None or not math.isfinite(x):
        return "—"
    if x != 0 and abs(x) < 1e-4:
        return f"{x:+.{digits - 1}e}" if sign else f"{x:.{digits - 1}e}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x))))) if x != 0 else digits
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def plot(payload: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed: no plot")
        return False
    rows = [r for r in payload["rows"] if r.get("trace")]
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        tr = r["trace"]
        ax.plot(tr["time_ps"], tr["etot_minus_e0_mev_per_atom"], lw=0.8, label="E_tot − E_tot(0)")
        if r.get("drift_mev_per_atom_per_ps") is not None:
            t = np.asarray(tr["time_ps"])
            ax.plot(t, r["drift_mev_per_atom_per_ps"] * t, "k--", lw=0.8,
                    label=f"drift {r['drift_mev_per_atom_per_ps']:+.4f} meV/atom/ps")
        ax.set_title(f"{r['run']} ({r['atoms']} atoms, {r['timestep_fs']:g} fs)", fontsize=9)
        ax.set_xlabel("time (ps)")
        ax.set_ylabel("meV/atom")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(out: Path, new_rows: list, meta: dict, merge: bool) -> Path:
    out = Path(out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_name(out.name + ".json")
    with _locked(path):
        rows = []
        if merge and path.is_file():
            old = json.loads(path.read_text())
            rows = [r for r in old.get("rows", []) if r["run"] not in {n["run"] for n in new_rows}]
            meta = {**old.get("meta", {}), **meta}
        rows = sorted(rows + new_rows, key=lambda r: RUNS.index(r["run"]) if r["run"] in RUNS else 99)
        payload = {"name": "nve", "meta": meta, "rows": rows}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, path)
        out.with_name(out.name + ".md").write_text(render(payload) + "\n")
        plot(payload, out.with_name(out.name + ".png"))
    return path


# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    p.add_argument("--out", default=None, help="results path stem (default benchmarks/results/nve; "
                   "--quick: a temp folder)")
    add_data_argument(p)  # --data-dir: the folder with nacl_pbc.xyz (default ../shared/data next to the project)
    p.add_argument("--ps", type=float, default=None, help="simulated ps per run (default: NaCl 10, water 2)")
    p.add_argument("--steps", type=int, default=None, help="MD steps per run (overrides --ps)")
    p.add_argument("--timestep-fs", type=float, default=None, help="timestep (default: NaCl 1 fs, water 0.5 fs)")
    p.add_argument("--water-molecules", type=int, default=7, help="molecules per side of the water box "
                   "(m³ molecules, 3 m³ atoms; default 7: 1029 atoms)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs per model (default 4)")
    p.add_argument("--train-time", type=float, default=600.0, help="training wall-clock cap per model, s")
    p.add_argument("--train-frames", type=int, default=None, help="train on a random subset of this many frames")
    p.add_argument("--train-dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--water-data", default=",".join(str(x) for x in WATER_DATA), help="the bulk-water training "
                   "set, comma-separated files (extended XYZ with energy, forces, stress; default "
                   "benchmarks/data/water_pbc.xyz,benchmarks/data/water_contacts.xyz, made by benchmarks/water_data.py)")
    p.add_argument("--water-channels", type=int, default=16, help="channels of the water model (default 16)")
    p.add_argument("--water-cutoff", type=float, default=5.0, help="cutoff of the water model, Å (default 5)")
    p.add_argument("--check", default=None, metavar="M:STEPS:T[,...]", help="no NVE run: train (or load) the "
                   "water model and run Langevin stability checks (friction --friction) on boxes of M³ molecules, "
                   "STEPS steps at T K each; prints the smallest intermolecular O–O distance and writes "
                   "OUT_check.json")
    p.add_argument("--batch-size", type=int, default=4, help="training batch size of the water model (default 4)")
    p.add_argument("--lr", type=float, default=5e-3, help="initial learning rate of the water model (default 5e-3)")
    p.add_argument("--equilibrate-ps", type=float, default=None, help="thermostatted (Langevin) equilibration "
                   "with the model before the NVE run, ps (default: NaCl 0, water 0.05)")
    p.add_argument("--friction", type=float, default=0.05, help="Langevin friction of the equilibration, 1/fs "
                   "(default 0.05: a 20 fs time constant)")
    p.add_argument("--temperature", type=float, default=None, help="start (and thermostat) temperature, K "
                   "(default 300)")
    p.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "cartlorem_nve_models"),
                   help="trained models are kept here, keyed by the training settings, so that parallel or "
                   "repeated runs share them (never committed; the results name the commit each was trained "
                   "at; a file the current code cannot load is retrained; delete the folder to retrain)")
    p.add_argument("--train-only", action="store_true", help="train (or find) the models of --runs and stop")
    p.add_argument("--max-time", type=float, default=None, help="stop each run's MD after this many seconds "
                   "(the result reports the simulated time reached)")
    p.add_argument("--deadline", default=None, help="HH:MM (UTC): stop each run's MD at this time of day "
                   "(like --max-time; the next such time from now)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", action="store_true", help="keep the other runs' rows already in the results file")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny training, 192-atom water box, 20 steps")
    p.add_argument("--render", action="store_true", help="only rewrite the .md / .png from the .json")
    p.add_argument("--note", default=None, help="with --render: a paragraph (Markdown) stored in the results "
                   "and printed under the table, e.g. why a target was missed")
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        p.error(f"--runs: unknown {bad}; choose from {', '.join(RUNS)}")
    args.runs = runs
    args.water_data = [x.strip() for x in str(args.water_data).split(",") if x.strip()]
    if args.water_channels < 1 or not args.water_cutoff > 0:
        p.error("--water-channels must be >= 1 and --water-cutoff > 0")
    if args.check is not None:
        try:
            args.check = [tuple(t(x) for t, x in zip((int, int, float), c.split(":"), strict=True))
                          for c in args.check.split(",")]
        except ValueError:
            p.error(f"--check must be M:STEPS:T[,M:STEPS:T...], got {args.check!r}")
    for name in ("ps", "timestep_fs", "max_time", "train_time", "lr", "friction", "temperature"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.deadline is not None:
        try:
            hh, mm = (int(x) for x in args.deadline.split(":"))
            now = datetime.datetime.now(datetime.timezone.utc)
            end = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        except ValueError:
            p.error(f"--deadline must be HH:MM (UTC), got {args.deadline!r}")
        if end <= now:
            end += datetime.timedelta(days=1)
        args.deadline = end
    if args.steps is not None and args.steps < 3:
        p.error(f"--steps must be >= 3 (a drift needs 3 points), got {args.steps}")
    if args.threads < 1 or args.water_molecules < 2 or args.epochs < 0 or args.batch_size < 1:
        p.error("--threads must be >= 1, --water-molecules >= 2, --epochs >= 0 and --batch-size >= 1")
    if args.equilibrate_ps is not None and args.equilibrate_ps < 0:
        p.error(f"--equilibrate-ps must be >= 0, got {args.equilibrate_ps}")
    if args.quick:
        args.water_molecules = min(args.water_molecules, 4)
        args.epochs = min(args.epochs, 1)
        args.steps = args.steps or 20
        args.equilibrate_ps = 0.005 if args.equilibrate_ps is None else args.equilibrate_ps
    if args.out is None:
        args.out = str(Path(tempfile.gettempdir()) / "cartlorem_nve_quick" / "nve") if args.quick else str(DEFAULT_OUT)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        path = Path(args.out).with_suffix("") if Path(args.out).suffix == ".json" else Path(args.out)
        payload = json.loads(path.with_name(path.name + ".json").read_text())
        if args.note is not None:
            with _locked(path.with_name(path.name + ".json")):
                payload["meta"]["reading"] = args.note
                path.with_name(path.name + ".json").write_text(json.dumps(payload, indent=1) + "\n")
        path.with_name(path.name + ".md").write_text(render(payload) + "\n")
        plot(payload, path.with_name(path.name + ".png"))
        print(f"wrote {path}.md")
        return 0
    if any(r.startswith("nacl") for r in args.runs):
        data_file(args.data_dir, "nacl_pbc")  # fail now, with a clear message, not after training
    import torch

    torch.set_num_threads(args.threads)

    def log(msg):
        print(f"{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S} {msg}", flush=True)

    import logging

    handler = logging.StreamHandler(sys.stdout)  # the training's per-epoch lines
    handler.setFormatter(logging.Formatter("%(asctime)s [train] %(message)s", "%H:%M:%S"))
    logging.getLogger("cartlorem.training").addHandler(handler)
    logging.getLogger("cartlorem.training").setLevel(logging.INFO)

    meta = {**_machine_info(), "threads": args.threads,
            "notes": "Commands and per-run stamps are in each row; `--merge` combines rows of separate processes."}
    command = "python benchmarks/nve.py " + " ".join(sys.argv[1:] if argv is None else argv)
    models = {}
    if args.check:
        model, info = get_model("water", args, log)
        checks = []
        for m, steps, temp in args.check:
            atoms = water_box(m, seed=args.seed)
            res = stability_check(atoms, model, "float32", steps, temp, timestep_fs=args.timestep_fs or 1.0,
                                  friction_per_fs=args.friction, seed=args.seed, log=log)
            checks.append({"molecules_per_side": m, **res})
            log(f"[check] {m}^3 molecules, {temp:.0f} K: {res['status']}, min O-O {res['min_oo_a']:.3f} A, "
                f"min intermolecular {res['min_intermolecular_a']:.3f} A, max intramolecular {res['max_intramolecular_a']:.3f} A")
        out = Path(str(args.out) + "_check.json")
        out.write_text(json.dumps({"model": info, "command": command, "checks": checks}, indent=1) + "\n")
        log(f"wrote {out}")
        return 0
    for run in args.runs:
        system, dtype = run.split("-")
        d = DEFAULTS[system]
        dt = args.timestep_fs or d["timestep_fs"]
        temperature = args.temperature or d["temperature_k"]
        eq_ps = d["equilibrate_ps"] if args.equilibrate_ps is None else args.equilibrate_ps
        eq_steps = int(round(eq_ps * 1000.0 / dt))
        steps = args.steps or int(round((args.ps or d["ps"]) * 1000.0 / dt))
        if system not in models:
            models[system] = get_model(system, args, log)
        model, info = models[system]
        if args.train_only:
            continue
        if system == "nacl":
            from ase.io import read

            a = lattice_constant_from(read(data_file(args.data_dir, "nacl_pbc"), ":"))
            atoms = nacl_crystal(a)
            structure = (f"rocksalt NaCl 2×2×2 conventional cells, a = {a:.4f} Å (median of the training cells), "
                         f"{temperature:.0f} K Maxwell–Boltzmann start")
        else:
            atoms = water_box(args.water_molecules, seed=args.seed)
            structure = (f"{args.water_molecules}³ water molecules on a grid at 1 g/cm³ (box "
                         f"{atoms.cell[0, 0]:.2f} Å), random orientations (closest intermolecular start distance "
                         f"{min_intermolecular_distance(atoms):.2f} Å), {temperature:.0f} K Maxwell–Boltzmann start")
        if eq_steps:
            structure += (f", then {eq_steps} steps ({eq_steps * dt / 1000:g} ps) of Langevin MD with the model at "
                          f"{temperature:.0f} K (friction {args.friction:g}/fs, same dtype and timestep) before the NVE run")
        else:
            structure += ", no equilibration"
        log(f"[{run}] {len(atoms)} atoms, {steps} steps of {dt:g} fs; {structure}")
        max_time = args.max_time
        if args.deadline is not None:
            left = (args.deadline - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
            max_time = max(1.0, left) if max_time is None else max(1.0, min(max_time, left))
        row = run_nve(atoms, model, dtype, dt, steps, temperature, seed=args.seed, max_time=max_time,
                      log=log, label=run, equilibrate_steps=eq_steps, friction_per_fs=args.friction,
                      molecule_size=3 if system == "water" else None)
        if args.deadline is not None and row["status"].startswith("stopped by --max-time"):
            row["status"] = f"stopped by --deadline {args.deadline:%H:%M} UTC at step {row['steps_run']}"
        row.update({"run": run, "system": system, "structure": structure, "model": info, "command": command,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "git_commit": meta.get("git_commit"), "threads": args.threads,
                    "malloc": {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}})
        log(f"[{run}] {row['status']}: drift {row.get('drift_mev_per_atom_per_ps')} meV/atom/ps, "
            f"RMS {row.get('rms_fluctuation_mev_per_atom')} meV/atom, {row.get('ms_per_step_wall')} ms/step")
        path = write(Path(args.out), [row], meta, merge=True if len(args.runs) > 1 and run != args.runs[0] else args.merge)
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
