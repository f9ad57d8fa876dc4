"""`cartlorem train` starts that are refused, contradictory or resumed: what is on disk must survive a refusal, and
a resume must continue the run that is there (or say why it does not)."""

import shutil

import ase.io
import pytest
import yaml

from conftest import emt_frames, run_cli as run  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

TINY = {"channels": 4, "num_layers": 1, "correlation": 1, "num_basis": 4, "radial_hidden": 4, "readout_hidden": 4,
        "cutoff": 3.0, "long_range": "none", "epochs": 1, "batch_size": 4, "threads": 1, "progress": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    frames = emt_frames(8, seed=0)
    ase.io.write(d / "train.xyz", frames)
    bare = [a.copy() for a in frames[:2]]  # no calculator: no labels
    ase.io.write(d / "unlabelled.xyz", bare)
    ase.io.write(d / "clusters.xyz", [a for a in frames if not a.pbc.any()])  # no stress labels
    (d / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return d


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """A finished one-epoch run (no EMA, so that a resume can ask for one); copy it before changing it."""
    from cartlorem import cli

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    code = cli.main(["train", "--train", str(files / "train.xyz"), "--config", str(files / "tiny.yaml"),
                     "--out", str(run_dir), "--ema-decay", "0"])
    assert code == 0
    return run_dir


def _copy(run_dir, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(run_dir, dest)
    return dest


def _contents(run_dir):
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


@pytest.mark.parametrize("flags, says", [
    (["--dipole-weight", 1], "no long range"),
    (["--energy-weight", -1], "energy_weight must be >= 0"),
    (["--energy-weight", 0, "--forces-weight", 0, "--stress-weight", 0], "every loss weight is 0"),
    (["--cutoff", 0.5], "no two atoms"),
    (["--valid", "clusters.xyz", "--energy-weight", 0, "--forces-weight", 0], "validation structures carries"),
])
def test_a_refused_overwrite_leaves_the_previous_run_as_it_was(files, trained, tmp_path, capsys, flags, says):
    """--overwrite removed the old run's checkpoint, model, log and plot (and rewrote config.yaml) before the checks
    of the data and settings and the statistics had run: a refused start deleted the run it did not replace."""
    run_dir = _copy(trained, tmp_path)
    before = _contents(run_dir)
    assert {"checkpoint.pt", "model.pt", "log.csv", "config.yaml"} <= set(before)
    flags = [files / f if str(f).endswith(".xyz") else f for f in flags]
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", run_dir, "--overwrite", *flags)
    assert code == 2 and says in err and "Traceback" not in err, err
    assert _contents(run_dir) == before


@pytest.mark.parametrize("flags, says", [
    (["--ema-decay", 0.99], "--ema-decay 0"),
    (["--dipole-weight", 1], "no long range"),
    (["--valid", "unlabelled.xyz"], "another split"),
    # the checkpoint's learning rate and random state go on: config.yaml recorded the new value, unused
    (["--lr", 0.1], "lr 0.005 → 0.1"),
])
def test_a_refused_resume_leaves_the_run_config_as_it_was(files, trained, tmp_path, capsys, flags, says):
    """config.yaml was rewritten with the new settings before train() refused them (EMA state, loss weights), so
    a plain --resume then read those settings and was refused too."""
    run_dir = _copy(trained, tmp_path)
    before = _contents(run_dir)
    flags = [files / f if str(f).endswith(".xyz") else f for f in flags]
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2, *flags)
    assert code == 2 and says in err and "Traceback" not in err, err
    assert _contents(run_dir) == before
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2)
    assert code == 0, err


def _all_copper(atoms):
    """``atoms`` with every atom made Cu, relabelled with EMT."""
    from conftest import emt_labelled

    a = atoms.copy()
    a.symbols[:] = "Cu"
    return emt_labelled(a)


def test_a_species_only_in_the_validation_set_is_refused(files, tmp_path, capsys):
    """Species were taken from the training and validation sets together: an element only in the validation set
    joined the model with a reference energy of 0 eV (fitted on the training set) and was never trained."""
    frames = emt_frames(8, seed=0)
    ase.io.write(tmp_path / "copper.xyz", [_all_copper(a) for a in frames])
    code, _, err = run(capsys, "train", "--train", tmp_path / "copper.xyz", "--valid", files / "train.xyz",
                       "--config", files / "tiny.yaml", "--out", tmp_path / "run")
    assert code == 2 and "contains Ag" in err and "never be trained on Ag" in err, err
    assert not (tmp_path / "run").exists()


def test_a_split_that_puts_a_species_in_the_validation_set_alone_is_refused(files, tmp_path, capsys):
    from cartlorem.data import split

    frames = emt_frames(8, seed=0)
    _, valid = split(len(frames), 0.25, seed=0)
    silver = next(a for a in frames if "Ag" in a.get_chemical_symbols())
    data = [silver if k == valid[0] else _all_copper(a) for k, a in enumerate(frames)]  # Ag only where it validates
    ase.io.write(tmp_path / "data.xyz", data)
    code, _, err = run(capsys, "train", "--train", tmp_path / "data.xyz", "--valid-fraction", 0.25,
                       "--config", files / "tiny.yaml", "--out", tmp_path / "run")
    assert code == 2 and "--valid-fraction 0.25 split" in err and "--seed" in err and "Ag" in err, err


def test_contradictory_flags_are_refused(files, trained, tmp_path, capsys):
    """--resume --overwrite resumed (overwrite ignored) and --valid with --valid-fraction ignored the fraction,
    both without a word."""
    run_dir = _copy(trained, tmp_path)
    before = _contents(run_dir)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--overwrite", "--epochs", 2)
    assert code == 2 and "--resume and --overwrite contradict" in err, err
    assert _contents(run_dir) == before
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--valid", files / "train.xyz",
                       "--valid-fraction", 0.5, "--config", files / "tiny.yaml", "--out", tmp_path / "new")
    assert code == 2 and "contradict" in err and "--valid-fraction" in err, err
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({**TINY, "valid": str(files / "train.xyz"),
                                                        "valid_fraction": 0.3}))
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", tmp_path / "both.yaml",
                       "--out", tmp_path / "new")
    assert code == 2 and "valid_fraction 0.3" in err and "contradict" in err, err
    assert not (tmp_path / "new").exists()


