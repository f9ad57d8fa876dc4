"""Equivariant channel mixing: a separate linear map over channels for each rank."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

__all__ = ["EquivariantLinear", "mix_channels"]


def mix_channels(x: torch.Tensor, weight: torch.Tensor, rank: int) -> torch.Tensor:
    """x [..., C_in] + (3,)*rank, weight [C_in, C_out] → [..., C_out] + (3,)*rank.

    One GEMM [M·3^rank, C_in] @ [C_in, C_out] on the components-first view: broadcasting Wᵀ over M
    small [C_in, 3^rank] blocks is a batched GEMM of M tiny products, forward and backward (measured
    in benchmarks/results/train_step.local.md)."""
    if rank == 0:
        return x @ weight
    lead = x.shape[: x.dim() - rank - 1]
    c_in, k = x.shape[-rank - 1], int(3**rank)
    flat = x.reshape(-1, c_in, k).transpose(1, 2).reshape(-1, c_in)  # [M 3^rank, C_in]
    out = (flat @ weight).reshape(-1, k, weight.shape[1]).transpose(1, 2)  # [M, C_out, 3^rank]
    return out.reshape(list(lead) + [weight.shape[1]] + [3] * rank)


class EquivariantLinear(nn.Module):
    """Mixes channels rank by rank; a bias only on rank 0 (any other bias would break equivariance).

    forward(xs) with xs = [x0 [N, C_in], x1 [N, C_in, 3], x2 [N, C_in, 3, 3]] (None entries are
    passed through as None) → the same ranks with C_out channels. Weights start as N(0, 1/C_in).
    """

    def __init__(self, in_channels: int, out_channels: int, ranks: Sequence[int] = (0, 1, 2), bias: bool = False):
        super().__init__()
        self.ranks = tuple(ranks)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(in_channels, out_channels) / math.sqrt(in_channels)) for _ in self.ranks]
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias and 0 in self.ranks else None

    def forward(self, xs: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        out: List[Optional[torch.Tensor]] = [None, None, None]
        while len(out) < len(xs):
            out.append(None)
        for k, weight in enumerate(self.weights):  # TorchScript: ParameterList entries by iteration only
            rank = self.ranks[k]
            x = xs[rank] if rank < len(xs) else None
            if x is not None:
                y = mix_channels(x, weight, rank)
                if rank == 0 and self.bias is not None:
                    y = y + self.bias
                out[rank] = self._output(y, rank)
        return out

    def _output(self, y: torch.Tensor, rank: int) -> torch.Tensor:
        """The mixed rank-``rank`` features, as returned (a subclass may transform them, e.g. mask channels)."""
        return y

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, ranks={self.ranks}, bias={self.bias is not None}"
