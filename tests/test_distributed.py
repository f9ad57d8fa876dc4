"""Training on several processes (gloo, CPU): the same global batches give the weights of one process.

Two processes are forked once for the module (gloo on a free local port); each runs every scenario
and saves what it got; the tests compare that with the same runs in one process (float64):
gradients of one global batch (exact scale, since Adam would hide a constant factor), weights,
EMA and validation metrics after a few optimiser steps for a local and a ``multipole`` model, a
resume under two processes, and files written by process 0 alone. A torchrun test runs the
command line.
"""

import dataclasses
import datetime
import math
import multiprocessing
import os
import shutil
import socket
import subprocess
import traceback
from pathlib import Path

import pytest
import torch

from cartlorem import CartLorem, load_model
from cartlorem.data import read_dataset
from cartlorem.graph import collate
from cartlorem.training import distributed, run_folder, train, weighted_loss
from conftest import emt_frames, needs_compiled_step  # noqa: E402  (tests/ is on sys.path under pytest)

CUTOFF = 3.0
TINY = dict(channels=4, num_layers=1, correlation=2, num_basis=4, radial_hidden=8, readout_hidden=8)
WEIGHTS = {"energy": 1.0, "forces": 10.0, "stress": 1.0}
# batch 3 over 7 structures: steps of 3, 3 and 1 structures, shared 1 + 2, 1 + 2 and 0 + 1
SETTINGS = dict(batch_size=3, lr=1e-2, progress=False, seed=3, weights=WEIGHTS)
TOL = 1e-6
SIZE = 2

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs torch.distributed and the fork start method",
)


def _dataset():
    """7 training + 5 validation structures of 4–6 atoms (stress on the periodic ones); some labels
    are switched off so that the processes' parts hold different numbers of each label."""
    graphs = read_dataset(emt_frames(12, seed=1), CUTOFF)
    graphs[1] = dataclasses.replace(graphs[1], has_energy=torch.tensor([False]))
    graphs[2] = dataclasses.replace(graphs[2], has_forces=torch.tensor([False]))
    return graphs[:7], graphs[7:]


def _unlabelled(graph):
    return dataclasses.replace(graph, has_energy=torch.zeros_like(graph.has_energy),
                               has_forces=torch.zeros_like(graph.has_forces),
                               has_stress=None if graph.has_stress is None else torch.zeros_like(graph.has_stress))


def local_model(seed=0):
    torch.manual_seed(seed)
    return CartLorem([29, 47], cutoff=CUTOFF, long_range=None, **TINY).double()


def multipole_model(seed=0):
    torch.manual_seed(seed)
    return CartLorem([29, 47], cutoff=CUTOFF, long_range="multipole", **TINY).double()


MODELS = {"local": local_model, "multipole": multipole_model}


def _grad_of_global_batch(make, graphs, ranks):
    """(loss of the global batch, gradients) for graphs[0:3], each process taking its part."""
    model = make()
    part = [graphs[k] for k in ranks.part(3)]
    batch = collate(part) if part else None
    pred = None
    if batch is not None:
        stress = bool(batch.has_stress.any())
        pred = model(batch, compute_forces=True, compute_stress=stress, create_graph=True)
    if ranks.many:
        loss = distributed.loss_share(pred, batch, WEIGHTS, ranks)
    else:
        loss, _ = weighted_loss(pred, batch, WEIGHTS)
    params = [p for p in model.parameters() if p.requires_grad]
    if loss is not None:
        loss.backward()
    value = ranks.sum_gradients(params, 0.0 if loss is None else float(loss.detach()))
    return value, [None if p.grad is None else p.grad.clone() for p in params]


def _summary(model, result, folder=None) -> dict:
    out = {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "avg_num_neighbors": model.config["avg_num_neighbors"],
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_metrics": result.best_metrics,
    }
    if folder is not None:
        ckpt = torch.load(Path(folder) / "checkpoint.pt", weights_only=True)
        out["train_state_dict"], out["ema"] = ckpt["train_state_dict"], ckpt["ema"]["shadow"]
    return out


