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

import functools
import math

import torch
from torch.utils.checkpoint import checkpoint

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
# :class:`.kernels.InteractionTensors`) times a constant coefficient table, and applies it with one
# batched matmul: about a dozen tensor ops in all, each differentiable twice by autograd.

#: Full (not symmetry-reduced) Cartesian components of ranks 0, 1, 2, in row-major order.
_FULL_INDICES = {0: ((),), 1: ((0,), (1,), (2,)), 2: tuple((a, b) for a in range(3) for b in range(3))}


@functools.lru_cache(maxsize=None)
def _pair_table(ranks: tuple, source_ranks: tuple):
    """Features and coefficients of the per-pair coupling matrix of the given field and source ranks.

    Returns (orders [F], monomial columns [F], coefficients [F][A * Bc] as nested lists, A, Bc, max order)
    with ``K[a, b] = sum_f coef[f, a * Bc + b] B_(orders[f]) mono[columns[f]]``; ``mono`` is the row
    ``[1, R (3), R R (9), R R R (27), R R R R (81)]`` of full outer products. K already holds the source
    weights ``(-1)^k / k!`` (full components, so no multiplicities) and the output signs (+1 potential,
    -1 field and gradient): ``out_a = sum_b K[a, b] M_b``.
    """
    rows = [idx for r in ranks for idx in _FULL_INDICES[r]]
    cols = [idx for r in source_ranks for idx in _FULL_INDICES[r]]
    offset = {0: 0, 1: 1, 2: 4, 3: 13, 4: 40}  # start of each degree in the monomial row

    def column(powers):
        idx = (0,) * powers[0] + (1,) * powers[1] + (2,) * powers[2]
        flat = 0
        for axis in idx:
            flat = 3 * flat + axis
        return offset[len(idx)] + flat

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
    orders = [order for order, _ in keys]
    columns = [column(powers) for _, powers in keys]
    return orders, columns, table, len(rows), len(cols), max(orders)


def pair_list_fields(
    positions: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    multipoles: dict,
    kernel: RadialKernel,
    ranks=(0, 1, 2),
    prefactor: float = 1.0,
) -> dict:
    """Fields at the targets of an explicit list of directed pairs (open boundaries, no images).

    positions [N, 3] (Å); i, j [P] long: pair p adds the field at atom ``i[p]`` of the source at atom
    ``j[p]`` (R = r_i - r_j; a pair list without i = j, typically every ordered pair of atoms within each
    molecule of a batch). multipoles: {rank: tensor} of the ranks present, charges [N, C] (e), dipoles
    [N, C, 3] (e Å), quadrupoles [N, C, 3, 3] (e Å², symmetric traceless). kernel: the radial kernel
    (``RadialKernel.coulomb()`` or ``.smeared(sigma)``). ranks: field ranks to return.
    Returns {rank: potential [N, C] / field [N, C, 3] / gradient [N, C, 3, 3]} times ``prefactor``,
    the same numbers as the blocked :func:`pair_sum` restricted to these pairs. Differentiable (twice
    and more) with respect to positions and multipoles; plain autograd ops (scriptable building blocks).
    """
    ranks = tuple(sorted(set(int(r) for r in ranks)))
    source_ranks = tuple(sorted(multipoles))
    orders, columns, table, n_rows, n_cols, max_order = _pair_table(ranks, source_ranks)
    ref = multipoles[source_ranks[0]]
    n_atoms, n_ch = positions.shape[0], ref.shape[1]
    dtype, device = positions.dtype, positions.device
    # sources as full components [N, Bc, C]: q, mu_x..z, Theta_xx..zz
    parts = []
    for r in source_ranks:
        t = multipoles[r]
        parts.append(t[:, None, :] if r == 0 else t.reshape(n_atoms, n_ch, 3**r).transpose(1, 2))
    v = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    R = positions[i] - positions[j]  # [P, 3]
    r2 = (R * R).sum(-1)  # [P]
    B = kernel.derivatives(r2, torch.ones_like(r2, dtype=torch.bool), max_order)
    B = torch.stack(B, dim=1)  # [P, max_order + 1]
    n_pairs = R.shape[0]
    mono = [torch.ones_like(R[:, :1]), R]  # degrees 0 and 1; then up to max_order (<= 4)
    while len(mono) <= max_order:
        mono.append((mono[-1][:, :, None] * R[:, None, :]).reshape(n_pairs, -1))  # [P, 3^d]
    mono = torch.cat(mono, dim=1)  # [P, 1 + 3 + 9 + ...]
    order_index = torch.tensor(orders, device=device)
    column_index = torch.tensor(columns, device=device)
    features = B.index_select(1, order_index) * mono.index_select(1, column_index)  # [P, F]
    coef = torch.tensor(table, dtype=dtype, device=device)  # [F, A * Bc]
    K = (features @ coef).reshape(n_pairs, n_rows, n_cols)  # [P, A, Bc]
    vj = v.index_select(0, j)  # [P, Bc, C]
    per_pair = K * vj if n_rows * n_cols == 1 else torch.bmm(K, vj)  # [P, A, C]
    out = positions.new_zeros(n_atoms, n_rows, n_ch).index_add(0, i, per_pair)  # [N, A, C]
    if prefactor != 1.0:
        out = out * prefactor
    fields, start = {}, 0
    for r in ranks:
        block = out[:, start : start + 3**r]  # [N, 3^r, C]
        start += 3**r
        fields[r] = block[:, 0] if r == 0 else block.transpose(1, 2).reshape((n_atoms, n_ch) + (3,) * r)
    return fields


def molecule_pairs(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair (i, j), i != j, of atoms in the same structure: (i [P], j [P]) long.

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
    keep = i != j
    return order[i[keep]], order[j[keep]]


def open_molecules_fields(positions, batch, charges=None, dipoles=None, quadrupoles=None, *, smearing=None,
                          accuracy=1e-6, prefactor=1.0, ranks=(0, 1, 2)) -> tuple:
    """Every open structure of a batch in one sum over its intra-structure pairs (:func:`pair_list_fields`).

    The arguments of ``cartlorem.ewald.fields._open_batched`` (positions [N, 3] Å, batch [N] long,
    charges [N, C], dipoles [N, C, 3], quadrupoles [N, C, 3, 3] or None; smearing σ in Å or None) and
    the same numbers, with a fraction of its autograd nodes. Returns (potential [N, C], field [N, C, 3],
    gradient [N, C, 3, 3]), None for a rank not in ``ranks``. Point multipoles closer than
    :data:`OVERLAP_DISTANCE` raise ValueError.
    """
    from ._validate import check_inputs

    inputs = check_inputs(positions, charges, dipoles, quadrupoles, None, None, smearing, accuracy)
    pos, m = inputs.positions, inputs.multipoles
    ranks = tuple(sorted(set(int(r) for r in ranks)))
    i, j = molecule_pairs(batch)
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
    out = pair_list_fields(pos, i, j, m, kernel, ranks, prefactor)
    return tuple(out.get(r) for r in (0, 1, 2))
