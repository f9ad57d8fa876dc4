"""Charge- and spin-state conditioning (``CartLorem(charge_state=True)``) and charge/spin input checks."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

import cartlorem
from cartlorem.data import read_dataset
from cartlorem.graph import atoms_to_graph, collate
from cartlorem.nn.conditioning import ChargeStateConditioning
from cartlorem.testing import check_batch_equals_single, check_forces_fd, check_o3_invariance


def small_model(long_range=None, charge_state=True, seed=0, species=(1, 6, 8, 11, 17), **kw):
    torch.manual_seed(seed)
    opts = dict(channels=8, num_layers=2, correlation=2, radial_hidden=16, avg_num_neighbors=6.0)
    opts.update(kw)
    model = cartlorem.CartLorem(species, cutoff=4.0, long_range=long_range, charge_state=charge_state, **opts)
    return model.double().eval()


def charged(atoms, charge, multiplicity=None):
    a = atoms.copy()
    a.info["total_charge"] = charge
    if multiplicity is not None:
        a.info["multiplicity"] = multiplicity
    return a


def methanol():
    a = molecule("CH3OH")
    a.rattle(0.05, seed=1)
    return a


def predict(model, atoms):
    out = model(atoms_to_graph(atoms, model.cutoff))
    return out["energy"].detach(), out["forces"].detach()


# --- the identity at neutral singlets ----------------------------------------------------------------


@pytest.mark.parametrize("long_range", [None, "multipole"])
def test_neutral_singlet_is_the_unconditioned_model_bit_for_bit(long_range, one_thread):
    off = small_model(long_range, charge_state=False)
    on = small_model(long_range, charge_state=True)  # same seed: the conditioning is made last
    assert on.conditioning is not None and off.conditioning is None
    with torch.no_grad():  # a conditioning far from zero, so that the identity is not an accident
        for p in on.conditioning.parameters():
            p.normal_(0.0, 1.0)
    structures = [methanol(), charged(methanol(), 0, 1), charged(molecule("H2O"), 0.0, 1)]
    for a in structures:
        e_off, f_off = predict(off, a)
        e_on, f_on = predict(on, a)
        assert torch.equal(e_on, e_off) and torch.equal(f_on, f_off)
    batch = collate([atoms_to_graph(a, 4.0, dtype=torch.float64) for a in structures])
    assert torch.equal(on(batch)["energy"].detach(), off(batch)["energy"].detach())
    # and it does act on other charge states
    e_off, _ = predict(off, charged(methanol(), 1, 2))
    e_on, _ = predict(on, charged(methanol(), 1, 2))
    e_trip, _ = predict(on, charged(methanol(), 0, 3))
    if long_range is None:  # (long-range models see Q through the charge correction)
        assert torch.equal(e_off, predict(off, methanol())[0])  # without conditioning Q changes nothing locally
    assert float((e_on - e_off).abs()) > 1e-3 and float((e_trip - predict(off, methanol())[0]).abs()) > 1e-3


def test_conditioning_output_is_exactly_zero_at_neutral_singlets_and_scriptable():
    torch.manual_seed(0)
    film = ChargeStateConditioning(channels=5, num_species=3).double()
    h0 = torch.randn(7, 5, dtype=torch.float64)
    species = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    batch = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    out = film(h0, species, batch, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert torch.equal(out, h0)
    q = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)
    mult = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out = film(h0, species, batch, q, mult)
    assert torch.equal(out[:3], h0[:3]) and not torch.allclose(out[3:], h0[3:])
    scripted = torch.jit.script(film)
    assert torch.equal(scripted(h0, species, batch, q, mult), out)
    assert torch.equal(scripted(h0, species, batch, q, None), film(h0, species, batch, q, None))


# --- physics: invariance, forces, batching -------------------------------------------------------------


@pytest.mark.parametrize("long_range", [None, "multipole"])
def test_conditioned_model_is_o3_invariant_float64(long_range, one_thread):
    model = small_model(long_range)
    for a in (charged(methanol(), 1, 2), charged(methanol(), -2, 1)):
        assert check_o3_invariance(model, a, seed=3) < 1e-11
    assert check_forces_fd(model, charged(methanol(), 1, 2), h=1e-5, n=4) < 1e-6


def test_batch_equals_single_with_mixed_charge_states(one_thread):
    model = small_model(None)
    structures = [charged(methanol(), 1, 2), molecule("H2O"), charged(molecule("H2O"), -1, 2),
                  charged(methanol(), 0, 3)]
    assert check_batch_equals_single(model, structures) < 1e-12
    # a graph without multiplicity (integrations) collates with others as singlets
    g = atoms_to_graph(molecule("H2O"), 4.0).replace(multiplicity=None)
    both = collate([g, atoms_to_graph(charged(molecule("H2O"), 0, 3), 4.0)])
    assert both.multiplicity.tolist() == [1.0, 3.0]


# --- learning: energies that depend on the charge state only -----------------------------------------------


def _charge_only_set():
    """Two fixed geometries, each with Q ∈ {−1, 0, +1, +2}; the energy depends on Q only (eV)."""
    frames, energies = [], []
    for geometry in (molecule("H2O"), molecule("CH3OH")):
        for q in (-1, 0, 1, 2):
            mult = 1 if (int(geometry.numbers.sum()) - q) % 2 == 0 else 2
            frames.append(charged(geometry, q, mult))
            energies.append(1.5 * q * q - 2.0 * q)  # 3.5, 0, -0.5, 2 eV
    return frames, torch.tensor(energies, dtype=torch.float64)


def _fit(charge_state: bool, steps: int = 120):
    frames, target = _charge_only_set()
    torch.manual_seed(0)
    model = cartlorem.CartLorem([1, 6, 8], cutoff=4.0, long_range=None, channels=8, num_layers=1,
                                correlation=2, radial_hidden=8, avg_num_neighbors=4.0,
                                charge_state=charge_state).double()
    batch = collate([atoms_to_graph(a, 4.0) for a in frames])
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(batch, compute_forces=False)["energy"] - target) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model(batch, compute_forces=False)["energy"].detach()
    return float((pred - target).abs().mean()), target


def test_local_model_needs_the_conditioning_to_fit_charge_only_energies(one_thread):
    mae_off, target = _fit(False)
    mae_on, _ = _fit(True)
    # per geometry, the best Q-independent prediction is the median: MAE = mean |E − median| = 1.5 eV
    best_constant = float((target.view(2, 4) - target.view(2, 4).median(dim=1, keepdim=True).values)
                          .abs().mean())
    assert best_constant == pytest.approx(1.5)
    assert mae_off > 0.95 * best_constant  # it cannot tell the charge states apart
    assert mae_on < 0.03 * best_constant, (mae_on, mae_off)


# --- model files and options --------------------------------------------------------------------------------


def test_save_load_keeps_the_conditioning_and_old_files_load_without_it(tmp_path):
    model = small_model(None)
    a = charged(methanol(), 1, 2)
    cartlorem.save_model(model, tmp_path / "m.pt")
    loaded = cartlorem.load_model(tmp_path / "m.pt")
    assert loaded.config["charge_state"] is True
    assert torch.equal(predict(loaded, a)[0], predict(model, a)[0])
    # a file written before the option existed: no 'charge_state' in its config
    off = small_model(None, charge_state=False)
    payload = cartlorem.model.model_payload(off)
    del payload["config"]["charge_state"]
    torch.save(payload, tmp_path / "old.pt")
    old = cartlorem.load_model(tmp_path / "old.pt")
    assert old.conditioning is None and old.config["charge_state"] is False
    assert torch.equal(predict(old, a)[0], predict(off, a)[0])


def test_charge_state_option_in_config_yaml_and_flags(tmp_path):
    from cartlorem.cli import build_parser
    from cartlorem.config import Config

    assert Config().charge_state is False
    cfg = Config(charge_state=True)
    assert cfg.build_model([1, 8]).conditioning is not None
    cfg.to_yaml(tmp_path / "c.yaml")
    assert Config.from_yaml(tmp_path / "c.yaml").charge_state is True
    args = build_parser().parse_args(["train", "--train", "x.xyz", "--out", "r", "--charge-state"])
    assert args.charge_state is True
    with pytest.raises(ValueError, match="charge_state"):
        Config.from_dict({"charge_state": "maybe"})


# --- bad charge/spin input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("charge, mult, match", [
    (0, 2, r"multiplicity 2 does not match the electron count.*10 electrons \(even\)"),  # H2O: 10 e
    (1, 1, r"multiplicity 1 does not match.*9 electrons \(odd\)"),
    (0, 13, r"up to 11"),  # more unpaired electrons than electrons
    (0, 0, r"integer >= 1"),
    (0, 1.5, r"integer >= 1"),
    (0, "two", r"must be numbers"),
    (11, 1, r"exceeds the nuclear charge"),
    (float("nan"), 1, r"finite"),
])
def test_bad_multiplicity_is_a_clear_error(charge, mult, match, tmp_path):
    bad = charged(molecule("H2O"), charge, mult)
    with pytest.raises(ValueError, match=match):
        atoms_to_graph(bad, 4.0)
    frames = [molecule("H2O"), charged(molecule("H2O"), 1, 2), bad]
    with pytest.raises(ValueError, match=r"frame 2") as err:
        read_dataset(frames, 4.0, require=())
    assert "frame 0" not in str(err.value) and "frame 1 " not in str(err.value)


def test_bad_multiplicity_in_a_file_and_in_the_calculator(tmp_path):
    import ase.io

    frames = [charged(molecule("H2O"), q, m) for q, m in ((0, 1), (1, 1), (-1, 2), (1, 3))]
    ase.io.write(tmp_path / "bad.xyz", frames, format="extxyz")
    with pytest.raises(ValueError, match=r"bad\.xyz, frame 1 \(H2O\): multiplicity 1.*2 of 4 frames.*\[1, 3\]"):
        read_dataset(tmp_path / "bad.xyz", 4.0, require=())
    model = small_model(None)
    atoms = charged(molecule("H2O"), 1, 1)
    atoms.calc = cartlorem.CartLoremCalculator(model)
    with pytest.raises(ValueError, match=r"H2O: multiplicity 1 does not match"):
        atoms.get_potential_energy()
    # the calculator passes the charge state on: a conditioned model tells the cation from the neutral
    energies = []
    for a in (molecule("H2O"), charged(molecule("H2O"), 1, 2)):
        a.calc = cartlorem.CartLoremCalculator(model)
        energies.append(a.get_potential_energy())
    assert energies[0] == pytest.approx(float(predict(model, molecule("H2O"))[0]), abs=1e-10)
    assert energies[1] == pytest.approx(float(predict(model, charged(molecule("H2O"), 1, 2))[0]), abs=1e-10)
    assert abs(energies[1] - energies[0]) > 1e-3


def test_good_charge_states_are_accepted():
    # doublet radicals, a triplet O2, fractional model charges (parity not checked), no multiplicity (singlet)
    ok = [charged(molecule("H2O"), 1, 2), charged(molecule("O2"), 0, 3), charged(molecule("H2O"), 0.5, 1),
          charged(molecule("H2O"), 1), Atoms("Na", positions=[[0, 0, 0]], info={"total_charge": 1, "multiplicity": 1})]
    graphs = read_dataset(ok, 4.0, require=())
    assert [float(g.multiplicity) for g in graphs] == [2.0, 3.0, 1.0, 1.0, 1.0]
    assert [float(g.total_charge) for g in graphs] == [1.0, 0.0, 0.5, 1.0, 1.0]
    assert np.allclose(atoms_to_graph(ok[1], 4.0, dtype=torch.float32).multiplicity.numpy(), [3.0])


def test_calculator_follows_a_changed_multiplicity_with_a_reused_neighbour_list():
    # the calculator reuses its neighbour list (and the graph's charge state) while the key matches;
    # a changed multiplicity must not be served from the old graph
    model = small_model(None)
    calc = cartlorem.CartLoremCalculator(model, skin=0.5)
    atoms = charged(molecule("O2"), 0, 1)
    calc.calculate(atoms, ["energy"])
    singlet = calc.results["energy"]
    atoms.info["multiplicity"] = 3
    calc.calculate(atoms, ["energy"])
    triplet = calc.results["energy"]
    expected = float(predict(model, charged(molecule("O2"), 0, 3))[0])
    assert triplet == pytest.approx(expected, abs=1e-10)
    assert abs(triplet - singlet) > 1e-6


def test_the_spin_keys_of_mace_and_fairchem_give_the_multiplicity(tmp_path):
    """MACE (>= 0.3.14) keeps 2S + 1 in atoms.info["total_spin"] and fairchem in ["spin"]; cartlorem read only
    "multiplicity", so a migrated triplet trained and ran as a singlet, unchecked, without a word. Both are read as
    the multiplicity now (checked against the electrons; the calculator follows a change), and two keys that
    disagree are refused."""
    import ase.io

    model = small_model(None)
    expected = float(predict(model, charged(molecule("O2"), 0, 3))[0])
    calc = cartlorem.CartLoremCalculator(model)
    for key in ("total_spin", "spin"):
        atoms = molecule("O2")
        atoms.info[key] = 3
        assert float(atoms_to_graph(atoms, 3.0).multiplicity[0]) == 3.0
        ase.io.write(tmp_path / "o2.xyz", atoms)
        assert float(read_dataset(str(tmp_path / "o2.xyz"), 3.0, require=())[0].multiplicity[0]) == 3.0
        atoms.info[key] = 1
        calc.calculate(atoms, ["energy"])
        atoms.info[key] = 3
        calc.calculate(atoms, ["energy"])
        assert calc.results["energy"] == pytest.approx(expected, abs=1e-10)
        atoms.info[key] = 2  # an even number of electrons has an odd multiplicity
        with pytest.raises(ValueError, match="multiplicity"):
            read_dataset([atoms], 3.0, require=())
    both = molecule("O2")
    both.info.update(multiplicity=3, total_spin=1)
    with pytest.raises(ValueError, match=r"multiplicity=3 and total_spin=1 disagree"):
        read_dataset([both], 3.0, require=())
    both.info.update(total_spin=3, total_charge=0, charge=1)
    with pytest.raises(ValueError, match=r"total_charge=0 and charge=1 disagree"):
        atoms_to_graph(both, 3.0)


# --- periodic structures: a supercell is the same system -------------------------------------------------------


def _charged_cell():
    from ase.build import bulk

    a = bulk("NaCl", "rocksalt", a=5.64)  # 2 atoms, fcc primitive cell
    a.rattle(0.05, seed=3)
    return a


@pytest.mark.parametrize("long_range", [None, "multipole"])
@pytest.mark.parametrize("pbc", [True, (True, True, False)])
def test_a_supercell_of_a_charged_cell_gets_the_cells_energy_per_cell(long_range, pbc, one_thread):
    """The conditioning took each structure's total charge Q and S − 1 as inputs, so a 2 × 1 × 1 supercell of a
    charged cell (2 Q, 2 (S − 1)) got another energy per cell than the cell itself (-55.23 / 2 against -33.21 eV in a
    review's model), though both describe one infinite system. Periodic structures now take Q/N and (S − 1)/N."""
    model = small_model(long_range)
    with torch.no_grad():  # a conditioning far from zero
        for p in model.conditioning.parameters():
            p.normal_(0.0, 1.0)
    cell = _charged_cell()
    cell.pbc = pbc
    if not all(cell.pbc):
        cell.center(vacuum=6.0, axis=2)
    for q, mult in ((1.0, 2), (-2.0, 3)):
        one = charged(cell, q, mult)
        two = charged(cell.repeat((2, 1, 1)), 2 * q, 2 * (mult - 1) + 1)
        e1, f1 = predict(model, one)
        e2, f2 = predict(model, two)
        tol = 1e-9 if long_range is None else 1e-7  # the Ewald sums' accuracy in a 4 Å cell (3e-7 eV neutral)
        assert float(e2) == pytest.approx(2 * float(e1), rel=tol, abs=tol)
        np.testing.assert_allclose(f2[: len(one)].numpy(), f1.numpy(), atol=10 * tol)
        assert abs(float(e1) - float(predict(model, charged(cell, 0.0, 1))[0])) > 1e-3  # the charge state matters
    # molecules keep the total charge as an input: one more electron is not a share per atom
    x = model.conditioning.inputs(torch.zeros(3, dtype=torch.long), torch.tensor([1.0]), torch.tensor([2.0]),
                                  torch.float64, torch.zeros(1, 3, dtype=torch.bool))
    assert x.tolist() == [[1.0, 1.0, 1 / 3, 1 / 3]]


def test_files_written_before_keep_their_periodic_inputs(tmp_path, one_thread):
    """A model file of format v3 (charge-state conditioning with Q and S − 1 for every structure) loads with
    ``conditioning.cells_per_atom`` False and predicts what it predicted; its TorchScript export too."""
    from cartlorem.export import export_model

    model = small_model("multipole")
    with torch.no_grad():
        for p in model.conditioning.parameters():
            p.normal_(0.0, 1.0)
    payload = cartlorem.model.model_payload(model)
    payload["format"] = "cartlorem-model-v3"
    del payload["state_dict"]["conditioning.cells_per_atom"]
    torch.save(payload, tmp_path / "v3.pt")
    old = cartlorem.load_model(tmp_path / "v3.pt")
    assert not bool(old.conditioning.cells_per_atom) and bool(model.conditioning.cells_per_atom)
    a = charged(_charged_cell(), 1.0, 2)
    with torch.no_grad():
        model.conditioning.cells_per_atom.fill_(False)
    then = predict(model, a)[0]
    assert torch.equal(predict(old, a)[0], then)
    with torch.no_grad():
        model.conditioning.cells_per_atom.fill_(True)
    now = predict(model, a)[0]
    assert abs(float(now - then)) > 1e-3
    cartlorem.save_model(model, tmp_path / "v4.pt")
    assert torch.equal(predict(cartlorem.load_model(tmp_path / "v4.pt"), a)[0], now)
    g = atoms_to_graph(a, model.cutoff)
    for m, ref in ((model, now), (old, then)):
        exported = export_model(m)
        e = exported.energy(g.positions, g.species, g.cell, g.pbc, g.edge_index, g.edge_shift, g.batch,
                            g.total_charge, g.multiplicity)["energy"]
        assert float(e.detach()) == pytest.approx(float(ref), rel=1e-12)


@pytest.mark.parametrize("missing_model", [False, True])
def test_a_run_written_before_resumes_with_its_inputs(tmp_path, missing_model, one_thread):
    """--resume of a run whose checkpoint and model.pt a v3 cartlorem wrote (no conditioning.cells_per_atom in any
    of its weights): training and best weights get the buffer load_model gives the model file (False: periodic
    structures keep the inputs they were trained with). The best weights were not upgraded at first: a resume
    with no better epoch, or one that rewrote a missing model.pt, failed on the missing key."""
    from cartlorem.training import train
    from cartlorem.training.run_folder import CHECKPOINT

    frames = []
    for k, q in enumerate((1.0, 0.0, -1.0, 1.0)):
        a = _charged_cell()
        a.rattle(0.05, seed=10 + k)
        a.info["total_charge"] = q
        a.info["multiplicity"] = 2 if q else 1
        a.info["energy"] = float(k)  # any labels: the test is about the weights' format
        a.arrays["forces"] = 0.1 * np.random.default_rng(k).normal(size=(len(a), 3))
        frames.append(a)
    graphs = read_dataset(frames, 4.0, energy_key="energy", forces_key="forces", stress_key=None)
    run = tmp_path / "run"
    train(small_model(None).float(), graphs[:3], graphs[3:], epochs=2, batch_size=2, out_dir=run, progress=False)
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    key = "conditioning.cells_per_atom"
    ckpt["model"]["format"] = "cartlorem-model-v3"
    for state in (ckpt["model"]["state_dict"], ckpt["train_state_dict"], ckpt["best_state_dict"]):
        del state[key]
    torch.save(ckpt, run / CHECKPOINT)
    saved = torch.load(run / "model.pt", weights_only=True)
    saved["format"] = "cartlorem-model-v3"
    del saved["state_dict"][key]
    torch.save(saved, run / "model.pt")
    if missing_model:
        (run / "model.pt").unlink()
    for epochs in (2, 3):  # nothing more to train (the best weights are loaded at the end), then one more epoch
        model = small_model(None).float()
        train(model, graphs[:3], graphs[3:], epochs=epochs, batch_size=2, out_dir=run, resume=True, progress=False)
        assert model.conditioning.cells_per_atom.item() is False
        assert cartlorem.load_model(run / "model.pt").conditioning.cells_per_atom.item() is False
