"""Model-level physics: invariances, finite differences, batching, periodic images, smoothness, I/O."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

import cartlorem
from cartlorem.graph import atoms_to_graph, collate
from cartlorem.testing import check_forces_fd, check_o3_invariance, check_stress_fd

#: long-range kinds; "kind@end" puts the block after the last layer (long_range_options placement "end")
LONG_RANGE = [None, "multipole", "lorem", "multipole@end", "lorem@end"]


def small_model(species, long_range=None, seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(channels=8, num_layers=2, correlation=3, radial_hidden=16, avg_num_neighbors=8.0)
    opts.update(kw)
    if long_range is not None and long_range.endswith("@end"):
        long_range = long_range[: -len("@end")]
        opts["long_range_options"] = {**opts.get("long_range_options", {}), "placement": "end"}
    model = cartlorem.CartLorem(species, cutoff=4.0, long_range=long_range, **opts).double()
    with torch.no_grad():  # break any symmetric initialisation
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def molecule_ch3oh():
    a = molecule("CH3OH")
    a.rattle(0.05, seed=1)
    return a


def nacl_cell():
    a = bulk("NaCl", "rocksalt", a=5.64)  # primitive fcc cell: triclinic, cutoff > cell -> many images
    a = a.repeat((2, 1, 1))
    a.rattle(0.08, seed=2)
    return a


def predict(model, atoms, **kw):
    return model(atoms_to_graph(atoms, model.cutoff), **kw)


@pytest.fixture(params=LONG_RANGE, ids=lambda x: f"lr={x}")
def long_range(request):
    return request.param


def test_o3_invariance_molecule(long_range):
    model = small_model([1, 6, 8], long_range)
    assert check_o3_invariance(model, molecule_ch3oh()) < 1e-10


def test_o3_invariance_crystal(long_range):
    model = small_model([11, 17], long_range)
    assert check_o3_invariance(model, nacl_cell()) < 1e-9


def test_forces_are_minus_gradient(long_range):
    model = small_model([1, 6, 8], long_range)
    assert check_forces_fd(model, molecule_ch3oh()) < 1e-6


def test_forces_and_stress_periodic(long_range):
    model = small_model([11, 17], long_range)
    atoms = nacl_cell()
    assert check_forces_fd(model, atoms, n=4) < 1e-6
    assert check_stress_fd(model, atoms) < 1e-6


def test_batch_equals_single_structures(long_range):
    model = small_model([1, 6, 8, 11, 17], long_range)
    structures = [molecule_ch3oh(), nacl_cell(), molecule("H2O")]
    singles = [predict(model, a) for a in structures]
    batch = model(collate([atoms_to_graph(a, model.cutoff) for a in structures]))
    torch.testing.assert_close(batch["energy"].detach(), torch.cat([s["energy"].detach() for s in singles]),
                               rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(batch["forces"].detach(), torch.cat([s["forces"].detach() for s in singles]),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(batch["stress"][1].detach(), singles[1]["stress"][0].detach(), rtol=1e-10, atol=1e-10)
    assert torch.all(batch["stress"][[0, 2]] == 0)


def test_supercell_and_rewrapping(long_range):
    model = small_model([11, 17], long_range)
    atoms = nacl_cell()
    e1 = predict(model, atoms)
    sup = atoms.repeat((1, 2, 1))
    e2 = predict(model, sup)
    torch.testing.assert_close(e2["energy"].detach(), 2 * e1["energy"].detach(), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(e2["forces"][: len(atoms)].detach(), e1["forces"].detach(), rtol=1e-9, atol=1e-9)
    wrapped = atoms.copy()
    wrapped.positions[0] += atoms.cell[0] - 2 * atoms.cell[2]  # same crystal, atom moved by a lattice vector
    e3 = predict(model, wrapped)
    torch.testing.assert_close(e3["energy"].detach(), e1["energy"].detach(), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(e3["forces"].detach(), e1["forces"].detach(), rtol=1e-10, atol=1e-10)


def test_translation_invariance_open():
    model = small_model([1, 6, 8])
    a = molecule_ch3oh()
    b = a.copy()
    b.positions += np.array([10.0, -3.0, 7.5])
    torch.testing.assert_close(predict(model, b)["energy"], predict(model, a)["energy"], rtol=1e-12, atol=1e-12)


def test_energy_smooth_as_neighbour_crosses_cutoff():
    model = small_model([1, 8], long_range=None)
    rc = model.cutoff

    def energy_and_force(d):
        a = Atoms("OH", positions=[[0, 0, 0], [d, 0, 0]])
        out = predict(model, a)
        return float(out["energy"]), float(out["forces"][1, 0])

    e_in, f_in = energy_and_force(rc - 1e-6)
    e_out, f_out = energy_and_force(rc + 1e-6)
    e_far, _ = energy_and_force(rc + 2.0)
    assert abs(e_in - e_out) < 1e-9 and abs(e_out - e_far) < 1e-12
    assert abs(f_in) < 1e-7 and f_out == 0.0
    e_near, _ = energy_and_force(rc - 0.5)
    assert abs(e_near - e_far) > 1e-6  # the interaction is really there inside the cutoff


@pytest.mark.parametrize("structure", ["molecule", "rocksalt"])
def test_float32_close_to_float64(long_range, structure):
    """float32 runs (no false alarms from the Ewald input checks on near-symmetric sites, where learned
    quadrupoles are small by cancellation) and agrees with float64."""
    if structure == "molecule":
        species, a = [1, 6, 8], molecule_ch3oh()
    else:
        species, a = [11, 17], bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
        a.rattle(0.01, seed=3)
    model = small_model(species, long_range)
    e64 = predict(model, a)
    m32 = model.float()
    e32 = m32(atoms_to_graph(a, model.cutoff, dtype=torch.float32))
    scale = max(1.0, abs(float(e64["energy"])))
    assert abs(float(e32["energy"]) - float(e64["energy"])) < 1e-4 * scale
    assert float((e32["forces"].double() - e64["forces"]).abs().max()) < 1e-4 * max(1.0, float(e64["forces"].abs().max()))


def test_save_load_roundtrip_bit_identical(tmp_path, long_range):
    model = small_model([1, 6, 8], long_range)
    model.set_statistics(atomic_energies={1: -13.6, 6: -1030.0, 8: -2040.0}, avg_num_neighbors=7.5, scale=0.7,
                         shift=0.1)
    path = tmp_path / "m.pt"
    cartlorem.save_model(model, path)
    loaded = cartlorem.load_model(path)
    assert loaded.config == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)
    # identical weights; predictions agree to round-off (vectorised reductions depend on memory alignment)
    a = molecule_ch3oh()
    p1, p2 = predict(loaded, a), predict(model, a)
    torch.testing.assert_close(p1["energy"], p2["energy"], rtol=1e-14, atol=0)
    torch.testing.assert_close(p1["forces"], p2["forces"], rtol=0, atol=1e-14 * float(p2["forces"].abs().max()))


def test_bad_input_errors(tmp_path):
    model = small_model([1, 6, 8])
    u = molecule_ch3oh()
    u.numbers[0] = 92
    with pytest.raises(ValueError, match=r"U \(Z=92\)"):
        predict(model, u)
    nan = molecule_ch3oh()
    nan.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        predict(model, nan)
    with pytest.raises(FileNotFoundError, match="not found"):
        cartlorem.load_model(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="corrupt"):
        cartlorem.load_model(bad)
    with pytest.raises(ValueError, match="long_range"):
        cartlorem.CartLorem([1], long_range="coulomb")


@pytest.mark.parametrize("size", ["channels", "num_layers", "correlation", "num_basis", "radial_hidden", "envelope_p",
                                  "readout_hidden"])
def test_degenerate_sizes_are_refused(size):
    """0 built a model that saw no geometry (envelope_p 0: the envelope is 0 everywhere; a hidden width 0: the
    forces are exactly 0), or one that failed inside its first call (channels 0: a division by zero)."""
    for value in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"{size} must be an integer >= 1"):
            cartlorem.CartLorem([1, 8], long_range=None, **{size: value})


def test_compiled_kernels_match_eager_and_training_stays_eager():
    eager = small_model([1, 6, 8])
    compiled = small_model([1, 6, 8], compile_kernels=True)
    a = molecule_ch3oh()
    e, c = predict(eager, a), predict(compiled, a)
    torch.testing.assert_close(c["energy"], e["energy"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c["forces"], e["forces"], rtol=1e-10, atol=1e-10)
    # training needs double backward: the compiled kernel must not be used there
    g = atoms_to_graph(a, compiled.cutoff)
    out = compiled(g, create_graph=True)
    (out["forces"] ** 2).sum().backward()
    assert all(p.grad is not None for p in compiled.layers[0].radial.parameters())


@pytest.mark.parametrize("kind", ["multipole", "lorem"])
@pytest.mark.parametrize("correction", ["uniform", "weighted"])
def test_charges_sum_to_total_charge(kind, correction):
    """Channel-0 charges of every structure in a batch add up to its total charge (here +1, 0, -2)."""
    mol, crystal = molecule_ch3oh(), nacl_cell()
    mol.info["total_charge"] = 1
    anion = molecule_ch3oh()
    anion.info["total_charge"] = -2
    model = small_model([1, 6, 8, 11, 17], kind, long_range_options={"charge_correction": correction})
    batch = collate([atoms_to_graph(a, model.cutoff) for a in (mol, crystal, anion)])
    out = model(batch)
    sums = torch.zeros(3, dtype=torch.float64).index_add(0, batch.batch, out["charges"].detach())
    assert torch.allclose(sums, torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64), atol=1e-12)
    if correction == "weighted":
        # constant weights reproduce the uniform shift; learned ones spread the excess differently
        uniform = small_model([1, 6, 8, 11, 17], kind)
        state = {k: v for k, v in model.state_dict().items() if "correction_weight" not in k}
        uniform.load_state_dict(state)
        with torch.no_grad():
            model.long_range_block.correction_weight.weight.zero_()
        assert torch.allclose(model(batch)["charges"], uniform(batch)["charges"], atol=1e-12)
        assert not torch.allclose(out["charges"], uniform(batch)["charges"], atol=1e-4)


def test_charge_correction_option_is_checked():
    with pytest.raises(ValueError, match="charge_correction"):
        small_model([1, 6, 8], "multipole", long_range_options={"charge_correction": "even"})


@pytest.mark.parametrize("kind", ["multipole", "lorem"])
@pytest.mark.parametrize("lmax", [0, 1])
def test_long_range_with_lmax_below_2(kind, lmax):
    """Features of rank ≤ lmax give multipoles up to that rank (lmax 0: charges, 1: + dipoles); the model
    stays O(3)-invariant with forces = −∇E, and (readout off, one channel) its long-range energy is the
    Coulomb energy of the reported multipoles (for "lorem" with lmax 0: of the charges)."""
    from cartlorem.ewald import electrostatic_energy
    from cartlorem.units import COULOMB

    model = small_model([11, 17], kind, lmax=lmax, long_range_options={"lr_channels": 1})
    atoms = nacl_cell()
    out = predict(model, atoms)
    assert out["charges"].shape == (len(atoms),) and "quadrupoles" not in out
    assert ("dipoles" in out) == (lmax == 1)
    assert check_o3_invariance(model, atoms) < 1e-9
    assert check_forces_fd(model, atoms, n=3) < 1e-6
    if kind == "lorem" and lmax == 1:
        return  # LOREM's rank-1 term convolves dipole components with the scalar kernel: not Coulomb
    block = model.long_range_block
    with torch.no_grad():
        block.readout[-1].weight.zero_()
        block.readout[-1].bias.zero_()
    g = atoms_to_graph(atoms, model.cutoff)
    out = model(g, create_graph=False)
    dipoles = out["dipoles"][:, None] if lmax == 1 else None
    # the reference converged (the block sums potential, field and gradient together, with the Ewald parameters of
    # that sum's order; the energy alone would take those of a lower order): the two agree to the block's accuracy
    u = electrostatic_energy(g.positions, out["charges"][:, None], dipoles, cell=g.cell[0], pbc=atoms.pbc,
                             smearing=block.smearing, accuracy=1e-12, prefactor=COULOMB)
    assert abs(float(u)) > 1e-4
    assert float(out["energy_lr"]) == pytest.approx(float(block.coupling[0]) * float(u), rel=block.accuracy)


def test_long_range_options_cannot_set_lmax():
    with pytest.raises(ValueError, match="lmax"):
        small_model([1, 6, 8], "multipole", long_range_options={"lmax": 1})


@pytest.mark.parametrize("cutoff", [float("inf"), 0.0, -1.0, float("nan")])
def test_cutoff_must_be_finite_and_positive(cutoff):
    """cutoff=inf built a model whose radial basis is zero at every distance (blind to geometry), silently."""
    with pytest.raises(ValueError, match="cutoff must be a finite positive length"):
        cartlorem.CartLorem([1, 6, 8], cutoff=cutoff, long_range=None, channels=4, num_layers=1)


def test_unknown_long_range_option_names_the_key():
    """CartLorem(long_range_options={"lr_chanels": 2}) failed with the block constructor's TypeError ("unexpected
    keyword argument"); now a ValueError naming the key and the closest option (what the config file says too)."""
    with pytest.raises(ValueError, match=r"unknown long-range option 'lr_chanels' \(did you mean 'lr_channels'\?\)"):
        small_model([1, 6, 8], "multipole", long_range_options={"lr_chanels": 2})
    model = small_model([1, 6, 8], "multipole", long_range_options={"lr_channels": 2, "placement": "end"})
    assert model.long_range_block.lr_channels == 2


