"""The command line through cli.main([...]): train → evaluate round trip, resume, demo, clear errors."""

import json

import ase.io
import pytest
import torch
import yaml

from cartlorem import load_model
from cartlorem.config import option_names
from conftest import emt_frames, needs_compiled_step, run_cli as run  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

TINY_CONFIG = {
    "channels": 8,
    "num_layers": 2,
    "correlation": 2,
    "num_basis": 4,
    "radial_hidden": 8,
    "readout_hidden": 8,
    "cutoff": 3.0,
    "long_range": "none",
    "epochs": 2,
    "batch_size": 4,
    "threads": 1,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ase.io.write(d / "train.xyz", emt_frames(12, seed=0))
    ase.io.write(d / "test.xyz", emt_frames(5, seed=1))
    (d / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    return d


def test_train_evaluate_round_trip(files, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run(
        capsys,
        "train",
        "--train",
        files / "train.xyz",
        "--config",
        files / "tiny.yaml",
        "--out",
        run_dir,
        "--epochs",
        1,
        "--seed",
        1,
        "--no-progress",
    )
    assert code == 0, err
    for name in ("model.pt", "checkpoint.pt", "config.yaml", "log.csv", "learning_curve.png"):
        assert (run_dir / name).is_file(), name
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["epochs"] == 1  # the flag overrides the config file
    assert written["channels"] == 8 and written["seed"] == 1
    every = set(option_names())
    assert set(written) == every  # every option, defaults included
    assert written["ema_decay"] == 0.99 and written["lmax"] == 2 and written["species"] == ["Cu", "Ag"]
    assert len((run_dir / "log.csv").read_text().strip().splitlines()) == 2
    model = load_model(run_dir / "model.pt")
    assert model.config["channels"] == 8 and model.long_range is None

    metrics_file = tmp_path / "m.json"
    code, out, err = run(
        capsys,
        "evaluate",
        "--model",
        run_dir / "model.pt",
        "--data",
        files / "test.xyz",
        "--json",
        metrics_file,
        "--no-progress",
    )
    assert code == 0, err
    m = json.loads(metrics_file.read_text())
    for key in (
        "energy_mae_mev_per_atom",
        "energy_rmse_mev_per_atom",
        "forces_mae_mev_per_a",
        "forces_rmse_mev_per_a",
        "stress_mae_mev_per_a3",
        "stress_rmse_mev_per_a3",
        "n_structures",
        "n_atoms",
    ):
        assert key in m, key
    assert m["n_structures"] == 5
    assert "meV/atom" in out and "forces" in out

    # resume from the run folder alone: its config.yaml is read back; --device cuda falls back to the CPU
    code, out, err = run(
        capsys, "train", "--out", run_dir, "--resume", "--epochs", 2, "--device", "cuda", "--no-progress"
    )
    assert code == 0, err
    if not torch.cuda.is_available():
        assert "CUDA is not available" in err
    assert len((run_dir / "log.csv").read_text().strip().splitlines()) == 3
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] == 2

    # a fresh run into the same folder needs --overwrite
    code, out, err = run(
        capsys,
        "train",
        "--train",
        files / "train.xyz",
        "--config",
        files / "tiny.yaml",
        "--out",
        run_dir,
        "--no-progress",
    )
    assert code == 2 and "--resume" in err and "--overwrite" in err


def test_demo_runs_on_small_data(files, tmp_path, capsys):
    code, out, err = run(
        capsys,
        "demo",
        "--data",
        files / "train.xyz",
        "--out",
        tmp_path / "demo",
        "--epochs",
        1,
        "--md-steps",
        10,
        "--channels",
        8,
        "--no-progress",
    )
    assert code == 0, err
    assert "energy drift" in out and "meV/atom/ps" in out
    # the MD starts at the temperature it announces
    announced = float(out.split(" fs at ")[1].split(" K")[0])
    started = float(out.split("; T ")[1].split(" K at the start")[0])
    assert started == pytest.approx(announced, abs=0.5)
    assert (tmp_path / "demo" / "model.pt").is_file() and (tmp_path / "demo" / "md.csv").is_file()
    assert len((tmp_path / "demo" / "md.csv").read_text().strip().splitlines()) == 12  # header + steps 0..10


@pytest.mark.parametrize("command", ["train", "evaluate", "demo"])
def test_help(command, capsys):
    code, out, err = run(capsys, command, "--help")
    assert code == 0
    assert f"usage: cartlorem {command}" in out
    assert {"train": "--long-range", "evaluate": "--json", "demo": "--epochs"}[command] in out


def _assert_user_error(code, err, *fragments):
    assert code == 2
    assert "error:" in err and "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)


def test_missing_files(files, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--train", tmp_path / "nope.xyz", "--out", tmp_path / "r")
    _assert_user_error(code, err, "nope.xyz", "does not exist")
    code, _, err = run(capsys, "evaluate", "--model", tmp_path / "nope.pt", "--data", files / "test.xyz")
    _assert_user_error(code, err, "nope.pt")
    code, _, err = run(
        capsys,
        "train",
        "--train",
        files / "train.xyz",
        "--config",
        tmp_path / "no.yaml",
        "--out",
        tmp_path / "r",
    )
    _assert_user_error(code, err, "no.yaml")
    code, _, err = run(capsys, "train", "--out", tmp_path / "r")
    _assert_user_error(code, err, "--train")


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "empty.xyz").write_text("")
    code, _, err = run(
        capsys, "train", "--train", tmp_path / "empty.xyz", "--out", tmp_path / "r", "--long-range", "none"
    )
    _assert_user_error(code, err, "empty")


def test_a_misspelt_stress_key_is_refused(files, tmp_path, capsys):
    """Stress is used where present, so --stress-key REF_stres on a periodic set trained without stress and said
    nothing; a named key that no periodic training frame has is refused, and nothing is written."""
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml", "--out",
                       tmp_path / "r", "--stress-key", "REF_stres", "--epochs", 1)
    _assert_user_error(code, err, "--stress-key REF_stres is in none of its 4 fully periodic frames")
    assert not (tmp_path / "r").exists()


def test_bad_config(files, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("chanels: 8\n")
    code, _, err = run(
        capsys, "train", "--train", files / "train.xyz", "--config", bad, "--out", tmp_path / "r"
    )
    _assert_user_error(code, err, "chanels", "did you mean 'channels'")
    bad.write_text("epochs: many\n")
    code, _, err = run(
        capsys, "train", "--train", files / "train.xyz", "--config", bad, "--out", tmp_path / "r"
    )
    _assert_user_error(code, err, "epochs", "integer")
    bad.write_text("- just\n- a list\n")
    code, _, err = run(
        capsys, "train", "--train", files / "train.xyz", "--config", bad, "--out", tmp_path / "r"
    )
    _assert_user_error(code, err, "key: value")


def test_bad_flags(files, tmp_path, capsys):
    code, _, err = run(
        capsys, "train", "--train", files / "train.xyz", "--out", tmp_path / "r", "--epochs", "x"
    )
    assert code == 2 and "epochs" in err
    code, _, err = run(
        capsys, "train", "--train", files / "train.xyz", "--out", tmp_path / "r", "--long-range", "coulomb"
    )
    assert code == 2 and "long-range" in err
    code, _, err = run(
        capsys,
        "train",
        "--train",
        files / "train.xyz",
        "--out",
        tmp_path / "r",
        "--energy-key",
        "REF_energy",
        "--config",
        files / "tiny.yaml",
    )
    _assert_user_error(code, err, "REF_energy")


def test_epochs_zero_names_no_model_file(files, tmp_path, capsys):
    code, out, err = run(
        capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml", "--out", tmp_path / "r",
        "--epochs", 0,
    )
    assert code == 0, err
    assert not (tmp_path / "r" / "model.pt").exists()
    assert "model.pt" not in out and "no model file was written" in out
    # the statistics line prints the shift as a number a reader can use (no 2.4e-14)
    line = next(ln for ln in err.splitlines() if ln.startswith("statistics from"))
    assert "e-" not in line.split("shift")[1]


def test_help_texts_say_what_flags_do(capsys):
    for command in ("train", "evaluate", "demo"):
        code, out, _ = run(capsys, command, "--help")
        text = " ".join(out.split())
        assert ("--progress, --no-progress progress bars" if command == "train" else "--no-progress turn off") \
            in text, command
        assert "(default: None)" not in text, command
        for option in text.split(" --"):  # one default per option's help
            assert option.count("(default:") <= 1, (command, option)
    # defaults of 0 and 1 are shown too (they compared equal to False / True and were left out)
    code, out, _ = run(capsys, "demo", "--help")
    text = " ".join(out.split())
    assert "--seed SEED random seed (default: 0)" in text and "model) (default: 1)" in text


def test_config_python_yaml_and_flags_agree(files, tmp_path):
    from cartlorem.config import Config

    cfg = Config.from_yaml(files / "tiny.yaml")
    assert cfg == Config(**{k: v for k, v in yaml.safe_load((files / "tiny.yaml").read_text()).items()})
    assert cfg.model_kwargs()["channels"] == 8 and cfg.model_kwargs()["long_range"] is None
    weights = cfg.train_kwargs()["weights"]
    assert cfg.train_kwargs()["batch_size"] == 4 and (weights["energy"], weights["forces"]) == (10.0, 1.0)
    cfg.replace(species=[29, 47]).to_yaml(tmp_path / "c.yaml")
    back = Config.from_yaml(tmp_path / "c.yaml")
    assert back == cfg.replace(species=[29, 47])
    model = cfg.build_model([29, 47])
    assert {k: model.config[k] for k in cfg.model_kwargs()} == {**cfg.model_kwargs(), "long_range_options": {}}
    with pytest.raises(ValueError, match="did you mean 'batch_size'"):
        Config.from_dict({"batch_sise": 3})
    with pytest.raises(ValueError, match="lr must be > 0"):
        Config(lr=0)
    for setting, value, rule in [("clip_grad", 0.0, "> 0"), ("scheduler_factor", 1.0, "in \\(0, 1\\)"),
                                 ("scheduler_patience", -1, ">= 0"), ("patience", 0, ">= 1"),
                                 ("valid_batch_size", 0, ">= 1"), ("weight_decay", -0.1, ">= 0"),
                                 ("ema_decay", 1.0, "in \\[0, 1\\)")]:
        with pytest.raises(ValueError, match=f"{setting} must be {rule}"):
            Config(**{setting: value})
    assert Config(clip_grad=None, patience=None, ema_decay=None, valid_batch_size=None).clip_grad is None


@needs_compiled_step
def test_train_compile_flag_reaches_the_trainer(files, tmp_path, capsys, caplog, eager_compiled_step):
    """--compile trains through the compiled step (here its function run eagerly: compiling takes minutes;
    tests/test_compiled_training.py compiles it) and is recorded in config.yaml."""
    import logging

    calls = eager_compiled_step
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="cartlorem.training"):
        code, out, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                             "--out", run_dir, "--epochs", 1, "--compile", "--no-progress")
    assert code == 0, err
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["compile"] is True
    assert len(calls) >= 2  # every training batch
    assert "compiling the training step" in caplog.text + err + out


