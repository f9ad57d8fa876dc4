"""The run folder: checkpoint.pt (everything to resume), model.pt (best model), log.csv, plot.

Files are written atomically (``cartlorem.fileio``) with ordinary permissions. The checkpoint
holds only tensors, numbers, strings, lists and dicts, so ``torch.load(path, weights_only=True)``
reads it; its "model" entry is a model file of its own (``load_model("checkpoint.pt")`` returns the
averaged model of the last epoch).

How a model is written and restored is the only model-specific part: a CartLorem is written as
``cartlorem.model.model_payload`` (hyperparameters + weights; ``load_model`` reads it) and on
resume its hyperparameters are compared and its data statistics restored; any other module is
written as its ``state_dict`` and compared by parameter names and shapes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..fileio import atomic_torch_save, damaged_record
from .log import plot_learning_curve, write_csv

__all__ = ["RunFolder", "model_payload_of", "CHECKPOINT", "BEST_MODEL", "LOG_CSV", "CURVE_PNG", "CONFIG_YAML",
           "DATA_JSON"]

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "model.pt"
LOG_CSV = "log.csv"
CURVE_PNG = "learning_curve.png"
CONFIG_YAML = "config.yaml"  # written by cartlorem.training.job once the run starts
DATA_JSON = "data.json"  # cartlorem.training.job: the data files' SHA-256 and the validation frames of a split
# what other commands write beside a run about its model (the demo); an overwritten run removes them with its own
ABOUT_THE_MODEL = (CONFIG_YAML, DATA_JSON, "test_metrics.json", "parity.png", "md.csv")
CHECKPOINT_FORMAT = "cartlorem-checkpoint-v1"
STATE_DICT_FORMAT = "torch-state-dict-v1"
# CartLorem config entries that training statistics change; everything else must match to resume
STATISTICS_KEYS = ("avg_num_neighbors", "scale", "shift")


def cpu_state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _is_cartlorem(model) -> bool:
    from ..model import CartLorem

    return isinstance(model, CartLorem)


def model_payload_of(model: torch.nn.Module) -> dict:
    """What a model file holds: ``model_payload`` for a CartLorem, else format + class + state_dict."""
    if _is_cartlorem(model):
        from ..model import model_payload

        return model_payload(model)
    return {"format": STATE_DICT_FORMAT, "class": type(model).__qualname__, "state_dict": cpu_state_dict(model)}


def restore_model_settings(model: torch.nn.Module, saved: dict, where) -> None:
    """Check that the checkpoint's model ``saved`` is the same model as ``model`` and restore what
    the state_dict does not hold (a CartLorem's data statistics). ValueError on a mismatch, or for a model whose
    optimiser state cannot be continued (:func:`_check_resumable`)."""
    _check_resumable(saved, where)
    if _is_cartlorem(model):
        from ..model import complete_config

        config = complete_config(saved.get("config", {}))  # options an older cartlorem did not have yet: as then
        mismatch = {
            k: (config.get(k), v) for k, v in model.config.items() if k not in STATISTICS_KEYS and config.get(k) != v
        }
        if mismatch:
            detail = "; ".join(f"{k}: checkpoint {a!r}, model {b!r}" for k, (a, b) in mismatch.items())
            raise ValueError(f"the checkpoint in {where} was written for a different model ({detail})")
        model.set_statistics(
            avg_num_neighbors=config["avg_num_neighbors"], scale=config["scale"], shift=config["shift"]
        )
        return
    # a CartLorem's extra state (avg_num_neighbors) inside another module: not in runs written before it existed
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    theirs = {k: tuple(v.shape) for k, v in saved.get("state_dict", {}).items() if not k.endswith("_extra_state")}
    if ours != theirs:
        diff = sorted(set(ours.items()) ^ set(theirs.items()))[:5]
        raise ValueError(f"the checkpoint in {where} was written for a different model (parameters {diff} differ)")


def upgrade_train_state(checkpoint: dict, state: Optional[dict] = None) -> dict:
    """Weights of the checkpoint (``state``, default its ``train_state_dict``; also its ``best_state_dict``) in the
    current model-file format: a checkpoint written by an older cartlorem goes through
    :func:`cartlorem.model.upgrade_state_dict`, as its model file does in ``load_model``."""
    state = checkpoint["train_state_dict"] if state is None else state
    saved = checkpoint.get("model") or {}
    if isinstance(saved.get("config"), dict) and str(saved.get("format", "")).startswith("cartlorem-model-"):
        from ..model import upgrade_state_dict

        return upgrade_state_dict(state, saved["config"], saved["format"])
    return state


def _check_resumable(saved: dict, where) -> None:
    """ValueError for a checkpoint's model ``saved`` whose optimiser and weight-average state this cartlorem cannot
    continue: a long-range model written in model format v1 or v2, whose couplings were one parameter (now two, and
    rescaled; :func:`cartlorem.model.upgrade_state_dict` converts the weights, not the moments of the optimiser)."""
    config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    if saved.get("format") in ("cartlorem-model-v1", "cartlorem-model-v2") and config.get("long_range") is not None:
        raise ValueError(
            f"the checkpoint in {where} was written by an older cartlorem (model format {saved['format']!r}), which "
            "stored the long-range couplings as one parameter: its optimiser state cannot be continued. Its weights "
            "still load (load_model on the checkpoint or its model.pt); start a new run from them to train further "
            "(--init-model)")


def rng_state(rng: np.random.Generator) -> dict:
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunFolder:
    """The files of one training run in ``path`` (see the module docstring).

    ``write=False`` (the processes other than 0 of a multi-process run): reading works (``open``'s
    checks, ``load_checkpoint``) and every write is skipped, since process 0 writes the same files.
    """

    def __init__(self, path, write: bool = True):
        self.path, self.write = Path(path), bool(write)
        self.checkpoint = self.path / CHECKPOINT
        self.best_model = self.path / BEST_MODEL
        self.log_csv = self.path / LOG_CSV
        self.curve_png = self.path / CURVE_PNG

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """The refusals of :meth:`open`, without touching the disk: a folder that is a file, a resume without a
        checkpoint, a fresh run over a checkpoint or a model.pt without ``overwrite``, and both flags at once."""
        if resume and overwrite:
            raise ValueError(
                "resume and overwrite contradict each other (resume continues the run in the folder, overwrite "
                "deletes it and starts afresh): pass one of them"
            )
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"output folder {str(self.path)!r} is a file, not a folder; choose another output folder")
        if resume and not self.checkpoint.is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {self.checkpoint}")
        if not resume and self.checkpoint.exists() and not overwrite:
            raise FileExistsError(
                f"{self.path} already holds a training run ({CHECKPOINT}); resume it, pass overwrite=True, "
                f"or choose another output folder"
            )
        if not resume and self.best_model.exists() and not overwrite:
            raise FileExistsError(
                f"{self.path} already holds a model ({self.best_model.name}) that this run would replace; pass "
                f"overwrite=True (--overwrite) or choose another output folder"
            )

    def open(self, *, resume: bool, overwrite: bool) -> None:
        """Create the folder after the checks of :meth:`check`; call it once every other check of the run has passed.

        A fresh run over an earlier one (``overwrite``) removes the files it left (checkpoint first, then model.pt,
        log.csv, the plot, and what was written about that model: config.yaml, which ``cartlorem evaluate`` reads
        the label keys from, data.json, and the demo's test_metrics.json, parity.png and md.csv), so that none of
        them passes for this run's: neither an old model.pt after a crash in the first epoch nor an old checkpoint
        that a resume would continue under the new settings. Without ``overwrite`` a model.pt there is refused like
        a checkpoint: the new run would replace it. Temporary files of writes that a signal killed (``.tmp-*``,
        which no exception handler could remove) are removed."""
        self.check(resume=resume, overwrite=overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        if self.write:  # what a write killed by a signal (SIGKILL, SIGTERM) left: fileio.atomic_write's temporaries
            for stale in self.path.glob(".tmp-*"):
                if stale.is_file() and stale.suffix in (".pt", ".csv", ".png", ".yaml", ".json"):
                    stale.unlink(missing_ok=True)
        if not resume and overwrite and self.write:
            for old in (self.checkpoint, self.best_model, self.log_csv, self.curve_png,
                        *(self.path / name for name in ABOUT_THE_MODEL)):
                old.unlink(missing_ok=True)

    def load_checkpoint(self) -> dict:
        damaged = damaged_record(self.checkpoint)
        if damaged is not None:
            raise ValueError(
                f"cannot read {self.checkpoint}: it is damaged (its record {damaged} does not match its checksum); "
                "start the run afresh (overwrite=True, --overwrite) or restore the file")
        try:
            ckpt = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, ... for a damaged file
            first = str(err).strip().split(". ")[0][:200]
            # torch's advice for a refused pickle (weights_only=False) would run the file's code: not repeated here
            detail = type(err).__name__ + (f": {first}" if first and "weights_only" not in first else "")
            raise ValueError(
                f"cannot read {self.checkpoint} ({detail}): the file is damaged or not a cartlorem checkpoint; "
                "start the run afresh (overwrite=True, --overwrite) or restore the file"
            ) from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.checkpoint} is not a cartlorem training checkpoint")
        return ckpt

    def save_checkpoint(self, state: dict) -> None:
        if self.write:
            atomic_torch_save({"format": CHECKPOINT_FORMAT, **state}, self.checkpoint)

    def save_best(self, model: torch.nn.Module, **extra) -> None:
        if self.write:
            atomic_torch_save({**model_payload_of(model), **extra}, self.best_model)

    def write_log(self, history: list, plot: bool) -> None:
        if not self.write:
            return
        write_csv(self.log_csv, history)
        if plot:
            self.plot(history)

    def plot(self, history: list) -> bool:
        """Write the learning curve; False when matplotlib is missing (True when not writing)."""
        return plot_learning_curve(history, self.curve_png) if self.write else True

    def kept_message(self, best_epoch: int) -> str:
        if best_epoch:
            return (
                f"the best model (epoch {best_epoch}) is kept in {self.best_model} and the last good "
                f"state in {self.checkpoint}."
            )
        return "no epoch had completed, so no model was saved."


def kept_message(folder: Optional[RunFolder], best_epoch: int) -> str:
    return "no files were written (out_dir=None)." if folder is None else folder.kept_message(best_epoch)
