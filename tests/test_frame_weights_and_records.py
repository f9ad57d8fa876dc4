"""MACE's frame weights and config types, the run's data record and evaluate's group metrics: edge cases that a
mutation pass over this code (session 36) showed the other tests would let through (a type not named weighing 0, a
stress weighted 0 still seen, a split record naming a frame past the end, ...)."""
import json
import logging
import math

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from conftest import emt_frames, run_cli as run  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def _labelled(atoms, energy=-1.0, forces=True, stress=False):
    kw = dict(energy=energy)
    if forces:
        kw["forces"] = np.zeros((len(atoms), 3))
    if stress:
        kw["stress"] = np.full(6, 0.01)
    atoms.calc = SinglePointCalculator(atoms, **kw)
    return atoms


def test_a_slab_taller_than_its_cell_is_not_called_wrapped():
    """pbc [T, T, F]: the open vector's length means nothing; a slab with an adsorbate 5 Å above it in a cell
    whose third vector is shorter than the span (atoms outside the cell) is one slab, not a wrapped one."""
    import ase.build
    from cartlorem.graph import wrapped_slab

    slab = ase.build.fcc111("Cu", (2, 2, 3), vacuum=0.0)
    top = slab.positions[:, 2].max()
    slab += Atoms("O", positions=[[0.0, 0.0, top + 5.0]])
    slab.pbc = [True, True, False]
    assert slab.positions[:, 2].max() - slab.positions[:, 2].min() > slab.cell[2, 2]  # spans more than c
    assert wrapped_slab(slab.positions, slab.cell.array, slab.pbc) is None


def test_a_boolean_spin_beside_a_multiplicity_is_refused():
    from cartlorem.graph import info_charge_state

    with pytest.raises(ValueError, match="disagree"):
        info_charge_state({"multiplicity": 1, "spin": True})


def test_a_stress_weighted_0_is_no_label_the_loss_or_metrics_see(make_molecule):
    from cartlorem.data import labels_the_loss_sees, read_dataset

    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.8, 1.8, 0]], cell=[3.6, 3.6, 3.6], pbc=True)
    _labelled(atoms, stress=True)
    atoms.info["config_stress_weight"] = 0.0
    g = read_dataset([atoms], 3.0)[0]
    assert bool(g.has_stress[0])
    seen = labels_the_loss_sees(g)
    assert not bool(seen.has_stress[0]) and bool(seen.has_energy[0]) and bool(seen.has_forces[0])


def test_other_labels_a_percent_off_are_warned_of_and_a_rounded_copy_is_not(caplog, make_molecule):
    from cartlorem.data import read_dataset

    frames = []
    for k, ref in ((0, -10.0 * (1 + 1e-9)), (1, -10.0 * 1.01)):  # a copy (rounding) / a 1 % other label
        atoms = _labelled(make_molecule(4, seed=k), energy=-10.0)
        atoms.info["REF_energy"] = ref
        frames.append(atoms)
    with caplog.at_level(logging.WARNING, logger="cartlorem.data"):
        read_dataset(frames, 3.0)
    assert "frames 1 hold atoms.info 'REF_energy' with other values" in caplog.text


def test_a_single_atom_without_forces_has_no_force_label_when_forces_are_not_required():
    """require=() (cartlorem evaluate): the force 0 is filled in for training only; a filled-in label would add
    three zero errors to the forces metrics."""
    from cartlorem.data import read_dataset

    atom = _labelled(Atoms("H", positions=[[0.0, 0.0, 0.0]]), energy=-13.6, forces=False)
    g = read_dataset([atom], 3.0, require=())[0]
    assert not bool(g.has_forces[0])


def test_a_type_not_named_in_config_type_weights_weighs_1(make_molecule):
    from cartlorem.data import read_dataset

    frames = [_labelled(make_molecule(4, seed=k)) for k in range(3)]
    frames[1].info["config_type"] = "bulk"
    frames[2].info["config_type"] = "surface"
    graphs = read_dataset(frames, 3.0, config_type_weights={"bulk": 2.0})
    assert [float(g.weight[0]) for g in graphs] == [1.0, 2.0, 1.0]