def test_demo_checks_its_arguments_before_training(files, tmp_path, capsys):
    """--channels 0 failed deep inside the first training step (a division by zero); --timestep 0 and a negative
    --temperature were refused only after the whole training and evaluation had run."""
    args = ("demo", "--data", files / "train.xyz", "--epochs", 1, "--md-steps", 2, "--no-progress")
    code, _, err = run(capsys, *args, "--out", tmp_path / "d0", "--channels", 0)
    _assert_user_error(code, err, "channels must be an integer >= 1")
    for flag, value in (("--timestep", 0), ("--temperature", -5)):
        out = tmp_path / f"d{flag}"
        code, _, err = run(capsys, *args, "--out", out, "--channels", 8, flag, value)
        _assert_user_error(code, err, flag)
        assert not (out / "model.pt").exists()  # refused before the training
    # run_demo in Python: an infinite temperature or timestep and a fractional step count passed these checks and
    # failed in the MD after the training had run and written its files
    import math

    from cartlorem.demo import run_demo

    for bad in ({"temperature": math.inf}, {"timestep": math.inf}, {"md_steps": 2.5}, {"epochs": math.nan}):
        out = tmp_path / f"py{sorted(bad)[0]}"
        with pytest.raises(ValueError, match=sorted(bad)[0].replace("_", "-")):
            run_demo(str(out), data=str(files / "train.xyz"), channels=8, progress=False, say=lambda line: None,
                     **{"epochs": 1, "md_steps": 2, **bad})
        assert not out.exists()


