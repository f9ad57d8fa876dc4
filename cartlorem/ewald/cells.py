"""The Ewald sum of a batch of periodic cells in one traced function (the compiled training step).

The eager field sum (:func:`.fields.batched_multipole_fields`) goes over a batch's cells one at a time and
decides from tensor values how: Ewald or PME, the splitting alpha from a cost model, the k-vectors and
images of each cell. None of that can be traced. For the compiled training step
(:mod:`cartlorem.training.compiled`) the decisions are taken before the call (:func:`periodic_plan`), and
the sum of every cell of the batch runs as one set of batched operations (:func:`traced_ewald_fields`):

* smeared sources only (the long-range block's): alpha is the largest the smearing allows,
  ``beta = 1/(sqrt 2 sigma)``, where the real-space kernel ``erfc(alpha R)/R - erfc(beta R)/R`` vanishes and
  the reciprocal sum is the whole periodic sum. This is what the eager cost model chooses for the small
  cells of training sets (64-atom NaCl: 2001 k-vectors at accuracy 1e-5). For larger cells the eager sum
  puts part of it in real space or on a PME mesh; the traced sum stays in reciprocal space (the same fields
  to the requested accuracy, at a cost that grows as atoms × volume) up to the size :func:`plan_fits` admits,
  and larger batches go the eager way;
* every cell's atoms padded to the batch's largest cell (``slots``) and its k-vectors, those of
  :func:`.ewald.kvector_indices` with the cutoff ``k_c = 2 p beta`` of :func:`.ewald.choose_parameters`,
  padded to the largest count with masked rows: phases ``[B, 2K, M]``, structure factors by one batched
  GEMM, the fields at the atoms by another;
* the self term as in :func:`.ewald.ewald_sum` (the uniform background of a charged cell has no potential at
  alpha = beta); positions wrapped into their cells in float64 first (:func:`.ewald.wrap_positions`), so
  float32 phases keep their resolution.

With alpha = beta in the eager sum too (the cells above) the two agree to rounding; otherwise to the
requested accuracy. The eager :func:`.fields.batched_multipole_fields` uses this sum too, for batches of
periodic cells that all get alpha = beta there (no pass per cell). The cell enters differentiably (k-vectors,
volume), so the stress is the strain derivative as in the eager path.

Slabs (pbc = [True, True, False]) take part as in :func:`.slab.slab_sum`: given in its frame (the third row
orthogonal to the plane, the atoms inside; the long-range block's :func:`~cartlorem.nn.long_range.slab_frame`),
a slab's cell is elongated along the normal by :func:`.slab.choose_gap` (its k-vectors are that cell's), the
plane-averaged correction of every slab is added from per-cell sums, and the replica layers' in-plane part is
taken out by :func:`.slab.replica_correction` over the padded slots. Open structures are not summed here.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..tensors.harmonics import stf
from .ewald import kvector_indices, phase_sum, tail_parameter, wrap_positions
from .slab import choose_gap, plane_kvector_indices, replica_correction, replica_k_cutoff, slab_correction
from .kernels import (
    InteractionTensors,
    Layout,
    cell_volume,
    erf_kernel_at_origin,
    pack_sources,
    reciprocal_kernel,
    smearing_beta,
    unpack_rank,
)

__all__ = ["PeriodicPlan", "periodic_plan", "plan_fits", "prepare_periodic_table", "traced_ewald_fields"]

#: Largest (cell, k-vector, atom slot) count B K M of a batch that :func:`plan_fits` admits: the phases
#: [B, 2K, M] and their products are held for the backward passes (about ten such arrays in the training step).
MAX_TERMS = 1 << 23


class PeriodicPlan(NamedTuple):
    """What :func:`traced_ewald_fields` takes from tensor values, decided before the trace (:func:`periodic_plan`).

    slots [B, M] long: the atom in each cell's padded row (N, a zero row, where the cell has fewer than M atoms);
    atom_slot [N] long: the flat slot b M + s of every atom; m [B, K, 3]: every cell's integer k-vector indices
    (one of each pair k, -k), zero rows where a cell has fewer than K; k_mask [B, K] bool: the real rows.
    With slabs in the batch (else None): slab [B] bool, which cells are slabs; gap [B] float64, the vacuum (Å)
    each slab's sum adds along its normal (:func:`.slab.choose_gap`; 0 for the others); shift [N, 3], the
    caller's constant translation of every atom into its slab's frame (the long-range block's; zero rows
    elsewhere); replica_m [B, K', 2], the in-plane indices of :func:`.slab.replica_correction`'s wave vectors
    (:func:`.slab.plane_kvector_indices` of the elongated cell), zero rows past a cell's own, and replica_mask
    [B, K'] bool, the real rows. With open structures in the batch (else None): open [B] bool, the structures this
    sum leaves out (zero fields at their atoms), and open_pairs (i [P], j [P]), their intra-structure pairs, each
    once, for the caller's pair sum.
    """

    slots: torch.Tensor
    atom_slot: torch.Tensor
    m: torch.Tensor
    k_mask: torch.Tensor
    slab: Optional[torch.Tensor] = None
    gap: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None
    replica_m: Optional[torch.Tensor] = None
    replica_mask: Optional[torch.Tensor] = None
    open: Optional[torch.Tensor] = None
    open_pairs: Optional[tuple] = None

    def sized_dims(self) -> list:
        """(tensor, dim) of every size that changes from batch to batch: cells, slots, k-vectors, atoms, pairs."""
        dims = [(self.slots, 0), (self.slots, 1), (self.atom_slot, 0), (self.m, 0), (self.m, 1), (self.k_mask, 0),
                (self.k_mask, 1)]
        if self.slab is not None:
            dims += [(self.slab, 0), (self.gap, 0), (self.shift, 0), (self.replica_m, 0), (self.replica_m, 1),
                     (self.replica_mask, 0), (self.replica_mask, 1)]
        if self.open is not None:
            dims += [(self.open, 0)] + [(t, 0) for t in self.open_pairs or ()]
        return dims


def _order(ranks, source_ranks) -> int:
    return max(ranks) + max(source_ranks)


def k_cutoff(smearing: float, accuracy: float, order: int) -> float:
    """The eager Ewald sum's k-space cutoff ``2 p alpha`` at alpha = beta (:func:`.ewald.choose_parameters`)."""
    return 2.0 * tail_parameter(accuracy, order) * smearing_beta(smearing)


def periodic_plan(batch: torch.Tensor, cell: torch.Tensor, *, smearing: float, accuracy: float, ranks=(0, 1, 2),
                  source_ranks=(0, 1, 2), slab: Optional[torch.Tensor] = None,
                  shift: Optional[torch.Tensor] = None, open: Optional[torch.Tensor] = None,
                  n_channels: Optional[int] = None) -> PeriodicPlan:
    """The padded atom slots and k-vectors of a batch of periodic cells (index bookkeeping, no gradient).

    batch [N] long, the cell index of every atom; cell [B, 3, 3] (Å, rows are lattice vectors). ``ranks`` and
    ``source_ranks`` (the field and source ranks of the sum) set the k-space cutoff as in the eager sum.
    ``slab`` [B] bool: the cells that are slabs, pbc = [True, True, False], given in the frame of
    :mod:`.slab` (third row orthogonal to the first two; the caller's ``shift`` [N, 3] moves each atom there):
    their k-vectors are those of the cell elongated along the normal by the gap of :func:`.slab.choose_gap`, as the
    eager :func:`.slab.slab_sum` takes it, which depends on the sum's channel count ``n_channels`` (needed with
    slabs). ``open`` [B] bool: structures with open boundaries, left out of the sum (no k-vectors; their cells
    are not read).
    """
    n = batch.shape[0]
    n_cells = cell.shape[0]
    device = batch.device
    counts = torch.bincount(batch, minlength=n_cells)
    width = max(1, int(counts.max())) if n else 1
    order = torch.argsort(batch, stable=True)
    sorted_cells = batch[order]
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(n, device=device) - starts[sorted_cells]
    slots = torch.full((n_cells, width), n, dtype=torch.long, device=device)
    slots[sorted_cells, local] = order
    atom_slot = torch.empty(n, dtype=torch.long, device=device)
    atom_slot[order] = sorted_cells * width + local
    cutoff = k_cutoff(smearing, accuracy, _order(ranks, source_ranks))
    cells = cell.detach().cpu().double()
    gap = None
    if slab is not None and bool(slab.any()):
        if n_channels is None:
            raise ValueError("periodic_plan needs n_channels (the sum's channel count) for slabs: it sets their "
                             "vacuum gap (slab.choose_gap)")
        rows, cols = Layout(ranks), Layout(source_ranks)
        gap = torch.tensor([choose_gap(c, int(k), accuracy, smearing, rows, cols, n_channels) if bool(s) else 0.0
                            for c, k, s in zip(cells.numpy(), counts.tolist(), slab)], dtype=torch.float64)  # [B]
        third = cells[:, 2]
        cells = torch.cat([cells[:, :2], (third * (1.0 + gap / third.norm(dim=1))[:, None])[:, None]], dim=1)
        shift = torch.zeros(n, 3, dtype=cell.dtype, device=device) if shift is None else shift.detach()
    else:
        slab = shift = None
    if open is not None and not bool(open.any()):
        open = None
    per_cell = [np.zeros((0, 3), dtype=np.int64) if open is not None and bool(open[b]) else kvector_indices(c, cutoff)
                for b, c in enumerate(cells.numpy())]
    plan = PeriodicPlan(slots, atom_slot, *_padded(per_cell, 3, device))
    if slab is not None:
        order = _order(ranks, source_ranks)
        planes = [plane_kvector_indices(c, replica_k_cutoff(float(g), accuracy, order)) if bool(s)
                  else np.zeros((0, 2), dtype=np.int64) for c, g, s in zip(cells.numpy(), gap, slab)]
        replica_m, replica_mask = _padded(planes, 2, device)
        plan = plan._replace(slab=slab.to(device=device, dtype=torch.bool), gap=gap.to(device), shift=shift,
                             replica_m=replica_m, replica_mask=replica_mask)
    if open is not None:
        plan = plan._replace(open=open.to(device=device, dtype=torch.bool))
    return plan


def _padded(per_cell: list, dims: int, device) -> tuple:
    """Every cell's integer index rows [K_b, dims] padded to the largest count: (m [B, K, dims] long, mask [B, K])."""
    n_k = max(1, max(len(x) for x in per_cell))
    m = np.zeros((len(per_cell), n_k, dims), dtype=np.int64)
    mask = np.zeros((len(per_cell), n_k), dtype=bool)
    for b, x in enumerate(per_cell):
        m[b, : len(x)] = x
        mask[b, : len(x)] = True
    return torch.as_tensor(m, device=device), torch.as_tensor(mask, device=device)


def plan_fits(plan: PeriodicPlan) -> bool:
    """Whether the batch's traced sum stays within :data:`MAX_TERMS` (cell, k-vector, atom slot) terms."""
    return plan.slots.shape[0] * plan.slots.shape[1] * plan.m.shape[1] <= MAX_TERMS


class _PeriodicTable:
    """The constants of one traced sum: layouts, the self matrix, the output signs."""

    def __init__(self, ranks: tuple, source_ranks: tuple, smearing: float, dtype, device):
        self.rows, self.cols = Layout(ranks), Layout(source_ranks)
        self.alpha = smearing_beta(smearing)
        tensors = InteractionTensors(self.rows, self.cols)
        B = [torch.tensor(b, dtype=dtype, device=device) for b in erf_kernel_at_origin(self.alpha, tensors.max_order)]
        self.self_matrix = tensors.matrix_at_origin(B)  # [rows, cols]
        self.output_signs = self.rows.output_signs(dtype, device)


#: Tables built so far, by (ranks, source ranks, smearing, dtype, device); a plain dict, as
#: :data:`.direct._TABLES`, so that a trace finds a prepared table instead of tracing its construction.
_TABLES: dict = {}


def _table(ranks: tuple, source_ranks: tuple, smearing: float, dtype, device) -> _PeriodicTable:
    key = (ranks, source_ranks, float(smearing), dtype, device)
    table = _TABLES.get(key)
    if table is None:
        outside = contextlib.nullcontext() if torch.compiler.is_compiling() else torch._C._DisableFuncTorch()
        with outside:
            table = _TABLES[key] = _PeriodicTable(ranks, source_ranks, float(smearing), dtype, device)
    return table


def _ranks(ranks) -> tuple:
    return tuple(sorted(set(int(r) for r in ranks)))


def prepare_periodic_table(ranks, source_ranks, smearing: float, dtype, device) -> None:
    """Build the constants :func:`traced_ewald_fields` uses, before torch.compile traces a call."""
    _table(_ranks(ranks), _ranks(source_ranks), smearing, dtype, torch.device(device))


def traced_ewald_fields(positions: torch.Tensor, batch: torch.Tensor, cell: torch.Tensor, plan: PeriodicPlan,
                        charges=None, dipoles=None, quadrupoles=None, *, smearing: float, prefactor: float = 1.0,
                        ranks=(0, 1, 2), traceless_gradient: bool = False) -> tuple:
    """Potential, field and field gradient at every atom of a batch of periodic cells, each cell on its own.

    positions [N, 3] Å; batch [N] long; cell [B, 3, 3] Å; plan from :func:`periodic_plan` (same batch, cells,
    smearing, accuracy and ranks); charges [N, C], dipoles [N, C, 3], quadrupoles [N, C, 3, 3] (symmetric
    traceless) or None; Gaussian sources of width ``smearing`` (Å). No input checks: the caller has made them.
    Returns (potential [N, C], field [N, C, 3], gradient [N, C, 3, 3] or its symmetric traceless part with
    ``traceless_gradient``), None for a rank not in ``ranks``: :func:`.fields.multipole_fields` per cell.
    """
    sources = {r: x for r, x in enumerate((charges, dipoles, quadrupoles)) if x is not None}
    t = _table(_ranks(ranks), tuple(sources), smearing, positions.dtype, positions.device)
    rows, cols = t.rows, t.cols
    n_atoms, n_channels = positions.shape[0], next(iter(sources.values())).shape[1]
    n_cells, width = plan.slots.shape
    n_rows, n_cols = len(rows), len(cols)
    v = pack_sources(cols, charges, dipoles, quadrupoles)  # [N, n_cols, C]

    if plan.open is not None:  # open structures: a stand-in cell, so that nothing divides by zero (their terms
        # are masked below, and no gradient reaches their cells)
        cell = torch.where(plan.open[:, None, None], torch.eye(3, dtype=cell.dtype, device=cell.device), cell)
    if plan.slab is not None:  # a slab's sum runs in its cell elongated along the normal (.slab)
        third = cell[:, 2]
        length = torch.linalg.vector_norm(third, dim=-1)  # the height h of the slab frame
        normal = third / length[:, None]
        length = length + plan.gap.to(positions.dtype)
        cell = torch.cat([cell[:, :2], torch.where(plan.slab[:, None], length[:, None] * normal, third)[:, None]], dim=1)
    # each atom into its cell, in float64; a slab's in its plane only (.slab.IN_PLANE: the replica correction
    # needs the heights along the normal as they are)
    periodic = None if plan.slab is None else torch.stack(
        [torch.ones_like(plan.slab), torch.ones_like(plan.slab), ~plan.slab], dim=1)[batch]  # [N, 3]
    wrapped = wrap_positions(positions, cell[batch], periodic)

    def pad(x):  # [N, ...] -> [B, M, ...], zeros in the empty slots
        return torch.cat([x, x.new_zeros((1,) + x.shape[1:])])[plan.slots]

    r = pad(wrapped)  # [B, M, 3], then padded per cell
    flat = pad(v.reshape(n_atoms, n_cols * n_channels))  # [B, M, n_cols C]

    # inv_ex: inv's error check is an effectful op, which keeps Inductor from caching the compiled step on disk
    recip = 2.0 * math.pi * torch.linalg.inv_ex(cell).inverse.transpose(1, 2)  # [B, 3, 3], rows b_k
    volume = cell_volume(cell)  # [B]
    k = plan.m.to(positions.dtype) @ recip  # [B, K, 3]
    k2 = (k * k).sum(-1)
    k2 = torch.where(plan.k_mask, k2, torch.ones_like(k2))
    weight = torch.where(plan.k_mask, 2.0 * reciprocal_kernel(k2, t.alpha), torch.zeros_like(k2))
    weight = weight / volume[:, None]  # [B, K], x2: both half spaces

    theta = k @ r.transpose(1, 2)  # [B, K, M]
    phase = torch.cat([torch.cos(theta), torch.sin(theta)], dim=1)  # [B, 2K, M]
    out = phase_sum(phase, flat, k, weight, rows, cols, n_channels)  # [B, M, n_rows C]
    if plan.slab is not None:  # the replica layers' in-plane part out of the slabs' sums
        out = out + replica_correction(r, flat, plan.replica_m, plan.replica_mask, cell, normal, length, plan.slab,
                                       rows, cols, n_channels)
    out = out.reshape(n_cells * width, n_rows, n_channels)[plan.atom_slot]  # [N, n_rows, C]

    # the self term; a charged cell's uniform background adds nothing here: its potential
    # -pi Q (1/alpha^2 - 2 sigma^2) / V (.kernels.background_potential) vanishes at alpha = beta
    own = torch.einsum("ab,nbc->nac", t.self_matrix, v)
    out = out - (own if plan.open is None else own * (~plan.open[batch]).to(own.dtype)[:, None, None])
    if plan.slab is not None:
        out = out + slab_correction(positions, batch, cell, normal, length, plan.slab, rows, charges, dipoles,
                                    quadrupoles, smearing=smearing)
    out = out * (prefactor * t.output_signs)[None, :, None]
    fields = {rank: unpack_rank(rows, out, rank) for rank in rows.ranks}
    if traceless_gradient and 2 in fields:
        fields[2] = stf(fields[2])
    return tuple(fields.get(r) for r in (0, 1, 2))

