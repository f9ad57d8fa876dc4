"""Atoms → graph: positions, species, cell, pbc, total charge and the edges i → j within the cutoff.

One :class:`Graph` holds one structure or a batch of many (atoms concatenated, ``batch`` maps each
atom to its structure). Edges are directed: ``edge_index[0]`` is the centre atom i that receives the
message, ``edge_index[1]`` the neighbour j, and the edge vector is

    r_ij = positions[j] − positions[i] + edge_shift[e] @ cell[batch[i]]

with ``edge_shift`` the integer lattice image (n1, n2, n3) stored as floats. Neighbour lists come
from vesin (a C++ cell list, checked against ``ase.neighborlist`` in the tests); it handles mixed
boundary conditions, triclinic cells and cutoffs larger than the cell (several images).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["Graph", "atoms_to_graph", "collate", "neighbour_list", "check_structure", "check_charge_state",
           "home_cell_offsets", "wrapped_slab", "info_charge_state", "CHARGE_KEYS", "MULTIPLICITY_KEYS"]

_MIN_DISTANCE = 0.1  # Å: two atoms (or an atom and an image) closer than this are a user error


@dataclass
class Graph:
    """A batch of B structures with N atoms and E directed edges in total.

    positions [N, 3] Å; species [N] atomic numbers (long); batch [N] structure index (long);
    cell [B, 3, 3] Å, rows are lattice vectors (zeros for open structures); pbc [B, 3] bool;
    total_charge [B] e; edge_index [2, E] (centre i, neighbour j); edge_shift [E, 3] integer
    lattice images as floats. Optional reference labels: energy [B] eV, forces [N, 3] eV/Å,
    stress [B, 3, 3] eV/Å³ (ASE sign convention), with has_* masks [B] telling which are present.
    Charge labels (open structures only for the dipole): dipole [B, 3] e·Å (about the coordinate
    origin), born_charges [N, 3, 3] e (Z*_i,ab = ∂P_a/∂r_ib), masks has_dipole / has_born_charges [B].
    """

    positions: torch.Tensor
    species: torch.Tensor
    batch: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    total_charge: torch.Tensor
    edge_index: torch.Tensor
    edge_shift: torch.Tensor
    energy: Optional[torch.Tensor] = None
    forces: Optional[torch.Tensor] = None
    stress: Optional[torch.Tensor] = None
    has_energy: Optional[torch.Tensor] = None
    has_forces: Optional[torch.Tensor] = None
    has_stress: Optional[torch.Tensor] = None
    # charge and spin state: multiplicity [B] = 2s + 1 (float; None: every structure a singlet), read from
    # atoms.info["multiplicity"] (default 1); with total_charge the input of charge-state conditioning
    multiplicity: Optional[torch.Tensor] = None
    # per-structure weight of every training-loss term [B] (float; None: 1 for all), read from MACE's
    # atoms.info["config_weight"] (cartlorem.data.read_dataset)
    weight: Optional[torch.Tensor] = None
    # per-structure weights of the energy, forces and stress terms [B, 3] (float; None: 1), MACE's
    # atoms.info config_energy_weight, config_forces_weight, config_stress_weight; they multiply ``weight``
    term_weight: Optional[torch.Tensor] = None
    # charge labels (cartlorem.data.attach_charge_labels)
    dipole: Optional[torch.Tensor] = None
    born_charges: Optional[torch.Tensor] = None
    has_dipole: Optional[torch.Tensor] = None
    has_born_charges: Optional[torch.Tensor] = None

    @property
    def num_graphs(self) -> int:
        return self.cell.shape[0]  # not int(...): under torch.compile a symbolic size, not a constant

    @property
    def num_atoms(self) -> torch.Tensor:
        """[B] number of atoms per structure."""
        return torch.bincount(self.batch, minlength=self.num_graphs)

    def to(self, device=None, dtype=None) -> "Graph":
        """Move to a device and cast floating tensors to ``dtype`` (integer/bool tensors keep theirs)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if v.is_floating_point() and dtype is not None:
                    v = v.to(device=device, dtype=dtype)
                else:
                    v = v.to(device=device)
            out[f.name] = v
        return Graph(**out)

    def replace(self, **changes) -> "Graph":
        return replace(self, **changes)

    def edge_vectors(self, positions: Optional[torch.Tensor] = None, cell: Optional[torch.Tensor] = None):
        """r_ij [E, 3] for the given (possibly strained, grad-carrying) positions and cell."""
        positions = self.positions if positions is None else positions
        cell = self.cell if cell is None else cell
        i, j = self.edge_index
        shift = torch.einsum("ek,ekx->ex", self.edge_shift, cell[self.batch[i]])  # [E, 3]
        return positions[j] - positions[i] + shift


