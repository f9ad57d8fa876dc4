"""The long-range energy in physical units: the electrostatic term is the Coulomb energy (eV) of the
reported multipoles (× the learned coupling) whatever the energy ``scale`` is; only the learned readout
is scaled. References: cartlorem.ewald.electrostatic_energy (checked against brute force, Madelung
constants and torch-pme in test_ewald.py) and Coulomb's law for two distant ions."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

import cartlorem
from cartlorem.ewald import electrostatic_energy
from cartlorem.graph import atoms_to_graph
from cartlorem.units import COULOMB

pytestmark = pytest.mark.usefixtures("one_thread")


def lr_model(species, kind="multipole", seed=0, lr_channels=1, charge_channels=1, **kw):
    """charge_channels: 1 (the default) or None (every channel charged, as before the option)."""
    torch.manual_seed(seed)
    opts = dict(channels=8, num_layers=1, correlation=2, num_basis=4, radial_hidden=8, readout_hidden=8)
    opts.update(kw)
    lr_options = {"lr_channels": lr_channels, "charge_channels": charge_channels}
    model = cartlorem.CartLorem(species, cutoff=4.0, long_range=kind, long_range_options=lr_options,
                                **opts).double()
    with torch.no_grad():  # off the initial symmetric values, and charges of a sizeable magnitude
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        others = model.long_range_block.coupling_others  # a_0 = 1 is fixed
        others.copy_(0.5 + torch.rand_like(others))
    return model.eval()


def structures():
    mol = molecule("CH3OH")
    mol.rattle(0.05, seed=1)
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    crystal.rattle(0.1, seed=2)
    return [("molecule", [1, 6, 8], mol), ("crystal", [11, 17], crystal)]


def predict(model, atoms, scale):
    model.set_statistics(scale=scale, shift=0.1)
    g = atoms_to_graph(atoms, model.cutoff)
    return g, model(g, create_graph=False)


@pytest.mark.parametrize("name,species,atoms", structures(), ids=lambda x: x if isinstance(x, str) else "")
def test_electrostatic_part_is_coulomb_energy_of_reported_multipoles(name, species, atoms):
    """energy_lr(scale) = scale × readout + E_es: the part that does not move with the scale is the
    coupling × Coulomb energy (eV) of the reported q, μ, Θ (one learned channel, so they are all of it)."""
    model = lr_model(species)
    block = model.long_range_block
    g, out1 = predict(model, atoms, 1.0)
    _, out2 = predict(model, atoms, 2.5)
    readout = (out2["energy_lr"] - out1["energy_lr"]) / 1.5
    e_es = float((out1["energy_lr"] - readout).detach())
    pbc = atoms.pbc if atoms.pbc.any() else None
    reference = float(block.coupling[0].detach()) * float(electrostatic_energy(
        g.positions, out1["charges"][:, None], out1["dipoles"][:, None], out1["quadrupoles"][:, None],
        cell=g.cell[0] if pbc is not None else None, pbc=pbc, smearing=block.smearing,
        accuracy=block.accuracy, prefactor=COULOMB).detach())
    assert abs(reference) > 1e-3 and abs(float(readout.detach())) > 1e-6  # both parts are really there
    assert e_es == pytest.approx(reference, rel=1e-9, abs=1e-12)
    # the reported multipoles themselves do not depend on the scale
    _, out3 = predict(model, atoms, 7.0)
    for key in ("charges", "dipoles", "quadrupoles"):
        torch.testing.assert_close(out3[key], out1[key], rtol=1e-13, atol=1e-13)

    # with the learned readout switched off, energy_lr is that Coulomb energy at any scale
    with torch.no_grad():
        block.readout[-1].weight.zero_()
        block.readout[-1].bias.zero_()
    for scale in (0.3, 2.5):
        _, out = predict(model, atoms, scale)
        assert float(out["energy_lr"].detach()) == pytest.approx(reference, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", ["multipole", "lorem"])
def test_two_ions_reported_charges_give_the_coulomb_tail(kind):
    """Na and Cl far beyond the cutoff, energy scale 2.5, coupling 1: the energy and force vary with the
    distance as Coulomb's law for the reported charges, E(r) = const + COULOMB q_Na q_Cl / r (eV)."""
    model = lr_model([11, 17], kind)
    block = model.long_range_block
    with torch.no_grad():
        block.coupling_others.fill_(1.0)
        block.readout[-1].weight.zero_()  # no learned long-range readout: what is left is electrostatics
        block.readout[-1].bias.zero_()
    model.set_statistics(scale=2.5)
    distances = [10.0, 14.0, 25.0, 60.0]
    energies, forces, charges = [], [], []
    for r in distances:
        out = model(atoms_to_graph(Atoms("NaCl", positions=[[0, 0, 0], [r, 0, 0]]), model.cutoff),
                    create_graph=False)
        energies.append(float(out["energy"]))
        forces.append(float(out["forces"][1, 0]))
        charges.append(out["charges"].detach().numpy())
    q = charges[0]
    assert abs(q[0]) > 0.05 and q[0] == pytest.approx(-q[1], abs=1e-14)  # neutral pair, charge correction
    for c in charges[1:]:
        assert np.allclose(c, q, atol=1e-14)  # no neighbours: the charges do not depend on r
    qq = COULOMB * q[0] * q[1]
    for k in range(1, len(distances)):  # Gaussian smearing 1 Å: erf(r/2) = 1 to 1e-12 beyond 10 Å
        assert energies[k] - energies[0] == pytest.approx(qq * (1 / distances[k] - 1 / distances[0]), rel=1e-9)
    assert np.allclose(forces, [qq / r**2 for r in distances], rtol=1e-8, atol=0)


