"""The run folder of `cartlorem train` after a failed or restarted run: what is on disk must stay usable."""

import ase.io
import pytest
import yaml

from cartlorem import cli, load_model
from conftest import emt_frames, run_cli as run  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

TINY = {"channels": 4, "num_layers": 1, "correlation": 1, "num_basis": 4, "radial_hidden": 4, "readout_hidden": 4,
        "cutoff": 3.0, "long_range": "none", "epochs": 1, "batch_size": 4, "threads": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ase.io.write(d / "train.xyz", emt_frames(8, seed=0))
    (d / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return d


def test_failed_resume_leaves_the_run_config_as_it_was(files, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", run_dir, "--no-progress")
    assert code == 0, err
    before = (run_dir / "config.yaml").read_text()
    # a model flag that does not match the checkpoint: the resume is refused ...
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2, "--channels", 6, "--no-progress")
    assert code == 2 and "different model" in err and "Traceback" not in err
    # ... and the run's config.yaml still describes the run, so a plain --resume continues it
    assert (run_dir / "config.yaml").read_text() == before
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2, "--no-progress")
    assert code == 0, err
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["epochs"] == 2
    assert load_model(run_dir / "checkpoint.pt").config["channels"] == 4


def test_overwrite_removes_the_previous_runs_files(files, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", run_dir, "--no-progress")
    assert code == 0, err
    assert (run_dir / "model.pt").is_file() and (run_dir / "checkpoint.pt").is_file()
    # a new run over the old one that ends before its first epoch: no file of the old run may pass for its own
    code, out, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                         "--out", run_dir, "--overwrite", "--epochs", 0, "--channels", 6, "--no-progress")
    assert code == 0, err
    assert "no model file was written" in out
    for name in ("model.pt", "checkpoint.pt", "log.csv", "learning_curve.png"):
        assert not (run_dir / name).exists(), name
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["channels"] == 6
    # and --resume does not continue the old run under the new config
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--no-progress")
    assert code == 2 and "no checkpoint.pt" in err


def test_overwrite_removes_what_was_written_about_the_old_model(files, tmp_path, capsys):
    """A run started over a `cartlorem train` folder through the library (or the demo, which overwrites) kept the
    old run's config.yaml, and `cartlorem evaluate` then read the new model's labels with the old run's keys."""
    import torch

    from cartlorem import CartLorem
    from cartlorem.data import read_dataset
    from cartlorem.train import train

    frames = emt_frames(8, seed=0)
    for a in frames:
        a.info["REF_energy"] = a.get_potential_energy() + 100.0
    ase.io.write(files / "ref.xyz", frames)
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--train", files / "ref.xyz", "--config", files / "tiny.yaml",
                       "--energy-key", "REF_energy", "--out", run_dir, "--no-progress")
    assert code == 0, err
    for name in ("test_metrics.json", "parity.png", "md.csv"):  # as a demo in this folder would have left them
        (run_dir / name).write_text("about the old model")
    graphs = read_dataset(files / "ref.xyz", 3.0)  # the calculator's energies
    model = CartLorem(species=[29, 47], channels=4, num_layers=1, correlation=1, num_basis=4, radial_hidden=4,
                      readout_hidden=4, cutoff=3.0, long_range=None).to(torch.float64)
    train(model, graphs, epochs=1, batch_size=4, out_dir=run_dir, overwrite=True, progress=False)
    for name in ("config.yaml", "test_metrics.json", "parity.png", "md.csv"):
        assert not (run_dir / name).exists(), name
    code, out, err = run(capsys, "evaluate", "--model", run_dir / "model.pt", "--data", files / "ref.xyz")
    assert code == 0, err
    assert "label keys of the run" not in out and "--energy-key REF_energy" not in out, out
    # the calculator's energies were scored, so the file's REF_energy (100 eV off) is pointed out as another label
    assert "hold atoms.info 'REF_energy' with other values" in err