def check_structure(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, label: str = "structure"
) -> None:
    """Raise ValueError for NaN/inf positions or cell, or a singular cell along periodic directions.

    positions [N, 3] Å; cell [3, 3] Å (rows are lattice vectors); pbc [3] bool. Only the lattice
    vectors of periodic directions must be linearly independent (a slab may have a zero third
    row). Overlapping atoms are found by :func:`neighbour_list`, which sees every pair and image.
    """
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"{label}: positions must have shape [N, 3], got {list(positions.shape)}")
    if positions.shape[0] == 0:
        raise ValueError(f"{label}: structure has no atoms")
    if not np.all(np.isfinite(positions)):
        bad = np.argwhere(~np.isfinite(positions).all(axis=1)).ravel()
        raise ValueError(f"{label}: positions contain NaN or inf (atoms {bad[:10].tolist()})")
    if cell.shape != (3, 3) or pbc.shape != (3,):
        raise ValueError(
            f"{label}: cell must be [3, 3] and pbc [3], got {list(cell.shape)} and {list(pbc.shape)}"
        )
    if not np.all(np.isfinite(cell)):
        raise ValueError(f"{label}: cell contains NaN or inf")
    if np.any(pbc) and bool(flat_periodic_cells(torch.from_numpy(cell)[None], torch.from_numpy(pbc)[None])[0]):
        raise flat_cell_error(label, cell.tolist(), pbc.tolist())


