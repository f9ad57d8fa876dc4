"""The TorchScript export (cartlorem.export, ``cartlorem export``): the file that torch.jit.load reads
back gives the Python model's energy, forces, stress and charges (float64, 1e-10), for local models,
long-range models on molecules and on periodic cells, in batches; what it does not support fails
with an error naming it."""

import math

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from cartlorem import CartLorem, cli, load_model, save_model
from cartlorem.export import ExportedCartLorem, export_model, save_exported
from cartlorem.graph import atoms_to_graph, collate

SPECIES = [1, 6, 8, 11, 17]
CUTOFF = 4.0


def _model(long_range, seed=0, **options):
    torch.manual_seed(seed)
    model = CartLorem(SPECIES, cutoff=CUTOFF, long_range=long_range, channels=8, radial_hidden=8,
                      readout_hidden=8, **options).double().eval()
    with torch.no_grad():  # non-trivial references and statistics
        model.set_statistics(atomic_energies={1: -13.6, 6: -1020.0, 8: -2040.0, 11: -4400.0, 17: -12500.0},
                             avg_num_neighbors=6.0, scale=0.7, shift=0.1)
    return model


def _structures():
    ethanol = molecule("CH3CH2OH")
    ethanol.info["total_charge"] = 1.0
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)  # a periodic cell; charged: a background
    salt.info["total_charge"] = -1.0
    water = molecule("H2O")
    for k, atoms in enumerate((ethanol, salt, water)):
        atoms.rattle(0.05, seed=k)
    return ethanol, salt, water


def _inputs(graph):
    return (graph.positions, graph.species, graph.cell, graph.pbc, graph.edge_index, graph.edge_shift, graph.batch,
            graph.total_charge)


def _graph(*atoms):
    return collate([atoms_to_graph(a, CUTOFF) for a in atoms]).to(dtype=torch.float64)


def _compare(ref, out, keys, tol=1e-10):
    for key in keys:
        assert key in out, key
        scale = max(1.0, float(ref[key].detach().abs().max()))
        err = float((ref[key].detach() - out[key]).abs().max())
        assert err <= tol * scale, f"{key}: max |eager − exported| = {err:.3g} (scale {scale:.3g})"


@pytest.fixture(autouse=True)
def _unoptimized_jit():
    """TorchScript's optimising executor spends its first calls profiling and re-compiling (seconds per call);
    the numbers are the same, so these tests run the plain interpreter, except where they say otherwise."""
    with torch.jit.optimized_execution(False):
        yield


@pytest.fixture
def loaded(tmp_path):
    """model → ``cartlorem export`` on its file → torch.jit.load."""

    def load(model):
        src, out = tmp_path / "model.pt", tmp_path / "exported.pt"
        save_model(model, src)
        assert cli.main(["export", str(src), str(out)]) == 0
        return torch.jit.load(str(out))

    return load


def test_local_model_exported_file_reproduces_energy_forces_stress(loaded):
    model = _model(None)
    ethanol, salt, water = _structures()
    wire = water.copy()  # a local model takes mixed pbc: a periodic wire of water
    wire.cell = [[4.0, 0, 0], [0, 0, 0], [0, 0, 0]]
    wire.pbc = [True, False, False]
    graph = _graph(ethanol, salt, water, wire)
    scripted = loaded(model)
    with torch.jit.optimized_execution(True):  # what engines run: the optimising executor, warmed up
        for _ in range(3):
            out = scripted(*_inputs(graph))
    ref = model(graph, compute_stress=True)
    _compare(ref, out, ("energy", "node_energy", "forces", "stress"))
    assert float(ref["stress"][1].abs().max()) > 1e-6  # the cell's stress is not trivially zero
    assert float(out["stress"][0].abs().max()) == 0.0  # open structures: zero rows, as the Python model


@pytest.mark.parametrize("placement", ["before_last", "end"])
@pytest.mark.parametrize("kind", ["multipole", "lorem"])
def test_long_range_model_on_molecules(loaded, kind, placement):
    model = _model(kind, long_range_options=dict(charge_correction="weighted", placement=placement))
    ethanol, _, water = _structures()
    graph = _graph(ethanol, water)
    out = loaded(model)(*_inputs(graph))
    ref = model(graph)
    keys = ["energy", "node_energy", "energy_lr", "forces", "charges", "dipoles", "quadrupoles"]
    _compare(ref, out, keys)
    assert abs(float(out["charges"][: len(ethanol)].sum()) - 1.0) < 1e-10  # the total charge is kept


