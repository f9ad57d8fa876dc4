"""CartLorem: the Cartesian MACE-like potential with optional long-range multipole messages.

Data flow (forward):
  graph → edge geometry (r, Bessel basis × envelope, unit vectors) → species embedding
  → interaction layers (ICTP messages → body-ordered products → mixing + species skip)
  → per-layer scalar readouts → [long-range block: features → (q, μ, Θ) → Ewald → (φ, E, ∇E)
  → invariants → scalar update → energy; by default run after the last layer, on its features (placement
  "end"), or between the last two layers, so that the last layer's messages carry the update ("before_last")]
  → per-atom energies + reference energies → total energy
  → forces = −∂E/∂r, stress = (1/V) ∂E/∂ε (cartlorem.forces)
"""

from __future__ import annotations

import math
import numbers

import os
from collections.abc import Iterable, Mapping
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .fileio import atomic_torch_save
from .forces import with_derivatives
from .graph import _MIN_DISTANCE, Graph, flat_cell_error, flat_periodic_cells
from .nn.blocks import BodyOrderProduct, Interaction, SpeciesLinear
from .nn.conditioning import ChargeStateConditioning
from .nn.radial import BesselBasis, PolynomialEnvelope
from .tensors import EquivariantLinear

__all__ = ["CartLorem", "save_model", "load_model", "model_payload", "upgrade_state_dict"]

LONG_RANGE_CHOICES = (None, "multipole", "lorem")


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"


def _atomic_number(z, what: str) -> int:
    """An atomic number 1..118 from an integer (Python, numpy or a 0-d integer tensor), an element symbol ("O") or
    the digits of a number ("8"); ValueError naming ``what`` for anything else (1.7 is not truncated to 1)."""
    if isinstance(z, torch.Tensor) and z.dim() == 0 and not (z.is_floating_point() or z.dtype == torch.bool):
        z = int(z)
    if isinstance(z, str):
        from ase.data import atomic_numbers

        s = z.strip()
        if atomic_numbers.get(s, 0) > 0:  # "X", the dummy element, is 0
            return atomic_numbers[s]
        if s.isdigit():
            z = int(s)
        else:
            raise ValueError(f"{what}: unknown element {z!r} (atomic numbers 1..118 or element symbols such as 'O')")
    if isinstance(z, bool) or not isinstance(z, numbers.Integral) or not 1 <= z <= 118:
        raise ValueError(f"{what} must be atomic numbers 1..118 or element symbols, got {z!r}")
    return int(z)


def _species_list(species) -> list:
    """The sorted atomic numbers of ``species`` (a sequence of atomic numbers or element symbols, or an integer
    array); ValueError for anything else."""
    if isinstance(species, (torch.Tensor, np.ndarray)):
        species = species.tolist()
    if isinstance(species, (str, bytes)) or not isinstance(species, Iterable):
        raise ValueError(f"species must be a list of atomic numbers 1..118 or element symbols, got {species!r}")
    out = sorted({_atomic_number(z, "species") for z in species})
    if not out:
        raise ValueError("species must name at least one element, got none")
    return out


def _reference_energies(atomic_energies: dict, species: list) -> dict:
    """{Z: E0} → {index of Z in ``species``: float(E0)}; ValueError for a species the model does not know (a
    mistyped key would otherwise leave that element's reference energy at 0, silently) or one given twice."""
    if not isinstance(atomic_energies, Mapping):
        raise ValueError(f"atomic_energies must be a mapping {{Z: E0 in eV}}, got {type(atomic_energies).__name__}")
    out = {}
    for key, e in atomic_energies.items():
        z = _atomic_number(key, "the keys of atomic_energies")
        if z not in species:
            known = ", ".join(_symbol(s) for s in species)
            raise ValueError(f"reference energy for {_symbol(z)} (Z={z}), a species the model does not know "
                             f"(it knows {known})")
        if species.index(z) in out:
            raise ValueError(f"atomic_energies gives the reference energy of {_symbol(z)} (Z={z}) twice")
        out[species.index(z)] = float(e)
    return out


def _check_statistics(avg_num_neighbors=None, scale=None, shift=None, atomic_energies=None) -> None:
    """ValueError for a message normalisation that is not a finite positive number, or a non-finite energy scale,
    shift or reference energy (each would make every energy NaN, inf or of the wrong sign, silently)."""
    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return float("nan")

    if avg_num_neighbors is not None and not 0 < number(avg_num_neighbors) < math.inf:
        raise ValueError(f"avg_num_neighbors must be a finite positive number (the messages are divided by it), "
                         f"got {avg_num_neighbors!r}")
    for name, value in (("scale", scale), ("shift", shift)):
        if value is not None and not math.isfinite(number(value)):
            raise ValueError(f"{name} must be a finite number of eV, got {value!r}")
    for z, e in (atomic_energies or {}).items():
        if not math.isfinite(number(e)):
            raise ValueError(f"the reference energy of Z={z} must be a finite number of eV, got {e!r}")


