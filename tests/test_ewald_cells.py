"""The Ewald sum of a batch of periodic cells in one traced function (cartlorem.ewald.cells), float64.

References: the eager per-cell Ewald sum (cartlorem.ewald.fields.compute_fields) at the same splitting, where the
two are the same sum and must agree to rounding, and at its own choice (to the requested accuracy); the
Madelung constant of rock salt; autograd's forces and strain derivative of the eager sum.
"""

from __future__ import annotations

import math

import pytest
import torch
from ase.build import bulk

from cartlorem.ewald.cells import (MAX_TERMS, PeriodicPlan, periodic_plan, plan_fits, prepare_periodic_table,
                                   traced_ewald_fields)
from cartlorem.ewald.fields import compute_fields
from cartlorem.ewald.kernels import smearing_beta
from cartlorem.tensors.harmonics import stf
from conftest import needs_compiled_step  # noqa: E402  (tests/ is on sys.path under pytest)

DT = torch.float64
PBC = torch.ones(3, dtype=torch.bool)


def _batch(seed=0, channels=2):
    """Three cells (triclinic, cubic, hexagonal-like) of 5, 9 and 3 atoms, the atoms shuffled across cells; random
    charges (cells not neutral), dipoles and traceless quadrupoles."""
    g = torch.Generator().manual_seed(seed)
    cells = [torch.tensor([[8.0, 0.3, -0.2], [0.5, 9.0, 0.1], [-0.4, 0.6, 7.5]], dtype=DT),
             torch.eye(3, dtype=DT) * 10.0,
             torch.tensor([[7.0, 0.0, 0.0], [3.5, 6.0, 0.0], [0.0, 0.0, 9.0]], dtype=DT)]
    counts = [5, 9, 3]
    # positions partly outside their cells: the sum wraps them
    pos = torch.cat([torch.rand(n, 3, generator=g, dtype=DT) @ c * 1.3 - 1.0 for n, c in zip(counts, cells)])
    batch = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    perm = torch.randperm(len(batch), generator=g)
    pos, batch = pos[perm], batch[perm]
    n = len(batch)
    q = torch.randn(n, channels, generator=g, dtype=DT)
    mu = torch.randn(n, channels, 3, generator=g, dtype=DT)
    theta = stf(torch.randn(n, channels, 3, 3, generator=g, dtype=DT))
    return pos, batch, torch.stack(cells), q, mu, theta


def _sources(q, mu, theta, which):
    return tuple(x if r in which else None for r, x in enumerate((q, mu, theta)))


@pytest.mark.parametrize("ranks, which", [((0, 1, 2), (0, 1, 2)), ((0,), (0,)), ((0, 1), (0, 1, 2)), ((0, 1, 2), (1,))])
def test_batched_cells_equal_the_per_cell_ewald_sum(ranks, which):
    """Every cell's fields as the eager Ewald sum of that cell alone at alpha = 1/(sqrt 2 sigma), to rounding
    (the same sum, batched and padded), and as its default choice to the requested accuracy."""
    pos, batch, cell, q, mu, theta = _batch()
    src = _sources(q, mu, theta, which)
    accuracy = 1e-6
    plan = periodic_plan(batch, cell, smearing=1.0, accuracy=accuracy, ranks=ranks, source_ranks=which)
    assert tuple(plan.slots.shape) == (3, 9) and bool(plan.k_mask.sum(1).min() < plan.m.shape[1])  # padded
    got = traced_ewald_fields(pos, batch, cell, plan, *src, smearing=1.0, ranks=ranks)
    for b in range(3):
        idx = (batch == b).nonzero().flatten()
        sub = [None if x is None else x[idx] for x in src]
        same = compute_fields(pos[idx], *sub, cell[b], PBC, smearing=1.0, accuracy=accuracy, ranks=ranks,
                              alpha=smearing_beta(1.0), method="ewald")
        auto = compute_fields(pos[idx], *sub, cell[b], PBC, smearing=1.0, accuracy=accuracy, ranks=ranks)
        for r in range(3):
            if r not in ranks:
                assert got[r] is None
                continue
            scale = float(same[r].abs().max())
            assert float((got[r][idx] - same[r]).abs().max()) <= 1e-13 * scale, (b, r)
            assert float((got[r][idx] - auto[r]).abs().max()) <= 10 * accuracy * scale, (b, r)