def test_a_model_file_without_a_checkpoint_is_not_removed_without_overwrite(files, tmp_path, capsys):
    """A fresh run deleted a model.pt it found in its folder (one the user put there, or of a run whose checkpoint
    was removed) even without --overwrite; it is now refused like a checkpoint, and kept."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.pt").write_bytes(b"a model the user keeps here")
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", run_dir, "--no-progress")
    assert code != 0 and "model.pt" in err and "--overwrite" in err, err
    assert (run_dir / "model.pt").read_bytes() == b"a model the user keeps here"


def test_unknown_long_range_option_is_a_clear_config_error(files, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "long_range": "multipole", "long_range_options": {"lr_chanels": 2}}))
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", bad, "--out", tmp_path / "r",
                       "--no-progress")
    assert code == 2 and "Traceback" not in err, err
    assert "long_range_options" in err and "lr_chanels" in err and "did you mean 'lr_channels'" in err
    assert not (tmp_path / "r").exists()  # refused before anything is read or written
    # the options the block takes are accepted, as are placement and end_features (CartLorem's own)
    from cartlorem.config import Config

    options = {"lr_channels": 2, "smearing": 1.5, "placement": "end", "end_features": "full"}
    assert Config(long_range_options=options).long_range_options == options


def test_output_folder_that_is_a_file(files, tmp_path, capsys):
    taken = tmp_path / "run"
    taken.write_text("not a folder\n")
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", taken, "--no-progress")
    assert code == 2 and "Traceback" not in err
    assert str(taken) in err and "is a file, not a folder" in err, err
    from cartlorem.training import RunFolder

    with pytest.raises(ValueError, match="is a file, not a folder"):
        RunFolder(taken).open(resume=False, overwrite=False)
    assert taken.read_text() == "not a folder\n"


@pytest.mark.parametrize("damage", ["truncated", "text", "one bit"])
def test_damaged_checkpoint_is_a_clear_error_on_resume(files, tmp_path, capsys, damage):
    """"one bit": a flipped bit in a stored tensor, which torch.load reads without a word (its checksum is not
    checked), and the run went on from the wrong number."""
    import zipfile

    from test_loading import _flip_a_bit_in

    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", run_dir, "--no-progress")
    assert code == 0, err
    ckpt = run_dir / "checkpoint.pt"
    if damage == "one bit":
        with zipfile.ZipFile(ckpt) as archive:
            record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        _flip_a_bit_in(ckpt, record.filename)
    else:
        ckpt.write_bytes(ckpt.read_bytes()[:1000] if damage == "truncated" else b"garbage\n")
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2, "--no-progress")
    assert code == 2 and "Traceback" not in err, err
    assert "cannot read" in err and str(ckpt) in err and "--overwrite" in err


def test_negative_seed_is_refused_naming_the_seed(files, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", tmp_path / "r", "--seed", -1, "--no-progress")
    assert code == 2 and "seed" in err and ">= 0" in err, err
    from cartlorem import CartLorem
    from cartlorem.data import read_dataset
    from cartlorem.training import train

    graphs = read_dataset(emt_frames(3, seed=0), 3.0)
    model = CartLorem([29, 47], cutoff=3.0, long_range=None, channels=4, num_layers=1).double()
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0"):
        train(model, graphs, epochs=1, seed=-1, progress=False)
    from cartlorem.data import split

    with pytest.raises(ValueError, match=r"seed must be an integer >= 0"):
        split(10, 0.2, seed=-1)


@pytest.mark.parametrize("key, value, expected", [("smearing", "x", "a number"), ("hidden", "x", "an integer"),
                                                  ("lr_channels", 2.5, "an integer"), ("accuracy", "x", "a number")])
def test_long_range_option_values_of_the_wrong_type_name_the_option(key, value, expected):
    from cartlorem.config import Config

    with pytest.raises(ValueError, match=rf"long_range_options.*{key}: expected {expected}"):
        Config.from_dict({"long_range": "multipole", "long_range_options": {key: value}})
    assert Config(long_range_options={"smearing": 2, "hidden": 16}).long_range_options == {"smearing": 2.0,
                                                                                            "hidden": 16}


def test_a_folder_given_as_a_data_or_model_file_is_called_a_folder(files, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--train", files, "--out", tmp_path / "r", "--no-progress")
    assert code == 2 and "is a folder, not a file" in err and "does not exist" not in err, err
    code, _, err = run(capsys, "evaluate", "--model", tmp_path, "--data", files / "train.xyz")
    assert code == 2 and "is a folder, not a file" in err and "does not exist" not in err, err
    # export, demo and --config said of an existing folder that it "does not exist"
    for argv, what in ((["export", tmp_path, tmp_path / "x.pt"], "model file"),
                       (["demo", "--data", tmp_path, "--out", tmp_path / "demo", "--no-progress"], "data file"),
                       (["train", "--config", tmp_path, "--train", files / "train.xyz", "--out", tmp_path / "r"],
                        "config file")):
        code, _, err = run(capsys, *argv)
        assert code == 2 and f"error: {what} '{tmp_path}' is a folder, not a file" in err, err
    code, _, err = run(capsys, "evaluate", "--model", "/dev/null", "--data", files / "train.xyz")
    assert code == 2 and "model file '/dev/null' is not a regular file" in err, err


def test_interrupt_before_the_first_checkpoint_does_not_offer_a_resume(files, tmp_path, capsys, monkeypatch):
    import cartlorem.training.job as job

    def interrupted(cfg, given=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run", interrupted)
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--out", tmp_path / "r", "--no-progress")
    assert code == 130 and "--resume" not in err and "no checkpoint" in err, err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"")
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--out", tmp_path / "r", "--no-progress")
    assert code == 130 and "--resume" in err, err


def test_evaluate_notes_reach_the_terminal_handler_under_python_m(files, tmp_path):
    """`python -m cartlorem.cli` (and torchrun -m cartlorem.cli) runs the module as __main__: its warnings
    must still go through the 'cartlorem' logger (the 'note:' lines), not Python's last-resort handler."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = cli.main(["train", "--train", str(files / "train.xyz"), "--config", str(files / "tiny.yaml"),
                         "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    (tmp_path / "bare.xyz").write_text("2\nplain\nCu 0 0 0\nAg 2.5 0 0\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "cartlorem.cli", "evaluate", "--model", str(tmp_path / "run" /
                           "model.pt"), "--data", str(tmp_path / "bare.xyz"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "note: the data carry no energy or force labels" in done.stderr, done.stderr


@pytest.mark.parametrize("flag, value", [("--seed", 5), ("--valid-fraction", 0.25)])
def test_resume_refuses_another_split(files, tmp_path, capsys, flag, value):
    """A resume with another --seed or --valid-fraction split --train anew: structures the run had validated on were
    trained on from then on, and the best model's loss compared with losses on another set, silently."""
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", run_dir, "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2, flag, value, "--no-progress")
    assert code == 2 and "another split of the data" in err and flag.lstrip("-").replace("-", "_") in err, err
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2, "--no-progress")
    assert code == 0, err  # the run's own values resume as before


