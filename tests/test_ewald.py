"""cartlorem.ewald against references: Madelung constants, brute-force sums written here (not using the
library's kernels), point-charge Ewald written here, torch-pme, finite differences, symmetry."""

import math
import re

import numpy as np
import pytest
import torch

from cartlorem import ewald
from cartlorem.ewald import direct
from cartlorem.ewald.fields import compute_fields
from ewald_helpers import fields_by_autograd, gen, random_traceless, rel

DT = torch.float64
PBC = [True, True, True]
TRICLINIC = torch.tensor([[6.3, 0.0, 0.0], [1.1, 5.9, 0.0], [-0.7, 0.9, 6.6]], dtype=DT)


def random_system(seed, n=5, c=2, cell=TRICLINIC, net_charge=True):
    g = gen(seed)
    pos = torch.rand(n, 3, generator=g, dtype=DT) @ cell
    q = torch.randn(n, c, generator=g, dtype=DT)
    if not net_charge:
        q = q - q.mean(0)
    mu = torch.randn(n, c, 3, generator=g, dtype=DT)
    th = random_traceless(g, n, c)
    return pos, q, mu, th


# ----------------------------------------------------------------------------- independent references


def open_potential(r, pos, q, mu, th, kernel=lambda d: 1.0 / d):
    """Potential at r of point (or kernel-smeared) multipoles: q f - mu.grad f + 1/2 Theta:grad grad f,
    derivatives of the scalar kernel f(|R|) taken by autograd, R = r - pos_j."""
    total = torch.zeros((), dtype=DT)
    for j in range(pos.shape[0]):
        R = (r - pos[j]).requires_grad_(True) if not r.requires_grad else r - pos[j]
        f = kernel(R.norm())
        (grad,) = torch.autograd.grad(f, R, create_graph=True)
        hess = torch.stack([torch.autograd.grad(grad[a], R, create_graph=True)[0] for a in range(3)])
        total = total + q[j] * f - mu[j] @ grad + 0.5 * (th[j] * hess).sum()
    return total


def ewald_charges_potential(r, pos, q, cell, alpha=0.9, n_real=3, k_max=14):
    """Point-charge Ewald potential at r (tin-foil, neutralising background), plain loops over boxes."""
    volume = torch.abs(torch.det(cell))
    n = torch.arange(-n_real, n_real + 1, dtype=DT)
    images = torch.stack(torch.meshgrid(n, n, n, indexing="ij"), -1).reshape(-1, 3) @ cell
    d = (r[None, None, :] - pos[None, :, :] - images[:, None, :]).norm(dim=-1)
    real = (q[None, :] * torch.erfc(alpha * d) / d).sum()
    recip_cell = 2 * math.pi * torch.linalg.inv(cell).T
    m = torch.arange(-k_max, k_max + 1, dtype=DT)
    m = torch.stack(torch.meshgrid(m, m, m, indexing="ij"), -1).reshape(-1, 3)
    k = m[(m != 0).any(-1)] @ recip_cell
    k2 = (k * k).sum(-1)
    k, k2 = k[k2 < (12 * alpha) ** 2], k2[k2 < (12 * alpha) ** 2]
    phase = (r[None, :] - pos) @ k.T  # [N, K]
    recip = (4 * math.pi / volume) * (
        (torch.exp(-k2 / (4 * alpha**2)) / k2) * q[:, None] * torch.cos(phase)
    ).sum()
    return real + recip - math.pi * q.sum() / (volume * alpha**2)


def multipoles_as_charges(pos, q, mu, th, d=1e-3):
    """Each point multipole -> a small symmetric cluster of point charges with the same q, mu, Theta."""
    P, Q = [], []
    for i in range(pos.shape[0]):
        size = float(mu[i].norm())
        u = mu[i] / size
        P += [pos[i] + 0.5 * d * u, pos[i] - 0.5 * d * u]
        Q += [size / d, -size / d]
        lam, vec = torch.linalg.eigh(th[i])
        centre = q[i]
        for k in range(3):  # +s at +-d e_k and -2s at the centre: Theta_k = 2 s d^2 along e_k, traceless sum
            s = lam[k] / (2 * d * d)
            P += [pos[i] + d * vec[:, k], pos[i] - d * vec[:, k]]
            Q += [s, s]
            centre = centre - 2 * s
        P.append(pos[i])
        Q.append(centre)
    return torch.stack(P), torch.stack([torch.as_tensor(x, dtype=DT) for x in Q])


def brute_neighbours(pos, cell, cutoff, n_img=3):
    """Full neighbour list (i, j, R_j - R_i + shift) within cutoff, for torch-pme."""
    n = torch.arange(-n_img, n_img + 1, dtype=DT)
    shifts = torch.stack(torch.meshgrid(n, n, n, indexing="ij"), -1).reshape(-1, 3) @ cell
    vec = pos[None, :, None, :] - pos[:, None, None, :] + shifts[None, None]  # [i, j, s, 3]
    dist = vec.norm(dim=-1)
    keep = (dist < cutoff) & (dist > 1e-12)
    i, j, s = keep.nonzero().T
    return torch.stack([i, j], 1), vec[i, j, s]


# ----------------------------------------------------------------------------- Madelung constants


def _madelung(structure, charges, factor, primitive):
    from ase.build import bulk

    kwargs = {
        "NaCl": dict(name="NaCl", crystalstructure="rocksalt", a=2.0),
        "CsCl": dict(name="CsCl", crystalstructure="cesiumchloride", a=2.0 / math.sqrt(3)),
        "ZnS": dict(name="ZnS", crystalstructure="zincblende", a=4.0 / math.sqrt(3)),
        "wurtzite": dict(
            name="ZnS", crystalstructure="wurtzite", a=(8 / 3) / math.sqrt(8 / 3), c=8 / 3, u=3 / 8
        ),
        "CaF2": dict(name="CaF2", crystalstructure="fluorite", a=4.0 / math.sqrt(3)),
    }[structure]
    if structure == "wurtzite":  # hexagonal primitive cell, or an orthorhombic 8-atom cell
        atoms = bulk(**kwargs, orthorhombic=not primitive)
    else:
        atoms = bulk(**kwargs, cubic=not primitive)
    dist = atoms.get_all_distances(mic=True)
    assert abs(dist[dist > 1e-9].min() - 1.0) < 1e-12  # every structure has nearest-neighbour distance 1
    q = torch.tensor([float(charges[s]) for s in atoms.get_chemical_symbols()], dtype=DT)[:, None]
    U = ewald.electrostatic_energy(
        torch.tensor(atoms.positions, dtype=DT),
        q,
        cell=torch.tensor(atoms.cell.array, dtype=DT),
        pbc=PBC,
        accuracy=1e-10,
    )
    n_units = len(atoms) // len(set(atoms.get_chemical_symbols())) if structure != "CaF2" else len(atoms) // 3
    return -float(U) / (n_units * factor)


@pytest.mark.parametrize("primitive", [False, True])
@pytest.mark.parametrize(
    "structure, charges, factor, reference",
    [
        ("NaCl", {"Na": 1, "Cl": -1}, 1, 1.747565),
        ("CsCl", {"Cs": 1, "Cl": -1}, 1, 1.762675),
        ("ZnS", {"Zn": 1, "S": -1}, 1, 1.638055),
        ("wurtzite", {"Zn": 1, "S": -1}, 1, 1.641322),
        # fluorite: U per CaF2 unit = -M z+ |z-| / r0 with z+ = 2, z- = -1 (M = 2.519392, "5.03878 per unit")
        ("CaF2", {"Ca": 2, "F": -1}, 2, 2.519392),
    ],
)
def test_madelung_constants(structure, charges, factor, reference, primitive):
    """U per formula unit = -M z+|z-| e^2 / r0 (r0 = nearest-neighbour distance = 1, prefactor 1).
    Conventional (cubic / orthorhombic) cells and non-orthogonal primitive cells; wurtzite: ideal
    c/a = sqrt(8/3), u = 3/8."""
    M = _madelung(structure, charges, factor, primitive)
    assert abs(M - reference) / reference < 1e-6


def test_single_charge_in_neutralising_background():
    """One charge per simple cubic cell plus uniform background: phi = -2.837297479 q / L (Wigner/Ewald
    constant of the simple cubic lattice), U = phi q / 2; independent of the cell's orientation."""
    L = 3.7
    for cell in (torch.eye(3, dtype=DT) * L, torch.tensor([[L, 0, 0], [L, L, 0], [0, 2 * L, L]], dtype=DT)):
        f = ewald.multipole_fields(
            torch.zeros(1, 3, dtype=DT), torch.ones(1, 1, dtype=DT), cell=cell, pbc=PBC, accuracy=1e-12
        )
        assert abs(float(f.potential) + 2.837297479480620 / L) < 1e-10
        U = ewald.electrostatic_energy(
            torch.zeros(1, 3, dtype=DT), 2 * torch.ones(1, 1, dtype=DT), cell=cell, pbc=True, accuracy=1e-12
        )
        assert abs(float(U) + 2 * 2.837297479480620 / L) < 1e-10


