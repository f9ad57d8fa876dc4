"""Checks shipped for users and for our own tests: equivariance under O(3), finite differences."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["random_orthogonal", "rotate", "assert_equivariant"]


def random_orthogonal(det: float = 1.0, *, dtype=torch.float64, generator: Optional[torch.Generator] = None):
    """A random 3×3 orthogonal matrix (Haar on SO(3), times −I-free reflection if det = −1)."""
    a = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) * det < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def rotate(x: torch.Tensor, q: torch.Tensor, rank: int) -> torch.Tensor:
    """Apply Q to every Cartesian axis of a rank-``rank`` tensor x [...] + (3,)*rank."""
    q = q.to(dtype=x.dtype, device=x.device)
    if rank == 0:
        return x
    if rank == 1:
        return x @ q.T
    if rank == 2:
        return q @ x @ q.T
    raise ValueError(f"rank must be 0, 1 or 2, got {rank}")


def assert_equivariant(
    fn: Callable,
    args: Sequence[torch.Tensor],
    ranks_in: Sequence[Optional[int]],
    ranks_out: Sequence[int],
    *,
    parity_out: Optional[Sequence[int]] = None,
    n_samples: int = 3,
    rtol: float = 1e-10,
    seed: int = 0,
) -> float:
    """Check fn(Q·args) == Q·fn(args) for random orthogonal Q with det = +1 and det = −1.

    ranks_in: rank of each argument (None: left untouched, e.g. weights or species);
    ranks_out: rank of each output (fn may return one tensor or a sequence);
    parity_out: +1 for true tensors, −1 for pseudotensors (sign flips under improper Q).
    Returns the worst relative error; raises AssertionError naming the output, det and error.
    """
    g = torch.Generator().manual_seed(seed)
    parity_out = list(parity_out) if parity_out is not None else [1] * len(ranks_out)

    def as_list(y):
        return list(y) if isinstance(y, (tuple, list)) else [y]

    with torch.no_grad():
        ref = as_list(fn(*args))
    if len(ref) != len(ranks_out):
        raise ValueError(f"fn returned {len(ref)} outputs but ranks_out names {len(ranks_out)}")
    worst = 0.0
    for det in (1.0, -1.0):
        for _ in range(n_samples):
            q = random_orthogonal(det, generator=g)
            moved = [a if r is None else rotate(a, q, r) for a, r in zip(args, ranks_in)]
            with torch.no_grad():
                got = as_list(fn(*moved))
            for k, (y, yq, r, p) in enumerate(zip(ref, got, ranks_out, parity_out)):
                expect = rotate(y, q, r) * (det if p < 0 else 1.0)
                scale = float(expect.abs().max()) or 1.0
                err = float((yq - expect).abs().max()) / scale
                worst = max(worst, err)
                if not err <= rtol:
                    raise AssertionError(f"output {k} (rank {r}) not equivariant for det {det:+.0f}: rel err {err:.2e}")
    return worst