def test_config_type_weights_parse_python_literals_and_refuse_negatives():
    import argparse

    from cartlorem.config import parse_config_type_weights

    assert parse_config_type_weights("{'bulk': 2, 'Default': 0.5}") == {"bulk": 2.0, "Default": 0.5}
    with pytest.raises(argparse.ArgumentTypeError, match=">= 0"):
        parse_config_type_weights('{"bulk": -0.5}')
    for deep in ("-" * 100_000 + "1", "-" * 3000 + "1"):  # MemoryError / RecursionError in the parser
        with pytest.raises(argparse.ArgumentTypeError, match="expected a mapping"):
            parse_config_type_weights(deep)


def _predictions(n=(2, 3, 1)):
    from cartlorem.evaluate import Predictions

    M, N = len(n), sum(n)
    rng = np.random.default_rng(0)
    return Predictions(
        n_atoms=np.array(n), structure=np.repeat(np.arange(M), n), species=rng.integers(1, 9, N),
        energy_ref=rng.normal(size=M), energy_pred=rng.normal(size=M), has_energy=np.ones(M, bool),
        forces_ref=rng.normal(size=(N, 3)), forces_pred=rng.normal(size=(N, 3)),
        has_forces=np.ones(M, bool)[np.repeat(np.arange(M), n)],
        stress_ref=np.zeros((M, 3, 3)), stress_pred=np.zeros((M, 3, 3)), has_stress=np.zeros(M, bool),
        dipole_ref=np.zeros((M, 3)), dipole_pred=np.zeros((M, 3)), has_dipole=np.zeros(M, bool),
        born_charges_ref=np.zeros((N, 3, 3)), born_charges_pred=np.zeros((N, 3, 3)), has_born_charges=np.zeros(N, bool))


def test_select_renumbers_the_structures():
    p = _predictions()
    s = p.select([2, 0])
    assert s.structure.tolist() == [0, 1, 1] and s.n_atoms.tolist() == [1, 2]
    assert np.array_equal(s.forces_pred, np.concatenate([p.forces_pred[5:6], p.forces_pred[0:2]]))


def test_metrics_by_group_are_in_sorted_order():
    from cartlorem.evaluate import metrics_by_group

    for names in (["z", "a", "m"], ["b", "c", "a"], ["surface", "Default", "bulk"]):
        assert list(metrics_by_group(_predictions(), names)) == sorted(names)


def test_metrics_json_nulls_a_non_finite_metric_of_a_group():
    from cartlorem.evaluate import metrics_json

    text = metrics_json({"a": 1.0, "by_config_type": {"bulk": {"energy_mae": math.nan, "n": 2}}})
    assert json.loads(text)["by_config_type"]["bulk"]["energy_mae"] is None


def _model_and_data(tmp_path):
    from cartlorem import CartLorem, save_model

    torch.manual_seed(0)
    model = CartLorem([29, 47], cutoff=3.0, long_range=None, channels=4, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8)
    save_model(model, tmp_path / "model.pt")
    ase.io.write(tmp_path / "test.xyz", emt_frames(3, seed=1))
    return tmp_path / "model.pt", tmp_path / "test.xyz"


def test_an_npz_of_predictions_alone_says_which_model_and_data(tmp_path, capsys):
    model, data = _model_and_data(tmp_path)
    code, _, err = run(capsys, "evaluate", "--model", model, "--data", data, "--predictions", tmp_path / "p.npz",
                       "--no-progress")
    assert code == 0, err
    with np.load(tmp_path / "p.npz") as saved:
        assert "inputs" in saved.files
        assert json.loads(str(saved["inputs"]))["data"] == str(data.resolve())


