"""Training on several processes (``torchrun``): the process group, shards and reductions.

    torchrun --nproc_per_node 4 -m cartlorem.cli train --train train.xyz --out run --batch-size 32

Data parallel: every process holds the whole model and the whole (map-style) data set. Each
optimiser step takes one *global* batch — the same structure indices on every process, cut from
one seeded permutation, exactly the batch a single process would take — and each process
evaluates its contiguous part of it (``batch_size`` is the global batch; a process sees about
``batch_size / N`` structures per step). Then:

* **loss**: each process computes its *share* of the global batch's loss: the squared errors of
  its structures, each term divided by the number of labelled items of that term in the whole
  global batch (one small all-reduce of the counts). The shares add up to the one-process loss,
  so their summed gradients are the one-process gradient, also when the parts hold different
  numbers of atoms or labels.
* **gradients**: summed over processes by hand after ``loss.backward()`` (an all-reduce of one
  flat buffer per dtype), not by ``DistributedDataParallel``. The loss differentiates the forces,
  which the model itself obtains with ``torch.autograd.grad(..., create_graph=True)`` inside its
  forward: DDP's reducer is driven by hooks on the parameters' gradient accumulation and PyTorch
  does not support or test it with double backward (pytorch/pytorch#47562, #63831). Checked with
  torch 2.13 (gloo, default DDP options, a CartLorem, a force loss, two processes): the gradients
  DDP hands back differ from the average of the processes' gradients by 60–90 % (relative norm)
  per parameter. By hand, the reduction happens after the whole double backward has finished,
  whatever the model does inside.
  It also gives the *sum* the exact loss shares need (DDP averages), lets a process whose part of
  a short last batch is empty join with zeros, and leaves the model a plain module (no
  ``module.`` prefix in checkpoints, the EMA sees the same parameters).
* after the reduction every process holds bitwise the same gradient (all-reduce hands every
  process the same result), so gradient clipping, the optimiser step and the EMA update give the
  same weights everywhere; the initial weights and the data statistics come from process 0.
* **validation**: each process predicts its contiguous share of the validation set; process 0
  gathers the predictions, computes the metrics on all of them (the same numbers as one process,
  not an average of per-process averages) and sends them to the others, so the scheduler, early
  stopping and the best-model choice agree everywhere.
* **files**: process 0 alone writes checkpoints, the best model, log.csv and the plot; on
  ``resume`` every process reads the same checkpoint. The batch order does not depend on the
  number of processes, so a run may be resumed with another number of processes.

Backends: gloo for ``--device cpu``, nccl for ``--device cuda`` (process k on GPU ``LOCAL_RANK``).
The group is created from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) by :func:`process_group`; Python users may instead create the
default group themselves and call ``cartlorem.training.train``, which picks it up
(:func:`current`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, fields
from typing import Mapping, Optional

import numpy as np
import torch

__all__ = ["Ranks", "SINGLE", "current", "process_group", "loss_share", "share_scales", "label_counts",
           "gather_predictions"]


class PeerStoppedError(RuntimeError):
    """A collective failed on this process (not process 0) because another process of the group went away, e.g.
    process 0 stopped at a refused write: that process says why; this one says only that it stopped."""


class LocalProcessError(ValueError):
    """A refusal that concerns this process alone (its LOCAL_RANK's GPU): said by this process, whatever its rank."""


def _peer_went_away(err: BaseException) -> bool:
    """Whether ``err``, raised by a collective of a group that was up, says a peer of the group is gone (gloo's
    "Connection closed by peer", torch.distributed's error types)."""
    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(err)
    return any(m in text for m in ("Connection closed by peer", "Connection reset by peer", "remote worker"))


_LAST: list = []  # the latest all-reduced tensor, kept until destroy_process_group (Ranks.sum_)
# torch < 2.8 with gloo: destroy_process_group can deadlock with a worker thread that frees a finished collective's
# tensor (pytorch#154976); _LAST covers the last all-reduce, a pause before destroy the other collectives (process_group)
_GLOO_EXIT_RACE = torch.__version__ < (2, 8)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the training job: ``rank`` of ``size`` processes; ``device`` is where
    tensors for collectives live (a CUDA device for nccl, else the CPU). With ``size == 1`` every
    method is the identity and nothing is communicated."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes files and logs."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1

    def part(self, n: int) -> range:
        """This process's contiguous block of ``range(n)`` (blocks differ in length by at most one;
        in rank order they tile ``range(n)``)."""
        return range(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes (in place, and returned)."""
        if self.many:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
            # torch < 2.8 (gloo): a worker thread that frees the last reference to this tensor needs the GIL, which
            # destroy_process_group holds while it joins that thread (pytorch#154976): keep it until then
            _LAST[:] = [tensor]
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is true on any (a decision all processes must share)."""
        if not self.many:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.sum_(t).item() > 0)

    def barrier(self) -> None:
        """Wait until every process gets here (an all-reduce of one number: any backend, any device)."""
        self.sum_(torch.zeros(1, device=self.device))

    def broadcast(self, obj):
        """Process 0's ``obj`` (any picklable object) on every process."""
        if not self.many:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, obj) -> Optional[list]:
        """[obj of process 0, obj of process 1, …] on process 0, None elsewhere."""
        if not self.many:
            return [obj]
        out = [None] * self.size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy process 0's parameters and buffers into ``module`` on every process."""
        if not self.many:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.detach().to(self.device)
            torch.distributed.broadcast(buf, src=0)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)

    @torch.no_grad()
    def sum_gradients(self, params, loss_value: float) -> float:
        """Sum ``p.grad`` over processes in place and return the summed ``loss_value`` (two
        all-reduces: the loss with one "has a gradient" flag per parameter, then the gradients, one
        flat buffer per dtype). A gradient that is None here but not elsewhere is summed as zeros; one that
        is None on every process stays None (as with one process, the optimiser skips it)."""
        if not self.many:
            return loss_value
        params = list(params)
        groups: dict = {}
        for k, p in enumerate(params):
            groups.setdefault(p.dtype, []).append(k)
        # the loss and one "has a gradient" flag per parameter ride along in float64
        meta = torch.tensor([loss_value] + [float(p.grad is not None) for p in params], dtype=torch.float64,
                            device=self.device)
        meta = self.sum_(meta).tolist()
        for dtype, ks in groups.items():
            flat = torch.cat([
                (params[k].grad if params[k].grad is not None else torch.zeros_like(params[k])).reshape(-1)
                for k in ks
            ]).to(self.device)
            self.sum_(flat)
            for k, piece in zip(ks, flat.split([params[k].numel() for k in ks])):
                p = params[k]
                if meta[1 + k] == 0.0:
                    p.grad = None
                else:
                    p.grad = piece.view_as(p).to(p.device).clone() if p.grad is None else p.grad.copy_(piece.view_as(p))
        return float(meta[0])


