"""Public entry points: potential, field and field gradient of Cartesian multipoles; their energy."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from ..tensors.harmonics import stf
from ._validate import (_finite, _tensor, check_inputs, check_periodic_cell, check_prefactor, check_shapes, pbc_flags,
                        pbc_rows)
from .cells import periodic_plan, plan_fits, traced_ewald_fields
from .direct import OVERLAP_DISTANCE, open_molecules_fields, pair_list_fits, pair_sum
from .ewald import choose_parameters as choose_ewald_parameters
from .ewald import ewald_sum
from .kernels import InteractionTensors, Layout, RadialKernel, pack_sources, smearing_beta, unpack_rank
from .pme import METHODS, choose_method, pme_sum
from .slab import slab_sum

#: the keys of ``compute_fields``' ``pme_options`` (the overrides :func:`.pme.pme_sum` takes)
PME_OPTIONS = frozenset({"alpha", "mesh", "spline_order", "real_cutoff"})

_FIELDS_DOC = """
    Conventions (cartlorem DESIGN.md): ``T^(n)(R) = grad^n (1/R)``, ``R = r_i - r_j`` (+ lattice vector).
    A source with charge q, dipole mu and traceless quadrupole Theta (no 3/2 factor) creates
    ``phi = q/R + mu.R/R^3 + 3/2 R^T Theta R / R^5``; ``E = -grad phi``, ``G = grad E``. Channels are
    independent sets of multipoles. Everything is multiplied by ``prefactor`` (1: Gaussian-like units,
    e/Å; ``cartlorem.units.COULOMB`` = 14.399645 for eV, e, Å).

    Boundary conditions: ``cell is None`` or ``pbc`` all False: exact direct sum over all pairs.
    ``pbc`` all True (``pbc=None`` with a cell means periodic): Ewald summation (or its particle-mesh
    form, PME) with tin-foil boundary conditions; a net charge Q per channel gets a uniform
    neutralising background (potential
    ``-pi Q / V (1/alpha^2 - 2 sigma^2)``, so that the potential has zero cell average; for point
    multipoles the trace of G at every atom is then ``-4 pi Q / V``). ``pbc = [True, True, False]``: a
    slab, periodic along a and b with vacuum along c (:mod:`.slab`: c orthogonal to a and b, atoms within
    ``0 <= r.n <= |c|``; summed by Ewald or PME in an elongated cell plus the slab corrections). Other mixed pbc
    raise ValueError. ``method``: "auto" (default) sums open boundaries directly and picks Ewald or PME
    (:mod:`.pme`) for periodic cells and slabs from measured cost models; "direct", "ewald", "pme" force one.

    Excluded self terms: the target's own source (same atom, same cell image) never contributes;
    its periodic images do. With ``smearing = sigma`` every source is a Gaussian of width sigma seen by
    point targets, kernel ``erf(R / (sqrt 2 sigma)) / R``: the finite field of an atom's own Gaussian
    at its centre is excluded, and the energy below is the sum over distinct pairs of
    (point target) x (Gaussian source) interactions (no Gaussian-Gaussian self energy). Smeared
    fields are smooth and bounded as atoms approach (even coincide); point multipoles closer than
    1e-8 Å raise ValueError.

    Parameters
    ----------
    positions : [N, 3] (Å)
    charges : [N, C] (e) or None
    dipoles : [N, C, 3] (e Å) or None
    quadrupoles : [N, C, 3, 3] (e Å^2) or None; symmetric and traceless to a relative tolerance of 1e-8
        (float64; 100 machine epsilons in float32), else ValueError; the remaining rounding-level
        asymmetry and trace are projected out.
    cell : [3, 3] (Å), rows are lattice vectors; pbc : three booleans (tensor or sequence) or None
    smearing : Gaussian width sigma (Å) or None for point multipoles
    accuracy : target relative error of the periodic potential, field and gradient (Ewald splitting
        and cutoffs follow from it; measured errors are 0.01-1x accuracy); ignored in open boundaries,
        which are exact. Known limit: in cells only a few smearing widths across (sigma = 1 Å in a 4-6 Å cell,
        tight groups of sources) the k-space cutoff, set from an integral over k, leaves the fields above
        ``accuracy``: measured up to 6.4x (dipoles' field gradient) and 3.5x (charges) in fcc-like cells, 4.2x /
        2.2x / 1.1x in 4 / 5 / 6 Å cubes; random smeared charges (sigma = 1 Å, accuracy 1e-4 to 1e-6) in triclinic
        cells of 6 / 9 / 12 / 16 Å: field gradients up to 2.3x / 2.2x / 1.2x / 0.9x. A cutoff raised per cell from
        its own reciprocal lattice met ``accuracy`` there but was not kept: it made a crystal's energy depend on the
        cell that describes it (a supercell's finer lattice is not raised, so it keeps the error, and a 1 x 2 x 1
        NaCl supercell's energy differed from twice its cell's by 1.4e-8, relative, instead of rounding;
        benchmarks/README.md, sessions 30 and 31). In float32 the fields carry rounding errors of ~1e-6 to 5e-6,
        relative to their largest value, whatever ``accuracy`` asks (measured with 648 and 3000 sources; the model's
        default 1e-5 is met); a smaller ``accuracy`` then costs k-vectors and gains nothing.
    prefactor : float, multiplies every output
    method : "auto" (default), "direct", "ewald" or "pme". "direct": exact pair sum, open boundaries
        only. "ewald": Ewald sum (O(N^2) for smeared sources, exact k-space sum). "pme": smooth
        particle-mesh Ewald (O(N log N), :mod:`cartlorem.ewald.pme`), periodic cells and slabs. "auto": "direct" in
        open boundaries; in a periodic cell the cheaper of "ewald" and "pme" for this N, cell,
        smearing and accuracy by a measured cost model (:func:`cartlorem.ewald.pme.choose_method`).
        Both periodic methods meet ``accuracy``. A slab's 3D sum in its elongated cell is chosen the same way
        ("ewald" or "pme" force one; the in-plane replica correction is a sum over wave vectors either way), and so
        is the vacuum gap that elongates it (:func:`cartlorem.ewald.slab.choose_gap`: wider for large slabs; a
        ``pme_options`` mesh for a slab is along that cell's rows).
        A method that does not fit the boundary conditions raises ValueError.

    Differentiable with respect to positions, cell and multipoles (forces, stress, training).
"""


class MultipoleFields(NamedTuple):
    """Fields at every atom, per channel (units of ``prefactor`` times e/Å, e/Å^2, e/Å^3)."""

    potential: torch.Tensor  # [N, C]
    field: torch.Tensor  # [N, C, 3]
    field_gradient: torch.Tensor  # [N, C, 3, 3]


def compute_fields(
    positions,
    charges=None,
    dipoles=None,
    quadrupoles=None,
    cell=None,
    pbc=None,
    *,
    smearing=None,
    accuracy=1e-6,
    prefactor=1.0,
    ranks=(0, 1, 2),
    alpha=None,
    return_sources=False,
    method="auto",
    pme_options=None,
):
    """The fields of ``ranks`` only: {0: potential [N, C], 1: field [N, C, 3], 2: gradient [N, C, 3, 3]}.

    ``alpha`` (1/Å) overrides the Ewald splitting parameter (for tests; results must not depend on it).
    With ``return_sources`` also the checked multipoles {rank: tensor} (quadrupoles made exactly
    symmetric and traceless). ``pme_options``: dict of :func:`.pme.pme_sum` overrides (``alpha``,
    ``mesh``, ``spline_order``, ``real_cutoff``) for method "pme".
    """
    method = _check_method(method, pbc)
    unknown = sorted(set(pme_options or {}) - PME_OPTIONS)
    if unknown:
        raise ValueError(f"pme_options {unknown} not known; the options are {sorted(PME_OPTIONS)}")
    prefactor = check_prefactor(prefactor)
    inputs = check_inputs(positions, charges, dipoles, quadrupoles, cell, pbc, smearing, accuracy)
    cols, rows = Layout(inputs.multipoles), Layout(ranks)
    m = inputs.multipoles
    v = pack_sources(cols, m.get(0), m.get(1), m.get(2))  # [N, n_cols, C]
    if inputs.slab and method not in ("auto", "ewald", "pme"):
        raise ValueError(f"method={method!r} does not sum slabs (pbc = [True, True, False]); use 'auto', 'ewald' or "
                         "'pme' (the 3D sum in an elongated cell, with the slab corrections)")
    if inputs.slab:  # pbc = [True, True, False]: Ewald or PME in an elongated cell + slab corrections (.slab)
        out = slab_sum(inputs.positions, v, m, inputs.cell, rows, cols, smearing=inputs.smearing,
                       accuracy=float(accuracy), alpha=alpha, method=method, pme_options=pme_options)
        out = out * (prefactor * rows.output_signs(out.dtype, out.device))[None, :, None]
        fields = {rank: unpack_rank(rows, out, rank) for rank in rows.ranks}
        return (fields, m) if return_sources else fields
    if inputs.periodic and method == "direct":
        raise ValueError("method='direct' sums open boundaries only; a periodic cell (pbc all True) needs "
                         "method='ewald', 'pme' or 'auto'")
    if not inputs.periodic and method in ("ewald", "pme"):
        raise ValueError(f"method={method!r} needs a periodic cell (pbc all True and a cell); open boundaries "
                         "are summed exactly with method='direct' or 'auto'")
    if inputs.periodic and method == "auto":
        method = choose_method(inputs.cell.detach().cpu().double().numpy(), inputs.positions.shape[0],
                               float(accuracy), rows, cols, v.shape[2], inputs.smearing)
    if inputs.periodic and method == "pme":
        total = m[0].sum(0) if 0 in m else None
        out = pme_sum(inputs.positions, v, inputs.cell, rows, cols, smearing=inputs.smearing,
                      accuracy=float(accuracy), total_charge=total, **(pme_options or {}))
    elif inputs.periodic:
        total = m[0].sum(0) if 0 in m else None
        out = ewald_sum(
            inputs.positions,
            v,
            inputs.cell,
            rows,
            cols,
            smearing=inputs.smearing,
            accuracy=float(accuracy),
            alpha=alpha,
            total_charge=total,
        )
    else:
        kernel = RadialKernel.coulomb() if inputs.smearing is None else RadialKernel.smeared(inputs.smearing)
        out = pair_sum(inputs.positions, v, kernel, InteractionTensors(rows, cols))
    out = out * (prefactor * rows.output_signs(out.dtype, out.device))[None, :, None]
    fields = {rank: unpack_rank(rows, out, rank) for rank in rows.ranks}
    return (fields, m) if return_sources else fields


def _check_method(method, pbc) -> str:
    """``method`` checked against :data:`.pme.METHODS`; PME refuses every pbc but all True and slabs by name."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    if method == "pme" and pbc is not None:
        flags = pbc_flags(pbc)
        if any(flags) and not all(flags) and flags != [True, True, False]:
            raise ValueError(f"method='pme' supports fully periodic cells and slabs (pbc [True, True, False]) only, "
                             f"got pbc={flags}")
    return method


def multipole_fields(
    positions,
    charges=None,
    dipoles=None,
    quadrupoles=None,
    cell=None,
    pbc=None,
    *,
    smearing=None,
    accuracy=1e-6,
    prefactor=1.0,
    method="auto",
) -> MultipoleFields:
    """Potential [N, C], field [N, C, 3] and field gradient [N, C, 3, 3] at every atom (see below)."""
    f = compute_fields(
        positions,
        charges,
        dipoles,
        quadrupoles,
        cell,
        pbc,
        smearing=smearing,
        accuracy=accuracy,
        prefactor=prefactor,
        method=method,
    )
    return MultipoleFields(f[0], f[1], f[2])


if multipole_fields.__doc__:  # None under python -OO
    multipole_fields.__doc__ += "\n" + _FIELDS_DOC


def electrostatic_energy(
    positions,
    charges=None,
    dipoles=None,
    quadrupoles=None,
    cell=None,
    pbc=None,
    *,
    smearing=None,
    accuracy=1e-6,
    prefactor=1.0,
    method="auto",
) -> torch.Tensor:
    """Electrostatic energy ``U = 1/2 sum_i (q_i phi_i - mu_i.E_i - 1/2 Theta_i : G_i)``.

    Summed over atoms and channels: a scalar tensor (prefactor x e^2/Å). Only the fields that the
    given multipoles need are computed.
    """
    ranks = [r for r, t in enumerate((charges, dipoles, quadrupoles)) if t is not None]
    f, m = compute_fields(
        positions,
        charges,
        dipoles,
        quadrupoles,
        cell,
        pbc,
        smearing=smearing,
        accuracy=accuracy,
        prefactor=prefactor,
        ranks=ranks or (0,),
        return_sources=True,
        method=method,
    )
    return energy_from_fields(f, m.get(0), m.get(1), m.get(2))


if electrostatic_energy.__doc__:
    electrostatic_energy.__doc__ += "\n" + _FIELDS_DOC


def energy_from_fields(fields: dict, charges=None, dipoles=None, quadrupoles=None) -> torch.Tensor:
    """``1/2 sum (q phi - mu.E - 1/2 Theta:G)`` from fields {rank: tensor} of :func:`compute_fields`."""
    total = 0.0
    if charges is not None:
        total = total + (charges * fields[0]).sum()
    if dipoles is not None:
        total = total - (dipoles * fields[1]).sum()
    if quadrupoles is not None:
        total = total - 0.5 * (quadrupoles * fields[2]).sum()
    return 0.5 * total


def batched_multipole_fields(
    positions,
    batch,
    cell,
    pbc,
    charges=None,
    dipoles=None,
    quadrupoles=None,
    *,
    smearing=None,
    accuracy=1e-6,
    prefactor=1.0,
    ranks=(0, 1, 2),
    method="auto",
    traceless_gradient=False,
) -> MultipoleFields:
    """:func:`multipole_fields` for a batch of structures, each with its own cell and boundary conditions.

    positions [N, 3] (Å); batch [N] long, structure index of every atom (0 .. B-1); cell [B, 3, 3] (Å);
    pbc [B, 3] bool; charges [N, C], dipoles [N, C, 3], quadrupoles [N, C, 3, 3] or None.
    ranks: the field ranks to compute (0 potential, 1 field, 2 gradient); the others come back as None
    and cost nothing (the LOREM block needs only the potential).
    method: as in :func:`multipole_fields`, for every structure ("auto" chooses per structure).
    traceless_gradient: return only the symmetric traceless part of the field gradient, all that couples to
    (traceless) quadrupoles; it drops the trace that smeared sources leave where they overlap and the
    −4πQ/(3V) I of a charged cell's background. The open structures' pair sum then carries rank 2 in five
    components instead of nine (:func:`.direct.pair_list_fields`), which is what the long-range block uses.
    Returns MultipoleFields for all N atoms, in the input order. Structures never interact.
    A batch of periodic cells with smeared sources whose every cell would get Ewald at alpha = 1/(sqrt 2 sigma) (the
    cost models' choice for dense training-size cells) is summed in one batched pass over all cells
    (:func:`.cells.traced_ewald_fields`, the same sum to rounding); otherwise structure by structure.
    """
    method = _check_method(method, None)
    prefactor = check_prefactor(prefactor)
    ranks = tuple(sorted(set(int(r) for r in ranks)))
    if not ranks or any(r not in (0, 1, 2) for r in ranks):
        raise ValueError(f"ranks must be a non-empty subset of (0, 1, 2), got {ranks}")
    # the whole batch's shapes, before it is split into structures: the same messages as for one structure
    check_shapes(positions, charges, dipoles, quadrupoles)
    if (
        not isinstance(batch, torch.Tensor)
        or batch.dim() != 1
        or batch.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            "batch must be an integer tensor of shape [N] with the structure index of every atom"
        )
    if batch.shape[0] != positions.shape[0]:
        raise ValueError(f"batch has {batch.shape[0]} entries, positions shape is {list(positions.shape)}")
    if not isinstance(cell, torch.Tensor) or cell.dim() != 3 or tuple(cell.shape[1:]) != (3, 3):
        raise ValueError("cell must be a tensor of shape [B, 3, 3]")
    pbc = pbc_rows(pbc, cell.shape[0])
    if batch.numel() and (int(batch.min()) < 0 or int(batch.max()) >= cell.shape[0]):
        raise ValueError(f"batch indices must lie in [0, {cell.shape[0] - 1}]")
    if smearing is not None and method in ("auto", "ewald") and cell.shape[0] and bool(pbc.all()):
        out = _cells_in_one_sum(positions, batch, cell, charges, dipoles, quadrupoles, smearing=smearing,
                                accuracy=accuracy, prefactor=prefactor, ranks=ranks, method=method,
                                traceless_gradient=traceless_gradient)
        if out is not None:
            return out
    open_struct = ~pbc.any(dim=1)  # [B]; mixed pbc is refused by multipole_fields below
    handled = torch.zeros_like(open_struct)
    parts, order = [], []
    all_open = bool(open_struct.all())
    open_atoms = None if all_open else open_struct[batch].nonzero().flatten()
    if (all_open or open_atoms.numel()) and method in ("auto", "direct"):
        n_channels = next(t for t in (charges, dipoles, quadrupoles) if t is not None).shape[1]
        source_ranks = tuple(r for r, t in enumerate((charges, dipoles, quadrupoles)) if t is not None)
        counts = torch.bincount(batch, minlength=cell.shape[0]) * open_struct  # atoms of each open structure
        if not pair_list_fits(int((counts ** 2).sum()), ranks, source_ranks, n_channels, traceless_gradient):
            # the smallest open structures in the pair list, as many as fit; the others one by one below (a large
            # cluster sent every small molecule of its batch through the slow per-structure sum)
            sizes, by_size = torch.sort(counts)
            pairs = torch.cumsum(sizes ** 2, 0).tolist()
            n_fit = next((k for k, p in enumerate(pairs) if not pair_list_fits(int(p), ranks, source_ranks,
                                                                                  n_channels, traceless_gradient)),
                         len(pairs))
            chosen = torch.zeros_like(open_struct)
            chosen[by_size[:n_fit]] = True
            open_struct, all_open = open_struct & chosen, False
            open_atoms = open_struct[batch].nonzero().flatten()
        if all_open or open_atoms.numel():
            # the atoms of those open structures (all of them, in place, when every structure is open)
            pick = (lambda t: t) if all_open else (lambda t: t[open_atoms])
            sub = [None if t is None else pick(t) for t in (charges, dipoles, quadrupoles)]
            out = open_molecules_fields(pick(positions), pick(batch), *sub, smearing=smearing,
                                        accuracy=accuracy, prefactor=prefactor, ranks=ranks,
                                        traceless_gradient=traceless_gradient)
            if all_open:
                return MultipoleFields(*out)
            parts.append(MultipoleFields(*out))
            order.append(open_atoms)
            handled = open_struct
    for b in range(cell.shape[0]):
        if bool(handled[b]):
            continue  # an open structure already done by the vectorised path
        idx = (batch == b).nonzero().flatten()
        if idx.numel() == 0:
            continue
        sub = [None if t is None else t[idx] for t in (charges, dipoles, quadrupoles)]
        f = compute_fields(
            positions[idx],
            *sub,
            cell=cell[b],
            pbc=pbc[b],
            smearing=smearing,
            accuracy=accuracy,
            prefactor=prefactor,
            ranks=ranks,
            method=method,
        )
        gradient = f.get(2)
        if traceless_gradient and gradient is not None:
            gradient = stf(gradient)
        parts.append(MultipoleFields(f.get(0), f.get(1), gradient))
        order.append(idx)
    inverse = torch.argsort(torch.cat(order))
    return MultipoleFields(*(None if x[0] is None else torch.cat(list(x))[inverse] for x in zip(*parts)))


#: Largest (k-vector x atom slot) count per cell for which :func:`batched_multipole_fields` sums a batch of cells
#: in one batched sum (:func:`.cells.traced_ewald_fields`): it is faster than the per-cell sum for training-size
#: cells and slower for larger ones (benchmarks/README.md, "Which periodic sum `auto` picks, and the eager cell
#: sum", session 39: 8 water cells of 24 / 81 / 192 atoms, q, mu, Theta: 0.5x / 1.0x / 1.4-1.9x the per-cell
#: time; one cell of 648 atoms 2.9x). 81-atom water cells and the 64-atom NaCl cells of the training data take
#: 0.9-1.3e5. The count is the batch's padded one (its most atoms and k-vectors): one large cell sends the whole
#: batch cell by cell.
CELL_SUM_TERMS = 1 << 18


def _cells_in_one_sum(positions, batch, cell, charges, dipoles, quadrupoles, *, smearing, accuracy, prefactor, ranks,
                      method, traceless_gradient) -> Optional[MultipoleFields]:
    """The fields of a batch of periodic cells (smeared sources) by one batched Ewald sum over all of them
    (:func:`.cells.traced_ewald_fields`), when every cell on its own would get Ewald at alpha = 1/(sqrt 2 sigma),
    reciprocal space only (what the cost models choose for training-size cells): the same sum, to rounding,
    without a pass per cell. None when some cell would get another splitting or PME, the batch exceeds
    :func:`.cells.plan_fits`, or its cells are larger than :data:`CELL_SUM_TERMS` admits: the caller then sums
    cell by cell. Checks the inputs as :func:`compute_fields` does."""
    inputs = check_inputs(positions, charges, dipoles, quadrupoles, None, None, smearing, accuracy)
    m = inputs.multipoles
    cols, rows = Layout(m), Layout(ranks)
    order = max(rows.ranks) + max(cols.ranks)
    n_channels = next(iter(m.values())).shape[1]
    beta = smearing_beta(float(smearing))
    _finite("cell", _tensor("cell", cell, positions))
    counts = torch.bincount(batch, minlength=cell.shape[0]).tolist()
    for b, c in enumerate(cell):
        check_periodic_cell(c)
        if counts[b] == 0:
            continue
        c_np = c.detach().cpu().double().numpy()
        if method == "auto" and choose_method(c_np, counts[b], float(accuracy), rows, cols, n_channels,
                                              inputs.smearing) != "ewald":
            return None
        if choose_ewald_parameters(c_np, counts[b], float(accuracy), order, inputs.smearing).alpha != beta:
            return None
    plan = periodic_plan(batch, cell, smearing=inputs.smearing, accuracy=float(accuracy), ranks=rows.ranks,
                         source_ranks=cols.ranks)
    if not plan_fits(plan) or plan.slots.shape[1] * plan.m.shape[1] > CELL_SUM_TERMS:
        return None
    return MultipoleFields(*traced_ewald_fields(inputs.positions, batch, cell, plan, m.get(0), m.get(1), m.get(2),
                                                smearing=inputs.smearing, prefactor=prefactor, ranks=rows.ranks,
                                                traceless_gradient=traceless_gradient))


def intra_pairs(batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All directed pairs (i, j), i != j, of atoms in the same structure: (i [P], j [P]) long.

    batch [N] structure index of every atom (any order). Index bookkeeping only (no autograd);
    TorchScript-compatible.
    """
    counts: List[int] = torch.bincount(batch).tolist()
    ii: List[torch.Tensor] = []
    jj: List[torch.Tensor] = []
    start = 0
    for n in counts:
        if n > 1:
            a = torch.arange(start, start + n, device=batch.device)
            i = a.repeat_interleave(n)
            j = a.repeat(n)
            keep = i != j
            ii.append(i[keep])
            jj.append(j[keep])
        start += n
    if len(ii) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=batch.device)
        return empty, empty
    # atoms are grouped by structure in the input order of ``batch`` only if sorted: sort to be safe
    order = torch.argsort(batch, stable=True)
    return order[torch.cat(ii)], order[torch.cat(jj)]


def pair_fields(R: torch.Tensor, i: torch.Tensor, n_atoms: int, q: Optional[torch.Tensor], mu: Optional[torch.Tensor],
                th: Optional[torch.Tensor], B: List[torch.Tensor], want_phi: bool, want_E: bool, want_G: bool
                ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fields at the targets i of sources across pairs, summed per target, op by op (TorchScript-compatible).

    With R = r_i − r_j and the kernel's B_n (B_0 = f, B_n = −(1/R) dB_{n−1}/dR), a source (q, μ, Θ)
    at j gives at i, Θ traceless:
        φ = q B0 + (μ·R) B1 + ½ (RᵀΘR) B2
        E = a R − μ B1 − (ΘR) B2,                  a = q B1 + (μ·R) B2 + ½ (RᵀΘR) B3
        G = a I + b R Rᵀ + (μ Rᵀ + R μᵀ) B2 + (ΘR Rᵀ + R (ΘR)ᵀ) B3 − Θ B2,
                                                   b = −(q B2 + (μ·R) B3 + ½ (RᵀΘR) B4)
    (φ differentiated with ∂B_n/∂R = −R B_{n+1}). The same numbers as
    :func:`.direct.pair_list_fields`, which eager code uses (fewer autograd nodes); this form is
    what :mod:`cartlorem.export` scripts.

    R [P, 3] (Å) pair vectors r_i − r_j; i [P] target atoms (0 .. n_atoms − 1); the sources at j of every pair:
    q [P, C], mu [P, C, 3], th [P, C, 3, 3] (traceless) or None; B: ``B_0 .. B_n`` [P] of the radial kernel
    (n ≥ the highest field rank + the highest source rank). Returns (φ [N, C], E [N, C, 3], G [N, C, 3, 3]),
    None where not wanted, without a prefactor. TorchScript-compatible (:mod:`cartlorem.export` uses it).
    """
    ref = q if q is not None else (mu[..., 0] if mu is not None else _present(th)[..., 0, 0])
    P, C = ref.shape[0], ref.shape[1]
    Bc = [b[:, None] for b in B]  # [P, 1]
    while len(Bc) < 5:
        Bc.append(torch.zeros_like(Bc[0]))
    Rc = R[:, None, :]  # [P, 1, 3]
    want_a = want_E or want_G
    phi = torch.zeros_like(ref)  # [P, C]
    a = torch.zeros_like(ref)
    b = torch.zeros_like(ref)
    E_extra = ref.new_zeros(P, C, 3)  # −μ B1 − (ΘR) B2
    w = ref.new_zeros(P, C, 3)  # μ B2 + (ΘR) B3 (+ b R / 2 below): G = a I + w Rᵀ + R wᵀ − Θ B2
    if q is not None:
        if want_phi:
            phi = phi + q * Bc[0]
        if want_a:
            a = a + q * Bc[1]
        if want_G:
            b = b - q * Bc[2]
    if mu is not None:
        muR = (mu * Rc).sum(-1)  # [P, C]
        if want_phi:
            phi = phi + muR * Bc[1]
        if want_a:
            a = a + muR * Bc[2]
        if want_G:
            b = b - muR * Bc[3]
            w = w + mu * Bc[2][..., None]
        if want_E:
            E_extra = E_extra - mu * Bc[1][..., None]
    pair_G: Optional[torch.Tensor] = None  # [P, C, 3, 3] whose symmetric part is what a pair adds to G − a I
    if th is not None:
        thR = (th * Rc[..., None, :]).sum(-1)  # Θ R [P, C, 3]
        RthR = (thR * Rc).sum(-1)  # [P, C]
        if want_phi:
            phi = phi + 0.5 * RthR * Bc[2]
        if want_a:
            a = a + 0.5 * RthR * Bc[3]
        if want_G:
            b = b - 0.5 * RthR * Bc[4]
            w = w + thR * Bc[3][..., None]
            pair_G = th * (-0.5 * Bc[2])[..., None, None]  # −Θ B2 / 2: symmetrised below to −Θ B2
        if want_E:
            E_extra = E_extra - thR * Bc[2][..., None]
    out_phi: Optional[torch.Tensor] = None
    out_E: Optional[torch.Tensor] = None
    out_G: Optional[torch.Tensor] = None
    if want_phi:
        out_phi = ref.new_zeros(n_atoms, C).index_add(0, i, phi)
    if want_E:
        out_E = ref.new_zeros(n_atoms, C, 3).index_add(0, i, a[..., None] * Rc + E_extra)
    if want_G:
        # G = a I + b R Rᵀ + B2 (μ Rᵀ + R μᵀ) + B3 (ΘR Rᵀ + R (ΘR)ᵀ) − B2 Θ = a I + S + Sᵀ with
        # S = w Rᵀ − Θ B2 / 2, w = B2 μ + B3 ΘR + b R / 2 (Θ symmetric): one rank-2 tensor per pair,
        # summed per target before it is symmetrised and the trace part added
        w = w + 0.5 * b[..., None] * Rc
        outer = w[..., :, None] * Rc[..., None, :]  # w_a R_b [P, C, 3, 3]
        pair_G = outer if pair_G is None else outer + pair_G
        S = ref.new_zeros(n_atoms, C, 3, 3).index_add(0, i, pair_G)
        trace_part = ref.new_zeros(n_atoms, C).index_add(0, i, a)
        eye = torch.eye(3, dtype=R.dtype, device=R.device)
        out_G = S + S.transpose(-1, -2) + trace_part[..., None, None] * eye
    return out_phi, out_E, out_G


def _present(x: Optional[torch.Tensor]) -> torch.Tensor:
    assert x is not None
    return x
