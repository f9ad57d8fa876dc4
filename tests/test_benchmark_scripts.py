"""The benchmark scripts' command lines and reports: defaults, refusals, and what their results record.

Tiny settings only (a few seconds each); no test needs the study data sets (../shared/data): the scripts that read
them get a missing folder or a synthetic split.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks import harness  # noqa: E402
from conftest import needs_torch  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(autouse=True)
def _keep_threads():
    """The scripts' main() sets torch's thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run_script(script, *args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


# --------------------------------------------------------------------------------------------------
# --data-dir: the documented default, and a missing folder named with the option


@pytest.mark.parametrize("script, argv", [
    ("field_sum_forms", ["--sets", "dimers", "--forms", "pairs", "--repeats", "1", "--warmup", "0",
                         "--batch-size", "2"]),
    pytest.param("hand_kernel", ["--set", "dimers", "--repeats", "1", "--warmup", "0", "--batch-size", "2"],
                 marks=needs_torch(hasattr(torch.library, "custom_op"), "torch.library.custom_op (hand_kernel.py)",
                                   "2.4")),
])
def test_data_dir_defaults_to_the_shared_folder_and_a_missing_one_names_the_option(script, argv, tmp_path,
                                                                                   monkeypatch):
    """field_sum_forms.py / hand_kernel.py defaulted --data-dir to None: Path(None) raised TypeError in pathlib."""
    module = __import__(script)
    assert Path(harness.DEFAULT_DATA) == ROOT.parent / "shared" / "data"  # ../shared/data next to the project
    missing = tmp_path / "no_data"
    monkeypatch.setattr(module.harness, "DEFAULT_DATA", missing)  # the default, read when the parser is made
    with pytest.raises(SystemExit, match="--data-dir") as err:
        module.main(argv + ["--out", str(tmp_path / "out")])
    assert str(missing) in str(err.value)
    assert not (tmp_path / "out.json").exists()


# --------------------------------------------------------------------------------------------------
# pme_cost_fit.py


def test_pme_cost_fit_refuses_a_fit_with_fewer_points_than_constants(tmp_path):
    """Every point skipped (r_c beyond half of a small box): nnls of an empty matrix aborted the interpreter."""
    r = run_script("pme_cost_fit.py", "--methods", "pme", "--sizes", "3", "--cutoffs", "5", "--orders", "4",
                   "--spacings", "1.0", "--layouts", "0:1", "--smearings", "none", "--repeats", "1",
                   "--out", tmp_path / "fit")
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert "0 pme point(s) measured, fewer than the 6 constants" in r.stderr
    assert not (tmp_path / "fit.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--layouts", "012"], "a layout is ranks:channels"),
    (["--layouts", "3:4"], "a layout is ranks:channels"),
    (["--smearings", "abc"], "--smearings"),
    (["--smearings", "-1"], "positive widths"),
])
def test_pme_cost_fit_names_a_bad_layout_or_smearing(argv, message, tmp_path):
    """A bad --layouts / --smearings was parsed outside argparse: a traceback (ArgumentTypeError, ValueError)."""
    r = run_script("pme_cost_fit.py", *argv, "--out", tmp_path / "fit")
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, message", [
    (["--gaps", "0"], "--gaps takes vacuum gaps of at least"),
    (["--gaps=-3,6"], "--gaps takes vacuum gaps of at least"),
    (["--slab-sizes", "0"], "--slab-sizes takes whole numbers >= 1"),
    (["--slab-sizes", "1", "--gaps", "6", "--layouts", "0:1"], "give more --slab-sizes, --gaps or --layouts"),
])
def test_pme_cost_fit_names_bad_replica_options(argv, message, tmp_path):
    """--methods replica: a gap of 0 divided by zero, 0 cells gave a singular cell, a negative gap became a data row,
    and too few points were blamed on the PME options."""
    r = run_script("pme_cost_fit.py", "--methods", "replica", "--repeats", "1", *argv, "--out", tmp_path / "fit")
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]
    assert not (tmp_path / "fit.json").exists()


def test_pme_cost_fit_skips_a_mesh_too_coarse_for_the_sources(tmp_path):
    """Spline order 4 on a 1.2 Å mesh cannot reach any accuracy for 1 Å Gaussians: pme_sum refuses it, which
    stopped the whole run with a ValueError; the point is now skipped with the sum's reason."""
    r = run_script("pme_cost_fit.py", "--methods", "pme", "--sizes", "3", "--cutoffs", "4", "--orders", "4",
                   "--spacings", "1.2", "--layouts", "0:1", "--smearings", "1.0", "--repeats", "1",
                   "--out", tmp_path / "fit")
    assert "skipped (PME mesh" in r.stdout and "Traceback" not in r.stderr, r.stderr[-500:]
    assert r.returncode == 2 and "0 pme point(s) measured" in r.stderr