# ----------------------------------------------------------------------------- open boundaries


@pytest.mark.parametrize("block_pairs", [1 << 15, 7])
def test_open_boundaries_vs_brute_force(monkeypatch, block_pairs):
    """Every atom's fields vs the explicit formula, E and G by autograd (incl. the Hessian of 1/R);
    tiny blocks exercise the blocked, symmetric (I < J) summation."""
    monkeypatch.setattr(direct, "BLOCK_PAIRS", block_pairs)
    pos, q, mu, th = random_system(0, n=6, c=2, cell=torch.eye(3, dtype=DT) * 5)
    got = ewald.multipole_fields(pos, q, mu, th)
    for c in range(2):
        for i in range(6):
            others = [j for j in range(6) if j != i]
            ref = fields_by_autograd(
                lambda r: open_potential(r, pos[others], q[others, c], mu[others, c], th[others, c]),
                pos[i : i + 1],
            )
            assert torch.allclose(got.potential[i, c], ref[0][0], rtol=1e-12, atol=1e-12)
            assert torch.allclose(got.field[i, c], ref[1][0], rtol=1e-12, atol=1e-12)
            assert torch.allclose(got.field_gradient[i, c], ref[2][0], rtol=1e-11, atol=1e-12)
    # energy: U = 1/2 sum_i (q phi - mu.E - 1/2 Theta:G), with the reference fields
    U = ewald.electrostatic_energy(pos, q, mu, th, prefactor=14.399645)
    ref = 0.0
    for c in range(2):
        for i in range(6):
            others = [j for j in range(6) if j != i]
            phi, E, G = fields_by_autograd(
                lambda r: open_potential(r, pos[others], q[others, c], mu[others, c], th[others, c]),
                pos[i : i + 1],
            )
            ref += 0.5 * (q[i, c] * phi[0] - mu[i, c] @ E[0] - 0.5 * (th[i, c] * G[0]).sum())
    assert abs(float(U) - 14.399645 * float(ref)) < 1e-12 * abs(float(U))


def test_dipole_pair_signs():
    """Two dipoles along the axis attract (U = -2 mu^2 / R^3); side by side they repel (+mu^2 / R^3)."""
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]], dtype=DT)
    head_to_tail = torch.tensor([[[0.0, 0.0, 1.0]], [[0.0, 0.0, 1.0]]], dtype=DT)
    side = torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]]], dtype=DT)
    assert abs(float(ewald.electrostatic_energy(pos, dipoles=head_to_tail)) + 2 / 8) < 1e-14
    assert abs(float(ewald.electrostatic_energy(pos, dipoles=side)) - 1 / 8) < 1e-14
    # a charge +1 at z = 2 sees the field of a dipole at the origin: E = 2 mu / R^3 along z
    f = ewald.multipole_fields(
        pos, torch.zeros(2, 1, dtype=DT), head_to_tail * torch.tensor([1.0, 0.0])[:, None, None]
    )
    assert torch.allclose(f.field[1, 0], torch.tensor([0.0, 0.0, 2 / 8], dtype=DT), atol=1e-15)
    assert abs(float(f.potential[1, 0]) - 1 / 4) < 1e-15


def test_channels_are_independent():
    pos, q, mu, th = random_system(1, n=4, c=3)
    both = ewald.multipole_fields(pos, q, mu, th, cell=TRICLINIC, pbc=PBC, accuracy=1e-10)
    for c in range(3):
        one = ewald.multipole_fields(
            pos, q[:, c : c + 1], mu[:, c : c + 1], th[:, c : c + 1], cell=TRICLINIC, pbc=PBC, accuracy=1e-10
        )
        assert torch.allclose(both.field_gradient[:, c : c + 1], one.field_gradient, rtol=1e-11, atol=1e-11)
        assert torch.allclose(both.potential[:, c : c + 1], one.potential, rtol=1e-11, atol=1e-11)


# ----------------------------------------------------------------------------- periodic


def _probes(seed=11, n=4):
    return torch.rand(n, 3, generator=gen(seed), dtype=DT) @ TRICLINIC


def test_periodic_charges_vs_reference_ewald():
    """Charged cell (background) at probe sites vs the plain Ewald sum written above; tr G = -4 pi Q / V."""
    pos, q, _, _ = random_system(2, n=5, c=1)
    probes = _probes()
    all_pos = torch.cat([pos, probes])
    charges = torch.cat([q, torch.zeros(len(probes), 1, dtype=DT)])
    got = ewald.multipole_fields(all_pos, charges, cell=TRICLINIC, pbc=PBC, accuracy=1e-12)
    ref = fields_by_autograd(lambda r: ewald_charges_potential(r, pos, q[:, 0], TRICLINIC), probes)
    assert rel(got.potential[5:, 0], ref[0]) < 1e-11
    assert rel(got.field[5:, 0], ref[1]) < 1e-11
    assert rel(got.field_gradient[5:, 0], ref[2]) < 1e-10
    volume = torch.det(TRICLINIC).abs()
    trace = got.field_gradient[:, 0].diagonal(dim1=-2, dim2=-1).sum(-1)
    assert torch.allclose(trace, -4 * math.pi * q.sum() / volume * torch.ones_like(trace), rtol=0, atol=1e-10)


def test_trace_of_gradient_with_multipoles():
    """Net charge Q with dipoles and quadrupoles everywhere: tr G = -4 pi Q / V at every point source."""
    pos, q, mu, th = random_system(3, n=6, c=2)
    G = ewald.multipole_fields(pos, q, mu, th, cell=TRICLINIC, pbc=PBC, accuracy=1e-12).field_gradient
    expect = -4 * math.pi * q.sum(0) / torch.det(TRICLINIC).abs()  # [C]
    assert torch.allclose(G.diagonal(dim1=-2, dim2=-1).sum(-1), expect.expand(6, 2), atol=1e-10, rtol=0)
    assert torch.allclose(G, G.transpose(-1, -2), atol=1e-12)


def test_periodic_multipoles_vs_charge_clusters():
    """Dipoles and quadrupoles vs tiny clusters of point charges: through the reference Ewald above and
    through the library's own charges-only path."""
    pos, q, mu, th = random_system(4, n=3, c=1)
    probes = _probes(n=3)
    got = ewald.multipole_fields(
        torch.cat([pos, probes]),
        torch.cat([q, torch.zeros(3, 1, dtype=DT)]),
        torch.cat([mu, torch.zeros(3, 1, 3, dtype=DT)]),
        torch.cat([th, torch.zeros(3, 1, 3, 3, dtype=DT)]),
        cell=TRICLINIC,
        pbc=PBC,
        accuracy=1e-12,
    )
    P, Q = multipoles_as_charges(pos, q[:, 0], mu[:, 0], th[:, 0])
    ref = fields_by_autograd(lambda r: ewald_charges_potential(r, P, Q, TRICLINIC), probes)
    for k, (name, value) in enumerate(zip(("potential", "field", "field_gradient"), got)):
        assert rel(value[3:, 0], ref[k]) < 1e-5, name
    # The library's charges-only path against the same reference, with clusters 10x wider. The d = 1e-3
    # clusters carry charges up to 2e6 e whose fields cancel to O(1): both sums then lose ~1e-9 to
    # rounding (measured: the reference's field moves by 1.5e-9 / 2.3e-9 when its own alpha goes
    # 0.9 -> 0.7 / 1.1, by < 2e-11 with more terms at a fixed alpha; our path moves by 1e-10 with alpha).
    # That floor scales as 1/d^2, so at d = 1e-2 both agree to ~7e-12 and 1e-10 is a sharp test.
    P, Q = multipoles_as_charges(pos, q[:, 0], mu[:, 0], th[:, 0], d=1e-2)
    ref = fields_by_autograd(lambda r: ewald_charges_potential(r, P, Q, TRICLINIC), probes)
    own = ewald.multipole_fields(
        torch.cat([P, probes]),
        torch.cat([Q, torch.zeros(3, dtype=DT)])[:, None],
        cell=TRICLINIC,
        pbc=PBC,
        accuracy=1e-14,
    )
    for k, name in enumerate(("potential", "field", "field_gradient")):
        assert rel(getattr(own, name)[len(P) :, 0], ref[k]) < 1e-10, name


def test_torchpme_multipole_clusters():
    """Potential of neutral dipoles + quadrupoles at probe sites vs torch-pme's EwaldCalculator applied to
    the equivalent tiny charge clusters."""
    torchpme = pytest.importorskip("torchpme")
    pos, q, mu, th = random_system(22, n=3, c=1, net_charge=False)
    probes = _probes(23, n=3)
    got = ewald.multipole_fields(
        torch.cat([pos, probes]),
        torch.cat([q, torch.zeros(3, 1, dtype=DT)]),
        torch.cat([mu, torch.zeros(3, 1, 3, dtype=DT)]),
        torch.cat([th, torch.zeros(3, 1, 3, 3, dtype=DT)]),
        cell=TRICLINIC,
        pbc=PBC,
        accuracy=1e-12,
    )
    P, Q = multipoles_as_charges(pos, q[:, 0], mu[:, 0], th[:, 0])
    P, Q = torch.cat([P, probes]), torch.cat([Q, torch.zeros(3, dtype=DT)])[:, None]
    index, vectors = brute_neighbours(P, TRICLINIC, 7.0)
    calc = torchpme.EwaldCalculator(
        torchpme.CoulombPotential(smearing=0.7), lr_wavelength=0.3, full_neighbor_list=True
    )
    half_phi = calc(Q, TRICLINIC, P, index, vectors.norm(dim=1))
    assert rel(got.potential[3:], 2 * half_phi[-3:]) < 1e-6


