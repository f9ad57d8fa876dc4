"""What is summed: radial kernels, Cartesian interaction tensors, reciprocal kernel, self and background.

Nothing here knows how a sum is organised (direct pairs, Ewald); :mod:`.direct` and :mod:`.ewald` do.

Multipole layout
----------------
A symmetric rank-k Cartesian tensor is stored by its unique components, each labelled by a sorted
multi-index (rank 2: xx, yy, zz, xy, xz, yz). A :class:`Layout` lists the components of the ranks
present. Sources are packed as ``v_b = (-1)^k / k! * mult(b) * M_k[b]`` (``mult`` = number of distinct
permutations of the multi-index), so that the potential of a source is ``phi = sum_b T^(k_b)[b] v_b``
with ``T^(n) = grad^n f(R)``; this is ``q f - mu . grad f + 1/2 Theta : grad grad f``.
The rank-l output at a target is ``F_a = c_l sum_b T^(l_a + k_b)[a u b] v_b`` with ``c_0 = 1`` (potential)
and ``c_1 = c_2 = -1`` (field ``E = -grad phi``, gradient ``G = grad E``); ``a u b`` joins the two
multi-indices. In Fourier space ``grad`` becomes ``i k``: the source factor is ``(i k)^b`` and the output
factor ``(i k)^a``. One code path serves every rank.

Radial kernels
--------------
Every kernel used is ``f(R) = sum_t w_t erfc(beta_t R) / R`` (``beta = 0`` is the bare ``1/R``). Its
derivatives enter through Smith's ``B_n = (-1/R d/dR)^n f``; for one ``erfc(beta R)/R`` term
``B_0 = erfc(beta R)/R``, ``B_n = [(2n-1) B_{n-1} + (2 beta^2)^n exp(-beta^2 R^2) / (beta sqrt(pi))] / R^2``.
Then ``grad^n f = sum_m (-1)^(n-m) B_{n-m} {delta^m R^(n-2m)}`` (sum over the distinct placements of
``m`` Kronecker deltas), e.g. ``grad grad f = B_2 R R^T - B_1 I``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import List

import torch

_SQRT_PI = math.sqrt(math.pi)

#: Unique components of a symmetric rank-l Cartesian tensor, as sorted multi-indices.
MULTI_INDICES = {
    0: ((),),
    1: ((0,), (1,), (2,)),
    2: ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)),
}

#: Powers of the imaginary unit, i^k = (real, imaginary), for the Fourier factor (i k)^idx.
_I_POWER = ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))


def _multiplicity(idx: tuple) -> int:
    """Number of distinct permutations of a multi-index."""
    count = math.factorial(len(idx))
    for axis in range(3):
        count //= math.factorial(idx.count(axis))
    return count


class Layout:
    """Unique Cartesian components of the ranks ``ranks`` (a subset of 0, 1, 2), rank 0 first."""

    def __init__(self, ranks):
        self.ranks = tuple(sorted(set(int(r) for r in ranks)))
        if not set(self.ranks) <= {0, 1, 2}:
            raise ValueError(f"ranks must be among 0, 1, 2, got {ranks}")
        self.indices = tuple(idx for rank in self.ranks for idx in MULTI_INDICES[rank])
        self.rank_of = tuple(len(idx) for idx in self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def offset(self, rank: int) -> int:
        """Position of the first component of ``rank``."""
        return self.rank_of.index(rank)

    def output_signs(self, dtype, device) -> torch.Tensor:
        """``c_l`` per row: +1 for the potential, -1 for field and gradient.  [n]"""
        return torch.tensor([1.0 if r == 0 else -1.0 for r in self.rank_of], dtype=dtype, device=device)

    def monomials(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fourier factors (i k)^idx of every component, split as real and imaginary parts.

        k [..., 3] (1/Å) -> (re [..., n], im [..., n]).
        """
        cols, re_sign, im_sign = [], [], []
        ones = torch.ones_like(k[..., 0])
        for idx in self.indices:
            mono = ones
            for axis in idx:
                mono = mono * k[..., axis]
            cols.append(mono)
            re, im = _I_POWER[len(idx) % 4]
            re_sign.append(re)
            im_sign.append(im)
        mono = torch.stack(cols, dim=-1)  # [..., n]
        re_sign = torch.tensor(re_sign, dtype=k.dtype, device=k.device)
        im_sign = torch.tensor(im_sign, dtype=k.dtype, device=k.device)
        return mono * re_sign, mono * im_sign

    def complex_monomials(self, re: torch.Tensor, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Products over each component's axes of complex per-axis factors ``re + i im``: the derivatives of a
        plane wave exp(i kappa . r) with a complex wave vector, (i kappa)^idx (``monomials`` is the case re = 0).

        re, im [..., 3] -> (re [..., n], im [..., n]).
        """
        out_re, out_im = [], []
        one, zero = torch.ones_like(re[..., 0]), torch.zeros_like(re[..., 0])
        for idx in self.indices:
            a, b = one, zero
            for axis in idx:
                a, b = a * re[..., axis] - b * im[..., axis], a * im[..., axis] + b * re[..., axis]
            out_re.append(a)
            out_im.append(b)
        return torch.stack(out_re, dim=-1), torch.stack(out_im, dim=-1)


def pack_sources(layout: Layout, charges, dipoles, quadrupoles) -> torch.Tensor:
    """Multipoles -> packed source components ``v`` of ``layout``.

    charges [N, C] (e), dipoles [N, C, 3] (e Å), quadrupoles [N, C, 3, 3] (e Å², symmetric traceless)
    -> v [N, n_components, C].
    """
    by_rank = {0: charges, 1: dipoles, 2: quadrupoles}
    cols = []
    for idx in layout.indices:
        k = len(idx)
        weight = (-1.0) ** k / math.factorial(k) * _multiplicity(idx)
        cols.append(weight * by_rank[k][(Ellipsis, *idx)])  # [N, C]
    return torch.stack(cols, dim=1)


def unpack_rank(layout: Layout, out: torch.Tensor, rank: int) -> torch.Tensor:
    """Rows of one rank of ``out`` [N, n_components, C] -> [N, C] (rank 0), [N, C, 3], [N, C, 3, 3]."""
    start = layout.offset(rank)
    block = out[:, start : start + len(MULTI_INDICES[rank])]  # [N, m, C]
    if rank == 0:
        return block[:, 0]
    if rank == 1:
        return block.transpose(1, 2)
    full = [MULTI_INDICES[2].index(tuple(sorted((a, b)))) for a in range(3) for b in range(3)]
    return block[:, full].reshape(block.shape[0], 3, 3, -1).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- interaction tensors


def _partial_matchings(items: tuple):
    """Ways to pair up equal entries of ``items``: yields (number of pairs, unpaired entries)."""
    if not items:
        yield 0, ()
        return
    first, rest = items[0], items[1:]
    for m, left in _partial_matchings(rest):
        yield m, (first,) + left
    for k, other in enumerate(rest):
        if other == first:
            for m, left in _partial_matchings(rest[:k] + rest[k + 1 :]):
                yield m + 1, left


@lru_cache(maxsize=None)
def tensor_terms(idx: tuple) -> tuple:
    """``grad^n f`` at the sorted multi-index ``idx`` as ``((order of B, (px, py, pz), coefficient), ...)``.

    The component is ``sum coefficient * B_order * Rx^px Ry^py Rz^pz``.
    """
    n = len(idx)
    terms: dict = {}
    for m, left in _partial_matchings(tuple(idx)):
        key = (n - m, tuple(left.count(axis) for axis in range(3)))
        terms[key] = terms.get(key, 0) + (-1) ** (n - m)
    return tuple((order, powers, coef) for (order, powers), coef in sorted(terms.items()) if coef != 0)


class InteractionTensors:
    """How the tensors ``T^(l_a + k_b) = grad^(l_a + k_b) f`` couple sources ``cols`` to outputs ``rows``.

    Every entry is a sum of *features* ``B_n(R) R^p`` (p a monomial of degree ``2n - l_a - k_b``):
    ``T[a, b] = sum_f coef[f, a, b] B_{n_f} R^{p_f}``. The features are evaluated once per pair; each
    is contracted with its own combination of the sources (:meth:`grouped_sources`), so no per-pair
    tensor of all entries is ever formed.
    """

    def __init__(self, rows: Layout, cols: Layout):
        self.rows, self.cols = rows, cols
        entries = {}  # (a, b) -> terms of grad^n f at the multi-index a u b
        for a, ia in enumerate(rows.indices):
            for b, ib in enumerate(cols.indices):
                entries[a, b] = tensor_terms(tuple(sorted(ia + ib)))
        self.features = tuple(
            sorted({(order, powers) for terms in entries.values() for order, powers, _ in terms})
        )
        position = {f: i for i, f in enumerate(self.features)}
        coef = [[[0.0] * len(cols) for _ in range(len(rows))] for _ in self.features]
        for (a, b), terms in entries.items():
            for order, powers, c in terms:
                coef[position[order, powers]][a][b] += c
        self.coef = coef  # [feature][row][col]
        self.max_order = max(order for order, _ in self.features)
        #: rows fed by each feature
        self.rows_of = tuple(
            [a for a in range(len(rows)) if any(coef[f][a])] for f in range(len(self.features))
        )
        #: monomials R^p needed, in order of degree: (p, lower p, axis) with R^p = R^lower * R[axis]
        needed, recipe = {(0, 0, 0)}, []
        for powers in sorted({p for _, p in self.features}, key=sum):
            chain = []
            while powers not in needed:
                axis = next(a for a in range(3) if powers[a] > 0)
                lower = tuple(p - (a == axis) for a, p in enumerate(powers))
                chain.append((powers, lower, axis))
                needed.add(powers)
                powers = lower
            recipe.extend(reversed(chain))
        self.monomial_recipe = tuple(recipe)
        #: parity of each feature under R -> -R: (-1)^degree
        self.parity = tuple((-1) ** sum(powers) for _, powers in self.features)

    def features_of(self, B: list, R) -> list:
        """Every feature ``B_n R^p`` for every pair.

        B: list of ``max_order + 1`` tensors ``B_n`` [...]; R: the three Cartesian components of the pair
        vectors, each [...] (Å) -> list of tensors [...], one per feature.
        """
        monomials: dict = {(0, 0, 0): None}
        for powers, lower, axis in self.monomial_recipe:  # each from a lower one times one component
            below = monomials[lower]
            monomials[powers] = R[axis] if below is None else below * R[axis]
        return [
            B[order] if sum(powers) == 0 else B[order] * monomials[powers] for order, powers in self.features
        ]

    def grouped_sources(self, v: torch.Tensor) -> list:
        """The source combination each feature multiplies.

        v [N, n_cols, C] -> list over features f of [N, len(rows_of[f]) * C],
        ``W_f[j, a, c] = sum_b coef[f, a, b] v[j, b, c]`` for the rows ``a`` in ``rows_of[f]``.
        """
        out = []
        for f, rows in enumerate(self.rows_of):
            c = torch.tensor([self.coef[f][a] for a in rows], dtype=v.dtype, device=v.device)  # [rows, b]
            out.append(torch.einsum("ab,jbc->jac", c, v).reshape(v.shape[0], -1))
        return out

    def matrix_at_origin(self, B: list) -> torch.Tensor:
        """The [n_rows, n_cols] coupling matrix ``T[a, b]`` at ``R = 0`` for scalar ``B_n`` (0-d tensors)."""
        coef = torch.tensor(self.coef, dtype=B[0].dtype, device=B[0].device)  # [f, a, b]
        value = torch.stack(
            [B[order] if sum(powers) == 0 else torch.zeros_like(B[0]) for order, powers in self.features]
        )
        return torch.einsum("f,fab->ab", value, coef)


# ----------------------------------------------------------------------------- radial kernels

_SERIES_X = 2.0  # below beta^2 R^2 < 2 a smooth kernel is evaluated by its Taylor series
_SERIES_TERMS = 28  # 2^27 / 27! < 1e-19
_SERIES_TERMS_FLOAT32 = 16  # 2^15 / (15! 31) < 1e-9: the top order's series to float32 rounding


def erf_kernel_derivatives(beta: float, r2: torch.Tensor, max_order: int) -> list:
    """``B_n`` of ``erf(beta R)/R`` from its Taylor series (accurate for ``beta^2 R^2 < 2``).

    ``B_n = 2 beta / sqrt(pi) (2 beta^2)^n sum_j (-beta^2 R^2)^j / (j! (2n + 2j + 1))``; finite at R = 0.
    The series is summed for the highest order only (:func:`erf_series_downward`: :data:`_SERIES_TERMS` terms,
    fewer in float32) and the lower orders follow from a recursion. r2 [...] (Å²) -> list of ``max_order + 1``
    tensors [...].
    """
    low = r2.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return erf_series_downward(beta, r2, int(max_order), _SERIES_TERMS_FLOAT32 if low else _SERIES_TERMS)


def erf_series_downward(beta: float, r2: torch.Tensor, max_order: int, terms: int) -> List[torch.Tensor]:
    """``B_0 .. B_max_order`` of ``erf(beta R)/R`` for ``beta^2 R^2 < 2``: the top order's Taylor series, ``terms``
    terms by Horner's scheme, then the downward recursion ``B_(n-1) = (R^2 B_n + (2 beta^2)^n exp(-beta^2 R^2) /
    (beta sqrt(pi))) / (2n - 1)`` (that of :func:`_erfc_derivatives` read backwards, for 1/R - erfc), whose two terms
    are positive, so no digits cancel. A few dozen ops instead of ``terms`` x 4 per order: autograd records them
    (the compiled training step evaluates them at every pair and differentiates them twice; the TorchScript
    export, :mod:`cartlorem.export`, once for the forces). TorchScript-compatible."""
    sqrt_pi = math.sqrt(math.pi)
    x = beta * beta * r2
    minus_x = -x
    coef: List[float] = []
    factorial = 1.0  # j!, a float: TorchScript's integers are 64-bit, and 21! is not
    for j in range(terms):
        if j > 0:
            factorial = factorial * j
        coef.append(1.0 / (factorial * (2 * max_order + 2 * j + 1)))
    total = torch.full_like(x, coef[terms - 1])
    for j in range(terms - 2, -1, -1):
        total = total * minus_x + coef[j]
    out: List[torch.Tensor] = [total * (2.0 * beta / sqrt_pi * (2.0 * beta * beta) ** max_order)]
    if max_order > 0:
        gauss = torch.exp(minus_x) * (1.0 / (beta * sqrt_pi))
        for n in range(max_order, 0, -1):
            out.insert(0, (r2 * out[0] + (2.0 * beta * beta) ** n * gauss) * (1.0 / (2 * n - 1)))
    return out


def erf_kernel_at_origin(beta: float, max_order: int) -> list:
    """``B_n(0)`` of ``erf(beta R)/R``: ``2^(n+1) beta^(2n+1) / ((2n+1) sqrt(pi))`` (floats)."""
    return [2.0 ** (n + 1) * beta ** (2 * n + 1) / ((2 * n + 1) * _SQRT_PI) for n in range(max_order + 1)]


def _erfc_derivatives(beta: float, r2: torch.Tensor, max_order: int) -> list:
    """``B_n`` of ``erfc(beta R)/R`` (``beta = 0``: ``1/R``) by Smith's upward recursion; r2 > 0."""
    r = torch.sqrt(r2)
    inv_r2 = 1.0 / r2 if max_order > 0 else None
    if beta == 0.0:
        B = [1.0 / r]
        for n in range(1, max_order + 1):
            B.append((2 * n - 1) * B[-1] * inv_r2)
        return B
    B = [torch.special.erfc(beta * r) / r]
    gauss = torch.exp(-beta * beta * r2) / (beta * _SQRT_PI)
    for n in range(1, max_order + 1):
        B.append(((2 * n - 1) * B[-1] + (2.0 * beta * beta) ** n * gauss) * inv_r2)
    return B


