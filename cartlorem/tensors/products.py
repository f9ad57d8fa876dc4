"""Irreducible Cartesian tensor products of ranks ≤ 2 (the ICTP replacement of Clebsch–Gordan paths).

A rank-l tensor with C channels is stored dense with trailing Cartesian axes: rank 0 ``[..., C]``,
rank 1 ``[..., C, 3]``, rank 2 ``[..., C, 3, 3]`` (symmetric, traceless). ``product(a, l1, b, l2, l3)``
couples two of them channel-wise into rank l3, normalised (DESIGN.md) so that for every even path
``product(T_l1(n), T_l2(n)) = T_l3(n)``:

====================  =====================  ======  ======
path                  raw product            N       parity
====================  =====================  ======  ======
(0,0)→0               a b                    1       even
(0,l)→l, (l,0)→l      a B                    1       even
(1,1)→0               a·b                    1       even
(1,1)→2               STF(a bᵀ)              3/2     even
(1,2)→1, (2,1)→1      B a                    1       even
(2,2)→0               A:B                    2/3     even
(2,2)→2               STF(A B)               2       even
(1,1)→1               a × b                  1       odd
(1,2)→2, (2,1)→2      STF(ε_ikl a_k B_lj)    1       odd
(2,2)→1               ε_ijk (A B)_jk         1       odd
====================  =====================  ======  ======

Even paths map true tensors to true tensors (O(3)-equivariant, reflections included); odd paths give
pseudotensors (only SO(3)-equivariant). Models use even paths unless they say otherwise.
"""

from __future__ import annotations

import torch

from .harmonics import stf

__all__ = ["EVEN_PATHS", "ODD_PATHS", "PATHS", "product", "paths_to"]

EVEN_PATHS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 1), (1, 1, 0), (1, 1, 2),
    (1, 2, 1), (2, 0, 2), (2, 1, 1), (2, 2, 0), (2, 2, 2),
)
ODD_PATHS: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 2, 2), (2, 1, 2), (2, 2, 1))
PATHS = EVEN_PATHS + ODD_PATHS


def paths_to(l1s, l2s, l3s, parity: str = "even") -> tuple[tuple[int, int, int], ...]:
    """The paths (l1, l2, l3) with l1 ∈ l1s, l2 ∈ l2s, l3 ∈ l3s, in table order.

    parity: "even" (O(3)), "odd" (pseudotensor paths only) or "all" (SO(3)).
    """
    table = {"even": EVEN_PATHS, "odd": ODD_PATHS, "all": PATHS}
    if parity not in table:
        raise ValueError(f"parity must be 'even', 'odd' or 'all', got {parity!r}")
    return tuple(p for p in table[parity] if p[0] in l1s and p[1] in l2s and p[2] in l3s)


def _check(x: torch.Tensor, rank: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():  # not an AttributeError or torch's dtype error
        raise TypeError(f"{name} must be a floating-point torch tensor")
    if rank < 0 or rank > 2:
        raise ValueError(f"ranks above 2 are not supported: {name} has rank {rank}")
    if rank > 0 and (x.dim() < rank or list(x.shape[-rank:]) != [3] * rank):
        raise ValueError(f"{name} of rank {rank} must end in {[3] * rank}, got shape {list(x.shape)}")


def _levi_civita(x: torch.Tensor) -> torch.Tensor:
    eps = torch.zeros(3, 3, 3, dtype=x.dtype, device=x.device)
    eps[0, 1, 2] = eps[1, 2, 0] = eps[2, 0, 1] = 1.0
    eps[0, 2, 1] = eps[2, 1, 0] = eps[1, 0, 2] = -1.0
    return eps


def product(a: torch.Tensor, l1: int, b: torch.Tensor, l2: int, l_out: int) -> torch.Tensor:
    """Channel-wise irreducible product of rank-l1 ``a`` and rank-l2 ``b`` into rank ``l_out``.

    a [..., C] + (3,)*l1 and b [..., C] + (3,)*l2 (leading axes broadcast) → [..., C] + (3,)*l_out,
    normalised as in the module table. Raises ValueError for a path that does not exist
    (|l1 − l2| ≤ l_out ≤ l1 + l2, every rank ≤ 2).
    """
    _check(a, l1, "a")
    _check(b, l2, "b")
    if l_out < 0 or l_out > 2 or not abs(l1 - l2) <= l_out <= l1 + l2:
        raise ValueError(f"no irreducible product path ({l1}, {l2}) -> {l_out} for ranks <= 2")
    key = (l1, l2, l_out)
    if l1 == 0:
        return a.reshape(list(a.shape) + [1] * l2) * b
    if l2 == 0:
        return a * b.reshape(list(b.shape) + [1] * l1)
    if key == (1, 1, 0):
        return (a * b).sum(-1)
    if key == (1, 1, 1):
        a, b = torch.broadcast_tensors(a, b)
        return torch.linalg.cross(a, b, dim=-1)
    if key == (1, 1, 2):
        return 1.5 * stf(a[..., :, None] * b[..., None, :])
    if key == (1, 2, 1):
        return (b * a[..., None, :]).sum(-1)  # B a (B symmetric)
    if key == (2, 1, 1):
        return (a * b[..., None, :]).sum(-1)  # A b
    if key == (2, 2, 0):
        return (2.0 / 3.0) * (a * b).sum((-1, -2))
    if key == (2, 2, 2):
        return 2.0 * stf(a @ b)
    eps = _levi_civita(a)
    if key == (1, 2, 2):  # STF(ε_ikl a_k B_lj)
        return stf(torch.einsum("ikl,...k,...lj->...ij", eps, a, b))
    if key == (2, 1, 2):  # STF(ε_ikl b_k A_lj)
        return stf(torch.einsum("ikl,...k,...lj->...ij", eps, b, a))
    # (2, 2, 1): ε_ijk (A B)_jk
    return torch.einsum("ijk,...jk->...i", eps, a @ b)