# --------------------------------------------------------------------------------------------------
# memory.py


def test_memory_report_states_the_settings_and_the_command(tmp_path):
    """The report said C = 64, `python benchmarks/memory.py` and 1000-atom diamond whatever was run, called
    targets without data "missed", and the JSON meta lacked the command, sizes, time size and repeats."""
    argv = ["--sizes", "diamond:2", "--channels", "8", "--repeats", "1", "--time-size", "2", "--timeout", "120",
            "--out", str(tmp_path / "mem")]
    r = run_script("memory.py", *argv)
    assert r.returncode == 0, r.stderr[-1000:]
    meta = json.loads((tmp_path / "mem.json").read_text())["meta"]
    assert meta["command"] == harness.command_line("memory.py", argv)
    assert meta["sizes"] == {"diamond": [2]} and meta["time_size"] == 2 and meta["repeats"] == 1
    assert meta["channels"] == 8
    md = (tmp_path / "mem.md").read_text()
    assert "C = 8," in md and "C = 64" not in md
    assert f"Command: `{meta['command']}`" in md
    assert "## Time, 64-atom diamond" in md and "1000-atom diamond (" not in md
    assert md.count("**not measured**") == 2 and "**missed**" not in md  # nothing at 1000-10,000 atoms


def test_memory_time_target_is_judged_only_at_its_size():
    import memory

    ok = {"status": "ok", "ratio_cpu": 1.01}
    assert memory.summarise([], {**ok, "n_atoms": 1000})["time_target_met"] is True
    assert memory.summarise([], {**ok, "n_atoms": 1000, "ratio_cpu": 1.2})["time_target_met"] is False
    assert memory.summarise([], {**ok, "n_atoms": 64})["time_target_met"] is None
    assert memory.summarise([], {"status": "failed"})["time_target_met"] is None


# --------------------------------------------------------------------------------------------------
# ewald_cost.py


def _speed_json(path, rows):
    base = {"status": "ok", "model": "short", "device": "cpu", "system": "water", "size": 3, "n_atoms": 81,
            "dtype": "float32"}
    path.write_text(json.dumps({"meta": {}, "rows": [{**base, **r} for r in rows]}))
    return path


def test_ewald_cost_matches_the_local_model_on_channels_and_threads(tmp_path):
    """The local-model time was looked up by (system, N, dtype) only: a speed.json of another C or thread count
    gave the share, and the report said C = 64 and `python benchmarks/ewald_cost.py` whatever was run."""
    speed = _speed_json(tmp_path / "speed.json", [{"channels": 8, "threads": 1, "cpu_time_s": 0.5},
                                                  {"channels": 64, "threads": 2, "cpu_time_s": 3.0}])
    argv = ["--sizes", "water:3", "--dtype", "float32", "--repeats", "1", "--speed", str(speed)]
    r = run_script("ewald_cost.py", *argv, "--out", tmp_path / "none")
    assert r.returncode != 0 and "no local-model row of water 81 atoms float32 at C = 64, 1 thread(s)" in r.stderr
    assert "--channels" in r.stderr and not (tmp_path / "none.json").exists()

    argv += ["--channels", "8", "--out", str(tmp_path / "ec")]
    r = run_script("ewald_cost.py", *argv)
    assert r.returncode == 0, r.stderr[-1000:]
    saved = json.loads((tmp_path / "ec.json").read_text())
    assert saved["meta"]["command"] == harness.command_line("ewald_cost.py", argv)
    assert saved["meta"]["channels"] == 8 and saved["rows"][0]["local_model_cpu_s"] == 0.5
    md = (tmp_path / "ec.md").read_text()
    assert "(C = 8, 1 thread(s))" in md and "C = 64" not in md and f"`{saved['meta']['command']}`" in md


def test_ewald_cost_refuses_several_matching_rows():
    import ewald_cost

    rows = [{"status": "ok", "model": "short", "device": "cpu", "system": "water", "n_atoms": 81, "dtype": "float32",
             "channels": 64, "threads": 1, "cpu_time_s": t} for t in (1.0, 2.0)]
    with pytest.raises(SystemExit, match="2 local-model rows .* ambiguous"):
        ewald_cost.local_model_seconds(rows, "water", 81, "float32", 64, 1)
    assert ewald_cost.local_model_seconds(rows[:1], "water", 81, "float32", 64, 1) == 1.0
    assert ewald_cost.local_model_seconds(rows, "diamond", 216, "float32", 64, 1) is None  # not in speed.json


# --------------------------------------------------------------------------------------------------
# intermolecular.py and nacl_profile.py: stamped like every other script


def _fake_split(frames):
    def load_split(name, args):
        n = len(frames)
        return frames, [None] * n, [1], np.arange(0), np.arange(0), np.arange(n)
    return load_split


