"""Cartesian harmonics of unit vectors and the symmetric-traceless projection."""

from __future__ import annotations

import torch

__all__ = ["harmonics", "stf", "identity_like"]


def identity_like(x: torch.Tensor) -> torch.Tensor:
    """3×3 identity with the dtype and device of ``x``."""
    return torch.eye(3, dtype=x.dtype, device=x.device)


def stf(x: torch.Tensor) -> torch.Tensor:
    """Symmetric-traceless part of a rank-2 tensor: ½(X + Xᵀ) − ⅓ tr(X) I.

    x [..., 3, 3] → [..., 3, 3].
    """
    if x.dim() < 2 or list(x.shape[-2:]) != [3, 3]:
        raise ValueError(f"stf expects [..., 3, 3], got shape {list(x.shape)}")
    s = 0.5 * (x + x.transpose(-1, -2))
    tr = s.diagonal(dim1=-2, dim2=-1).sum(-1)
    return s - (tr / 3.0)[..., None, None] * identity_like(x)


def harmonics(vectors: torch.Tensor, lmax: int = 2) -> list[torch.Tensor]:
    """Cartesian harmonics T_l(r̂) of the directions of ``vectors``, l = 0..lmax.

    vectors [..., 3] (any non-zero length) → [T0 [...], T1 [..., 3], T2 [..., 3, 3]] with
    T0 = 1, T1 = n, T2 = (3/2)(n nᵀ − I/3), n = r/|r|, normalised so that T_l(n) fully contracted
    with m^⊗l gives the Legendre polynomial P_l(n·m).
    """
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise TypeError("harmonics expects a floating-point torch tensor of vectors [..., 3]")
    if vectors.shape[-1:] != (3,):
        raise ValueError(f"harmonics expects vectors [..., 3], got shape {tuple(vectors.shape)}")
    if not 0 <= lmax <= 2:
        raise ValueError(f"harmonics supports lmax = 0, 1, 2, got {lmax}")
    r = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    n = vectors / r
    out = [torch.ones_like(n[..., 0])]
    if lmax >= 1:
        out.append(n)
    if lmax >= 2:
        out.append(1.5 * (n[..., :, None] * n[..., None, :]) - 0.5 * identity_like(n))
    return out
