"""The training loop: any ``torch.nn.Module`` that maps a batch to energies and forces.

The model contract: ``model(batch, compute_forces=bool, compute_stress=bool, create_graph=bool)``
returns a dict with "energy" [B] eV, "forces" [N, 3] eV/Å and, when asked for, "stress"
[B, 3, 3] eV/Å³ (other entries are ignored); ``batch`` is a collated :class:`~cartlorem.graph.Graph`.
CartLorem satisfies it, and so does any wrapper (benchmarks/harness.py wraps MACE).

Per epoch: shuffled mini-batches (a ``DataLoader`` with ``collate``) → loss → gradient clipping →
Adam/AMSGrad step → EMA update; then the averaged weights are validated, the plateau scheduler
and early stopping see the validation loss, and the run folder (optional) receives the
checkpoint, the best model, log.csv and the learning curve.

Under torchrun (or any initialised default process group) the same loop trains on several
processes: ``batch_size`` is then the global batch, shared out over the processes, and one
process alone writes files (``cartlorem.training.distributed`` says how and why).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..evaluate import metrics as compute_metrics
from ..evaluate import predict
from ..fileio import damaged_record
from ..graph import Graph, collate
from ..nn.long_range import compact_slab_cells
from .averaging import ExponentialMovingAverage
from .distributed import SINGLE, Ranks, gather_predictions, loss_share, share_scales
from .distributed import current as current_ranks
from .log import metric_summary
from .loss import charge_outputs, check_labels_to_fit, check_loss_labels, loss_weights, validation_loss, weighted_loss
from .prepare import check_dataset, fit_statistics
from .run_folder import (
    RunFolder,
    cpu_state_dict,
    kept_message,
    model_payload_of,
    restore_model_settings,
    rng_state,
    set_rng_state,
    upgrade_train_state,
)

__all__ = ["train", "TrainResult", "NonFiniteLossError", "epoch_loader"]

log = logging.getLogger(__name__)
_STATE_KEYS = ("epoch", "step", "bad_epochs", "elapsed_s", "best_state_dict")


def make_optimizer(params, lr: float, weight_decay: float, amsgrad: bool) -> torch.optim.Adam:
    """Adam (or AMSGrad) over ``params`` as the trainer uses it: the fused implementation (one kernel for every
    parameter: 0.25 ms against 0.81 ms for the foreach one and 1.37 ms for the per-tensor loop, 59 tensors of
    a C = 16 model on one CPU thread) where torch has it for the parameters' device and dtype, else foreach."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad, fused=True)
    except (RuntimeError, ValueError):  # no fused Adam for this device or dtype
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad, foreach=True)


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient) became NaN or inf; training stopped, the best model is kept."""


@dataclass
class TrainResult:
    """What :func:`train` did: one ``history`` row per epoch (the columns of log.csv), the best
    epoch and its validation metrics, why it stopped ("epochs", "early_stopping", "max_time") and
    where the files are (``model_path`` None until a best model has been written; both None
    without ``out_dir``). ``best_metrics_on``: "validation", or "training" when there was no
    validation set and the best model was selected by its metrics on the training set. ``cut_short``:
    the last epoch was cut short by ``max_time`` (a resume continues it)."""

    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_valid_loss: float = math.inf
    best_metrics: dict = field(default_factory=dict)
    epochs_completed: int = 0
    stop_reason: str = "epochs"
    model_path: Optional[str] = None
    checkpoint_path: Optional[str] = None
    best_metrics_on: str = "validation"
    cut_short: bool = False


def epoch_loader(graphs, batch_size: int, rng: np.random.Generator, workers: int = 0, ranks: Ranks = SINGLE, *,
                 order=None):
    """One epoch's batches: (index lists [[k, …], …], a DataLoader yielding their ``collate``d Graphs).

    The order is ``rng.permutation(len(graphs))`` cut into chunks of ``batch_size`` (the last one
    may be smaller); pass the same generator every epoch so that epochs differ. ``order``: the
    structures to take, in this order, instead (the rest of an epoch that was cut short). ``workers``
    processes collate ahead of the loop (0: in this process). With several processes (``ranks``)
    every process draws the same chunks (the global batches) and keeps its contiguous part of
    each (``ranks.part``); a part may be empty (a short last batch), and the loader yields None
    for it.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    order = rng.permutation(len(graphs)) if order is None else np.asarray(order, dtype=np.int64)
    chunks = [order[b : b + batch_size].tolist() for b in range(0, len(order), int(batch_size))]
    if ranks.many:
        chunks = [[c[k] for k in ranks.part(len(c))] for c in chunks]
    loader = DataLoader(graphs, batch_sampler=chunks, collate_fn=_collate_or_none, num_workers=int(workers),
                        generator=torch.Generator(),  # a private generator: torch's global stream is untouched
                        multiprocessing_context=_worker_context() if int(workers) > 0 else None)
    return chunks, loader


