"""Training loop, checkpoints and metrics on tiny models and small EMT data made on the fly."""

import math

import numpy as np
import pytest
import torch

from cartlorem import CartLorem, load_model
from cartlorem.data import dataset_statistics, fit_reference_energies, read_dataset
from cartlorem.evaluate import evaluate, metrics, predict
from cartlorem.train import NonFiniteLossError, train, validation_loss
from cartlorem.training import DEFAULT_WEIGHTS
from conftest import emt_frames, needs_torch, works  # noqa: E402  (tests/ is on sys.path under pytest)

CUTOFF = 3.0
TINY = dict(channels=8, num_layers=2, correlation=2, num_basis=4, radial_hidden=8, readout_hidden=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    graphs = read_dataset(emt_frames(16, seed=0), CUTOFF)
    return graphs[:12], graphs[12:]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CartLorem([29, 47], cutoff=CUTOFF, long_range=None, **TINY).double()


def loss_on(model, graphs, weights=None):
    w = {**DEFAULT_WEIGHTS, **(weights or {})}  # what train() optimises unless told otherwise
    return validation_loss(metrics(predict(model, graphs)), w)


SETTINGS = dict(batch_size=4, lr=1e-2, progress=False, seed=3)


def test_statistics_and_training_lower_the_loss(data):
    train_set, valid_set = data
    model = tiny_model()
    train(model, train_set, valid_set, epochs=0, **SETTINGS)  # sets the statistics only
    refs = fit_reference_energies(train_set, [29, 47])
    stats = dataset_statistics(train_set, refs)
    assert torch.allclose(model.atomic_energies, torch.tensor([refs[29], refs[47]], dtype=torch.float64))
    assert math.isclose(float(model.scale), stats["forces_rms"], rel_tol=1e-12)
    assert math.isclose(model.config["avg_num_neighbors"], stats["avg_num_neighbors"], rel_tol=1e-12)

    before = loss_on(model, train_set)
    result = train(model, train_set, valid_set, epochs=6, statistics=False, **SETTINGS)
    after = loss_on(model, train_set)
    assert after < 0.7 * before
    assert result.epochs_completed == 6 and len(result.history) == 6
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # the returned model holds the best epoch's (EMA) weights
    best = result.history[result.best_epoch - 1]
    assert math.isclose(loss_on(model, valid_set), best["valid_loss"], rel_tol=1e-9)


def test_outputs_and_best_model_file(data, tmp_path):
    train_set, valid_set = data
    model = tiny_model()
    result = train(model, train_set, valid_set, epochs=2, out_dir=tmp_path, **SETTINGS)
    for name in ("checkpoint.pt", "model.pt", "log.csv", "learning_curve.png"):
        assert (tmp_path / name).is_file(), name
    rows = (tmp_path / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith(
        "epoch,lr,train_loss,valid_loss,valid_energy_mae_mev_per_atom,valid_forces_mae_mev_per_a"
    )
    assert len(rows) == 3
    assert rows[0].endswith(",metrics_on") and all(r.endswith(",validation") for r in rows[1:])
    best = load_model(tmp_path / "model.pt").double()
    assert evaluate(best, valid_set) == pytest.approx(evaluate(model, valid_set), rel=1e-10)
    assert result.model_path == str(tmp_path / "model.pt")
    # the checkpoint's "model" entry is the current EMA model, readable by load_model
    assert load_model(tmp_path / "checkpoint.pt").config == model.config
    # a second fresh run into the same folder is refused unless asked for
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny_model(), train_set, valid_set, epochs=1, out_dir=tmp_path, **SETTINGS)


def test_resume_continues_exactly(data, tmp_path):
    train_set, valid_set = data
    ref = train(tiny_model(), train_set, valid_set, epochs=3, out_dir=tmp_path / "a", **SETTINGS)

    train(tiny_model(), train_set, valid_set, epochs=2, out_dir=tmp_path / "b", **SETTINGS)
    first = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert first["epoch"] == 2
    # a differently initialised model object: everything comes from the checkpoint
    resumed = train(
        tiny_model(seed=7), train_set, valid_set, epochs=3, out_dir=tmp_path / "b", resume=True, **SETTINGS
    )
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert b["epoch"] == 3 and b["step"] == a["step"]
    for k, v in a["train_state_dict"].items():
        assert torch.allclose(v, b["train_state_dict"][k], rtol=1e-9, atol=1e-12), k
    for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for ra, rb in zip(ref.history, resumed.history):
        assert rb["valid_loss"] == pytest.approx(ra["valid_loss"], rel=1e-9)
        assert rb["lr"] == ra["lr"]
    assert len((tmp_path / "b" / "log.csv").read_text().strip().splitlines()) == 4  # header + 3 epochs


def test_resume_refuses_another_model(data, tmp_path):
    train_set, valid_set = data
    train(tiny_model(), train_set, valid_set, epochs=1, out_dir=tmp_path, **SETTINGS)
    other = CartLorem([29, 47], cutoff=CUTOFF, long_range=None, **{**TINY, "channels": 4}).double()
    with pytest.raises(ValueError, match="different model.*channels"):
        train(other, train_set, valid_set, epochs=2, out_dir=tmp_path, resume=True, **SETTINGS)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(
            tiny_model(), train_set, valid_set, epochs=2, out_dir=tmp_path / "none", resume=True, **SETTINGS
        )


def test_nonfinite_loss_stops_and_keeps_the_best(data, tmp_path):
    train_set, valid_set = data
    train(tiny_model(), train_set, valid_set, epochs=1, out_dir=tmp_path, **SETTINGS)
    best_bytes = (tmp_path / "model.pt").read_bytes()
    ckpt_bytes = (tmp_path / "checkpoint.pt").read_bytes()

    poisoned = list(train_set)
    poisoned[5] = poisoned[5].replace(energy=torch.tensor([float("nan")], dtype=torch.float64))
    with pytest.raises(NonFiniteLossError) as err:
        train(tiny_model(), poisoned, valid_set, epochs=3, out_dir=tmp_path, resume=True, **SETTINGS)
    message = str(err.value)
    assert "non-finite loss" in message and "epoch 2, batch" in message
    assert "5" in message.split("training structures")[1].split("]")[0]  # names the culprit
    assert "epoch 1" in message and "model.pt" in message
    assert (tmp_path / "model.pt").read_bytes() == best_bytes
    assert (tmp_path / "checkpoint.pt").read_bytes() == ckpt_bytes
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 1


def test_checkpoint_write_is_atomic(data, tmp_path, monkeypatch):
    train_set, valid_set = data
    train(tiny_model(), train_set, valid_set, epochs=1, out_dir=tmp_path, **SETTINGS)
    before = {n: (tmp_path / n).read_bytes() for n in ("checkpoint.pt", "model.pt")}

    def crash(obj, f, *args, **kwargs):  # a crash half-way through writing
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_model(), train_set, valid_set, epochs=2, out_dir=tmp_path, resume=True, **SETTINGS)
    monkeypatch.undo()
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content, name
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 1
    load_model(tmp_path / "model.pt")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_max_time_stops_early(data):
    train_set, valid_set = data
    result = train(tiny_model(), train_set, valid_set, epochs=50, max_time=1e-3, **SETTINGS)
    assert result.stop_reason == "max_time" and result.epochs_completed == 1