def test_torchpme_charges_and_dipoles():
    """Potential of neutral charges vs torch-pme's EwaldCalculator (its potential is phi / 2) and the
    dipole-dipole energy vs CalculatorDipole (its output is -E / 2, energy = sum mu . output)."""
    torchpme = pytest.importorskip("torchpme")
    pos, q, mu, _ = random_system(5, n=6, c=1, net_charge=False)
    smearing, cutoff = 0.7, 7.0
    index, vectors = brute_neighbours(pos, TRICLINIC, cutoff)
    # torch-pme converged to ~1e-15 with these settings (erfc(cutoff / (sqrt 2 smearing)) ~ 1e-23)
    calc = torchpme.EwaldCalculator(
        torchpme.CoulombPotential(smearing=smearing), lr_wavelength=0.3, full_neighbor_list=True
    )
    half_phi = calc(q, TRICLINIC, pos, index, vectors.norm(dim=1))
    got = ewald.multipole_fields(pos, q, cell=TRICLINIC, pbc=PBC, accuracy=1e-13)
    assert rel(got.potential, 2 * half_phi) < 1e-12
    dcalc = torchpme.CalculatorDipole(
        torchpme.PotentialDipole(smearing=smearing), full_neighbor_list=True, lr_wavelength=0.3
    )
    out = dcalc(mu[:, 0], TRICLINIC, pos, index, vectors)  # [N, 3]
    fields = ewald.multipole_fields(pos, dipoles=mu, cell=TRICLINIC, pbc=PBC, accuracy=1e-13)
    assert rel(fields.field[:, 0], -2 * out) < 1e-12
    U = ewald.electrostatic_energy(pos, dipoles=mu, cell=TRICLINIC, pbc=PBC, accuracy=1e-13)
    assert abs(float(U) - float((mu[:, 0] * out).sum())) < 1e-12 * abs(float(U))


@pytest.mark.parametrize("smearing", [None, 0.6])
def test_independent_of_splitting(smearing):
    pos, q, mu, th = random_system(6, n=5, c=2)
    results = [
        compute_fields(pos, q, mu, th, TRICLINIC, PBC, smearing=smearing, accuracy=1e-12, alpha=a)
        for a in (0.35, 0.6, 1.0)
    ]
    for other in results[1:]:
        for rank in range(3):
            assert rel(other[rank], results[0][rank]) < 1e-10
    default = compute_fields(pos, q, mu, th, TRICLINIC, PBC, smearing=smearing, accuracy=1e-6)
    for rank in range(3):
        assert rel(default[rank], results[0][rank]) < 1e-6


def test_supercell_and_images():
    """A 2x2x2 supercell has 8x the energy and the same fields; a cutoff larger than the cell is fine."""
    pos, q, mu, th = random_system(7, n=3, c=1, cell=TRICLINIC * 0.6)
    cell = TRICLINIC * 0.6
    U = ewald.electrostatic_energy(pos, q, mu, th, cell, PBC, accuracy=1e-11)
    f = ewald.multipole_fields(pos, q, mu, th, cell, PBC, accuracy=1e-11)
    n = torch.tensor([[a, b, c] for a in range(2) for b in range(2) for c in range(2)], dtype=DT)
    big_pos = (pos[None] + (n @ cell)[:, None]).reshape(-1, 3)
    rep = lambda t: t.repeat(8, *([1] * (t.dim() - 1)))  # noqa: E731
    U8 = ewald.electrostatic_energy(big_pos, rep(q), rep(mu), rep(th), 2 * cell, PBC, accuracy=1e-11)
    f8 = ewald.multipole_fields(big_pos, rep(q), rep(mu), rep(th), 2 * cell, PBC, accuracy=1e-11)
    assert abs(float(U8) - 8 * float(U)) < 1e-9 * abs(8 * float(U))
    for a, b in zip(f8, f):
        assert rel(a, rep(b)) < 1e-9


@pytest.mark.parametrize("det", [1.0, -1.0])
@pytest.mark.parametrize("periodic", [False, True])
def test_rotation_and_reflection(det, periodic):
    pos, q, mu, th = random_system(8, n=5, c=2)
    A = torch.linalg.qr(torch.randn(3, 3, generator=gen(9), dtype=DT))[0]
    if torch.det(A) * det < 0:
        A[:, 0] = -A[:, 0]
    cell = TRICLINIC if periodic else None
    kw = dict(pbc=PBC if periodic else None, accuracy=1e-11)
    f = ewald.multipole_fields(pos, q, mu, th, cell, **kw)
    g = ewald.multipole_fields(
        pos @ A.T, q, mu @ A.T, A @ th @ A.T, None if cell is None else cell @ A.T, **kw
    )
    assert rel(g.potential, f.potential) < 1e-10
    assert rel(g.field, f.field @ A.T) < 1e-10
    assert rel(g.field_gradient, A @ f.field_gradient @ A.T) < 1e-10
    U = ewald.electrostatic_energy(pos, q, mu, th, cell, **kw)
    V = ewald.electrostatic_energy(
        pos @ A.T, q, mu @ A.T, A @ th @ A.T, None if cell is None else cell @ A.T, **kw
    )
    assert abs(float(U - V)) < 1e-10 * abs(float(U))


def test_forces_and_stress_by_finite_differences():
    pos, q, mu, th = random_system(10, n=4, c=2)
    cell = TRICLINIC

    def energy(x, c):
        return ewald.electrostatic_energy(x, q, mu, th, c, PBC, accuracy=1e-12)

    x = pos.clone().requires_grad_(True)
    eps = torch.zeros(3, 3, dtype=DT, requires_grad=True)
    strain = torch.eye(3, dtype=DT) + eps
    U = energy(x @ strain.T, cell @ strain.T)
    forces, dU_deps = torch.autograd.grad(-U, (x, eps))
    dU_deps = -dU_deps
    h = 1e-5
    fd = torch.zeros_like(pos)
    for i in range(4):
        for a in range(3):
            dp = torch.zeros_like(pos)
            dp[i, a] = h
            fd[i, a] = -(energy(pos + dp, cell) - energy(pos - dp, cell)) / (2 * h)
    assert rel(forces, fd) < 1e-7
    fd_s = torch.zeros(3, 3, dtype=DT)
    for a in range(3):
        for b in range(3):
            e = torch.zeros(3, 3, dtype=DT)
            e[a, b] = h
            up, down = torch.eye(3, dtype=DT) + e, torch.eye(3, dtype=DT) - e
            fd_s[a, b] = (energy(pos @ up.T, cell @ up.T) - energy(pos @ down.T, cell @ down.T)) / (2 * h)
    assert rel(dU_deps, fd_s) < 1e-7


@pytest.mark.parametrize("smearing", [None, 1.0])
def test_stress_by_finite_strain_at_default_accuracy(smearing):
    """At the default accuracy (1e-6) the autograd stress is the derivative of the energy to ~1e-10,
    not just to ~accuracy: the splitting is chosen on a grid, so it does not move under small strains
    (autograd treats it as a constant). Before that, point multipoles agreed to 1e-7 and smeared ones
    to 1e-5 here."""

    def energy(x, c):
        return ewald.electrostatic_energy(x, q, mu, th, c, PBC, smearing=smearing)

    for seed in (1, 2, 3):
        pos, q, mu, th = random_system(seed, n=8, c=2)
        eps = torch.zeros(3, 3, dtype=DT, requires_grad=True)
        strain = torch.eye(3, dtype=DT) + eps
        (dU_deps,) = torch.autograd.grad(energy(pos @ strain.T, TRICLINIC @ strain.T), eps)
        h, fd = 1e-5, torch.zeros(3, 3, dtype=DT)
        for a in range(3):
            for b in range(3):
                e = torch.zeros(3, 3, dtype=DT)
                e[a, b] = h
                up, down = torch.eye(3, dtype=DT) + e, torch.eye(3, dtype=DT) - e
                fd[a, b] = (energy(pos @ up.T, TRICLINIC @ up.T) - energy(pos @ down.T, TRICLINIC @ down.T)) / (2 * h)
        assert rel(dU_deps, fd) < 2e-9, seed


