"""Training: weighted energy/force/stress loss, EMA weights, plateau scheduler, checkpoints, logs.

One function, :func:`train`, runs the whole loop::

    graphs = read_dataset("train.xyz", cutoff=model.cutoff)
    train_idx, valid_idx = split(graphs, valid_fraction=0.1, seed=0)
    result = train(model, [graphs[k] for k in train_idx], [graphs[k] for k in valid_idx],
                   epochs=50, out_dir="run")

Per epoch: shuffled mini-batches → loss → gradient clipping → Adam/AMSGrad step → EMA update;
then the EMA weights are validated, the plateau scheduler and early stopping see the validation
loss, and ``out_dir`` receives

- ``checkpoint.pt``: everything needed to continue (weights, EMA, optimiser, scheduler, epoch,
  random states, best metric, history), written atomically every epoch;
  ``load_model("checkpoint.pt")`` returns the current EMA model;
- ``model.pt``: the best EMA model so far (by validation loss), written with ``save_model``;
- ``log.csv`` and ``learning_curve.png`` (the plot needs matplotlib; skipped with a note if absent).

Loss (weights w from ``weights``; every mean runs only over labelled items, the ``has_*`` masks)::

    L = w_E · mean_s ((E_s − E_s^ref) / N_s)²  +  w_F · mean_{i,α} (F_iα − F_iα^ref)²
      + w_S · mean_{s,αβ} (σ_sαβ − σ_sαβ^ref)²

in eV/atom, eV/Å and eV/Å³. The validation loss is the same expression over the whole
validation set.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from .evaluate import metrics as compute_metrics
from .evaluate import predict
from .graph import Graph, collate
from .model import CartLorem, _atomic_save, model_payload, save_model

__all__ = [
    "train",
    "TrainResult",
    "NonFiniteLossError",
    "ExponentialMovingAverage",
    "weighted_loss",
    "DEFAULT_WEIGHTS",
]

DEFAULT_WEIGHTS = {"energy": 1.0, "forces": 10.0, "stress": 1.0}
CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "model.pt"
LOG_CSV = "log.csv"
CURVE_PNG = "learning_curve.png"
_CHECKPOINT_FORMAT = "cartlorem-checkpoint-v1"
_LOG_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "valid_loss",
    "valid_energy_mae_mev_per_atom",
    "valid_forces_mae_mev_per_a",
    "valid_stress_mae_mev_per_a3",
    "epoch_time_s",
    "elapsed_s",
)
# config entries that training statistics change; everything else must match to resume
_STATISTICS_KEYS = ("avg_num_neighbors", "scale", "shift")


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient) became NaN or inf; training stopped, the best model is kept."""


# --------------------------------------------------------------------------------------------------
# loss


def weighted_loss(out: dict, batch: Graph, weights: Mapping[str, float]) -> tuple[torch.Tensor, dict]:
    """Weighted squared-error loss of predictions ``out`` against the labels of ``batch``.

    out: model output with "energy" [B] eV, "forces" [N, 3] eV/Å and (when stress is trained)
    "stress" [B, 3, 3] eV/Å³. batch: a labelled :class:`Graph` (energy/forces/stress + has_* masks).
    weights: {"energy", "forces", "stress"} → weight. Returns (scalar loss, {term: float}) where the
    terms are the unweighted mean squared errors (eV²/atom², eV²/Å², eV²/Å⁶) of labelled items only;
    a term with no labelled item in the batch is 0.
    """
    loss = out["energy"].new_zeros(())
    terms = {}
    if batch.energy is not None and weights.get("energy", 0.0) > 0:
        mask = batch.has_energy
        if bool(mask.any()):
            err = (out["energy"] - batch.energy)[mask] / batch.num_atoms[mask].to(out["energy"].dtype)
            mse = (err**2).mean()
            loss = loss + weights["energy"] * mse
            terms["energy"] = float(mse.detach())
    if batch.forces is not None and weights.get("forces", 0.0) > 0 and "forces" in out:
        mask = batch.has_forces[batch.batch]  # [N] atoms of structures with force labels
        if bool(mask.any()):
            mse = ((out["forces"] - batch.forces)[mask] ** 2).mean()
            loss = loss + weights["forces"] * mse
            terms["forces"] = float(mse.detach())
    if batch.stress is not None and weights.get("stress", 0.0) > 0 and "stress" in out:
        mask = batch.has_stress
        if bool(mask.any()):
            mse = ((out["stress"] - batch.stress)[mask] ** 2).mean()
            loss = loss + weights["stress"] * mse
            terms["stress"] = float(mse.detach())
    return loss, terms


