"""Direct summation over pairs (and periodic images) of a radial kernel's interaction tensors.

Used for the exact open-boundary sum (``1/R`` or the smeared kernel) and for the real-space part of
Ewald (screened kernels within a cutoff). Atoms are cut into blocks; for every pair of blocks
(I <= J) the features ``B_n(R) R^p`` of all pairs and images are evaluated once, summed over images,
and contracted with the sources by one matmul per feature (:class:`.kernels.InteractionTensors`):

    out[I, rows_of[f]] += F_f(I, J) @ W_f[J]        # [I, J] @ [J, rows * C]
    out[J, rows_of[f]] += F_f(I, J)^T @ (+-W_f[I])   # the same pairs seen from J: R -> -R

Memory stays bounded by the block size. When gradients are tracked and the sum is large, each block
is recomputed in the backward pass (activation checkpointing, which supports double backward too).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch.utils.checkpoint import checkpoint

from ..tensors.harmonics import stf as symmetric_traceless
from ..tensors.spherical import to_spherical
from .kernels import InteractionTensors, RadialKernel, tensor_terms

#: Pair evaluations per block (targets x images x sources).
BLOCK_PAIRS = 1 << 15
#: Above this many pair evaluations in total, blocks are checkpointed when gradients are tracked.
CHECKPOINT_PAIRS = 1 << 21
#: Distinct point sources closer than this (Å) are rejected as overlapping.
OVERLAP_DISTANCE = 1e-8


def pair_sum(
    positions: torch.Tensor,
    v: torch.Tensor,
    kernel: RadialKernel,
    tensors: InteractionTensors,
    *,
    cell: torch.Tensor | None = None,
    shifts: torch.Tensor | None = None,
    cutoff: float | None = None,
) -> torch.Tensor:
    """Sum of ``grad^(l+k) f`` contracted with the sources over all pairs (and images).

    positions [N, 3] (Å); v [N, n_cols, C] packed sources (:func:`.kernels.pack_sources`).
    Open boundaries: ``cell = shifts = None``, every pair ``i != j``. Periodic: cell [3, 3] (rows are
    lattice vectors); shifts [S, 3] integer lattice translations, a set closed under n -> -n, applied on
    top of the minimum-image (fractional rounding) pair vector; every image with ``R < cutoff`` counts,
    except the target itself (i = j, zero translation).
    Returns [N, n_rows, C] without the output signs ``c_l``: ``sum_j T^(l_a+k_b)(R_ij) v_jb``.
    """
    n_atoms = positions.shape[0]
    n_rows, n_channels = len(tensors.rows), v.shape[2]
    if kernel.is_zero:
        return positions.new_zeros(n_atoms, n_rows, n_channels)
    sources = tensors.grouped_sources(v)  # per feature f: [N, rows_of[f] * C]
    mirrored = [s if p > 0 else -s for s, p in zip(sources, tensors.parity)]  # sources seen through -R
    if shifts is None:
        shifts = torch.zeros(1, 3, dtype=torch.long, device=positions.device)
    n_shifts = shifts.shape[0]
    zero_shift = (shifts == 0).all(dim=1)  # [S]
    shift_vectors = None if cell is None else shifts.to(positions.dtype) @ cell  # [S, 3]
    inv_cell = None if cell is None else torch.linalg.inv(cell.detach())

    size = min(n_atoms, max(1, math.isqrt(BLOCK_PAIRS // n_shifts)))  # atoms per block
    s_size = min(n_shifts, max(1, BLOCK_PAIRS // (size * size)))  # images per pass
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (positions, v, cell))
    use_checkpoint = track and n_atoms * n_atoms * n_shifts > CHECKPOINT_PAIRS

    def features(pos_i, pos_j, i0, j0, cell_, shift_vectors_):
        """Features of the pairs (targets i0.., sources j0..), summed over images -> list of [I, J]."""
        d = [pos_i[:, None, a] - pos_j[None, :, a] for a in range(3)]  # 3 x [I, J]
        if cell_ is not None:
            # minimum image by fractional rounding; the integer offsets carry no gradient
            wrap = [-torch.round(sum(d[a].detach() * inv_cell[a, k] for a in range(3))) for k in range(3)]
            d = [d[a] + sum(wrap[k] * cell_[k, a] for k in range(3)) for a in range(3)]
        if i0 == j0:
            index = torch.arange(pos_i.shape[0], device=pos_i.device)
            same = (index[:, None] == index[None, :])[:, None, :]  # [I, 1, J]
        total = None
        for s0 in range(0, n_shifts, s_size):
            s1 = min(n_shifts, s0 + s_size)
            if shift_vectors_ is None:
                R = [c[:, None, :] for c in d]  # 3 x [I, 1, J]
            else:
                R = [
                    d[a][:, None, :] + shift_vectors_[None, s0:s1, a, None] for a in range(3)
                ]  # 3 x [I, S, J]
            r2 = R[0] * R[0] + R[1] * R[1] + R[2] * R[2]
            valid = torch.ones_like(r2, dtype=torch.bool)
            if i0 == j0:
                valid = ~(same & zero_shift[None, s0:s1, None])
            if cutoff is not None:
                valid = valid & (r2 < cutoff * cutoff)
            if kernel.singular:
                _check_overlap(r2, valid, i0, j0, shifts[s0:s1])
            B = kernel.derivatives(r2, valid, tensors.max_order)
            feats = [f.sum(1) if f.shape[1] > 1 else f[:, 0] for f in tensors.features_of(B, R)]  # [I, J]
            total = feats if total is None else [t + f for t, f in zip(total, feats)]
        return total

    def block(pos_i, pos_j, i0, j0, cell_, shift_vectors_, *srcs):
        """Contributions of the block pair (I, J) to I and, if J != I, to J: lists over features."""
        n_f = len(sources)
        src_j, mir_i = srcs[:n_f], srcs[n_f:]
        feats = features(pos_i, pos_j, i0, j0, cell_, shift_vectors_)
        to_i = [f @ s for f, s in zip(feats, src_j)]  # [I, rows_f * C]
        to_j = [] if i0 == j0 else [f.transpose(0, 1) @ s for f, s in zip(feats, mir_i)]  # [J, rows_f * C]
        return to_i + to_j

    starts = list(range(0, n_atoms, size))
    acc = {i0: None for i0 in starts}  # block start -> per-feature accumulated outputs

    def add(i0, parts):
        acc[i0] = parts if acc[i0] is None else [a + p for a, p in zip(acc[i0], parts)]

    for bi, i0 in enumerate(starts):
        i1 = min(n_atoms, i0 + size)
        for j0 in starts[bi:]:
            j1 = min(n_atoms, j0 + size)
            args = (
                positions[i0:i1],
                positions[j0:j1],
                i0,
                j0,
                cell,
                shift_vectors,
                *[s[j0:j1] for s in sources],
                *([] if i0 == j0 else [m[i0:i1] for m in mirrored]),
            )
            parts = checkpoint(block, *args, use_reentrant=False) if use_checkpoint else block(*args)
            add(i0, parts[: len(sources)])
            if i0 != j0:
                add(j0, parts[len(sources) :])

    out = []
    for i0 in starts:
        rows = positions.new_zeros(acc[i0][0].shape[0], n_rows, n_channels)
        for f, part in enumerate(acc[i0]):
            index = torch.tensor(tensors.rows_of[f], device=positions.device)
            rows = rows.index_add(1, index, part.reshape(part.shape[0], len(index), n_channels))
        out.append(rows)
    return torch.cat(out)


def _check_overlap(r2: torch.Tensor, valid: torch.Tensor, i0: int, j0: int, shifts: torch.Tensor) -> None:
    bad = valid & (r2 < OVERLAP_DISTANCE**2)
    if bool(bad.any()):
        i, s, j = (int(x) for x in bad.nonzero()[0])
        where = "" if bool((shifts[s] == 0).all()) else f" (periodic image {shifts[s].tolist()})"
        raise ValueError(
            f"atoms {i0 + i} and {j0 + j}{where} overlap (distance {float(r2[i, s, j]) ** 0.5:.3g} Å): "
            "point multipoles at the same position have an infinite interaction; use smearing or "
            "separate the atoms"
        )


# ----------------------------------------------------------------------------- explicit pair lists
#
# Batches of small open molecules (the training sets: 8 structures of 6-18 atoms) have ~10^3 pairs. There
# the cost of a training step is the number of autograd nodes, not arithmetic: the forward, the force
# backward and the double backward each replay the graph op by op. :func:`pair_list_fields` therefore
# builds, per pair, the whole coupling matrix K[a, b] (outputs a = phi, E, G components; sources
# b = q, mu, Theta components) from one small feature matrix (features B_n R^p, as in
# :class:`.kernels.InteractionTensors`) times a constant coefficient table, applies it with one batched
# matmul, and writes out the backward and the backward of the backward (:class:`PairListSum`): one
# autograd node per pass.

#: Full (not symmetry-reduced) Cartesian components of ranks 0, 1, 2, in row-major order.
_FULL_INDICES = {0: ((),), 1: ((0,), (1,), (2,)), 2: tuple((a, b) for a in range(3) for b in range(3))}


def _monomial_column(powers: tuple) -> int:
    """Column of ``Rx^px Ry^py Rz^pz`` in the row ``[1, R (3), R R (9), R R R (27), ...]`` of full products."""
    idx = (0,) * powers[0] + (1,) * powers[1] + (2,) * powers[2]
    flat = 0
    for axis in idx:
        flat = 3 * flat + axis
    return (3 ** len(idx) - 1) // 2 + flat


#: Exponents (px, py, pz) of every column of that row up to degree 5.
_MONOMIAL_POWERS = {_monomial_column(p): p for p in
                    ((a, b, d - a - b) for d in range(6) for a in range(d + 1) for b in range(d + 1 - a))}


#: [5, 9] float64: the five real spherical components of a 3 x 3 tensor's symmetric traceless part
#: (:func:`cartlorem.tensors.to_spherical` of its ``stf``), as rows acting on the nine row-major components. The rows
#: are orthonormal and span the symmetric traceless tensors (``to_spherical`` is an isometry there): for a symmetric
#: traceless M, ``m = STF_BASIS @ M.flatten()`` and ``M = STF_BASIS.T @ m``; for any A, ``STF_BASIS.T @ STF_BASIS @
#: A.flatten()`` is ``stf(A)``.
STF_BASIS = to_spherical(symmetric_traceless(torch.eye(9, dtype=torch.float64).reshape(9, 3, 3)), 2).T.contiguous()


def _rank_set(ranks) -> tuple:
    """Ranks as the sorted tuple of distinct ints that keys the coupling tables."""
    return tuple(sorted(set(int(r) for r in ranks)))


def _rank_width(rank: int, stf: bool) -> int:
    """Components of a rank in a pair list's rows or columns: 1, 3, and 9 (full) or 5 (``stf``)."""
    return 5 if stf and rank == 2 else 3**rank


