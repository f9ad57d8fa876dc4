"""The fused Cartesian message kernel against e3nn's channel-wise ("uvu") tensor product.

Same irreps on both sides: node features C×(0e+1o+2e) per edge, edge harmonics 0e+1o+2e, one
weight per (edge, path, channel) for the 11 parity-allowed paths (exactly the even paths of the
Cartesian table), output C×(0e+1o+2e).

* cartlorem: ``compact_edge_product([h0, h1, h2c], n, w)``, the kernel the interaction blocks run:
  h0 [E, C], h1 [E, C, 3], h2c [E, C, 6] (the symmetric traceless rank-2 features in the compact
  layout, ``sym_to_compact``, prepared outside the timing like e3nn's spherical inputs), n [E, 3],
  w [E, 11, C]; rank-2 output compact too. ``dense layout`` = ``weighted_edge_product`` (h2 and its
  output as [E, C, 3, 3]), the same closed form, is reported as a variant.
* e3nn: ``o3.TensorProduct(C×(0e+1o+2e), 0e+1o+2e, C×(0e+1o+2e), 11 × 'uvu',
  shared_weights=False, internal_weights=False)`` on x1 [E, 9C] = the same features after
  ``to_spherical``, x2 [E, 9] = the same harmonics after ``to_spherical`` (precomputed, not timed),
  weights [E, 11C] = the same weights.

"forward" runs under ``torch.no_grad()``; "fwd+bwd" is the forward plus ``torch.autograd.grad`` of
the sum of all outputs with respect to the features and the weights (not the edge vectors).
Warm-up, then the median of ≥ 5 repeats (``time.perf_counter``, CUDA synchronised).

Before timing, the script checks (float64, small E) the fused kernel against a path-by-path sum of
``product(h_l1, T_l2(n), l3)``, that each of its paths equals the e3nn path up to one constant
after ``to_spherical``, and every candidate (values and gradients) against the fused kernel.

Candidates (proposals for ``cartlorem/tensors/fused.py``, reported separately, not adopted):
``hand-backward`` (the same closed form in a ``torch.autograd.Function`` with an analytic backward,
contractions as batched GEMV; every size), and at the target size only (C = 128, E = 10⁴,
float32): ``hand-backward+compile`` (its forward and backward each through ``torch.compile``),
``torch.compile`` of ``weighted_edge_product`` (default mode; compile time reported separately)
and ``dense-einsum`` (a precomputed 11×13×13×13 coupling tensor contracted with opt_einsum).

Contenders are timed interleaved (repeat r runs each once, in rotated order), so a shared
machine's drifting load hits all of them alike; the load average is stamped into the results.

    python benchmarks/tensor_products.py                 # full run, ~10 min on 2 CPU cores
    python benchmarks/tensor_products.py --quick         # smoke test, seconds; writes nothing
    python benchmarks/tensor_products.py --device cuda   # falls back to CPU without CUDA

Large configurations (E = 10⁵) run in priority order while the time budget (``--budget``) and the
free memory allow; each one skipped is listed with the reason. Writes
benchmarks/results/tensor_products.json and .md (machine, versions and git commit stamped).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
from benchmarks.harness import (  # noqa: E402
    machine_info, markdown_table, mem_available_bytes, peak_memory_bytes, reset_peak_memory,
    resolve_device, sync_fn, time_fns, write_results,
)

from cartlorem.tensors import (compact_edge_product, compact_to_sym, edge_paths, harmonics, product, stf,  # noqa: E402
                               sym_to_compact, to_spherical, weighted_edge_product)

PATHS = edge_paths()  # the 11 even paths (l_node, l_edge, l_out), in weight order
TARGET = {"C": 128, "dtype": "float32", "mode": "fwd+bwd", "speedup": 2.0}
MODES = ("forward", "fwd+bwd")


# --- inputs -----------------------------------------------------------------------------------------

def make_inputs(E: int, C: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """The same random features, directions and weights in both layouts.

    Returns h0 [E, C], h1 [E, C, 3], h2 [E, C, 3, 3] (symmetric traceless), n [E, 3] (unit),
    w [E, 11, C], and their e3nn forms x1 [E, 9C], x2 [E, 9], ww [E, 11C].
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    n = torch.nn.functional.normalize(randn(E, 3), dim=-1)
    h0, h1, h2 = randn(E, C), randn(E, C, 3), stf(randn(E, C, 3, 3))
    w = randn(E, len(PATHS), C)
    x1 = torch.cat([h0, h1.reshape(E, 3 * C), to_spherical(h2, 2).reshape(E, 5 * C)], dim=-1)
    x2 = torch.cat([to_spherical(t, l) for l, t in enumerate(harmonics(n))], dim=-1)
    return {"h0": h0, "h1": h1, "h2": h2, "n": n, "w": w,
            "x1": x1.contiguous(), "x2": x2.contiguous(), "ww": w.reshape(E, len(PATHS) * C)}


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def e3nn_tensor_product(C: int, dtype: torch.dtype, device: torch.device):
    """e3nn's channel-wise product with the 11 parity-allowed paths, in the order of PATHS."""
    from e3nn import o3

    irreps_node = o3.Irreps(f"{C}x0e + {C}x1o + {C}x2e")
    irreps_edge = o3.Irreps("0e + 1o + 2e")
    allowed = {(i, j, k) for i, (_, a) in enumerate(irreps_node) for j, (_, b) in enumerate(irreps_edge)
               for k, (_, c) in enumerate(irreps_node) if c in a * b}
    if allowed != set(PATHS):  # index = rank for both irreps lists
        raise RuntimeError(f"e3nn's parity-allowed paths {sorted(allowed)} differ from {PATHS}")
    instructions = [(l1, l2, l3, "uvu", True) for l1, l2, l3 in PATHS]
    tp = o3.TensorProduct(irreps_node, irreps_edge, irreps_node, instructions,
                          shared_weights=False, internal_weights=False)
    if tp.weight_numel != len(PATHS) * C:
        raise RuntimeError(f"e3nn weight_numel {tp.weight_numel} != {len(PATHS) * C}")
    return tp.to(device=device, dtype=dtype)


