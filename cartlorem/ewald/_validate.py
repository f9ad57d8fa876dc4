"""Input checks for :mod:`cartlorem.ewald`: every problem is a ``ValueError`` that names it."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch


#: Argument names of the multipoles by rank.
MULTIPOLE_NAMES = {0: "charges", 1: "dipoles", 2: "quadrupoles"}


class Inputs(NamedTuple):
    """Checked inputs: multipoles of the ranks present, quadrupoles made exactly symmetric traceless."""

    positions: torch.Tensor  # [N, 3]
    multipoles: dict  # rank -> [N, C], [N, C, 3], [N, C, 3, 3]
    cell: torch.Tensor | None  # [3, 3] when periodic or a slab
    periodic: bool  # all three directions periodic
    smearing: float | None
    slab: bool = False  # pbc = [True, True, False]: periodic along a and b, vacuum along c


def quadrupole_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance on the asymmetry and trace of quadrupoles: 1e-8 (float64), ~1e-5 (float32)."""
    return max(1e-8, 100.0 * torch.finfo(dtype).eps)


def _finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{name} contains NaN or inf (first at index {bad})")


def _tensor(name: str, t, positions: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != positions.dtype or t.device != positions.device:
        raise ValueError(
            f"{name} has dtype {t.dtype} on {t.device}, positions have {positions.dtype} on "
            f"{positions.device}; pass them with the same dtype and device"
        )
    return t


def pbc_flags(pbc) -> list:
    """``pbc`` as three Python bools: one bool (or 0/1) for all directions or three (sequence, array, tensor).

    Anything else is a ValueError, strings included: ``bool("FFF")`` is True, so a string such as ``"FFF"``
    would otherwise read as periodic.
    """
    flags = np.asarray(pbc.detach().cpu() if isinstance(pbc, torch.Tensor) else pbc)
    if flags.dtype.kind not in "biu" or not np.isin(flags, (0, 1)).all():
        raise ValueError(f"pbc takes booleans (one, or three: one per cell row), got {pbc!r}")
    flags = [bool(f) for f in flags.reshape(-1)]
    if len(flags) == 1:
        flags = flags * 3
    if len(flags) != 3:
        raise ValueError(f"pbc must be three booleans, got {pbc!r}")
    return flags


def pbc_rows(pbc, n_struct: int) -> torch.Tensor:
    """``pbc`` of a batch, [B, 3] booleans (or 0/1; tensor, array or nested sequence), as a bool tensor.

    ValueError for anything else, strings included (as :func:`pbc_flags`), and for another shape.
    """
    try:
        flags = pbc.detach() if isinstance(pbc, torch.Tensor) else torch.as_tensor(np.asarray(pbc))
    except (TypeError, ValueError):  # ragged nesting; np.asarray of strings gives a str array, refused below
        flags = None
    if (flags is None or flags.is_floating_point() or flags.is_complex()
            or not bool(((flags == 0) | (flags == 1)).all())):
        raise ValueError(f"pbc takes booleans (three per structure: [B, 3]), got {pbc!r}")
    if tuple(flags.shape) != (n_struct, 3):
        raise ValueError(f"pbc must have shape [B, 3] = [{n_struct}, 3], got {list(flags.shape)}")
    return flags.to(torch.bool)


def check_prefactor(prefactor):
    """``prefactor`` (a real number, or a one-element floating tensor whose gradient flows, as a 0-d tensor) if it
    is finite; ValueError otherwise."""
    if isinstance(prefactor, torch.Tensor):
        ok = (prefactor.numel() == 1 and prefactor.is_floating_point()
              and bool(torch.isfinite(prefactor.detach()).all()))
        if ok:
            prefactor = prefactor.reshape(())
    else:
        ok = isinstance(prefactor, numbers.Real) and not isinstance(prefactor, bool) and math.isfinite(prefactor)
    if not ok:
        raise ValueError("prefactor must be a finite real number (or a one-element floating tensor), "
                         f"got {prefactor!r}")
    return prefactor


def parse_boundary(pbc, cell) -> str:
    """``"periodic"`` (pbc all True, or None with a cell), ``"open"``, or ``"slab"`` (pbc = [T, T, F]).

    Every other pattern is a ValueError: a slab's vacuum direction must be the third cell row.
    """
    if pbc is None:
        return "open" if cell is None else "periodic"
    flags = pbc_flags(pbc)
    if all(flags):
        return "periodic"
    if not any(flags):
        return "open"
    if flags == [True, True, False]:
        return "slab"
    raise ValueError(
        f"mixed periodic boundary conditions pbc={flags} are not supported: use all True, all False, or "
        "[True, True, False] for a slab (vacuum along the third cell row; reorder the cell rows so that "
        "the open direction comes last)"
    )


def parse_pbc(pbc, cell) -> bool:
    """True for a fully periodic system, False for open boundaries; ValueError for mixed pbc (slabs too)."""
    boundary = parse_boundary(pbc, cell)
    if boundary == "slab":
        raise ValueError("pbc=[True, True, False] (a slab) is not supported here; only all True or all False")
    return boundary == "periodic"


def check_slab(positions: torch.Tensor, cell: torch.Tensor) -> None:
    """ValueError unless ``cell`` is a valid slab cell holding every atom (see :mod:`.slab`).

    Rows a, b span the periodic plane (not parallel, heights >= ``MIN_CELL_HEIGHT``); row c, the normal,
    must be non-zero and orthogonal to a and b; every atom must lie within ``0 <= r . c/|c| <= |c|``.
    """
    c = cell.detach().cpu().double()
    lengths = torch.linalg.norm(c, dim=1)
    if not float(lengths[2]) > 0.0:
        raise ValueError("slab (pbc = [True, True, False]): cell row 2 (c, the normal direction) is zero")
    area = float(torch.linalg.norm(torch.linalg.cross(c[0], c[1])))
    if not area > 1e-10 * float(lengths[0] * lengths[1]):
        raise ValueError(
            f"slab (pbc = [True, True, False]): cell rows 0 and 1 (a, b) span no plane (area {area:.3g} Å^2)"
        )
    tol = max(1e-8, 100.0 * torch.finfo(positions.dtype).eps)
    cosines = [float(c[k] @ c[2] / (lengths[k] * lengths[2])) for k in range(2)]
    if max(abs(x) for x in cosines) > tol:
        raise ValueError(
            "slab (pbc = [True, True, False]): cell row 2 (c) must be orthogonal to rows 0 and 1 (a, b): "
            f"it is the normal of the periodic plane; cos(a, c) = {cosines[0]:.3g}, cos(b, c) = "
            f"{cosines[1]:.3g}. Use c = |c| (a x b)/|a x b|"
        )
    check_cell_heights(cell, periodic=(True, True, False))
    z = positions.detach().cpu().double() @ (c[2] / lengths[2])  # [N]
    slack = tol * float(lengths[2])
    outside = (z < -slack) | (z > float(lengths[2]) + slack)
    if bool(outside.any()):
        i = int(outside.nonzero()[0])
        raise ValueError(
            f"slab (pbc = [True, True, False]): atom {i} lies at z = {float(z[i]):.6g} Å along the normal, "
            f"outside the vacuum-padded region 0 <= z <= |c| = {float(lengths[2]):.6g} Å; every atom must "
            "lie between the plane of a and b through the origin and its translate by c (add vacuum to c "
            "or shift the atoms)"
        )


#: Smallest distance between lattice planes (Å) of a periodic cell: far below any interatomic distance.
MIN_CELL_HEIGHT = 0.1


def cell_heights(cell: torch.Tensor) -> list:
    """Distances between lattice planes ``h_k = V / |a_l x a_m|`` (Å) of cell [3, 3] -> three floats."""
    c = cell.detach().cpu().double()
    volume = float(torch.abs(torch.linalg.det(c)))
    areas = [float(torch.linalg.norm(torch.linalg.cross(c[(k + 1) % 3], c[(k + 2) % 3]))) for k in range(3)]
    return [volume / area for area in areas]


def check_cell_heights(cell: torch.Tensor, periodic=(True, True, True)) -> None:
    """ValueError if the planes of a periodic lattice direction are closer than ``MIN_CELL_HEIGHT``.

    The volume check alone lets through cells such as 10 x 10 x 1e-5 Å, for which the number of periodic
    images the sums need grows like 1/height (GiBs, then MemoryError). No atomistic cell has lattice
    planes 0.1 Å apart, unless it is extremely skewed (then reduce it, e.g. ase.geometry.minkowski_reduce).
    """
    for k, h in enumerate(cell_heights(cell)):
        if periodic[k] and not h >= MIN_CELL_HEIGHT:
            what = "not a physical periodic cell"
            if all(periodic):  # the same lattice in a reduced basis: is only this basis too skewed?
                from ase.geometry import minkowski_reduce

                reduced, _ = minkowski_reduce(cell.detach().cpu().double().numpy(), pbc=True)
                if min(cell_heights(torch.as_tensor(reduced))) >= MIN_CELL_HEIGHT:
                    what = "the lattice is fine, this basis of it is too skewed"
            raise ValueError(
                f"cell height h_{k} = {h:.3g} Å (distance between the lattice planes spanned by cell rows "
                f"{(k + 1) % 3} and {(k + 2) % 3}) is below {MIN_CELL_HEIGHT} Å: {what} (a very skewed cell can "
                "be reduced first, e.g. with ase.geometry.minkowski_reduce)"
            )


def check_periodic_cell(cell: torch.Tensor) -> None:
    """ValueError for a periodic cell [3, 3] (finite) of zero volume or with lattice planes too close."""
    volume = float(torch.abs(torch.linalg.det(cell.detach())))
    scale = float(torch.linalg.norm(cell.detach(), dim=1).prod())
    if not volume > 1e-10 * scale:
        raise ValueError(
            f"cell has zero volume (|det| = {volume:.3g} Å^3): a periodic cell needs three "
            "linearly independent lattice vectors"
        )
    check_cell_heights(cell)


def check_shapes(positions, charges, dipoles, quadrupoles) -> dict:
    """ValueError unless positions are [N, 3] (N >= 1) and at least one multipole is given, every given one a
    tensor of their dtype and device with N rows, its rank's shape and the same channels as the others.

    Shapes only (no values, no device synchronisation): {rank: tensor} of the given multipoles. What
    :func:`check_inputs` checks first; :func:`.fields.batched_multipole_fields` checks a whole batch with it
    before it splits the batch into structures.
    """
    if not isinstance(positions, torch.Tensor) or not positions.is_floating_point():
        raise ValueError("positions must be a floating-point torch.Tensor of shape [N, 3]")
    if positions.dtype not in (torch.float32, torch.float64):
        # half precision: three significant digits (bfloat16), and torch has no LU of a cell in it
        raise ValueError(f"positions have dtype {positions.dtype}: the multipole sums run in float32 or float64 "
                         "(convert positions, multipoles and cell with .float() or .double())")
    if positions.dim() != 2 or positions.shape[1] != 3 or positions.shape[0] == 0:
        raise ValueError(f"positions must have shape [N, 3] with N >= 1, got {list(positions.shape)}")
    n_atoms = positions.shape[0]
    given = {0: charges, 1: dipoles, 2: quadrupoles}
    trailing = {0: (), 1: (3,), 2: (3, 3)}
    multipoles, channels = {}, None
    for rank, t in given.items():
        if t is None:
            continue
        t = _tensor(MULTIPOLE_NAMES[rank], t, positions)
        expect = "[N, C" + "".join(f", {d}" for d in trailing[rank]) + "]"
        if t.dim() != 2 + rank or tuple(t.shape[2:]) != trailing[rank]:
            raise ValueError(f"{MULTIPOLE_NAMES[rank]} must have shape {expect}, got {list(t.shape)}")
        if t.shape[0] != n_atoms:
            raise ValueError(
                f"{MULTIPOLE_NAMES[rank]} has {t.shape[0]} rows but there are {n_atoms} positions"
            )
        if channels is None:
            channels = (MULTIPOLE_NAMES[rank], t.shape[1])
        elif t.shape[1] != channels[1]:
            raise ValueError(
                f"{MULTIPOLE_NAMES[rank]} have {t.shape[1]} channels but {channels[0]} have {channels[1]}"
            )
        multipoles[rank] = t
    if not multipoles:
        raise ValueError("no multipoles given: pass at least one of charges, dipoles, quadrupoles")
    return multipoles


def check_inputs(positions, charges, dipoles, quadrupoles, cell, pbc, smearing, accuracy) -> Inputs:
    multipoles = check_shapes(positions, charges, dipoles, quadrupoles)
    _finite("positions", positions)
    for rank, t in multipoles.items():
        _finite(MULTIPOLE_NAMES[rank], t)
    if 2 in multipoles:
        multipoles[2] = _traceless(multipoles[2])

    boundary = parse_boundary(pbc, cell)
    periodic, slab = boundary == "periodic", boundary == "slab"
    if periodic or slab:
        if cell is None:
            raise ValueError(f"pbc is {'a slab' if slab else 'periodic'} but no cell was given")
        cell = _tensor("cell", cell, positions)
        if tuple(cell.shape) != (3, 3):
            raise ValueError(
                f"cell must have shape [3, 3] (rows are lattice vectors), got {list(cell.shape)}"
            )
        _finite("cell", cell)
        if slab:
            check_slab(positions, cell)
        else:
            check_periodic_cell(cell)
    else:
        cell = None
    smearing = check_smearing(smearing)
    check_accuracy(accuracy)
    return Inputs(positions, multipoles, cell, periodic, smearing, slab)


def _real_scalar(value):
    """``value`` as a float if it is a real number (not a bool) or a one-element real tensor or array, else None."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
        return float(value.detach().item()) if ok else None
    if isinstance(value, np.ndarray):
        return float(value.item()) if value.size == 1 and value.dtype.kind in "fiu" else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def check_smearing(smearing):
    """``smearing`` (the Gaussian width σ of the sources, Å) as a float, or None; ValueError naming it otherwise.

    A bool (``True`` would read as 1 Å), a string or a non-positive or non-finite number is refused, and so is a
    tensor that requires grad: the sums take σ as a constant (kernels, splitting, cutoffs), so its gradient would
    be silently lost.
    """
    if smearing is None:
        return None
    if isinstance(smearing, torch.Tensor) and smearing.requires_grad:
        raise ValueError("smearing is a tensor that requires grad, but the multipole sums are not differentiable "
                         "with respect to smearing (a constant of their kernels and cutoffs); pass a number, e.g. "
                         "float(smearing)")
    value = _real_scalar(smearing)
    if value is None or not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"smearing must be a positive length in Å (a number) or None, got {smearing!r}")
    return value


def check_accuracy(accuracy) -> float:
    """``accuracy`` as a float in (0, 1); ValueError naming it otherwise (None, a bool, a string, out of range)."""
    value = _real_scalar(accuracy)
    if value is None or not (0.0 < value < 1.0):
        raise ValueError(f"accuracy must be a number in (0, 1), got {accuracy!r}")
    return value


def _traceless(theta: torch.Tensor) -> torch.Tensor:
    """Check that quadrupoles are symmetric and traceless, then remove the residual (rounding) part."""
    detached = theta.detach()
    # round-off is judged against the largest quadrupole of each channel, not each site's own: a
    # site whose Θ comes out small by cancellation (e.g. mixed from larger features) keeps the
    # absolute rounding of its inputs
    scale = detached.abs().amax(dim=(0, -2, -1), keepdim=True)[..., 0, 0].expand(detached.shape[:-2])  # [N, C]
    asym = (detached - detached.transpose(-1, -2)).abs().amax(dim=(-2, -1))
    trace = detached.diagonal(dim1=-2, dim2=-1).sum(-1).abs()
    tol = quadrupole_tolerance(theta.dtype)
    limit = tol * scale + torch.finfo(theta.dtype).tiny
    for what, err in (("symmetric", asym), ("traceless", trace)):
        bad = err > limit
        if bool(bad.any()):
            n, c = bad.nonzero()[0].tolist()
            raise ValueError(
                f"quadrupoles must be symmetric and traceless (relative tolerance {tol:g}); "
                f"quadrupoles[{n}, {c}] is not {what} (deviation {float(err[n, c]):.3g}, "
                f"largest entry {float(scale[n, c]):.3g})"
            )
    sym = 0.5 * (theta + theta.transpose(-1, -2))
    eye = torch.eye(3, dtype=theta.dtype, device=theta.device)
    return sym - sym.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * eye / 3.0