def _stf_project(table: list, ranks: tuple, source_ranks: tuple) -> list:
    """The coefficients of :func:`_pair_table` with rank-2 rows and columns in the basis :data:`STF_BASIS`.

    Rows: the gradient's symmetric traceless part, ``g = STF_BASIS @ G``. Columns: quadrupoles given as
    ``STF_BASIS @ Theta`` (exact for symmetric traceless Theta). So ``K_stf = P_rows K P_cols^T``.
    """
    def transform(rank_list):  # [reduced, full]
        return torch.block_diag(*[STF_BASIS if r == 2 else torch.eye(3**r, dtype=torch.float64) for r in rank_list])

    p_rows, p_cols = transform(ranks), transform(source_ranks)
    k = torch.tensor(table, dtype=torch.float64).reshape(len(table), p_rows.shape[1], p_cols.shape[1])
    return (p_rows @ k @ p_cols.T).reshape(len(table), -1).tolist()


@functools.lru_cache(maxsize=None)
def _pair_table(ranks: tuple, source_ranks: tuple, stf: bool = False):
    """Features and coefficients of the per-pair coupling matrix of the given field and source ranks.

    Returns (orders [F], monomial columns [F], coefficients [F][A * Bc] as nested lists, A, Bc, max order)
    with ``K[a, b] = sum_f coef[f, a * Bc + b] B_(orders[f]) mono[columns[f]]``; ``mono`` is the row
    ``[1, R (3), R R (9), R R R (27), R R R R (81)]`` of full outer products. K already holds the source
    weights ``(-1)^k / k!`` (full components, so no multiplicities) and the output signs (+1 potential,
    -1 field and gradient): ``out_a = sum_b K[a, b] M_b``. ``stf``: rank-2 rows and columns in the five
    components of :data:`STF_BASIS` (:func:`_stf_project`; A and Bc shrink, K from 13 x 13 to 9 x 9 for all
    ranks), and the features that then no longer contribute (those of the gradient's trace) dropped.
    """
    rows = [idx for r in ranks for idx in _FULL_INDICES[r]]
    cols = [idx for r in source_ranks for idx in _FULL_INDICES[r]]
    features, coef = {}, {}
    for a, ia in enumerate(rows):
        sign = 1.0 if not ia else -1.0
        for b, ib in enumerate(cols):
            weight = sign * (-1.0) ** len(ib) / math.factorial(len(ib))
            for order, powers, c in tensor_terms(tuple(sorted(ia + ib))):
                f = features.setdefault((order, powers), len(features))
                coef[f, a * len(cols) + b] = coef.get((f, a * len(cols) + b), 0.0) + weight * c
    table = [[0.0] * (len(rows) * len(cols)) for _ in features]
    for (f, ab), c in coef.items():
        table[f][ab] = c
    keys = sorted(features, key=features.get)
    n_rows, n_cols = len(rows), len(cols)
    if stf:
        table = _stf_project(table, ranks, source_ranks)
        n_rows = sum(_rank_width(r, True) for r in ranks)
        n_cols = sum(_rank_width(r, True) for r in source_ranks)
        kept = [f for f, row in enumerate(table) if max(abs(c) for c in row) > 1e-12]
        keys, table = [keys[f] for f in kept], [table[f] for f in kept]
    orders = [order for order, _ in keys]
    columns = [_monomial_column(powers) for _, powers in keys]
    return orders, columns, table, n_rows, n_cols, max(orders)