class RadialKernel:
    """``f(R) = sum_t w_t erfc(beta_t R) / R`` (``beta_t = 0``: bare ``1/R``); lengths in Å.

    A kernel whose weights sum to zero has no ``1/R`` singularity; it is evaluated by a Taylor series
    at short range, so it stays smooth and bounded for pairs at (or near) ``R = 0``.
    """

    def __init__(self, terms):
        merged: dict = {}
        for weight, beta in terms:
            merged[float(beta)] = merged.get(float(beta), 0.0) + float(weight)
        self.terms = tuple((w, b) for b, w in sorted(merged.items()) if w != 0.0)

    @classmethod
    def coulomb(cls) -> "RadialKernel":
        """``1/R``: point multipoles in open boundaries."""
        return cls([(1.0, 0.0)])

    @classmethod
    def smeared(cls, smearing: float) -> "RadialKernel":
        """``erf(R / (sqrt 2 sigma)) / R = 1/R - erfc(R / (sqrt 2 sigma)) / R``: Gaussian sources."""
        return cls([(1.0, 0.0), (-1.0, smearing_beta(smearing))])

    @classmethod
    def ewald_real(cls, alpha: float, smearing: float | None = None) -> "RadialKernel":
        """Short-range part ``f - erf(alpha R)/R`` of the point (or smeared) kernel."""
        terms = [(1.0, alpha)]
        if smearing is not None:
            terms.append((-1.0, smearing_beta(smearing)))
        return cls(terms)

    @property
    def is_zero(self) -> bool:
        return not self.terms

    @property
    def singular(self) -> bool:
        """True if the kernel diverges like 1/R at R = 0."""
        total = sum(w for w, _ in self.terms)
        return abs(total) > 1e-12 * max([abs(w) for w, _ in self.terms] or [1.0])  # a list: torch.compile traces it

    def derivatives(self, r2: torch.Tensor, valid: torch.Tensor, max_order: int) -> list:
        """``B_0 .. B_max_order`` at r2 [...] (Å²); zero where ``valid`` [...] is False.

        When r2 needs a gradient, the ``B_n`` come from :class:`KernelDerivatives`, whose backward is the
        closed form ``dB_n / d(R^2) = -B_(n+1) / 2`` (differentiable again to any order, so force training's
        double backward records a handful of nodes instead of every step of the Taylor series and the
        Smith recursion). Under TorchScript, or without gradients, the direct evaluation
        (:meth:`derivatives_autograd`) runs.
        """
        if not torch.jit.is_scripting() and r2.requires_grad and torch.is_grad_enabled():
            return list(KernelDerivatives.apply(r2, valid, self, 0, max_order))
        return self.derivatives_autograd(r2, valid, max_order)

    def derivatives_autograd(self, r2: torch.Tensor, valid: torch.Tensor, max_order: int, dense: bool = False) -> list:
        """:meth:`derivatives` evaluated op by op (autograd records every step); the reference path.

        ``dense``: the short-distance series of a smooth kernel evaluated at every pair (at r2 = 0 where it
        is not used) and selected, instead of gathered for the pairs that need it: no step depends on
        values, so that torch.compile traces it (the compiled training step)."""
        zero = torch.zeros((), dtype=r2.dtype, device=r2.device)
        if self.singular:
            far = valid
        else:
            beta_max = max(b for _, b in self.terms)
            near = valid & (beta_max * beta_max * r2 < _SERIES_X)
            far = valid & ~near
        safe = torch.where(far, r2, torch.ones_like(r2))
        B = None
        for weight, beta in self.terms:
            terms = _erfc_derivatives(beta, safe, max_order)
            if B is None:
                B = terms if weight == 1.0 else [weight * b for b in terms]
            else:
                B = [torch.add(b, t, alpha=weight) for b, t in zip(B, terms)]
        B = [torch.where(far, b, zero) for b in B]
        if dense and not self.singular:
            r2_near = torch.where(near, r2, torch.zeros_like(r2))  # finite series (and gradients) elsewhere
            for weight, beta in self.terms:
                if beta > 0.0:
                    for n, b in enumerate(erf_kernel_derivatives(beta, r2_near, max_order)):
                        B[n] = torch.where(near, B[n] - weight * b, B[n])
        elif not self.singular and bool(near.any()):
            # f = -sum_t w_t erf(beta_t R) / R because the weights sum to zero
            flat = r2.reshape(-1)
            where = near.reshape(-1).nonzero().flatten()  # one nonzero, not one per order
            r2_near = flat.index_select(0, where)
            series = [torch.zeros_like(r2_near) for _ in range(max_order + 1)]
            erf_series = erf_kernel_derivatives if torch.is_grad_enabled() else _erf_series_no_grad
            for weight, beta in self.terms:
                if beta > 0.0:
                    for n, b in enumerate(erf_series(beta, r2_near, max_order)):
                        series[n] = series[n] - weight * b
            B = [b.reshape(-1).index_put((where,), s).reshape(r2.shape) for b, s in zip(B, series)]
        return B