def test_train_refuses_resume_with_overwrite(trained, tmp_path):
    from cartlorem import load_model
    from cartlorem.data import read_dataset
    from cartlorem.training import train

    run_dir = _copy(trained, tmp_path)
    before = _contents(run_dir)
    graphs = read_dataset(emt_frames(4, seed=0), 3.0)
    with pytest.raises(ValueError, match="resume and overwrite contradict"):
        train(load_model(run_dir / "model.pt"), graphs, out_dir=run_dir, resume=True, overwrite=True,
              progress=False)
    assert _contents(run_dir) == before


def test_a_failed_write_is_a_clear_error_with_the_resume_hint(trained, tmp_path, capsys, monkeypatch):
    """A full disk or a file-size limit ended `cartlorem train` in a chain of raw tracebacks (cli.main caught only
    some OSError subclasses, and torch.save wraps the OSError in a RuntimeError)."""
    import errno

    import torch

    run_dir = _copy(trained, tmp_path)
    checkpoint = (run_dir / "checkpoint.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2)
    assert code == 1 and "Traceback" not in err, err
    assert f"error: could not write {run_dir}" in err and ".pt: No space left on device" in err, err
    assert f"the training run in {run_dir}" in err and "--resume" in err, err
    assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint


def test_an_interrupt_offers_the_resume_of_a_run_whose_folder_the_config_names(files, tmp_path, capsys, monkeypatch):
    """After Ctrl-C main looked for the run folder in args.out, which only a --out flag sets: with 'out' in the
    --config file it said "interrupted" and nothing of the checkpoint to resume from."""
    import cartlorem.training.job as job

    def interrupted(cfg, given=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run", interrupted)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "out.yaml").write_text(yaml.safe_dump({**TINY, "out": str(tmp_path / "r")}))
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", tmp_path / "out.yaml")
    assert code == 130 and "continues with --resume" in err and str(tmp_path / "r") in err, err


@pytest.mark.parametrize("harm", ["missing", "damaged"])
def test_a_missing_model_file_is_written_again_on_resume(trained, tmp_path, capsys, harm):
    """model.pt missing next to checkpoint.pt (deleted, or not copied along): a resume never wrote it again though
    the checkpoint holds the best weights (only a better epoch would), and the summary said no epoch was trained.
    A model.pt with a flipped bit in a weight (torch.load reads it without a word) was kept."""
    import zipfile

    import torch

    from cartlorem import load_model
    from test_loading import _flip_a_bit_in

    run_dir = _copy(trained, tmp_path)
    if harm == "missing":
        (run_dir / "model.pt").unlink()
    else:
        with zipfile.ZipFile(run_dir / "model.pt") as archive:
            record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        _flip_a_bit_in(run_dir / "model.pt", record.filename)
    code, out, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 1)
    assert code == 0, err
    assert "no epoch was trained" not in out and f"model: {run_dir / 'model.pt'}" in out, out
    assert f"model.pt was {harm}" in err, err
    best = torch.load(run_dir / "checkpoint.pt", weights_only=True)["best_state_dict"]
    model = load_model(run_dir / "model.pt")
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert torch.load(run_dir / "model.pt", weights_only=True)["training"]["epoch"] == 1


def test_without_a_validation_set_the_metrics_are_called_training_metrics(files, tmp_path, capsys):
    """With no validation set the best model is selected on the training set, but the summary said "(validation)"
    and model.pt stored the training-set metrics as valid_metrics."""
    import torch

    code, out, err = run(capsys, "train", "--train", files / "train.xyz", "--valid-fraction", 0,
                         "--config", files / "tiny.yaml", "--out", tmp_path / "run")
    assert code == 0, err
    assert "(training set: no validation set)" in out and "(validation)" not in out, out
    training = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["training"]
    assert "valid_metrics" not in training and "valid_loss" not in training
    assert training["epoch"] == 1 and training["training_set_metrics"]["n_structures"] == 8
    # log.csv's valid_* columns hold these training-set metrics, and say so
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [r["metrics_on"] for r in rows] == ["training"] * len(rows) and rows


def _as_older_cartlorem(ckpt_path, model_format, drop=("charge_state", "long_range_options")):
    """Rewrite a checkpoint as an older cartlorem wrote it: its model entry in ``model_format``, without the options
    that did not exist then; long-range couplings in the one-parameter layout of formats v1 and v2."""
    import torch

    ckpt = torch.load(ckpt_path, weights_only=True)
    saved = ckpt["model"]
    saved["format"] = model_format
    saved["config"] = {k: v for k, v in saved["config"].items() if k not in drop}
    torch.save(ckpt, ckpt_path)


def test_a_checkpoint_of_an_older_cartlorem_resumes(trained, tmp_path, capsys):
    """Its model file loaded, but the resume compared the file's options as stored: an option the older cartlorem
    did not have (charge_state, long_range_options) was a "different model", and the run could not go on."""
    import torch

    from cartlorem import load_model

    run_dir = _copy(trained, tmp_path)
    _as_older_cartlorem(run_dir / "checkpoint.pt", "cartlorem-model-v2")
    assert load_model(run_dir / "checkpoint.pt").config["charge_state"] is False
    code, out, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2)
    assert code == 0, err
    assert "stopped after epoch 2" in out
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]["format"] == "cartlorem-model-v5"


