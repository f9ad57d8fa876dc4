"""Closed-form backward passes of the long-range sums against autograd (float64 gradcheck / gradgradcheck)."""

import math

import numpy as np

import pytest
import torch

from cartlorem.ewald.kernels import KernelDerivatives, RadialKernel, erf_kernel_derivatives
from conftest import needs_compiled_step, needs_torch, works  # noqa: E402  (tests/ is on sys.path under pytest)

KERNELS = {
    "coulomb": RadialKernel.coulomb(),
    "smeared": RadialKernel.smeared(0.8),
    "ewald_real": RadialKernel.ewald_real(0.6, smearing=0.9),
}


def _r2(seed=0, n=40):
    """Squared distances spanning the Taylor-series region (beta^2 R^2 < 2) and the far region."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) * 3.5 + 0.05) ** 2


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_derivatives_match_op_by_op_path(name):
    kernel = KERNELS[name]
    r2 = _r2()
    valid = torch.ones_like(r2, dtype=torch.bool)
    valid[3] = False
    ref = kernel.derivatives_autograd(r2, valid, 4)
    fast = KernelDerivatives.apply(r2.requires_grad_(True), valid, kernel, 0, 4)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=0.0)
    assert all(float(b[3].detach()) == 0.0 for b in fast)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_derivatives_gradcheck(name):
    """First and second derivatives (the double backward of force training) against finite differences."""
    kernel = KERNELS[name]
    r2 = _r2(1, 6).requires_grad_(True)
    valid = torch.ones_like(r2, dtype=torch.bool)
    valid[0] = False

    def f(x):
        return KernelDerivatives.apply(x, valid, kernel, 0, 3)

    assert torch.autograd.gradcheck(f, (r2,))
    assert torch.autograd.gradgradcheck(f, (r2,))


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_derivatives_second_order_equal_autograd(name):
    """Gradient and Hessian-vector product through the Function equal those of the op-by-op graph."""
    kernel = KERNELS[name]
    r2 = _r2(2, 30)
    valid = torch.ones_like(r2, dtype=torch.bool)
    w = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)

    def loss(B):
        return sum(wk * (b * torch.sin(b)).sum() for wk, b in zip(w, B))

    out = []
    for path in (lambda x: kernel.derivatives_autograd(x, valid, 4), lambda x: kernel.derivatives(x, valid, 4)):
        x = r2.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(path(x)), x, create_graph=True)
        (h,) = torch.autograd.grad((g * torch.cos(x)).sum(), x)
        out.append((g.detach(), h))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-9, atol=1e-12)


def test_erf_series_table_matches_loop():
    """The matmul form of the erf series (no-grad path: every order's series) equals the form autograd records (the
    top order's series, then the downward recursion)."""
    from cartlorem.ewald.kernels import _erf_series_no_grad

    beta = 1.0 / (math.sqrt(2.0) * 0.7)
    r2 = torch.linspace(0.0, 2.0 / beta**2, 50, dtype=torch.float64)
    for a, b in zip(erf_kernel_derivatives(beta, r2, 4), _erf_series_no_grad(beta, r2, 4)):
        torch.testing.assert_close(b, a, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 2e-15), (torch.float32, 1e-6)])
