"""Energy → forces and stress by automatic differentiation (the energy model never mentions forces).

Stress follows ASE: σ = (1/V) ∂E/∂ε for a homogeneous strain r → r (I + ε), cell → cell (I + ε),
in eV/Å³, for fully periodic structures. Open structures and slabs (pbc = [True, True, False]) get a
zero stress row: their volume is not defined by the atoms (a slab's cell volume is mostly the vacuum
the user chose), so σ would be a number without meaning. The virial W = −∂E/∂ε (eV), which needs no
volume, comes with the stress for every structure: W = −V σ for a periodic cell, and for a slab or an
open structure what an MD engine divides by its own box volume for the pressure (a slab's lateral
pressure under a barostat in x and y).
"""

from __future__ import annotations

from typing import Callable

import torch

from .ewald.kernels import cell_volume
from .graph import Graph

__all__ = ["with_derivatives", "stress_from_strain_gradient"]


def with_derivatives(energy_fn: Callable[[Graph, torch.Tensor, torch.Tensor], dict], graph: Graph, *,
                     compute_forces: bool = True, compute_stress: bool = False, create_graph: bool = False,
                     compute_born_charges: bool = False) -> dict:
    """Call ``energy_fn(graph, positions, cell)`` (→ dict with "energy" [B]) and add forces/stress.

    positions [N, 3] and cell [B, 3, 3] passed to energy_fn carry the graph for the derivatives.
    Optional entries of energy_fn's dict that this function reads:

    * "force_only_energy" [B] (eV): a term whose −∂/∂r is added to the forces but which is neither part
      of "energy" nor of the stress (the field force Z*ᵀE of a periodic cell); removed from the result.
    * "dipole" [B, 3] (e·Å): with ``compute_born_charges``, "born_charges" [N, 3, 3] (e),
      Z*_i,ab = ∂P_a/∂r_ib (one backward pass per component a).
    """
    if (compute_forces or compute_stress or compute_born_charges) and torch.is_inference_mode_enabled():
        # enable_grad cannot lift inference mode: autograd would fail deep inside with "element 0 of tensors does
        # not require grad"
        asked = [name for name, on in (("forces", compute_forces), ("stress", compute_stress),
                                       ("born_charges", compute_born_charges)) if on]
        raise RuntimeError(f"{', '.join(asked)} are derivatives of the energy by autograd, which "
                           "torch.inference_mode() switches off: call the model under torch.no_grad() instead (the "
                           "derivatives are still taken), or ask for the energy only (compute_forces=False, "
                           "compute_stress=False)")
    with torch.enable_grad():
        positions = graph.positions.detach().requires_grad_(compute_forces or compute_born_charges)
        cell = graph.cell.detach()
        strain = None
        if compute_stress:
            strain = torch.zeros_like(cell).requires_grad_(True)  # [B, 3, 3]
            positions_s = positions + torch.einsum("ni,nij->nj", positions, strain[graph.batch])
            cell = cell + cell @ strain
        else:
            positions_s = positions
        out = energy_fn(graph, positions_s, cell)
        extra = out.pop("force_only_energy", None)
        if compute_born_charges and "dipole" not in out:
            raise ValueError("born charges need a model that returns a dipole (a long-range model)")
        wrt = ([positions] if compute_forces else []) + ([strain] if compute_stress else [])
        later = compute_born_charges or (extra is not None and compute_forces)  # more backward passes follow
        if wrt:
            grads = torch.autograd.grad(out["energy"].sum(), wrt, create_graph=create_graph, allow_unused=True,
                                        retain_graph=True if later else None)
            grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
            if compute_forces:
                out["forces"] = -grads[0]
                if extra is not None:
                    (g,) = torch.autograd.grad(extra.sum(), positions, create_graph=create_graph,
                                               allow_unused=True, retain_graph=True if compute_born_charges else None)
                    if g is not None:
                        out["forces"] = out["forces"] - g
            if compute_stress:
                out["stress"] = stress_from_strain_gradient(graph, grads[-1])
                out["virial"] = -grads[-1]  # [B, 3, 3] eV, every structure
        if compute_born_charges:
            rows = []
            for a in range(3):  # Z*[:, a, :] = ∂P_a/∂r (P_a summed over structures: each atom is in one)
                (g,) = torch.autograd.grad(out["dipole"][:, a].sum(), positions, create_graph=create_graph,
                                           allow_unused=True, retain_graph=True if (a < 2 or create_graph) else None)
                rows.append(torch.zeros_like(positions) if g is None else g)
            out["born_charges"] = torch.stack(rows, dim=1)  # [N, 3, 3]
    return out


def stress_from_strain_gradient(graph: Graph, grad: torch.Tensor) -> torch.Tensor:
    """σ = (1/V) ∂E/∂ε [B, 3, 3] (eV/Å³) from ``grad`` = ∂E/∂ε [B, 3, 3]; zero rows for open structures and slabs."""
    volume = cell_volume(graph.cell)  # [B]
    periodic = graph.pbc.all(dim=1) & (volume > 0)
    safe = torch.where(periodic, volume, torch.ones_like(volume))
    return torch.where(periodic[:, None, None], grad / safe[:, None, None], 0.0)
