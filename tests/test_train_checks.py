"""train(): data that do not fit the model are refused before the first step."""

import pytest
import torch

from cartlorem import CartLorem
from cartlorem.data import read_dataset
from cartlorem.training import check_dataset, train
from conftest import emt_frames  # noqa: E402  (tests/ is on sys.path under pytest)


def tiny_model(cutoff=3.0):
    torch.manual_seed(0)
    return CartLorem([29, 47], cutoff=cutoff, long_range=None, channels=4, num_layers=1, correlation=1,
                     num_basis=4, radial_hidden=4, readout_hidden=4).double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_graphs_read_with_a_smaller_cutoff_are_refused(dtype):
    frames = emt_frames(6, seed=0)
    short = read_dataset(frames, 2.6, dtype=dtype)  # neighbours between 2.6 and 3.0 Å are missing
    model = tiny_model(3.0).to(dtype)
    with pytest.raises(ValueError, match=r"training structure 0 .* smaller cutoff.*cutoff=model\.cutoff"):
        train(model, short, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"validation structure 0 .* smaller cutoff"):
        train(model, read_dataset(frames, 3.0, dtype=dtype), short, epochs=1, progress=False)
    check_dataset(model, read_dataset(frames, 3.0, dtype=dtype), "training")  # the model's own cutoff passes


def test_predict_and_evaluate_refuse_graphs_of_another_cutoff():
    """predict / evaluate took graphs read with a smaller (or larger) cutoff than the model's and gave other
    energies without a word (1.5 meV/atom off on a model's own labels); train already refused them."""
    from cartlorem.evaluate import evaluate, predict

    frames = emt_frames(4, seed=0)
    model = tiny_model(3.0)
    for cutoff in (2.6, 4.0):
        graphs = read_dataset(frames, cutoff)
        with pytest.raises(ValueError, match=r"structure 0 .*cutoff=model\.cutoff"):
            predict(model, graphs)
        with pytest.raises(ValueError, match=r"structure 0 .*cutoff=model\.cutoff"):
            evaluate(model, graphs)
    assert len(predict(model, read_dataset(frames, 3.0)).energy_pred) == 4


def test_float32_lengths_at_the_cutoff_far_from_the_origin_are_not_longer_edges():
    """Two atoms 1e-7 Å inside the cutoff near 110 Å from the origin measure 5.0000095 Å in float32; the check of
    predict (and train) took that for an edge read with a longer cutoff and refused the model's own graph."""
    import numpy as np
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from cartlorem.evaluate import predict

    p1 = np.array([108.8341557171149, 100.65016505265203, 115.86488523954513])
    atoms = Atoms("H2", positions=[p1, p1 + (5.0 - 1e-7) * np.ones(3) / np.sqrt(3)], cell=[130.0] * 3, pbc=True)
    atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((2, 3)))
    graphs = read_dataset([atoms], 5.0, dtype=torch.float32)
    assert float(graphs[0].edge_vectors().norm(dim=-1).max()) > 5.0 * (1 + 1e-6) + 1e-9  # the case
    model = CartLorem([1], cutoff=5.0, long_range=None, channels=4, num_layers=1, correlation=1, num_basis=4,
                      radial_hidden=4, readout_hidden=4)
    assert len(predict(model, graphs).energy_pred) == 1
    check_dataset(model, graphs, "training")


def test_training_set_without_edges_names_the_cutoff():
    model = tiny_model(0.5)  # a cutoff in nm by mistake: no two atoms are this close
    graphs = read_dataset(emt_frames(4, seed=0), 0.5)
    with pytest.raises(ValueError, match=r"no two atoms .* within the cutoff 0\.5 Å"):
        train(model, graphs, epochs=1, progress=False)


def test_batches_without_a_weighted_label_are_skipped():
    """Stress is the only trained term (energy weight 0, no force labels): batches of molecules carry
    nothing to fit and must not end the run with an autograd error."""
    graphs = read_dataset(emt_frames(6, seed=0), 3.0, forces_key=None, require=("energy",))
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    result = train(model, graphs, epochs=1, batch_size=1, weights={"energy": 0.0}, ema_decay=None, progress=False)
    assert result.epochs_completed == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the stress batches trained
    train(tiny_model(), graphs, epochs=1, batch_size=1, weights={"energy": 0.0}, clip_grad=None, progress=False)


