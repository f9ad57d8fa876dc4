"""Data layer: reading labelled extxyz, reference energies, statistics, splits."""

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.calculators.singlepoint import SinglePointCalculator

from cartlorem.data import (
    attach_labels,
    dataset_statistics,
    fit_reference_energies,
    read_dataset,
    split,
)
from cartlorem.graph import atoms_to_graph, collate


def _emt_crystal(make_crystal, seed):
    """Periodic Cu/Al structure labelled by EMT (energy, forces, stress) as single-point results."""
    atoms = make_crystal(n_atoms=5, species=(13, 29), seed=seed, length=4.5, min_dist=2.0)
    atoms.calc = EMT()
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    return atoms


def _lj_molecule(make_molecule, seed, charge=0):
    atoms = make_molecule(n_atoms=6, species=(1, 8), seed=seed, min_dist=1.0)
    atoms.calc = LennardJones(sigma=1.0, epsilon=0.01, rc=4.0)
    atoms.get_potential_energy(), atoms.get_forces()
    atoms.info["total_charge"] = charge
    return atoms


@pytest.fixture
def labelled(make_crystal, make_molecule):
    """Two EMT crystals and two Lennard-Jones molecules (one with total charge −1)."""
    return [
        _emt_crystal(make_crystal, 0),
        _lj_molecule(make_molecule, 1),
        _emt_crystal(make_crystal, 2),
        _lj_molecule(make_molecule, 3, charge=-1),
    ]


def test_read_calc_labels(tmp_path, labelled):
    path = tmp_path / "train.xyz"
    ase.io.write(path, labelled, format="extxyz")
    graphs = read_dataset(path, 4.0)
    assert len(graphs) == 4
    for g, atoms in zip(graphs, labelled):
        assert g.energy.shape == (1,) and g.forces.shape == (len(atoms), 3) and g.stress.shape == (1, 3, 3)
        assert g.has_energy.tolist() == [True] and g.has_forces.tolist() == [True]
        np.testing.assert_allclose(g.energy.item(), atoms.get_potential_energy(), rtol=1e-12)
        np.testing.assert_allclose(g.forces.numpy(), atoms.get_forces(), atol=1e-7)
        if atoms.pbc.all():
            assert g.has_stress.tolist() == [True]
            np.testing.assert_allclose(g.stress[0].numpy(), atoms.get_stress(voigt=False), atol=1e-9)
        else:
            assert g.has_stress.tolist() == [False] and g.stress.abs().sum() == 0
    assert [g.total_charge.item() for g in graphs] == [0.0, 0.0, 0.0, -1.0]
    # same result from the list of Atoms, in float32
    direct = read_dataset(labelled, 4.0, dtype=torch.float32)
    assert direct[0].forces.dtype == torch.float32
    np.testing.assert_allclose(direct[2].energy.item(), graphs[2].energy.item(), rtol=1e-6)


