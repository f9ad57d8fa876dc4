"""Smooth particle-mesh Ewald for Cartesian multipoles (Sagui, Pedersen & Darden, JCP 120, 73 (2004)).

The same splitting as :mod:`.ewald` (real space + reciprocal space - self + background, tin-foil
boundary conditions); only the reciprocal step differs. There, ``exp(-i k.r_j)`` of every source is
replaced by its cardinal B-spline interpolation on a mesh of ``K_1 x K_2 x K_3`` points along the lattice
vectors (fractional coordinates ``u = K s``, ``s = r cell^-1`` wrapped into [0, 1)):

    exp(-i k.r) ~ b(k) sum_m Theta(u - m) exp(-2 pi i k~.m / K),   Theta(u) = M_n(u_1) M_n(u_2) M_n(u_3)

(M_n: cardinal B-spline of order n, |b(k)|^2 = 1 / |sum_t M_n(t) exp(2 pi i k~_d t / K_d)|^2 per axis).
A multipole's Fourier factor ``(i k)^b`` is a derivative ``(-d/dr_j)^b`` of that phase, so every
channel's charges, dipoles and quadrupoles are spread onto ONE mesh with the spline weights and their
first and second derivatives:

    Q(m) = sum_j sum_b v_jb (-d/dr_j)^b Theta(u_j - m)                  (packed sources v, see .kernels)

One forward FFT, a product with the influence function ``(4 pi / V) exp(-k^2/4 alpha^2) / k^2 |b(k)|^2``
(the smearing of Gaussian sources is inside alpha, exactly as in :mod:`.ewald`: ``alpha <= 1/(sqrt 2
sigma)``), one inverse FFT give the reciprocal potential on the mesh, ``phi(m)``; the potential and its
first and second derivatives at every atom come back through the same weights:

    d^a phi_rec(r_i) = sum_m (d/dr_i)^a Theta(u_i - m) phi(m)

Two FFTs per channel whatever the ranks. Everything is plain torch (rfftn, index_add, gather) and
differentiable to any order in positions, cell and multipoles (the splines are polynomials inside each
mesh interval, order n >= 4 keeps them C^(n-2)).

The real-space part, ``erfc``-screened interaction tensors within ``r_c`` over a neighbour list
(vesin, each pair once), reuses the kernels of :mod:`.kernels`; the self and background terms are those
of :mod:`.ewald`.

Parameters (:func:`choose_parameters`): ``r_c = p / alpha`` and the spline truncation follow the
Ewald rule (:func:`.ewald.tail_parameter`); the mesh spacing along each lattice vector is
``h alpha = (accuracy / 2c)^(1/e)`` (the spline error falls as ``c (h alpha)^e``, ``e ~ n - d`` for outputs or
sources of rank d; constants measured against the exact k-space sum, :data:`MESH_ERROR` for point multipoles,
:data:`MESH_ERROR_SMEARED` for Gaussian sources, whose fields are mostly or wholly reciprocal), rounded up to an FFT-friendly size
(a product of 2, 3 and 5); alpha minimises a measured cost model (:func:`pme_cost`).
"""

from __future__ import annotations

import bisect
import math
from functools import lru_cache
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from . import ewald as _ewald
from .ewald import tail_parameter
from .kernels import (
    InteractionTensors,
    Layout,
    cell_volume,
    RadialKernel,
    background_potential,
    self_matrix,
    smearing_beta,
)

#: Summation methods of :func:`cartlorem.ewald.multipole_fields`.
METHODS = ("auto", "direct", "ewald", "pme")
#: Spline orders the automatic choice considers (even orders: |b(k)|^2 never vanishes).
SPLINE_ORDERS = (4, 6, 8, 10)
#: Spline error model: the relative error of the reciprocal part (worst output, point q, mu, Theta, cubic
#: and triclinic cells) is below ``c (h alpha)^e`` for mesh spacing h along each lattice vector; (c, e) per
#: highest source/output rank d and spline order n (the error of rank-d outputs falls as about
#: ``(h alpha)^(n - d)``: the spline's own representation of an atom's self-interaction). Measured against
#: the exact Ewald k-space sum for 0.09 <= h alpha <= 0.75 (upper envelope of the data); the mesh rule keeps
#: half of ``accuracy`` for this error.
MESH_ERROR = {
    0: {4: (0.0487, 4.21), 6: (0.0191, 6.51), 8: (0.0116, 8.76), 10: (0.0221, 11.47)},
    1: {4: (0.1337, 3.73), 6: (0.1405, 6.43), 8: (0.1294, 8.75), 10: (0.1306, 10.95)},
    2: {4: (0.2579, 2.55), 6: (0.0955, 4.85), 8: (0.0676, 7.19), 10: (0.0720, 9.55)},
}
#: Spline error model for Gaussian sources (smearing given), (c, e) per spline order, any rank d <= 2:
#: measured with alpha = 1/(sqrt 2 sigma), where the reciprocal sum is the whole field (no real-space part
#: to dilute the mesh error): worst relative error per channel and output rank over q, mu, Theta alone and
#: together, cubic, triclinic and skewed 16-60-atom cells, 0.12 <= h alpha <= 0.5 (upper envelope; Theta
#: alone is the worst case). The constants are ~40x those of :data:`MESH_ERROR` at the same exponents: the
#: point-multipole constants, applied to the model's smeared sources, gave errors up to 1.3x the requested
#: accuracy (water box, q + mu + Theta, accuracy 1e-4; tests/test_pme.py::test_model_settings_water_box).
MESH_ERROR_SMEARED = {4: (3.0, 2.06), 6: (1.78, 4.45), 8: (3.64, 7.20), 10: (10.2, 9.86)}
#: Cost models of one call with gradients to the positions and the sources (seconds, one CPU thread, float64): a
#: constant per term of :func:`pme_cost_terms` and :func:`ewald_cost_terms`, fitted by benchmarks/pme_cost_fit.py
#: (non-negative least squares on relative errors) to process times of water boxes of 192-3000 atoms, point and
#: smeared (1 Å) sources, in the layouts of both long-range kinds: q, mu, Theta in 4 channels ("multipole") and
#: charges in 36 channels ("lorem"), and 4 channels of charges (results/pme_cost_fit.pme.md and .ewald.md: model
#: within 0.56-1.41x of the measured PME times, 0.55-1.56x of the Ewald times, medians 0.98 and 0.97).
#: PME: a fixed overhead per call; per real-space pair, and per pair and (row x column x channel) entry; per
#: atom, stencil point and channel (gathering and scattering the mesh), and per atom, stencil point and
#: (row + column) x channel (the spline weights' products); per mesh point x log2(mesh points) x channel (two
#: FFTs).
COST_PME_CALL = 0.00649
COST_PAIR_FIXED = 5.84e-07
COST_PAIR = 1.11e-08
COST_GATHER = 2.79e-08
COST_STENCIL = 1.55e-09
COST_MESH = 4.06e-09
#: Ewald (:mod:`.ewald`): a fixed overhead per call; per real-space pair (dense blocks over minimum-image pairs x
#: lattice shifts), and per pair and (row x column x channel) entry; per (atom, k-vector) term (its phase), and
#: per term x (row + column) x channel.
COST_EWALD_CALL = 0.00196
COST_EWALD_PAIR_FIXED = 1.83e-07
COST_EWALD_PAIR = 4.82e-09
COST_EWALD_PHASE = 4.16e-08
COST_EWALD_K = 1.71e-10
#: Edges per real-space chunk; atoms per spreading/interpolation chunk (a chunk's stencil values: 4 bytes x C x
#: n^3 per atom in float32, 33 MB at C = 4, n = 10).
EDGE_BLOCK = 1 << 15
ATOM_BLOCK = 1 << 11
#: Above this many edges (or stencil points x atoms), chunks are checkpointed when gradients are tracked.
CHECKPOINT_EDGES = 1 << 18
CHECKPOINT_STENCIL = 1 << 22