def test_a_long_range_checkpoint_of_format_v2_is_refused_with_the_reason(files, tmp_path, capsys):
    """Its couplings were one parameter; the weights convert, the optimiser's moments do not: a clear refusal, not a
    size mismatch from inside the optimiser."""
    import torch

    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--long-range", "multipole", "--out", run_dir, "--ema-decay", "0")
    assert code == 0, err
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for key in ("train_state_dict", "best_state_dict"):
        state = ckpt[key]
        a0 = state.pop("long_range_block.coupling_channel0")
        state["long_range_block.coupling"] = torch.cat([a0.reshape(1), state.pop("long_range_block.coupling_others")])
    torch.save(ckpt, run_dir / "checkpoint.pt")
    _as_older_cartlorem(run_dir / "checkpoint.pt", "cartlorem-model-v2")
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2)
    assert code == 2 and "Traceback" not in err, err
    assert "older cartlorem" in err and "cartlorem-model-v2" in err and "optimiser" in err, err


def test_structures_the_long_range_block_cannot_take_are_refused_before_anything_is_written(
        files, trained, tmp_path, capsys):
    """A wire (pbc T, F, F) or a slab thicker than its c was refused only inside the first training step: after
    --overwrite had removed the previous run, and named by its place in the batch, not in the file."""
    import torch

    from cartlorem import CartLorem
    from cartlorem.data import read_dataset
    from cartlorem.train import train

    frames = emt_frames(12, seed=3)
    cells = [k for k, a in enumerate(frames) if a.pbc.all()]
    wire = cells[-1]
    frames[wire].pbc = [True, False, False]
    ase.io.write(tmp_path / "wire.xyz", frames)
    run_dir = _copy(trained, tmp_path)
    before = _contents(run_dir)
    code, _, err = run(capsys, "train", "--train", tmp_path / "wire.xyz", "--config", files / "tiny.yaml",
                       "--long-range", "multipole", "--out", run_dir, "--overwrite")
    assert code == 2 and "Traceback" not in err, err
    assert f"wire.xyz, frame {wire} has pbc = [True, False, False]" in err, err
    assert _contents(run_dir) == before
    # evaluate names the frame too
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--long-range", "multipole", "--out", tmp_path / "lr")
    assert code == 0, err
    code, _, err = run(capsys, "evaluate", "--model", tmp_path / "lr" / "model.pt", "--data", tmp_path / "wire.xyz")
    assert code == 2 and f"wire.xyz, frame {wire} has pbc" in err, err
    # the library's train() checks before it writes, naming the structure of the list it was given
    graphs = read_dataset(tmp_path / "wire.xyz", 3.0)
    model = CartLorem(species=[29, 47], channels=4, num_layers=1, correlation=1, num_basis=4, radial_hidden=4,
                      readout_hidden=4, cutoff=3.0, long_range="multipole").to(torch.float64)
    with pytest.raises(ValueError, match=f"training structure {wire} has pbc"):
        train(model, graphs, epochs=1, batch_size=4, out_dir=tmp_path / "lib", progress=False)
    assert not (tmp_path / "lib").exists()


