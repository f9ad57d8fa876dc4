"""Training: a model-agnostic loop and its parts, one job per module.

    loss.py        loss terms (weighted energy / forces / stress errors) and the validation loss
    averaging.py   exponential moving average of the weights
    prepare.py     data checks and CartLorem's statistics from data (the model-specific set-up)
    run_folder.py  checkpoint.pt (atomic, resumable), model.pt, log.csv, learning curve
    log.py         history rows → CSV, plot, one-line metric summaries
    distributed.py torchrun: process group, each process's share of a global batch, reductions
    loop.py        ``train``: batches (DataLoader + collate) → loss → step → EMA → validate → save

Typical use::

    graphs = read_dataset("train.xyz", cutoff=model.cutoff)
    train_idx, valid_idx = split(graphs, valid_fraction=0.1, seed=0)
    result = train(model, [graphs[k] for k in train_idx], [graphs[k] for k in valid_idx],
                   epochs=50, out_dir="run")
"""

from .averaging import ExponentialMovingAverage
from .log import best_epoch_summary, metric_summary, plot_learning_curve
from .loop import NonFiniteLossError, TrainResult, epoch_loader, train
from .loss import DEFAULT_WEIGHTS, loss_weights, validation_loss, weighted_loss
from .prepare import check_dataset, fit_statistics, refit_reference_energies
from .run_folder import BEST_MODEL, CHECKPOINT, RunFolder

__all__ = [
    "train",
    "epoch_loader",
    "TrainResult",
    "NonFiniteLossError",
    "ExponentialMovingAverage",
    "weighted_loss",
    "validation_loss",
    "loss_weights",
    "DEFAULT_WEIGHTS",
    "fit_statistics",
    "refit_reference_energies",
    "check_dataset",
    "RunFolder",
    "CHECKPOINT",
    "BEST_MODEL",
    "best_epoch_summary",
    "metric_summary",
    "plot_learning_curve",
]