def flat_periodic_cells(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """[B] bool: structures whose periodic cell rows (cell [B, 3, 3], pbc [B, 3]) span no length, area or volume:
    the square root of their Gram determinant at most 1e-6 of the product of their lengths (scale free; NaN counts
    as flat). In float64 whatever the cell's dtype: float32's rounding (1e-7 of the determinant) let half of flat
    cells by."""
    with torch.no_grad():
        cell = cell.double()
        rows = cell * pbc[..., None].to(cell.dtype)  # the open directions' rows zero ...
        gram = rows @ rows.transpose(1, 2) + torch.diag_embed((~pbc).to(cell.dtype))  # ... and 1 on the diagonal
        lengths2 = torch.where(pbc, (rows * rows).sum(-1), torch.ones_like(cell[..., 0]))
        return pbc.any(dim=1) & ~(torch.linalg.det(gram) > 1e-12 * lengths2.prod(dim=1))


def flat_cell_error(label: str, cell: list, pbc: list) -> ValueError:
    """The error for a structure that :func:`flat_periodic_cells` finds flat (cell and pbc as lists)."""
    what = {1: "length", 2: "area", 3: "volume"}[sum(bool(p) for p in pbc)]
    return ValueError(f"{label}: periodic cell has zero {what} along the periodic directions (pbc = {pbc}, "
                      f"cell = {cell})")


def wrapped_slab(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> Optional[tuple[float, float]]:
    """(gap, across) in Å when a slab (one open direction) looks wrapped across its open cell vector, else None.

    A periodic code wraps every coordinate into the cell, so a slab near a face of the cell comes in two parts:
    atoms near the bottom face and atoms near the top one, the vacuum between them (``gap``, the widest empty
    layer along the normal of the periodic plane) and only ``across`` (the distance through the faces) apart. With
    the third direction open the model then sees two half-slabs, a vacuum apart. Flagged when the widest gap is
    over 3 Å and more than twice the distance across the faces; a slab in one piece, or two slabs with vacuum on
    both sides, is not."""
    pbc = np.asarray(pbc, dtype=bool)
    if int(pbc.sum()) != 2 or len(positions) < 2:
        return None
    cell = np.asarray(cell, dtype=np.float64)
    a, b = cell[pbc]
    normal = np.cross(a, b)
    normal = normal / max(float(np.linalg.norm(normal)), 1e-300)  # unit normal of the periodic plane
    height = abs(float(cell[~pbc][0] @ normal))
    z = np.sort(np.asarray(positions, dtype=np.float64) @ normal)
    across = height - float(z[-1] - z[0])
    gap = float(np.max(np.diff(z)))
    if height < 1e-6 or across < 0:  # no cell height along the open direction, or atoms that span more: no period
        return None
    return (gap, across) if gap > 3.0 and gap > 2.0 * across else None


#: atoms.info keys of a structure's total charge (e), in order of precedence: cartlorem's and MACE's, fairchem's
CHARGE_KEYS = ("total_charge", "charge")
#: atoms.info keys of its spin multiplicity 2S + 1: cartlorem's, MACE's (mace-torch >= 0.3.14), fairchem's
MULTIPLICITY_KEYS = ("multiplicity", "total_spin", "spin")


def info_charge_state(info, label: str = "structure") -> tuple:
    """(total charge, multiplicity) as ``info`` (an ``atoms.info``) gives them, unconverted: the first of
    :data:`CHARGE_KEYS` (default 0.0) and of :data:`MULTIPLICITY_KEYS` (default None, not given; MACE's
    ``total_spin`` and fairchem's ``spin`` are 2S + 1 as ``multiplicity``; fairchem's ``spin`` 0, its default, is
    not given). ValueError naming ``label`` when two keys of one quantity disagree (a file converted from one code
    to another: which one holds is not for us to guess)."""
    out = []
    for keys, default in ((CHARGE_KEYS, 0.0), (MULTIPLICITY_KEYS, None)):
        # fairchem's (and torch-sim's) spin 0 means "not given" (their default for data without a spin state)
        given = [(k, info[k]) for k in keys if info.get(k) is not None
                 and not (k == "spin" and _same_number(info[k], 0))]
        for k, v in given[1:]:
            if not _same_number(v, given[0][1]):
                raise ValueError(f"{label}: atoms.info {given[0][0]}={given[0][1]!r} and {k}={v!r} disagree (both "
                                 f"give the {'total charge' if keys is CHARGE_KEYS else 'spin multiplicity 2S + 1'}); "
                                 "keep one of them")
        out.append(given[0][1] if given else default)
    return tuple(out)


def _same_number(a, b) -> bool:
    try:
        return float(a) == float(b) and isinstance(a, (bool, np.bool_)) == isinstance(b, (bool, np.bool_))
    except (TypeError, ValueError):
        return repr(a) == repr(b)


def check_charge_state(numbers, total_charge: float, multiplicity: Optional[float] = None,
                       label: str = "structure",
                       where: tuple = ("atoms.info['total_charge'] or ['charge']", "atoms.info['multiplicity']")
                       ) -> None:
    """Raise ValueError unless the charge and spin state can be that of the atoms ``numbers`` [N].

    total_charge Q (e) must be finite; multiplicity 2s + 1 an integer ≥ 1. When Q is an integer, the
    electron count n = Σ Z − Q must be ≥ 0, hold at least multiplicity − 1 unpaired electrons and
    have the parity of multiplicity − 1 (an even count pairs into singlets, triplets, …; an odd one
    into doublets, quartets, …). A fractional Q (a model charge) skips the electron-count checks.
    multiplicity None (not given): only Q is checked (finite; n ≥ 0 when Q is an integer). ``where``: the inputs
    that set Q and the multiplicity, which the messages name (default: ASE's atoms.info entries).
    """
    q = float(total_charge)
    if not np.isfinite(q):
        raise ValueError(f"{label}: total_charge must be a finite number of e, got {total_charge!r}")
    m = None if multiplicity is None else float(multiplicity)
    if m is not None and not (np.isfinite(m) and m >= 1 and m == round(m)):
        raise ValueError(f"{label}: multiplicity (2S+1) must be an integer >= 1, got {multiplicity!r}")
    if abs(q - round(q)) > 1e-6:
        return
    electrons = int(np.sum(np.asarray(numbers, dtype=np.int64))) - int(round(q))
    if electrons < 0:
        raise ValueError(f"{label}: total_charge {q:g} exceeds the nuclear charge {electrons + int(round(q))} "
                         f"(a negative number of electrons); check the total charge ({where[0]})")
    if m is None:
        return
    unpaired = int(round(m)) - 1
    if unpaired > electrons or (electrons - unpaired) % 2:
        parity = "even" if electrons % 2 == 0 else "odd"
        allowed = "1, 3, 5, …" if electrons % 2 == 0 else "2, 4, 6, …"
        raise ValueError(
            f"{label}: multiplicity {int(round(m))} does not match the electron count: Σ Z − Q = "
            f"{electrons + int(round(q))} − ({q:g}) = {electrons} electrons ({parity}) allow multiplicity {allowed} "
            f"(up to {electrons + 1}); check {where[1]} and {where[0]}")


#: the oldest vesin that takes ``periodic`` per direction: 0.3 reads a list of three bools as one True, so a slab was
#: listed as a crystal (pairs through its vacuum, a changed energy) with no error
VESIN_MIN = (0, 4)


@functools.lru_cache(maxsize=1)
def vesin_module():
    """The vesin module, or ImportError when the installed one is older than VESIN_MIN."""
    import vesin

    version = getattr(vesin, "__version__", "0")
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0, 0]
    if tuple(parts[:2]) < VESIN_MIN:
        raise ImportError(f"cartlorem needs vesin >= {VESIN_MIN[0]}.{VESIN_MIN[1]} (installed: {version}, which takes "
                          "the boundary conditions as one bool and lists slabs as crystals): "
                          f"pip install -U 'vesin>={VESIN_MIN[0]}.{VESIN_MIN[1]}'")
    return vesin


def neighbour_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    """Full neighbour list of one structure: (i [E], j [E], shifts [E, 3] int), |r_ij| ≤ cutoff.

    positions [N, 3] Å; cell [3, 3] Å (rows are lattice vectors; ignored when no direction is
    periodic); pbc [3] bool; cutoff Å. r_ij = positions[j] − positions[i] + shifts @ cell. Cutoffs
    larger than the cell give several images. Pairs are directed and both (i, j) and (j, i)
    appear; an atom is its own neighbour only through a non-zero lattice image.
    """
    vesin = vesin_module()
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be a positive number of Å, got {cutoff}")
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    box = np.array(cell, dtype=np.float64) if np.any(pbc) else np.zeros((3, 3))
    search = float(cutoff)
    if not np.any(pbc) and len(positions):
        # every pair of an open structure is within its bounding box's diagonal: a larger cutoff finds the same
        # pairs, but vesin's cell list grows as its cube (a 1e6 Å cutoff ran for days on a 17-atom molecule)
        search = min(search, float(np.linalg.norm(np.ptp(positions, axis=0))) + 1.0)
    # vesin wants an invertible box along periodic directions only; zero rows are fine when not periodic
    try:
        nl = vesin.NeighborList(cutoff=search, full_list=True)
        i, j, s, d = nl.compute(points=positions, box=box, periodic=pbc.tolist(), quantities="ijSd")
    except RuntimeError as err:  # e.g. "cutoff is too small" below ~1e-5 Å
        raise ValueError(f"cutoff {cutoff} Å: the neighbour list refuses it ({err})") from None
    if len(d) and d.min() < _MIN_DISTANCE:
        k = int(np.argmin(d))
        if i[k] == j[k]:  # an atom and its own periodic image: the cell is too short along a periodic direction
            raise ValueError(f"atom {int(i[k])} is {float(d[k]):.2e} Å from its own periodic image (lattice shift "
                             f"{s[k].tolist()}): the cell is too short along a periodic direction")
        raise ValueError(
            f"atoms {int(i[k])} and {int(j[k])} are {float(d[k]):.2e} Å apart (overlapping atoms)"
        )
    return i.astype(np.int64), j.astype(np.int64), s.astype(np.int64)


def home_cell_offsets(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Whole lattice vectors that take each atom into its home cell along the periodic cell rows: [N, 3] Å,
    float64, zeros for open structures. Afterwards the position's fractional coordinates along those rows (of its
    component in their span) are in [0, 1): ASE's ``wrap`` for a fully periodic cell, and for a slab whose open
    row is normal to the plane.
    Subtracting them changes no result (energy, forces, stress, Born charges)."""
    positions, pbc = np.asarray(positions, dtype=np.float64), np.asarray(pbc, dtype=bool)
    if not np.any(pbc):
        return np.zeros_like(positions)
    lattice = np.asarray(cell, dtype=np.float64)[pbc]  # [P, 3] periodic lattice vectors
    return np.floor(positions @ np.linalg.pinv(lattice)) @ lattice


def atoms_to_graph(atoms, cutoff: float, *, dtype=torch.float64, label: Optional[str] = None,
                   wrap: bool = True) -> Graph:
    """One ``ase.Atoms`` → :class:`Graph` (B = 1) with edges within ``cutoff`` Å, without labels
    (``cartlorem.data.read_dataset`` attaches those). ``label`` names the structure in error
    messages (default: its chemical formula).

    Charge and spin state: ``atoms.info["total_charge"]`` (or ``"charge"``; e, default 0) and
    ``atoms.info["multiplicity"]`` (2s + 1, default 1). An integer total charge may not exceed the nuclear
    charge, and a multiplicity that is given must match the electron count (:func:`check_charge_state`;
    ValueError naming the structure otherwise).

    Positions along periodic directions are taken in their home cell (:func:`home_cell_offsets`, in float64 before
    any cast), as the ASE calculator takes them: float32 graphs of unwrapped trajectories keep their resolution
    along periodic directions (no result depends on the image). Open directions keep the positions as given (the
    dipole labels are about their origin), so a float32 graph of a molecule or slab 1e4 Å from the origin holds its
    atoms to ~1e-3 Å: keep such structures near the origin, or use float64 (the calculator shifts them itself).
    ``wrap=False`` keeps the positions as given (for callers that chose the images themselves).
    """
    positions = np.asarray(atoms.get_positions(), dtype=np.float64)
    pbc = np.asarray(atoms.get_pbc(), dtype=bool)
    cell = np.asarray(atoms.get_cell().array, dtype=np.float64)
    if not np.any(pbc):
        cell = np.zeros((3, 3))
    label = label or atoms.get_chemical_formula() or "structure"
    check_structure(positions, cell, pbc, label=label)
    if wrap:
        positions = positions - home_cell_offsets(positions, cell, pbc)
    charge, multiplicity = info_charge_state(atoms.info, label)  # multiplicity absent: 1, not checked
    try:
        if isinstance(charge, (bool, np.bool_)) or isinstance(multiplicity, (bool, np.bool_)):
            raise TypeError  # extxyz reads T / F as booleans: not 1 e or a multiplicity of 1
        charge, multiplicity = float(charge), (None if multiplicity is None else float(multiplicity))
    except (TypeError, ValueError):
        raise ValueError(f"{label}: total_charge and multiplicity must be numbers, got "
                         f"{charge!r} and {multiplicity!r}") from None
    check_charge_state(atoms.get_atomic_numbers(), charge, multiplicity, label=label)  # None: the charge only
    try:
        i, j, s = neighbour_list(positions, cell, pbc, cutoff)
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from None
    n = len(atoms)
    return Graph(
        positions=torch.tensor(positions, dtype=dtype),
        species=torch.tensor(atoms.get_atomic_numbers(), dtype=torch.long),
        batch=torch.zeros(n, dtype=torch.long),
        cell=torch.tensor(cell, dtype=dtype)[None],
        pbc=torch.tensor(pbc)[None],
        total_charge=torch.tensor([charge], dtype=dtype),
        edge_index=torch.tensor(np.stack([i, j]), dtype=torch.long),
        edge_shift=torch.tensor(s, dtype=dtype),
        multiplicity=torch.tensor([1.0 if multiplicity is None else multiplicity], dtype=dtype),
    )


def collate(graphs: Sequence[Graph]) -> Graph:
    """Concatenate graphs into one batch (atom and structure indices offset)."""
    if len(graphs) == 0:
        raise ValueError("cannot collate an empty list of graphs")
    if len(graphs) == 1:
        return graphs[0]
    offsets = np.cumsum([0] + [int(g.positions.shape[0]) for g in graphs[:-1]])
    struct_off = np.cumsum([0] + [g.num_graphs for g in graphs[:-1]])
    out = dict(
        positions=torch.cat([g.positions for g in graphs]),
        species=torch.cat([g.species for g in graphs]),
        batch=torch.cat([g.batch + int(o) for g, o in zip(graphs, struct_off)]),
        cell=torch.cat([g.cell for g in graphs]),
        pbc=torch.cat([g.pbc for g in graphs]),
        total_charge=torch.cat([g.total_charge for g in graphs]),
        edge_index=torch.cat([g.edge_index + int(o) for g, o in zip(graphs, offsets)], dim=1),
        edge_shift=torch.cat([g.edge_shift for g in graphs]),
    )
    for name in ("energy", "forces", "stress", "has_energy", "has_forces", "has_stress"):
        vals = [getattr(g, name) for g in graphs]
        if all(v is not None for v in vals):
            out[name] = torch.cat(vals)
        elif any(v is not None for v in vals):
            raise ValueError(f"cannot collate graphs where only some carry '{name}'")
    for name, width in (("multiplicity", ()), ("weight", ()), ("term_weight", (3,))):  # per structure, None: 1
        if any(getattr(g, name) is not None for g in graphs):
            out[name] = torch.cat([g.total_charge.new_ones((g.num_graphs,) + width) if getattr(g, name) is None
                                   else getattr(g, name).to(g.total_charge) for g in graphs])
    for name in ("dipole", "born_charges", "has_dipole", "has_born_charges"):  # charge labels
        vals = [getattr(g, name) for g in graphs]
        if all(v is not None for v in vals):
            out[name] = torch.cat(vals)
        elif any(v is not None for v in vals):
            raise ValueError(f"cannot collate graphs where only some carry '{name}' (read them with the same keys)")
    return Graph(**out)
