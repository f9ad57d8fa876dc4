"""Chunked edge messages (cartlorem.tensors.chunked): the same numbers as the unchunked path, gradients
checked against finite differences (gradcheck / gradgradcheck), and the model's training path
(E² + |F|² with create_graph) unchanged by chunking."""

import pytest
import torch
from ase.build import bulk, molecule

import cartlorem
import cartlorem.nn.blocks as blocks
from cartlorem.graph import atoms_to_graph, collate
from cartlorem.nn.radial import RadialMLP
from cartlorem.tensors import chunked_edge_sum, compact_edge_product, edge_paths


def _problem(seed=0, n_nodes=5, n_edges=11, C=2, n_basis=4, dtype=torch.float64):
    """A small message-passing problem: node features of ranks 0-2 (compact rank 2), random edges,
    unit vectors, a radial MLP whose output weights the compact message kernel."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n_nodes, (n_edges,), generator=g)
    j = torch.randint(0, n_nodes, (n_edges,), generator=g)
    h0 = torch.randn(n_nodes, C, generator=g, dtype=dtype)
    h1 = torch.randn(n_nodes, C, 3, generator=g, dtype=dtype)
    h2 = torch.randn(n_nodes, C, 6, generator=g, dtype=dtype)
    vec = torch.randn(n_edges, 3, generator=g, dtype=dtype)
    basis = torch.randn(n_edges, n_basis, generator=g, dtype=dtype)
    paths = edge_paths((0, 1, 2), (0, 1, 2))
    torch.manual_seed(seed)
    mlp = RadialMLP(n_basis, 5, len(paths) * C, layers=2).to(dtype)

    def messages(j, vec, basis, h0, h1, h2):
        return gathered(vec, basis, h0[j], h1[j], h2[j])

    def gathered(vec, basis, hj0, hj1, hj2):  # the same from the senders' rows (chunked_edge_sum(senders=j))
        unit = vec / torch.linalg.vector_norm(vec, dim=-1, keepdim=True)
        w = mlp(basis).view(-1, len(paths), C)
        return compact_edge_product([hj0, hj1, hj2], unit, w)

    messages.gathered = gathered
    return i, j, [vec, basis], [h0, h1, h2], mlp, messages


def _chunked(fn, n_nodes, i, j, edge, nodes, params, chunk, mode):
    """chunked_edge_sum with the whole node tensors passed to every chunk, or their senders' rows."""
    if mode == "whole":
        return chunked_edge_sum(fn, n_nodes, i, [j, *edge], nodes, params, chunk=chunk)
    return chunked_edge_sum(fn.gathered, n_nodes, i, edge, nodes, params, chunk=chunk, senders=j)


MODES = ["whole", "gathered"]


def _unchunked(fn, n_nodes, i, j, edge, nodes):
    return [torch.zeros((n_nodes,) + m.shape[1:], dtype=m.dtype).index_add(0, i, m) for m in fn(j, *edge, *nodes)]


