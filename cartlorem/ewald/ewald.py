"""Ewald summation for point (or Gaussian-smeared) Cartesian multipoles in a fully periodic cell.

    F = real space (screened kernel, pairs and images within r_c)
      + reciprocal space (structure factor, |k| < k_c) - self + background,

with tin-foil boundary conditions, on positions first wrapped into the cell (:func:`wrap_positions`, in
float64, so that float32 phases k.r keep their resolution far from the origin). The long-range kernel is
``erf(alpha R)/R`` (Fourier transform ``4 pi exp(-k^2/4 alpha^2) / k^2``); the short-range kernel is the
rest, ``erfc(alpha R)/R`` for point sources and ``erfc(alpha R)/R - erfc(R/(sqrt 2 sigma))/R`` for
Gaussian sources of width sigma. (This is the same as screening the Gaussians with ``alpha_s``,
``1/alpha^2 = 1/alpha_s^2 + 2 sigma^2``: the reciprocal factor ``exp(-k^2/4 alpha_s^2) exp(-k^2
sigma^2/2)``.) With smearing, alpha never exceeds ``1/(sqrt 2 sigma)``; at that value the short-range
kernel vanishes and only the reciprocal sum is left.

Parameters (:func:`choose_parameters`): with ``p`` from :func:`tail_parameter`, ``r_c = p / alpha`` and
``k_c = 2 p alpha``; alpha minimises a cost model, ``N^2 S(r_c)`` pair evaluations (S = number of lattice
translations, real space is summed in dense blocks over minimum-image pair vectors) against
``N K(k_c)`` atom-k-vector terms, which for large cells puts ``r_c`` at half the smallest cell height.
The chosen alpha is rounded up to the grid ``2^(j/16)`` (:func:`snap_alpha`), so that it does not move
under small strains: the stress (autograd, alpha held constant) is then the exact derivative of the
energy (finite-strain agreement ~1e-10 at accuracy 1e-6), not just to ~accuracy.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from .direct import pair_sum
from .kernels import (
    InteractionTensors,
    Layout,
    RadialKernel,
    background_potential,
    cell_volume,
    reciprocal_kernel,
    self_matrix,
    smearing_beta,
)

#: Relative cost of one real-space pair evaluation against one (atom, k-vector) term, by order
#: (output rank + source rank), forward + backward. Measured on a 1-thread CPU, float32, water boxes of
#: 648-3000 atoms, smearing 1 Å: charges only (order 2 with all outputs, 52 channels) ~7-9; charges,
#: dipoles and quadrupoles to potential, field and gradient (order 4, 4 channels) ~30-45.
REAL_COST = {0: 7.0, 1: 8.0, 2: 9.0, 3: 20.0, 4: 35.0}
#: Largest alpha times the mean atomic spacing (V/N)^(1/3) the parameter choice considers.
ALPHA_SPACING_MAX = 2.0
#: (atom x k-vector) terms per reciprocal block.
K_BLOCK = 1 << 20
#: Above this many (atom x k-vector) terms, blocks are checkpointed when gradients are tracked.
CHECKPOINT_TERMS = 1 << 23


def kvector_blocks(n_atoms: int, n_k: int, terms: int) -> list:
    """Slices of ``n_k`` wave vectors, at most ``terms`` (atom x vector) terms per block (one vector at least): the
    blocks the sums over wave vectors run in (:data:`K_BLOCK` here and in the slab's replica correction)."""
    size = max(1, terms // n_atoms)
    return [slice(k0, k0 + size) for k0 in range(0, n_k, size)]


class EwaldParameters(NamedTuple):
    """Splitting ``alpha`` (1/Å), real-space cutoff (Å), k-space cutoff (1/Å)."""

    alpha: float
    real_cutoff: float
    k_cutoff: float


def tail_parameter(accuracy: float, order: int) -> float:
    """``p`` (``r_c = p / alpha``, ``k_c = 2 p alpha``) for a requested relative ``accuracy``.

    The relative tail of ``B_n`` of ``erfc(alpha R)/R`` at ``x = alpha R`` is
    ``2^n x^(2n-1) exp(-x^2) / (sqrt(pi) (2n-1)!!) = x^(2n-1) exp(-x^2) / Gamma(n + 1/2)``; ``p`` makes it equal
    to ``accuracy`` with ``n = max(1, order - 2)`` (order = output rank + source rank), except ``n = 3/2`` at
    order 3. The tensors of rank 3 and 4 fall off faster than the fields they add to, so their full polynomial
    factor is not charged; but at order 3 (dipoles to field gradient, quadrupoles to field) ``n = 1`` left the
    field gradient of smeared charges and dipoles at 1.2-1.9x accuracy (1 Å Gaussians in 27-64 atom cells),
    ``n = 3/2`` brings it to ~0.3x. Measured errors of potential, field and gradient on random
    charge/dipole/quadrupole systems are 0.01-1x accuracy.
    """
    n = 1.5 if order == 3 else float(max(1, order - 2))
    gamma = math.gamma(n + 0.5)

    def tail(x):
        return x ** (2 * n - 1) * math.exp(-x * x) / gamma

    lo, hi = math.sqrt(n), 60.0  # the tail decreases beyond its maximum at x^2 = n - 1/2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if tail(mid) > accuracy else (lo, mid)
    return hi


def lattice_shifts(cell: np.ndarray, cutoff: float) -> np.ndarray:
    """Integer translations n [S, 3] (zero included) that can bring a minimum-image pair within ``cutoff``.

    After rounding, a pair vector has fractional coordinates in [-1/2, 1/2]; an image n is reached only if
    ``|n_k| <= cutoff / h_k + 1/2`` (h_k: distance between lattice planes) and
    ``|n . cell| <= cutoff + rho`` (rho: half the longest diagonal).
    """
    volume = abs(np.linalg.det(cell))
    heights = np.array(
        [volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
    )
    bound = np.floor(cutoff / heights + 0.5).astype(int)
    rho = 0.5 * max(np.linalg.norm(np.array(s) @ cell) for s in itertools.product((-1, 1), repeat=3))
    grid = np.stack(np.meshgrid(*[np.arange(-b, b + 1) for b in bound], indexing="ij"), -1).reshape(-1, 3)
    keep = np.linalg.norm(grid @ cell, axis=1) <= cutoff + rho
    grid = grid[keep]
    return grid[np.argsort(np.abs(grid).sum(1), kind="stable")]


#: Most integer translations the real-space image search may enumerate (a box, about 100 MB).
MAX_IMAGE_BOX = 1 << 22


def check_image_count(cell: np.ndarray, cutoff: float) -> None:
    """ValueError if reaching ``cutoff`` (Å) needs more than ``MAX_IMAGE_BOX`` candidate translations.

    That happens only for cells whose heights are tiny relative to the real-space cutoff (strongly
    skewed cells, or a few atoms in a huge thin cell); the message names the thinnest height.
    """
    heights = _cell_heights(cell)
    box = float(np.prod(2.0 * np.floor(cutoff / heights + 0.5) + 1.0))
    if box > MAX_IMAGE_BOX:
        k = int(np.argmin(heights))
        raise ValueError(
            f"cell height h_{k} = {heights[k]:.3g} Å is too small relative to the Ewald real-space cutoff "
            f"{cutoff:.3g} Å: the image search would need {box:.3g} lattice translations "
            f"(limit {MAX_IMAGE_BOX}); reduce the cell (e.g. ase.geometry.minkowski_reduce) or use "
            "a larger, less skewed one"
        )


def kvector_indices(cell: np.ndarray, k_cutoff: float) -> np.ndarray:
    """Integer reciprocal-lattice indices m [K, 3], 0 < |k| < k_c, one of every pair k, -k."""
    recip = 2.0 * np.pi * np.linalg.inv(cell).T
    bound = np.floor(k_cutoff * np.linalg.norm(cell, axis=1) / (2.0 * np.pi)).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-b, b + 1) for b in bound], indexing="ij"), -1).reshape(-1, 3)
    half = (
        (grid[:, 0] > 0)
        | ((grid[:, 0] == 0) & (grid[:, 1] > 0))
        | ((grid[:, 0] == 0) & (grid[:, 1] == 0) & (grid[:, 2] > 0))
    )
    grid = grid[half]
    return grid[np.linalg.norm(grid @ recip, axis=1) < k_cutoff]


