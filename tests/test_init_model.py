"""Fine-tuning: `cartlorem train --init-model MODEL` starts from a trained model (architecture, weights, statistics),
and `--refit-reference-energies` corrects its per-element reference energies for data of another code."""

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from conftest import emt_frames, emt_labelled, run_cli as run  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

TINY = {"channels": 4, "num_layers": 1, "correlation": 1, "num_basis": 4, "radial_hidden": 4, "readout_hidden": 4,
        "cutoff": 3.0, "long_range": "none", "epochs": 1, "batch_size": 4, "threads": 1, "progress": False}
SHIFT = {"Cu": 1.5, "Ag": -0.7}  # eV per atom: the same structures computed with "another code"


def _shifted(frames, shift):
    out = []
    for a in frames:
        b = a.copy()
        res = {k: v for k, v in a.calc.results.items() if k in ("energy", "forces", "stress")}
        res["energy"] = res["energy"] + sum(shift[s] for s in b.get_chemical_symbols())
        b.calc = SinglePointCalculator(b, **res)
        out.append(b)
    return out


def _with_gold(frames, fraction=0.4, seed=0):
    """``frames`` with a share of the atoms turned into gold, labelled by EMT (stress for periodic cells)."""
    rng, out = np.random.default_rng(seed), []
    for a in frames:
        a = a.copy()
        if len(a) > 1:
            a.symbols[rng.random(len(a)) < fraction] = "Au"
        else:
            a.symbols[0] = "Au"
        out.append(emt_labelled(a))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    first, second = emt_frames(12, seed=0), emt_frames(12, seed=1)
    ase.io.write(d / "first.xyz", first)
    ase.io.write(d / "second.xyz", second)
    ase.io.write(d / "first_shifted.xyz", _shifted(first, SHIFT))
    gold = [a.copy() for a in second[:4]]
    for a in gold:
        a.symbols[0] = "Au"
        a.calc = SinglePointCalculator(a, energy=0.0, forces=np.zeros((len(a), 3)))
    ase.io.write(d / "with_gold.xyz", gold)
    ase.io.write(d / "gold_emt.xyz", _with_gold(emt_frames(12, seed=5)))
    ase.io.write(d / "gold_atom.xyz", _with_gold([Atoms("Au", positions=[[0.0, 0.0, 0.0]])]))
    (d / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return d


@pytest.fixture(scope="module")
def pretrained(files, tmp_path_factory):
    """A model trained one epoch on first.xyz."""
    from cartlorem import cli

    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    assert cli.main(["train", "--train", str(files / "first.xyz"), "--config", str(files / "tiny.yaml"),
                     "--out", str(run_dir)]) == 0
    return run_dir / "model.pt"


def _load(path):
    from cartlorem import load_model

    return load_model(path)


def test_a_fine_tuning_run_starts_from_the_model_and_keeps_its_statistics(files, pretrained, tmp_path, capsys):
    """Without --init-model there was no way to train a trained model further on new data from the command line:
    every run started from random weights, with statistics fitted to its own data."""
    from cartlorem.data import read_dataset
    from cartlorem.training import fit_statistics

    start = _load(pretrained)
    out = tmp_path / "ft"
    # a learning rate this small leaves the weights where they start, to float64 rounding
    code, _, err = run(capsys, "train", "--train", files / "second.xyz", "--init-model", pretrained, "--out", out,
                       "--lr", 1e-12, "--epochs", 1, "--batch-size", 4, "--threads", 1, "--no-progress")
    assert code == 0, err
    tuned = _load(out / "model.pt")
    assert tuned.config == start.config  # architecture and statistics: the model's, not the new data's
    before, after = start.state_dict(), tuned.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-8, atol=1e-10, msg=k)
    # the same data give a fresh run other statistics: the test would see them had they been refitted
    fresh = _load(pretrained)
    fit_statistics(fresh, read_dataset(files / "second.xyz", start.cutoff))
    assert abs(float(fresh.scale) - float(start.scale)) > 1e-3 * float(start.scale)
    assert not torch.equal(fresh.atomic_energies, start.atomic_energies)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["init_model"] == str(pretrained.resolve())
    assert {k: config[k] for k in ("channels", "cutoff", "long_range")} == {"channels": 4, "cutoff": 3.0,
                                                                            "long_range": "none"}
    from cartlorem.fileio import file_sha256
    import json

    assert json.loads((out / "data.json").read_text())["init_model_sha256"] == file_sha256(pretrained)


