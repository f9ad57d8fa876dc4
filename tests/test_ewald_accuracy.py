"""The requested ``accuracy`` of periodic Ewald sums, against the same sums converged: order-3 sums (charges and
dipoles to the field gradient), whose real-space tail was charged as order 2."""

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