class PMEParameters(NamedTuple):
    """Splitting ``alpha`` (1/Å), real-space cutoff (Å), mesh points per lattice vector, spline order."""

    alpha: float
    real_cutoff: float
    mesh: tuple
    spline_order: int


# ----------------------------------------------------------------------------- parameters


def _smooth_numbers(limit: int) -> np.ndarray:
    """Sorted integers <= limit whose prime factors are 2, 3 and 5."""
    out = set()
    a = 1
    while a <= limit:
        b = a
        while b <= limit:
            c = b
            while c <= limit:
                out.add(c)
                c *= 5
            b *= 3
        a *= 2
    return sorted(out)


_SMOOTH = _smooth_numbers(1 << 20)

#: Most mesh points a PME sum may use (2^31, 8 GiB per channel and mesh array in float32): a guard against absurd
#: settings (a 0.01 Å real cutoff asks for 2.6e12). A 10^6-atom water box at accuracy 1e-6 takes 625^3 (point
#: sources) to 864^3 (the model's 1 Å Gaussians) = 2.4e8-6.4e8; the automatic choice skips meshes above it.
MAX_MESH_POINTS = 1 << 31


def fft_size(n: int) -> int:
    """Smallest integer >= n whose prime factors are 2, 3 and 5."""
    n = max(1, int(n))
    if n > _SMOOTH[-1]:
        raise ValueError(f"PME mesh of {n} points per axis is beyond any sensible size (cell too large for "
                         "the accuracy)")
    return _SMOOTH[bisect.bisect_left(_SMOOTH, n)]


def mesh_spacing(alpha: float, accuracy: float, spline_order: int, derivatives: int, smeared: bool = False) -> float:
    """Largest mesh spacing (Å) along a lattice vector that keeps the spline error below ``accuracy / 2``.

    derivatives: highest rank of the sources or outputs (0, 1, 2); spline_order among SPLINE_ORDERS;
    smeared: Gaussian sources (:data:`MESH_ERROR_SMEARED`, whatever alpha) instead of point multipoles.
    """
    c, e = MESH_ERROR_SMEARED[spline_order] if smeared else MESH_ERROR[derivatives][spline_order]
    return min(0.75, (0.5 * accuracy / c) ** (1.0 / e)) / alpha


def mesh_for(cell: np.ndarray, spacing: float, spline_order: int) -> tuple:
    """FFT-friendly mesh sizes ``K_d >= |a_d| / spacing`` (and >= 2 x spline order)."""
    lengths = [math.sqrt(sum(x * x for x in row)) for row in np.asarray(cell).tolist()]
    return tuple(fft_size(max(2 * spline_order, math.ceil(length / spacing))) for length in lengths)


def pme_cost_terms(n_atoms: int, volume: float, real_cutoff: float, mesh: tuple, spline_order: int,
                   n_rows: int, n_cols: int, n_channels: int, real_space: bool = True) -> tuple:
    """The counts :func:`pme_cost` weighs by :data:`PME_COST_CONSTANTS` (one per constant, in that order)."""
    pairs = 0.5 * n_atoms * n_atoms / volume * 4.0 / 3.0 * math.pi * real_cutoff**3 if real_space else 0.0
    n_mesh = float(math.prod(mesh))
    stencil = n_atoms * spline_order**3 * n_channels
    return (1.0, pairs, pairs * n_rows * n_cols * n_channels, stencil, stencil * (n_rows + n_cols),
            n_mesh * max(1.0, math.log2(n_mesh)) * n_channels)


#: Names of the PME cost constants, in the order of :func:`pme_cost_terms`.
PME_COST_CONSTANTS = ("COST_PME_CALL", "COST_PAIR_FIXED", "COST_PAIR", "COST_GATHER", "COST_STENCIL", "COST_MESH")


def pme_cost(n_atoms: int, volume: float, real_cutoff: float, mesh: tuple, spline_order: int,
             n_rows: int, n_cols: int, n_channels: int, real_space: bool = True) -> float:
    """Modelled seconds of one PME evaluation with gradients (see the COST_* constants)."""
    terms = pme_cost_terms(n_atoms, volume, real_cutoff, mesh, spline_order, n_rows, n_cols, n_channels, real_space)
    return sum(globals()[name] * t for name, t in zip(PME_COST_CONSTANTS, terms))


@lru_cache(maxsize=256)
def _choose(cell_key: bytes, n_atoms: int, accuracy: float, order: int, smearing, n_rows: int, n_cols: int,
            n_channels: int, alpha, spline_order, mesh, real_cutoff, derivatives):
    cell = np.frombuffer(cell_key).reshape(3, 3)
    volume = abs(np.linalg.det(cell))
    p = tail_parameter(accuracy, order)
    beta_max = math.inf if smearing is None else smearing_beta(smearing)
    smeared = smearing is not None
    orders = [int(spline_order)] if spline_order is not None else [n for n in SPLINE_ORDERS if n >= derivatives + 4]
    if mesh is not None:
        mesh = tuple(int(k) for k in mesh)
        coarsest = float(max(np.linalg.norm(cell, axis=1) / np.array(mesh)))  # largest spacing (Å)
        orders = [n for n in orders if n <= min(mesh)] or orders  # a given mesh: the orders it takes (else refused)
    if alpha is not None:
        alphas = [min(float(alpha), beta_max)]
    elif real_cutoff is not None:
        alphas = [min(p / float(real_cutoff), beta_max)]
    elif mesh is not None:  # the sharpest splitting the given mesh resolves to accuracy
        alphas = sorted({min(beta_max, mesh_spacing(1.0, accuracy, n, derivatives, smeared) / coarsest) for n in orders})
    else:
        # Candidates on the 2^(j/16) grid of .ewald.snap_alpha: alpha (and with it the real cutoff and the
        # mesh) is then piecewise constant in the cell, so the stress is the exact strain derivative of
        # the energy (as for the Ewald path), not only to about ``accuracy``.
        spacing = (volume / n_atoms) ** (1.0 / 3.0)
        alphas = {_ewald.snap_alpha(a, beta_max) for a in np.geomspace(0.3 / spacing, 2.0 / spacing, 12)}
        if math.isfinite(beta_max):
            alphas = {a for a in alphas if a < beta_max} | {beta_max}
        alphas = sorted(alphas)
    best = None
    for a in alphas:
        cutoff = float(real_cutoff) if real_cutoff is not None else float(p / a)
        for n in orders:
            if mesh is None:
                m = mesh_for(cell, mesh_spacing(a, accuracy, n, derivatives, smeared), n)
            elif coarsest <= mesh_spacing(a, accuracy, n, derivatives, smeared) * (1.0 + 1e-9):
                m = mesh
            else:
                continue
            cost = pme_cost(n_atoms, volume, cutoff, m, n, n_rows, n_cols, n_channels, real_space=a < beta_max)
            # a mesh above MAX_MESH_POINTS only where no candidate fits (choose_parameters then names it)
            cost = (bool(np.prod(m, dtype=np.float64) > MAX_MESH_POINTS), cost)
            if best is None or cost < best[0]:
                best = (cost, PMEParameters(float(a), cutoff, m, n))
    if best is None:  # only with a given mesh
        a = alphas[0]
        need = mesh_for(cell, mesh_spacing(a, accuracy, max(orders), derivatives, smeared), max(orders))
        raise ValueError(
            f"PME mesh {list(mesh)} is too coarse for accuracy {accuracy:g} with alpha = {a:.4g} 1/Å and spline "
            f"order {'/'.join(map(str, orders))}: it needs about {list(need)} points (or a smaller alpha, a larger "
            "real_cutoff, a lower accuracy)")
    return best[1]


