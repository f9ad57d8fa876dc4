"""CartLorem's arguments and inputs: a wrong value is a ValueError naming it when the model is built or called, never
a value the model silently drops, truncates or reads as something else, nor a TypeError from deep inside."""

import math

import numpy as np
import pytest
import torch
from ase.build import molecule

import cartlorem
from cartlorem.config import Config
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


@pytest.mark.parametrize("long_range", [None, "multipole"])
def test_overlapping_atoms_of_a_graph_are_refused(long_range):
    """A graph built by hand (or moved after atoms_to_graph) with two atoms on top of each other gave a NaN energy and
    NaN forces without a word; atoms_to_graph, the calculator and the exported model refuse such atoms."""
    model = _model(long_range=long_range)
    graph = _methanol()
    positions = graph.positions.clone()
    positions[5] = positions[1] + 0.03  # an H 0.05 Å from the O
    with pytest.raises(ValueError, match=r"atoms (1 and 5|5 and 1) are 5.20e-02 Å apart \(overlapping atoms\)"):
        model(graph.replace(positions=positions))
    self_edge = torch.cat([graph.edge_index, torch.tensor([[2], [2]])], dim=1)
    shift = torch.cat([graph.edge_shift, graph.edge_shift.new_zeros(1, 3)])
    with pytest.raises(ValueError, match=r"edge \d+ joins atom 2 to itself \(edge_shift \[0.0, 0.0, 0.0\]\), 0.00e\+00"):
        model(graph.replace(edge_index=self_edge, edge_shift=shift))
    model(graph.replace(positions=positions.detach().clone().index_fill_(0, torch.tensor([5]), 9.0)))  # far: fine


@pytest.mark.parametrize("long_range", [None, "multipole"])
def test_a_flat_periodic_cell_in_a_graph_is_refused(long_range):
    """A hand-built graph of a crystal whose cell was zeroed (or one row of it) kept its edges' lattice shifts: a
    short-range model collapsed them onto in-cell vectors and returned another energy, forces in a perfect crystal
    and a stress of exactly 0 (read as a molecule's), with no error. A slab's open row may be zero."""
    from ase.build import bulk

    model = _model(species=(8,), long_range=long_range)
    crystal = atoms_to_graph(bulk("Si", "diamond", a=5.43, cubic=True), 3.0)
    crystal = crystal.replace(species=torch.full_like(crystal.species, 8))
    model(crystal)  # fine
    for cell in (torch.zeros_like(crystal.cell), crystal.cell * torch.tensor([1.0, 1.0, 0.0])[:, None]):
        with pytest.raises(ValueError, match=r"structure 0: periodic cell has zero volume along the periodic"):
            model(crystal.replace(cell=cell))
    flat_plane = crystal.cell.clone()
    flat_plane[0, 1] = flat_plane[0, 0]  # rows a and b parallel: no area
    slab = crystal.replace(pbc=torch.tensor([[True, True, False]]), edge_index=crystal.edge_index[:, :0],
                           edge_shift=crystal.edge_shift[:0])
    with pytest.raises(ValueError, match=r"periodic cell has zero area along the periodic directions"):
        model(slab.replace(cell=flat_plane))
    open_row = crystal.cell.clone()
    open_row[0, 2] = 0.0
    if long_range is None:  # (the long-range block needs the open row's height)
        model(slab.replace(cell=open_row))
    # in float32, where the Gram determinant's rounding let about half of such cells by: c = x a + y b
    rng, model32 = np.random.default_rng(0), model.float()
    for _ in range(10):
        a, b = rng.normal(size=3) * 5, rng.normal(size=3) * 5
        x, y = rng.normal(size=2)
        dependent = torch.tensor(np.array([a, b, x * a + y * b]), dtype=torch.float32)[None]
        with pytest.raises(ValueError, match=r"periodic cell has zero volume"):
            model32(crystal.replace(cell=dependent))


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


