"""benchmarks/nve.py: the drift / fluctuation metric on synthetic energy series with a known answer,
and the start structures (no training, no MD)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: benchmarks is a package
from benchmarks import nve  # noqa: E402


def series(n_atoms=64, drift=0.02, amplitude=0.3, period_ps=0.05, duration_ps=2.0, dt_ps=0.001, e0=-4074.8):
    """Total energy (eV) of ``n_atoms`` with a linear drift (meV/atom/ps) and a cosine oscillation of
    ``amplitude`` meV/atom, symmetric about the middle of the run so that it cannot tilt the fit."""
    t = np.arange(int(round(duration_ps / dt_ps)) + 1) * dt_ps
    mid = 0.5 * (t[0] + t[-1])
    e_per_atom_mev = drift * t + amplitude * np.cos(2 * np.pi * (t - mid) / period_ps)
    return t, e0 + e_per_atom_mev * n_atoms / 1000.0


def test_drift_and_fluctuation_of_a_known_series():
    t, e = series()  # 2 ps = 40 whole periods of the oscillation
    m = nve.conservation_metrics(t, e, 64)
    assert m["drift_mev_per_atom_per_ps"] == pytest.approx(0.02, abs=1e-9)
    # RMS of a cosine over whole periods (sampled 50 times per period) about its mean: A / sqrt(2)
    assert m["rms_fluctuation_mev_per_atom"] == pytest.approx(0.3 / math.sqrt(2), rel=1e-3)
    assert m["duration_ps"] == pytest.approx(2.0)
    assert m["points"] == len(t)
    # the standard error of the fit is small against a drift of 0.02 over 40 periods ...
    assert m["drift_stderr_mev_per_atom_per_ps"] < 0.02
    # ... and the drift adds to the spread about the mean, not to the fluctuation about the line
    assert m["std_mev_per_atom"] == pytest.approx(math.sqrt(0.3**2 / 2 + (0.02 * 2.0) ** 2 / 12), rel=2e-3)


def test_units_and_normalisation():
    # E(t) = E0 + 0.5 eV/ps · t for 1000 atoms: 0.5 meV/atom/ps, no fluctuation; max |E - E0| at 3 ps
    t = np.linspace(0.0, 3.0, 301)
    m = nve.conservation_metrics(t, -1.0e5 + 0.5 * t, 1000)
    assert m["drift_mev_per_atom_per_ps"] == pytest.approx(0.5, rel=1e-9)
    assert m["rms_fluctuation_mev_per_atom"] < 1e-9
    assert m["max_deviation_mev_per_atom"] == pytest.approx(1.5, rel=1e-9)
    # the same series for twice the atoms is half the per-atom drift
    assert nve.conservation_metrics(t, 0.5 * t, 2000)["drift_mev_per_atom_per_ps"] == pytest.approx(0.25, rel=1e-9)


def test_float32_sized_noise_does_not_look_like_drift():
    # white noise of the size of float32 rounding of a -4000 eV energy (0.004 meV/atom), no drift
    rng = np.random.default_rng(0)
    t = np.arange(10001) * 0.001
    e = -4074.8 + rng.normal(0.0, 0.004e-3 * 64, t.size)
    m = nve.conservation_metrics(t, e, 64)
    assert abs(m["drift_mev_per_atom_per_ps"]) < 4 * m["drift_stderr_mev_per_atom_per_ps"] < 1e-4
    assert m["rms_fluctuation_mev_per_atom"] == pytest.approx(0.004, rel=0.05)


@pytest.mark.parametrize("args, match", [
    (([0.0, 1.0], [1.0, 2.0], 8), "at least 3"),
    (([0.0, 1.0, 2.0], [1.0, 2.0], 8), "same length"),
    (([0.0, 1.0, 2.0], [1.0, float("nan"), 2.0], 8), "finite"),
    (([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], 8), "span"),
    (([0.0, 1.0, 2.0], [1.0, 2.0, 3.0], 0), "n_atoms"),
])
def test_bad_input_is_refused(args, match):
    with pytest.raises(ValueError, match=match):
        nve.conservation_metrics(*args)


def test_start_structures():
    w = nve.water_box(3, seed=0)  # 27 molecules at 1 g/cm³
    assert len(w) == 81 and w.get_chemical_formula() == "H54O27"
    density = w.get_masses().sum() / w.get_volume() * 1.66054  # amu/Å³ → g/cm³
    assert density == pytest.approx(1.0, rel=2e-3)
    d = w.get_all_distances(mic=True)
    assert np.allclose(d[0, 1:3], nve.WATER_OH) and nve.min_intermolecular_distance(w) > 1.5
    nacl = nve.nacl_crystal(5.64)
    assert len(nacl) == 64 and nacl.get_chemical_formula() == "Cl32Na32" and nacl.pbc.all()
    assert nacl.get_volume() == pytest.approx(8 * 5.64**3)
    assert nve.lattice_constant_from([nacl]) == pytest.approx(5.64)


def test_molecule_check_of_whole_and_broken_water():
    w = nve.water_box(3, seed=0)
    hh = 2 * nve.WATER_OH * math.sin(math.radians(nve.WATER_HOH) / 2)  # the H–H distance, the longest in-molecule
    m = nve.molecule_check(w, 3)
    assert m["max_intramolecular_a"] == pytest.approx(hh, abs=1e-9)
    assert m["min_intermolecular_a"] == pytest.approx(nve.min_intermolecular_distance(w), abs=1e-12)
    w.positions[4] += [0.0, 0.0, 2.0]  # pull one H of the second molecule 2 Å away: the molecule is broken
    assert nve.molecule_check(w, 3)["max_intramolecular_a"] > 2.0


def test_missing_water_training_set_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="water_data.py"):
        nve._training_frames("water", tmp_path, False, tmp_path / "nope.xyz")


def test_water_data_frames_carry_the_labels_of_their_own_positions(tmp_path):
    """The bulk-water generator keeps MD frames with the energy, forces and stress of the stored
    positions (not those of a neighbouring step) and labels rattled / strained frames afresh."""
    pytest.importorskip("tblite")
    from ase.io import read
    from tblite.ase import TBLite

    from benchmarks import water_data

    out = tmp_path / "w.xyz"
    assert water_data.main([str(out), "--molecules-per-side", "2", "--trajectories", "1", "--steps", "2",
                            "--every", "2", "--rattled", "1", "--workers", "1"]) == 0
    frames = read(out, ":")
    assert [f.info["kind"] for f in frames] == ["md", "md", "rattled"]
    assert [int(f.info["step"]) for f in frames[:2]] == [0, 2]
    assert not list(tmp_path.glob("w.xyz.part*"))
    for f in frames:
        ref = f.copy()
        ref.calc = TBLite(method="GFN1-xTB", verbosity=0, accuracy=1.0, max_iterations=300)
        assert f.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-5)
        np.testing.assert_allclose(f.get_forces(), ref.get_forces(), atol=1e-4)
        np.testing.assert_allclose(f.get_stress(), ref.get_stress(), atol=1e-6)
    assert abs(frames[2].get_volume() / frames[0].get_volume() - 1) <= 3 * 0.03 + 1e-9
    with pytest.raises(SystemExit):
        water_data.main([str(out), "--every", "0"])


def _frame_as_md(atoms, step=0):
    a = atoms.copy()
    a.info.update({"kind": "md", "trajectory": 0, "step": step, "temperature_k": 300.0})
    return a


def test_compressed_water_keeps_rigid_whole_molecules_at_the_requested_density():
    from benchmarks import water_data

    w = nve.water_box(3, seed=1)
    w.positions[3:6] += w.cell[0]  # one molecule moved by a lattice vector: the same structure
    w.positions[7] -= w.cell[1]  # one H of another molecule in the next image: not whole as stored
    c = water_data.compress(w, 1.45)
    from ase.units import _amu

    assert c.get_masses().sum() * _amu * 1e27 / c.get_volume() == pytest.approx(1.45, rel=1e-9)  # g/cm³
    ref = nve.water_box(3, seed=1)
    for k in range(27):  # every molecule rigid: its in-molecule distances (not minimum image) unchanged
        blk = slice(3 * k, 3 * k + 3)
        np.testing.assert_allclose(c[blk].get_all_distances(), ref[blk].get_all_distances(), atol=1e-9)
    # centres of mass scaled with the cell: intermolecular O–O distances shrink by the cube-root factor
    f = (1.0 / 1.45) ** (1 / 3)
    com = lambda a: (a.get_masses().reshape(-1, 3, 1) * a.positions.reshape(-1, 3, 3)).sum(1) / a.get_masses().reshape(-1, 3).sum(1)[:, None]
    dcom_ref = water_data._mic(com(ref)[1] - com(ref)[0], ref.cell.array)
    dcom_c = water_data._mic(com(c)[1] - com(c)[0], c.cell.array)
    np.testing.assert_allclose(dcom_c, f * dcom_ref, atol=1e-9)


@pytest.mark.parametrize("kinds, key, lo, hi", [(("OO",), "OO", 1.8, 2.3), (("OH", "HO"), "OH", 1.1, 1.5),
                                                (("HH",), "HH", 1.1, 1.6)])
def test_pushed_pairs_are_at_the_drawn_distance_and_nothing_else_collides(kinds, key, lo, hi):
    from benchmarks import water_data

    w = water_data.whole_molecules(nve.water_box(3, seed=2))
    before = w.copy()
    rng = np.random.default_rng(3)
    ranges = {"OO": (1.8, 2.3), "OH": (1.1, 1.5), "HO": (1.1, 1.5), "HH": (1.1, 1.6)}
    busy, pushed = set(), []
    for _ in range(3):
        got = water_data.push_pair(w, rng, kinds, ranges, 1.0, busy)
        assert got is not None
        pushed.append(got)
    d = w.get_all_distances(mic=True)
    sym = w.get_chemical_symbols()
    for i, j, target in pushed:
        assert i // 3 != j // 3 and {sym[i], sym[j]} == set(key)
        assert lo <= target <= hi and d[i, j] == pytest.approx(target, abs=1e-9)
    # pushed molecules moved rigidly, three pairs over six different molecules, all other molecules still
    assert len(busy) == 6
    moved = {k for k in range(27) if not np.allclose(w.positions[3 * k:3 * k + 3], before.positions[3 * k:3 * k + 3])}
    assert 1 <= len(moved) <= 3 and moved <= busy
    for k in moved:
        np.testing.assert_allclose(w[3 * k:3 * k + 3].get_all_distances(), before[3 * k:3 * k + 3].get_all_distances(), atol=1e-9)
    inter = water_data.intermolecular_distances(w)
    for i, j, _ in pushed:
        inter[i, j] = inter[j, i] = np.inf
    assert inter.min() >= 1.0


def test_close_contact_frames_carry_their_own_labels(tmp_path):
    """``--contacts-from``: compressed and pushed frames, each labelled by a GFN1-xTB single point
    of its own positions, with the pushed O–O pairs in the requested range."""
    pytest.importorskip("tblite")
    from ase.io import read, write
    from tblite.ase import TBLite

    from benchmarks import water_data

    src = tmp_path / "md.xyz"
    write(src, [_frame_as_md(nve.water_box(2, seed=s), step=s) for s in range(2)], format="extxyz")
    out = tmp_path / "c.xyz"
    assert water_data.main([str(out), "--contacts-from", str(src), "--trajectories", "1", "--contacts", "3",
                            "--pushes", "1", "--workers", "1", "--seed", "4"]) == 0
    frames = read(out, ":")
    assert [f.info["kind"] for f in frames] == ["compressed", "pushed_oo", "pushed_xh"]
    assert 1.2 <= frames[0].info["density"] <= 1.6
    from ase.units import _amu

    assert frames[0].get_masses().sum() * _amu * 1e27 / frames[0].get_volume() == pytest.approx(frames[0].info["density"], rel=1e-6)
    i, j = (int(x) for x in str(frames[1].info["pushed"]).split(":")[0].split("-"))
    d_oo = frames[1].get_distance(i, j, mic=True)
    assert frames[1].get_chemical_symbols()[i] == frames[1].get_chemical_symbols()[j] == "O"
    assert 1.8 <= d_oo <= 2.3 and d_oo == pytest.approx(frames[1].info["pushed_min_a"], abs=1e-3)
    assert water_data.intermolecular_distances(frames[2]).min() <= 1.6
    for f in frames:
        ref = f.copy()
        ref.calc = TBLite(method="GFN1-xTB", verbosity=0, accuracy=1.0, max_iterations=300)
        assert f.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-5)
        np.testing.assert_allclose(f.get_forces(), ref.get_forces(), atol=1e-4)
        np.testing.assert_allclose(f.get_stress(), ref.get_stress(), atol=1e-6)
    # the close contact is repulsive: the pushed O atoms are driven apart
    e = frames[1].get_positions()[j] - frames[1].get_positions()[i]
    e = water_data._mic(e, frames[1].cell.array)
    f_rel = frames[1].get_forces()[j] - frames[1].get_forces()[i]
    assert f_rel @ e > 0


@pytest.mark.parametrize("argv", [["--density", "1.6", "1.2"], ["--oo", "0", "2"], ["--pushes", "0"], ["--floor", "0"]])
def test_contact_options_are_checked(tmp_path, argv):
    from benchmarks import water_data

    with pytest.raises(SystemExit):
        water_data.main([str(tmp_path / "x.xyz"), *argv])


def test_water_training_frames_join_several_files_and_model_options(tmp_path):
    from ase.io import write

    a, b = tmp_path / "a.xyz", tmp_path / "b.xyz"
    write(a, [_frame_as_md(nve.water_box(2, seed=0))], format="extxyz")
    write(b, [_frame_as_md(nve.water_box(2, seed=s)) for s in (1, 2)], format="extxyz")
    frames, source = nve._training_frames("water", tmp_path, False, [a, b])
    assert len(frames) == 3 and source == f"{a},{b}"
    np.testing.assert_allclose(frames[2].positions, nve.water_box(2, seed=2).positions, atol=1e-6)
    with pytest.raises(SystemExit, match="water_data.py"):
        nve._training_frames("water", tmp_path, False, [a, tmp_path / "missing.xyz"])
    args = nve.parse_args(["--runs", "water-float32", "--water-data", f"{a},{b}", "--water-channels", "8",
                           "--water-cutoff", "4", "--check", "4:100:350,7:20:300"])
    assert args.water_data == [str(a), str(b)]
    assert nve.water_model_options(args) == {**nve.MODEL_OPTIONS, "channels": 8, "cutoff": 4.0}
    assert args.check == [(4, 100, 350.0), (7, 20, 300.0)]
    assert nve.water_model_options(nve.parse_args([])) == nve.MODEL_OPTIONS  # the defaults: the NaCl model's
    for bad in (["--check", "4:100"], ["--water-channels", "0"], ["--water-cutoff", "-1"]):
        with pytest.raises(SystemExit):
            nve.parse_args(bad)