# --- candidates (proposals for cartlorem/tensors/fused.py) -------------------------------------------
#
# Both "hand-backward" variants evaluate the closed form of fused.py (all 11 even paths) inside a
# torch.autograd.Function with an analytic backward. With s1 = h1·n, v2 = h2 n, s2 = v2·n:
#     out0 = w000 h0 + w110 s1 + w220 s2
#     out1 = α n + β h1 + w211 v2,      α = w011 h0 + 3/2 w121 s1,  β = w101 − 1/2 w121
#     out2 = q nᵀ + n qᵀ − δ I + γ h2,  q = 3/4 (w022 h0 n + w112 h1) + 3/2 w222 v2,
#                                       δ = 1/2 (w022 h0 + w112 s1) + w222 s2,  γ = w202 − w222
# The backward (G0, G1, G2 = output gradients; m = (G2 + G2ᵀ) n, t = tr G2) is the exact adjoint of
# these lines, so it equals autograd of fused.py to round-off. It saves only the inputs and skips
# autograd's tape of ~40 broadcast kernels. "eager" writes the contractions as batched GEMV and
# accumulates in place; "compiled" hands the same formulas, written elementwise, to torch.compile.


def _dot3(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x [E, C, 3] · n [E, 3] → [E, C] as one batched GEMV."""
    return torch.bmm(x, n[:, :, None]).squeeze(-1)


def _matvec(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x [E, C, 3, 3] @ n [E, 3] → [E, C, 3] (x_ij n_j) as one batched GEMV."""
    E, C = x.shape[:2]
    return torch.bmm(x.reshape(E, 3 * C, 3), n[:, :, None]).view(E, C, 3)


def _trace(x: torch.Tensor) -> torch.Tensor:
    """tr x over the last two axes, [..., 3, 3] → [...], as one GEMV."""
    return x.reshape(*x.shape[:-2], 9) @ torch.eye(3, dtype=x.dtype, device=x.device).reshape(9)


def _eager_forward(h0, h1, h2, n, w):
    w000, w011, w022, w101, w110, w112, w121, w202, w211, w220, w222 = w.unbind(1)
    s1, v2 = _dot3(h1, n), _matvec(h2, n)
    s2 = _dot3(v2, n)
    nn = n[:, None, :]  # [E, 1, 3]
    o0 = w000 * h0
    o0.addcmul_(w110, s1).addcmul_(w220, s2)
    alpha = w011 * h0
    alpha.addcmul_(w121, s1, value=1.5)
    o1 = (w101 - 0.5 * w121)[..., None] * h1
    o1.addcmul_(alpha[..., None], nn).addcmul_(w211[..., None], v2)
    a = w022 * h0
    q = (0.75 * a)[..., None] * nn
    q.addcmul_(w112[..., None], h1, value=0.75).addcmul_(w222[..., None], v2, value=1.5)
    delta = 0.5 * a
    delta.addcmul_(w112, s1, value=0.5).addcmul_(w222, s2)
    o2 = (w202 - w222)[..., None, None] * h2
    o2.addcmul_(q[..., :, None], nn[..., None, :])  # q_i n_j
    o2.addcmul_(nn[..., :, None], q[..., None, :])  # n_i q_j
    o2.diagonal(dim1=-2, dim2=-1).sub_(delta[..., None])
    return o0, o1, o2


def _eager_backward(h0, h1, h2, n, w, G0, G1, G2):
    """Gradients for h0, h1, h2 and w; differentiable torch ops only (double backward works)."""
    w000, w011, w022, w101, w110, w112, w121, w202, w211, w220, w222 = w.unbind(1)
    s1, v2 = _dot3(h1, n), _matvec(h2, n)
    s2 = _dot3(v2, n)
    nn = n[:, None, :]
    m = _matvec(G2, n) + _matvec(G2.transpose(-1, -2), n)  # (G2 + G2ᵀ) n   [E, C, 3]
    t = _trace(G2)  # [E, C]
    g_alpha = _dot3(G1, n)
    g_a = 0.75 * _dot3(m, n) - 0.5 * t
    g_s2 = w220 * G0 - w222 * t
    g_s1 = w110 * G0 + 1.5 * w121 * g_alpha - 0.5 * w112 * t
    g_v2 = w211[..., None] * G1 + (1.5 * w222)[..., None] * m + g_s2[..., None] * nn
    g_h0 = w000 * G0 + w011 * g_alpha + w022 * g_a
    g_h1 = (w101 - 0.5 * w121)[..., None] * G1 + (0.75 * w112)[..., None] * m + g_s1[..., None] * nn
    g_h2 = torch.addcmul((w202 - w222)[..., None, None] * G2, g_v2[..., :, None], nn[..., None, :])
    g_beta = torch.linalg.vecdot(G1, h1)
    g_gamma = torch.linalg.vecdot(G2.flatten(-2), h2.flatten(-2))  # G2 : h2
    g_w = torch.stack([
        h0 * G0, h0 * g_alpha, h0 * g_a, g_beta, s1 * G0,
        0.75 * torch.linalg.vecdot(h1, m) - 0.5 * s1 * t,
        1.5 * s1 * g_alpha - 0.5 * g_beta,
        g_gamma, torch.linalg.vecdot(G1, v2), s2 * G0,
        1.5 * torch.linalg.vecdot(v2, m) - s2 * t - g_gamma,
    ], dim=1)
    return g_h0, g_h1, g_h2, g_w


def _plain_forward(h0, h1, h2, n, w):
    """The closed form as broadcast elementwise expressions (what torch.compile fuses best)."""
    w000, w011, w022, w101, w110, w112, w121, w202, w211, w220, w222 = w.unbind(1)
    nn = n[:, None, :]
    s1 = (h1 * nn).sum(-1)
    v2 = (h2 * nn[..., None, :]).sum(-1)
    s2 = (v2 * nn).sum(-1)
    o0 = w000 * h0 + w110 * s1 + w220 * s2
    alpha = w011 * h0 + 1.5 * w121 * s1
    o1 = (w101 - 0.5 * w121)[..., None] * h1 + alpha[..., None] * nn + w211[..., None] * v2
    a = w022 * h0
    q = (0.75 * a)[..., None] * nn + (0.75 * w112)[..., None] * h1 + (1.5 * w222)[..., None] * v2
    delta = 0.5 * a + 0.5 * w112 * s1 + w222 * s2
    eye = torch.eye(3, dtype=h0.dtype, device=h0.device)
    o2 = ((w202 - w222)[..., None, None] * h2 + q[..., :, None] * nn[..., None, :]
          + nn[..., :, None] * q[..., None, :] - delta[..., None, None] * eye)
    return o0, o1, o2


def _plain_backward(h0, h1, h2, n, w, G0, G1, G2):
    w000, w011, w022, w101, w110, w112, w121, w202, w211, w220, w222 = w.unbind(1)
    nn = n[:, None, :]
    s1 = (h1 * nn).sum(-1)
    v2 = (h2 * nn[..., None, :]).sum(-1)
    s2 = (v2 * nn).sum(-1)
    m = (G2 * nn[..., None, :]).sum(-1) + (G2 * nn[..., :, None]).sum(-2)
    t = G2[..., 0, 0] + G2[..., 1, 1] + G2[..., 2, 2]
    g_alpha = (G1 * nn).sum(-1)
    g_a = 0.75 * (m * nn).sum(-1) - 0.5 * t
    g_s2 = w220 * G0 - w222 * t
    g_s1 = w110 * G0 + 1.5 * w121 * g_alpha - 0.5 * w112 * t
    g_v2 = w211[..., None] * G1 + (1.5 * w222)[..., None] * m + g_s2[..., None] * nn
    g_h0 = w000 * G0 + w011 * g_alpha + w022 * g_a
    g_h1 = (w101 - 0.5 * w121)[..., None] * G1 + (0.75 * w112)[..., None] * m + g_s1[..., None] * nn
    g_h2 = (w202 - w222)[..., None, None] * G2 + g_v2[..., :, None] * nn[..., None, :]
    g_beta = (G1 * h1).sum(-1)
    g_gamma = (G2 * h2).sum((-1, -2))
    g_w = torch.stack([
        h0 * G0, h0 * g_alpha, h0 * g_a, g_beta, s1 * G0,
        0.75 * (h1 * m).sum(-1) - 0.5 * s1 * t, 1.5 * s1 * g_alpha - 0.5 * g_beta,
        g_gamma, (G1 * v2).sum(-1), s2 * G0, 1.5 * (v2 * m).sum(-1) - s2 * t - g_gamma,
    ], dim=1)
    return g_h0, g_h1, g_h2, g_w


def _grad_n(h0, h1, h2, n, w, G0, G1, G2):
    """d/dn [E, 3] of Σ G·out (fused.py's convention: |n| = 1 used inside the closed form)."""
    w000, w011, w022, w101, w110, w112, w121, w202, w211, w220, w222 = w.unbind(1)
    nn = n[:, None, :]
    s1 = (h1 * nn).sum(-1)
    v2 = (h2 * nn[..., None, :]).sum(-1)
    Gs = G2 + G2.transpose(-1, -2)
    m = (Gs * nn[..., None, :]).sum(-1)
    t = G2.diagonal(dim1=-2, dim2=-1).sum(-1)
    g_s2 = w220 * G0 - w222 * t
    g_s1 = w110 * G0 + 1.5 * w121 * (G1 * nn).sum(-1) - 0.5 * w112 * t
    g_v2 = w211[..., None] * G1 + (1.5 * w222)[..., None] * m + g_s2[..., None] * nn
    alpha = w011 * h0 + 1.5 * w121 * s1
    a = w022 * h0
    q = (0.75 * a)[..., None] * nn + (0.75 * w112)[..., None] * h1 + (1.5 * w222)[..., None] * v2
    gn = (Gs * q[..., None, :]).sum(-1) + alpha[..., None] * G1 + g_s2[..., None] * v2 + g_s1[..., None] * h1
    gn = gn + (h2 * g_v2[..., :, None]).sum(-2) + (0.75 * a)[..., None] * m
    return gn.sum(1)


def _hand_backward_function(name: str, forward_fn, backward_fn):
    """An autograd.Function running ``forward_fn`` / ``backward_fn`` (gradient for n in eager)."""

    class HandBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h0, h1, h2, n, w):
            ctx.save_for_backward(h0, h1, h2, n, w)
            return forward_fn(h0, h1, h2, n, w)

        @staticmethod
        def backward(ctx, G0, G1, G2):
            h0, h1, h2, n, w = ctx.saved_tensors
            # gradients of a sum arrive expanded (stride 0), which sends bmm to a per-matrix loop
            G0, G1, G2 = G0.contiguous(), G1.contiguous(), G2.contiguous()
            g_h0, g_h1, g_h2, g_w = backward_fn(h0, h1, h2, n, w, G0, G1, G2)
            g_n = _grad_n(h0, h1, h2, n, w, G0, G1, G2) if ctx.needs_input_grad[3] else None
            return g_h0, g_h1, g_h2, g_n, g_w

    HandBackward.__name__ = HandBackward.__qualname__ = name
    return HandBackward


