"""The requested ``accuracy`` of periodic Ewald sums, against the same sums converged: order-3 sums (charges and
dipoles to the field gradient), whose real-space tail was charged as order 2; and cells whose reciprocal lattice is
coarse (Gaussian sources about a third of the cell wide, e.g. the model's 1 Å smearing in a 3-4 Å primitive cell),
for the eager Ewald sum and the batched one over cells."""

import pytest
import torch

from cartlorem import ewald
from ewald_helpers import gen, rel

DT = torch.float64
PBC = [True, True, True]


@pytest.mark.parametrize("size, n, accuracy", [(9.0, 27, 1e-7), (12.4, 64, 1e-5), (12.4, 64, 1e-7)])
def test_order_three_sums_meet_accuracy(size, n, accuracy):
    """Charges and dipoles to potential, field and gradient (order 3: the long-range block with lmax = 1), 1 Å
    Gaussians at liquid density. Was: the real-space tail charged as order 2 (n = 1 in tail_parameter), the field
    gradient 1.2-1.3x ``accuracy``. Reference: the same sum converged (accuracy 1e-13)."""
    from test_pme import random_system

    cell = torch.eye(3, dtype=DT) * size + 0.3 * torch.randn(3, 3, generator=gen(1), dtype=DT)
    for seed in range(2):
        pos, q, mu, _ = random_system(seed, n, 2, cell)
        ref = ewald.multipole_fields(pos, q, mu, None, cell, PBC, smearing=1.0, accuracy=1e-13, method="ewald")
        got = ewald.multipole_fields(pos, q, mu, None, cell, PBC, smearing=1.0, accuracy=accuracy, method="ewald")
        for rank, (a, b) in enumerate(zip(got, ref)):
            for c in range(a.shape[1]):
                assert rel(a[:, c], b[:, c]) <= accuracy, (seed, rank, c, rel(a[:, c], b[:, c]) / accuracy)


def small_cell_system(seed, scale):
    g = gen(seed)
    cell = scale * torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]], dtype=DT)
    cell = cell + 0.05 * scale * torch.randn(3, 3, generator=g, dtype=DT)
    pos = (0.15 * torch.rand(4, 3, generator=g, dtype=DT)) @ cell  # a tight group: near-field dominated
    q = torch.randn(4, 2, generator=g, dtype=DT)
    mu = 0.5 * torch.randn(4, 2, 3, generator=g, dtype=DT)
    return cell, pos, q, mu


@pytest.mark.parametrize("which", ["q", "mu"])
@pytest.mark.parametrize("accuracy", [1e-4, 1e-5, 1e-6])
def test_coarse_reciprocal_lattice_meets_accuracy(which, accuracy):
    """Was: k_c = 2 p beta from an integral over k; with ~2 lattice spacings inside k_c the field gradient missed
    ``accuracy`` by up to 6.4x (dipoles) and 3.5x (charges) here (0.7x now). Reference: the same sum converged
    (accuracy 1e-14)."""
    for seed, (scale, sigma) in enumerate([(6.0, 1.0), (8.0, 1.5), (12.0, 2.5)]):
        cell, pos, q, mu = small_cell_system(seed, scale)
        src = (q, None) if which == "q" else (None, mu)
        ref = ewald.multipole_fields(pos, *src, None, cell, PBC, smearing=sigma, accuracy=1e-14, method="ewald")
        got = ewald.multipole_fields(pos, *src, None, cell, PBC, smearing=sigma, accuracy=accuracy, method="ewald")
        for rank, (a, b) in enumerate(zip(got, ref)):
            for c in range(a.shape[1]):
                assert rel(a[:, c], b[:, c]) <= accuracy, (seed, rank, c, rel(a[:, c], b[:, c]))
        # the batched sum over cells (the training step) takes the same k-vectors
        batch = torch.zeros(pos.shape[0], dtype=torch.long)
        cells = cell[None]
        q_, mu_ = src
        bat = ewald.batched_multipole_fields(pos, batch, cells, torch.tensor([PBC]), q_, mu_, smearing=sigma,
                                             accuracy=accuracy)
        for rank, (a, b) in enumerate(zip(bat, ref)):
            for c in range(a.shape[1]):
                assert rel(a[:, c], b[:, c]) <= accuracy, ("batched", seed, rank, c, rel(a[:, c], b[:, c]))