def test_nothing_to_train_is_refused_up_front():
    graphs = read_dataset(emt_frames(4, seed=0), 3.0)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        train(tiny_model(), graphs, epochs=1, weights={"energy": 0, "forces": 0, "stress": 0}, progress=False)
    energy_only = read_dataset(emt_frames(4, seed=0), 3.0, forces_key=None, stress_key=None, require=("energy",))
    with pytest.raises(ValueError, match=r"none of the 4 training structures carries a label .*forces"):
        train(tiny_model(), energy_only, epochs=1, weights={"energy": 0}, progress=False)


def test_labels_all_weighted_0_are_nothing_to_train_and_no_validation_reference():
    """Frames whose config_energy_weight and config_forces_weight were all 0 (and no stress labels) passed the
    check (the absent stress's weight 1 counted) and trained on nothing: a loss of 0 every epoch and no reference
    energies. They are refused now. And a label weighted 0 is no reference of the validation metrics (as in
    MACE's): a placeholder energy weighted 0 changed the validation loss that picks the best model."""
    from cartlorem.evaluate import metrics, predict

    frames = [a for a in emt_frames(8, seed=0) if not a.pbc.any()][:4]  # molecules: no stress labels
    for atoms in frames:
        atoms.info.update(config_energy_weight=0.0, config_forces_weight=0.0)
    with pytest.raises(ValueError, match=r"none of the 4 training structures carries a label .*do not count"):
        train(tiny_model(), read_dataset(frames, 3.0), epochs=1, progress=False)

    frames = emt_frames(6, seed=1)
    model = tiny_model()
    plain = metrics(predict(model, read_dataset(frames, 3.0)))
    frames[0].info["config_energy_weight"] = 0.0
    frames[0].calc.results["energy"] += 100.0  # a placeholder the author marked
    frames[3].info["config_weight"] = 0.0
    frames[3].calc.results["forces"] = frames[3].get_forces() + 5.0
    m = metrics(predict(model, read_dataset(frames, 3.0)))
    kept = read_dataset([frames[k] for k in (1, 2, 4, 5)], 3.0)
    alone = metrics(predict(model, kept))
    assert m["n_energy"] == 4 and m["n_forces"] == 5 and plain["n_energy"] == 6
    assert m["energy_mae_mev_per_atom"] == pytest.approx(alone["energy_mae_mev_per_atom"], rel=1e-12)
    forces_kept = metrics(predict(model, read_dataset([frames[k] for k in (0, 1, 2, 4, 5)], 3.0)))
    assert m["forces_mae_mev_per_a"] == pytest.approx(forces_kept["forces_mae_mev_per_a"], rel=1e-12)


def test_validation_set_without_the_trained_labels_is_refused():
    """A validation set read with the wrong keys has no labels: its loss would be 0 every epoch, the first
    epoch 'best' and early stopping would end the run there."""
    frames = emt_frames(6, seed=0)
    graphs = read_dataset(frames, 3.0)
    unlabelled = read_dataset(frames[:2], 3.0, energy_key="REF_energy", forces_key="REF_forces",
                              stress_key="REF_stress", require=())
    with pytest.raises(ValueError, match=r"none of the 2 validation structures carries a label"):
        train(tiny_model(), graphs, unlabelled, epochs=3, patience=1, progress=False)


