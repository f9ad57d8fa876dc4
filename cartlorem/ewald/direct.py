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

import math

import torch
from torch.utils.checkpoint import checkpoint

from .kernels import InteractionTensors, RadialKernel

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