def scenarios(data, tmp: Path, ranks) -> dict:
    """Everything both the one-process and the two-process runs do (``tmp``: a folder per run)."""
    train_set, valid_set = data
    out = {}
    for name, make in MODELS.items():
        out[f"grad_{name}"] = _grad_of_global_batch(make, train_set, ranks)
    model = local_model()
    out["local"] = _summary(model, train(model, train_set, valid_set, epochs=2, **SETTINGS))
    out["local_compiled"], out["compiled_calls"] = _compiled_run(train_set, valid_set)
    model = multipole_model()
    out["multipole"] = _summary(model, train(model, train_set[:5], valid_set[:3], epochs=2, **SETTINGS))
    # one labelled structure in four, batches of two: every epoch has a global batch with no label, which must
    # leave the weights alone as with one process (the processes' zero shares gave every parameter a zero
    # gradient, and Adam moved them by its momentum)
    model = local_model()
    few = [train_set[0]] + [_unlabelled(g) for g in train_set[3:6]]
    out["unlabelled"] = _summary(model, train(model, few, valid_set, epochs=2, **(SETTINGS | {"batch_size": 2})))
    train(local_model(), train_set, valid_set, epochs=1, out_dir=tmp / "resumed", **SETTINGS)
    model = local_model(seed=7)  # every weight comes from the checkpoint
    result = train(model, train_set, valid_set, epochs=2, out_dir=tmp / "resumed", resume=True, **SETTINGS)
    out["resumed"] = _summary(model, result, tmp / "resumed")
    return out


def _compiled_run(train_set, valid_set):
    """The local run of :func:`scenarios` with ``compile=True``: the compiled step (traced whole by the
    "aot_eager" backend, as in test_compiled_training.py) on every process; and how many steps took it."""
    from cartlorem.training import compiled as compiled_mod

    calls = []
    saved = compiled_mod.BACKEND, compiled_mod.CompiledLossGradient.__call__

    def counted(self, *a, **k):
        calls.append(1)
        return saved[1](self, *a, **k)

    compiled_mod.BACKEND, compiled_mod.CompiledLossGradient.__call__ = "aot_eager", counted
    try:
        model = local_model()
        summary = _summary(model, train(model, train_set, valid_set, epochs=2, compile=True, **SETTINGS))
    finally:
        compiled_mod.BACKEND, compiled_mod.CompiledLossGradient.__call__ = saved
    return summary, len(calls)


def _forbid_writes(monkeypatch_target):
    def refuse(*args, **kwargs):
        raise AssertionError("a process other than 0 wrote a run file")

    for name in ("atomic_torch_save", "write_csv", "plot_learning_curve"):
        setattr(monkeypatch_target, name, refuse)