# --- reference energies ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("energies, unknown", [({1: -13.6, 92: -5.0}, r"U \(Z=92\)"),
                                               ({1: -13.6, 7: -1500.0}, r"N \(Z=7\)")])  # a typo of 8
def test_reference_energy_of_an_unknown_species_is_refused_by_the_constructor(energies, unknown):
    """The constructor dropped such an entry without a word (an O reference mistyped as N left O at 0 eV), where
    set_statistics refused it; now both say so."""
    with pytest.raises(ValueError, match=rf"reference energy for {unknown}, a species the model does not know"):
        _model([1, 8], atomic_energies=energies)
    model = _model([1, 8])
    with pytest.raises(ValueError, match=rf"reference energy for {unknown}, a species the model does not know"):
        model.set_statistics(atomic_energies=energies)
    assert model.atomic_energies.tolist() == [0.0, 0.0]  # all keys checked before any is set


def test_reference_energies_by_element_symbol():
    model = _model([1, 8], atomic_energies={"H": -13.5, 8: -2040.0})
    assert model.atomic_energies.tolist() == [-13.5, -2040.0]
    model.set_statistics(atomic_energies={"O": -2041.0})
    assert model.atomic_energies.tolist() == [-13.5, -2041.0]
    with pytest.raises(ValueError, match=r"reference energy of H \(Z=1\) twice"):
        _model([1, 8], atomic_energies={"H": -13.5, 1: -13.6})


# --- constructor arguments -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(lmax=2.0), r"lmax must be 0, 1 or 2 \(an integer\), got 2.0"),  # TypeError of range() deep inside
    (dict(lmax=True), r"lmax must be 0, 1 or 2 \(an integer\), got True"),
    (dict(channels=4.0), "channels must be an integer >= 1, got 4.0"),  # TypeError of torch.randn
    (dict(num_layers=1.0), "num_layers must be an integer >= 1, got 1.0"),
    (dict(charge_state="no"), "charge_state must be True or False, got 'no'"),  # bool("no"): conditioning on
    (dict(compile_kernels="false"), "compile_kernels must be True or False, got 'false'"),  # compiled kernels on
    (dict(charge_state=1), "charge_state must be True or False, got 1"),
    (dict(cutoff="5"), r"cutoff must be a finite positive length in Å \(a number\), got '5'"),  # TypeError of <
    (dict(cutoff=True), r"cutoff must be a finite positive length in Å \(a number\), got True"),
    (dict(species=[1.7, 8]), "species must be atomic numbers 1..118 or element symbols, got 1.7"),  # read as 1
    (dict(species=[True, 8]), "species must be atomic numbers 1..118 or element symbols, got True"),
    (dict(species=["H", "Xx"]), "species: unknown element 'Xx'"),
    (dict(species=8), "species must be a list of atomic numbers"),
    (dict(species=[]), "species must name at least one element"),
])
def test_constructor_arguments_of_the_wrong_type_are_refused(kw, match):
    kw = dict(kw)
    species = kw.pop("species", [1, 8])
    with pytest.raises(ValueError, match=match):
        _model(species, **kw)


def test_species_by_element_symbol_and_numpy_numbers(tmp_path):
    """Element symbols gave "invalid literal for int()"; numpy integers are read as the numbers they are, and the
    config keeps Python ints, which the model file stores as plain data."""
    model = _model(["O", "H", "C"], channels=np.int64(4), lmax=np.int64(1), cutoff=np.float64(3.0),
                   charge_state=np.bool_(False))
    assert model.species == [1, 6, 8] and type(model.config["channels"]) is int and model.config["lmax"] == 1
    assert model.conditioning is None
    cartlorem.save_model(model, tmp_path / "m.pt")
    assert cartlorem.load_model(tmp_path / "m.pt").species == [1, 6, 8]
    assert _model(np.array([8, 1])).species == [1, 8] and _model(torch.tensor([8, 1])).species == [1, 8]
    # a one-element tensor cutoff, which the constructor took before its type checks (and the Ewald functions take)
    assert _model([1, 8], cutoff=torch.tensor(3.0)).config["cutoff"] == 3.0


