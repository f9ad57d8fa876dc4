"""Molecular dynamics helpers: NVE velocity Verlet with an attached calculator, energy-conservation
summary, and the trajectory as CSV.

    atoms.calc = CartLoremCalculator(model, dtype="float64")
    md = run_nve(atoms, steps=400, timestep_fs=0.5, temperature_K=300.0)
    print(md["drift_mev_per_atom_per_ps"], md["max_abs_de_mev_per_atom"])
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from tqdm.auto import tqdm

from .fileio import atomic_write_text

__all__ = ["initial_velocities", "run_nve", "write_md_csv"]


def initial_velocities(atoms, temperature_K: float, seed: int = 0) -> None:
    """Maxwell–Boltzmann momenta (seeded), centre-of-mass motion (and, for open structures, rotation)
    removed, then rescaled so that ``atoms.get_temperature()`` is exactly ``temperature_K``.

    Without the rescaling a small cluster starts far from the requested temperature (a random draw
    of few momenta, less the removed motion; the demo started at 206 K when asked for 300 K).
    """
    from ase.md import velocitydistribution as vd

    if not temperature_K >= 0:
        raise ValueError(f"temperature_K must be >= 0, got {temperature_K}")
    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    # preserve_temperature=False: ASE's default rescales to the temperature before, dividing by the zero kinetic
    # energy left when nothing but the removed motion was drawn (one atom: NaN momenta); the rescaling is below
    vd.Stationary(atoms, preserve_temperature=False)
    if not atoms.pbc.any():
        vd.ZeroRotation(atoms, preserve_temperature=False)
    now = atoms.get_temperature()
    if now > 0 and temperature_K > 0:
        atoms.set_momenta(atoms.get_momenta() * np.sqrt(temperature_K / now))


def check_nve_settings(steps, timestep_fs, temperature_K,
                       names=("steps", "timestep_fs", "temperature_K")) -> None:
    """ValueError unless ``steps`` is a whole number >= 1, ``timestep_fs`` a finite number > 0 and ``temperature_K``
    one >= 0; ``names``: what the caller's user calls them (run_demo checks them before its training)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"{names[0]} must be a whole number >= 1, got {steps!r}")
    for name, value, low in ((names[1], timestep_fs, "> 0"), (names[2], temperature_K, ">= 0")):
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                or not (value > 0 if low == "> 0" else value >= 0)):
            raise ValueError(f"{name} must be a finite number {low}, got {value!r}")


def run_nve(atoms, *, steps: int, timestep_fs: float, temperature_K: float, seed: int = 0,
            progress: bool = False) -> dict:
    """NVE velocity-Verlet MD with the calculator attached to ``atoms``; energy-conservation summary.

    Velocities from :func:`initial_velocities`. Returns arrays over the recorded steps 0..n:
    "time_fs", "epot", "ekin", "etot" (eV), "temperature" (K); and "drift_mev_per_atom_per_ps"
    (slope of a linear fit of E_tot/N), "max_abs_de_mev_per_atom", "max_abs_de_mev" (largest
    |E(t) − E(0)|), "steps_done", "error" (a message if the run stopped early, else None).
    """
    from ase import units
    from ase.md.verlet import VelocityVerlet

    check_nve_settings(steps, timestep_fs, temperature_K)
    initial_velocities(atoms, temperature_K, seed)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    rec = {"time_fs": [], "epot": [], "ekin": [], "etot": [], "temperature": []}

    def record():
        epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        if not (math.isfinite(epot) and math.isfinite(ekin)):  # a run that went NaN has stopped, not finished
            raise ValueError(f"the energy is not finite (potential {epot}, kinetic {ekin} eV)")
        rec["time_fs"].append(dyn.nsteps * timestep_fs)
        rec["epot"].append(epot)
        rec["ekin"].append(ekin)
        rec["etot"].append(epot + ekin)
        rec["temperature"].append(atoms.get_temperature())

    bar = tqdm(total=steps, desc="NVE MD", unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    dyn.attach(record, interval=1)
    dyn.attach(lambda: bar.update(1) if dyn.nsteps > 0 else None, interval=1)
    error = None
    try:
        # the initial state (ASE may call observers at step 0 too; duplicates are dropped below). Outside the
        # early stop below: a structure the calculator refuses (an unknown species, a bad cell) is the caller's
        # error, and the run has nothing to report
        record()
        try:
            dyn.run(steps)
        except ValueError as err:  # e.g. atoms that came too close for an untrained model
            error = f"MD stopped at step {dyn.nsteps}: {err}"
    finally:
        bar.close()
    rec = {k: np.asarray(v) for k, v in rec.items()}
    _, first = np.unique(rec["time_fs"], return_index=True)
    rec = {k: v[first] for k, v in rec.items()}
    n = len(atoms)
    e = rec["etot"] / n
    t_ps = rec["time_fs"] / 1000.0
    slope = float(np.polyfit(t_ps, e, 1)[0]) * 1000.0 if len(t_ps) >= 2 else float("nan")
    dev = np.abs(rec["etot"] - rec["etot"][0])
    rec.update(
        drift_mev_per_atom_per_ps=slope,
        max_abs_de_mev_per_atom=float(dev.max() / n * 1000.0),
        max_abs_de_mev=float(dev.max() * 1000.0),
        steps_done=int(len(t_ps) - 1),
        error=error,
    )
    return rec


def write_md_csv(path, md: dict) -> None:
    """time_fs, epot_ev, ekin_ev, etot_ev, temperature_k: one row per recorded step, every number as the float64 it
    is (8 digits left steps of 1e-5 eV in a total energy of -684 eV, too coarse to fit the drift the run reports)."""
    lines = ["time_fs,epot_ev,ekin_ev,etot_ev,temperature_k"]
    for row in zip(md["time_fs"], md["epot"], md["ekin"], md["etot"], md["temperature"]):
        lines.append(",".join(repr(float(x)) for x in row))
    atomic_write_text(path, "\n".join(lines) + "\n")
