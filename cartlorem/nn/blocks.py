"""Interaction blocks of the local model: ICTP messages, body-ordered products, species-dependent skip.

Shapes: features are lists ``[h0 [N, C], h1 [N, C, 3], h2 [N, C, 3, 3]]`` with None for absent ranks.
"""

from __future__ import annotations

import math
from functools import partial
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..tensors import (EquivariantLinear, chunked_edge_sum, compact_edge_product, compact_to_sym, compiled_compact_edge_product, edge_paths,
                       mix_channels, paths_to, product, sym_to_compact)
from ..tensors.fused import compiled_component_major_edge_product, component_major_edge_product
from ..tensors.harmonics import stf
from .radial import RadialMLP

__all__ = ["Interaction", "BodyOrderProduct", "SpeciesLinear"]

Features = List[Optional[torch.Tensor]]  # [h0, h1, h2], None for absent ranks


def _present(x: Optional[torch.Tensor]) -> torch.Tensor:
    """``x``, which the caller knows is not None (a type refinement for TorchScript)."""
    assert x is not None
    return x

#: Size of an edge chunk of the message computation (``Interaction.forward``) on the CPU, in edges × channels:
#: 2048 edges at C = 64 (chosen in benchmarks/memory.py: ~0.27 MB per atom for energy + forces
#: and faster than no chunking; smaller chunks cost time, larger ones memory). On CUDA chunks are sized by
#: the free GPU memory instead (:data:`CUDA_MEMORY_FRACTION`). A layer's ``edge_chunk`` attribute overrides
#: both (edges per chunk; 0 turns chunking off).
EDGE_CHUNK_ELEMENTS = 2**17
#: On CUDA the edges of one chunk may take this fraction of the GPU memory free to the process (the driver's
#: free memory plus what torch's caching allocator holds unused), at :data:`CUDA_BYTES_PER_EDGE_CHANNEL` per
#: edge and channel; edges beyond one chunk are chunked, and a chunk is never smaller than 16 ×
#: EDGE_CHUNK_ELEMENTS / C edges. On an H200 (benchmarks/results/gpu.profile.short_diamond17576*.md), energy
#: + forces of 17576 atoms of diamond (1.57 M edges, C = 64) took 452 ms in chunks of 32768 edges (2.3 GB), 291
#: ms in chunks of 131072 (5.3 GB) and 205 ms unchunked (44 GB), and 272 ms (34.5 GB) by this rule (two chunks).
CUDA_MEMORY_FRACTION = 0.25
#: Peak bytes per edge and channel of an unchunked energy + forces call (44.4 GB for 1.57 M edges at C = 64 on
#: the H200 above).
CUDA_BYTES_PER_EDGE_CHANNEL = 450
#: By default, chunking starts above this many chunks of edges (24576 edges at C = 64, 49152 at C = 32): below
#: it the unchunked path's large-tensor page faults, which the chunked path avoids, do not always pay for the
#: recomputation. benchmarks/results/chunk_threshold.md (energy + forces, one thread, three runs): chunked /
#: unchunked 1.22-1.42 for diamond at 4.7-11.1 chunks, 0.72-0.76 for 1029 atoms of water at 13.9 chunks (C = 32),
#: 0.49-0.62 from 17.5 chunks on; water at C = 64 gains from ~5 chunks on, but diamond does not. (It was 16, which
#: left the 1029-atom water box at C = 32 on the slower path.) The unchunked memory below the threshold is not small
#: at every width and dtype: 3000 atoms of water at C = 8 (163k edges) took 1.1 GB in float32 and 2.2 GB in
#: float64, against 0.08 and 0.29 GB chunked (a scale review, session 37); a layer's ``edge_chunk`` sets chunks.
MIN_CHUNKS = 12