def test_demo_refuses_one_structure_before_training(tmp_path, capsys):
    """With one structure there is nothing to test on: the demo trained first and only then failed with "no
    structures to evaluate"."""
    ase.io.write(tmp_path / "one.xyz", emt_frames(1, seed=2))
    out = tmp_path / "demo"
    code, _, err = run(capsys, "demo", "--data", tmp_path / "one.xyz", "--out", out, "--epochs", 1, "--md-steps", 2,
                       "--channels", 4, "--no-progress")
    _assert_user_error(code, err, "one.xyz", "1 structure", "at least 2")
    assert not (out / "model.pt").exists()


def test_demo_with_an_empty_data_path_is_an_error(tmp_path, capsys):
    """`--data ""` (an unset shell variable) trained on the bundled set without a word."""
    code, _, err = run(capsys, "demo", "--data", "", "--out", tmp_path / "demo", "--epochs", 1, "--md-steps", 2,
                       "--channels", 4, "--no-progress")
    _assert_user_error(code, err, "data file '' does not exist")
    assert not (tmp_path / "demo").exists()


def test_evaluate_with_an_empty_model_path_says_it_does_not_exist(files, tmp_path, capsys):
    """--model= (an unset shell variable) was called 'a folder, not a file' (Path('') is '.')."""
    code, _, err = run(capsys, "evaluate", "--model=", "--data", files / "test.xyz", "--no-progress")
    _assert_user_error(code, err, "model file '' does not exist")
    # empty output names: evaluate wrote nothing and said nothing, export said "could not write : Is a directory"
    model = _untrained_model_file(tmp_path)
    for flag in ("--json=", "--predictions=", "--parity="):
        code, _, err = run(capsys, "evaluate", "--model", model, "--data", files / "test.xyz", flag, "--no-progress")
        _assert_user_error(code, err, f"{flag[:-1]} was given an empty file name")
    code, _, err = run(capsys, "export", model, "")
    _assert_user_error(code, err, "the output file was given an empty name")