@pytest.mark.parametrize("stress_form", ["voigt6", "flat9", "matrix"])
def test_read_ref_keys(tmp_path, make_crystal, stress_form):
    rng = np.random.default_rng(4)
    atoms = make_crystal(n_atoms=4, seed=5)
    forces = rng.normal(size=(4, 3))
    sym = rng.normal(size=(3, 3))
    stress = (sym + sym.T) * 1e-3
    voigt = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]  # xx yy zz yz xz xy
    atoms.info["REF_energy"] = -12.5
    atoms.arrays["REF_forces"] = forces
    atoms.info["REF_stress"] = {"voigt6": voigt, "flat9": stress.ravel(), "matrix": stress}[stress_form]
    path = tmp_path / "ref.xyz"
    ase.io.write(path, [atoms], format="extxyz")
    kw = dict(energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress")
    (g,) = read_dataset(path, 4.0, require=("energy", "forces", "stress"), **kw)
    assert g.energy.item() == pytest.approx(-12.5)
    np.testing.assert_allclose(g.forces.numpy(), forces, atol=1e-7)
    np.testing.assert_allclose(g.stress[0].numpy(), stress, atol=1e-9)
    # the default keys find nothing in this file
    with pytest.raises(ValueError, match=r"frame 0: no 'energy' label.*REF_energy"):
        read_dataset(path, 4.0)


def test_standard_names_as_keys_fall_back_on_calculator(tmp_path, labelled):
    """energy_key="energy" works although ase.io.read moved 'energy' into the calculator."""
    path = tmp_path / "d.xyz"
    ase.io.write(path, labelled[:2], format="extxyz")
    g = read_dataset(path, 4.0, energy_key="energy", forces_key="forces")[0]
    assert g.energy.item() == pytest.approx(labelled[0].get_potential_energy())


def test_standard_names_in_memory_read_as_from_a_file(tmp_path, labelled):
    """Atoms built in memory keep energy / forces / stress in info / arrays, where ase.io.read would have moved them
    into the calculator: the default keys read them the same (the stress was silently dropped before)."""
    frames = []
    for a in labelled:
        b = a.copy()  # no calculator
        b.info["energy"] = a.get_potential_energy()
        b.arrays["forces"] = a.get_forces()
        if a.pbc.all():
            b.info["stress"] = a.get_stress()
        frames.append(b)
    path = tmp_path / "d.xyz"
    ase.io.write(path, frames, format="extxyz")
    from_file = read_dataset(path, 4.0)
    in_memory = read_dataset(frames, 4.0)
    for f, m in zip(from_file, in_memory):
        assert m.has_stress.tolist() == f.has_stress.tolist()
        for name in ("energy", "forces", "stress"):
            np.testing.assert_allclose(getattr(m, name).numpy(), getattr(f, name).numpy(), rtol=1e-7, atol=1e-7)
    assert [bool(g.has_stress) for g in in_memory] == [True, False, True, False]
    # the calculator's results win over an info entry of the same name
    frames[0].calc = SinglePointCalculator(frames[0], energy=-1.0)
    assert read_dataset(frames[:1], 4.0, require=("energy",))[0].energy.item() == -1.0


def test_missing_required_label_names_frame_and_label(tmp_path, labelled):
    frames = [a.copy() for a in labelled]
    for k, a in enumerate(labelled):
        results = dict(a.calc.results)
        if k == 2:
            results.pop("forces")
        frames[k].calc = SinglePointCalculator(frames[k], **results)
    path = tmp_path / "missing.xyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(ValueError, match=r"missing\.xyz, frame 2: no 'forces' label") as err:
        read_dataset(path, 4.0)
    assert "1 of 4 frames" in str(err.value)
    # not required: read with a False mask and zeros
    graphs = read_dataset(path, 4.0, require=("energy",))
    assert graphs[2].has_forces.tolist() == [False] and graphs[2].forces.abs().sum() == 0
    assert graphs[1].has_forces.tolist() == [True]
    # stress required but open structures have none
    with pytest.raises(ValueError, match=r"frame 1: no 'stress' label \(the structure is not periodic"):
        read_dataset(path, 4.0, require=("stress",))


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_dataset(tmp_path / "nope.xyz", 4.0)
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    with pytest.raises(ValueError, match="no structures in"):
        read_dataset(empty, 4.0)
    blank = tmp_path / "blank.xyz"
    blank.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no structures in"):
        read_dataset(blank, 4.0)
    with pytest.raises(ValueError, match="no structures in"):
        read_dataset([], 4.0)
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not\nan xyz file\n")
    with pytest.raises(ValueError, match="could not read"):
        read_dataset(garbage, 4.0)


def test_emptiness_check_reads_only_the_start_of_a_file(tmp_path, monkeypatch):
    """The empty-file check reads up to the first non-blank byte, not the whole file (it read all of it into
    memory: a 400 MiB dataset cost 400 MiB more), and a file with many leading blank lines is not empty."""
    import tracemalloc

    big = tmp_path / "big.xyz"
    with open(big, "wb") as f:
        f.write(b"3\nProperties=species:S:1:pos:R:3\n")
        f.truncate(64 * 2**20)  # sparse: no disk used

    def stop(*args, **kwargs):
        raise RuntimeError("reached ase.io.read")

    with monkeypatch.context() as m:
        m.setattr(ase.io, "read", stop)
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match="reached ase.io.read"):
                read_dataset(big, 4.0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB allocated before ase.io.read"

    crystal = Atoms("Cu4", scaled_positions=[[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]],
                    cell=np.eye(3) * 3.61, pbc=True)
    cif = tmp_path / "cu.cif"
    ase.io.write(cif, crystal)
    cif.write_bytes(b"\n" * 5000 + cif.read_bytes())  # ase reads it; it is not empty
    (g,) = read_dataset(cif, 3.0, require=())
    assert g.species.tolist() == [29] * 4


def test_bad_structures_name_file_and_frame(tmp_path, labelled):
    def frames():
        out = [a.copy() for a in labelled]
        for f, a in zip(out, labelled):
            f.calc = SinglePointCalculator(f, **a.calc.results)
        return out

    nan_frames = frames()
    nan_frames[1].positions[0, 0] = np.nan
    path = tmp_path / "nan.xyz"
    ase.io.write(path, nan_frames, format="extxyz")
    with pytest.raises(ValueError, match=r"nan\.xyz, frame 1: positions contain NaN"):
        read_dataset(path, 4.0)

    overlap = frames()
    overlap[3].positions[2] = overlap[3].positions[4]
    with pytest.raises(ValueError, match=r"structures, frame 3: .*overlapping"):
        read_dataset(overlap, 4.0, require=())

    flat = Atoms(
        "Cu2", positions=[[0, 0, 0], [1.3, 1.3, 0]], cell=[[2.6, 0, 0], [0, 2.6, 0], [2.6, 2.6, 0]], pbc=True
    )
    with pytest.raises(ValueError, match=r"frame 0: periodic cell has zero volume"):
        read_dataset([flat], 4.0, require=())


def test_attach_labels_checks(labelled):
    atoms = labelled[0].copy()
    atoms.calc = EMT()
    atoms.get_forces()
    g = atoms_to_graph(atoms, 4.0)
    assert attach_labels(g, atoms, {"energy": "calc"}).has_forces.tolist() == [False]
    atoms.positions[0] += 0.1  # the calculator's results no longer describe these positions
    with pytest.raises(ValueError, match="stale"):
        attach_labels(atoms_to_graph(atoms, 4.0), atoms, {"energy": "calc"})
    with pytest.raises(ValueError, match="unknown label"):
        attach_labels(g, labelled[0], {"charges": "calc"})
    bad = labelled[1].copy()
    bad.info["REF_energy"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        read_dataset([bad], 4.0, energy_key="REF_energy", require=())
    bad.info["REF_stress"] = [1.0, 2.0]
    bad.pbc = True
    bad.cell = 10 * np.eye(3)
    with pytest.raises(ValueError, match="stress"):
        read_dataset([bad], 4.0, stress_key="REF_stress", require=())


def _synthetic(make_molecule, refs, n=30, seed=0):
    """Molecules of random composition with energy exactly Σ_Z n_Z E_Z and zero forces."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = make_molecule(n_atoms=int(rng.integers(2, 9)), species=tuple(refs), seed=1000 + k)
        energy = float(sum(refs[int(z)] for z in a.numbers))
        a.calc = SinglePointCalculator(a, energy=energy, forces=np.zeros((len(a), 3)))
        out.append(a)
    return out


def test_reference_energies_recover_known_values(make_molecule):
    refs = {1: -13.6, 6: -1029.5, 8: -2041.3, 29: -45000.25}
    graphs = read_dataset(_synthetic(make_molecule, refs), 3.0)
    fit = fit_reference_energies(graphs, species=[1, 6, 8, 29, 17])
    for z, e in refs.items():
        assert fit[z] == pytest.approx(e, rel=1e-7, abs=1e-6)
    assert fit[17] == 0.0  # a known species that is absent from the data
    # works on batches too, and ignores structures without energies
    batch = collate(graphs)
    fit2 = fit_reference_energies([batch], species=[1, 6, 8, 29])
    assert fit2[8] == pytest.approx(refs[8], rel=1e-7)
    with pytest.raises(ValueError, match=r"species 29 \(Cu\)"):
        fit_reference_energies(graphs, species=[1, 6, 8])


def test_reference_energies_collinear_species():
    """O and H always 1:2 (water clusters): the split is arbitrary but the totals are fitted."""
    frames = []
    for n in range(1, 5):
        a = Atoms("OH2" * n, positions=np.arange(9 * n).reshape(-1, 3) * 1.1)
        a.calc = SinglePointCalculator(a, energy=-14.2 * n + 0.01 * (n % 2))
        frames.append(a)
    graphs = read_dataset(frames, 2.0, require=("energy",))
    fit = fit_reference_energies(graphs, species=[1, 8])
    assert np.isfinite(list(fit.values())).all()
    assert 2 * fit[1] + fit[8] == pytest.approx(-14.2, abs=2e-2)


def test_split_deterministic_and_disjoint():
    train, valid = split(100, valid_fraction=0.2, seed=3)
    assert len(valid) == 20 and len(train) == 80
    assert set(train).isdisjoint(valid) and set(train) | set(valid) == set(range(100))
    t2, v2 = split(list(range(100)), valid_fraction=0.2, seed=3)
    assert np.array_equal(train, t2) and np.array_equal(valid, v2)
    assert not np.array_equal(valid, split(100, valid_fraction=0.2, seed=4)[1])
    assert len(split(5, valid_fraction=0.01)[1]) == 1  # at least one validation structure
    assert len(split(5, valid_fraction=0.0)[1]) == 0
    for n in (1, 2, 3):  # never all of them to validation (split(1, 0.6) gave an empty training set)
        for fraction in (0.0, 0.3, 0.5, 0.6, 0.99):
            train, valid = split(n, valid_fraction=fraction)
            assert len(train) >= 1 and len(train) + len(valid) == n, (n, fraction)
    assert split(1, valid_fraction=0.6)[0].tolist() == [0]
    with pytest.raises(ValueError, match="valid_fraction"):
        split(10, valid_fraction=1.0)


def test_statistics(labelled):
    graphs = read_dataset(labelled, 4.0)
    refs = fit_reference_energies(graphs, species=[1, 8, 13, 29])
    stats = dataset_statistics(graphs, refs)
    # brute-force neighbour count over lattice images −3..3 (enough for these ~4.5 Å cells)
    n_edges = 0
    for a in labelled:
        rng3 = range(-3, 4) if a.pbc.any() else range(1)
        for shift in np.array(np.meshgrid(rng3, rng3, rng3)).reshape(3, -1).T:
            d = np.linalg.norm(a.positions[None] - a.positions[:, None] + shift @ a.cell.array, axis=-1)
            n_edges += int(np.sum((d <= 4.0) & (d > 1e-8)))
    n_atoms = sum(len(a) for a in labelled)
    assert stats["avg_num_neighbors"] == pytest.approx(n_edges / n_atoms)
    forces = np.concatenate([a.get_forces() for a in labelled])
    assert stats["forces_rms"] == pytest.approx(np.sqrt(np.mean(forces**2)))
    assert stats["n_structures"] == 4 and stats["n_atoms"] == n_atoms
    assert stats["n_energy"] == 4 and stats["n_stress"] == 2
    assert stats["species_counts"] == {
        z: int(np.sum(np.concatenate([a.numbers for a in labelled]) == z))
        for z in (1, 8, 13, 29)
        if any(z in a.numbers for a in labelled)
    }
    e = np.array([a.get_potential_energy() for a in labelled])
    resid = [(ei - sum(refs[int(z)] for z in a.numbers)) / len(a) for ei, a in zip(e, labelled)]
    assert stats["residual_energy_per_atom_mean"] == pytest.approx(np.mean(resid), abs=1e-12)
    assert stats["residual_energy_per_atom_std"] == pytest.approx(np.std(resid), abs=1e-12)
    with pytest.raises(ValueError, match="no reference energy"):
        dataset_statistics(graphs, {1: 0.0})


def test_bundled_demo_dataset():
    from cartlorem.datasets import demo_path

    path = demo_path()
    assert path.stat().st_size < 1_000_000
    graphs = read_dataset(path, 5.0)
    assert len(graphs) == 500
    assert {g.total_charge.item() for g in graphs} == {-1.0, 0.0, 1.0}
    assert set(torch.cat([g.species for g in graphs]).unique().tolist()) == {1, 8, 11, 17}
    stats = dataset_statistics(graphs, fit_reference_energies(graphs, species=[1, 8, 11, 17]))
    assert 0.3 < stats["forces_rms"] < 3.0 and stats["residual_energy_per_atom_std"] < 0.1


def test_slab_stress_labels_are_ignored(caplog):
    """A slab (pbc [T, T, F]) has no volume, so a stress label on it is not trained against (the model
    gives slabs no stress); before, only structures periodic in no direction were excluded. It is left out with a
    note (it was without a word, unlike a periodic structure's dipole)."""
    import logging

    from ase.build import fcc111
    from ase.calculators.emt import EMT

    slab = fcc111("Cu", (2, 2, 2), vacuum=6.0)
    slab.calc = EMT()
    slab.get_potential_energy(), slab.get_forces(), slab.get_stress()
    with caplog.at_level(logging.INFO, logger="cartlorem.data"):
        (g,) = read_dataset([slab], 4.0)
    assert g.has_stress.tolist() == [False] and g.stress.abs().sum() == 0
    assert "the stress of 1 structure(s) that are not fully periodic (frames 0) is not a label" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cartlorem.data"):
        read_dataset([slab], 4.0, stress_key=None)
    assert "stress" not in caplog.text
    with pytest.raises(ValueError, match="not periodic in all three directions"):
        read_dataset([slab], 4.0, require=("stress",))


def test_frames_after_a_blank_line_are_not_lost(tmp_path):
    """ASE's extxyz reader stops at a blank line between frames without a word: `cat a.xyz b.xyz` of files that end
    in a blank line gave the first file's frames only, and training went ahead on them."""
    import gzip

    from conftest import emt_frames

    frames = emt_frames(6, seed=1)
    ase.io.write(tmp_path / "a.xyz", frames[:3])
    (tmp_path / "a.xyz").write_text((tmp_path / "a.xyz").read_text() + "\n")  # reads alone: a trailing blank line
    ase.io.write(tmp_path / "b.xyz", frames[3:])
    assert len(read_dataset(tmp_path / "a.xyz", 3.0)) == 3
    joined = (tmp_path / "a.xyz").read_text() + (tmp_path / "b.xyz").read_text()
    (tmp_path / "ab.xyz").write_text(joined)
    (tmp_path / "ab.xyz.gz").write_bytes(gzip.compress(joined.encode()))
    for name in ("ab.xyz", "ab.xyz.gz"):
        with pytest.raises(ValueError, match=r"line \d+ follows a blank line .* only the 3 frame\(s\) before it"):
            read_dataset(tmp_path / name, 3.0)
    (tmp_path / "lead.xyz").write_text("\n" + (tmp_path / "b.xyz").read_text())
    with pytest.raises(ValueError, match=r"line 2 follows a blank line \(line 1\)"):
        read_dataset(tmp_path / "lead.xyz", 3.0)
    # an empty comment line is part of a frame, not a separator
    (tmp_path / "plain.xyz").write_text("2\n\nH 0 0 0\nH 0 0 0.74\n2\n\nH 0 0 0\nH 0 0 0.76\n\n\n")
    assert len(read_dataset(tmp_path / "plain.xyz", 3.0, require=())) == 2


def test_stress_labels_that_cannot_be_stresses(tmp_path, caplog):
    """A misspelt stress key trained without stress and said nothing; a virial key (MACE's REF_virials, eV) and a
    stress in GPa were read as eV/Å³ without a word."""
    import logging

    from conftest import emt_frames

    frames = [a for a in emt_frames(6, seed=2) if a.pbc.all()]
    for a in frames:
        a.info["REF_stress"] = a.get_stress()
        a.info["REF_virials"] = -a.get_volume() * a.get_stress(voigt=False)
        a.info["stress_GPa"] = a.get_stress() * 160.21766
    with pytest.raises(ValueError, match="stress_key 'REF_virials' names a virial"):
        read_dataset(frames, 3.0, stress_key="REF_virials")
    with caplog.at_level(logging.WARNING, logger="cartlorem.data"):
        caplog.clear()
        graphs = read_dataset(frames, 3.0, stress_key="REF_stres")
        assert not any(bool(g.has_stress[0]) for g in graphs)
        assert "stress_key 'REF_stres' is in none of its 2 fully periodic frames" in caplog.text
        caplog.clear()
        read_dataset(frames, 3.0, stress_key="stress_GPa")
        assert "GPa" in caplog.text and "in eV/Å³" in caplog.text
        # no fully periodic frame: a named key that no frame has was read in silence (and trains nothing)
        molecules = [a for a in emt_frames(6, seed=2) if not a.pbc.any()]
        caplog.clear()
        read_dataset(molecules, 3.0, stress_key="REF_stress")
        assert f"stress_key 'REF_stress' is in none of its {len(molecules)} frames, and none of them" in caplog.text
        caplog.clear()
        read_dataset(molecules, 3.0)  # the default 'calc' says nothing
        assert "stress_key" not in caplog.text
        caplog.clear()
        read_dataset(frames, 3.0, stress_key="REF_stress")
        assert caplog.text == ""


def test_calculator_results_are_checked_once_per_frame(monkeypatch):
    """ASE's check_state ran once per label and frame (five times), ~60% of the reading time of small molecules."""
    from conftest import emt_frames

    frames = emt_frames(6, seed=3)
    calls = []
    original = SinglePointCalculator.check_state

    def counting(self, atoms, tol=1e-15):
        calls.append(id(atoms))
        return original(self, atoms, tol)

    monkeypatch.setattr(SinglePointCalculator, "check_state", counting)
    read_dataset(frames, 3.0)
    assert len(calls) == len(frames)
    frames[0].positions[0, 0] += 0.1  # stale results are still refused
    with pytest.raises(ValueError, match="stale"):
        read_dataset(frames, 3.0)


def test_isolated_atoms_give_their_elements_reference_energies(make_molecule):
    """Isolated-atom structures (MACE's config_type=IsolatedAtom: one neutral atom, open boundaries) entered the
    least-squares fit as ordinary frames, so the reference energy of Cu came out 0.11 eV against the file's
    -0.5 eV; they now give their elements' references (the lowest of several, a ground state), the other elements
    are fitted to what they leave, and the training statistics leave them out."""
    from cartlorem import CartLorem
    from cartlorem.data import isolated_atom_energies, is_isolated_atom
    from cartlorem.training import fit_statistics

    refs = {1: -13.6, 6: -1029.5, 8: -2041.3, 29: -45000.25}
    frames = _synthetic(make_molecule, refs)
    for symbol, energy, charge in (("H", -13.1, 0), ("H", -13.3, 0), ("O", -2040.0, 0), ("O", -2030.0, 1)):
        atom = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
        atom.info["total_charge"] = charge
        atom.calc = SinglePointCalculator(atom, energy=energy, forces=np.zeros((1, 3)))
        frames.append(atom)
    periodic_one = Atoms("C", positions=[[0.0, 0.0, 0.0]], cell=[3.0, 3.0, 3.0], pbc=True)  # a crystal, not an atom
    periodic_one.calc = SinglePointCalculator(periodic_one, energy=-1000.0, forces=np.zeros((1, 3)))
    graphs = read_dataset(frames, 3.0)
    assert isolated_atom_energies(graphs) == {1: -13.3, 8: -2040.0}  # the lowest; the cation is no reference
    assert isolated_atom_energies(read_dataset([periodic_one], 3.0)) == {}
    fit = fit_reference_energies(graphs, species=[1, 6, 8, 29], fixed=isolated_atom_energies(graphs))
    assert fit[1] == -13.3 and fit[8] == -2040.0
    # the other elements are fitted to what the fixed ones leave: with the fixed ones at the data's own values,
    # exactly their E_Z (a sign slip in the subtraction gave C -2089 eV and Cu -46794 eV and passed the above)
    exact = fit_reference_energies(read_dataset(_synthetic(make_molecule, refs), 3.0), species=[1, 6, 8, 29],
                                   fixed={1: refs[1], 8: refs[8]})
    assert all(exact[z] == pytest.approx(refs[z], abs=1e-6) for z in refs), exact
    model = CartLorem([1, 6, 8, 29], cutoff=3.0, channels=4, num_layers=1, correlation=1).double()
    stats = fit_statistics(model, graphs)
    assert stats["reference_energies"] == fit and stats["n_structures"] == len(graphs) - 3  # the cation stays
    # an isolated atom weighted 0 (config_weight: out of the loss) still gives its element's reference, as MACE's
    # E0s; another structure weighted 0 leaves the fit
    from cartlorem.data import training_statistics

    weighted = [g.replace(weight=torch.zeros(1, dtype=g.positions.dtype) if is_isolated_atom(g) or k == 0
                          else torch.ones(1, dtype=g.positions.dtype)) for k, g in enumerate(graphs)]
    stats0 = training_statistics(weighted, [1, 6, 8, 29])
    assert stats0["isolated_atom_energies"] == {1: -13.3, 8: -2040.0}
    assert stats0["n_structures"] == len(graphs) - 4
    assert float(model.atomic_energies[model.species_index(torch.tensor([8]))]) == -2040.0


def test_duplicate_structures_compare_what_the_model_is_given(make_molecule):
    """Exact repeats of elements, positions, cell, boundaries and charge state are duplicates; a structure that
    differs in any of them (here the total charge, or one coordinate by 1e-9 Å) is not."""
    from cartlorem.data import duplicate_structures

    a, b = make_molecule(5, seed=1), make_molecule(5, seed=2)
    charged = a.copy()
    charged.info["total_charge"] = 1
    moved = a.copy()
    moved.positions[3, 2] += 1e-9
    graphs = read_dataset([a, b, a.copy(), charged, moved, b.copy()], 3.0, require=())
    assert duplicate_structures(graphs) == [(2, 0), (5, 1)]
    others = read_dataset([moved, b, charged], 3.0, require=())
    assert duplicate_structures(graphs, others) == [(0, 4), (1, 1), (2, 3)]
    assert duplicate_structures(graphs[:2], graphs[3:5]) == []


def test_per_frame_weights_of_mace_files(tmp_path, make_molecule, caplog):
    """MACE's per-frame weights were ignored without a word: a frame weighted 0 (left out of MACE's fit) was trained
    on as any other. config_weight, the weight of all of a frame's terms, is read into Graph.weight (1 for the
    frames without one); the per-property weights, which cartlorem does not use, are warned of; a weight that is not
    a number >= 0 is refused."""
    import logging

    frames = []
    for k in range(4):
        atoms = make_molecule(4, seed=k)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 * k, forces=np.zeros((4, 3)))
        frames.append(atoms)
    frames[0].info["config_weight"] = 2.5
    frames[2].info["config_weight"] = 0.0
    frames[3].info["config_forces_weight"] = 10.0
    frames[3].info["config_energy_weight"] = 1.0
    frames[3].info["config_virials_weight"] = 2.0
    ase.io.write(tmp_path / "w.xyz", frames)
    with caplog.at_level(logging.WARNING, logger="cartlorem.data"):
        graphs = read_dataset(tmp_path / "w.xyz", 3.0)
    assert [float(g.weight[0]) for g in graphs] == [2.5, 1.0, 0.0, 1.0]
    # MACE's energy, forces and stress weights are Graph.term_weight (1 where absent); its virials weight is not used
    assert [g.term_weight[0].tolist() for g in graphs] == [[1.0, 1.0, 1.0]] * 3 + [[1.0, 10.0, 1.0]]
    assert "config_virials_weight other than 1 in 1 frame(s) (the first: frame 3)" in caplog.text
    assert "config_forces_weight other" not in caplog.text and "config_energy_weight other" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cartlorem.data"):
        plain = read_dataset(frames[1:2], 3.0)  # no weights: none stored
    assert plain[0].weight is None and plain[0].term_weight is None and "weight" not in caplog.text
    for key in ("config_weight", "config_stress_weight"):
        for bad in (-1.0, "heavy", True, float("nan")):
            frames[1].info[key] = bad
            with pytest.raises(ValueError, match=rf"frame 1: {key} .* must be a finite number >= 0"):
                read_dataset(frames, 3.0)
        frames[1].info[key] = 1.0


def test_a_mace_isolated_atom_in_a_periodic_box_gives_its_reference(caplog):
    """MACE marks its E0 references config_type=IsolatedAtom whatever the boundaries, and DFT codes compute them in
    a periodic box; cartlorem took only open atoms, so such a file's atoms were trained on as crystals and the
    reference energies came from the least-squares fit (H -17.45 eV against the file's -13.6 in a review), without
    a word. A marked atom with no image within the cutoff is now read as open; a marked frame that cannot be a
    reference is warned of, and an unmarked one-atom crystal stays a crystal."""
    import logging

    from cartlorem.data import isolated_atom_energies

    def atom(symbol, energy, box, marked=True, charge=0):
        a = Atoms(symbol, positions=[[1.0, 2.0, 3.0]], cell=[box] * 3, pbc=True)
        if marked:
            a.info["config_type"] = "IsolatedAtom"
        a.info["total_charge"] = charge
        a.calc = SinglePointCalculator(a, energy=energy, forces=np.zeros((1, 3)), stress=np.full(6, 0.01))
        return a

    frames = [atom("H", -13.6, 12.0), atom("O", -432.0, 12.0), atom("C", -150.0, 3.0), atom("N", -270.0, 12.0, False),
              atom("O", -431.0, 12.0, charge=1)]
    with caplog.at_level(logging.INFO, logger="cartlorem.data"):
        graphs = read_dataset(frames, 5.0)
    assert isolated_atom_energies(graphs) == {1: -13.6, 8: -432.0}
    assert [bool(g.pbc.any()) for g in graphs] == [False, False, True, True, True]
    assert not graphs[0].has_stress[0] and bool(graphs[2].has_stress[0])  # an atom has no volume
    assert float(graphs[0].energy[0]) == -13.6 and float(graphs[0].cell.abs().sum()) == 0.0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "frame(s) 2, 4 are marked config_type=IsolatedAtom" in warned[0], warned
    noted = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "frames 0, 1) are read as open atoms" in noted and "not fully periodic" not in noted


def test_a_single_open_atom_without_forces_gets_the_force_0(caplog, make_molecule):
    """MACE's isolated-atom frames often carry an energy only; with forces required (cartlorem train's default) a
    file with them was refused, and both remedies it offered were harmful (no force training, or no references).
    One atom with open boundaries has the force 0 by symmetry (the model's too), which it now gets; a molecule
    without forces is still refused."""
    import logging

    from cartlorem.data import MissingLabelError, isolated_atom_energies

    frames = []
    for k in range(3):
        atoms = make_molecule(4, seed=k)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 * k, forces=np.zeros((4, 3)))
        frames.append(atoms)
    for symbol, energy in (("H", -13.6), ("O", -432.0)):
        atom = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
        atom.info.update(REF_energy=energy, config_type="IsolatedAtom")
        frames.append(atom)
    for atoms in frames[:3]:
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
    with caplog.at_level(logging.INFO, logger="cartlorem.data"):
        graphs = read_dataset(frames, 3.0, energy_key="REF_energy", forces_key="REF_forces")
    assert isolated_atom_energies(graphs) == {1: -13.6, 8: -432.0}
    assert all(bool(g.has_forces[0]) for g in graphs) and float(graphs[3].forces.abs().sum()) == 0.0
    assert "2 single atom(s) with open boundaries and no force label (frames 3, 4)" in caplog.text
    del frames[1].arrays["REF_forces"]
    with pytest.raises(MissingLabelError, match="frame 1"):
        read_dataset(frames, 3.0, energy_key="REF_energy", forces_key="REF_forces")


def test_labels_under_other_keys_than_the_calculators_are_warned_of(caplog, make_molecule):
    """A file written after a calculator was attached holds its results as the calculator's energy and forces, and
    MACE's labels under REF_energy / REF_forces; with the default keys ('calc') cartlorem trained on the former
    without a word (only the stress had such a hint). Other values under other keys are warned of, naming the flag;
    equal ones (a copy) are not."""
    import logging

    frames = []
    for k in range(3):
        atoms = make_molecule(4, seed=k)
        forces = np.full((4, 3), 0.1 * k)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 * k, forces=forces)
        atoms.info.update(REF_energy=-1.0 * k, config_energy_weight=1.0)
        atoms.arrays["REF_forces"] = forces.copy()
        frames.append(atoms)
    with caplog.at_level(logging.WARNING, logger="cartlorem.data"):
        read_dataset(frames, 3.0)
    assert "other values" not in caplog.text
    frames[1].info["REF_energy"] = 5.0
    frames[2].arrays["REF_forces"] = np.zeros((4, 3))
    with caplog.at_level(logging.WARNING, logger="cartlorem.data"):
        graphs = read_dataset(frames, 3.0)
    assert float(graphs[1].energy[0]) == -1.0  # the calculator's, as asked
    assert "frames 1 hold atoms.info 'REF_energy' with other values" in caplog.text
    assert "--energy-key REF_energy" in caplog.text and "frames 2 hold atoms.arrays 'REF_forces'" in caplog.text