def test_erf_kernel_derivatives_equal_the_closed_form_in_high_precision(dtype, rtol):
    """The short-range form of B_n of erf(beta R)/R (the top order's series, then the downward recursion) against
    B_0 = erf(beta R)/R and Smith's upward recursion evaluated with 50 digits (no series: an independent form),
    and B_n(0) = 2^(n+1) beta^(2n+1) / ((2n+1) sqrt(pi)), over the whole range where it is used (beta^2 R^2 < 2)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    for sigma in (0.4, 1.0, 2.5):
        beta = 1.0 / (math.sqrt(2.0) * sigma)
        r2 = torch.linspace(0.0, 2.0 / beta**2, 61, dtype=torch.float64).to(dtype)
        got = erf_kernel_derivatives(beta, r2, 5)
        b = mpmath.mpf(beta)
        for k, x in enumerate(r2.tolist()):  # the reference at the very inputs (float32 rounded)
            if x == 0.0:
                ref = [2 ** (n + 1) * b ** (2 * n + 1) / ((2 * n + 1) * mpmath.sqrt(mpmath.pi)) for n in range(6)]
            else:
                r = mpmath.sqrt(mpmath.mpf(x))
                gauss = mpmath.exp(-b * b * r * r) / (b * mpmath.sqrt(mpmath.pi))
                ref = [mpmath.erf(b * r) / r]
                for n in range(1, 6):
                    ref.append(((2 * n - 1) * ref[-1] - (2 * b * b) ** n * gauss) / (r * r))
            for n in range(6):
                assert abs(float(got[n][k]) - float(ref[n])) <= rtol * abs(float(ref[n])), (sigma, x, n)


def test_derivative_is_minus_half_next_order():
    """Physics check of the identity the backward uses: d B_n / d(R^2) = -B_(n+1) / 2, by finite differences."""
    kernel = KERNELS["smeared"]
    r2 = _r2(3, 20)
    valid = torch.ones_like(r2, dtype=torch.bool)
    h = 1e-6
    plus = kernel.derivatives_autograd(r2 + h, valid, 4)
    minus = kernel.derivatives_autograd(r2 - h, valid, 4)
    B = kernel.derivatives_autograd(r2, valid, 4)
    for n in range(4):
        torch.testing.assert_close((plus[n] - minus[n]) / (2 * h), -0.5 * B[n + 1], rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- pair-list sum of open molecules

def _molecules(seed=0, channels=2):
    """Three small molecules in a shuffled batch (atoms of a structure need not be contiguous)."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.tensor([0, 0, 2, 1, 0, 2, 2, 1, 0, 2])
    pos = torch.randn(len(batch), 3, generator=g, dtype=torch.float64) * 1.5 + batch[:, None] * 20.0
    n = len(batch)
    q = torch.randn(n, channels, generator=g, dtype=torch.float64)
    mu = torch.randn(n, channels, 3, generator=g, dtype=torch.float64)
    th = torch.randn(n, channels, 3, 3, generator=g, dtype=torch.float64)
    th = th + th.transpose(-1, -2)
    th = th - th.diagonal(dim1=-1, dim2=-2).sum(-1)[..., None, None] * torch.eye(3, dtype=torch.float64) / 3
    return batch, pos, q, mu, th


def test_molecule_pairs_are_all_ordered_intra_pairs():
    from cartlorem.ewald.direct import molecule_pairs

    batch = torch.tensor([1, 0, 1, 1, 2, 0])
    i, j = molecule_pairs(batch)
    got = sorted(zip(i.tolist(), j.tolist()))
    want = sorted((a, b) for a in range(6) for b in range(6) if a != b and batch[a] == batch[b])
    assert got == want
    i, j = molecule_pairs(batch, unordered=True)  # each pair once
    got = sorted(tuple(sorted(p)) for p in zip(i.tolist(), j.tolist()))
    assert got == sorted((a, b) for a, b in want if a < b)