def test_demo_says_what_labels_it_reads(tmp_path, capsys):
    """A file without force labels: the demo passed on read_dataset's advice, "Choose another forces_key, or leave
    'forces' out of require", options the demo does not have."""
    frames = emt_frames(4, seed=3)
    for a in frames:
        a.calc.results.pop("forces")
    ase.io.write(tmp_path / "energies.xyz", frames)
    code, _, err = run(capsys, "demo", "--data", tmp_path / "energies.xyz", "--out", tmp_path / "demo", "--epochs", 1,
                       "--md-steps", 2, "--channels", 4, "--no-progress")
    _assert_user_error(code, err, "no 'forces' label", "energies and forces of a calculator", "--forces-key")
    assert "Choose another" not in err


def test_demo_without_validation_set_says_training_set(tmp_path, capsys):
    """Two structures: one to test, one to train and no validation set; the summary called the training-set
    metrics of the best epoch "(validation)" right after the note that there is no validation set."""
    ase.io.write(tmp_path / "two.xyz", emt_frames(2, seed=2))
    code, out, err = run(capsys, "demo", "--data", tmp_path / "two.xyz", "--out", tmp_path / "demo", "--epochs", 1,
                         "--md-steps", 2, "--channels", 4, "--no-progress")
    assert code == 0, err
    summary = next(line for line in out.splitlines() if "best epoch" in line)
    assert "(training set: no validation set)" in summary and "(validation)" not in summary


def test_demo_md_skips_a_structure_charged_by_info_charge(tmp_path, capsys):
    """The MD runs on the largest neutral test structure; it read only info["total_charge"], while the graphs (and
    the calculator) also take info["charge"], so a structure charged that way counted as neutral."""
    from cartlorem.data import read_dataset, split

    frames = emt_frames(20, seed=3)
    _, test_idx = split(len(frames), 0.1, seed=0)  # the demo's test split
    assert len(test_idx) == 2
    largest = max(test_idx, key=lambda k: (len(frames[k]), -k))
    frames[largest].info["charge"] = 1
    ase.io.write(tmp_path / "data.xyz", frames)
    code, out, err = run(capsys, "demo", "--data", tmp_path / "data.xyz", "--out", tmp_path / "demo", "--epochs", 1,
                         "--md-steps", 2, "--channels", 4, "--no-progress")
    assert code == 0, err
    other = int(test_idx[test_idx != largest][0])
    assert f"frame {other} of the data, a test structure)" in out
    from cartlorem.demo import md_structure

    graphs = read_dataset(frames, 3.0)
    assert md_structure(graphs, test_idx) == other


def _untrained_model_file(tmp_path):
    from cartlorem import CartLorem, save_model

    torch.manual_seed(0)
    model = CartLorem([29, 47], cutoff=3.0, long_range=None, channels=4, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8)
    save_model(model, tmp_path / "model.pt")
    return tmp_path / "model.pt"


def test_evaluate_writes_predictions_where_it_says(files, tmp_path, capsys):
    """numpy's writer added .npz to a name without it, while the command reported the name as given."""
    import numpy as np

    model = _untrained_model_file(tmp_path)
    target = tmp_path / "predictions.out"
    code, out, err = run(capsys, "evaluate", "--model", model, "--data", files / "test.xyz", "--predictions", target,
                         "--no-progress")
    assert code == 0, err
    assert f"predictions written to {target}" in out
    assert target.is_file() and not (tmp_path / "predictions.out.npz").exists()
    with np.load(target) as saved:
        assert saved["energy_pred"].shape == (5,) and np.all(np.isfinite(saved["forces_pred"]))


def test_every_path_of_evaluate_demo_and_export_expands_the_home_folder(files, tmp_path, capsys, monkeypatch):
    """The shell leaves '~' in --json=~/m.json; train expanded it, but evaluate wrote a folder named '~' in the
    current one (and said "written to ~/m.json"), and export did not find '~/model.pt'."""
    import shutil

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    shutil.copy(_untrained_model_file(tmp_path), home / "model.pt")
    shutil.copy(files / "test.xyz", home / "test.xyz")
    code, out, err = run(capsys, "evaluate", "--model=~/model.pt", "--data=~/test.xyz", "--json=~/m.json",
                         "--predictions=~/p.npz", "--no-progress")
    assert code == 0, err
    assert (home / "m.json").is_file() and (home / "p.npz").is_file() and not (tmp_path / "~").exists()
    code, out, err = run(capsys, "export", "~/model.pt", "~/model.ts")
    assert code == 0, err
    assert (home / "model.ts").is_file()
    code, out, err = run(capsys, "export", "~/model.pt/", "~/exported/")  # an input's slash is dropped, as before;
    assert code != 0 and "names a folder, not a file" in err  # an output's names a folder (a file was made)
    assert not (home / "exported").exists()
    from cartlorem.cli import build_parser

    demo = build_parser().parse_args(["demo", "--out=~/demo_run", "--data=~/test.xyz"])
    assert (demo.out, demo.data) == (str(home / "demo_run"), str(home / "test.xyz"))


