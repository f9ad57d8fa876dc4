"""benchmarks/accuracy.py towards convergence: --patience, the stop record and learning curves, the
intermolecular force of the dimers, the cumulene torsion groups, the plateau extrapolation.

The data are made here (a few Lennard-Jones "dimers"), not read from ../shared/data."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import accuracy, harness  # noqa: E402
from conftest import needs_compiled_step  # noqa: E402  (tests/ is on sys.path under pytest)


def write_dimers(path, n=24, seed=0):
    """n two-monomer frames (H2 + OH, 2 atoms each) with Lennard-Jones energies and forces, tagged like
    ../shared/data/dimers.xyz (classes, separation, monomer_a_atoms)."""
    from ase import Atoms
    from ase.calculators.lj import LennardJones
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        d = 3.5 + 8.0 * k / (n - 1)  # 3.5 … 11.5 Å: every separation bin
        pos = np.array([[0, 0, 0], [1.12, 0, 0], [d, 0, 0], [d + 1.12, 0, 0]]) + rng.normal(0, 0.05, (4, 3))
        a = Atoms("H2OH", positions=pos)
        a.calc = LennardJones(sigma=1.0, epsilon=0.05, rc=12.0)
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        a.info.update(classes="polar-polar" if k % 2 else "apolar-apolar", separation=d, monomer_a_atoms=2)
        frames.append(a)
    write(path, frames, format="extxyz")


@pytest.mark.parametrize("bad", ["0", "-3", "two"])
def test_patience_must_be_a_positive_whole_number(bad, capsys):
    with pytest.raises(SystemExit):
        accuracy.main(["--patience", bad, "--skip-mace"])
    assert "--patience" in capsys.readouterr().err


def test_tiny_run_records_stop_reason_epochs_and_curves(tmp_path):
    write_dimers(tmp_path / "dimers.xyz")
    out = tmp_path / "converged"
    accuracy.main(["--data-dir", str(tmp_path), "--sets", "dimers", "--variants", "none,mace", "--skip-mace",
                   "--channels", "4", "--batch-size", "4", "--budget", "4", "--patience", "2", "--threads", "1",
                   "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["patience"] == 2 and data["meta"]["budget"] == 4.0
    assert data["meta"]["command"].endswith("--out " + str(out))
    r = data["results"]["dimers"]["variants"]["none"]
    assert r["stop_reason"] in ("early_stopping", "max_time")
    assert r["epochs"] == len(r["history"]) >= 1
    assert 1 <= r["best_epoch"] <= r["epochs"]
    losses = [h["valid_loss"] for h in r["history"]]
    assert r["best_valid_loss"] == pytest.approx(min(losses))
    assert [h["epoch"] for h in r["history"]] == list(range(1, r["epochs"] + 1))
    assert all(h["valid_forces_mae_mev_per_a"] > 0 and h["lr"] > 0 for h in r["history"])
    if r["stop_reason"] == "early_stopping":
        assert r["epochs"] - r["best_epoch"] == 2
    assert r["convergence"].get("best_epoch", r["best_epoch"]) == r["best_epoch"]
    assert r["train_cpu_seconds"] > 0 and r["train_seconds"] > 0
    assert set(r["intermolecular"]) == set(r["groups"])  # every group, intermolecular force too
    md = out.with_suffix(".md").read_text()
    assert "patience 2 epochs" in md and "stop reason" in md and "Intermolecular force" in md


def test_scheduler_settings_reach_train_and_the_report(tmp_path, monkeypatch):
    """--scheduler-patience / --scheduler-factor are passed to train() and written to the report; left out,
    the report carries train()'s defaults (the values used), not "None"."""
    import inspect

    import cartlorem.train as cartlorem_train
    from cartlorem.training.loop import train as real

    seen = []

    def spy(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("scheduler_patience", "scheduler_factor")})
        return real(*args, **kwargs)

    monkeypatch.setattr(cartlorem_train, "train", spy)
    write_dimers(tmp_path / "dimers.xyz")
    common = ["--data-dir", str(tmp_path), "--sets", "dimers", "--variants", "none", "--skip-mace", "--channels",
              "4", "--batch-size", "4", "--epochs", "1", "--threads", "1"]
    accuracy.main(common + ["--scheduler-patience", "7", "--scheduler-factor", "0.5", "--out", str(tmp_path / "a")])
    assert seen[-1] == {"scheduler_patience": 7, "scheduler_factor": 0.5}
    assert "ReduceLROnPlateau factor 0.5 after 7 epochs" in (tmp_path / "a.md").read_text()
    accuracy.main(common + ["--out", str(tmp_path / "b")])
    defaults = inspect.signature(real).parameters
    assert seen[-1] == {k: defaults[k].default for k in ("scheduler_patience", "scheduler_factor")}
    meta = json.loads((tmp_path / "b.json").read_text())["meta"]
    assert meta["scheduler_patience"] == defaults["scheduler_patience"].default


