"""The checks cartlorem.testing ships for users' models: they pass on CartLorem and catch broken models."""

import pytest
import torch
from ase.build import bulk, molecule

from cartlorem import CartLorem
from cartlorem.testing import (
    check_batch_equals_single,
    check_cutoff_smoothness,
    check_forces_fd,
    check_o3_invariance,
    check_stress_fd,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(channels=4, num_layers=2, correlation=2, num_basis=4, radial_hidden=8, readout_hidden=4)


def tiny(species, long_range=None):
    torch.manual_seed(0)
    return CartLorem(species, cutoff=3.0, long_range=long_range, **TINY).double()


def rocksalt():
    a = bulk("NaCl", "rocksalt", a=5.0)
    a.rattle(0.1, seed=1)
    return a


class HardCutoff(torch.nn.Module):
    """A deliberately broken pair model: E = Σ_edges 1/r with no envelope (jumps at the cutoff) and a
    stress that ignores the batch layout. Its forces are exact (autograd)."""

    def __init__(self, cutoff=3.0):
        super().__init__()
        self.cutoff = cutoff
        self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, graph, compute_forces=True, compute_stress=None, create_graph=False):
        from cartlorem.forces import with_derivatives

        def energy(g, positions, cell):
            r = g.edge_vectors(positions, cell).norm(dim=-1)
            e = torch.zeros(g.num_graphs, dtype=r.dtype).index_add(0, g.batch[g.edge_index[0]], self.w / r)
            return {"energy": e}

        out = with_derivatives(energy, graph, compute_forces=compute_forces, compute_stress=bool(compute_stress),
                               create_graph=create_graph)
        if "stress" in out:
            out["stress"] = out["stress"] + 1.0  # wrong: every structure, periodic or not
        return out


def test_checks_pass_on_cartlorem():
    model = tiny([1, 6, 8, 11, 17])
    mol, crystal = molecule("CH3OH"), rocksalt()
    assert check_o3_invariance(model, mol) < 1e-10
    assert check_forces_fd(model, mol) < 1e-6
    assert check_stress_fd(model, crystal) < 1e-6
    assert check_batch_equals_single(model, [mol, crystal, molecule("H2O")]) < 1e-10
    smooth = check_cutoff_smoothness(model, "OH")
    assert smooth["energy_jump"] < 1e-9 and smooth["force_inside"] < 1e-7 and smooth["energy_range"] > 1e-6


def test_checks_catch_a_broken_model():
    model = HardCutoff()
    assert check_forces_fd(model, molecule("H2O"), n=3) < 1e-6  # forces are right ...
    smooth = check_cutoff_smoothness(model, "OH")
    assert smooth["energy_jump"] > 0.1  # ... but the energy jumps by ~1/r_c at the cutoff
    with pytest.raises(AssertionError, match="not periodic"):
        check_batch_equals_single(model, [rocksalt(), molecule("H2O")])
    with pytest.raises(ValueError, match="cutoff"):
        check_cutoff_smoothness(torch.nn.Linear(1, 1), "OH")


def test_every_check_takes_the_cutoff_of_a_model_without_one():
    """The module says "or pass cutoff=" for a model without a cutoff attribute (a user's wrapper), and so does the
    error; check_o3_invariance, check_forces_fd and check_stress_fd raised TypeError for it."""

    class Wrapped(torch.nn.Module):  # a CartLorem inside a user's module, which has no cutoff attribute
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def forward(self, graph, compute_stress=None):
            return self.inner(graph, compute_stress=compute_stress)

    model = tiny([11, 17])
    wrapped, crystal = Wrapped(model), rocksalt()
    with pytest.raises(ValueError, match="pass cutoff="):
        check_o3_invariance(wrapped, crystal)
    assert check_o3_invariance(wrapped, crystal, cutoff=3.0) == check_o3_invariance(model, crystal) < 1e-10
    assert check_forces_fd(wrapped, crystal, cutoff=3.0) == check_forces_fd(model, crystal) < 1e-6
    assert check_stress_fd(wrapped, crystal, cutoff=3.0) == check_stress_fd(model, crystal) < 1e-6
