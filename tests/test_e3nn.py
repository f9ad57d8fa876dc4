"""Interop with e3nn: the spherical map, Wigner D matrices and Clebsch–Gordan coefficients.

Only this file needs e3nn (a test extra); without it these tests are skipped and nothing else is.
"""

import math
import pytest
import torch

from cartlorem.tensors import EVEN_PATHS, ODD_PATHS, from_spherical, harmonics, product, stf, to_spherical
from cartlorem.testing import random_orthogonal, rotate

DT = torch.float64


def rand_irrep(shape, rank, gen, dtype=DT):
    x = torch.randn(*shape, *(3,) * rank, generator=gen, dtype=torch.float64)
    return (stf(x) if rank == 2 else x).to(dtype)


e3nn_o3 = pytest.importorskip("e3nn.o3")


def _e3nn_uses_xyz_basis() -> bool:
    q = random_orthogonal(1.0, generator=torch.Generator().manual_seed(0))
    return bool(torch.allclose(e3nn_o3.Irrep(1, -1).D_from_matrix(q).double(), q, atol=1e-5))


xyz_basis = pytest.mark.skipif(not _e3nn_uses_xyz_basis(),
                               reason="this e3nn orders l=1 as (y, z, x); cartlorem's interop targets e3nn >= 0.6")


@xyz_basis
def test_spherical_roundtrip_isometry_and_harmonics():
    g = torch.Generator().manual_seed(13)
    for rank in (0, 1, 2):
        x = rand_irrep((8,), rank, g)
        y = to_spherical(x, rank)
        assert y.shape == (8, 2 * rank + 1)
        torch.testing.assert_close(from_spherical(y, rank), x)
        torch.testing.assert_close(y.norm(dim=-1), x.reshape(8, -1).norm(dim=-1))
    n = torch.randn(10, 3, generator=g, dtype=DT)
    T = harmonics(n)
    for rank, constant in ((1, 1 / math.sqrt(3)), (2, math.sqrt(3 / 10))):  # the module docstring's constants
        Y = e3nn_o3.spherical_harmonics(rank, n, normalize=True, normalization="component")
        ratio = to_spherical(T[rank], rank) / Y
        torch.testing.assert_close(ratio, torch.full_like(ratio, constant))


@xyz_basis
def test_spherical_map_intertwines_wigner_d():
    g = torch.Generator().manual_seed(14)
    for det in (1.0, -1.0):
        q = random_orthogonal(det, generator=g)
        for rank in (1, 2):
            D = e3nn_o3.Irrep(rank, (-1) ** rank).D_from_matrix(q)
            x = rand_irrep((4,), rank, g)
            # e3nn builds D from Euler angles in float32: ~1e-7 is its own round-off
            torch.testing.assert_close(to_spherical(rotate(x, q, rank), rank), to_spherical(x, rank) @ D.T,
                                       rtol=5e-6, atol=5e-6)


@xyz_basis
@pytest.mark.parametrize("path", EVEN_PATHS + ODD_PATHS)
def test_each_path_proportional_to_e3nn_clebsch_gordan(path):
    l1, l2, l3 = path
    w3j = e3nn_o3.wigner_3j(l1, l2, l3).to(DT)
    g = torch.Generator().manual_seed(15)
    a, b = rand_irrep((32,), l1, g), rand_irrep((32,), l2, g)
    got = to_spherical(product(a, l1, b, l2, l3), l3)
    ref = torch.einsum("ijk,ni,nj->nk", w3j, to_spherical(a, l1), to_spherical(b, l2))
    c = float((got * ref).sum() / (ref * ref).sum())
    assert abs(c) > 1e-3
    # one constant for every input; e3nn stores its 3j symbols in float32, hence 1e-6 and not 1e-12
    assert float((got - c * ref).norm() / got.norm()) < 1e-6