def _cell_heights(cell: np.ndarray) -> np.ndarray:
    """Distances between lattice planes, h_k = V / |a_l x a_m| (Å)."""
    volume = abs(np.linalg.det(cell))
    return np.array(
        [volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
    )


def _shift_counts(cell: np.ndarray, cutoffs: np.ndarray) -> np.ndarray:
    """len(lattice_shifts(cell, r_c)) for every r_c in ``cutoffs``, in one pass.

    A translation n enters :func:`lattice_shifts` at ``r_c >= max(max_k (|n_k| - 1/2) h_k, |n . cell| - rho)``;
    those thresholds are computed in blocks of about a million translations (memory stays bounded for
    thin or elongated cells) and counted below every cutoff.
    """
    heights = _cell_heights(cell)
    bound = np.floor(cutoffs.max() / heights + 0.5).astype(int)
    rho = 0.5 * max(np.linalg.norm(np.array(s) @ cell) for s in itertools.product((-1, 1), repeat=3))
    axis = int(np.argmax(bound))  # blocks along the axis with the most translations
    others = [k for k in range(3) if k != axis]
    plane = np.stack(
        np.meshgrid(*[np.arange(-bound[k], bound[k] + 1) for k in others], indexing="ij"), -1
    ).reshape(-1, 2)  # [M, 2]
    step = max(1, (1 << 20) // len(plane))
    thresholds = []
    for n0 in range(-bound[axis], bound[axis] + 1, step):
        values = np.arange(n0, min(n0 + step, bound[axis] + 1))
        grid = np.empty((len(values) * len(plane), 3), dtype=np.int64)
        grid[:, axis] = np.repeat(values, len(plane))
        grid[:, others] = np.tile(plane, (len(values), 1))
        t = np.maximum(((np.abs(grid) - 0.5) * heights).max(1), np.linalg.norm(grid @ cell, axis=1) - rho)
        thresholds.append(t[t <= cutoffs.max()])
    return np.searchsorted(np.sort(np.concatenate(thresholds)), cutoffs, side="right")


@lru_cache(maxsize=256)
def _choose_alpha(cell_key: bytes, n_atoms: int, p: float, beta_max: float, order: int) -> float:
    cell = np.frombuffer(cell_key).reshape(3, 3)
    volume = abs(np.linalg.det(cell))
    heights = _cell_heights(cell)
    # the real-space cost jumps where another lattice translation enters: try just below those too
    jumps = [(m + 0.5) * h * (1.0 - 1e-9) for h in heights for m in range(6)]
    candidates = set(np.geomspace(0.25 * heights.min(), 4.0 * heights.max() + 10.0, 40)) | set(jumps)
    if math.isfinite(beta_max):
        candidates.add(p / beta_max)  # smeared sources: reciprocal space only, no real-space pairs
    cutoffs = np.array(sorted(candidates))
    # a splitting much sharper than the atomic spacing loses the rank-2 outputs to cancellation between
    # real and reciprocal parts (measured: errors 5-25x accuracy at alpha * spacing = 5): cap it
    alphas = np.minimum(p / cutoffs, min(beta_max, ALPHA_SPACING_MAX / (volume / n_atoms) ** (1.0 / 3.0)))
    # splittings whose real-space image search is refused by check_image_count are not candidates
    # (if every one is, the smallest cutoff is kept and refused later with a clear message)
    box = np.prod(2.0 * np.floor((p / alphas)[:, None] / heights[None, :] + 0.5) + 1.0, axis=1)
    keep = (box <= MAX_IMAGE_BOX) | (alphas >= beta_max)
    if not keep.any():
        return float(alphas.max())
    alphas = alphas[keep]
    n_k = volume * (2.0 * p * alphas) ** 3 / (12.0 * np.pi**2)  # half-space k-vectors
    needs_real = alphas < beta_max
    real = np.zeros_like(alphas)
    if needs_real.any():
        real[needs_real] = n_atoms * n_atoms * _shift_counts(cell, p / alphas[needs_real])
    return snap_alpha(float(alphas[np.argmin(REAL_COST[min(order, 4)] * real + n_atoms * n_k)]), beta_max)


#: Chosen splittings are rounded up to the grid 2^(j / ALPHA_GRID) (1/Å), steps of 4.4%.
ALPHA_GRID = 16


def snap_alpha(alpha: float, beta_max: float = math.inf) -> float:
    """``alpha`` rounded up to the grid ``2^(j/16)`` (1/Å), at most ``beta_max`` (reciprocal-only sums).

    The cost model's optimum moves continuously with the cell, but autograd treats alpha as a constant,
    so the stress would be the derivative of the energy only to about ``accuracy`` (measured 1e-7
    relative for point and 1e-5 for smeared sources at accuracy 1e-6). On the grid alpha is piecewise
    constant: the energy is then exactly differentiable in the cell except on the grid's boundaries
    (and where a k-vector or image crosses its cutoff, an energy step far below ``accuracy``). Rounding
    up keeps the real-space cutoff ``p / alpha`` below the image count the cost model chose; the k-space
    cutoff grows by less than 4.4% (k-vectors by less than 14%).
    """
    if alpha >= beta_max:
        return beta_max
    return min(beta_max, 2.0 ** (math.ceil(ALPHA_GRID * math.log2(alpha) - 1e-9) / ALPHA_GRID))

def choose_parameters(
    cell: np.ndarray,
    n_atoms: int,
    accuracy: float,
    order: int,
    smearing: float | None = None,
    alpha: float | None = None,
) -> EwaldParameters:
    """Splitting and cutoffs for a requested ``accuracy`` (see the module docstring).

    order: highest tensor rank summed (output rank + source rank, at most 4); given ``alpha`` is kept.
    """
    p = tail_parameter(accuracy, order)
    beta_max = math.inf if smearing is None else smearing_beta(smearing)
    if alpha is not None and not (math.isfinite(float(alpha)) and float(alpha) > 0):
        raise ValueError(f"alpha must be a positive number (1/Å), got {alpha}")
    if alpha is None:
        alpha = _choose_alpha(np.ascontiguousarray(cell, dtype=np.float64).tobytes(), n_atoms, p, beta_max, order)
    alpha = min(float(alpha), beta_max)
    return EwaldParameters(alpha, p / alpha, 2.0 * p * alpha)


def reciprocal_sum(
    positions: torch.Tensor,
    v: torch.Tensor,
    cell: torch.Tensor,
    m: torch.Tensor,
    alpha: float,
    rows: Layout,
    cols: Layout,
) -> torch.Tensor:
    """Reciprocal-space part (k != 0, both half spaces) for the long-range kernel ``erf(alpha R)/R``.

    positions [N, 3] (Å); v [N, n_cols, C] packed sources; cell [3, 3]; m [K, 3] integer half-space
    indices. ``S(k) = sum_j sum_b (i k)^b v_jb exp(-i k.r_j)`` and
    ``out_a(r_i) = (4 pi / V) sum_k exp(-k^2/4 alpha^2)/k^2 Re[(i k)^a S(k) exp(i k.r_i)]``
    -> [N, n_rows, C] without the output signs ``c_l``.
    """
    n_atoms, n_cols, n_channels = v.shape
    volume = cell_volume(cell)
    recip = 2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1)  # rows b_k, a_i . b_k = 2 pi delta_ik
    flat = v.reshape(n_atoms, n_cols * n_channels)
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (positions, v, cell))
    use_checkpoint = track and n_atoms * m.shape[0] > CHECKPOINT_TERMS

    def chunk(m_chunk, positions, flat, recip, volume):
        """Contribution of the k-vectors ``m_chunk`` -> [N, rows * C]."""
        k = m_chunk.to(positions.dtype) @ recip  # [K, 3] (1/Å), differentiable in the cell
        weight = 2.0 * reciprocal_kernel((k * k).sum(-1), alpha) / volume  # [K], x2: both half spaces
        theta = k @ positions.transpose(0, 1)  # [K, N]
        phase = torch.cat([torch.cos(theta), torch.sin(theta)])  # [2K, N]
        return phase_sum(phase, flat, k, weight, rows, cols, n_channels)

    out = positions.new_zeros(n_atoms, len(rows) * n_channels)
    for part in kvector_blocks(n_atoms, m.shape[0], K_BLOCK):
        args = (m[part], positions, flat, recip, volume)
        out = out + (checkpoint(chunk, *args, use_reentrant=False) if use_checkpoint else chunk(*args))
    return out.reshape(n_atoms, len(rows), n_channels)


