"""Where the long-range block runs (long_range_options["placement"]): after the last interaction layer ("end",
the default, the model before the option, and what model files without the key load as) or between the last
two ("before_last")."""

import pytest
import torch
from ase.build import molecule

import cartlorem
from cartlorem.graph import atoms_to_graph, collate


def _model(placement=None, num_layers=2, kind="multipole", seed=0):
    torch.manual_seed(seed)
    options = {} if placement is None else {"placement": placement}
    model = cartlorem.CartLorem([1, 6, 8], cutoff=4.0, long_range=kind, channels=8, num_layers=num_layers,
                                correlation=2, radial_hidden=16, long_range_options=options).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _graph():
    a, b = molecule("CH3OH"), molecule("H2O")
    a.rattle(0.05, seed=1)
    b.positions += (6.0, 0.0, 0.0)
    return collate([atoms_to_graph(x, 4.0, dtype=torch.float64) for x in (a, b)])


def test_default_is_end():
    assert _model().placement == "end"
    assert _model().config["long_range_options"]["placement"] == "end"  # stored resolved
    assert _model(num_layers=1).placement == "end"
    assert cartlorem.CartLorem([1, 8], long_range=None, channels=4).placement is None


def test_file_keeps_its_placement(tmp_path):
    """A model saved with the block before the last layer reloads with it (the config stores the placement in
    use), not with today's default."""
    model = _model("before_last")
    path = tmp_path / "before_last.pt"
    cartlorem.save_model(model, path)
    loaded = cartlorem.load_model(path)
    assert loaded.placement == "before_last"
    graph = _graph()
    torch.testing.assert_close(loaded(graph)["energy"], model(graph)["energy"], rtol=1e-13, atol=0)


def test_before_last_keeps_the_last_layer_scalar_only():
    """With the block before the last layer, the last layer outputs scalars only (as a short-range
    model's), so its rank-1/2 paths are neither computed nor differentiated; with "end" they are."""
    assert _model("before_last").products[-1].l_out == [0]
    assert _model("end").products[-1].l_out == [0, 1, 2]
    assert cartlorem.CartLorem([1, 8], long_range=None, channels=4).products[-1].l_out == [0]


@pytest.mark.parametrize("kind", ["multipole", "lorem"])
def test_the_fields_reach_the_last_layer(kind):
    """before_last: the block's scalar update is the last layer's input, so changing the learned
    multipoles changes the last layer's per-atom readout; with "end" it cannot."""
    graph = _graph()
    for placement, reaches in (("before_last", True), ("end", False)):
        model = _model(placement, kind=kind)
        captured = []
        hook = model.readouts[-1].register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
        model(graph)
        with torch.no_grad():
            for w in model.long_range_block.to_multipoles.weights:
                w.mul_(3.0)
        model(graph)
        hook.remove()
        assert (float((captured[0] - captured[1]).abs().max()) > 1e-8) == reaches, placement


def test_file_without_placement_loads_as_end(tmp_path):
    """A model file written before the option (no "placement" key) is the model it was: the block at the end
    (today's default too; the upgrade in load_model keeps it so if the default changes)."""
    model = _model("end")
    path = tmp_path / "old.pt"
    cartlorem.save_model(model, path)
    payload = torch.load(path, weights_only=True)
    del payload["config"]["long_range_options"]["placement"]
    torch.save(payload, path)
    loaded = cartlorem.load_model(path)
    assert loaded.placement == "end"
    graph = _graph()
    torch.testing.assert_close(loaded(graph)["energy"], model(graph)["energy"], rtol=1e-13, atol=0)


def test_bad_placement_is_a_clear_error():
    with pytest.raises(ValueError, match="placement.*'before_last', 'end'"):
        _model("middle")
    with pytest.raises(ValueError, match="needs num_layers >= 2"):
        _model("before_last", num_layers=1)


@pytest.mark.parametrize("option", ["placement", "end_features"])
def test_an_empty_choice_is_refused_not_read_as_the_default(option):
    """An empty string (a YAML `placement: ''`, a blank template value) built the default layout without a word."""
    with pytest.raises(ValueError, match=f"{option}.*got ''"):
        cartlorem.CartLorem([1, 8], channels=4, long_range="multipole", long_range_options={option: ""})