@pytest.mark.parametrize("suffix", ["db", "json"])
def test_an_ase_database_gives_its_rows_key_value_pairs_and_data(tmp_path, suffix):
    """ase.io.read builds a database row's Atoms without its key-value pairs and data: a total charge, multiplicity,
    config_weight or REF_energy stored with the row (the usual way to keep them in a database) was silently not
    seen, and the calculator's energy of another model was trained on instead."""
    import ase.db
    from ase.build import molecule

    atoms = molecule("H2O")
    atoms.center(vacuum=3.0)
    n = len(atoms)
    atoms.calc = SinglePointCalculator(atoms, energy=-10.0, forces=np.ones((n, 3)))
    path = tmp_path / f"set.{suffix}"
    with ase.db.connect(str(path)) as db:
        db.write(atoms, REF_energy=-14.0, total_charge=-1, multiplicity=2, config_weight=0.5,
                 data={"REF_forces": np.full((n, 3), 0.25), "REF_stress": np.zeros((3, 3)),
                       "bonds": [[0, 1], [0, 2, 7]]})  # a ragged list: no array, and no refusal of the file
    g = read_dataset(path, 3.0, energy_key="REF_energy", forces_key="REF_forces", stress_key=None)[0]
    assert float(g.energy[0]) == -14.0 and torch.equal(g.forces, torch.full((n, 3), 0.25, dtype=g.forces.dtype))
    assert float(g.total_charge[0]) == -1.0 and float(g.multiplicity[0]) == 2.0 and float(g.weight[0]) == 0.5
    calc = read_dataset(path, 3.0, stress_key=None)[0]  # the calculator's results, as from any other file
    assert float(calc.energy[0]) == -10.0 and float(calc.total_charge[0]) == -1.0


