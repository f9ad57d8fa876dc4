"""The compiled training step (cartlorem.training.compiled, ``train(compile=True)``) against the eager one.

The functional loss gradient (torch.func: forces and stress as vjps, the loss of ``loss_terms``) is checked
against autograd's ``weighted_loss(model(batch, create_graph=True)).backward()`` in float64 without
compiling (fast), and once compiled through ``train`` (one compilation: about a minute on two cores).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator

from cartlorem import CartLorem
from cartlorem.data import read_dataset
from cartlorem.graph import collate
from cartlorem.training import compiled as compiled_mod
from cartlorem.training import train
from cartlorem.training.compiled import CompiledLossGradient
from cartlorem.training.loss import loss_terms, loss_weights, weighted_loss
from conftest import needs_compiled_step  # noqa: E402  (tests/ is on sys.path under pytest)


def _labelled(rng, atoms, stress=True, energy=True, forces=True):
    atoms = atoms.copy()
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    results = {}
    if energy:
        results["energy"] = float(rng.normal()) * len(atoms)
    if forces:
        results["forces"] = rng.normal(size=(len(atoms), 3))
    if stress and atoms.pbc.all():
        results["stress"] = rng.normal(scale=0.01, size=6)
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def _structures(seed=0):
    rng = np.random.default_rng(seed)
    water, nh3 = molecule("H2O"), molecule("NH3")
    cell = bulk("Si", "diamond", a=5.43, cubic=False)
    cell.symbols = ["Si", "O"]
    return [_labelled(rng, water), _labelled(rng, nh3), _labelled(rng, cell), _labelled(rng, water, energy=False),
            _labelled(rng, nh3, forces=False)]


def _cells(seed=0):
    """Periodic cells of different sizes and shapes, one of them charged (labels: energy, forces, stress)."""
    rng = np.random.default_rng(seed)
    small = bulk("Si", "diamond", a=5.43, cubic=False)
    small.symbols = ["Si", "O"]
    cubic = bulk("Si", "diamond", a=5.43, cubic=True)
    cubic.symbols = ["Si", "O"] * 4
    charged = small.copy()
    charged.info["total_charge"] = 1.0
    return [_labelled(rng, small), _labelled(rng, cubic), _labelled(rng, charged)]


def _slabs(seed=0, with_cell=False):
    """Slabs (pbc = [True, True, False]) of different sizes and shapes: one with its third cell row tilted off the
    normal and atoms outside the cell, the same charged; with ``with_cell`` also a periodic cell (a mixed batch)."""
    rng = np.random.default_rng(seed)
    flat = bulk("Si", "diamond", a=5.43, cubic=True)
    flat.symbols = ["Si", "O"] * 4
    flat.center(vacuum=4.0, axis=2)
    flat.pbc = [True, True, False]
    tilted = bulk("Si", "diamond", a=5.43, cubic=False)
    tilted.symbols = ["Si", "O"]
    tilted = tilted.repeat((1, 1, 2))
    tilted.pbc = [True, True, False]
    cell = tilted.cell.array.copy()
    normal = np.cross(cell[0], cell[1])
    normal /= np.linalg.norm(normal)
    tilted.set_cell([cell[0], cell[1], cell[2] + 12.0 * normal], scale_atoms=False)
    tilted.positions += 0.7 * cell[0] - 1.5 * normal  # unwrapped, below the plane
    charged = tilted.copy()  # a charged slab's energy depends on its place in the frame's cell: the shift matters
    charged.info["total_charge"] = -1.0
    out = [_labelled(rng, flat), _labelled(rng, tilted), _labelled(rng, charged)]
    if with_cell:
        out += _cells(seed)[:1]
    return out


def _model(structures, long_range=None, **kw):
    species = sorted({int(z) for a in structures for z in a.numbers})
    torch.manual_seed(0)
    model = CartLorem(species, cutoff=3.5, channels=4, long_range=long_range, **kw).double()
    with torch.no_grad():  # nonzero everywhere, so that every path carries gradient
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _assert_same_runs(runs):
    """runs = [(losses, state_dict) eager, (losses, state_dict) compiled]: the same losses and weights to float64
    rounding."""
    (loss_e, state_e), (loss_c, state_c) = runs
    np.testing.assert_allclose(loss_c, loss_e, rtol=1e-12)
    for k in state_e:
        if state_e[k].is_floating_point():
            torch.testing.assert_close(state_c[k], state_e[k], rtol=1e-10, atol=1e-12)


def _eager_gradient(model, batch, weights):
    model.zero_grad(set_to_none=True)
    pred = model(batch, compute_forces=True, compute_stress=True, create_graph=True)
    loss, terms = weighted_loss(pred, batch, weights)
    loss.backward()
    return loss.detach(), terms, {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _check_step_function_equals_autograd(model, batch):
    """The function the compiled step runs (without torch.compile) gives autograd's loss and gradient on ``batch``."""
    model.train()
    weights = loss_weights()
    loss_ref, _, grads_ref = _eager_gradient(model, batch, weights)
    step = CompiledLossGradient(model, weights)
    step._fn = step._loss_and_grad  # eager: the same function without torch.compile
    model.zero_grad(set_to_none=True)
    loss, _ = step(batch)
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-12)
    for name, p in model.named_parameters():
        if p.grad is not None:
            scale = float(grads_ref[name].abs().max()) + 1e-300
            assert float((p.grad - grads_ref[name]).abs().max()) <= 1e-10 * scale, name