# --- long_range_options of a model without long range ----------------------------------------------------------

@pytest.mark.parametrize("options", [{"lr_chanels": 2}, {"placement": "nowhere"}, {"placement": "end"}])
def test_long_range_options_without_long_range_are_refused(options):
    """They were neither checked nor used with long_range=None, but stored in the config and the model file."""
    with pytest.raises(ValueError, match=r"long_range_options .* options of the long-range block.*long_range=None"):
        _model(long_range_options=options)
    with pytest.raises(ValueError, match="long_range_options"):  # a misspelled key: the config's parser says so
        Config(train="t.xyz", out="o", long_range="none", long_range_options=options)
    with pytest.raises(ValueError, match=r"long_range_options \{'lr_channels': 3\} .* long_range is 'none'"):
        Config(train="t.xyz", out="o", long_range="none", long_range_options={"lr_channels": 3})
    for empty in (None, {}):  # no options: fine
        assert _model(long_range_options=empty).config["long_range_options"] == {}
        assert Config(long_range="none", long_range_options=empty).build_model([1, 8]).long_range is None


def test_stored_long_range_options_of_a_short_range_file_are_dropped_on_load(tmp_path):
    """A file an older cartlorem wrote with options it ignored still loads, and predicts what it did."""
    model = _model()
    payload = cartlorem.model.model_payload(model)
    payload["config"]["long_range_options"] = {"placement": "end", "lr_channels": 3}
    torch.save(payload, tmp_path / "old.pt")
    loaded = cartlorem.load_model(tmp_path / "old.pt")
    assert loaded.config["long_range_options"] == {}
    graph = _methanol()
    assert float(loaded(graph)["energy"].detach()) == float(model(graph)["energy"].detach())


# --- long_range_options: plain data, whole numbers, no-ops, checked by the config ----------------------------

def test_numpy_long_range_options_leave_a_model_file_load_model_reads(tmp_path):
    """A np.float64 smearing (from np.linspace, say) was stored as given: the trainer pickled it into model.pt
    and checkpoint.pt, which load_model (weights_only) then refused to read. Options are stored as plain numbers
    now, and a value that is not plain data is refused when the model is made."""
    from fractions import Fraction

    from cartlorem.data import read_dataset
    from cartlorem.training import train

    options = {"smearing": np.linspace(0.5, 1.5, 3)[1], "lr_channels": np.int64(2), "accuracy": np.float32(1e-5)}
    model = _model(long_range="multipole", long_range_options=options)
    stored = model.config["long_range_options"]
    assert type(stored["smearing"]) is float and type(stored["lr_channels"]) is int, stored
    frames = [molecule("CH3OH") for _ in range(3)]
    for k, atoms in enumerate(frames):
        atoms.rattle(0.05, seed=k)
        atoms.info["energy"], atoms.arrays["forces"] = -1.0 * k, np.zeros((len(atoms), 3))
    graphs = read_dataset(frames, 3.0, energy_key="energy", forces_key="forces", stress_key=None)
    train(model, graphs[:2], graphs[2:], epochs=1, batch_size=2, progress=False, out_dir=tmp_path / "run")
    for name in ("model.pt", "checkpoint.pt"):
        assert cartlorem.load_model(tmp_path / "run" / name).config["long_range_options"]["smearing"] == 1.0
    with pytest.raises(ValueError, match=r"long_range_options\['smearing'\] is a fractions.Fraction: model files "
                                         r"hold plain data only"):
        _model(long_range="multipole", long_range_options={"smearing": Fraction(1, 2)})


