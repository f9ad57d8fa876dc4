"""long_range_options["charge_channels"]: only the first k long-range channels carry charges.

With k = 1, channels c ≥ 1 carry dipoles and quadrupoles only: their charges, as the Ewald layer
receives them, are exact zeros for any input, while channel 0 still sums to each structure's total
charge (charge_correction). References: the multipoles captured where they enter
cartlorem.ewald (what the energy is made of), the structures' total charges, rotated and reflected
copies of the structures, and the model file written by save_model."""

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

import cartlorem
import cartlorem.nn.long_range as long_range
from cartlorem.graph import atoms_to_graph, collate
from cartlorem.testing import random_orthogonal, rotate

pytestmark = pytest.mark.usefixtures("one_thread")

LR_CHANNELS = 4


def make_model(species, charge_channels=1, kind="multipole", seed=0, correction="uniform", lr_channels=LR_CHANNELS):
    torch.manual_seed(seed)
    options = {"lr_channels": lr_channels, "charge_correction": correction}
    if charge_channels != "default":
        options["charge_channels"] = charge_channels
    model = cartlorem.CartLorem(species, cutoff=4.0, long_range=kind, channels=8, num_layers=1, correlation=2,
                                num_basis=4, radial_hidden=8, readout_hidden=8,
                                long_range_options=options).double()
    with torch.no_grad():  # off the initial symmetric values, and charges of a sizeable magnitude
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def capture_sources(monkeypatch):
    """Record the multipoles of every channel as the Ewald layer receives them (the last call)."""
    seen = {}
    original = long_range.batched_multipole_fields

    def recording(*args, **kw):
        seen.update({k: kw.get(k) for k in ("charges", "dipoles", "quadrupoles")})
        return original(*args, **kw)

    monkeypatch.setattr(long_range, "batched_multipole_fields", recording)
    return seen


def channel_charges(seen, kind, lr_channels=LR_CHANNELS):
    """q [N, C_lr] from a recorded call: for "lorem" the first C_lr columns of the stacked components."""
    q = seen["charges"]
    return q if kind == "multipole" else q[:, :lr_channels]


def charged_batch():
    """A cation, a neutral crystal and an anion in one batch (total charges +1, 0, −1)."""
    cation = molecule("CH3CONH2")
    cation.rattle(0.05, seed=1)
    cation.info["total_charge"] = 1.0
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    crystal.rattle(0.1, seed=2)
    anion = molecule("CH3COOH")
    anion.rattle(0.05, seed=3)
    anion.info["total_charge"] = -1.0
    return [cation, crystal, anion], [1, 6, 7, 8, 11, 17]


@pytest.mark.parametrize("kind", ["multipole", "lorem"])
@pytest.mark.parametrize("correction", ["uniform", "weighted"])
@pytest.mark.parametrize("seed", [0, 1])
def test_other_channels_have_no_charge_and_channel_zero_the_total(monkeypatch, kind, correction, seed):
    frames, species = charged_batch()
    seen = capture_sources(monkeypatch)
    batch = collate([atoms_to_graph(a, 4.0) for a in frames])
    sizes = [len(a) for a in frames]
    totals = [a.info.get("total_charge", 0.0) for a in frames]

    # control: with charge_channels=None (all channels charged, the default) channels ≥ 1 do carry charges,
    # which the model corrects to sum to zero per structure
    model = make_model(species, charge_channels="default", kind=kind, seed=seed, correction=correction)
    model(batch, create_graph=False)
    q_all = channel_charges(seen, kind).detach()
    assert float(q_all[:, 1:].abs().max()) > 1e-3
    for part in torch.split(q_all[:, 1:], sizes):
        torch.testing.assert_close(part.sum(0), torch.zeros_like(part[0]), rtol=0, atol=1e-12)

    model = make_model(species, charge_channels=1, kind=kind, seed=seed, correction=correction)
    assert model.long_range_block.charge_channels == 1 and model.config["long_range_options"]["charge_channels"] == 1
    out = model(batch, create_graph=False)
    q = channel_charges(seen, kind).detach()
    assert q.shape == (sum(sizes), LR_CHANNELS)
    assert bool((q[:, 1:] == 0).all())  # exact zeros, not corrected to a zero sum
    torch.testing.assert_close(q[:, 0], out["charges"].detach(), rtol=0, atol=0)
    for part, total in zip(torch.split(q[:, 0], sizes), totals):
        assert float(part.sum()) == pytest.approx(total, abs=1e-12)
        assert float(part.abs().max()) > 1e-3  # not trivially zero
    if kind == "multipole":  # the other channels still carry dipoles and quadrupoles
        assert float(seen["dipoles"][:, 1:].abs().max()) > 1e-3
        assert float(seen["quadrupoles"][:, 1:].abs().max()) > 1e-3

    # k = 2: channel 1 carries charges that sum to zero per structure, channels 2 and 3 none
    model = make_model(species, charge_channels=2, kind=kind, seed=seed, correction=correction)
    model(batch, create_graph=False)
    q = channel_charges(seen, kind).detach()
    assert bool((q[:, 2:] == 0).all()) and float(q[:, 1].abs().max()) > 1e-3
    for part in torch.split(q[:, 1], sizes):
        assert float(part.sum()) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "crystal"])
