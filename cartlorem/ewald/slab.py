"""Slabs, ``pbc = [True, True, False]``: multipoles periodic along a and b, open (vacuum) along c.

Method (Yeh & Berkowitz, J. Chem. Phys. 111, 3155 (1999), with the terms for net-charged slabs of
Ballenegger, Arnold & Cerda, J. Chem. Phys. 131, 094107 (2009), here for charges, dipoles and
quadrupoles): the 3D Ewald sum (:func:`.ewald.ewald_sum`, tin foil, neutralising background) in a cell
elongated along the normal, ``(a, b, L n)``, plus an exact correction for the plane-averaged part.

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

Cell. Rows a, b span the plane; row c gives the normal direction and must be orthogonal to a and b;
every atom must lie within ``0 <= r . n <= |c|`` (the vacuum-padded region), else ValueError. The
length of c does not change the results (beyond ``accuracy``): the sum itself uses the height
``L = |c| + gap``, with a further vacuum gap ``(ln(1/accuracy) + 3) / k_min`` (rounded up to 1 Å;
``k_min = 2 pi / max(|a|, |b|)`` bounds the shortest in-plane reciprocal vector from below), after
which the in-plane-varying field of the replica layers is below ``accuracy``.
"""

from __future__ import annotations

import math

import torch

from .ewald import ewald_sum
from .kernels import Layout

#: Extra e-foldings of the replica layers' field beyond ln(1/accuracy) in the vacuum gap.
GAP_MARGIN = 3.0


def vacuum_gap(cell: torch.Tensor, accuracy: float) -> float:
    """Vacuum (Å) added along the normal: ``(ln(1/accuracy) + 3) / k_min``, rounded up to whole Å.

    cell [3, 3] (Å). ``k_min = 2 pi / max(|a|, |b|)`` (1/Å) is a lower bound of the shortest non-zero
    in-plane reciprocal vector, ``2 pi lambda_1 / A`` with lambda_1 the shortest lattice vector: every
    lattice vector is at least as long as the smaller height ``A / max(|a|, |b|)``. Whole Å keep the gap
    constant under small strains (exact stress, as ``ewald.snap_alpha`` does for the splitting).
    """
    longest = float(torch.linalg.norm(cell.detach()[:2].double(), dim=1).max())
    k_min = 2.0 * math.pi / longest
    return float(math.ceil((math.log(1.0 / accuracy) + GAP_MARGIN) / k_min))


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
) -> torch.Tensor:
    """Slab sum: Ewald in the elongated cell plus the plane-averaged correction (module docstring).

    positions [N, 3] (Å), inside the slab region (checked by ``_validate.check_slab``); v [N, n_cols, C]
    packed sources; multipoles {rank: [N, C], [N, C, 3], [N, C, 3, 3]} the same sources unpacked;
    cell [3, 3] (Å), rows a, b in-plane, c along the normal; ``alpha`` (1/Å) overrides the Ewald splitting.
    Returns [N, n_rows, C] without the output signs ``c_l``, like :func:`.ewald.ewald_sum`.
    """
    c_len = torch.linalg.norm(cell[2])
    normal = cell[2] / c_len  # [3]
    length = c_len + vacuum_gap(cell, accuracy)  # L (Å)
    box = torch.stack([cell[0], cell[1], length * normal])  # [3, 3] elongated cell
    q, mu, th = multipoles.get(0), multipoles.get(1), multipoles.get(2)
    total = q.sum(0) if q is not None else None
    out = ewald_sum(positions, v, box, rows, cols, smearing=smearing, accuracy=accuracy, alpha=alpha,
                    total_charge=total)

    zeros = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
    return out + slab_correction(positions, zeros, box[None], normal[None], length.reshape(1),
                                 torch.ones(1, dtype=torch.bool, device=positions.device), rows, q, mu, th,
                                 smearing=smearing)


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
    volume = torch.abs(torch.linalg.det(box))  # [B]
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
    Q, M, S = (x[batch] for x in sums.split(n_channels, dim=1))  # [N, C] each: the sums Q, M, S of the atom's cell
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