@pytest.mark.parametrize("smearing", [None, 0.8])
def test_open_molecules_fields_equal_separate_direct_sums(smearing):
    """Each molecule summed alone by the public direct sum (blocked pair_sum) gives the same fields."""
    from cartlorem.ewald import multipole_fields
    from cartlorem.ewald.direct import open_molecules_fields

    batch, pos, q, mu, th = _molecules()
    got = open_molecules_fields(pos, batch, q, mu, th, smearing=smearing, prefactor=1.7)
    for b in range(3):
        idx = (batch == b).nonzero().flatten()
        ref = multipole_fields(pos[idx], q[idx], mu[idx], th[idx], smearing=smearing, prefactor=1.7,
                               method="direct")
        for r in range(3):
            torch.testing.assert_close(got[r][idx], ref[r], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("smearing", [None, 0.8])
def test_scripted_pair_formulas_equal_the_pair_list_sum(smearing):
    """fields.pair_fields (op by op, what the TorchScript export runs) gives the eager PairListSum's numbers."""
    from cartlorem.ewald.direct import open_molecules_fields
    from cartlorem.ewald.fields import intra_pairs, pair_fields

    batch, pos, q, mu, th = _molecules(2)
    i, j = intra_pairs(batch)
    R = pos[i] - pos[j]
    kernel = RadialKernel.coulomb() if smearing is None else RadialKernel.smeared(smearing)
    B = kernel.derivatives_autograd((R * R).sum(-1), torch.ones_like(R[:, 0], dtype=torch.bool), 4)
    want = pair_fields(R, i, len(batch), q[j], mu[j], th[j], B, True, True, True)
    got = open_molecules_fields(pos, batch, q, mu, th, smearing=smearing)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_open_molecules_fields_subsets_of_ranks():
    from cartlorem.ewald import multipole_fields
    from cartlorem.ewald.direct import open_molecules_fields

    batch, pos, q, mu, th = _molecules(1)
    got = open_molecules_fields(pos, batch, None, mu, None, smearing=1.0, ranks=(0, 2))
    assert got[1] is None
    for b in range(3):
        idx = (batch == b).nonzero().flatten()
        ref = multipole_fields(pos[idx], dipoles=mu[idx], smearing=1.0)
        torch.testing.assert_close(got[0][idx], ref.potential, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(got[2][idx], ref.field_gradient, rtol=1e-12, atol=1e-13)


def test_open_molecules_fields_overlap_is_a_clear_error():
    from cartlorem.ewald.direct import open_molecules_fields

    batch, pos, q, mu, th = _molecules()
    pos = pos.clone()
    pos[4] = pos[0]
    with pytest.raises(ValueError, match="overlap"):
        open_molecules_fields(pos, batch, q, smearing=None)
    open_molecules_fields(pos, batch, q, smearing=0.5)  # smeared sources may coincide


@pytest.mark.parametrize("unordered,traceless", [(False, False), (True, False), (True, True)])
def test_pair_list_fields_gradcheck_and_gradgradcheck(unordered, traceless):
    """Derivatives w.r.t. positions and all multipoles, first and second order, against finite differences."""
    from cartlorem.ewald.direct import molecule_pairs, pair_list_fields

    batch = torch.tensor([0, 0, 1, 1, 0])
    _, pos, q, mu, th = _molecules(2, channels=1)
    pos, q, mu, th = pos[:5].clone(), q[:5], mu[:5], th[:5]
    i, j = molecule_pairs(batch, unordered=unordered)
    kernel = RadialKernel.smeared(0.9)

    def f(p, q_, mu_, th_):
        th_ = 0.5 * (th_ + th_.transpose(-1, -2))
        out = pair_list_fields(p, i, j, {0: q_, 1: mu_, 2: th_}, kernel, unordered=unordered,
                               traceless_gradient=traceless)
        return out[0], out[1], out[2]

    args = tuple(t.clone().requires_grad_(True) for t in (pos, q, mu, th))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args, fast_mode=True)  # random projections of the full check


@pytest.mark.parametrize("smearing", [None, 0.8])
def test_unordered_and_traceless_pair_lists_give_the_full_sum(smearing):
    """Each pair once (its matrix applied in both directions with the parity signs) and rank 2 in five
    symmetric traceless components give the fields of the ordered full-component sum (the gradient's
    symmetric traceless part), and the same force-training gradients through the closed-form backward passes."""
    from cartlorem.ewald.direct import molecule_pairs, pair_list_fields
    from cartlorem.tensors import stf

    batch, pos, q, mu, th = _molecules()
    kernel = RadialKernel.coulomb() if smearing is None else RadialKernel.smeared(smearing)
    m = {0: q, 1: mu, 2: th}
    ref = pair_list_fields(pos, *molecule_pairs(batch), m, kernel, prefactor=1.3)
    assert float((ref[2] - stf(ref[2])).abs().max()) > 1e-3 or smearing is None  # smeared overlap: a trace
    for unordered, traceless in ((True, False), (False, True), (True, True)):
        i, j = molecule_pairs(batch, unordered=unordered)
        assert i.numel() == molecule_pairs(batch)[0].numel() // (2 if unordered else 1)
        got = pair_list_fields(pos, i, j, m, kernel, prefactor=1.3, unordered=unordered, traceless_gradient=traceless)
        for r in (0, 1, 2):
            want = stf(ref[r]) if r == 2 and traceless else ref[r]
            torch.testing.assert_close(got[r], want, rtol=1e-12, atol=1e-12)

        def loss(p, theta, options):
            x = p.clone().requires_grad_(True)
            src = {0: q * theta[0] + torch.tanh(x[:, :1]) * theta[1], 1: mu * theta[2], 2: th * theta[3]}
            ii, jj = molecule_pairs(batch, unordered=options[0])
            out = pair_list_fields(x, ii, jj, src, kernel, unordered=options[0], traceless_gradient=options[1])
            grad = stf(out[2]) if traceless else out[2]
            energy = (out[0] ** 2).sum() + (out[1] * torch.sin(out[1])).sum() + (grad**3).sum()
            (forces,) = torch.autograd.grad(energy, x, create_graph=True)
            return (forces**2).sum() + energy

        theta = torch.tensor([0.7, -1.3, 0.4, 1.1], dtype=torch.float64, requires_grad=True)
        (want,) = torch.autograd.grad(loss(pos, theta, (False, False)), theta)
        (got_g,) = torch.autograd.grad(loss(pos, theta, (unordered, traceless)), theta)
        torch.testing.assert_close(got_g, want, rtol=1e-10, atol=1e-10)


def test_pair_list_fields_equivariant_under_reflection_and_rotation():
    from cartlorem.ewald.direct import open_molecules_fields

    batch, pos, q, mu, th = _molecules(3)
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    Q = Q * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64) if torch.det(Q) > 0 else Q  # det -1
    a = open_molecules_fields(pos, batch, q, mu, th, smearing=0.7)
    b = open_molecules_fields(pos @ Q.T, batch, q, mu @ Q.T, Q @ th @ Q.T, smearing=0.7)
    torch.testing.assert_close(b[0], a[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b[1], a[1] @ Q.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b[2], Q @ a[2] @ Q.T, rtol=1e-12, atol=1e-12)


def test_kernel_derivatives_third_order_equal_autograd():
    """Beyond the cached orders (forward, backward, double backward) the Function re-evaluates: still exact."""
    kernel = KERNELS["smeared"]
    r2 = _r2(4, 25)
    valid = torch.ones_like(r2, dtype=torch.bool)

    def derivatives(path):
        x = r2.clone().requires_grad_(True)
        e = sum((b * torch.cos(x)).sum() for b in path(x))
        (g,) = torch.autograd.grad(e, x, create_graph=True)
        (h,) = torch.autograd.grad((g**2).sum(), x, create_graph=True)
        (t,) = torch.autograd.grad((h * torch.sin(x)).sum(), x)
        return g.detach(), h.detach(), t

    ref = derivatives(lambda x: kernel.derivatives_autograd(x, valid, 3))
    got = derivatives(lambda x: kernel.derivatives(x, valid, 3))
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def _training_loss(pos, theta, fields_of):
    """A force-training-like loss: multipoles depend on parameters theta (and positions), E on the fields."""
    p = pos.clone().requires_grad_(True)
    batch, _, q, mu, th = _molecules(7)
    q = q * theta[0] + torch.tanh(p[:, :1]) * theta[1]
    out = fields_of(p, batch, q * 1.0, mu * theta[2], th * theta[3])
    energy = (out[0] ** 2).sum() + (out[1] * torch.sin(out[1])).sum() + (out[2] ** 3).sum()
    (forces,) = torch.autograd.grad(energy, p, create_graph=True)
    return (forces**2).sum() + energy


def test_pair_list_sum_parameter_gradient_of_force_loss_without_second_position_derivative(monkeypatch):
    """Force training's double backward, taken for the parameters only (as the training loop does), runs the
    closed-form backward of the backward and gives autograd's gradient; the positions' second derivative
    (the op-by-op reference) runs only when the positions are differentiated again."""
    import cartlorem.ewald.direct as direct

    _, pos, *_ = _molecules(7)
    theta = torch.tensor([0.7, -1.3, 0.4, 1.1], dtype=torch.float64, requires_grad=True)
    closed_form = direct.PairListSum.apply

    def fields_of(pair_sum):
        def f(p, batch, q, mu, th):
            monkeypatch.setattr(direct.PairListSum, "apply", pair_sum)
            return direct.open_molecules_fields(p, batch, q, mu, th, smearing=0.8, prefactor=1.7)
        return f

    reference = fields_of(lambda *a: direct._field_sum_reference(*a[:7], unordered=a[7]))
    (want,) = torch.autograd.grad(_training_loss(pos, theta, reference), theta)

    fused = fields_of(closed_form)
    calls = []
    second_order = direct._second_order_reference
    monkeypatch.setattr(direct, "_second_order_reference", lambda *a: calls.append(1) or second_order(*a))
    theta.grad = None
    torch.autograd.backward(_training_loss(pos, theta, fused), inputs=[theta])
    torch.testing.assert_close(theta.grad, want, rtol=1e-12, atol=1e-12)
    assert not calls  # closed form only
    theta.grad = None
    _training_loss(pos, theta, fused).backward()  # the positions (a leaf) get their second derivative too
    torch.testing.assert_close(theta.grad, want, rtol=1e-12, atol=1e-12)
    assert calls


def test_training_step_differentiates_parameters_only(make_molecule, monkeypatch):
    """cartlorem.train's backward asks for the parameters' gradients only: no second derivative in the
    positions is ever taken (fails with a plain ``loss.backward()``, which fills ``positions.grad`` too)."""
    import cartlorem.ewald.direct as direct
    from cartlorem import CartLorem
    from cartlorem.data import read_dataset
    from cartlorem.train import train

    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k in range(6):
        a = make_molecule(n_atoms=5, seed=k)
        a.calc = SinglePointCalculator(a, energy=float(k), forces=np.random.default_rng(k).normal(size=(5, 3)))
        frames.append(a)
    graphs = read_dataset(frames, 3.0)

    def forbidden(*a):
        raise AssertionError("second derivative in the positions taken during training")

    monkeypatch.setattr(direct, "_second_order_reference", forbidden)
    torch.manual_seed(0)
    model = CartLorem([1, 6, 8], cutoff=3.0, long_range="multipole", channels=4, num_layers=2, correlation=2,
                      num_basis=4, radial_hidden=8, readout_hidden=8).double()
    result = train(model, graphs[:4], graphs[4:], epochs=1, batch_size=2, progress=False, seed=0)
    assert result.epochs_completed == 1


@pytest.mark.parametrize("ranks", [(0,), (1, 2)])
def test_pair_list_fields_of_charges_gradcheck_and_gradgradcheck(ranks):
    """Charges alone (the ``lorem`` block's potential: 1 x 1 coupling, products instead of matmuls)."""
    from cartlorem.ewald.direct import molecule_pairs, pair_list_fields

    batch = torch.tensor([0, 1, 0, 1, 0])
    _, pos, q, _, _ = _molecules(3, channels=3)
    pos, q = pos[:5].clone(), q[:5]
    i, j = molecule_pairs(batch, unordered=True)

    def f(p, q_):
        out = pair_list_fields(p, i, j, {0: q_}, RadialKernel.smeared(0.7), ranks, prefactor=0.9, unordered=True,
                               traceless_gradient=True)
        return tuple(out[r] for r in ranks)

    args = tuple(t.clone().requires_grad_(True) for t in (pos, q))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_dense_kernel_derivatives_equal_the_gathered_ones(name):
    """derivatives_autograd(dense=True) (the series at every pair, selected; the compiled training step's form)
    gives the values, first and second derivatives of the gathered series, finite everywhere."""
    kernel = KERNELS[name]
    r2 = _r2(3).requires_grad_(True)
    valid = torch.ones_like(r2, dtype=torch.bool)
    valid[5] = False
    ref = kernel.derivatives_autograd(r2, valid, 3)
    dense = kernel.derivatives_autograd(r2, valid, 3, dense=True)
    w = torch.linspace(0.5, 1.5, len(r2), dtype=torch.float64)
    for a, b in zip(ref, dense):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=0.0)
        (ga,) = torch.autograd.grad((a * w).sum(), r2, create_graph=True)
        (gb,) = torch.autograd.grad((b * w).sum(), r2, create_graph=True)
        torch.testing.assert_close(gb, ga, rtol=1e-12, atol=0.0)
        (hb,) = torch.autograd.grad(gb.sum(), r2, retain_graph=True)
        (ha,) = torch.autograd.grad(ga.sum(), r2, retain_graph=True)
        assert torch.isfinite(hb).all()
        torch.testing.assert_close(hb, ha, rtol=1e-11, atol=0.0)