#: Floats a pair list may hold per call (coupling matrices, what their backward keeps, per-pair fields);
#: beyond it a batch of open structures is summed structure by structure in blocks (:func:`pair_sum`).
PAIR_LIST_FLOATS = 1 << 24


def pair_list_fits(n_pairs: int, ranks, source_ranks, n_channels: int, stf: bool = False) -> bool:
    """Whether :func:`pair_list_fields` over ``n_pairs`` pairs (with ``stf`` as given to it) stays within
    :data:`PAIR_LIST_FLOATS`."""
    orders, _, _, n_rows, n_cols, _ = _pair_table(tuple(sorted(ranks)), tuple(sorted(source_ranks)), bool(stf))
    n_features = len(orders)
    return n_pairs * (n_rows * n_cols + 5 * n_features + 2 * n_rows * n_channels) <= PAIR_LIST_FLOATS


class _CouplingTable:
    """Constant tables of the coupling matrix ``K`` of :func:`_pair_table`, on one dtype and device.

    The features ``B_n R^p`` and, for the gradient, the rows ``B_n dR^p/dR_x`` (x = 0, 1, 2) and
    ``-B_(n+1) R^p`` are products of one column of the ``B_n`` and one monomial of a compact list
    (every monomial they use, each built from a lower one times one component of R):

    orders, columns [F] long; coef [F, A * Bc]; grad_orders, grad_columns [4 F] long and grad_coef [4, F]
    (exponent p_x, or -1); steps: per degree (lower monomial indices, axes) [long]; max_order, degree;
    row_parity [A, 1] and col_parity [Bc, 1], (-1)^rank of every row and column: the pair seen from the
    other end (R -> -R) has the coupling matrix ``row_parity * K * col_parity.T``, every entry of a rank
    (l_a + l_b) tensor.
    """

    def __init__(self, ranks, source_ranks, dtype, device, stf=False):
        orders, columns, table, self.n_rows, self.n_cols, self.max_order = _pair_table(ranks, source_ranks, stf)
        self.row_parity, self.col_parity = (
            torch.tensor([(-1.0) ** r for r in rs for _ in range(_rank_width(r, stf))], dtype=dtype,
                         device=device)[:, None] for rs in (ranks, source_ranks))
        powers = [_MONOMIAL_POWERS[c] for c in columns]
        lowered = [[tuple(q - (a == x) for a, q in enumerate(p)) if p[x] else (0, 0, 0) for p in powers]
                   for x in range(3)]
        needed = set(powers) | {q for row in lowered for q in row} | {(0, 0, 0)}
        for p in sorted(needed, key=sum, reverse=True):  # close under lowering the first non-zero exponent
            while sum(p):
                axis = next(a for a in range(3) if p[a])
                p = tuple(q - (a == axis) for a, q in enumerate(p))
                needed.add(p)
        compact = sorted(needed, key=lambda p: (sum(p), p))  # degree by degree, (0, 0, 0) first
        index = {p: k for k, p in enumerate(compact)}
        self.degree = max(sum(p) for p in compact)
        self.steps = []
        for d in range(1, self.degree + 1):
            block = [p for p in compact if sum(p) == d]
            axes = [next(a for a in range(3) if p[a]) for p in block]
            lower = [index[tuple(q - (a == x) for a, q in enumerate(p))] for p, x in zip(block, axes)]
            self.steps.append((torch.tensor(lower, device=device), torch.tensor(axes, device=device)))
        self.orders = torch.tensor(orders, device=device)
        self.columns = torch.tensor([index[p] for p in powers], device=device)
        self.coef = torch.tensor(table, dtype=dtype, device=device)
        self.grad_orders = torch.tensor(orders * 3 + [n + 1 for n in orders], device=device)
        self.grad_columns = torch.tensor([index[q] for row in lowered for q in row] + [index[p] for p in powers],
                                         device=device)
        self.grad_coef = torch.tensor([[float(p[x]) for p in powers] for x in range(3)] + [[-1.0] * len(powers)],
                                      dtype=dtype, device=device)

    def monomials(self, R: torch.Tensor) -> torch.Tensor:
        """The compact monomials of R [P, 3]: [P, M], one degree at a time."""
        mono = torch.ones_like(R[:, :1])
        for lower, axes in self.steps:
            mono = torch.cat([mono, mono.index_select(1, lower) * R.index_select(1, axes)], dim=1)
        return mono