def test_splitting_on_grid():
    """The chosen alpha is 2^(j/16) (or 1/(sqrt2 sigma) for reciprocal-only sums), constant under a small
    strain, and the results do not depend on it."""
    from cartlorem.ewald.ewald import choose_parameters

    for scale in (1.0, 1.0 + 1e-6, 1.3, 2.0):
        cell = TRICLINIC.numpy() * scale
        alpha = choose_parameters(cell, 8, 1e-6, 4).alpha
        j = 16 * math.log2(alpha)
        assert abs(j - round(j)) < 1e-9
    assert choose_parameters(TRICLINIC.numpy(), 8, 1e-6, 4).alpha == choose_parameters(
        TRICLINIC.numpy() * (1 + 1e-6), 8, 1e-6, 4).alpha


def test_gradients_of_multipoles_are_the_fields():
    """dU/dq = phi, dU/dmu = -E, dU/dTheta = -1/2 G (traceless part), periodic and charged."""
    pos, q, mu, th = random_system(12, n=4, c=2)
    q, mu, th = (t.clone().requires_grad_(True) for t in (q, mu, th))
    U = ewald.electrostatic_energy(pos, q, mu, th, TRICLINIC, PBC, accuracy=1e-12)
    gq, gmu, gth = torch.autograd.grad(U, (q, mu, th))
    f = ewald.multipole_fields(pos, q, mu, th, TRICLINIC, PBC, accuracy=1e-12)
    G = f.field_gradient.detach()
    G = G - G.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * torch.eye(3, dtype=DT) / 3
    assert rel(gq, f.potential.detach()) < 1e-12
    assert rel(gmu, -f.field.detach()) < 1e-12
    assert rel(gth, -0.5 * G) < 1e-12


@pytest.mark.parametrize("periodic", [False, True])
def test_checkpointed_blocks_double_backward(monkeypatch, periodic):
    """Forces inside a loss (double backward) agree with and without checkpointing of the real-space and
    reciprocal blocks, and the second derivative matches finite differences."""
    from cartlorem.ewald import ewald as ewald_method

    pos, q, mu, th = random_system(13, n=5, c=1, cell=torch.eye(3, dtype=DT) * 4)
    kw = dict(cell=TRICLINIC, pbc=PBC, accuracy=1e-8) if periodic else dict(smearing=0.5)

    def forces_and_dq(charges):
        qq = charges.clone().requires_grad_(True)
        x = pos.clone().requires_grad_(True)
        (F,) = torch.autograd.grad(-ewald.electrostatic_energy(x, qq, mu, th, **kw), x, create_graph=True)
        (dq,) = torch.autograd.grad((F**2).sum(), qq)
        return F.detach(), dq, float((F.detach() ** 2).sum())

    monkeypatch.setattr(direct, "BLOCK_PAIRS", 4 if not periodic else 200)  # several blocks
    monkeypatch.setattr(ewald_method, "K_BLOCK", 2000)
    plain = forces_and_dq(q)
    monkeypatch.setattr(direct, "CHECKPOINT_PAIRS", 0)
    monkeypatch.setattr(ewald_method, "CHECKPOINT_TERMS", 0)
    checked = forces_and_dq(q)
    assert torch.allclose(plain[0], checked[0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(plain[1], checked[1], rtol=1e-11, atol=1e-12)
    h = 1e-5
    up, down = q.clone(), q.clone()
    up[2, 0] += h
    down[2, 0] -= h
    fd = (forces_and_dq(up)[2] - forces_and_dq(down)[2]) / (2 * h)
    assert abs(fd - float(checked[1][2, 0])) < 1e-6 * abs(fd)


# ----------------------------------------------------------------------------- smearing


def test_smearing_open_vs_erf_kernel():
    sigma = 0.8
    pos, q, mu, th = random_system(14, n=4, c=1, cell=torch.eye(3, dtype=DT) * 4)
    probes = _probes(15, 3) * 0.5
    got = ewald.multipole_fields(
        torch.cat([pos, probes]),
        torch.cat([q, torch.zeros(3, 1, dtype=DT)]),
        torch.cat([mu, torch.zeros(3, 1, 3, dtype=DT)]),
        torch.cat([th, torch.zeros(3, 1, 3, 3, dtype=DT)]),
        smearing=sigma,
    )
    kernel = lambda d: torch.erf(d / (math.sqrt(2) * sigma)) / d  # noqa: E731
    ref = fields_by_autograd(lambda r: open_potential(r, pos, q[:, 0], mu[:, 0], th[:, 0], kernel), probes)
    for k in range(3):
        assert rel(got[k][4:, 0], ref[k]) < 1e-12


def test_smearing_bounded_at_short_distance():
    """Smeared fields are finite and continuous as two atoms approach and coincide; values at R = 0 are
    the Gaussian's own: phi = 2 a q / sqrt(pi), E = -4 a^3 mu / (3 sqrt(pi)), a = 1 / (sqrt 2 sigma)."""
    sigma = 0.5
    a = 1 / (math.sqrt(2) * sigma)
    g = gen(16)
    q, mu, th = (
        torch.randn(2, 1, generator=g, dtype=DT),
        torch.randn(2, 1, 3, generator=g, dtype=DT),
        random_traceless(g, 2, 1),
    )
    values = []
    for d in (0.0, 1e-9, 1e-6, 1e-3, 0.3, 1.0):
        pos = torch.tensor(
            [[0.1, 0.2, 0.3], [0.1 + 0.6 * d, 0.2 + 0.8 * d, 0.3]], dtype=DT, requires_grad=True
        )
        f = ewald.multipole_fields(pos, q, mu, th, smearing=sigma)
        U = ewald.electrostatic_energy(pos, q, mu, th, smearing=sigma)
        (forces,) = torch.autograd.grad(-U, pos)
        assert all(bool(torch.isfinite(t).all()) for t in (*f, forces))
        values.append(f)
    at_zero = values[0]
    assert torch.allclose(at_zero.potential[0, 0], 2 * a * q[1, 0] / math.sqrt(math.pi), rtol=1e-14)
    assert torch.allclose(at_zero.field[0, 0], -4 * a**3 * mu[1, 0] / (3 * math.sqrt(math.pi)), rtol=1e-13)
    for near, tol in zip(values[1:4], (1e-8, 1e-5, 1e-2)):  # continuous approach to R = 0
        for x, y in zip(near, at_zero):
            assert rel(x, y) < tol
    # on both sides of the switch between Taylor series and recursion (a^2 R^2 = 2): the erf kernel
    # (autograd of erf(a R)/R itself loses digits at shorter R, so the reference stops at a R = 1)
    kernel = lambda d: torch.erf(a * d) / d  # noqa: E731
    for d in (math.sqrt(2) / a * (1 - 1e-9), math.sqrt(2) / a * (1 + 1e-9), 1.0 / a, 3.0 / a):
        pos = torch.tensor([[0.0, 0.0, 0.0], [d * 0.6, d * 0.8, 0.0]], dtype=DT)
        got = ewald.multipole_fields(pos, q, mu, th, smearing=sigma)
        ref = fields_by_autograd(
            lambda r: open_potential(r, pos[1:], q[1:, 0], mu[1:, 0], th[1:, 0], kernel), pos[:1]
        )
        for k in range(3):
            assert rel(got[k][:1, 0], ref[k]) < 1e-13


def smeared_fourier_potential(r, pos, q, mu, th, cell, sigma, k_max=12):
    """Periodic potential of Gaussian multipoles (width sigma) plus neutralising background, as the plain
    Fourier series (4 pi / V) sum_{k != 0} exp(-k^2 sigma^2 / 2) / k^2 Re[S(k) exp(i k.r)] (zero cell mean).
    """
    volume = torch.abs(torch.det(cell))
    m = torch.arange(-k_max, k_max + 1, dtype=DT)
    m = torch.stack(torch.meshgrid(m, m, m, indexing="ij"), -1).reshape(-1, 3)
    k = m[(m != 0).any(-1)] @ (2 * math.pi * torch.linalg.inv(cell).T)
    k2 = (k * k).sum(-1)
    factor = q[None, :] - 1j * (k @ mu.T) - 0.5 * torch.einsum("ka,jab,kb->kj", k, th, k)  # [K, N]
    S = (factor * torch.exp(-1j * (k @ pos.T))).sum(1)  # [K]
    return (4 * math.pi / volume) * (
        torch.exp(-k2 * sigma**2 / 2) / k2 * (S * torch.exp(1j * (k @ r))).real
    ).sum()


def test_smearing_periodic_vs_fourier_series():
    """Charged cell of Gaussian multipoles at probe sites vs the pure Fourier series (which fixes the
    background convention: zero cell average)."""
    sigma = 0.9
    pos, q, mu, th = random_system(17, n=3, c=1)
    probes = _probes(18, 3)
    got = ewald.multipole_fields(
        torch.cat([pos, probes]),
        torch.cat([q, torch.zeros(3, 1, dtype=DT)]),
        torch.cat([mu, torch.zeros(3, 1, 3, dtype=DT)]),
        torch.cat([th, torch.zeros(3, 1, 3, 3, dtype=DT)]),
        cell=TRICLINIC,
        pbc=PBC,
        smearing=sigma,
        accuracy=1e-12,
    )
    ref = fields_by_autograd(
        lambda r: smeared_fourier_potential(r, pos, q[:, 0], mu[:, 0], th[:, 0], TRICLINIC, sigma), probes
    )
    for k in range(3):
        assert rel(got[k][3:, 0], ref[k]) < 1e-10


# ----------------------------------------------------------------------------- API


def test_batched_equals_single():
    pos_a, q_a, mu_a, th_a = random_system(18, n=4, c=2)
    pos_b, q_b, mu_b, th_b = random_system(19, n=3, c=2)
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3])  # interleave the two structures
    cat = lambda a, b: torch.cat([a, b])[order]  # noqa: E731
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1])[order]
    cells = torch.stack([TRICLINIC, torch.eye(3, dtype=DT) * 3])
    pbc = torch.tensor([[True] * 3, [False] * 3])
    got = ewald.batched_multipole_fields(
        cat(pos_a, pos_b), batch, cells, pbc, cat(q_a, q_b), cat(mu_a, mu_b), cat(th_a, th_b), accuracy=1e-10
    )
    a = ewald.multipole_fields(pos_a, q_a, mu_a, th_a, TRICLINIC, PBC, accuracy=1e-10)
    b = ewald.multipole_fields(pos_b, q_b, mu_b, th_b)
    for x, ya, yb in zip(got, a, b):
        assert torch.allclose(x, cat(ya, yb), rtol=1e-13, atol=1e-13)
    only = ewald.batched_multipole_fields(
        cat(pos_a, pos_b), batch, cells, pbc, cat(q_a, q_b), cat(mu_a, mu_b), cat(th_a, th_b), accuracy=1e-10,
        ranks=(0,))
    assert only.field is None and only.field_gradient is None
    assert torch.allclose(only.potential, got.potential, rtol=1e-9, atol=1e-9)  # own Ewald parameters
    with pytest.raises(ValueError, match="ranks"):
        ewald.batched_multipole_fields(pos_a, torch.zeros(4, dtype=torch.long), cells[:1], pbc[:1], q_a, ranks=(3,))


