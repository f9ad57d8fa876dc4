"""Shared pytest fixtures: small, seeded test structures (ase.Atoms) for graph, data and model tests.

Each fixture returns a *factory* so that a test can ask for several different structures;
every factory is deterministic for a given ``seed``.
"""

import numpy as np
import pytest


def _random_positions(rng, n_atoms, lo, hi, min_dist, max_tries=10_000):
    """n_atoms points uniformly in the box [lo, hi]^3 with all pairwise distances ≥ min_dist (Å)."""
    pos = []
    for _ in range(max_tries):
        p = rng.uniform(lo, hi, size=3)
        if all(np.linalg.norm(p - q) >= min_dist for q in pos):
            pos.append(p)
            if len(pos) == n_atoms:
                return np.array(pos)
    raise RuntimeError("could not place atoms; use a larger box or a smaller min_dist")


@pytest.fixture
def make_molecule():
    """Factory ``make_molecule(n_atoms=8, species=(1, 6, 8), seed=0, min_dist=0.9, size=None)``.

    Returns an open (pbc False, no cell) ``ase.Atoms`` of ``n_atoms`` atoms with elements drawn
    from ``species`` and random positions in a cube of side ``size`` Å (default grows with
    n_atoms so the density stays molecular) with pairwise distances ≥ ``min_dist`` Å.
    """
    from ase import Atoms

    def make(n_atoms=8, species=(1, 6, 8), seed=0, min_dist=0.9, size=None):
        rng = np.random.default_rng(seed)
        size = size if size is not None else 1.6 * n_atoms ** (1 / 3) + 1.0
        pos = _random_positions(rng, n_atoms, 0.0, size, min_dist)
        numbers = rng.choice(np.asarray(species), size=n_atoms)
        return Atoms(numbers=numbers, positions=pos, pbc=False)

    return make


@pytest.fixture
def make_crystal():
    """Factory ``make_crystal(n_atoms=6, species=(11, 17), seed=0, pbc=True, triclinic=True,
    length=4.0, min_dist=1.2)``.

    Returns a periodic ``ase.Atoms``: a random cell whose rows have lengths ≈ ``length`` Å
    (skewed by up to ~25 % when ``triclinic``, a cube otherwise), ``n_atoms`` atoms drawn from
    ``species`` at random fractional positions, all distances (nearest images included)
    ≥ ``min_dist`` Å, and positions *not* wrapped into the cell (a few are shifted
    by whole lattice vectors, to exercise wrapping). ``pbc`` may be a bool or three bools.
    """
    from ase import Atoms

    def make(n_atoms=6, species=(11, 17), seed=0, pbc=True, triclinic=True, length=4.0, min_dist=1.2):
        from ase.geometry import get_distances

        rng = np.random.default_rng(seed)
        cell = length * np.eye(3)
        if triclinic:
            cell = cell + rng.uniform(-0.25, 0.25, size=(3, 3)) * length
        pbc3 = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
        pos = np.zeros((0, 3))
        for _ in range(10_000):  # sequential placement, distances measured between nearest images
            p = rng.uniform(0.0, 1.0, size=3) @ cell
            if len(pos) == 0 or get_distances(p, pos, cell=cell, pbc=pbc3)[1].min() >= min_dist:
                pos = np.vstack([pos, p])
                if len(pos) == n_atoms:
                    break
        else:
            raise RuntimeError("could not place atoms; use a larger cell or a smaller min_dist")
        pos += rng.integers(-1, 2, size=(n_atoms, 3)) * pbc3 @ cell  # some atoms in other images
        numbers = rng.choice(np.asarray(species), size=n_atoms)
        return Atoms(numbers=numbers, positions=pos, cell=cell, pbc=pbc3)

    return make