def phase_sum(phase: torch.Tensor, flat: torch.Tensor, k: torch.Tensor, weight: torch.Tensor, rows: Layout,
              cols: Layout, n_channels: int, *, factors=None, field_phase=None) -> torch.Tensor:
    """``out_a(r_i) = sum_k w(k) Re[(i k)^a S(k) exp(i k.r_i)]``, ``S(k) = sum_j sum_b (i k)^b v_jb exp(-i k.r_j)``,
    from the phases; any leading (batch) dimensions.

    phase [..., 2K, N]: cos(k.r_j) over sin(k.r_j); flat [..., N, n_cols C] packed sources; k [..., K, 3];
    weight [..., K] -> [..., N, n_rows C]. One GEMM into the structure factors, one back to the atoms.
    For plane waves with a complex wave vector (the slab's replica correction, :mod:`.slab`): ``factors``
    (re [..., K, 3], im [..., K, 3]), the per-axis derivative factors in place of i k, and ``field_phase`` the
    phases at the field points where they differ from the sources' (real amplitudes times cos and sin).
    """
    n_k = k.shape[-2]
    ab = (phase @ flat).unflatten(-1, (len(cols), n_channels))  # [..., 2K, b, C]
    a, b = ab[..., :n_k, :, :], ab[..., n_k:, :, :]  # sum_j cos(k.r_j) v_jb, sum_j sin(k.r_j) v_jb

    def monomials(layout):
        return layout.monomials(k) if factors is None else layout.complex_monomials(*factors)

    col_re, col_im = (x[..., None] for x in monomials(cols))  # [..., K, b, 1]: (i k)^b
    # S = sum_b (i k)^b (a_b - i b_b), as products and sums over b (a K-batched matmul of [1, b] rows is slow)
    s_re = (col_re * a + col_im * b).sum(-2)[..., None, :]  # [..., K, 1, C]
    s_im = (col_im * a - col_re * b).sum(-2)[..., None, :]
    row_re, row_im = (x[..., None] * weight[..., None, None] for x in monomials(rows))  # [..., K, a, 1]
    z_re = row_re * s_re - row_im * s_im  # [..., K, a, C]: Z_a = w (i k)^a S
    z_im = row_re * s_im + row_im * s_re
    # sum_k Re[Z exp(i k.r)] = sum_k cos(k.r) Z_re - sin(k.r) Z_im: [..., N, 2K] @ [..., 2K, a C]
    out_phase = phase if field_phase is None else field_phase
    return out_phase.transpose(-1, -2) @ torch.cat([z_re, -z_im], dim=-3).flatten(-2)