@pytest.mark.parametrize("smearing", [None, 0.8])
def test_batched_traceless_gradient_is_the_symmetric_traceless_part(smearing):
    """traceless_gradient=True (what the long-range block asks for): the potential and field unchanged, the
    gradient's symmetric traceless part, for an open structure (five-component pair sum) and a charged
    periodic cell (whose background adds -4 pi Q / (3 V) I to the full gradient) alike."""
    from cartlorem.tensors import stf

    pos_a, q_a, mu_a, th_a = random_system(18, n=4, c=2)  # net charge: a trace in the periodic gradient
    pos_b, q_b, mu_b, th_b = random_system(19, n=5, c=2)
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    cells = torch.stack([TRICLINIC, torch.eye(3, dtype=DT) * 3])
    pbc = torch.tensor([[True] * 3, [False] * 3])
    args = (torch.cat([pos_a, pos_b]), batch, cells, pbc, torch.cat([q_a, q_b]), torch.cat([mu_a, mu_b]),
            torch.cat([th_a, th_b]))
    full = ewald.batched_multipole_fields(*args, smearing=smearing, accuracy=1e-10)
    got = ewald.batched_multipole_fields(*args, smearing=smearing, accuracy=1e-10, traceless_gradient=True)
    assert float((full.field_gradient - stf(full.field_gradient))[:4].abs().max()) > 1e-6
    torch.testing.assert_close(got.potential, full.potential, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.field, full.field, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.field_gradient, stf(full.field_gradient), rtol=1e-12, atol=1e-12)


def test_float32_matches_float64():
    pos, q, mu, th = random_system(20, n=6, c=2)
    f64 = ewald.multipole_fields(pos, q, mu, th, TRICLINIC, PBC, accuracy=1e-6)
    f32 = ewald.multipole_fields(
        pos.float(), q.float(), mu.float(), th.float(), TRICLINIC.float(), PBC, accuracy=1e-6
    )
    for a, b in zip(f32, f64):
        assert a.dtype == torch.float32
        assert rel(a.double(), b) < 1e-5


@pytest.mark.parametrize("method, smearing", [("ewald", 1.0), ("pme", 1.0), ("pme", None)])
def test_float32_far_from_origin(method, smearing):
    """Unwrapped positions (MD never wraps; method="auto" takes PME for large cells): float32 forces of a periodic
    structure translated by ~3e4 Å equal float64 forces at the same positions to float32 accuracy, and the
    untranslated float64 forces to the method's accuracy. Positions lie on a 2^-9 Å grid so that the translated
    float32 positions are exact (the float32 spacing at 3e4 Å is 2^-9 Å). Without wrapping before the phases k.r the
    Ewald error was 2.9e-2 eV/Å here (max force 20 eV/Å); before PME wrapped the positions into the cell, its float32
    error was 1.3e-3 (smeared) and 1.8e-4 (point sources) of the largest force, against 1e-6 untranslated."""
    from cartlorem.units import COULOMB

    g = gen(50)
    cell = torch.tensor([[9.1, 0.0, 0.0], [1.3, 8.7, 0.0], [-0.9, 1.1, 9.4]], dtype=DT)
    pos = torch.round(torch.rand(24, 3, generator=g, dtype=DT) @ cell * 512) / 512
    q = torch.randn(24, 4, generator=g, dtype=DT)
    mu = 0.5 * torch.randn(24, 4, 3, generator=g, dtype=DT)
    th = 0.3 * random_traceless(g, 24, 4)

    def forces(p, dtype):
        x = p.to(dtype).requires_grad_(True)
        srcs = (t.to(dtype) for t in (q, mu, th))
        U = ewald.electrostatic_energy(x, *srcs, cell.to(dtype), PBC, smearing=smearing, prefactor=COULOMB,
                                       accuracy=1e-5, method=method)
        return -torch.autograd.grad(U, x)[0].double()

    shift = torch.tensor([30000.0, -29999.5, 29876.25], dtype=DT)
    assert torch.equal((pos + shift).float().double(), pos + shift)  # exact in float32
    f64, f64_far, f32_far = forces(pos, DT), forces(pos + shift, DT), forces(pos + shift, torch.float32)
    scale = float(f64.abs().max())
    assert scale > 5.0
    assert float((f32_far - f64_far).abs().max()) < 1e-5 * scale  # float32 accuracy itself
    assert float((f32_far - f64).abs().max()) < 1e-5 * scale  # and the method's (accuracy 1e-5), translated


@pytest.mark.parametrize("height", [1e-5, 1e-9, 0.05])
def test_thin_cells_are_refused(height):
    """A cell with lattice planes closer than 0.1 Å passes the volume check but used to send the
    splitting's cost model into GiB allocations (MemoryError): a ValueError naming the height instead."""
    cell = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, height]], dtype=DT)
    pos, q, _, _ = random_system(60, n=3, c=1, cell=cell)
    with pytest.raises(ValueError, match=rf"cell height h_2 = {height:.3g} Å .* below 0.1 Å: not a physical"):
        ewald.multipole_fields(pos, q, cell=cell, pbc=PBC)


def test_a_skewed_basis_of_a_fine_lattice_is_called_that():
    """Rock salt in the basis U @ cell (det U = 1, its Minkowski-reduced form the cubic cell) was 'not a physical
    periodic cell'; the lattice is physical, only its basis is too skewed."""
    cell = 5.64 * torch.eye(3, dtype=DT)
    skewed = torch.tensor([[1.0, 0, 0], [7, 1, 0], [7, -7, 1]], dtype=DT) @ cell
    pos, q, _, _ = random_system(61, n=4, c=1, cell=cell)
    with pytest.raises(ValueError, match=r"below 0.1 Å: the lattice is fine, this basis of it is too skewed"):
        ewald.multipole_fields(pos, q, cell=skewed, pbc=PBC)


def test_skewed_cells_image_search():
    """A skewed basis of the same lattice gives the same fields; Ewald refuses one whose heights are tiny relative to
    the real-space cutoff (0.1 Å planes, 1000 Å vectors, 4 atoms) before any allocation (method="auto" picks PME
    there, which runs on the reduced basis: test_pme.py::test_a_thin_basis_of_an_ordinary_lattice_takes_pme)."""
    from cartlorem.ewald.ewald import _shift_counts, lattice_shifts

    pos, q, mu, th = random_system(61, n=4, c=1)
    skew = torch.tensor([[1, 0, 0], [0, 1, 0], [3, -2, 1]], dtype=DT) @ TRICLINIC  # same lattice
    ref = ewald.multipole_fields(pos, q, mu, th, TRICLINIC, PBC, accuracy=1e-10)
    got = ewald.multipole_fields(pos, q, mu, th, skew, PBC, accuracy=1e-10)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-9
    # the cost model's count of translations is the image search's own
    cutoffs = torch.linspace(0.5, 30.0, 13, dtype=DT).numpy()
    counts = _shift_counts(skew.numpy(), cutoffs)
    assert [len(lattice_shifts(skew.numpy(), float(c))) for c in cutoffs] == counts.tolist()
    thin = torch.tensor([[1000.0, 0, 0], [0, 1000.0, 0], [300.0, 200.0, 0.1]], dtype=DT)
    with pytest.raises(ValueError, match=r"cell height h_2 = 0.1 Å is too small relative to the Ewald"):
        ewald.multipole_fields(random_system(62, n=4, c=1, cell=thin)[0], q, cell=thin, pbc=PBC, method="ewald")