@pytest.mark.parametrize("mode", MODES)
def test_chunked_sum_equals_unchunked_bitwise(mode):
    i, j, edge, nodes, mlp, fn = _problem(n_edges=23)
    ref = _unchunked(fn, 5, i, j, edge, nodes)
    for chunk in (1, 4, 7, 23, 100):
        out = _chunked(fn, 5, i, j, edge, nodes, list(mlp.parameters()), chunk, mode)
        assert len(out) == 3
        for a, b in zip(out, ref):
            # the edges reach index_add_ in the same order: identical sums; the MLP's GEMM on a subset
            # of rows may round differently, hence allclose at float64 rounding, not equality
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_sum_gradcheck_and_gradgradcheck(mode):
    """Finite differences of the chunked sum and of its backward (3 chunks, the last one ragged); small,
    because gradgradcheck's cost grows with inputs × outputs."""
    i, j, edge, nodes, mlp, fn = _problem(n_nodes=3, n_edges=5, C=1, n_basis=2)
    params = list(mlp.parameters())

    def g(vec, basis, h0, h1, h2):
        return tuple(_chunked(fn, 3, i, j, [vec, basis], [h0, h1, h2], params, 2, mode))

    x = [t.clone().requires_grad_() for t in edge + nodes]
    assert torch.autograd.gradcheck(g, x, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(g, x, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_sum_parameter_gradients_match_unchunked(mode):
    """Parameter gradients, first and second order (the training path), against plain autograd."""
    i, j, edge, nodes, mlp, fn = _problem(n_edges=17, seed=3)
    params = list(mlp.parameters())
    results = []
    for chunk in (None, 5):
        x = [t.clone().requires_grad_() for t in edge + nodes]
        if chunk is None:
            out = _unchunked(fn, 5, i, j, x[:2], x[2:])
        else:
            out = _chunked(fn, 5, i, j, x[:2], x[2:], params, chunk, mode)
        loss = sum((o.sin() * torch.arange(o.numel(), dtype=o.dtype).view_as(o)).sum() for o in out)
        gx = torch.autograd.grad(loss, x, create_graph=True)  # "forces"
        second = sum((g**2).sum() for g in gx) + loss**2
        results.append([*gx, *torch.autograd.grad(second, params + x)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_sum_first_order_gradients_match_unchunked(mode):
    """The inference path (forces: one backward, no create_graph): input and parameter gradients against
    plain autograd, with a node input that receives no gradient."""
    i, j, edge, nodes, mlp, fn = _problem(n_edges=19, seed=4)
    params = list(mlp.parameters())
    results = []
    for chunk in (None, 4):
        x = [t.clone().requires_grad_(k != 2) for k, t in enumerate(edge + nodes)]  # h0: no gradient
        if chunk is None:
            out = _unchunked(fn, 5, i, j, x[:2], x[2:])
        else:
            out = _chunked(fn, 5, i, j, x[:2], x[2:], params, chunk, mode)
        loss = sum((o.cos() * torch.arange(o.numel(), dtype=o.dtype).view_as(o)).sum() for o in out[:2])
        wrt = [t for t in x if t.requires_grad] + params
        results.append(torch.autograd.grad(loss, wrt, allow_unused=True))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_gathered_chunks_see_only_their_senders_rows():
    """With senders, the message function gets each chunk's rows of the node features, in the forward and
    in the backward's recomputation (so the backward's node gradients are chunk-sized, not node-sized:
    whole node tensors per chunk made the backward of a 10^5-atom call cost chunks x atoms)."""
    i, j, edge, nodes, mlp, fn = _problem(n_nodes=40, n_edges=30, seed=5)
    rows = []

    def spy(vec, basis, hj0, hj1, hj2):
        rows.append((vec.shape[0], hj0.shape[0], hj1.shape[0], hj2.shape[0]))
        return fn.gathered(vec, basis, hj0, hj1, hj2)

    x = [t.clone().requires_grad_() for t in edge + nodes]
    out = chunked_edge_sum(spy, 40, i, x[:2], x[2:], list(mlp.parameters()), chunk=8, senders=j)
    torch.autograd.grad(sum(o.sum() for o in out), x)
    assert len(rows) == 2 * 4  # 4 chunks, forward and recomputation
    assert all(r == (r[0],) * 4 and r[0] <= 8 for r in rows)
    with pytest.raises(ValueError, match="senders"):
        chunked_edge_sum(spy, 40, i, x[:2], x[2:], chunk=8, senders=j[:5])


def test_chunked_sum_without_edges_and_bad_chunk():
    i, j, edge, nodes, mlp, fn = _problem(n_edges=0)
    out = chunked_edge_sum(fn, 5, i, [j, *edge], nodes, list(mlp.parameters()), chunk=4)
    assert [tuple(o.shape) for o in out] == [(5, 2), (5, 2, 3), (5, 2, 6)]
    assert all(bool((o == 0).all()) for o in out)
    with pytest.raises(ValueError, match="chunk"):
        chunked_edge_sum(fn, 5, i, [j, *edge], nodes, chunk=0)
    i, j, edge, nodes, mlp, fn = _problem(n_edges=6)
    with pytest.raises(ValueError, match="leading dimension"):
        chunked_edge_sum(fn, 5, i, [j[:3], *edge], nodes, chunk=2)


def _model(species, long_range, seed=0):
    torch.manual_seed(seed)
    model = cartlorem.CartLorem(species, cutoff=4.0, long_range=long_range, channels=8, num_layers=2, correlation=3,
                                radial_hidden=16, avg_num_neighbors=20.0).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _structures():
    d = bulk("C", "diamond", a=3.567, cubic=True).repeat((2, 1, 1))
    d.rattle(0.05, seed=0)
    w = molecule("CH3OH")
    w.rattle(0.05, seed=1)
    return collate([atoms_to_graph(d, 4.0), atoms_to_graph(w, 4.0)])


@pytest.mark.parametrize("long_range", [None, "multipole"])
def test_model_chunked_matches_unchunked_training_path(long_range):
    """Energy, forces, stress and the parameter gradients of Σ E² + |F|² (create_graph, as training
    does), float64, a periodic crystal and a molecule in one batch: chunks of 61 edges vs none."""
    graph = _structures()
    n_edges = graph.edge_index.shape[1]
    assert n_edges > 10 * 61  # many chunks, and a ragged last one
    results = []
    for chunk in (0, 61):
        model = _model([1, 6, 8], long_range)
        for layer in model.layers:
            layer.edge_chunk = chunk
        model.train()
        out = model(graph, compute_forces=True, compute_stress=True, create_graph=True)
        loss = (out["energy"] ** 2).sum() + (out["forces"] ** 2).sum()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append([out["energy"], out["forces"], out["stress"]]
                       + [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    ref, new = results
    assert any(float(g.abs().max()) > 0 for g in ref[3:])
    for a, b in zip(new, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("long_range", [None, "multipole"])
def test_model_chunked_matches_unchunked_inference_path(long_range):
    """Energy, forces and stress without create_graph (MD, evaluation), parameters frozen and not:
    chunks of 61 edges against none, float64."""
    graph = _structures()
    for frozen in (False, True):
        results = []
        for chunk in (0, 61):
            model = _model([1, 6, 8], long_range).eval()
            model.requires_grad_(not frozen)
            for layer in model.layers:
                layer.edge_chunk = chunk
            out = model(graph, compute_forces=True, compute_stress=True)
            results.append([out["energy"], out["forces"], out["stress"]])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_model_chunking_is_used_and_instance_setting_wins(monkeypatch):
    """The default chunk is EDGE_CHUNK_ELEMENTS / C edges, used above MIN_CHUNKS chunks; with edge_chunk
    set, above one chunk of edges the layer goes through chunked_edge_sum; edge_chunk = 0 on a layer turns it off for that layer only. Without this, the test above could pass with chunking never run."""
    graph = _structures()
    calls = []
    real = blocks.chunked_edge_sum

    def spy(*args, **kw):
        calls.append(args[2].shape[0])
        return real(*args, **kw)

    monkeypatch.setattr(blocks, "chunked_edge_sum", spy)
    model = _model([1, 6, 8], None)
    assert [layer.chunk_edges("cpu") for layer in model.layers] == [blocks.EDGE_CHUNK_ELEMENTS // 8] * 2  # C = 8
    monkeypatch.setattr(blocks, "_cuda_free_bytes", lambda device: 0)  # no GPU needed: the rule alone
    assert model.layers[0].chunk_edges("cuda") == 16 * blocks.EDGE_CHUNK_ELEMENTS // 8  # the floor
    model(graph)  # fewer edges than MIN_CHUNKS default chunks: not chunked
    assert calls == []
    for layer in model.layers:
        layer.edge_chunk = graph.edge_index.shape[1]  # explicit: chunked above one chunk only
    model(graph)
    assert calls == []
    for layer in model.layers:
        layer.edge_chunk = 200
    model(graph)
    assert calls == [graph.edge_index.shape[1]] * 2
    calls.clear()
    model.layers[0].edge_chunk = 0
    model(graph)
    assert len(calls) == 1


def test_cuda_chunks_are_sized_by_the_free_gpu_memory(monkeypatch):
    """On CUDA a chunk holds the edges whose working set fits in CUDA_MEMORY_FRACTION of the free GPU memory
    (H200: 32768-edge chunks took 2.2x the time of none at 17576 atoms), never fewer than the floor; and the
    layer chunks as soon as there is more than one chunk of edges (the CPU waits for MIN_CHUNKS)."""
    model = _model([1, 6, 8], None)  # C = 8
    free = {"bytes": 80 * 2**30}
    monkeypatch.setattr(blocks, "_cuda_free_bytes", lambda device: free["bytes"])
    layer = model.layers[0]
    expected = int(blocks.CUDA_MEMORY_FRACTION * 80 * 2**30) // (blocks.CUDA_BYTES_PER_EDGE_CHANNEL * 8)
    assert layer.chunk_edges("cuda") == expected > 16 * blocks.EDGE_CHUNK_ELEMENTS // 8
    assert layer.chunk_edges("cuda:0") == expected
    free["bytes"] = 2**20  # little memory: the floor
    assert layer.chunk_edges("cuda") == 16 * blocks.EDGE_CHUNK_ELEMENTS // 8
    assert layer.chunk_edges("cpu") == blocks.EDGE_CHUNK_ELEMENTS // 8  # the CPU rule is unchanged
    layer.edge_chunk = 123  # an explicit setting wins on every device
    assert layer.chunk_edges("cuda") == 123

    # the threshold: on a CUDA tensor one chunk and one edge are chunked (the CPU's rule, MIN_CHUNKS chunks, would
    # leave 16x as many unchunked: 44 GB at 17576 atoms of diamond). A stand-in device; no kernel runs.
    calls = []
    monkeypatch.setattr(blocks, "chunked_edge_sum", lambda *a, **k: calls.append(a[6]) or "chunked")
    layer.edge_chunk = None
    floor = 16 * blocks.EDGE_CHUNK_ELEMENTS // 8
    free["bytes"] = int(2 * floor * blocks.CUDA_BYTES_PER_EDGE_CHANNEL * 8 / blocks.CUDA_MEMORY_FRACTION) + 8
    assert layer.chunk_edges("cuda") == 2 * floor

    class _Unit:
        device = torch.device("cuda")

    i = torch.zeros(2 * floor + 1, dtype=torch.long)
    assert layer._chunked_messages(False, 1, i, i, _Unit(), None, None, None) == "chunked"
    assert calls == [2 * floor]
    assert layer._chunked_messages(False, 1, i[:2 * floor], i[:2 * floor], _Unit(), None, None, None) is None


def test_a_1029_atom_water_box_at_c32_is_chunked_on_the_cpu():
    """Chunking started above 16 chunks, which left a 1029-atom water box at C = 32 (56944 edges, 13.9 chunks) on
    the unchunked path, 1.35x slower there (benchmarks/results/chunk_threshold.md); it starts above 12 now, and
    diamond at 11.1 chunks, where the chunked path is slower, stays unchunked."""
    model = cartlorem.CartLorem([1, 8], cutoff=5.0, long_range=None, channels=32, num_layers=1, correlation=2)
    layer = model.layers[0]
    assert layer.chunk_edges("cpu") == 4096
    assert layer.chunks(56944, "cpu") and not layer.chunks(45564, "cpu")