def test_a_frame_without_forces_gets_advice_for_the_command_line(tmp_path, capsys):
    """The CLI appended its hint to read_dataset's advice, which named a Python argument ("require") that no flag
    sets."""
    frames = emt_frames(6, seed=1)
    del frames[2].calc.results["forces"]
    ase.io.write(tmp_path / "part.xyz", frames)
    code, _, err = run(capsys, "train", "--train", tmp_path / "part.xyz", "--out", tmp_path / "run", "--epochs", 1)
    assert code == 2 and "frame 2: no 'forces' label" in err, err
    assert "require" not in err.replace("require=", "") and "--forces-key none" in err, err


def test_a_resume_with_another_seed_is_refused_where_the_split_does_not_use_it(files, tmp_path, capsys):
    """With a validation file the seed does not split the data, and a resume takes the checkpoint's random state:
    --seed was accepted, unused, and written to config.yaml."""
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--valid", files / "train.xyz",
                       "--config", files / "tiny.yaml", "--out", run_dir)
    assert code == 0, err
    before = _contents(run_dir)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2, "--seed", 7)
    assert code == 2 and "seed 0 → 7" in err and "Traceback" not in err, err
    assert _contents(run_dir) == before


def test_a_python_run_resumed_from_the_command_line_records_the_rate_it_goes_on_with(files, tmp_path, capsys):
    """A run started from Python has no config.yaml; resumed with --lr 0.5 it went on at the checkpoint's rate, and
    the config.yaml written then said 0.5."""
    import torch

    from cartlorem import CartLorem
    from cartlorem.data import read_dataset
    from cartlorem.train import train

    model = CartLorem(species=[29, 47], channels=4, num_layers=1, correlation=1, num_basis=4, radial_hidden=4,
                      readout_hidden=4, cutoff=3.0, long_range=None).to(torch.float64)
    run_dir = tmp_path / "run"
    train(model, read_dataset(files / "train.xyz", 3.0), epochs=1, batch_size=4, lr=0.01, seed=3, out_dir=run_dir,
          progress=False)
    assert not (run_dir / "config.yaml").exists()
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", run_dir, "--resume", "--epochs", 2, "--lr", 0.5, "--valid-fraction", 0,
                       "--no-progress")
    assert code == 0, err
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["lr"] == 0.01 and written["seed"] == 3, written
    # a warning: the --lr the user typed is not used, which --no-progress (notes off) hid
    assert "go on from the checkpoint" in err, err


def test_a_long_range_checkpoint_of_format_v3_without_charge_channels_resumes(files, tmp_path, capsys):
    """Format v3 files written before charge_channels was stored meant every channel; filled in as None, the resume
    compared None with the model's number of channels and refused a "different model"."""
    import torch

    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--long-range", "multipole", "--out", run_dir, "--ema-decay", "0")
    assert code == 0, err
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    ckpt["model"]["format"] = "cartlorem-model-v3"
    options = ckpt["model"]["config"]["long_range_options"]
    ckpt["model"]["config"]["long_range_options"] = {k: v for k, v in options.items() if k != "charge_channels"}
    torch.save(ckpt, run_dir / "checkpoint.pt")
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    written["long_range_options"] = {k: v for k, v in (written.get("long_range_options") or {}).items()
                                     if k != "charge_channels"}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(written))
    code, out, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2)
    assert code == 0, err
    assert "stopped after epoch 2" in out


def test_isolated_atoms_stay_in_the_training_split():
    """A random --valid-fraction split put isolated-atom frames into validation for some seeds (18 of 100 in a
    review), and their elements' reference energies went back to the least-squares fit; they all stay in training
    now, and a set without them is split as before."""
    import numpy as np
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from cartlorem.config import Config
    from cartlorem.data import is_isolated_atom, read_dataset, split
    from cartlorem.training.job import _split

    frames = emt_frames(12, seed=1)
    plain = read_dataset(frames, 3.0)
    for symbol, energy in (("Cu", -0.3), ("Ag", -0.2)):
        atom = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
        atom.calc = SinglePointCalculator(atom, energy=energy, forces=np.zeros((1, 3)))
        frames.insert(5, atom)
    graphs = read_dataset(frames, 3.0)
    for seed in range(30):
        cfg = Config(valid_fraction=0.3, seed=seed)
        train, valid = _split(graphs, cfg)
        assert sum(map(is_isolated_atom, train)) == 2 and not any(map(is_isolated_atom, valid))
        assert len(train) + len(valid) == len(graphs)
        tr, va = split(plain, 0.3, seed=seed)
        train, valid = _split(plain, cfg)
        assert [g.positions.tolist() for g in valid] == [plain[k].positions.tolist() for k in va]