class CartLorem(nn.Module):
    """Machine-learning interatomic potential on irreducible Cartesian tensors (ranks 0–2).

    Args:
        species: atomic numbers the model knows (integers 1..118, or element symbols such as "O").
        cutoff: local cutoff r_c in Å (default 5).
        long_range: "multipole" (default; learned q, μ, Θ with Ewald interaction tensors), "lorem"
            (each Cartesian component of the equivariant charges with the scalar kernel) or None.
        channels: features per rank (default 64).
        num_layers: interaction layers (default 2).
        correlation: body order of the products (default 3).
        lmax: highest feature rank (0, 1 or 2; default 2); with long range also the highest rank of the
            learned multipoles (0: charges only, 1: charges and dipoles).
        num_basis, radial_hidden: Bessel functions (8) and radial MLP width (64).
        envelope_p: polynomial envelope exponent (5).
        readout_hidden: width of the last layer's readout MLP (16).
        atomic_energies: {Z: E0 in eV} reference energies (default 0; set from data by training); Z an atomic
            number or an element symbol of ``species`` (another species is a ValueError).
        avg_num_neighbors: message normalisation (default 10; set from data by training).
        scale, shift: per-atom energy scale and shift of the learned readouts (eV; default 1, 0). The
            electrostatic energy of the learned multipoles is not scaled: it stays in eV, so the
            reported charges and dipoles keep physical units whatever ``scale`` training sets.
        long_range_options: dict for the long-range block (see cartlorem.nn.long_range; none with
            ``long_range=None``, which has no block: ValueError), e.g.
            ``lr_channels`` (4), ``charge_correction`` ("uniform"), ``charge_channels`` (None, the
            default: charges in every channel; 1: in channel 0 only, whose charges are then the only
            1/r sources and so identifiable as physical charges), ``placement``
            ("end", the default: after the last layer, on its features, the update feeding the block's
            readout only; "before_last": between the last two interaction layers, on the features of
            the layer before the last, its scalar update the last layer's input, so the last layer
            outputs scalars only and a training step is cheaper, but the block then works on features
            with the reach of one layer; on the cumulene set it stayed on the short-range floor, see
            benchmarks/results/torsion_signal.md and cumulene_defaults.md), ``end_features`` ("full", the
            default: with the block at the end, the last layer makes its rank-1/2 features as every layer
            does; "light": its body-order product makes the scalars only, ranks 1 and 2 being its message
            weighted per species and channel, and their skip has one weight matrix for all species, which
            makes a training step cheaper; cartlorem.nn.long_range.END_FEATURES). The config stores the
            ``charge_channels``, ``placement`` and ``end_features`` in use, so that a saved model reloads
            with them; files written before an option load with the behaviour of then (all channels
            charged, "end", "full").
        compile_kernels: run the message kernel through torch.compile when no double backward is
            needed (inference: energy, forces, stress, MD). Training always uses the eager kernel.
            First calls pay a compilation of ~10–60 s; falls back to eager if compilation fails.
        charge_state: condition the rank-0 features after the embedding on each structure's total charge
            (``graph.total_charge``) and spin multiplicity (``graph.multiplicity``) by a FiLM modulation
            (cartlorem.nn.conditioning), so that one geometry in two charge states gets two energies, for
            local models too. Exactly the unconditioned model for neutral singlets. Default False.

    Boundary conditions (per structure, ``pbc``): local models take any pattern (the neighbour list
    handles it); long-range models take open (all False), fully periodic (all True) and slabs
    (``[True, True, False]``, vacuum along the third cell row, which must have a height above the a-b
    plane that spans the atoms; :func:`cartlorem.nn.long_range.slab_frame`), and refuse others with a
    ValueError. Stress is computed for fully periodic structures only.
    """

    def __init__(self, species: Sequence[int], cutoff: float = 5.0, long_range: Optional[str] = "multipole", *,
                 channels: int = 64, num_layers: int = 2, correlation: int = 3, lmax: int = 2, num_basis: int = 8,
                 radial_hidden: int = 64, envelope_p: int = 5, readout_hidden: int = 16,
                 atomic_energies: Optional[dict] = None, avg_num_neighbors: float = 10.0, scale: float = 1.0,
                 shift: float = 0.0, long_range_options: Optional[dict] = None, compile_kernels: bool = False,
                 charge_state: bool = False):
        super().__init__()
        species = _species_list(species)
        if long_range not in LONG_RANGE_CHOICES:
            if isinstance(long_range, str) and long_range.lower() == "none":
                long_range = None
            else:
                raise ValueError(f"long_range must be one of {LONG_RANGE_CHOICES}, got {long_range!r}")
        # a number, not a string ("5": a TypeError of the comparison) or a bool; inf: a Bessel basis of zeros, a
        # model blind to geometry
        if isinstance(cutoff, torch.Tensor) and cutoff.numel() == 1 and cutoff.is_floating_point():
            cutoff = float(cutoff)  # a one-element tensor, as the Ewald functions take
        if isinstance(cutoff, bool) or not isinstance(cutoff, numbers.Real) or not 0 < cutoff < math.inf:
            raise ValueError(f"cutoff must be a finite positive length in Å (a number), got {cutoff!r}")
        if isinstance(lmax, bool) or not isinstance(lmax, numbers.Integral) or lmax not in (0, 1, 2):
            raise ValueError(f"lmax must be 0, 1 or 2 (an integer), got {lmax!r}")  # 2.0: a TypeError of range()
        sizes = dict(channels=channels, num_layers=num_layers, correlation=correlation, num_basis=num_basis,
                     radial_hidden=radial_hidden, envelope_p=envelope_p, readout_hidden=readout_hidden)
        for name, value in sizes.items():
            # 0 would build a model that runs and sees no geometry (envelope_p 0: an envelope of 0 everywhere;
            # a hidden width 0: forces exactly 0) or fails deep inside (channels 0: a division by zero); 4.0 a
            # TypeError of the tensor constructors
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        channels, num_layers, correlation, num_basis, radial_hidden, envelope_p, readout_hidden = (
            int(v) for v in sizes.values())  # numpy integers → int: the config is saved as plain data
        lmax = int(lmax)
        for name, value in (("compile_kernels", compile_kernels), ("charge_state", charge_state)):
            if not isinstance(value, (bool, np.bool_)):  # bool("no") is True: the feature would be on
                raise ValueError(f"{name} must be True or False, got {value!r}")
        e0_given = _reference_energies(atomic_energies or {}, species)
        _check_statistics(avg_num_neighbors, scale, shift, atomic_energies)
        if long_range_options is not None and not isinstance(long_range_options, Mapping):
            raise ValueError(f"long_range_options must be a mapping {{option: value}}, got {long_range_options!r}")
        # numpy numbers → int / float: the config is saved as plain data (a np.float64 smearing was pickled into
        # model.pt, which load_model then refused to read); anything else that is not plain data is refused
        long_range_options = {key: value.item() if isinstance(value, np.generic) else value
                              for key, value in dict(long_range_options or {}).items()}
        _check_plain(long_range_options, "long_range_options")
        if long_range is None and long_range_options:  # neither checked nor used: a typo or a misplaced option
            raise ValueError(f"long_range_options {dict(long_range_options)!r} are options of the long-range block, "
                             "and this model has none (long_range=None): drop them, or choose long_range "
                             "'multipole' or 'lorem'")
        self.config = dict(species=species, cutoff=float(cutoff), long_range=long_range, channels=channels,
                           num_layers=num_layers, correlation=correlation, lmax=lmax, num_basis=num_basis,
                           radial_hidden=radial_hidden, envelope_p=envelope_p, readout_hidden=readout_hidden,
                           avg_num_neighbors=float(avg_num_neighbors), scale=float(scale), shift=float(shift),
                           long_range_options=dict(long_range_options or {}), compile_kernels=bool(compile_kernels),
                           charge_state=bool(charge_state))
        self.compile_kernels = bool(compile_kernels)
        self._compiled_now = False
        self.cutoff = float(cutoff)
        self.species = species
        self.long_range = long_range
        S = len(species)
        z_to_index = torch.full((119,), -1, dtype=torch.long)
        z_to_index[species] = torch.arange(S)
        self.register_buffer("z_to_index", z_to_index, persistent=False)
        e0 = torch.zeros(S)
        for k, e in e0_given.items():
            e0[k] = e
        self.register_buffer("atomic_energies", e0)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("shift", torch.tensor(float(shift)))

        self.radial_basis = BesselBasis(cutoff, num_basis)
        self.envelope = PolynomialEnvelope(cutoff, envelope_p)
        self.embedding = nn.Parameter(torch.randn(S, channels))
        ranks = tuple(range(lmax + 1))
        placement = end_features = None
        if long_range is not None:
            from .nn.long_range import block_layout

            placement, end_features = block_layout(self.config["long_range_options"], num_layers, lmax)
        self.placement = placement
        # with the block at the end, the last layer outputs rank 1 and 2 features for it; else scalars only
        keep_all = placement == "end"
        light = end_features == "light"
        self.layers = nn.ModuleList()
        self.products = nn.ModuleList()
        self.mixers = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.readouts = nn.ModuleList()
        l_in: tuple[int, ...] = (0,)
        for t in range(num_layers):
            last = t == num_layers - 1
            l_out = ranks if (not last or keep_all) else (0,)
            self.layers.append(Interaction(channels, l_in, ranks, num_basis, radial_hidden, avg_num_neighbors))
            light_last = last and light  # ranks 1, 2: the message, no products; a skip shared by the species
            self.products.append(BodyOrderProduct(channels, S, correlation, ranks, l_out,
                                                  product_ranks=(0,) if light_last else None))
            self.mixers.append(EquivariantLinear(channels, channels, l_out, bias=True))
            skip_ranks = tuple(l for l in l_in if l in l_out)
            self.skips.append(SpeciesLinear(channels, channels, S, skip_ranks,
                                            shared_ranks=tuple(l for l in skip_ranks if l > 0) if light_last else ()))
            if last:
                self.readouts.append(nn.Sequential(nn.Linear(channels, readout_hidden), nn.SiLU(),
                                                   nn.Linear(readout_hidden, 1)))
            else:
                self.readouts.append(nn.Linear(channels, 1, bias=False))
            l_in = l_out
        self.long_range_block = None
        if long_range is not None:
            from .nn.long_range import LongRangeBlock, check_long_range_keys

            options = self.config["long_range_options"]
            check_long_range_keys(options)  # a mistyped key: its name, not a TypeError of the block's constructor
            self.long_range_block = LongRangeBlock(channels, kind=long_range, lmax=lmax,
                                                   **{k: v for k, v in options.items()
                                                      if k not in ("placement", "end_features")})
            # stored resolved: a file without the key was written before the option (see load_model)
            options["charge_channels"] = self.long_range_block.charge_channels
            options["placement"] = placement
            options["end_features"] = end_features
        # made last, so that the other weights draw the same random numbers with and without it
        self.conditioning = ChargeStateConditioning(channels, S) if charge_state else None

    # --- statistics set from data --------------------------------------------------------------
    def set_statistics(self, *, atomic_energies: Optional[dict] = None, avg_num_neighbors: Optional[float] = None,
                       scale: Optional[float] = None, shift: Optional[float] = None) -> None:
        """Set reference energies {Z: eV}, message normalisation and energy scale/shift (from data)."""
        e0 = None if atomic_energies is None else _reference_energies(atomic_energies, self.species)
        _check_statistics(avg_num_neighbors, scale, shift, atomic_energies)
        for k, e in (e0 or {}).items():  # all checked first: a bad key changes none of them
            self.atomic_energies[k] = e
        if avg_num_neighbors is not None:
            self.config["avg_num_neighbors"] = float(avg_num_neighbors)
            for layer in self.layers:
                layer.avg_num_neighbors = float(avg_num_neighbors)
        if scale is not None:
            self.scale.fill_(float(scale))
            self.config["scale"] = float(scale)
        if shift is not None:
            self.shift.fill_(float(shift))
            self.config["shift"] = float(shift)

    def with_species(self, species: Sequence[int]) -> "CartLorem":
        """A new model that knows ``species`` (atomic numbers or symbols; every species of this model among them), for
        fine-tuning on data with elements the model has not seen. It has this model's architecture, statistics and
        weights; a new element's embedding row and per-species weights (products, skips, charge-state FiLM) are drawn
        from torch's random number generator as a new model's would be, and its reference energy is 0 eV
        (:func:`cartlorem.training.refit_reference_energies` fits it to data). On structures of the old elements the
        new model predicts what this one does, to rounding. This model is left as it was."""
        species = _species_list(species)
        dropped = sorted(set(self.species) - set(species))
        if dropped:
            raise ValueError(f"with_species adds elements and keeps the model's: species "
                             f"{', '.join(map(_symbol, species))} lack {', '.join(map(_symbol, dropped))}, which the "
                             "model knows")
        new = type(self)(**{**self.config, "species": species})
        new = new.to(device=self.embedding.device, dtype=self.dtype)
        rows = torch.tensor([species.index(z) for z in self.species], device=self.embedding.device)
        old_state, new_state = self.state_dict(), new.state_dict()
        S, T = len(self.species), len(species)
        with torch.no_grad():
            for name, value in old_state.items():
                target = new_state[name]
                if name.endswith("_extra_state"):  # avg_num_neighbors: in the config the new model was built with
                    continue
                if value.shape == target.shape:  # no species dimension (or no new species)
                    target.copy_(value)
                    continue
                # a leading species dimension, [S·m, ...] → [T·m, ...] (the FiLM output: m = 2C rows per species)
                if value.shape[1:] != target.shape[1:] or value.shape[0] % S or target.shape[0] % T \
                        or value.shape[0] // S != target.shape[0] // T:
                    raise RuntimeError(f"with_species: {name} {tuple(value.shape)} → {tuple(target.shape)} has no "
                                       "leading species dimension")
                target.reshape(T, -1)[rows] = value.reshape(S, -1)
        new.train(self.training)
        return new

    # avg_num_neighbors is a Python float in every layer (the compiled step and TorchScript fold it), not a parameter
    # or buffer: it travels in state_dict() as "_extra_state", so that torch.save(model.state_dict()) loaded into a
    # new model brings it (before, such a model ran with the default 10: trained energies off by 0.18 eV)
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([float(self.config["avg_num_neighbors"])], dtype=torch.float64)

    def set_extra_state(self, state) -> None:
        if not (isinstance(state, torch.Tensor) and state.numel() == 1):
            raise ValueError(f"the state_dict's _extra_state must be a one-element tensor (avg_num_neighbors), "
                             f"got {type(state).__name__}")
        self.set_statistics(avg_num_neighbors=float(state.reshape(-1)[0]))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # the config's copies of the statistics that are buffers follow them (save_model writes the config)
        self.config["scale"], self.config["shift"] = float(self.scale), float(self.shift)
        key = prefix + "_extra_state"
        if key in missing_keys:  # a state_dict written before it held the statistic: loads, with a warning
            import warnings

            missing_keys.remove(key)
            warnings.warn(f"this state_dict has no {key} (avg_num_neighbors; written by an older cartlorem): the model "
                          f"keeps avg_num_neighbors = {self.config['avg_num_neighbors']:g}; set the trained value with "
                          "set_statistics(avg_num_neighbors=...), or save and load with save_model / load_model, "
                          "whose files hold it", stacklevel=_first_frame_outside_torch())

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.dtype

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Atomic numbers [N] → model species indices [N]; ValueError naming any unknown species."""
        if numbers.dtype not in (torch.int32, torch.int64):  # int8/int16/uint8 cannot index the lookup table
            numbers = numbers.long()
        bad = (numbers < 1) | (numbers > 118)
        idx = self.z_to_index[numbers.clamp(0, 118)]
        bad = bad | (idx < 0)
        if bool(bad.any()):
            unknown = sorted({int(z) for z in numbers[bad].tolist()})
            names = ", ".join(f"{_symbol(z)} (Z={z})" if 0 < z < 119 else f"Z={z}" for z in unknown)
            known = ", ".join(_symbol(z) for z in self.species)
            raise ValueError(f"species not known to the model: {names}; the model knows {known}")
        return idx

    # --- the energy model ----------------------------------------------------------------------
    def energy(self, graph: Graph, positions: torch.Tensor, cell: torch.Tensor, *, dipole: bool = False,
               electric_field: Optional[torch.Tensor] = None, species: Optional[torch.Tensor] = None,
               pairs: Optional[tuple] = None, dipole_origin: Optional[torch.Tensor] = None) -> dict:
        """Total energy [B] (eV) and per-atom energies [N] for the given positions and cell.

        Long-range models also: with ``dipole`` (or a field), "dipole" [B, 3] (e·Å), P = Σ_i q_i (r_i − o) + μ_i
        of channel 0 with r the positions as given and o ``dipole_origin`` [B, 3] (Å; default 0, the origin of
        the positions); with ``electric_field`` [B, 3] (V/Å), the term −P·E (eV) in the energy of open
        structures (periodic cells and slabs, whose P is not defined, get the force Z*ᵀE from
        :func:`cartlorem.forces.with_derivatives`, and no energy term).

        ``species``: the model's species indices of the atoms, ``self.species_index(graph.species)``, when the
        caller has them (checked) already; ``pairs``: for a long-range model on a batch of open structures only,
        the intra-structure pairs (i, j), each once, of ``cartlorem.ewald.direct.molecule_pairs(batch,
        unordered=True)``, the batch checked; on a batch of periodic cells only, the block's
        :meth:`~cartlorem.nn.long_range.LongRangeBlock.periodic_plan` (:meth:`LongRangeBlock.forward`). With both, nothing here depends on tensor values, and
        ``torch.compile`` traces the energy whole (:mod:`cartlorem.training.compiled`).
        """
        species = self.species_index(graph.species) if species is None else species
        i, j = graph.edge_index
        # index_select rather than x[idx]: the backward (and that of the force backward) is an index_add,
        # where advanced indexing's is an accumulating index_put; the shift as 3 multiply-adds per edge, where
        # an einsum would be a batched GEMM of E 1×3 by 3×3 products
        shifts = (graph.edge_shift[:, :, None] * cell.index_select(0, graph.batch.index_select(0, i))).sum(1)
        vec = positions.index_select(0, j) - positions.index_select(0, i) + shifts  # r_ij [E, 3]
        r = torch.linalg.vector_norm(vec, dim=-1)  # [E]
        unit = vec / r[:, None]
        radial = self.radial_basis(r)  # [E, B]
        envelope = self.envelope(r)  # [E]

        h = [self.embedding.index_select(0, species), None, None]
        if self.conditioning is not None:  # total charge and spin state → rank-0 features
            h[0] = self.conditioning(h[0], species, graph.batch, graph.total_charge, graph.multiplicity, graph.pbc)
        node_energy = torch.zeros_like(positions[:, 0])
        out = {}
        last = len(self.layers) - 1
        for t, (layer, prod, mix, skip, readout) in enumerate(
                zip(self.layers, self.products, self.mixers, self.skips, self.readouts)):
            if t == last and self.placement == "before_last":  # the fields update the last layer's input scalars
                out = self.long_range_block(h, graph, positions, cell, pairs=pairs)
                h = [out["scalars"]] + h[1:]
            A = layer(h, graph.edge_index, unit, radial, envelope, compiled=self._compiled_now)
            B = mix(prod(A, species))
            sc = skip(h, species)
            h = [b if s is None else (b + s if b is not None else None) for b, s in zip(B, sc)]
            node_energy = node_energy + readout(h[0]).squeeze(-1)

        if self.placement == "end":
            out = self.long_range_block(h, graph, positions, cell, pairs=pairs)
        if self.long_range_block is not None:
            out.pop("scalars")
            lr_readout, e_es = out.pop("readout"), out.pop("electrostatic")  # [N] learned, [N] eV
            node_energy = node_energy + lr_readout
        # the scale multiplies the learned readouts only; the electrostatic energy is already in eV and
        # stays the (coupling-weighted) Coulomb energy of the reported multipoles
        node_energy = self.scale * node_energy + self.shift + self.atomic_energies[species]
        if self.long_range_block is not None:
            node_energy = node_energy + e_es
        zeros = torch.zeros(graph.num_graphs, dtype=node_energy.dtype, device=node_energy.device)  # [B]
        if dipole or electric_field is not None:
            site = out["charges"][:, None] * positions  # [N, 3] e·Å: q_i r_i + μ_i of channel 0
            if "dipoles" in out:
                site = site + out["dipoles"]
            out["dipole"] = torch.zeros_like(cell[:, 0]).index_add(0, graph.batch, site)  # [B, 3], about 0
            node_field = -(site * electric_field[graph.batch]).sum(-1) if electric_field is not None else None
            if dipole_origin is not None:
                # P about o: Σ q_i r_i + μ_i − Q o. Q is the given total charge where the block corrects the charges
                # to it (exactly Q, not its float32 rounding times a distant o), else Σ q_i
                if self.long_range_block.charge_correction is not None:
                    total = graph.total_charge.to(site.dtype)
                else:
                    total = zeros.index_add(0, graph.batch, out["charges"])
                out["dipole"] = out["dipole"] - total[:, None] * dipole_origin
                if node_field is not None:  # + Q o·E, shared evenly by the structure's atoms
                    count = zeros.index_add(0, graph.batch, torch.ones_like(node_field))
                    share = total * (dipole_origin * electric_field).sum(-1) / count  # [B] eV
                    node_field = node_field + share.index_select(0, graph.batch)
            if electric_field is not None:  # periodic cells and slabs: the force Z*ᵀE only (cartlorem.forces)
                molecule = ~graph.pbc.any(dim=1)[graph.batch]  # [N]
                node_energy = node_energy + torch.where(molecule, node_field, torch.zeros_like(node_field))
        # summed in float64: in float32 the total rounds at the scale of the reference energies' sum at every
        # addition (0.16 eV off for 192 atoms of −2000 eV references); this leaves the final cast, ≤ 4 meV there
        energy = zeros.double().index_add(0, graph.batch, node_energy.double()).to(node_energy.dtype)
        out.update(energy=energy, node_energy=node_energy)
        if self.long_range_block is not None:
            out["energy_lr"] = torch.zeros_like(energy).index_add(0, graph.batch, self.scale * lr_readout + e_es)
        return out

    def forward(self, graph: Graph, compute_forces: bool = True, compute_stress: Optional[bool] = None,
                create_graph: Optional[bool] = None, *, compute_dipole: bool = False,
                compute_born_charges: bool = False, electric_field=None, dipole_origin=None) -> dict:
        """Predict for a batch: "energy" [B], "node_energy" [N], "forces" [N, 3], "stress" [B, 3, 3]
        (eV/Å³; computed by default when a structure is fully periodic; rows of open structures and
        slabs are zero) with the virial "virial" [B, 3, 3] (eV, −∂E/∂ε, −V σ for a periodic cell; defined for
        slabs and open structures too: cartlorem.forces), and for long-range models channel 0 of the learned multipoles,
        "charges" [N] (e), "dipoles" [N, 3] (e·Å, lmax ≥ 1), "quadrupoles" [N, 3, 3] (e·Å², lmax 2),
        and "energy_lr" [B] (eV): ``scale`` × the long-range readout + the electrostatic energy, which
        is COULOMB × Σ_c coupling_c × U_c, independent of ``scale``; coupling_0 is fixed at 1. For "multipole"
        U_c is :func:`cartlorem.ewald.electrostatic_energy` of the learned multipoles of channel c with the
        block's smearing, so the channel-0 term is the Coulomb energy (eV) of the reported multipoles; for
        "lorem" it is ½ Σ (qφ + μ·ψ + Θ:Ψ), every Cartesian component convolved with the scalar kernel as a
        charge (the LOREM paper's form; :mod:`cartlorem.nn.long_range`).
        ``create_graph`` defaults to ``self.training`` (needed to train on forces). The derivatives are taken in
        detached copies of ``graph.positions`` and ``graph.cell``: with ``create_graph`` the outputs stay
        differentiable in the parameters, not in a caller's position tensor (no Hessian through ``forces``; take
        finite differences of the forces, as ``ase.vibrations`` does, or the exact Hessian of :meth:`energy` with
        torch.autograd, e.g. ``torch.autograd.functional.hessian``; torch.func's transforms take it for short-range
        models only).

        Charge outputs of long-range models, computed when asked for (ValueError for a model without
        long range):

        * ``compute_dipole``: "dipole" [B, 3] (e·Å), P = Σ_i q_i r_i + μ_i over channel 0 of the learned
          multipoles, about the origin of the positions given (for a charged molecule P depends on it).
          Open structures only (ValueError for periodic cells and slabs, where P is not defined).
        * ``compute_born_charges``: "born_charges" [N, 3, 3] (e), Z*_i,ab = ∂P_a/∂r_ib by autograd (three
          more backward passes). Σ_i Z*_i = Q I, Q = Σ_i q_i (the total charge with charge correction).
          For periodic cells and slabs (21 more backward passes): q_i δ_ab + ∂Σ_j μ_j,a/∂r_ib + the charge
          transfer Σ_j d_a(i → j) ∂q_j/∂r_ib, with d the smooth periodic form of r_j − r_i
          (:func:`cartlorem.forces.born_charges`): independent of the lattice image each position is taken
          in and of rigid translations, the sum rule imposed.
        * ``electric_field``: uniform external field E (V/Å), [3] or [B, 3]. Open structures: the energy
          gets −P·E (eV) and the forces its gradient, Z*_iᵀE. Periodic cells and slabs: the forces get
          F_i += Z*_iᵀE (the standard practice, P not being defined) and the energy and stress do not
          change. A zero field gives the results without a field.
        * ``dipole_origin``: the point o (Å), [3] or [B, 3], in the frame of the positions given, about which P is
          taken, P = Σ_i q_i (r_i − o) + μ_i, and where the potential of the field is zero (default: the origin).
          It matters where the total charge Q can differ from zero: P, the field energy −P·E and, for a model
          whose Q depends on the positions (no charge correction), the forces and Born charges, by Q o and its
          derivatives. (The ASE calculator passes the origin of the positions ASE holds, since it shifts them.)
          With charge correction Q is the given total charge, so a distant o costs no precision; the field's −Q o·E
          is shared evenly by a structure's atoms in ``node_energy``.
        """
        if not isinstance(graph, Graph):
            raise TypeError(f"CartLorem takes a cartlorem Graph (cartlorem.graph.atoms_to_graph, collate), got "
                            f"{type(graph).__name__}")
        if self.dtype not in (torch.float32, torch.float64):  # float16/bfloat16 ran, 0.65 eV off at -4000 eV
            raise ValueError(f"CartLorem runs in float32 or float64; this model is {str(self.dtype)[6:]} "
                             "(model.float() or model.double())")
        if getattr(graph.positions, "device", None) != self.embedding.device or any(
                isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != self.dtype
                for v in vars(graph).values()):  # every floating field: a float64 cell beside float32 positions too
            graph = graph.to(device=self.embedding.device, dtype=self.dtype)
        graph = self._index_dtypes(graph)
        self._check_values(graph)
        if self.long_range_block is not None:
            from .nn.long_range import check_boundaries

            check_boundaries(graph.pbc)  # before any work: open, periodic or [T, T, F] slabs
        asked = [name for name, on in (("compute_dipole", compute_dipole), ("compute_born_charges",
                 compute_born_charges), ("electric_field", electric_field is not None)) if on]
        if asked and self.long_range_block is None:
            raise ValueError(f"{', '.join(asked)} need(s) learned charges: this model has no long range "
                             "(long_range=None); use a 'multipole' or 'lorem' model")
        if compute_dipole and bool(graph.pbc.any()):
            k = int(graph.pbc.any(dim=1).nonzero()[0])
            raise ValueError(f"the dipole is defined for open structures only; structure {k} has pbc = "
                             f"{graph.pbc[k].tolist()} (born_charges and electric_field work for any cell)")
        if electric_field is not None:
            electric_field = self._field(electric_field, graph.num_graphs)
        if dipole_origin is not None:
            if not asked:
                raise ValueError("dipole_origin is the origin of the dipole P and of the field's potential: it needs "
                                 "compute_dipole, compute_born_charges or electric_field")
            dipole_origin = self._field(dipole_origin, graph.num_graphs, "dipole_origin", "Å")
        if (compute_born_charges or (electric_field is not None and compute_forces)) and bool(graph.pbc.any()):
            self._warn_small_cells(graph)
        if compute_stress is None:
            compute_stress = bool(graph.pbc.all(dim=1).any())
        create_graph = self.training if create_graph is None else create_graph
        self._compiled_now = self.compile_kernels and not create_graph
        want_p = compute_dipole or compute_born_charges or electric_field is not None

        def energy_fn(g, positions, cell):
            return self.energy(g, positions, cell, dipole=want_p, electric_field=electric_field,
                               dipole_origin=dipole_origin)

        try:
            out = with_derivatives(energy_fn, graph, compute_forces=compute_forces, compute_stress=compute_stress,
                                   create_graph=create_graph, compute_born_charges=compute_born_charges,
                                   electric_field=electric_field, dipole_origin=dipole_origin)
        finally:
            self._compiled_now = False
        if not compute_dipole:
            out.pop("dipole", None)
        return out

    def _warn_small_cells(self, graph: Graph) -> None:
        """A warning when a periodic cell or slab is too small for its Born charges (and field forces): the charge
        transfer between atoms up to the model's reach R apart is counted at the periodic form of their displacement
        (:func:`cartlorem.forces.born_charges`), which is off where atoms r apart are a sizeable fraction of the
        lattice plane spacing h apart (a relative ~(2π r / h)⁶ / 140) and loses atoms half a cell apart."""
        from .forces import periodic_plane_spacings

        reach = self.cutoff * len(self.layers)
        spacing = periodic_plane_spacings(graph).min(dim=1).values  # [B]
        small = (spacing < 2 * reach) & graph.pbc.any(dim=1)
        if bool(small.any()):
            import warnings

            k = int(small.nonzero()[0])
            warnings.warn(f"structure {k}: Born charges and field forces of a periodic cell with lattice planes "
                          f"{float(spacing[k]):.1f} Å apart, less than twice the model's reach ({len(self.layers)} "
                          f"layers × {self.cutoff:g} Å): the charge transfer between atoms r apart is counted at the "
                          "periodic form of their displacement, off by a relative ~(2π r / spacing)⁶ / 140 and lost "
                          "for atoms half a cell apart; compute them in a supercell (ase's atoms.repeat) whose planes "
                          f"are ≥ {2 * reach:g} Å apart", stacklevel=_first_frame_outside_torch())

    @staticmethod
    def _index_dtypes(graph: Graph) -> Graph:
        """``graph`` with species, batch and edge_index of a small integer type (int8, int16, uint8, ...) as int64:
        they index tensors, which takes int32 or int64 (an IndexError or RuntimeError deep inside otherwise).
        Floating-point and bool tensors are left for :meth:`_check_layout` to refuse."""
        small = {}
        for name in ("species", "batch", "edge_index"):
            t = getattr(graph, name)
            if isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex()) and t.dtype not in (
                    torch.bool, torch.int32, torch.int64):
                small[name] = t.long()
        return graph.replace(**small) if small else graph

    def _check_values(self, graph: Graph) -> None:
        """ValueError for NaN or inf in the positions, cells, edge shifts or total charges of ``graph`` (each of them
        makes every energy NaN: the cell enters every edge vector as shift @ cell), or, for a charge-state model, a
        multiplicity that is not a finite number >= 1, or atoms closer than 0.1 Å (an edge of length 0 makes its unit
        vector NaN); before that, for tensors of the wrong shape or type, or edges and atoms that point past the atoms
        and structures there are (otherwise an IndexError deep inside, or a wrong result). One device synchronisation
        when all is well."""
        self._check_layout(graph)
        ok = torch.isfinite(graph.positions).all() & torch.isfinite(graph.cell).all()
        ok = ok & torch.isfinite(graph.total_charge).all() & torch.isfinite(graph.edge_shift).all()
        multiplicity = graph.multiplicity if self.conditioning is not None else None
        if multiplicity is not None:
            ok = ok & (torch.isfinite(multiplicity) & (multiplicity >= 1)).all()
        flat = flat_periodic_cells(graph.cell, graph.pbc)
        ok = ok & ~flat.any()
        n_atoms, n_struct = graph.positions.shape[0], graph.cell.shape[0]
        if graph.batch.numel():
            ok = ok & (graph.batch.min() >= 0) & (graph.batch.max() < n_struct)
        shortest = None
        if graph.edge_index.numel():
            ok = ok & (graph.edge_index.min() >= 0) & (graph.edge_index.max() < n_atoms)
            # overlapping atoms (an edge of length ~0 is a 0/0 in the edge's direction: NaN, not an error), as
            # atoms_to_graph, the calculator and the exported model refuse them; indices clamped, checked above
            with torch.no_grad():
                d = graph.replace(edge_index=graph.edge_index.clamp(0, max(n_atoms - 1, 0)),
                                  batch=graph.batch.clamp(0, max(n_struct - 1, 0))).edge_vectors().square().sum(-1)
                shortest = d.min()
            ok = ok & ~(shortest < _MIN_DISTANCE**2)  # NaN: the checks below name it
        if bool(ok):
            return
        for name, index, size in (("batch", graph.batch, n_struct), ("edge_index", graph.edge_index, n_atoms)):
            if index.numel() and not (0 <= int(index.min()) and int(index.max()) < size):
                raise ValueError(f"graph.{name} holds indices from {int(index.min())} to {int(index.max())}, outside "
                                 f"0..{size - 1} ({'structures' if name == 'batch' else 'atoms'} in the graph)")
        if not bool(torch.isfinite(graph.positions).all()):
            raise ValueError("positions contain NaN or inf")
        for name, values in (("cell", graph.cell.flatten(1)), ("total_charge", graph.total_charge[:, None])):
            bad = ~torch.isfinite(values).all(dim=1)
            if bool(bad.any()):
                k = int(bad.nonzero()[0])
                raise ValueError(f"the {name} of structure {k} contains NaN or inf: {values[k].tolist()}")
        bad = ~torch.isfinite(graph.edge_shift).all(dim=1)
        if bool(bad.any()):  # it multiplies the cell in every edge vector: a NaN energy, or an error far from here
            k = int(bad.nonzero()[0])
            raise ValueError(f"graph.edge_shift contains NaN or inf ({int(bad.sum())} of {bad.numel()} edges; "
                             f"edge {k}, atoms {graph.edge_index[:, k].tolist()}: {graph.edge_shift[k].tolist()})")
        if shortest is not None and bool(shortest < _MIN_DISTANCE**2):
            e = int(d.argmin())
            a, b = graph.edge_index[:, e].tolist()
            what = (f"atoms {a} and {b} are" if a != b else
                    f"edge {e} joins atom {a} to itself (edge_shift {graph.edge_shift[e].tolist()}),")
            raise ValueError(f"{what} {float(d[e]) ** 0.5:.2e} Å apart (overlapping atoms)")
        if bool(flat.any()):  # the edges across the boundary collapsed, and the stress came back 0 (a molecule's)
            k = int(flat.nonzero()[0])
            raise flat_cell_error(f"structure {k}", graph.cell[k].tolist(), graph.pbc[k].tolist())
        assert multiplicity is not None
        k = int((~(torch.isfinite(multiplicity) & (multiplicity >= 1))).nonzero()[0])
        raise ValueError(f"the multiplicity (2S + 1) of structure {k} must be a finite number >= 1, "
                         f"got {float(multiplicity[k])}")

    @staticmethod
    def _check_layout(graph: Graph) -> None:
        """ValueError naming the first tensor of ``graph`` whose shape or dtype is not that of :class:`Graph`."""
        for name in ("positions", "cell", "edge_index"):  # their shapes give the others'
            if not isinstance(getattr(graph, name), torch.Tensor):
                raise ValueError(f"graph.{name} must be a tensor, got {type(getattr(graph, name)).__name__}")
        n = graph.positions.shape[0] if graph.positions.dim() == 2 else -1
        b = graph.cell.shape[0] if graph.cell.dim() == 3 else -1
        e = graph.edge_index.shape[1] if graph.edge_index.dim() == 2 else -1
        expect = [("positions", graph.positions, [n, 3], True), ("species", graph.species, [n], False),
                  ("batch", graph.batch, [n], False), ("cell", graph.cell, [b, 3, 3], True),
                  ("pbc", graph.pbc, [b, 3], None), ("total_charge", graph.total_charge, [b], True),
                  ("edge_index", graph.edge_index, [2, e], False), ("edge_shift", graph.edge_shift, [e, 3], True)]
        if graph.multiplicity is not None:
            expect.append(("multiplicity", graph.multiplicity, [b], True))
        for name, t, shape, floating in expect:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"graph.{name} must be a tensor, got {type(t).__name__}")
            if list(t.shape) != shape or -1 in shape:
                sizes = {"positions": "[N, 3]", "species": "[N]", "batch": "[N]", "cell": "[B, 3, 3]", "pbc": "[B, 3]",
                         "total_charge": "[B]", "edge_index": "[2, E]", "edge_shift": "[E, 3]", "multiplicity": "[B]"}
                raise ValueError(f"graph.{name} must have shape {sizes[name]} (N = {n} atoms, B = {b} structures, "
                                 f"E = {e} edges), got {list(t.shape)}")
            kind = t.dtype.is_floating_point
            wrong = (floating is True and not kind) or (floating is False and (kind or t.dtype == torch.bool)) or (
                floating is None and t.dtype != torch.bool)
            if wrong:
                want = {True: "a floating-point", False: "an integer", None: "a bool"}[floating]
                raise ValueError(f"graph.{name} must be {want} tensor, got {t.dtype}")
        if n == 0:
            raise ValueError("the graph has no atoms")

    def _field(self, field, n_struct: int, name: str = "electric_field", unit: str = "V/Å") -> torch.Tensor:
        """electric_field (or another vector per structure, ``name``) → [B, 3] tensor in the model's dtype;
        ValueError for a bad shape or value."""
        try:
            field = torch.as_tensor(field, dtype=self.dtype, device=self.embedding.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be 3 numbers ({unit}) or one row per structure: {err}") from None
        if field.shape == (3,):
            field = field.expand(n_struct, 3)
        if field.shape != (n_struct, 3):
            raise ValueError(f"{name} must have shape [3] or [B, 3] = [{n_struct}, 3] ({unit}), "
                             f"got {list(field.shape)}")
        if not bool(torch.isfinite(field).all()):
            raise ValueError(f"{name} contains NaN or inf")
        return field

    def extra_repr(self) -> str:
        c = self.config
        placement = "" if self.placement is None else f" (placement {self.placement!r})"
        return (f"species={c['species']}, cutoff={c['cutoff']}, long_range={c['long_range']!r}{placement}, "
                f"channels={c['channels']}, layers={c['num_layers']}, correlation={c['correlation']}, lmax={c['lmax']}")


# --- persistence ---------------------------------------------------------------------------------
# A model file is a torch.save of plain data, {"format", "config", "state_dict", "dtype", extra entries},
# read back with torch.load(weights_only=True): dicts, lists, tuples, strings, numbers, booleans, None and
# tensors are rebuilt, anything else is refused, so opening a model file never runs pickled code.
#
# Formats:
#   cartlorem-model-v1 (cartlorem 0.1.0): the energy ``scale`` multiplied the electrostatic energy of the
#       learned multipoles too, so the effective Coulomb coupling of channel c was scale × a_c.
#   cartlorem-model-v2: ``scale`` multiplies the learned readouts only. A v1 file is read exactly: its
#       couplings a_c become scale × a_c (:func:`upgrade_state_dict`), which gives the same energies,
#       forces and charges as 0.1.0 (to rounding). Its charges keep the units they were trained in:
#       scale × a_c × U(q) is the Coulomb energy of charges √(scale × a_c) q, not of q.
#   cartlorem-model-v3: the weight of channel 0 is fixed at a_0 = 1 (the buffer
#       ``long_range_block.coupling_channel0``), the others are the parameter ``coupling_others``; v1 and
#       v2 stored all of them as one parameter ``long_range_block.coupling`` [C_lr]. An older file is
#       split into the two; its a_0 (scale × a_0 for v1) is kept, so it predicts exactly what it did.
#       If that a_0 is not 1 (training moved it, or the v1 scale), the model's charges are in the old
#       units described above: physical only up to √a_0.
#   cartlorem-model-v4: charge-state conditioning gives structures with a periodic direction the per-atom
#       inputs only (Q/N, (S − 1)/N), so that a supercell of a charged cell gets the cell's energy per cell
#       (:mod:`cartlorem.nn.conditioning`); the buffer ``conditioning.cells_per_atom`` says so. Older files
#       with conditioning get it False: they predict what they predicted.
#   cartlorem-model-v5: the state dict holds ``_extra_state``, avg_num_neighbors (float64 [1]), as
#       ``CartLorem.state_dict()`` does; older files get it from their config. (A v4 reader refuses the key; the
#       new number makes it say that the file is newer.)
_FORMAT = "cartlorem-model-v5"
_FORMAT_V1 = "cartlorem-model-v1"
_FORMAT_V2 = "cartlorem-model-v2"
_FORMAT_V3 = "cartlorem-model-v3"
_FORMAT_V4 = "cartlorem-model-v4"
_FORMATS = (_FORMAT_V1, _FORMAT_V2, _FORMAT_V3, _FORMAT_V4, _FORMAT)


def upgrade_state_dict(state_dict: dict, config: dict, format: str) -> dict:
    """A state dict written in ``format`` → the current format's (a new dict; tensors shared unless changed).

    v1 → v2: the long-range couplings absorb the energy scale (see the notes above), so that the model
    gives the numbers it gave in 0.1.0. v2 → v3: the couplings [C_lr] split into ``coupling_channel0``
    (a_0, kept as stored) and ``coupling_others`` [C_lr − 1]. v3 → v4: a charge-state model gets
    ``conditioning.cells_per_atom`` False (periodic structures keep the inputs of molecules, as then).
    """
    if format not in _FORMATS:
        raise ValueError(f"unknown model format {format!r}; this cartlorem reads {', '.join(_FORMATS)}")
    state = dict(state_dict)
    if "_extra_state" not in state and "avg_num_neighbors" in config:  # files written before it was in state_dict
        state["_extra_state"] = torch.tensor([float(config["avg_num_neighbors"])], dtype=torch.float64)
    key = "long_range_block.coupling"
    if format in (_FORMAT_V1, _FORMAT_V2) and config.get("long_range") is not None and key in state:
        coupling = state.pop(key)
        if format == _FORMAT_V1:
            coupling = coupling * float(config.get("scale", 1.0))
        state["long_range_block.coupling_channel0"] = coupling[0].clone()
        state["long_range_block.coupling_others"] = coupling[1:].clone()
    key = "conditioning.cells_per_atom"
    if format != _FORMAT and config.get("charge_state") and key not in state:
        state[key] = torch.zeros((), dtype=torch.bool)
    return state


_PLAIN_TYPES = (str, int, float, bool, type(None))


def _check_plain(obj, where: str) -> None:
    """ValueError naming the first entry of ``obj`` that torch.load(weights_only=True) would refuse."""
    import collections

    if type(obj) in (dict, collections.OrderedDict):
        for key, value in obj.items():
            if type(key) not in _PLAIN_TYPES:
                raise ValueError(f"{where} has a key of type {type(key).__name__}; use strings or numbers")
            _check_plain(value, f"{where}[{key!r}]")
    elif type(obj) in (list, tuple):
        for n, value in enumerate(obj):
            _check_plain(value, f"{where}[{n}]")
    elif not (type(obj) in _PLAIN_TYPES or type(obj) is torch.Tensor or isinstance(obj, torch.dtype)):
        raise ValueError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: model files hold plain data only "
            "(dicts, lists, tuples, strings, int/float/bool/None, torch tensors), so that load_model can read "
            "them without running pickled code; convert it (e.g. float(x), x.tolist(), torch.as_tensor(x))"
        )


def _first_frame_outside_torch() -> int:
    """The ``stacklevel`` of a warning raised in here that names the caller of torch's load_state_dict (which
    reaches a module's _load_from_state_dict through its own frames, as many as the module is deep)."""
    import sys

    torch_dir, level, frame = os.path.dirname(torch.__file__), 1, sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith(torch_dir)):
        frame, level = frame.f_back, level + 1
    return level