def _worker(rank: int, port: int, tmp: Path, data) -> None:
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=SIZE,
            timeout=datetime.timedelta(seconds=120),
        )
        ranks = distributed.current()
        assert (ranks.rank, ranks.size) == (rank, SIZE)
        if rank != 0:
            _forbid_writes(run_folder)  # this forked process only
        torch.save(scenarios(data, tmp / "runs", ranks), tmp / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (tmp / f"error{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"one": scenarios in this process, 0: process 0 of two, 1: process 1 of two}."""
    tmp = tmp_path_factory.mktemp("distributed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = multiprocessing.get_context("fork")
        port = _free_port()
        data = _dataset()  # the forked processes inherit it
        procs = [ctx.Process(target=_worker, args=(rank, port, tmp, data)) for rank in range(SIZE)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = [(tmp / f"error{r}.txt").read_text() for r in range(SIZE) if (tmp / f"error{r}.txt").exists()]
        assert not errors, "\n".join(errors)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        out = {r: torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(SIZE)}
        out["one"] = scenarios(data, tmp / "single", distributed.SINGLE)
        out["tmp"] = tmp
    finally:
        torch.set_num_threads(threads)
    return out


def _close(a, b, tol=TOL) -> float:
    """max |a − b| / (1 + |b|) over two tensors, asserted <= tol; returns it."""
    err = float(((a - b).abs() / (1 + b.abs())).max())
    assert err <= tol, err
    return err


def test_largest_difference_is_rounding(runs):
    """The weights differ by rounding only (printed with -s; measured 5e-16), far inside TOL."""
    err = max(
        float(((runs[0][name]["params"][k] - v).abs() / (1 + v.abs())).max())
        for name in ("local", "multipole", "resumed", "unlabelled")
        for k, v in runs["one"][name]["params"].items()
    )
    print(f"largest relative weight difference, 2 processes vs 1: {err:.2e}")
    assert err < 1e-10


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_of_a_global_batch_equals_one_process(runs, name):
    (loss1, grads1), (loss2, grads2) = runs["one"][f"grad_{name}"], runs[0][f"grad_{name}"]
    assert math.isclose(loss2, loss1, rel_tol=1e-12)
    assert runs[1][f"grad_{name}"][0] == loss2
    assert len(grads1) == len(grads2) and any(g is not None for g in grads1)
    for g1, g2, g2_other in zip(grads1, grads2, runs[1][f"grad_{name}"][1]):
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            assert torch.allclose(g2, g1, rtol=1e-10, atol=1e-14)  # the scale too, not just the direction
            assert torch.equal(g2, g2_other)  # bitwise the same on both processes


@pytest.mark.parametrize("name", ["local", "multipole", "resumed", "unlabelled"])
def test_training_on_two_processes_equals_one(runs, name):
    one, two, other = runs["one"][name], runs[0][name], runs[1][name]
    assert one["params"].keys() == two["params"].keys()
    for k, v in one["params"].items():
        _close(two["params"][k], v)
        assert torch.equal(two["params"][k], other["params"][k]), k  # the processes agree exactly
    for k, v in one["buffers"].items():
        assert torch.allclose(two["buffers"][k], v, rtol=1e-12, atol=0), k  # reference energies, scale, shift
    assert math.isclose(two["avg_num_neighbors"], one["avg_num_neighbors"], rel_tol=1e-12)
    # validation metrics are those of the whole set (not averages of per-process averages)
    assert two["best_epoch"] == one["best_epoch"] and len(two["history"]) == len(one["history"]) == 2
    for r1, r2 in zip(one["history"], two["history"]):
        for key in ("valid_loss", "train_loss", "valid_energy_mae_mev_per_atom", "valid_forces_mae_mev_per_a"):
            assert math.isclose(r2[key], r1[key], rel_tol=1e-6), key
        assert r2["lr"] == r1["lr"]
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731
    assert untimed(two["history"]) == untimed(other["history"])
    assert two["best_metrics"]["n_structures"] == one["best_metrics"]["n_structures"]
    if "ema" in one:  # the EMA and the training weights in process 0's checkpoint
        for a, b in zip(two["ema"], one["ema"]):
            _close(a, b)
        for k, v in one["train_state_dict"].items():
            _close(two["train_state_dict"][k], v)


@needs_compiled_step
def test_compiled_training_on_two_processes_equals_eager_on_one(runs):
    """train(compile=True) under two processes: each process's compiled step computes its share of the global
    batch (share_scales), the gradients are summed, and the weights are the one-process eager run's. Process 0
    has an empty part in the last step of each epoch (it takes the eager way there and joins the sums)."""
    one, two, other = runs["one"]["local"], runs[0]["local_compiled"], runs[1]["local_compiled"]
    for k, v in one["params"].items():
        _close(two["params"][k], v)
        assert torch.equal(two["params"][k], other["params"][k]), k
    for r1, r2 in zip(one["history"], two["history"]):
        assert math.isclose(r2["train_loss"], r1["train_loss"], rel_tol=1e-9)
        assert math.isclose(r2["valid_loss"], r1["valid_loss"], rel_tol=1e-6)
    # the compiled step ran: process 0 on 2 of the 3 steps per epoch (an empty part in the third), process 1 on 3
    assert (runs[0]["compiled_calls"], runs[1]["compiled_calls"], runs["one"]["compiled_calls"]) == (4, 6, 6)


def test_steps_take_uneven_parts_and_an_empty_one(runs):
    """The settings really exercise parts of different sizes and a process with nothing to do."""
    parts = [[len(distributed.Ranks(r, SIZE).part(n)) for r in range(SIZE)] for n in (3, 3, 1)]
    assert parts == [[1, 2], [1, 2], [0, 1]]
    # and a plain average of the two processes' losses would not be the global batch's loss
    train_set, _ = _dataset()
    model = local_model()
    losses = []
    for r in range(SIZE):
        batch = collate([train_set[k] for k in distributed.Ranks(r, SIZE).part(3)])
        pred = model(batch, compute_forces=True, compute_stress=bool(batch.has_stress.any()))
        losses.append(float(weighted_loss(pred, batch, WEIGHTS)[0].detach()))
    assert not math.isclose(sum(losses) / SIZE, runs["one"]["grad_local"][0], rel_tol=1e-3)


def test_only_process_zero_writes_and_the_files_are_complete(runs):
    """Process 1 ran with every run-folder write raising; process 0 wrote a complete run."""
    folder = runs["tmp"] / "runs" / "resumed"
    for name in ("checkpoint.pt", "model.pt", "log.csv", "learning_curve.png"):
        assert (folder / name).is_file(), name
    assert len((folder / "log.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    best = load_model(folder / "model.pt")
    assert best.config["avg_num_neighbors"] == runs[0]["resumed"]["avg_num_neighbors"]


def test_ranks_parts_tile_the_range():
    for n in range(0, 9):
        for size in (1, 2, 3, 4):
            parts = [list(distributed.Ranks(r, size).part(n)) for r in range(size)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_bad_settings_are_clear_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        with distributed.process_group("cpu", backend="nccl"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no|0 CUDA GPUs"):
            with distributed.process_group("cuda"):
                pass
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        with distributed.process_group("cuda:1"):
            pass
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(ValueError, match="MASTER_PORT"):
        with distributed.process_group("cpu"):
            pass
    monkeypatch.setenv("WORLD_SIZE", "1")
    with distributed.process_group("cpu") as (ranks, device):
        assert ranks is distributed.SINGLE and device == "cpu"


def test_label_counts_follow_the_loss_masks():
    train_set, _ = _dataset()
    batch = collate(train_set[:3])
    n_atoms = batch.num_atoms.tolist()
    has_stress = batch.has_stress.tolist()
    counts = distributed.label_counts(batch, ["energy", "forces", "stress"])
    assert counts == [2, 3 * (n_atoms[0] + n_atoms[1]), 9 * sum(has_stress)]
    with pytest.raises(ValueError, match="'charges'"):
        distributed.label_counts(batch, ["charges"])


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_command_line_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m cartlorem.cli train`: one summary, a loadable model, a
    two-epoch log, the config (the resume under two processes is tested above, through ``train``)."""
    import ase.io

    ase.io.write(tmp_path / "train.xyz", emt_frames(8, seed=2))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    base = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "cartlorem.cli", "train",
            "--train", str(tmp_path / "train.xyz"), "--out", str(tmp_path / "run"), "--cutoff", "3",
            "--channels", "4", "--num-layers", "1", "--long-range", "none", "--batch-size", "4",
            "--no-progress", "--threads", "1"]
    done = subprocess.run(base + ["--epochs", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("stopped after epoch 2") == 1, done.stdout  # process 0 alone prints
    assert (tmp_path / "run" / "config.yaml").is_file()
    log = (tmp_path / "run" / "log.csv").read_text().strip().splitlines()
    assert len(log) == 3
    model = load_model(tmp_path / "run" / "model.pt")
    assert model.config["channels"] == 4
    # a refusal met by every process is said once, by process 0 (each process printed it: 8 lines for 8 processes)
    again = subprocess.run(base + ["--epochs", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode != 0
    assert again.stderr.count("already holds a training run") == 1, again.stderr


def test_a_process_whose_peer_stopped_says_so_in_one_line(monkeypatch, capsys):
    """Under torchrun, when process 0 stopped (a refused checkpoint write), process 1 died in its next collective with
    gloo's 38-line "Connection closed by peer" traceback, burying process 0's one-line reason. A collective of a group
    that was up now ends process 1 with one line; errors of the group's start-up (nobody at MASTER_ADDR), process 0's
    own errors and other errors are left as they are."""
    from cartlorem import cli
    from cartlorem.training import distributed

    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: None)  # a group "up" at once
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:11151")

    def collective_fails(args):
        with distributed.process_group("cpu"):
            raise gone

    monkeypatch.setattr(cli, "_cmd_train", collective_fails)
    argv = ["train", "--train", "x.xyz", "--out", "run"]
    monkeypatch.setenv("RANK", "1")
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("error: process 1 stopped: another process of the run ended first (process 0's message "
                           "says why)"), err
    monkeypatch.setenv("RANK", "0")  # process 0 has no peer to blame: the error is its own
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        cli.main(argv)
    monkeypatch.setenv("RANK", "1")

    def start_fails(**kwargs):  # nobody listening at MASTER_ADDR: torch's own error names the address
        raise RuntimeError("DistNetworkError: failed to connect to 127.0.0.1:29999 (Connection reset by peer)")

    monkeypatch.setattr(torch.distributed, "init_process_group", start_fails)
    with pytest.raises(RuntimeError, match="failed to connect"):
        cli.main(argv)


@pytest.mark.parametrize("race", [True, False])
def test_on_old_torch_gloo_gets_a_moment_before_the_group_is_destroyed(monkeypatch, race):
    """torch < 2.8: destroy_process_group could deadlock with a gloo worker thread still freeing a finished
    collective's tensor (pytorch#154976; _LAST kept only the last all-reduce's). On torch 2.3.1 a helper's
    reproducer hung 8 of 12 times after a broadcast_object_list and 0 of 12 with the pause; a cartlorem run stalled
    once in 16 NaN-loss exits before and never in 28 exits after. CI's torch has no race: no pause there."""
    from cartlorem.training import distributed

    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: None)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(distributed.time, "sleep", lambda s: calls.append(("sleep", s)))
    monkeypatch.setattr(distributed, "_GLOO_EXIT_RACE", race)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29999")):
        monkeypatch.setenv(name, value)
    with distributed.process_group("cpu"):
        pass
    assert calls == ([("sleep", 0.1)] if race else []) + ["destroy"]


def test_refusals_under_torchrun_are_said_once_but_a_process_s_own_by_it(monkeypatch, capsys):
    """Every process of a training run meets the same refusals, so process 0 alone says them; a refusal of one
    process's own (no GPU for its LOCAL_RANK) is said by that process, and other commands say their errors wherever
    they run (a worker's subprocess inherits WORLD_SIZE and RANK)."""
    from cartlorem import cli
    from cartlorem.training import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def refused(args):
        raise ValueError("--lr must be positive")

    monkeypatch.setattr(cli, "_cmd_train", refused)
    argv = ["train", "--train", "x.xyz", "--out", "run"]
    assert cli.main(argv) == 2 and capsys.readouterr().err == ""  # said by process 0, not once per process
    monkeypatch.setenv("RANK", "0")
    assert cli.main(argv) == 2 and capsys.readouterr().err.strip() == "error: --lr must be positive"
    monkeypatch.setenv("RANK", "1")

    def no_gpu(args):
        raise distributed.LocalProcessError("process 1 (LOCAL_RANK 1) needs GPU 1")

    monkeypatch.setattr(cli, "_cmd_train", no_gpu)
    assert cli.main(argv) == 2 and "needs GPU 1" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", "missing.pt", "--data", "missing.xyz"]) == 2
    assert "error:" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "one")  # not a number: the process group's start-up names it; main does not crash
    monkeypatch.setattr(cli, "_cmd_train", refused)
    assert cli.main(argv) == 2 and "--lr must be positive" in capsys.readouterr().err
