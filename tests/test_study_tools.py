"""The study helpers of issue 12: the settings grid and score (benchmarks/settings.py), the seed-paired
comparison of accuracy.py runs (benchmarks/compare_runs.py) and the placement names of train_step.py."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks import compare_runs, settings  # noqa: E402


def test_settings_grid_is_one_factor_at_a_time_without_repeats():
    grid = settings.settings_grid([0.002, 0.005, 0.01], [0.1, 1.0, 10.0], 0.005, 10.0)
    assert grid[0] == (0.005, 10.0)  # the base first
    assert len(grid) == len(set(grid)) == 5
    assert set(grid) == {(0.005, 10.0), (0.002, 10.0), (0.01, 10.0), (0.005, 0.1), (0.005, 1.0)}


def test_settings_score_is_relative_to_the_best_per_set():
    rows = {"a": {"x": (1.0, 2.0), "y": (3.0, 4.0)},  # best at everything
            "b": {"x": (2.0, 2.0), "y": (3.0, 16.0)}}  # 2× energy on x; 4× forces on y
    score = settings.scores(rows)
    assert score["a"] == pytest.approx(1.0)
    assert score["b"] == pytest.approx(0.5 * (math.sqrt(2.0) + 2.0))


def _accuracy_json(path, seed, energy, forces, far, inter):
    result = {"test": {"energy_mae_mev_per_atom": energy, "forces_mae_mev_per_a": forces},
              "groups": {"sep>=8": {"forces_mae_mev_per_a": far}},
              "intermolecular": {"sep>=8": {"intermolecular_force_mae_mev_per_a": inter}},
              "cpu_seconds_per_epoch": 9.0}
    meta = {"seed": seed, "git_commit": "abc", "cpu_model": "test", "epochs": 12, "channels": 16, "dtype": "float32"}
    path.write_text(json.dumps({"meta": meta, "results": {"dimers": {"variants": {"multipole": result}}}}))


def test_compare_runs_pairs_seeds_and_summarises(tmp_path):
    for seed, (a, b) in enumerate([(1.0, 3.0), (3.0, 5.0)]):
        _accuracy_json(tmp_path / f"a_s{seed}.json", seed, a, 10 * a, 20 * a, a / 10)
        _accuracy_json(tmp_path / f"b_s{seed}.json", seed, b, 10 * b, 20 * b, b / 10)
    _accuracy_json(tmp_path / "b_s7.json", 7, 100.0, 1.0, 1.0, 1.0)  # no partner in "a": left out
    out = tmp_path / "cmp"
    compare_runs.main(["--runs", f"a={tmp_path}/a_s*.json", f"b={tmp_path}/b_s*.json", "--out", str(out)])
    summary = json.loads(Path(str(out) + ".json").read_text())
    assert summary["seeds"] == [0, 1]
    energy = summary["summary"]["b"]["energy MAE (meV/atom)"]
    assert energy["per_seed"] == [3.0, 5.0] and energy["mean"] == pytest.approx(4.0)
    assert energy["std"] == pytest.approx(math.sqrt(2.0))
    assert "| energy MAE (meV/atom) | 2.00 ± 1.41 (1.00, 3.00) | 4.00 ± 1.41 (3.00, 5.00) |" in \
        Path(str(out) + ".md").read_text()


def test_compare_runs_at_equal_epochs_and_first_epoch_below(tmp_path):
    """Learning curves compared at equal epochs (a run that stopped earlier has none past its end) and the first
    epoch below an energy threshold; ratios are geometric means over the seeds that reached the epoch."""
    curves = {("a", 0): [(1, 20.0, 100.0), (2, 8.0, 40.0), (3, 1.0, 10.0)],
              ("b", 0): [(1, 20.0, 100.0), (2, 16.0, 20.0), (3, 4.0, 40.0), (4, 1.5, 9.0)],
              ("a", 1): [(1, 30.0, 90.0), (2, 10.0, 30.0), (3, 5.0, 20.0)],
              ("b", 1): [(1, 30.0, 90.0), (2, 5.0, 60.0)]}
    for (label, seed), rows in curves.items():
        path = tmp_path / f"{label}_s{seed}.json"
        _accuracy_json(path, seed, 1.0, 1.0, 1.0, 1.0)
        d = json.loads(path.read_text())
        d["results"]["dimers"]["variants"]["multipole"]["history"] = [
            {"epoch": e, "valid_energy_mae_mev_per_atom": en, "valid_forces_mae_mev_per_a": f} for e, en, f in rows]
        if seed == 1:
            d["meta"].update(git_commit="def", git_dirty=True)
        path.write_text(json.dumps(d))
    out = tmp_path / "cmp"
    compare_runs.main(["--runs", f"a={tmp_path}/a_s*.json", f"b={tmp_path}/b_s*.json", "--epochs", "2", "3", "9",
                       "--below", "9", "0.5", "--out", str(out)])
    saved = json.loads(Path(str(out) + ".json").read_text())
    summary = saved["summary"]
    assert summary["a"]["first epoch below 9"] == [2, 3] and summary["b"]["first epoch below 9"] == [3, 2]
    assert summary["b"]["first epoch below 0.5"] == [None, None]
    assert summary["b"]["valid at epoch"]["3"] == [[4.0, 40.0], None]
    md = Path(str(out) + ".md").read_text()
    # epoch 2: energy ratios 16/8 and 5/10, geometric mean 1; forces 20/40 and 60/30, also 1
    assert "| 2 | 8.00 / 40.0 | 10.00 / 30.0 | 16.00 / 20.0 | 5.00 / 60.0 | 1.00 / 1.00 (2) |" in md
    assert "| 3 | 1.00 / 10.0 | 5.00 / 20.0 | 4.00 / 40.0 | — | 4.00 / 4.00 (1) |" in md
    assert "| 9 | — | — | — | — | — |" in md
    assert "runs on commits abc (seeds 0), def, dirty tree (seeds 1)" in md
    assert saved["commits"] == "commits abc (seeds 0), def, dirty tree (seeds 1)"
    assert "| first epoch with validation energy below 0.5 meV/atom (per seed) | never, never | never, never |" in md


def test_train_step_model_names_carry_the_placement():
    import argparse

    import numpy as np
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    import train_step
    from cartlorem.data import read_dataset

    water = molecule("H2O")
    water.calc = SinglePointCalculator(water, energy=-14.0, forces=np.zeros((3, 3)))
    stats = read_dataset([water], 4.0)
    args = argparse.Namespace(seed=0, cutoff=4.0, correlation=2, dtype="float64")
    before = train_step.build_model("multipole[before_last]", [1, 8], 4, args, stats)
    default = train_step.build_model("lorem", [1, 8], 4, args, stats)
    assert (before.placement, before.long_range) == ("before_last", "multipole")
    assert (default.placement, default.long_range) == ("end", "lorem")


def test_train_step_zero_fields_variant_reaches_the_compiled_field_sum():
    """'/zero-fields' replaces the compiled step's field sum (traced_pair_fields) too, by zeros of its shapes that
    stay attached to the multipoles and positions, and restores it afterwards."""
    import train_step
    import cartlorem.nn.long_range as long_range
    from cartlorem.ewald.direct import molecule_pairs, traced_pair_fields

    g = torch.Generator().manual_seed(0)
    pos = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    pairs = molecule_pairs(torch.tensor([0, 0, 1, 1, 1]), unordered=True)
    real = traced_pair_fields(pos, pairs, q, smearing=1.0)
    with train_step.variant("multipole/zero-fields"):
        assert long_range.traced_pair_fields is not traced_pair_fields
        zero = long_range.traced_pair_fields(pos, pairs, q, smearing=1.0)
    assert long_range.traced_pair_fields is traced_pair_fields
    for a, b in zip(zero, real):
        assert a.shape == b.shape and not a.any() and a.requires_grad


def test_train_step_breakdown_sorts_profiler_events_by_kind_of_work():
    """The compiled step's profile splits into guard checks, the graph's Python wrapper, Inductor's fused kernels,
    GEMMs, the optimiser and the rest; every event counts once, per step."""
    from types import SimpleNamespace

    import train_step

    events = [("TorchDynamo Cache Lookup", 400.0), ("## Call CompiledFxGraph f3st3gise57 ##", 800.0),
              ("graph_1_cpp_fused_add_mul_sum_57", 300.0), ("graph_0_cpp_fused_silu_4", 100.0),
              ("aten::mm", 1000.0), ("aten::addmm", 200.0), ("aten::bmm", 100.0),
              ("Optimizer.step#Adam.step", 150.0), ("aten::_fused_adam_", 50.0), ("aten::_foreach_norm", 40.0),
              ("aten::copy_", 60.0), ("aten::index_add", 20.0)]
    out = train_step.step_breakdown([SimpleNamespace(key=k, self_cpu_time_total=t) for k, t in events], n_steps=2)
    assert list(out) == list(train_step.WORK_KINDS)
    assert out == {"guard checks": 0.2, "graph wrapper": 0.4, "fused kernels": 0.2, "GEMMs": 0.65,
                   "optimiser and clipping": 0.12, "other ops": 0.04}
    assert sum(out.values()) == pytest.approx(sum(t for _, t in events) / 2e3)


def test_train_step_field_sum_alone_runs_the_traced_sum():
    """--field-sum times the compiled step's field sum on a batch's geometry: every intra-structure pair once."""
    import train_step

    g = torch.Generator().manual_seed(0)
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    pos = torch.randn(7, 3, generator=g) * 1.5 + batch[:, None] * 20.0
    graph = type("Batch", (), {"positions": pos, "batch": batch})()
    out = train_step.field_sum_times(graph, torch.float32, repeats=2, warmup=0, compile=False)
    assert out["pairs"] == 3 + 6 and out["atoms"] == 7 and out["eager_ms"] > 0 and "compiled_ms" not in out


def test_results_files_carry_a_command_that_a_shell_reruns():
    """Empty arguments (the default placement '' of train_step.py) and ones with spaces or globs are quoted;
    a plain " ".join dropped the '' and the stamped command ran something else."""
    import shlex

    from benchmarks import harness

    argv = ["--placements", "", "end", "--runs", "a=x/acc_*.json", "two words"]
    line = harness.command_line("train_step.py", argv)
    assert line.startswith("PYTHONPATH=$PWD python3 benchmarks/train_step.py ")
    assert shlex.split(line)[3:] == argv


def test_torsion_signal_falls_off_as_the_multipole_order_says():
    """benchmarks/torsion_signal.py: the quadrupole-quadrupole reading of the `multipole` kind falls off as r⁻⁵,
    the component-wise potential of the `lorem` kind as r⁻¹ (far beyond the 1 Å smearing), and both depend on
    the torsion as cos 2θ (the 45° reading halfway between 0° and 90°)."""
    from benchmarks.torsion_signal import signals

    def reading(r):
        out = signals(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, r]]), ["C", "C"], smearing=1.0)
        return {kind: [row[kind] for row in out["rows"]] for kind in ("multipole", "lorem")}

    near, far = reading(9.0), reading(18.0)
    for kind, power in (("multipole", 5), ("lorem", 1)):
        amp_near, amp_far = near[kind][0] - near[kind][2], far[kind][0] - far[kind][2]
        assert amp_near / amp_far == pytest.approx(2.0 ** power, rel=1e-3)
        assert near[kind][1] == pytest.approx(0.5 * (near[kind][0] + near[kind][2]), rel=1e-6, abs=1e-12)


def test_torsion_paths_pair_energies_add_up_to_the_block(tmp_path):
    """torsion_signal.torsion_paths splits the block's electrostatic energy into atom-pair energies (all channels,
    with their couplings and the uniform charge correction): they must add up to what the model computed."""
    import torch
    from ase import Atoms

    import cartlorem
    from benchmarks.torsion_signal import torsion_paths
    from cartlorem.model import save_model

    torch.manual_seed(0)
    model = cartlorem.CartLorem([1, 6], cutoff=3.0, long_range="multipole", channels=4,
                                long_range_options={"placement": "end", "charge_channels": None}).double()
    with torch.no_grad():
        model.long_range_block.coupling_others.copy_(torch.tensor([0.5, 2.0, 0.7]))
    save_model(model, tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    frames = []
    for k in range(3):
        a = Atoms("CCHH", positions=[[0, 0, 0], [0, 0, 4.0], [0.9, 0, -0.6], [0, 0.9, 4.6]] + rng.normal(0, 0.1, (4, 3)))
        a.info["theta"] = 30.0 * k
        frames.append(a)
    r = torsion_paths(str(tmp_path / "model.pt"), frames)
    assert r["placement"] == "end" and r["charge_channels"] == 4
    assert r["pairs_minus_block_max_eV"] < 1e-10
    assert sum(r["slope"][k] for k in ("electrostatic", "readout", "rest")) == pytest.approx(r["slope"]["total"])


def test_benchmark_rows_name_the_device_they_ran_on(monkeypatch):
    """A CUDA request on a machine without CUDA runs on the CPU, and its rows say cpu (speed.py labelled them
    cuda before: a CPU timing filed as a GPU column)."""
    import torch

    from benchmarks import harness

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert harness.resolve_devices("cuda") == ["cpu"]
    assert harness.resolve_devices("cpu, cuda,") == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert harness.resolve_devices("cpu,cuda") == ["cpu", "cuda"]


def test_speed_results_carry_the_command_and_each_update_its_commit(tmp_path, monkeypatch):
    """speed.py stamps the command; --update records (and the .md prints) the commit, dirty flag and command
    of the re-measured points (they had kept the first run's header only)."""
    from benchmarks import harness, speed

    def fake_point(args, rows, loads, last, device, dtype, C, system, size, model, *rest):
        return {"device": device, "dtype": dtype, "channels": C, "system": system, "size": size, "model": model,
                "n_atoms": harness.ATOMS_PER[system](size), "status": "ok", "time_s": 0.1, "cpu_time_s": 0.1,
                "peak_mem_mb": 1.0}

    monkeypatch.setattr(speed, "run_model_point", fake_point)
    monkeypatch.setattr(speed, "plot", lambda *a, **k: None)
    out = str(tmp_path / "speed")
    base = ["--models", "short", "--sizes", "diamond:1", "--profile", "never", "--out", out]
    monkeypatch.setattr(speed, "machine_info", lambda *a: {**harness.machine_info(), "git_commit": "a" * 40,
                                                           "git_dirty": False})
    speed.main(base)
    first = json.loads(Path(out + ".json").read_text())["meta"]
    assert first["command"] == harness.command_line("speed.py", base)
    monkeypatch.setattr(speed, "machine_info", lambda *a: {**harness.machine_info(), "git_commit": "b" * 40,
                                                           "git_dirty": True})
    speed.main(base + ["--dtype", "float64", "--update"])
    meta = json.loads(Path(out + ".json").read_text())["meta"]
    assert meta["git_commit"] == "a" * 40 and meta["updates"][0]["git_commit"] == "b" * 40
    assert meta["updates"][0]["command"].endswith("--dtype float64 --update")
    md = Path(out + ".md").read_text()
    assert f"Command: `{first['command']}`" in md
    assert "on commit bbbbbbbbbb, dirty tree (`" in md


def test_long_range_records_the_command_and_merges_only_equal_settings(tmp_path, monkeypatch):
    """long_range.py: the command is stamped; --merge refuses results made with other settings (it joined them
    under the new header before); the report renders without a git commit (it raised TypeError on None)."""
    from benchmarks import harness, long_range

    fake = {"n_train": 1, "n_valid": 1, "n_test": 1,
            "variants": {"none": {"epochs": 1, "groups": {"all": {"n": 1, "energy_mae_mev_per_atom": 1.0,
                                                                  "forces_mae_mev_per_a": 2.0}}}}}
    monkeypatch.setattr(long_range, "run_set", lambda name, args: json.loads(json.dumps(fake)))
    out = str(tmp_path / "lr")
    argv = ["--sets", "dimers", "--variants", "none", "--save-models", "", "--out", out]
    long_range.main(argv)
    saved = json.loads(Path(out + ".json").read_text())
    assert saved["meta"]["command"] == harness.command_line("long_range.py", argv)
    assert saved["meta"]["channels"] == 16 and saved["meta"]["batch_size"] == 8
    long_range.main(argv + ["--merge"])  # the same settings: joined
    with pytest.raises(SystemExit, match="channels: 16 before, 32 now"):
        long_range.main(argv + ["--merge", "--channels", "32"])
    md = long_range.to_markdown(saved["results"], dict(saved["meta"], git_commit=None))
    assert md.startswith("# Long range vs short range (") and "commit ?" in md


def test_train_step_mace_child_gets_the_cutoff_and_the_report_says_it_is_not_interleaved(monkeypatch):
    """The MACE child was built at its default 5 Å whatever --cutoff said; and the report called the ÷ MACE
    ratios interleaved while MACE is timed afterwards in its own process."""
    import argparse
    import subprocess
    from types import SimpleNamespace

    import train_step

    calls = []
    monkeypatch.setattr(train_step.harness, "peer_python", lambda: ("/peer/python", None))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or SimpleNamespace(
        returncode=0, stdout=json.dumps({"median_s": 1.0, "iqr_s": 0.1, "cpu_median_s": 1.0}), stderr=""))
    args = argparse.Namespace(data_dir="/d", device="cpu", correlation=2, batch_size=8, n_batches=6, threads=1,
                              repeats=12, warmup=3, dtype="float32", seed=0, cutoff=4.0)
    assert train_step.mace_step_time("dimers", 16, args)[0]["median_s"] == 1.0
    cmd = calls[0]
    assert cmd[cmd.index("--cutoff") + 1] == "4.0"
    meta = {"command": "c", "git_commit": "a" * 40, "git_dirty": False, "date": "d", "cpu_model": "x", "torch": "t",
            "settings": {"threads": 1, "dtype": "float32", "batch_size": 8, "correlation": 2, "profile_steps": 0},
            "loadavg_start": 1.0, "loadavg_end": 1.0, "cpu_count": 2}
    rows = [{"set": "dimers", "channels": 16, "model": m, "atoms_per_batch": 10.0, "median_s": 0.1,
             "cpu_median_s": 0.1} for m in ("none", "mace")]
    md = train_step._markdown(rows, meta)
    assert "interleaved ratios hold" not in md and "MACE is timed in its own process" in md
    assert "MACE is timed" not in train_step._markdown(rows[:1], meta)