@pytest.mark.parametrize("kind", ["multipole", "lorem"])
def test_exported_open_field_sum_in_chunks_equals_the_model(kind):
    """The exported open-structure sum over its pairs in chunks (PAIR_CHUNK; here 5 pairs per chunk, so that a
    chunk ends inside a molecule and a batch spans many) gives the model's numbers; so do lone atoms (no pairs)."""
    model = _model(kind)
    ethanol, _, water = _structures()
    ion = Atoms("Na", positions=[[0.0, 0.0, 0.0]])
    ion.info["total_charge"] = 1.0
    scripted = export_model(model)
    scripted.long_range_block.pair_chunk = 5
    assert scripted.long_range_block.pair_chunk == 5
    keys = ["energy", "node_energy", "energy_lr", "forces", "charges"]
    for graph in (_graph(ethanol, ion, water), _graph(ion), _graph(ion, ion.copy())):
        _compare(model(graph), scripted(*_inputs(graph)), keys)


@pytest.mark.parametrize("kind", [None, "multipole"])
def test_charge_state_conditioned_model_exports(loaded, kind):
    """A model with charge_state=True: the export applies the same FiLM conditioning after the embedding
    (total charge and multiplicity as inputs), so a charged doublet gets the Python model's numbers."""
    model = _model(kind, charge_state=True)
    with torch.no_grad():  # conditioning weights large enough to matter
        for p in model.conditioning.parameters():
            p.normal_()
    ethanol, _, water = _structures()
    ethanol.info["multiplicity"] = 2  # C2H6O+: 25 electrons
    graph = _graph(ethanol, water)
    scripted = loaded(model)
    out = scripted(*_inputs(graph), multiplicity=graph.multiplicity)
    ref = model(graph)
    _compare(ref, out, ("energy", "node_energy", "forces"))
    singlet_inputs = scripted(*_inputs(graph))  # no multiplicity given: singlets, so a different energy
    assert abs(float(singlet_inputs["energy"][0] - out["energy"][0])) > 1e-6


@pytest.mark.parametrize("placement", ["before_last", "end"])
@pytest.mark.parametrize("kind", ["multipole", "lorem"])
def test_long_range_model_on_periodic_cells(loaded, kind, placement):
    """A batch of a charged periodic cell (Ewald with a background) and molecules: the exported Ewald
    (reciprocal space at α = β) is the Python model's, which picks that splitting for these cells."""
    from cartlorem.ewald.ewald import choose_parameters
    from cartlorem.ewald.kernels import smearing_beta

    model = _model(kind, long_range_options=dict(placement=placement))
    ethanol, salt, water = _structures()
    params = choose_parameters(salt.cell.array, len(salt), model.long_range_block.accuracy, 4,
                               model.long_range_block.smearing)
    assert params.alpha == smearing_beta(model.long_range_block.smearing)  # what the claim above rests on
    graph = _graph(ethanol, salt, water)
    out = loaded(model)(*_inputs(graph))
    ref = model(graph, compute_stress=True)
    _compare(ref, out, ("energy", "node_energy", "energy_lr", "forces", "stress", "charges"))
    assert float(ref["stress"][1].abs().max()) > 1e-4


def test_a_dilute_periodic_cell_agrees_to_the_accuracy():
    """Above (2√2σ)³ per atom the Python model splits at a smaller α with a real-space part, so the export (α = β,
    reciprocal only) agrees to the sum's accuracy there, not to rounding, as the docs now say (they claimed rounding
    for every cell of up to a few hundred atoms)."""
    from cartlorem.ewald.ewald import choose_parameters
    from cartlorem.ewald.kernels import smearing_beta

    model = _model("multipole")
    salt = bulk("NaCl", "rocksalt", a=6.0, cubic=True)  # 27 Å³ per atom
    salt.rattle(0.1, seed=1)
    block = model.long_range_block
    assert choose_parameters(salt.cell.array, len(salt), block.accuracy, 4, block.smearing).alpha < \
        smearing_beta(block.smearing)
    graph = _graph(salt)
    out = export_model(model)(*_inputs(graph))
    ref = model(graph, compute_stress=True)
    _compare(ref, out, ("energy", "forces", "stress", "charges"), tol=1e-5)
    assert float((ref["energy"].detach() - out["energy"]).abs().max()) > 1e-10  # not the same numbers


