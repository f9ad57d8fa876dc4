"""long_range_options["end_features"]: how the last layer makes the rank-1/2 features of a block placed at the end.
"full" (the default, and what files without the key load as): as every other layer; "light": its product reaches
the scalars only, ranks 1 and 2 being v[Z] A_l (the message, weighted per species and channel), and their skip
has one weight matrix for all species (cartlorem.nn.long_range.END_FEATURES)."""

import pytest
import torch
from ase.build import molecule

import cartlorem
from cartlorem.export import ExportedCartLorem
from cartlorem.graph import atoms_to_graph, collate
from cartlorem.nn import BodyOrderProduct, SpeciesLinear
from cartlorem.tensors import mix_channels
from cartlorem.testing import check_forces_fd, check_o3_invariance, random_orthogonal, rotate


def _model(end_features=None, kind="multipole", placement=None, seed=0):
    torch.manual_seed(seed)
    options = {} if end_features is None else {"end_features": end_features}
    if placement is not None:
        options["placement"] = placement
    model = cartlorem.CartLorem([1, 6, 8], cutoff=4.0, long_range=kind, channels=8, correlation=2,
                                radial_hidden=16, long_range_options=options).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _structures():
    a, b = molecule("CH3OH"), molecule("H2O")
    a.rattle(0.05, seed=1)
    b.rattle(0.05, seed=2)
    b.positions += (6.0, 0.0, 0.0)
    return a, b


def _graph():
    return collate([atoms_to_graph(x, 4.0, dtype=torch.float64) for x in _structures()])


def _features(n=7, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a2 = torch.randn(n, c, 3, 3, generator=g, dtype=torch.float64)
    a2 = 0.5 * (a2 + a2.transpose(-1, -2))
    a2 = a2 - torch.eye(3, dtype=torch.float64) * a2.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    return [torch.randn(n, c, generator=g, dtype=torch.float64), torch.randn(n, c, 3, generator=g, dtype=torch.float64), a2]


@pytest.mark.parametrize("correlation", [2, 3])
@pytest.mark.parametrize("scripted", [False, True])
def test_scalar_products_against_the_full_product(correlation, scripted):
    """With product_ranks (0,), rank 0 is the full product's rank 0 (same weights: the same paths into the
    scalars) and ranks 1, 2 are exactly the last stage's linear term v[Z] A_l; in the grouped form that
    training runs and in the path-by-path form of TorchScript (the exported model)."""
    torch.manual_seed(0)
    ranks = (0, 1, 2)
    full = BodyOrderProduct(5, 3, correlation, ranks, ranks).double()
    light = BodyOrderProduct(5, 3, correlation, ranks, ranks, product_ranks=(0,)).double()
    assert [p[2] for p in light.stage_paths[-1]] == [0] * len(light.stage_paths[-1])
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn_like(p))
        light.first.copy_(full.first)
        for stage, (w_full, w_light) in enumerate(zip(full.path_weights, light.path_weights)):
            index = [full.stage_paths[stage].index(p) for p in light.stage_paths[stage]]
            w_light.copy_(w_full[:, index])
        for v_full, v_light in zip(full.linear_weights, light.linear_weights):
            v_light.copy_(v_full)
    A = _features()
    species = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    run_full, run_light = (torch.jit.script(full), torch.jit.script(light)) if scripted else (full, light)
    ref, out = run_full(A, species), run_light(A, species)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-13, atol=1e-13)
    v = light.linear_weights[-1][species]  # [N, 3 ranks, C]
    torch.testing.assert_close(out[1], v[:, 1, :, None] * A[1], rtol=1e-14, atol=0)
    torch.testing.assert_close(out[2], v[:, 2, :, None, None] * A[2], rtol=1e-14, atol=0)
    assert float((ref[1] - out[1]).detach().abs().max()) > 1e-3  # the full product's ranks 1, 2 differ: not vacuous


@pytest.mark.parametrize("scripted", [False, True])
def test_shared_skip_ranks_are_one_matrix_for_all_species(scripted):
    """SpeciesLinear with shared_ranks: those ranks are x @ W for every atom whatever its species; the others
    keep a matrix per species (checked against mix_channels atom by atom)."""
    torch.manual_seed(1)
    skip = SpeciesLinear(5, 4, 3, (0, 1, 2), shared_ranks=(1, 2)).double()
    assert [w.shape[0] for w in skip.weights] == [3, 1, 1]
    A = _features()
    species = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    out = (torch.jit.script(skip) if scripted else skip)(A, species)
    for n, z in enumerate(species.tolist()):
        torch.testing.assert_close(out[0][n], A[0][n] @ skip.weights[0][z], rtol=1e-13, atol=1e-13)
    for k, l in ((1, 1), (2, 2)):
        torch.testing.assert_close(out[l], mix_channels(A[l], skip.weights[k][0], l), rtol=1e-13, atol=1e-13)