def _split_run(tmp_path, capsys):
    """(run folder, its data.json) of a one-epoch run on 8 frames, a quarter split off for validation."""
    ase.io.write(tmp_path / "train.xyz", emt_frames(8, seed=0))
    cfg = {"cutoff": 3.0, "long_range": "none", "epochs": 1, "batch_size": 4, "threads": 1, "progress": False}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--train", tmp_path / "train.xyz", "--config", tmp_path / "tiny.yaml",
                       "--valid-fraction", 0.25, "--out", run_dir)
    assert code == 0, err
    return run_dir, json.loads((run_dir / "data.json").read_text())


def test_a_data_json_naming_a_frame_past_the_end_is_a_clear_error(tmp_path, capsys):
    run_dir, record = _split_run(tmp_path, capsys)
    record["validation"] = [record["validation"][0], 8]  # 8 frames: 0..7
    (run_dir / "data.json").write_text(json.dumps(record))
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2)
    assert code == 2 and "does not have once each" in err and "Traceback" not in err, err


def test_a_recorded_split_keeps_every_other_frame_in_training(tmp_path, capsys, monkeypatch):
    from cartlorem.training import job

    run_dir, record = _split_run(tmp_path, capsys)
    record["validation"] = [1, 3]  # as an older cartlorem's rule drew it (not the last frame)
    (run_dir / "data.json").write_text(json.dumps(record))
    seen, real_train = {}, job.train

    def spy(model, train_graphs, valid_graphs, **kwargs):
        seen["n"] = (len(train_graphs), len(valid_graphs))
        return real_train(model, train_graphs, valid_graphs, **kwargs)

    monkeypatch.setattr(job, "train", spy)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2)
    assert code == 0, err
    assert seen["n"] == (6, 2)


def test_fairchem_spin_0_is_not_given():
    """fairchem's (and torch-sim's) spin 0 means "no spin state given"; read as the multiplicity it refused files
    that loaded before (and that the torch-sim engine ran)."""
    from cartlorem.graph import atoms_to_graph, info_charge_state

    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.8, 1.8, 0]], cell=[3.6, 3.6, 3.6], pbc=True)
    atoms.info.update(charge=0, spin=0)
    assert float(atoms_to_graph(atoms, 3.0).multiplicity[0]) == 1.0
    assert info_charge_state({"spin": 0, "multiplicity": 3}) == (0.0, 3)
    assert info_charge_state({"spin": 0}) == (0.0, None)


def test_predictions_and_metadata_are_not_taken_for_other_labels(caplog, make_molecule):
    """The other-labels warning took any key with "energy" in it for a label: a model's predictions beside the
    labels (cartlorem evaluate's cartlorem_energy, MACE's MACE_energy) and metadata (energy_cutoff) were pointed
    out as labels to train on. Label keys only (REF_, DFT_, QM_) are."""
    from cartlorem.data import read_dataset

    atoms = _labelled(make_molecule(4, seed=0), energy=-10.0)
    atoms.info.update(cartlorem_energy=-9.0, MACE_energy=-9.5, energy_cutoff=520.0)
    atoms.arrays["MACE_forces"] = np.ones((4, 3))
    with caplog.at_level(logging.WARNING, logger="cartlorem.data"):
        read_dataset([atoms], 3.0)
    assert "other values" not in caplog.text
    atoms.info["DFT_energy"] = -11.0
    with caplog.at_level(logging.WARNING, logger="cartlorem.data"):
        read_dataset([atoms], 3.0)
    assert "'DFT_energy' with other values" in caplog.text and "MACE_energy" not in caplog.text


def test_evaluate_of_labels_all_weighted_0_says_so(tmp_path, capsys):
    """With every label weighted 0, evaluate said the data carry no labels and to check the keys, after saying
    that the weighted labels are not scored."""
    model, data = _model_and_data(tmp_path)
    frames = ase.io.read(data, ":")
    for atoms in frames:
        atoms.info["config_weight"] = 0.0
    ase.io.write(tmp_path / "w0.xyz", frames)
    code, _, err = run(capsys, "evaluate", "--model", model, "--data", tmp_path / "w0.xyz", "--no-progress")
    assert code == 0, err
    assert "every energy and force label of the data is weighted 0" in err and "check --energy-key" not in err