_EAGER = _hand_backward_function("FusedEager", _eager_forward, _eager_backward)
_COMPILED = None


def hand_backward_product(h, n, w):
    """Candidate "hand-backward": analytic backward, batched-GEMV contractions (all ranks in)."""
    return list(_EAGER.apply(h[0], h[1], h[2], n, w))


def hand_backward_compiled_product(h, n, w):
    """Candidate "hand-backward+compile": the same, forward and backward each fused by torch.compile."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _hand_backward_function("FusedCompiled", torch.compile(_plain_forward),
                                            torch.compile(_plain_backward))
    return list(_COMPILED.apply(h[0], h[1], h[2], n, w))


def coupling_tensor(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """K [11, 13, 13, 13]: path p maps (h, T) in the flat basis (1 + 3 + 9 components) to the output."""
    off, dim = (0, 1, 4), (1, 3, 9)
    K = torch.zeros(len(PATHS), 13, 13, 13, dtype=torch.float64)
    for p, (l1, l2, l3) in enumerate(PATHS):
        a = torch.eye(dim[l1], dtype=torch.float64).reshape((dim[l1], 1, 1) + (3,) * l1)
        b = torch.eye(dim[l2], dtype=torch.float64).reshape((1, dim[l2], 1) + (3,) * l2)
        out = product(a, l1, b, l2, l3).reshape(dim[l1], dim[l2], dim[l3])
        K[p, off[l1]:off[l1] + dim[l1], off[l2]:off[l2] + dim[l2], off[l3]:off[l3] + dim[l3]] = out
    return K.to(device=device, dtype=dtype)


def dense_einsum_product(h, n, w, K):
    """Candidate: out[e,c,k] = Σ K[p,i,j,k] w[e,p,c] h[e,c,i] T[e,j], contracted by opt_einsum."""
    import opt_einsum

    E, C = h[0].shape
    hf = torch.cat([h[0][..., None], h[1], h[2].reshape(E, C, 9)], dim=-1)
    T = harmonics(n)
    tf = torch.cat([T[0][:, None], T[1], T[2].reshape(E, 9)], dim=-1)
    out = opt_einsum.contract("pijk,epc,eci,ej->eck", K, w, hf, tf, backend="torch")
    return [out[..., 0], out[..., 1:4], out[..., 4:].reshape(E, C, 3, 3)]


# --- correctness ---------------------------------------------------------------------------------

def reference_product(h, n, w):
    """Path-by-path Σ_p w[:, p] · product(h_l1, T_l2(n), l3) with the public ``product``."""
    T = [t[:, None] for t in harmonics(n)]  # channel axis to broadcast over C
    out = [0.0, 0.0, 0.0]
    for k, (l1, l2, l3) in enumerate(PATHS):
        out[l3] = out[l3] + w[:, k].reshape(w[:, k].shape + (1,) * l3) * product(h[l1], l1, T[l2], l2, l3)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


def compact_dense(h, n, w):
    """compact_edge_product with dense rank-2 input and output (for the checks)."""
    o = compact_edge_product([h[0], h[1], sym_to_compact(h[2])], n, w)
    return [o[0], o[1], compact_to_sym(o[2])]


def check_reference(E: int = 24, C: int = 6) -> float:
    """Largest relative difference between the fused kernels (both layouts) and the path-by-path
    reference (float64)."""
    x = make_inputs(E, C, torch.float64, torch.device("cpu"), seed=1)
    h, n, w = [x["h0"], x["h1"], x["h2"]], x["n"], x["w"]
    ref = reference_product(h, n, w)
    return max(_rel(a, b) for kernel in (weighted_edge_product, compact_dense) for a, b in zip(kernel(h, n, w), ref))


def check_e3nn(E: int = 24, C: int = 6) -> dict:
    """Per path: the constant c with ours ≈ c · e3nn after to_spherical, and the relative residual."""
    x = make_inputs(E, C, torch.float64, torch.device("cpu"), seed=2)
    tp = e3nn_tensor_product(C, torch.float64, torch.device("cpu"))
    h, n = [x["h0"], x["h1"], x["h2"]], x["n"]
    blocks = {0: (0, C, 1), 1: (C, 4 * C, 3), 2: (4 * C, 9 * C, 5)}
    result = {}
    for k, (l1, l2, l3) in enumerate(PATHS):
        w = torch.zeros_like(x["w"])
        w[:, k] = x["w"][:, k]
        ours = to_spherical(weighted_edge_product(h, n, w)[l3], l3).reshape(E, C, 2 * l3 + 1)
        full = tp(x["x1"], x["x2"], w.reshape(E, -1))
        lo, hi, d = blocks[l3]
        theirs = full[:, lo:hi].reshape(E, C, d)
        c = float((ours * theirs).sum() / (theirs * theirs).sum())
        leak = float(torch.cat([full[:, :lo], full[:, hi:]], dim=-1).abs().max()) if full.shape[1] > hi - lo else 0.0
        result[str((l1, l2, l3))] = {"constant": c, "residual": _rel(c * theirs, ours), "other_blocks_max": leak}
    return result


def check_candidate(fn, E: int = 16, C: int = 5, project: bool = False) -> dict:
    """Values and gradients (features, n, weights) of a candidate against weighted_edge_product (float64).

    project: compare only the parts of the gradients the product defines, the symmetric-traceless
    part for h2 and the part tangent to the unit sphere for n (fused.py uses |n| = 1 and STF h2 in
    its closed form, a generic contraction does not; both agree once n is normalised upstream).
    """
    x = make_inputs(E, C, torch.float64, torch.device("cpu"), seed=3)
    leaves = [x[k].clone().requires_grad_() for k in ("h0", "h1", "h2", "n", "w")]
    h, n, w = leaves[:3], leaves[3], leaves[4]
    ref, got = weighted_edge_product(h, n, w), fn(h, n, w)
    g = torch.Generator().manual_seed(4)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in ref]
    gr = list(torch.autograd.grad(ref, leaves, cot))
    gg = list(torch.autograd.grad(got, leaves, cot))
    if project:
        for g_ in (gr, gg):
            g_[2] = stf(g_[2])
            g_[3] = g_[3] - (g_[3] * n).sum(-1, keepdim=True) * n
    return {"values": max(_rel(a, b) for a, b in zip(got, ref)),
            "grads": max(_rel(a, b) for a, b in zip(gg, gr))}


def check_double_backward(fn, E: int = 4, C: int = 3) -> bool:
    """gradgradcheck of a candidate in float64 (forces in training differentiate the gradient)."""
    x = make_inputs(E, C, torch.float64, torch.device("cpu"), seed=5)
    leaves = [x[k].clone().requires_grad_() for k in ("h0", "h1", "h2", "n", "w")]
    return bool(torch.autograd.gradgradcheck(lambda *a: tuple(fn(list(a[:3]), a[3], a[4])), leaves))


# --- timing --------------------------------------------------------------------------------------

def _runner(fn, inputs, mode):
    """A zero-argument callable: forward under no_grad, or forward + grad of the sum of outputs."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                fn()
    else:
        def run():
            out = fn()
            out = out if isinstance(out, (list, tuple)) else [out]
            loss = sum(o.sum() for o in out if o is not None)
            torch.autograd.grad(loss, inputs)
    return run


