"""What a run records: one history row per epoch, log.csv, the learning-curve plot, metric text."""

from __future__ import annotations

import csv
import io
from typing import Sequence

from ..fileio import atomic_write, atomic_write_text

__all__ = ["LOG_COLUMNS", "write_csv", "plot_learning_curve", "metric_summary"]

LOG_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "valid_loss",
    "valid_energy_mae_mev_per_atom",
    "valid_forces_mae_mev_per_a",
    "valid_stress_mae_mev_per_a3",
    "valid_dipole_mae_e_a",
    "valid_born_charges_mae_e",
    "epoch_time_s",
    "elapsed_s",
    "metrics_on",
)
"""The columns of log.csv. The ``valid_*`` columns hold the metrics of the set named in ``metrics_on``: "validation",
or "training" for a run without a validation set (which then selects its best model on the training set)."""


def write_csv(path, history: Sequence[dict]) -> None:
    """Rewrite ``path`` from the history, one row per epoch (atomic replace, so no duplicate rows
    after a resume). Floats with 6 significant digits; None as an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(LOG_COLUMNS)
    for row in history:
        w.writerow(
            [
                "" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                for c in LOG_COLUMNS
            ]
        )
    atomic_write_text(path, buf.getvalue())


def plot_learning_curve(history: Sequence[dict], path) -> bool:
    """Loss and validation MAEs against epoch → PNG. Returns False (with nothing written) when
    matplotlib is not installed. Uses the Agg canvas directly, so no global backend is changed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    epochs = [r["epoch"] for r in history]
    on_training = any(r.get("metrics_on") == "training" for r in history)
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    seen = "training set, evaluated" if on_training else "valid"  # no validation set: the training set's metrics
    panels = [
        ("loss", [("train_loss", "train"), ("valid_loss", seen)], True),
        ("energy MAE (meV/atom)", [("valid_energy_mae_mev_per_atom", seen)], False),
        ("force MAE (meV/Å)", [("valid_forces_mae_mev_per_a", seen)], False),
    ]
    for k, (title, series, log) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        for key, label in series:
            ys = [r.get(key) for r in history]
            pts = [(e, y) for e, y in zip(epochs, ys) if y is not None and y > 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        if log:
            ax.set_yscale("log")
        if (log or on_training) and ax.lines:  # a panel with nothing to plot (all-zero forces) has no legend
            ax.legend()
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    return True


def metric_summary(m: dict) -> str:
    """'E MAE 1.23 meV/atom, F MAE 45.6 meV/Å[, S MAE …]' for the metrics that are present."""
    parts = []
    if m.get("energy_mae_mev_per_atom") is not None:
        parts.append(f"E MAE {m['energy_mae_mev_per_atom']:.2f} meV/atom")
    if m.get("forces_mae_mev_per_a") is not None:
        parts.append(f"F MAE {m['forces_mae_mev_per_a']:.1f} meV/Å")
    if m.get("stress_mae_mev_per_a3") is not None:
        parts.append(f"S MAE {m['stress_mae_mev_per_a3']:.2f} meV/Å³")
    if m.get("dipole_mae_e_a") is not None:
        parts.append(f"P MAE {m['dipole_mae_e_a']:.3f} e·Å")
    if m.get("born_charges_mae_e") is not None:
        parts.append(f"Z* MAE {m['born_charges_mae_e']:.3f} e")
    return ", ".join(parts)


def best_epoch_summary(result) -> str:
    """"best epoch K: <its metrics> (validation)" for a :class:`~cartlorem.training.TrainResult`, "(training set: no
    validation set)" when the best model was selected on the training set (``result.best_metrics_on``); the summary
    of ``cartlorem train`` and of the demo."""
    return (
        f"best epoch {result.best_epoch}: {metric_summary(result.best_metrics) or 'no validation yet'}"
        + ((" (validation)" if result.best_metrics_on == "validation" else " (training set: no validation set)")
           if result.best_metrics else "")
    )
