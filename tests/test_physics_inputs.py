"""Bad inputs to the model itself (not through ase.Atoms): a clear ValueError naming the problem, never a silent
NaN, inf or sign-flipped energy."""

import math

import pytest
import torch
from ase.build import molecule

import cartlorem
from cartlorem.graph import atoms_to_graph


def _model(**kw):
    torch.manual_seed(0)
    opts = dict(channels=4, num_layers=1, correlation=2, radial_hidden=8, long_range=None)
    opts.update(kw)
    return cartlorem.CartLorem([1, 8], cutoff=3.0, **opts).double().eval()


@pytest.mark.parametrize("value", [0.0, -4.0, math.inf, math.nan])
def test_bad_message_normalisation_is_refused(value):
    """avg_num_neighbors divides every message: 0 gave NaN energies, a negative value flipped the messages' sign and
    inf switched them off, all without a word from the constructor (set_statistics refused only values <= 0)."""
    with pytest.raises(ValueError, match="avg_num_neighbors must be a finite positive number"):
        _model(avg_num_neighbors=value)
    model = _model()
    with pytest.raises(ValueError, match="avg_num_neighbors must be a finite positive number"):
        model.set_statistics(avg_num_neighbors=value)
    assert all(layer.avg_num_neighbors == 10.0 for layer in model.layers)


@pytest.mark.parametrize("name", ["scale", "shift"])
def test_non_finite_scale_or_shift_is_refused(name):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        _model(**{name: math.nan})
    model = _model()
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        model.set_statistics(**{name: math.inf})
    out = model(atoms_to_graph(molecule("H2O"), 3.0))
    assert bool(torch.isfinite(out["energy"]).all())


def test_non_finite_reference_energy_is_refused():
    with pytest.raises(ValueError, match="reference energy of Z=8"):
        _model(atomic_energies={1: -13.6, 8: math.nan})
    with pytest.raises(ValueError, match="reference energy of Z=1"):
        _model().set_statistics(atomic_energies={1: math.inf})