def _erf_series_no_grad(beta: float, r2: torch.Tensor, max_order: int) -> list:
    """The ``B_n`` of :func:`erf_kernel_derivatives`, every order from its own series (:data:`_SERIES_TERMS`
    terms), as one product table and one matmul.

    The terms ``(-x)^j / j!`` are a cumulative product; the sums over j for every order are a matmul with
    the table ``1 / (2n + 2j + 1)``: a few large ops, the form used when no autograd graph is recorded
    (inside :class:`KernelDerivatives`).
    """
    x = (beta * beta) * r2.reshape(-1, 1)  # [M, 1]
    steps = torch.arange(1, _SERIES_TERMS, dtype=r2.dtype, device=r2.device)  # j = 1 .. J-1
    terms = torch.cat([torch.ones_like(x), torch.cumprod(-x / steps, dim=1)], dim=1)  # [M, J]
    j = torch.arange(_SERIES_TERMS, dtype=torch.float64, device=r2.device)[:, None]
    n = torch.arange(max_order + 1, dtype=torch.float64, device=r2.device)[None, :]
    scale = 2.0 * beta / _SQRT_PI * (2.0 * beta * beta) ** n  # [1, n]
    table = (scale / (2 * n + 2 * j + 1)).to(r2.dtype)  # [J, n]
    out = terms @ table  # [M, n]
    return [out[:, k].reshape(r2.shape) for k in range(max_order + 1)]