@pytest.mark.parametrize("kind", ["multipole", "lorem"])
def test_perfect_crystal_batched_with_a_molecule(kind):
    """A perfect rocksalt cell, where the learned quadrupoles vanish by symmetry, batched with a molecule
    (a ValueError 'quadrupoles must be symmetric and traceless' came from the rounding noise of Θ)."""
    model = small_model([1, 8, 11, 17], long_range=kind).double()
    crystal = bulk("NaCl", "rocksalt", a=5.64)
    water = molecule("H2O")
    graphs = [atoms_to_graph(a, model.cutoff, dtype=torch.float64) for a in (water, crystal)]
    out = model(collate(graphs))
    for k, g in enumerate(graphs):
        alone = model(g)
        assert torch.allclose(out["energy"][k], alone["energy"][0], rtol=1e-12, atol=1e-12)


def test_every_submodule_is_reached_from_the_package():
    """docs/engines.md names cartlorem.export.ExportedCartLorem and cartlorem.integrations, but after
    `import cartlorem` both raised AttributeError: the lazy list missed them. Every module and package of
    cartlorem/ is now reachable as an attribute, in a fresh interpreter."""
    import pathlib
    import subprocess
    import sys

    import cartlorem

    root = pathlib.Path(cartlorem.__file__).parent
    names = sorted({p.stem for p in root.glob("*.py") if not p.stem.startswith("_")}
                   | {p.parent.name for p in root.glob("*/__init__.py")})
    assert {"export", "integrations", "ewald", "training"} <= set(names)
    code = "import cartlorem\n" + "".join(f"cartlorem.{n}\n" for n in names) + \
        "cartlorem.export.ExportedCartLorem\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