def test_exported_periodic_sum_converges_with_its_k_cutoff():
    """The k-space cutoff matters (a smaller one changes the energy) and the model's is converged
    (a larger one changes nothing at the model's accuracy): the comparison above is not vacuous."""
    model = _model("multipole")
    _, salt, _ = _structures()
    graph = _graph(salt)
    scripted = torch.jit.script(ExportedCartLorem(model))
    ref = float(scripted(*_inputs(graph), compute_forces=False, compute_stress=False)["energy"])
    k_c = scripted.long_range_block.k_cutoff
    energies = {}
    for factor in (0.6, 1.5):
        scripted.long_range_block.k_cutoff = factor * k_c
        energies[factor] = float(scripted(*_inputs(graph), compute_forces=False, compute_stress=False)["energy"])
    assert abs(energies[0.6] - ref) > 1e-4
    assert abs(energies[1.5] - ref) < 1e-5 * abs(float(model(graph)["energy_lr"]))


def test_smeared_kernel_matches_the_ewald_module():
    """B_n of erf(βR)/R in the exported block against cartlorem.ewald.kernels (series near 0, recursion far)."""
    from cartlorem.ewald.kernels import RadialKernel

    block = torch.jit.script(ExportedCartLorem(_model("multipole"))).long_range_block
    beta = block.beta
    # β²R² of 1, 1.5 and 1.99: the series' last terms matter there (its coefficients 1/j! up to j = 27)
    r = torch.tensor([0.0, 1e-6, 0.3, 1.0 / beta, 1.5**0.5 / beta, 1.99**0.5 / beta, 1.9 / beta, 2.1 / beta, 3.0, 7.5,
                      20.0], dtype=torch.float64)
    r2 = r * r
    ours = block._kernel(r2, 4)
    ref = RadialKernel.smeared(1.0 / (math.sqrt(2.0) * beta)).derivatives(r2, torch.ones_like(r2, dtype=torch.bool), 4)
    for n, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-300, msg=f"B_{n}")
    # gradients are finite at R = 0 (coinciding Gaussian sources)
    r2 = r2.clone().requires_grad_(True)
    sum(block._kernel(r2, 4)).sum().backward()
    assert bool(torch.isfinite(r2.grad).all())


def test_float32_model_exports():
    model = _model("multipole").float()
    ethanol, salt, _ = _structures()
    graph = collate([atoms_to_graph(a, CUTOFF) for a in (ethanol, salt)]).to(dtype=torch.float32)
    out = export_model(model)(*_inputs(graph))
    ref = model(graph, compute_stress=True)
    assert out["energy"].dtype == torch.float32
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)
    # a float64 export converted afterwards (what engines do with .to(dtype, device)): every tensor follows
    converted = export_model(_model("multipole")).float()
    out = converted(*_inputs(graph))
    assert all(v.dtype == torch.float32 for v in out.values())
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)


def test_float32_export_takes_the_float64_graph_of_atoms_to_graph():
    """atoms_to_graph gives float64 by default; a float32 export given its fields crashed deep inside TorchScript
    ("mat1 and mat2 must have the same dtype"), where CartLorem.forward casts."""
    model = _model("multipole").float()
    ethanol, salt, _ = _structures()
    graph = collate([atoms_to_graph(a, CUTOFF) for a in (ethanol, salt)])  # float64
    exported = export_model(model)
    ref = model(graph, compute_stress=True)
    for out in (exported(*_inputs(graph)), exported.energy(*_inputs(graph))):
        assert out["energy"].dtype == torch.float32
        torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(exported(*_inputs(graph))["forces"], ref["forces"], rtol=1e-4, atol=1e-4)