def ewald_cost_terms(cell: np.ndarray, n_atoms: int, accuracy: float, order: int, smearing, n_rows: int,
                     n_cols: int, n_channels: int) -> tuple:
    """The counts :func:`ewald_cost` weighs by :data:`EWALD_COST_CONSTANTS` (one per constant, in that order),
    for the parameters :func:`.ewald.choose_parameters` gives."""
    p = _ewald.choose_parameters(cell, n_atoms, accuracy, order, smearing)
    volume = abs(np.linalg.det(cell))
    beta_max = math.inf if smearing is None else smearing_beta(smearing)
    # lattice translations the dense real-space sum visits (the box of :func:`.ewald.lattice_shifts`)
    heights = volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    shifts = float(np.prod(2 * np.floor(p.real_cutoff / heights + 0.5) + 1)) if p.alpha < beta_max else 0.0
    pairs = 0.5 * n_atoms * n_atoms * shifts
    terms = n_atoms * volume * p.k_cutoff**3 / (12.0 * math.pi**2)  # atoms x half-space k-vectors
    return (1.0, pairs, pairs * n_rows * n_cols * n_channels, terms, terms * (n_rows + n_cols) * n_channels)


#: Names of the Ewald cost constants, in the order of :func:`ewald_cost_terms`.
EWALD_COST_CONSTANTS = ("COST_EWALD_CALL", "COST_EWALD_PAIR_FIXED", "COST_EWALD_PAIR", "COST_EWALD_PHASE",
                        "COST_EWALD_K")


def ewald_cost(cell: np.ndarray, n_atoms: int, accuracy: float, order: int, smearing, n_rows: int,
               n_cols: int, n_channels: int) -> float:
    """Modelled seconds of one Ewald evaluation (:mod:`.ewald`) with gradients (COST_EWALD_*)."""
    terms = ewald_cost_terms(cell, n_atoms, accuracy, order, smearing, n_rows, n_cols, n_channels)
    return sum(globals()[name] * t for name, t in zip(EWALD_COST_CONSTANTS, terms))


def reduced_basis(cell: np.ndarray) -> Optional[np.ndarray]:
    """The integer matrix ``op`` (det +1) that takes ``cell`` [3, 3] to a Minkowski-reduced basis of the same
    lattice, ``op @ cell`` (ase.geometry.minkowski_reduce), or None when ``cell`` is reduced already (up to the
    order and signs of its rows: the input basis is kept, and with it the results of before). Read-only. The PME
    sum does not depend on the basis, but its mesh does: the error model (MESH_ERROR) was measured on cubic and
    mildly triclinic cells, and on a skewed basis (lattice vectors 35-40 degrees apart) the automatic mesh left
    point multipoles' fields at up to 3x the requested accuracy."""
    return _reduced_basis(np.ascontiguousarray(cell, dtype=np.float64).tobytes())


@lru_cache(maxsize=256)
def _reduced_basis(cell_key: bytes) -> Optional[np.ndarray]:
    from ase.geometry import minkowski_reduce

    cell = np.frombuffer(cell_key).reshape(3, 3)
    _, op = minkowski_reduce(cell, pbc=True)
    op = np.asarray(op, dtype=np.int64)
    if np.linalg.det(op) < 0:
        op = -op  # the same lattice, right-handed as the input
    if (np.abs(op).sum(axis=0) == 1).all() and (np.abs(op).sum(axis=1) == 1).all():
        return None  # rows permuted or negated only: the input basis is as reduced
    op.flags.writeable = False  # cached: shared by every caller
    return op


def mesh_basis(cell: np.ndarray, mesh=None) -> tuple:
    """(op, the cell :func:`pme_sum` puts its mesh on): ``op @ cell`` on a Minkowski-reduced basis
    (:func:`reduced_basis`), or (None, ``cell``) when it is reduced already or a ``mesh`` is given (its sizes are
    along the rows of ``cell`` as given). Costs and parameters of a PME sum are those of this cell."""
    op = reduced_basis(cell) if mesh is None else None
    return op, (cell if op is None else op @ cell)


def choose_method(cell: np.ndarray, n_atoms: int, accuracy: float, rows: Layout, cols: Layout,
                  n_channels: int, smearing=None) -> str:
    """"ewald" or "pme", whichever the measured cost models say is cheaper for this periodic system.

    cell [3, 3] (Å, numpy). Both meet ``accuracy``; PME is only considered down to ``accuracy = 1e-8``
    (below, its meshes and spline orders grow without bound and Ewald is both exact and cheap enough).
    The models (:func:`ewald_cost`, :func:`pme_cost`) count real-space pairs and pair entries, k-vector terms,
    spline stencil points and mesh points (constants: COST_*, measured on one CPU thread); small systems
    go to Ewald, large ones to PME. For water-density boxes and 1 Å Gaussians at accuracy 1e-5, the long-range
    block's sources go to PME from ~440 atoms on for "multipole" (C = 4 channels of q, mu, Theta) and from
    ~6,100 atoms on for "lorem" (36 charge channels); benchmarks/auto_check.py measures the choice against both
    sums. Point q, mu, Theta at accuracy 1e-6 go to PME from ~270 atoms on; the choice is not monotone below
    (PME for ~24-74 atoms, where the two sums are within ~1.4x of each other).
    """
    if accuracy < 1e-8:
        return "ewald"
    t_ewald, t_pme = method_costs(cell, n_atoms, accuracy, rows, cols, n_channels, smearing)
    return "pme" if t_pme < t_ewald else "ewald"


def method_costs(cell: np.ndarray, n_atoms: int, accuracy: float, rows: Layout, cols: Layout, n_channels: int,
                 smearing=None) -> tuple:
    """(Ewald, PME): the modelled seconds of one call of each (:func:`ewald_cost`, :func:`pme_cost` at the
    parameters :func:`choose_parameters` picks), as :func:`choose_method` weighs them. PME is ``inf`` where it is not
    considered: below ``accuracy = 1e-8``, and where its overhead alone exceeds Ewald's whole cost."""
    return _method_costs(np.ascontiguousarray(cell, dtype=np.float64).tobytes(), int(n_atoms), float(accuracy),
                         rows.ranks, cols.ranks, int(n_channels), smearing)


