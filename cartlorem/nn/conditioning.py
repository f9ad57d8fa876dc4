"""Charge- and spin-state conditioning of the scalar node features (FiLM).

A purely local model sees only geometry, so two charge states of one geometry (Na8Cl8 and Na8Cl8⁺,
say) get the same energy. Here the total charge Q (e) and the spin multiplicity S = 2s + 1 of each
structure modulate the rank-0 features of its atoms, feature-wise (FiLM: Perez et al., AAAI 2018):

    h⁰_ic ← h⁰_ic · (1 + γ_{z_i c}(x_b)) + β_{z_i c}(x_b),   x_b = (Q_b, S_b − 1, Q_b / N_b, (S_b − 1) / N_b)

for atom i of species z_i in structure b with N_b atoms, γ and β one small MLP of x_b with an output
per (species, channel). The per-atom shares Q/N and (S − 1)/N let the model make the effect of an
extra electron intensive (independent of the structure's size) as well as extensive.

A structure with a periodic direction (a crystal, a slab) gets x_b = (0, 0, Q_b / N_b, (S_b − 1) / N_b): its
cell stands for an infinite system, and an m-fold supercell (charge m Q, m (S − 1) unpaired electrons) is the same
system, which must get m times the energy; Q and S − 1 of the cell alone would tell the two apart. (Files written
before this rule, format cartlorem-model-v3 and older, keep x_b of molecules for every structure: the buffer
``cells_per_atom`` is False for them, see :func:`cartlorem.model.upgrade_state_dict`.)

The MLP has no biases and SiLU activations (SiLU(0) = 0), so γ = β = 0 *exactly* at x = 0, i.e. for
neutral singlets: there the features, energies and forces are bit for bit those of the same model
without conditioning. Only rank-0 features are modulated (by invariants), so equivariance under
rotations and reflections is untouched.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["ChargeStateConditioning"]


class ChargeStateConditioning(nn.Module):
    """FiLM modulation of rank-0 features by total charge and spin multiplicity.

    Args:
        channels: C, the width of the rank-0 features.
        num_species: S, species known to the model (γ, β are per species and channel).
        hidden: width of the two hidden layers of the bias-free MLP (default 16).
    """

    def __init__(self, channels: int, num_species: int, hidden: int = 16):
        super().__init__()
        self.channels = int(channels)
        self.num_species = int(num_species)
        # no biases anywhere and SiLU(0) = 0: the output is exactly 0 for a zero input
        self.net = nn.Sequential(
            nn.Linear(4, hidden, bias=False), nn.SiLU(),
            nn.Linear(hidden, hidden, bias=False), nn.SiLU(),
            nn.Linear(hidden, 2 * self.num_species * self.channels, bias=False),
        )
        # periodic structures take the per-atom inputs only (module docstring); False: every structure all four
        self.register_buffer("cells_per_atom", torch.ones((), dtype=torch.bool))

    def inputs(self, batch: torch.Tensor, total_charge: torch.Tensor,
               multiplicity: Optional[torch.Tensor], dtype: torch.dtype,
               pbc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, 4] = (Q, S − 1, Q/N, (S − 1)/N) per structure, (0, 0, Q/N, (S − 1)/N) for one with a periodic
        direction (pbc [B, 3]; None: all open); multiplicity None means singlets."""
        q = total_charge.to(dtype)  # [B] e
        if multiplicity is None:
            s = torch.zeros_like(q)
        else:
            s = multiplicity.to(dtype) - 1.0  # [B] unpaired electrons
        n = torch.zeros_like(q).index_add(0, batch, torch.ones_like(batch, dtype=dtype))  # [B] atoms
        n = n.clamp(min=1.0)
        x = torch.stack([q, s, q / n, s / n], dim=-1)
        if pbc is not None:  # a cell: the extensive inputs would tell it from its supercells
            extensive = (~(pbc.any(dim=1) & self.cells_per_atom)).to(dtype)  # [B]
            x = torch.cat([x[:, :2] * extensive[:, None], x[:, 2:]], dim=1)
        return x

    def forward(self, h0: torch.Tensor, species: torch.Tensor, batch: torch.Tensor, total_charge: torch.Tensor,
                multiplicity: Optional[torch.Tensor] = None, pbc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Modulated rank-0 features [N, C].

        h0 [N, C] rank-0 features; species [N] model species indices (0..S−1); batch [N] structure of each
        atom; total_charge [B] (e); multiplicity [B] (2s + 1; None: all singlets); pbc [B, 3] bool (None: all
        structures open).
        """
        x = self.inputs(batch, total_charge, multiplicity, h0.dtype, pbc)  # [B, 4]
        film = self.net(x).reshape(-1, 2, self.channels)  # [B·S, 2, C]
        film = film[batch * self.num_species + species]  # [N, 2, C]
        return h0 * (1.0 + film[:, 0]) + film[:, 1]