def test_structures_given_twice_are_warned_of(files, tmp_path, capsys):
    """A training file concatenated with itself, or a validation file that holds training structures, trained
    without a word: the copies count again in the loss, and a validation loss on trained structures picks the best
    model and stops the run."""
    frames = ase.io.read(files / "train.xyz", ":")
    ase.io.write(tmp_path / "twice.xyz", frames + frames[:3])
    ase.io.write(tmp_path / "valid.xyz", [frames[6], frames[2]])
    code, _, err = run(capsys, "train", "--train", tmp_path / "twice.xyz", "--config", files / "tiny.yaml",
                       "--out", tmp_path / "a", "--valid-fraction", 0.5)
    assert code == 0, err
    assert "repeats 3 structure(s) exactly (frame 8 = frame 0, frame 9 = frame 1, frame 10 = frame 2)" in err, err
    assert "copies of training structures into validation" in err, err
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", tmp_path / "b", "--valid", tmp_path / "valid.xyz")
    assert code == 0, err
    assert "2 structure(s) of the validation set" in err and "frame 0 = training frame 6" in err, err
    assert "repeats" not in err, err
    # a structure moved by 1e-6 Å is another structure
    frames[2].positions[0, 0] += 1e-6
    ase.io.write(tmp_path / "valid.xyz", frames[2:3])
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", tmp_path / "c", "--valid", tmp_path / "valid.xyz")
    assert code == 0, err
    assert "validation set" not in err and "repeats" not in err, err


def test_the_command_line_in_a_program_with_logging_prints_each_line_once(files, tmp_path, capsys):
    """cli.main() inside a program whose root logger has a handler printed every cartlorem line twice (its own
    handler's, and the root's, which also broke the progress bar)."""
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    root = logging.getLogger()
    keep = Keep(level=logging.DEBUG)
    root.addHandler(keep)
    try:
        code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                           "--out", tmp_path / "run")
    finally:
        root.removeHandler(keep)
    assert code == 0, err
    assert "epoch" in err and not [r for r in records if r.name.startswith("cartlorem")], records[:3]
    assert logging.getLogger("cartlorem").propagate


def test_threads_hold_for_the_call_only(files, tmp_path, capsys):
    """--threads (and Config.threads in Python) set torch's thread count for the rest of the process: a program
    that called cli.main(["demo"]) or job.run(...) went on with one thread."""
    import torch

    from cartlorem.config import Config
    from cartlorem.training.job import run as run_job

    torch.set_num_threads(2)
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", tmp_path / "a", "--threads", 1)
    assert code == 0, err
    assert torch.get_num_threads() == 2
    cfg = Config.from_yaml(files / "tiny.yaml").replace(train=str(files / "train.xyz"), out=str(tmp_path / "b"),
                                                       threads=1)
    run_job(cfg)
    assert torch.get_num_threads() == 2
    code, _, err = run(capsys, "evaluate", "--model", tmp_path / "a" / "model.pt", "--data", files / "train.xyz",
                       "--threads", 1, "--no-progress")
    assert code == 0, err
    assert torch.get_num_threads() == 2


def _write_a_then_b_spoiled(frames, tmp_path, energies=(), forces=()):
    """a.xyz: ``frames``; b.xyz: the same with the energies of frames ``energies`` 50 eV off and the forces of
    frames ``forces`` 3 eV/Å off (labels that, weighted 0, must change nothing)."""
    ase.io.write(tmp_path / "a.xyz", frames)
    for k in energies:
        frames[k].calc.results["energy"] = frames[k].get_potential_energy() + 50.0
    for k in forces:
        frames[k].calc.results["forces"] = frames[k].get_forces() + 3.0
    ase.io.write(tmp_path / "b.xyz", frames)


def _models_of_a_and_b(files, tmp_path, capsys, *flags):
    """([model file of a.xyz, of b.xyz], [stderr of each]): one-epoch runs, no validation split."""
    import torch

    states, errs = [], []
    for name in ("a", "b"):
        code, _, err = run(capsys, "train", "--train", tmp_path / f"{name}.xyz", "--config", files / "tiny.yaml",
                           "--out", tmp_path / f"run_{name}", "--valid-fraction", 0, "--epochs", 1, *flags)
        assert code == 0, err
        states.append(torch.load(tmp_path / f"run_{name}" / "model.pt", weights_only=True))
        errs.append(err)
    return states, errs


