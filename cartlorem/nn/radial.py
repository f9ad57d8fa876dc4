"""Radial edge features: Bessel functions, a polynomial envelope and the radial MLP."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["BesselBasis", "PolynomialEnvelope", "RadialMLP"]


class BesselBasis(nn.Module):
    """R_n(r) = √(2/r_c) sin(nπ r / r_c) / r, n = 1..num_basis. r [E] Å → [E, num_basis]."""

    def __init__(self, cutoff: float, num_basis: int = 8):
        super().__init__()
        self.cutoff = float(cutoff)
        self.register_buffer("freqs", math.pi / self.cutoff * torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype()))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r[:, None]
        return math.sqrt(2.0 / self.cutoff) * torch.sin(self.freqs * r) / r


class PolynomialEnvelope(nn.Module):
    """u(x) = 1 − (p+1)(p+2)/2 xᵖ + p(p+2) xᵖ⁺¹ − p(p+1)/2 xᵖ⁺², x = r/r_c, and 0 beyond r_c.

    u, u′ and u″ vanish at the cutoff, so energies and forces are smooth as neighbours leave.
    """

    def __init__(self, cutoff: float, p: int = 5):
        super().__init__()
        self.cutoff, self.p = float(cutoff), int(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p, x = self.p, r / self.cutoff
        u = 1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
        return u * (x < 1.0)


class RadialMLP(nn.Module):
    """Radial basis [E, B] → per-edge weights [E, out] (SiLU MLP)."""

    def __init__(self, num_basis: int, hidden: int, out: int, layers: int = 3):
        super().__init__()
        dims = [num_basis] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.SiLU()]
        mods.append(nn.Linear(dims[-1], out, bias=False))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, envelope: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [E, B] → [E, out]; with ``envelope`` [E], the output times the envelope, applied to the last
        hidden layer (the output layer has no bias): E × hidden multiplies instead of E × out."""
        last = len(self.net) - 1
        for k, layer in enumerate(self.net):  # TorchScript: a Sequential cannot be sliced
            if k == last and envelope is not None:
                x = x * envelope[:, None]
            x = layer(x)
        return x