def wrap_positions(positions: torch.Tensor, cell: torch.Tensor, periodic=None) -> torch.Tensor:
    """Positions moved into the cell (fractional coordinates in [0, 1)), differentiably.

    ``r - n . cell`` with the integers ``n = floor(r . cell^-1)`` held constant: the same function of
    (positions, cell) as the unwrapped one for every periodic quantity, so forces and stress do not
    change (d wrapped / d r = identity). ``n`` and the subtraction are computed in float64 and the result
    is cast back, so float32 inputs far from the origin (unwrapped MD trajectories) keep their
    float32 resolution in every phase ``k . r`` and pair vector afterwards.
    positions [N, 3] (Å); cell [3, 3], or [N, 3, 3] each atom's own (Å, rows are lattice vectors) -> [N, 3] (Å),
    positions' dtype. (``inv_ex``: no error check, which would be an effectful op in a compiled graph and keep
    Inductor from caching it; the cells are checked before.) ``periodic``: bool [3] or [N, 3], the cell rows to
    wrap along (default all); a slab is wrapped in its plane only, so that ``r . n`` keeps the atoms' heights
    (:mod:`.slab`: the replica correction needs every pair's height difference, not one modulo the period).
    """
    r64 = positions.double()[:, None, :]  # [N, 1, 3]
    c64 = cell.double()
    n = torch.floor(r64.detach() @ torch.linalg.inv_ex(c64.detach()).inverse)  # [N, 1, 3] integers, no gradient
    if periodic is not None:
        n = n * torch.as_tensor(periodic, device=n.device).to(n.dtype).reshape(-1, 1, 3)
    return (r64 - n @ c64)[:, 0].to(positions.dtype)


