"""The fused weighted edge product: the message kernel of the interaction blocks.

For every edge e = (i ← j) with unit vector n and per-edge, per-path, per-channel weights w:

    out_l3[e, c] = Σ_{(l1, l2, l3) even} w[e, path, c] · product(h_l1[e, c], T_l2(n_e), l3)

Because the second operand is a Cartesian harmonic of a *unit* vector, every path collapses to a
few multiply-adds on three edge-wise intermediates, s1 = h1·n, v2 = h2 n and s2 = nᵀ h2 n
(with T2 = 3/2 n nᵀ − I/2 and h2 symmetric traceless):

    out0 = w000 h0 + w110 s1 + w220 s2
    out1 = n (w011 h0 + 3/2 w121 s1) + h1 (w101 − 1/2 w121) + w211 v2
    out2 = n qᵀ + q nᵀ − (a/2 + u·n/3) I + (w202 − w222) h2,
           a = w022 h0,  u = 3/2 w112 h1 + 3 w222 v2,  q = 3/4 a n + u/2

which equals the table's normalised products path by path (checked against ``product`` in the
tests). Measured against the alternatives on this machine (benchmarks/tensor_products.py): a dense
precomputed coupling tensor contracted with opt_einsum does ~13²× more multiply-adds per edge and
channel, and a per-path loop over ``product`` launches ~30 kernels and materialises T2 per path;
the closed form above launches ~15 elementwise kernels and never builds a coupling tensor.

The interaction blocks run :func:`compact_edge_product`: the same closed form with the symmetric
traceless rank-2 tensors carried over the edges as their 6 independent components, so that h2 n and
n qᵀ + q nᵀ are batched GEMMs with small per-edge maps and the gather, scatter and backward move 6
numbers instead of 9 (1.6–2.1× less CPU time for the whole model in benchmarks/speed.py). Outside
TorchScript they run :func:`component_major_edge_product`, the same closed form with the Cartesian
components before the channels ([E, 3, C], [E, 6, C]): every step is then elementwise along contiguous
channels, which makes the training step (forward, forces, double backward) of the kernel 1.4–1.7× cheaper
on small molecular batches (issue 12; benchmarks/results/train_step.local.md). With rank-0 input only (the
first layer) both reduce to out_l = w_0ll h0 T_l(n), three products with the harmonics.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .products import paths_to

__all__ = ["edge_paths", "weighted_edge_product", "compact_edge_product", "compiled_compact_edge_product",
           "compiled_weighted_edge_product", "component_major_edge_product", "compiled_component_major_edge_product",
           "sym_to_compact", "compact_to_sym", "harmonic2_compact"]

# Symmetric 3×3 tensors on edges are carried as their 6 independent components (xx, yy, zz, xy, xz, yz):
# the rank-2 edge work (gather, kernel, scatter and their backward) then moves 6 numbers instead of 9 and
# never forms n qᵀ + q nᵀ as two dense outer products.
def sym_to_compact(x: torch.Tensor) -> torch.Tensor:
    """Symmetric [..., 3, 3] → [..., 6] (xx, yy, zz, xy, xz, yz); reads the upper triangle."""
    upper = torch.tensor([0, 4, 8, 1, 2, 5], device=x.device)  # flat 3×3 index of each compact component
    return x.flatten(-2).index_select(-1, upper)


def compact_to_sym(c: torch.Tensor) -> torch.Tensor:
    """[..., 6] (xx, yy, zz, xy, xz, yz) → symmetric [..., 3, 3]."""
    full = torch.tensor([0, 3, 4, 3, 1, 5, 4, 5, 2], device=c.device)  # compact component of each 3×3 entry
    return c.index_select(-1, full).unflatten(-1, [3, 3])


class _SubDiagonal(torch.autograd.Function):
    """c[..., :3] -= d in place on a fresh compact tensor c, whose gradient passes through unchanged.

    Autograd's own in-place-on-a-view handling (CopySlices) would clone the whole [E, C, 6] gradient
    in the backward; this returns it as it is. The backward is made of differentiable operations, so
    double backward (training on forces) works through it."""

    @staticmethod
    def forward(ctx, c, d):
        c[..., :3].sub_(d)
        ctx.mark_dirty(c)
        return c

    @staticmethod
    def backward(ctx, g):
        return g, (-g[..., :3]).sum(-1, keepdim=True)


def _sub_diagonal(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    # torch.compile (the inference-only kernel) cannot trace ctx.mark_dirty and would split the graph
    # there (torch 2.13); it fuses the plain in-place form by itself. TorchScript has no autograd.Function.
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        c[..., :3].sub_(d)
        return c
    return _SubDiagonal.apply(c, d)


# _edge_maps as one gather of n and one constant mask: entry k of the flat M [6, 3] (P [3, 6]) is
# n[_M_INDEX[k]] * _M_SCALE[k] (a scale 0 marks a structural zero). Two ops per map, and two in their
# backward, instead of an 18-way stack of edge columns and zeros (whose backward splits it again).
_M_INDEX = [0, 0, 0, 0, 1, 0, 0, 0, 2, 1, 0, 0, 2, 0, 0, 0, 2, 1]
_M_SCALE = [1., 0., 0., 0., 1., 0., 0., 0., 1., 1., 1., 0., 1., 0., 1., 0., 1., 1.]
_P_INDEX = [0, 0, 0, 1, 2, 0, 0, 1, 0, 0, 0, 2, 0, 0, 2, 0, 0, 1]
_P_SCALE = [2., 0., 0., 1., 1., 0., 0., 2., 0., 1., 0., 1., 0., 0., 2., 0., 1., 1.]


def _edge_maps(n: torch.Tensor):
    """Per-edge linear maps of the compact layout: M [E, 6, 3] with (H n)_a = Σ_k H_k M[k, a], and
    P [E, 3, 6] with (n qᵀ + q nᵀ)_k = Σ_a q_a P[a, k]."""
    # TorchScript reads no global lists: the tables above, written out
    index = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 2, 1, 0, 0, 2, 0, 0, 0, 2, 1,
                          0, 0, 0, 1, 2, 0, 0, 1, 0, 0, 0, 2, 0, 0, 2, 0, 0, 1], device=n.device)
    scale = torch.tensor([1., 0., 0., 0., 1., 0., 0., 0., 1., 1., 1., 0., 1., 0., 1., 0., 1., 1.,
                          2., 0., 0., 1., 1., 0., 0., 2., 0., 1., 0., 1., 0., 0., 2., 0., 1., 1.],
                         dtype=n.dtype, device=n.device)
    maps = n.index_select(1, index) * scale  # [E, 36]
    return maps[:, :18].view(-1, 6, 3), maps[:, 18:].view(-1, 3, 6)


def harmonic2_compact(n: torch.Tensor) -> torch.Tensor:
    """T2(n) = 3/2 n nᵀ − I/2 of unit vectors n [E, 3] in the compact layout [E, 6] (xx, yy, zz, xy, xz, yz)."""
    a = torch.tensor([0, 1, 2, 0, 0, 1], device=n.device)
    b = torch.tensor([0, 1, 2, 1, 2, 2], device=n.device)
    half = torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0, 0.0], dtype=n.dtype, device=n.device)
    return 1.5 * n.index_select(1, a) * n.index_select(1, b) - half


def edge_paths(l_in: Sequence[int] = (0, 1, 2), l_out: Sequence[int] = (0, 1, 2)):
    """Even paths (l_node, l_edge, l_out) used by the message kernel, in weight order."""
    return paths_to(tuple(l_in), (0, 1, 2), tuple(l_out), parity="even")


def _unpack(h: List[Optional[torch.Tensor]], weights: torch.Tensor, l_out: List[int]):
    """Shared preamble of the kernels: check the weights against the paths of the ranks present and
    return ({path "l1l2l3": w [E, C]}, h0, h1, h2)."""
    present = [l < len(h) and h[l] is not None for l in range(3)]
    # edge_paths(ranks present, l_out) as strings "l1l2l3" (TorchScript has neither tuple dict keys nor
    # iteration over a global table): the even paths are the (l1, l2, l3) with |l1 − l2| <= l3 <= l1 + l2
    # and l1 + l2 + l3 even, and EVEN_PATHS lists them in this lexicographic order
    paths: List[str] = []
    for l1 in range(3):
        for l2 in range(3):
            for l3 in range(3):
                if present[l1] and l3 in l_out and abs(l1 - l2) <= l3 <= l1 + l2 and (l1 + l2 + l3) % 2 == 0:
                    paths.append(f"{l1}{l2}{l3}")
    if weights.shape[-2] != len(paths):
        raise ValueError(f"weights have {weights.shape[-2]} paths, expected {len(paths)} for {paths}")
    # unbind, not w[:, k]: each slice's backward would otherwise allocate a zero tensor of all weights
    w: Dict[str, torch.Tensor] = {}
    for key, wk in zip(paths, weights.unbind(1)):
        w[key] = wk
    h0 = h[0]
    if h0 is None:  # a ValueError, not an assert: python -O dropped it, and a KeyError came from deep inside
        raise ValueError("the fused edge products need rank-0 features (h[0] is None)")
    return w, h0, (h[1] if len(h) > 1 else None), (h[2] if len(h) > 2 else None)


def _ranks_0_1(w: Dict[str, torch.Tensor], h0: torch.Tensor, h1: Optional[torch.Tensor], s1: Optional[torch.Tensor],
               v2: Optional[torch.Tensor], n: torch.Tensor, want0: bool, want1: bool,
               sn: Optional[torch.Tensor] = None):
    """(out0, out1) of the closed form, shared by both layouts (h2 enters only through v2 = h2 n and
    sn = nᵀ h2 n, which is computed here if not given).
    The caller decides which ranks it wants: under torch.compile(dynamic=True), torch 2.13, an
    ``l in l_out`` test inside this helper evaluated False (checked by the compiled-kernel test)."""
    o0: Optional[torch.Tensor] = None
    o1: Optional[torch.Tensor] = None
    ncol, nn = n[:, :, None], n[:, None, :]
    if want0:
        o0 = w["000"] * h0
        if s1 is not None:
            o0 = torch.addcmul(o0, w["110"], s1)
        if v2 is not None:
            if sn is None:
                sn = torch.bmm(v2, ncol).squeeze(-1)  # nᵀ h2 n
            o0 = torch.addcmul(o0, w["220"], sn)
    if want1:
        along = w["011"] * h0
        if h1 is not None and s1 is not None:
            along = torch.addcmul(along, w["121"], s1, value=1.5)
            o1 = torch.add(w["101"], w["121"], alpha=-0.5)[..., None] * h1
        o1 = along[..., None] * nn if o1 is None else torch.addcmul(o1, along[..., None], nn)
        if v2 is not None:
            o1 = torch.addcmul(o1, w["211"][..., None], v2)
    return o0, o1


def weighted_edge_product(
    h: Sequence[Optional[torch.Tensor]],
    n: torch.Tensor,
    weights: torch.Tensor,
    l_out: Sequence[int] = (0, 1, 2),
) -> list[Optional[torch.Tensor]]:
    """Σ over even paths of w[e, path, c] · product(h_l1[e, c], T_l2(n_e)) for every edge.

    h: [h0 [E, C], h1 [E, C, 3] or None, h2 [E, C, 3, 3] or None] (neighbour features on edges;
    h2 symmetric traceless); n [E, 3] unit edge vectors; weights [E, P, C] with P =
    len(edge_paths(l_in, l_out)) for the ranks present in h, in that order.
    Returns [out0 [E, C], out1 [E, C, 3], out2 [E, C, 3, 3]] (None for ranks not in l_out).
    """
    w, h0, h1, h2 = _unpack(h, weights, l_out)
    E = n.shape[0]
    ncol = n[:, :, None]  # [E, 3, 1]
    nn = n[:, None, :]  # [E, 1, 3]
    # contractions with n as batched matrix products: no [E, C, 3, 3] temporaries
    s1 = torch.bmm(h1, ncol).squeeze(-1) if h1 is not None else None  # h1·n [E, C]
    C = h0.shape[1]
    v2 = torch.bmm(h2.reshape(E, 3 * C, 3), ncol).view(E, C, 3) if h2 is not None else None  # h2 n [E, C, 3]
    out: list[Optional[torch.Tensor]] = [*_ranks_0_1(w, h0, h1, s1, v2, n, 0 in l_out, 1 in l_out), None]

    if 2 in l_out:
        a = w["022"] * h0  # [E, C]
        u = None
        if h1 is not None:
            u = (1.5 * w["112"])[..., None] * h1
        if v2 is not None:
            u3 = (3.0 * w["222"])[..., None] * v2
            u = u3 if u is None else u + u3
        q = (0.75 * a)[..., None] * nn  # [E, C, 3]
        diag = 0.5 * a
        if u is not None:
            q = torch.add(q, u, alpha=0.5)
            diag = diag + torch.bmm(u, ncol).squeeze(-1) / 3.0
        nq = n[:, None, :, None] * q[:, :, None, :]  # n qᵀ [E, C, 3, 3]
        o2 = nq + nq.transpose(-1, -2)
        o2 = o2 - diag[..., None, None] * torch.eye(3, dtype=n.dtype, device=n.device)
        if h2 is not None:
            o2 = torch.addcmul(o2, (w["202"] - w["222"])[..., None, None], h2)
        out[2] = o2
    return out


def compact_edge_product(
    h: List[Optional[torch.Tensor]],
    n: torch.Tensor,
    weights: torch.Tensor,
    l_out: Optional[List[int]] = None,
) -> List[Optional[torch.Tensor]]:
    """:func:`weighted_edge_product` with rank 2 in the compact layout, in and out.

    h: [h0 [E, C], h1 [E, C, 3] or None, h2 [E, C, 6] or None] (h2 = ``sym_to_compact`` of a symmetric
    traceless tensor); returns [out0 [E, C], out1 [E, C, 3], out2 [E, C, 6]]. This is what the
    interaction blocks use: the same closed form, with every rank-2 step a batched GEMM on 6 components
    (measured in benchmarks/results/speed.md). ``l_out`` defaults to all ranks (0, 1, 2).
    """
    if l_out is None:
        l_out = [0, 1, 2]
    w, h0, h1, h2 = _unpack(h, weights, l_out)
    if h1 is None and h2 is None:
        # rank-0 input (the first layer): out_l = w_0ll h0 T_l(n), three products with the harmonics
        return _scalar_input_product(w, h0, n, l_out)
    ncol = n[:, :, None]  # [E, 3, 1]
    nn = n[:, None, :]  # [E, 1, 3]
    M, P = _edge_maps(n)  # [E, 6, 3], [E, 3, 6]: used below when h2 is present or rank 2 is wanted
    s1 = torch.bmm(h1, ncol).squeeze(-1) if h1 is not None else None  # h1·n [E, C]
    v2 = torch.bmm(h2, M) if h2 is not None else None  # h2 n [E, C, 3]
    sn = torch.bmm(v2, ncol).squeeze(-1) if v2 is not None else None  # nᵀ h2 n [E, C]
    o0, o1 = _ranks_0_1(w, h0, h1, s1, v2, n, 0 in l_out, 1 in l_out, sn)
    out: List[Optional[torch.Tensor]] = [o0, o1, None]

    if 2 in l_out:
        a = w["022"] * h0  # [E, C]
        # q = 3/4 a n + u/2 with u = 3/2 w112 h1 + 3 w222 v2;  diag = a/2 + u·n/3
        q = (0.75 * a)[..., None] * nn
        if h1 is not None:
            q = torch.addcmul(q, (0.75 * w["112"])[..., None], h1)
        if v2 is not None:
            q = torch.addcmul(q, (1.5 * w["222"])[..., None], v2)
        # diag = a/2 + u·n/3 = a/2 + w112 s1/2 + w222 nᵀh2n: [E, C] multiply-adds on the contractions
        # already made, where (2/3) q·n (n a unit vector) would be one more batched GEMM and its derivatives
        diag = 0.5 * a
        if s1 is not None:
            diag = torch.addcmul(diag, w["112"], s1, value=0.5)
        if sn is not None:
            diag = torch.addcmul(diag, w["222"], sn)
        o2 = torch.bmm(q, P)  # n qᵀ + q nᵀ, compact [E, C, 6]
        o2 = _sub_diagonal(o2, diag[..., None])
        if h2 is not None:
            o2 = torch.addcmul(o2, (w["202"] - w["222"])[..., None], h2)
        out[2] = o2
    return out


def _scalar_input_product(w: Dict[str, torch.Tensor], h0: torch.Tensor, n: torch.Tensor,
                          l_out: List[int]) -> List[Optional[torch.Tensor]]:
    """The kernel for rank-0 input only: out_l [E, C, ...] = w_0ll h0 T_l(n) (rank 2 compact); the closed
    form of :func:`compact_edge_product` reduces to this (q = 3/4 a n, diag = a/2)."""
    out: List[Optional[torch.Tensor]] = [None, None, None]
    if 0 in l_out:
        out[0] = w["000"] * h0
    if 1 in l_out:
        out[1] = (w["011"] * h0)[..., None] * n[:, None, :]
    if 2 in l_out:
        out[2] = (w["022"] * h0)[..., None] * harmonic2_compact(n)[:, None, :]
    return out


# (xx, yy, zz, xy, xz, yz) → the compact component of each entry of the 3×3 matrix, row by row
_FULL_INDEX = [0, 3, 4, 3, 1, 5, 4, 5, 2]
# compact (n qᵀ + q nᵀ)_k = q_a n_b + q_b n_a with (a, b) = (_PAIR_A[k], _PAIR_B[k])
_PAIR_A = [0, 1, 2, 0, 0, 1]
_PAIR_B = [0, 1, 2, 1, 2, 2]


def component_major_edge_product(
    h: List[Optional[torch.Tensor]],
    n: torch.Tensor,
    weights: torch.Tensor,
    l_out: Optional[List[int]] = None,
) -> List[Optional[torch.Tensor]]:
    """:func:`compact_edge_product` with the Cartesian components before the channels.

    h: [h0 [E, C], h1 [E, 3, C] or None, h2 [E, 6, C] or None] (h2 compact, ``sym_to_compact`` then
    transposed); n [E, 3] unit vectors; weights [E, P, C] as in :func:`weighted_edge_product`. Returns
    [out0 [E, C], out1 [E, 3, C], out2 [E, 6, C]] (None for ranks not in ``l_out``, default all).

    The same closed form, every step an elementwise operation whose innermost axis is the C contiguous
    channels: the edge geometry (n [E, 3, 1]) and the path weights (w [E, 1, C]) broadcast along
    vectorised rows, and the contractions with n are sums over a middle axis of length 3, where the
    [E, C, 3] layout needs batched 3-wide GEMMs or 3-element inner loops. This is what the interaction
    blocks run outside TorchScript: the training step (forward, forces, double backward) of the message
    kernel takes 1.4–1.7× less CPU time than :func:`compact_edge_product` on molecular batches
    (E ≈ 600, C = 16–32), and about the same on large graphs (benchmarks/results/train_step.local.md).
    """
    if l_out is None:
        l_out = [0, 1, 2]
    w, h0, h1, h2 = _unpack(h, weights, l_out)
    n3 = n[:, :, None]  # [E, 3, 1]
    out: List[Optional[torch.Tensor]] = [None, None, None]
    if h1 is None and h2 is None:  # rank-0 input (the first layer): out_l = w_0ll h0 T_l(n)
        if 0 in l_out:
            out[0] = w["000"] * h0
        if 1 in l_out:
            out[1] = n3 * (w["011"] * h0)[:, None, :]
        if 2 in l_out:
            out[2] = harmonic2_compact(n)[:, :, None] * (w["022"] * h0)[:, None, :]
        return out
    s1: Optional[torch.Tensor] = None  # h1·n [E, C]
    v2: Optional[torch.Tensor] = None  # h2 n [E, 3, C]
    sn: Optional[torch.Tensor] = None  # nᵀ h2 n [E, C]
    if h1 is not None:
        s1 = (h1 * n3).sum(1)
    if h2 is not None:
        full = h2.index_select(1, torch.tensor(_FULL_INDEX, device=n.device)).view(h2.shape[0], 3, 3, h2.shape[2])
        v2 = (full * n[:, None, :, None]).sum(2)
        sn = (v2 * n3).sum(1)
    if 0 in l_out:
        o0 = w["000"] * h0
        if s1 is not None:
            o0 = torch.addcmul(o0, w["110"], s1)
        if sn is not None:
            o0 = torch.addcmul(o0, w["220"], sn)
        out[0] = o0
    if 1 in l_out:
        along = w["011"] * h0
        o1: Optional[torch.Tensor] = None
        if h1 is not None and s1 is not None:
            along = torch.addcmul(along, w["121"], s1, value=1.5)
            o1 = torch.add(w["101"], w["121"], alpha=-0.5)[:, None, :] * h1
        o1 = n3 * along[:, None, :] if o1 is None else torch.addcmul(o1, n3, along[:, None, :])
        if v2 is not None:
            o1 = torch.addcmul(o1, w["211"][:, None, :], v2)
        out[1] = o1
    if 2 in l_out:
        a = w["022"] * h0
        # q = 3/4 a n + 3/4 w112 h1 + 3/2 w222 v2;  diag = a/2 + w112 s1/2 + w222 nᵀh2n  (= (2/3) q·n)
        q = n3 * (0.75 * a)[:, None, :]
        diag = 0.5 * a
        if h1 is not None and s1 is not None:
            q = torch.addcmul(q, (0.75 * w["112"])[:, None, :], h1)
            diag = torch.addcmul(diag, w["112"], s1, value=0.5)
        if v2 is not None and sn is not None:
            q = torch.addcmul(q, (1.5 * w["222"])[:, None, :], v2)
            diag = torch.addcmul(diag, w["222"], sn)
        pa = torch.tensor(_PAIR_A, device=n.device)
        pb = torch.tensor(_PAIR_B, device=n.device)
        o2 = q.index_select(1, pa) * n.index_select(1, pb)[:, :, None]  # n qᵀ + q nᵀ, compact [E, 6, C]
        o2 = torch.addcmul(o2, q.index_select(1, pb), n.index_select(1, pa)[:, :, None])
        eye = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=n.dtype, device=n.device)
        o2 = o2 - eye[None, :, None] * diag[:, None, :]
        if h2 is not None:
            o2 = torch.addcmul(o2, (w["202"] - w["222"])[:, None, :], h2)
        out[2] = o2
    return out


_COMPILED = {}


def _compiled(kernel, h, n, weights, l_out):
    key = (kernel.__name__, tuple(x is not None for x in h), tuple(l_out))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = torch.compile(kernel, dynamic=True)
        _COMPILED[key] = fn
    if fn is kernel:
        return fn(h, n, weights, l_out)
    try:
        return fn(h, n, weights, l_out)
    except Exception as exc:  # compiler missing or failing: eager is always correct
        failure = exc
    # bad inputs fail eagerly too: their error, and compilation stays on for the calls that follow
    out = kernel(h, n, weights, l_out)
    import warnings

    warnings.warn(f"torch.compile of the message kernel failed ({type(failure).__name__}: {failure}); using eager")
    _COMPILED[key] = kernel
    return out


def compiled_weighted_edge_product(h, n, weights, l_out=(0, 1, 2)):
    """:func:`weighted_edge_product` through ``torch.compile`` (one fused loop per output instead of
    ~15 elementwise kernels; 4.3× e3nn vs 1.6× eager in benchmarks/tensor_products.py, C = 128).

    For inference only: compiled graphs do not support double backward, which training on forces
    needs. Falls back to the eager kernel, with one warning, where compilation is unavailable
    (no C++ compiler, unsupported platform).
    """
    return _compiled(weighted_edge_product, h, n, weights, l_out)


def compiled_compact_edge_product(h, n, weights, l_out=(0, 1, 2)):
    """:func:`compact_edge_product` through ``torch.compile``; inference only, eager fallback as above."""
    return _compiled(compact_edge_product, h, n, weights, l_out)


def compiled_component_major_edge_product(h, n, weights, l_out=(0, 1, 2)):
    """:func:`component_major_edge_product` through ``torch.compile``; inference only, eager fallback as above."""
    return _compiled(component_major_edge_product, h, n, weights, l_out)
