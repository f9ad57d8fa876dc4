"""Public entry points: potential, field and field gradient of Cartesian multipoles; their energy."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._validate import check_inputs
from .direct import pair_sum
from .ewald import ewald_sum
from .kernels import InteractionTensors, Layout, RadialKernel, pack_sources, unpack_rank

_FIELDS_DOC = """
    Conventions (cartlorem DESIGN.md): ``T^(n)(R) = grad^n (1/R)``, ``R = r_i - r_j`` (+ lattice vector).
    A source with charge q, dipole mu and traceless quadrupole Theta (no 3/2 factor) creates
    ``phi = q/R + mu.R/R^3 + 3/2 R^T Theta R / R^5``; ``E = -grad phi``, ``G = grad E``. Channels are
    independent sets of multipoles. Everything is multiplied by ``prefactor`` (1: Gaussian-like units,
    e/Å; ``cartlorem.units.COULOMB`` = 14.399645 for eV, e, Å).

    Boundary conditions: ``cell is None`` or ``pbc`` all False: exact direct sum over all pairs.
    ``pbc`` all True (``pbc=None`` with a cell means periodic): Ewald summation with tin-foil boundary
    conditions; a net charge Q per channel gets a uniform neutralising background (potential
    ``-pi Q / V (1/alpha^2 - 2 sigma^2)``, so that the potential has zero cell average; for point
    multipoles the trace of G at every atom is then ``-4 pi Q / V``). Mixed pbc raises ValueError.

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
        which are exact
    prefactor : float, multiplies every output

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
):
    """The fields of ``ranks`` only: {0: potential [N, C], 1: field [N, C, 3], 2: gradient [N, C, 3, 3]}.

    ``alpha`` (1/Å) overrides the Ewald splitting parameter (for tests; results must not depend on it).
    With ``return_sources`` also the checked multipoles {rank: tensor} (quadrupoles made exactly
    symmetric and traceless).
    """
    inputs = check_inputs(positions, charges, dipoles, quadrupoles, cell, pbc, smearing, accuracy)
    cols, rows = Layout(inputs.multipoles), Layout(ranks)
    m = inputs.multipoles
    v = pack_sources(cols, m.get(0), m.get(1), m.get(2))  # [N, n_cols, C]
    if inputs.periodic:
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
) -> MultipoleFields:
    """:func:`multipole_fields` for a batch of structures, each with its own cell and boundary conditions.

    positions [N, 3] (Å); batch [N] long, structure index of every atom (0 .. B-1); cell [B, 3, 3] (Å);
    pbc [B, 3] bool; charges [N, C], dipoles [N, C, 3], quadrupoles [N, C, 3, 3] or None.
    Returns MultipoleFields for all N atoms, in the input order. Structures never interact.
    """
    if (
        not isinstance(batch, torch.Tensor)
        or batch.dim() != 1
        or batch.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            "batch must be an integer tensor of shape [N] with the structure index of every atom"
        )
    if (
        not isinstance(positions, torch.Tensor)
        or positions.dim() != 2
        or batch.shape[0] != positions.shape[0]
    ):
        raise ValueError(f"batch has {batch.shape[0]} entries, positions shape is {list(positions.shape)}")
    if not isinstance(cell, torch.Tensor) or cell.dim() != 3 or tuple(cell.shape[1:]) != (3, 3):
        raise ValueError("cell must be a tensor of shape [B, 3, 3]")
    pbc = torch.as_tensor(pbc, dtype=torch.bool)
    if tuple(pbc.shape) != (cell.shape[0], 3):
        raise ValueError(f"pbc must have shape [B, 3] = [{cell.shape[0]}, 3], got {list(pbc.shape)}")
    if batch.numel() and (int(batch.min()) < 0 or int(batch.max()) >= cell.shape[0]):
        raise ValueError(f"batch indices must lie in [0, {cell.shape[0] - 1}]")
    parts, order = [], []
    for b in range(cell.shape[0]):
        idx = (batch == b).nonzero().flatten()
        if idx.numel() == 0:
            continue
        sub = [None if t is None else t[idx] for t in (charges, dipoles, quadrupoles)]
        f = multipole_fields(
            positions[idx],
            *sub,
            cell=cell[b],
            pbc=pbc[b],
            smearing=smearing,
            accuracy=accuracy,
            prefactor=prefactor,
        )
        parts.append(f)
        order.append(idx)
    inverse = torch.argsort(torch.cat(order))
    return MultipoleFields(*(torch.cat(list(x))[inverse] for x in zip(*parts)))
