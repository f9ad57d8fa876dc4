"""A trained model as TorchScript: what engines that load ``torch.jit`` files (metatomic, LAMMPS
pair styles, C++ drivers) run.

:class:`ExportedCartLorem` is built from a :class:`cartlorem.CartLorem` and shares its weights and
its blocks (interaction, products, mixing, readouts, the long-range block's maps); only the
composition of :meth:`CartLorem.energy <cartlorem.model.CartLorem.energy>` and the electrostatics are
restated here with plain tensors, which TorchScript compiles. Its inputs are tensors, never a Graph:

    positions [N, 3] Å, species [N] atomic numbers, cell [B, 3, 3] Å (rows are lattice vectors),
    pbc [B, 3] bool, edge_index [2, E] (centre i, neighbour j), edge_shift [E, 3] lattice images
    (r_ij = positions[j] − positions[i] + edge_shift @ cell[batch[i]]), batch [N], total_charge [B] e

— the graph of :func:`cartlorem.graph.atoms_to_graph`, field by field. :meth:`ExportedCartLorem.energy`
gives "energy" [B] (eV), "node_energy" [N] and, for long-range models, channel 0 of the learned
multipoles; :meth:`ExportedCartLorem.forward` adds "forces" [N, 3] (eV/Å) and "stress" [B, 3, 3]
(eV/Å³, zero rows for structures that are not fully periodic) by ``torch.autograd.grad`` inside the
scripted code.

What the exported model computes, against the Python model:

* local models: the same function (same numbers to float rounding), any boundary conditions;
* long-range models, open structures (pbc all False): the same all-pairs direct sum;
* long-range models, fully periodic cells: Ewald summation with the splitting at the smearing width
  (α = 1/(√2 σ)), where the real-space part vanishes and only the reciprocal sum, the self term and
  the neutralising background remain, with the k-space cutoff for the model's ``accuracy``. This is
  what the Python model's parameter rule picks for smeared sources in the cells it sums by Ewald with up to
  (2√2 σ)³ per atom (22.6 Å³ at σ = 1 Å; same numbers to rounding); in more dilute cells it splits at a smaller α
  with a real-space part, and in large cells it picks particle-mesh Ewald: there the two agree to ``accuracy``.
  The cost is O(N × number of k-vectors), i.e. O(N × V): for cells of up to a few hundred atoms; larger periodic
  systems belong to the Python model (PME).
* refused at call time with an error (ValueError; a torch.jit.Error from C++): NaN or inf in the positions or
  cells, atoms closer than 0.1 Å (naming them), structure indices past the cells given, and, naming the structure
  or the atomic numbers: slabs
  (pbc = [True, True, False]) and other mixed boundary conditions for long-range models (local models
  take any pbc), unknown species. Not exported: electric fields, dipole and Born-charge outputs
  (the Python model has them), ``compile_kernels`` (torch.compile; the script runs the eager kernel).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .ewald.fields import intra_pairs, pair_fields
from .graph import _MIN_DISTANCE
from .ewald.kernels import cell_volume, erf_series_downward
from .tensors import stf
from .tensors.products import product
from .units import COULOMB

#: Pairs per chunk of the exported open-structure field sum (``_ExportedLongRange._open_fields``). Its per-pair
#: terms ([P, C, 3, 3] and smaller) are then at most ~10 MB each (C = 4, float32) instead of growing with N²:
#: energy + forces of a 648-atom open water cluster took 1.09-1.10 s with 2^16 pairs per chunk against 1.42-1.67 s
#: unchunked (2^11: 1.51 s, 2^13: 1.20 s, 2^15: 1.12 s, 2^17: 1.09 s, 2^18: 1.22 s; benchmarks/export_cluster.py).
PAIR_CHUNK = 1 << 16

__all__ = ["ExportedCartLorem", "export_model", "save_exported"]


def _present(x: Optional[torch.Tensor]) -> torch.Tensor:
    """``x``, known not to be None (a type refinement for TorchScript)."""
    assert x is not None
    return x


class _ExportedLongRange(nn.Module):
    """The long-range block of a CartLorem (:class:`cartlorem.nn.long_range.LongRangeBlock`) on tensors.

    Shares the block's maps and couplings; the fields of the learned (smeared) multipoles come from the
    direct sum (open structures) or reciprocal-space Ewald (periodic cells) below.
    """

    def __init__(self, block):
        super().__init__()
        from .ewald.ewald import tail_parameter
        from .ewald.kernels import (_SERIES_TERMS, _SERIES_TERMS_FLOAT32, _SERIES_X, InteractionTensors, Layout,
                                    smearing_beta)

        self.kind: str = block.kind
        self.lmax: int = block.lmax
        self.field_ranks: List[int] = list(block.field_ranks)
        self.smearing: float = float(block.smearing)
        self.uniform_correction: bool = block.charge_correction == "uniform"
        self.weighted_correction: bool = block.charge_correction == "weighted"
        self.to_multipoles = block.to_multipoles
        self.from_fields = block.from_fields
        self.update = block.update
        self.readout = block.readout
        self.correction_weight = block.correction_weight if self.weighted_correction else None
        self.register_buffer("coupling_channel0", block.coupling_channel0)  # a buffer: moves with .to()
        self.coupling_others = block.coupling_others
        # the Ewald parameters of cartlorem.ewald.ewald for α = β (no real-space part): k_c = 2 p β
        self.beta: float = smearing_beta(self.smearing)
        source_ranks = tuple(range(self.lmax + 1)) if self.kind == "multipole" else (0,)
        field_ranks = (0, 1, 2) if self.kind == "multipole" else (0,)
        order = InteractionTensors(Layout(field_ranks), Layout(source_ranks)).max_order
        self.k_cutoff: float = 2.0 * tail_parameter(float(block.accuracy), order) * self.beta
        self.series_x: float = float(_SERIES_X)
        self.series_terms: int = int(_SERIES_TERMS)  # float64; float32 (and lower) sum fewer terms
        self.series_terms_float32: int = int(_SERIES_TERMS_FLOAT32)
        self.coulomb: float = COULOMB  # eV Å / e² (TorchScript reads no global floats)
        self.pair_chunk: int = PAIR_CHUNK

    # --- radial kernel of Gaussian sources: B_n of erf(βR)/R (as cartlorem.ewald.kernels) ------------
    def _kernel(self, r2: torch.Tensor, max_order: int) -> List[torch.Tensor]:
        """``B_0 .. B_max_order`` [P] of ``erf(βR)/R`` at r2 [P] (Å²): 1/R − erfc(βR)/R by Smith's
        recursion, and where β²R² < 2 its Taylor series (:func:`~cartlorem.ewald.kernels.erf_series_downward`, as
        ``RadialKernel.smeared(σ).derivatives``)."""
        beta = self.beta
        near = beta * beta * r2 < self.series_x
        far_r2 = torch.where(near, torch.ones_like(r2), r2)
        r = torch.sqrt(far_r2)
        inv_r2 = 1.0 / far_r2
        coulomb = [1.0 / r]
        screened = [torch.special.erfc(beta * r) / r]
        gauss = torch.exp(-beta * beta * far_r2) / (beta * math.sqrt(math.pi))
        for n in range(1, max_order + 1):
            coulomb.append((2 * n - 1) * coulomb[-1] * inv_r2)
            screened.append(((2 * n - 1) * screened[-1] + (2.0 * beta * beta) ** n * gauss) * inv_r2)
        terms = self.series_terms if r2.dtype == torch.float64 else self.series_terms_float32
        series = erf_series_downward(beta, torch.where(near, r2, torch.zeros_like(r2)), max_order, terms)
        out: List[torch.Tensor] = []
        for n in range(max_order + 1):
            out.append(torch.where(near, series[n], torch.add(coulomb[n], screened[n], alpha=-1.0)))
        return out

    # --- fields ---------------------------------------------------------------------------------
    def _open_fields(self, positions: torch.Tensor, batch: torch.Tensor, q: torch.Tensor, mu: Optional[torch.Tensor],
                     th: Optional[torch.Tensor], want_E: bool, want_G: bool
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Direct sum over all pairs within each structure (open boundaries), :data:`PAIR_CHUNK` pairs at a time, so
        that the per-pair [P, C, 3, 3] terms of a large cluster do not grow with N² (benchmarks/export_cluster.py)."""
        i_all, j_all = intra_pairs(batch)
        order = (2 if want_G else (1 if want_E else 0)) + (2 if th is not None else (1 if mu is not None else 0))
        n, c = q.shape[0], q.shape[1]
        phi = torch.zeros_like(q)
        E = q.new_zeros(n, c, 3)  # summed over the chunks, returned when wanted
        G = q.new_zeros(n, c, 3, 3)
        for start in range(0, i_all.shape[0], self.pair_chunk):
            i = i_all[start:start + self.pair_chunk]
            j = j_all[start:start + self.pair_chunk]
            R = positions[i] - positions[j]  # [P, 3]
            B = self._kernel((R * R).sum(-1), order)
            phi_c, E_c, G_c = pair_fields(R, i, n, q[j], None if mu is None else mu[j],
                                          None if th is None else th[j], B, True, want_E, want_G)
            phi = phi + _present(phi_c)
            if E_c is not None:
                E = E + E_c
            if G_c is not None:
                G = G + G_c
        return phi, E if want_E else None, G if want_G else None

    def _ewald_fields(self, positions: torch.Tensor, cell: torch.Tensor, q: torch.Tensor, mu: Optional[torch.Tensor],
                      th: Optional[torch.Tensor], want_E: bool, want_G: bool
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """One periodic cell [3, 3]: reciprocal sum − self term + background, splitting α = β.

        With S(k) = Σ_j (q_j − i k·μ_j − ½ kᵀΘ_j k) e^{−i k·r_j} and w(k) = (4π/V) e^{−k²/4α²}/k² over all
        k ≠ 0 (twice the half space): φ = Σ w Re[S e^{ik·r}], E = Σ w Re[−i k S e^{ik·r}],
        G = Σ w Re[k kᵀ S e^{ik·r}] (cartlorem DESIGN.md, Long range)."""
        alpha = self.beta
        n, C = q.shape[0], q.shape[1]
        # positions into the cell (integers held constant, float64), as cartlorem.ewald.ewald.wrap_positions
        r64, c64 = positions.double(), cell.double()
        shift = torch.floor(r64.detach() @ torch.linalg.inv(c64.detach()))
        positions = (r64 - shift @ c64).to(positions.dtype)
        volume = cell_volume(cell)
        recip = 2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1)  # rows b_k, a_i·b_k = 2π δ_ik
        m = self._kvector_indices(c64.detach())
        k = m.to(positions.dtype) @ recip  # [K, 3] 1/Å, differentiable in the cell
        k2 = (k * k).sum(-1)
        w = 2.0 * 4.0 * math.pi * torch.exp(-k2 / (4.0 * alpha * alpha)) / k2 / volume  # [K], ×2: both halves
        phase = k @ positions.transpose(0, 1)  # [K, N]
        cos, sin = torch.cos(phase), torch.sin(phase)
        a_q, b_q = cos @ q, sin @ q  # [K, C]: Σ_j cos(k·r_j) q_j, Σ_j sin(k·r_j) q_j
        s_re, s_im = a_q, -b_q
        if mu is not None:
            a_mu = (cos @ mu.reshape(n, C * 3)).view(-1, C, 3)
            b_mu = (sin @ mu.reshape(n, C * 3)).view(-1, C, 3)
            s_re = s_re - (b_mu * k[:, None, :]).sum(-1)
            s_im = s_im - (a_mu * k[:, None, :]).sum(-1)
        kk = k[:, :, None] * k[:, None, :]  # [K, 3, 3]
        if th is not None:
            a_th = (cos @ th.reshape(n, C * 9)).view(-1, C, 3, 3)
            b_th = (sin @ th.reshape(n, C * 9)).view(-1, C, 3, 3)
            s_re = s_re - 0.5 * (a_th * kk[:, None]).sum((-1, -2))
            s_im = s_im + 0.5 * (b_th * kk[:, None]).sum((-1, -2))
        u, v = w[:, None] * s_re, w[:, None] * s_im  # [K, C]
        root_pi = math.sqrt(math.pi)
        phi = cos.transpose(0, 1) @ u - sin.transpose(0, 1) @ v - (2.0 * alpha / root_pi) * q  # [N, C]
        # neutralising background of a net charge (zero for α = β, kept for the formula's sake)
        total = q.sum(0)  # [C]
        phi = phi - math.pi * (1.0 / (alpha * alpha) - 2.0 * self.smearing * self.smearing) * total / volume
        E: Optional[torch.Tensor] = None
        G: Optional[torch.Tensor] = None
        if want_E:
            ku = (k[:, None, :] * u[:, :, None]).reshape(-1, C * 3)  # [K, C·3]
            kv = (k[:, None, :] * v[:, :, None]).reshape(-1, C * 3)
            E = (sin.transpose(0, 1) @ ku + cos.transpose(0, 1) @ kv).view(n, C, 3)
            if mu is not None:
                E = E + (4.0 * alpha**3 / (3.0 * root_pi)) * mu
        if want_G:
            kku = (kk[:, None] * u[:, :, None, None]).reshape(-1, C * 9)
            kkv = (kk[:, None] * v[:, :, None, None]).reshape(-1, C * 9)
            G = (cos.transpose(0, 1) @ kku - sin.transpose(0, 1) @ kkv).view(n, C, 3, 3)
            eye = torch.eye(3, dtype=q.dtype, device=q.device)
            G = G - (4.0 * alpha**3 / (3.0 * root_pi)) * q[..., None, None] * eye
            if th is not None:
                G = G + (8.0 * alpha**5 / (5.0 * root_pi)) * th
        return phi, E, G

    def _kvector_indices(self, cell: torch.Tensor) -> torch.Tensor:
        """Integer indices m [K, 3] of the half space of k-vectors with 0 < |k| < k_c (cell [3, 3] float64),
        as :func:`cartlorem.ewald.ewald.kvector_indices`."""
        k_c = self.k_cutoff
        recip = 2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1)
        bound: List[int] = torch.floor(k_c * torch.linalg.vector_norm(cell, dim=1) / (2.0 * math.pi)).long().tolist()
        axes = [torch.arange(-b, b + 1, device=cell.device) for b in bound]
        grid = torch.stack(torch.meshgrid(axes, indexing="ij"), -1).reshape(-1, 3)
        half = (grid[:, 0] > 0) | ((grid[:, 0] == 0) & (grid[:, 1] > 0)) | (
            (grid[:, 0] == 0) & (grid[:, 1] == 0) & (grid[:, 2] > 0))
        grid = grid[half]
        return grid[torch.linalg.vector_norm(grid.double() @ recip, dim=1) < k_c]

    def _fields(self, positions: torch.Tensor, batch: torch.Tensor, cell: torch.Tensor, periodic: torch.Tensor,
                q: torch.Tensor, mu: Optional[torch.Tensor], th: Optional[torch.Tensor], want_E: bool, want_G: bool
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(φ [N, C], E [N, C, 3], G [N, C, 3, 3]) for a batch: open structures together, cells one by one."""
        n, C = q.shape[0], q.shape[1]
        phi = q.new_zeros(n, C)
        E: Optional[torch.Tensor] = q.new_zeros(n, C, 3) if want_E else None
        G: Optional[torch.Tensor] = q.new_zeros(n, C, 3, 3) if want_G else None
        atom_periodic = periodic[batch]
        groups: List[Tuple[int, torch.Tensor]] = []
        open_atoms = (~atom_periodic).nonzero().flatten()
        if open_atoms.numel() > 0:
            groups.append((-1, open_atoms))
        cells: List[int] = periodic.nonzero().flatten().tolist()
        for b in cells:
            idx = (batch == b).nonzero().flatten()
            if idx.numel() > 0:
                groups.append((b, idx))
        for b, idx in groups:
            sub_mu = None if mu is None else mu[idx]
            sub_th = None if th is None else th[idx]
            if b < 0:
                f = self._open_fields(positions[idx], batch[idx], q[idx], sub_mu, sub_th, want_E, want_G)
            else:
                f = self._ewald_fields(positions[idx], cell[b], q[idx], sub_mu, sub_th, want_E, want_G)
            phi = phi.index_copy(0, idx, f[0])
            if E is not None:
                E = E.index_copy(0, idx, _present(f[1]))
            if G is not None:
                G = G.index_copy(0, idx, _present(f[2]))
        return phi, E, G

    def forward(self, h: List[Optional[torch.Tensor]], positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                batch: torch.Tensor, total_charge: torch.Tensor) -> Dict[str, torch.Tensor]:
        """As ``LongRangeBlock.forward``: "readout" [N], "electrostatic" [N] (eV), "charges" [N], ..."""
        periodic = pbc.all(dim=1)
        ok = periodic | ~pbc.any(dim=1)
        if not bool(ok.all()):
            k = int((~ok).nonzero()[0])
            flags: List[bool] = pbc[k].tolist()
            raise ValueError(
                f"structure {k} has pbc = {flags}: the exported (TorchScript) long-range model sums open "
                "structures (pbc all False) and fully periodic cells (pbc all True); slabs and other mixed "
                "boundary conditions need the Python model (cartlorem.load_model)")
        xs = self.to_multipoles(h[: self.lmax + 1])
        q = _present(xs[0])
        mu = xs[1] if self.lmax >= 1 else None
        theta = xs[2] if self.lmax >= 2 else None
        h0 = _present(h[0])
        if self.uniform_correction or self.weighted_correction:
            q = self._correct_charges(q, batch, total_charge, h0, cell.shape[0])
        fields: List[Optional[torch.Tensor]] = []  # potential-like features of rank 0, 1, 2
        if self.kind == "multipole":
            if theta is not None:
                theta = stf(stf(theta))  # twice: see LongRangeBlock.forward
            phi, E, G = self._fields(positions, batch, cell, periodic, q, mu, theta, True, True)
            E, G = _present(E), _present(G)
            e_es = q * phi
            if mu is not None:
                e_es = e_es - (mu * E).sum(-1)
            if theta is not None:
                e_es = e_es - 0.5 * (theta * G).sum((-1, -2))
            fields.append(phi)
            fields.append(E)
            fields.append(stf(G))  # a net-charge background adds −4πQ/(3V) I: not a rank-2 feature
        else:  # "lorem": every Cartesian component of the charges through the scalar kernel
            n, c = q.shape[0], q.shape[1]
            sources: List[torch.Tensor] = [q]
            if mu is not None:
                sources.append(mu)
            if theta is not None:
                sources.append(theta)
            stacked = torch.cat([s.reshape(n, -1) for s in sources], dim=1)
            pot = self._fields(positions, batch, cell, periodic, stacked, None, None, False, False)[0]
            e_es = torch.zeros_like(q)
            start = 0
            for s in sources:
                size = s[0].numel()
                p = pot[:, start:start + size].reshape(s.shape)
                fields.append(p)
                e_es = e_es + (s * p).reshape(n, c, -1).sum(-1)
                start += size
        coupling = torch.cat([self.coupling_channel0.reshape(1), self.coupling_others])
        e_es = self.coulomb * (0.5 * e_es * coupling).sum(-1)  # [N] eV

        F = self.from_fields(fields)
        F0 = _present(F[0])
        invariants = [F0 * h0, F0]
        for l in self.field_ranks:
            if l > 0:
                Fl = _present(F[l])
                if l <= self.lmax:
                    invariants.append(product(Fl, l, _present(h[l]), l, 0))
                invariants.append((Fl * Fl).flatten(2).sum(-1))
        h0_new = h0 + self.update(torch.cat([h0] + invariants, dim=-1))
        out = {"readout": self.readout(h0_new).squeeze(-1), "electrostatic": e_es, "scalars": h0_new,
               "charges": q[:, 0]}
        if mu is not None:
            out["dipoles"] = mu[:, 0]
        if theta is not None:
            out["quadrupoles"] = theta[:, 0]
        return out

    def _correct_charges(self, q: torch.Tensor, batch: torch.Tensor, total_charge: torch.Tensor, h0: torch.Tensor,
                         n_struct: int) -> torch.Tensor:
        """As ``LongRangeBlock._correct_charges``: channel 0 sums to the total charge, the others to 0."""
        weight = self.correction_weight
        if weight is None:
            w = torch.ones_like(q[:, :1])
        else:
            w = nn.functional.softplus(weight(h0)) + 1e-3
        totals = torch.zeros(n_struct, 1, dtype=q.dtype, device=q.device).index_add(0, batch, w)
        sums = torch.zeros(n_struct, q.shape[1], dtype=q.dtype, device=q.device).index_add(0, batch, q)
        target = torch.zeros_like(sums)
        target[:, 0] = total_charge.to(q.dtype)
        return q - w * ((sums - target) / totals)[batch]


class ExportedCartLorem(nn.Module):
    """A :class:`cartlorem.CartLorem` in a form that ``torch.jit.script`` compiles (see the module docstring).

    ``ExportedCartLorem(model)`` shares the model's weights (a later change of the model shows here);
    :func:`export_model` makes an independent scripted copy.
    """

    def __init__(self, model):
        super().__init__()
        from .model import CartLorem

        if not isinstance(model, CartLorem):
            raise TypeError(f"expected a CartLorem, got {type(model).__name__}")
        if model.dtype not in (torch.float32, torch.float64):  # float16 ran 0.12 eV off, bfloat16 12 eV
            raise ValueError(f"exported models run in float32 or float64; this one is {str(model.dtype)[6:]} "
                             "(model.float() or model.double() first)")
        block = model.long_range_block
        self.species: List[int] = list(model.species)
        self.cutoff: float = float(model.cutoff)
        self.min_distance: float = _MIN_DISTANCE  # Å: closer atoms are refused, as by cartlorem.graph
        self.long_range: Optional[str] = model.long_range
        self.lr_before_last: bool = model.placement == "before_last"  # where the block runs (CartLorem.energy)
        # buffers (not plain attributes), so that .to(device / dtype) of the exported module moves them
        self.register_buffer("z_to_index", model.z_to_index)
        self.register_buffer("atomic_energies", model.atomic_energies)
        self.register_buffer("scale", model.scale)
        self.register_buffer("shift", model.shift)
        self.radial_basis = model.radial_basis
        self.envelope = model.envelope
        self.embedding = model.embedding
        self.layers = model.layers
        self.products = model.products
        self.mixers = model.mixers
        self.skips = model.skips
        self.readouts = model.readouts
        self.long_range_block = None if block is None else _ExportedLongRange(block)
        self.conditioning = model.conditioning  # charge/spin-state FiLM (cartlorem.nn.conditioning) or None

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Atomic numbers [N] → model species indices [N]; ValueError naming unknown atomic numbers."""
        idx = self.z_to_index[numbers.clamp(0, 118)]
        bad = (numbers < 1) | (numbers > 118) | (idx < 0)
        if bool(bad.any()):
            unknown: List[int] = torch.unique(numbers[bad]).tolist()
            raise ValueError(f"atomic numbers not known to the model: {unknown}; the model knows {self.species}")
        return idx

    def _check_batch(self, batch: torch.Tensor, n_struct: int) -> None:
        """ValueError for structure indices past the cells given (a bare IndexError inside otherwise)."""
        if batch.numel() > 0 and bool((batch.min() < 0) | (batch.max() >= n_struct)):
            raise ValueError(f"batch holds structure indices from {int(batch.min())} to {int(batch.max())}, outside "
                             f"0..{n_struct - 1} (cells given)")

    @torch.jit.export
    def energy(self, positions: torch.Tensor, species: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
               edge_index: torch.Tensor, edge_shift: torch.Tensor, batch: torch.Tensor,
               total_charge: torch.Tensor, multiplicity: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """"energy" [B] (eV), "node_energy" [N] (eV); long-range models also "energy_lr" [B] and channel 0 of
        the learned multipoles, "charges" [N] (e), "dipoles" [N, 3], "quadrupoles" [N, 3, 3]. Differentiable
        in positions and cell (as CartLorem.energy). ``multiplicity`` [B] (2s + 1, None: singlets) is used by
        models with charge-state conditioning only. Floating inputs are taken in the model's dtype."""
        self._check_batch(batch, cell.shape[0])
        positions, cell, edge_shift, total_charge, multiplicity = self._in_dtype(positions, cell, edge_shift,
                                                                                 total_charge, multiplicity)
        return self._energy(positions, species, cell, pbc, edge_index, edge_shift, batch, total_charge, multiplicity)

    def _in_dtype(self, positions: torch.Tensor, cell: torch.Tensor, edge_shift: torch.Tensor,
                  total_charge: torch.Tensor, multiplicity: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The floating inputs in the model's dtype (``atoms_to_graph`` gives float64 by default)."""
        dtype = self.embedding.dtype
        return (positions.to(dtype), cell.to(dtype), edge_shift.to(dtype), total_charge.to(dtype),
                None if multiplicity is None else multiplicity.to(dtype))

    def _energy(self, positions: torch.Tensor, species: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                edge_index: torch.Tensor, edge_shift: torch.Tensor, batch: torch.Tensor,
                total_charge: torch.Tensor, multiplicity: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """:meth:`energy` of a ``batch`` already checked (:meth:`_check_batch`)."""
        z = self.species_index(species)
        n_struct = cell.shape[0]
        i, j = edge_index[0], edge_index[1]
        shifts = torch.einsum("ek,ekx->ex", edge_shift.to(positions.dtype), cell[batch[i]])
        vec = positions[j] - positions[i] + shifts  # r_ij [E, 3]
        r = torch.linalg.vector_norm(vec, dim=-1)
        # NaN or inf inputs, and (as cartlorem.graph and the calculator) overlapping atoms: errors, not a NaN energy;
        # one host sync when all is well
        finite = torch.isfinite(positions).all() & torch.isfinite(cell).all() & torch.isfinite(edge_shift).all()
        bad = ~finite
        if r.numel() > 0:
            bad = bad | (r.detach().min() < self.min_distance)
        if bool(bad):
            if not bool(finite):
                raise ValueError("positions, cell or edge_shift contain NaN or inf")
            k = int(torch.argmin(r.detach()))
            raise ValueError(f"atoms {int(i[k])} and {int(j[k])} are {float(r[k])} Å apart (overlapping atoms)")
        unit = vec / r[:, None]
        radial = self.radial_basis(r)
        envelope = self.envelope(r)

        h: List[Optional[torch.Tensor]] = [self.embedding[z], None, None]
        conditioning = self.conditioning
        if conditioning is not None:  # total charge and spin state → rank-0 features, as CartLorem.energy
            h[0] = conditioning(self.embedding[z], z, batch, total_charge, multiplicity, pbc)
        node_energy = torch.zeros_like(positions[:, 0])
        out: Dict[str, torch.Tensor] = {}
        lr = self.long_range_block
        last = len(self.layers) - 1
        t = 0
        for layer, prod, mix, skip, readout in zip(self.layers, self.products, self.mixers, self.skips, self.readouts):
            if lr is not None and self.lr_before_last and t == last:  # as CartLorem.energy
                out = lr(h, positions, cell, pbc, batch, total_charge)
                h = [out["scalars"], h[1], h[2]]
            t += 1
            A = layer(h, edge_index, unit, radial, envelope)
            B = mix(prod(A, z))
            sc = skip(h, z)
            new: List[Optional[torch.Tensor]] = [None, None, None]
            for l in range(3):
                b, s = B[l], sc[l]
                new[l] = b if (s is None or b is None) else b + s
            h = new
            node_energy = node_energy + readout(_present(h[0])).squeeze(-1)

        lr_readout = torch.zeros_like(node_energy)
        e_es = torch.zeros_like(node_energy)
        if lr is not None:
            if not self.lr_before_last:
                out = lr(h, positions, cell, pbc, batch, total_charge)
            out.pop("scalars")
            lr_readout, e_es = out.pop("readout"), out.pop("electrostatic")
            node_energy = node_energy + lr_readout
        node_energy = self.scale * node_energy + self.shift + self.atomic_energies[z]
        if lr is not None:
            node_energy = node_energy + e_es
        zeros = torch.zeros(n_struct, dtype=node_energy.dtype, device=node_energy.device)
        # summed in float64, as CartLorem.energy (a float32 total otherwise rounds at every addition)
        out["energy"] = zeros.double().index_add(0, batch, node_energy.double()).to(node_energy.dtype)
        out["node_energy"] = node_energy
        if lr is not None:
            out["energy_lr"] = zeros.index_add(0, batch, self.scale * lr_readout + e_es)
        return out

    def forward(self, positions: torch.Tensor, species: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                edge_index: torch.Tensor, edge_shift: torch.Tensor, batch: torch.Tensor, total_charge: torch.Tensor,
                compute_forces: bool = True, compute_stress: bool = True,
                multiplicity: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """:meth:`energy` plus "forces" [N, 3] (eV/Å) = −∂E/∂r and "stress" [B, 3, 3] (eV/Å³) = (1/V) ∂E/∂ε
        for fully periodic structures (zero rows for the others), as :mod:`cartlorem.forces`. Floating inputs are
        taken in the model's dtype (``atoms_to_graph`` gives float64 by default), and so are the outputs."""
        self._check_batch(batch, cell.shape[0])
        positions, cell, edge_shift, total_charge, multiplicity = self._in_dtype(positions, cell, edge_shift,
                                                                                 total_charge, multiplicity)
        positions = positions.detach().requires_grad_(compute_forces)
        cell = cell.detach()
        strain = torch.zeros_like(cell).requires_grad_(compute_stress)  # [B, 3, 3]
        if compute_stress:
            positions_s = positions + torch.einsum("ni,nij->nj", positions, strain[batch])
            cell_s = cell + cell @ strain
        else:
            positions_s, cell_s = positions, cell
        out = self._energy(positions_s, species, cell_s, pbc, edge_index, edge_shift, batch, total_charge,
                           multiplicity)
        wrt: List[torch.Tensor] = []
        if compute_forces:
            wrt.append(positions)
        if compute_stress:
            wrt.append(strain)
        if len(wrt) > 0:
            grads = torch.autograd.grad([out["energy"].sum()], wrt, allow_unused=True)
            k = 0
            if compute_forces:
                g = grads[0]
                out["forces"] = -g if g is not None else torch.zeros_like(positions)
                k = 1
            if compute_stress:
                g = grads[k]
                g = g if g is not None else torch.zeros_like(cell)
                volume = cell_volume(cell)
                periodic = pbc.all(dim=1) & (volume > 0)
                safe = torch.where(periodic, volume, torch.ones_like(volume))
                out["stress"] = torch.where(periodic[:, None, None], g / safe[:, None, None], torch.zeros_like(g))
        return {key: value.detach() for key, value in out.items()}


def export_model(model) -> torch.jit.ScriptModule:
    """A scripted, independent copy of ``model`` (a CartLorem or a model file path), in eval mode."""
    if isinstance(model, (str, os.PathLike)):
        from .model import load_model

        model = load_model(model)
    model = copy.deepcopy(model).eval()
    return torch.jit.script(ExportedCartLorem(model))


def save_exported(model, path) -> torch.jit.ScriptModule:
    """Script ``model`` (a CartLorem or a model file path) and write it to ``path`` (``torch.jit.load``s it)."""
    from .fileio import atomic_write

    path = os.fspath(path)
    if os.path.isdir(path):
        example = os.path.join(path, "model.pt")
        raise ValueError(f"{path} is a folder: give the exported model a file name (e.g. {example})")
    scripted = export_model(model)
    atomic_write(path, lambda f: torch.jit.save(scripted, f))  # the folder is made; nothing left behind on failure
    return scripted