#: The tables built so far, by (ranks, source ranks, dtype, device, stf). A plain dict rather than lru_cache:
#: torch.compile (dynamo) ignores an lru_cache wrapper and traces the construction inside it, ~30 s of symbolic
#: Python per compilation, while a table it finds in this dict costs nothing (:func:`prepare_pair_table`).
_TABLES: dict = {}


def _coupling_table(ranks: tuple, source_ranks: tuple, dtype, device, stf: bool = False) -> _CouplingTable:
    key = (ranks, source_ranks, dtype, device, stf)
    table = _TABLES.get(key)
    if table is None:
        # constants, kept across calls: built outside any torch.func transform that may be running (a tensor
        # made inside one belongs to its level and is invalid once that has ended); dynamo, which cannot trace
        # that switch, traces the construction instead (prepare_pair_table spares it that)
        outside = contextlib.nullcontext() if torch.compiler.is_compiling() else torch._C._DisableFuncTorch()
        with outside:
            table = _TABLES[key] = _CouplingTable(ranks, source_ranks, dtype, device, stf)
    return table


def prepare_pair_table(ranks, source_ranks, dtype, device, traceless_gradient: bool = False) -> None:
    """Build the table that :func:`pair_list_fields` uses for these field and source ranks, before torch.compile
    traces a call (:meth:`cartlorem.nn.long_range.LongRangeBlock.prepare_compiled`): the trace then only looks
    it up."""
    _coupling_table(_rank_set(ranks), _rank_set(source_ranks), dtype, torch.device(device), bool(traceless_gradient))