def test_metrics_equal_hand_computed(data):
    train_set, valid_set = data
    graphs = train_set[:7]  # crystals (with stress) and clusters
    model = tiny_model()
    model.set_statistics(atomic_energies={29: -0.1, 47: 0.2}, scale=0.5)
    m = evaluate(model, graphs, batch_size=3)

    e_err, f_err, s_err = [], [], []
    for g in graphs:
        out = model(g, compute_stress=bool(g.pbc.any()))
        n = g.positions.shape[0]
        e_err.append(float(out["energy"][0].detach() - g.energy[0]) / n)
        f_err.append((out["forces"] - g.forces).detach().numpy().ravel())
        if bool(g.has_stress[0]):
            s_err.append((out["stress"] - g.stress).detach().numpy().ravel())
    e_err, f_err, s_err = np.array(e_err) * 1e3, np.concatenate(f_err) * 1e3, np.concatenate(s_err) * 1e3
    expect = {
        "energy_mae_mev_per_atom": np.abs(e_err).mean(),
        "energy_rmse_mev_per_atom": np.sqrt((e_err**2).mean()),
        "forces_mae_mev_per_a": np.abs(f_err).mean(),
        "forces_rmse_mev_per_a": np.sqrt((f_err**2).mean()),
        "stress_mae_mev_per_a3": np.abs(s_err).mean(),
        "stress_rmse_mev_per_a3": np.sqrt((s_err**2).mean()),
    }
    for k, v in expect.items():
        assert m[k] == pytest.approx(v, rel=1e-10), k
    assert m["n_structures"] == 7 and m["n_atoms"] == sum(g.positions.shape[0] for g in graphs)

    clusters = [g for g in graphs if not bool(g.pbc.any())]
    assert "stress_mae_mev_per_a3" not in evaluate(model, clusters)


