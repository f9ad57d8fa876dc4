"""The long-range block: learned equivariant charges → Ewald fields → back into the node features.

From node features h = [h0, h1, h2] (C channels; those of the layer before the last, or of the last
layer, by the model's ``placement``), equivariant linear maps give C_lr
channels of Cartesian multipoles per atom: charges q [N, C_lr], dipoles μ [N, C_lr, 3] and
traceless quadrupoles Θ [N, C_lr, 3, 3]. Channels 0 … k−1 carry charges (``charge_channels`` = k;
default: all of them); the charges of the others are identically zero (those channels carry μ and Θ only).
Charges may be corrected so that channel 0 sums to the structure's total charge and the other channels
to zero (``charge_correction``). Then

* ``kind="multipole"``: the multipoles are contracted with the (Gaussian-smeared) Cartesian Ewald
  interaction tensors, giving at every atom a potential φ (rank 0), field E (rank 1) and field
  gradient G (rank 2) per channel (cartlorem.ewald);
* ``kind="lorem"``: as in the LOREM paper, every Cartesian component of the equivariant charges is
  treated as a scalar charge and convolved with the scalar kernel, giving a rank-0 potential from q,
  a rank-1 potential vector from the components of μ and a rank-2 potential tensor from Θ.

The field ranks are mixed to C channels, coupled with the node features through the Cartesian
products into invariants (φ h0, E·h1, G:h2 and the field norms), and an MLP on [h0, invariants]
updates the scalar channels. The long-range energy of each atom has two parts, returned apart:

* a learned readout of the updated scalars (dimensionless: the model multiplies it by its energy
  ``scale``, like every other learned readout);
* the electrostatic energy of the learned multipoles in eV, with a weight per channel,
  COULOMB · ½ Σ_c a_c (q φ − μ·E − ½ Θ:G) (for "lorem", COULOMB · ½ Σ_c a_c (qφ + μ·ψ + Θ:Ψ)). It is
  never rescaled, so that the reported multipoles keep physical units (e, e·Å, e·Å²), and it carries
  the exact 1/r, 1/r², 1/r³ tails. The weight of channel 0, the channel the model reports, is fixed
  at a_0 = 1 (a buffer, not trained): its term is exactly the Coulomb energy of the reported charges,
  dipoles and quadrupoles. Left free, training moved it (1 → 0.69 on the dimer set), and the reported
  charges were then physical only up to √a_0. The other channels' weights a_c (c ≥ 1) are learned.

Boundary conditions, per structure: open (pbc all False), fully periodic, or a slab, pbc = [True, True,
False] (periodic along cell rows a and b, vacuum along the third row). For a slab the block hands the
Ewald layer its slab frame (:func:`slab_frame`): the third row becomes ``h n`` (n the unit normal of
the a-b plane on the side of c, h = c·n the height of c above the plane) and the atoms are translated
along n to the middle of [0, h]. Both are exact symmetries of the slab energy (the result depends on
a, b, the normal and the relative positions only), so positions can come unwrapped and c need not be
orthogonal to the plane; the atoms must span less than h along the normal. Other pbc patterns are
refused (ValueError).

With feature rank ``lmax`` < 2 the multipoles go only up to that rank (lmax 0: charges; lmax 1:
charges and dipoles). The "multipole" kind still feeds back the field and field gradient of those
sources (their norms are invariants); the "lorem" kind has potentials only up to rank ``lmax``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import numbers
from typing import Optional

import torch
from torch import nn

from ..ewald import batched_multipole_fields
from ..ewald.cells import PeriodicPlan, periodic_plan, plan_fits, prepare_periodic_table, traced_ewald_fields
from ..ewald.direct import STF_BASIS, molecule_pairs, pair_list_fits, prepare_pair_table, traced_pair_fields
from ..tensors import EquivariantLinear, product, stf

__all__ = ["LongRangeBlock", "MultipoleMap", "slab_frame", "compact_slab_cells", "check_boundaries", "PLACEMENTS",
           "check_placement", "END_FEATURES", "check_end_features", "long_range_option_defaults",
           "check_long_range_keys", "block_layout", "check_block_options",
           "without_no_op_options"]

#: Where a model runs its long-range block (``long_range_options["placement"]``, an option of the model, not of
#: the block): "before_last", between the last two interaction layers, on the features of the layer before the
#: last, its scalar update being the last layer's input (so the fields reach the neighbours' energies too, and
#: the last layer outputs scalars only, as a short-range model's); "end", after the last layer, on its
#: features, its update feeding the block's readout only (the last layer then outputs rank-1 and rank-2
#: features for the block, whose backward and double backward make a training step dearer;
#: benchmarks/train_step.py).
PLACEMENTS = ("before_last", "end")


def _check_choice(key: str, value, choices, meaning: str) -> None:
    """ValueError unless ``value`` of long_range_options[``key``] is one of ``choices`` (``meaning``: what it sets)."""
    if value not in choices:
        raise ValueError(f"long_range_options[{key!r}] must be one of {', '.join(map(repr, choices))} ({meaning}), "
                         f"got {value!r}")


def check_placement(placement) -> None:
    """ValueError unless ``placement`` is one of :data:`PLACEMENTS`."""
    _check_choice("placement", placement, PLACEMENTS,
                  "where the long-range block runs: between the last two interaction layers, or after the last")


#: How the last layer makes the rank-1 and rank-2 features that a block placed at the end reads
#: (``long_range_options["end_features"]``, an option of the model): "full", as every other layer (its body-order
#: product into every rank, a skip with a weight matrix per species); "light", its product into the scalars only,
#: ranks 1 and 2 being the layer's message A_l times a learned weight per species and channel (body order of the
#: message; the block's sources keep the last layer's reach), mixed, plus a skip of the previous layer's ranks 1
#: and 2 with one weight matrix for all species. "light" saves the rank-1/2 product paths and the per-species
#: rank-1/2 skip (S× the multiply-adds of one GEMM: SpeciesLinear), with their backward and double backward in training
#: (benchmarks/train_step.py); the rank-0 path is the same in both.
END_FEATURES = ("full", "light")


def check_end_features(end_features) -> None:
    """ValueError unless ``end_features`` is one of :data:`END_FEATURES`."""
    _check_choice("end_features", end_features, END_FEATURES,
                  "how the last layer makes the rank-1/2 features of a block at the end")


def block_layout(options, num_layers: int, lmax: int) -> tuple[str, str]:
    """(placement, end_features) of a model's long-range block from its ``long_range_options`` (None or absent:
    "end", "full"); ValueError for a value the model cannot build or that would change nothing: a choice not
    in :data:`PLACEMENTS` / :data:`END_FEATURES`, "before_last" with one layer, "light" end features with the
    block before the last layer or with ``lmax`` 0 (no rank-1/2 features for them to make)."""
    placement = options.get("placement")
    placement = "end" if placement is None else placement  # an empty string is no choice of the default
    check_placement(placement)
    if placement == "before_last" and num_layers < 2:
        raise ValueError("long_range_options['placement'] = 'before_last' runs the long-range block between the "
                         "last two interaction layers and needs num_layers >= 2; use placement 'end' with one layer")
    end_features = options.get("end_features")
    end_features = "full" if end_features is None else end_features
    check_end_features(end_features)
    if end_features != "full" and placement != "end":
        raise ValueError(f"long_range_options['end_features'] = {end_features!r} chooses how the last layer makes the "
                         f"rank-1/2 features of a block placed at the end; with placement {placement!r} the last "
                         "layer outputs scalars only: leave it 'full'")
    if end_features != "full" and lmax == 0:
        raise ValueError(f"long_range_options['end_features'] = {end_features!r} chooses how the last layer makes the "
                         "rank-1/2 features of the block, and with lmax = 0 it has none (the model would be the "
                         "'full' one): leave it 'full'")
    return placement, end_features


def without_no_op_options(options, lmax: int) -> tuple[dict, list]:
    """(``options`` without the values that change nothing, which :func:`block_layout` and the block refuse, and
    what was changed, as text): "light" end features with ``lmax`` 0 become "full", a coupling with lr_channels 1
    is dropped. Older cartlorem versions stored them: their model files and run configs still load."""
    options, changed = dict(options), []
    if options.get("end_features") == "light" and lmax == 0:
        options["end_features"] = "full"
        changed.append("end_features 'light' is 'full' with lmax = 0")
    if options.get("lr_channels") == 1 and "coupling" in options:
        changed.append(f"coupling {options.pop('coupling')!r} sets nothing with lr_channels = 1")
    return options, changed


def check_block_options(options, kind: str, num_layers: int, lmax: int) -> None:
    """ValueError for ``long_range_options`` a model of these settings would refuse (:func:`block_layout`, and the
    block's own checks, on a block of one channel), before a model or any data is made."""
    check_long_range_keys(options)
    block_layout(options, num_layers, lmax)
    with torch.device("meta"):  # weights without memory or random numbers: the caller's streams (any device) stay
        LongRangeBlock(1, kind=kind, lmax=lmax,
                       **{k: v for k, v in options.items() if k not in ("placement", "end_features")})


def long_range_option_defaults() -> dict:
    """The keys a model's ``long_range_options`` take, with their defaults: the arguments of :class:`LongRangeBlock`
    but those the model sets (channels, kind, lmax), and the model's own ``placement`` and ``end_features``
    (None: the model's default)."""
    params = inspect.signature(LongRangeBlock.__init__).parameters
    out = {k: p.default for k, p in params.items() if k not in ("self", "channels", "kind", "lmax")}
    out.update(placement=None, end_features=None)
    return out


def check_long_range_keys(options) -> None:
    """ValueError naming a key of ``long_range_options`` that no option has (with the closest one, if any)."""
    known = list(long_range_option_defaults())
    for key in options:
        if key == "lmax":
            raise ValueError("long_range_options must not set 'lmax': the long-range block uses the model's lmax")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown long-range option {key!r}{hint}; valid: {', '.join(known)}")


def check_boundaries(pbc: torch.Tensor) -> None:
    """ValueError unless every row of pbc [B, 3] (bool) is all False, all True or [True, True, False]."""
    pbc = pbc.detach().to("cpu", torch.bool)
    ok = pbc.all(dim=1) | ~pbc.any(dim=1) | (pbc[:, 0] & pbc[:, 1] & ~pbc[:, 2])
    if not bool(ok.all()):
        k = int((~ok).nonzero()[0])
        raise ValueError(
            f"structure {k} has pbc = {pbc[k].tolist()}: long-range models support open boundaries (all False), "
            "fully periodic cells (all True) and slabs, pbc = [True, True, False] (vacuum along the third cell "
            "row; reorder the cell rows so that the open direction comes last)")


def check_structures(graphs, label_of) -> None:
    """ValueError for the first one-structure graph of ``graphs`` that the long-range block cannot take (boundaries
    other than open, periodic or a slab; a slab whose atoms do not fit in the height of its third cell row), named
    ``label_of(k)`` (e.g. "train.xyz, frame 7"): the block would refuse it only inside the first batch that holds
    it, with the structure's index in that batch."""
    for k, g in enumerate(graphs):
        try:
            check_boundaries(g.pbc)
            slab_frame(g.positions, g.batch, g.cell, g.pbc)
        except ValueError as err:
            message = str(err)
            where = "structure 0" if g.num_graphs == 1 else ""
            raise ValueError(label_of(k) + (message[len(where):] if where and message.startswith(where)
                                            else f": {message}")) from None


def slab_frame(positions: torch.Tensor, batch: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor):
    """The frame in which the Ewald layer takes slabs (pbc = [True, True, False]); others are unchanged.

    positions [N, 3] Å, batch [N], cell [B, 3, 3] Å (rows a, b, c), pbc [B, 3] bool → (positions [N, 3],
    cell [B, 3, 3]). For each slab, with n = ±(a × b)/|a × b| on the side of c and the height h = c·n > 0:
    the third row becomes h n (orthogonal to a and b), and the atoms move along n by the constant
    (not differentiated) t = h/2 − (z_min + z_max)/2, z = r·n, so that they lie in the middle of the
    region 0 <= z <= h that :mod:`cartlorem.ewald.slab` needs. The slab energy does not depend on either
    change (a rigid translation; c enters only through the vacuum it pads), so forces are unchanged.
    ValueError if c has no height above the plane or the atoms span more than h along n.
    """
    slab = pbc[:, 0] & pbc[:, 1] & ~pbc[:, 2]  # [B]
    if not bool(slab.any()):
        return positions, cell
    frame_cell, normal, height = _slab_cell(cell, slab)
    z_min, z_max = _span(positions, batch, normal)
    for k in slab.nonzero().flatten().tolist():
        h, extent = float(height[k].detach()), float(z_max[k] - z_min[k])
        if not h > 0.0:
            raise ValueError(
                f"structure {k} is a slab (pbc = [True, True, False]) but its third cell row has no height above "
                "the plane of a and b: long-range models need it to span the atoms plus vacuum (e.g. "
                "atoms.center(vacuum=10.0, axis=2), or ase.build.fcc111(..., vacuum=10.0))")
        if extent > h * (1.0 + 1e-12):
            raise ValueError(
                f"structure {k} is a slab (pbc = [True, True, False]) whose atoms span {extent:.6g} Å along the "
                f"normal, more than the height of the third cell row, {h:.6g} Å: make c longer (more vacuum)")
    shift = torch.where(slab, 0.5 * height.detach() - 0.5 * (z_min + z_max), torch.zeros_like(height))  # [B]
    return positions + shift[batch, None] * normal.detach()[batch], frame_cell


def compact_slab_cells(graph, margin: float = 1.0):
    """``graph`` with every slab's third cell row shortened to ``h' n``, ``h' = ceil(extent) + margin`` (Å, the atoms'
    extent along the normal n), where that is below its height; other structures and slabs with less vacuum unchanged.

    A slab's fields do not depend on the vacuum in its cell (:mod:`cartlorem.ewald.slab`), but its Ewald sum runs over
    the cell's height plus the sum's own gap, and its k-vectors grow with that height: 10 Å of vacuum in c nearly
    doubles them for a 9 Å slab. The trainer shortens the cells of its batches (the same for the eager and the
    compiled step); the result changes within the sum's ``accuracy``. The local model does not see c (no
    images along it). Not for MD: the height would change with the positions, and with it the k-vectors.
    """
    pbc = graph.pbc
    if pbc.numel() == 0:
        return graph
    slab = pbc[:, 0] & pbc[:, 1] & ~pbc[:, 2]
    if not bool(slab.any()):
        return graph
    cell = graph.cell
    _, normal, height = _slab_cell(cell.detach(), slab)
    z_min, z_max = _span(graph.positions, graph.batch, normal)
    tight = torch.ceil(z_max - z_min) + margin
    shorten = slab & (tight < height) & torch.isfinite(tight)  # a slab without atoms keeps its cell
    if not bool(shorten.any()):
        return graph
    third = torch.where(shorten[:, None], (tight[:, None] * normal).to(cell.dtype), cell[:, 2])
    return dataclasses.replace(graph, cell=torch.cat([cell[:, :2], third[:, None]], dim=1))


def _span(positions: torch.Tensor, batch: torch.Tensor, normal: torch.Tensor):
    """(lowest, highest) z = r·n of every structure's atoms (no gradient): positions [N, 3], batch [N], normal [B, 3]
    → ([B], [B]); ±inf for a structure without atoms."""
    z = (positions.detach() * normal.detach()[batch]).sum(-1)  # [N]
    n_struct = normal.shape[0]
    z_min = torch.full((n_struct,), float("inf"), dtype=z.dtype, device=z.device).scatter_reduce(
        0, batch, z, reduce="amin")
    z_max = torch.full((n_struct,), -float("inf"), dtype=z.dtype, device=z.device).scatter_reduce(
        0, batch, z, reduce="amax")
    return z_min, z_max


def _slab_cell(cell: torch.Tensor, slab: torch.Tensor):
    """The cells of :func:`slab_frame` (no value-dependent step: what the compiled training step traces).

    cell [B, 3, 3], slab [B] bool → (cell [B, 3, 3] with the slabs' third row h n, normal n [B, 3], height h [B]);
    the other cells unchanged (their n and h are of no use)."""
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    basis = torch.where(slab[:, None, None], cell, eye)  # other structures: a harmless stand-in (no 0/0)
    normal = torch.linalg.cross(basis[:, 0], basis[:, 1])  # [B, 3]
    normal = normal / torch.linalg.vector_norm(normal, dim=-1, keepdim=True).clamp_min(1e-30)
    height = (basis[:, 2] * normal).sum(-1)  # [B], signed
    normal = torch.where(height[:, None] < 0, -normal, normal)
    height = height.abs()
    third = torch.where(slab[:, None], height[:, None] * normal, cell[:, 2])  # [B, 3]
    return torch.cat([cell[:, :2], third[:, None]], dim=1), normal, height


def _real(value) -> bool:
    """Whether ``value`` is a real number (a bool is not one here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(value) -> float:
    """``float(value)``, or NaN where that fails or ``value`` is a bool (NaN fails every range check)."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class MultipoleMap(EquivariantLinear):
    """Node features → C_lr channels of (q, μ, Θ): an :class:`EquivariantLinear` (same weights, same state
    dict keys) whose charges (rank 0) in channels ≥ ``charge_channels`` are exact zeros, whatever its
    weights hold. The mask lives in this module, so anything that runs it (the long-range block, the
    TorchScript export) gets the same zeros; those channels' charge weights get no gradient."""

    def __init__(self, in_channels: int, out_channels: int, ranks, charge_channels: int):
        super().__init__(in_channels, out_channels, ranks)
        mask = torch.zeros(out_channels)
        mask[:charge_channels] = 1.0
        self.register_buffer("charge_mask", mask, persistent=False)  # [C_lr]; not in model files

    def _output(self, y: torch.Tensor, rank: int) -> torch.Tensor:
        if rank == 0:
            return y * self.charge_mask.to(y.dtype)  # exact zeros: 0 × finite
        return y


class LongRangeBlock(nn.Module):
    """Equivariant long-range messages (see module docstring).

    Args:
        channels: C, channels of the node features.
        kind: "multipole" or "lorem".
        lmax: highest rank of the node features and of the learned multipoles (0, 1 or 2; default 2).
        lr_channels: C_lr, channels of learned multipoles (default 4).
        smearing: Gaussian width σ of the sources in Å (default 1.0; the local model owns short range).
        accuracy: Ewald accuracy (default 1e-5, relative).
        charge_correction: make channel 0 sum to the total charge and the others to zero.
            "weighted": the excess is spread over the atoms with learned positive weights
            w_i = softplus(w · h0_i) (like the inverse hardness of charge equilibration), so that an
            ion far from a neutral molecule can keep its charge; "uniform" or True: the same shift on
            every atom of the structure; False / None: no correction.
        coupling: initial weight a_c of the electrostatic energy of the learned channels c ≥ 1
            (default 1: the Coulomb energy of the learned charges, in eV); channel 0 has a_0 = 1, fixed
            (see the module docstring). Starting at the physical scale matters:
            with 0.1 the dimer models learned far too small charges (±0.04–0.15 e on ammonium
            formate against xTB's ±0.93 e) and half of the ion-pair force beyond 8 Å was missing
            (benchmarks/intermolecular.py). The model's energy ``scale`` does not multiply this term.
        hidden: width of the scalar-update MLP (default 32).
        charge_channels: how many channels, from channel 0 on, carry charges (1 … C_lr, or None: all
            C_lr, the default). With 1, channels c ≥ 1 carry dipoles and quadrupoles only and their charges
            are identically zero, so the monopole (1/r) energy between distant fragments is that of
            channel 0 alone and channel 0's charges are fixed by it. With charges in several channels,
            their 1/r tails add up to a_0 Q_0² + Σ a_c Q_c² and channel 0's share is not determined by
            energies and forces. On the dimer set (benchmarks/charge_units.py, 12 epochs, one seed) the
            charged monomers' channel-0 charges are 0.100 e from their formal ±1 with all four channels
            charged and 0.087 e with channel 0 alone. All channels are the default because one charge
            channel trained worse: on the cumulene set, with the block after the last layer, models with
            all channels charged left the short-range energy floor in all four runs and those with one
            channel in neither of two (benchmarks/results/cumulene_defaults.md, benchmarks/README.md); on the dimers the model
            trained to convergence with both defaults of today (block at the end, all channels charged)
            has lower errors than the one with the earlier defaults (before the last layer, one channel;
            benchmarks/results/converged.end_all.dimers.md).
            Model files written before this option (no key) load with None, as they were trained; the
            model stores the value in use in its config.
    """

    def __init__(self, channels: int, kind: str = "multipole", lr_channels: int = 4, smearing: float = 1.0,
                 accuracy: float = 1e-5, charge_correction="uniform", hidden: int = 32,
                 coupling: float = 1.0, lmax: int = 2, charge_channels: Optional[int] = None):
        super().__init__()
        if kind not in ("multipole", "lorem"):
            raise ValueError(f"long-range kind must be 'multipole' or 'lorem', got {kind!r}")
        # checked here, not at the first call (the Ewald layer's checks) or never (a NaN coupling: NaN energies)
        if not 0 < _number(smearing) < math.inf:
            raise ValueError(f"smearing must be a finite positive width in Å (the model's sources are Gaussians), "
                             f"got {smearing!r}")
        if not 0 < _number(accuracy) < 1:
            raise ValueError(f"accuracy must be a number in (0, 1) (relative Ewald accuracy), got {accuracy!r}")
        if not math.isfinite(_number(coupling)):
            raise ValueError(f"coupling must be a finite number, got {coupling!r}")
        if _number(coupling) != 1.0 and _real(lr_channels) and lr_channels == 1:
            raise ValueError(f"coupling = {coupling!r} is the initial weight of the channels c >= 1, and with "
                             "lr_channels = 1 there are none (channel 0's weight is 1): drop it, or use more channels")
        if lmax not in (0, 1, 2):
            raise ValueError(f"lmax of the long-range block must be 0, 1 or 2, got {lmax!r}")
        for name, value in (("lr_channels", lr_channels), ("hidden", hidden)):
            if not (_real(value) and value == int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.kind, self.lr_channels, self.lmax = kind, int(lr_channels), int(lmax)
        if charge_channels is None:
            charge_channels = self.lr_channels
        if (isinstance(charge_channels, bool) or not isinstance(charge_channels, numbers.Integral)
                or not 1 <= charge_channels <= self.lr_channels):
            raise ValueError(f"charge_channels must be an integer from 1 to lr_channels = {self.lr_channels} (how "
                             f"many channels, from channel 0 on, carry charges) or None (all), got {charge_channels!r}")
        self.charge_channels = int(charge_channels)
        self.smearing, self.accuracy = float(smearing), float(accuracy)
        if charge_correction is True:
            charge_correction = "uniform"
        if charge_correction not in ("uniform", "weighted", False, None):
            raise ValueError(f"charge_correction must be 'weighted', 'uniform', True, False or None, "
                             f"got {charge_correction!r}")
        self.charge_correction = charge_correction or None
        self.correction_weight = nn.Linear(channels, 1) if self.charge_correction == "weighted" else None
        source_ranks = tuple(range(self.lmax + 1))
        # "multipole": sources of any rank make a potential, field and field gradient;
        # "lorem": the rank-l components of the charges give a rank-l potential only
        self.field_ranks = (0, 1, 2) if kind == "multipole" else source_ranks
        self.to_multipoles = MultipoleMap(channels, self.lr_channels, source_ranks, self.charge_channels)
        self.from_fields = EquivariantLinear(self.lr_channels, channels, self.field_ranks)
        # invariants: F0 h0, F0, then per field rank l > 0: F_l·h_l (when the features have rank l), |F_l|²
        n_inv = channels * (2 + sum(1 + (l <= self.lmax) for l in self.field_ranks if l > 0))
        hidden = int(hidden)
        self.update = nn.Sequential(nn.Linear(channels + n_inv, hidden), nn.SiLU(), nn.Linear(hidden, channels))
        self.readout = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        # a_0 = 1 for the reported channel: a buffer, so no optimiser step (or weight decay) moves it. A
        # model read from an older file (format v1 or v2, where a_0 was a parameter) keeps its stored
        # a_0; when that is not 1, its charges are in the old units: a_0 × U(q) is the Coulomb energy
        # of √a_0 q, not of q (cartlorem.model.upgrade_state_dict).
        self.register_buffer("coupling_channel0", torch.tensor(1.0))
        self.coupling_others = nn.Parameter(torch.full((self.lr_channels - 1,), float(coupling)))  # a_1 ...

    @property
    def coupling(self) -> torch.Tensor:
        """[C_lr] weights a_c of the channels' electrostatic energies: a_0 (fixed, 1 for new models) then
        the learned a_1 … (read-only: set ``coupling_channel0`` / ``coupling_others``)."""
        return torch.cat([self.coupling_channel0.reshape(1), self.coupling_others])

    def pair_list_fits(self, n_pairs: int) -> bool:
        """Whether this block's field sum over ``n_pairs`` intra-structure pairs (i = j counted) fits one pair list
        (:func:`cartlorem.ewald.direct.pair_list_fits`) with the sources :meth:`forward` sends: q, μ, Θ for the
        potential, field and gradient ("multipole"), or every Cartesian component as a charge for its
        potential ("lorem")."""
        if self.kind == "multipole":
            return pair_list_fits(n_pairs, self.field_ranks, tuple(range(self.lmax + 1)), self.lr_channels, stf=True)
        return pair_list_fits(n_pairs, (0,), (0,), self.lr_channels * (1, 4, 9)[self.lmax])

    def prepare_compiled(self, dtype: torch.dtype, device) -> None:
        """Build the constant tables of the field sum that :meth:`forward` runs with ``pairs`` (dtype and device of
        the positions) before torch.compile traces it, so that the trace finds them
        (:func:`cartlorem.ewald.direct.prepare_pair_table`)."""
        if self.kind == "multipole":
            prepare_pair_table(self.field_ranks, range(self.lmax + 1), dtype, device, traceless_gradient=True)
        else:
            prepare_pair_table((0,), (0,), dtype, device, traceless_gradient=True)
        prepare_periodic_table(*self._sum_ranks(), self.smearing, dtype, device)

    def _sum_ranks(self) -> tuple:
        """(field ranks, source ranks) of the sum :meth:`forward` runs."""
        return (self.field_ranks, tuple(range(self.lmax + 1))) if self.kind == "multipole" else ((0,), (0,))

    def _sum_channels(self) -> int:
        """Channels of the sum :meth:`forward` runs: q, mu, Theta in ``lr_channels`` ("multipole"), or every
        component of them as a charge ("lorem": (1 + 3 + 5) x ``lr_channels`` up to ``lmax``)."""
        if self.kind == "multipole":
            return self.lr_channels
        return self.lr_channels * sum(2 * l + 1 for l in range(self.lmax + 1))

    def periodic_plan(self, graph) -> Optional[PeriodicPlan]:
        """The plan of :func:`cartlorem.ewald.cells.traced_ewald_fields` for a batch of periodic cells and slabs,
        possibly with open structures beside them (what the compiled training step passes to :meth:`forward` as
        ``pairs``; with the slabs' frames of :func:`slab_frame`, checked here, and the open structures' pairs), or
        None where that sum does not take the batch: no periodic structure, another pbc pattern, or more terms
        than :func:`cartlorem.ewald.cells.plan_fits` or :meth:`pair_list_fits` admit (the eager sum then
        chooses real space or PME for the large cells)."""
        pbc = graph.pbc
        if pbc.numel() == 0 or not bool(pbc.any()):
            return None
        slab = pbc[:, 0] & pbc[:, 1] & ~pbc[:, 2]
        open_ = ~pbc.any(dim=1)
        if not bool((pbc.all(dim=1) | slab | open_).all()):
            return None
        cell, shift = graph.cell.detach(), None
        if bool(slab.any()):
            positions = graph.positions.detach()
            framed, cell = slab_frame(positions, graph.batch, cell, pbc)  # ValueError for a slab it cannot take
            shift = framed - positions
        ranks, source_ranks = self._sum_ranks()
        plan = periodic_plan(graph.batch, cell, smearing=self.smearing, accuracy=self.accuracy, ranks=ranks,
                             source_ranks=source_ranks, slab=slab, shift=shift, open=open_,
                             n_channels=self._sum_channels())
        if plan.open is not None:  # the open structures' fields: their pair sum, over their own atoms only
            n_open = torch.bincount(graph.batch, minlength=open_.shape[0])[open_]
            if not self.pair_list_fits(int((n_open**2).sum())):
                return None
            atoms = open_[graph.batch].nonzero().flatten()
            i, j = molecule_pairs(graph.batch[atoms], unordered=True)
            plan = plan._replace(open_pairs=(atoms[i], atoms[j]))
        return plan if plan_fits(plan) else None

    def forward(self, h, graph, positions: torch.Tensor, cell: torch.Tensor, pairs=None) -> dict:
        """h = [h0 [N, C], h1 [N, C, 3] or None, h2 [N, C, 3, 3] or None]; positions [N, 3] Å; cell [B, 3, 3] Å.

        Returns "readout" [N] (learned, dimensionless: the caller scales it), "electrostatic" [N]
        (eV, the coupling-weighted energy of the learned multipoles; channel 0 with weight a_0 = 1), "scalars"
        [N, C] (h0 updated by the field invariants: the next layer's input with placement "before_last"), and channel 0 of the learned
        multipoles: "charges" [N] (e), "dipoles" [N, 3] (e·Å, lmax ≥ 1), "quadrupoles" [N, 3, 3]
        (e·Å², traceless, lmax 2).

        ``pairs``: the intra-structure pairs (i, j), each once, of ``cartlorem.ewald.direct.molecule_pairs(batch,
        unordered=True)`` when every
        structure is open and the caller has checked the batch (the compiled training step,
        :mod:`cartlorem.training.compiled`): the field sum then runs op by op over them with no
        value-dependent step (:func:`cartlorem.ewald.direct.traced_pair_fields`); for "multipole" its pair
        features linearised about the positions: exact values, first derivatives in the positions and every
        derivative in the parameters (what the training loss's gradient takes), but no curvature of the kernel
        in a second derivative in the positions (a Hessian: leave ``pairs`` None). Or, when every structure is a
        periodic cell or a slab, :meth:`periodic_plan`'s plan: one Ewald sum over all the cells, again with no
        value-dependent step (:func:`cartlorem.ewald.cells.traced_ewald_fields`); open structures in such a batch
        get the pair sum over the plan's ``open_pairs``.
        """
        from ..units import COULOMB

        if pairs is None:
            check_boundaries(graph.pbc)
            positions, cell = slab_frame(positions, graph.batch, cell, graph.pbc)
        elif isinstance(pairs, PeriodicPlan) and pairs.slab is not None:  # the frame of slab_frame, as planned
            positions = positions + pairs.shift
            cell = _slab_cell(cell, pairs.slab)[0]

        # the field gradient's symmetric traceless part is all the block uses (Θ : G with Θ traceless, and the
        # rank-2 features): the open structures' pair sum then carries rank 2 in five components, not nine
        def pair_fields(pair_list, charges, dipoles, quadrupoles, ranks):
            # linearised for the multipole kernels (2-5% off the compiled step); for the scalar kernel of
            # "lorem" no gain was measured (benchmarks/README.md, session 25)
            return traced_pair_fields(positions, pair_list, charges, dipoles, quadrupoles, smearing=self.smearing,
                                      ranks=ranks, traceless_gradient=True, linearized=self.kind == "multipole")

        def fields_of(charges, dipoles=None, quadrupoles=None, ranks=(0, 1, 2)):
            if isinstance(pairs, PeriodicPlan):
                f = traced_ewald_fields(positions, graph.batch, cell, pairs, charges, dipoles, quadrupoles,
                                        smearing=self.smearing, ranks=ranks, traceless_gradient=True)
                if pairs.open_pairs is None:
                    return f
                # open structures beside the cells: their pair sum (zero at the cells' atoms, as the Ewald sum is at
                # theirs)
                g = pair_fields(pairs.open_pairs, charges, dipoles, quadrupoles, ranks)
                return tuple(None if a is None else a + b for a, b in zip(f, g))
            if pairs is not None:
                return pair_fields(pairs, charges, dipoles, quadrupoles, ranks)
            f = batched_multipole_fields(positions, graph.batch, cell, graph.pbc, charges=charges, dipoles=dipoles,
                                         quadrupoles=quadrupoles, smearing=self.smearing, accuracy=self.accuracy,
                                         ranks=ranks, traceless_gradient=True)
            return f.potential, f.field, f.field_gradient

        q, mu, theta = self.to_multipoles(h[: self.lmax + 1])[:3]  # q: zero from channel charge_channels on
        if self.charge_correction:  # leaves those zeros exact: their sums and targets are 0
            q = self._correct_charges(q, graph, h[0])
        ranks = self.field_ranks
        if self.kind == "multipole":
            if theta is not None:
                # Θ comes from traceless features through a linear map: traceless up to the rounding of
                # the (possibly much larger) features; project it so the Ewald input check sees exact Θ.
                # Twice: where Θ vanishes by symmetry (a perfect rocksalt cell) the features' rounding can
                # leave Θ ≈ a·I, which one projection turns into noise of size eps·a whose trace is as
                # large as its entries; the second projection leaves noise eps² a, traceless to eps.
                theta = stf(stf(theta))
            fields = list(fields_of(q, mu, theta))
            e_es = q * fields[0]
            if mu is not None:
                e_es = e_es - (mu * fields[1]).sum(-1)
            if theta is not None:
                e_es = e_es - 0.5 * (theta * fields[2]).sum((-1, -2))
        else:
            n, c = q.shape
            sources = [q, mu, theta][: self.lmax + 1]
            if theta is not None:  # Θ by its five symmetric traceless components (STF_BASIS): the potential
                # of each is that component of Ψ, which is symmetric traceless too (the kernel is linear)
                basis = STF_BASIS.to(device=theta.device, dtype=theta.dtype)  # [5, 9]
                sources[2] = theta.reshape(n, c, 9) @ basis.T  # [N, C, 5]
            stacked = torch.cat([s.reshape(n, -1) for s in sources], dim=1)  # [N, (1 + 3 + 5) C] up to lmax
            pot = fields_of(stacked, ranks=(0,))[0]
            fields, start = [], 0
            for s in sources:  # potential of every component, in the shape of its source
                size = s[0].numel()
                fields.append(pot[:, start:start + size].reshape(s.shape))
                start += size
            e_es = sum((s * p).reshape(n, c, -1).sum(-1) for s, p in zip(sources, fields))
            if theta is not None:
                fields[2] = (fields[2] @ basis).reshape(n, c, 3, 3)  # Ψ [N, C, 3, 3]
        e_es = COULOMB * (0.5 * e_es * self.coupling).sum(-1)  # [N] eV

        F = self.from_fields(fields)
        h0 = h[0]
        invariants = [F[0] * h0, F[0]]
        for l in ranks[1:]:
            if l <= self.lmax:
                invariants.append(product(F[l], l, h[l], l, 0))
            invariants.append((F[l] * F[l]).flatten(2).sum(-1))
        h0_new = h0 + self.update(torch.cat([h0] + invariants, dim=-1))
        out = {"readout": self.readout(h0_new).squeeze(-1), "electrostatic": e_es, "scalars": h0_new,
               "charges": q[:, 0]}
        if mu is not None:
            out["dipoles"] = mu[:, 0]
        if theta is not None:
            out["quadrupoles"] = theta[:, 0]
        return out

    def _correct_charges(self, q: torch.Tensor, graph, h0: torch.Tensor) -> torch.Tensor:
        """Per structure, channel 0 sums to the total charge and the others to 0: the excess is
        removed uniformly or in proportion to learned positive weights (``charge_correction``)."""
        n_struct = graph.num_graphs
        if self.correction_weight is None:
            w = torch.ones_like(q[:, :1])  # [N, 1]
        else:
            w = nn.functional.softplus(self.correction_weight(h0)) + 1e-3  # [N, 1], > 0
        totals = torch.zeros(n_struct, 1, dtype=q.dtype, device=q.device).index_add(0, graph.batch, w)  # [B, 1]
        sums = torch.zeros(n_struct, q.shape[1], dtype=q.dtype, device=q.device).index_add(0, graph.batch, q)
        target = torch.zeros_like(sums)
        target[:, 0] = graph.total_charge.to(q.dtype)
        return q - w * ((sums - target) / totals)[graph.batch]

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, lmax={self.lmax}, lr_channels={self.lr_channels}, "
                f"charge_channels={self.charge_channels}, smearing={self.smearing}, "
                f"accuracy={self.accuracy}, charge_correction={self.charge_correction!r}")
