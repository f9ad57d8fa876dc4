"""Plain arrays of one or many structures → one :class:`cartlorem.graph.Graph` (needs no MD engine).

Engines hand over atoms as flat arrays: positions [N, 3], atomic numbers [N], a structure index
[N] and per-structure cells and boundary conditions. This module builds the same graph that
:func:`cartlorem.graph.atoms_to_graph` builds from ``ase.Atoms`` (the same neighbour list, the same
edge convention r_ij = x_j − x_i + shift @ cell with cell rows = lattice vectors), for all
structures at once, so the engine adapters only translate names and units.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..graph import Graph, check_charge_state, check_structure, home_cell_offsets, neighbour_list

__all__ = ["structures_to_graph"]


def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _as_integers(x, name: str) -> np.ndarray:
    """``x`` as int64, ValueError for values that are not whole numbers (a cast truncated 8.9 to oxygen)."""
    values = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if values.dtype.kind not in "iub":
        values = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(values) & (values == np.round(values))):
            bad = values[~(np.isfinite(values) & (values == np.round(values)))]
            raise ValueError(f"{name} must be whole numbers, got {bad[:5].tolist()}")
    return values.astype(np.int64)


def structures_to_graph(positions, numbers, cells, pbc, system_idx=None, *, cutoff: float,
                        total_charge=None, multiplicity=None, dtype: Optional[torch.dtype] = None,
                        charge_inputs: tuple = ("total_charge", "multiplicity")) -> Graph:
    """B structures given as concatenated arrays → one :class:`Graph` with edges within ``cutoff``.

    Args:
        positions: [N, 3] Å (torch tensor or array). A tensor keeps its device. Atoms outside the cell are
            fine: as :func:`cartlorem.graph.atoms_to_graph`, each is taken into its home cell along the periodic
            directions in float64 before any cast to ``dtype`` (no energy, force or stress changes; a float32
            model keeps its resolution for atoms far from the origin, e.g. of unwrapped trajectories).
        numbers: [N] atomic numbers.
        cells: [B, 3, 3] or [3, 3] (B = 1) Å, rows are lattice vectors (ASE / torch-sim
            ``row_vector_cell`` convention). Ignored (set to zero) for a structure that is
            periodic in no direction.
        pbc: [3] (the same for every structure), [B, 3] bool, or one bool.
        system_idx: [N] structure index of each atom, 0..B−1 (default: all atoms in structure 0).
            Atoms of one structure need not be contiguous.
        cutoff: neighbour cutoff in Å (the model's ``cutoff``).
        total_charge: [B] e, or None for neutral structures.
        multiplicity: [B] spin multiplicities 2S + 1, checked against the electron count; None (all) or a None
            entry (a list) for a structure whose spin is not given: a singlet, not checked, as ``atoms_to_graph``
            takes a structure without ``info["multiplicity"]``. Models with charge-state conditioning use it.
        dtype: floating dtype of the graph (default: that of ``positions`` if a tensor, else float64).
        charge_inputs: how the caller's user sets the total charge and the multiplicity, named in the messages
            of a charge state the atoms cannot have (e.g. torch-sim's "state.charge", "state.spin").

    Returns:
        Graph with positions [N, 3], species [N], batch [N], cell [B, 3, 3], pbc [B, 3],
        total_charge [B], multiplicity [B] (None when not given), edge_index [2, E], edge_shift [E, 3], all on the
        device of ``positions``.
    """
    device = positions.device if isinstance(positions, torch.Tensor) else torch.device("cpu")
    if dtype is None:
        dtype = positions.dtype if isinstance(positions, torch.Tensor) and positions.is_floating_point() \
            else torch.float64
    pos_np = _as_numpy(positions, np.float64)
    if pos_np.ndim != 2 or pos_np.shape[1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {list(pos_np.shape)}")
    n = pos_np.shape[0]
    z = _as_integers(numbers, "numbers").reshape(-1)
    if z.shape[0] != n:
        raise ValueError(f"numbers must have shape [{n}] like positions, got {list(z.shape)}")
    if n and (z.min() < 1 or z.max() > 118):  # before the charge check counts electrons from them
        bad = sorted(set(z[(z < 1) | (z > 118)].tolist()))
        raise ValueError(f"numbers must be atomic numbers 1..118, got {bad[:10]}")
    cells_np = _as_numpy(cells, np.float64).copy()  # rows of open structures are zeroed below
    if cells_np.shape == (3, 3):
        cells_np = cells_np[None]
    if cells_np.ndim != 3 or cells_np.shape[1:] != (3, 3):
        raise ValueError(f"cells must have shape [B, 3, 3], got {list(cells_np.shape)}")
    n_struct = cells_np.shape[0]
    if n_struct == 0:
        raise ValueError("no structures: cells has shape [0, 3, 3]; give one cell per structure")
    idx = np.zeros(n, dtype=np.int64) if system_idx is None else _as_integers(system_idx, "system_idx").reshape(-1)
    if idx.shape[0] != n:
        raise ValueError(f"system_idx must have shape [{n}] like positions, got {list(idx.shape)}")
    if n and (idx.min() < 0 or idx.max() >= n_struct):
        raise ValueError(f"system_idx must lie in 0..{n_struct - 1} (one entry per cell), "
                         f"got values {int(idx.min())}..{int(idx.max())}")
    pbc_np = np.asarray(_as_numpy(pbc, bool))
    if pbc_np.ndim == 0:
        pbc_np = np.full((n_struct, 3), bool(pbc_np))
    elif pbc_np.shape == (3,):
        pbc_np = np.broadcast_to(pbc_np, (n_struct, 3)).copy()
    if pbc_np.shape != (n_struct, 3):
        raise ValueError(f"pbc must be one bool, [3] or [{n_struct}, 3], got {list(pbc_np.shape)}")
    charge = np.zeros(n_struct) if total_charge is None else _as_numpy(total_charge, np.float64).reshape(-1)
    if charge.shape != (n_struct,):
        raise ValueError(f"total_charge must have shape [{n_struct}], got {list(charge.shape)}")
    spin = None
    if multiplicity is not None:
        spin = multiplicity.detach().cpu().reshape(-1).tolist() if isinstance(multiplicity, torch.Tensor) \
            else list(np.asarray(multiplicity, dtype=object).reshape(-1))
        if len(spin) != n_struct:
            raise ValueError(f"multiplicity must have shape [{n_struct}], got [{len(spin)}]")

    edges, shifts, home = [], [], np.zeros_like(pos_np)
    for b in range(n_struct):
        atoms_b = np.flatnonzero(idx == b)  # global indices of structure b's atoms, in order
        if len(atoms_b) == 0:
            raise ValueError(f"structure {b} has no atoms")
        if not pbc_np[b].any():
            cells_np[b] = 0.0
        label = f"structure {b}"
        check_structure(pos_np[atoms_b], cells_np[b], pbc_np[b], label=label)
        home[atoms_b] = home_cell_offsets(pos_np[atoms_b], cells_np[b], pbc_np[b])  # whole lattice vectors
        # as atoms_to_graph: Q finite, electrons >= 0; a multiplicity an integer >= 1 that the electrons allow
        check_charge_state(z[atoms_b], charge[b], None if spin is None else spin[b], label=label, where=charge_inputs)
        try:
            i, j, s = neighbour_list(pos_np[atoms_b] - home[atoms_b], cells_np[b], pbc_np[b], cutoff)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None
        edges.append(np.stack([atoms_b[i], atoms_b[j]]))
        shifts.append(s)

    as_float = dict(dtype=dtype, device=device)
    if isinstance(positions, torch.Tensor):  # differentiable in the given tensor, shifted in float64
        pos_t = (positions.to(torch.float64) - torch.as_tensor(home, device=device)).to(**as_float)
    else:
        pos_t = torch.tensor(pos_np - home, **as_float)
    return Graph(
        positions=pos_t,
        species=torch.tensor(z, dtype=torch.long, device=device),
        batch=torch.tensor(idx, dtype=torch.long, device=device),
        cell=torch.tensor(cells_np, **as_float),
        pbc=torch.tensor(pbc_np, dtype=torch.bool, device=device),
        total_charge=torch.tensor(charge, **as_float),
        multiplicity=None if spin is None else torch.tensor([1.0 if m is None else float(m) for m in spin], **as_float),
        edge_index=torch.tensor(np.concatenate(edges, axis=1), dtype=torch.long, device=device),
        edge_shift=torch.tensor(np.concatenate(shifts, axis=0), **as_float),
    )