def _validation_loss(m: dict, weights: Mapping[str, float]) -> float:
    """The loss expression of :func:`weighted_loss` over a whole set, from its RMSEs (meV units)."""
    total = 0.0
    for name, key in (
        ("energy", "energy_rmse_mev_per_atom"),
        ("forces", "forces_rmse_mev_per_a"),
        ("stress", "stress_rmse_mev_per_a3"),
    ):
        if weights.get(name, 0.0) > 0 and m.get(key) is not None:
            total += weights[name] * (m[key] / 1000.0) ** 2
    return total


# --------------------------------------------------------------------------------------------------
# exponential moving average of the weights


class ExponentialMovingAverage:
    """Shadow copy of parameters, θ̄ ← d θ̄ + (1 − d) θ after every optimiser step.

    The decay warms up as d = min(decay, (1 + n) / (10 + n)) after n updates, so that the average
    is not dominated by the random initial weights in short runs.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.parameters = list(parameters)
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for s, p in zip(self.shadow, self.parameters):
            s.lerp_(p.detach(), 1.0 - d)

    @contextlib.contextmanager
    def applied(self):
        """Temporarily put the averaged weights into the model (restored on exit)."""
        backup = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for p, s in zip(self.parameters, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.parameters, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": [s.detach().cpu() for s in self.shadow],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's parameters")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v.to(device=s.device, dtype=s.dtype))


# --------------------------------------------------------------------------------------------------
# result


@dataclass
class TrainResult:
    """What :func:`train` did: one ``history`` row per epoch (the columns of log.csv), the best
    epoch and its validation metrics, why it stopped ("epochs", "early_stopping", "max_time") and
    where the files are (None without ``out_dir``)."""

    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_valid_loss: float = math.inf
    best_metrics: dict = field(default_factory=dict)
    epochs_completed: int = 0
    stop_reason: str = "epochs"
    model_path: Optional[str] = None
    checkpoint_path: Optional[str] = None


# --------------------------------------------------------------------------------------------------
# helpers


def _progress(iterable=None, **kwargs):
    """tqdm if available and enabled, else a silent stand-in with the same small interface."""
    if kwargs.pop("enabled", True):
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, **kwargs)
        except ImportError:
            pass
    return _NoBar(iterable)


class _NoBar:
    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _say(message: str, progress: bool) -> None:
    """One line of output that does not break a running progress bar."""
    if not progress:
        return
    try:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:
        print(message, file=sys.stderr, flush=True)


def _check_graphs(model: CartLorem, graphs: Sequence[Graph], what: str) -> None:
    """Labels present, species known, edges built with the model's cutoff."""
    known = set(model.species)
    for k, g in enumerate(graphs):
        if g.energy is None and g.forces is None:
            raise ValueError(
                f"{what} structure {k} carries no labels (read it with cartlorem.data.read_dataset)"
            )
        unknown = sorted(set(g.species.tolist()) - known)
        if unknown:
            from ase.data import chemical_symbols

            names = ", ".join(chemical_symbols[z] for z in unknown)
            raise ValueError(f"{what} structure {k} contains species the model does not know: {names}")
        if g.edge_index.shape[1]:
            longest = float(g.edge_vectors().norm(dim=-1).max())
            if longest > model.cutoff * (1 + 1e-6) + 1e-9:
                raise ValueError(
                    f"{what} structure {k} has edges up to {longest:.3f} Å, longer than the model cutoff "
                    f"{model.cutoff} Å: read the data with cutoff=model.cutoff"
                )