def test_refitted_reference_energies_take_up_a_shift_per_element(files, pretrained):
    """The corrections are a least-squares fit of what the model leaves of the labels: energies shifted by a
    constant per element shift the corrections by exactly those constants (the EMT clusters' Cu and Ag counts are
    not collinear), and the model's other weights are untouched."""
    from cartlorem.data import read_dataset
    from cartlorem.training import refit_reference_energies

    cutoff = _load(pretrained).cutoff
    plain, shifted = _load(pretrained), _load(pretrained)
    d_plain = refit_reference_energies(plain, read_dataset(files / "first.xyz", cutoff))
    d_shifted = refit_reference_energies(shifted, read_dataset(files / "first_shifted.xyz", cutoff))
    assert d_shifted[29] - d_plain[29] == pytest.approx(SHIFT["Cu"], abs=1e-8)
    assert d_shifted[47] - d_plain[47] == pytest.approx(SHIFT["Ag"], abs=1e-8)
    start = _load(pretrained)
    for z, index in ((29, 0), (47, 1)):
        assert float(shifted.atomic_energies[index]) == pytest.approx(float(start.atomic_energies[index])
                                                                     + d_shifted[z], abs=1e-10)
    kept = {k: v for k, v in start.state_dict().items() if k != "atomic_energies"}
    for k, v in kept.items():
        assert torch.equal(shifted.state_dict()[k], v), k
    # after the correction the model's energy errors on the shifted set are those on the plain set
    from cartlorem.evaluate import evaluate

    e_plain = evaluate(plain, read_dataset(files / "first.xyz", cutoff))["energy_mae_mev_per_atom"]
    e_shifted = evaluate(shifted, read_dataset(files / "first_shifted.xyz", cutoff))["energy_mae_mev_per_atom"]
    assert e_shifted == pytest.approx(e_plain, rel=1e-6, abs=1e-9)


def test_the_command_line_refit_changes_the_reference_energies_only(files, pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    code, _, err = run(capsys, "train", "--train", files / "first_shifted.xyz", "--init-model", pretrained,
                       "--refit-reference-energies", "--out", out, "--lr", 1e-12, "--epochs", 1, "--threads", 1,
                       "--no-progress")
    assert code == 0, err
    start, tuned = _load(pretrained), _load(out / "model.pt")
    shift = tuned.atomic_energies - start.atomic_energies
    assert shift.abs().max() > 0.1  # the shifts of first_shifted.xyz (plus the model's own error, fitted too)
    assert float(tuned.scale) == float(start.scale) and float(tuned.shift) == float(start.shift)


@pytest.mark.parametrize("flags, says", [
    (["--channels", 8], "channels 8 (the model's: 4)"),
    (["--long-range", "lorem"], "long_range 'lorem' (the model's: 'none')"),
    (["--species", "Cu,Ag,Au"], "species Cu, Ag, Au (the model's: Cu, Ag; --add-elements adds elements)"),
    (["--train", "with_gold.xyz"], "which the model in init_model"),
    (["--train", "with_gold.xyz"], "pass --add-elements to add them"),
    (["--add-elements", "--species", "Cu,Au"], "species Cu, Au (the model's: Cu, Ag)"),
])
def test_settings_that_contradict_the_initial_model_are_refused(files, pretrained, tmp_path, capsys, flags, says):
    flags = [files / f if str(f).endswith(".xyz") else f for f in flags]
    train = [] if "--train" in flags else ["--train", files / "second.xyz"]
    code, _, err = run(capsys, "train", *train, "--init-model", pretrained, "--out", tmp_path / "ft", "--threads", 1,
                       "--epochs", 1, *flags)
    assert code == 2 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "ft" / "model.pt").exists()


