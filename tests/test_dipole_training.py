"""Training on molecular dipoles and Born effective charges (issue 14 items 2 and 5).

Label reading (keys, shapes, the row-major [N, 9] layout), the loss terms against hand-computed
values, the double backward of the Born-charge loss against finite differences of the loss, short
trainings that lower the dipole / Born-charge errors, the errors for impossible requests, and the
MAEs in ``cartlorem evaluate``. No tblite: synthetic labels, or the shipped ``bec_water.xyz``.
"""

import json
import logging
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator

import cartlorem
from cartlorem import cli
from cartlorem.config import Config
from cartlorem.data import read_dataset
from cartlorem.evaluate import evaluate, metrics, predict
from cartlorem.graph import collate
from cartlorem.train import train
from cartlorem.training.loss import charge_outputs, check_loss_labels, loss_weights, validation_loss, weighted_loss

pytestmark = pytest.mark.usefixtures("one_thread")

BEC_FILE = Path(cartlorem.__file__).resolve().parent / "datasets" / "bec_water.xyz"
Q_WATER = {1: 0.4, 8: -0.8}  # e: fixed charges that define the synthetic dipole labels


def tiny(long_range="multipole", species=(1, 8), seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return cartlorem.CartLorem(list(species), cutoff=3.0, long_range=long_range, channels=8, num_layers=1,
                               correlation=2, num_basis=4, radial_hidden=8, readout_hidden=8).to(dtype)


def water_frames(n, seed=0):
    """n structures of one or two rattled waters off the origin, labelled with P = Σ_i q_Z r_i (e·Å) for
    q_H = 0.4, q_O = −0.8 in atoms.info["dipole"], and zero energy and forces."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        a = molecule("H2O")
        if k % 2:
            b = molecule("H2O")
            b.rotate(float(rng.uniform(0, 360)), rng.normal(size=3))
            b.positions += [0.0, 0.0, 3.2]
            a += b
        a.rotate(float(rng.uniform(0, 360)), rng.normal(size=3))
        a.positions += rng.normal(scale=0.08, size=a.positions.shape) + rng.uniform(-2, 2, size=3)
        a.info["dipole"] = np.array([Q_WATER[z] for z in a.numbers]) @ a.positions
        a.calc = SinglePointCalculator(a, energy=0.0, forces=np.zeros((len(a), 3)))
        frames.append(a)
    return frames


# ------------------------------------------------------------------------------------------------
# labels


def test_labels_are_read_with_their_keys_and_layout(tmp_path):
    a = molecule("H2O")
    a.positions += [0.5, -0.3, 0.2]
    z = np.arange(27, dtype=float).reshape(3, 9) / 10  # row-major: z[i, 3a + b] = Z*_i,ab
    a.arrays["my_bec"] = z
    a.info["p_ref"] = np.array([0.1, -0.2, 0.3])
    a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.zeros((3, 3)), dipole=[1.0, 2.0, 3.0])
    path = tmp_path / "w.xyz"
    ase.io.write(path, [a])  # the extxyz dipole comes back among the calculator results

    (g,) = read_dataset(path, 3.0)  # default keys: "dipole" (calculator results), "born_charges" (absent)
    assert g.has_dipole.tolist() == [True] and g.dipole.tolist() == [[1.0, 2.0, 3.0]]
    assert g.has_born_charges.tolist() == [False] and g.born_charges.abs().sum() == 0
    (g,) = read_dataset(path, 3.0, dipole_key="p_ref", born_charges_key="my_bec")
    assert np.allclose(g.dipole.numpy(), [[0.1, -0.2, 0.3]])
    assert g.has_born_charges.tolist() == [True] and g.born_charges.shape == (3, 3, 3)
    assert g.born_charges[2, 1, 0] == pytest.approx(z[2, 3]) and g.born_charges[0, 0, 2] == pytest.approx(z[0, 2])
    (g,) = read_dataset(path, 3.0, dipole_key=None)
    assert g.has_dipole.tolist() == [False]

    b = molecule("H2O")
    b.calc = SinglePointCalculator(b, energy=-1.0, forces=np.zeros((3, 3)))
    batch = collate(read_dataset([b, a], 3.0, born_charges_key="my_bec"))  # only the second is labelled
    assert batch.has_dipole.tolist() == [False, True] and batch.dipole.shape == (2, 3)
    assert batch.has_born_charges.tolist() == [False, True] and batch.born_charges.shape == (6, 3, 3)


def test_calc_key_reads_ases_born_effective_charges(tmp_path):
    """born_charges_key="calc" reads ASE's born_effective_charges (it looked for results['born_charges'], a name
    no ASE reader gives, and silently found nothing): from an extxyz per-atom property, [N, 9] row-major, and
    from a calculator's [N, 3, 3] (as ase.io.read gives for vasprun.xml), Z*_i,ab in the same places."""
    z = np.random.default_rng(1).normal(size=(3, 3, 3))
    a = molecule("H2O")
    a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.zeros((3, 3)), born_effective_charges=z.reshape(3, 9))
    path = tmp_path / "bec.xyz"
    ase.io.write(path, [a])  # extxyz writes [N, 9] per-atom properties only
    assert "born_effective_charges:R:9" in path.read_text().splitlines()[1]
    assert ase.io.read(path).calc.results["born_effective_charges"].shape == (3, 9)
    b = a.copy()
    b.calc = SinglePointCalculator(b, energy=-1.0, forces=np.zeros((3, 3)), born_effective_charges=z)
    for source in (path, [b]):
        (g,) = read_dataset(source, 3.0, born_charges_key="calc")
        assert g.has_born_charges.tolist() == [True]
        assert np.allclose(g.born_charges.numpy(), z, rtol=0, atol=1e-7)  # z[i, a, b] = Z*_i,ab
    b.calc.results["born_effective_charges"] = z[:, :2]
    with pytest.raises(ValueError, match=r"born_charges label calculator results\['born_effective_charges'\] "
                                         r"has shape \[3, 2, 3\]"):
        read_dataset([b], 3.0, born_charges_key="calc")