def test_a_frame_weighted_0_is_left_out_of_training(files, tmp_path, capsys):
    """MACE's config_weight 0 leaves a frame out of the fit; cartlorem trained on it as on any other. Its labels
    now change nothing (loss and statistics; one epoch: the validation loss, here on the training set and
    unweighted, picks no epoch), and a set weighted 0 throughout is refused."""
    import torch

    frames = ase.io.read(files / "train.xyz", ":")
    frames[3].info["config_weight"] = 0.0
    _write_a_then_b_spoiled(frames, tmp_path, energies=(3,), forces=(3,))
    states, errs = _models_of_a_and_b(files, tmp_path, capsys)
    assert not any("config_weight" in err for err in errs), errs
    for key, value in states[0]["state_dict"].items():
        assert torch.equal(value, states[1]["state_dict"][key]), key
    for atoms in frames:
        atoms.info["config_weight"] = 0
    ase.io.write(tmp_path / "c.xyz", frames)
    code, _, err = run(capsys, "train", "--train", tmp_path / "c.xyz", "--config", files / "tiny.yaml",
                       "--out", tmp_path / "run_c")
    assert code == 2 and "has weight 0" in err and "Traceback" not in err, err


def test_a_validation_set_weighted_0_throughout_is_refused(files, tmp_path, capsys):
    """check_labels_to_fit counted the labels of frames weighted 0, which the validation loss leaves out: a
    validation set weighted 0 throughout (config_weight, or --config-type-weights giving its types 0) trained with a
    validation loss of 0 every epoch, kept epoch 1 as the best model and early-stopped there, exit status 0."""
    frames = ase.io.read(files / "train.xyz", ":")
    for atoms in frames[6:]:
        atoms.info["config_weight"] = 0.0
    ase.io.write(tmp_path / "t.xyz", frames[:6])
    ase.io.write(tmp_path / "v.xyz", frames[6:])
    code, _, err = run(capsys, "train", "--train", tmp_path / "t.xyz", "--valid", tmp_path / "v.xyz",
                       "--config", files / "tiny.yaml", "--out", tmp_path / "run_w0")
    assert code == 2 and "no loss to select the best model by" in err and "Traceback" not in err, err
    for atoms in frames:
        atoms.info.pop("config_weight", None)
        atoms.info["config_type"] = "bulk"
    for atoms in frames[6:]:
        atoms.info["config_type"] = "held_out"
    ase.io.write(tmp_path / "t.xyz", frames[:6])
    ase.io.write(tmp_path / "v.xyz", frames[6:])
    code, _, err = run(capsys, "train", "--train", tmp_path / "t.xyz", "--valid", tmp_path / "v.xyz",
                       "--config", files / "tiny.yaml", "--out", tmp_path / "run_types",
                       "--config-type-weights", '{"bulk": 1.0, "held_out": 0.0}')
    assert code == 2 and "no loss to select the best model by" in err and "Traceback" not in err, err
    assert "config_weight times config_type_weights" in err
    # the training set weighted 0 by its type: the message named only atoms.info['config_weight'], not in the file
    code, _, err = run(capsys, "train", "--train", tmp_path / "t.xyz", "--valid", tmp_path / "v.xyz",
                       "--config", files / "tiny.yaml", "--out", tmp_path / "run_types",
                       "--config-type-weights", '{"bulk": 0.0, "held_out": 1.0}')
    assert code == 2 and "training structures has weight 0" in err and "--config-type-weights" in err, err


def test_a_config_type_in_the_other_file_is_not_warned_of(files, tmp_path, capsys):
    """read_dataset warned per file of the types --config-type-weights names that the file lacks: with training and
    validation files of different types, each file's warning named the other's type as one that 'no frame has'.
    A run now warns once, of the types neither file has."""
    frames = ase.io.read(files / "train.xyz", ":")
    for k, atoms in enumerate(frames):
        atoms.info["config_type"] = "bulk" if k < 6 else "held_out"
    ase.io.write(tmp_path / "t.xyz", frames[:6])
    ase.io.write(tmp_path / "v.xyz", frames[6:])
    code, _, err = run(capsys, "train", "--train", tmp_path / "t.xyz", "--valid", tmp_path / "v.xyz",
                       "--config", files / "tiny.yaml", "--out", tmp_path / "run", "--epochs", 1,
                       "--config-type-weights", '{"bulk": 1.0, "held_out": 2.0, "surface": 3.0}')
    assert code == 0, err
    lines = [line for line in err.splitlines() if "that no frame has" in line]
    assert len(lines) == 1 and "t.xyz and " in lines[0] and "v.xyz" in lines[0], err
    assert "names config type(s) 'surface' that no frame has (the frames' types: 'bulk', 'held_out')" in lines[0]