def test_traceless_gradient_is_the_symmetric_traceless_part():
    pos, batch, cell, q, mu, theta = _batch(1)
    plan = periodic_plan(batch, cell, smearing=1.0, accuracy=1e-6)
    full = traced_ewald_fields(pos, batch, cell, plan, q, mu, theta, smearing=1.0)
    part = traced_ewald_fields(pos, batch, cell, plan, q, mu, theta, smearing=1.0, traceless_gradient=True)
    torch.testing.assert_close(part[2], stf(full[2]), rtol=0, atol=1e-14)
    assert float(full[2].diagonal(dim1=-2, dim2=-1).sum(-1).abs().max()) > 1e-3  # smeared sources: a trace to drop


def test_madelung_constant_of_rock_salt():
    """Narrow Gaussians (sigma = 0.1 Å against 2.82 Å to the nearest ion) in the conventional NaCl cell: the
    potential at every ion is -+ M / r0 with M = 1.747564594633 (the sum over the other ions; each Gaussian's own
    potential is the self term)."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    pos = torch.tensor(atoms.positions, dtype=DT)
    cell = torch.tensor(atoms.cell.array, dtype=DT)[None]
    q = torch.tensor([1.0 if z == 11 else -1.0 for z in atoms.numbers], dtype=DT)[:, None]
    batch = torch.zeros(len(atoms), dtype=torch.long)
    plan = periodic_plan(batch, cell, smearing=0.1, accuracy=1e-10, ranks=(0,), source_ranks=(0,))
    phi = traced_ewald_fields(pos, batch, cell, plan, q, smearing=0.1, ranks=(0,))[0][:, 0]
    r0 = 5.64 / 2
    torch.testing.assert_close(phi * r0, -q[:, 0] * 1.747564594633, rtol=1e-9, atol=0)


def test_forces_and_strain_derivative_equal_the_eager_sum():
    """The energy's gradient in the positions and in a homogeneous strain of positions and cells (the stress),
    through the batched sum, equals autograd through the eager per-cell sum."""
    pos, batch, cell, q, mu, theta = _batch(2)
    plan = periodic_plan(batch, cell, smearing=1.0, accuracy=1e-6)

    def energy(fn, positions, strain):
        c = cell + cell @ strain
        r = positions + torch.einsum("ni,nij->nj", positions, strain[batch])
        phi, field, grad = fn(r, c)
        return 0.5 * ((q * phi).sum() - (mu * field).sum() - 0.5 * (theta * grad).sum())

    def batched(r, c):
        return traced_ewald_fields(r, batch, c, plan, q, mu, theta, smearing=1.0)

    def eager(r, c):
        out = [torch.zeros_like(q), torch.zeros_like(mu), torch.zeros_like(theta)]
        for b in range(3):
            idx = (batch == b).nonzero().flatten()
            f = compute_fields(r[idx], q[idx], mu[idx], theta[idx], c[b], PBC, smearing=1.0, accuracy=1e-6,
                               alpha=smearing_beta(1.0), method="ewald")
            out = [o.index_copy(0, idx, f[k]) for k, o in enumerate(out)]
        return out

    grads = []
    for fn in (batched, eager):
        r = pos.clone().requires_grad_()
        strain = torch.zeros(3, 3, 3, dtype=DT, requires_grad=True)
        grads.append(torch.autograd.grad(energy(fn, r, strain), (r, strain)))
    for got, ref in zip(*grads):
        assert float(ref.abs().max()) > 1e-3
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-12)


def test_plan_slots_and_limits():
    """Every atom's slot holds that atom; cells with fewer atoms or k-vectors are padded (the zero row N, masked
    k-vectors); plan_fits refuses more than MAX_TERMS (cell, k-vector, slot) terms."""
    pos, batch, cell, *_ = _batch()
    plan = periodic_plan(batch, cell, smearing=1.0, accuracy=1e-5)
    n, width = len(batch), plan.slots.shape[1]
    assert torch.equal(plan.slots.flatten()[plan.atom_slot], torch.arange(n))
    assert torch.equal(plan.atom_slot // width, batch)
    assert int((plan.slots == n).sum()) == 3 * width - n
    assert torch.equal(plan.k_mask.sum(1) > 0, torch.ones(3, dtype=torch.bool))
    assert bool((plan.m[~plan.k_mask] == 0).all()) and not bool((plan.m[plan.k_mask] == 0).all(-1).any())
    assert plan_fits(plan)
    big = PeriodicPlan(torch.zeros(8, 1024, dtype=torch.long), plan.atom_slot,
                       torch.zeros(8, MAX_TERMS // (8 * 1024) + 1, 3, dtype=torch.long), plan.k_mask)
    assert not plan_fits(big)
    # the k-space cutoff is the eager sum's at alpha = beta: 2 p beta, p the tail parameter of the order
    from cartlorem.ewald.ewald import choose_parameters

    params = choose_parameters(cell[0].numpy(), 5, 1e-5, 4, 1.0, alpha=smearing_beta(1.0))
    k = plan.m[0][plan.k_mask[0]].to(DT) @ (2 * math.pi * torch.linalg.inv(cell[0]).T)
    assert float(k.norm(dim=1).max()) < params.k_cutoff


def _dense_cells(seed=5, channels=2):
    """Rock salt (8 atoms), diamond (2 and 8), rattled: cells for which the eager cost model puts the whole sum of
    sigma = 1 Å sources in reciprocal space (alpha = beta)."""
    rng = torch.Generator().manual_seed(seed)
    structures = [bulk("NaCl", "rocksalt", a=5.64, cubic=True), bulk("Si", "diamond", a=5.43),
                  bulk("Si", "diamond", a=5.43, cubic=True)]
    pos = torch.cat([torch.tensor(a.positions, dtype=DT) + 0.1 * torch.randn(len(a), 3, generator=rng, dtype=DT)
                     for a in structures])
    batch = torch.cat([torch.full((len(a),), i) for i, a in enumerate(structures)])
    cell = torch.stack([torch.tensor(a.cell.array, dtype=DT) for a in structures])
    n = len(batch)
    return (pos, batch, cell, torch.randn(n, channels, generator=rng, dtype=DT),
            torch.randn(n, channels, 3, generator=rng, dtype=DT),
            stf(torch.randn(n, channels, 3, 3, generator=rng, dtype=DT)))


@pytest.mark.parametrize("traceless", [False, True])
def test_eager_batched_fields_sum_all_cells_at_once(monkeypatch, traceless):
    """batched_multipole_fields on a batch of periodic cells with smeared sources: one batched sum when every
    cell's own choice is Ewald at alpha = beta (dense cells), each cell as multipole_fields alone to rounding; a
    batch whose cells get another splitting (sparse cells: part of the sum in real space) goes cell by cell."""
    from cartlorem.ewald import cells as cells_mod
    from cartlorem.ewald import fields as fields_mod
    from cartlorem.ewald.fields import batched_multipole_fields

    calls = []
    monkeypatch.setattr(fields_mod, "traced_ewald_fields",
                        lambda *a, **k: calls.append(1) or cells_mod.traced_ewald_fields(*a, **k))
    for name, (p, bt, c, *src) in {"dense": _dense_cells(), "sparse": _batch(3)}.items():
        calls.clear()
        pbc = torch.ones(c.shape[0], 3, dtype=torch.bool)
        got = batched_multipole_fields(p, bt, c, pbc, *src, smearing=1.0, accuracy=1e-6, prefactor=2.0,
                                       traceless_gradient=traceless)
        assert len(calls) == (name == "dense"), name
        for b in range(c.shape[0]):
            idx = (bt == b).nonzero().flatten()
            ref = compute_fields(p[idx], *[x[idx] for x in src], c[b], PBC, smearing=1.0, accuracy=1e-6,
                                 prefactor=2.0)
            if traceless:
                ref[2] = stf(ref[2])
            for r, x in enumerate(got):
                torch.testing.assert_close(x[idx], ref[r], rtol=1e-12, atol=1e-12 * float(ref[r].abs().max()))


def test_eager_batched_fields_sum_large_cells_one_by_one(monkeypatch):
    """The batched sum holds every cell's phases padded to the largest cell: beyond CELL_SUM_TERMS (k-vectors x
    atom slots per cell) it was slower than the per-cell sum (one 648-atom water cell: 2.9x), and a batch with a
    216-atom cell goes cell by cell; two 64-atom NaCl cells (the training data's) still take one sum."""
    from cartlorem.ewald import cells as cells_mod
    from cartlorem.ewald import fields as fields_mod
    from cartlorem.ewald.fields import batched_multipole_fields

    calls = []
    monkeypatch.setattr(fields_mod, "traced_ewald_fields",
                        lambda *a, **k: calls.append(1) or cells_mod.traced_ewald_fields(*a, **k))
    rng = torch.Generator().manual_seed(7)
    cubic = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    for structures, one_sum in (([cubic.repeat(2), cubic.repeat(2)], True),
                                ([cubic.repeat(2), cubic.repeat(3)], False)):
        pos = torch.cat([torch.tensor(a.positions, dtype=DT) + 0.1 * torch.randn(len(a), 3, generator=rng, dtype=DT)
                         for a in structures])
        bt = torch.cat([torch.full((len(a),), i) for i, a in enumerate(structures)])
        c = torch.stack([torch.tensor(a.cell.array, dtype=DT) for a in structures])
        n = len(bt)
        src = (torch.randn(n, 2, generator=rng, dtype=DT), torch.randn(n, 2, 3, generator=rng, dtype=DT),
               stf(torch.randn(n, 2, 3, 3, generator=rng, dtype=DT)))  # q, mu, Theta: alpha = beta for both cells
        calls.clear()
        got = batched_multipole_fields(pos, bt, c, torch.ones(len(structures), 3, dtype=torch.bool), *src,
                                       smearing=1.0, accuracy=1e-6, method="ewald")
        assert len(calls) == one_sum, [len(a) for a in structures]
        for b in range(len(structures)):
            idx = (bt == b).nonzero().flatten()
            ref = compute_fields(pos[idx], *[x[idx] for x in src], c[b], PBC, smearing=1.0, accuracy=1e-6,
                                 method="ewald")
            for r, x in enumerate(got):
                torch.testing.assert_close(x[idx], ref[r], rtol=1e-12, atol=1e-12 * float(ref[r].abs().max()))


@needs_compiled_step
def test_traced_sum_has_no_effectful_ops():
    """The traced sum, differentiated as the training step does, lowers to a graph without effectful operations:
    torch.linalg.inv adds an error check (_linalg_check_errors) that AOT autograd wraps in with_effects, and
    Inductor then bypasses its on-disk graph cache, so that every new process compiled the periodic step from
    scratch (minutes). The cells are checked before the call; the sum uses inv_ex."""
    from torch._dynamo.backends.common import aot_autograd

    pos, batch, cell, q, mu, theta = _batch(4)
    plan = periodic_plan(batch, cell, smearing=1.0, accuracy=1e-4)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def energy(r):
        phi, field, grad = traced_ewald_fields(r, batch, cell, plan, q, mu, theta, smearing=1.0)
        return (q * phi).sum() - (mu * field).sum() - 0.5 * (theta * grad).sum()

    prepare_periodic_table((0, 1, 2), (0, 1, 2), 1.0, DT, "cpu")  # as LongRangeBlock.prepare_compiled does
    torch._dynamo.reset()
    compiled = torch.compile(torch.func.grad(energy), backend=aot_autograd(fw_compiler=capture), fullgraph=True)
    torch.testing.assert_close(compiled(pos), torch.func.grad(energy)(pos), rtol=1e-12, atol=1e-12)
    assert graphs
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "with_effects" in t or "check_errors" in t], sorted(targets)


