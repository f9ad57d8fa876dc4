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


def _water():
    return atoms_to_graph(molecule("H2O"), 3.0)


def _periodic_water():
    a = molecule("H2O")
    a.cell, a.pbc = [6.0, 6.5, 7.0], True
    return atoms_to_graph(a, 3.0)


@pytest.mark.parametrize("long_range", [None, "multipole"])
def test_non_finite_cell_is_refused(long_range):
    """A NaN in a periodic cell gave a local model a NaN energy and a zero stress (the volume NaN counted as no cell),
    and a long-range model the error 'charges contains NaN or inf', about learned charges, not the cell."""
    model = _model(long_range=long_range)
    graph = _periodic_water()
    cell = graph.cell.clone()
    cell[0, 1, 2] = math.nan
    with pytest.raises(ValueError, match=r"the cell of structure 0 contains NaN or inf"):
        model(graph.replace(cell=cell), compute_stress=True)


@pytest.mark.parametrize("long_range", [None, "multipole"])
def test_non_finite_total_charge_is_refused(long_range):
    """A Graph with a NaN total charge (made by hand or by an engine's interface) gave a charge-state model a NaN
    energy without a word, and a long-range model an error about its learned charges."""
    model = _model(long_range=long_range, charge_state=True)
    graph = _water()
    with pytest.raises(ValueError, match="the total_charge of structure 0 contains NaN or inf"):
        model(graph.replace(total_charge=torch.tensor([math.nan], dtype=torch.float64)))


@pytest.mark.parametrize("value", [math.nan, 0.0, -1.0])
def test_bad_multiplicity_is_refused_by_a_charge_state_model(value):
    model = _model(charge_state=True)
    graph = _water()
    with pytest.raises(ValueError, match=r"multiplicity \(2S \+ 1\) of structure 0 must be a finite number >= 1"):
        model(graph.replace(multiplicity=torch.tensor([value], dtype=torch.float64)))
    assert bool(torch.isfinite(model(graph)["energy"]).all())  # the graph's own multiplicity (1) is fine


def test_derivatives_under_inference_mode_are_a_clear_error():
    """Forces under torch.inference_mode() failed inside autograd with 'element 0 of tensors does not require grad
    and does not have a grad_fn'; the energy alone works there, and torch.no_grad() gives the forces."""
    model = _model(long_range="multipole")
    graph = _water()
    ref = model(graph)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"forces are derivatives .* torch.inference_mode\(\)"):
            model(graph)
        with pytest.raises(RuntimeError, match=r"born_charges are derivatives"):
            model(graph, compute_forces=False, compute_born_charges=True)
        energy = model(graph, compute_forces=False)["energy"]
    assert float(energy) == float(ref["energy"].detach())
    with torch.no_grad():
        torch.testing.assert_close(model(graph)["forces"], ref["forces"], rtol=0, atol=0)


@pytest.mark.parametrize("key, value, match", [
    ("hidden", 0, "hidden must be a positive integer"),  # built a model whose scalar update was a constant
    ("hidden", 2.5, "hidden must be a positive integer"),  # TypeError of nn.Linear
    ("coupling", math.nan, "coupling must be a finite number"),  # NaN energies
    ("smearing", math.inf, "smearing must be a finite positive width"),  # refused only at the first call
    ("smearing", None, "smearing must be a finite positive width"),  # TypeError: '>' between None and int
    ("accuracy", 0.0, r"accuracy must be a number in \(0, 1\)"),  # refused only at the first call
    ("accuracy", 2.0, r"accuracy must be a number in \(0, 1\)"),
    ("lr_channels", True, "lr_channels must be a positive integer"),  # TypeError of torch.zeros
])
def test_bad_long_range_options_are_refused_when_the_model_is_built(key, value, match):
    with pytest.raises(ValueError, match=match):
        _model(long_range="multipole", long_range_options={key: value})


def test_long_range_options_that_are_numbers_in_another_type_still_work():
    model = _model(long_range="multipole", long_range_options={"hidden": 3.0, "accuracy": "1e-4", "lr_channels": 2})
    assert model.long_range_block.update[0].out_features == 3
    assert bool(torch.isfinite(model(_water())["energy"]).all())


@pytest.mark.parametrize("change, match", [
    (lambda g: g.replace(species=g.species.double()), "graph.species must be an integer tensor"),
    (lambda g: g.replace(edge_index=g.edge_index.index_fill(1, torch.tensor([0]), 7)),
     r"graph.edge_index holds indices from 0 to 7, outside 0..2"),
    (lambda g: g.replace(batch=torch.tensor([0, 0, 1])), r"graph.batch holds indices from 0 to 1, outside 0..0"),
    (lambda g: g.replace(positions=g.positions[:2]), r"graph.species must have shape \[N\] \(N = 2 atoms"),
    (lambda g: g.replace(total_charge=torch.zeros(2, dtype=torch.float64)),
     r"graph.total_charge must have shape \[B\]"),
    (lambda g: g.replace(pbc=g.pbc.long()), "graph.pbc must be a bool tensor"),
    (lambda g: g.replace(positions=g.positions[:0], species=g.species[:0], batch=g.batch[:0],
                         edge_index=g.edge_index[:, :0], edge_shift=g.edge_shift[:0]), "the graph has no atoms"),
])
def test_malformed_graph_is_a_clear_error(change, match):
    """A hand-made graph whose edges or atoms point past the atoms or structures there are, or whose tensors have the
    wrong shape or type, stopped with an IndexError or a shape error deep inside the model."""
    with pytest.raises(ValueError, match=match):
        _model(long_range="multipole")(change(_water()))


@pytest.mark.parametrize("field", ["cell", "edge_shift", "positions"])
def test_a_graph_with_mixed_float_dtypes_is_cast_whole(field):
    """The model cast a graph only when its positions had another dtype: a float64 cell or edge_shift beside float32
    positions (or float32 positions in a float64 graph) crashed inside einsum."""
    torch.manual_seed(0)
    model = cartlorem.CartLorem([1, 8], cutoff=3.0, long_range="multipole", channels=4).float().eval()
    atoms = molecule("H2O")
    atoms.center(vacuum=3.0)
    atoms.pbc = True
    g = atoms_to_graph(atoms, model.cutoff)  # float64
    ref = model(g.to(dtype=torch.float32))
    mixed = g.to(dtype=torch.float32).replace(**{field: getattr(g, field)}) if field != "positions" else \
        g.replace(positions=g.positions.float())
    out = model(mixed)
    torch.testing.assert_close(out["energy"], ref["energy"])
    torch.testing.assert_close(out["forces"], ref["forces"])


def test_predict_names_a_structure_the_long_range_block_refuses_by_its_index_in_the_set():
    """predict() left the boundary check to the model's forward, whose message named the structure's index in its
    batch: frame 5 with pbc [False, True, True] was 'structure 1' in batches of 4."""
    import ase
    from ase.build import bulk

    from cartlorem import CartLorem
    from cartlorem.data import read_dataset
    from cartlorem.evaluate import predict

    frames = [bulk("NaCl", "rocksalt", a=5.64, cubic=True) for _ in range(6)]
    for k, atoms in enumerate(frames):
        atoms.rattle(0.02, seed=k)
        atoms.calc = None
    frames[5].pbc = [False, True, True]
    graphs = read_dataset([ase.Atoms(a) for a in frames], 3.0, require=())
    model = CartLorem([11, 17], cutoff=3.0, channels=4, num_layers=1, correlation=1, long_range="multipole").double()
    with pytest.raises(ValueError, match=r"^structure 5 has pbc = \[False, True, True\]"):
        predict(model, graphs, batch_size=4)
