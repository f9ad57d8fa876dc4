"""Slabs, ``pbc = [True, True, False]``: multipoles periodic along a and b, open (vacuum) along c.

Method (Yeh & Berkowitz, J. Chem. Phys. 111, 3155 (1999), with the terms for net-charged slabs of
Ballenegger, Arnold & Cerda, J. Chem. Phys. 131, 094107 (2009), and the layer correction of Arnold,
de Joannis & Holm, J. Chem. Phys. 117, 2496 (2002), here for charges, dipoles and quadrupoles): the 3D Ewald
sum (:func:`.ewald.ewald_sum`, tin foil, neutralising background; or its particle-mesh form, PME, by
:func:`slab_sum`'s ``method``) in a cell elongated along the normal, ``(a, b, L n)``, plus two exact
corrections: one for the plane-averaged part, one that removes the in-plane varying part of the replica
layers. With both, the vacuum added to the cell can be small.

Why the correction is exact. Seen from afar, a 2D-periodic layer is only its plane average, the
1D density

    rho(z) = (1/A) sum_j [q_j delta(z - z_j) - mu_jz delta'(z - z_j) + 1/2 Theta_jzz delta''(z - z_j)]

(``z = r . n``, ``mu_z = mu . n``, ``Theta_zz = n^T Theta n``, A the in-plane area); the rest of each
replica layer decays like ``exp(-|k| d)`` with the in-plane wave vector k. For a charge sheet the 3D
sum with background and zero cell mean gives ``(2 pi q / A)(z^2/L + L/6 + sigma^2/L - g*|z|)`` for
``|z| < L``, where ``g*|z|`` is |z| smoothed by the sources' Gaussian of width sigma (|z| itself for point
sources, sigma = 0): ``(g*|z|)'' = 2 g`` and the mean of ``g*|z|`` over a period is ``L/4 + sigma^2/L``.
The isolated sheet has ``-(2 pi q / A) g*|z|``. The difference is the polynomial kernel

    K(R) = -(2 pi / V) ((n . R)^2 + L^2 / 6 + sigma^2),        V = A L,

which acts on multipoles exactly like 1/R does (``phi = q K - mu . grad K + 1/2 Theta : grad grad K``;
a quadratic has no higher derivatives) and also between a source and itself. Summed over sources
(O(N)), with ``Q = sum q``, ``M = sum (q z + mu_z)`` and ``S = sum (q z^2 + 2 mu_z z + Theta_zz)`` per channel:

    phi_i += -(2 pi / V) (Q z_i^2 - 2 M z_i + S + Q (L^2 / 6 + sigma^2))
    E_i   += (4 pi / V) (Q z_i - M) n
    G_i   += (4 pi / V) Q n n^T

and the energy gets ``(2 pi / V) (M^2 - Q S - Q^2 (L^2 / 12 + sigma^2 / 2))``: the Yeh-Berkowitz term ``M^2``,
the Ballenegger-Arnold-Cerda terms of a charged slab, and from quadrupoles ``-Q sum Theta_zz``.

Conventions. For a net charge Q the in-plane-averaged potential of every charge is that of a sheet,
``-2 pi q |z - z_j| / A`` (Gaussian-smoothed with smearing), with no added constant (the convention of
2D Ewald sums); fields and field gradients have no such freedom. Self terms are excluded as in 3D.
There is no neutralising background: ``tr G = 0`` at point sources whatever the net charge.

The replica layers. The 3D sum also holds every layer's copies at ``n L n``, n != 0. Their plane average is
part of the correction above; what is left of them varies in the plane, and for one in-plane wave vector
k != 0 a point source's copies add ``(2 pi / (A k)) cos(k . rho) sum_{n != 0} exp(-k |z - n L|)``, which for
``|z| < L`` is ``(2 pi / (A k)) cos(k . rho) (exp(-k (L - z)) + exp(-k (L + z))) / (1 - exp(-k L))``.
:func:`replica_correction` subtracts that, summed over k: each term is a product of one factor per atom,
``exp(i k . r +- k z)``, a plane wave with a complex wave vector, so it is summed as the reciprocal sum is
(structure factors by one GEMM, fields by another) with the derivative factors ``i k +- k n`` for the
multipoles, the fields and their gradients, and the i = j copies included (a source's own copies are
not part of the slab). The terms fall like ``exp(-k d)`` with ``d >= gap`` between a layer and its copies,
so the cutoff is ``~ ln(1/accuracy) / gap`` (:func:`replica_k_cutoff`, growing with the sources' and fields'
ranks): at accuracy 1e-5 and a 6 Å gap ~0.86 in-plane vectors per Å² of area for q, mu, Theta to potential, field
and gradient (1750 for a 45 Å square cell, 5350 for 79 Å; ~0.65 for q and mu; a quarter of that at twice the
gap), summed in blocks over the vectors like the 3D sum's k-vectors. Gaussian sources act on a copy one gap
away as points do, to within ``erfc(gap / (sqrt 2 sigma))``, which sets the gap.

Cell. Rows a, b span the plane; row c gives the normal direction and must be orthogonal to a and b;
every atom must lie within ``0 <= r . n <= |c|`` (the vacuum-padded region), else ValueError. The
length of c does not change the results (beyond ``accuracy``): the sum itself uses the height
``L = |c| + gap``. The gap is at least :func:`vacuum_gap` (5 Å, or 6 Å for the long-range block's
sigma = 1 Å at accuracy 1e-5; before the replica correction it was ``(ln(1/accuracy) + 3) / k_min``,
27 Å for a 11 Å cell, and the 3D sum's k-vectors grew with it); :func:`choose_gap` widens it for large slabs,
where the replica correction's ~area / gap^2 in-plane vectors would cost more than a taller 3D cell.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from .ewald import K_BLOCK, ewald_sum, kvector_blocks, phase_sum, wrap_positions
from .kernels import Layout, cell_volume

#: Extra e-foldings beyond ln(1/accuracy) in the cutoff of the replica correction.
GAP_MARGIN = 3.0
#: Smallest vacuum gap (Å) added along the normal.
GAP_FLOOR = 5.0
#: The cell rows along which a slab's positions are wrapped (:func:`.ewald.wrap_positions`): a and b, not c. The
#: replica correction's formula holds for height differences |z_i - z_j| < L; an atom a rounding error below the
#: plane z = 0 (which the input check accepts) wrapped along c would sit near z = L, and its pairs would count
#: as replicas.
IN_PLANE = (True, True, False)
#: Above this many (atom x in-plane vector) terms, the replica correction's blocks are checkpointed when gradients
#: are tracked: each term keeps ~10 saved values (phases, growths and decays, their products), several times what a
#: term of the 3D sum keeps (:data:`.ewald.CHECKPOINT_TERMS`, 4x this). The slab sum of a 1936-atom NaCl slab
#: (q, mu, Theta: 3286 vectors, 6.4M terms) peaked at 2.86 GB unchecked, 1.76 GB checkpointed, ~15% slower; a
#: 1024-atom one (1.8M terms, not checkpointed) would save < 0.1 GB for 9-15% more time.
CHECKPOINT_TERMS = 1 << 21
#: Cost model of :func:`replica_sum` with gradients to the positions and the sources (seconds, one CPU thread,
#: float64): a constant per term of :func:`replica_cost_terms`: per call; per (atom, in-plane vector) term (its
#: phase, growth and decay factors); per term x (row + column) (the derivative factors); per term x (row + column)
#: x channel (structure factors and fields). Fitted by benchmarks/pme_cost_fit.py --methods replica on NaCl slabs
#: of 256-1936 atoms, gaps 6-16 Å, the layouts of both long-range kinds (results/pme_cost_fit.replica.md, its
#: "fitted" column: within 0.58-1.24x of the 36 measured times).
COST_REPLICA_CALL = 1.38e-03
COST_REPLICA_PHASE = 1.90e-07
COST_REPLICA_FACTOR = 2.64e-09
COST_REPLICA_K = 7.12e-10
#: Names of the replica correction's cost constants, in the order of :func:`replica_cost_terms`.
REPLICA_COST_CONSTANTS = ("COST_REPLICA_CALL", "COST_REPLICA_PHASE", "COST_REPLICA_FACTOR", "COST_REPLICA_K")
#: The vacuum gaps :func:`choose_gap` weighs: these multiples of :func:`vacuum_gap`, rounded up to whole Å.
GAP_FACTORS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
#: :func:`choose_gap` takes the smallest gap whose modelled cost is within this factor of the least, or within
#: :data:`GAP_MIN_SAVING` seconds of it. The cost models are within ~0.5-1.6x of measured times, and flat in the
#: gap once the replica correction is cheap, where they miss how PME's time grows with a taller cell (3136-atom
#: NaCl slab: 2.2 s at 36 Å, 3.5 s at 48 and 96 Å, which the models put lowest); and a few milliseconds are
#: within their error for small slabs (a 4-atom slab's Ewald sum modelled 2 ms cheaper at 36 Å than at 6 Å).
GAP_TOLERANCE = 1.2
GAP_MIN_SAVING = 0.01


def _erfc_inverse(y: float) -> float:
    """x with erfc(x) = y, 0 < y < 1 (bisection; float64 resolution)."""
    lo, hi = 0.0, 30.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if math.erfc(mid) > y else (lo, mid)
    return 0.5 * (lo + hi)


def vacuum_gap(accuracy: float, smearing: float | None = None) -> float:
    """Vacuum (Å) added along the normal, whole Å: at least :data:`GAP_FLOOR`, and for Gaussian sources of
    width sigma at least ``sqrt(2) sigma erfcinv(accuracy) + sigma``, where a replica's Gaussian acts on the
    slab as a point source does to within ``accuracy`` (what the replica correction assumes). Whole Å, and no
    dependence on the cell: the gap stays constant under strain (exact stress, as ``ewald.snap_alpha`` does
    for the splitting).
    """
    gap = GAP_FLOOR
    if smearing is not None and smearing > 0:
        gap = max(gap, math.sqrt(2.0) * smearing * _erfc_inverse(accuracy) + smearing)
    return float(math.ceil(gap))


def replica_k_cutoff(gap: float, accuracy: float, order: int) -> float:
    """In-plane cutoff (1/Å) of :func:`replica_correction`: the terms fall like ``(k d)^n exp(-k d)`` over
    the fields at distance ``d >= gap`` (n = ``order``, the rank of field plus source), so ``k_r = x / gap``
    with ``x = ln(1/accuracy) + GAP_MARGIN + n ln x``."""
    base = math.log(1.0 / accuracy) + GAP_MARGIN
    x = base
    for _ in range(100):
        x = base + order * math.log(max(x, 1.0))
    return x / gap


def replica_cost_terms(n_atoms: int, n_vectors: int, n_rows: int, n_cols: int, n_channels: int) -> tuple:
    """The counts :func:`replica_cost` weighs by :data:`REPLICA_COST_CONSTANTS` (one per constant, in that order)."""
    terms = float(n_atoms) * float(n_vectors)
    return (1.0 if n_vectors else 0.0, terms, terms * (n_rows + n_cols), terms * (n_rows + n_cols) * n_channels)


def replica_cost(n_atoms: int, n_vectors: int, n_rows: int, n_cols: int, n_channels: int) -> float:
    """Modelled seconds of :func:`replica_sum` with gradients, over ``n_vectors`` in-plane wave vectors."""
    terms = replica_cost_terms(n_atoms, n_vectors, n_rows, n_cols, n_channels)
    return sum(globals()[name] * t for name, t in zip(REPLICA_COST_CONSTANTS, terms))


def choose_gap(cell: np.ndarray, n_atoms: int, accuracy: float, smearing, rows: Layout, cols: Layout,
               n_channels: int) -> float:
    """The vacuum gap (Å) a slab's sum adds along the normal, for a slab of ``n_atoms`` in ``cell`` [3, 3] (Å, rows
    a, b in the plane, c along the normal) with sources ``cols`` and outputs ``rows`` in ``n_channels`` channels.

    A small gap keeps the 3D sum's cell short, but the replica correction's in-plane vectors grow like
    ``area / gap^2`` (:func:`replica_k_cutoff`), and their work like N x area: O(N^2) at fixed thickness. Of the
    gaps :data:`GAP_FACTORS` x :func:`vacuum_gap` (whole Å), this is the one whose modelled cost is least: the 3D
    sum in the elongated cell (the cheaper of Ewald and PME, :func:`.pme.method_costs`) plus the replica
    correction (:func:`replica_cost`, its vectors counted), or the smallest gap within :data:`GAP_TOLERANCE` /
    :data:`GAP_MIN_SAVING` of it. Small slabs keep :func:`vacuum_gap` (for q, mu, Theta in 4 channels and 1 Å
    Gaussians at accuracy 1e-5, NaCl slabs up to ~300 atoms; small slabs without pricing a 3D sum, see below); a
    1024-atom NaCl slab takes 12 Å, a 3136-atom one 24 Å (benchmarks/README.md, "The vacuum gap chosen by the cost
    models"). The search stops early: a wider gap can save at most the correction's cost at the narrower one (a
    taller cell costs the 3D sum more), so where that is below the tolerance it is not priced further. The results
    do not depend on the gap beyond ``accuracy`` (both corrections are exact). It depends on the cell only through
    the lengths of a, b and c and the angle of a and b, is piecewise constant in them (whole Å), and is the same
    for the eager sum (:func:`slab_sum`) and the batched one (:func:`.cells.periodic_plan`).
    """
    cell = np.asarray(cell, dtype=np.float64)
    la, lb, lc = (float(np.linalg.norm(x)) for x in cell)
    cos_ab = float(cell[0] @ cell[1]) / (la * lb)
    # rounded: the two sums' frames of one slab may differ in the last bits
    return _choose_gap(round(la, 9), round(lb, 9), round(cos_ab, 12), round(lc, 9), int(n_atoms), float(accuracy),
                       None if smearing is None else float(smearing), vacuum_gap(accuracy, smearing), rows.ranks,
                       cols.ranks, int(n_channels))


@lru_cache(maxsize=4096)
def _choose_gap(la: float, lb: float, cos_ab: float, lc: float, n_atoms: int, accuracy: float, smearing,
                floor: float, row_ranks: tuple, col_ranks: tuple, n_channels: int) -> float:
    from .pme import method_costs  # .pme imports this module

    rows, cols = Layout(row_ranks), Layout(col_ranks)
    order = max(rows.rank_of) + max(cols.rank_of)
    sin_ab = math.sqrt(max(0.0, 1.0 - cos_ab * cos_ab))

    def box(gap):
        return np.array([[la, 0.0, 0.0], [lb * cos_ab, lb * sin_ab, 0.0], [0.0, 0.0, lc + gap]])

    def replica(gap):
        n_k = len(plane_kvector_indices(box(gap), replica_k_cutoff(gap, accuracy, order)))
        return replica_cost(n_atoms, n_k, len(rows), len(cols), n_channels)

    def sum_3d(gap):
        return min(method_costs(box(gap), n_atoms, accuracy, rows, cols, n_channels, smearing))

    # A wider gap saves at most the correction's cost at the smallest one (a taller cell costs the 3D sum more):
    # where that is within the tolerance, the smallest gap, without pricing 3D sums (a parameter search each,
    # ~6 ms; a small slab's whole sum costs a few ms).
    r_floor = replica(floor)
    if r_floor <= GAP_MIN_SAVING:
        return floor
    try:
        t_floor = sum_3d(floor)
    except ValueError:  # the sum itself says what is wrong
        return floor
    if r_floor <= (GAP_TOLERANCE - 1.0) * t_floor:
        return floor
    costs = {floor: t_floor + r_floor}
    for gap in sorted({float(math.ceil(floor * f - 1e-9)) for f in GAP_FACTORS} - {floor}):
        r = replica(gap)
        try:  # a mesh past pme.MAX_MESH_POINTS for the taller cell: not a candidate (the sum would refuse it)
            costs[gap] = sum_3d(gap) + r
        except ValueError:
            continue
        if r <= 0.25 * max((GAP_TOLERANCE - 1.0) * min(costs.values()), GAP_MIN_SAVING):
            break  # the wider gaps save at most r more: a quarter of the tolerance
    least = min(costs.values())
    return min(gap for gap, cost in costs.items() if cost <= max(GAP_TOLERANCE * least, least + GAP_MIN_SAVING))


def plane_kvector_indices(cell: np.ndarray, k_cutoff: float) -> np.ndarray:
    """Integer in-plane indices m [K, 2] of the wave vectors k = m_0 b_0 + m_1 b_1 (b the reciprocal rows of
    ``cell`` [3, 3], rows a, b in the plane), 0 < |k| < k_cutoff, one of every pair k, -k."""
    recip = 2.0 * np.pi * np.linalg.inv(cell).T
    bound = np.floor(k_cutoff * np.linalg.norm(cell[:2], axis=1) / (2.0 * np.pi)).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-b, b + 1) for b in bound], indexing="ij"), -1).reshape(-1, 2)
    grid = grid[(grid[:, 0] > 0) | ((grid[:, 0] == 0) & (grid[:, 1] > 0))]
    return grid[np.linalg.norm(grid @ recip[:2], axis=1) < k_cutoff]


def replica_correction(r: torch.Tensor, flat: torch.Tensor, k_index: torch.Tensor, k_mask: torch.Tensor,
                       box: torch.Tensor, normal: torch.Tensor, length: torch.Tensor, slab: torch.Tensor,
                       rows: Layout, cols: Layout, n_channels: int) -> torch.Tensor:
    """Minus the in-plane-varying (k != 0) part of what the replica layers at ``n L``, n != 0, add to the 3D sum
    (module docstring), for a batch of cells.

    r [B, M, 3] positions (Å, in the slabs' frames, ``0 <= r . n <= L``, padded slots too: e.g. at the origin; not
    wrapped along the normal, see :data:`IN_PLANE`: the formula needs every pair's ``|z_i - z_j| < L``); flat
    [B, M, n_cols C] packed sources (zero in padded slots); k_index [B, K, 2] in-plane indices of
    :func:`plane_kvector_indices` (the elongated cell's), k_mask [B, K] the real ones; box [B, 3, 3] the elongated
    cells; normal [B, 3]; length [B] their heights L; slab [B] bool (other cells get zero). Returns [B, M,
    n_rows C] in the packed rows of ``rows`` without the output signs, like :func:`.ewald.phase_sum`.
    """
    recip = 2.0 * math.pi * torch.linalg.inv_ex(box).inverse.transpose(1, 2)  # [B, 3, 3]
    k = k_index.to(r.dtype) @ recip[:, :2]  # [B, K, 3], in the plane
    real = k_mask & slab[:, None]  # [B, K]
    # |k|, and 0 in the rows that are not summed: their factors exp(+-|k| z) are then 1 wherever the atoms are
    # (the cells that are not slabs, open structures in their stand-in cells), never an overflow times a zero weight
    kn = torch.where(real, torch.linalg.vector_norm(k, dim=-1), torch.zeros_like(k[..., 0]))  # [B, K]
    safe = torch.where(real, kn, torch.ones_like(kn))
    area = torch.linalg.vector_norm(torch.linalg.cross(box[:, 0], box[:, 1]), dim=-1)  # [B]
    L = length[:, None]
    # both half planes (x2), minus the replicas: -(2 pi / (A k)) sum_{n != 0} exp(-k |dz - n L|) per pair
    weight = -4.0 * math.pi / (area[:, None] * safe * -torch.expm1(-safe * L))
    weight = torch.where(real, weight, torch.zeros_like(weight))  # [B, K]
    sign = torch.cat([torch.ones_like(kn), -torch.ones_like(kn)], dim=1)  # [B, 2K]: exp(+-k dz)
    kk, kw, w2 = torch.cat([k, k], dim=1), torch.cat([kn, kn], dim=1), torch.cat([weight, weight], dim=1)
    z = (r * normal[:, None, :]).sum(-1)[:, None, :] - 0.5 * L[:, :, None]  # [B, 1, M], |z| <= L / 2
    decay = -0.5 * (kw * L)[:, :, None]  # [B, 2K, 1]: exp(-k L) split between the two ends, each factor <= 1
    grow = (sign * kw)[:, :, None] * z  # [B, 2K, M]
    theta = kk @ r.transpose(1, 2)  # [B, 2K, M]
    cos, sin = torch.cos(theta), torch.sin(theta)
    src, fld = torch.exp(decay - grow), torch.exp(decay + grow)  # exp(-+ s k z) at sources / field points
    # derivative factors of exp(i k.r + s k z): i k + s k n, per axis
    factors = ((sign * kw)[..., None] * normal[:, None, :], kk)  # [B, 2K, 3]
    return phase_sum(torch.cat([cos * src, sin * src], dim=1), flat, kk, w2, rows, cols, n_channels,
                     factors=factors, field_phase=torch.cat([cos * fld, sin * fld], dim=1))


def slab_sum(
    positions: torch.Tensor,
    v: torch.Tensor,
    multipoles: dict,
    cell: torch.Tensor,
    rows: Layout,
    cols: Layout,
    *,
    smearing: float | None,
    accuracy: float,
    alpha: float | None = None,
    method: str = "auto",
    pme_options: dict | None = None,
) -> torch.Tensor:
    """Slab sum: the 3D sum in the elongated cell plus the replica and plane-averaged corrections (module
    docstring).

    positions [N, 3] (Å), inside the slab region (checked by ``_validate.check_slab``); v [N, n_cols, C]
    packed sources; multipoles {rank: [N, C], [N, C, 3], [N, C, 3, 3]} the same sources unpacked;
    cell [3, 3] (Å), rows a, b in-plane, c along the normal; ``alpha`` (1/Å) overrides the Ewald splitting.
    ``method``: the 3D sum, "ewald", "pme" or "auto" (the one :func:`.pme.choose_method` models as cheaper for
    the elongated cell; Ewald when ``alpha`` is given): a large slab's 3D sum by Ewald grows like a large cell's.
    ``pme_options``: :func:`.pme.pme_sum` overrides for the elongated cell (method "pme").
    Returns [N, n_rows, C] without the output signs ``c_l``, like :func:`.ewald.ewald_sum`.
    """
    from .pme import choose_method, pme_sum  # looked up per call: the tests patch the choice in .pme

    c_len = torch.linalg.norm(cell[2])
    normal = cell[2] / c_len  # [3]
    gap = choose_gap(cell.detach().cpu().double().numpy(), positions.shape[0], accuracy, smearing, rows, cols,
                     v.shape[2])
    length = c_len + gap  # L (Å)
    box = torch.stack([cell[0], cell[1], length * normal])  # [3, 3] elongated cell
    q, mu, th = multipoles.get(0), multipoles.get(1), multipoles.get(2)
    total = q.sum(0) if q is not None else None
    if method == "auto":
        method = "ewald" if alpha is not None else choose_method(
            box.detach().cpu().double().numpy(), positions.shape[0], float(accuracy), rows, cols, v.shape[2], smearing)
    if method == "pme":
        out = pme_sum(positions, v, box, rows, cols, smearing=smearing, accuracy=accuracy, total_charge=total,
                      **(pme_options or {}))
    else:
        out = ewald_sum(positions, v, box, rows, cols, smearing=smearing, accuracy=accuracy, alpha=alpha,
                        total_charge=total)
    out = out + replica_sum(positions, v, box, rows, cols, gap=gap, accuracy=accuracy)
    zeros = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
    return out + slab_correction(positions, zeros, box[None], normal[None], length.reshape(1),
                                 torch.ones(1, dtype=torch.bool, device=positions.device), rows, q, mu, th,
                                 smearing=smearing)


def replica_sum(positions: torch.Tensor, v: torch.Tensor, box: torch.Tensor, rows: Layout, cols: Layout, *,
                gap: float, accuracy: float) -> torch.Tensor:
    """:func:`replica_correction` of one slab over its in-plane vectors to ``accuracy`` (:func:`replica_k_cutoff`
    for the vacuum ``gap``), in blocks of vectors, checkpointed from :data:`CHECKPOINT_TERMS` terms when gradients
    are tracked. positions [N, 3] (Å, in the slab's frame); v [N, n_cols, C] packed sources; box [3, 3] the cell
    elongated by ``gap`` along its third row, the normal. Returns [N, n_rows, C] without the output signs."""
    n, n_channels = v.shape[0], v.shape[2]
    length = torch.linalg.norm(box[2])
    normal = box[2] / length
    order = max(rows.rank_of) + max(cols.rank_of)
    m = plane_kvector_indices(box.detach().cpu().double().numpy(), replica_k_cutoff(gap, accuracy, order))
    out = v.new_zeros(n, len(rows), n_channels)
    if not len(m):
        return out
    one = torch.ones(1, dtype=torch.bool, device=positions.device)
    k_index = torch.as_tensor(m, device=positions.device)[None]
    # the in-plane vectors grow with the area (~0.65 per Å² at accuracy 1e-5 and the smallest gap), and each holds
    # [2K, N] phases: blocks of them, checkpointed for large slabs, keep the memory bounded as the 3D sum's do
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (positions, v, box))
    use_checkpoint = track and n * len(m) > CHECKPOINT_TERMS

    def block(k_part, r, flat, box, normal, length):
        return replica_correction(r, flat, k_part, one[:, None].expand(1, k_part.shape[1]), box[None],
                                  normal[None], length.reshape(1), one, rows, cols, n_channels)

    args = (wrap_positions(positions, box, IN_PLANE)[None], v.flatten(1)[None], box, normal, length)
    for blk in kvector_blocks(n, len(m), K_BLOCK):
        part = k_index[:, blk]
        add = checkpoint(block, part, *args, use_reentrant=False) if use_checkpoint else block(part, *args)
        out = out + add.reshape(n, len(rows), n_channels)
    return out


def slab_correction(positions, batch, box, normal, length, slab, rows: Layout, charges=None, dipoles=None,
                    quadrupoles=None, *, smearing: float | None) -> torch.Tensor:
    """The plane-averaged correction (module docstring) of every slab in a batch of cells, at once.

    positions [N, 3] (Å, in the slabs' frames); batch [N] long, each atom's cell; box [B, 3, 3], the elongated cells;
    normal [B, 3]; length [B], their heights L (Å); slab [B] bool, which cells are slabs; charges [N, C],
    dipoles [N, C, 3], quadrupoles [N, C, 3, 3] or None. Returns [N, n_rows, C] in the packed rows of ``rows``
    without the output signs, zero at the atoms of the other cells.
    """
    sources = [x for x in (charges, dipoles, quadrupoles) if x is not None]
    n_channels = sources[0].shape[1]
    volume = cell_volume(box)  # [B]
    n_at = normal[batch]  # [N, 3]
    z = (positions * n_at).sum(-1)[:, None]  # [N, 1] (Å)
    q = charges if charges is not None else positions.new_zeros(positions.shape[0], n_channels)
    per_m, per_s = q * z, q * z * z
    if dipoles is not None:
        mu_z = (dipoles * n_at[:, None, :]).sum(-1)  # [N, C]
        per_m = per_m + mu_z
        per_s = per_s + 2.0 * mu_z * z
    if quadrupoles is not None:
        # n^T Theta n by products and sums (a three-operand einsum goes through opt_einsum's path search, which
        # would make the atom count a constant of a compiled graph)
        per_s = per_s + (quadrupoles * (n_at[:, :, None] * n_at[:, None, :])[:, None]).sum((-1, -2))
    sums = positions.new_zeros(box.shape[0], 3 * n_channels).index_add(0, batch, torch.cat([q, per_m, per_s], dim=1))
    # [N, C] each: the sums Q, M, S of the atom's cell (unflattened, not split: C may be 0)
    Q, M, S = (x[batch] for x in sums.unflatten(1, (3, n_channels)).unbind(1))
    spread = (length * length / 6.0 + (0.0 if smearing is None else float(smearing) ** 2))[batch, None]  # [N, 1]
    scale = torch.where(slab, 2.0 * math.pi / volume, torch.zeros_like(volume))[batch, None]  # [N, 1]: 2 pi / V
    phi = -scale * (Q * z * z - 2.0 * M * z + S + Q * spread)  # [N, C]
    e_n = 2.0 * scale * (Q * z - M)  # [N, C], E = e_n n
    g_nn = 2.0 * scale * Q  # [N, C], G = g_nn n n^T
    parts = []
    for idx in rows.indices:  # packed rows carry phi, -E_a, -G_ab (output signs are applied later)
        if len(idx) == 0:
            parts.append(phi)
        elif len(idx) == 1:
            parts.append(-e_n * n_at[:, idx[0], None])
        else:
            parts.append(-g_nn * (n_at[:, idx[0]] * n_at[:, idx[1]])[:, None])
    return torch.stack(parts, dim=1)