def test_bad_labels_are_clear_errors():
    mol = molecule("H2O")
    mol.calc = SinglePointCalculator(mol, energy=-1.0, forces=np.zeros((3, 3)))
    crystal = bulk("NaCl", "rocksalt", a=5.64)
    crystal.calc = SinglePointCalculator(crystal, energy=-1.0, forces=np.zeros((2, 3)))
    crystal.info["dipole"] = [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"frame 1: dipole label atoms.info\['dipole'\] on a structure with pbc"):
        read_dataset([mol, crystal], 3.0)
    slab = crystal.copy()
    slab.pbc = [True, True, False]
    slab.calc = SinglePointCalculator(slab, energy=-1.0, forces=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="frame 0: .*open structures only"):
        read_dataset([slab], 3.0)
    assert read_dataset([crystal], 3.0, dipole_key=None)[0].has_dipole.tolist() == [False]
    mol.calc.results["dipole"] = [1.0, 2.0]  # a message names where the label came from
    with pytest.raises(ValueError, match=r"dipole label calculator results\['dipole'\] has shape \[2\]"):
        read_dataset([mol], 3.0)

    mol.calc.results["dipole"] = [0.0, 0.0, 1.0]
    bad = mol.copy()
    bad.calc = mol.calc
    bad.arrays["born_charges"] = np.zeros((3, 6))
    with pytest.raises(ValueError, match=r"frame 1: born_charges label atoms.arrays\['born_charges'\] has shape "
                                         r"\[3, 6\], expected \[3, 9\]"):
        read_dataset([mol, bad], 3.0)
    bad.arrays["born_charges"] = np.full((3, 9), np.nan)
    with pytest.raises(ValueError, match="frame 0: born_charges .* NaN"):
        read_dataset([bad], 3.0)
    bad = mol.copy()
    bad.calc = mol.calc
    bad.info["dipole"] = [1.0, 2.0]
    with pytest.raises(ValueError, match=r"dipole .* has shape \[2\], expected 3 numbers"):
        read_dataset([bad], 3.0)