def test_options_left_at_their_defaults_take_the_models_values(files, pretrained):
    from cartlorem.config import Config
    from cartlorem.training.job import initial_model

    model, cfg = initial_model(Config(train=str(files / "second.xyz"), init_model=str(pretrained), cutoff=3.0))
    assert (cfg.channels, cfg.num_layers, cfg.long_range, cfg.cutoff) == (4, 1, "none", 3.0)
    assert cfg.species == [29, 47] and model.config["channels"] == 4


def test_refit_without_an_initial_model_is_refused(files, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--train", files / "second.xyz", "--config", files / "tiny.yaml",
                       "--refit-reference-energies", "--out", tmp_path / "r")
    assert code == 2 and "there is none" in err and "Traceback" not in err, err


def test_the_run_folders_own_model_is_not_an_initial_model(files, pretrained, tmp_path, capsys):
    """--overwrite of the folder the initial model is in would replace the model the run starts from."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(pretrained.parent, run_dir)
    before = (run_dir / "model.pt").read_bytes()
    code, _, err = run(capsys, "train", "--train", files / "second.xyz", "--init-model", run_dir / "model.pt",
                       "--out", run_dir, "--overwrite", "--threads", 1)
    assert code == 2 and "which this run writes over" in err, err
    assert (run_dir / "model.pt").read_bytes() == before


def test_a_fine_tuning_run_resumes_without_its_initial_model(files, pretrained, tmp_path, capsys):
    """The architecture is in config.yaml and the weights in the checkpoint: the initial model file is not read
    again, and another one is refused (the run started from the first)."""
    import shutil

    init = tmp_path / "init.pt"
    shutil.copy(pretrained, init)
    out = tmp_path / "ft"
    code, _, err = run(capsys, "train", "--train", files / "second.xyz", "--init-model", init, "--out", out,
                       "--epochs", 1, "--threads", 1, "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", 2, "--init-model", pretrained)
    assert code == 2 and "started from its initial model once" in err, err
    init.unlink()
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", 2)
    assert code == 0, err
    assert _load(out / "model.pt").config["channels"] == 4


@pytest.mark.parametrize("flags, says", [
    (["--long-range", "multipole"], "long_range 'multipole' (the model's: 'none')"),  # the default, asked for
    (["--cutoff", 5.0], "cutoff 5.0 (the model's: 3.0)"),
])
def test_an_explicit_default_that_contradicts_the_model_is_refused(files, pretrained, tmp_path, capsys, flags, says):
    """A flag set to the option's default was taken for "not given": `--long-range multipole` fine-tuned the
    short-range model without a word."""
    code, _, err = run(capsys, "train", "--train", files / "second.xyz", "--init-model", pretrained, "--out",
                       tmp_path / "ft", "--threads", 1, "--epochs", 1, *flags)
    assert code == 2 and says in err and "Traceback" not in err, err
    config = tmp_path / "c.yaml"  # the same from a --config file
    config.write_text(yaml.safe_dump({"long_range": "multipole"}))
    code, _, err = run(capsys, "train", "--train", files / "second.xyz", "--init-model", pretrained, "--out",
                       tmp_path / "ft", "--config", config, "--epochs", 1)
    assert code == 2 and "long_range 'multipole' (the model's: 'none')" in err, err


def test_a_validation_set_of_elements_the_model_knows_is_taken(files, pretrained, tmp_path, capsys):
    """Fine-tuning on copper alone while validating on structures with silver (is the old domain forgotten?) was
    refused as if the model had never been trained on silver."""
    cu = [a for a in emt_frames(12, seed=3) if set(a.get_chemical_symbols()) == {"Cu"}]
    mixed = [a for a in emt_frames(12, seed=4) if "Ag" in a.get_chemical_symbols()]
    assert cu and mixed
    ase.io.write(tmp_path / "cu.xyz", cu)
    ase.io.write(tmp_path / "mixed.xyz", mixed)
    code, _, err = run(capsys, "train", "--train", tmp_path / "cu.xyz", "--valid", tmp_path / "mixed.xyz",
                       "--init-model", pretrained, "--out", tmp_path / "ft", "--epochs", 1, "--threads", 1,
                       "--no-progress")
    assert code == 0, err
    # and it resumes (the check for a new model ran on resume), keeping data.json's record of the initial model
    import json

    record = json.loads((tmp_path / "ft" / "data.json").read_text())
    assert record["init_model"] == str(pretrained.resolve())
    code, _, err = run(capsys, "train", "--out", tmp_path / "ft", "--resume", "--epochs", 2)
    assert code == 0, err
    assert json.loads((tmp_path / "ft" / "data.json").read_text()) == record


def test_long_range_options_at_the_blocks_defaults_agree_with_the_model(tmp_path):
    """The model file stores the options that were set; one given at the block's default (smearing 1.0) was called
    a contradiction ("the model's: None")."""
    from cartlorem import CartLorem, save_model
    from cartlorem.config import Config
    from cartlorem.nn.long_range import long_range_option_defaults
    from cartlorem.training.job import initial_model

    save_model(CartLorem([29, 47], cutoff=3.0, channels=4, long_range="multipole"), tmp_path / "lr.pt")
    smearing = long_range_option_defaults()["smearing"]
    cfg = Config(init_model=str(tmp_path / "lr.pt"), long_range_options={"smearing": smearing})
    assert initial_model(cfg, {"long_range_options"})[1].long_range == "multipole"
    # given as None, the options resolve as the model resolved them (every channel charged, the block at the end)
    nones = {"charge_channels": None, "placement": None, "end_features": None}
    assert initial_model(Config(init_model=str(tmp_path / "lr.pt"), long_range_options=nones),
                         {"long_range_options"})[1].long_range == "multipole"
    with pytest.raises(ValueError, match=r"smearing=2.5 \(the model's: " + str(smearing)):
        initial_model(Config(init_model=str(tmp_path / "lr.pt"), long_range_options={"smearing": 2.5}),
                      {"long_range_options"})


def test_an_isolated_atom_fixes_its_elements_correction(files, pretrained):
    """As a fresh run takes an element's reference energy from its isolated-atom structure, the refit makes the
    model exact on it; the other element is fitted to what it leaves."""
    from ase import Atoms
    from cartlorem.data import read_dataset
    from cartlorem.training import refit_reference_energies

    atom = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    atom.calc = SinglePointCalculator(atom, energy=-3.25, forces=np.zeros((1, 3)))
    frames = list(ase.io.read(files / "first_shifted.xyz", ":")) + [atom]
    model = _load(pretrained)
    graphs = read_dataset(frames, model.cutoff)
    refit_reference_energies(model, graphs)
    from cartlorem.evaluate import predict

    p = predict(model, graphs[-1:])
    assert p.energy_pred[0] == pytest.approx(-3.25, abs=1e-9)


def test_an_isolated_atom_weighted_0_still_fixes_its_correction(files, pretrained):
    """A fresh run takes an isolated atom's energy whatever its config_weight (as MACE's E0s); the refit read the
    weighted labels, so an atom weighted 0 was no isolated atom and its element was fitted instead."""
    from ase import Atoms
    from cartlorem.data import read_dataset
    from cartlorem.evaluate import predict
    from cartlorem.training import refit_reference_energies

    atom = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    atom.info["config_weight"] = 0.0
    atom.calc = SinglePointCalculator(atom, energy=-3.25, forces=np.zeros((1, 3)))
    model = _load(pretrained)
    graphs = read_dataset(list(ase.io.read(files / "first_shifted.xyz", ":")) + [atom], model.cutoff)
    refit_reference_energies(model, graphs)
    assert predict(model, graphs[-1:]).energy_pred[0] == pytest.approx(-3.25, abs=1e-9)


def test_the_ground_state_of_an_isolated_atom_fixes_its_correction():
    """Two spin states of an isolated atom, for a model that tells them apart (charge_state): the correction made the
    model exact on the higher one (the lowest residual), not on the ground state a fresh run takes."""
    from ase import Atoms
    from cartlorem import CartLorem
    from cartlorem.data import read_dataset
    from cartlorem.evaluate import predict
    from cartlorem.training import refit_reference_energies

    torch.manual_seed(0)
    model = CartLorem([29], cutoff=3.0, channels=4, num_layers=1, correlation=1, long_range=None,
                      charge_state=True).double()
    frames = []
    for multiplicity, energy in ((2, -5.00), (4, -4.99)):
        a = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
        a.info["multiplicity"] = multiplicity
        a.calc = SinglePointCalculator(a, energy=energy, forces=np.zeros((1, 3)))
        frames.append(a)
    graphs = read_dataset(frames, 3.0)
    first = predict(model, graphs).energy_pred
    assert first[1] - first[0] > 0.01 + 1e-3  # so the quartet leaves the lower residual: the case that went wrong
    refit_reference_energies(model, graphs)
    assert predict(model, graphs[:1]).energy_pred[0] == pytest.approx(-5.00, abs=1e-9)


# --- adding elements (--add-elements, CartLorem.with_species) ---------------------------------------------------------

def _perturbed(model, seed=0):
    """``model`` with every weight and the reference energies moved off their initial values (float64)."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.set_statistics(atomic_energies={z: -1.0 - 0.5 * k for k, z in enumerate(model.species)}, scale=0.8,
                         shift=0.05)
    return model