def _slab_batch(seed=6, channels=2):
    """Two slabs (pbc = [True, True, False]; one with its third row tilted off the normal and pointing down, atoms
    outside the cell) and a periodic cell, in the long-range block's slab frame (cartlorem.nn.long_range.slab_frame)."""
    from cartlorem.nn.long_range import slab_frame

    g = torch.Generator().manual_seed(seed)
    cells = torch.stack([torch.tensor([[8.0, 0.3, 0.0], [0.5, 9.0, 0.0], [1.0, -0.6, 14.0]], dtype=DT),
                         torch.eye(3, dtype=DT) * 10.0,
                         torch.tensor([[7.0, 0.0, 0.0], [3.5, 6.0, 0.0], [0.8, 0.0, -12.0]], dtype=DT)])
    pbc = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])
    counts = [5, 9, 4]
    spread = torch.tensor([1.3, 1.3, 0.5], dtype=DT)  # the slabs' atoms within half their height
    pos = torch.cat([torch.rand(n, 3, generator=g, dtype=DT) * spread @ c for n, c in zip(counts, cells)])
    batch = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    n = len(batch)
    sources = (torch.randn(n, channels, generator=g, dtype=DT), torch.randn(n, channels, 3, generator=g, dtype=DT),
               stf(torch.randn(n, channels, 3, 3, generator=g, dtype=DT)))
    framed, frame = slab_frame(pos, batch, cells, pbc)
    return framed, batch, frame, pbc, framed - pos, sources