def _cuda_free_bytes(device: torch.device) -> int:
    """GPU memory this process can still use on ``device``: the driver's free memory plus the memory torch's
    caching allocator holds without using it."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) + int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device))


class Interaction(nn.Module):
    """Message A_i = (1/avg_neighbours) Σ_j Σ_paths R_path(r_ij) · product(W h_j, T(r̂_ij)), then mixing.

    l_in: ranks of the incoming node features; the message has ranks ``l_msg``.
    """

    def __init__(self, channels: int, l_in: Sequence[int], l_msg: Sequence[int], num_basis: int,
                 radial_hidden: int, avg_num_neighbors: float):
        super().__init__()
        self.l_in, self.l_msg = list(l_in), list(l_msg)  # lists: TorchScript passes them on as List[int]
        self.channels = channels
        self.paths = edge_paths(self.l_in, self.l_msg)
        self.linear_up = EquivariantLinear(channels, channels, self.l_in)
        self.radial = RadialMLP(num_basis, radial_hidden, len(self.paths) * channels)
        self.linear_out = EquivariantLinear(channels, channels, self.l_msg)
        self.avg_num_neighbors = float(avg_num_neighbors)
        # Optional[int]: edges per chunk; None: from EDGE_CHUNK_ELEMENTS; 0: off (not annotated: TorchScript
        # warns about an annotated None attribute; the scripted forward never chunks)
        self.edge_chunk = None

    def forward(self, h: Features, edge_index: torch.Tensor, unit: torch.Tensor, radial: torch.Tensor,
                envelope: torch.Tensor, compiled: bool = False) -> Features:
        """h: node features [h0 [N, C], h1 [N, C, 3] or None, h2 [N, C, 3, 3] or None]; edge_index [2, E]
        (receiver i, sender j); unit [E, 3] r̂_ij; radial [E, num_basis]; envelope [E]. Returns the message
        features (ranks ``l_msg``) [N, C, ...].

        With more than :data:`MIN_CHUNKS` chunks of edges (:meth:`chunk_edges`; with ``edge_chunk`` set,
        more than one chunk) the edges run in chunks that are recomputed in the backward pass
        (:func:`cartlorem.tensors.chunked_edge_sum`): the same numbers to rounding, with the per-edge
        intermediates of one chunk alive instead of those of all edges.

        Outside TorchScript this runs :meth:`_forward_component_major` (faster, equal to rounding); the
        code below is what TorchScript compiles (the export), never chunked."""
        if not torch.jit.is_scripting():  # eager (training, inference): the component-major path
            return self._forward_component_major(h, edge_index, unit, radial, envelope, compiled)
        i, j = edge_index[0], edge_index[1]
        n_nodes = _present(h[0]).shape[0]
        hu = self.linear_up(h)
        hu2 = hu[2]
        if hu2 is not None:  # rank 2 travels over the edges as 6 components (tensors.fused)
            hu = [hu[0], hu[1], sym_to_compact(hu2)]
        edge_msg = self._edge_messages(compiled, j, unit, radial, envelope, _present(hu[0]), hu[1], hu[2])
        msg: List[torch.Tensor] = []
        for m in edge_msg:
            agg = torch.zeros([n_nodes] + list(m.shape[1:]), dtype=m.dtype, device=m.device)
            msg.append(agg.index_add_(0, i, m))
        out: Features = [None, None, None]
        for l, agg in zip(self.l_msg, msg):
            agg = agg / self.avg_num_neighbors
            out[l] = compact_to_sym(agg) if l == 2 else agg
        return self.linear_out(out)

    @torch.jit.unused
    def _forward_component_major(self, h, edge_index, unit, radial, envelope, compiled):
        """:meth:`forward` outside TorchScript: the same message with the Cartesian components before the
        channels on the edges ([E, 3, C], compact [E, 6, C]; :func:`component_major_edge_product`), so that
        the edge work is elementwise along contiguous channels and the channel mixings are single GEMMs.
        Equal to the scripted path to rounding (tests/test_fast_training_kernel.py)."""
        i, j = edge_index[0], edge_index[1]
        n_nodes = _present(h[0]).shape[0]
        h1, h2 = h[1] if len(h) > 1 else None, h[2] if len(h) > 2 else None
        hu = _mix_component_major(self.linear_up, [h[0], None if h1 is None else h1.transpose(1, 2),
                                                   None if h2 is None else sym_to_compact(h2).transpose(1, 2)])
        msg = self._chunked_messages(compiled, n_nodes, i, j, unit, radial, envelope, hu)  # None: not chunked
        if msg is None:
            msg = [m.new_zeros((n_nodes,) + m.shape[1:]).index_add_(0, i, m)
                   for m in self._edge_messages_component_major(compiled, j, unit, radial, envelope, *hu)]
        agg: Features = [None, None, None]
        for l, m in zip(self.l_msg, msg):
            agg[l] = m / self.avg_num_neighbors
        out = _mix_component_major(self.linear_out, agg)  # [N, C], [N, 3, C], [N, 6, C]
        o1, o2 = out[1], out[2]
        return [out[0], None if o1 is None else o1.transpose(1, 2),
                None if o2 is None else compact_to_sym(o2.transpose(1, 2))]

    @torch.jit.unused
    def _edge_messages_component_major(self, compiled, j, unit, radial, envelope, hu0, hu1, hu2):
        """Per-edge messages of ranks ``l_msg``: [E, C], [E, 3, C], compact [E, 6, C]."""
        # index_select, not hu[j]: its backward is an index_add (advanced indexing's is an accumulating index_put)
        return self._gathered_messages(compiled, unit, radial, envelope, hu0.index_select(0, j),
                                       None if hu1 is None else hu1.index_select(0, j),
                                       None if hu2 is None else hu2.index_select(0, j))

    @torch.jit.unused
    def _gathered_messages(self, compiled, unit, radial, envelope, hj0, hj1, hj2):
        """:meth:`_edge_messages_component_major` from the senders' features hj (already gathered)."""
        w = self.radial(radial, envelope).view(-1, len(self.paths), self.channels)
        kernel = compiled_component_major_edge_product if compiled else component_major_edge_product
        msg = kernel([hj0, hj1, hj2], unit, w, self.l_msg)
        return [msg[l] for l in self.l_msg]

    @torch.jit.unused
    def _chunked_messages(self, compiled, n_nodes, i, j, unit, radial, envelope, hu):
        """The summed messages of :meth:`_gathered_messages` by :func:`chunked_edge_sum` (each chunk gets its
        senders' rows of ``hu``) when there are enough edges (see :meth:`forward`), else None."""
        if torch.compiler.is_compiling():  # a traced graph runs unchunked (the compiled training step decides which
            return None                    # batches it takes: cartlorem.training.compiled)
        chunk = self._chunk_for(i.shape[0], unit.device)
        if not chunk:
            return None
        params = list(self.radial.parameters())
        return chunked_edge_sum(partial(self._gathered_messages, compiled), n_nodes, i, (unit, radial, envelope),
                                hu, params, chunk, senders=j)

    @torch.jit.unused
    def _chunk_for(self, n_edges: int, device: torch.device) -> int:
        """Edges per chunk with which :meth:`forward` runs ``n_edges`` edges, or 0 where it does not chunk them: on
        the CPU by default above :data:`MIN_CHUNKS` chunks (see there), on CUDA or with ``edge_chunk`` set above one."""
        chunk = self.chunk_edges(device)
        threshold = chunk if self.edge_chunk is not None or torch.device(device).type == "cuda" else MIN_CHUNKS * chunk
        return chunk if chunk > 0 and n_edges > threshold else 0

    @torch.jit.unused
    def chunks(self, n_edges: int, device: torch.device) -> bool:
        """Whether :meth:`forward` runs ``n_edges`` edges in chunks (:func:`cartlorem.tensors.chunked_edge_sum`, an
        autograd.Function that torch.func transforms, and so the compiled training step, cannot take)."""
        return self._chunk_for(int(n_edges), device) > 0

    @torch.jit.unused
    def chunk_edges(self, device: torch.device) -> int:
        """Edges per chunk of the message computation: ``self.edge_chunk`` if set (0: no chunking), else
        :data:`EDGE_CHUNK_ELEMENTS` / C on the CPU, and on CUDA the edges that fit in
        :data:`CUDA_MEMORY_FRACTION` of the free GPU memory (at least 16 × EDGE_CHUNK_ELEMENTS / C)."""
        if self.edge_chunk is not None:
            return int(self.edge_chunk)
        device = torch.device(device)
        if device.type == "cuda":
            fits = int(CUDA_MEMORY_FRACTION * _cuda_free_bytes(device)) // (CUDA_BYTES_PER_EDGE_CHANNEL * self.channels)
            return max(fits, 16 * EDGE_CHUNK_ELEMENTS // self.channels, 1)
        return max(EDGE_CHUNK_ELEMENTS // self.channels, 1)

    def _edge_messages(self, compiled: bool, j: torch.Tensor, unit: torch.Tensor, radial: torch.Tensor,
                       envelope: torch.Tensor, hu0: torch.Tensor, hu1: Optional[torch.Tensor],
                       hu2: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """Per-edge messages [E, C, ...] of ranks ``l_msg`` (rank 2 compact) from the mixed node features."""
        hj: Features = [hu0[j], None if hu1 is None else hu1[j], None if hu2 is None else hu2[j]]  # [E, C, ...]
        w = self.radial(radial, envelope).view(-1, len(self.paths), self.channels)
        msg: Optional[Features] = None
        if not torch.jit.is_scripting():  # torch.compile: eager inference only
            if compiled:
                msg = compiled_compact_edge_product(hj, unit, w, self.l_msg)
        if msg is None:
            msg = compact_edge_product(hj, unit, w, self.l_msg)
        return [_present(msg[l]) for l in self.l_msg]


def _mix_component_major(linear: EquivariantLinear, xs: Features) -> Features:
    """``linear`` (an :class:`EquivariantLinear`) applied to component-major features [x0 [N, C],
    x1 [N, 3, C], x2 [N, k, C]] (any number k of components): one GEMM x @ W per rank."""
    out: Features = [None, None, None]
    for k, weight in enumerate(linear.weights):
        rank = linear.ranks[k]
        x = xs[rank]
        if x is not None:
            y = x @ weight
            if rank == 0 and linear.bias is not None:
                y = y + linear.bias
            out[rank] = y
    return out


class BodyOrderProduct(nn.Module):
    """B = Σ_{ν ≤ correlation} Σ_paths w[Z, path, c] (A ⊗ … ⊗ A), evaluated Horner-style:

        Y ← u_ν[Z] A;   then (correlation − 1) times:   Y ← Σ_paths w[Z, path, c] product(Y, A) + u[Z] A

    which is a polynomial of degree ``correlation`` in A with every body order up to it, built only
    from the Cartesian products (no CG tables). Weights depend on the species and the channel.
    """

    def __init__(self, channels: int, num_species: int, correlation: int, l_in: Sequence[int], l_out: Sequence[int],
                 product_ranks: Optional[Sequence[int]] = None):
        """``product_ranks``: the ranks of ``l_out`` that the last stage's products reach (None: all); the
        others are the linear term of that stage only, v[Z] A_l, so that the block outputs them at the body
        order of the message, without the products' cost (their paths, backward and double backward)."""
        super().__init__()
        if correlation < 1:
            raise ValueError(f"correlation must be >= 1, got {correlation}")
        self.l_in, self.l_out, self.correlation = list(l_in), list(l_out), int(correlation)
        product_ranks = self.l_out if product_ranks is None else [l for l in self.l_out if l in product_ranks]
        self.product_ranks = list(product_ranks)
        lmid = self.l_in  # intermediate Y keeps the ranks of A
        self.stage_paths = []
        self.path_weights = nn.ParameterList()
        self.linear_weights = nn.ParameterList()
        # first: Y = u A  (ranks of the first Y: those needed by later stages, or l_out if correlation == 1)
        first_ranks = self.l_out if correlation == 1 else lmid
        self.first_ranks = list(first_ranks)
        self.first = nn.Parameter(torch.ones(num_species, len(first_ranks), channels))
        for stage in range(correlation - 1):
            last = stage == correlation - 2
            targets = self.l_out if last else lmid
            paths = paths_to(lmid, self.l_in, self.product_ranks if last else targets, parity="even")
            self.stage_paths.append(list(paths))
            fan = {l3: sum(1 for p in paths if p[2] == l3) for l3 in targets}
            init = torch.randn(num_species, len(paths), channels)
            init = init / torch.tensor([math.sqrt(fan[p[2]]) for p in paths])[None, :, None]
            self.path_weights.append(nn.Parameter(init))
            self.linear_weights.append(nn.Parameter(torch.ones(num_species, len(targets), channels)))

    def forward(self, A: Features, species: torch.Tensor) -> Features:
        if not torch.jit.is_scripting():
            return self._forward_grouped(A, species)
        Y: Features = [None, None, None]
        u = self.first[species]  # [N, R, C]
        for uk, l in zip(u.unbind(1), self.first_ranks):
            Y[l] = uk.reshape(list(uk.shape) + [1] * l) * _present(A[l])
        stage = 0
        for path_weights, linear_weights in zip(self.path_weights, self.linear_weights):
            paths = self.stage_paths[stage]
            w = path_weights[species]  # [N, P, C]
            lin = linear_weights[species]  # [N, R, C]
            last = stage == len(self.stage_paths) - 1
            targets = self.l_out if last else self.l_in
            new: Features = [None, None, None]
            for wk, path in zip(w.unbind(1), paths):
                l1, l2, l3 = path
                term = wk.reshape(list(wk.shape) + [1] * l3) * product(_present(Y[l1]), l1, _present(A[l2]), l2, l3)
                acc = new[l3]
                new[l3] = term if acc is None else acc + term
            for lk, l in zip(lin.unbind(1), targets):
                term = lk.reshape(list(lk.shape) + [1] * l) * _present(A[l])
                acc = new[l]
                new[l] = term if acc is None else acc + term
            Y = new
            stage += 1
        return Y

    @torch.jit.unused
    def _forward_grouped(self, A: Features, species: torch.Tensor) -> Features:
        """:meth:`forward` outside TorchScript: each stage with the paths grouped by what they share
        (module docstring of cartlorem.tensors.products for the normalisations):

            new0 = A0 (w000 Y0 + v0) + w110 Y1·A1 + (2/3) w220 Y2:A2
            new1 = A1 (w011 Y0 + v1) + w101 A0 Y1 + Σ_b (w121 A2 Y1ᵀ + w211 Y2 A1ᵀ)_ab
            new2 = A2 (w022 Y0 + v2) + w202 A0 Y2 + STF(3/2 w112 Y1 A1ᵀ + 2 w222 Y2 A2)

        (v the linear weights; STF is linear, so the two rank-2 paths share one projection). About half
        the operations of the path-by-path form, and of its first and second derivatives; equal to it to
        rounding (tests/test_fast_training_kernel.py)."""
        Y: Features = [None, None, None]
        u = self.first.index_select(0, species)  # [N, R, C]
        for uk, l in zip(u.unbind(1), self.first_ranks):
            Y[l] = uk.reshape(list(uk.shape) + [1] * l) * _present(A[l])
        for stage, (path_weights, linear_weights) in enumerate(zip(self.path_weights, self.linear_weights)):
            last = stage == len(self.stage_paths) - 1
            targets = self.l_out if last else self.l_in
            w = dict(zip(self.stage_paths[stage], path_weights.index_select(0, species).unbind(1)))  # (l1, l2, l3) → [N, C]
            v = dict(zip(targets, linear_weights.index_select(0, species).unbind(1)))  # rank → [N, C]
            Y = _grouped_stage(Y, A, w, v, targets)
        return Y


def _grouped_stage(Y: Features, A: Features, w: dict, v: dict, targets) -> Features:
    """One Horner stage Σ_paths w_path product(Y_l1, A_l2) + v_l A_l with the paths grouped (see
    :meth:`BodyOrderProduct._forward_grouped`). w: {(l1, l2, l3): [N, C]}, v: {l: [N, C]}; features
    [N, C], [N, C, 3], [N, C, 3, 3]."""
    def wt(key, rank):  # the weight of a path broadcast against rank-``rank`` features, or None
        x = w.get(key)
        return None if x is None else x.reshape(list(x.shape) + [1] * rank)

    def add(acc, term):
        return term if acc is None else acc + term

    new: Features = [None, None, None]
    for l in targets:
        # A_l (w_{0ll} Y0 + v_l): the (0, l, l) path and the linear term share A_l
        coef = v[l]
        w0 = w.get((0, l, l))
        if w0 is not None and Y[0] is not None:
            coef = torch.addcmul(coef, w0, Y[0])
        acc = coef.reshape(list(coef.shape) + [1] * l) * A[l]
        if l > 0 and (l, 0, l) in w and Y[l] is not None:  # w_{l0l} A0 Y_l
            acc = acc + (w[(l, 0, l)] * A[0]).reshape(list(coef.shape) + [1] * l) * Y[l]
        if l == 0:
            if (1, 1, 0) in w and Y[1] is not None:
                acc = torch.addcmul(acc, w[(1, 1, 0)], (Y[1] * A[1]).sum(-1))
            if (2, 2, 0) in w and Y[2] is not None:
                acc = torch.addcmul(acc, w[(2, 2, 0)], (Y[2] * A[2]).sum((-1, -2)), value=2.0 / 3.0)
        elif l == 1:
            x = None  # [N, C, 3, 3] whose row sums are A2 Y1 (w121) + Y2 A1 (w211)
            if (1, 2, 1) in w and Y[1] is not None:
                x = wt((1, 2, 1), 2) * A[2] * Y[1][..., None, :]
            if (2, 1, 1) in w and Y[2] is not None:
                x = add(x, wt((2, 1, 1), 2) * Y[2] * A[1][..., None, :])
            if x is not None:
                acc = acc + x.sum(-1)
        else:
            x = None  # STF(3/2 w112 Y1 A1ᵀ + 2 w222 Y2 A2)
            if (1, 1, 2) in w and Y[1] is not None:
                x = (1.5 * wt((1, 1, 2), 2)) * (Y[1][..., :, None] * A[1][..., None, :])
            if (2, 2, 2) in w and Y[2] is not None:
                x = add(x, (2.0 * wt((2, 2, 2), 2)) * (Y[2][..., :, :, None] * A[2][..., None, :, :]).sum(-2))
            if x is not None:
                acc = acc + stf(x)
        new[l] = acc
    return new


class SpeciesLinear(nn.Module):
    """Channel mixing with a separate weight matrix for each species (the residual skip); the ranks in
    ``shared_ranks`` have one matrix for all species (weight [1, C_in, C_out]: a plain GEMM, not one per species)."""

    def __init__(self, in_channels: int, out_channels: int, num_species: int, ranks: Sequence[int],
                 shared_ranks: Sequence[int] = ()):
        super().__init__()
        self.ranks = list(ranks)
        self.shared_ranks = [l for l in self.ranks if l in shared_ranks]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(1 if l in self.shared_ranks else num_species, in_channels, out_channels)
                          / math.sqrt(in_channels)) for l in self.ranks]
        )
        self.out_channels = out_channels
        self.num_species = int(num_species)

    def forward(self, h: Features, species: torch.Tensor) -> Features:
        if not torch.jit.is_scripting():
            return self._forward_all_species(h, species)
        out: Features = [None, None, None]
        present = torch.unique(species)
        for k, weight in enumerate(self.weights):  # TorchScript: ParameterList entries by iteration only
            l = self.ranks[k]
            x = h[l]
            if x is not None:
                if weight.shape[0] == 1:  # shared by the species
                    out[l] = mix_channels(x, weight[0], l)
                else:
                    y = x.new_zeros([x.shape[0], self.out_channels] + list(x.shape[2:]))
                    for s in present:
                        mask = species == s
                        y[mask] = mix_channels(x[mask], weight[s], l)
                    out[l] = y
        return out

    @torch.jit.unused
    def _forward_all_species(self, h: Features, species: torch.Tensor) -> Features:
        """:meth:`forward` outside TorchScript: every node through the weights of every species (one
        batched GEMM [S, N·3^l, C_in] @ [S, C_in, C_out] per rank), then each node's own species picked by
        a one-hot sum — no masks, no data-dependent shapes, three operations per rank instead of five per
        species present. S× the multiply-adds of the masked form; S is the number of species (a few)."""
        S = self.num_species
        onehot = (species[None, :] == torch.arange(S, device=species.device)[:, None])  # [S, N]
        out: Features = [None, None, None]
        for k, weight in enumerate(self.weights):
            l = self.ranks[k]
            x = h[l]
            if x is None:
                continue
            if weight.shape[0] == 1 and l in self.shared_ranks:
                out[l] = mix_channels(x, weight[0], l)
                continue
            N, C = x.shape[0], x.shape[1]
            # [1, N·3^l, C_in], components before channels (sizes, not -1: zero nodes too)
            xm = x.reshape(N, C, 3**l).transpose(1, 2).reshape(1, N * 3**l, C)
            y = torch.matmul(xm, weight)  # [S, N·3^l, C_out]
            y = y.view(S, N, 3**l, self.out_channels)
            y = (y * onehot.to(y.dtype)[:, :, None, None]).sum(0)  # [N, 3^l, C_out]: each node's own species
            out[l] = y.transpose(1, 2).reshape([N, self.out_channels] + list(x.shape[2:]))
        return out