def test_model_options_stored_and_checked():
    assert _model().config["long_range_options"]["end_features"] == "full"  # stored resolved
    model = _model("light")
    assert model.config["long_range_options"]["end_features"] == "light"
    assert model.products[-1].product_ranks == [0] and model.products[-1].l_out == [0, 1, 2]
    assert model.skips[-1].shared_ranks == [1, 2] and [w.shape[0] for w in model.skips[-1].weights] == [3, 1, 1]
    assert model.products[0].product_ranks == [0, 1, 2]  # the layers before the last are untouched
    assert model.skips[0].shared_ranks == []
    assert _model("full").products[-1].product_ranks == [0, 1, 2] and _model("full").skips[-1].shared_ranks == []
    n_full = sum(p.numel() for p in _model("full").parameters())
    assert sum(p.numel() for p in model.parameters()) < n_full
    with pytest.raises(ValueError, match="end_features.*'full', 'light'"):
        _model("vectors")
    with pytest.raises(ValueError, match="placement 'before_last'.*leave it 'full'"):
        _model("light", placement="before_last")


@pytest.mark.parametrize("kind", ["multipole", "lorem"])
def test_scalars_model_is_o3_equivariant_with_consistent_forces(kind):
    """Energies invariant and forces equivariant under rotations and reflections; forces = −∇E (finite
    differences); learned dipoles and quadrupoles rotate as vectors and rank-2 tensors."""
    model = _model("light", kind=kind)
    a, _ = _structures()
    assert check_o3_invariance(model, a) < 1e-10
    assert check_forces_fd(model, a, h=1e-5) < 1e-7
    graph = atoms_to_graph(a, 4.0, dtype=torch.float64)
    out = model(graph)
    gen = torch.Generator().manual_seed(3)
    for det in (1.0, -1.0):
        q = random_orthogonal(det, generator=gen)
        moved = a.copy()
        moved.positions = a.positions @ q.numpy().T
        out_q = model(atoms_to_graph(moved, 4.0, dtype=torch.float64))
        torch.testing.assert_close(out_q["dipoles"], rotate(out["dipoles"], q, 1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out_q["quadrupoles"], rotate(out["quadrupoles"], q, 2), rtol=1e-9, atol=1e-12)
    assert float(out["quadrupoles"].abs().max()) > 1e-4


def test_scalars_model_differs_from_all():
    """The option changes the model (the block's rank-1/2 sources) and has fewer weights."""
    graph = _graph()
    e_all, e_scalars = _model("full")(graph)["energy"], _model("light")(graph)["energy"]
    assert float((e_all - e_scalars).abs().max()) > 1e-6


def test_file_keeps_end_features_and_old_files_load_as_all(tmp_path):
    model = _model("light")
    path = tmp_path / "scalars.pt"
    cartlorem.save_model(model, path)
    loaded = cartlorem.load_model(path)
    assert loaded.config["long_range_options"]["end_features"] == "light"
    graph = _graph()
    torch.testing.assert_close(loaded(graph)["energy"], model(graph)["energy"], rtol=1e-13, atol=0)
    # a file written before the option: the full product, whatever the default becomes
    model = _model("full")
    cartlorem.save_model(model, path)
    payload = torch.load(path, weights_only=True)
    del payload["config"]["long_range_options"]["end_features"]
    torch.save(payload, path)
    loaded = cartlorem.load_model(path)
    assert loaded.config["long_range_options"]["end_features"] == "full"
    torch.testing.assert_close(loaded(graph)["energy"], model(graph)["energy"], rtol=1e-13, atol=0)


def test_exported_scalars_model_matches():
    """The TorchScript export runs the path-by-path product: the same numbers as the Python model."""
    model = _model("light")
    graph = _graph()
    scripted = torch.jit.script(ExportedCartLorem(model))
    out = scripted(graph.positions, graph.species, graph.cell, graph.pbc, graph.edge_index, graph.edge_shift,
                   graph.batch, graph.total_charge)
    ref = model(graph)
    for key in ("energy", "forces", "charges"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-10)
