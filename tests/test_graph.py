"""Graph construction: neighbour lists against ASE, edge vectors, collation, bad input."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import primitive_neighbor_list

from cartlorem.graph import Graph, atoms_to_graph, check_structure, collate, neighbour_list


def _edges(i, j, shifts, d):
    """{(i, j, s1, s2, s3): distance} for comparing neighbour lists as sets."""
    return {(int(a), int(b), *map(int, s)): float(r) for a, b, s, r in zip(i, j, shifts, d)}


def _ase_edges(atoms, cutoff):
    i, j, S, d = primitive_neighbor_list(
        "ijSd", atoms.pbc, atoms.cell.array, atoms.positions, cutoff, self_interaction=False
    )
    return _edges(i, j, S, d)


CASES = {
    # name: (make_* fixture kwargs, cutoff Å)
    "triclinic-0": (dict(kind="crystal", seed=0), 3.5),
    "triclinic-1": (dict(kind="crystal", seed=1, n_atoms=9), 5.0),
    "cubic": (dict(kind="crystal", seed=2, triclinic=False), 4.0),
    "cutoff>cell": (dict(kind="crystal", seed=3, n_atoms=3, length=2.6, min_dist=1.0), 6.5),
    "mixed-TFT": (dict(kind="crystal", seed=4, pbc=(True, False, True)), 4.5),
    "slab-TTF": (dict(kind="crystal", seed=5, pbc=(True, True, False)), 4.5),
    "wire-FFT": (dict(kind="crystal", seed=6, pbc=(False, False, True), length=3.0), 5.0),
    "open": (dict(kind="molecule", seed=7, n_atoms=12), 3.0),
}


@pytest.fixture
def structure(request, make_molecule, make_crystal):
    kw, cutoff = CASES[request.param]
    kw = dict(kw)
    make = make_crystal if kw.pop("kind") == "crystal" else make_molecule
    return make(**kw), cutoff


@pytest.mark.parametrize("structure", list(CASES), indirect=True)
def test_neighbour_list_matches_ase(structure):
    atoms, cutoff = structure
    i, j, s = neighbour_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    assert i.dtype == j.dtype == s.dtype == np.int64
    ref = _ase_edges(atoms, cutoff)
    d = np.linalg.norm(atoms.positions[j] - atoms.positions[i] + s @ atoms.cell.array, axis=1)
    ours = _edges(i, j, s, d)
    assert len(ref) > 0
    assert set(ours) == set(ref)
    for key, r in ref.items():
        assert ours[key] == pytest.approx(r, abs=1e-10)
    # the graph takes the atoms in their home cell: ASE's list of those positions
    g = atoms_to_graph(atoms, cutoff)
    home = atoms.copy()
    home.positions = g.positions.numpy()
    ref = _ase_edges(home, cutoff)
    ours = _edges(g.edge_index[0], g.edge_index[1], g.edge_shift.numpy().round(), g.edge_vectors().norm(dim=1).numpy())
    assert set(ours) == set(ref)
    for key, r in ref.items():
        assert ours[key] == pytest.approx(r, abs=1e-10)


def test_many_images_when_cutoff_exceeds_cell(make_crystal):
    atoms = make_crystal(n_atoms=2, seed=3, length=2.6, min_dist=1.0)
    g = atoms_to_graph(atoms, 7.0)
    assert g.edge_shift.abs().max() >= 2  # reaches beyond the first images
    i, j = g.edge_index
    assert bool(((i == j) & (g.edge_shift.abs().sum(1) > 0)).any())  # an atom sees its own images
    assert not bool(((i == j) & (g.edge_shift.abs().sum(1) == 0)).any())  # never itself


@pytest.mark.parametrize("structure", ["triclinic-1", "slab-TTF", "open"], indirect=True)
def test_edge_vectors_match_ase(structure):
    atoms, cutoff = structure
    g = atoms_to_graph(atoms, cutoff, wrap=False)  # the positions as given (wrapping: the test below)
    i, j, S, D = primitive_neighbor_list("ijSD", atoms.pbc, atoms.cell.array, atoms.positions, cutoff)
    ref = {(int(a), int(b), *map(int, s)): v for a, b, s, v in zip(i, j, S, D)}
    vec = g.edge_vectors().numpy()
    for e, (a, b) in enumerate(g.edge_index.T.tolist()):
        key = (a, b, *map(int, g.edge_shift[e].round().tolist()))
        np.testing.assert_allclose(vec[e], ref[key], atol=1e-10)
    # convention spelled out: r_ij = pos[j] − pos[i] + shift @ cell
    pos, cell = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)
    a, b = g.edge_index
    np.testing.assert_allclose(vec, (pos[b] - pos[a] + g.edge_shift @ cell).numpy(), atol=1e-12)


def test_edge_vectors_follow_positions_and_strain(make_crystal):
    atoms = make_crystal(seed=8)
    g = atoms_to_graph(atoms, 4.0)
    strain = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    deform = torch.eye(3, dtype=torch.float64) + strain
    vec = g.edge_vectors(g.positions @ deform, g.cell @ deform)
    np.testing.assert_allclose(vec.detach().numpy(), g.edge_vectors().numpy(), atol=1e-12)
    (vec**2).sum().backward()
    assert strain.grad is not None and torch.isfinite(strain.grad).all()
    # a homogeneous strain acts on the edge vectors directly
    eps = 1e-2 * torch.tensor([[1.0, 0.2, 0.0], [0.2, -0.5, 0.1], [0.0, 0.1, 0.3]], dtype=torch.float64)
    deform = torch.eye(3, dtype=torch.float64) + eps
    strained = g.edge_vectors(g.positions @ deform, g.cell @ deform)
    np.testing.assert_allclose(strained.numpy(), (g.edge_vectors() @ deform).numpy(), atol=1e-12)


def test_atoms_to_graph_fields(make_crystal):
    atoms = make_crystal(seed=9)
    atoms.info["total_charge"] = -2
    g = atoms_to_graph(atoms, 4.0, dtype=torch.float32)
    n = len(atoms)
    assert g.positions.shape == (n, 3) and g.positions.dtype == torch.float32
    assert g.species.tolist() == atoms.numbers.tolist() and g.species.dtype == torch.long
    assert g.batch.tolist() == [0] * n
    assert g.cell.shape == (1, 3, 3) and g.pbc.tolist() == [[True] * 3]
    assert g.total_charge.tolist() == [-2.0]
    assert g.edge_index.dtype == torch.long and g.edge_shift.dtype == torch.float32
    assert g.energy is None and g.num_graphs == 1 and g.num_atoms.tolist() == [n]
    # open structures store a zero cell, whatever ase.Atoms carried
    mol = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=5 * np.eye(3), pbc=False)
    gm = atoms_to_graph(mol, 3.0)
    assert gm.cell.abs().sum() == 0 and gm.edge_shift.abs().sum() == 0
    assert gm.edge_index.shape[1] == 6


@pytest.mark.parametrize("pbc", [True, (True, True, False), (False, True, True)])
def test_periodic_positions_are_taken_in_their_home_cell(make_crystal, pbc):
    """atoms_to_graph takes each atom into its home cell along the periodic rows (fractional coordinates in [0, 1)
    there, as ASE's wrap for a fully periodic cell), whatever image it was given in; nothing moves along open
    directions."""
    atoms = make_crystal(seed=11, n_atoms=8, pbc=pbc)
    g = atoms_to_graph(atoms, 4.0)
    periodic = atoms.cell.array[atoms.pbc]
    moved_by = np.linalg.lstsq(periodic.T, (atoms.positions - g.positions.numpy()).T, rcond=None)[0]
    np.testing.assert_allclose(moved_by, moved_by.round(), atol=1e-9)  # whole periodic lattice vectors
    assert np.abs(moved_by).max() >= 1  # make_crystal put some atoms in other images
    frac = g.positions.numpy() @ np.linalg.pinv(periodic)
    assert frac.min() >= 0.0 and frac.max() < 1.0
    if all(atoms.pbc):
        home = atoms.copy()
        home.wrap(eps=0.0)
        np.testing.assert_allclose(g.positions.numpy(), home.positions, atol=1e-12)
    moved = atoms.copy()
    moved.positions += (np.random.default_rng(0).integers(-3, 4, size=(len(atoms), 3)) * atoms.pbc) @ atoms.cell.array
    gm = atoms_to_graph(moved, 4.0)
    np.testing.assert_allclose(gm.positions.numpy(), g.positions.numpy(), atol=1e-10)
    assert torch.equal(gm.edge_index, g.edge_index) and torch.equal(gm.edge_shift, g.edge_shift)
    np.testing.assert_allclose(atoms_to_graph(atoms, 4.0, wrap=False).positions.numpy(), atoms.positions)


def test_float32_graph_of_an_unwrapped_frame_keeps_its_resolution(make_crystal):
    """A frame of an unwrapped trajectory 1000 cells from the origin: its float32 graph's edge vectors are those
    of the float64 graph to float32 rounding of the home-cell positions, not of positions ~4000 Å out."""
    atoms = make_crystal(seed=12)
    ref = atoms_to_graph(atoms, 4.0).edge_vectors()
    far = atoms.copy()
    far.positions += 1000 * atoms.cell.array.sum(0)
    vec = atoms_to_graph(far, 4.0, dtype=torch.float32).edge_vectors().double()
    assert (vec - ref).abs().max() < 5e-6


def test_collate_is_concatenation(make_crystal, make_molecule):
    structures = [
        make_crystal(seed=10),
        make_molecule(n_atoms=7, seed=11),
        make_crystal(n_atoms=4, seed=12, pbc=(True, False, True)),
    ]
    structures[1].info["total_charge"] = 1
    singles = [atoms_to_graph(a, 4.0) for a in structures]
    g = collate(singles)
    n = [len(a) for a in structures]
    assert g.num_graphs == 3 and g.num_atoms.tolist() == n
    assert g.batch.tolist() == sum(([k] * m for k, m in enumerate(n)), [])
    assert g.total_charge.tolist() == [0.0, 1.0, 0.0]
    offsets = np.cumsum([0] + n[:-1])
    expected_index = torch.cat([s.edge_index + int(o) for s, o in zip(singles, offsets)], dim=1)
    assert torch.equal(g.edge_index, expected_index)
    # edge vectors of the batch are those of the single structures, in order
    np.testing.assert_allclose(
        g.edge_vectors().numpy(), torch.cat([s.edge_vectors() for s in singles]).numpy(), atol=1e-12
    )
    # the centre and neighbour of every edge belong to the same structure
    assert torch.equal(g.batch[g.edge_index[0]], g.batch[g.edge_index[1]])
    # collating batches again keeps structure indices consistent
    gg = collate([collate(singles[:2]), singles[2]])
    assert torch.equal(gg.batch, g.batch) and torch.equal(gg.edge_index, g.edge_index)
    assert collate(singles[:1]) is singles[0]
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_graph_to_casts_floats_only(make_molecule):
    g = atoms_to_graph(make_molecule(seed=13), 3.0).to(dtype=torch.float32)
    assert g.positions.dtype == g.cell.dtype == g.edge_shift.dtype == torch.float32
    assert g.species.dtype == g.edge_index.dtype == torch.long and g.pbc.dtype == torch.bool
    assert isinstance(g, Graph)


def test_nan_positions_raise(make_molecule):
    atoms = make_molecule(seed=14)
    atoms.positions[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*\[3\]"):
        atoms_to_graph(atoms, 3.0)


def test_overlapping_atoms_raise(make_molecule, make_crystal):
    atoms = make_molecule(seed=15)
    atoms.positions[5] = atoms.positions[2] + 1e-4
    with pytest.raises(ValueError, match="overlapping"):
        atoms_to_graph(atoms, 3.0)
    # an atom sitting on the periodic image of another
    crystal = make_crystal(seed=16)
    crystal.positions[1] = crystal.positions[0] + crystal.cell[2]
    with pytest.raises(ValueError, match="overlapping"):
        atoms_to_graph(crystal, 3.0)


def test_zero_volume_cell_raises():
    atoms = Atoms(
        "NaCl", positions=[[0, 0, 0], [1.4, 1.4, 1.4]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 0]], pbc=True
    )
    with pytest.raises(ValueError, match="zero volume"):
        atoms_to_graph(atoms, 3.0)
    # only the periodic directions must span space: a slab with a zero third row is fine …
    slab = Atoms("NaCl", positions=[[0, 0, 0], [1.4, 1.4, 1.4]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]])
    slab.pbc = (True, True, False)
    assert atoms_to_graph(slab, 3.0).edge_index.shape[1] > 0
    # … but a degenerate periodic plane is not
    slab.cell = [[3, 0, 0], [6, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="zero area"):
        atoms_to_graph(slab, 3.0)


def test_check_structure_messages():
    with pytest.raises(ValueError, match="frame 7: cell contains NaN"):
        check_structure(np.zeros((1, 3)), np.full((3, 3), np.nan), np.ones(3, bool), label="frame 7")
    with pytest.raises(ValueError, match="no atoms"):
        check_structure(np.zeros((0, 3)), np.eye(3), np.ones(3, bool))
    with pytest.raises(ValueError, match="cutoff"):
        neighbour_list(np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]], np.eye(3), np.zeros(3, bool), -1.0)


def test_a_huge_cutoff_on_an_open_structure_searches_only_its_extent(make_molecule, monkeypatch):
    """CartLorem(cutoff=1e6) on a 17-atom molecule ran for days inside vesin (its cell list grows as the cutoff
    cubed); every pair of an open structure is within its bounding box's diagonal, so the search stops there and
    finds the same pairs."""
    import vesin

    from cartlorem.graph import neighbour_list

    atoms = make_molecule(17, seed=3)
    asked = []
    original = vesin.NeighborList

    def recording(cutoff, **kw):
        asked.append(cutoff)
        assert cutoff < 1e3, "the search would run for days"  # fail, not hang, without the cap
        return original(cutoff=cutoff, **kw)

    monkeypatch.setattr(vesin, "NeighborList", recording)
    i, j, s = neighbour_list(atoms.positions, np.zeros((3, 3)), np.zeros(3, bool), 1e6)
    extent = float(np.linalg.norm(np.ptp(atoms.positions, axis=0)))
    assert asked == [pytest.approx(extent + 1.0)]
    assert len(i) == 17 * 16 and not s.any()
    i2, j2, _ = neighbour_list(atoms.positions, np.zeros((3, 3)), np.zeros(3, bool), 3.0)
    assert asked[-1] == 3.0 and 0 < len(i2) < len(i)