def measure(contenders: dict, mode: str, device, warmup: int, repeats: int) -> dict:
    """Time ``{name: (fn, grad inputs)}`` interleaved; per name ms (median, IQR), first call, peak memory.

    The first call of each contender runs alone (its duration, which includes any compilation, and
    its peak-memory increment are recorded); the remaining warm-up and the repeats are interleaved.
    """
    sync = sync_fn(device)
    runs, first = {}, {}
    for name, (fn, inputs) in contenders.items():
        run = _runner(fn, inputs, mode)
        reset_peak_memory(device)
        base = peak_memory_bytes(device)
        t0 = time.perf_counter()
        run()
        if sync is not None:
            sync()
        dt = time.perf_counter() - t0
        peak = peak_memory_bytes(device)
        first[name] = {"first_call_s": dt,
                       "peak_mem_gib": None if peak is None or base is None else (peak - base) / 2**30}
        runs[name] = run
    stats = time_fns(runs, warmup=max(warmup - 1, 0), repeats=repeats, sync=sync)
    return {name: {"ms": st["median"] * 1e3, "iqr_ms": st["iqr"] * 1e3, "cpu_ms": st["cpu_median"] * 1e3,
                   "times_ms": [t * 1e3 for t in st["times"]], **first[name]} for name, st in stats.items()}