def test_slabs_equal_the_per_slab_sum():
    """Slabs beside a periodic cell: every structure's fields as the eager sum of that structure alone (slab_sum:
    Ewald in the elongated cell plus the plane-averaged correction, charged slabs included, and the replica
    layers' in-plane part removed) at alpha = beta, to rounding, and at its own splitting to the requested
    accuracy."""
    pos, batch, cell, pbc, shift, src = _slab_batch()
    accuracy = 1e-6
    slab = pbc[:, 0] & pbc[:, 1] & ~pbc[:, 2]
    plan = periodic_plan(batch, cell, smearing=1.0, accuracy=accuracy, slab=slab, shift=shift,
                         n_channels=src[0].shape[1])
    assert torch.equal(plan.slab, slab) and float(plan.gap[1]) == 0.0 and bool((plan.gap[slab] >= 1.0).all())
    assert bool(plan.replica_mask[slab].any(1).all()) and not bool(plan.replica_mask[~slab].any())
    got = traced_ewald_fields(pos, batch, cell, plan, *src, smearing=1.0)
    for b in range(3):
        idx = (batch == b).nonzero().flatten()
        sub = [x[idx] for x in src]
        assert abs(float(sub[0].sum())) > 0.1  # charged structures: the slab correction's Q terms count
        same = compute_fields(pos[idx], *sub, cell[b], pbc[b], smearing=1.0, accuracy=accuracy,
                              alpha=smearing_beta(1.0), method="ewald")
        auto = compute_fields(pos[idx], *sub, cell[b], pbc[b], smearing=1.0, accuracy=accuracy)
        for r in range(3):
            scale = float(same[r].abs().max())
            assert float((got[r][idx] - same[r]).abs().max()) <= 1e-13 * scale, (b, r)
            assert float((got[r][idx] - auto[r]).abs().max()) <= 10 * accuracy * scale, (b, r)