@needs_compiled_step
def test_term_weights_scale_each_structures_energy_forces_and_stress():
    """MACE's config_energy_weight, config_forces_weight and config_stress_weight (Graph.term_weight) multiply the
    structure's squared errors of that term, times config_weight; the means divide by the labelled items. The
    function the compiled step runs gives autograd's gradient with them too."""
    structures = _structures(1)
    per_term = ((2.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.0, 3.0, 2.0), (1.0, 0.5, 1.0), (4.0, 1.0, 0.0))
    for atoms, weight, (e, f, s) in zip(structures, (1.0, 2.0, 1.0, 0.5, 1.0), per_term):
        atoms.info.update(config_weight=weight, config_energy_weight=e, config_forces_weight=f,
                          config_stress_weight=s)
    batch = collate(read_dataset(structures, cutoff=3.5, require=()))
    assert batch.term_weight.tolist() == [list(t) for t in per_term]
    model = _model(structures).eval()
    out = model(batch, compute_stress=True)
    terms = loss_terms(out, batch, loss_weights())
    n, w, tw = batch.num_atoms.double(), batch.weight, batch.term_weight
    e_ref = (w * tw[:, 0] * ((out["energy"] - batch.energy) / n) ** 2)[batch.has_energy].sum() / batch.has_energy.sum()
    has_f = batch.has_forces[batch.batch]
    f_err = (w * tw[:, 1])[batch.batch][:, None] * (out["forces"] - batch.forces) ** 2
    f_ref = f_err[has_f].sum() / (3 * has_f.sum())
    s_err = (w * tw[:, 2])[:, None, None] * (out["stress"] - batch.stress) ** 2
    s_ref = s_err[batch.has_stress].sum() / (9 * batch.has_stress.sum())
    assert bool(batch.has_stress.any()) and float(s_ref) > 0
    for name, ref in (("energy", e_ref), ("forces", f_ref), ("stress", s_ref)):
        assert float(terms[name][0].detach()) == pytest.approx(float(ref.detach()), rel=1e-13), name

    _check_step_function_equals_autograd(model, batch)


@pytest.mark.parametrize("kind, weights", [(None, {}), (None, {"stress": 0.0}), (None, {"energy": 0.0, "stress": 5.0}),
                                           ("multipole", {}), ("lorem", {}), ("multipole", {"energy": 0.0}),
                                           ("multipole/cells", {}), ("lorem/cells", {}),
                                           ("multipole/cells", {"energy": 0.0, "forces": 0.0, "stress": 5.0}),
                                           ("multipole/slabs", {}), ("lorem/slabs", {}), ("multipole/mixed", {}),
                                           ("lorem/mixed", {})])
@needs_compiled_step
def test_functional_gradient_equals_autograd(monkeypatch, kind, weights):
    """The function that is compiled, run eagerly: loss, terms and every parameter gradient as autograd's, with
    partly labelled structures (a molecule without energy, one without forces) and a periodic cell's stress
    (local models; long-range ones on the molecules: their field sum op by op over the given pairs). "/cells":
    a long-range model on a batch of periodic cells (two sizes, one charged) with stress, its Ewald sum
    traced for all cells at once (cartlorem.ewald.cells) against the eager per-cell sum, which chooses the same
    splitting for these small cells, so the two agree to rounding. "/slabs": three slabs (one tilted and unwrapped,
    one charged) and a periodic cell in one batch: the slabs' frames, elongated cells and slab corrections
    traced with the cell's sum; the eager sum (slab_sum per slab) held to the same splitting, alpha = beta (it
    would put part of these sparse cells' sums in real space: the same fields to the accuracy only). "/mixed":
    the same with two molecules in the batch (their pair sum beside the Ewald sum)."""
    kind, _, cells = (kind or "").partition("/")
    kind = kind or None
    if cells:
        structures = _cells() if cells == "cells" else _slabs(with_cell=True)
        if cells == "mixed":
            structures += _molecules()
    else:
        structures = _structures()
        if kind is not None:
            structures = [a for a in structures if not a.pbc.any()]
    graphs = read_dataset(structures, cutoff=3.5, require=())
    batch = collate(graphs)
    if not cells:
        assert not bool(batch.has_energy.all()) and not bool(batch.has_forces.all())
    assert bool(batch.has_stress.any()) == (kind is None or bool(cells))
    model = _model(structures, long_range=kind).train()
    w = loss_weights(weights)
    if cells in ("slabs", "mixed"):
        from cartlorem.ewald import ewald

        monkeypatch.setattr(ewald, "_choose_alpha", lambda *args: math.inf)  # capped at beta
    loss_ref, terms_ref, grads_ref = _eager_gradient(model, batch, w)
    monkeypatch.undo()
    if cells:
        plan = model.long_range_block.periodic_plan(batch)
        assert isinstance(plan.slab, torch.Tensor) == (cells != "cells")
        assert isinstance(plan.open, torch.Tensor) == (cells == "mixed")

    step = CompiledLossGradient(model, w)
    step._fn = step._loss_and_grad  # eager: the same function without torch.compile
    assert step.unsupported(batch) is None
    model.zero_grad(set_to_none=True)
    loss, terms = step(batch)
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-12)
    assert terms.keys() == terms_ref.keys()
    for k in terms:
        assert terms[k] == pytest.approx(terms_ref[k], rel=1e-12)
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads_ref[n] is None), n  # no gradient where autograd gives none
        if p.grad is None:
            continue
        scale = float(grads_ref[n].abs().max()) + 1e-300
        assert float((p.grad - grads_ref[n]).abs().max()) <= 1e-10 * scale, n