def model_payload(model: CartLorem) -> dict:
    """What :func:`save_model` writes: format header, hyperparameters, weights (CPU copies), dtype."""
    if not isinstance(model, CartLorem):
        raise TypeError(f"expected a CartLorem, got {type(model).__name__}")
    if model.dtype not in (torch.float32, torch.float64):  # load_model reads these two only
        raise ValueError(f"save_model writes float32 or float64 models; this one is {str(model.dtype)[6:]} "
                         "(model.float() or model.double() first)")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": _FORMAT, "config": dict(model.config), "state_dict": state,
               "dtype": str(model.dtype).replace("torch.", "")}
    _check_plain(payload["config"], "the model's config")  # for every writer (the trainer's too), not save_model's only
    return payload


#: the entries of a model file that load_model reads (an extra "model" cannot be passed: it is the first argument)
_RESERVED = ("format", "config", "state_dict", "dtype")


def save_model(model: CartLorem, path, **extra) -> None:
    """Write hyperparameters and weights to ``path`` (atomically). ``extra`` entries are stored too; they
    must be plain data (dicts, lists, strings, numbers, tensors: ValueError naming the entry otherwise) and
    must not be named like the file's own entries, format, config, state_dict or dtype (ValueError)."""
    clash = [key for key in _RESERVED if key in extra]
    if clash:  # they replaced the model's own: a file load_model refuses, or reads back as another model
        raise ValueError(f"save_model: extra entries named {', '.join(map(repr, clash))} would replace the model "
                         f"file's own ({', '.join(_RESERVED)} are what load_model reads); store them under "
                         "another name, e.g. notes=...")
    payload = {**model_payload(model), **extra}
    _check_plain(payload, "the model file")
    atomic_torch_save(payload, path)  # temp file + rename, mode 0644 like every other output