def _assert_stamped(saved, md, script, argv):
    meta = saved["meta"]
    for key in ("date", "cpu_model", "loadavg_1min", "torch", "numpy", "git_commit", "git_dirty"):
        assert key in meta, key
    assert meta["command"] == harness.command_line(script, argv)
    assert f"`{meta['command']}`" in md


def _run_stamped(module, script: str, accuracy: dict, tmp_path):
    """Run a scoring script's main on a fake accuracy.py result (no saved models); check its stamp, return its JSON."""
    (tmp_path / "acc.json").write_text(json.dumps(accuracy))
    argv = ["--accuracy", str(tmp_path / "acc.json"), "--models", str(tmp_path / "no_models"),
            "--out", str(tmp_path / "out")]
    module.main(argv)
    saved = json.loads((tmp_path / "out.json").read_text())
    _assert_stamped(saved, (tmp_path / "out.md").read_text(), script, argv)
    return saved

def test_intermolecular_stamps_machine_versions_commit_and_command(tmp_path, monkeypatch):
    from ase import Atoms

    from benchmarks import intermolecular

    rng = np.random.default_rng(0)
    frames = []
    for sep in (3.0, 6.0, 9.0, 10.0):
        a = Atoms("H4", positions=rng.normal(size=(4, 3)))
        a.info.update(monomer_a_atoms=2, separation=sep, classes="polar-polar")
        frames.append(a)
    monkeypatch.setattr(intermolecular, "load_split", _fake_split(frames))
    f = rng.normal(size=(16, 3))
    acc = {"meta": {"seed": 0, "test_fraction": 0.2}, "results": {"dimers": {"variants": {"none": {
        "epochs": 1, "parity": {"forces_pred": (f + 0.1).tolist(), "forces_ref": f.tolist()}}}}}}
    saved = _run_stamped(intermolecular, "intermolecular.py", acc, tmp_path)
    assert saved["results"]["accuracy.py: cartlorem none (1 epochs)"]["all"]["n"] == 4


def test_nacl_profile_stamps_machine_versions_commit_and_command(tmp_path, monkeypatch):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from benchmarks import nacl_profile

    rng = np.random.default_rng(0)
    frames, energies = [], []
    for k in range(24):
        cluster = nacl_profile.CLUSTERS[k % 2]
        d = -0.6 + 3.1 * k / 23
        a = Atoms("Na2", positions=[[0, 0, 0], [3.0 + d, 0, 0]])
        e = 0.3 * d + 0.1 * d ** 3 + rng.normal(0.0, 0.01) + (0.03 * d ** 2 if k % 2 == 0 else 0.0)
        a.calc = SinglePointCalculator(a, energy=e)
        a.info.update(displacement=d, cluster=cluster)
        frames.append(a)
        energies.append(e)
    monkeypatch.setattr(nacl_profile, "load_split", _fake_split(frames))
    per_atom = np.array(energies) / 2
    acc = {"meta": {}, "results": {"nacl": {"variants": {"none": {"epochs": 1, "parity": {
        "energy_ref": per_atom.tolist(), "energy_pred": (per_atom + 0.001).tolist()}}}}}}
    saved = _run_stamped(nacl_profile, "nacl_profile.py", acc, tmp_path)
    assert saved["meta"]["degree"] == nacl_profile.DEGREE and len(saved["results"]) == 1


# --------------------------------------------------------------------------------------------------
# long_range.py


def test_long_range_tells_variants_left_out_from_variants_not_trained(tmp_path, monkeypatch):
    """A variant left out by --variants was reported as "Not trained in this run (time)"."""
    from benchmarks import long_range

    fake = {"n_train": 1, "n_valid": 1, "n_test": 1,
            "variants": {"none": {"epochs": 1, "groups": {"all": {"n": 1, "energy_mae_mev_per_atom": 1.0,
                                                                  "forces_mae_mev_per_a": 2.0}}}}}
    monkeypatch.setattr(long_range, "run_set", lambda name, args: json.loads(json.dumps(fake)))
    out = str(tmp_path / "lr")
    long_range.main(["--sets", "dimers", "--variants", "none", "--save-models", "", "--out", out])
    saved = json.loads(Path(out + ".json").read_text())
    md = Path(out + ".md").read_text()
    assert "Left out by --variants: lorem, multipole." in md and "Not trained" not in md
    # asked for, but missing (an earlier run's results without them): not trained
    md = long_range.to_markdown(saved["results"], dict(saved["meta"], variants=["none", "lorem"]))
    assert "Left out by --variants: multipole." in md and "Not trained in this run (time): lorem." in md


def test_long_range_quick_help_says_what_quick_does(capsys):
    from benchmarks import long_range

    with pytest.raises(SystemExit):
        long_range.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "20 s budget" not in text
    assert "smoke test: 1 epoch (the --budget cap as given) on the first 120 frames of each set, no models saved" \
        in text