@pytest.mark.parametrize("kind", ["multipole", "lorem"])
@needs_compiled_step
def test_slab_gap_planned_as_the_eager_sum_chooses_it(monkeypatch, kind):
    """A slab's vacuum gap depends on its sum's layout and channel count (slab.choose_gap): the compiled step's
    plan must ask for it as the eager sum does, else the two sums run in differently elongated cells. With the
    replica correction's cost raised so far that every slab takes a wider gap than vacuum_gap, the plan's gaps are
    the eager sums' (spied), the question put to choose_gap is the same, and the loss gradient is autograd's to
    1e-10."""
    from cartlorem.ewald import cells as cells_mod
    from cartlorem.ewald import slab as slab_mod

    structures = _slabs()
    batch = collate(read_dataset(structures, cutoff=3.5, require=()))
    model = _model(structures, long_range=kind).train()
    asked, real = [], slab_mod.choose_gap

    def spy(cell, n_atoms, accuracy, smearing, rows, cols, n_channels):
        gap = real(cell, n_atoms, accuracy, smearing, rows, cols, n_channels)
        asked.append((n_atoms, accuracy, smearing, rows.ranks, cols.ranks, n_channels, gap))
        return gap

    monkeypatch.setattr(slab_mod, "COST_REPLICA_PHASE", 1.0)
    slab_mod._choose_gap.cache_clear()
    monkeypatch.setattr(slab_mod, "choose_gap", spy)
    monkeypatch.setattr(cells_mod, "choose_gap", spy)
    try:
        plan = model.long_range_block.periodic_plan(batch)
        planned, asked[:] = list(asked), []
        from cartlorem.ewald import ewald

        monkeypatch.setattr(ewald, "_choose_alpha", lambda *args: math.inf)  # capped at beta, as the plan's sum
        w = loss_weights({})
        loss_ref, _, grads_ref = _eager_gradient(model, batch, w)
        eager = list(asked)
        step = CompiledLossGradient(model, w)
        step._fn = step._loss_and_grad
        model.zero_grad(set_to_none=True)
        loss, _ = step(batch)
    finally:
        slab_mod._choose_gap.cache_clear()
    assert len(planned) == 3 and sorted(set(planned)) == sorted(set(eager))
    floor = slab_mod.vacuum_gap(model.long_range_block.accuracy, model.long_range_block.smearing)
    assert all(g > floor for g in plan.gap.tolist()), (plan.gap, floor)
    assert sorted(plan.gap.tolist()) == sorted(x[-1] for x in planned)
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-12)
    for n, p in model.named_parameters():
        if p.grad is not None:
            scale = float(grads_ref[n].abs().max()) + 1e-300
            assert float((p.grad - grads_ref[n]).abs().max()) <= 1e-10 * scale, n


def test_loss_terms_count_labelled_items_only():
    """loss_terms' masked means are the means over labelled rows (reference: boolean indexing)."""
    structures = _structures(1)
    batch = collate(read_dataset(structures, cutoff=3.5, require=()))
    model = _model(structures).eval()
    out = model(batch, compute_stress=True)
    terms = loss_terms(out, batch, loss_weights())
    n = batch.num_atoms.double()
    e_ref = (((out["energy"] - batch.energy) / n)[batch.has_energy] ** 2).mean()
    f_ref = ((out["forces"] - batch.forces)[batch.has_forces[batch.batch]] ** 2).mean()
    s_ref = ((out["stress"] - batch.stress)[batch.has_stress] ** 2).mean()
    for name, ref, count in (("energy", e_ref, int(batch.has_energy.sum())),
                             ("forces", f_ref, 3 * int(batch.has_forces[batch.batch].sum())),
                             ("stress", s_ref, 9 * int(batch.has_stress.sum()))):
        mse, items = terms[name]
        assert float(mse.detach()) == pytest.approx(float(ref.detach()), rel=1e-13), name
        assert int(items) == count, name