def test_slab_forces_equal_the_eager_sum():
    """The energy's gradient in the positions and in the cells (through the elongated cell and the correction's
    volume and normal), batched, equals autograd through the eager per-structure sum at the same splitting."""
    pos, batch, cell, pbc, shift, (q, mu, theta) = _slab_batch(7)
    slab = pbc[:, 0] & pbc[:, 1] & ~pbc[:, 2]
    plan = periodic_plan(batch, cell, smearing=1.0, accuracy=1e-6, slab=slab, shift=shift, n_channels=q.shape[1])

    def energy(fields):
        phi, field, grad = fields
        return 0.5 * ((q * phi).sum() - (mu * field).sum() - 0.5 * (theta * grad).sum())

    def eager(r, c):
        out = [torch.zeros_like(q), torch.zeros_like(mu), torch.zeros_like(theta)]
        for b in range(3):
            idx = (batch == b).nonzero().flatten()
            f = compute_fields(r[idx], q[idx], mu[idx], theta[idx], c[b], pbc[b], smearing=1.0, accuracy=1e-6,
                               alpha=smearing_beta(1.0), method="ewald")
            out = [o.index_copy(0, idx, f[k]) for k, o in enumerate(out)]
        return out

    grads = []
    for fn in (lambda r, c: traced_ewald_fields(r, batch, c, plan, q, mu, theta, smearing=1.0), eager):
        r, c = pos.clone().requires_grad_(), cell.clone().requires_grad_()
        grads.append(torch.autograd.grad(energy(fn(r, c)), (r, c)))
    for got, ref in zip(*grads):
        assert float(ref.abs().max()) > 1e-3
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-12)