def _fmt(x, digits=1):
    return None if x is None else f"{x:.{digits}f}"


def run_config(E, C, dtype, device, args, candidates, expensive, small, notes):
    """Time cartlorem, e3nn and the candidates at one size; fills ``small`` for the estimates."""
    dt_name = str(dtype).removeprefix("torch.")
    label = f"C={C} E={E} {dt_name}"
    x = make_inputs(E, C, dtype, device)
    h = [x["h0"].requires_grad_(), x["h1"].requires_grad_(), x["h2"].requires_grad_()]
    n, w = x["n"], x["w"].requires_grad_()
    x1, x2, ww = x["x1"].requires_grad_(), x["x2"], x["ww"].detach().requires_grad_()
    tp = e3nn_tensor_product(C, dtype, device)
    hc = [h[0], h[1], sym_to_compact(x["h2"].detach()).contiguous().requires_grad_()]
    contenders = {"cartlorem": (lambda: compact_edge_product(hc, n, w), [*hc, w]),
                  "e3nn": (lambda: tp(x1, x2, ww), [x1, ww]),
                  "dense layout": (lambda: weighted_edge_product(h, n, w), [*h, w])}
    for name, fn in candidates.items():
        if expensive or not name.startswith(("torch.compile", "dense", "hand-backward+compile")):
            contenders[name] = ((lambda f: lambda: f(h, n, w))(fn), [*h, w])
    if expensive:
        torch._dynamo.reset()
    inputs_gib = {"cartlorem": nbytes(*hc, n, w) / 2**30, "e3nn": nbytes(x1, x2, ww) / 2**30,
                  "dense layout": nbytes(*h, n, w) / 2**30}
    rows, cand_rows = [], []
    for mode in MODES:
        try:
            res = measure(contenders, mode, device, args.warmup, args.repeats)
        except Exception as exc:  # noqa: BLE001 - a failing candidate is reported, not fatal
            if not expensive:
                raise
            notes.append(f"{label} {mode}: {exc!r}; retried without the compiled/dense candidates")
            print(f"# {notes[-1]}")
            contenders = {k: v for k, v in contenders.items() if k in ("cartlorem", "e3nn", "dense layout", "hand-backward")}
            res = measure(contenders, mode, device, args.warmup, args.repeats)
        a, b = res["cartlorem"], res["e3nn"]
        for name, r in res.items():
            r["inputs_gib"] = inputs_gib.get(name, inputs_gib["cartlorem"])
            small.setdefault((C, dt_name, mode, name), r)
        row = {"C": C, "E": E, "dtype": dt_name, "mode": mode, "cartlorem_ms": a["ms"], "e3nn_ms": b["ms"],
               "speedup": b["ms"] / a["ms"], "cartlorem": a, "e3nn": b}
        rows.append(row)
        print(f"{label:<24} {mode:<8} cartlorem {a['ms']:9.1f} ms  e3nn {b['ms']:9.1f} ms  "
              f"speed-up {row['speedup']:5.2f}x", flush=True)
        for name, r in res.items():
            if name in ("cartlorem", "e3nn"):
                continue
            if "compile" in name:
                r["compile_s"] = max(r["first_call_s"] - r["ms"] / 1e3, 0.0)
            if E <= 20000 and name in candidates:  # agreement with the library function on the timed inputs
                with torch.no_grad():
                    r["max_rel_diff"] = max(_rel(u, v) for u, v in
                                            zip(candidates[name](h, n, w), weighted_edge_product(h, n, w)))
            cand_rows.append({"variant": name, "C": C, "E": E, "dtype": dt_name, "mode": mode, **r,
                              "vs_cartlorem": a["ms"] / r["ms"], "vs_e3nn": b["ms"] / r["ms"]})
            extra = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
            print(f"{'':<24} {mode:<8}   {name:<22} {r['ms']:9.1f} ms  ({a['ms'] / r['ms']:.2f}x cartlorem, "
                  f"{b['ms'] / r['ms']:.2f}x e3nn{extra})", flush=True)
    if expensive:
        torch._dynamo.reset()
    return rows, cand_rows