@needs_compiled_step
def test_frame_weights_scale_each_structures_terms():
    """MACE's config_weight (Graph.weight) multiplies each squared error of its structure; the means still divide by
    the labelled items, as MACE's do. A structure weighted 0 changes nothing, whatever its labels; and the function
    the compiled step runs gives autograd's gradient with the weights too."""
    structures = _structures(1)
    for atoms, weight in zip(structures, (2.0, 0.0, 0.5, 1.0, 3.0)):
        atoms.info["config_weight"] = weight
    batch = collate(read_dataset(structures, cutoff=3.5, require=()))
    model = _model(structures).eval()
    out = model(batch, compute_stress=True)
    terms = loss_terms(out, batch, loss_weights())
    n, w = batch.num_atoms.double(), batch.weight
    per_atom = w[batch.batch][:, None]
    e_ref = (w * ((out["energy"] - batch.energy) / n) ** 2)[batch.has_energy].sum() / batch.has_energy.sum()
    has_f = batch.has_forces[batch.batch]
    f_ref = (per_atom * (out["forces"] - batch.forces) ** 2)[has_f].sum() / (3 * has_f.sum())
    s_err = w[:, None, None] * (out["stress"] - batch.stress) ** 2
    s_ref = s_err[batch.has_stress].sum() / (9 * batch.has_stress.sum())
    for name, ref in (("energy", e_ref), ("forces", f_ref), ("stress", s_ref)):
        assert float(terms[name][0].detach()) == pytest.approx(float(ref.detach()), rel=1e-13), name
    moved = batch.replace(energy=batch.energy + 100.0 * (w == 0), forces=batch.forces + 5.0 * (per_atom == 0))
    for name, (mse, _) in loss_terms(model(moved, compute_stress=True), moved, loss_weights()).items():
        assert float(mse.detach()) == pytest.approx(float(terms[name][0].detach()), rel=1e-13), name
    # also a label so far off that its square overflows in float32 (a broken frame, the kind that is weighted 0)
    broken = moved.replace(energy=moved.energy + 1e22 * (w == 0)).to(dtype=torch.float32)
    model32 = _model(structures).float().eval()
    for name, (mse, _) in loss_terms(model32(broken, compute_stress=True), broken, loss_weights()).items():
        assert torch.isfinite(mse), name

    _check_step_function_equals_autograd(model, batch)


def _molecules(seed=3):
    """Two molecules (labels: energy, forces)."""
    rng = np.random.default_rng(seed)
    return [_labelled(rng, molecule("H2O")), _labelled(rng, molecule("NH3"))]


def test_unsupported_batches_run_eagerly(monkeypatch, caplog):
    """A long-range model on periodic cells too large for the traced sum (here: any, with its limit at zero terms)
    trains under compile=True as without it (those batches eagerly), and says why."""
    from cartlorem.ewald import cells as cells_mod

    monkeypatch.setattr(cells_mod, "MAX_TERMS", 0)
    structures = _cells()
    graphs = read_dataset(structures, cutoff=3.5, require=())
    losses = []
    for flag in (False, True):
        model = _model(structures, long_range="multipole")
        with caplog.at_level(logging.WARNING, logger="cartlorem.training"):
            result = train(model, graphs, epochs=1, batch_size=2, progress=False, compile=flag)
        losses.append(result.history[-1]["train_loss"])
    assert losses[0] == losses[1]
    assert "too large for one reciprocal sum" in caplog.text and "run eagerly" in caplog.text


@needs_compiled_step
def test_batches_the_layers_would_chunk_run_eagerly(eager_compiled_step, caplog):
    """A batch with more edges than the interaction layers compute at once (they run it in chunks through an
    autograd.Function, which torch.func and so the compiled step cannot take) runs eagerly, and says why; the other
    batches keep the compiled step. Was: the compiled step failed inside torch.func on the first such batch and the
    rest of the run trained eagerly ("the compiled step failed ... training continues eagerly")."""
    water, nh3 = molecule("H2O"), molecule("NH3")
    rng = np.random.default_rng(0)
    structures = [_labelled(rng, water), _labelled(rng, nh3)] * 2
    graphs = read_dataset(structures, cutoff=3.5, require=())
    assert [g.edge_index.shape[1] for g in graphs[:2]] == [6, 12]
    runs = []
    for flag in (False, True):
        model = _model(structures)
        for layer in model.layers:
            layer.edge_chunk = 8  # the ammonia batches (12 edges) run in chunks, the water ones (6) not
        with caplog.at_level(logging.WARNING, logger="cartlorem.training"):
            result = train(model, graphs, epochs=2, batch_size=1, progress=False, compile=flag, ema_decay=None)
        runs.append(([row["train_loss"] for row in result.history], model.state_dict()))
    assert "edges than the interaction layers compute at once" in caplog.text and "run eagerly" in caplog.text
    assert "the compiled step failed" not in caplog.text
    assert len(eager_compiled_step) == 4  # every water batch of both epochs took the compiled step
    _assert_same_runs(runs)
    step = CompiledLossGradient(model, loss_weights({}))
    batch = collate(graphs[:2])
    assert "edges" in step.unsupported(batch)
    for layer in model.layers:
        layer.edge_chunk = 0  # chunking off
    assert step.unsupported(batch) is None