@pytest.mark.parametrize("width, length", [(2.5, 200.0), (3.0, 120.0)])
def test_long_thin_cells_meet_accuracy(width, length):
    """A long thin cell is as coarse across as its short sides, whatever its volume. Was (the search for the cutoff
    skipped by the cell's volume): the sum over cells of the compiled training step (reciprocal space only) left tight
    groups of smeared dipoles above ``accuracy``: 1.41x (2.5 x 2.5 x 200 Å) and 1.24x (3 x 3 x 120 Å) at the first
    seed here, up to 3.6x and 1.9x over six. Reference: the eager sum converged (accuracy 1e-13)."""
    from cartlorem.ewald import cells as cells_mod

    accuracy = 1e-5
    cell = torch.diag(torch.tensor([width, width, length], dtype=DT))
    batch = torch.zeros(4, dtype=torch.long)
    for seed in range(3):
        g = gen(seed)
        pos = 0.2 * torch.rand(4, 3, generator=g, dtype=DT) @ cell
        pos[:, 2] = 2.0 * torch.rand(4, generator=g, dtype=DT)
        mu = 0.5 * torch.randn(4, 2, 3, generator=g, dtype=DT)
        ref = ewald.multipole_fields(pos, None, mu, None, cell, PBC, smearing=1.0, accuracy=1e-13, method="ewald")
        plan = cells_mod.periodic_plan(batch, cell[None], smearing=1.0, accuracy=accuracy, source_ranks=(1,))
        got = cells_mod.traced_ewald_fields(pos, batch, cell[None], plan, None, mu, smearing=1.0)
        for rank, (a, b) in enumerate(zip(got, ref)):
            for c in range(a.shape[1]):
                assert rel(a[:, c], b[:, c]) <= accuracy, (seed, rank, c, rel(a[:, c], b[:, c]) / accuracy)


@pytest.mark.parametrize("batched", [False, True])
def test_raised_cutoff_keeps_the_strain_derivative(batched):
    """The raised k-space cutoff cuts between shells of k-vectors: a small strain splits a degenerate shell of a
    cubic cell, and a cutoff just above one of its vectors would keep part of it, an energy step that spoils the
    finite-strain derivative. Stress by autograd (the cutoff held) against central differences of the energy."""
    cell0 = torch.eye(3, dtype=DT) * 4.0
    pos0 = torch.tensor([[0.3, 0.2, 0.1], [2.2, 1.9, 2.1]], dtype=DT)
    q = torch.tensor([[1.0], [-1.0]], dtype=DT)
    mu = torch.tensor([[[0.2, -0.1, 0.3]], [[0.0, 0.4, -0.2]]], dtype=DT)

    def energy(eps):
        strain = torch.eye(3, dtype=DT) + eps
        pos, cell = pos0 @ strain, cell0 @ strain
        if not batched:
            return ewald.electrostatic_energy(pos, q, mu, None, cell, PBC, smearing=1.0, accuracy=1e-5, method="ewald")
        f = ewald.batched_multipole_fields(pos, torch.zeros(2, dtype=torch.long), cell[None], torch.tensor([PBC]),
                                           q, mu, smearing=1.0, accuracy=1e-5, ranks=(0, 1))
        return 0.5 * ((q * f.potential).sum() - (mu * f.field).sum())

    eps = torch.zeros(3, 3, dtype=DT, requires_grad=True)
    (grad,) = torch.autograd.grad(energy(eps), eps)
    h = 1e-5
    for a in range(3):
        for b in range(3):
            e = torch.zeros(3, 3, dtype=DT)
            e[a, b] = h
            fd = float(energy(e) - energy(-e)) / (2 * h)
            assert abs(fd - float(grad[a, b])) <= 1e-6 * max(1.0, abs(fd)), (a, b, fd, float(grad[a, b]))