def test_evaluate_files_say_which_model_and_data_they_score(files, tmp_path, capsys, monkeypatch):
    """evaluate's JSON and npz files held numbers only: which model scored which data was nowhere in them, so a
    folder of results could not be traced back (or a result for a model retrained since told apart)."""
    import hashlib
    import json

    import numpy as np

    model = _untrained_model_file(tmp_path)
    code, _, err = run(capsys, "evaluate", "--model", model, "--data", files / "test.xyz", "--json",
                       tmp_path / "m.json", "--predictions", tmp_path / "p.npz", "--energy-key", "none",
                       "--dtype", "float32", "--no-progress")
    assert code == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    with np.load(tmp_path / "p.npz") as saved:
        assert json.loads(str(saved["inputs"])) == m["inputs"]
    inputs = m["inputs"]
    assert inputs["model"] == str(model.resolve()) and inputs["data"] == str((files / "test.xyz").resolve())
    assert inputs["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert inputs["data_sha256"] == hashlib.sha256((files / "test.xyz").read_bytes()).hexdigest()
    assert inputs["label_keys"]["energy_key"] is None and inputs["label_keys"]["forces_key"] == "calc"
    assert inputs["dtype"] == "float32" and m["n_energy"] == 0
    # the bytes scored, not the file after scoring: a run that saves a new best model meanwhile replaces it
    import cartlorem.model as model_module

    original, load = model.read_bytes(), model_module.load_model

    def load_then_replaced(path, *args, **kwargs):
        loaded = load(path, *args, **kwargs)
        model.write_bytes(original + b"\0")  # another file under the name, once it was read
        return loaded

    monkeypatch.setattr(model_module, "load_model", load_then_replaced)
    code, _, err = run(capsys, "evaluate", "--model", model, "--data", files / "test.xyz", "--json",
                       tmp_path / "m2.json", "--no-progress")
    assert code == 0, err
    recorded = json.loads((tmp_path / "m2.json").read_text())["inputs"]["model_sha256"]
    assert recorded == hashlib.sha256(original).hexdigest()


def test_evaluate_reports_each_config_type_as_mace_does(files, tmp_path, capsys):
    """MACE's evaluation gives a table per config_type (bulk, surface, ...); cartlorem's gave one for the whole set,
    so a class of structures the model fails on was averaged away. Each type's metrics are those of its frames
    scored alone; a frame without a config_type is 'Default'; one type gives the one table."""
    import json

    from cartlorem.data import read_dataset
    from cartlorem.evaluate import metrics, predict
    from cartlorem.model import load_model

    model = _untrained_model_file(tmp_path)
    frames = ase.io.read(files / "test.xyz", ":")
    for k, kind in ((0, "bulk"), (2, "bulk"), (3, "surface")):
        frames[k].info["config_type"] = kind
    ase.io.write(tmp_path / "typed.xyz", frames)
    code, out, err = run(capsys, "evaluate", "--model", model, "--data", tmp_path / "typed.xyz", "--json",
                         tmp_path / "m.json", "--no-progress")
    assert code == 0, err
    by_type = json.loads((tmp_path / "m.json").read_text())["by_config_type"]
    assert list(by_type) == ["Default", "bulk", "surface"]
    assert "config_type bulk:" in out and "config_type surface:" in out
    loaded = load_model(model)
    for kind, members in (("Default", (1, 4)), ("bulk", (0, 2)), ("surface", (3,))):
        alone = metrics(predict(loaded, read_dataset([frames[k] for k in members], 3.0, require=())))
        assert by_type[kind].keys() == alone.keys()
        for key, value in alone.items():
            assert by_type[kind][key] == pytest.approx(value, rel=1e-5, abs=1e-9), (kind, key)  # float32 batches
    assert by_type["bulk"]["n_structures"] == 2 and by_type["surface"]["n_atoms"] == len(frames[3])
    code, out, err = run(capsys, "evaluate", "--model", model, "--data", files / "test.xyz", "--json",
                         tmp_path / "one.json", "--no-progress")
    assert code == 0 and "config_type" not in out and "by_config_type" not in (tmp_path / "one.json").read_text()


def test_evaluate_writes_a_nan_metric_as_null(files, tmp_path, capsys, monkeypatch):
    """A model that diverged gives NaN metrics, which json.dumps wrote as `NaN`: not JSON (jq, JavaScript and
    strict parsers reject the file). Non-finite metrics are now null. The table showed them as "n/a", as for a
    quantity without labels, and the command ended with status 0: it shows nan / inf and ends with status 1."""
    import math

    from cartlorem import evaluate

    real_metrics = evaluate.metrics

    def diverged(preds):
        m = real_metrics(preds)
        m["energy_mae_mev_per_atom"], m["forces_rmse_mev_per_a"] = math.nan, math.inf
        return m

    monkeypatch.setattr(evaluate, "metrics", diverged)
    target = tmp_path / "m.json"
    code, out, err = run(capsys, "evaluate", "--model", _untrained_model_file(tmp_path), "--data", files / "test.xyz",
                         "--json", target, "--no-progress")
    assert code == 1 and "energy, forces predictions are not finite" in err, err
    assert "nan" in out and "inf" in out and "n/a" not in out, out

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    m = json.loads(target.read_text(), parse_constant=refuse)
    assert m["energy_mae_mev_per_atom"] is None and m["forces_rmse_mev_per_a"] is None
    assert m["n_structures"] == 5 and math.isfinite(m["forces_mae_mev_per_a"])
    assert evaluate.metrics_json({"a": math.nan, "n": 3, "b": 1.5}) == '{\n  "a": null,\n  "n": 3,\n  "b": 1.5\n}\n'


def test_outputs_do_not_overwrite_the_inputs(files, tmp_path, capsys):
    """`cartlorem export m.pt m.pt` replaced the trained model with its TorchScript export, and `evaluate --json` (or
    --predictions, --parity) named like the model or the data overwrote them, without a word. Each is refused up
    front, also through a symbolic or hard link, and the inputs keep their bytes."""
    import os
    import shutil

    model = _untrained_model_file(tmp_path)
    data = tmp_path / "test.xyz"
    shutil.copy(files / "test.xyz", data)
    (tmp_path / "link.pt").symlink_to(model)
    os.link(data, tmp_path / "hard.xyz")
    before = {p: p.read_bytes() for p in (model, data)}
    evaluate = ("evaluate", "--model", model, "--data", data, "--no-progress")
    for flag, target, names in (("--json", model, ("--json", "model file")),
                                ("--json", tmp_path / "link.pt", ("--json", "model file")),
                                ("--predictions", data, ("--predictions", "data file")),
                                ("--parity", tmp_path / "hard.xyz", ("--parity", "data file"))):
        code, _, err = run(capsys, *evaluate, flag, target)
        _assert_user_error(code, err, *names, "overwrite")
    code, _, err = run(capsys, *evaluate, "--json", tmp_path / "out", "--predictions", tmp_path / "out")
    _assert_user_error(code, err, "--json and --predictions")
    for target in (model, tmp_path / "link.pt", f"{tmp_path}/./model.pt"):
        code, _, err = run(capsys, "export", model, target)
        _assert_user_error(code, err, "model file", "overwrite")
    assert {p: p.read_bytes() for p in (model, data)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.xyz", "link.pt", "model.pt", "test.xyz"]


def test_export_to_a_folder_or_a_new_folder(tmp_path, capsys):
    """A folder as the target left a temporary file beside it and said only "[Errno 21]"; a file in a folder
    that does not exist yet failed with a traceback (save_model makes the folder)."""
    model = _untrained_model_file(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    code, _, err = run(capsys, "export", model, folder)
    _assert_user_error(code, err, "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "out"] and not any(folder.iterdir())
    nested = tmp_path / "new" / "sub" / "exported.pt"
    code, _, err = run(capsys, "export", model, nested)
    assert code == 0, err
    assert [p.name for p in nested.parent.iterdir()] == ["exported.pt"]
    assert torch.jit.load(str(nested)) is not None


def test_evaluate_reads_labels_with_the_keys_the_model_was_trained_with(files, tmp_path, capsys):
    """A model trained with --energy-key / --forces-key was evaluated with the default keys ('calc'), found no labels
    and scored nothing; now evaluate takes the keys of the run's config.yaml unless flags say otherwise."""
    def renamed(frames):
        for a in frames:
            a.info["REF_energy"] = a.get_potential_energy()
            a.arrays["REF_forces"] = a.get_forces()
            a.calc = None
        return frames

    ase.io.write(tmp_path / "train.xyz", renamed(emt_frames(12, seed=0, periodic_every=100)))
    ase.io.write(tmp_path / "test.xyz", renamed(emt_frames(5, seed=1, periodic_every=100)))
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--train", tmp_path / "train.xyz", "--config", files / "tiny.yaml", "--out",
                       run_dir, "--epochs", 1, "--energy-key", "REF_energy", "--forces-key", "REF_forces",
                       "--no-progress")
    assert code == 0, err
    evaluate = ("evaluate", "--model", run_dir / "model.pt", "--data", tmp_path / "test.xyz", "--no-progress",
                "--json")
    code, out, err = run(capsys, *evaluate, tmp_path / "m.json")
    assert code == 0, err
    assert "label keys of the run that trained the model" in out and "--energy-key REF_energy" in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_energy"] == 5 and m["n_forces"] == 5 and m["energy_mae_mev_per_atom"] is not None
    # a flag wins over the run's key; 'none' turns a label off
    code, out, err = run(capsys, *evaluate, tmp_path / "m2.json", "--energy-key", "none")
    assert code == 0, err
    m = json.loads((tmp_path / "m2.json").read_text())
    assert m["n_energy"] == 0 and m["n_forces"] == 5 and "--energy-key REF_energy" not in out
    # a model file away from its run folder: the defaults, as before
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "model.pt").write_bytes((run_dir / "model.pt").read_bytes())
    code, out, err = run(capsys, "evaluate", "--model", tmp_path / "alone" / "model.pt", "--data",
                         tmp_path / "test.xyz", "--no-progress", "--json", tmp_path / "m3.json")
    assert code == 0, err
    assert json.loads((tmp_path / "m3.json").read_text())["n_energy"] == 0 and "no energy or force labels" in err


def test_an_empty_label_key_is_refused(files, tmp_path, capsys):
    """--energy-key '' (an unset shell variable) trained without an energy term; evaluate --forces-key '' ended in a
    traceback (argparse.ArgumentTypeError from inside the command)."""
    from cartlorem import CartLorem, save_model

    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", tmp_path / "run", "--energy-key", "")
    _assert_user_error(code, err, "--energy-key", "'none'")
    assert not (tmp_path / "run").exists()
    save_model(CartLorem([29, 47], cutoff=3.0, channels=4, long_range=None), tmp_path / "m.pt")
    for flag in ("--forces-key", "--dipole-key"):
        code, _, err = run(capsys, "evaluate", "--model", tmp_path / "m.pt", "--data", files / "test.xyz", flag, "")
        _assert_user_error(code, err, flag, "'none'")
    code, out, err = run(capsys, "evaluate", "--model", tmp_path / "m.pt", "--data", files / "test.xyz",
                         "--forces-key", "none")
    assert code == 0, err


def test_a_cutoff_the_neighbour_list_refuses_is_a_clear_error(files, tmp_path, capsys):
    """--cutoff 1e-6 ended in a traceback from vesin ("RuntimeError: cutoff is too small")."""
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", tmp_path / "run", "--cutoff", 1e-6)
    _assert_user_error(code, err, "cutoff 1e-06", "frame 0")


def test_yes_no_options_are_overridden_by_a_flag_both_ways(files, tmp_path, capsys):
    """`compile: true` or `progress: false` in a config (or a resumed run's config.yaml) could not be undone by a
    flag: --no-compile and --progress did not exist."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "compile": True, "progress": False, "epochs": 0}))
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", config, "--out", tmp_path / "r",
                       "--no-compile", "--progress")
    assert code == 0, err
    written = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert written["compile"] is False and written["progress"] is True


def test_config_takes_what_the_flags_take():
    """`species: 29` in YAML and a Path in Python were refused, while `--species 29` and read_dataset(Path) work;
    a malformed CUDA device string passed the checks and failed inside torch."""
    from pathlib import Path

    from cartlorem.config import Config
    from cartlorem.training.job import select_device

    assert Config.from_dict({"species": 29}).species == [29]
    assert Config(train=Path("data") / "train.xyz").train == str(Path("data") / "train.xyz")
    for bad in ("cuda:abc", "cudax"):
        with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
            select_device(bad)


def test_evaluate_names_a_given_key_that_no_structure_holds(files, tmp_path, capsys):
    """--forces-key REF_F (a misspelling) scored no forces and said nothing while the energies were labelled."""
    from cartlorem import CartLorem, save_model

    save_model(CartLorem([29, 47], cutoff=3.0, channels=4, long_range=None), tmp_path / "m.pt")
    code, _, err = run(capsys, "evaluate", "--model", tmp_path / "m.pt", "--data", files / "test.xyz",
                       "--forces-key", "REF_F")
    assert code == 0, err
    assert "forces label under --forces-key REF_F" in err, err
    code, _, err = run(capsys, "evaluate", "--model", tmp_path / "m.pt", "--data", files / "test.xyz")
    assert code == 0 and "label under" not in err, err


def test_demo_names_a_structure_the_long_range_block_cannot_take_by_its_frame(tmp_path, capsys):
    """A wire in the demo's data was named by its place in the training subset ("training structure 21")."""
    frames = emt_frames(12, seed=3)
    wire = [k for k, a in enumerate(frames) if a.pbc.all()][-1]
    frames[wire].pbc = [True, False, False]
    ase.io.write(tmp_path / "wire.xyz", frames)
    code, _, err = run(capsys, "demo", "--data", tmp_path / "wire.xyz", "--out", tmp_path / "demo", "--epochs", 1,
                       "--md-steps", 2, "--channels", 4, "--long-range", "multipole", "--no-progress")
    _assert_user_error(code, err, f"wire.xyz, frame {wire} has pbc = [True, False, False]")


def test_evaluate_reads_each_key_of_the_run_on_its_own(files, tmp_path, capsys):
    """A config.yaml of an older run with energy_key '' (which meant no label) made evaluate drop every key of the
    run, REF_forces too, and score other labels without a word."""
    from cartlorem import CartLorem, save_model

    frames = emt_frames(5, seed=1)
    for a in frames:
        a.arrays["REF_forces"] = a.get_forces() + 0.5
    ase.io.write(tmp_path / "ref.xyz", frames)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_model(CartLorem([29, 47], cutoff=3.0, channels=4, long_range=None), run_dir / "model.pt")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**TINY_CONFIG, "energy_key": "", "forces_key": "REF_forces"}))
    code, out, err = run(capsys, "evaluate", "--model", run_dir / "model.pt", "--data", tmp_path / "ref.xyz")
    assert code == 0, err
    assert "--forces-key REF_forces" in out + err and "--energy-key none" in out + err, out + err