@pytest.mark.parametrize("kind, options", [
    ("none", {}),
    ("multipole", {}),
    ("lorem", {"long_range_options": {"end_features": "light"}}),  # a skip shared by the species
    ("multipole", {"charge_state": True, "lmax": 1}),  # the FiLM output holds 2C rows per species
])
def test_a_model_with_added_elements_predicts_as_before_on_the_old_ones(kind, options):
    """Every species-indexed weight moves to the element's new index (nickel sorts before copper and silver, gold
    after them): on copper/silver structures, open and periodic and charged, the extended model gives the energies,
    forces, stress and charges of the model it came from, and the new element's weights are a new model's."""
    from cartlorem import CartLorem
    from cartlorem.graph import collate
    from cartlorem.data import read_dataset

    torch.manual_seed(1)
    old = _perturbed(CartLorem(["Cu", "Ag"], cutoff=3.0, channels=4, long_range=None if kind == "none" else kind,
                               **options))
    torch.manual_seed(7)
    new = old.with_species(["Au", "Cu", "Ni", "Ag"])
    assert new.species == [28, 29, 47, 79]
    frames = emt_frames(6, seed=2)
    for k, a in enumerate(frames):
        a.info["charge"] = float(k % 3 - 1) if not a.pbc.any() else 0.0
    batch = collate(read_dataset(frames, 3.0, dtype=torch.float64))
    before, after = old(batch), new(batch)
    assert set(before) == set(after)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=1e-12, atol=1e-12, msg=key)
    assert {float(e) for e in new.atomic_energies[[0, 3]]} == {0.0}
    torch.manual_seed(7)  # the same draws: the new elements' rows are those of a model built with all four
    fresh = CartLorem(**{**old.config, "species": [28, 29, 47, 79]}).double()
    torch.testing.assert_close(new.embedding[[0, 3]], fresh.embedding[[0, 3]], rtol=0, atol=0)
    torch.testing.assert_close(new.products[0].first[[0, 3]], fresh.products[0].first[[0, 3]], rtol=0, atol=0)
    torch.testing.assert_close(new.embedding[[1, 2]], old.embedding, rtol=0, atol=0)
    gold = collate(read_dataset(_with_gold(emt_frames(3, seed=3)), 3.0, dtype=torch.float64))
    assert torch.isfinite(new(gold)["forces"]).all()


