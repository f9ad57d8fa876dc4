"""Change of basis between rank-l irreducible Cartesian tensors and e3nn's real spherical components.

e3nn (≥ 0.6) orders rank-1 components as (x, y, z), so rank 1 maps by the identity. A symmetric
traceless X maps to five components

    (√2 X_xz, √2 X_xy, √(3/2) X_yy, √2 X_yz, (X_zz − X_xx)/√2),

an isometry (Frobenius norm = Euclidean norm) onto e3nn's l = 2 basis: the image of T2(n) is
Y2(n)/√(10/3) in e3nn's ``component`` normalisation (and T1(n) = n is Y1(n)/√3), and the map intertwines
the Cartesian action Q X Qᵀ with e3nn's Wigner matrix D²(Q) (checked against e3nn in the tests).
"""

from __future__ import annotations

import math

import torch

__all__ = ["to_spherical", "from_spherical"]

_S2 = math.sqrt(2.0)


def to_spherical(x: torch.Tensor, rank: int) -> torch.Tensor:
    """x [...] + (3,)*rank → [..., 2·rank + 1] real spherical components (e3nn order)."""
    if rank == 0:
        return x[..., None]
    if rank == 1:
        return x
    if rank == 2:
        return torch.stack(
            [
                _S2 * x[..., 0, 2],
                _S2 * x[..., 0, 1],
                math.sqrt(1.5) * x[..., 1, 1],
                _S2 * x[..., 1, 2],
                (x[..., 2, 2] - x[..., 0, 0]) / _S2,
            ],
            dim=-1,
        )
    raise ValueError(f"rank must be 0, 1 or 2, got {rank}")


def from_spherical(y: torch.Tensor, rank: int) -> torch.Tensor:
    """[..., 2·rank + 1] real spherical components → rank-l irreducible Cartesian tensor."""
    if y.shape[-1] != 2 * rank + 1:
        raise ValueError(f"rank {rank} needs {2 * rank + 1} components, got {y.shape[-1]}")
    if rank == 0:
        return y[..., 0]
    if rank == 1:
        return y
    if rank == 2:
        xz, xy, yy, yz = y[..., 0] / _S2, y[..., 1] / _S2, y[..., 2] / math.sqrt(1.5), y[..., 3] / _S2
        d = y[..., 4] / _S2  # (zz − xx) / 2
        xx = -0.5 * yy - d
        zz = -0.5 * yy + d
        rows = [torch.stack([xx, xy, xz], -1), torch.stack([xy, yy, yz], -1), torch.stack([xz, yz, zz], -1)]
        return torch.stack(rows, dim=-2)
    raise ValueError(f"rank must be 0, 1 or 2, got {rank}")
