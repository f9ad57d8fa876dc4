"""The faster local training step (issue 12 item 2) against the code it replaces, in float64.

Outside TorchScript the interaction blocks run the component-major message kernel
(``component_major_edge_product``), the body-order product with its paths grouped, and the species skip
with all species at once, and ``EquivariantLinear`` mixes channels with one GEMM per rank; TorchScript (the export) still runs the path-by-path code, the reference here.
Every check compares values AND the first and second derivatives that training on forces takes.
"""

import contextlib

import pytest
import torch
from ase.build import bulk, molecule

import cartlorem
import cartlorem.nn.blocks as blocks
from cartlorem.graph import atoms_to_graph, collate
from cartlorem.nn.blocks import BodyOrderProduct, SpeciesLinear
from cartlorem.tensors import EquivariantLinear, compact_edge_product, edge_paths, stf, sym_to_compact
from cartlorem.tensors.fused import component_major_edge_product, harmonic2_compact
from cartlorem.testing import check_o3_invariance

DT = torch.float64


@contextlib.contextmanager
def reference_path():
    """Run the blocks' TorchScript branch eagerly: the path-by-path code the fast path replaces."""
    saved = torch.jit.is_scripting
    torch.jit.is_scripting = lambda: True
    try:
        yield
    finally:
        torch.jit.is_scripting = saved


def _irrep(shape, l, g):
    x = torch.randn(*shape, *(3,) * l, generator=g, dtype=DT)
    return stf(x) if l == 2 else x


def _to_cm(x, l):
    """[E, C] / [E, C, 3] / [E, C, 3, 3] → component-major [E, C] / [E, 3, C] / [E, 6, C]."""
    if l == 0:
        return x
    return (sym_to_compact(x) if l == 2 else x).transpose(1, 2)


def _second_order(outs, inputs, g):
    """Values, the gradient of a random projection of ``outs`` w.r.t. ``inputs`` (create_graph), and the
    gradient of a random projection of that gradient (the double backward of training on forces)."""
    probes = [torch.randn(o.shape, generator=g, dtype=DT) for o in outs]
    loss = sum((o * p).sum() for o, p in zip(outs, probes))
    first = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    probes2 = [torch.randn(x.shape, generator=g, dtype=DT) for x in inputs]
    loss2 = sum((f * p).sum() for f, p in zip(first, probes2) if f is not None)
    second = torch.autograd.grad(loss2, inputs, allow_unused=True)
    return first, second