def test_with_species_keeps_the_models_elements():
    from cartlorem import CartLorem

    with pytest.raises(ValueError, match="lack Ag, which the model knows"):
        CartLorem(["Cu", "Ag"], cutoff=3.0, channels=4).with_species(["Cu", "Au"])


def test_the_refit_of_some_elements_keeps_the_others(files, pretrained):
    from cartlorem.data import read_dataset
    from cartlorem.training import refit_reference_energies

    model = _load(pretrained)
    before = model.atomic_energies.clone()
    delta = refit_reference_energies(model, read_dataset(files / "first_shifted.xyz", model.cutoff), elements=["Ag"])
    assert delta[29] == 0.0 and abs(delta[47]) > 0.1
    assert float(model.atomic_energies[0]) == float(before[0])
    assert float(model.atomic_energies[1]) == pytest.approx(float(before[1]) + delta[47], abs=1e-12)
    with pytest.raises(ValueError, match="not species of the model"):
        refit_reference_energies(model, read_dataset(files / "first.xyz", model.cutoff), elements=["Au"])


def test_a_fine_tune_adds_the_elements_of_its_data(files, pretrained, tmp_path, capsys):
    """Data with an element the model does not know were refused, whatever the user wanted. With --add-elements
    the model learns gold: its copper and silver predictions start where the model's were, gold's reference energy is
    fitted (an isolated gold atom makes it exact), and the run resumes from its folder alone."""
    import shutil

    from cartlorem.data import read_dataset
    from cartlorem.evaluate import predict

    init = tmp_path / "init.pt"
    shutil.copy(pretrained, init)
    out = tmp_path / "ft"
    train = tmp_path / "train.xyz"
    ase.io.write(train, list(ase.io.read(files / "gold_emt.xyz", ":")) + list(ase.io.read(files / "gold_atom.xyz",
                                                                                           ":")))
    code, _, err = run(capsys, "train", "--train", train, "--valid", files / "first.xyz", "--init-model", init,
                       "--add-elements", "--out", out, "--lr", 1e-12, "--epochs", 1, "--threads", 1, "--no-progress")
    assert code == 0, err
    start, tuned = _load(init), _load(out / "model.pt")
    assert tuned.species == [29, 47, 79]
    assert yaml.safe_load((out / "config.yaml").read_text())["species"] == ["Cu", "Ag", "Au"]
    old_frames = read_dataset(files / "first.xyz", start.cutoff)
    np.testing.assert_allclose(predict(tuned, old_frames).energy_pred, predict(start, old_frames).energy_pred,
                               rtol=0, atol=1e-8)
    atom = read_dataset(files / "gold_atom.xyz", start.cutoff)
    assert predict(tuned, atom).energy_pred[0] == pytest.approx(float(atom[0].energy[0]), abs=1e-8)
    torch.testing.assert_close(tuned.atomic_energies[:2], start.atomic_energies, rtol=0, atol=0)
    init.unlink()
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", 2)
    assert code == 0, err
    assert _load(out / "model.pt").species == [29, 47, 79]


