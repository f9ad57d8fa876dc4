"""The demo job: train a small model on the bundled clusters, test it, run NVE MD (about 2 minutes).

    run_demo(out="cartlorem_demo_run")     # what `cartlorem demo` runs

Steps: split the data (test 10 %, then validation 10 % of the rest), train a small CartLorem,
report test accuracy and a parity plot, run NVE MD on the largest neutral test structure in
float64 and report the energy drift. Writes model.pt, checkpoint.pt, log.csv, learning_curve.png,
test_metrics.json, parity.png and md.csv into ``out``.
"""

from __future__ import annotations

import numbers
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .fileio import atomic_write_text, require_file

__all__ = ["run_demo", "demo_data"]


def demo_data(path: Optional[str] = None) -> Path:
    """``path`` if given (must exist), else (None) the bundled demo dataset."""
    if path is not None:
        require_file(path, "data")
        return Path(path)
    from .datasets import demo_path

    return demo_path()


def md_structure(graphs, candidates) -> int:
    """The index, among ``candidates``, of the largest neutral structure (the first of the largest), else of the
    largest one: its charge as the graphs read it (``atoms.info["total_charge"]`` or ``"charge"``, see
    :func:`cartlorem.graph.atoms_to_graph`)."""
    return int(max(candidates, key=lambda k: (float(graphs[k].total_charge.sum()) == 0.0, len(graphs[k].species), -k)))


def run_demo(
    out="cartlorem_demo_run",
    *,
    data: Optional[str] = None,
    epochs: int = 20,
    max_time: float = 110.0,
    channels: int = 16,
    long_range: Optional[str] = None,
    md_steps: int = 400,
    timestep: float = 0.5,
    temperature: float = 300.0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> int:
    """Run the demo; ``say`` receives the report lines. Returns 0, or 1 if the MD stopped early."""
    import ase.io

    from .calculator import CartLoremCalculator
    from .data import MissingLabelError, read_dataset, split
    from .evaluate import format_table, metrics, metrics_json, parity_plot, predict
    from .md import check_nve_settings, run_nve, write_md_csv
    from .model import CartLorem
    from .training import best_epoch_summary, train

    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1 or not max_time > 0:
        raise ValueError(f"--epochs must be a whole number >= 1 and --max-time positive, got {epochs!r} and "
                         f"{max_time!r}")
    # the MD's settings as run_nve checks them, before the training rather than after it
    check_nve_settings(md_steps, timestep, temperature, names=("--md-steps", "--timestep", "--temperature"))
    long_range = None if long_range in (None, "none") else long_range
    t_start = time.perf_counter()
    path, out, cutoff = demo_data(data), Path(out), 5.0
    dtype = torch.float32  # training and evaluation; the MD runs in float64

    say(f"[1/4] data: {path}")
    frames = ase.io.read(str(path), index=":")
    try:
        graphs = read_dataset(frames, cutoff, dtype=dtype)
    except MissingLabelError as err:  # its advice names read_dataset's arguments, which the demo does not have
        raise ValueError(f"{err.finding} The demo reads the energies and forces of a "
                         "calculator (ase.io.write of atoms with one attached: energy= and forces in the extxyz "
                         "file); for other labels (REF_energy, ...) use cartlorem train with --energy-key and "
                         "--forces-key.") from None
    if long_range is not None:  # named by frame of the file, not by place in the training subset
        from .nn.long_range import check_structures

        check_structures(graphs, lambda k: f"{path}, frame {k}")
    rest, test_idx = split(graphs, 0.1, seed=seed)
    if len(test_idx) == 0:  # refused before the training, not after it
        raise ValueError(f"data file {str(path)!r} has {len(graphs)} structure; the demo needs at least 2 (one to "
                         "test on, the others to train on)")
    tr, va = split(len(rest), 0.1, seed=seed + 1)
    train_idx, valid_idx = rest[tr], rest[va]
    species = sorted({int(z) for g in graphs for z in g.species.unique().tolist()})
    from ase.data import chemical_symbols

    say(
        f"      {len(graphs)} structures ({', '.join(chemical_symbols[z] for z in species)}): "
        f"{len(train_idx)} train, {len(valid_idx)} validation, {len(test_idx)} test"
    )

    say(
        f"[2/4] training a small CartLorem (channels {channels}, 2 layers, correlation 2, cutoff {cutoff} Å, "
        f"long range {long_range or 'none'}) for at most {epochs} epochs or {max_time:g} s"
    )
    torch.manual_seed(seed)
    try:
        model = CartLorem(species, cutoff=cutoff, long_range=long_range, channels=channels, num_layers=2,
                          correlation=2, radial_hidden=32).to(device=device, dtype=dtype)
    except ImportError as err:
        raise ValueError(f"long_range={long_range!r} is not available in this installation ({err})") from None
    t0 = time.perf_counter()
    result = train(model, [graphs[k] for k in train_idx], [graphs[k] for k in valid_idx], epochs=epochs,
                   batch_size=4, lr=1e-2, ema_decay=0.99, scheduler_patience=3, patience=None, out_dir=out,
                   overwrite=True, seed=seed, progress=progress, max_time=max_time)
    say(f"      stopped after epoch {result.epochs_completed} ({result.stop_reason.replace('_', ' ')}); "
        f"{best_epoch_summary(result)}")
    say(f"      training time {time.perf_counter() - t0:.0f} s")

    say(f"[3/4] accuracy on the {len(test_idx)} test structures")
    preds = predict(model, [graphs[k] for k in test_idx], batch_size=16)
    m = metrics(preds)
    say("      " + format_table(m).replace("\n", "\n      "))
    atomic_write_text(out / "test_metrics.json", metrics_json(m))  # strict JSON: a NaN metric is null
    parity_plot(preds, out / "parity.png")

    pick = md_structure(graphs, test_idx)
    atoms = frames[int(pick)].copy()
    atoms.calc = CartLoremCalculator(model, device=device, dtype="float64")
    say(
        f"[4/4] NVE MD: {md_steps} steps × {timestep:g} fs at {temperature:g} K on {atoms.get_chemical_formula()} "
        f"({len(atoms)} atoms, frame {int(pick)} of the data, a test structure), float64"
    )
    t0 = time.perf_counter()
    md = run_nve(atoms, steps=md_steps, timestep_fs=timestep, temperature_K=temperature, seed=seed,
                 progress=progress)
    t_md = time.perf_counter() - t0
    write_md_csv(out / "md.csv", md)
    if md["error"]:
        say(f"      {md['error']}")
    say(
        f"      {md['steps_done']} steps in {t_md:.1f} s ({1000 * t_md / max(md['steps_done'], 1):.0f} ms/step); "
        f"T {md['temperature'][0]:.0f} K at the start, mean {np.mean(md['temperature']):.0f} K"
    )
    say(
        f"      energy drift {md['drift_mev_per_atom_per_ps']:+.3f} meV/atom/ps; max |ΔE| "
        f"{md['max_abs_de_mev_per_atom']:.3f} meV/atom ({md['max_abs_de_mev']:.2f} meV)"
    )
    say(
        f"demo finished in {time.perf_counter() - t_start:.0f} s; files in {out}/ (model.pt, checkpoint.pt, log.csv, "
        "learning_curve.png, test_metrics.json, parity.png, md.csv)"
    )
    return 0 if not md["error"] else 1