@pytest.mark.parametrize("l_in", [(0,), (0, 1), (0, 1, 2), (0, 2)])
@pytest.mark.parametrize("l_out", [(0, 1, 2), (0,), (1, 2)])
def test_component_major_kernel_equals_compact_kernel_to_second_order(l_in, l_out):
    """Values, first and second derivatives w.r.t. features, weights and the edge vector v (n = v/|v|)."""
    g = torch.Generator().manual_seed(21)
    E, C = 9, 4
    h = [_irrep((E, C), l, g) if l in l_in else None for l in range(3)]
    v = torch.randn(E, 3, generator=g, dtype=DT)
    w = torch.randn(E, len(edge_paths(l_in, l_out)), C, generator=g, dtype=DT)
    results = []
    for cm in (False, True):
        leaves = [x.clone().requires_grad_(True) for x in h if x is not None] + [v.clone().requires_grad_(True),
                                                                              w.clone().requires_grad_(True)]
        hs = iter(leaves)
        hin = [None if x is None else next(hs) for x in h]
        n = leaves[-2] / leaves[-2].norm(dim=-1, keepdim=True)
        if cm:
            out = component_major_edge_product([None if x is None else _to_cm(x, l) for l, x in enumerate(hin)],
                                               n, leaves[-1], list(l_out))
            out = [None if o is None else (o if l == 0 else o.transpose(1, 2)) for l, o in enumerate(out)]
        else:
            out = compact_edge_product([None if x is None else (sym_to_compact(x) if l == 2 else x)
                                        for l, x in enumerate(hin)], n, leaves[-1], list(l_out))
        assert [o is not None for o in out] == [l in l_out for l in range(3)]
        outs = [o for o in out if o is not None]
        results.append((outs, *_second_order(outs, leaves, torch.Generator().manual_seed(5))))
    (ref, ref1, ref2), (got, got1, got2) = results
    if l_in != (0,) or l_out != (0,):  # (0, 0, 0) alone does not depend on the geometry
        assert float(ref2[-2].abs().max()) > 0  # the second derivative w.r.t. the geometry is exercised
    for a, b in zip(got + list(got1) + list(got2), ref + list(ref1) + list(ref2)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("l_in", [(0,), (0, 1, 2)])
def test_component_major_kernel_gradcheck_and_gradgradcheck(l_in):
    g = torch.Generator().manual_seed(3)
    E, C = 4, 2
    h = [_to_cm(_irrep((E, C), l, g), l).contiguous().requires_grad_(True) for l in l_in]
    n = torch.randn(E, 3, generator=g, dtype=DT)
    n = (n / n.norm(dim=-1, keepdim=True)).requires_grad_(True)
    w = torch.randn(E, len(edge_paths(l_in)), C, generator=g, dtype=DT, requires_grad=True)

    def fn(*args):
        hs = list(args[:-2]) + [None] * (3 - len(l_in))
        return tuple(component_major_edge_product(hs, args[-2], args[-1]))

    assert torch.autograd.gradcheck(fn, (*h, n, w))
    assert torch.autograd.gradgradcheck(fn, (*h, n, w))


def test_harmonic2_compact_is_the_rank2_harmonic():
    g = torch.Generator().manual_seed(4)
    n = torch.randn(7, 3, generator=g, dtype=DT)
    n = n / n.norm(dim=-1, keepdim=True)
    dense = 1.5 * n[:, :, None] * n[:, None, :] - 0.5 * torch.eye(3, dtype=DT)
    torch.testing.assert_close(harmonic2_compact(n), sym_to_compact(dense), rtol=0, atol=1e-15)


@pytest.mark.parametrize("correlation", [1, 2, 3])
@pytest.mark.parametrize("l_in, l_out", [((0, 1, 2), (0, 1, 2)), ((0, 1, 2), (0,)), ((0, 1, 2), (1, 2)), ((0, 2), (0,))])
def test_grouped_body_order_equals_path_by_path(correlation, l_in, l_out):
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    prod = BodyOrderProduct(5, 3, correlation, l_in, l_out).double()
    with torch.no_grad():
        for p in prod.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    A = [_irrep((8, 5), l, g) if l in l_in else None for l in range(3)]
    species = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0])
    results = []
    for ref in (True, False):
        leaves = [x.clone().requires_grad_(True) for x in A if x is not None]
        it = iter(leaves)
        Ain = [None if x is None else next(it) for x in A]
        with reference_path() if ref else contextlib.nullcontext():
            out = prod(Ain, species)
        outs = [o for o in out if o is not None]
        results.append((outs, *_second_order(outs, leaves + list(prod.parameters()), torch.Generator().manual_seed(8))))
    (ref, ref1, ref2), (got, got1, got2) = results
    assert len(got) == len(l_out)
    for a, b in zip(got + list(got1) + list(got2), ref + list(ref1) + list(ref2)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_species_linear_all_species_equals_masked():
    """Including a species the batch does not hold (its weights get zero gradient either way)."""
    g = torch.Generator().manual_seed(9)
    torch.manual_seed(9)
    skip = SpeciesLinear(5, 4, 4, (0, 1, 2)).double()
    h = [_irrep((9, 5), l, g) for l in range(3)]
    species = torch.tensor([0, 2, 2, 0, 0, 2, 3, 3, 0])  # species 1 absent
    results = []
    for ref in (True, False):
        leaves = [x.clone().requires_grad_(True) for x in h]
        with reference_path() if ref else contextlib.nullcontext():
            out = skip(leaves, species)
        results.append((out, *_second_order(out, leaves + list(skip.parameters()), torch.Generator().manual_seed(2))))
    (ref, ref1, ref2), (got, got1, got2) = results
    for a, b in zip(got + list(got1) + list(got2), ref + list(ref1) + list(ref2)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _linear_by_einsum(lin, xs):
    """EquivariantLinear's definition written out: out_l[n, d, ...] = sum_c x_l[n, c, ...] W_l[c, d] (+ bias, rank 0)."""
    out = [None, None, None]
    for rank, weight in zip(lin.ranks, lin.weights):
        y = torch.einsum("nc...,cd->nd...", xs[rank], weight)
        out[rank] = y + lin.bias if rank == 0 and lin.bias is not None else y
    return out


@pytest.mark.parametrize("ranks, bias", [((0, 1, 2), True), ((0,), True), ((1, 2), False)])
def test_equivariant_linear_one_gemm_equals_its_definition(ranks, bias):
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    lin = EquivariantLinear(5, 4, ranks, bias=bias).double()
    if lin.bias is not None:
        with torch.no_grad():
            lin.bias.copy_(torch.randn(4, generator=g, dtype=DT))
    x = [_irrep((7, 5), l, g) for l in range(3)]
    results = []
    for fn in (lambda xs: _linear_by_einsum(lin, xs), lin):
        leaves = [t.clone().requires_grad_(True) for t in x]
        out = [o for o in fn(leaves) if o is not None]
        assert len(out) == len(ranks)
        results.append((out, *_second_order(out, leaves + list(lin.parameters()), torch.Generator().manual_seed(1))))
    (ref, ref1, ref2), (got, got1, got2) = results
    for a, b in zip(got + list(got1) + list(got2), ref + list(ref1) + list(ref2)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(channels=8, num_layers=2, correlation=3, radial_hidden=16, avg_num_neighbors=12.0)
    opts.update(kw)
    model = cartlorem.CartLorem([1, 6, 8], cutoff=4.0, long_range=None, **opts).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _batch():
    d = bulk("C", "diamond", a=3.567, cubic=True)
    d.rattle(0.05, seed=0)
    m = molecule("CH3OH")
    m.rattle(0.05, seed=1)
    return collate([atoms_to_graph(d, 4.0), atoms_to_graph(m, 4.0)])


def _training_quantities(model, graph):
    """Energy, forces, stress and the parameter gradients of a force-training loss (double backward)."""
    model.train()
    out = model(graph, compute_forces=True, compute_stress=True, create_graph=True)
    loss = (out["energy"] ** 2).sum() + (out["forces"] ** 2).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [out["energy"], out["forces"], out["stress"]] + [torch.zeros_like(p) if g is None else g
                                                           for g, p in zip(grads, params)]


@pytest.mark.parametrize("correlation", [2, 3])
@pytest.mark.parametrize("chunk", [0, 23])
def test_model_training_quantities_equal_reference_path(correlation, chunk, monkeypatch):
    """CartLorem (local), float64, a crystal and a molecule in one batch: energy, forces, stress and the
    force-loss gradients of every parameter on the fast path (unchunked, and in chunks of 23 edges
    through chunked_edge_sum) equal the path-by-path reference to 1e-10."""
    graph = _batch()
    with reference_path():
        ref = _training_quantities(_model(correlation=correlation), graph)
    calls = []
    real = blocks.component_major_edge_product

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(blocks, "component_major_edge_product", spy)
    model = _model(correlation=correlation)
    for layer in model.layers:
        layer.edge_chunk = chunk
    got = _training_quantities(model, graph)
    assert calls  # the fast kernel ran
    assert sum(float(g.abs().max()) > 0 for g in ref[3:]) > len(ref[3:]) // 2
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_model_on_fast_path_is_o3_equivariant():
    """Energy invariant and forces equivariant under a rotation and a reflection (float64), on the path
    the training step runs (eval mode runs the same eager blocks)."""
    a = molecule("CH3OH")
    a.rattle(0.05, seed=3)
    assert check_o3_invariance(_model(), a) < 1e-10
    crystal = bulk("C", "diamond", a=3.567)
    crystal.rattle(0.05, seed=4)
    assert check_o3_invariance(_model(seed=1), crystal) < 1e-9