def test_intermolecular_force_is_the_net_force_on_each_monomer():
    """Two frames (3 + 2 atoms, 1 + 1 atoms); the error is that of the summed forces of each monomer."""
    frames = [_Frame(3, 2), _Frame(2, 1)]
    ref = np.array([[1.0, 0, 0], [0, 1, 0], [-1, -1, 0], [0, 0, 2], [0, 0, -2]])  # net A: (1,1,0) | (0,0,2)
    pred = ref.copy()
    pred[0] += [0.003, 0, 0]  # frame 0, monomer A: +3 meV/Å in x
    pred[1] += [-0.003, 0, 0]  # ... cancelled: the intramolecular part does not count
    pred[4] += [0, 0.006, 0]  # frame 1, monomer B: +6 meV/Å in y
    p = SimpleNamespace(structure=np.array([0, 0, 0, 1, 1]), forces_pred=pred, forces_ref=ref)
    masks = {"all": np.array([True, True]), "second": np.array([False, True])}
    res = accuracy.intermolecular_errors(p, frames, masks)
    assert res["all"]["intermolecular_force_mae_mev_per_a"] == pytest.approx(6.0 / 12)  # 2 frames × 2 × 3
    assert res["second"]["intermolecular_force_mae_mev_per_a"] == pytest.approx(6.0 / 6)
    # mean |net F| over frame 1's two monomers: (0,0,2) and (0,0,-2) eV/Å
    assert res["second"]["intermolecular_force_ref_mean_abs_mev_per_a"] == pytest.approx(4000.0 / 6)
    with pytest.raises(ValueError, match="predictions cover 5 atoms"):
        accuracy.intermolecular_errors(p, [_Frame(3, 2), _Frame(3, 1)], masks)


class _Frame:
    def __init__(self, n, na):
        self.n, self.info = n, {"monomer_a_atoms": na}

    def __len__(self):
        return self.n


def test_convergence_of_a_power_law_curve():
    """best ∝ epoch^-0.5: slope -0.5; 20 more epochs gain < 1 % once (1 + 20/E)^0.5 > 1/0.99 …"""
    history = [{"valid_loss": e ** -0.5} for e in range(1, 41)]
    c = accuracy.convergence(history, cpu_seconds=400.0)
    assert c["slope"] == pytest.approx(-0.5)
    plateau = 20 / (0.99 ** -2 - 1)  # ≈ 985 epochs
    assert c["plateau_epochs"] == int(np.ceil(plateau))
    assert c["plateau_cpu_s"] == pytest.approx(c["plateau_epochs"] * 10.0)
    assert c["best_epoch"] == 40 and c["epochs_after_best"] == 0 and c["gain_over_window"] > 0.01
    flat = accuracy.convergence([{"valid_loss": v} for v in [3, 2, 1, 1, 1, 1, 1, 1, 1, 1]], 10.0)
    assert flat["best_epoch"] == 3 and flat["gain_over_window"] == 0.0 and flat["plateau_epochs"] is None