def test_resume_with_new_loss_weights_compares_losses_of_the_same_weights(tmp_path):
    """A second stage with a much larger force weight: its validation losses are on another scale than the
    first stage's best, which must be re-expressed with the new weights, else no epoch of the second stage
    is ever 'better' and early stopping keeps the first stage's model."""
    from cartlorem.training import validation_loss
    from cartlorem.training.loss import loss_weights

    frames = emt_frames(10, seed=0)
    graphs, valid = read_dataset(frames[:7], 3.0), read_dataset(frames[7:], 3.0)
    first = train(tiny_model(), graphs, valid, epochs=2, out_dir=tmp_path, lr=1e-2, progress=False)
    heavy = {"forces": 100.0}
    second = train(tiny_model(), graphs, valid, epochs=4, out_dir=tmp_path, resume=True, lr=1e-2, patience=2,
                   weights=heavy, progress=False)
    best_first = validation_loss(first.best_metrics, loss_weights(heavy))  # stage 1's best, in stage 2's terms
    new_losses = [row["valid_loss"] for row in second.history[2:]]
    assert second.best_valid_loss == pytest.approx(validation_loss(second.best_metrics, loss_weights(heavy)))
    if min(new_losses) < best_first:  # stage 2 improved on it: its best epoch must be kept
        assert second.best_epoch > 2 and second.best_valid_loss == pytest.approx(min(new_losses))
    else:
        assert second.best_epoch == first.best_epoch and second.best_valid_loss == pytest.approx(best_first)


@pytest.mark.parametrize("first, then", [("amsgrad", "adam"), ("adam", "amsgrad")])
def test_resume_applies_the_settings_it_is_given(tmp_path, first, then):
    """The checkpoint gives the state (moments, current rate, counters); the settings of the resuming call
    (scheduler factor and patience, EMA decay, weight decay, optimiser) apply from then on, as the run's
    config.yaml says."""
    graphs = read_dataset(emt_frames(6, seed=0), 3.0)
    train(tiny_model(), graphs, epochs=1, out_dir=tmp_path, optimizer=first, progress=False)
    train(tiny_model(), graphs, epochs=2, out_dir=tmp_path, resume=True, progress=False, scheduler_patience=3,
          scheduler_factor=0.5, ema_decay=0.9, weight_decay=1e-4, optimizer=then)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (ckpt["scheduler"]["patience"], ckpt["scheduler"]["factor"]) == (3, 0.5)
    assert ckpt["ema"]["decay"] == 0.9
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 1e-4 and group["amsgrad"] == (then == "amsgrad")
    assert group["lr"] == ckpt["history"][0]["lr"]  # the rate is state: the checkpoint's


def test_a_run_that_stopped_early_stays_stopped_on_resume(tmp_path, caplog):
    """The stop reason was not saved and patience was tested only after an epoch: resuming an early-stopped run
    with the same settings trained further epochs. A larger patience still trains on."""
    frames = emt_frames(8, seed=0)
    graphs, valid = read_dataset(frames[:6], 3.0), read_dataset(frames[6:], 3.0)
    first = train(tiny_model(), graphs, valid, epochs=40, patience=1, lr=0.2, out_dir=tmp_path, progress=False)
    assert first.stop_reason == "early_stopping" and first.epochs_completed < 40
    again = train(tiny_model(), graphs, valid, epochs=40, patience=1, lr=0.2, out_dir=tmp_path, resume=True,
                  progress=False)
    assert again.stop_reason == "early_stopping" and again.epochs_completed == first.epochs_completed
    assert len(again.history) == len(first.history) and "had already stopped early" in caplog.text
    more = train(tiny_model(), graphs, valid, epochs=first.epochs_completed + 1, patience=5, lr=0.2, out_dir=tmp_path,
                 resume=True, progress=False)
    assert more.epochs_completed == first.epochs_completed + 1


