"""ASE calculator for CartLorem models.

Neighbour lists are reused between MD steps: the list is built with cutoff + skin and rebuilt only
when an atom has moved more than skin/2, or when the number of atoms, the species, the cell or the
boundary conditions change. Edges beyond the cutoff in a padded list are harmless: the envelope and
the Bessel basis vanish there exactly, so results equal those of a fresh list.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .graph import Graph, atoms_to_graph

__all__ = ["CartLoremCalculator"]


class CartLoremCalculator(Calculator):
    """ASE calculator: energy, free_energy, energies, forces, stress (periodic); for long-range models
    also per-atom ``charges``, ``dipoles`` (e·Å, per atom) and ``energy_lr``.

    Args:
        model_or_path: a CartLorem model or the path of a file written by ``save_model``.
        device: "cpu" or "cuda" (falls back to CPU with a warning when CUDA is absent).
        dtype: None keeps the model's dtype; "float32"/"float64" casts it.
        skin: neighbour-list skin in Å for reuse between MD steps (0 disables reuse).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "charges", "dipoles",
                              "energy_lr"]

    def __init__(self, model_or_path, device: str = "cpu", dtype: Optional[Union[str, torch.dtype]] = None,
                 skin: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        from .model import CartLorem, load_model

        if isinstance(model_or_path, (str, os.PathLike)):
            model = load_model(model_or_path)
        elif isinstance(model_or_path, CartLorem):
            model = model_or_path
        else:
            raise TypeError(f"model_or_path must be a CartLorem or a path, got {type(model_or_path).__name__}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            import warnings

            warnings.warn("CUDA is not available; CartLoremCalculator runs on the CPU")
            device = "cpu"
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if (dtype is not None and dtype != model.dtype) or torch.device(device) != model.embedding.device:
            import copy

            model = copy.deepcopy(model)  # never change the caller's model in place
        self.model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        self.model.eval()
        self.device = device
        self.skin = float(skin)
        self._nl_key = None
        self._nl_graph: Optional[Graph] = None
        self._nl_positions: Optional[np.ndarray] = None

    def _graph(self, atoms) -> Graph:
        positions = atoms.get_positions()
        key = (len(atoms), tuple(atoms.get_atomic_numbers()), tuple(np.round(atoms.get_cell().array, 12).ravel()),
               tuple(atoms.get_pbc()), float(atoms.info.get("total_charge", atoms.info.get("charge", 0.0))))
        reuse = (self.skin > 0 and self._nl_key == key and self._nl_positions is not None
                 and np.all(np.isfinite(positions))
                 and np.max(np.linalg.norm(positions - self._nl_positions, axis=1)) < 0.5 * self.skin)
        if reuse:
            g = self._nl_graph
            g = g.replace(positions=torch.tensor(positions, dtype=g.positions.dtype))
            # overlapping atoms inside a reused list still need catching
            vec = g.edge_vectors()
            if len(vec) and float(vec.norm(dim=-1).min()) < 1e-3:
                reuse = False
            else:
                return g
        g = atoms_to_graph(atoms, self.model.cutoff + self.skin, dtype=self.model.dtype)
        self._nl_key, self._nl_graph, self._nl_positions = key, g, positions.copy()
        return g

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        graph = self._graph(self.atoms).to(device=self.device, dtype=self.model.dtype)
        want_stress = "stress" in properties and bool(np.all(self.atoms.get_pbc()))
        out = self.model(graph, compute_forces=True, compute_stress=want_stress or None, create_graph=False)
        energy = float(out["energy"].detach().sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out["node_energy"].detach().cpu().numpy().astype(np.float64),
            "forces": out["forces"].detach().cpu().numpy().astype(np.float64),
        }
        if "stress" in out and bool(np.any(self.atoms.get_pbc())):
            s = out["stress"][0].detach().cpu().numpy().astype(np.float64)
            self.results["stress"] = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]  # Voigt xx yy zz yz xz xy
        for key in ("charges", "dipoles"):
            if key in out:
                self.results[key] = out[key].detach().cpu().numpy().astype(np.float64)
        if "energy_lr" in out:
            self.results["energy_lr"] = float(out["energy_lr"].detach().sum())