def test_a_lammps_dump_gives_its_elements_and_forces_and_no_energy(tmp_path):
    """ASE reads a LAMMPS text dump with the energy 0.0 in every frame's results (a dump holds none), which was
    trained on as the reference energy, and takes atom types for atomic numbers where the dump has no 'element'
    column (Na and Cl read as H and He), silently."""
    head = "ITEM: TIMESTEP\n0\nITEM: NUMBER OF ATOMS\n2\nITEM: BOX BOUNDS pp pp pp\n0 5.64\n0 5.64\n0 5.64\n"
    rows = ["1 1 0.3 0.2 0.1 0.1 0 0", "2 2 2.82 0.1 0.2 -0.1 0 0"]
    path = tmp_path / "no_elements.lammpstrj"
    path.write_text(head + "ITEM: ATOMS id type x y z fx fy fz\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"no_elements.lammpstrj' is a LAMMPS dump without an 'element' column"):
        read_dataset(path, 3.0)
    path = tmp_path / "elements.lammpstrj"
    named = [f"{r.split()[0]} {r.split()[1]} {'Na' if r.split()[1] == '1' else 'Cl'} {' '.join(r.split()[2:])}"
             for r in rows]
    path.write_text(head + "ITEM: ATOMS id type element x y z fx fy fz\n" + "\n".join(named) + "\n")
    g = read_dataset(path, 3.0, require=("forces",))[0]
    assert g.species.tolist() == [11, 17] and not bool(g.has_energy[0])  # forces read, no energy of 0.0
    assert torch.allclose(g.forces[:, 0], torch.tensor([0.1, -0.1], dtype=g.forces.dtype))
    with pytest.raises(ValueError, match="energy"):  # the default needs energies: a clear refusal, not zeros
        read_dataset(path, 3.0)
