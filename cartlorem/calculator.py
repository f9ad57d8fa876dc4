"""ASE calculator for CartLorem models.

Neighbour lists are reused between MD steps: the list is built with cutoff + skin and rebuilt only
when an atom has moved more than skin/2, or when the number of atoms, the species, the cell or the
boundary conditions change. At every call the model gets only the list's edges within the cutoff: those
beyond it would add nothing (the envelope and the Bessel basis vanish there exactly) but cost as much as any
other edge, so results equal those of a fresh list at the cost of one fresh list's edges.

Positions reach the model wrapped, in float64, before any cast to the model's dtype: when a list is
built every atom gets a fixed whole number of lattice vectors (periodic directions) and the structure a
fixed origin (open directions) to subtract; the list is built for those positions and keeps them while
it is reused. ASE's MD never wraps, and a float32 model fed raw positions 3e4 Å from the origin would
see them only to 2e-3 Å. Energies, forces and stress do not change (lattice and global translations).

Boundary conditions: open, fully periodic, and for long-range models also slabs (pbc = [True, True,
False], vacuum along the third cell row; the model puts the atoms in the middle of that row's height,
see :func:`cartlorem.nn.long_range.slab_frame`, so the shift above never takes them out of the region
the slab sum needs). Local models accept any pattern. Stress is reported for fully periodic cells only:
asking for it otherwise raises ASE's PropertyNotImplementedError.

Results: ``results`` holds only properties ASE knows (energy, free_energy, energies, forces, stress,
and for long-range models the per-atom ``charges`` and, for molecules, the ``dipole`` moment when
asked for, e.g. by ``atoms.get_dipole_moment()``), so that every ASE path (``get_properties``,
SinglePointCalculator copies, extxyz output, socket clients) accepts them. The model's other outputs
of the last calculation are in ``extra_results``: "dipoles" [N, 3] (e·Å, per atom), "quadrupoles"
[N, 3, 3] (e·Å², per atom), "energy_lr" (eV) and, once asked for, "born_charges" [N, 3, 3] (e) and "virial"
[3, 3] (eV, −∂E/∂ε for any boundaries: −V σ for a periodic cell, also defined for slabs and molecules);
:meth:`CartLoremCalculator.get_extra` computes them when needed.

Electric field: ``CartLoremCalculator(model, electric_field=[Ex, Ey, Ez])`` (V/Å) applies a uniform
field (long-range models): molecules get −P·E in the energy and its gradient in the forces; periodic
cells and slabs get the forces F_i += Z*_iᵀE and no energy term (see :meth:`cartlorem.CartLorem.forward`).
``calc.set(electric_field=...)`` or ``calc.electric_field = ...`` changes it (None: no field) and drops the
results. Dipoles, Born charges, field energies and forces are those of the positions ASE holds: the model
takes P about ASE's origin (``dipole_origin``), whatever the float64 shift. For periodic cells and slabs Z*
and the field forces do not depend on the lattice image each atom's position is taken in
(:func:`cartlorem.forces.born_charges`).

Charge state: ``atoms.info["total_charge"]`` (or ``"charge"``, e) and ``atoms.info["multiplicity"]`` (or MACE's
``"total_spin"`` or fairchem's ``"spin"``, all 2S + 1; two that disagree are refused) are those of the whole
structure. ASE's ``repeat`` and ``atoms * n`` copy ``info`` as it is, and so do the supercells of
``ase.phonons.Phonons``: for the supercell of n cells of a cell with charge Q, set ``total_charge`` to n·Q (and
the multiplicity to the supercell's).

Threads: one calculator shared by several threads computes for one of them at a time (each gets its own
structure's results); for calculations in parallel give each thread its own calculator (they may share the model).
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .graph import (_MIN_DISTANCE, CHARGE_KEYS, MULTIPLICITY_KEYS, Graph, atoms_to_graph, home_cell_offsets,
                    wrapped_slab)

__all__ = ["CartLoremCalculator"]


def _same_field(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    """Whether two electric fields (arrays, or None: no field) are the same."""
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


class CartLoremCalculator(Calculator):
    """ASE calculator: energy, free_energy, energies, forces, stress (fully periodic cells); for long-range models
    also per-atom ``charges`` (e). Per-atom dipoles, quadrupoles and the long-range energy are in
    ``extra_results`` (see the module docstring and :meth:`get_extra`).

    Args:
        model_or_path: a CartLorem model or the path of a file written by ``save_model``.
        device: "cpu" or "cuda" (falls back to CPU with a warning when CUDA is absent).
        dtype: None keeps the model's dtype; "float32"/"float64" casts it.
        skin: neighbour-list skin in Å for reuse between MD steps (0 disables reuse).
        trust_pickle: passed to :func:`cartlorem.load_model` for a path (default False: a file holding
            pickled objects is refused).
        electric_field: uniform external field [Ex, Ey, Ez] in V/Å (long-range models; default None).
        **kwargs: ASE's own calculator arguments (``label``, ``directory``, ``atoms``, ...); any other is an error.

    ``parameters`` / ``todict()`` (what trajectories and ase.db rows record): device, dtype, skin, electric_field
    and the model file when one was given.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "charges", "dipole"]
    extra_properties = ("dipoles", "quadrupoles", "energy_lr", "born_charges", "virial")

    def __init__(self, model_or_path, device: str = "cpu", dtype: Optional[Union[str, torch.dtype]] = None,
                 skin: float = 0.5, trust_pickle: bool = False, electric_field=None, **kwargs):
        from .model import CartLorem, load_model

        self._lock = threading.RLock()
        unknown = sorted(set(kwargs) - self._ASE_ARGUMENTS)
        if unknown:  # ASE would keep them as "parameters" and do nothing with them (a misspelled electric_field)
            raise TypeError(f"CartLoremCalculator got unknown argument(s) {', '.join(unknown)}; it takes "
                            "model_or_path, device, dtype, skin, trust_pickle, electric_field and ASE's "
                            f"{', '.join(sorted(self._ASE_ARGUMENTS))}")
        super().__init__(**kwargs)

        if isinstance(model_or_path, (str, os.PathLike)):
            model = load_model(model_or_path, trust_pickle=trust_pickle)
        elif isinstance(model_or_path, CartLorem):
            model = model_or_path
        else:
            raise TypeError(f"model_or_path must be a CartLorem or a path, got {type(model_or_path).__name__}")
        device = str(device)
        try:
            kind = torch.device(device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):  # mps, xpu, meta, ...: failed deep inside torch at the first call
            raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            import warnings

            warnings.warn("CUDA is not available; CartLoremCalculator runs on the CPU")
            device = "cpu"
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, dtype)
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be None (the model's), 'float32' or 'float64', got {dtype!r}")
        try:
            skin = float(skin)
        except (TypeError, ValueError):
            skin = float("nan")
        if not (np.isfinite(skin) and skin >= 0.0):
            raise ValueError(f"skin must be a finite distance >= 0 Å (0: a new neighbour list at every call), "
                             f"got {skin!r}")
        own = model is not model_or_path  # read from a file: the calculator's alone
        if (dtype is not None and dtype != model.dtype) or torch.device(device) != model.embedding.device:
            import copy

            model, own = copy.deepcopy(model), True  # never change the caller's model in place
        self.model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        if own:  # the calculator asks for no graph of its results (create_graph=False), in any mode; the
            self.model.eval()  # caller's model keeps its mode (a model in training keeps training on forces)
        self.device = device
        self.skin = skin
        # ASE's record of the settings (todict(): trajectories, ase.db rows); the field is added by its setter
        self.parameters.update(device=device, dtype=str(self.model.dtype).replace("torch.", ""), skin=skin)
        if isinstance(model_or_path, (str, os.PathLike)):
            self.parameters["model"] = os.fspath(model_or_path)
        # an instance attribute: only long-range models have charges and a dipole
        self.implemented_properties = [p for p in type(self).implemented_properties
                                       if p not in ("charges", "dipole") or self.model.long_range is not None]
        self._field: Optional[np.ndarray] = None
        self.electric_field = electric_field
        self.extra_results: dict = {}
        self._nl_key = None
        self._nl_graph: Optional[Graph] = None
        self._nl_positions: Optional[np.ndarray] = None
        self._nl_lattice: Optional[np.ndarray] = None  # [N, 3] whole lattice vectors subtracted per atom
        self._nl_shift: Optional[np.ndarray] = None  # [3] the global shift subtracted (open directions)

    # One calculation at a time: ASE's get_property sets self.atoms, computes and then reads self.results, so two
    # threads sharing a calculator got each other's results (wrong forces for a structure, with no error).
    def __getstate__(self):  # pickles and deep copies (a lock is neither) get a new lock
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def get_property(self, name, atoms=None, allow_calculation=True):
        with self._lock:
            return super().get_property(name, atoms, allow_calculation)

    def calculate_properties(self, atoms, properties):  # Atoms.get_properties: calculate, then read the results
        with self._lock:
            return super().calculate_properties(atoms, properties)

    #: the arguments of ase.calculators.calculator.Calculator.__init__
    _ASE_ARGUMENTS = frozenset({"restart", "ignore_bad_restart_file", "label", "atoms", "directory"})

    @property
    def electric_field(self) -> Optional[np.ndarray]:
        """The uniform external field [Ex, Ey, Ez] (V/Å), or None. Setting it checks it and drops the results."""
        return None if self._field is None else self._field.copy()

    @electric_field.setter
    def electric_field(self, value) -> None:
        field = None
        if value is not None:
            if self.model.long_range is None:
                raise ValueError("electric_field needs learned charges: this model has no long range "
                                 "(long_range=None); use a 'multipole' or 'lorem' model")
            try:
                field = np.array(value, dtype=np.float64)
            except (TypeError, ValueError):
                field = np.full(0, np.nan)
            if field.shape != (3,) or not np.all(np.isfinite(field)):
                raise ValueError(f"electric_field must be 3 finite numbers (V/Å), got {value!r}")
        with self._lock:
            same = _same_field(field, self._field)
            self._field = field
            self.parameters["electric_field"] = None if field is None else field.tolist()
            if not same:
                self.reset()

    def set(self, **kwargs):
        """ASE's ``set``: ``electric_field`` (V/Å, or None) is the one parameter; it drops the results when it
        changes. Returns {name: new value} of what changed."""
        unknown = sorted(set(kwargs) - {"electric_field"})
        if unknown:
            raise TypeError(f"CartLoremCalculator.set takes electric_field only, got {', '.join(unknown)}")
        if "electric_field" not in kwargs:
            return {}
        with self._lock:  # not in the middle of another thread's calculation
            before = self._field
            self.electric_field = kwargs["electric_field"]
            if _same_field(before, self._field):
                return {}
            return {"electric_field": self.electric_field}

    def reset(self):
        super().reset()
        self.extra_results = {}

    #: ``atoms.info`` keys the model reads (the structure's total charge and spin multiplicity)
    INFO_KEYS = CHARGE_KEYS + MULTIPLICITY_KEYS

    def check_state(self, atoms, tol=1e-15):
        """ASE's changes (positions, numbers, cell, pbc, ...), and "info" when the total charge or multiplicity in
        ``atoms.info`` changed: ASE does not compare ``info``, so the results of the old charge state were kept."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and not changes:
            if any(repr(self.atoms.info.get(k)) != repr(atoms.info.get(k)) for k in self.INFO_KEYS):
                changes.append("info")
        return changes

    def get_extra(self, name: str, atoms=None):
        """A model output outside ASE's property list, computed for ``atoms`` (default: the last ones)
        if needed: "dipoles" [N, 3] e·Å, "quadrupoles" [N, 3, 3] e·Å², "energy_lr" eV, "born_charges"
        [N, 3, 3] e (Z*_i,ab = ∂P_a/∂r_ib; three more backward passes, computed only when asked for)
        (long-range models; dipoles need lmax ≥ 1, quadrupoles lmax 2); "virial" [3, 3] eV, −∂E/∂ε for any
        boundaries (−V σ for a periodic cell; for a slab or a molecule, whose volume is mostly vacuum, the
        strain derivative that the engines' barostats divide by their box volume; computed when asked for)."""
        with self._lock:
            return self._get_extra(name, atoms)

    def _get_extra(self, name: str, atoms):
        from ase.calculators.calculator import PropertyNotImplementedError

        if name not in self.extra_properties:
            raise ValueError(f"unknown extra output {name!r}; choose from {', '.join(self.extra_properties)}")
        if atoms is None and self.atoms is None:
            raise ValueError("nothing calculated yet: pass the atoms")
        if name == "born_charges" and self.model.long_range is None:
            raise ValueError("born_charges need learned charges: this model has no long range (long_range=None)")
        changed = atoms is not None and bool(self.check_state(atoms))
        if name in ("born_charges", "virial") and (changed or name not in self.extra_results):
            # one evaluation with the extra output (energy and forces come with it), not one without and one with
            self.calculate(self.atoms if atoms is None else atoms, ["energy", "forces", name], all_changes)
        else:
            self.get_property("energy", atoms)  # (re)computes when the structure changed
        if name not in self.extra_results:
            raise PropertyNotImplementedError(f"{name} is not an output of this model")
        value = self.extra_results[name]
        return value.copy() if isinstance(value, np.ndarray) else value

    @staticmethod
    def _offsets(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What to subtract from the positions: ([N, 3] Å, whole lattice vectors per atom along the periodic
        directions, to the home cell; [3] Å, when a direction is open the centroid of the rest, a global shift)."""
        lattice_part, shift = home_cell_offsets(positions, cell, pbc), np.zeros(3)
        if not np.all(pbc):
            shift = (positions - lattice_part).mean(axis=0)
        return lattice_part, shift

    def _graph(self, atoms) -> Graph:
        """The graph of ``atoms``, from the reused list where it holds (no result depends on the lattice image an
        atom is taken in, so an atom that crossed a cell face within the skin keeps the list's image)."""
        positions = atoms.get_positions()
        key = (len(atoms), tuple(atoms.get_atomic_numbers()), tuple(np.round(atoms.get_cell().array, 12).ravel()),
               tuple(atoms.get_pbc()), tuple(repr(atoms.info.get(k)) for k in self.INFO_KEYS))  # repr: any value
        reuse = (self.skin > 0 and self._nl_key == key and self._nl_positions is not None
                 and np.all(np.isfinite(positions))
                 and np.max(np.linalg.norm(positions - self._nl_positions, axis=1)) < 0.5 * self.skin)
        if reuse:
            g = self._nl_graph
            g = g.replace(positions=torch.tensor(positions - self._nl_lattice - self._nl_shift,
                                                 dtype=g.positions.dtype))
            d = g.edge_vectors().norm(dim=-1)
            # overlapping atoms inside a reused list still need catching: the same limit and message as a new list
            if len(d):
                k = int(d.argmin())
                if float(d[k]) < _MIN_DISTANCE:
                    i, j = (int(x) for x in g.edge_index[:, k])
                    raise ValueError(f"{atoms.get_chemical_formula() or 'structure'}: atoms {i} and {j} are "
                                     f"{float(d[k]):.2e} Å apart (overlapping atoms)")
            return self._within_cutoff(g, d)
        lattice_part, shift, cell = np.zeros_like(positions), np.zeros(3), atoms.get_cell().array
        # otherwise atoms_to_graph says what is bad (no atoms, NaN)
        if len(positions) and np.all(np.isfinite(positions)) and np.all(np.isfinite(cell)):
            lattice_part, shift = self._offsets(positions, cell, atoms.get_pbc())
        shifted = atoms.copy()
        shifted.arrays["positions"] = positions - lattice_part - shift
        g = atoms_to_graph(shifted, self.model.cutoff + self.skin, dtype=self.model.dtype,
                           label=atoms.get_chemical_formula() or "structure", wrap=False)  # wrapped just above
        self._nl_key, self._nl_graph, self._nl_positions = key, g, positions.copy()
        self._nl_lattice, self._nl_shift = lattice_part, shift
        return self._within_cutoff(g, g.edge_vectors().norm(dim=-1))

    def _within_cutoff(self, g: Graph, lengths: torch.Tensor) -> Graph:
        """``g`` with the edges of the list's skin left out (``lengths`` [E] Å): they add nothing to the results
        (the envelope is zero beyond the cutoff), but a 0.5 Å skin gave a water box ~26% more edges to compute,
        which cost more per step than building a new list."""
        if self.skin == 0:
            return g
        keep = lengths <= self.model.cutoff
        if bool(keep.all()):
            return g
        return g.replace(edge_index=g.edge_index[:, keep], edge_shift=g.edge_shift[keep])

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        with self._lock:
            self._calculate(atoms, properties, system_changes)

    def _calculate(self, atoms, properties, system_changes):
        if torch.is_inference_mode_enabled():  # the model's advice (ask for the energy only) is not ours to take
            raise RuntimeError("CartLoremCalculator computes forces by autograd, which torch.inference_mode() "
                               "switches off: call it outside inference_mode (torch.no_grad() is fine)")
        super().calculate(atoms, properties, system_changes)
        if {"numbers", "cell", "pbc"} & set(system_changes):  # a new structure, not a step of one
            wrapped = wrapped_slab(self.atoms.get_positions(), self.atoms.get_cell().array, self.atoms.get_pbc())
            if wrapped:
                import warnings

                warnings.warn(f"{self.atoms.get_chemical_formula()}: this slab looks wrapped across its open cell "
                              f"vector (a {wrapped[0]:.1f} Å empty layer between atoms near both faces of the cell, "
                              f"{wrapped[1]:.1f} Å apart through them), so the model sees two half-slabs; shift the "
                              "atoms near the top face down by the third cell vector if it is one slab", stacklevel=2)
        field = self._field
        charge_outputs = field is not None or "dipole" in properties or "born_charges" in properties
        graph = self._graph(self.atoms)
        graph = graph.to(device=self.device, dtype=self.model.dtype)
        periodic = bool(np.all(self.atoms.get_pbc()))
        if "stress" in properties and not periodic:
            from ase.calculators.calculator import PropertyNotImplementedError

            raise PropertyNotImplementedError(
                f"stress is computed for fully periodic cells only; these atoms have pbc = "
                f"{self.atoms.get_pbc().tolist()} (for a slab or a molecule the cell volume, mostly vacuum, "
                "gives the stress no meaning)")
        molecule = not bool(np.any(self.atoms.get_pbc()))
        if "dipole" in properties and not molecule:
            from ase.calculators.calculator import PropertyNotImplementedError

            raise PropertyNotImplementedError(
                f"the dipole moment is defined for molecules (pbc all False); these atoms have pbc = "
                f"{self.atoms.get_pbc().tolist()} (get_extra('born_charges') works for any cell)")
        # the model saw r − shift (and whole lattice vectors): P and the field's potential about ASE's origin
        origin = -self._nl_shift if charge_outputs and np.any(self._nl_shift) else None
        want_stress = (periodic and "stress" in properties) or "virial" in properties
        out = self.model(graph, compute_forces=True, compute_stress=want_stress or None,
                         create_graph=False, compute_dipole="dipole" in properties,
                         compute_born_charges="born_charges" in properties, electric_field=field,
                         dipole_origin=origin)
        energies = out["node_energy"].detach().cpu().numpy().astype(np.float64)
        # summed in float64: a float32 model's total is cast to float32 (steps of 1.6e-2 eV at 1.3e5 eV, a 192-atom
        # water box with all-electron-like reference energies); its per-atom energies summed here keep ~1e-3 eV
        energy = float(energies.sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": energies,
            "forces": out["forces"].detach().cpu().numpy().astype(np.float64),
        }
        if "dipole" in out:
            self.results["dipole"] = out["dipole"][0].detach().cpu().numpy().astype(np.float64)
        if "stress" in out and periodic:
            s = out["stress"][0].detach().cpu().numpy().astype(np.float64)
            self.results["stress"] = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]  # Voigt xx yy zz yz xz xy
        if "charges" in out:
            self.results["charges"] = out["charges"].detach().cpu().numpy().astype(np.float64)
        self.extra_results = {key: out[key].detach().cpu().numpy().astype(np.float64)
                              for key in ("dipoles", "quadrupoles") if key in out}
        if "energy_lr" in out:
            self.extra_results["energy_lr"] = float(out["energy_lr"].detach().sum())
        if "born_charges" in out:
            self.extra_results["born_charges"] = out["born_charges"].detach().cpu().numpy().astype(np.float64)
        if "virial" in out:
            self.extra_results["virial"] = out["virial"][0].detach().cpu().numpy().astype(np.float64)