class PairModel(torch.nn.Module):
    """Not a CartLorem: E = Σ_Z e_Z n_Z + Σ_edges a exp(−b r); forces and stress by autograd."""

    def __init__(self):
        super().__init__()
        self.e0 = torch.nn.Parameter(torch.zeros(119, dtype=torch.float64))
        self.a = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def energy(self, graph, positions, cell):
        r = graph.edge_vectors(positions, cell).norm(dim=-1)
        node = self.e0[graph.species].index_add(0, graph.edge_index[0], 0.5 * self.a * torch.exp(-self.b * r))
        return {"energy": torch.zeros(graph.num_graphs, dtype=node.dtype).index_add(0, graph.batch, node)}

    def forward(self, graph, compute_forces=True, compute_stress=False, create_graph=False):
        from cartlorem.forces import with_derivatives

        return with_derivatives(self.energy, graph, compute_forces=compute_forces,
                                compute_stress=bool(compute_stress), create_graph=create_graph)


def test_trains_any_module_with_the_output_contract(data, tmp_path):
    train_set, valid_set = data
    model, energy_only = PairModel(), {"energy": 1.0, "forces": 0.0, "stress": 0.0}
    before = loss_on(model, train_set, energy_only)
    with pytest.raises(TypeError, match="statistics=False"):
        train(model, train_set, valid_set, epochs=1, **SETTINGS)
    settings = {**SETTINGS, "lr": 0.1}
    result = train(model, train_set, valid_set, epochs=4, weights=energy_only, statistics=False,
                   out_dir=tmp_path, **settings)
    assert loss_on(model, train_set, energy_only) < 0.7 * before
    assert result.epochs_completed == 4
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["class"] == "PairModel"
    assert torch.equal(saved["state_dict"]["a"], model.a.detach())
    # resume restores the same module class; another module's checkpoint is refused
    train(PairModel(), train_set, valid_set, epochs=5, weights=energy_only, statistics=False, out_dir=tmp_path,
          resume=True, **settings)
    with pytest.raises(ValueError, match="different model"):
        train(tiny_model(), train_set, valid_set, epochs=6, out_dir=tmp_path, resume=True, **SETTINGS)