@pytest.mark.parametrize("flags", [["--add-elements"], ["--add-elements", "--species", "Cu,Ag,Au"], []])
def test_an_element_new_to_the_model_only_in_the_validation_set_is_refused(files, pretrained, tmp_path, capsys,
                                                                          flags):
    """Gold only in --valid would be added untrained (0 eV reference energy) and scored: --species Cu,Ag,Au got it
    past the check, and without --add-elements the message advised that flag, which then refused it."""
    code, _, err = run(capsys, "train", "--train", files / "second.xyz", "--valid", files / "gold_emt.xyz",
                       "--init-model", pretrained, *flags, "--out", tmp_path / "ft", "--epochs", 1, "--threads", 1)
    assert code == 2 and "the model would never be trained on Au" in err and "Traceback" not in err, err
    assert "--add-elements" not in err and not (tmp_path / "ft" / "model.pt").exists()


def test_a_split_that_puts_a_new_element_in_validation_says_so(files, pretrained, tmp_path, capsys):
    """The refusal told the user to leave the element out of --valid, which had not been given."""
    gold = [a for a in ase.io.read(files / "gold_emt.xyz", ":") if "Au" in a.get_chemical_symbols()][:1]
    frames = list(ase.io.read(files / "second.xyz", ":")) + gold
    ase.io.write(tmp_path / "mixed.xyz", frames)
    for seed in range(20):  # a seed whose split puts the one gold frame into validation
        code, _, err = run(capsys, "train", "--train", tmp_path / "mixed.xyz", "--init-model", pretrained,
                           "--add-elements", "--out", tmp_path / f"ft{seed}", "--epochs", 1, "--threads", 1,
                           "--seed", seed, "--valid-fraction", 0.5, "--no-progress")
        if code == 2:
            break
    assert code == 2 and "--valid-fraction 0.5 split" in err and "--valid " not in err.split("give a")[0], err