def _set_statistics(model: CartLorem, graphs: Sequence[Graph]) -> dict:
    """Reference energies (least squares), ⟨neighbours⟩, scale = force RMS, shift = mean residual."""
    from .data import dataset_statistics, fit_reference_energies

    refs = fit_reference_energies(graphs, model.species)
    stats = dataset_statistics(graphs, refs)
    scale = stats["forces_rms"] or stats["residual_energy_per_atom_std"] or 1.0
    model.set_statistics(
        atomic_energies=refs,
        avg_num_neighbors=stats["avg_num_neighbors"],
        scale=scale,
        shift=stats["residual_energy_per_atom_mean"],
    )
    stats["reference_energies"] = refs
    return stats


def _rng_state(rng: np.random.Generator) -> dict:
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_csv(path: Path, history: list) -> None:
    """Rewrite log.csv from the history (atomic replace; no duplicate rows after a resume)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(_LOG_COLUMNS)
    for row in history:
        w.writerow(
            [
                "" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                for c in _LOG_COLUMNS
            ]
        )
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def plot_learning_curve(history: list, path) -> bool:
    """Loss and validation MAEs against epoch → PNG. Returns False (with nothing written) when
    matplotlib is not installed. Uses the Agg canvas directly, so no global backend is changed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    panels = [
        ("loss", [("train_loss", "train"), ("valid_loss", "valid")], True),
        ("energy MAE (meV/atom)", [("valid_energy_mae_mev_per_atom", "valid")], False),
        ("force MAE (meV/Å)", [("valid_forces_mae_mev_per_a", "valid")], False),
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
            ax.legend()
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    tmp = Path(path).with_name(f".tmp-{Path(path).name}")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return True


# --------------------------------------------------------------------------------------------------
# the loop


def train(
    model: CartLorem,
    train_graphs: Sequence[Graph],
    valid_graphs: Optional[Sequence[Graph]] = None,
    *,
    epochs: int = 100,
    batch_size: int = 8,
    lr: float = 5e-3,
    weights: Optional[Mapping[str, float]] = None,
    optimizer: str = "amsgrad",
    weight_decay: float = 0.0,
    ema_decay: Optional[float] = 0.99,
    scheduler_factor: float = 0.8,
    scheduler_patience: int = 5,
    clip_grad: Optional[float] = 10.0,
    patience: Optional[int] = 30,
    valid_batch_size: Optional[int] = None,
    out_dir=None,
    resume: bool = False,
    overwrite: bool = False,
    statistics: bool = True,
    seed: int = 0,
    progress: bool = True,
    max_time: Optional[float] = None,
) -> TrainResult:
    """Train ``model`` in place; on return it holds the best EMA weights (by validation loss).

    Args:
        model: a CartLorem on the device to train on (its dtype is used for the data).
        train_graphs, valid_graphs: labelled graphs from ``cartlorem.data.read_dataset`` built with
            the model's cutoff. Without a validation set the training set is validated (noted).
        epochs: total number of epochs (counting those done before a resume).
        batch_size: structures per training batch; valid_batch_size (default 2 × batch_size).
        lr: initial learning rate. optimizer: "adam" or "amsgrad"; weight_decay: L2 (Adam style).
        weights: loss weights {"energy": per-atom energy, "forces", "stress"}; missing entries take
            ``DEFAULT_WEIGHTS`` (1, 10, 1).
        ema_decay: decay of the weight average used for validation and the saved model (None or 0: off).
        scheduler_factor, scheduler_patience: ReduceLROnPlateau on the validation loss.
        clip_grad: maximum gradient norm (None: no clipping).
        patience: stop after this many epochs without a better validation loss (None: never).
        out_dir: folder for checkpoint.pt, model.pt, log.csv, learning_curve.png (None: nothing written).
        resume: continue from ``out_dir/checkpoint.pt`` exactly where it stopped (weights, EMA,
            optimiser, scheduler, random states, history). Statistics are not recomputed.
        overwrite: allow a fresh run in an ``out_dir`` that already holds a checkpoint.
        statistics: set reference energies (least squares), average neighbour count, scale (force
            RMS) and shift (mean residual energy per atom) from the training set before training.
        seed: seeds the batch order and torch's random generator (fresh runs).
        progress: show progress bars and one line per epoch on stderr.
        max_time: wall-clock budget in seconds for this call: no epoch is started that is expected
            to end after it, and an epoch still running at the limit is cut short.

    Raises:
        NonFiniteLossError: NaN/inf loss or gradient (the message names epoch, batch and
            structures; model.pt and checkpoint.pt keep the last good state).
        ValueError / FileNotFoundError / FileExistsError: bad settings, data or out_dir.
    """
    if not isinstance(model, CartLorem):
        raise TypeError(f"train expects a CartLorem model, got {type(model).__name__}")
    train_graphs = list(train_graphs)
    valid_graphs = list(valid_graphs or [])
    if not train_graphs:
        raise ValueError("the training set is empty")
    if int(epochs) < 0 or int(batch_size) < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if optimizer.lower() not in ("adam", "amsgrad"):
        raise ValueError(f"optimizer must be 'adam' or 'amsgrad', got {optimizer!r}")
    w = dict(DEFAULT_WEIGHTS)
    for k, v in (weights or {}).items():
        if k not in DEFAULT_WEIGHTS:
            raise ValueError(f"unknown loss weight {k!r}; expected some of {list(DEFAULT_WEIGHTS)}")
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"loss weight {k!r} must be a finite number >= 0, got {v}")
        w[k] = float(v)
    valid_batch_size = int(valid_batch_size or 2 * batch_size)
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT if out else None
    if resume and out is None:
        raise ValueError("resume=True needs out_dir (where checkpoint.pt is)")
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {ckpt_path}")
    if not resume and ckpt_path is not None and ckpt_path.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds a training run ({CHECKPOINT}); resume it, pass overwrite=True, "
            f"or choose another output folder"
        )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    device, dtype = model.embedding.device, model.dtype
    _check_graphs(model, train_graphs, "training")
    _check_graphs(model, valid_graphs, "validation")
    train_graphs = [g.to(dtype=dtype) for g in train_graphs]
    if valid_graphs:
        valid_graphs = [g.to(dtype=dtype) for g in valid_graphs]
    else:
        _say(
            "note: no validation set; validating (and selecting the best model) on the training set", progress
        )
        valid_graphs = train_graphs

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=optimizer.lower() == "amsgrad")
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=scheduler_factor, patience=scheduler_patience
    )
    ema = ExponentialMovingAverage(params, ema_decay) if ema_decay else None
    rng = np.random.default_rng(seed)
    result = TrainResult(
        model_path=str(out / BEST_MODEL) if out else None, checkpoint_path=str(ckpt_path) if out else None
    )
    state = {"epoch": 0, "step": 0, "bad_epochs": 0, "elapsed_s": 0.0, "best_state_dict": None}

    if resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_path} is not a cartlorem training checkpoint")
        saved = ckpt["model"]["config"]
        mismatch = {
            k: (saved.get(k), v)
            for k, v in model.config.items()
            if k not in _STATISTICS_KEYS and saved.get(k) != v
        }
        if mismatch:
            detail = "; ".join(f"{k}: checkpoint {a!r}, model {b!r}" for k, (a, b) in mismatch.items())
            raise ValueError(f"the checkpoint in {out} was written for a different model ({detail})")
        model.set_statistics(
            avg_num_neighbors=saved["avg_num_neighbors"], scale=saved["scale"], shift=saved["shift"]
        )
        model.load_state_dict(ckpt["train_state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            if ckpt.get("ema") is None:
                raise ValueError("the checkpoint has no EMA state but ema_decay is set")
            ema.load_state_dict(ckpt["ema"])
        _set_rng_state(rng, ckpt["rng"])
        state.update({k: ckpt[k] for k in ("epoch", "step", "bad_epochs", "elapsed_s", "best_state_dict")})
        result.history = list(ckpt["history"])
        result.best_epoch, result.best_valid_loss = ckpt["best"]["epoch"], ckpt["best"]["loss"]
        result.best_metrics = dict(ckpt["best"]["metrics"])
        _say(f"resuming {out} after epoch {state['epoch']} (best epoch {result.best_epoch})", progress)
    else:
        torch.manual_seed(seed)
        if statistics:
            stats = _set_statistics(model, train_graphs)
            _say(
                f"statistics from {stats['n_structures']} training structures: ⟨neighbours⟩ "
                f"{stats['avg_num_neighbors']:.2f}, scale (force RMS) {float(model.scale):.4g} eV/Å, "
                f"shift {float(model.shift):.4g} eV/atom",
                progress,
            )

    def save_checkpoint():
        with ema.applied() if ema is not None else contextlib.nullcontext():
            payload = model_payload(model)
        _atomic_save(
            {
                "format": _CHECKPOINT_FORMAT,
                "model": payload,  # the EMA (evaluation) weights: load_model(checkpoint.pt) works
                "train_state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": _rng_state(rng),
                "best": {
                    "epoch": result.best_epoch,
                    "loss": result.best_valid_loss,
                    "metrics": result.best_metrics,
                },
                "history": result.history,
                "settings": {
                    "batch_size": batch_size,
                    "lr": lr,
                    "weights": w,
                    "optimizer": optimizer,
                    "ema_decay": ema_decay,
                    "clip_grad": clip_grad,
                    "patience": patience,
                    "seed": seed,
                },
                **{k: state[k] for k in ("epoch", "step", "bad_epochs", "elapsed_s", "best_state_dict")},
            },
            ckpt_path,
        )

    t_call = time.perf_counter()
    epoch_times: list[float] = []
    n_train = len(train_graphs)
    n_batches = math.ceil(n_train / batch_size)
    bar = _progress(
        total=max(int(epochs) - state["epoch"], 0),
        desc="training",
        unit="epoch",
        enabled=progress,
        dynamic_ncols=True,
    )
    result.stop_reason = "epochs"
    last_plot = time.perf_counter()
    try:
        for epoch in range(state["epoch"] + 1, int(epochs) + 1):
            if max_time is not None and epoch_times:
                if time.perf_counter() - t_call + float(np.mean(epoch_times)) > max_time:
                    result.stop_reason = "max_time"
                    break
            t_epoch = time.perf_counter()
            model.train()
            order = rng.permutation(n_train)
            sum_loss, n_seen = 0.0, 0
            inner = _progress(
                total=n_batches,
                desc=f"epoch {epoch}/{epochs}",
                unit="batch",
                leave=False,
                enabled=progress,
                dynamic_ncols=True,
            )
            for b in range(n_batches):
                if max_time is not None and b > 0 and time.perf_counter() - t_call > max_time:
                    _say(
                        f"epoch {epoch} cut short after {b}/{n_batches} batches (max_time {max_time:g} s)",
                        progress,
                    )
                    result.stop_reason = "max_time"
                    break
                idx = order[b * batch_size : (b + 1) * batch_size]
                batch = collate([train_graphs[k] for k in idx]).to(device=device)
                want_stress = w["stress"] > 0 and batch.stress is not None and bool(batch.has_stress.any())
                pred = model(
                    batch, compute_forces=w["forces"] > 0, compute_stress=want_stress, create_graph=True
                )
                loss, terms = weighted_loss(pred, batch, w)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        _nonfinite_message(
                            "loss", float(loss.detach()), terms, epoch, b + 1, n_batches, idx, result, out
                        )
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad:
                    gnorm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
                else:
                    gnorm = torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in params if p.grad is not None])
                    )
                if not torch.isfinite(gnorm):
                    raise NonFiniteLossError(
                        _nonfinite_message(
                            "gradient", float(gnorm), terms, epoch, b + 1, n_batches, idx, result, out
                        )
                    )
                opt.step()
                if ema is not None:
                    ema.update()
                state["step"] += 1
                sum_loss += float(loss.detach()) * len(idx)
                n_seen += len(idx)
                inner.update(1)
                inner.set_postfix(loss=f"{sum_loss / n_seen:.4g}", refresh=False)
            inner.close()
            train_loss = sum_loss / max(n_seen, 1)

            # validation with the averaged weights
            with ema.applied() if ema is not None else contextlib.nullcontext():
                m = compute_metrics(predict(model, valid_graphs, batch_size=valid_batch_size))
                valid_loss = _validation_loss(m, w)
                if not math.isfinite(valid_loss):
                    raise NonFiniteLossError(
                        f"non-finite validation loss ({valid_loss}) at epoch {epoch}; "
                        + _kept_message(result, out)
                    )
                improved = valid_loss < result.best_valid_loss
                if improved:
                    result.best_epoch, result.best_valid_loss, result.best_metrics = epoch, valid_loss, m
                    state["best_state_dict"] = {
                        k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                    }
                    if out is not None:
                        save_model(
                            model,
                            out / BEST_MODEL,
                            training={"epoch": epoch, "valid_loss": valid_loss, "valid_metrics": m},
                        )
            lr_now = opt.param_groups[0]["lr"]
            sched.step(valid_loss)
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            dt = time.perf_counter() - t_epoch
            epoch_times.append(dt)
            state["elapsed_s"] += dt
            state["epoch"] = epoch
            row = {
                "epoch": epoch,
                "lr": lr_now,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "valid_energy_mae_mev_per_atom": m["energy_mae_mev_per_atom"],
                "valid_forces_mae_mev_per_a": m["forces_mae_mev_per_a"],
                "valid_stress_mae_mev_per_a3": m.get("stress_mae_mev_per_a3"),
                "epoch_time_s": dt,
                "elapsed_s": state["elapsed_s"],
            }
            result.history.append(row)
            result.epochs_completed = epoch
            if out is not None:
                save_checkpoint()
                _write_csv(out / LOG_CSV, result.history)
                if time.perf_counter() - last_plot > 60:
                    plot_learning_curve(result.history, out / CURVE_PNG)
                    last_plot = time.perf_counter()
            bar.update(1)
            bar.set_postfix_str(_metric_str(m), refresh=True)
            _say(
                f"epoch {epoch:>4}  lr {lr_now:.2e}  train loss {train_loss:.4g}  "
                f"valid loss {valid_loss:.4g}  {_metric_str(m)}  {dt:.1f} s{'  *' if improved else ''}",
                progress,
            )
            if result.stop_reason == "max_time":
                break
            if patience is not None and state["bad_epochs"] >= patience:
                result.stop_reason = "early_stopping"
                _say(f"early stopping: no better validation loss for {patience} epochs", progress)
                break
    finally:
        bar.close()
        if out is not None and result.history:
            if not plot_learning_curve(result.history, out / CURVE_PNG):
                _say(f"note: matplotlib is not installed; {CURVE_PNG} not written", progress)

    result.epochs_completed = state["epoch"]
    if state["best_state_dict"] is not None:
        model.load_state_dict(state["best_state_dict"])
    model.eval()
    return result