@needs_compiled_step
def test_compiled_step_takes_the_batches_the_layers_would_chunk_on_the_cpu(monkeypatch, caplog):
    """On the CPU, with the layers' default chunk size, a batch that the eager layers run in chunks takes the
    compiled step (its traced forward unchunked: benchmarks/compiled_memory.py measured 0.47× the step's memory and
    0.33-0.38× the time of the eager chunked step), and trains as the eager run does. Was: such batches ran eagerly
    ("edges than the interaction layers compute at once"). A layer's own ``edge_chunk`` still sends them the eager
    way."""
    from torch._dynamo.utils import counters

    from cartlorem.nn import blocks

    monkeypatch.setattr(compiled_mod, "BACKEND", "aot_eager")  # the traced graph, without Inductor's kernels
    monkeypatch.setattr(blocks, "EDGE_CHUNK_ELEMENTS", 4)  # C = 4: one edge per chunk, chunked above MIN_CHUNKS edges
    chunked = []
    real = blocks.chunked_edge_sum
    monkeypatch.setattr(blocks, "chunked_edge_sum", lambda *a, **k: chunked.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    structures = [_labelled(rng, molecule("H2O")), _labelled(rng, molecule("NH3"))] * 2
    graphs = read_dataset(structures, cutoff=3.5, require=())
    assert sum(g.edge_index.shape[1] for g in graphs) == 36  # one batch of 36 edges
    graphs_before = counters["stats"]["unique_graphs"]
    runs, chunked_calls = [], []
    for flag in (False, True):
        model = _model(structures)
        chunked.clear()
        with caplog.at_level(logging.WARNING, logger="cartlorem.training"):
            result = train(model, graphs, epochs=2, batch_size=4, progress=False, compile=flag, ema_decay=None)
        runs.append(([row["train_loss"] for row in result.history], model.state_dict()))
        chunked_calls.append(len(chunked))
    # two layers, two epochs: the validation passes (on the training set) chunk in both runs, the training steps
    # only in the eager one
    assert chunked_calls == [8, 4]
    assert "edges than the interaction layers" not in caplog.text and "compiled step failed" not in caplog.text
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    _assert_same_runs(runs)
    step = CompiledLossGradient(model, loss_weights({}))
    batch = collate(graphs)
    assert model.layers[0].chunks(36, batch.positions.device) and step.unsupported(batch) is None
    for layer in model.layers:
        layer.edge_chunk = 8  # the user's chunks: the eager way
    assert "edges" in step.unsupported(batch)


@needs_compiled_step
def test_train_with_the_functional_gradient_equals_eager(eager_compiled_step):
    """train() fed by the functional gradient (run eagerly: seconds) takes the eager run's steps, the stress
    included: the gradients the compiled step hands to the optimiser (some of them transposed in memory, which
    the fused Adam must not see) move the weights as autograd's do."""
    structures = _structures(2) * 2
    graphs = read_dataset(structures, cutoff=3.5, require=())
    runs = []
    for flag in (False, True):
        model = _model(structures)
        result = train(model, graphs, epochs=2, batch_size=4, progress=False, compile=flag)
        runs.append(([row["train_loss"] for row in result.history], model.state_dict()))
    assert eager_compiled_step  # the compiled step's function took the steps
    _assert_same_runs(runs)


@needs_compiled_step
def test_a_batch_without_labels_moves_no_weight(eager_compiled_step):
    """A batch with no labelled item of any weighted term: the eager step takes no backward pass and Adam leaves every
    weight alone; the compiled step gave the charge-state conditioning (whose gradient it always keeps) a gradient of
    zeros, which Adam's momentum turned into a step. Charged structures, so that the conditioning learns; two of six
    labelled in batches of two: every epoch has a batch without labels."""
    from conftest import emt_frames

    frames = emt_frames(6, seed=0)
    for atoms in frames:
        atoms.info["total_charge"] = 1.0
    graphs = read_dataset(frames, cutoff=3.0)
    graphs[2:] = [dataclasses.replace(g, has_energy=torch.zeros_like(g.has_energy),
                                      has_forces=torch.zeros_like(g.has_forces),
                                      has_stress=None if g.has_stress is None else torch.zeros_like(g.has_stress))
                  for g in graphs[2:]]
    runs = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = CartLorem([29, 47], cutoff=3.0, channels=4, num_layers=1, correlation=1, num_basis=4,
                          radial_hidden=4, readout_hidden=4, charge_state=True).double()
        result = train(model, graphs, epochs=3, batch_size=2, progress=False, compile=flag, ema_decay=None, seed=0)
        runs.append(([row["train_loss"] for row in result.history], model.state_dict()))
    assert eager_compiled_step
    _assert_same_runs(runs)


@pytest.mark.parametrize("compile_step", [False, pytest.param(True, marks=needs_compiled_step)])
def test_a_batch_without_labels_leaves_the_weight_average_alone(eager_compiled_step, tmp_path, compile_step):
    """On a batch without labels Adam took no step, but the weight average was updated all the same (pulled
    towards weights that had not moved, and its warm-up counted on) and so was the trainer's step count."""
    from conftest import emt_frames

    graphs = read_dataset(emt_frames(6, seed=0), cutoff=3.0)
    graphs[2:] = [dataclasses.replace(g, has_energy=torch.zeros_like(g.has_energy),
                                      has_forces=torch.zeros_like(g.has_forces),
                                      has_stress=None if g.has_stress is None else torch.zeros_like(g.has_stress))
                  for g in graphs[2:]]
    torch.manual_seed(0)
    model = CartLorem([29, 47], cutoff=3.0, channels=4, num_layers=1, correlation=1, num_basis=4, radial_hidden=4,
                      readout_hidden=4).double()
    train(model, graphs, graphs[:2], epochs=3, batch_size=1, progress=False, compile=compile_step, ema_decay=0.99,
          seed=0, out_dir=tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {6.0}  # two labelled structures, three epochs, batches of one
    assert state["ema"]["num_updates"] == 6 and state["step"] == 6, (state["ema"]["num_updates"], state["step"])
    assert bool(eager_compiled_step) == compile_step


@pytest.mark.parametrize("kind", [None, "multipole", "lorem"])
@pytest.mark.parametrize("weights", [{}, {"energy": 0.0}])
@needs_compiled_step
def test_a_batch_of_atoms_alone(kind, weights):
    """A batch of one-atom structures (isolated-atom reference frames): a multipole model's traced field sum failed
    on its zero pairs ("cannot reshape tensor of 0 elements into shape [0, 4, -1]"; compiled, the trainer then ran
    eagerly for the rest of the run), and the compiled step gave the layers None where autograd gives zeros (their
    edges are empty, but they are in the graph), so Adam moved them otherwise (1.6e-2 apart after two epochs)."""
    from ase import Atoms

    rng = np.random.default_rng(5)
    atoms = [_labelled(rng, Atoms(s, positions=[[0.0, 0.0, 0.0]])) for s in ("O", "H", "N")]
    model = _model(_structures() + atoms, long_range=kind).train()
    batch = collate(read_dataset(atoms, cutoff=3.5, require=()))
    assert batch.edge_index.shape[1] == 0
    w = loss_weights(weights)
    loss_ref, terms_ref, grads_ref = _eager_gradient(model, batch, w)
    step = CompiledLossGradient(model, w)
    step._fn = step._loss_and_grad  # eager: the same function without torch.compile
    assert step.unsupported(batch) is None
    model.zero_grad(set_to_none=True)
    loss, terms = step(batch)
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-12, abs=1e-300) and terms.keys() == terms_ref.keys()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads_ref[n] is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads_ref[n], rtol=1e-10, atol=1e-14)
    assert any(g is not None and float(g.abs().max()) == 0 for g in grads_ref.values())  # the zeros that must stay


