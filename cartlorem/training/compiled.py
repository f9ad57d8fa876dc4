"""The gradient of the training loss as one compiled function (``train(..., compile=True)``, ``--compile``).

Training on forces differentiates the model twice: forces = −∂E/∂r (a backward pass that is recorded),
then the loss gradient through it (the double backward). Autograd runs that op by op; for the local model
at C = 16 on a batch of eight dimers that is ~8500 small operations per step of ~3 µs each on one CPU
thread, so the step is mostly per-operation overhead. ``torch.compile`` cannot trace a recorded backward
pass (``create_graph=True``), but it traces torch.func transforms: written as

    grads = torch.func.grad(loss)(params),  loss(params) = L(E(params, r), −vjp_r E(params, r))

(the stress: a vjp in a zero strain too) the whole gradient is one function of the parameters and the
batch, which dynamo captures in one graph and Inductor turns into fused C++ (CUDA: Triton) kernels.
The batch's sizes (atoms, edges, structures, pairs) are symbolic, the parameters' fixed: one compilation
serves every batch of a kind. The kinds: with stress labels or without; for long-range models molecules alone
(a pair list) or with periodic cells, with or without slabs (the plan's form); and a batch of one structure (its
sizes of 1 are constants to dynamo). A data set that mixes molecules, cells and slabs, and ends its epochs on a
batch of one structure, compiles a graph for each kind it meets, once: the step allows RECOMPILE_LIMIT of them
(dynamo's default of 8 raised; a ninth kind ran the rest of the training eagerly). The numbers are those of the
eager step to float rounding (tests/test_compiled_training.py), except for slabs and sparse periodic cells: there
the eager sum chooses a splitting with a real-space part, and the traced one sums in reciprocal space only, so they
agree to the Ewald accuracy (1.5e-6 of a NaCl slab's forces with ``multipole``, 3.5e-5 with ``lorem``, float64).

What the eager model decides from tensor values is decided here before the call, where the checks run:
the species indices, and for long-range models the intra-molecular pair list, so that the block's field
sum runs op by op over it (:func:`cartlorem.ewald.direct.traced_pair_fields`; the hand-written autograd
Functions of the eager sum are beyond torch.func), or, for a batch of periodic cells, the padded atom slots
and k-vectors of one reciprocal-space Ewald sum over all its cells (:mod:`cartlorem.ewald.cells`; the eager
model sums one cell at a time and chooses Ewald or PME per cell); slabs (pbc = [True, True, False]) join that
sum in their elongated cells, with the slab correction, and open structures in such a batch get the pair sum
over their own pairs. The traced forward never runs the interaction layers' edges in chunks (the chunked sum is an
autograd.Function that torch.func cannot take): on the CPU the compiled step takes the batches the eager layers would
chunk, since its unchunked step needs less memory than the eager chunked one (benchmarks/compiled_memory.py), but on
CUDA (where the chunk size follows the free memory) or with a layer's ``edge_chunk`` set it leaves them to the
eager step. Those batches, periodic batches beyond :func:`cartlorem.ewald.cells.plan_fits` and the dipole /
Born-charge loss terms are not covered: :meth:`CompiledLossGradient.unsupported` says so and the trainer
runs those batches eagerly. With several processes (torchrun) each compiles its own
step and computes its share of the global batch's loss (``scales``); the trainer sums the gradients.

The first call compiles (1.5-3 minutes for C = 16 on a 2-core CPU; torch caches the result on disk, so a
later run of the same model compiles in seconds).
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from typing import Mapping, Optional

import torch
from torch.func import functional_call

from ..ewald.direct import OVERLAP_DISTANCE, molecule_pairs
from ..graph import Graph
from ..nn.long_range import check_boundaries
from ..forces import stress_from_strain_gradient
from .loss import _CHARGE_TERMS, loss_terms

__all__ = ["CompiledLossGradient"]

#: torch.compile backend of the training step ("aot_eager" traces the same graph without generating kernels:
#: what the tests use, in seconds instead of minutes)
BACKEND = "inductor"

#: The torch release the compiled step is tested with (CPU, Inductor). torch 2.11 fails while dynamo traces the
#: force vjp inside ``torch.func.grad`` ("isIntList() INTERNAL ASSERT FAILED ... Expected IntList but got
#: GenericList", on CPU and CUDA alike; benchmarks/results/gpu.log), and the trainer then runs eagerly.
TESTED_TORCH = (2, 13)


#: Graphs one compiled step may hold (dynamo's recompile_limit while it runs): one per kind of batch (module docstring)
RECOMPILE_LIMIT = 64


def version_note(version: Optional[str] = None) -> str:
    """'' with a tested torch release or newer, else a sentence saying which release the step is tested with."""
    version = torch.__version__ if version is None else version
    try:
        release = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        return ""
    if release >= TESTED_TORCH:
        return ""
    return (f"the compiled step is tested with torch {'.'.join(map(str, TESTED_TORCH))} or newer, this is torch "
            f"{version}")


def _own_code(fn):
    """``fn`` as a new function with a copy of its code object (same behaviour, a cache of dynamo's of its own)."""
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__, own.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return own


def _leaves_chunks_to_eager(layer, n_edges: int, device: torch.device) -> bool:
    """Whether the compiled step leaves a batch of ``n_edges`` edges to the eager step because interaction ``layer``
    would run them in chunks (:meth:`cartlorem.nn.blocks.Interaction.chunks`; its traced forward never chunks). On
    the CPU with the layer's default chunks it does not: there the compiled step, unchunked, needs 0.47× the memory
    of the eager chunked step (its peak above the memory held before it; 0.55× for the whole process) and 0.33-0.38×
    its time (512- and 1000-atom diamond, C = 64:
    benchmarks/compiled_memory.py). On CUDA the chunk size follows the free memory (the unchunked batch might not
    fit), and a layer's ``edge_chunk`` is the user's choice: those batches go the eager way."""
    if torch.device(device).type == "cpu" and layer.edge_chunk is None:
        return False
    return layer.chunks(n_edges, device)


class _Energy(torch.nn.Module):
    """``model.energy(graph, positions, cell, species=...)["energy"]`` as a module, for functional_call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, graph: Graph, positions: torch.Tensor, cell: torch.Tensor, species: torch.Tensor, pairs):
        return self.model.energy(graph, positions, cell, species=species, pairs=pairs)["energy"]


class CompiledLossGradient:
    """``weighted_loss`` of ``model(batch, compute_forces=True, create_graph=True)`` and its gradient in the
    model's trainable parameters, compiled by ``torch.compile`` (one graph, dynamic shapes).

    Calling it on a batch (on the model's device and dtype) fills ``p.grad`` of every trainable parameter
    and returns (loss tensor, {term: MSE without the loss weight}) as :func:`~cartlorem.training.loss.weighted_loss`
    does. With ``scales`` ({term: factor}, :func:`cartlorem.training.distributed.share_scales`) each term's
    mean is multiplied by its factor: the loss and gradient are then this process's share of a global batch
    shared by several processes (:func:`~cartlorem.training.distributed.loss_share`). ``unsupported(batch)``
    says why a batch must go the eager way (None: it need not).
    """

    def __init__(self, model: torch.nn.Module, weights: Mapping[str, float], backend: Optional[str] = None):
        self.model, self.weights = model, dict(weights)
        self._energy = _Energy(model)
        self._plan = None  # (batch, its periodic plan): unsupported() builds it, __call__ uses it
        self._off_forces = {}  # stress asked for → names of the parameters that forces and stress cannot reach
        named = list(self._energy.named_parameters())
        self.trainable = [(n, p) for n, p in named if p.requires_grad]
        # fullgraph: a graph break would leave most of the step eager; it raises instead, and the trainer says so.
        # Dynamo keeps its compiled graphs on the function's code object, shared by every instance of this class,
        # and with fullgraph it fails once that holds torch._dynamo.config.recompile_limit (8) graphs: the ninth
        # model of another size trained in one process (a sweep in a notebook) ran eagerly. A copy of the code
        # object per instance keeps each step's graphs, and that limit, its own.
        own = _own_code(type(self)._loss_and_grad)
        self._fn = torch.compile(types.MethodType(own, self), dynamic=False, fullgraph=True,
                                 backend=backend or BACKEND)
        # the copy's compiled graphs go with this step: dynamo keeps them on the code object, which outlives the
        # instance (36 MB a call for a small model with aot_eager: an active-learning loop of train(compile=True)
        # calls grew without bound)
        self._code = own.__code__
        weakref.finalize(self, torch._dynamo.reset_code, own.__code__)

    def unsupported(self, batch: Graph) -> Optional[str]:
        """Why ``batch`` cannot take the compiled step with this model, or None."""
        from ..model import CartLorem

        if not isinstance(self.model, CartLorem):
            return f"the compiled step knows CartLorem models, not {type(self.model).__name__}"
        block = self.model.long_range_block
        if block is not None:
            if bool(batch.pbc.any()):
                check_boundaries(batch.pbc)  # another pbc pattern: the eager model's error, not a fallback
                if self._plan_of(batch) is None:
                    return ("a batch of periodic cells or slabs too large for one reciprocal sum "
                            "(cartlorem.ewald.cells.plan_fits), or with too many pairs in its open structures")
            elif not block.pair_list_fits(int((torch.bincount(batch.batch) ** 2).sum())):
                return "a batch of molecules too large for one pair list (cartlorem.ewald.direct.pair_list_fits)"
        n_edges = int(batch.edge_index.shape[1])
        if any(_leaves_chunks_to_eager(layer, n_edges, batch.positions.device) for layer in self.model.layers):
            return ("a batch with more edges than the interaction layers compute at once (they would run it in "
                    "chunks, which the compiled step cannot trace; the chunk size is the layers' edge_chunk where set, "
                    "else on CUDA what fits in the free GPU memory; smaller batches avoid it, and edge_chunk unset on "
                    "a CPU or 0 lets the compiled step take it unchunked)")
        for name in _CHARGE_TERMS:
            has = getattr(batch, f"has_{name}", None)
            if self.weights.get(name, 0.0) > 0 and has is not None and bool(has.any()):
                return f"the {name} loss term is not in the compiled step"
        return None

    def _plan_of(self, batch: Graph):
        """The long-range block's :meth:`~cartlorem.nn.long_range.LongRangeBlock.periodic_plan` of a batch of
        periodic cells (None: the traced sum does not take it), kept for the batch last asked about."""
        if self._plan is None or self._plan[0] is not batch:
            self._plan = (batch, self.model.long_range_block.periodic_plan(batch))
        return self._plan[1]

    def __call__(self, batch: Graph, scales: Optional[Mapping[str, float]] = None) -> tuple[torch.Tensor, dict]:
        species = self.model.species_index(batch.species)  # checked here: the compiled code does no checks
        pairs = None
        block = getattr(self.model, "long_range_block", None)
        if block is not None:
            if bool(batch.pbc.any()):  # periodic cells and slabs (and open structures): one Ewald sum over them all
                pairs = self._plan_of(batch)
                if pairs is None:
                    raise ValueError(f"this batch cannot take the compiled step: {self.unsupported(batch)}")
                sized = pairs.sized_dims()  # cells, k-vectors and atom slots: their counts vary from batch to batch
            else:  # open structures (unsupported()): every intra-structure pair
                pairs = molecule_pairs(batch.batch, unordered=True)  # each pair once
                if block.smearing is None and pairs[0].numel():  # point multipoles must not overlap
                    d2 = ((batch.positions[pairs[0]] - batch.positions[pairs[1]]) ** 2).sum(-1)
                    if bool((d2 < OVERLAP_DISTANCE**2).any()):
                        raise ValueError(f"point multipoles closer than {OVERLAP_DISTANCE} Å in the batch")
                sized = [(t, 0) for t in pairs]
            for t, dim in sized:
                torch._dynamo.maybe_mark_dynamic(t, dim)
            block.prepare_compiled(batch.positions.dtype, batch.positions.device)  # the trace finds its tables
        stress = bool(self.weights.get("stress", 0.0) > 0 and batch.stress is not None and batch.has_stress.any())
        frozen = {n: t.detach() for n, t in self._energy.named_buffers()}
        frozen.update((n, p.detach()) for n, p in self._energy.named_parameters() if not p.requires_grad)
        params = {n: p.detach() for n, p in self.trainable}
        # the sizes of the batch (atoms, edges, structures) vary, the parameters' do not: only the former are
        # symbolic in the compiled graph (all-dynamic shapes would also equate an atom count with a parameter
        # size that happens to be equal, and compile again when they differ)
        for f in dataclasses.fields(batch):
            t = getattr(batch, f.name)
            if isinstance(t, torch.Tensor) and t.dim():
                torch._dynamo.maybe_mark_dynamic(t, t.dim() - 1 if f.name == "edge_index" else 0)
        torch._dynamo.maybe_mark_dynamic(species, 0)
        if scales is not None:  # tensors, not Python floats: a float would be a constant of the graph
            scales = {k: torch.tensor(float(v), dtype=batch.positions.dtype, device=batch.positions.device)
                      for k, v in scales.items()}
        with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
            grads, (loss, terms) = self._fn(params, frozen, batch, species, pairs, stress, scales)
        # A parameter the loss does not reach gets None from autograd and a zero tensor from torch.func: None, as in
        # the eager step, so that Adam skips it (a zero gradient would still move it by its momentum). Every parameter
        # reaches the energy; without an energy term in this batch, those that cannot reach forces and stress (the
        # readouts' last biases: a constant energy) get None. A zero gradient of a parameter the loss reaches (the
        # charge-state conditioning on neutral singlets, the layers on a batch of atoms alone) stays, as eagerly.
        # A batch (or this process's part of one) with no labelled item of any weighted term: no gradient at all, as
        # the eager step takes no backward pass there.
        values = dict(zip(terms, torch.stack([torch.stack([mse.detach(), count.to(mse.dtype)])
                                              for mse, count in terms.values()]).tolist())) if terms else {}
        counted = {k: mse for k, (mse, count) in values.items() if count > 0}  # one host sync for all terms
        labelled, energy = bool(counted), "energy" in counted
        unreached = set() if energy or not labelled else self._unreached_by_forces(batch, stress)
        for n, p in self.trainable:
            g = grads[n]
            if g.stride() != p.stride():  # e.g. a transposed GEMM result: the fused Adam walks grad and param
                g = torch.empty_like(p).copy_(g)  # memory in step, so they must share the layout
            p.grad = g if labelled and n not in unreached else None
        return loss, counted

    def _unreached_by_forces(self, batch: Graph, stress: bool) -> set:
        """Names of the trainable parameters that forces (and stress, when asked for) do not depend on, whatever the
        batch: autograd's None, from one eager pass the first time it is needed."""
        if stress not in self._off_forces:
            names = [n for n, _ in self.trainable]
            with torch.enable_grad():
                out = self.model(batch, compute_forces=True, compute_stress=stress, create_graph=True)
                target = out["forces"].sum() + (out["stress"].sum() if stress else 0.0)
                grads = torch.autograd.grad(target, [p for _, p in self.trainable], allow_unused=True)
            self._off_forces[stress] = {n for n, g in zip(names, grads) if g is None}
        return self._off_forces[stress]

    def _loss_and_grad(self, params: dict, frozen: dict, graph: Graph, species: torch.Tensor, pairs, stress: bool,
                       scales: Optional[dict] = None):
        """(∂loss/∂params, (loss, {term: (mse, count)})): what is compiled."""

        def loss(p):
            def energy(positions, *strain):
                cell = graph.cell
                if strain:  # r → r (I + ε), cell → cell (I + ε) (cartlorem.forces)
                    positions = positions + torch.einsum("ni,nij->nj", positions, strain[0].index_select(0, graph.batch))
                    cell = cell + cell @ strain[0]
                return functional_call(self._energy, (p, frozen), (graph, positions, cell, species, pairs))

            primals = (graph.positions,) + ((torch.zeros_like(graph.cell),) if stress else ())
            e, vjp = torch.func.vjp(energy, *primals)
            grads = vjp(torch.ones_like(e))
            out = {"energy": e, "forces": -grads[0]}
            if stress:
                out["stress"] = stress_from_strain_gradient(graph, grads[1])
            terms = loss_terms(out, graph, self.weights)
            total = e.new_zeros(())
            for name, (mse, _) in terms.items():
                if scales is not None:  # this process's share of the global batch's mean
                    mse = mse * scales[name]
                total = total + self.weights[name] * mse
            return total, (total.detach(), {k: (m.detach(), c) for k, (m, c) in terms.items()})

        return torch.func.grad(loss, has_aux=True)(params)