def _metric_str(m: dict) -> str:
    parts = []
    if m.get("energy_mae_mev_per_atom") is not None:
        parts.append(f"E MAE {m['energy_mae_mev_per_atom']:.2f} meV/atom")
    if m.get("forces_mae_mev_per_a") is not None:
        parts.append(f"F MAE {m['forces_mae_mev_per_a']:.1f} meV/Å")
    if m.get("stress_mae_mev_per_a3") is not None:
        parts.append(f"S MAE {m['stress_mae_mev_per_a3']:.2f} meV/Å³")
    return ", ".join(parts)


def _kept_message(result: TrainResult, out: Optional[Path]) -> str:
    if out is None:
        return "no files were written (out_dir=None)."
    if result.best_epoch:
        return (
            f"the best model (epoch {result.best_epoch}) is kept in {out / BEST_MODEL} and the last good "
            f"state in {out / CHECKPOINT}."
        )
    return "no epoch had completed, so no model was saved."


def _nonfinite_message(what, value, terms, epoch, b, n_batches, idx, result, out) -> str:
    detail = ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
    return (
        f"non-finite {what} ({value}) at epoch {epoch}, batch {b}/{n_batches} (training structures "
        f"{sorted(int(k) for k in idx)}; loss terms: {detail or 'none'}); training stopped. "
        + _kept_message(result, out)
        + " Check the labels of these structures, or lower the learning rate."
    )