SINGLE = Ranks()


def current(device=None) -> Ranks:
    """The default process group as :class:`Ranks` (``SINGLE`` when none is initialised).
    ``device``: the model's device; collectives use it under nccl, the CPU otherwise."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    comm = torch.device("cpu")
    if dist.get_backend() == "nccl":
        comm = torch.device(device) if device is not None and torch.device(device).type == "cuda" else torch.device(
            "cuda", torch.cuda.current_device())
    return Ranks(dist.get_rank(), dist.get_world_size(), comm)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


@contextlib.contextmanager
def process_group(device: str, backend: Optional[str] = None):
    """The process group of a torchrun job, for the duration of the ``with`` block.

    Yields ``(ranks, device)``: the :class:`Ranks` of this process and the device it trains on
    ("cpu", or "cuda:LOCAL_RANK" for ``device="cuda"``). Outside torchrun (no ``WORLD_SIZE``, or
    ``WORLD_SIZE=1``) it yields ``(SINGLE, device)`` and does nothing. ``backend`` None: gloo on the
    CPU, nccl on CUDA. A group that is already initialised is used and left open.

    ValueError: "cuda" without a GPU for every local process, an explicit "cuda:k" with several
    processes, nccl without CUDA, or an unknown backend.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        yield current(device), device
        return
    size = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if size <= 1:
        yield SINGLE, device
        return
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={size}, but this PyTorch build has no torch.distributed")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={size} but {name} is not set: start several processes with torchrun")
    name = device.strip().lower()
    if name.startswith("cuda"):
        if name != "cuda":
            raise ValueError(
                f"device {device!r} with {size} processes: each process takes the GPU of its LOCAL_RANK; "
                "pass --device cuda"
            )
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local >= have:
            raise LocalProcessError(
                f"--device cuda with torchrun: process {rank} (LOCAL_RANK {local}) needs GPU {local}, but this "
                f"machine has {have} CUDA GPU{'s' if have != 1 else ''}; use --device cpu (gloo) or fewer processes "
                "per node"
            )
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    elif name != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if backend is None:
        backend = "nccl" if name == "cuda" else "gloo"
    backend = backend.lower()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and (name != "cuda" or not dist.is_nccl_available()):
        why = "this PyTorch build has no NCCL" if not dist.is_nccl_available() else "the device is the CPU"
        raise ValueError(f"backend nccl needs CUDA GPUs ({why}); use gloo for CPU training")
    dist.init_process_group(backend=backend, rank=rank, world_size=size)
    try:
        yield current(device), device
    except RuntimeError as err:  # not errors of the group's start-up: those name their cause themselves
        if rank != 0 and not isinstance(err, PeerStoppedError) and _peer_went_away(err):
            raise PeerStoppedError(f"process {rank} stopped: another process of the run ended first (process 0's "
                                   "message says why)") from err
        raise
    finally:
        if backend == "gloo" and _GLOO_EXIT_RACE:
            # a gloo worker thread may still be destroying a finished collective (a broadcast_object_list's, a
            # gather_object's, an earlier all-reduce's: gloo has two) and need the GIL to free its tensor, which
            # destroy_process_group holds while it joins the thread: give it the moment it needs. torch 2.3.1,
            # helper's reproducer (destroy right after the collective): broadcast_object_list 8/12 hangs, 0/12 so;
            # cartlorem train paths 1 stall in 16 NaN-loss exits before, 0/28 exits after
            time.sleep(0.1)
        dist.destroy_process_group()
        _LAST.clear()