@lru_cache(maxsize=1024)
def _method_costs(cell_key: bytes, n_atoms: int, accuracy: float, row_ranks: tuple, col_ranks: tuple,
                  n_channels: int, smearing) -> tuple:
    cell = np.frombuffer(cell_key).reshape(3, 3)
    rows, cols = Layout(row_ranks), Layout(col_ranks)
    order = max(rows.rank_of) + max(cols.rank_of)
    derivatives = max(max(rows.ranks), max(cols.ranks))
    n_rows, n_cols = len(rows), len(cols)
    t_ewald = ewald_cost(cell, n_atoms, accuracy, order, smearing, n_rows, n_cols, n_channels)
    if accuracy < 1e-8:
        return t_ewald, math.inf
    # no PME call is cheaper than its overhead plus the lowest-order stencils: skip the parameter search
    n_min = min(n for n in SPLINE_ORDERS if n >= derivatives + 4)
    floor = pme_cost(n_atoms, 1.0, 0.0, (1, 1, 1), n_min, n_rows, n_cols, n_channels, real_space=False)
    if floor >= t_ewald:
        return t_ewald, math.inf
    params = choose_parameters(mesh_basis(cell)[1], n_atoms, accuracy, order, smearing, n_rows=n_rows,
                               n_cols=n_cols, n_channels=n_channels, derivatives=derivatives)
    beta_max = math.inf if smearing is None else smearing_beta(smearing)
    t_pme = pme_cost(n_atoms, abs(np.linalg.det(cell)), params.real_cutoff, params.mesh, params.spline_order,
                     n_rows, n_cols, n_channels, real_space=params.alpha < beta_max)
    return t_ewald, t_pme


def choose_parameters(cell: np.ndarray, n_atoms: int, accuracy: float, order: int, smearing=None, *,
                      n_rows: int = 10, n_cols: int = 10, n_channels: int = 1, alpha=None, mesh=None,
                      spline_order=None, real_cutoff=None, derivatives: int = 2) -> PMEParameters:
    """Splitting, cutoff, mesh and spline order for a requested relative ``accuracy`` (module docstring).

    cell [3, 3] (Å, numpy); order: output rank + source rank (at most 4); derivatives: highest rank of
    the sources or outputs (the spline derivative used). The automatic spline order is at least
    ``derivatives + 4`` (and even), so that forces and their derivatives (training) are continuous.
    Given values are kept and checked: ValueError if a given mesh is smaller than the spline order or too
    coarse for ``accuracy`` at the given (or chosen) alpha. With a mesh but no alpha (or real_cutoff),
    alpha is the largest the mesh resolves to ``accuracy``.
    """
    if spline_order is not None and spline_order not in SPLINE_ORDERS:
        raise ValueError(f"spline_order must be one of {SPLINE_ORDERS} (even orders with a measured error "
                         f"model), got {spline_order}")
    if mesh is not None:
        sizes = np.asarray(mesh).reshape(-1)
        if sizes.size not in (1, 3) or not all(isinstance(k, (int, np.integer)) or float(k).is_integer()
                                               for k in sizes.tolist()):
            raise ValueError(f"PME mesh must be one size or three (whole points along each lattice vector), "
                             f"got {mesh!r}")
        mesh = tuple(int(k) for k in np.broadcast_to(sizes, (3,)))
        n = int(spline_order) if spline_order is not None else derivatives + 4
        if min(mesh) < n:
            raise ValueError(f"PME mesh {list(mesh)} is smaller than the spline order {n} along some axis: "
                             "use at least spline_order points per lattice vector")
    if alpha is not None and not (math.isfinite(float(alpha)) and float(alpha) > 0):
        raise ValueError(f"alpha must be a positive number (1/Å), got {alpha}")
    if real_cutoff is not None and not (math.isfinite(float(real_cutoff)) and float(real_cutoff) > 0):
        raise ValueError(f"real_cutoff must be a positive length in Å, got {real_cutoff}")
    params = _choose(np.ascontiguousarray(cell, dtype=np.float64).tobytes(), int(n_atoms), float(accuracy),
                     int(order), smearing, n_rows, n_cols, n_channels, alpha, spline_order, mesh, real_cutoff,
                     int(derivatives))
    if mesh is not None and min(mesh) < params.spline_order:
        raise ValueError(f"PME mesh {list(mesh)} is smaller than the spline order {params.spline_order}")
    points = int(np.prod(params.mesh))
    if points > MAX_MESH_POINTS:  # the mesh arrays alone would take gigabytes per channel: an error, not a crash
        raise ValueError(
            f"PME mesh {list(params.mesh)} ({points:.3g} points, limit {MAX_MESH_POINTS:.3g}) for alpha = "
            f"{params.alpha:.4g} 1/Å, real_cutoff {params.real_cutoff:.4g} Å and accuracy {accuracy:g}: "
            "ask for a lower accuracy, a larger real_cutoff (smaller alpha) or a coarser mesh")
    return params


# ----------------------------------------------------------------------------- B-splines


def bspline(w: torch.Tensor, order: int, derivatives: int) -> list:
    """Cardinal B-spline ``M_n`` and derivatives at ``w + t``, t = 0 .. n-1.

    w [...] in [0, 1) -> list of ``derivatives + 1`` tensors [..., n]: ``d^k M_n / dx^k (w + t)``.
    Recursion ``M_n(x) = [x M_{n-1}(x) + (n - x) M_{n-1}(x - 1)] / (n - 1)``,
    ``M_n' (x) = M_{n-1}(x) - M_{n-1}(x - 1)``.
    """
    x = w[..., None]
    levels = {1: torch.ones_like(x)}  # M_1(w + 0) = 1 on [0, 1)
    for n in range(2, order + 1):
        prev = levels[n - 1]  # [..., n-1]: M_{n-1}(w + t), t = 0 .. n-2
        zero = torch.zeros_like(x)
        here = torch.cat([prev, zero], -1)  # M_{n-1}(w + t), t = 0 .. n-1
        below = torch.cat([zero, prev], -1)  # M_{n-1}(w + t - 1)
        t = torch.arange(n, dtype=w.dtype, device=w.device)
        xt = x + t
        levels[n] = (xt * here + (n - xt) * below) / (n - 1)
    out = [levels[order]]
    for k in range(1, derivatives + 1):
        diff = levels[order - k]  # [..., n-k]
        for _ in range(k):  # finite difference of order k: f(t) - f(t-1), widened by one each time
            z = torch.zeros_like(diff[..., :1])
            diff = torch.cat([diff, z], -1) - torch.cat([z, diff], -1)
        out.append(diff)
    return out


def bspline_moduli(size: int, order: int) -> np.ndarray:
    """``|b(k~)|^2 = 1 / |sum_t M_n(t) exp(2 pi i k~ t / K)|^2`` for k~ = 0 .. K-1 (float64 [K])."""
    values = bspline(torch.zeros((), dtype=torch.float64), order, 0)[0].numpy()  # M_n(t), t = 0 .. n-1
    t = np.arange(order)
    k = np.arange(size)
    denom = np.abs(np.exp(2j * np.pi * np.outer(k, t) / size) @ values) ** 2
    return 1.0 / denom


#: u-space derivative multi-indices of Theta used (index = per-axis derivative counts), order <= 2.
_U_INDICES = ((0, 0, 0),
              (1, 0, 0), (0, 1, 0), (0, 0, 1),
              (2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1))
_U_SLOT = {idx: s for s, idx in enumerate(_U_INDICES)}


def _u_index(axes: tuple) -> int:
    """Slot of the u-derivative along the (unordered) lattice axes ``axes``."""
    return _U_SLOT[tuple(axes.count(d) for d in range(3))]


def cartesian_to_u(layout: Layout, A: torch.Tensor) -> torch.Tensor:
    """Matrix [n_layout, 10]: ``(d/dr)^idx = sum_u M[idx, u] (d/du)^u`` for every component of ``layout``.

    A [3, 3] = du_d / dr_alpha (``A[alpha, d] = K_d (cell^-1)[alpha, d]``), differentiable in the cell.
    """
    rows = []
    zero = A.new_zeros(len(_U_INDICES))
    for idx in layout.indices:
        row = zero
        if len(idx) == 0:
            row = row.index_add(0, torch.tensor([0], device=A.device), A.new_ones(1))
        elif len(idx) == 1:
            row = row.index_add(0, torch.tensor([_u_index((d,)) for d in range(3)], device=A.device),
                                A[idx[0]])
        else:
            a, b = idx
            slots = torch.tensor([_u_index((d, e)) for d in range(3) for e in range(3)], device=A.device)
            row = row.index_add(0, slots, (A[a][:, None] * A[b][None, :]).reshape(9))
        rows.append(row)
    return torch.stack(rows)