def _worker_context():
    """The loader workers' start method: fork on Linux. Under forkserver (Python 3.14's default there, or the
    user's choice) starting a worker sends every tensor of the data set as a file descriptor in one message, and
    more than 256 (~20 structures) failed with "too many fds"; spawn is slow to start. Elsewhere the default."""
    import multiprocessing
    import sys

    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def _collate_or_none(graphs):
    return collate(graphs) if len(graphs) else None


def _model_place(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    floats = [p for p in model.parameters() if p.is_floating_point()]
    if not floats:
        raise ValueError(f"{type(model).__name__} has no floating-point parameters to train")
    return floats[0].device, floats[0].dtype


def _keeps_callers_random_state(fn):
    """The call runs on its own copy of torch's and Python's global random states (seeded, or restored from a
    checkpoint, inside it); the caller's are as they were on return. Before, a fresh run left torch's generator at
    manual_seed(seed): models built in a loop of train() calls all started from the same weights."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        state = random.getstate()
        # the CUDA generators too where they are in use: CUDA already started, or the model on a GPU (which the
        # seeding inside would start); a CPU run on a GPU machine does not start CUDA for this
        model = args[0] if args else kwargs.get("model")
        on_gpu = isinstance(model, torch.nn.Module) and any(p.is_cuda for p in model.parameters())
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() or on_gpu else []
        try:
            with torch.random.fork_rng(devices=cuda):
                return fn(*args, **kwargs)
        finally:
            random.setstate(state)
    return wrapper


@_keeps_callers_random_state
def train(
    model: torch.nn.Module,
    train_graphs: Sequence[Graph],
    valid_graphs: Optional[Sequence[Graph]] = None,
    *,
    epochs: int = 1000,
    batch_size: int = 8,
    lr: float = 5e-3,
    weights: Optional[Mapping[str, float]] = None,
    optimizer: str = "amsgrad",
    weight_decay: float = 0.0,
    ema_decay: Optional[float] = 0.99,
    scheduler_factor: float = 0.8,
    scheduler_patience: int = 20,
    clip_grad: Optional[float] = 10.0,
    patience: Optional[int] = 50,
    valid_batch_size: Optional[int] = None,
    out_dir=None,
    resume: bool = False,
    overwrite: bool = False,
    statistics: bool = True,
    seed: int = 0,
    progress: bool = True,
    max_time: Optional[float] = None,
    workers: int = 0,
    compile: bool = False,
    on_start=None,
) -> TrainResult:
    """Train ``model`` in place; on return it holds the best EMA weights (by validation loss).

    Args:
        model: a CartLorem, or any module with the contract of the module docstring, on the
            device to train on (the dtype of its parameters is used for the data).
        train_graphs, valid_graphs: labelled graphs (``cartlorem.data.read_dataset``, built with the
            model's cutoff): a list, or any map-style dataset (``len`` and ``[k]``) so that the data
            need not all be in memory. Without a validation set the training set is validated.
        epochs: total number of epochs (counting those done before a resume); the default is a cap that
            early stopping (``patience``) or ``max_time`` normally ends first.
        batch_size: structures per training batch (per optimiser step); with several processes the
            global batch, shared out so that each process takes about batch_size / N of it (the same
            steps as one process with this batch_size). valid_batch_size: structures per validation
            batch on each process (default 2 × the per-process training batch).
        lr: initial learning rate. optimizer: "adam" or "amsgrad"; weight_decay: L2 (Adam style).
        weights: loss weights {"energy": per-atom energy, "forces", "stress", "dipole", "born_charges"};
            missing entries take ``DEFAULT_WEIGHTS`` (10, 1, 1, 0, 0). A dipole / Born-charge weight > 0
            calls the model with compute_dipole / compute_born_charges on labelled batches.
        ema_decay: decay of the weight average used for validation and the saved model (None or 0: off).
        scheduler_factor, scheduler_patience: ReduceLROnPlateau on the validation loss: the rate is
            multiplied by the factor after ``scheduler_patience`` + 1 epochs in a row that did not lower the best
            loss by more than 1e-4 of it, at the last of them (torch's rule and relative threshold; early stopping
            counts any lower loss as better, and stops after ``patience`` epochs without one). The defaults (0.8
            after 20, early stopping after 50) come from the learning-rate study of benchmarks/README.md:
            long-range models can sit on a plateau for hundreds of epochs while the loss creeps down (cumulene:
            ~300 epochs near 5 meV/atom); with a patience of 5 the rate had been cut tenfold on it and early
            stopping ended the run there.
        clip_grad: maximum gradient norm (None: no clipping).
        patience: stop after this many epochs without a better validation loss (None: never).
        out_dir: folder for checkpoint.pt, model.pt, log.csv, learning_curve.png (None: nothing written).
        resume: continue from ``out_dir/checkpoint.pt`` exactly where it stopped (weights, EMA,
            optimiser, scheduler, random states, history). Statistics are not recomputed. The settings of
            this call apply from then on (scheduler factor and patience, EMA decay, weight decay, optimiser,
            loss weights: the best validation loss is re-expressed in new weights); the learning rate
            continues from the checkpoint's.
        overwrite: allow a fresh run in an ``out_dir`` that already holds a checkpoint.
        statistics: on a fresh run, set a CartLorem's reference energies, average neighbour count,
            scale and shift from the training set (``cartlorem.training.prepare.fit_statistics``);
            pass False for other models (TypeError otherwise) or to keep the model's own.
        seed: seeds the batch order and torch's random generator (fresh runs), within the call: the caller's
            random states (torch's, Python's) are as they were on return.
        progress: show progress bars on stderr. Per-epoch lines go to the ``cartlorem.training``
            logger (level INFO); the command line prints them.
        max_time: wall-clock budget in seconds for this call: no epoch is started that is expected
            to end after it, and an epoch still running at the limit is cut short. A cut epoch is validated
            and reported (``TrainResult.cut_short``; model.pt says so when it is the best), but its checkpoint
            is written before that validation and holds the epoch's batch order and position: a resume
            continues the same epoch where it stopped, so that cut + resume give the uninterrupted run.
        workers: DataLoader worker processes that collate training batches (0: in this process).
        compile: compute the loss gradient of each training step as one ``torch.compile``'d function
            (:mod:`cartlorem.training.compiled`): the same numbers, several times faster per step once
            compiled, but the first step compiles (minutes on a CPU). Batches it does not cover (long-range
            models on periodic batches beyond
            :func:`cartlorem.ewald.cells.plan_fits`, dipole / Born-charge terms) and a failed
            compilation run eagerly, with a warning that says why.
        on_start: called with no arguments once every check of the settings and data has passed and the run
            folder is this run's (statistics set or checkpoint read, old files of an ``overwrite`` removed), before
            the first epoch; ``cartlorem train`` writes the run's config.yaml there. A refused start calls nothing
            and leaves ``out_dir`` as it was.

    Several processes: when a default process group is initialised (``torchrun``, or
    ``torch.distributed.init_process_group`` in your script), every process calls ``train`` with
    the same arguments and data; process 0's initial weights and statistics are sent to the
    others, gradients and validation results are summed over processes, and process 0 alone
    writes ``out_dir`` and logs (see ``cartlorem.training.distributed``).

    Raises:
        NonFiniteLossError: NaN/inf loss or gradient (the message names epoch, batch and
            structures; model.pt and checkpoint.pt keep the last good state).
        ValueError / FileNotFoundError / FileExistsError: bad settings, data or out_dir.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"train expects a torch.nn.Module, got {type(model).__name__}")
    if len(train_graphs) == 0:
        raise ValueError("the training set is empty")
    for name, value, least in (("epochs", epochs, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not math.isfinite(value) or int(value) != value or value < least:  # 2.5 → 2
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not 0 < lr < math.inf:
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    if max_time is not None and not max_time > 0:  # 0 trained one batch; NaN was ignored
        raise ValueError(f"max_time must be a positive number of seconds (None: no limit), got {max_time}")
    if optimizer.lower() not in ("adam", "amsgrad"):
        raise ValueError(f"optimizer must be 'adam' or 'amsgrad', got {optimizer!r}")
    _check_optimiser_settings(weight_decay=weight_decay, ema_decay=ema_decay, scheduler_factor=scheduler_factor,
                              scheduler_patience=scheduler_patience, clip_grad=clip_grad, patience=patience,
                              valid_batch_size=valid_batch_size)
    if isinstance(workers, bool) or int(workers) != workers or workers < 0:  # 1.5 ran 1 without a word
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    if int(seed) != seed or seed < 0:  # numpy's generator takes no negative seed
        raise ValueError(f"seed must be an integer >= 0, got {seed}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where checkpoint.pt is)")
    # numpy numbers (an lr from np.logspace) → int / float: checkpoint.pt records the settings, and the safe reader
    # of a resume (and load_model) takes plain data only
    epochs, batch_size, seed, workers, scheduler_patience = map(int, (epochs, batch_size, seed, workers,
                                                                      scheduler_patience))
    lr, weight_decay, scheduler_factor = map(float, (lr, weight_decay, scheduler_factor))
    ema_decay, clip_grad, max_time = (None if v is None else float(v) for v in (ema_decay, clip_grad, max_time))
    patience, valid_batch_size = (None if v is None else int(v) for v in (patience, valid_batch_size))
    ranks = current_ranks(_model_place(model)[0])
    if int(batch_size) < ranks.size:
        raise ValueError(
            f"batch_size {batch_size} is the global batch, shared out over {ranks.size} processes: it must be at "
            f"least {ranks.size}"
        )
    say = log if ranks.is_main else _QUIET
    progress = progress and ranks.is_main
    folder = RunFolder(out_dir, write=ranks.is_main) if out_dir is not None else None
    if folder is not None:  # refusals only: nothing in out_dir changes before every check below has passed
        folder.check(resume=resume, overwrite=overwrite)
    valid_graphs = valid_graphs if valid_graphs is not None else []
    w = loss_weights(weights)
    check_dataset(model, train_graphs, "training")
    check_dataset(model, valid_graphs, "validation")
    check_loss_labels(model, train_graphs, w)
    if len(valid_graphs):
        check_labels_to_fit(valid_graphs, w, "validation")
    if len(valid_graphs) == 0:
        say.warning("no validation set; validating (and selecting the best model) on the training set")
        valid_graphs = train_graphs

    ranks.broadcast_module(model)  # every process starts from process 0's weights (a resume replaces them)
    run = _Run(model, folder, w, int(valid_batch_size or 2 * -(-batch_size // ranks.size)),
               progress,
               dict(batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                    ema_decay=ema_decay, scheduler_factor=scheduler_factor,
                    scheduler_patience=scheduler_patience, clip_grad=clip_grad, patience=patience, seed=seed,
                    compile=bool(compile)),
               ranks)
    if valid_graphs is train_graphs:
        run.result.best_metrics_on = "training"
    if resume:
        run.resume()
        state_partial = run.state["partial"]
        if state_partial is not None and len(state_partial["order"]) != len(train_graphs):
            raise ValueError(
                f"the checkpoint in {folder.path} continues epoch {state_partial['epoch']}, which max_time cut short, "
                f"over {len(state_partial['order'])} training structures, but this call has {len(train_graphs)}: "
                "resume with the run's training set"
            )
    else:
        torch.manual_seed(seed)
        if statistics:
            fit_statistics(model, train_graphs, ranks=ranks)
    if folder is not None:  # the start is accepted: from here on the folder is this run's
        folder.open(resume=resume, overwrite=overwrite)
        if resume:
            run.write_missing_best_model()
            # the checkpoint is written before log.csv: a run killed between the two left log.csv an epoch short
            folder.write_log(run.result.history, plot=False)
    if on_start is not None:
        on_start()

    result, state = run.result, run.state
    t_call = time.perf_counter()
    epoch_times: list[float] = []
    bar = tqdm(total=max(int(epochs) - state["epoch"], 0), desc="training", unit="epoch",
               disable=not progress, dynamic_ncols=True)
    last_plot = time.perf_counter()
    try:
        for epoch in range(state["epoch"] + 1, int(epochs) + 1):
            if patience is not None and state["bad_epochs"] >= patience:  # a resumed run that had stopped early
                result.stop_reason = "early_stopping"
                say.warning("the run had already stopped early after epoch %d (no better validation loss for %d "
                            "epochs, patience %d): no epoch trained; pass a larger patience (--patience) to train "
                            "on", state["epoch"], state["bad_epochs"], patience)
                break
            if max_time is not None and epoch_times:
                if ranks.any(time.perf_counter() - t_call + float(np.mean(epoch_times)) > max_time):
                    result.stop_reason = "max_time"
                    break
            t_epoch = time.perf_counter()
            deadline = None if max_time is None else t_call + max_time
            train_loss = run.train_epoch(train_graphs, epoch, epochs, int(workers), deadline)
            cut = result.cut_short = state["partial"] is not None
            if cut and folder is not None:
                # the checkpoint of a cut epoch is written before its validation: a resume continues the epoch
                # from the state of the cut, with the scheduler, early stopping and best model of the epochs
                # before it (the run it continues then is the uninterrupted run)
                run.save_checkpoint()
            m, valid_loss, improved = run.validate(valid_graphs, epoch, cut=cut)
            dt = time.perf_counter() - t_epoch
            if not cut:
                epoch_times.append(dt)
            row = run.end_epoch(epoch, train_loss, m, valid_loss, improved, run.epoch_time_before + dt)
            if folder is not None:
                if not cut:
                    run.save_checkpoint()
                plot_now = time.perf_counter() - last_plot > 60
                folder.write_log(result.history, plot=plot_now)
                if plot_now:
                    last_plot = time.perf_counter()
            bar.update(1)
            bar.set_postfix_str(metric_summary(m), refresh=True)
            say.info(
                "epoch %4d  lr %.2e  train loss %.4g  valid loss %.4g  %s  %.1f s%s",
                epoch, row["lr"], train_loss, valid_loss, metric_summary(m), row["epoch_time_s"],  # (log.csv's: the
                "  *" if improved else "",  # whole epoch, also when a resume finished one that max_time cut short)
            )
            if result.stop_reason == "max_time":
                break
            if patience is not None and state["bad_epochs"] >= patience:
                result.stop_reason = "early_stopping"
                say.info("early stopping: no better validation loss for %d epochs", patience)
                break
    finally:
        bar.close()
        if folder is not None and result.history and not folder.plot(result.history):
            say.warning("matplotlib is not installed; %s not written", folder.curve_png.name)
    ranks.barrier()  # process 0's files are complete when train returns on any process

    result.epochs_completed = state["epoch"]
    if state["best_state_dict"] is not None:
        model.load_state_dict(state["best_state_dict"])
    model.eval()
    return result


def _check_optimiser_settings(*, weight_decay, ema_decay, scheduler_factor, scheduler_patience, clip_grad, patience,
                              valid_batch_size) -> None:
    """ValueError naming the setting for values that would otherwise fail deep inside torch or train silently
    wrong (a clip_grad <= 0 flips or zeroes every gradient, a scheduler_factor of 0 sets the rate to 0)."""
    problems = []
    if not 0 <= weight_decay < math.inf:
        problems.append(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if ema_decay is not None and not 0 <= ema_decay < 1:
        problems.append(f"ema_decay must be in [0, 1) (0 or None: off), got {ema_decay}")
    if not 0 < scheduler_factor < 1:
        problems.append(f"scheduler_factor must be in (0, 1), got {scheduler_factor}")
    if int(scheduler_patience) != scheduler_patience or scheduler_patience < 0:
        problems.append(f"scheduler_patience must be an integer >= 0, got {scheduler_patience}")
    if clip_grad is not None and not clip_grad > 0:
        problems.append(f"clip_grad must be > 0 (None: no clipping), got {clip_grad}")
    if patience is not None and (int(patience) != patience or patience < 1):
        problems.append(f"patience must be an integer >= 1 (None: no early stopping), got {patience}")
    if valid_batch_size is not None and (int(valid_batch_size) != valid_batch_size or valid_batch_size < 1):
        problems.append(f"valid_batch_size must be an integer >= 1 (None: the default), got {valid_batch_size}")
    if problems:
        raise ValueError("; ".join(problems))


class _Quiet:
    """The logger of processes other than 0, which log nothing."""

    def info(self, *args, **kwargs) -> None:
        pass

    warning = info


_QUIET = _Quiet()


class _Run:
    """The state of one training run (model, optimiser, scheduler, EMA, batch-order generator,
    history) and the steps of an epoch; :func:`train` drives it."""

    def __init__(self, model, folder: Optional[RunFolder], weights: dict, valid_batch_size: int, progress: bool,
                 settings: dict, ranks: Ranks = SINGLE):
        self.ranks, self.say = ranks, (log if ranks.is_main else _QUIET)
        self.model, self.folder, self.w, self.progress = model, folder, weights, progress
        self.valid_batch_size, self.settings = valid_batch_size, settings
        self.batch_size, self.clip_grad = int(settings["batch_size"]), settings["clip_grad"]
        self.device, self.dtype = _model_place(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, settings["lr"], settings["weight_decay"],
                                  settings["optimizer"].lower() == "amsgrad")
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, mode="min", factor=settings["scheduler_factor"], patience=settings["scheduler_patience"],
            threshold=1e-4, threshold_mode="rel")  # torch's defaults, written out: the docstring states them
        decay = settings["ema_decay"]
        self.ema = ExponentialMovingAverage(self.params, decay) if decay else None
        self.rng = np.random.default_rng(settings["seed"])
        self.result = TrainResult(checkpoint_path=str(folder.checkpoint) if folder else None)
        self.state = {"epoch": 0, "step": 0, "bad_epochs": 0, "elapsed_s": 0.0, "best_state_dict": None,
                      "partial": None}
        self.compiled, self._eager_reasons, self._compile_announced = None, set(), False
        if settings.get("compile"):
            from .compiled import CompiledLossGradient

            self.compiled = CompiledLossGradient(model, weights)

    def averaged(self):
        """Context in which the model holds the averaged (EMA) weights."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def resume(self) -> None:
        """Everything from the checkpoint: weights, optimiser, scheduler, EMA, random states, history."""
        folder, result = self.folder, self.result
        ckpt = folder.load_checkpoint()
        restore_model_settings(self.model, ckpt["model"], folder.path)
        self.model.load_state_dict(upgrade_train_state(ckpt))
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise ValueError(
                    f"the run in {folder.path} was trained without a weight average (its ema_decay was 0 / none), so "
                    f"its checkpoint has no EMA state to continue with ema_decay {self.settings['ema_decay']}: resume "
                    "with the run's value (--ema-decay 0, ema_decay=None), or start a new run to train with one")
            self.ema.load_state_dict(ckpt["ema"])
        self._apply_settings()
        set_rng_state(self.rng, ckpt["rng"])
        self.state.update({k: ckpt[k] for k in _STATE_KEYS})
        if self.state["best_state_dict"] is not None:  # loaded at the end, and by write_missing_best_model
            self.state["best_state_dict"] = upgrade_train_state(ckpt, self.state["best_state_dict"])
        self.state["partial"] = ckpt.get("partial")
        result.history = list(ckpt["history"])
        result.best_epoch, result.best_valid_loss = ckpt["best"]["epoch"], ckpt["best"]["loss"]
        result.best_metrics = dict(ckpt["best"]["metrics"])
        saved_w = (ckpt.get("settings") or {}).get("weights")
        if result.best_epoch and saved_w is not None and loss_weights(saved_w) != self.w:
            # another stage with other loss weights: the best loss (and the scheduler's) in the new weights' terms,
            # from the best epoch's metrics, so that the new epochs' losses are compared with a loss of the same kind
            result.best_valid_loss = validation_loss(result.best_metrics, self.w)
            self.sched.best = result.best_valid_loss
            self.say.info("loss weights changed since the checkpoint (%s → %s): best validation loss %.4g in the "
                          "new weights", saved_w, self.w, result.best_valid_loss)
        if result.best_epoch and folder.best_model.is_file():
            result.model_path = str(folder.best_model)
        self.say.info("resuming %s after epoch %d (best epoch %d)", folder.path, self.state["epoch"], result.best_epoch)

    def write_missing_best_model(self) -> None:
        """After a resume: write model.pt again from the checkpoint's best weights when the file is missing
        (deleted, or not copied with checkpoint.pt), which would otherwise be written again only by a better epoch,
        or when it holds another epoch than the checkpoint's best (an epoch that max_time cut short, validated
        after its checkpoint was written and continued by this resume; an epoch whose checkpoint a crash lost), or
        when it is damaged."""
        folder, result, best = self.folder, self.result, self.state["best_state_dict"]
        if not result.best_epoch or best is None:
            return
        if folder.best_model.is_file():
            if damaged_record(folder.best_model) is not None:  # torch.load would read a flipped bit without a word
                why = "was damaged (a record does not match its checksum)"
            elif self._best_file_epoch() == result.best_epoch:
                return
            else:
                why = "holds another epoch than the checkpoint's best"
        else:
            why = "was missing"
        current = cpu_state_dict(self.model)
        self.model.load_state_dict(best)
        try:
            folder.save_best(self.model, training=self._best_training(result.best_epoch, result.best_valid_loss,
                                                                      result.best_metrics))
        finally:
            self.model.load_state_dict(current)
        result.model_path = str(folder.best_model)
        self.say.warning("%s %s: written again from the checkpoint's best model (epoch %d)",
                         folder.best_model, why, result.best_epoch)

    def _best_file_epoch(self) -> Optional[int]:
        """The epoch model.pt says it holds (None for a file without one, or one that cannot be read)."""
        try:
            saved = torch.load(self.folder.best_model, map_location="cpu", weights_only=True)
            return int(saved["training"]["epoch"])
        except Exception:  # noqa: BLE001 - a damaged or foreign file: written again
            return None

    def _best_training(self, epoch: int, loss: float, metrics: dict) -> dict:
        """The "training" entry of model.pt: the best epoch and its validation loss and metrics, or, without a
        validation set, its loss and metrics on the training set under names that say so."""
        if self.result.best_metrics_on == "training":
            return {"epoch": epoch, "training_set_loss": loss, "training_set_metrics": metrics,
                    "note": "no validation set: the best model was selected by its loss on the training set"}
        return {"epoch": epoch, "valid_loss": loss, "valid_metrics": metrics}

    def _apply_settings(self) -> None:
        """After loading a checkpoint: the settings of this call apply from here on (the load_state_dicts bring
        back the old scheduler factor and patience, EMA decay, weight decay and Adam / AMSGrad along with the
        state); the state itself stays: moments, current learning rate, counters."""
        settings = self.settings
        amsgrad = settings["optimizer"].lower() == "amsgrad"
        for group in self.opt.param_groups:
            group["weight_decay"], group["amsgrad"] = settings["weight_decay"], amsgrad
            for p in group["params"]:
                state = self.opt.state.get(p, {})
                if amsgrad and "exp_avg_sq" in state and "max_exp_avg_sq" not in state:  # Adam → AMSGrad
                    state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()  # the running maximum starts here
        self.sched.factor, self.sched.patience = settings["scheduler_factor"], int(settings["scheduler_patience"])
        if self.ema is not None:
            self.ema.decay = float(settings["ema_decay"])

    def train_epoch(self, graphs, epoch: int, epochs: int, workers: int, deadline: Optional[float]) -> float:
        """One pass over shuffled batches; returns the mean training loss. Past ``deadline``
        (perf_counter seconds) the epoch is cut short, the stop reason set to "max_time" and
        ``state["partial"]`` records where (the epoch's order, the structures done, the loss sums, the time),
        so that a resume continues this epoch where it stopped; an epoch cut before continues from there."""
        model, w = self.model, self.w
        model.train()
        t0 = time.perf_counter()
        partial = self.state["partial"]
        if partial is not None and int(partial["epoch"]) == epoch:  # the rest of an epoch that was cut short
            order = np.asarray(partial["order"], dtype=np.int64)
            done, sum_loss, n_seen = int(partial["done"]), float(partial["sum_loss"]), int(partial["n_seen"])
            time_before = float(partial["time_s"])
            self.say.info("epoch %d continues after %d of its %d structures", epoch, done, len(order))
        else:
            order = self.rng.permutation(len(graphs))
            done, sum_loss, n_seen, time_before = 0, 0.0, 0, 0.0
        self.state["partial"], self.epoch_time_before = None, time_before
        rest = order[done:]
        batch_indices, loader = epoch_loader(graphs, self.batch_size, self.rng, workers, self.ranks, order=rest)
        first = -(-done // self.batch_size)  # batches of the epoch before these (when the batch size is unchanged)
        n_batches = first + len(batch_indices)
        inner = tqdm(total=n_batches, initial=first, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                     disable=not self.progress, dynamic_ncols=True)
        for k, (idx, batch) in enumerate(zip(batch_indices, loader)):
            b = first + k
            if deadline is not None and k > 0 and self.ranks.any(time.perf_counter() > deadline):
                at = done + k * self.batch_size  # structures of the epoch done
                self.say.info("epoch %d cut short after %d/%d batches (max_time); a resume continues it there",
                              epoch, b, n_batches)
                self.result.stop_reason = "max_time"
                self.state["partial"] = {"epoch": epoch, "order": torch.as_tensor(order), "done": at,
                                         "sum_loss": sum_loss, "n_seen": n_seen,
                                         "time_s": time_before + time.perf_counter() - t0}
                break
            n_global = min(self.batch_size, len(rest) - k * self.batch_size)  # structures in this step
            if batch is None:  # this process's part of a short last batch is empty: it joins the sums only
                loss_value = self._step(loss_share(None, None, w, self.ranks), {}, epoch, b, n_batches, idx)
                sum_loss, n_seen = sum_loss + loss_value * n_global, n_seen + n_global
                inner.update(1)
                continue
            # slabs in cells with little vacuum: the same fields, fewer k-vectors (eager and compiled step alike)
            batch = compact_slab_cells(batch.to(device=self.device, dtype=self.dtype))
            # several processes: each term's share of the global batch, counted once per step whichever way the
            # step then goes (the all-reduce must pair up across processes)
            scales = share_scales(batch, w, self.ranks) if self.ranks.many else None
            compiled = self._compiled_loss(batch, scales)
            if compiled is not None:  # the loss gradient is in p.grad already
                loss_value = self._step(compiled[0], compiled[1], epoch, b, n_batches, idx, grads_ready=True)
                sum_loss, n_seen = sum_loss + loss_value * n_global, n_seen + n_global
                inner.update(1)
                inner.set_postfix(loss=f"{sum_loss / n_seen:.4g}", refresh=False)
                continue
            want_stress = w["stress"] > 0 and batch.stress is not None and bool(batch.has_stress.any())
            pred = model(batch, compute_forces=w["forces"] > 0, compute_stress=want_stress, create_graph=True,
                         **charge_outputs(w, batch))  # dipole / Born charges when their weights are > 0
            loss, terms = weighted_loss(pred, batch, w)

            if self.ranks.many:  # this process's share of the global batch's loss
                loss = loss_share(pred, batch, w, self.ranks, scales=scales)
            loss_value = self._step(loss, terms, epoch, b, n_batches, idx)
            sum_loss, n_seen = sum_loss + loss_value * n_global, n_seen + n_global
            inner.update(1)
            inner.set_postfix(loss=f"{sum_loss / n_seen:.4g}", refresh=False)
        inner.close()
        return sum_loss / max(n_seen, 1)

    def _compiled_loss(self, batch: Graph, scales=None) -> Optional[tuple[torch.Tensor, dict]]:
        """(loss, terms) of ``batch`` with the parameters' gradients filled by the compiled step, or None where
        there is none or it does not cover the batch (each reason is logged once). ``scales``: this process's
        share of each term (several processes; :func:`~cartlorem.training.distributed.share_scales`)."""
        if self.compiled is None:
            return None
        why = self.compiled.unsupported(batch)
        if why is not None:
            if why not in self._eager_reasons:
                self._eager_reasons.add(why)
                self.say.warning("compile: %s; such batches run eagerly", why)
            return None
        if not self._compile_announced:
            self._compile_announced = True
            self.say.info("compile: compiling the training step (the first step takes minutes on a CPU)")
        try:
            return self.compiled(batch, scales)
        except (ValueError, TypeError):  # the batch's own problem (e.g. a species the model does not know)
            raise
        except Exception as err:  # noqa: BLE001 - no compiler, an unsupported operation, ...: train eagerly
            from .compiled import version_note

            if type(err).__name__ == "FailOnRecompileLimitHit":  # torch's words name its limit, not the cause
                from .compiled import RECOMPILE_LIMIT

                self.say.warning(
                    "compile: the batches came in more than %d kinds (each kind, e.g. with or without stress labels, "
                    "molecules, periodic cells or slabs, batches of one structure, is a compiled graph of its own): "
                    "training continues eagerly", RECOMPILE_LIMIT)
                self.compiled = None
                return None
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            note = version_note()
            self.say.warning("compile: the compiled step failed (%s: %s)%s; training continues eagerly",
                             type(err).__name__, first[:300], f" ({note})" if note else "")
            self.compiled = None
            return None

    def _step(self, loss: Optional[torch.Tensor], terms: dict, epoch: int, b: int, n_batches: int, idx,
              grads_ready: bool = False) -> float:
        """backward → (gradients summed over processes) → clipping → optimiser step → EMA update.
        ``loss``: this batch's loss (with several processes this process's share; None for an empty
        part); ``grads_ready``: the parameters' ``.grad`` hold its gradient already (the compiled step).
        Returns the batch's loss (the global batch's with several processes)."""
        params = self.params
        if not self.ranks.many and not torch.isfinite(loss):
            raise self._nonfinite("loss", float(loss.detach()), terms, epoch, b + 1, n_batches, idx)
        if not grads_ready:
            self.opt.zero_grad(set_to_none=True)
            if loss is not None and loss.requires_grad:  # no labelled item of a weighted term in the batch: no step
                # only the parameters' gradients: the positions (a leaf when forces are computed) would otherwise
                # get one too, i.e. the second derivative of every geometric term of the model, never used
                torch.autograd.backward(loss, inputs=params)
        loss_value = 0.0 if loss is None else float(loss.detach())
        if self.ranks.many:
            loss_value = self.ranks.sum_gradients(params, loss_value)  # the same on every process
            if not math.isfinite(loss_value):
                raise self._nonfinite("loss", loss_value, terms, epoch, b + 1, n_batches, idx)
        if all(p.grad is None for p in params):  # no labelled item in the batch (on any process): no step, and no
            return loss_value  # EMA update either (it would pull the average towards weights that did not move)
        if self.clip_grad:
            gnorm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad, foreach=True)
        else:
            norms = [p.grad.norm() for p in params if p.grad is not None]
            gnorm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if not torch.isfinite(gnorm):
            raise self._nonfinite("gradient", float(gnorm), terms, epoch, b + 1, n_batches, idx)
        self.opt.step()
        if self.ema is not None:
            self.ema.update()
        self.state["step"] += 1
        return loss_value

    def validate(self, graphs, epoch: int, cut: bool = False) -> tuple[dict, float, bool]:
        """Metrics and loss of the averaged weights on ``graphs``; keeps (and writes) a new best. ``cut``: the
        epoch was cut short (max_time), which model.pt then says."""
        result = self.result
        with self.averaged():
            m = self._metrics(graphs)
            valid_loss = validation_loss(m, self.w)
            if not math.isfinite(valid_loss):
                raise NonFiniteLossError(
                    f"non-finite validation loss ({valid_loss}) at epoch {epoch}; "
                    + kept_message(self.folder, result.best_epoch)
                )
            improved = valid_loss < result.best_valid_loss
            if improved:
                result.best_epoch, result.best_valid_loss, result.best_metrics = epoch, valid_loss, m
                self.state["best_state_dict"] = cpu_state_dict(self.model)
                if self.folder is not None:
                    info = self._best_training(epoch, valid_loss, m)
                    if cut:
                        info["cut_short"] = "max_time ended this epoch early; a resume continues it"
                    self.folder.save_best(self.model, training=info)
                    result.model_path = str(self.folder.best_model)
        return m, valid_loss, improved

    def _metrics(self, graphs) -> dict:
        """``cartlorem.evaluate.metrics`` of the model on ``graphs``; with several processes each
        predicts its contiguous share, process 0 computes the metrics of all the predictions and
        sends them to the others (the numbers of one process, not an average of averages)."""
        if not self.ranks.many:
            return compute_metrics(predict(self.model, graphs, batch_size=self.valid_batch_size, check_cutoff=False))
        part = self.ranks.part(len(graphs))
        mine = predict(self.model, Subset(graphs, part), batch_size=self.valid_batch_size,
                       check_cutoff=False) if len(part) else None  # checked before the first epoch
        parts = self.ranks.gather(mine)
        return self.ranks.broadcast(compute_metrics(gather_predictions(parts)) if self.ranks.is_main else None)

    def end_epoch(self, epoch, train_loss, m, valid_loss, improved, dt) -> dict:
        """Scheduler and early-stopping bookkeeping; appends and returns the epoch's history row."""
        state = self.state
        lr_now = self.opt.param_groups[0]["lr"]
        self.sched.step(valid_loss)
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
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
            "valid_dipole_mae_e_a": m.get("dipole_mae_e_a"),
            "valid_born_charges_mae_e": m.get("born_charges_mae_e"),
            "epoch_time_s": dt,
            "elapsed_s": state["elapsed_s"],
            "metrics_on": self.result.best_metrics_on,
        }
        self.result.history.append(row)
        self.result.epochs_completed = epoch
        return row

    def save_checkpoint(self) -> None:
        result, settings = self.result, self.settings
        with self.averaged():
            payload = model_payload_of(self.model)
        self.folder.save_checkpoint(
            {
                "model": payload,  # the EMA (evaluation) weights: load_model(checkpoint.pt) works
                "train_state_dict": cpu_state_dict(self.model),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "rng": rng_state(self.rng),
                "best": {"epoch": result.best_epoch, "loss": result.best_valid_loss, "metrics": result.best_metrics},
                "history": result.history,
                "settings": {k: settings[k] for k in ("batch_size", "lr", "optimizer", "ema_decay", "clip_grad",
                                                      "patience", "seed")} | {"weights": self.w},
                **{k: self.state[k] for k in _STATE_KEYS},
                "partial": self.state["partial"],  # where an epoch cut short by max_time stopped (else None)
            }
        )

    def _nonfinite(self, what, value, terms, epoch, b, n_batches, idx) -> NonFiniteLossError:
        detail = ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
        return NonFiniteLossError(
            f"non-finite {what} ({value}) at epoch {epoch}, batch {b}/{n_batches} (training structures "
            f"{sorted(int(k) for k in idx)}; loss terms: {detail or 'none'}); training stopped. "
            + kept_message(self.folder, self.result.best_epoch)
            + " Check the labels of these structures, or lower the learning rate."
        )