# --------------------------------------------------------------------------------------------------
# the loss share of one process


def label_counts(batch, names) -> list[int]:
    """Number of labelled items that each loss term in ``names`` averages over in ``batch``.

    The rule of ``cartlorem.training.loss.weighted_loss``: term ``k`` is the mean squared error
    over every component of the labels ``batch.k`` of labelled structures (mask ``batch.has_k``
    [B]): per-structure labels (leading size B, e.g. energy [B], stress [B, 3, 3]) count
    ``has_k.sum() × components``, per-atom labels (leading size N, e.g. forces [N, 3]) count the
    atoms of labelled structures × components. ValueError for a term without such a label/mask.
    """
    out = []
    for k in names:
        if batch is None:
            out.append(0)
            continue
        if not hasattr(batch, k) or not hasattr(batch, f"has_{k}"):
            raise ValueError(
                f"loss term {k!r}: the batch has no '{k}' label with a 'has_{k}' mask, so its share of a "
                "multi-process batch cannot be counted (see cartlorem.training.distributed.label_counts)"
            )
        label, mask = getattr(batch, k), getattr(batch, f"has_{k}")
        if label is None or mask is None:
            out.append(0)
            continue
        mask = mask.bool()
        if label.shape[0] != batch.num_graphs and label.shape[0] == batch.positions.shape[0]:
            mask = mask[batch.batch]  # per-atom label
        out.append(int(mask.sum()) * math.prod(label.shape[1:]))
    return out


def share_scales(batch, weights: Mapping[str, float], ranks: Ranks) -> dict:
    """{term k: n_k here / n_k in the whole global batch} for every term with a weight > 0 (0 where this part
    has none of its labels): the factor that turns this part's mean of term k into its share of the global
    batch's mean. One all-reduce, so every process calls it once per step, also with ``batch = None``."""
    names = [k for k, w in weights.items() if w > 0]
    local = label_counts(batch, names)
    total = ranks.sum_(torch.tensor(local, dtype=torch.float64, device=ranks.device)).tolist()
    return {k: (n_here / n_all if n_here else 0.0) for k, n_here, n_all in zip(names, local, total)}


def loss_share(pred: Optional[dict], batch, weights: Mapping[str, float], ranks: Ranks,
               scales: Optional[dict] = None):
    """This process's share of the global batch's loss (a scalar tensor; None for an empty part, or one with no
    labelled item of any weighted term, which then adds no gradient, not a zero one: as with one process, a
    parameter that no process gives a gradient stays without one, and the optimiser leaves it alone).

    share = Σ_k w_k · (Σ over this part's labelled items of the squared error of term k) / n_k,
    with n_k the labelled items of term k in the whole global batch (summed over processes by
    :func:`share_scales`, so every process must call this once per step, also with ``pred = batch = None``,
    unless it passes the ``scales`` of its own call of share_scales for this step). Summed over processes, the
    shares are ``weighted_loss`` of the global batch; so are their gradients.
    """
    from .loss import weighted_loss

    if scales is None:
        scales = share_scales(batch, weights, ranks)
    if batch is None:
        return None
    share = None
    for k, scale in scales.items():
        if scale == 0.0:
            continue
        term, _ = weighted_loss(pred, batch, {k: weights[k]})  # w_k · mean over this part
        term = term * scale
        share = term if share is None else share + term
    return share


# --------------------------------------------------------------------------------------------------
# validation


def gather_predictions(parts: list):
    """One ``cartlorem.evaluate.Predictions`` from the per-process ones (in rank order; None for a
    process with no validation structures): every array concatenated along its first axis, the
    per-atom structure index shifted to the running structure count."""
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError("no structures to evaluate")
    first = parts[0]
    offsets = np.cumsum([0] + [len(p.n_atoms) for p in parts[:-1]])
    values = {}
    for f in fields(first):
        arrays = [getattr(p, f.name) for p in parts]
        if all(a is None for a in arrays):
            values[f.name] = None
        elif f.name == "structure":
            values[f.name] = np.concatenate([a + off for a, off in zip(arrays, offsets)])
        else:
            values[f.name] = np.concatenate(arrays)
    return type(first)(**values)