class KernelDerivatives(torch.autograd.Function):
    """``(B_lo, ..., B_hi)`` of a :class:`RadialKernel` at r2 with the closed-form derivative.

    Every radial kernel obeys ``dB_n/dR = -R B_(n+1)``, i.e. ``dB_n / d(R^2) = -B_(n+1) / 2``; the backward
    applies this with B_(n+1) from this same Function one order up, so it is itself differentiable (the
    double backward of force training, and any higher order). The forward evaluates the ``B_n`` without
    recording a graph, :data:`AHEAD` orders beyond ``hi``, and hands those to the backward's call, so that
    the forward, backward and double backward of a training step evaluate the kernel once. Masked pairs
    (``valid`` False) are 0 with zero derivative, as in :meth:`RadialKernel.derivatives_autograd`. Not
    scriptable: TorchScript uses the op-by-op path.

    apply(r2 [...] (Å²), valid [...] bool, kernel, lo, hi, ahead=None) -> tuple of ``hi - lo + 1`` tensors
    [...]; ``ahead`` (internal): already evaluated ``B_lo .. B_(hi + k)``, a tuple of tensors.
    """

    AHEAD = 2

    @staticmethod
    def forward(ctx, r2, valid, kernel, lo: int, hi: int, ahead=None):
        n_out = hi - lo + 1
        if ahead is not None and len(ahead) >= n_out:
            B = [b.detach() for b in ahead]  # new tensor objects: the cached ones keep their own graph
        else:
            B = kernel.derivatives_autograd(r2, valid, hi + KernelDerivatives.AHEAD)[lo:]
        ctx.save_for_backward(r2, valid, *B)
        ctx.kernel, ctx.lo, ctx.hi = kernel, lo, hi
        return tuple(B[:n_out])

    @staticmethod
    def backward(ctx, *grads):
        r2, valid, *B = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        ahead = tuple(B[1:]) if len(B) - 1 >= ctx.hi - ctx.lo + 1 else None  # B_(lo+1) .. already known
        up = KernelDerivatives.apply(r2, valid, ctx.kernel, ctx.lo + 1, ctx.hi + 1, ahead)
        grad = None
        for g, b in zip(grads, up):
            if g is None:
                continue
            grad = g * b if grad is None else torch.addcmul(grad, g, b)
        return (None if grad is None else -0.5 * grad), None, None, None, None, None