def test_cumulene_groups_by_torsion():
    frames = [SimpleNamespace(info={"theta": t}) for t in (0.1, 29.9, 30.0, 59.0, 60.0, 89.98, 90.0)]
    g = harness.groups_for("cumulene", frames)
    assert g["all"].all()
    assert g["theta<30"].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert g["30<=theta<60"].tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert g["theta>=60"].tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_combine_puts_runs_made_in_parallel_side_by_side(tmp_path):
    """--combine: one report from runs made one model each (in parallel), models in the order of VARIANTS,
    every run's command kept; runs of different commits are refused rather than silently mixed."""
    write_dimers(tmp_path / "dimers.xyz")
    run = tmp_path / "run_none"
    accuracy.main(["--data-dir", str(tmp_path), "--sets", "dimers", "--variants", "none", "--channels", "4",
                   "--batch-size", "4", "--budget", "2", "--threads", "1", "--out", str(run)])
    data = json.loads(run.with_suffix(".json").read_text())
    other = json.loads(json.dumps(data))  # the same run standing in for a second model's
    other["results"]["dimers"]["variants"] = {"multipole": other["results"]["dimers"]["variants"]["none"]}
    other["meta"]["command"] = "second run"
    (tmp_path / "run_multipole.json").write_text(json.dumps(other))
    out = tmp_path / "both"
    files = [str(tmp_path / "run_multipole.json"), str(run.with_suffix(".json"))]
    accuracy.main(["--combine", *files, "--out", str(out)])
    both = json.loads(out.with_suffix(".json").read_text())
    assert list(both["results"]["dimers"]["variants"]) == ["none", "multipole"]
    assert both["meta"]["command"].startswith("second run; ") and len(both["meta"]["combined_from"]) == 2
    header = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| group")][0]
    assert header.index("cartlorem none") < header.index("cartlorem multipole")
    assert "different settings" not in out.with_suffix(".md").read_text()
    # runs with other settings: listed per column, not labelled with the first run's (budget 1200 for all)
    other["meta"].update(budget=7.0, placement="end")
    (tmp_path / "run_multipole.json").write_text(json.dumps(other))
    accuracy.main(["--combine", *files, "--out", str(out)])
    md = out.with_suffix(".md").read_text()
    assert "**The columns were trained with different settings** (budget, placement;" in md
    assert "- dimers, cartlorem multipole: budget 7.0, placement end" in md
    assert "- dimers, cartlorem none: budget 2.0, placement None" in md
    other["meta"]["seed"] = 7  # another split: not comparable at all
    (tmp_path / "run_multipole.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different test sets .seed: 7, 0"):
        accuracy.main(["--combine", *files, "--out", str(out)])
    other["meta"].update(seed=0, git_commit="0" * 40)
    (tmp_path / "run_multipole.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different commits"):
        accuracy.main(["--combine", *files, "--out", str(out)])


def test_run_dir_continues_a_model_across_sessions(tmp_path):
    """--run-dir: a second session resumes the first one's checkpoint (history, epochs and time add up, the
    sessions are recorded); other settings, or a checkpoint without its record, are refused."""
    write_dimers(tmp_path / "dimers.xyz")
    common = ["--data-dir", str(tmp_path), "--sets", "dimers", "--variants", "none", "--channels", "4",
              "--batch-size", "4", "--budget", "2", "--patience", "50", "--threads", "1",
              "--run-dir", str(tmp_path / "runs")]
    accuracy.main(common + ["--out", str(tmp_path / "first")])
    first = json.loads((tmp_path / "first.json").read_text())["results"]["dimers"]["variants"]["none"]
    accuracy.main(common + ["--out", str(tmp_path / "second")])
    second = json.loads((tmp_path / "second.json").read_text())["results"]["dimers"]["variants"]["none"]
    assert len(second["sessions"]) == 2 and second["sessions"][1]["epochs_before"] == first["epochs"]
    assert second["epochs"] > first["epochs"]
    assert [h["epoch"] for h in second["history"]] == list(range(1, second["epochs"] + 1))
    assert second["history"][: first["epochs"]] == first["history"]
    assert second["train_cpu_seconds"] == pytest.approx(sum(x["cpu_s"] for x in second["sessions"]))
    with pytest.raises(SystemExit, match="other settings"):
        other = list(common)
        other[other.index("--channels") + 1] = "6"
        accuracy.main(other + ["--out", str(tmp_path / "third")])
    (tmp_path / "runs" / "dimers" / "none" / "sessions.json").unlink()
    with pytest.raises(SystemExit, match="no sessions.json"):
        accuracy.main(common + ["--out", str(tmp_path / "fourth")])


def test_convergence_of_an_almost_flat_curve():
    """A validation loss that falls by 1e-9 per epoch: the plateau is reached now (the power-law factor
    (0.99)^(1/slope) overflowed a float before, and the whole model's result was lost to an OverflowError)."""
    c = accuracy.convergence([{"valid_loss": 1.0 - 1e-9 * k} for k in range(12)], cpu_seconds=12.0)
    assert c["slope"] < 0 and c["plateau_epochs"] == 12