def test_shipped_born_charge_set_obeys_the_acoustic_sum_rule():
    frames = ase.io.read(BEC_FILE, ":")
    graphs = read_dataset(frames, 3.0)
    assert len(graphs) > 100 and all(bool(g.has_born_charges[0]) and bool(g.has_dipole[0]) for g in graphs)
    charges = {round(float(g.total_charge[0])) for g in graphs}
    assert charges == {-1, 0, 1}
    for g in graphs:  # Σ_i Z*_i = Q I up to the finite-difference / SCF error recorded in the file
        err = (g.born_charges.sum(0) - g.total_charge[0] * torch.eye(3, dtype=g.born_charges.dtype)).abs().max()
        assert float(err) < 5e-4
    na = torch.cat([g.born_charges[g.species == 11] for g in graphs])  # a bare cation: Z* ≈ +1 I
    assert np.allclose(na.mean(0).numpy(), np.eye(3), atol=0.25)


# ------------------------------------------------------------------------------------------------
# loss terms


def _labelled_batch():
    """Two molecules (2 and 3 atoms); a dipole label on the first only, Born charges on the second only."""
    g1 = cartlorem.graph.atoms_to_graph(Atoms("HH", positions=[[0, 0, 0], [0, 0, 0.8]]), 3.0)
    g2 = cartlorem.graph.atoms_to_graph(Atoms("OHH", positions=[[0, 0, 0], [0, 0.8, 0.5], [0, -0.8, 0.5]]), 3.0)
    zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)
    g1 = g1.replace(energy=zeros(1), forces=zeros(2, 3), stress=zeros(1, 3, 3), has_energy=torch.tensor([False]),
                    has_forces=torch.tensor([False]), has_stress=torch.tensor([False]),
                    dipole=torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64), born_charges=zeros(2, 3, 3),
                    has_dipole=torch.tensor([True]), has_born_charges=torch.tensor([False]))
    z2 = torch.arange(27, dtype=torch.float64).reshape(3, 3, 3) / 27
    g2 = g2.replace(energy=zeros(1), forces=zeros(3, 3), stress=zeros(1, 3, 3), has_energy=torch.tensor([False]),
                    has_forces=torch.tensor([False]), has_stress=torch.tensor([False]),
                    dipole=zeros(1, 3), born_charges=z2, has_dipole=torch.tensor([False]),
                    has_born_charges=torch.tensor([True]))
    return collate([g1, g2]), z2