@needs_compiled_step
def test_traced_pair_fields_first_called_inside_torch_func(monkeypatch):
    """The coupling table that traced_pair_fields builds on its first call is a constant kept for later calls: built
    inside a torch.func transform it used to belong to that transform's level, and the next call failed with
    functorch's internal assertion ("escaped?")."""
    import cartlorem.ewald.direct as direct

    monkeypatch.setattr(direct, "_TABLES", {})  # no table yet: the first call below builds it
    batch, pos, q, mu, th = _molecules()
    pairs = direct.molecule_pairs(batch, unordered=True)

    def loss(qq, x):
        def energy(y):
            f = direct.traced_pair_fields(y, pairs, qq, mu, th, smearing=1.0)
            return (qq * f[0]).sum() - (mu * f[1]).sum() - 0.5 * (th * f[2]).sum()
        return (torch.func.grad(energy)(x) ** 2).sum()

    first = torch.func.grad(loss)(q, pos)
    second = torch.func.grad(loss)(q, pos)
    torch.testing.assert_close(second, first, rtol=0.0, atol=0.0)
    # both are the gradient autograd gives through the eager sum (its autograd Functions, checked against the
    # brute-force pair sum above)
    qa, xa = q.clone().requires_grad_(True), pos.clone().requires_grad_(True)
    f = direct.open_molecules_fields(xa, batch, qa, mu, th, smearing=1.0)
    (gx,) = torch.autograd.grad((qa * f[0]).sum() - (mu * f[1]).sum() - 0.5 * (th * f[2]).sum(), xa, create_graph=True)
    (g_ref,) = torch.autograd.grad((gx**2).sum(), qa)
    torch.testing.assert_close(first, g_ref, rtol=1e-10, atol=1e-12)
    # and under torch.compile, which cannot trace the switch out of the transforms, with no table prepared: one graph
    expected = direct.open_molecules_fields(pos, batch, q, mu, th, smearing=1.0)
    monkeypatch.setattr(direct, "_TABLES", {})
    compiled = torch.compile(lambda x: direct.traced_pair_fields(x, pairs, q, mu, th, smearing=1.0), fullgraph=True,
                             backend="aot_eager")
    for a, b in zip(compiled(pos), expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("linearized", [False, True])
@pytest.mark.parametrize("smearing", [None, 0.8])
@needs_torch(works(lambda: torch.randn_like(torch.zeros(1), generator=torch.Generator())),
             "torch.randn_like(generator=)", "2.10")
def test_traced_pair_fields_equal_open_molecules_fields_under_torch_func(smearing, linearized):
    """traced_pair_fields (the compiled training step's field sum) gives open_molecules_fields' fields, their
    derivatives in the positions, and under torch.func (grad of a force loss in the sources) the gradients autograd
    gives through the autograd Functions; ``linearized`` too (the pair features expanded to first order about
    the positions: what training needs is exact)."""
    from cartlorem.ewald.direct import molecule_pairs, open_molecules_fields, traced_pair_fields

    batch, pos, q, mu, th = _molecules()
    pairs = molecule_pairs(batch, unordered=True)
    ref = open_molecules_fields(pos, batch, q, mu, th, smearing=smearing)
    got = traced_pair_fields(pos, pairs, q, mu, th, smearing=smearing, linearized=linearized)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    weights = [torch.randn_like(a, generator=torch.Generator().manual_seed(k)) for k, a in enumerate(ref)]
    (f_ref,) = torch.autograd.functional.vjp(lambda x: open_molecules_fields(x, batch, q, mu, th, smearing=smearing),
                                             pos, tuple(weights))[1:]
    (f_got,) = torch.func.vjp(lambda x: traced_pair_fields(x, pairs, q, mu, th, smearing=smearing,
                                                           linearized=linearized), pos)[1](tuple(weights))
    torch.testing.assert_close(f_got, f_ref, rtol=1e-11, atol=1e-12)

    def force_loss(fn, qq, positions):
        def energy(x):
            f = fn(x, qq)
            return (qq * f[0]).sum() - (mu * f[1]).sum() - 0.5 * (th * f[2]).sum()
        return (torch.func.grad(energy)(positions) ** 2).sum()

    traced = lambda x, qq: traced_pair_fields(x, pairs, qq, mu, th, smearing=smearing, linearized=linearized)  # noqa: E731
    g_func = torch.func.grad(lambda qq: force_loss(traced, qq, pos))(q)
    qa, xa = q.clone().requires_grad_(True), pos.clone().requires_grad_(True)
    f = open_molecules_fields(xa, batch, qa, mu, th, smearing=smearing)
    e = (qa * f[0]).sum() - (mu * f[1]).sum() - 0.5 * (th * f[2]).sum()
    (gx,) = torch.autograd.grad(e, xa, create_graph=True)
    (g_ref,) = torch.autograd.grad((gx**2).sum(), qa)
    torch.testing.assert_close(g_func, g_ref, rtol=1e-10, atol=1e-12)