def test_evaluate_writes_the_file_types_its_names_say(files, tmp_path, capsys):
    """--predictions pred.xyz wrote npz bytes (ase.io.read failed on it) and --parity par.pdf PNG bytes, with exit
    status 0. A .xyz / .extxyz name now gets the data's frames with the predictions beside the references, a plot
    the type of its suffix, and another plot suffix is refused before the model runs."""
    import numpy as np

    model = _untrained_model_file(tmp_path)
    evaluate = ("evaluate", "--model", model, "--data", files / "test.xyz", "--no-progress")
    code, out, err = run(capsys, *evaluate, "--predictions", tmp_path / "p.npz", "--parity", tmp_path / "p.pdf")
    assert code == 0, err
    assert (tmp_path / "p.pdf").read_bytes().startswith(b"%PDF")
    code, out, err = run(capsys, *evaluate, "--predictions", tmp_path / "p.xyz", "--parity", tmp_path / "p.svg")
    assert code == 0, err
    assert b"<svg" in (tmp_path / "p.svg").read_bytes()
    frames, given = ase.io.read(tmp_path / "p.xyz", ":"), ase.io.read(files / "test.xyz", ":")
    with np.load(tmp_path / "p.npz") as saved:
        start = np.concatenate([[0], np.cumsum(saved["n_atoms"])])
        for k, (atoms, ref) in enumerate(zip(frames, given)):
            assert atoms.info["cartlorem_energy"] == pytest.approx(saved["energy_pred"][k], rel=1e-12)
            # (extxyz writes per-atom numbers with 8 decimals)
            np.testing.assert_allclose(atoms.arrays["cartlorem_forces"], saved["forces_pred"][start[k]:start[k + 1]],
                                       atol=1e-8)
            assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), rel=1e-12)  # kept
            np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), atol=1e-8)
            if np.isfinite(saved["stress_pred"][k]).all():
                np.testing.assert_allclose(np.reshape(atoms.info["cartlorem_stress"], (3, 3)), saved["stress_pred"][k],
                                           rtol=1e-8, atol=1e-12)
            else:
                assert "cartlorem_stress" not in atoms.info
    assert any("cartlorem_stress" in a.info for a in frames)
    # evaluated again on that file without stress: no stress of the first run is left under this run's name
    code, _, err = run(capsys, "evaluate", "--model", model, "--data", tmp_path / "p.xyz", "--no-progress",
                       "--stress-key", "none", "--predictions", tmp_path / "again.xyz")
    assert code == 0, err
    assert not any("cartlorem_stress" in a.info for a in ase.io.read(tmp_path / "again.xyz", ":"))
    code, _, err = run(capsys, "evaluate", "--model", model, "--data", tmp_path / "p.xyz", "--no-progress",
                       "--energy-key", "cartlorem_energy", "--predictions", tmp_path / "again2.xyz")
    _assert_user_error(code, err, "references are read from cartlorem_energy")
    code, _, err = run(capsys, *evaluate, "--parity", tmp_path / "p.jpg")
    _assert_user_error(code, err, "p.jpg", ".png, .pdf or .svg")
    assert not (tmp_path / "p.jpg").exists()