# --- main ----------------------------------------------------------------------------------------

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, writes nothing unless --out")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (falls back to CPU without CUDA)")
    p.add_argument("--out", default=None, help="output path stem (default benchmarks/results/tensor_products)")
    p.add_argument("--channels", default="64,128")
    p.add_argument("--edges", default="10000,100000", help="the smallest runs every configuration; "
                   "larger ones run while --budget and memory allow")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=570.0, help="seconds for the whole run (0 = no limit)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidates")
    p.add_argument("--no-candidates", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    channels = [int(c) for c in args.channels.split(",")]
    edges = sorted(int(e) for e in args.edges.split(","))
    dtypes = args.dtypes.split(",")
    if args.quick:
        channels, edges, args.repeats, args.budget = [8, 16], [300, 600], 3, 0
        args.no_compile = True
    if args.repeats < 5 and not args.quick:
        p.error("--repeats must be >= 5 for a reported run")
    target_C = TARGET["C"] if TARGET["C"] in channels else max(channels)

    meta = {**machine_info(device), "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
            "budget_s": args.budget, "paths": [list(p_) for p_ in PATHS], "target": TARGET,
            "timing": "median of repeats (time.perf_counter, CUDA-synchronised, contenders interleaved), "
                      "ms; forward under no_grad; fwd+bwd = forward + autograd.grad(sum of outputs, "
                      "features and weights); e3nn harmonics x2 precomputed (not timed)",
            "command": "python benchmarks/tensor_products.py " + " ".join(argv), "notes": []}
    print(f"# {meta['cpu_model']}, {meta['cpu_count']} cores, torch {meta['torch']} "
          f"({meta['torch_num_threads']} threads), e3nn {meta['e3nn']}, device {device}, "
          f"commit {meta['git_commit']}{' (dirty)' if meta['git_dirty'] else ''}, load {meta['loadavg_1min']}")

    # correctness, once, float64 on the CPU
    checks = {"reference_rel": check_reference(), "e3nn_per_path": check_e3nn()}
    worst = max(v["residual"] for v in checks["e3nn_per_path"].values())
    print(f"# check: fused vs path-by-path product(): max rel diff {checks['reference_rel']:.1e}; "
          f"vs e3nn after to_spherical: one constant per path, worst residual {worst:.1e}")
    if checks["reference_rel"] > 1e-12 or worst > 1e-5:
        raise SystemExit("correctness check failed: " + repr(checks))
    candidates = {}
    if not args.no_candidates:
        K = {}

        def dense(h, n, w):
            key = (h[0].dtype, h[0].device)
            if key not in K:
                K[key] = coupling_tensor(*key)
            return dense_einsum_product(h, n, w, K[key])

        candidates = {"hand-backward": hand_backward_product, "dense-einsum": dense}
        if not args.no_compile:
            candidates["hand-backward+compile"] = hand_backward_compiled_product
            candidates["torch.compile"] = torch.compile(weighted_edge_product)
        checks["hand-backward"] = check_candidate(hand_backward_product)
        checks["hand-backward"]["double_backward"] = check_double_backward(hand_backward_product)
        checks["dense-einsum"] = check_candidate(dense, project=True)
        for name in ("hand-backward", "dense-einsum"):
            c = checks[name]
            print(f"# check {name}: values {c['values']:.1e}, gradients {c['grads']:.1e}"
                  + (f", gradgradcheck {c['double_backward']}" if "double_backward" in c else ""))
            if c["values"] > 1e-12 or c["grads"] > 1e-12 or c.get("double_backward") is False:
                raise SystemExit(f"candidate {name} disagrees with weighted_edge_product: {c}")
    meta["checks"] = checks

    rows, cand_rows, skipped = [], [], []
    small = {}  # (C, dtype, mode, contender) -> measurement at the smallest E
    configs = [(E, C, dt) for E in edges for C in channels for dt in dtypes]
    if len(edges) > 1:  # larger sizes in priority order: the target first
        rest = [c for c in configs if c[0] != edges[0]]
        rest.sort(key=lambda c: (c[0], c[2] != TARGET["dtype"], c[1] != target_C, c[1]))
        configs = [c for c in configs if c[0] == edges[0]] + rest

    def remaining():
        return math.inf if args.budget <= 0 else args.budget - (time.perf_counter() - start)

    for E, C, dt_name in configs:
        label = f"C={C} E={E} {dt_name}"
        if E != edges[0]:  # estimate from the smallest size: time and memory scale with E
            ratio = E / edges[0]
            est_t, est_mem = 0.0, 0.0
            for (c_, d_, _, name), r in small.items():
                if (c_, d_) != (C, dt_name) or any(k in name for k in ("compile", "dense")):
                    continue
                est_t += ratio * r["ms"] / 1e3 * (args.warmup + args.repeats) + r["first_call_s"] * 0.1
                est_mem = max(est_mem, ratio * ((r["peak_mem_gib"] or 0.0) + r["inputs_gib"]))
            free = mem_available_bytes(device)
            free_gib = None if free is None else free / 2**30
            reason = None
            if free_gib is not None and est_mem > 0.8 * free_gib:
                reason = f"memory: needs ~{est_mem:.1f} GiB, {free_gib:.1f} GiB available"
            elif est_t > remaining():
                reason = (f"time: ~{est_t:.0f} s estimated, {max(remaining(), 0):.0f} s left of "
                          f"--budget {args.budget:.0f}")
            if reason:
                skipped.append({"config": label, "reason": reason})
                print(f"# skip {label}: {reason}")
                continue
        expensive = E == edges[0] and C == target_C and dt_name == TARGET["dtype"]
        new_rows, new_cands = run_config(E, C, getattr(torch, dt_name), device, args, candidates, expensive,
                                         small, meta["notes"])
        rows += new_rows
        cand_rows += new_cands
        gc.collect()

    meta["skipped"] = skipped
    meta["wall_s"] = time.perf_counter() - start
    meta["loadavg_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    target_rows = [r for r in rows if r["C"] == target_C and r["dtype"] == TARGET["dtype"]
                   and r["mode"] == TARGET["mode"]]
    met = bool(target_rows) and all(r["speedup"] >= TARGET["speedup"] for r in target_rows)
    meta["target_met"] = met if target_rows else None
    markdown = to_markdown(rows, cand_rows, meta, args, device, target_C, met, target_rows)
    print()
    print(markdown)
    if args.out is not None or not args.quick:
        path = write_results("tensor_products", rows + [{"candidate": True, **c} for c in cand_rows], meta,
                             markdown=markdown, out=args.out)
        print(f"\n# wrote {path} and {path.with_suffix('.md')}")


def to_markdown(rows, cand_rows, meta, args, device, target_C, met, target_rows) -> str:
    def pm(ms, iqr):
        return f"{ms:.1f} ± {iqr / 2:.1f}"

    main_rows = [{"C": r["C"], "E": r["E"], "dtype": r["dtype"], "mode": r["mode"],
                  "ours": pm(r["cartlorem_ms"], r["cartlorem"]["iqr_ms"]), "e3nn": pm(r["e3nn_ms"], r["e3nn"]["iqr_ms"]),
                  "x": f"{r['speedup']:.2f}×"} for r in rows]
    md = [f"# Fused Cartesian product vs e3nn 'uvu' tensor product ({'quick' if args.quick else 'full'} run)", "",
          f"{meta['cpu_model']}, {meta['cpu_count']} cores, {meta['torch_num_threads']} torch threads, "
          f"device {device}; torch {meta['torch']}, e3nn {meta['e3nn']}; commit {meta['git_commit']}"
          f"{' (uncommitted changes)' if meta['git_dirty'] else ''}; {meta['date']}; 1-min load average "
          f"{meta['loadavg_1min']} at start, {meta['loadavg_1min_end']} at end (above the core count: "
          "other processes shared the cores).", "",
          f"Median of {args.repeats} repeats after {args.warmup} warm-up, ± half the inter-quartile range, ms; "
          "contenders interleaved. forward = no_grad; fwd+bwd = forward + grad of the sum of outputs w.r.t. "
          "features and weights. Speed-up = e3nn / cartlorem (`compact_edge_product`, the kernel the model "
          "runs, rank 2 as 6 components).", "",
          markdown_table(main_rows, [("C", "C"), ("E", "E"), ("dtype", "dtype"), ("mode", "mode"),
                                     ("cartlorem ms", "ours"), ("e3nn ms", "e3nn"), ("speed-up", "x")]), ""]
    if target_rows:
        md += [f"Target (≥ {TARGET['speedup']}× e3nn, C = {target_C}, {TARGET['mode']}, {TARGET['dtype']}, "
               f"{device.type}): **{'met' if met else 'not met'}** ("
               + ", ".join(f"E={r['E']}: {r['speedup']:.2f}×" for r in target_rows) + ").", ""]
    if meta["skipped"]:
        md += ["Skipped: " + "; ".join(f"{s['config']} ({s['reason']})" for s in meta["skipped"]) + ".", ""]
    if cand_rows:
        md += ["## Variants and candidates for `cartlorem/tensors/fused.py`", "",
               "dense layout = `weighted_edge_product`, the same closed form with rank 2 as [E, C, 3, 3] (what "
               "the model ran before the compact layout); the others are proposals, not adopted: "
               "hand-backward = same closed form in an autograd.Function with an analytic backward "
               "(batched-GEMV contractions, in-place accumulation); +compile = its forward and backward "
               "each through torch.compile; torch.compile = `torch.compile(weighted_edge_product)`; "
               "dense-einsum = 11×13×13×13 coupling tensor contracted by opt_einsum. Compile s = first "
               "call − median.", "",
               markdown_table([{**c, "ms_s": pm(c["ms"], c["iqr_ms"]), "vs_c": f"{c['vs_cartlorem']:.2f}×",
                                "vs_e": f"{c['vs_e3nn']:.2f}×", "comp": _fmt(c.get("compile_s"))}
                               for c in cand_rows],
                              [("variant", "variant"), ("C", "C"), ("E", "E"), ("dtype", "dtype"), ("mode", "mode"),
                               ("ms", "ms_s"), ("vs cartlorem", "vs_c"), ("vs e3nn", "vs_e"),
                               ("compile s", "comp")]), ""]
    checks = meta["checks"]
    worst = max(v["residual"] for v in checks["e3nn_per_path"].values())
    md.append(f"Checks (float64): fused kernels (both layouts) vs path-by-path `product` "
              f"{checks['reference_rel']:.1e} relative; "
              f"fused vs e3nn after `to_spherical`: one constant per path, worst residual {worst:.1e}"
              + "".join(f"; {k} vs fused: values {checks[k]['values']:.1e}, gradients {checks[k]['grads']:.1e}"
                        for k in ("hand-backward", "dense-einsum") if k in checks)
              + ("; hand-backward gradgradcheck passed" if checks.get("hand-backward", {}).get("double_backward")
                 else "") + ".")
    for note in meta["notes"]:
        md.append(f"\nNote: {note}")
    md.append(f"\nWall time {meta['wall_s']:.0f} s. Command: `{meta['command'].strip()}`")
    return "\n".join(md)


if __name__ == "__main__":
    main()
