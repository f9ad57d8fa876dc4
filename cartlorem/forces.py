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

from typing import Callable, Optional

import torch

from .ewald.kernels import cell_volume
from .graph import Graph

__all__ = ["with_derivatives", "born_charges", "born_forces", "stress_from_strain_gradient"]


def with_derivatives(energy_fn: Callable[[Graph, torch.Tensor, torch.Tensor], dict], graph: Graph, *,
                     compute_forces: bool = True, compute_stress: bool = False, create_graph: bool = False,
                     compute_born_charges: bool = False, electric_field: Optional[torch.Tensor] = None,
                     dipole_origin: Optional[torch.Tensor] = None) -> dict:
    """Call ``energy_fn(graph, positions, cell)`` (→ dict with "energy" [B]) and add forces/stress.

    positions [N, 3] and cell [B, 3, 3] passed to energy_fn carry the graph for the derivatives.
    Optional entries of energy_fn's dict that this function reads, for the Born charges
    (:func:`born_charges`): "dipole" [B, 3] (e·Å), "charges" [N] (e) and "dipoles" [N, 3] (e·Å; absent for
    lmax 0). With ``compute_born_charges``, "born_charges" [N, 3, 3] (e). ``electric_field`` [B, 3] (V/Å):
    periodic cells and slabs get the forces F_i += Z*_iᵀE (their energy has no field term: P is not defined);
    an open structure's field term −P·E is energy_fn's to put in its energy. ``dipole_origin`` [B, 3] (Å): the
    origin o of P for open structures (default 0).
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
        extended = graph.pbc.any(dim=1)  # [B] periodic cells and slabs
        field_force = compute_forces and electric_field is not None and bool(extended.any())
        want_z = compute_born_charges or field_force
        if want_z and "dipole" not in out:
            raise ValueError("born charges need a model that returns a dipole (a long-range model)")
        wrt = ([positions] if compute_forces else []) + ([strain] if compute_stress else [])
        if wrt:
            grads = torch.autograd.grad(out["energy"].sum(), wrt, create_graph=create_graph, allow_unused=True,
                                        retain_graph=True if want_z else None)
            grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
            if compute_forces:
                out["forces"] = -grads[0]
            if compute_stress:
                out["stress"] = stress_from_strain_gradient(graph, grads[-1])
                out["virial"] = -grads[-1]  # [B, 3, 3] eV, every structure
        if compute_born_charges:
            z = born_charges(graph, positions, out, dipole_origin=dipole_origin, create_graph=create_graph)
            out["born_charges"] = z
            if field_force:  # F_i += Z*_iᵀE on the atoms of periodic cells and slabs
                f = torch.einsum("nab,na->nb", z, electric_field.to(z.dtype).index_select(0, graph.batch))
                out["forces"] = out["forces"] + torch.where(extended[graph.batch][:, None], f, torch.zeros_like(f))
        elif field_force:
            out["forces"] = out["forces"] + born_forces(graph, positions, out, electric_field,
                                                        create_graph=create_graph)
    return out


def _grad(objective: torch.Tensor, positions: torch.Tensor, create_graph: bool, retain: bool) -> torch.Tensor:
    (g,) = torch.autograd.grad(objective, positions, create_graph=create_graph, allow_unused=True,
                               retain_graph=True if (retain or create_graph) else None)
    return torch.zeros_like(positions) if g is None else g


def born_charges(graph: Graph, positions: torch.Tensor, out: dict, *, dipole_origin: Optional[torch.Tensor] = None,
                 create_graph: bool = False) -> torch.Tensor:
    """Born effective charges Z*_i,ab = q_i δ_ab + ∂(Σ_j μ_j,a)/∂r_ib + Σ_j d_a(i → j) ∂q_j/∂r_ib [N, 3, 3] (e)
    of the charges q ("charges" [N]) and dipoles μ ("dipoles" [N, 3]) in ``out``, functions of ``positions``.

    Open structures: d(i → j) = r_j − o, so that Z* = ∂P/∂r of P = Σ_j q_j (r_j − o) + μ_j (o
    ``dipole_origin`` [B, 3], default 0; from "dipole" [B, 3], three backward passes when no structure is
    periodic).

    Periodic cells and slabs, where P is not defined: the charge that flows to atom j when atom i moves is counted
    at its displacement from i in a smooth periodic form, d(i → j) = Σ_m a_m g(Δs_m) over the periodic rows a_m of
    :func:`transfer_basis` (Δs_m = s_j,m − s_i,m, fractional coordinates; linear, a_m Δs_m, along a slab's open row,
    taken normal to the plane), g(x) = Σ_k c_k sin(2πkx)/2π with the weights :data:`PERIODIC_FORM`, equal to x but
    for O(x⁷). (The latent-Ewald Born charges, Zhong et al. 2025, take one sine, sin(2πx)/2π.) Z* then depends
    neither on the lattice image each position is taken in nor on a rigid translation (r_j itself, as in the open
    formula, made Z* jump by R ∂q_j/∂r_i where an atom crossed a cell face, and move with the distance to the cell's
    centre under charge correction). The price is accuracy in small cells, where atoms whose charges depend on each
    other are a sizeable fraction of the cell apart; atoms half a cell apart drop out. Measured on rocksalt NaCl
    with a random model (reach 4 Å; session 43), the charge-transfer part of Z*_xx(Na) converges to −0.0161 e; it is
    +0.0048 in the 2- and 8-atom cells (the wrong sign), −0.0147 at 64 atoms, −0.0159 at 216 and −0.0160 at 512 (one
    sine: −0.0085, −0.0125, −0.0140). The model warns below plane spacings of twice its reach; compute Z* of a small
    cell in a supercell. The acoustic sum rule Σ_i Z*_i = Q I is imposed per structure by sharing the excess evenly:
    that excess is not small, as the uniform background of the charge correction has no defined dipole in a crystal
    (the exact displacement would give it −(1/N) ∂Q̃/∂ε, the strain response of the uncorrected total charge Q̃,
    which the periodic form misses); in the 64- and 216-atom NaCl cells above, 0.058 and 0.062 e per atom (−(1/N)
    ∂Q̃/∂ε: 0.063), against at most 0.018 and 0.019 e of Z* − q I after it. 3 + 6 × 3 = 21 backward passes.
    """
    batch = graph.batch
    extended = graph.pbc.any(dim=1)  # [B]
    if not bool(extended.any()):
        rows = [_grad(out["dipole"][:, a].sum(), positions, create_graph, a < 2) for a in range(3)]
        return torch.stack(rows, dim=1)  # Z*[:, a, :] = ∂P_a/∂r (P_a summed over structures: each atom is in one)
    q, mu = out["charges"], out.get("dipoles")
    eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
    basis, terms = _transfer_terms(graph, positions, dipole_origin)
    x = [torch.zeros_like(positions) for _ in range(3)]  # per cell row m: [N, 3 (b)]
    for m, alpha, beta, u, v in terms:
        gu = _grad((u * q).sum(), positions, create_graph, True)  # [N, 3]
        gv = _grad((v * q).sum(), positions, create_graph, True)
        x[m] = x[m] + alpha[:, None] * gu - beta[:, None] * gv
    transfer = torch.einsum("nma,nmb->nab", basis.index_select(0, batch), torch.stack(x, dim=1))  # [N, a, b]
    z = q[:, None, None] * eye + transfer
    if mu is not None:
        z = z + torch.stack([_grad(mu[:, a].sum(), positions, create_graph, a < 2) for a in range(3)], dim=1)
    # the acoustic sum rule on periodic cells and slabs: Σ_i Z*_i = Q I, the excess shared evenly
    return z - _excess(graph, z, q[:, None, None] * eye)


def born_forces(graph: Graph, positions: torch.Tensor, out: dict, electric_field: torch.Tensor, *,
                create_graph: bool = False) -> torch.Tensor:
    """Z*_iᵀE [N, 3] (eV/Å) of :func:`born_charges` for the field ``electric_field`` [B, 3] (V/Å), without the
    full tensors: one backward pass for the dipoles and six for each cell row with a_m·E ≠ 0 (seven for a field
    normal to two of the rows, nineteen at most), where Z* takes 21. Rows of open structures are zero (their field
    force is the gradient of −P·E, in the energy)."""
    batch = graph.batch
    extended = graph.pbc.any(dim=1)[batch]  # [N]
    field = torch.where(extended[:, None], electric_field.to(positions.dtype).index_select(0, batch), 0.0)  # [N, 3]
    q, mu = out["charges"], out.get("dipoles")
    basis, terms = _transfer_terms(graph, positions, None)
    along = torch.einsum("nma,na->nm", basis.index_select(0, batch), field)  # [N, 3]: a_m·E
    f = q[:, None] * field
    terms = [t for t in terms if bool((along[:, t[0]] != 0).any())]
    if mu is not None:
        f = f + _grad((mu * field).sum(), positions, create_graph, bool(terms))
    for k, (m, alpha, beta, u, v) in enumerate(terms):
        gu = _grad((u * q).sum(), positions, create_graph, True)
        gv = _grad((v * q).sum(), positions, create_graph, k < len(terms) - 1)
        f = f + along[:, m, None] * (alpha[:, None] * gu - beta[:, None] * gv)
    f = f - _excess(graph, f, q[:, None] * field)  # Σ_i Z*_iᵀE = Q E
    return torch.where(extended[:, None], f, torch.zeros_like(f))


#: weights c_k of the periodic form g(x) = Σ_k c_k sin(2πkx) / 2π of a fractional displacement x: equal to x but
#: for O(x⁷) (one sine, the latent-Ewald form, leaves a relative (2πx)²/6: 22% of the charge transfer of a 216-atom
#: NaCl cell, where these three leave 1%)
PERIODIC_FORM = (3 / 2, -3 / 10, 1 / 30)


def _transfer_terms(graph: Graph, positions: torch.Tensor, dipole_origin: Optional[torch.Tensor]) -> tuple:
    """(basis [B, 3, 3], terms) of the charge transfer Σ_j d(i → j) ∂q_j/∂r_i = Σ_m a_m Σ_terms (α_i ∂U/∂r_i −
    β_i ∂V/∂r_i), U = Σ_j u_j q_j, V = Σ_j v_j q_j, each term (m, α, β, u, v) with [N] weights: along periodic rows
    c_k sin(k(θ_j − θ_i))/2π = c_k (sin kθ_j cos kθ_i − cos kθ_j sin kθ_i)/2π, θ = 2π s (:data:`PERIODIC_FORM`);
    along linear rows s_j − s_i (a slab's open row) or r_j − o (open structures, whose rows are the Cartesian axes),
    in the first term of the row."""
    batch = graph.batch
    extended = graph.pbc.any(dim=1)  # [B]
    dtype = positions.dtype
    basis = transfer_basis(graph, dtype)
    s = torch.einsum("na,nam->nm", positions.detach(), torch.linalg.inv(basis).index_select(0, batch))  # fractional
    periodic = graph.pbc[batch]  # [N, 3]: the periodic rows of each atom's structure (open: none)
    ref = torch.where(extended[batch][:, None], s, torch.zeros_like(s) if dipole_origin is None else
                      dipole_origin.to(dtype).index_select(0, batch))
    zero, one = torch.zeros_like(s), torch.ones_like(s)
    terms = []
    for k, c in enumerate(PERIODIC_FORM, start=1):
        theta = 2 * torch.pi * k * s
        sin, cos = torch.sin(theta), torch.cos(theta)
        u = torch.where(periodic, sin, s if k == 1 else zero)
        v = torch.where(periodic, cos, one if k == 1 else zero)
        alpha = torch.where(periodic, c * cos / (2 * torch.pi), one if k == 1 else zero)
        beta = torch.where(periodic, c * sin / (2 * torch.pi), ref if k == 1 else zero)
        terms += [(m, alpha[:, m], beta[:, m], u[:, m], v[:, m]) for m in range(3)
                  if k == 1 or bool(periodic[:, m].any())]
    return basis, terms


def transfer_basis(graph: Graph, dtype: torch.dtype) -> torch.Tensor:
    """[B, 3, 3] rows a_m along which the charge transfer of :func:`born_charges` is measured: the cell of a periodic
    cell, a slab's cell with its open row replaced by the part normal to the plane (its tilt is a convention, which
    changes no energy), the Cartesian axes for an open structure."""
    cell = graph.cell.to(dtype).detach()
    normal = torch.linalg.cross(cell[:, 0], cell[:, 1])  # [B, 3]
    normal = normal / torch.linalg.vector_norm(normal, dim=-1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)
    upright = (cell[:, 2] * normal).sum(-1, keepdim=True) * normal
    slab = graph.pbc[:, 0] & graph.pbc[:, 1] & ~graph.pbc[:, 2]
    cell = torch.cat([cell[:, :2], torch.where(slab[:, None], upright, cell[:, 2])[:, None]], dim=1)
    eye = torch.eye(3, dtype=dtype, device=cell.device)
    return torch.where(graph.pbc.any(dim=1)[:, None, None], cell, eye)


def periodic_plane_spacings(graph: Graph) -> torch.Tensor:
    """[B, 3] (Å) the spacing of the lattice planes of each periodic row of :func:`transfer_basis` (1 / |b_m|),
    inf for open rows: the scale against which :func:`born_charges` measures the charge transfer."""
    basis = transfer_basis(graph, torch.float64)
    spacing = 1.0 / torch.linalg.vector_norm(torch.linalg.inv(basis), dim=-2)  # columns of inv: the b_m
    return torch.where(graph.pbc, spacing, torch.full_like(spacing, float("inf")))


def _excess(graph: Graph, value: torch.Tensor, ideal: torch.Tensor) -> torch.Tensor:
    """Per atom, (Σ_i value_i − Σ_i ideal_i) / N of its structure for periodic cells and slabs, 0 for open ones."""
    batch = graph.batch
    shape = (graph.num_graphs,) + tuple(value.shape[1:])
    total = torch.zeros(shape, dtype=value.dtype, device=value.device).index_add(0, batch, value - ideal)
    count = graph.num_atoms.to(value.dtype)
    per_structure = (-1,) + (1,) * (value.dim() - 1)
    excess = torch.where(graph.pbc.any(dim=1).reshape(per_structure), total / count.clamp(min=1).reshape(per_structure),
                         0.0)
    return excess.index_select(0, batch)


def stress_from_strain_gradient(graph: Graph, grad: torch.Tensor) -> torch.Tensor:
    """σ = (1/V) ∂E/∂ε [B, 3, 3] (eV/Å³) from ``grad`` = ∂E/∂ε [B, 3, 3]; zero rows for open structures and slabs."""
    volume = cell_volume(graph.cell)  # [B]
    periodic = graph.pbc.all(dim=1) & (volume > 0)
    safe = torch.where(periodic, volume, torch.ones_like(volume))
    return torch.where(periodic[:, None, None], grad / safe[:, None, None], 0.0)