def _linearized_features(R: torch.Tensor, kernel, t) -> torch.Tensor:
    """The pair features ``B_n(R) R^p`` [P, F] of :func:`_field_sum_reference` as their first-order expansion about
    the pair vectors' own values: ``f(R0) + (R - R0) . df/dR(R0)`` with R0 = R.detach(), the kernel and its slope
    evaluated once, without gradient. The value and the first derivative in R are exact (R - R0 is zero), and the
    result is linear in R, so its second derivative in R is zero instead of the kernel's curvature. The slope is
    the rows of :class:`PairListSum`'s backward: ``dR^p/dR_x B_n - R_x B_(n+1) R^p``."""
    R0 = R.detach()
    r2 = (R0 * R0).sum(-1)
    B = torch.stack(kernel.derivatives_autograd(r2, torch.ones_like(r2, dtype=torch.bool), t.max_order + 1,
                                                dense=True), dim=1)  # [P, max_order + 2]
    mono = t.monomials(R0)
    features = B.index_select(1, t.orders) * mono.index_select(1, t.columns)  # [P, F]
    F = t.grad_orders.shape[0] // 4  # the pair features; an explicit size, so that no pairs (atoms alone) is no error
    G = (B.index_select(1, t.grad_orders) * mono.index_select(1, t.grad_columns)).view(R.shape[0], 4, F) * t.grad_coef
    slope = G[:, :3] + R0[:, :, None] * G[:, 3:]  # [P, 3, F]: d features / dR
    return features + ((R - R0)[:, :, None] * slope).sum(1)


def _field_sum_reference(pos, v, i, j, kernel, t, prefactor, traced: bool = False, unordered: bool = False,
                         linearized: bool = False):
    """The sum of :class:`PairListSum` op by op (autograd records every step; the path of Hessians and
    higher orders): out [N, A, C]. ``traced``: the kernel op by op too (torch.func and torch.compile, which
    cannot differentiate the autograd Function of :meth:`RadialKernel.derivatives`). ``unordered``: every
    pair (i, j) stands for both directions; the coupling matrix of j <- i is that of i <- j with the signs
    (-1)^(l_a + l_b) (:class:`_CouplingTable`), so each matrix is built once and applied to both sources in
    one product."""
    R = pos[i] - pos[j]
    if linearized:
        features = _linearized_features(R, kernel, t)
    else:
        r2 = (R * R).sum(-1)
        valid = torch.ones_like(r2, dtype=torch.bool)
        if traced:
            B = torch.stack(kernel.derivatives_autograd(r2, valid, t.max_order, dense=True), dim=1)
        else:
            B = torch.stack(kernel.derivatives(r2, valid, t.max_order), dim=1)
        features = B.index_select(1, t.orders) * t.monomials(R).index_select(1, t.columns)  # [P, F]
    K = (features @ t.coef).reshape(R.shape[0], t.n_rows, t.n_cols) * prefactor
    x = _gather(v, j, i, t.col_parity, unordered)
    if traced and K.shape[1] * K.shape[2] > 1:
        # a broadcast product and sum, which Inductor fuses into one loop (9% faster than its batched matmul of
        # 9 x 9 matrices in the compiled step's field sum; eagerly it would be 4x slower)
        y = (K[..., None] * x[:, None]).sum(2)
    else:
        y = _times(K, x)
    return _scatter(y, pos.shape[0], i, j, t.row_parity, unordered)