def test_loss_terms_against_hand_computed_values():
    batch, z2 = _labelled_batch()
    out = {"energy": torch.zeros(2, dtype=torch.float64),
           "dipole": torch.tensor([[0.4, 0.0, 0.3], [9.0, 9.0, 9.0]], dtype=torch.float64),  # row 2 unlabelled
           "born_charges": torch.cat([torch.full((2, 3, 3), 7.0, dtype=torch.float64), z2 + 0.5])}
    out["born_charges"][2, 1, 1] += 1.0  # error 1.5 in one component, 0.5 in the other 26 of the labelled atoms
    w = loss_weights({"dipole": 2.0, "born_charges": 3.0})
    loss, terms = weighted_loss(out, batch, w)
    mse_p = (0.3**2 + 0.2**2 + 0.0**2) / 3  # first structure only
    mse_z = (26 * 0.5**2 + 1.5**2) / 27  # atoms of the second structure only
    assert terms["dipole"] == pytest.approx(mse_p, rel=1e-14)
    assert terms["born_charges"] == pytest.approx(mse_z, rel=1e-14)
    assert float(loss) == pytest.approx(2.0 * mse_p + 3.0 * mse_z, rel=1e-14)
    # weight 0: no term; weight > 0 without the prediction: an error, not a silent zero
    loss0, terms0 = weighted_loss(out, batch, loss_weights())
    assert "dipole" not in terms0 and "born_charges" not in terms0 and float(loss0) == 0.0
    with pytest.raises(ValueError, match="no 'born_charges'.*compute_born_charges=True"):
        weighted_loss({"energy": out["energy"], "dipole": out["dipole"]}, batch, w)
    # the whole-set expression: Σ w · RMSE²
    m = {"dipole_rmse_e_a": 0.2, "born_charges_rmse_e": 0.1, "energy_rmse_mev_per_atom": 3.0}
    assert validation_loss(m, w) == pytest.approx(w["energy"] * 0.003**2 + 2.0 * 0.04 + 3.0 * 0.01, rel=1e-14)
    # what the trainer asks the model for
    assert charge_outputs(loss_weights(), batch) == {}
    assert charge_outputs(w, batch) == {"compute_dipole": True, "compute_born_charges": True}
    assert charge_outputs(w, batch.replace(has_dipole=torch.tensor([False, False]))) == {"compute_born_charges": True}
    with pytest.raises(ValueError, match="unknown loss weight 'dipoles'.*'dipole', 'born_charges'"):
        loss_weights({"dipoles": 1.0})


def test_born_charge_loss_double_backward_matches_finite_differences():
    """d(loss)/dθ through Z* = ∂P/∂r (create_graph) against central differences of the loss in θ."""
    frames = ase.io.read(BEC_FILE, ":")[::30][:4]
    graphs = read_dataset(frames, 3.0)
    batch = collate(graphs)
    model = tiny(species=(1, 8, 11, 17))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    w = loss_weights({"energy": 0.0, "forces": 0.0, "stress": 0.0, "born_charges": 1.0})

    def loss_of(create_graph):
        out = model(batch, compute_forces=False, create_graph=create_graph, **charge_outputs(w, batch))
        return weighted_loss(out, batch, w)[0]

    model.zero_grad()
    loss_of(True).backward()
    params = dict(model.named_parameters())
    checked = 0
    for name in ("long_range_block", "layers.0", "embedding"):
        pname, p = max(((n, q) for n, q in params.items() if n.startswith(name) and q.grad is not None),
                       key=lambda t: float(t[1].grad.abs().max()))
        k = int(p.grad.abs().argmax())
        g = float(p.grad.view(-1)[k])
        h, flat = 1e-5, p.data.view(-1)
        old = float(flat[k])
        values = []
        for sign in (1, -1):
            flat[k] = old + sign * h
            values.append(float(loss_of(False)))
        flat[k] = old
        assert abs(g) > 1e-6, pname
        assert (values[0] - values[1]) / (2 * h) == pytest.approx(g, rel=1e-5, abs=1e-9), pname
        checked += 1
    assert checked == 3


# ------------------------------------------------------------------------------------------------
# training


def test_training_on_dipoles_lowers_the_dipole_error():
    frames = water_frames(16, seed=0)
    graphs = read_dataset(frames, 3.0)
    train_g, valid_g = graphs[:12], graphs[12:]
    results = {}
    for wp in (0.0, 10.0):
        model = tiny(seed=1)
        before = evaluate(model, valid_g)["dipole_mae_e_a"]
        res = train(model, train_g, valid_g, epochs=4, batch_size=4, lr=1e-2, progress=False, patience=None,
                    weights={"energy": 0.0, "forces": 1.0, "dipole": wp}, seed=0)
        results[wp] = (before, evaluate(model, valid_g)["dipole_mae_e_a"], res)
    before, after, res = results[10.0]
    assert before == pytest.approx(results[0.0][0], rel=1e-12)  # same seed, same start
    assert after < 0.3 * before, (before, after)
    assert after < 0.5 * results[0.0][1], results  # the dipole term, not chance, made it better
    assert res.history[-1]["valid_dipole_mae_e_a"] is not None
    assert res.best_metrics["dipole_mae_e_a"] == pytest.approx(after, rel=1e-6)