def test_open_structures_are_left_out():
    """Open structures in the plan (a molecule beside cells, its cell all zeros): zero fields at their atoms, the
    cells' fields as without them, and finite gradients (no division by the zero cell), zero for that cell."""
    pos, batch, cell, q, mu, theta = _batch(8)
    g = torch.Generator().manual_seed(8)
    n_mol = 4
    pos_all = torch.cat([pos, torch.randn(n_mol, 3, generator=g, dtype=DT)])
    batch_all = torch.cat([batch, torch.full((n_mol,), 3)])
    cell_all = torch.cat([cell, torch.zeros(1, 3, 3, dtype=DT)])
    src_all = [torch.cat([x, torch.randn((n_mol,) + x.shape[1:], generator=g, dtype=DT)]) for x in (q, mu, theta)]
    src_all[2] = stf(src_all[2])
    open_ = torch.tensor([False, False, False, True])
    plan = periodic_plan(batch_all, cell_all, smearing=1.0, accuracy=1e-6, open=open_)
    assert torch.equal(plan.open, open_) and not bool(plan.k_mask[3].any())
    ref = traced_ewald_fields(pos, batch, cell, periodic_plan(batch, cell, smearing=1.0, accuracy=1e-6), q, mu, theta,
                              smearing=1.0)
    r, c = pos_all.clone().requires_grad_(), cell_all.clone().requires_grad_()
    got = traced_ewald_fields(r, batch_all, c, plan, *src_all, smearing=1.0)
    n = len(batch)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a[:n], b, rtol=1e-13, atol=1e-13)
        assert float(a[n:].abs().max()) == 0.0
    energy = sum((x * f).sum() for x, f in zip(src_all, got))
    g_r, g_c = torch.autograd.grad(energy, (r, c))
    assert bool(torch.isfinite(g_r).all()) and bool(torch.isfinite(g_c).all())
    assert float(g_c[3].abs().max()) == 0.0 and float(g_r[n:].abs().max()) == 0.0