def _times(K: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per pair ``K @ x``: K [P, A, B], x [P, B, C] -> [P, A, C] (a broadcast product when A = B = 1)."""
    return K * x if K.shape[1] * K.shape[2] == 1 else torch.bmm(K, x)


def _gather(x: torch.Tensor, near: torch.Tensor, far: torch.Tensor, parity: torch.Tensor, unordered: bool):
    """Per pair, the rows of x [N, ., C] at one end of the pair: x[near] [P, ., C]; for an unordered pair list
    also those of the other direction, ``parity * x[far]``, beside them: [P, ., 2C]. Sources: near = j, far = i,
    the column parity; targets (and their gradients): near = i, far = j, the row parity."""
    if not unordered:
        return x.index_select(0, near)
    return torch.cat([x.index_select(0, near), x.index_select(0, far) * parity], dim=2)


def _scatter(y: torch.Tensor, n: int, near: torch.Tensor, far: torch.Tensor, parity: torch.Tensor,
             unordered: bool) -> torch.Tensor:
    """Sum per-pair rows y [P, ., C] (or [P, ., 2C], unordered) into [N, ., C]: the transpose of :func:`_gather`."""
    if not unordered:
        return y.new_zeros(n, y.shape[1], y.shape[2]).index_add(0, near, y)
    c = y.shape[2] // 2
    return y.new_zeros(n, y.shape[1], c).index_add(0, near, y[..., :c]).index_add(0, far, y[..., c:] * parity)


def _outer(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per pair ``g @ x^T``: g [P, A, C], x [P, B, C] -> [P, A, B]."""
    if g.shape[1] * x.shape[1] == 1:
        return (g * x).sum(-1, keepdim=True)
    return torch.bmm(g, x.transpose(1, 2))


class PairListSum(torch.autograd.Function):
    """Fields of the sources v at the targets of a pair list, with closed-form backward passes.

    ``out[i] += K(r_i - r_j) v[j]`` over the pairs (i, j), with the coupling matrices ``K = features @ coef``
    of :func:`_pair_table` (features ``B_n(R) R^p``) times ``prefactor``. Their gradient needs only
    ``dB_n/dR = -R B_(n+1)``: ``g_R = sum_f w_f (B_(n_f) dR^p_f/dR - R B_(n_f + 1) R^p_f)`` with
    ``w = g_K coef^T`` and ``g_K = g_out[i] v[j]^T``. The backward is :class:`PairListSumGrad`, whose own
    backward (the double backward of force training, taken for the parameters) is closed form too, so a
    training step records one node per pass here, whatever the number of pairs and ranks. The second
    derivative in the positions (Hessians; any third order) goes through :func:`_field_sum_reference`
    and autograd.

    apply(pos [N, 3] (Å), v [N, Bc, C] (sources as full components), i, j [P] long, kernel, table,
    prefactor, unordered) -> out [N, A, C]. ``unordered``: each pair stands for both directions (the
    matrix of the other, ``row_parity * K * col_parity.T``, applied in the same product: the per-pair
    sources and target gradients are [P, ., 2C], :func:`_gather`).
    """

    @staticmethod
    def forward(ctx, pos, v, i, j, kernel, t, prefactor, unordered=False):
        with torch.no_grad():
            R = pos[i] - pos[j]  # [P, 3]
            r2 = (R * R).sum(-1)
            B = torch.stack(kernel.derivatives_autograd(r2, torch.ones_like(r2, dtype=torch.bool),
                                                        t.max_order + 1), dim=1)  # [P, max_order + 2]
            mono = t.monomials(R)
            features = B.index_select(1, t.orders) * mono.index_select(1, t.columns)  # [P, F]
            K = (features @ t.coef).reshape(R.shape[0], t.n_rows, t.n_cols) * prefactor  # [P, A, Bc]
            vj = _gather(v, j, i, t.col_parity, unordered)
            out = _scatter(_times(K, vj), pos.shape[0], i, j, t.row_parity, unordered)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                n = R.shape[0]
                # rows B_n dR^p/dR_x (x = 0, 1, 2) and -B_(n+1) R^p of every feature  [P, 4, F]
                G = (B.index_select(1, t.grad_orders) * mono.index_select(1, t.grad_columns)).view(n, 4, -1)
                ctx.save_for_backward(pos, v, i, j, R, K, vj, G * t.grad_coef)
        ctx.kernel, ctx.table, ctx.prefactor, ctx.unordered = kernel, t, prefactor, unordered
        return out

    @staticmethod
    def backward(ctx, g_out):
        grads = PairListSumGrad.apply(g_out, *ctx.saved_tensors, ctx.kernel, ctx.table, ctx.prefactor, ctx.unordered)
        return grads + (None,) * 6


class PairListSumGrad(torch.autograd.Function):
    """(g_pos, g_v) of :class:`PairListSum` from g_out; its backward is closed form for g_out and v.

    With ``w = g_K coef^T`` [P, F] and the rows G [P, 4, F] of the forward, ``(G w)`` [P, 4] holds
    ``sum_f w_f B_n dR^p/dR`` and ``-sum_f w_f B_(n+1) R^p``: ``g_R = (G w)[:3] + R (G w)[3]``.
    """

    @staticmethod
    def forward(ctx, g_out, pos, v, i, j, R, K, vj, G, kernel, t, prefactor, unordered):
        go = _gather(g_out, i, j, t.row_parity, unordered)  # [P, A, C] ([P, A, 2C] unordered)
        g_v = _scatter(_times(K.transpose(1, 2), go), v.shape[0], j, i, t.col_parity, unordered)
        w = (_outer(go, vj).reshape(go.shape[0], -1) @ t.coef.T) * prefactor  # [P, F]
        s = torch.bmm(G, w[:, :, None])[..., 0]  # [P, 4]
        gR = torch.addcmul(s[:, :3], R, s[:, 3:])
        g_pos = torch.zeros_like(pos).index_add_(0, i, gR).index_add_(0, j, -gR)
        ctx.save_for_backward(g_out, pos, v, i, j, R, K, vj, G, go)
        ctx.kernel, ctx.table, ctx.prefactor, ctx.unordered = kernel, t, prefactor, unordered
        return g_pos, g_v

    @staticmethod
    def backward(ctx, gg_pos, gg_v):
        g_out, pos, v, i, j, R, K, vj, G, go = ctx.saved_tensors
        need_out, need_pos, need_v = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() or (need_pos and _engine_needs(pos)):
            return _second_order_reference(ctx, gg_pos, gg_v) + (None,) * 10
        t, u, n = ctx.table, ctx.unordered, pos.shape[0]
        g_gout, g_v = None, None
        per_pair = None  # d/d(go): target-side rows [P, A, C or 2C]
        if need_out and gg_v is not None:  # g_v = sum over pairs of K^T go
            per_pair = _times(K, _gather(gg_v, j, i, t.col_parity, u))
        if gg_pos is not None:  # g_pos through g_K = go vj^T
            gg_R = gg_pos[i] - gg_pos[j]  # [P, 3]
            c = torch.cat([gg_R, (gg_R * R).sum(-1, keepdim=True)], dim=1)  # [P, 4]
            g_w = torch.bmm(c[:, None, :], G)[:, 0]  # [P, F]
            g_gK = ((g_w @ t.coef) * ctx.prefactor).reshape(K.shape)  # [P, A, Bc]
            if need_out:
                y = _times(g_gK, vj)
                per_pair = y if per_pair is None else per_pair + y
            if need_v:
                g_v = _scatter(_times(g_gK.transpose(1, 2), go), n, j, i, t.col_parity, u)
        if need_out:
            g_gout = torch.zeros_like(g_out) if per_pair is None else _scatter(per_pair, n, i, j, t.row_parity, u)
        return (g_gout, None, g_v) + (None,) * 10


def _engine_needs(t: torch.Tensor) -> bool:
    """Whether the running backward pass will propagate into ``t`` (True when that cannot be told).

    ``loss.backward(inputs=parameters)`` in force training never needs the second derivative in the
    positions; ``_will_engine_execute_node`` says so during a backward pass (for a leaf, of its
    gradient accumulator).
    """
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:
        return True
    node = t.grad_fn
    if node is None:
        with torch.enable_grad():
            node = t.view_as(t).grad_fn.next_functions[0][0]  # the leaf's AccumulateGrad
    try:
        return bool(will_execute(node))
    except RuntimeError:  # a leaf during torch.autograd.grad: not answered
        return True


def _second_order_reference(ctx, gg_pos, gg_v):
    """(g_g_out, g_pos, g_v) of :class:`PairListSumGrad` by autograd through :func:`_field_sum_reference`."""
    g_out, pos, v, i, j = ctx.saved_tensors[:5]
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [x if create_graph and x.requires_grad else x.detach().requires_grad_(True) for x in (g_out, pos, v)]
        out = _field_sum_reference(leaves[1], leaves[2], i, j, ctx.kernel, ctx.table, ctx.prefactor,
                                   unordered=ctx.unordered)
        first = torch.autograd.grad(out, leaves[1:], leaves[0], create_graph=True)
        pairs = [(f, g) for f, g in zip(first, (gg_pos, gg_v)) if g is not None]
        wanted = [x for x, need in zip(leaves, ctx.needs_input_grad[:3]) if need]
        grads = iter(torch.autograd.grad([f for f, _ in pairs], wanted, [g for _, g in pairs],
                                         create_graph=create_graph, allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:3])


def pair_list_fields(
    positions: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    multipoles: dict,
    kernel: RadialKernel,
    ranks=(0, 1, 2),
    prefactor=1.0,
    traced: bool = False,
    traceless_gradient: bool = False,
    unordered: bool = False,
    linearized: bool = False,
) -> dict:
    """Fields at the targets of an explicit list of directed pairs (open boundaries, no images).

    positions [N, 3] (Å); i, j [P] long: pair p adds the field at atom ``i[p]`` of the source at atom
    ``j[p]`` (R = r_i - r_j; a pair list without i = j, typically every ordered pair of atoms within each
    molecule of a batch). multipoles: {rank: tensor} of the ranks present, charges [N, C] (e), dipoles
    [N, C, 3] (e Å), quadrupoles [N, C, 3, 3] (e Å², symmetric traceless). kernel: the radial kernel
    (``RadialKernel.coulomb()`` or ``.smeared(sigma)``). ranks: field ranks to return.
    Returns {rank: potential [N, C] / field [N, C, 3] / gradient [N, C, 3, 3]} times ``prefactor`` (a number, or a
    one-element tensor whose gradient flows), the same numbers as the blocked :func:`pair_sum` restricted to these
    pairs. Differentiable to any order with respect to positions and multipoles (:class:`PairListSum`). ``traced``:
    op by op, for torch.func transforms and torch.compile (the compiled training step), which cannot differentiate
    the hand-written autograd Functions. ``traceless_gradient``: return the gradient's symmetric traceless part only
    (what couples to traceless quadrupoles; the trace that smeared sources leave where they overlap is dropped),
    with the quadrupoles taken as symmetric traceless (their other parts are ignored): rank 2 then travels in five
    components instead of nine, so the coupling matrices are 9 x 9 instead of 13 x 13. ``unordered``: every pair
    (i, j) of the list stands for both directions, i <- j and j <- i (a list of :func:`molecule_pairs` with
    ``unordered=True``): each coupling matrix is built once for the two.
    """
    ranks = _rank_set(ranks)
    source_ranks = tuple(sorted(multipoles))
    stf = bool(traceless_gradient)
    t = _coupling_table(ranks, source_ranks, positions.dtype, positions.device, stf)
    ref = multipoles[source_ranks[0]]
    n_atoms, n_ch = positions.shape[0], ref.shape[1]
    basis = STF_BASIS.to(device=positions.device, dtype=positions.dtype) if stf else None  # [5, 9]
    # sources [N, Bc, C]: q, mu_x..z, Theta_xx..zz (or its five STF_BASIS components)
    parts = []
    for r in source_ranks:
        x = multipoles[r]
        if r == 0:
            parts.append(x[:, None, :])
        elif r == 2 and stf:
            parts.append(basis @ x.reshape(n_atoms, n_ch, 9).transpose(1, 2))  # [N, 5, C]
        else:
            parts.append(x.reshape(n_atoms, n_ch, 3**r).transpose(1, 2))
    v = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    # a tensor prefactor (one element, check_prefactor) multiplies the result, so that its gradient flows; a number
    # goes into the sums, as a constant of their hand-written backward passes
    scale = 1.0 if isinstance(prefactor, torch.Tensor) else float(prefactor)
    if traced:
        out = _field_sum_reference(positions, v, i, j, kernel, t, scale, traced=True, unordered=unordered,
                                   linearized=linearized)
    elif i.numel():
        out = PairListSum.apply(positions, v, i, j, kernel, t, scale, bool(unordered))  # [N, A, C]
    else:
        out = positions.new_zeros(n_atoms, t.n_rows, n_ch) + 0.0 * v.sum()
    fields, start = {}, 0
    for r in ranks:
        width = _rank_width(r, stf)
        block = out[:, start : start + width]  # [N, 3^r or 5, C]
        start += width
        if r == 2 and stf:
            block = basis.T @ block  # [N, 9, C]
        fields[r] = block[:, 0] if r == 0 else block.transpose(1, 2).reshape((n_atoms, n_ch) + (3,) * r)
        if isinstance(prefactor, torch.Tensor):
            fields[r] = fields[r] * prefactor.reshape(())
    return fields


def molecule_pairs(batch: torch.Tensor, unordered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair (i, j), i != j, of atoms in the same structure: (i [P], j [P]) long; with
    ``unordered``, every pair once (half as many; which atom comes first is unspecified).

    batch [N] long, structure index of every atom (any order). Index bookkeeping only.
    """
    n = batch.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=batch.device)
        return empty, empty
    order = torch.argsort(batch, stable=True)
    counts = torch.bincount(batch)
    counts = counts[counts > 0]
    sizes = counts.repeat_interleave(counts)  # [N] size of the structure of each (sorted) atom
    starts = (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)  # [N] first atom of its structure
    i = torch.arange(n, device=batch.device).repeat_interleave(sizes)  # [sum n_s^2]
    first = starts.repeat_interleave(sizes)
    local = torch.arange(i.shape[0], device=batch.device) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    j = first + local
    keep = i < j if unordered else i != j
    return order[i[keep]], order[j[keep]]


def open_molecules_fields(positions, batch, charges=None, dipoles=None, quadrupoles=None, *, smearing=None,
                          accuracy=1e-6, prefactor=1.0, ranks=(0, 1, 2), traceless_gradient=False) -> tuple:
    """Every open structure of a batch in one sum over its intra-structure pairs (:func:`pair_list_fields`).

    positions [N, 3] Å, batch [N] long, charges [N, C], dipoles [N, C, 3], quadrupoles [N, C, 3, 3] or
    None; smearing σ in Å or None (what :func:`.fields.batched_multipole_fields` uses for the open
    structures of a batch when :func:`pair_list_fits`). Returns (potential [N, C], field [N, C, 3],
    gradient [N, C, 3, 3]; its symmetric traceless part with ``traceless_gradient``), None for a rank not in
    ``ranks``. Point multipoles closer than :data:`OVERLAP_DISTANCE` raise ValueError.
    """
    from ._validate import check_inputs

    inputs = check_inputs(positions, charges, dipoles, quadrupoles, None, None, smearing, accuracy)
    pos, m = inputs.positions, inputs.multipoles
    i, j = molecule_pairs(batch, unordered=True)
    if smearing is None:
        if i.numel():
            d2 = ((pos[i].detach() - pos[j].detach()) ** 2).sum(-1)
            if bool((d2 < OVERLAP_DISTANCE**2).any()):
                k = int(torch.argmin(d2))
                raise ValueError(f"point multipoles at atoms {int(i[k])} and {int(j[k])} overlap "
                                 f"(distance {float(d2[k].sqrt()):.2e} Å)")
        kernel = RadialKernel.coulomb()
    else:
        kernel = RadialKernel.smeared(float(smearing))
    out = pair_list_fields(pos, i, j, m, kernel, ranks, prefactor, traceless_gradient=traceless_gradient,
                           unordered=True)
    return tuple(out.get(r) for r in (0, 1, 2))


def traced_pair_fields(positions, pairs, charges=None, dipoles=None, quadrupoles=None, *, smearing=None,
                       prefactor=1.0, ranks=(0, 1, 2), traceless_gradient=False, linearized=False) -> tuple:
    """:func:`open_molecules_fields` for the compiled training step (:mod:`cartlorem.training.compiled`):
    the intra-structure pairs ``pairs`` = (i, j) of ``molecule_pairs(batch, unordered=True)`` given (each
    pair once), no input checks (the
    caller has made them where it built the pairs: every structure open, no overlapping point multipoles),
    every step op by op, so that torch.func differentiates it and torch.compile traces it whole.

    ``linearized``: the pair features ``B_n(R) R^p`` to first order about the positions' values
    (:func:`_linearized_features`). The fields, their first derivatives in the positions and all their derivatives
    in the sources are unchanged; the second derivative in the positions loses the kernel's curvature. A force
    loss's gradient in the parameters needs no more than that, and the compiled training step (the long-range
    block of kind "multipole" with ``pairs``) then evaluates the kernel and its slope once, without gradient,
    instead of differentiating them twice (benchmarks/README.md, "The compiled step's pair sum, linearised")."""
    i, j = pairs
    m = {r: x for r, x in enumerate((charges, dipoles, quadrupoles)) if x is not None}
    kernel = RadialKernel.coulomb() if smearing is None else RadialKernel.smeared(float(smearing))
    out = pair_list_fields(positions, i, j, m, kernel, ranks, prefactor, traced=True,
                           traceless_gradient=traceless_gradient, unordered=True, linearized=linearized)
    return tuple(out.get(r) for r in (0, 1, 2))