def test_training_on_born_charges_lowers_the_born_charge_error():
    frames = [a for a in ase.io.read(BEC_FILE, ":") if a.info["system"] in ("w2", "na_w2")][::4]
    graphs = read_dataset(frames, 3.0, dipole_key=None)
    train_g, valid_g = graphs[:10], graphs[10:]
    after = {}
    for wz in (0.0, 10.0):
        model = tiny(species=(1, 8, 11), seed=2)
        before = evaluate(model, valid_g)["born_charges_mae_e"]
        train(model, train_g, valid_g, epochs=3, batch_size=5, lr=1e-2, progress=False, patience=None,
              weights={"energy": 0.1, "forces": 1.0, "born_charges": wz}, seed=0)
        after[wz] = evaluate(model, valid_g)["born_charges_mae_e"]
    assert after[10.0] < 0.6 * before and after[10.0] < 0.6 * after[0.0], (before, after)


def test_a_calculator_dipole_of_a_periodic_structure_or_slab_is_ignored(tmp_path, caplog):
    """DFT and xTB codes report a dipole for cells and slabs too, and ase.io.write stores it in extxyz, whence
    ase.io.read puts it among the calculator results: such data is read (the dipole left out, it is not defined
    there) rather than refused whole, for any dipole weight and model."""
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    crystal.calc = SinglePointCalculator(crystal, energy=-10.0, forces=np.zeros((8, 3)), stress=np.zeros(6),
                                         dipole=np.array([0.1, 0.0, 0.0]))
    slab = crystal.copy()
    slab.pbc = [True, True, False]
    slab.calc = SinglePointCalculator(slab, energy=-9.0, forces=np.zeros((8, 3)), dipole=np.array([0.0, 0.0, 0.3]))
    mol = water_frames(1)[0]
    mol.calc = SinglePointCalculator(mol, energy=0.0, forces=np.zeros((3, 3)), dipole=mol.info.pop("dipole"))
    path = tmp_path / "mixed.xyz"
    ase.io.write(path, [crystal, slab, mol])
    assert all("dipole" in a.calc.results for a in ase.io.read(path, ":"))
    for key in ("dipole", "calc"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cartlorem.data"):
            graphs = read_dataset(path, 3.0, dipole_key=key)
        assert "2 periodic structure(s) or slab(s) (frames 0, 1) is not a label" in caplog.text  # said, once
        assert [g.has_dipole.item() for g in graphs] == [False, False, True]
        assert graphs[0].dipole.abs().sum() == 0 and np.allclose(graphs[2].dipole.numpy(), mol.calc.results["dipole"])
        assert [g.energy.item() for g in graphs] == [-10.0, -9.0, 0.0]
    short = tiny(long_range=None, species=(1, 8, 11, 17))
    train(short, graphs, epochs=1, progress=False)  # dipole weight 0, short-range model
    assert evaluate(short, graphs)["n_dipole"] == 0
    assert evaluate(tiny(species=(1, 8, 11, 17)), graphs)["n_dipole"] == 1  # the molecule's


def test_impossible_dipole_or_born_charge_training_is_a_clear_error():
    graphs = read_dataset(water_frames(4), 3.0)
    w = {"dipole": 1.0}
    with pytest.raises(ValueError, match="dipole loss weight.*no long range"):
        train(tiny(long_range=None), graphs, epochs=1, progress=False, weights=w)
    with pytest.raises(ValueError, match=r"born_charges loss weight is 2.0 but none of the 4 training structures "
                                         r"carries a born_charges label.*born_charges_key"):
        train(tiny(), graphs, epochs=1, progress=False, weights={"born_charges": 2.0})
    unlabelled = read_dataset(water_frames(4), 3.0, dipole_key=None)
    with pytest.raises(ValueError, match="none of the 4 training structures carries a dipole label.*--dipole-key"):
        train(tiny(), unlabelled, epochs=1, progress=False, weights=w)
    crystal = bulk("NaCl", "rocksalt", a=5.64)
    crystal.calc = SinglePointCalculator(crystal, energy=-1.0, forces=np.zeros((2, 3)))
    mixed = graphs + read_dataset([crystal], 3.0)
    with pytest.raises(ValueError, match="1 of the training structures are periodic"):
        train(tiny(species=(1, 8, 11, 17)), mixed, epochs=1, progress=False, weights=w)
    # periodic structures alone, their calculator's dipoles dropped as labels: the periodic message, not advice to
    # put the dipole in atoms.info (which refuses it for a periodic structure)
    crystal.calc = SinglePointCalculator(crystal, energy=-1.0, forces=np.zeros((2, 3)), dipole=np.ones(3))
    with pytest.raises(ValueError, match="1 of the training structures are periodic"):
        train(tiny(species=(11, 17)), read_dataset([crystal], 3.0), epochs=1, progress=False, weights=w)
    check_loss_labels(tiny(long_range=None), graphs, loss_weights())  # weights 0: nothing to check


def test_config_and_flags_carry_the_weights_and_keys(tmp_path):
    cfg = Config(dipole_weight=0.5, born_charges_weight=2.0, dipole_key="xtb_dipole", born_charges_key="none")
    assert cfg.train_kwargs()["weights"] == {"energy": 10.0, "forces": 1.0, "stress": 1.0, "dipole": 0.5,
                                             "born_charges": 2.0}
    assert cfg.label_keys() == {"energy_key": "calc", "forces_key": "calc", "stress_key": "calc",
                                "dipole_key": "xtb_dipole", "born_charges_key": None}
    path = tmp_path / "c.yaml"
    path.write_text("dipole_weight: 0.5\nborn_charges_weight: 2\ndipole_key: xtb_dipole\nborn_charges_key: none\n")
    assert Config.from_yaml(path) == cfg
    with pytest.raises(ValueError, match="dipole_weight.*expected a number"):
        Config.from_dict({"dipole_weight": "lots"})


def test_cli_train_with_dipole_weight(tmp_path, capsys):
    data = tmp_path / "w.xyz"
    ase.io.write(data, water_frames(8))
    common = ["train", "--train", data, "--epochs", 1, "--channels", 8, "--num-layers", 1, "--correlation", 2,
              "--cutoff", 3.0, "--threads", 1, "--no-progress", "--dipole-weight", 1.0]
    code = cli.main([str(a) for a in common + ["--out", tmp_path / "a", "--long-range", "none"]])
    err = capsys.readouterr().err
    assert code == 2 and "no long range" in err and "dipole" in err
    code = cli.main([str(a) for a in common + ["--out", tmp_path / "b"]])
    capsys.readouterr()
    assert code == 0
    model = cartlorem.load_model(tmp_path / "b" / "model.pt")
    assert model.long_range == "multipole"


def test_cli_train_reads_the_dipole_under_the_given_key(tmp_path, capsys):
    # the training job must read labels with --dipole-key (it once read the default key only, and a set
    # whose dipoles sit under another key was refused as having no dipole labels)
    frames = water_frames(8)
    for a in frames:
        a.info["my_dipole"] = a.info.pop("dipole")
    data = tmp_path / "w.xyz"
    ase.io.write(data, frames)
    args = ["train", "--train", data, "--epochs", 1, "--channels", 8, "--num-layers", 1, "--correlation", 2,
            "--cutoff", 3.0, "--threads", 1, "--no-progress", "--dipole-weight", 1.0, "--dipole-key", "my_dipole",
            "--out", tmp_path / "run"]
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 0, err
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert rows and float(rows[-1]["valid_dipole_mae_e_a"]) > 0


# ------------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_reports_dipole_and_born_charge_maes(tmp_path, capsys):
    frames = [a for a in ase.io.read(BEC_FILE, ":") if a.info["system"] in ("w2", "cl_w2")][::6]
    model = tiny(species=(1, 8, 17), seed=3)
    graphs = read_dataset(frames, model.cutoff)
    # reference numbers straight from the model outputs
    p_err, z_err = [], []
    for g in graphs:
        out = model(g, create_graph=False, compute_dipole=True, compute_born_charges=True)
        p_err.append((out["dipole"] - g.dipole).detach().numpy().ravel())
        z_err.append((out["born_charges"] - g.born_charges).detach().numpy().ravel())
    p_err, z_err = np.concatenate(p_err), np.concatenate(z_err)
    m = evaluate(model, graphs, batch_size=3)
    assert m["n_dipole"] == m["n_born_charges"] == len(graphs)
    assert m["dipole_mae_e_a"] == pytest.approx(np.abs(p_err).mean(), rel=1e-10)
    assert m["dipole_rmse_e_a"] == pytest.approx(np.sqrt((p_err**2).mean()), rel=1e-10)
    assert m["born_charges_mae_e"] == pytest.approx(np.abs(z_err).mean(), rel=1e-10)

    model_path, data, js = tmp_path / "m.pt", tmp_path / "d.xyz", tmp_path / "m.json"
    cartlorem.save_model(model, model_path)
    ase.io.write(data, frames)
    code = cli.main(["evaluate", "--model", str(model_path), "--data", str(data), "--json", str(js), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "dipole" in out and "e·Å" in out and "Born Z*" in out
    saved = json.loads(js.read_text())
    assert saved["dipole_mae_e_a"] == pytest.approx(m["dipole_mae_e_a"], rel=1e-10)
    assert saved["born_charges_mae_e"] == pytest.approx(m["born_charges_mae_e"], rel=1e-10)
    code = cli.main(["evaluate", "--model", str(model_path), "--data", str(data), "--json", str(js),
                     "--dipole-key", "none", "--born-charges-key", "none", "--no-progress"])
    capsys.readouterr()
    assert code == 0 and "dipole_mae_e_a" not in json.loads(js.read_text())

    local = tiny(long_range=None, species=(1, 8, 17))
    m = evaluate(local, graphs)
    assert m["dipole_mae_e_a"] is None and m["n_dipole"] == 0 and m["born_charges_mae_e"] is None


def test_predict_mixes_molecules_and_crystals():
    """A batch with dipole-labelled molecules and a periodic cell: the molecules' dipoles are predicted
    (as alone), the crystal's row is NaN and not scored."""
    mols = water_frames(3)
    crystal = bulk("NaCl", "rocksalt", a=5.64)
    crystal.rattle(0.05, seed=1)  # (the unrattled cell trips the quadrupole check of main: reported)
    crystal.calc = SinglePointCalculator(crystal, energy=-1.0, forces=np.zeros((2, 3)))
    model = tiny(species=(1, 8, 11, 17))
    graphs = read_dataset([mols[0], crystal, mols[1], mols[2]], model.cutoff)
    p = predict(model, graphs, batch_size=4)
    alone = [model(g, create_graph=False, compute_dipole=True)["dipole"].detach().numpy()[0] for g in
             (graphs[0], graphs[2], graphs[3])]
    assert np.allclose(p.dipole_pred[[0, 2, 3]], alone, rtol=1e-12, atol=1e-12)
    assert np.isnan(p.dipole_pred[1]).all() and p.has_dipole.tolist() == [True, False, True, True]
    assert metrics(p)["n_dipole"] == 3
