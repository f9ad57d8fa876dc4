"""Checks shipped for users and for our own tests: run them on your own model variant.

Tensor level: :func:`assert_equivariant` (any function of Cartesian tensors, rotations and
reflections). Model level, for any module with the output contract of ``cartlorem.training``
(``model(graph, compute_stress=...)`` → "energy" [B] eV, "forces" [N, 3] eV/Å, "stress"
[B, 3, 3] eV/Å³) and a ``cutoff`` attribute in Å (or pass ``cutoff=``):

* :func:`check_o3_invariance`      energy invariant, forces equivariant under O(3) and translations
* :func:`check_forces_fd`          forces = −∂E/∂r against central finite differences
* :func:`check_stress_fd`          stress = (1/V) ∂E/∂ε against finite strains
* :func:`check_batch_equals_single` a batch of structures = each structure alone
* :func:`check_cutoff_smoothness`  energy and force of a dimer continuous as it crosses the cutoff

Each returns the worst error (relative unless stated); compare it with a tolerance, e.g.
``assert check_forces_fd(model, atoms) < 1e-6`` in float64.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = [
    "random_orthogonal",
    "rotate",
    "assert_equivariant",
    "check_o3_invariance",
    "check_forces_fd",
    "check_stress_fd",
    "check_batch_equals_single",
    "check_cutoff_smoothness",
]


def random_orthogonal(det: float = 1.0, *, dtype=torch.float64, generator: Optional[torch.Generator] = None):
    """A random 3×3 orthogonal matrix (Haar on SO(3), times −I-free reflection if det = −1)."""
    a = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) * det < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def rotate(x: torch.Tensor, q: torch.Tensor, rank: int) -> torch.Tensor:
    """Apply Q to every Cartesian axis of a rank-``rank`` tensor x [...] + (3,)*rank."""
    q = q.to(dtype=x.dtype, device=x.device)
    if rank == 0:
        return x
    if rank == 1:
        return x @ q.T
    if rank == 2:
        return q @ x @ q.T
    raise ValueError(f"rank must be 0, 1 or 2, got {rank}")


def assert_equivariant(
    fn: Callable,
    args: Sequence[torch.Tensor],
    ranks_in: Sequence[Optional[int]],
    ranks_out: Sequence[int],
    *,
    parity_out: Optional[Sequence[int]] = None,
    n_samples: int = 3,
    rtol: float = 1e-10,
    seed: int = 0,
) -> float:
    """Check fn(Q·args) == Q·fn(args) for random orthogonal Q with det = +1 and det = −1.

    ranks_in: rank of each argument (None: left untouched, e.g. weights or species);
    ranks_out: rank of each output (fn may return one tensor or a sequence);
    parity_out: +1 for true tensors, −1 for pseudotensors (sign flips under improper Q).
    Returns the worst relative error; raises AssertionError naming the output, det and error.
    """
    g = torch.Generator().manual_seed(seed)
    parity_out = list(parity_out) if parity_out is not None else [1] * len(ranks_out)

    def as_list(y):
        return list(y) if isinstance(y, (tuple, list)) else [y]

    with torch.no_grad():
        ref = as_list(fn(*args))
    if len(ref) != len(ranks_out):
        raise ValueError(f"fn returned {len(ref)} outputs but ranks_out names {len(ranks_out)}")
    worst = 0.0
    for det in (1.0, -1.0):
        for _ in range(n_samples):
            q = random_orthogonal(det, generator=g)
            moved = [a if r is None else rotate(a, q, r) for a, r in zip(args, ranks_in)]
            with torch.no_grad():
                got = as_list(fn(*moved))
            for k, (y, yq, r, p) in enumerate(zip(ref, got, ranks_out, parity_out)):
                expect = rotate(y, q, r) * (det if p < 0 else 1.0)
                scale = float(expect.abs().max()) or 1.0
                err = float((yq - expect).abs().max()) / scale
                worst = max(worst, err)
                if not err <= rtol:
                    raise AssertionError(f"output {k} (rank {r}) not equivariant for det {det:+.0f}: rel err {err:.2e}")
    return worst


# --- model-level checks (used by our test suite; usable on any model with the output contract) ----


def _graph(model, atoms, cutoff=None):
    from .graph import atoms_to_graph

    cutoff = getattr(model, "cutoff", None) if cutoff is None else cutoff
    if cutoff is None:
        raise ValueError("the model has no 'cutoff' attribute: pass cutoff= (Å)")
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    return atoms_to_graph(atoms, cutoff, dtype=dtype)


def _predict(model, atoms, cutoff=None, stress=None):
    return model(_graph(model, atoms, cutoff), compute_stress=stress)


def check_o3_invariance(model, atoms, *, seed: int = 0, cutoff: Optional[float] = None) -> float:
    """Energy invariant, forces equivariant under random rotations, reflections and a translation.

    Returns the worst relative error (energy and forces)."""
    rng = torch.Generator().manual_seed(seed)
    ref = _predict(model, atoms, cutoff)
    e0, f0 = ref["energy"].detach(), ref["forces"].detach()
    worst = 0.0
    for det in (1.0, -1.0):
        q = random_orthogonal(det, generator=rng).numpy()
        moved = atoms.copy()
        moved.positions = atoms.positions @ q.T + torch.randn(3, generator=rng, dtype=torch.float64).numpy()
        if atoms.pbc.any():
            moved.set_cell(atoms.cell.array @ q.T, scale_atoms=False)
        out = _predict(model, moved, cutoff)
        e_err = float((out["energy"].detach() - e0).abs().max() / e0.abs().clamp_min(1e-12).max())
        f_ref = f0 @ torch.as_tensor(q, dtype=f0.dtype).T
        f_err = float((out["forces"].detach() - f_ref).abs().max() / f0.abs().max().clamp_min(1e-12))
        worst = max(worst, e_err, f_err)
    return worst


def check_forces_fd(model, atoms, *, h: float = 1e-4, n: int = 6, seed: int = 0,
                    cutoff: Optional[float] = None) -> float:
    """Forces against central finite differences of the energy; worst error relative to max |F|.

    A periodic long-range model's Ewald energy steps where a lattice image or k-vector crosses its cutoff, by far
    less than the sum's ``accuracy`` (e.g. 8e-8 eV in 0.7 eV), but divided by 2h that can be 1e-4 of the forces: a
    worse result in a few cells in ten at h = 1e-4 is that step (check with a smaller or another h), not a wrong
    force. The same holds for :func:`check_stress_fd`."""
    rng = torch.Generator().manual_seed(seed)
    f = _predict(model, atoms, cutoff)["forces"].detach()
    worst = 0.0
    for _ in range(n):
        i = int(torch.randint(len(atoms), (1,), generator=rng))
        k = int(torch.randint(3, (1,), generator=rng))
        es = []
        for sgn in (1, -1):
            a = atoms.copy()
            a.positions[i, k] += sgn * h
            es.append(float(_predict(model, a, cutoff)["energy"].detach().sum()))
        fd = -(es[0] - es[1]) / (2 * h)
        worst = max(worst, abs(fd - float(f[i, k])) / float(f.abs().max().clamp_min(1e-12)))
    return worst


def check_stress_fd(model, atoms, *, h: float = 1e-4, cutoff: Optional[float] = None) -> float:
    """Stress against finite strain cell → cell (I + ε); worst error relative to max |σ|."""
    import numpy as np

    s = _predict(model, atoms, cutoff, stress=True)["stress"][0].detach()
    vol = abs(float(np.linalg.det(atoms.cell.array)))
    worst = 0.0
    for x, y in [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]:
        eps = np.zeros((3, 3))
        eps[x, y] = eps[y, x] = h if x == y else h / 2
        es = []
        for sgn in (1, -1):
            a = atoms.copy()
            a.set_cell(atoms.cell.array @ (np.eye(3) + sgn * eps), scale_atoms=True)
            es.append(float(_predict(model, a, cutoff)["energy"].detach().sum()))
        fd = (es[0] - es[1]) / (2 * h) / vol
        worst = max(worst, abs(fd - float(s[x, y])) / float(s.abs().max().clamp_min(1e-12)))
    return worst


def check_batch_equals_single(model, structures, *, cutoff: Optional[float] = None) -> float:
    """Predict ``structures`` (a list of ase.Atoms) one by one and as one collated batch.

    Returns the worst absolute difference of energies (eV), forces (eV/Å) and, for periodic
    structures, stresses (eV/Å³), relative to the largest |value| of that quantity (1 if zero).
    Non-periodic structures in the batch must get a zero stress row.
    """
    from .graph import collate

    graphs = [_graph(model, a, cutoff) for a in structures]
    singles = [model(g, compute_stress=True) for g in graphs]
    batch = model(collate(graphs), compute_stress=True)
    worst = 0.0
    for key in ("energy", "forces", "stress"):
        if key not in batch:
            continue
        ref = torch.cat([s[key].detach() for s in singles])
        scale = float(ref.abs().max()) or 1.0
        worst = max(worst, float((batch[key].detach() - ref).abs().max()) / scale)
    if "stress" in batch:
        for k, a in enumerate(structures):
            if not a.pbc.any() and bool(batch["stress"][k].abs().max() > 0):
                raise AssertionError(f"structure {k} is not periodic but has a non-zero stress in the batch")
    return worst


def check_cutoff_smoothness(model, symbols: str = "OH", *, h: float = 1e-6,
                            cutoff: Optional[float] = None) -> dict:
    """A dimer ``symbols`` at separations r_c − h and r_c + h across the cutoff r_c (Å).

    Returns absolute values: "energy_jump" |E(r_c − h) − E(r_c + h)| (eV), "force_inside" |F| at
    r_c − h and "force_jump" |F(r_c − h) − F(r_c + h)| (eV/Å) on the second atom, and
    "energy_range" |E(r_c − 0.5) − E(r_c + h)| (eV), which must be far from zero for the check to
    mean anything (the pair does interact inside the cutoff). For a short-range model the jumps
    and the force inside go to zero with h; a long-range term adds a smooth part (its force is
    not zero at r_c, but it does not jump).
    """
    from ase import Atoms

    rc = getattr(model, "cutoff", None) if cutoff is None else cutoff
    if rc is None:
        raise ValueError("the model has no 'cutoff' attribute: pass cutoff= (Å)")
    if len(Atoms(symbols)) != 2:
        raise ValueError(f"symbols must name two atoms, got {symbols!r}")

    def energy_force(d):
        out = _predict(model, Atoms(symbols, positions=[[0, 0, 0], [d, 0, 0]]), cutoff=rc)
        return float(out["energy"].detach().sum()), out["forces"][1].detach()

    e_in, f_in = energy_force(rc - h)
    e_out, f_out = energy_force(rc + h)
    e_near, _ = energy_force(rc - 0.5)
    return {
        "energy_jump": abs(e_in - e_out),
        "force_inside": float(f_in.norm()),
        "force_jump": float((f_in - f_out).norm()),
        "energy_range": abs(e_near - e_out),
    }