def test_checkpoint_is_weights_only_and_files_are_world_readable(data, tmp_path):
    import os

    train_set, valid_set = data
    train(tiny_model(), train_set, valid_set, epochs=1, out_dir=tmp_path, **SETTINGS)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain tensors and containers
    assert ckpt["epoch"] == 1 and ckpt["model"]["config"]["channels"] == TINY["channels"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint.pt", "model.pt", "log.csv", "learning_curve.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_dataloader_workers_give_the_same_run(data):
    train_set, valid_set = data
    a = train(tiny_model(), train_set, valid_set, epochs=2, **SETTINGS)
    b = train(tiny_model(), train_set, valid_set, epochs=2, workers=2, **SETTINGS)
    assert [r["valid_loss"] for r in a.history] == pytest.approx([r["valid_loss"] for r in b.history], rel=1e-12)


def test_dataloader_workers_start_under_forkserver(tmp_path):
    """Under the forkserver start method (Python 3.14's default on Linux) starting a loader worker sent every tensor
    of the data set as a file descriptor in one message: 100 structures failed with "too many fds". A process of its
    own, whose default start method is forkserver, collates them with two workers."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import multiprocessing, sys
        import numpy as np
        from ase.build import molecule
        from cartlorem.graph import atoms_to_graph
        from cartlorem.training import epoch_loader

        if __name__ == "__main__":
            multiprocessing.set_start_method("forkserver")
            graphs = [atoms_to_graph(molecule("H2O"), 3.0) for _ in range(100)]
            _, loader = epoch_loader(graphs, 10, np.random.default_rng(0), workers=2)
            print(sum(b.num_graphs for b in loader))
    """)
    (tmp_path / "run.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "100"


def test_epochs_zero_writes_no_model(data, tmp_path):
    train_set, valid_set = data
    result = train(tiny_model(), train_set, valid_set, epochs=0, out_dir=tmp_path, **SETTINGS)
    assert result.model_path is None and not (tmp_path / "model.pt").exists()


def test_epoch_batches_cover_each_graph_once(make_molecule):
    """The trainer's batches (moved here from data.batches, which the DataLoader replaced)."""
    from cartlorem.graph import atoms_to_graph
    from cartlorem.training import epoch_loader

    graphs = [atoms_to_graph(make_molecule(n_atoms=3 + k % 4, seed=k), 3.0) for k in range(10)]
    chunks, loader = epoch_loader(graphs, 4, np.random.default_rng(0))
    assert [b.num_graphs for b in loader] == [4, 4, 2] == [len(c) for c in chunks]

    def order(rng, workers=0):
        seen = []
        chunks, loader = epoch_loader(graphs, 3, rng, workers)
        for chunk, b in zip(chunks, loader):
            assert torch.equal(b.positions, torch.cat([graphs[k].positions for k in chunk]))
            for k in range(b.num_graphs):
                pos = b.positions[b.batch == k]
                seen.append(next(n for n, g in enumerate(graphs) if torch.equal(g.positions, pos)))
        assert seen == [k for c in chunks for k in c]
        return seen

    assert sorted(order(np.random.default_rng(0))) == list(range(10))
    assert order(np.random.default_rng(0)) == order(np.random.default_rng(0), workers=2)
    assert order(np.random.default_rng(0)) != order(np.random.default_rng(1))
    rng = np.random.default_rng(0)
    assert order(rng) != order(rng)  # one generator, successive epochs differ
    with pytest.raises(ValueError, match="batch_size"):
        epoch_loader(graphs, 0, rng)


@pytest.mark.parametrize("setting, value", [
    ("clip_grad", -1.0),  # trained before, with every clipped gradient turned round
    ("clip_grad", 0.0),
    ("scheduler_factor", 0.0),  # trained before: the first plateau set the rate to 0
    ("scheduler_factor", 1.5),
    ("scheduler_patience", -1),
    ("patience", 0),  # stopped after one epoch before
    ("valid_batch_size", 0),  # taken as "the default" before
    ("weight_decay", -1.0),
    ("ema_decay", 1.0),
    # the command line refused these; train() took them: inf failed later as a "non-finite loss", max_time 0
    # trained one batch and NaN was ignored, 2.5 epochs or structures per batch were truncated
    ("weight_decay", math.inf),
    ("lr", math.inf),
    ("max_time", 0.0),
    ("max_time", math.nan),
    ("epochs", 2.5),
    ("batch_size", 2.5),
    ("epochs", math.inf),
    ("epochs", math.nan),
    ("batch_size", math.inf),
])
def test_bad_optimiser_settings_are_refused_up_front(data, tmp_path, setting, value):
    """A ValueError naming the setting before anything is trained or written, not a deep torch error or a run
    that trains silently wrong."""
    train_set, valid_set = data
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"^{setting} must be|; {setting} must be"):
        train(tiny_model(), train_set, valid_set, out_dir=out, **{"epochs": 1, **SETTINGS, setting: value})
    assert not out.exists()


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python example, as written, on the bundled data (budget cut to seconds)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = text.split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "epochs=20" in code and "split(" in code and "graphs[:" not in code
    code = code.replace("epochs=20", "epochs=1, max_time=5, progress=False")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "run" / "model.pt").is_file()
    atoms = namespace["atoms"]
    assert np.isfinite(atoms.get_potential_energy()) and atoms.calc.results["charges"].shape == (len(atoms),)


def test_training_data_may_be_a_lazy_dataset(data):
    """A map-style dataset that builds each graph when asked trains exactly like the list."""
    train_set, valid_set = data

    class Lazy(torch.utils.data.Dataset):
        def __init__(self, graphs):
            self.graphs, self.reads = graphs, 0

        def __len__(self):
            return len(self.graphs)

        def __getitem__(self, k):
            if not 0 <= k < len(self.graphs):
                raise IndexError(k)
            self.reads += 1
            return self.graphs[k].replace()  # a fresh object every time

    lazy = Lazy(train_set)
    a = train(tiny_model(), train_set, valid_set, epochs=2, **SETTINGS)
    b = train(tiny_model(), lazy, Lazy(valid_set), epochs=2, **SETTINGS)
    assert lazy.reads > 2 * len(train_set)
    assert [r["valid_loss"] for r in b.history] == [r["valid_loss"] for r in a.history]