@pytest.mark.parametrize("bad, flag", [(["--epochs", "1"], "--epochs"), (["--rounds", "0"], "--rounds"),
                                       (["--models", ","], "--models")])
def test_train_epoch_refuses_settings_that_leave_nothing_to_time(bad, flag, tmp_path, capsys):
    """--epochs 1 (the one epoch is dropped as warm-up) or --rounds 0 ended in a StatisticsError after all the
    training; now a usage error before any."""
    import train_epoch

    with pytest.raises(SystemExit):
        train_epoch.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "x"), *bad])
    assert flag + ":" in capsys.readouterr().err


def test_train_epoch_shows_why_a_training_command_failed(tmp_path):
    """A failing `cartlorem train` raised CalledProcessError with its stderr sent to /dev/null."""
    import argparse

    import train_epoch

    args = argparse.Namespace(channels=4, correlation=2, epochs=2, dtype="float32", batch_size=4)
    with pytest.raises(SystemExit, match="training none failed") as err:
        train_epoch.run_cli(tmp_path / "missing.xyz", "none", args, tmp_path)
    assert "missing.xyz" in str(err.value).split("\n", 1)[1]  # the CLI's own message, from its stderr


def test_compare_runs_says_why_runs_cannot_be_compared(tmp_path):
    """No seed in common (IndexError before) and a file without the --set (KeyError before): clear errors."""
    _accuracy_json(tmp_path / "a_s0.json", 0, 1.0, 1.0, 1.0, 1.0)
    _accuracy_json(tmp_path / "b_s1.json", 1, 1.0, 1.0, 1.0, 1.0)
    out = str(tmp_path / "cmp")
    with pytest.raises(SystemExit, match="no seed is common to all the runs .a: seeds 0; b: seeds 1"):
        compare_runs.main(["--runs", f"a={tmp_path}/a_s*.json", f"b={tmp_path}/b_s*.json", "--out", out])
    with pytest.raises(SystemExit, match="has no results on 'cumulene' .it has dimers"):
        compare_runs.main(["--set", "cumulene", "--runs", f"a={tmp_path}/a_s*.json", "--out", out])


def test_compare_runs_reports_the_training_time_of_runs_spread_over_sessions(tmp_path):
    """A --run-dir study: --budget is per session; the header gave it as the runs' budget. It now says so and
    adds the sessions' training wall time up (train_seconds)."""
    for label, wall in (("a", 2900.0), ("b", 3100.0)):
        path = tmp_path / f"{label}_s0.json"
        _accuracy_json(path, 0, 1.0, 1.0, 1.0, 1.0)
        d = json.loads(path.read_text())
        d["meta"].update(epochs=0, budget=1200.0, run_dir="runs")
        d["results"]["dimers"]["variants"]["multipole"].update(
            train_seconds=wall, sessions=[{"wall_s": 1200.0}, {"wall_s": 1200.0}, {"wall_s": wall - 2400.0}])
        path.write_text(json.dumps(d))
    out = tmp_path / "cmp"
    compare_runs.main(["--runs", f"a={tmp_path}/a_s*.json", f"b={tmp_path}/b_s*.json", "--out", str(out)])
    md = Path(str(out) + ".md").read_text()
    assert "a cap of 1200 s per session, up to 3 sessions: 2900–3100 s of training wall clock per run in all" in md
    assert "1200 s of training wall clock each" not in md