# ----------------------------------------------------------------------------- reciprocal part


def _axis_weights(u: torch.Tensor, order: int, max_d: int) -> tuple:
    """Per-axis spline weights of Theta at the atoms (Theta is a product of one B-spline per axis).

    u [N, 3] fractional mesh coordinates in [0, K); max_d: highest derivative order wanted.
    Returns (base [N, 3] long, W) with ``W[k][d]`` [N, n] = ``d^k M_n / du_d^k`` at stencil position t,
    grid points ``m_d = base_d - t_d`` (mod K_d).
    """
    base = torch.floor(u.detach())
    w = u - base  # [N, 3] in [0, 1), differentiable
    per_axis = bspline(w, order, max_d)  # list over derivative counts of [N, 3, n]
    return base.long(), [[p[:, d] for d in range(3)] for p in per_axis]


def _groups(slots: tuple) -> tuple:
    """Factorisation of a set of u-derivative slots axis by axis (separable spreading / interpolation).

    Returns (pairs, xs): ``pairs`` the (dx, dy) prefixes that occur, each with its (dz, slot) list; ``xs``
    the dx values that occur, each with its (dy, pair index) list.
    """
    pairs = {}
    for s in slots:
        dx, dy, dz = _U_INDICES[s]
        pairs.setdefault((dx, dy), []).append((dz, s))
    keys = sorted(pairs)
    xs = {}
    for p, (dx, dy) in enumerate(keys):
        xs.setdefault(dx, []).append((dy, p))
    return [(k, pairs[k]) for k in keys], sorted(xs.items())


def _spread_weights(W: list, c_u: torch.Tensor, slots: tuple) -> torch.Tensor:
    """Mesh weights ``sum_u c_u (d/du)^u Theta`` of a chunk of atoms, axis by axis.

    W: per-axis weights (:func:`_axis_weights`), c_u [n, len(slots), C] -> [C, n, s (x), s (y), s (z)], the
    layout of the [C, mesh] scatter (no permuted copy of the chunk's C x n x s^3 weights).
    z and y first (small), then one batched product over the x-derivative orders: the cost per atom is
    ~ (number of x-derivative orders) x s^3 x C instead of len(slots) x s^3 x (C + 2) for full stencils.
    """
    pairs, xs = _groups(slots)
    col = {s: i for i, s in enumerate(slots)}
    c_t = c_u.permute(2, 1, 0)  # [C, slots, n]
    # z: P[(dx, dy)] [C, n, z] = sum_dz c_u[n, (dx, dy, dz), C] W_z^(dz)[n, z]
    P = [sum(c_t[:, col[s], :, None] * W[dz][2] for dz, s in group) for _, group in pairs]
    # y: R[dx] [C, n, y, z] = sum_dy W_y^(dy)[n, y] P[(dx, dy)][C, n, z]
    R = torch.stack([sum(W[dy][1][:, :, None] * P[p][:, :, None, :] for dy, p in ys) for _, ys in xs], 2)
    Wx = torch.stack([W[dx][0] for dx, _ in xs], -1)  # [n, x, dx]
    c, n, s = R.shape[0], Wx.shape[0], Wx.shape[1]
    return torch.matmul(Wx, R.reshape(c, n, len(xs), s * s)).reshape(c, n, s, s, s)  # x: [C, n, x, y, z]


def _interpolate_values(W: list, values: torch.Tensor, slots: tuple) -> torch.Tensor:
    """``sum_m (d/du)^u Theta(u - m) phi(m)`` for every slot: W per-axis weights, values [C, n, s (x), s, s]
    (phi at the stencil points, the layout of the [C, mesh] gather) -> [n, len(slots), C]; contracted axis by
    axis (x, then y, then z)."""
    pairs, xs = _groups(slots)
    c, n, s = values.shape[0], values.shape[1], values.shape[2]
    Wx = torch.stack([W[dx][0] for dx, _ in xs], 1)  # [n, dx, x]
    A = torch.matmul(Wx, values.reshape(c, n, s, s * s)).reshape(c, n, len(xs), s, s)  # [C, n, dx, y, z]
    row = {dx: k for k, (dx, _) in enumerate(xs)}
    out = {}
    for (dx, dy), group in pairs:
        B = (W[dy][1][:, :, None] * A[:, :, row[dx]]).sum(2)  # [C, n, z]
        for dz, slot in group:
            out[slot] = (W[dz][2] * B).sum(-1)  # [C, n]
    return torch.stack([out[s] for s in slots], -1).permute(1, 2, 0)


def _flat_indices(base: torch.Tensor, mesh: tuple, order: int) -> torch.Tensor:
    """Flat mesh index of every stencil point: base [N, 3] -> [N, n^3]."""
    t = torch.arange(order, device=base.device)
    m = [torch.remainder(base[:, d, None] - t, mesh[d]) for d in range(3)]  # 3 x [N, n]
    flat = (m[0][:, :, None, None] * mesh[1] + m[1][:, None, :, None]) * mesh[2] + m[2][:, None, None, :]
    return flat.reshape(base.shape[0], -1)


class _MeshAdd(torch.autograd.Function):
    """``Q.index_add_(1, index, src)`` in place (as a ``scatter_add_``), saving only ``index`` for the backward.

    torch's own ``index_add_`` keeps ``src`` alive until the backward (its formula expands the gradient to
    ``src``'s shape): for a mesh spread that is C x n^3 values per atom, 16 kB per atom at order 10 and
    four channels. Q [C, M] (a mesh, modified and returned), index [S] (int32 or int64), src [C, S].
    Differentiable to any order: the backward is :class:`_MeshGather`, whose backward is this.
    """

    @staticmethod
    def forward(ctx, Q, index, src):
        ctx.mark_dirty(Q)
        ctx.save_for_backward(index)
        # scatter_add_ with the index broadcast over the channels: torch's CPU index_add_ along dim 1 adds
        # one strided C-column per index: 445 against 88 ms for 2048 atoms x 10^3 stencil points x 4 channels
        return Q.scatter_add_(1, index.long().expand(Q.shape[0], -1), src)

    @staticmethod
    def backward(ctx, grad_q):
        (index,) = ctx.saved_tensors
        return grad_q, None, _MeshGather.apply(grad_q, index)