def ewald_sum(
    positions: torch.Tensor,
    v: torch.Tensor,
    cell: torch.Tensor,
    rows: Layout,
    cols: Layout,
    *,
    smearing: float | None,
    accuracy: float,
    alpha: float | None = None,
    total_charge: torch.Tensor | None = None,
) -> torch.Tensor:
    """Periodic multipole sum: real + reciprocal - self + background.

    positions [N, 3] (Å); v [N, n_cols, C] packed sources; cell [3, 3] (rows are lattice vectors);
    total_charge [C] (e) or None if the sources have no charges.
    Returns [N, n_rows, C] without the output signs ``c_l`` (see :func:`.direct.pair_sum`).
    """
    tensors = InteractionTensors(rows, cols)
    # every phase k.r and pair vector below sees wrapped positions: float32 keeps its resolution
    positions = wrap_positions(positions, cell)
    cell_np = cell.detach().cpu().double().numpy()
    params = choose_parameters(cell_np, positions.shape[0], accuracy, tensors.max_order, smearing, alpha)
    kernel = RadialKernel.ewald_real(params.alpha, smearing)
    shifts = None
    if not kernel.is_zero:  # smeared sources split at alpha = beta (a zero kernel: pair_sum's zeros) need no images
        check_image_count(cell_np, params.real_cutoff)
        shifts = torch.as_tensor(lattice_shifts(cell_np, params.real_cutoff), device=positions.device)
    out = pair_sum(positions, v, kernel, tensors, cell=cell, shifts=shifts, cutoff=params.real_cutoff)
    m = torch.as_tensor(kvector_indices(cell_np, params.k_cutoff), device=positions.device)
    out = out + reciprocal_sum(positions, v, cell, m, params.alpha, rows, cols)
    out = out - torch.einsum("ab,nbc->nac", self_matrix(tensors, params.alpha, v.dtype, v.device), v)
    if total_charge is not None and 0 in rows.ranks:
        volume = cell_volume(cell)
        phi = background_potential(total_charge, volume, params.alpha, smearing)  # [C]
        bg = torch.zeros_like(out[0])
        bg = bg.index_put((torch.tensor(rows.offset(0)),), phi)
        out = out + bg[None]
    return out
