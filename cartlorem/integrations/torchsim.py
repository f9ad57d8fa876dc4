"""torch-sim adapter: a CartLorem model as a torch-sim ``ModelInterface`` (batched MD, GPU).

    import torch, torch_sim as ts
    from cartlorem.integrations.torchsim import CartLoremModel

    model = CartLoremModel("model.pt", device="cuda", dtype=torch.float64)
    final = ts.integrate(system=[atoms_1, atoms_2], model=model, integrator=ts.Integrator.nvt_langevin,
                         n_steps=1000, temperature=300.0, timestep=0.001)   # ps

A batched ``SimState`` (positions [N, 3] Å, column-vector cells [B, 3, 3], ``system_idx`` [N],
atomic numbers, pbc) becomes one cartlorem batch: the cells are transposed to rows
(``state.row_vector_cell``), each structure gets its own neighbour list (vesin, on the CPU), and
the model returns energy [B] eV, forces [N, 3] eV/Å and stress [B, 3, 3] eV/Å³ (ASE sign
convention, which is torch-sim's). A per-system total charge is read from ``state.charge`` ([B] e,
the SimState extra other charge-aware torch-sim models use; torch-sim 0.6 also names it ``total_charge``) when
present, else 0. torch-sim 0.6 takes no extras from ``ase.Atoms`` by itself (0.4-0.5 took ``atoms.info["charge"]``
and ``["spin"]``): give a charged or open-shell structure as a state, ``ts.io.atoms_to_state(atoms, device, dtype,
system_extras_map={"charge": "charge", "spin": "spin"})``, or it is computed neutral and a singlet.

Works with torch-sim 0.3 (Python 3.11) to 0.6 (Python >= 3.12): only the SimState attributes
common to these versions are read. :func:`state_to_graph` needs no torch-sim at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Optional, Union

import torch

from ..graph import Graph
from .common import structures_to_graph

try:
    from torch_sim.models.interface import ModelInterface as _Base

    _MISSING: Optional[ImportError] = None
except ImportError as exc:  # torch-sim is optional: state_to_graph still works without it
    _Base, _MISSING = torch.nn.Module, exc

__all__ = ["CartLoremModel", "state_to_graph"]

#: The SimState extra of a uniform external electric field [B, 3] (V/Å), torch-sim >= 0.6's name for it.
FIELD = "external_E_field"


def state_to_graph(state, cutoff: float, dtype: Optional[torch.dtype] = None, *, read_spin: bool = True) -> Graph:
    """A torch-sim ``SimState`` (or any object with its attributes, or a mapping of them: torch-sim's ``StateDict``,
    which ``ModelInterface.forward`` may be given) → one :class:`Graph` batch.

    Reads ``positions`` [N, 3] Å, ``atomic_numbers`` [N], ``system_idx`` [N], ``cell`` [B, 3, 3] Å
    with lattice vectors as *columns* (torch-sim's convention; ``row_vector_cell`` is used when the
    object has it), ``pbc`` (bool, [3] or [B, 3]) and, optionally, ``charge`` [B] e and (``read_spin``) ``spin``
    [B] (torch-sim >= 0.4), taken as the spin multiplicity 2S + 1, as torch-sim hands it to fairchem's models; a 0
    (torch-sim 0.4-0.5's default, for a system whose spin was not given) is a singlet, not checked. torch-sim 0.6
    keeps them as system extras named ``charge`` / ``total_charge`` and ``spin`` / ``total_spin``: either name is
    read, and a state whose two names disagree is refused. A multiplicity the electron count does not allow is
    refused.
    The graph's positions are the state's (same device, differentiable in them), taken into their home cell in
    float64 and cast to ``dtype``.
    """
    if isinstance(state, Mapping):
        state = SimpleNamespace(**state)
    rows = getattr(state, "row_vector_cell", None)
    if rows is None:
        rows = state.cell.transpose(-1, -2)
    system_idx = getattr(state, "system_idx", None)
    if system_idx is None:  # torch-sim < 0.3 called it "batch"
        system_idx = getattr(state, "batch", None)
    charge, charge_name = _extra(state, "charge", "total_charge")
    spin, spin_name = _extra(state, "spin", "total_spin") if read_spin else (None, "state.spin")
    if spin is not None:  # torch-sim's 0: not given (per system: a batch may mix given spins and defaults)
        spin = [None if m == 0 else m for m in torch.as_tensor(spin).detach().cpu().reshape(-1).tolist()]
        spin = None if all(m is None for m in spin) else spin
    return structures_to_graph(state.positions, state.atomic_numbers, rows, state.pbc, system_idx,
                               cutoff=cutoff, total_charge=charge, multiplicity=spin,
                               dtype=dtype, charge_inputs=(charge_name, f"{spin_name} (2S + 1)"))


def _extra(state, *names) -> tuple:
    """(value, "state.<name>") of the first of ``names`` the state holds, or (None, "state.<first name>"): torch-sim
    0.6 keeps a system's charge and spin as extras under either of two names. Where both are given they must
    agree."""
    found = [(name, getattr(state, name, None)) for name in names]
    found = [(name, value) for name, value in found if value is not None]
    if not found:
        return None, f"state.{names[0]}"
    name, value = found[0]
    for other, x in found[1:]:
        a = torch.as_tensor(value).detach().cpu().double().reshape(-1)
        b = torch.as_tensor(x).detach().cpu().double().reshape(-1)
        if a.shape != b.shape or not torch.equal(a, b):
            raise ValueError(f"the state gives state.{name} = {a.tolist()} and state.{other} = {b.tolist()}: two "
                             "values of one quantity (torch-sim 0.6 reads either name); give one of them")
    return value, f"state.{name}"


class CartLoremModel(_Base):
    """A CartLorem model behind torch-sim's ``ModelInterface``.

    Args:
        model_or_path: a CartLorem model or the path of a file written by ``save_model``.
        device: where to run (default: where the model is). The caller's model is never moved:
            a copy is made when device or dtype change.
        dtype: torch-sim runs in the model's dtype (default: the model's own); float64 for tests.
        compute_forces, compute_stress: what ``forward`` returns besides the energy (both default
            True; both may be switched later, as torch-sim's validation does).

    ``forward(state)`` → {"energy": [B] eV, "forces": [N, 3] eV/Å, "stress": [B, 3, 3] eV/Å³},
    detached (zeros as stress for structures that are not fully periodic: open structures and slabs). A state
    with a uniform external field, ``state.external_E_field`` [B, 3] (V/Å; torch-sim 0.6's system extra), gets it
    as :meth:`cartlorem.CartLorem.forward`'s ``electric_field`` (long-range models): open structures −P·E in the
    energy and its gradient in the forces, periodic cells and slabs the forces Z*ᵀE. That is the whole response of
    the model, not its linear part: torch-sim's ``UniformPolarizationModel`` is not added on top.
    """

    def __init__(self, model_or_path, *, device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None, compute_forces: bool = True, compute_stress: bool = True):
        if _MISSING is not None:
            raise ImportError("cartlorem.integrations.torchsim.CartLoremModel needs torch-sim: "
                              "pip install torch-sim-atomistic") from _MISSING
        super().__init__()
        from ..model import CartLorem, load_model

        if isinstance(model_or_path, (str, os.PathLike)):
            model = load_model(model_or_path)
        elif isinstance(model_or_path, CartLorem):
            model = model_or_path
        else:
            raise TypeError(f"model_or_path must be a CartLorem or a path, got {type(model_or_path).__name__}")
        device = torch.device(device) if device is not None else model.embedding.device
        dtype = dtype if dtype is not None else model.dtype
        if device != model.embedding.device or dtype != model.dtype:
            import copy

            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        self.model = model.eval()
        self._device, self._dtype = device, dtype
        self._compute_forces, self._compute_stress = bool(compute_forces), bool(compute_stress)

    @property
    def compute_forces(self) -> bool:
        return self._compute_forces

    @compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        self._compute_forces = bool(value)

    @property
    def compute_stress(self) -> bool:
        return self._compute_stress

    @compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        self._compute_stress = bool(value)

    def forward(self, state, **kwargs) -> dict:
        """Energy [B], forces [N, 3] and stress [B, 3, 3] of a batched SimState (see the class)."""
        # the spin only where the model uses it (charge-state conditioning): other models are not refused a state
        # whose spin follows another convention
        graph = state_to_graph(state, self.model.cutoff, dtype=self._dtype,
                               read_spin=self.model.conditioning is not None)
        field = state.get(FIELD) if isinstance(state, Mapping) else getattr(state, FIELD, None)
        if field is not None:
            field = torch.as_tensor(field).detach().to(device=graph.positions.device, dtype=graph.positions.dtype)
            finite = bool(torch.isfinite(field).all())
            if field.shape != (graph.num_graphs, 3) or not finite:
                raise ValueError(f"state.{FIELD} must hold one finite field [Ex, Ey, Ez] (V/Å) per system, "
                                 f"[{graph.num_graphs}, 3]; got shape {list(field.shape)}"
                                 + ("" if finite else " with NaN or inf"))
            if bool((field == 0).all()):  # no field (and a local model takes it)
                field = None
            elif self.model.long_range is None:
                raise ValueError(f"state.{FIELD} needs learned charges: this model has no long range "
                                 "(long_range=None)")
        out = self.model(graph, compute_forces=self._compute_forces, compute_stress=self._compute_stress,
                         create_graph=False, electric_field=field)
        result = {"energy": out["energy"].detach()}
        if self._compute_forces:
            result["forces"] = out["forces"].detach()
        if self._compute_stress:
            result["stress"] = out["stress"].detach()
        return result