def complete_config(config: dict) -> dict:
    """The options of a model file (its "config") as this cartlorem reads them: an option the file's cartlorem did
    not have yet gets the behaviour of then, which is the constructor's default except for the long-range block
    (charges in every channel, the block at the end). ``load_model`` builds the model from these, and a resume
    compares them with the new run's model."""
    import inspect

    config = dict(config)
    if config.get("long_range") is None:
        # none stored, or options of a block it has not that an older cartlorem let a short-range model store
        config["long_range_options"] = {}
    else:
        from .nn.long_range import long_range_option_defaults

        options = config.get("long_range_options") or {}
        old = {"charge_channels": None, "placement": "end", "end_features": "full"}
        options = {**{k: v for k, v in old.items() if k not in options}, **options}
        if options["charge_channels"] is None:  # every channel, as the model now states it (a resume compares)
            options["charge_channels"] = options.get("lr_channels", long_range_option_defaults()["lr_channels"])
        config["long_range_options"] = options
    for name, parameter in inspect.signature(CartLorem.__init__).parameters.items():
        if name != "self" and name not in config and parameter.default is not inspect.Parameter.empty:
            config[name] = parameter.default
    if config["long_range_options"]:  # values an older cartlorem took that changed nothing: the same model
        from .nn.long_range import without_no_op_options

        config["long_range_options"] = without_no_op_options(config["long_range_options"], config["lmax"])[0]
    return config


