"""atoms → graph: bad charge states and neighbour lists against a brute-force search."""

import itertools

import numpy as np
import pytest
from ase import Atoms

from cartlorem.graph import atoms_to_graph, neighbour_list


@pytest.mark.parametrize("charge", [float("nan"), float("inf"), True])
def test_total_charge_must_be_a_finite_number(charge):
    a = Atoms("H2", positions=[[0, 0, 0], [0.8, 0, 0]])
    a.info["total_charge"] = charge  # no multiplicity
    with pytest.raises(ValueError, match=r"H2: total_charge (must be a finite|and multiplicity must be) number"):
        atoms_to_graph(a, 3.0)


def test_a_total_charge_above_the_nuclear_charge_is_refused_without_a_multiplicity():
    """H2 with total charge 3 has −1 electrons: refused whether or not a multiplicity is given (the electron
    count was checked only with one); 2 (no electrons) and a fractional model charge are accepted."""
    from cartlorem.data import read_dataset

    a = Atoms("H2", positions=[[0, 0, 0], [0.8, 0, 0]])
    a.info["total_charge"] = 3
    with pytest.raises(ValueError, match=r"^H2: total_charge 3 exceeds the nuclear charge 2"):
        atoms_to_graph(a, 3.0)
    ok = a.copy()
    ok.info["total_charge"] = 0
    with pytest.raises(ValueError, match=r"^structures, frame 1: total_charge 3 exceeds the nuclear charge 2"):
        read_dataset([ok, a], 3.0, require=())
    for charge in (2, 2.5, -1):
        ok.info["total_charge"] = charge
        assert atoms_to_graph(ok, 3.0).total_charge.tolist() == [charge]


def _brute_force_pairs(pos, cell, pbc, cutoff):
    """Every (i, j, n1, n2, n3) with 0 < |r_j − r_i + n·cell| < cutoff, over enough images."""
    ranges = []
    for d in range(3):
        if pbc[d]:
            height = 1.0 / np.linalg.norm(np.linalg.inv(cell)[:, d])  # distance between lattice planes
            n = int(np.ceil(cutoff / height)) + 2  # positions may lie up to half a cell outside it
            ranges.append(range(-n, n + 1))
        else:
            ranges.append([0])
    out = set()
    for s in itertools.product(*ranges):
        d = pos[None, :, :] - pos[:, None, :] + np.array(s) @ cell  # [i, j, 3]
        for i, j in zip(*np.nonzero((np.linalg.norm(d, axis=-1) < cutoff) & (np.linalg.norm(d, axis=-1) > 1e-9))):
            out.add((int(i), int(j)) + s)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_neighbour_list_matches_brute_force_in_small_skewed_cells(seed):
    """Small triclinic cells, mixed pbc, atoms outside the cell, cutoffs up to several cell heights."""
    rng = np.random.default_rng(seed)
    cell = np.eye(3) * rng.uniform(1.5, 3.5) + rng.normal(size=(3, 3)) * 0.6
    pbc = rng.random(3) < 0.7
    pos = rng.uniform(-0.5, 1.5, size=(int(rng.integers(1, 5)), 3)) @ cell
    cutoff = float(rng.uniform(1.0, 5.0))
    i, j, s = neighbour_list(pos, cell, pbc, cutoff)
    got = {(int(a), int(b)) + tuple(int(x) for x in c) for a, b, c in zip(i, j, s)}
    assert got == _brute_force_pairs(pos, cell if pbc.any() else np.zeros((3, 3)), pbc, cutoff)


def test_engine_graphs_refuse_no_structures_and_non_elements():
    """structures_to_graph failed inside numpy for zero structures, and took atomic number −1 for a total charge
    above the nuclear charge ("check the total charge")."""
    import torch

    from cartlorem.integrations.common import structures_to_graph

    with pytest.raises(ValueError, match=r"no structures: cells has shape \[0, 3, 3\]"):
        structures_to_graph(torch.zeros(0, 3), [], torch.zeros(0, 3, 3), False, cutoff=3.0)
    for bad in (-1, 0, 119):
        with pytest.raises(ValueError, match=rf"numbers must be atomic numbers 1\.\.118, got \[{bad}\]"):
            structures_to_graph(torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]]), [1, bad], torch.zeros(3, 3), False,
                                cutoff=3.0)
    # non-integers were cast: 8.9 read as oxygen, and structure indices 0.7 and 0.2 as structure 0
    two = torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"numbers must be whole numbers, got \[8.9\]"):
        structures_to_graph(two, [8.9, 1.0], torch.zeros(3, 3), False, cutoff=3.0)
    with pytest.raises(ValueError, match=r"system_idx must be whole numbers, got \[0.7\]"):
        structures_to_graph(two, [8, 1], torch.zeros(2, 3, 3), False, system_idx=[0.7, 1.0], cutoff=3.0)
    graph = structures_to_graph(two, torch.tensor([8.0, 1.0]), torch.zeros(2, 3, 3), False,
                                system_idx=np.array([0, 1], dtype=np.int32), cutoff=3.0)  # whole floats, int32: fine
    assert graph.species.tolist() == [8, 1] and graph.batch.tolist() == [0, 1]


def test_an_atom_at_its_own_image_names_the_cell():
    """An atom 0.05 Å from its own periodic image was reported as 'atoms 0 and 0 are ... apart (overlapping
    atoms)'; the message now says the cell is too short."""
    atoms = Atoms("H2", positions=[[0.0, 0.0, 0.0], [0.0, 2.0, 2.0]], cell=[0.05, 5.0, 5.0], pbc=True)
    with pytest.raises(ValueError, match=r"atom 0 is 5\.00e-02 Å from its own periodic image .*cell is too short"):
        atoms_to_graph(atoms, 3.0)


def test_a_dummy_atom_is_named_once():
    """ASE's dummy atom X (Z = 0) was named 'Z=0 (Z=0)'."""
    import torch

    from cartlorem import CartLorem

    model = CartLorem([1, 8], cutoff=3.0, channels=4, num_layers=1, correlation=1, num_basis=4, radial_hidden=4,
                      readout_hidden=4)
    with pytest.raises(ValueError, match=r"species not known to the model: Z=0; the model knows H, O"):
        model.species_index(torch.tensor([1, 0]))