def test_unsupported_inputs_are_named():
    ethanol, salt, _ = _structures()
    scripted = export_model(_model("multipole"))
    slab = salt.copy()
    slab.pbc = [True, True, False]
    slab.cell[2] = [0, 0, 20.0]
    with pytest.raises(Exception, match=r"structure 1 has pbc = \[True, True, False\].*slabs"):
        scripted(*_inputs(_graph(ethanol, slab)))
    iron = Atoms("FeO", positions=[[0, 0, 0], [0, 0, 1.6]])
    graph = atoms_to_graph(iron, CUTOFF).to(dtype=torch.float64)
    with pytest.raises(Exception, match=r"atomic numbers not known to the model: \[26\]"):
        scripted(*_inputs(graph))


@pytest.mark.parametrize("kind", [None, "multipole"])
def test_bad_inputs_are_errors_not_nan(kind):
    """The exported model gave NaN energies for overlapping atoms and NaN positions (the Python path refuses them in
    atoms_to_graph and CartLorem._check_values), and a bare IndexError for structure indices past the cells."""
    _, _, water = _structures()
    scripted = export_model(_model(kind))
    graph = _graph(water)
    args = list(_inputs(graph))
    assert torch.isfinite(scripted(*args)["energy"]).all()
    close = graph.positions.clone()
    close[1] = close[0] + torch.tensor([0.05, 0.0, 0.0], dtype=close.dtype)
    with pytest.raises(Exception, match=r"atoms \d and \d are 0\.05\d* Å apart \(overlapping atoms\)"):
        scripted(close, *args[1:])
    bad = graph.positions.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(Exception, match="positions, cell or edge_shift contain NaN or inf"):
        scripted(bad, *args[1:])
    with pytest.raises(Exception, match=r"batch holds structure indices from 0 to 1, outside 0\.\.0"):
        scripted(*args[:6], torch.tensor([0, 0, 1]), args[7])


def test_export_shares_no_state_with_the_model(tmp_path):
    """export_model copies: training the Python model on afterwards does not change the exported one."""
    model = _model(None)
    ethanol, *_ = _structures()
    graph = _graph(ethanol)
    scripted = export_model(model)
    before = scripted(*_inputs(graph))["energy"].clone()
    with torch.no_grad():
        model.embedding.add_(1.0)
    assert torch.equal(scripted(*_inputs(graph))["energy"], before)
    save_exported(model, tmp_path / "x.pt")
    assert float((torch.jit.load(str(tmp_path / "x.pt"))(*_inputs(graph))["energy"] - before).abs()) > 1e-6


def test_cli_export_errors(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "out.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    model = _model(None)
    save_model(model, tmp_path / "m.pt")
    assert cli.main(["export", str(tmp_path / "m.pt"), str(tmp_path / "out32.pt"), "--dtype", "float32"]) == 0
    scripted = torch.jit.load(str(tmp_path / "out32.pt"))
    graph = atoms_to_graph(molecule("H2O"), CUTOFF).to(dtype=torch.float32)
    assert scripted(*_inputs(graph))["energy"].dtype == torch.float32
    assert np.isfinite(float(scripted(*_inputs(graph))["energy"]))


def test_an_export_given_as_a_model_file_is_named(tmp_path, capsys):
    """load_model (evaluate --model, train --init-model) passed an export gave torch.load's advice to retry with
    weights_only=False, which would not read it either."""
    save_model(_model(None), tmp_path / "m.pt")
    assert cli.main(["export", str(tmp_path / "m.pt"), str(tmp_path / "ts.pt")]) == 0
    capsys.readouterr()
    with pytest.raises(ValueError, match="is a TorchScript export .* pass the model.pt it was made from"):
        load_model(tmp_path / "ts.pt")
    ase.io.write(tmp_path / "water.xyz", molecule("H2O"))
    assert cli.main(["evaluate", "--model", str(tmp_path / "ts.pt"), "--data", str(tmp_path / "water.xyz")]) == 2
    assert "TorchScript export" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_not_exported(dtype):
    """CartLorem's forward and save_model refuse float16/bfloat16, but the export ran them: 0.12 eV (float16) and
    12 eV (bfloat16) off at -3140 eV, with no warning."""
    model = _model("multipole").to(dtype)
    for export in (ExportedCartLorem, export_model):
        with pytest.raises(ValueError, match="exported models run in float32 or float64"):
            export(model)