def test_the_run_records_its_validation_frames_and_a_resume_keeps_them(files, tmp_path, capsys, monkeypatch):
    """Which frames a --valid-fraction split put into validation was nowhere on disk, and a resume drew the split
    again: a cartlorem whose split rule had changed (as it did for isolated atoms) trained on structures the run
    had validated on, without a word. data.json records them, a resume keeps them, and a training file with
    other contents (here a frame more) is refused."""
    import json

    import numpy as np

    from cartlorem.data import read_dataset, split
    from cartlorem.training import job

    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--valid-fraction", 0.25, "--seed", 3, "--out", run_dir)
    assert code == 0, err
    record = json.loads((run_dir / "data.json").read_text())
    assert record["frames"] == 8 and record["validation"] == split(8, 0.25, seed=3)[1].tolist() == [6, 7]

    seen = {}
    real_train = job.train

    def spy(model, train_graphs, valid_graphs, **kwargs):
        seen["valid"] = [g.positions.tolist() for g in valid_graphs]
        seen["train"] = len(train_graphs)
        return real_train(model, train_graphs, valid_graphs, **kwargs)

    def another_rule(graphs_or_len, valid_fraction, seed):  # as a later cartlorem might draw it
        return np.arange(2, 8), np.arange(2)

    monkeypatch.setattr(job, "train", spy)
    monkeypatch.setattr(job, "split", another_rule)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2)
    assert code == 0, err
    assert "validation frames recorded in data.json" in err
    graphs = read_dataset(str(files / "train.xyz"), 3.0)
    assert seen == {"valid": [graphs[k].positions.tolist() for k in (6, 7)], "train": 6}
    assert json.loads((run_dir / "data.json").read_text())["validation"] == [6, 7]

    monkeypatch.setattr(job, "split", split)
    longer = tmp_path / "longer"
    shutil.copytree(run_dir, longer)
    grown = tmp_path / "train.xyz"
    ase.io.write(grown, ase.io.read(files / "train.xyz", ":") + emt_frames(1, seed=5))
    config = yaml.safe_load((longer / "config.yaml").read_text())
    config["train"] = str(grown)
    (longer / "config.yaml").write_text(yaml.safe_dump(config))
    before = _contents(longer)
    code, _, err = run(capsys, "train", "--out", longer, "--resume", "--epochs", 3)
    assert code == 2 and "contents changed" in err and "Traceback" not in err, err
    assert _contents(longer) == before


def test_config_type_weights_weigh_the_frames_as_mace_does(files, tmp_path, capsys, caplog):
    """MACE's --config_type_weights (a weight per atoms.info config_type, 'Default' for a frame without one) had no
    counterpart: a MACE user's set trained its down-weighted frames at full weight. A type weighted 0 now changes
    nothing (here: its labels), the weights multiply config_weight, and a type no frame has is warned of."""
    import logging

    import torch

    from cartlorem.data import read_dataset

    frames = ase.io.read(files / "train.xyz", ":")
    for k in (2, 5):
        frames[k].info["config_type"] = "noise"
    frames[6].info["config_type"] = "bulk"
    frames[6].info["config_weight"] = 3.0
    with caplog.at_level(logging.WARNING, logger="cartlorem.data"):
        graphs = read_dataset(frames, 3.0, config_type_weights={"Default": 0.5, "noise": 0.0, "bulk": 2.0,
                                                                "surface": 4.0})
    assert [float(g.weight[0]) for g in graphs] == [0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 6.0, 0.5]
    assert "'surface' that no frame has" in caplog.text and "'Default', 'bulk', 'noise'" in caplog.text
    assert all(g.weight is None for g in read_dataset(frames[:6], 3.0))  # neither given: unweighted
    with pytest.raises(ValueError, match=r"config_type_weights\['bulk'\] must be a finite number >= 0"):
        read_dataset(frames, 3.0, config_type_weights={"bulk": -1.0})

    _write_a_then_b_spoiled(frames, tmp_path, energies=(2, 5), forces=(2, 5))
    states, _ = _models_of_a_and_b(files, tmp_path, capsys, "--config-type-weights", '{"noise": 0.0, "bulk": 2.0}')
    assert all(torch.equal(value, states[1]["state_dict"][key]) for key, value in states[0]["state_dict"].items())
    written = yaml.safe_load((tmp_path / "run_a" / "config.yaml").read_text())
    assert written["config_type_weights"] == {"noise": 0.0, "bulk": 2.0}
    code, _, err = run(capsys, "train", "--train", tmp_path / "a.xyz", "--config", files / "tiny.yaml",
                       "--out", tmp_path / "run_c", "--config-type-weights", "noise=0")
    assert code == 2 and "expected a mapping" in err and "Traceback" not in err, err


