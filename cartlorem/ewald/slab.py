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

    volume = torch.abs(torch.linalg.det(box))
    z = positions @ normal  # [N] (Å)
    zero = positions.new_zeros(v.shape[2])  # [C]
    Q = total if total is not None else zero
    M, S = zero, zero
    if q is not None:
        M = M + (q * z[:, None]).sum(0)
        S = S + (q * (z * z)[:, None]).sum(0)
    if mu is not None:
        mu_z = mu @ normal  # [N, C]
        M = M + mu_z.sum(0)
        S = S + 2.0 * (mu_z * z[:, None]).sum(0)
    if th is not None:
        S = S + torch.einsum("a,ncab,b->c", normal, th, normal)
    zc = z[:, None]  # [N, 1]
    spread = length * length / 6.0 + (0.0 if smearing is None else smearing * smearing)
    phi = -(2.0 * math.pi / volume) * (Q * zc * zc - 2.0 * M * zc + S + Q * spread)  # [N, C]
    e_n = (4.0 * math.pi / volume) * (Q * zc - M)  # [N, C], E = e_n n
    g_nn = (4.0 * math.pi / volume) * Q  # [C], G = g_nn n n^T
    parts = []
    for idx in rows.indices:  # packed rows carry phi, -E_a, -G_ab (output signs are applied later)
        if len(idx) == 0:
            parts.append(phi)
        elif len(idx) == 1:
            parts.append(-e_n * normal[idx[0]])
        else:
            parts.append((-g_nn * normal[idx[0]] * normal[idx[1]]).expand_as(phi))
    return out + torch.stack(parts, dim=1)