def test_a_whole_float_lr_channels_builds_the_block():
    """lr_channels = 2.0 passed the block's check (a positive whole number) and then failed deep inside with
    "randn(): argument 'size' ... got float"; hidden = 3.0 worked."""
    a = _model(long_range="multipole", long_range_options={"lr_channels": 2.0})
    b = _model(long_range="multipole", long_range_options={"lr_channels": 2})
    graph = _methanol()
    assert float(a(graph)["energy"].detach()) == float(b(graph)["energy"].detach())


@pytest.mark.parametrize("kw, match", [
    (dict(lmax=0, long_range_options={"end_features": "light"}), r"with lmax = 0 it has none .* leave it 'full'"),
    (dict(long_range_options={"lr_channels": 1, "coupling": 0.5}), r"coupling = 0.5 .* with lr_channels = 1 there "
                                                                    r"are none"),
])
def test_long_range_options_that_change_nothing_are_refused_and_old_files_still_load(tmp_path, kw, match, caplog):
    """'light' end features with lmax 0 built the 'full' model, and a coupling with one long-range channel set no
    weight (channel 0's is 1), while the config recorded them. A file an older cartlorem wrote with them loads as
    the model it was, and a config (an older run's config.yaml, which a resume reads) leaves them out, with a
    warning."""
    import logging

    with pytest.raises(ValueError, match=match):
        _model(long_range="multipole", **kw)
    options = dict(kw["long_range_options"])
    plain = {k: v for k, v in options.items() if k not in ("end_features", "coupling")}
    model = _model(long_range="multipole", **{**kw, "long_range_options": plain})
    payload = cartlorem.model.model_payload(model)
    payload["config"]["long_range_options"].update(options)  # as the older cartlorem stored them
    torch.save(payload, tmp_path / "old.pt")
    loaded = cartlorem.load_model(tmp_path / "old.pt")
    graph = _methanol()
    assert float(loaded(graph)["energy"].detach()) == float(model(graph)["energy"].detach())
    with caplog.at_level(logging.WARNING, logger="cartlorem.config"):
        cfg = Config(long_range="multipole", lmax=kw.get("lmax", 2), long_range_options=options)
    assert cfg.long_range_options == {**plain, **({"end_features": "full"} if "end_features" in options else {})}
    assert "long_range_options: " in caplog.text and "left out" in caplog.text


@pytest.mark.parametrize("options, match", [
    ({"placement": "start"}, r"long_range_options\['placement'\] must be one of 'before_last', 'end'"),
    ({"end_features": "x"}, r"long_range_options\['end_features'\] must be one of 'full', 'light'"),
    ({"charge_channels": 1.5}, r"charge_channels must be an integer from 1 to lr_channels"),
    ({"placement": "before_last"}, r"needs num_layers >= 2"),
    ({"charge_correction": "sometimes"}, r"charge_correction must be 'weighted', 'uniform'"),
])
def test_the_config_checks_long_range_option_values_before_the_data_are_read(options, match):
    """Only the numeric options were checked when the config was read; a misspelt placement (and three more) was
    refused by the model, after `cartlorem train` had read the whole data set."""
    with pytest.raises(ValueError, match=match):
        Config(train="t.xyz", out="o", long_range="multipole", num_layers=1, long_range_options=options)
    state = torch.random.get_rng_state()  # the check builds a block: the caller's random numbers stay as they were
    Config(long_range="multipole", long_range_options={"lr_channels": 3})
    assert torch.equal(torch.random.get_rng_state(), state)


def test_charge_correction_none_in_a_config_file_is_none(tmp_path):
    """'charge_correction: none' was the text "none", which the model refused; none means None elsewhere in the
    config."""
    path = tmp_path / "c.yaml"
    path.write_text("long_range: multipole\nlong_range_options:\n  charge_correction: none\n")
    cfg = Config.from_yaml(path)
    assert cfg.long_range_options == {"charge_correction": None}
    assert cfg.build_model([1, 8]).long_range_block.charge_correction is None