class _MeshGather(torch.autograd.Function):
    """``mesh.index_select(1, index)`` [C, S] from mesh [C, M], saving only ``index`` (the adjoint of
    :class:`_MeshAdd`)."""

    @staticmethod
    def forward(ctx, mesh, index):
        ctx.save_for_backward(index)
        ctx.size = mesh.shape[1]
        return mesh.index_select(1, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _MeshAdd.apply(grad.new_zeros(grad.shape[0], ctx.size), index, grad), None


class _MeshGatherChain(torch.autograd.Function):
    """``(mesh.index_select(1, index), mesh)``: one chunk's gather, passing the mesh on to the next chunk's.

    Gathering every interpolation chunk from the same mesh with :class:`_MeshGather` gives each chunk a
    gradient the size of the whole mesh (zeroed, filled, then summed by autograd): ~3 passes over the mesh per
    chunk, which at 10^5 atoms (a 525-MB mesh, 48 chunks of ATOM_BLOCK atoms) cost more than the
    interpolation itself. Chained, the chunks' backward calls run last chunk first and each adds its values'
    gradient in place into the one mesh gradient that comes back from the later chunks: one mesh-sized
    gradient for all of them. Differentiable to any order (the backward is :class:`_MeshAdd`).
    """

    @staticmethod
    def forward(ctx, mesh, index):
        ctx.save_for_backward(index)
        ctx.size = mesh.shape[1]
        ctx.set_materialize_grads(False)
        return mesh.index_select(1, index), mesh.view_as(mesh)

    @staticmethod
    def backward(ctx, grad_values, grad_mesh):
        if grad_values is None:
            return grad_mesh, None
        (index,) = ctx.saved_tensors
        if grad_mesh is None:
            grad_mesh = grad_values.new_zeros(grad_values.shape[0], ctx.size)
        return _MeshAdd.apply(grad_mesh, index, grad_values), None


def _convolve(Q: torch.Tensor, G: torch.Tensor, mesh: tuple) -> torch.Tensor:
    """phi = IFFT(FFT(Q) G) channel by channel: Q [C, K1, K2, K3], G [K1, K2, K3//2+1] -> [C, K1, K2, K3].

    One channel at a time keeps a single complex mesh alive instead of C of them. Differentiable to any
    order through :class:`_MeshConvolution`.
    """
    return _MeshConvolution.apply(Q, G, mesh)


#: Bytes of mesh per slab (or column block) of the CPU transforms of :func:`_convolve_channels`.
FFT_BLOCK_BYTES = 1 << 20


def _spectrum(mesh_values: torch.Tensor) -> torch.Tensor:
    """An uninitialised complex half-spectrum [K1, K2, K3//2+1] of the precision of ``mesh_values``."""
    K1, K2, K3 = mesh_values.shape[-3:]
    pairs = mesh_values.new_empty(K1, K2, K3 // 2 + 1, 2)
    return torch.view_as_complex(pairs)


def _blocks(mesh_values: torch.Tensor, axis: int) -> range:
    """Starts of the blocks along ``axis`` (0: x slabs, 1: y column blocks): about FFT_BLOCK_BYTES each on
    CPU, one block (the whole mesh: fewer kernel launches) on other devices."""
    K1, K2, K3 = mesh_values.shape[-3:]
    size = mesh_values.shape[-3 + axis]
    if mesh_values.device.type != "cpu":
        return range(0, size, size)
    per_index = mesh_values.element_size() * (K2 * K3 if axis == 0 else K1 * K3)
    return range(0, size, max(1, FFT_BLOCK_BYTES // per_index))


def _rfft3(q: torch.Tensor, spec: torch.Tensor, G: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rfftn of one channel's mesh q [K1, K2, K3] into ``spec`` (2-D transforms of x slabs, then 1-D along x
    by y blocks); with G, each y block is also multiplied by G and transformed back along x (the x half of
    the inverse, :func:`_convolve_channels`)."""
    slabs, columns = _blocks(q, 0), _blocks(q, 1)
    for x0 in slabs:
        torch.fft.rfft2(q[x0:x0 + slabs.step], out=spec[x0:x0 + slabs.step])
    for y0 in columns:
        column = spec[:, y0:y0 + columns.step]
        t = torch.fft.fft(column, dim=0)
        if G is not None:
            torch.view_as_real(t).mul_(G[:, y0:y0 + columns.step, :, None])
            t = torch.fft.ifft(t, dim=0)
        column.copy_(t)
    return spec


def _convolve_channels(Q: torch.Tensor, G: torch.Tensor, mesh: tuple) -> torch.Tensor:
    """IFFT(FFT(q) G) for every channel q of Q [C, K1, K2, K3] (no autograd), into one output mesh.

    Page faults of fresh memory cost more than the transforms here (5 us per 4-kB page on the 2-core VM,
    1.2 ms per MB): per channel ``irfftn(rfftn(q) * G)`` allocates the spectrum, a complex copy of G, their
    product and the transforms' own buffers, 3 GB per convolution at a 320^3 mesh with four channels, all
    above glibc's 32-MiB mmap limit and so faulted afresh at every call. Here one half-spectrum is shared by
    the channels, G multiplies it in place (as real pairs), and on CPU the 3-D transform runs as 2-D
    transforms of ~1-MB x slabs and 1-D transforms of ~1-MB y blocks along x (G applied in between): small
    buffers the allocator reuses, and blocks that stay in cache (1.43 against 2.37 s and 0.63 against 3.0 GB
    of page faults at 320^3, 4 channels, one thread; the same to rounding). On GPUs the same steps on the
    whole mesh (fewer kernel launches).
    """
    out = torch.empty_like(Q)
    spec = _spectrum(Q)
    slabs = _blocks(Q, 0)
    for q, o in zip(Q.unbind(0), out.unbind(0)):
        _rfft3(q, spec, G)  # x already transformed back
        for x0 in slabs:
            torch.fft.irfft2(spec[x0:x0 + slabs.step], s=mesh[1:], out=o[x0:x0 + slabs.step])
    return out


class _MeshConvolution(torch.autograd.Function):
    """:func:`_convolve` with its adjoint written out. G is real and even (G(k) = G(-k): it depends on k
    through k^2 and |b(k)|^2), so the convolution is self-adjoint and the gradient of the mesh is the same
    convolution of the incoming gradient: one real-to-complex and one complex-to-real FFT per channel.
    Autograd's own backward of ``rfftn`` runs a full complex-to-complex FFT of the padded spectrum
    instead, which at 98,304 atoms (320^3 mesh) cost 2.9 of the long range's 25 s and grew as N^1.7.
    The gradient of G (cell, stress) by Parseval: ``(w / M) Re[FFT(Q) conj(FFT(g))]`` summed over the
    channels, w = 2 for the k3 columns that stand for k and -k, 1 for k3 = 0 and K3 / 2.
    """

    @staticmethod
    def forward(ctx, Q, G, mesh):
        ctx.mesh = mesh
        ctx.save_for_backward(Q if ctx.needs_input_grad[1] else None, G)
        return _convolve_channels(Q, G, mesh)

    @staticmethod
    def backward(ctx, grad):
        Q, G = ctx.saved_tensors
        grad_q = _MeshConvolution.apply(grad, G, ctx.mesh) if ctx.needs_input_grad[0] else None
        grad_g = None
        if ctx.needs_input_grad[1]:
            k3 = ctx.mesh[2]
            w = torch.full((k3 // 2 + 1,), 2.0, dtype=G.dtype, device=G.device)
            w[0] = 1.0
            if k3 % 2 == 0:
                w[-1] = 1.0
            if torch.is_grad_enabled():  # create_graph: differentiable (second derivatives of the stress)
                grad_g = sum((torch.fft.rfftn(q) * torch.fft.rfftn(g).conj()).real
                             for q, g in zip(Q.unbind(0), grad.unbind(0)))
            else:  # Re[a conj(b)] = a_re b_re + a_im b_im, accumulated in place
                grad_g = torch.zeros_like(G)
                spec_q, spec_g = _spectrum(Q), _spectrum(Q)
                for q, g in zip(Q.unbind(0), grad.unbind(0)):
                    a, b = torch.view_as_real(_rfft3(q, spec_q)), torch.view_as_real(_rfft3(g, spec_g))
                    grad_g.addcmul_(a[..., 0], b[..., 0]).addcmul_(a[..., 1], b[..., 1])
            grad_g = grad_g * (w / float(np.prod(ctx.mesh)))
        return grad_q, grad_g, None


def influence_function(cell: torch.Tensor, mesh: tuple, order: int, alpha: float) -> torch.Tensor:
    """``(K_1 K_2 K_3 / V) 4 pi exp(-k^2/4 alpha^2)/k^2 |b(k)|^2`` on the rfftn grid [K1, K2, K3//2+1], 0 at k=0.

    Differentiable in the cell (stress, training) when the cell requires a gradient; otherwise (the
    energy-and-forces call) it is built in place in one mesh-sized buffer: the expression below makes
    ~15 of them (1 GB of fresh memory at a 320^3 mesh, 0.6 s on the 2-core VM, mostly page faults).
    """
    dtype, device = cell.dtype, cell.device
    recip = 2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1)  # rows b_d (1/Å)
    freqs = [torch.fft.fftfreq(mesh[0], 1.0 / mesh[0]), torch.fft.fftfreq(mesh[1], 1.0 / mesh[1]),
             torch.fft.rfftfreq(mesh[2], 1.0 / mesh[2])]
    m = [f.to(dtype=dtype, device=device).reshape([-1 if d == a else 1 for d in range(3)])
         for a, f in enumerate(freqs)]  # m_a along axis a
    # k^2 = sum_ab m_a m_b (b_a . b_b), by broadcasting: no [K1, K2, K3/2, 3] grid of k-vectors
    metric = recip @ recip.transpose(0, 1)
    moduli = [torch.as_tensor(bspline_moduli(size, order), dtype=dtype, device=device) for size in mesh]
    scale = float(np.prod(mesh)) / cell_volume(cell)
    # pairwise products are planes, only their sum is a full mesh (accumulated in place)
    k2 = (2.0 * metric[0, 1]) * (m[0] * m[1]) + (2.0 * metric[0, 2]) * (m[0] * m[2])
    k2.add_((2.0 * metric[1, 2]) * (m[1] * m[2])).add_(metric[0, 0] * m[0] * m[0])
    k2.add_(metric[1, 1] * m[1] * m[1]).add_(metric[2, 2] * m[2] * m[2])
    if not (cell.requires_grad and torch.is_grad_enabled()):  # exp, / k^2 and the factors in place
        k2.view(-1)[0] = 1.0  # k = 0 (the only k with k^2 = 0), zeroed below
        G = torch.exp(k2 * (-0.25 / (alpha * alpha)))
        G.div_(k2).mul_(moduli[0][:, None, None] * (4.0 * math.pi * scale)).mul_(moduli[1][None, :, None])
        G.mul_(moduli[2][None, None, : mesh[2] // 2 + 1])
        G.view(-1)[0] = 0.0
        return G
    safe = torch.where(k2 > 0, k2, torch.ones_like(k2))
    kernel = torch.where(k2 > 0, 4.0 * math.pi * torch.exp(-safe / (4.0 * alpha * alpha)) / safe,
                         torch.zeros_like(k2))
    b2 = moduli[0][:, None, None] * moduli[1][None, :, None] * moduli[2][None, None, : mesh[2] // 2 + 1]
    return kernel * b2 * scale


def reciprocal_sum(positions: torch.Tensor, v: torch.Tensor, cell: torch.Tensor, params: PMEParameters,
                   rows: Layout, cols: Layout) -> torch.Tensor:
    """Reciprocal part by PME: positions [N, 3] (Å), v [N, n_cols, C] packed sources, cell [3, 3].

    Returns ``d^a phi_rec`` at every atom, [N, n_rows, C] (no output signs, as :func:`.ewald.reciprocal_sum`).
    """
    n_atoms, _, n_channels = v.shape
    mesh, order = params.mesh, params.spline_order
    inv_cell = torch.linalg.inv(cell)
    frac = positions @ inv_cell  # [N, 3]
    frac = frac - torch.floor(frac.detach())  # wrapped into [0, 1): the integer shift carries no gradient
    K = torch.tensor(mesh, dtype=positions.dtype, device=positions.device)
    u = frac * K
    A = inv_cell * K  # [3 (alpha), 3 (d)]: du_d / dr_alpha
    # sources: Q(m) = sum_b v_b (-d/dr)^b Theta = sum_u c_u (d/du)^u Theta
    col_sign = torch.tensor([(-1.0) ** len(idx) for idx in cols.indices], dtype=v.dtype, device=v.device)
    to_u_cols = cartesian_to_u(cols, A) * col_sign[:, None]  # [b, 10]
    to_u_rows = cartesian_to_u(rows, A)  # [a, 10]
    # derivative slots by their order only (a zero entry of A for a cubic cell still has a cell gradient)
    src_slots = [s for s, idx in enumerate(_U_INDICES) if sum(idx) <= max(cols.rank_of)]
    out_slots = [s for s, idx in enumerate(_U_INDICES) if sum(idx) <= max(rows.rank_of)]
    c_u = torch.einsum("bu,nbc->nuc", to_u_cols[:, src_slots], v)  # [N, u, C]
    n_mesh = int(np.prod(mesh))
    # atoms in mesh order (x, then y, then z of their base point): a chunk's stencils then cover a few
    # neighbouring planes of the mesh, which stay in cache for the scatter and the gather (a shuffled
    # 31,944-atom water box was 1.27x slower than the same box in grid order)
    base = torch.floor(u.detach()).long()
    perm = torch.argsort(_flat_indices(base, mesh, 1)[:, 0])
    u, c_u, base = u.index_select(0, perm), c_u.index_select(0, perm), base.index_select(0, perm)
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (positions, v, cell))
    use_checkpoint = track and n_atoms * order**3 * len(_U_INDICES) > CHECKPOINT_STENCIL

    src_max = max(sum(_U_INDICES[s]) for s in src_slots)
    out_max = max(sum(_U_INDICES[s]) for s in out_slots)

    def spread(u_chunk, c_chunk):
        """Mesh weights of a chunk of atoms: [C, n, s, s, s] (separable, :func:`_spread_weights`)."""
        _, W = _axis_weights(u_chunk, order, src_max)
        return _spread_weights(W, c_chunk, tuple(src_slots))

    def mesh_index(base):
        """Flat index into one channel's mesh of every (atom, x, y, z) stencil point: [n s^3] (int32 where
        the mesh allows: 4 bytes per entry; the index is shared by the channels)."""
        return _flat_indices(base, mesh, order).reshape(-1).to(index_dtype)

    # one mesh per channel [C, points], accumulated in place; the backward keeps only the indices (_MeshAdd)
    index_dtype = torch.int32 if n_mesh < 2**31 else torch.long
    Q = u.new_zeros(n_channels, n_mesh)
    for a0 in range(0, n_atoms, ATOM_BLOCK):
        args = (u[a0:a0 + ATOM_BLOCK], c_u[a0:a0 + ATOM_BLOCK])
        weights = checkpoint(spread, *args, use_reentrant=False) if use_checkpoint else spread(*args)
        flat = mesh_index(base[a0:a0 + ATOM_BLOCK])
        Q = _MeshAdd.apply(Q, flat, weights.flatten(1))  # [C, n x y z]
    G = influence_function(cell, mesh, order, params.alpha)
    phi = _convolve(Q.reshape(n_channels, *mesh), G, mesh).reshape(n_channels, n_mesh)  # [C, K1 K2 K3]

    def interpolate(u_chunk, phi):
        """[n, u, C] at a chunk of atoms, and phi for the next chunk (:class:`_MeshGatherChain`)."""
        base, W = _axis_weights(u_chunk, order, out_max)
        n = base.shape[0]
        values, phi = _MeshGatherChain.apply(phi, mesh_index(base))
        return _interpolate_values(W, values.reshape(n_channels, n, order, order, order), tuple(out_slots)), phi

    parts = []
    for a0 in range(0, n_atoms, ATOM_BLOCK):
        args = (u[a0:a0 + ATOM_BLOCK], phi)
        part, phi = (checkpoint(interpolate, *args, use_reentrant=False) if use_checkpoint
                     else interpolate(*args))
        parts.append(part)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n_atoms, device=perm.device)
    d_u = torch.cat(parts).index_select(0, inverse)  # [N, u, C], in the callers' atom order
    return torch.einsum("au,nuc->nac", to_u_rows[:, out_slots], d_u)


# ----------------------------------------------------------------------------- real-space part


def half_neighbour_list(positions: torch.Tensor, cell: torch.Tensor, cutoff: float):
    """Every pair (and periodic image) within ``cutoff`` once: i [E], j [E], shifts [E, 3] (long, device).

    ``r_j - r_i + shifts @ cell`` is the pair vector (vesin's convention); an atom pairs with its own
    images (i = j, non-zero shift), one of each +-shift.
    """
    from ..graph import vesin_module

    vesin = vesin_module()
    pos = positions.detach().cpu().double().numpy()
    box = cell.detach().cpu().double().numpy()
    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=False)
    i, j, s = nl.compute(points=pos, box=box, periodic=True, quantities="ijS")
    device = positions.device
    return (torch.as_tensor(i.astype(np.int64), device=device), torch.as_tensor(j.astype(np.int64), device=device),
            torch.as_tensor(s.astype(np.int64), device=device))


def real_space_sum(positions: torch.Tensor, v: torch.Tensor, cell: torch.Tensor, kernel: RadialKernel,
                   tensors: InteractionTensors, cutoff: float) -> torch.Tensor:
    """``sum_j T^(l_a+k_b)(R_ij) v_jb`` over pairs and images with ``R < cutoff`` (no self pair).

    positions [N, 3] (Å), v [N, n_cols, C], cell [3, 3] -> [N, n_rows, C] (no output signs). Each pair is
    evaluated once: ``T(-R)[a, b] = (-1)^(l_a + k_b) T(R)[a, b]`` gives the other direction.
    """
    n_atoms, _, n_channels = v.shape
    n_rows = len(tensors.rows)
    out = positions.new_zeros(n_atoms, n_rows, n_channels)
    if kernel.is_zero:
        return out
    i, j, shifts = half_neighbour_list(positions, cell, cutoff)
    if i.numel() == 0:
        return out
    coef = torch.tensor(tensors.coef, dtype=v.dtype, device=v.device)  # [f, a, b]
    parity = torch.tensor([[(-1.0) ** (len(ia) + len(ib)) for ib in tensors.cols.indices]
                           for ia in tensors.rows.indices], dtype=v.dtype, device=v.device)  # [a, b]
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (positions, v, cell))
    use_checkpoint = track and i.numel() > CHECKPOINT_EDGES

    def chunk(i_c, j_c, s_c, positions, v, cell):
        R = positions[i_c] - positions[j_c] - s_c.to(positions.dtype) @ cell  # target i, source j  [E, 3]
        r2 = (R * R).sum(-1)
        valid = r2 < cutoff * cutoff
        if kernel.singular:
            bad = valid & (r2.detach() < 1e-16)
            if bool(bad.any()):
                e = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"atoms {int(i_c[e])} and {int(j_c[e])} overlap (distance {float(r2[e].detach()) ** 0.5:.3g} Å): "
                    "point multipoles at the same position have an infinite interaction; use smearing or "
                    "separate the atoms")
        B = kernel.derivatives(r2, valid, tensors.max_order)
        feats = torch.stack(tensors.features_of(B, [R[:, 0], R[:, 1], R[:, 2]]), 1)  # [E, f]
        T = torch.einsum("ef,fab->eab", feats, coef)  # [E, a, b]
        to_i = torch.einsum("eab,ebc->eac", T, v[j_c])
        to_j = torch.einsum("eab,ebc->eac", T * parity, v[i_c])
        return v.new_zeros(n_atoms, n_rows, n_channels).index_add(0, i_c, to_i).index_add(0, j_c, to_j)

    for e0 in range(0, i.numel(), EDGE_BLOCK):
        args = (i[e0:e0 + EDGE_BLOCK], j[e0:e0 + EDGE_BLOCK], shifts[e0:e0 + EDGE_BLOCK], positions, v, cell)
        out = out + (checkpoint(chunk, *args, use_reentrant=False) if use_checkpoint else chunk(*args))
    return out


# ----------------------------------------------------------------------------- the whole sum


def pme_sum(positions: torch.Tensor, v: torch.Tensor, cell: torch.Tensor, rows: Layout, cols: Layout, *,
            smearing: float | None, accuracy: float, total_charge: torch.Tensor | None = None,
            alpha=None, mesh=None, spline_order=None, real_cutoff=None) -> torch.Tensor:
    """Periodic multipole sum by PME: real + reciprocal (mesh) - self + background.

    Same inputs and output as :func:`.ewald.ewald_sum`: positions [N, 3] (Å); v [N, n_cols, C] packed
    sources; cell [3, 3] (rows are lattice vectors); total_charge [C] (e) or None.
    Returns [N, n_rows, C] without the output signs ``c_l``. ``alpha``, ``mesh`` (three sizes or one),
    ``spline_order`` and ``real_cutoff`` override the automatic choice. The sum runs on a Minkowski-reduced basis
    of the lattice (:func:`mesh_basis`; the same fields, differentiable in ``cell``), except with a given
    ``mesh``, whose sizes are along the rows of ``cell`` as given.
    """
    tensors = InteractionTensors(rows, cols)
    op, cell_np = mesh_basis(cell.detach().cpu().double().numpy(), mesh)
    if op is not None:
        cell = torch.tensor(op, dtype=cell.dtype, device=cell.device) @ cell
    # the mesh coordinates and pair vectors below see wrapped positions: float32 keeps its resolution far from the
    # origin (unwrapped MD), as in .ewald.ewald_sum
    positions = _ewald.wrap_positions(positions, cell)
    params = choose_parameters(cell_np, positions.shape[0], accuracy, tensors.max_order, smearing,
                               n_rows=len(rows), n_cols=len(cols), n_channels=v.shape[2], alpha=alpha,
                               mesh=mesh, spline_order=spline_order, real_cutoff=real_cutoff,
                               derivatives=max(max(rows.ranks), max(cols.ranks)))
    kernel = RadialKernel.ewald_real(params.alpha, smearing)
    if not kernel.is_zero:  # the same bound as Ewald's image search: thin or strongly skewed cells refused
        _ewald.check_image_count(cell_np, params.real_cutoff)
    out = real_space_sum(positions, v, cell, kernel, tensors, params.real_cutoff)
    out = out + reciprocal_sum(positions, v, cell, params, rows, cols)
    out = out - torch.einsum("ab,nbc->nac", self_matrix(tensors, params.alpha, v.dtype, v.device), v)
    if total_charge is not None and 0 in rows.ranks:
        volume = cell_volume(cell)
        phi = background_potential(total_charge, volume, params.alpha, smearing)  # [C]
        bg = torch.zeros_like(out[0])
        bg = bg.index_put((torch.tensor(rows.offset(0), device=bg.device),), phi)
        out = out + bg[None]
    return out
