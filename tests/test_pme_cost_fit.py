"""benchmarks/pme_cost_fit.py fits the constants of the PME cost model of ``method="auto"``: its features
must be the terms of ``pme.pme_cost`` (or the fitted constants mean something else than the code uses)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from cartlorem.ewald import pme  # noqa: E402


@pytest.mark.parametrize("n_atoms,volume,rc,mesh,order", [(81, 750.0, 4.0, (12, 12, 12), 6),
                                                          (3000, 29900.0, 8.0, (64, 48, 36), 10)])
def test_fit_features_are_the_cost_model_terms(n_atoms, volume, rc, mesh, order):
    import pme_cost_fit

    x = np.array(pme_cost_fit.features(n_atoms, volume, rc, mesh, order, 10, 10, 4))
    constants = np.array([pme.COST_PME_CALL, pme.COST_PAIR, pme.COST_STENCIL, pme.COST_MESH])
    modelled = pme.pme_cost(n_atoms, volume, rc, mesh, order, 10, 10, 4)
    assert math.isclose(float(x @ constants), modelled, rel_tol=1e-12)