def test_a_label_weighted_0_changes_nothing(files, tmp_path, capsys):
    """MACE's config_energy_weight / config_forces_weight 0 leave that label of the frame out of the fit; cartlorem
    warned and trained on it. Now such a label changes nothing: the loss, and the reference energies and statistics
    (an energy 50 eV off, forces 3 eV/Å off)."""
    import torch

    frames = ase.io.read(files / "train.xyz", ":")
    frames[2].info["config_energy_weight"] = 0.0
    frames[5].info["config_forces_weight"] = 0.0
    _write_a_then_b_spoiled(frames, tmp_path, energies=(2,), forces=(5,))
    states, errs = _models_of_a_and_b(files, tmp_path, capsys)
    assert not any("does not use" in err for err in errs), errs
    for key, value in states[0]["state_dict"].items():
        assert torch.equal(value, states[1]["state_dict"][key]), key
    assert states[0]["config"] == states[1]["config"]  # the statistics (scale, shift, neighbours) too


def test_a_resume_with_other_data_under_the_same_name_or_another_dtype_is_refused(files, tmp_path, capsys):
    """A training or validation file rewritten under the same name was resumed without a word (a reviewer's
    validation loss went from 0.81 to 915, and the best epoch, chosen on the old set, stayed for good); so was
    --dtype float32 on a float64 run (config.yaml then recorded float32 for the whole run). Both are refused now;
    the same file resumes."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    for name, seed in (("train", 0), ("valid", 1)):
        ase.io.write(data / f"{name}.xyz", emt_frames(8, seed=seed))
    for flags in ([], ["--valid", data / "valid.xyz"]):
        run_dir = tmp_path / f"run{len(flags)}"
        code, _, err = run(capsys, "train", "--train", data / "train.xyz", "--config", files / "tiny.yaml", "--out",
                           run_dir, *flags)
        assert code == 0, err
        record = json.loads((run_dir / "data.json").read_text())
        assert (record["valid_sha256"] is None) == (not flags) and len(record["train_sha256"]) == 64
        code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2, "--dtype", "float32")
        assert code == 2 and "dtype 'float64' → 'float32'" in err and "Traceback" not in err, err
        changed = "valid" if flags else "train"
        original = (data / f"{changed}.xyz").read_bytes()
        ase.io.write(data / f"{changed}.xyz", emt_frames(8, seed=7))  # as many frames, other structures
        before = _contents(run_dir)
        code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2)
        what = "validation" if flags else "training"
        assert code == 2 and f"the {what} file" in err and "contents changed" in err and "Traceback" not in err, err
        assert _contents(run_dir) == before
        (data / f"{changed}.xyz").write_bytes(original)
        code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 2)
        assert code == 0, err


def test_a_resume_repairs_what_a_killed_run_left(trained, tmp_path, capsys):
    """A run killed (SIGKILL) between writing the checkpoint and log.csv left log.csv an epoch short for good, and
    one killed inside a write left its half-written temporary file in the run folder, also after --resume and
    --overwrite. A resume writes log.csv from the checkpoint, and opening the folder removes the temporaries."""
    import torch

    run_dir = _copy(trained, tmp_path)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 3)
    assert code == 0, err
    rows = (run_dir / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 4  # a header and three epochs
    (run_dir / "log.csv").write_text("\n".join(rows[:-1]) + "\n")  # as a kill after the checkpoint of epoch 3 left it
    (run_dir / ".tmp-abc123.pt").write_bytes(b"half a checkpoint")
    (run_dir / ".tmp-notes.txt").write_text("not ours")
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", 3)  # nothing left to train
    assert code == 0, err
    assert (run_dir / "log.csv").read_text().strip().splitlines() == rows
    history = torch.load(run_dir / "checkpoint.pt", weights_only=True)["history"]
    assert len(history) == 3
    assert not (run_dir / ".tmp-abc123.pt").exists() and (run_dir / ".tmp-notes.txt").exists()


def test_the_statistics_line_names_where_the_scale_came_from(files, tmp_path, capsys):
    """Without force labels the scale is the spread of the energy per atom (eV/atom), but the line called it the
    force RMS in eV/Å."""
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", tmp_path / "run", "--epochs", 1, "--forces-key", "none")
    assert code == 0, err
    line = next(line for line in err.splitlines() if "statistics from" in line)
    assert "(no forces: spread of the energy per atom, eV/atom)" in line and "force RMS" not in line, line
    code, _, err = run(capsys, "train", "--train", files / "train.xyz", "--config", files / "tiny.yaml",
                       "--out", tmp_path / "run_f", "--epochs", 1)
    assert code == 0 and "(force RMS, eV/Å)" in err, err
