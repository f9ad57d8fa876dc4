"""benchmarks/nvalchemi_pme.py: its helpers (always), and nvalchemiops against the Ewald path (only where
nvalchemiops is importable: a benchmark-only package, never on CI; the physics test skips otherwise)."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("nvalchemi_pme")


def test_correct_k_squared_is_the_reciprocal_metric_of_a_triclinic_cell():
    cell = torch.tensor([[9.0, 0.0, 0.0], [2.5, 8.4, 0.0], [-1.8, 1.2, 9.3]], dtype=torch.float64)
    mesh = (6, 8, 10)
    k2 = bench.correct_k_squared(cell, mesh)
    assert k2.shape == (6, 8, 6)
    recip = 2 * math.pi * np.linalg.inv(cell.numpy()).T  # rows b_d, a_i . b_d = 2 pi delta_id
    assert np.allclose(cell.numpy() @ recip.T, 2 * math.pi * np.eye(3))
    for idx, m in [((1, 0, 0), (1, 0, 0)), ((0, 7, 2), (0, -1, 2)), ((5, 3, 5), (-1, 3, 5))]:
        k = np.asarray(m, dtype=float) @ recip
        assert float(k2[idx]) == pytest.approx(float(k @ k), rel=1e-12)
    # the transposed metric (what a columns-as-lattice-vectors k-grid gives) differs for this cell
    kt = np.asarray((1, 0, 0), dtype=float) @ (2 * math.pi * np.linalg.inv(cell.numpy()))
    assert abs(float(k2[1, 0, 0]) - float(kt @ kt)) > 1e-3


def test_full_csr_lists_every_pair_both_ways_sorted_by_first_atom():
    rng = np.random.default_rng(0)
    cell = np.array([[6.0, 0.0, 0.0], [1.0, 6.5, 0.0], [0.5, -0.7, 7.0]])
    pos = bench.jittered_cell(cell, 3, rng)
    idx_j, ptr, shifts = bench.full_csr(pos, cell, 4.0)
    assert idx_j.dtype == ptr.dtype == shifts.dtype == torch.int32
    assert int(ptr[0]) == 0 and int(ptr[-1]) == idx_j.numel() == shifts.shape[0]
    pairs = set()
    for i in range(len(pos)):
        for e in range(int(ptr[i]), int(ptr[i + 1])):
            j, s = int(idx_j[e]), tuple(int(x) for x in shifts[e])
            d = pos[j] - pos[i] + np.asarray(s) @ cell
            assert 0 < np.linalg.norm(d) < 4.0
            pairs.add((i, j, s))
    assert all((j, i, tuple(-x for x in s)) in pairs for i, j, s in pairs)
    # brute force over images: the same number of pairs within the cutoff
    count = sum(1 for i in range(len(pos)) for j in range(len(pos)) for s in np.ndindex(5, 5, 5)
                if 0 < np.linalg.norm(pos[j] - pos[i] + (np.asarray(s) - 2) @ cell) < 4.0)
    assert count == len(pairs)


def test_random_multipoles_are_neutral_symmetric_traceless():
    q, mu, th = bench.random_multipoles(20, np.random.default_rng(1))
    assert abs(float(q.sum())) < 1e-12 and mu.shape == (20, 3)
    assert torch.allclose(th, th.transpose(1, 2)) and float(th.diagonal(dim1=1, dim2=2).sum(-1).abs().max()) < 1e-12


@pytest.mark.skipif(importlib.util.find_spec("nvalchemiops") is None,
                    reason="nvalchemiops not importable (benchmark-only: bash benchmarks/setup_nvalchemi.sh)")
def test_nvalchemiops_matches_ewald_in_a_cubic_cell_and_needs_the_k_grid_fix_in_a_triclinic_one():
    """Cubic: their PME = our Ewald (units, packing, quadrupole convention); triclinic: only with |k|² fixed."""
    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(2)
    for cell_np, fix in [(np.eye(3) * 8.0, False),
                         (np.array([[8.0, 0.0, 0.0], [2.0, 7.5, 0.0], [-1.5, 1.0, 8.5]]), True)]:
        pos = torch.tensor(bench.jittered_cell(cell_np, 3, rng))
        cell = torch.tensor(cell_np)
        q, mu, th = bench.random_multipoles(len(pos), rng)
        e_ref, f_ref = bench.ours_energy_forces(pos, cell, q, mu, th, smearing=None, accuracy=1e-10, method="ewald")
        t = bench.Theirs(pos, cell, q, mu, th, sigma=bench.POINT_SIGMA, accuracy=1e-7, k_squared_fix=fix)
        err = bench.errors(*t.energy_forces(), e_ref, f_ref)
        assert err["energy_rel"] < 1e-5 and err["forces_rms_rel"] < 1e-4, err