@needs_compiled_step
def test_each_kind_of_batch_compiles_once_within_the_steps_own_limit(monkeypatch):
    """Batches with and without stress labels, and a batch of one structure, are three graphs; molecules, cells and
    slabs in their mixtures are more. Dynamo's recompile limit (8) made the ninth kind a hard failure, after which
    the trainer ran eagerly for good. The step now holds up to RECOMPILE_LIMIT graphs: here the global limit is
    set to 1 and the step's to 3 (dynamo's 'eager' backend, which traces without compiling: ~7 s per graph)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    monkeypatch.setattr(compiled_mod, "RECOMPILE_LIMIT", 3)
    cells = _cells()
    model = _model(cells).train()
    graphs = read_dataset(cells, cutoff=3.5, require=())
    no_stress = [dataclasses.replace(g, has_stress=torch.zeros_like(g.has_stress)) for g in graphs]
    step = CompiledLossGradient(model, loss_weights({"stress": 1.0}), backend="eager")
    for batch in (collate(graphs[:2]), collate(no_stress[:2]), graphs[2]):
        loss, _ = step(batch)
        assert torch.isfinite(loss)
    assert torch._dynamo.config.recompile_limit == 1  # the step's own limit applies while it runs only


@needs_compiled_step
def test_failed_compilation_falls_back(monkeypatch, caplog):
    """A compiler that fails (no C++ compiler, an unsupported operation) leaves the training eager, with a
    warning, and the same numbers."""
    structures = _structures()[:2] * 2
    graphs = read_dataset(structures, cutoff=3.5)

    def broken(self, batch, *rest):
        raise RuntimeError("InductorError: no working C++ compiler found")

    losses = []
    for flag in (False, True):
        model = _model(structures)
        with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="cartlorem.training"):
            m.setattr(compiled_mod.CompiledLossGradient, "__call__", broken)
            result = train(model, graphs, epochs=2, batch_size=2, progress=False, compile=flag)
        losses.append([row["train_loss"] for row in result.history])
    assert losses[0] == losses[1]
    assert "no working C++ compiler" in caplog.text and "training continues eagerly" in caplog.text
    assert "tested with torch" not in caplog.text  # this torch is a tested one


@needs_compiled_step
def test_too_many_kinds_of_batch_name_the_cause(monkeypatch, caplog):
    """Past the step's recompile limit torch raises FailOnRecompileLimitHit, whose words name dynamo's limit; the
    warning named that exception. It now says what it means here: the batches came in too many kinds."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    structures = _structures()[:2]
    graphs = read_dataset(structures, cutoff=3.5)

    def full(self, batch, *rest):
        raise FailOnRecompileLimitHit("recompile_limit reached with fullgraph=True")

    monkeypatch.setattr(compiled_mod.CompiledLossGradient, "__call__", full)
    with caplog.at_level(logging.WARNING, logger="cartlorem.training"):
        train(_model(structures), graphs, epochs=1, batch_size=2, progress=False, compile=True)
    assert f"more than {compiled_mod.RECOMPILE_LIMIT} kinds" in caplog.text and "eagerly" in caplog.text
    assert "recompile_limit reached" not in caplog.text