def _is_torchscript(path) -> bool:
    """Whether ``path`` is a TorchScript archive (torch.jit.save: a zip file with the model's code), which
    ``torch.load`` cannot read, unlike a torch.save file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in name for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_model(path, map_location="cpu", *, trust_pickle: bool = False) -> CartLorem:
    """Read a model written by :func:`save_model` (or a training checkpoint that holds one).

    The file is read with ``torch.load(weights_only=True)``: only plain data is rebuilt and no code
    stored in the file runs. A file that holds other Python objects (a pickled function or class, a
    numpy scalar) is refused with a ValueError naming the object, unless ``trust_pickle=True``: then
    it is read with the full pickle machinery, which runs whatever code the file carries. Pass it only
    for a file you wrote yourself or otherwise trust — e.g. one that cartlorem 0.1.0's
    ``save_model(model, path, **extra)`` stored with such extra objects. Files written by 0.1.0
    otherwise hold plain data and load without it; they predict what they predicted in 0.1.0 (their
    long-range couplings are converted, see :func:`upgrade_state_dict`).

    map_location: as in torch.load (default "cpu"). Returns the model in the dtype it was saved in and in eval
    mode (a model in training mode keeps a second-order graph of its forces; :func:`cartlorem.training.train`
    sets the mode it needs).
    """
    import pickle
    import re

    from .fileio import damaged_record, file_problem

    path = os.fspath(path)
    problem = file_problem(path)
    if problem is not None:  # the exception types a caller may catch, fileio's words
        if problem == "does not exist":
            raise FileNotFoundError(f"model file not found: {path}")
        raise (IsADirectoryError if os.path.isdir(path) else ValueError)(f"model file {path!r} {problem}")
    damaged = damaged_record(path)
    if damaged is not None:
        raise ValueError(f"model file {path} is damaged: its record {damaged} does not match its checksum (the "
                         "file changed after it was written); restore it or write it again")
    if _is_torchscript(path):  # torch.load's own advice (weights_only=False) would not read it either
        raise ValueError(f"{path} is a TorchScript export (cartlorem export, plain or --metatomic), not a model file: "
                         "pass the model.pt it was made from (exports run in the engines: torch.jit.load, metatomic)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(exc))  # torch >= 2.4 | 2.3
        convert = ("load it with load_model(path, trust_pickle=True); for the command line, convert it once in "
                   "Python: save_model(load_model(path, trust_pickle=True), new_path)")
        if refused is None and not trust_pickle:  # e.g. torch.save(..., pickle_protocol=4): opcodes it lacks
            reason = [line for line in str(exc).splitlines() if line.strip() and "documentation" not in line]
            raise ValueError(f"cannot read model file {path} with the safe reader "
                             f"({reason[-1].strip() if reason else exc}): it is damaged, not a cartlorem model, or "
                             f"pickled with features that reader lacks (e.g. pickle_protocol=4). If you trust its "
                             f"source, {convert}") from None
        if not trust_pickle:
            raise ValueError(
                f"refusing to load {path}: it holds a pickled Python object ({refused.group(1)}), and unpickling "
                "it could run arbitrary code. cartlorem model files hold plain data only. If you wrote this "
                "file yourself or trust its source (e.g. a cartlorem 0.1.0 file saved with extra objects), "
                f"{convert}") from None
        try:
            obj = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:
            raise ValueError(f"cannot read model file {path} (corrupt or not a cartlorem model): {err}") from err
    except Exception as exc:
        raise ValueError(f"cannot read model file {path} (corrupt or not a cartlorem model): {exc}") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    fmt = obj.get("format") if isinstance(obj, dict) else None
    newer = re.fullmatch(r"cartlorem-model-v(\d+)", fmt) if isinstance(fmt, str) else None
    if fmt not in _FORMATS and newer and int(newer.group(1)) > int(_FORMAT.rsplit("v", 1)[1]):
        raise ValueError(f"{path} was written by a newer cartlorem (format {fmt!r}; this one reads up to {_FORMAT!r}): "
                         "upgrade cartlorem to load it")
    if fmt not in _FORMATS:
        raise ValueError(f"{path} is not a cartlorem model file (no '{_FORMAT}' header"
                         + (f"; found {fmt!r})" if isinstance(fmt, str) else ")"))
    config, state = obj.get("config"), obj.get("state_dict")
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise ValueError(f"{path}: a cartlorem model file needs a 'config' dict and a 'state_dict' dict")
    config = complete_config(config)
    try:
        with torch.random.fork_rng(devices=[]):  # the random initial weights, replaced below: the caller's stream
            model = CartLorem(**config)  # of random numbers is left where it was
    except TypeError as exc:
        raise ValueError(f"{path}: the model options in the file are not those of this cartlorem: {exc}") from exc
    dtype = obj.get("dtype", "float32")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"{path}: unsupported dtype {dtype!r} (float32 or float64)")
    model = model.to(getattr(torch, dtype))
    try:
        model.load_state_dict(upgrade_state_dict(state, config, fmt))
    except RuntimeError as exc:  # missing / unexpected entries, or a shape the options do not give
        detail = " ".join(str(exc).split())
        raise ValueError(f"{path}: the weights in the file do not fit the model its options describe ({detail[:600]})"
                         ) from None
    return model.eval()
