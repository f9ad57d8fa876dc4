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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and timings do not depend on the machine's load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def emt_frames(n, seed=0, periodic_every=3):
    """n small Cu/Ag structures with EMT energy/forces (stress for the periodic ones), seeded.

    Clusters: an fcc atom and 3–5 of its nearest neighbours; crystals: a strained 4-atom cubic fcc
    cell. Every structure is rattled by 0.1 Å.
    """
    from ase import Atoms
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    lattice = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    centre = int(np.argmin(np.linalg.norm(lattice.positions - 3.6, axis=1)))
    d = np.linalg.norm(lattice.positions - lattice.positions[centre], axis=1)
    shell = np.flatnonzero((d > 0) & (d < 2.6))  # the 12 nearest neighbours
    frames = []
    for k in range(n):
        if k % periodic_every == 0:
            a = bulk("Cu", "fcc", a=3.6, cubic=True)
            a.set_cell(a.cell * (1 + 0.03 * rng.standard_normal()), scale_atoms=True)
        else:
            pick = np.concatenate([[centre], rng.choice(shell, int(rng.integers(3, 6)), replace=False)])
            a = Atoms("Cu" * len(pick), positions=lattice.positions[pick])
        a.symbols[rng.random(len(a)) < 0.3] = "Ag"
        a.positions += 0.1 * rng.standard_normal(a.positions.shape)
        frames.append(emt_labelled(a))
    return frames


def emt_labelled(a):
    """``a`` with its EMT energy and forces (and stress, when periodic) as single-point results."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    a.calc = EMT()
    res = {"energy": a.get_potential_energy(), "forces": a.get_forces()}
    if a.pbc.any():
        res["stress"] = a.get_stress()
    a.calc = SinglePointCalculator(a, **res)
    return a


def needs_torch(available, what, release):
    """A skip mark for a test of ``what``, which torch has from release ``release`` on: the test is skipped where
    ``available`` (the capability itself, tested where that is simple) is false."""
    import torch

    return pytest.mark.skipif(not available, reason=f"{what} needs torch >= {release} (this is {torch.__version__})")


def works(probe):
    """Whether ``probe()`` runs: a torch capability that a call shows (an older torch raises TypeError for an
    argument it does not know, RuntimeError for a case it does not support)."""
    try:
        probe()
    except (TypeError, RuntimeError):
        return False
    return True


def _compiled_step_mark():
    from cartlorem.training.compiled import TESTED_TORCH, version_note

    return needs_torch(not version_note(), "torch.compile of the training step", ".".join(map(str, TESTED_TORCH)))


#: tests of the compiled training step (torch.compile, dynamo): the library's own rule for the torch it takes
#: (cartlorem.training.compiled.version_note; an older torch trains eagerly, with a warning that says so)
needs_compiled_step = _compiled_step_mark()


@pytest.fixture
def eager_compiled_step(monkeypatch):
    """The compiled training step (cartlorem.training.compiled) with its function run eagerly instead of
    compiled (compiling takes minutes): the trainer's path through it in seconds. Returns a list that gets
    one entry per step taken that way."""
    from cartlorem.training import compiled as compiled_mod

    calls = []
    real_init = compiled_mod.CompiledLossGradient.__init__

    def eager_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        fn = self._loss_and_grad
        self._fn = lambda *a: calls.append(1) or fn(*a)

    monkeypatch.setattr(compiled_mod.CompiledLossGradient, "__init__", eager_init)
    return calls


@pytest.fixture(scope="module")
def restore_torch_threads():
    """The CLI's --threads sets torch's thread count for the whole process: put it back after the module."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run_cli(capsys, *argv):
    """``cartlorem ARGV`` in this process: (exit code, stdout, stderr)."""
    from cartlorem import cli

    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