def _capture_all_channels(monkeypatch):
    """Record every channel's multipoles as the Ewald layer receives them: q [N, C], μ [N, C, 3], Θ [N, C, 3, 3]."""
    import cartlorem.nn.long_range as long_range

    seen = {}
    original = long_range.batched_multipole_fields

    def recording(*args, **kw):
        seen.update(q=kw["charges"], mu=kw["dipoles"], theta=kw["quadrupoles"])
        return original(*args, **kw)

    monkeypatch.setattr(long_range, "batched_multipole_fields", recording)
    return seen


@pytest.mark.parametrize("charge_channels", [None, 1], ids=["all_charged", "one_charge_channel"])
@pytest.mark.parametrize("name,species,atoms", structures(), ids=lambda x: x if isinstance(x, str) else "")
def test_channel_zero_is_the_coulomb_energy_and_the_others_are_weighted(monkeypatch, name, species, atoms,
                                                                         charge_channels):
    """Three learned channels: energy_lr − scale × readout = COULOMB × U(reported q, μ, Θ) (weight exactly
    1) + Σ_{c ≥ 1} a_c COULOMB U_c, with U of cartlorem.ewald.electrostatic_energy. With
    charge_channels = 1 the channels c ≥ 1 enter with their dipoles and quadrupoles only (zero charges)."""
    model = lr_model(species, lr_channels=3, charge_channels=charge_channels)
    block = model.long_range_block
    assert float(block.coupling[0]) == 1.0 and "coupling_channel0" not in dict(block.named_parameters())
    with torch.no_grad():  # larger μ, Θ in channels ≥ 1: without charges, their energy in the rattled
        for w in block.to_multipoles.weights[1:]:  # rocksalt cell is otherwise ~1e-5 eV
            w[:, 1:] *= 10.0
    seen = _capture_all_channels(monkeypatch)
    g, out1 = predict(model, atoms, 1.0)
    q, mu, theta = (seen[k].detach() for k in ("q", "mu", "theta"))
    _, out2 = predict(model, atoms, 2.5)
    e_es = float((out1["energy_lr"] - (out2["energy_lr"] - out1["energy_lr"]) / 1.5).detach())
    torch.testing.assert_close(q[:, 0], out1["charges"].detach(), rtol=0, atol=0)
    torch.testing.assert_close(theta[:, 0], out1["quadrupoles"].detach(), rtol=0, atol=0)
    if charge_channels == 1:
        assert bool((q[:, 1:] == 0).all())
    else:
        assert float(q[:, 1:].abs().max()) > 1e-3
    periodic = bool(atoms.pbc.any())
    kw = dict(cell=g.cell[0] if periodic else None, pbc=atoms.pbc if periodic else None, smearing=block.smearing,
              accuracy=block.accuracy, prefactor=COULOMB)
    u0 = float(electrostatic_energy(g.positions, out1["charges"][:, None], out1["dipoles"][:, None],
                                    out1["quadrupoles"][:, None], **kw).detach())
    others = [float(electrostatic_energy(g.positions, q[:, c:c + 1], mu[:, c:c + 1], theta[:, c:c + 1], **kw))
              for c in (1, 2)]
    a = block.coupling_others.detach().tolist()
    assert min(abs(u0), *map(abs, others)) > 1e-4 and min(abs(x - 1.0) for x in a) > 0.01
    assert e_es == pytest.approx(u0 + a[0] * others[0] + a[1] * others[1], rel=1e-9, abs=1e-12)


def test_training_steps_leave_channel_zero_coupling_at_one():
    """Adam with weight decay on energy + forces: the other couplings move, a_0 stays exactly 1."""
    from ase.build import bulk

    model = lr_model([11, 17], lr_channels=2)
    block = model.long_range_block
    before = block.coupling_others.detach().clone()
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    crystal.rattle(0.1, seed=3)
    g = atoms_to_graph(crystal, model.cutoff)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()
        out = model(g)
        loss = (out["energy"] - 1.0).pow(2).sum() + out["forces"].pow(2).mean()
        loss.backward()
        assert block.coupling_others.grad is not None and float(block.coupling_others.grad.abs().max()) > 0
        opt.step()
    assert float(block.coupling_channel0) == 1.0 and float(block.coupling[0]) == 1.0
    assert float((block.coupling_others.detach() - before).abs().max()) > 1e-4
    assert all(p is not block.coupling_channel0 for p in model.parameters())


def test_lr_channels_must_be_positive():
    with pytest.raises(ValueError, match="lr_channels"):
        cartlorem.CartLorem([1], long_range="multipole", channels=4, long_range_options={"lr_channels": 0})


def test_the_coulomb_constant_is_codatas():
    """COULOMB = e²/(4πε₀) in eV·Å, against CODATA (scipy) and ASE's Hartree·Bohr: every other test takes the
    constant from cartlorem.units itself, so a wrong digit there passed them all."""
    import scipy.constants as const
    from ase import units

    codata = const.e / (4 * np.pi * const.epsilon_0 * const.angstrom)  # V·e per e per Å: eV·Å/e²
    assert COULOMB == pytest.approx(codata, rel=2e-7)
    assert COULOMB == pytest.approx(units.Hartree * units.Bohr, rel=2e-7)
