"""benchmarks/pme_cost_fit.py fits the constants of the cost models of ``method="auto"``: the constants it
reports must be those the code weighs each term with (or the fitted numbers mean something else in the code)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from cartlorem.ewald import pme  # noqa: E402


def test_pme_cost_terms_count_pairs_stencils_and_mesh_points():
    n, volume, rc, mesh, order = 3000, 29900.0, 8.0, (64, 48, 36), 10
    terms = pme.pme_cost_terms(n, volume, rc, mesh, order, 10, 10, 4)
    pairs = n * (n / volume) * 4 / 3 * math.pi * rc**3 / 2
    k = 64 * 48 * 36
    expected = (1.0, pairs, pairs * 400, n * 1000 * 4, n * 1000 * 80, k * math.log2(k) * 4)
    assert np.allclose(terms, expected, rtol=1e-12)
    assert pme.pme_cost_terms(n, volume, rc, mesh, order, 10, 10, 4, real_space=False)[1:3] == (0.0, 0.0)


@pytest.mark.parametrize("method", ["pme", "ewald"])
def test_fit_recovers_the_constants_the_code_weighs_each_term_with(method, monkeypatch, tmp_path):
    """Times that are exactly a cost model with known constants come back as those constants, by name."""
    import pme_cost_fit

    names = pme.PME_COST_CONSTANTS if method == "pme" else pme.EWALD_COST_CONSTANTS
    truth = dict(zip(names, [0.01 * (i + 1) * 10.0 ** -(3 * i) for i in range(len(names))]))
    for name, value in truth.items():
        monkeypatch.setattr(pme, name, value)
    cost = pme.pme_cost if method == "pme" else pme.ewald_cost

    def fake_pme(atoms, layout, v, smearing, alpha, real_cutoff, mesh, order, repeats):
        volume = abs(np.linalg.det(atoms.cell.array))
        return cost(len(atoms), volume, real_cutoff or 0.0, mesh, order, len(layout), len(layout), v.shape[-1],
                    real_space=real_cutoff is not None)

    def fake_ewald(atoms, layout, v, smearing, accuracy, repeats):
        return cost(atoms.cell.array, len(atoms), accuracy, 2 * max(layout.ranks), smearing, len(layout),
                    len(layout), v.shape[-1])

    monkeypatch.setattr(pme_cost_fit, "time_pme", fake_pme)
    monkeypatch.setattr(pme_cost_fit, "time_ewald", fake_ewald)
    monkeypatch.setattr(pme_cost_fit, "RESULTS", str(tmp_path))
    pme_cost_fit.main(["--methods", method, "--sizes", "3,4,6", "--cutoffs", "4,5", "--orders", "6,8",
                       "--spacings", "0.9,0.6", "--layouts", "012:2,0:5"])
    # the default output names the method: results/pme_cost_fit.{json,md} (the PME-only fit of 27cda9d) is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"pme_cost_fit.{method}.json", f"pme_cost_fit.{method}.md"]
    fitted = json.loads((tmp_path / f"pme_cost_fit.{method}.json").read_text())[method]["fitted"]
    assert list(fitted) == list(names)
    for name in names:
        assert math.isclose(fitted[name], truth[name], rel_tol=1e-4), (name, fitted[name], truth[name])


def test_fit_recovers_the_replica_correction_constants(monkeypatch, tmp_path):
    """--methods replica: times that are exactly slab.replica_cost with known constants come back as those
    constants, by name, and the in-plane vectors it counts are those replica_sum sums."""
    import pme_cost_fit

    from cartlorem.ewald import slab

    names = slab.REPLICA_COST_CONSTANTS
    truth = dict(zip(names, [0.002, 3e-7, 4e-9, 5e-10]))
    for name, value in truth.items():
        monkeypatch.setattr(slab, name, value)
    summed = []
    real = slab.plane_kvector_indices

    def fake_replica(atoms, layout, v, gap, accuracy, repeats):
        box = atoms.cell.array.copy()
        box[2] *= 1.0 + gap / np.linalg.norm(box[2])
        n_k = len(real(box, slab.replica_k_cutoff(gap, accuracy, 2 * max(layout.ranks))))
        summed.append(n_k)
        return slab.replica_cost(len(atoms), n_k, len(layout), len(layout), v.shape[-1])

    monkeypatch.setattr(pme_cost_fit, "time_replica", fake_replica)
    monkeypatch.setattr(pme_cost_fit, "RESULTS", str(tmp_path))
    pme_cost_fit.main(["--methods", "replica", "--slab-sizes", "2,3", "--gaps", "6,10",
                       "--layouts", "012:2,0:5,0:1"])  # three layouts: the per-term constants apart
    result = json.loads((tmp_path / "pme_cost_fit.replica.json").read_text())["replica"]
    assert [r["vectors"] for r in result["rows"]] == summed and min(summed) > 0
    assert list(result["fitted"]) == list(names)
    for name in names:
        assert math.isclose(result["fitted"][name], truth[name], rel_tol=1e-4), (name, result["fitted"][name])