def test_add_elements_without_an_initial_model_is_refused(files, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--train", files / "second.xyz", "--config", files / "tiny.yaml",
                       "--add-elements", "--out", tmp_path / "r")
    assert code == 2 and "add_elements adds elements to the model in init_model" in err, err


def test_a_fine_tune_resumes_with_the_config_file_that_started_it(files, pretrained, tmp_path, capsys):
    """`cartlorem train --config ft.yaml --auto-resume`, run again (after a preemption, under torchrun), rebuilt the
    model from the config's options and defaults, not the initial model's: "the checkpoint was written for a
    different model (cutoff: checkpoint 3.0, model 5.0; ...)". The same with a config that restates the model's
    elements while the data lack one of them."""
    cu = [a for a in emt_frames(16, seed=3) if set(a.get_chemical_symbols()) == {"Cu"}]
    ase.io.write(tmp_path / "cu.xyz", cu)
    for name, extra in (("plain", {}), ("species", {"species": ["Cu", "Ag"], "cutoff": 3.0})):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"train": str(tmp_path / "cu.xyz"), "init_model": str(pretrained),
                                          "out": str(tmp_path / name), "epochs": 1, "batch_size": 4, "threads": 1,
                                          "progress": False, **extra}))
        code, _, err = run(capsys, "train", "--config", config, "--auto-resume")
        assert code == 0, err
        code, _, err = run(capsys, "train", "--config", config, "--auto-resume", "--epochs", 2)
        assert code == 0, err
        code, _, err = run(capsys, "train", "--config", config, "--resume", "--epochs", 3)
        assert code == 0, err
        assert len((tmp_path / name / "log.csv").read_text().splitlines()) == 4  # a header and three epochs
        assert _load(tmp_path / name / "model.pt").config["channels"] == 4
    code, _, err = run(capsys, "train", "--config", config, "--resume", "--epochs", 4, "--channels", 8)
    assert code == 2 and "channels 8 (the model's: 4)" in err and "resume" in err, err


def test_a_float32_initial_model_is_fine_tuned_in_float32(files, pretrained, tmp_path, capsys):
    """Without --dtype a float32 model was fine-tuned and saved as float64 (twice the file, slower MD), without a
    word; --dtype still chooses."""
    from cartlorem import save_model

    single = tmp_path / "single.pt"
    save_model(_load(pretrained).float(), single)
    code, _, err = run(capsys, "train", "--train", files / "second.xyz", "--init-model", single, "--out",
                       tmp_path / "ft", "--epochs", 1, "--threads", 1, "--no-progress")
    assert code == 0, err
    assert _load(tmp_path / "ft" / "model.pt").dtype == torch.float32
    assert yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["dtype"] == "float32"
    code, _, err = run(capsys, "train", "--out", tmp_path / "ft", "--resume", "--epochs", 2)
    assert code == 0, err
    code, _, err = run(capsys, "train", "--train", files / "second.xyz", "--init-model", single, "--out",
                       tmp_path / "ft64", "--epochs", 1, "--threads", 1, "--no-progress", "--dtype", "float64")
    assert code == 0, err
    assert _load(tmp_path / "ft64" / "model.pt").dtype == torch.float64