def test_failed_compilation_names_the_tested_torch(monkeypatch, caplog):
    """On a torch older than the tested one (2.11 fails inside dynamo), the fallback warning says which release
    the compiled step is tested with."""
    structures = _structures()[:2]
    graphs = read_dataset(structures, cutoff=3.5)

    def broken(self, batch, *rest):
        raise RuntimeError("isIntList() INTERNAL ASSERT FAILED")

    monkeypatch.setattr(compiled_mod.CompiledLossGradient, "__call__", broken)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    with caplog.at_level(logging.WARNING, logger="cartlorem.training"):
        train(_model(structures), graphs, epochs=1, batch_size=2, progress=False, compile=True)
    assert "tested with torch 2.13 or newer, this is torch 2.11.0+cu130" in caplog.text
    assert compiled_mod.version_note("2.13.0+cpu") == "" and compiled_mod.version_note("2.14.1") == ""
    assert compiled_mod.version_note("2.9.1").startswith("the compiled step is tested with torch 2.13")


@pytest.mark.parametrize("kind", [None, "multipole", "multipole/light", "multipole/cells", "multipole/slabs",
                                  "multipole/mixed"])
@needs_compiled_step
def test_compiled_training_equals_eager(monkeypatch, kind):
    """train(compile=True) gives the eager run's losses and weights to float64 rounding (a local model; a
    long-range one on molecules, its field sum traced over the pairs the step gives it). The step is compiled
    with fullgraph=True (a graph break fails) by the "aot_eager" backend: the same traced graph as Inductor's
    input, without generating kernels (Inductor's kernels are compared with the eager step by
    benchmarks/train_step.py --compiled, minutes per compilation). Batch sizes vary (4, 4, 2 structures): one
    compilation serves them all. The field sum's constant tables are built before dynamo traces the step
    (LongRangeBlock.prepare_compiled), once: dynamo ignores an lru_cache and would trace their construction
    (~30 s of symbolic Python per compilation). "multipole/light": long_range_options end_features "light" (its
    skip shared by the species on ranks 1, 2 traced too). "multipole/cells": periodic cells of 2 and 8 atoms, one
    charged, with stress; every batch's Ewald sum traced for all its cells at once (cartlorem.ewald.cells), atom
    slots and k-vectors padded to the batch's largest cell. "multipole/slabs": slabs (one tilted and unwrapped,
    one charged), their frames, elongated cells and corrections traced too. "multipole/mixed": molecules, slabs
    and a periodic cell in one batch (one batch per epoch, so that every step sees all three)."""
    from cartlorem.ewald import cells as cells_mod
    from cartlorem.ewald import direct

    kind, _, variant = (kind or "").partition("/")
    kind, options = kind or None, ({"end_features": variant} if variant == "light" else None)

    monkeypatch.setattr(compiled_mod, "BACKEND", "aot_eager")
    if variant == "cells":
        structures, weights = _cells(2) * 2, {}
    elif variant in ("slabs", "mixed"):
        structures, weights = (_slabs(2) * 2, {}) if variant == "slabs" else (_slabs(2, with_cell=True) + _molecules(), {})
        from cartlorem.ewald import ewald

        monkeypatch.setattr(ewald, "_choose_alpha", lambda *args: math.inf)  # the eager sum at the traced splitting
    else:
        structures, weights = [a for a in _structures(2) if kind is None or not a.pbc.any()] * 2, {"stress": 0.0}
    graphs = read_dataset(structures, cutoff=3.5, require=())
    from torch._dynamo.utils import counters

    built = []

    def recording(table):
        def build(*args):
            built.append(torch.compiler.is_compiling())
            return table(*args)
        return build

    monkeypatch.setattr(direct, "_CouplingTable", recording(direct._CouplingTable))
    monkeypatch.setattr(direct, "_TABLES", {})
    monkeypatch.setattr(cells_mod, "_PeriodicTable", recording(cells_mod._PeriodicTable))
    monkeypatch.setattr(cells_mod, "_TABLES", {})
    graphs_before = counters["stats"]["unique_graphs"]
    runs = []
    for flag in (False, True):
        if flag:  # the compiled run builds its own tables
            direct._TABLES.clear()
            cells_mod._TABLES.clear()
            built.clear()
        model = _model(structures, long_range=kind, long_range_options=options)
        result = train(model, graphs, epochs=2, batch_size=len(graphs) if variant == "mixed" else 4, progress=False,
                       compile=flag, ema_decay=None, weights=weights)
        runs.append(([row["train_loss"] for row in result.history], model.state_dict()))
    compiled = counters["stats"]["unique_graphs"] - graphs_before
    assert compiled == 1, f"compiled {compiled} times"
    assert built == ([] if kind is None else [False, False])  # both tables, outside the trace
    _assert_same_runs(runs)