def test_a_learning_curve_with_an_empty_panel_gives_no_warning(tmp_path):
    """With no validation set and all forces zero, the force panel had nothing to plot and matplotlib warned 'No
    artists with labels found to put in legend'."""
    import warnings

    from cartlorem.training.log import plot_learning_curve

    history = [{"epoch": e, "train_loss": 1.0 / e, "valid_loss": 1.0 / e, "metrics_on": "training",
                "valid_energy_mae_mev_per_atom": 2.0 / e, "valid_forces_mae_mev_per_a": 0.0} for e in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_learning_curve(history, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_a_run_of_a_module_holding_a_cartlorem_written_before_its_extra_state_resumes():
    """CartLorem.state_dict() holds "_extra_state" (avg_num_neighbors) since model format v5; the checkpoint of a
    user's module around a CartLorem written before it was refused on resume as "a different model
    (inner._extra_state differs)". A module that does differ is still refused."""
    import torch

    from cartlorem import CartLorem
    from cartlorem.training.run_folder import STATE_DICT_FORMAT, cpu_state_dict, restore_model_settings

    class Wrapped(torch.nn.Module):
        def __init__(self, channels=4):
            super().__init__()
            self.inner = CartLorem([1, 8], cutoff=3.0, channels=channels, num_layers=1)

    model = Wrapped()
    old = {k: v for k, v in cpu_state_dict(model).items() if not k.endswith("_extra_state")}
    assert len(old) == len(model.state_dict()) - 1
    restore_model_settings(model, {"format": STATE_DICT_FORMAT, "class": "Wrapped", "state_dict": old}, "run")
    other = {k: v for k, v in cpu_state_dict(Wrapped(channels=8)).items()}
    with pytest.raises(ValueError, match="written for a different model"):
        restore_model_settings(model, {"format": STATE_DICT_FORMAT, "class": "Wrapped", "state_dict": other}, "run")