def cell_volume(cell: torch.Tensor) -> torch.Tensor:
    """|a · (b × c)| of the cell rows [..., 3, 3] → [...] Å³, differentiable. The triple product, not
    ``torch.linalg.det``: in torch 2.13 the backward of det of a float32 cell builds its LU in the default dtype and
    fails when that is float64 (as after MACE's calculator set it), so every periodic float32 long-range call with
    forces or stress failed in such a session."""
    return (cell[..., 0, :] * torch.linalg.cross(cell[..., 1, :], cell[..., 2, :], dim=-1)).sum(-1).abs()


def smearing_beta(smearing: float) -> float:
    """``1 / (sqrt 2 sigma)`` (1/Å): a Gaussian source of width sigma has the kernel erf(beta R)/R."""
    return 1.0 / (math.sqrt(2.0) * smearing)


# ----------------------------------------------------------------------------- Ewald pieces


def reciprocal_kernel(k2: torch.Tensor, alpha: float) -> torch.Tensor:
    """Fourier transform of ``erf(alpha R)/R``: ``4 pi exp(-k^2 / 4 alpha^2) / k^2``; k2 [K] (1/Å²)."""
    return 4.0 * math.pi * torch.exp(-k2 / (4.0 * alpha * alpha)) / k2


def self_matrix(tensors: InteractionTensors, alpha: float, dtype, device) -> torch.Tensor:
    """What a source's own ``erf(alpha R)/R`` cloud adds at its own site: [n_rows, n_cols].

    The reciprocal sum includes every source's interaction with itself through the long-range kernel;
    this matrix (``grad^n`` of ``erf(alpha R)/R`` at R = 0) is subtracted. After the output signs it
    amounts to the familiar ``phi = 2 alpha q / sqrt(pi)``, ``E = -4 alpha^3 mu / (3 sqrt(pi))`` and
    ``G = 4 alpha^3 q I / (3 sqrt(pi)) - 8 alpha^5 Theta / (5 sqrt(pi))``.
    """
    B = [torch.tensor(b, dtype=dtype, device=device) for b in erf_kernel_at_origin(alpha, tensors.max_order)]
    return tensors.matrix_at_origin(B)


def background_potential(
    total_charge: torch.Tensor, volume: torch.Tensor, alpha: float, smearing: float | None
) -> torch.Tensor:
    """Potential of the uniform neutralising background, ``-pi Q / V (1/alpha^2 - 2 sigma^2)``.

    The background ``-Q/V`` interacts through the same kernel as the sources: its long-range part
    cancels the (omitted) k = 0 term of the sources, its short-range part gives
    ``-(Q/V) int f_SR d^3r = -(Q/V) pi (1/alpha^2 - 2 sigma^2)``. The result has zero cell average and
    does not depend on alpha. total_charge [C] (e), volume (Å³) -> [C] (e/Å).
    """
    shift = 1.0 / (alpha * alpha)
    if smearing is not None:
        shift -= 2.0 * smearing * smearing
    return -math.pi * shift * total_charge / volume