def test_an_epoch_cut_by_max_time_is_continued_on_resume(tmp_path, monkeypatch, caplog):
    """A max_time cut in the middle of an epoch was checkpointed as a full epoch, so a resume went on with the next
    one: fewer optimiser steps than the uninterrupted run, other results. The checkpoint now holds the epoch's
    order and position, and the resumed run is the uninterrupted run."""
    import logging
    import types

    import cartlorem.training.loop as loop
    from cartlorem import load_model

    frames = emt_frames(8, seed=0)
    graphs, valid = read_dataset(frames[:6], 3.0), read_dataset(frames[6:], 3.0)
    settings = dict(batch_size=1, progress=False, seed=0, epochs=2)
    whole = train(tiny_model(), graphs, valid, out_dir=tmp_path / "whole", **settings)

    # a clock that moves with the optimiser steps: 1 s each in epoch 1, then 10 s (a machine that got loaded), so
    # that epoch 2 starts (6 s + 6 s expected <= 13 s) and is cut after its first batch
    clock = {"t": 0.0, "steps": 0}
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    step = loop._Run._step

    def timed_step(self, *args, **kwargs):
        clock["steps"] += 1
        clock["t"] += 1.0 if clock["steps"] <= 6 else 10.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(loop._Run, "_step", timed_step)
    cut = train(tiny_model(), graphs, valid, out_dir=tmp_path / "cut", max_time=13, **settings)
    assert cut.stop_reason == "max_time" and cut.cut_short and len(cut.history) == 2  # validated and reported
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 7 and ckpt["partial"]["done"] == 1
    if cut.best_epoch == 2:  # the cut epoch's model was better: model.pt says that epoch was cut short
        assert "cut_short" in torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["training"]
    monkeypatch.setattr(loop._Run, "_step", step)
    with pytest.raises(ValueError, match="which max_time cut short, over 6 training structures, but this call has 5"):
        train(tiny_model(), graphs[:5], valid, out_dir=tmp_path / "cut", resume=True, **settings)

    with caplog.at_level(logging.INFO, logger="cartlorem"):
        resumed = train(tiny_model(), graphs, valid, out_dir=tmp_path / "cut", resume=True, **settings)
    # the epoch line gave the time of the part this call trained (0 s on the frozen clock), log.csv the whole epoch's
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch    2"))
    whole_epoch = resumed.history[-1]["epoch_time_s"]
    assert whole_epoch > 0 and line.rstrip(" *").endswith(f"{whole_epoch:.1f} s"), line
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (b["epoch"], b["step"], b["partial"]) == (a["epoch"], a["step"], None) == (2, 12, None)
    assert [r["valid_loss"] for r in resumed.history] == pytest.approx([r["valid_loss"] for r in whole.history],
                                                                       rel=1e-12)
    assert all(torch.allclose(v, b["train_state_dict"][k], rtol=1e-12, atol=0)
               for k, v in a["train_state_dict"].items())
    assert resumed.best_epoch == whole.best_epoch and not resumed.cut_short
    best = load_model(tmp_path / "cut" / "model.pt").state_dict()
    assert all(torch.allclose(v, best[k], rtol=1e-12, atol=0) for k, v in load_model(tmp_path / "whole" /
                                                                                       "model.pt").state_dict().items())


def test_numpy_settings_leave_a_checkpoint_a_resume_reads(tmp_path):
    """checkpoint.pt recorded the settings as given: a learning rate from np.logspace (or any numpy number among
    the settings) was pickled into it, and the resume's safe reader then called the checkpoint damaged (and
    load_model refused it)."""
    import numpy as np

    import cartlorem

    graphs = read_dataset(emt_frames(6, seed=0), cutoff=3.0)
    settings = dict(lr=np.logspace(-3, -2, 3)[1], seed=np.int64(3), ema_decay=np.float64(0.99),
                    weight_decay=np.float32(1e-6), scheduler_factor=np.float64(0.5), clip_grad=np.float64(10.0),
                    batch_size=np.int64(2), patience=np.int64(5), scheduler_patience=np.int64(3),
                    valid_batch_size=np.int64(2), max_time=np.float64(600.0), epochs=np.int64(1))
    model = CartLorem([29, 47], cutoff=3.0, channels=4, num_layers=1, correlation=1, num_basis=4, radial_hidden=4,
                      readout_hidden=4)
    train(model, graphs[:4], graphs[4:], progress=False, out_dir=tmp_path / "run", **settings)
    cartlorem.load_model(tmp_path / "run" / "checkpoint.pt")
    result = train(model, graphs[:4], graphs[4:], progress=False, out_dir=tmp_path / "run", resume=True,
                   **{**settings, "epochs": 2})
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_a_fractional_worker_count_is_refused():
    """workers=1.5 ran one data-loading process without a word (the other counts refuse fractions)."""
    graphs = read_dataset(emt_frames(2, seed=0), cutoff=3.0)
    with pytest.raises(ValueError, match=r"workers must be an integer >= 0, got 1.5"):
        train(tiny_model(), graphs, workers=1.5, epochs=1, progress=False)