def test_auto_resume_starts_a_run_then_continues_it(files, tmp_path, capsys):
    """torchrun --max-restarts (or a scheduler's requeue) runs the same command line again: with --resume a first
    start was refused (no checkpoint), without it every restart was ("already holds a training run").
    --auto-resume starts the run, then continues it from its checkpoint."""
    run_dir = tmp_path / "run"
    argv = ["train", "--train", files / "train.xyz", "--config", files / "tiny.yaml", "--out", run_dir,
            "--no-progress", "--auto-resume"]
    code, _, err = run(capsys, *argv, "--epochs", 1)
    assert code == 0, err
    assert len((run_dir / "log.csv").read_text().strip().splitlines()) == 2
    code, _, err = run(capsys, *argv, "--epochs", 2)  # the restart: the same command, a later epoch limit
    assert code == 0, err
    assert len((run_dir / "log.csv").read_text().strip().splitlines()) == 3  # epoch 1 kept, epoch 2 added
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] == 2
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 2 and "--auto-resume decides whether to resume by itself: it does not go with --overwrite" in err
    # a config file that says 'overwrite: true' (for the first start) does not stop a restart from resuming
    config = tmp_path / "overwrite.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "overwrite": True}))
    argv[argv.index(files / "tiny.yaml")] = config
    code, _, err = run(capsys, *argv, "--epochs", 3)
    assert code == 0, err
    assert len((run_dir / "log.csv").read_text().strip().splitlines()) == 4
    # a crash in the first epoch between model.pt and checkpoint.pt: a restart starts afresh (it was refused for the
    # model.pt, with advice to pass --overwrite, which --auto-resume refuses)
    (run_dir / "checkpoint.pt").unlink()
    code, _, err = run(capsys, *argv, "--epochs", 1)
    assert code == 0, err
    assert len((run_dir / "log.csv").read_text().strip().splitlines()) == 2