@pytest.mark.parametrize("smearing", [30.0, 1e3, 1e6])
def test_sources_far_wider_than_the_cell(smearing):
    """Gaussian sources far wider than a 4 Å cell: the neutral cell's charge and polarisation densities are then
    uniform to within exp(-k²σ²/2) at the shortest k-vector (zero in double precision), so all that is left at each
    atom is minus what its own Gaussian gives at its centre: potential -q √(2/π) / σ, field +μ √(2/π) / (3σ³) (a
    Gaussian dipole's field at its centre is -(4π/3) g(0) μ). Was, from σ = 1000 Å on: a ValueError blaming the
    cell ("too small relative to the Ewald real-space cutoff") for an image search that the split at the sources'
    own width (a real-space kernel of zero) never needed."""
    cell = torch.eye(3, dtype=DT) * 4.0
    pos = torch.tensor([[0.3, 0.1, 0.0], [2.0, 1.9, 2.2]], dtype=DT)
    q = torch.tensor([[1.0], [-1.0]], dtype=DT)
    mu = torch.tensor([[[0.2, -0.1, 0.3]], [[0.0, 0.4, -0.2]]], dtype=DT)
    phi, field, _ = ewald.multipole_fields(pos, q, mu, None, cell, PBC, smearing=smearing, accuracy=1e-8)
    torch.testing.assert_close(phi, -q * math.sqrt(2.0 / math.pi) / smearing, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(field, mu * math.sqrt(2.0 / math.pi) / (3.0 * smearing**3), rtol=1e-12, atol=0.0)


def test_bad_input_is_rejected():
    pos, q, mu, th = random_system(21, n=3, c=2)
    cases = [
        (
            dict(
                positions=pos.clone().index_put_(
                    (torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan"), dtype=DT)
                ),
                charges=q,
            ),
            "positions contains NaN",
        ),
        (
            dict(
                positions=pos,
                charges=q,
                cell=torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]], dtype=DT),
                pbc=PBC,
            ),
            "zero volume",
        ),
        (dict(positions=pos, charges=q[:2]), "charges has 2 rows"),
        (dict(positions=pos, charges=q, dipoles=mu[:, :1]), "channels"),
        (dict(positions=pos, dipoles=mu[..., :2]), r"dipoles must have shape \[N, C, 3\]"),
        (dict(positions=pos[:, :2], charges=q), r"positions must have shape \[N, 3\]"),
        (dict(positions=pos, quadrupoles=th + 0.1 * torch.eye(3, dtype=DT)), "not traceless"),
        (
            dict(positions=pos, quadrupoles=th + torch.tensor([[0, 0.1, 0], [0, 0, 0], [0, 0, 0]], dtype=DT)),
            "not symmetric",
        ),
        (dict(positions=pos, charges=q, cell=TRICLINIC, pbc=[True, False, True]), r"mixed periodic.*False"),
        (dict(positions=pos), "no multipoles"),
        (dict(positions=pos, charges=q.float()), "dtype"),
        (dict(positions=pos, charges=q, pbc=PBC), "no cell"),
        (dict(positions=torch.cat([pos, pos[:1]]), charges=torch.cat([q, q[:1]])), "overlap"),
        (dict(positions=pos, charges=q, smearing=-1.0), "smearing"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ewald.multipole_fields(**kwargs)
    # the same overlap with smearing is fine
    f = ewald.multipole_fields(torch.cat([pos, pos[:1]]), torch.cat([q, q[:1]]), smearing=0.5)
    assert bool(torch.isfinite(f.potential).all())


@pytest.mark.parametrize("method", ["auto", "pme"])
@pytest.mark.parametrize(
    "pbc, refused",
    [(True, False), (1, False), ([1, 1, 1], False), (np.ones(3, dtype=bool), False),
     (torch.ones(3, dtype=torch.bool), False), ("FFF", True), ("TTT", True), (["T", "T", "T"], True),
     ([2, 2, 2], True)],
)
def test_pbc_takes_booleans(pbc, refused, method):
    """pbc: one boolean or three (or 0/1); a string is refused, not read as periodic (bool("FFF") is True)."""
    pos, q, _, _ = random_system(22, n=3, c=1)
    if refused:
        with pytest.raises(ValueError, match="pbc takes booleans"):
            ewald.multipole_fields(pos, q, cell=TRICLINIC, pbc=pbc, method=method)
    else:
        got = ewald.multipole_fields(pos, q, cell=TRICLINIC, pbc=pbc, method=method)
        ref = ewald.multipole_fields(pos, q, cell=TRICLINIC, pbc=PBC, method=method)
        assert torch.equal(got.potential, ref.potential)


@pytest.mark.parametrize("boundary", ["mixed", "periodic", "open"])
@pytest.mark.parametrize("case", ["more rows", "fewer rows", "charges [N]", "no multipoles", "no atoms",
                                  "positions [N, 2]"])
def test_batched_bad_input_is_rejected_up_front(case, boundary):
    """batched_multipole_fields checks the whole batch's shapes before it splits it into structures, with
    multipole_fields' messages: the open structures' subset used to hide positions and multipoles of the wrong
    size (more rows: fields for the first atoms, no error; fewer: an IndexError), as did the per-cell path."""
    pos, q, _, _ = random_system(23, n=3, c=1)
    batch = torch.tensor([0, 0, 1])
    cells = torch.stack([TRICLINIC, torch.zeros(3, 3, dtype=DT)])
    pbc = torch.tensor([[True] * 3, [False] * 3])
    if boundary != "mixed":
        k = 0 if boundary == "periodic" else 1
        batch, cells, pbc = batch * 0, cells[k:k + 1], pbc[k:k + 1]
    sources = {"more rows": (torch.cat([q, q[:2]]),), "fewer rows": (q[:2],), "charges [N]": (q[:, 0],),
               "no multipoles": (), "no atoms": (q[:0],), "positions [N, 2]": (q,)}[case]
    if case == "no atoms":
        pos, batch = pos[:0], batch[:0]
    elif case == "positions [N, 2]":
        pos = pos[:, :2]
    with pytest.raises(ValueError) as single:
        ewald.multipole_fields(pos, *sources)
    with pytest.raises(ValueError, match=re.escape(str(single.value))):
        ewald.batched_multipole_fields(pos, batch, cells, pbc, *sources)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("boundary", ["open", "periodic", "batched"])
def test_half_precision_is_refused(dtype, boundary):
    """bfloat16 / float16 inputs: a periodic cell failed inside torch's LU ("lu_cpu" not implemented) and an open
    structure was summed with three significant digits, silently; both are now refused up front."""
    pos, q, _, _ = (None if t is None else t.to(dtype) for t in random_system(25, n=3, c=1))
    cell = TRICLINIC.to(dtype)
    with pytest.raises(ValueError, match="float32 or float64"):
        if boundary == "batched":
            ewald.batched_multipole_fields(pos, torch.zeros(3, dtype=torch.long), cell[None],
                                           torch.ones(1, 3, dtype=torch.bool), q)
        elif boundary == "periodic":
            ewald.multipole_fields(pos, q, cell=cell, pbc=PBC)
        else:
            ewald.multipole_fields(pos, q)


@pytest.mark.parametrize("prefactor", ["x", None, float("nan"), float("inf"), torch.ones(2), True])
@pytest.mark.parametrize("batched", [False, True])
def test_bad_prefactor_is_refused(prefactor, batched):
    """prefactor "x" failed with torch's "only integer tensors ... can be converted to an index" (or, batched,
    numpy's float conversion), and NaN / inf gave fields of NaN / inf without a word."""
    pos, q, _, _ = random_system(26, n=3, c=1)
    with pytest.raises(ValueError, match="prefactor must be a finite real number"):
        if batched:
            ewald.batched_multipole_fields(pos, torch.zeros(3, dtype=torch.long), TRICLINIC[None],
                                           torch.ones(1, 3, dtype=torch.bool), q, prefactor=prefactor)
        else:
            ewald.multipole_fields(pos, q, cell=TRICLINIC, pbc=PBC, prefactor=prefactor)


BAD_SCALARS = [
    (dict(accuracy=None), r"accuracy must be a number in \(0, 1\), got None"),  # TypeError from float()
    (dict(accuracy="x"), r"accuracy must be a number in \(0, 1\), got 'x'"),  # "could not convert string to float"
    (dict(accuracy=True), r"accuracy must be a number in \(0, 1\), got True"),
    (dict(accuracy=1.5), r"accuracy must be a number in \(0, 1\), got 1.5"),
    (dict(smearing="x"), r"smearing must be a positive length in Å \(a number\) or None, got 'x'"),
    (dict(smearing=True), r"smearing must be a positive length .* got True"),  # was taken as 1 Å
    (dict(smearing=-1.0), r"smearing must be a positive length .* got -1.0"),
    (dict(smearing=float("nan")), r"smearing must be a positive length .* got nan"),
    (dict(smearing=torch.ones(2, dtype=DT)), r"smearing must be a positive length .* got tensor"),
    # its gradient was lost with only torch's "Converting a tensor with requires_grad=True to a scalar" warning
    (dict(smearing=torch.tensor(1.0, dtype=DT, requires_grad=True)),
     "smearing is a tensor that requires grad, but the multipole sums are not differentiable with respect to smearing"),
]


@pytest.mark.parametrize("boundary", ["open", "periodic", "batched open", "batched periodic"])
@pytest.mark.parametrize("kwargs, message", BAD_SCALARS)
def test_bad_smearing_and_accuracy_are_refused(kwargs, message, boundary):
    """accuracy None / "x" and smearing "x" failed with messages that did not name the argument, smearing=True was
    taken as 1 Å, and a smearing tensor that requires grad silently lost its gradient: each a ValueError naming the
    argument, in every path (multipole_fields, batched_multipole_fields for open and periodic structures)."""
    pos, q, _, _ = random_system(26, n=3, c=1)
    periodic = "periodic" in boundary
    with pytest.raises(ValueError, match=message):
        if boundary.startswith("batched"):
            ewald.batched_multipole_fields(pos, torch.zeros(3, dtype=torch.long), TRICLINIC[None],
                                           torch.full((1, 3), periodic), q, **kwargs)
        else:
            ewald.multipole_fields(pos, q, cell=TRICLINIC if periodic else None, pbc=PBC if periodic else None,
                                   **kwargs)


def test_good_smearing_and_accuracy_forms():
    """Numbers of any real type, and one-element tensors and arrays without gradient, are taken as they were."""
    pos, q, _, _ = random_system(26, n=3, c=1)
    ref = ewald.multipole_fields(pos, q, cell=TRICLINIC, pbc=PBC, smearing=1.0, accuracy=1e-6)
    forms = ((1, 1e-6), (np.float32(1.0), np.float64(1e-6)), (torch.tensor(1.0), torch.tensor(1e-6, dtype=DT)),
             (np.array([1.0]), 1e-6))
    for smearing, accuracy in forms:
        got = ewald.multipole_fields(pos, q, cell=TRICLINIC, pbc=PBC, smearing=smearing, accuracy=accuracy)
        assert torch.equal(got.potential, ref.potential)


def test_prefactor_scales_the_fields():
    """A number or a one-element tensor (e.g. a learned scale, whose gradient flows) multiplies every field."""
    pos, q, mu, _ = random_system(27, n=3, c=1)
    ref = ewald.multipole_fields(pos, q, mu, cell=TRICLINIC, pbc=PBC)
    scale = torch.tensor(2.5, dtype=DT, requires_grad=True)
    for prefactor in (2.5, 5 // 2 + 0.5, np.float64(2.5), scale):
        got = ewald.multipole_fields(pos, q, mu, cell=TRICLINIC, pbc=PBC, prefactor=prefactor)
        assert torch.allclose(got.field, 2.5 * ref.field, rtol=1e-12, atol=0)
    got.potential.sum().backward()
    assert torch.allclose(scale.grad, ref.potential.sum(), rtol=1e-12)


@pytest.mark.parametrize("smearing", [None, 1.0])
@pytest.mark.parametrize("periodic", [False, True])
def test_batched_prefactor_gradient(smearing, periodic):
    """A one-element tensor prefactor's gradient through batched_multipole_fields equals that through
    multipole_fields structure by structure: open structures (two molecules, the pair-list path) and, with
    ``periodic``, a periodic cell beside them. The pair-list path took float(prefactor), and the gradient was None."""
    g = gen(29)
    counts = [3, 4] + ([5] if periodic else [])
    pos = torch.cat([torch.rand(n, 3, generator=g, dtype=DT) * 4.0 for n in counts])
    batch = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    q = torch.randn(len(batch), 2, generator=g, dtype=DT)
    mu = torch.randn(len(batch), 2, 3, generator=g, dtype=DT)
    th = random_traceless(g, len(batch), 2)
    cells = torch.zeros(len(counts), 3, 3, dtype=DT)
    pbc = torch.zeros(len(counts), 3, dtype=torch.bool)
    if periodic:
        cells[2], pbc[2] = TRICLINIC, True
    weights = [torch.randn(len(batch), 2, *(3,) * r, generator=g, dtype=DT) for r in range(3)]

    def loss(fields, rows=slice(None)):
        return sum((f * w[rows]).sum() for f, w in zip(fields, weights))

    scale = torch.tensor(2.5, dtype=DT, requires_grad=True)
    got = ewald.batched_multipole_fields(pos, batch, cells, pbc, q, mu, th, smearing=smearing, prefactor=scale)
    (grad,) = torch.autograd.grad(loss(got), scale)
    ref = torch.tensor(2.5, dtype=DT, requires_grad=True)
    total = 0.0
    for b in range(len(counts)):
        idx = (batch == b).nonzero().flatten()
        one = ewald.multipole_fields(pos[idx], q[idx], mu[idx], th[idx], cells[b], pbc[b], smearing=smearing,
                                     prefactor=ref)
        for a, c in zip(got, one):
            assert torch.allclose(a[idx], c, rtol=1e-10, atol=1e-12)
        total = total + loss(one, idx)
    (expected,) = torch.autograd.grad(total, ref)
    assert abs(float(expected)) > 1e-2
    assert torch.allclose(grad, expected, rtol=1e-10)


@pytest.mark.parametrize("pbc, refused", [("FFF", True), (["FFF"], True), ([["T", "T", "T"]], True),
                                          ([[2, 2, 2]], True), ([[1, 1, 1]], False),
                                          (np.ones((1, 3), dtype=bool), False),
                                          (torch.ones(1, 3, dtype=torch.int64), False)])
def test_batched_pbc_takes_booleans(pbc, refused):
    """batched_multipole_fields' pbc [B, 3]: strings failed in torch.as_tensor with "new(): invalid data type 'str'"
    or "too many dimensions 'str'", and 2 was read as True; now a message like multipole_fields'."""
    pos, q, _, _ = random_system(28, n=3, c=1)
    batch = torch.zeros(3, dtype=torch.long)
    if refused:
        with pytest.raises(ValueError, match="pbc takes booleans"):
            ewald.batched_multipole_fields(pos, batch, TRICLINIC[None], pbc, q)
    else:
        got = ewald.batched_multipole_fields(pos, batch, TRICLINIC[None], pbc, q)
        ref = ewald.multipole_fields(pos, q, cell=TRICLINIC, pbc=PBC)
        assert torch.allclose(got.potential, ref.potential, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("boundary", ["open", "ewald", "pme", "slab"])
def test_no_channels_give_empty_fields(boundary):
    """C = 0 channels: fields [N, 0], [N, 0, 3], [N, 0, 3, 3] and a zero energy with zero forces for every
    method (PME and slabs used to fail on reshapes and splits of the empty channel dimension)."""
    cell = TRICLINIC if boundary != "slab" else torch.diag(torch.tensor([6.0, 6.0, 8.0], dtype=DT))
    pos, q, mu, th = (t[:, :0] if k else t for k, t in enumerate(random_system(24, n=4, c=1, cell=cell)))
    kwargs = {"open": dict(), "ewald": dict(cell=cell, pbc=PBC, method="ewald"),
              "pme": dict(cell=cell, pbc=PBC, method="pme"), "slab": dict(cell=cell, pbc=[True, True, False])}
    f = ewald.multipole_fields(pos, q, mu, th, **kwargs[boundary])
    assert [tuple(x.shape) for x in f] == [(4, 0), (4, 0, 3), (4, 0, 3, 3)]
    x = pos.clone().requires_grad_(True)
    energy = ewald.electrostatic_energy(x, q, mu, th, **kwargs[boundary])
    (force,) = torch.autograd.grad(energy, x, allow_unused=True)
    assert float(energy.detach()) == 0.0 and (force is None or not bool(force.any()))


@pytest.mark.parametrize("ranks", [(0, 1, 2), (0,), (1, 2)])
@pytest.mark.parametrize("smearing", [None, 0.8])
@pytest.mark.parametrize("given", [(0,), (1,), (2,), (0, 1, 2)])
def test_batched_open_fast_path_equals_blocked_sum(smearing, given, ranks):
    """Many open structures go through one vectorised pair sum; it must equal the per-structure sum.
    Fields not asked for come back as None."""
    systems = [random_system(30 + k, n=n, c=3) for k, n in enumerate((4, 1, 5, 3))]
    pos = torch.cat([s[0] for s in systems])
    batch = torch.cat([torch.full((s[0].shape[0],), k) for k, s in enumerate(systems)])
    perm = torch.randperm(pos.shape[0], generator=torch.Generator().manual_seed(5))  # not grouped
    srcs = [torch.cat([s[1 + r] for s in systems]) if r in given else None for r in range(3)]
    got = ewald.batched_multipole_fields(
        pos[perm], batch[perm], torch.zeros(4, 3, 3, dtype=DT), torch.zeros(4, 3, dtype=torch.bool),
        *[None if x is None else x[perm] for x in srcs], smearing=smearing, prefactor=2.0, ranks=ranks)
    assert [k for k in range(3) if got[k] is not None] == list(ranks)
    start = 0
    for s in systems:
        n = s[0].shape[0]
        ref = ewald.multipole_fields(s[0], *[None if r not in given else s[1 + r] for r in range(3)],
                                     smearing=smearing, prefactor=2.0)
        rows = [int((perm == k).nonzero()) for k in range(start, start + n)]
        for k in ranks:
            assert torch.allclose(got[k][rows], ref[k], rtol=1e-12, atol=1e-12)
        start += n


def test_batched_open_structures_beyond_the_pair_list_budget_are_summed_one_by_one(monkeypatch):
    """Above PAIR_LIST_FLOATS the open structures go through the blocked per-structure sum: same fields."""
    import cartlorem.ewald.fields as fields

    systems = [random_system(40 + k, n=n, c=2) for k, n in enumerate((4, 3, 5))]
    pos = torch.cat([s[0] for s in systems])
    batch = torch.cat([torch.full((s[0].shape[0],), k) for k, s in enumerate(systems)])
    args = (pos, batch, torch.zeros(3, 3, 3, dtype=DT), torch.zeros(3, 3, dtype=torch.bool),
            *[torch.cat([s[1 + r] for s in systems]) for r in range(3)])
    fast = ewald.batched_multipole_fields(*args, smearing=0.8)
    calls = []
    monkeypatch.setattr(direct, "PAIR_LIST_FLOATS", 1)
    monkeypatch.setattr(fields, "open_molecules_fields", lambda *a, **k: calls.append(1))
    blocked = ewald.batched_multipole_fields(*args, smearing=0.8)
    assert not calls
    for k in range(3):
        torch.testing.assert_close(blocked[k], fast[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("smearing", [None, 0.8])
def test_batched_open_fast_path_gradcheck_and_gradgradcheck(smearing):
    """First and second derivatives of the vectorised open-structure sum (the path of force training:
    forces, then the loss's double backward) in positions, charges, dipoles and quadrupoles, against
    finite differences; the quadrupoles as the STF part of free 3x3 matrices, so every probe stays valid."""
    from cartlorem.tensors import stf

    g = gen(11)
    batch = torch.tensor([0, 0, 0, 1, 1])
    pos = (torch.rand(5, 3, generator=g, dtype=DT) * 3.0).requires_grad_()
    q = torch.randn(5, 2, generator=g, dtype=DT, requires_grad=True)
    mu = torch.randn(5, 2, 3, generator=g, dtype=DT, requires_grad=True)
    A = torch.randn(5, 2, 3, 3, generator=g, dtype=DT, requires_grad=True)
    cell, pbc = torch.zeros(2, 3, 3, dtype=DT), torch.zeros(2, 3, dtype=torch.bool)

    def fields(pos, q, mu, A):
        f = ewald.batched_multipole_fields(pos, batch, cell, pbc, q, mu, stf(A), smearing=smearing)
        return f.potential, f.field, f.field_gradient

    assert torch.autograd.gradcheck(fields, (pos, q, mu, A))
    assert torch.autograd.gradgradcheck(fields, (pos, q, mu, A))


def test_parameter_choice_large_cell_smeared_and_point():
    """Smeared sources in a large cell go all to reciprocal space (alpha = 1/(sqrt2 sigma): no dense
    real-space pair sum, the O(N^2)-pairs regime that made the long-range block slow); point sources
    keep a real-space part; alpha never exceeds 2 / mean spacing."""
    from cartlorem.ewald.ewald import ALPHA_SPACING_MAX, choose_parameters
    from cartlorem.ewald.kernels import smearing_beta

    cell = torch.eye(3, dtype=DT).numpy() * 24.8  # ~1536 atoms of water
    p = choose_parameters(cell, 1536, 1e-5, 4, smearing=1.0)
    assert p.alpha == pytest.approx(smearing_beta(1.0))
    point = choose_parameters(cell, 1536, 1e-5, 4)
    assert point.real_cutoff < 24.8 / 2 + 1e-9 and point.alpha < ALPHA_SPACING_MAX / (24.8**3 / 1536) ** (1 / 3) + 1e-12
    small = choose_parameters(TRICLINIC.numpy(), 5, 1e-6, 4)
    spacing = (abs(float(torch.linalg.det(TRICLINIC))) / 5) ** (1 / 3)
    assert small.alpha <= ALPHA_SPACING_MAX / spacing + 1e-12


def test_reciprocal_only_sum_matches_split_sum():
    """The reciprocal-only sum chosen for smeared sources equals a real + reciprocal split (alpha = 0.3)."""
    cell = TRICLINIC * 1.6
    pos, q, mu, th = random_system(40, n=24, c=2, cell=cell)
    # any alpha above 1/(sqrt2 sigma) is clamped to it: the real-space kernel vanishes
    auto = compute_fields(pos, q, mu, th, cell, PBC, smearing=0.9, accuracy=1e-9, alpha=10.0)
    split_ = compute_fields(pos, q, mu, th, cell, PBC, smearing=0.9, accuracy=1e-11, alpha=0.3)
    for rank in range(3):
        assert rel(auto[rank], split_[rank]) < 1e-8
    # and against the plain Fourier series of Gaussian multipoles (independent reference) at probe sites
    sigma = 0.9
    pos, q, mu, th = random_system(41, n=3, c=1)
    probes = _probes(42, 3)
    zeros = [torch.zeros(3, 1, *shape, dtype=DT) for shape in ((), (3,), (3, 3))]
    got = compute_fields(torch.cat([pos, probes]), *[torch.cat([x, z]) for x, z in zip((q, mu, th), zeros)],
                         TRICLINIC, PBC, smearing=sigma, accuracy=1e-12, alpha=10.0)
    ref = fields_by_autograd(
        lambda r: smeared_fourier_potential(r, pos, q[:, 0], mu[:, 0], th[:, 0], TRICLINIC, sigma), probes
    )
    for k in range(3):
        assert rel(got[k][3:, 0], ref[k]) < 1e-10


def test_one_large_open_structure_leaves_the_small_ones_in_the_pair_list(monkeypatch):
    """When the pair list of all a batch's open structures did not fit its memory budget, every open structure
    went through the per-structure sum (~5x slower per small molecule): one 260-atom cluster in a batch of 63
    dimers cost 2.6x the two batches apart. The small ones now stay in the pair list, with the same fields."""
    from cartlorem.ewald import direct
    from cartlorem.ewald import fields as fields_mod

    g = gen(71)
    sizes = [3, 4, 2, 5, 30, 3]
    batch = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(sizes)])
    pos = torch.cat([torch.rand(n, 3, generator=g, dtype=DT) * (2.0 + n ** (1 / 3) * 2.0) + 50.0 * b
                     for b, n in enumerate(sizes)])
    q = torch.randn(len(pos), 2, generator=g, dtype=DT)
    mu = torch.randn(len(pos), 2, 3, generator=g, dtype=DT)
    cells, pbc = torch.zeros(len(sizes), 3, 3, dtype=DT), torch.zeros(len(sizes), 3, dtype=torch.bool)
    kw = dict(smearing=1.0, ranks=(0, 1, 2), traceless_gradient=True)
    whole = ewald.batched_multipole_fields(pos, batch, cells, pbc, q, mu, **kw)
    seen = []
    real = fields_mod.open_molecules_fields
    monkeypatch.setattr(fields_mod, "open_molecules_fields",
                        lambda p, b, *a, **k: seen.append(sorted(set(b.tolist()))) or real(p, b, *a, **k))
    monkeypatch.setattr(direct, "PAIR_LIST_FLOATS", 10 ** 6)
    lo, hi = 1, 10 ** 6  # the most pairs that fit in 10**6 floats
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if direct.pair_list_fits(mid, (0, 1, 2), (0, 1), 2, True) else (lo, mid - 1)
    monkeypatch.setattr(direct, "PAIR_LIST_FLOATS", 200 * (10 ** 6 // lo))  # ~200 pairs: the cluster's 900 not
    assert direct.pair_list_fits(sum(n * n for n in sizes if n < 30), (0, 1, 2), (0, 1), 2, True)
    assert not direct.pair_list_fits(sum(n * n for n in sizes), (0, 1, 2), (0, 1), 2, True)
    parts = ewald.batched_multipole_fields(pos, batch, cells, pbc, q, mu, **kw)
    assert seen == [[0, 1, 2, 3, 5]]  # every structure but the cluster, in one pair list
    for a, b in zip(whole, parts):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