def test_compiled_step_names_an_unsupported_periodic_batch(monkeypatch):
    """Called on a batch it cannot take (periodic cells beyond the traced sum's limit), the step says why instead of
    failing inside the trace; a pbc pattern that no long-range model takes gets the eager model's error."""
    from cartlorem.ewald import cells as cells_mod

    structures = _cells()
    batch = collate(read_dataset(structures, cutoff=3.5, require=()))
    step = CompiledLossGradient(_model(structures, long_range="multipole"), loss_weights({}))
    assert step.unsupported(batch) is None
    monkeypatch.setattr(cells_mod, "MAX_TERMS", 0)
    step = CompiledLossGradient(step.model, loss_weights({}))
    assert "too large" in step.unsupported(batch)
    with pytest.raises(ValueError, match="cannot take the compiled step: a batch of periodic cells or slabs too large"):
        step(batch)
    wire = _cells()[0].copy()
    wire.pbc = [True, False, False]
    batch = collate(read_dataset([wire], cutoff=3.5, require=()))
    with pytest.raises(ValueError, match=r"pbc = \[True, False, False\]"):
        step.unsupported(batch)


@needs_compiled_step
def test_many_compiled_steps_in_one_process(monkeypatch):
    """Dynamo keeps compiled graphs on the code object of the compiled function, and with fullgraph=True it fails
    once that holds recompile_limit graphs: models of other sizes trained one after the other in one process (a
    sweep) fell back to eager from the ninth on. Each step now has a code object of its own. (Here the limit is 2
    and three models of different widths: the third failed with FailOnRecompileLimitHit before.)"""
    monkeypatch.setattr(compiled_mod, "BACKEND", "aot_eager")
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    structures = [a for a in _structures(4) if not a.pbc.any()]
    batch = collate(read_dataset(structures, cutoff=3.5, require=()))
    species = sorted({int(z) for a in structures for z in a.numbers})
    for channels in (2, 3, 4):
        torch.manual_seed(channels)
        model = CartLorem(species, cutoff=3.5, channels=channels, num_layers=1).double()
        loss_ref, _, grads_ref = _eager_gradient(model, batch, loss_weights({"stress": 0.0}))
        step = CompiledLossGradient(model, loss_weights({"stress": 0.0}))
        model.zero_grad(set_to_none=True)
        loss, _ = step(batch)
        assert float(loss) == pytest.approx(float(loss_ref), rel=1e-12)
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(p.grad, grads_ref[n], rtol=1e-10, atol=1e-12)


@needs_compiled_step
def test_a_compiled_step_takes_its_graphs_with_it(monkeypatch):
    """Each step's copy of the code object kept its compiled graphs after the step (and its training run) were
    gone: an active-learning loop of train(compile=True) calls grew by ~36 MB a call with the aot_eager backend and
    a small model. They are dropped with the step now."""
    import gc

    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as cache_entries

    monkeypatch.setattr(compiled_mod, "BACKEND", "aot_eager")
    structures = [a for a in _structures(4) if not a.pbc.any()]
    batch = collate(read_dataset(structures, cutoff=3.5, require=()))
    model = _model(structures)
    step = CompiledLossGradient(model, loss_weights({"stress": 0.0}))
    step(batch)
    code = step._code
    assert len(cache_entries(code)) == 1
    del step
    gc.collect()
    assert len(cache_entries(code)) == 0