def test_epoch_batches_shared_out_over_processes(make_molecule):
    """Several processes draw the same global batches; their parts tile each batch in rank order
    (a part may be empty: the loader yields None for it)."""
    from cartlorem.graph import atoms_to_graph
    from cartlorem.training import epoch_loader
    from cartlorem.training.distributed import Ranks

    graphs = [atoms_to_graph(make_molecule(n_atoms=3 + k % 3, seed=k), 3.0) for k in range(7)]
    whole, _ = epoch_loader(graphs, 3, np.random.default_rng(5))
    parts = []
    for rank in range(3):
        chunks, loader = epoch_loader(graphs, 3, np.random.default_rng(5), ranks=Ranks(rank, 3))
        for chunk, b in zip(chunks, loader):
            if chunk:
                assert torch.equal(b.positions, torch.cat([graphs[k].positions for k in chunk]))
            else:
                assert b is None
        parts.append(chunks)
    assert [sum((p[s] for p in parts), []) for s in range(len(whole))] == whole
    assert [len(p[-1]) for p in parts] == [0, 0, 1]  # the last global batch holds one structure


def test_run_folder_of_other_processes_writes_nothing(data, tmp_path):
    """RunFolder(write=False): the checks and reads of process 0's folder, and no file written."""
    from cartlorem.training import RunFolder

    folder = RunFolder(tmp_path / "run", write=False)
    folder.open(resume=False, overwrite=False)
    folder.save_checkpoint({"epoch": 1})
    folder.save_best(tiny_model())
    folder.write_log([{"epoch": 1, "lr": 0.1}], plot=True)
    assert folder.plot([{"epoch": 1}]) and list((tmp_path / "run").iterdir()) == []
    RunFolder(tmp_path / "run").save_checkpoint({"epoch": 1})
    assert RunFolder(tmp_path / "run", write=False).load_checkpoint()["epoch"] == 1


@needs_torch(works(lambda: torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)),
             "the fused Adam on the CPU", "2.4")
def test_trainer_optimizer_is_fused_adam_and_matches_the_foreach_one():
    """make_optimizer picks torch's fused Adam on CPU; its steps equal the foreach implementation's."""
    from cartlorem.training.loop import make_optimizer

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    opt = make_optimizer(params, 1e-2, 1e-3, amsgrad=True)
    assert opt.defaults["fused"]
    ref = torch.optim.Adam(twins, lr=1e-2, weight_decay=1e-3, amsgrad=True, foreach=True)
    for _ in range(4):
        grads = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in params]
        for p, t, gr in zip(params, twins, grads):
            p.grad, t.grad = gr.clone(), gr.clone()
        opt.step()
        ref.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=1e-12, atol=1e-14)


def test_train_and_load_model_leave_the_callers_random_state(data, tmp_path):
    """train() left torch's generator at manual_seed(seed) after every fresh run, so models built in a loop of
    train() calls (a committee for active learning) all started from the same weights and ended identical; and
    load_model drew the random initial weights it then replaced from the caller's stream."""
    import random

    train_set, valid_set = data
    torch.manual_seed(7)
    random.seed(7)
    members = []
    for k in range(3):
        model = CartLorem([29, 47], cutoff=CUTOFF, long_range=None, **TINY).double()
        state, py = torch.get_rng_state(), random.getstate()
        train(model, train_set, valid_set, epochs=1, out_dir=tmp_path / f"m{k}", **SETTINGS)
        assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py
        members.append(predict(model, valid_set).energy_pred)
    assert not np.array_equal(members[1], members[2]) and not np.array_equal(members[0], members[1])
    state = torch.get_rng_state()
    load_model(tmp_path / "m0" / "model.pt")
    assert torch.equal(torch.get_rng_state(), state)


def test_stress_predictions_do_not_depend_on_the_batch(data):
    """A molecule sharing a batch with a stress-labelled cell got the model's zero stress row, and NaN in a batch
    of its own; a periodic cell without a stress label got a stress or NaN by its batch. Rows not asked for are
    NaN in any batch now: molecules always, unlabelled cells unless compute_stress=True."""
    train_set, _ = data
    cell = next(g for g in train_set if bool(g.pbc.all()) and bool(g.has_stress[0]))
    molecule = next(g for g in train_set if not bool(g.pbc.any()))
    unlabelled = cell.replace(has_stress=torch.tensor([False]))
    graphs = [molecule, cell, unlabelled]
    model = tiny_model()
    runs = [predict(model, graphs, batch_size=b).stress_pred for b in (1, 3)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.isnan(runs[0][0]).all() and np.isfinite(runs[0][1]).all() and np.isnan(runs[0][2]).all()
    every = [predict(model, graphs, batch_size=b, compute_stress=True).stress_pred for b in (1, 3)]
    np.testing.assert_allclose(every[0], every[1], rtol=1e-12, atol=1e-15)
    assert np.isnan(every[0][0]).all() and np.allclose(every[0][2], every[0][1], rtol=1e-12)
