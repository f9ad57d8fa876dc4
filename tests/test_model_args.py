"""CartLorem's arguments and inputs: a wrong value is a ValueError naming it when the model is built or called, never
a value the model silently drops, truncates or reads as something else, nor a TypeError from deep inside."""

import math

import pytest
import torch
from ase.build import molecule

import cartlorem
from cartlorem.graph import atoms_to_graph

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(species=(1, 6, 8), **kw):
    torch.manual_seed(0)
    opts = dict(cutoff=3.0, channels=4, num_layers=1, correlation=2, num_basis=4, radial_hidden=8, readout_hidden=8,
                long_range=None)
    opts.update(kw)
    return cartlorem.CartLorem(species, **opts).double().eval()


def _methanol():
    return atoms_to_graph(molecule("CH3OH"), 3.0)


# --- documentation ----------------------------------------------------------------------------------------------

def test_module_docstring_names_the_default_placement():
    """It said the block runs 'by default between the last two layers'; the default placement is 'end'."""
    assert _model(long_range="multipole").placement == "end"
    text = " ".join(cartlorem.model.__doc__.split())
    assert "by default run after the last layer" in text and "by default run between" not in text


# --- graph inputs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("long_range", [None, "multipole"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_edge_shift_is_refused(long_range, value):
    """A NaN shift gave a local model a NaN energy without a word, and a long-range model the error 'charges contains
    NaN or inf', about its learned charges."""
    model = _model(long_range=long_range)
    graph = _methanol()
    shift = graph.edge_shift.clone()
    shift[3, 1] = value
    with pytest.raises(ValueError, match=r"graph.edge_shift contains NaN or inf \(1 of \d+ edges; edge 3, atoms"):
        model(graph.replace(edge_shift=shift))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32])
def test_small_integer_index_tensors_work(dtype):
    """int8/int16/uint8 species, batch and edge_index passed the layout check, then failed inside with an IndexError
    ("tensors used as indices must be long, int, byte or bool") or index_select's RuntimeError."""
    model = _model(long_range="multipole")
    graph = _methanol()
    ref = model(graph, create_graph=False)
    for name in ("species", "batch", "edge_index"):
        out = model(graph.replace(**{name: getattr(graph, name).to(dtype)}), create_graph=False)
        assert float(out["energy"]) == float(ref["energy"])
        torch.testing.assert_close(out["forces"], ref["forces"], rtol=0, atol=0)


# --- save_model extras -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("config", {"note": "my run"}), ("dtype", "float32"), ("format", "mine"),
                                        ("state_dict", {})])
def test_save_model_refuses_extras_named_like_the_files_own_entries(tmp_path, key, value):
    """They replaced the payload's own: config= wrote a file load_model refused, dtype="float32" read a float64
    model back as float32."""
    with pytest.raises(ValueError, match=rf"extra entries named '{key}' would replace the model file's own"):
        cartlorem.save_model(_model(), tmp_path / "m.pt", **{key: value})
    assert not (tmp_path / "m.pt").exists()
    cartlorem.save_model(_model(), tmp_path / "m.pt", notes={key: value})  # under another name: fine
    assert cartlorem.load_model(tmp_path / "m.pt").dtype == torch.float64