def test_charge_channels_reach_the_block_and_a_continued_study_keeps_them(tmp_path):
    """--charge-channels K|all and --end-features set long_range_options charge_channels and end_features
    (recorded per model); a --run-dir study written before the options existed (no key: the model's default)
    continues without them and refuses a change, and a study left to the model's defaults refuses to continue when
    the defaults resolve otherwise."""
    write_dimers(tmp_path / "dimers.xyz")
    common = ["--data-dir", str(tmp_path), "--sets", "dimers", "--variants", "multipole", "--skip-mace",
              "--channels", "4", "--batch-size", "4", "--budget", "1", "--threads", "1"]
    for flag, expected in (("all", 4), ("2", 2)):
        accuracy.main(common + ["--charge-channels", flag, "--placement", "end", "--out", str(tmp_path / flag)])
        r = json.loads((tmp_path / f"{flag}.json").read_text())["results"]["dimers"]["variants"]["multipole"]
        assert r["long_range_options"] == {"placement": "end", "charge_channels": expected, "lr_channels": 4,
                                           "end_features": "full"}
    accuracy.main(common + ["--end-features", "light", "--out", str(tmp_path / "light")])
    r = json.loads((tmp_path / "light.json").read_text())["results"]["dimers"]["variants"]["multipole"]
    assert r["long_range_options"]["end_features"] == "light"
    runs = common + ["--patience", "50", "--run-dir", str(tmp_path / "runs")]
    accuracy.main(runs + ["--out", str(tmp_path / "first")])
    record = tmp_path / "runs" / "dimers" / "multipole" / "sessions.json"
    saved = json.loads(record.read_text())
    assert saved["long_range_options"]["charge_channels"] == 4  # the default, resolved
    assert saved["settings"].pop("charge_channels") == "None"
    assert saved["settings"].pop("end_features") == "None"
    assert saved["long_range_options"].pop("end_features") == "full"
    record.write_text(json.dumps(saved))  # as an older study wrote it
    accuracy.main(runs + ["--out", str(tmp_path / "second")])
    second = json.loads((tmp_path / "second.json").read_text())["results"]["dimers"]["variants"]["multipole"]
    assert len(second["sessions"]) == 2 and second["long_range_options"]["charge_channels"] == 4
    with pytest.raises(SystemExit, match="charge_channels"):
        accuracy.main(runs + ["--charge-channels", "1", "--out", str(tmp_path / "third")])
    with pytest.raises(SystemExit, match="end_features"):
        accuracy.main(runs + ["--end-features", "light", "--out", str(tmp_path / "third")])
    saved = json.loads(record.read_text())
    saved["long_range_options"]["placement"] = "before_last"  # the defaults of the session that started it
    record.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="long_range_options"):
        accuracy.main(runs + ["--out", str(tmp_path / "fourth")])


@needs_compiled_step
def test_compile_flag_trains_cartlorem_models_compiled_and_is_recorded(tmp_path, eager_compiled_step):
    """--compile: the cartlorem models train through the compiled step (its function run eagerly here: compiling
    takes minutes) and each session records it; a session without the flag continues the same run."""
    calls = eager_compiled_step
    write_dimers(tmp_path / "dimers.xyz")
    common = ["--data-dir", str(tmp_path), "--sets", "dimers", "--variants", "none", "--channels", "4",
              "--batch-size", "4", "--budget", "2", "--patience", "50", "--threads", "1",
              "--run-dir", str(tmp_path / "runs")]
    accuracy.main(common + ["--compile", "--out", str(tmp_path / "first")])
    assert calls, "the compiled step was not used"
    n = len(calls)
    accuracy.main(common + ["--out", str(tmp_path / "second")])
    assert len(calls) == n  # no --compile: eager
    second = json.loads((tmp_path / "second.json").read_text())["results"]["dimers"]["variants"]["none"]
    assert [s["compile"] for s in second["sessions"]] == [True, False]


@pytest.mark.parametrize("bad", ["multipol", "", "none,mace2"])
def test_unknown_variants_are_refused_before_training(bad, tmp_path, capsys):
    """A typo in --variants: a usage error naming the choices, not a KeyError (LABEL[v]) once training starts."""
    with pytest.raises((SystemExit, KeyError, FileNotFoundError)) as err:  # before: KeyError or no data, here
        accuracy.main(["--variants", bad, "--skip-mace", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x")])
    assert err.type is SystemExit
    assert "--variants: a comma list of none, lorem, multipole, mace" in capsys.readouterr().err


def test_mace_runs_with_the_peer_python_of_the_environment(tmp_path, monkeypatch):
    """run_mace_subprocess uses harness.peer_python(): CARTLOREM_PEER_PYTHON is honoured, not only the venv."""
    import subprocess

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return SimpleNamespace(returncode=1, stderr="boom\n", stdout="")

    monkeypatch.setattr(accuracy, "peer_python", lambda: ("/opt/peer/bin/python", None))
    monkeypatch.setattr(subprocess, "run", fake_run)
    res = accuracy.run_mace_subprocess("dimers", SimpleNamespace(budget=1.0))
    assert calls and calls[0][0] == "/opt/peer/bin/python" and res["status"] == "failed: boom"
    monkeypatch.setattr(accuracy, "peer_python", lambda: (None, "not installed (why)"))
    assert accuracy.run_mace_subprocess("dimers", SimpleNamespace(budget=1.0))["status"] == "not installed (why)"
