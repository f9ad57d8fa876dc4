"""atoms → graph: bad charge states and neighbour lists against a brute-force search."""

import itertools

import numpy as np
import pytest
from ase import Atoms

from cartlorem.graph import atoms_to_graph, neighbour_list


@pytest.mark.parametrize("charge", [float("nan"), float("inf"), True])
def test_total_charge_must_be_a_finite_number(charge):
    a = Atoms("H2", positions=[[0, 0, 0], [0.8, 0, 0]])
    a.info["total_charge"] = charge  # no multiplicity: the charge-state check of the electrons does not run
    with pytest.raises(ValueError, match=r"H2: total_charge (must be a finite number|and multiplicity must be numbers)"):
        atoms_to_graph(a, 3.0)