def test_equivariant_under_rotation_and_reflection(monkeypatch, periodic):
    """Energy invariant; forces, channel-0 multipoles and every channel's sources (q, μ, Θ) rotate with
    the structure, for a proper rotation and a reflection; channels ≥ 1 stay uncharged."""
    if periodic:
        atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
        atoms.rattle(0.1, seed=4)
        species = [11, 17]
    else:
        atoms = molecule("CH3CONH2")
        atoms.rattle(0.05, seed=5)
        atoms.info["total_charge"] = 1.0
        species = [1, 6, 7, 8]
    model = make_model(species, charge_channels=1)
    seen = capture_sources(monkeypatch)

    def run(a):
        out = model(atoms_to_graph(a, model.cutoff), create_graph=False)
        got = {k: out[k].detach() for k in ("energy", "forces", "charges", "dipoles", "quadrupoles")}
        got.update(q=seen["charges"].detach(), mu=seen["dipoles"].detach(), theta=seen["quadrupoles"].detach())
        return got

    ref = run(atoms)
    ranks = {"energy": 0, "forces": 1, "charges": 0, "dipoles": 1, "quadrupoles": 2, "q": 0, "mu": 1, "theta": 2}
    g = torch.Generator().manual_seed(7)
    for det in (1.0, -1.0):
        rot = random_orthogonal(det, generator=g)
        moved = atoms.copy()
        moved.positions = atoms.positions @ rot.numpy().T + np.array([0.3, -1.2, 0.7])
        if periodic:
            moved.set_cell(atoms.cell.array @ rot.numpy().T, scale_atoms=False)
        got = run(moved)
        assert bool((got["q"][:, 1:] == 0).all())
        for key, rank in ranks.items():
            expect = rotate(ref[key], rot, rank)
            err = float((got[key] - expect).abs().max()) / max(float(expect.abs().max()), 1e-30)
            assert err < 1e-9, f"{key} (rank {rank}), det {det:+.0f}: relative error {err:.2e}"


def test_save_load_round_trip(tmp_path, monkeypatch):
    """The option in use is stored in the model file and read back; a file without it (written before the
    option existed) loads with charges in every channel, as it was trained, which is also the default."""
    frames, species = charged_batch()
    batch = collate([atoms_to_graph(a, 4.0) for a in frames])
    seen = capture_sources(monkeypatch)
    default = make_model(species, charge_channels="default")
    assert default.long_range_block.charge_channels == LR_CHANNELS
    assert default.config["long_range_options"]["charge_channels"] == LR_CHANNELS

    model = make_model(species, charge_channels=1)
    ref = model(batch, create_graph=False)
    cartlorem.save_model(model, tmp_path / "one.pt")
    loaded = cartlorem.load_model(tmp_path / "one.pt")
    assert loaded.config["long_range_options"]["charge_channels"] == 1
    assert loaded.long_range_block.charge_channels == 1
    got = loaded(batch, create_graph=False)
    assert bool((seen["charges"][:, 1:] == 0).all())
    for key in ("energy", "forces", "charges", "dipoles", "quadrupoles"):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)

    old = make_model(species, charge_channels=None)  # every channel charged, as before the option
    assert old.config["long_range_options"]["charge_channels"] == LR_CHANNELS  # stored resolved
    ref = old(batch, create_graph=False)
    cartlorem.save_model(old, tmp_path / "all.pt")
    assert cartlorem.load_model(tmp_path / "all.pt").long_range_block.charge_channels == LR_CHANNELS
    payload = torch.load(tmp_path / "all.pt", weights_only=True)
    del payload["config"]["long_range_options"]["charge_channels"]  # as written before the option
    torch.save(payload, tmp_path / "old.pt")
    loaded = cartlorem.load_model(tmp_path / "old.pt")
    assert loaded.long_range_block.charge_channels == LR_CHANNELS
    got = loaded(batch, create_graph=False)
    assert float(seen["charges"][:, 1:].abs().max()) > 1e-3
    for key in ("energy", "forces", "charges"):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)
    cartlorem.save_model(loaded, tmp_path / "again.pt")  # and it stays that way when saved again
    assert cartlorem.load_model(tmp_path / "again.pt").long_range_block.charge_channels == LR_CHANNELS


@pytest.mark.parametrize("bad", [0, -1, LR_CHANNELS + 1, 1.5, True, "1"])
def test_bad_charge_channels_is_refused(bad):
    with pytest.raises(ValueError, match=r"charge_channels must be an integer from 1 to lr_channels = 4"):
        make_model([1, 8], charge_channels=bad)


@pytest.mark.parametrize("kind", ["multipole", "lorem"])
def test_exported_model_keeps_the_other_channels_uncharged(kind):
    """cartlorem.export runs the block's to_multipoles itself: its charges, energies and forces must be
    the Python model's, also after training steps and with nonzero weights in the unused charge columns
    (a state dict from elsewhere, in-place initialisation)."""
    from cartlorem.export import export_model

    frames, species = charged_batch()
    frames = [frames[0], frames[2]]  # the export sums open structures directly
    batch = collate([atoms_to_graph(a, 4.0) for a in frames])
    model = make_model(species, charge_channels=1, kind=kind)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(2):
        opt.zero_grad()
        out = model(batch)
        ((out["energy"] - 1.0).pow(2).sum() + out["forces"].pow(2).mean()).backward()
        opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["long_range_block.to_multipoles.weights.0"][:, 1:] = 1.0  # weights that would charge channels ≥ 1
    model.load_state_dict(state)
    model.eval()
    ref = model(batch, create_graph=False)
    got = export_model(model)(batch.positions, batch.species, batch.cell, batch.pbc, batch.edge_index,
                              batch.edge_shift, batch.batch, batch.total_charge)
    for key in ("energy", "forces", "charges", "dipoles"):
        err = float((got[key] - ref[key].detach()).abs().max())
        assert err <= 1e-10 * max(1.0, float(ref[key].detach().abs().max())), f"{key}: {err:.3g}"
