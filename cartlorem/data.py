"""Datasets: extxyz → labelled graphs, per-species reference energies, statistics, splits.

Labels are read either from ASE single-point results (``"calc"``, what ``ase.io.read`` returns for
the standard extxyz keys ``energy``/``forces``/``stress``) or MACE-style from named entries in
``atoms.info`` / ``atoms.arrays`` (``REF_energy``, ``REF_forces``, ``REF_stress``). Units: eV, Å,
eV/Å, eV/Å³ (ASE stress sign convention: stress = (1/V) ∂E/∂ε). ``atoms.info["total_charge"]``
(e, default 0; or fairchem's ``"charge"``) and ``atoms.info["multiplicity"]`` (2s + 1, default 1; or MACE's
``"total_spin"`` or fairchem's ``"spin"``, also 2s + 1: cartlorem.graph.MULTIPLICITY_KEYS; checked against the
electron count where given, :func:`check_charge_states`) are carried into the graph. Charge labels
(:func:`attach_charge_labels`): a molecular dipole (e·Å, ``atoms.info["dipole"]`` or the calculator's
dipole; open structures only: a calculator's dipole of a periodic structure or slab is ignored) and Born
effective charges (e, ``atoms.arrays["born_charges"]`` [N, 9], row-major Z*_i,ab = ∂P_a/∂r_ib, or the
calculator's ``born_effective_charges``).

Typical use::

    graphs = read_dataset("train.xyz", cutoff=5.0)
    refs = fit_reference_energies(graphs, species=[1, 8, 11, 17])
    stats = dataset_statistics(graphs, refs)
    train_idx, valid_idx = split(graphs, valid_fraction=0.1, seed=0)

Batches for training are made by ``cartlorem.training`` (a DataLoader with ``graph.collate``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .graph import Graph, atoms_to_graph, check_charge_state, info_charge_state, wrapped_slab

_log = logging.getLogger(__name__)

__all__ = [
    "attach_labels",
    "check_charge_states",
    "attach_charge_labels",
    "read_dataset",
    "fit_reference_energies",
    "isolated_atom_energies",
    "is_isolated_atom",
    "labels_the_loss_sees",
    "ISOLATED_ATOM_TYPE",
    "training_statistics",
    "stress_key_unused",
    "duplicate_structures",
    "dataset_statistics",
    "split",
]

LABELS = ("energy", "forces", "stress")
CHARGE_LABELS = ("dipole", "born_charges")


# --------------------------------------------------------------------------------------------------
# labels


#: while read_dataset runs: {id(atoms): results} of the frames checked so far (ASE's check_state for every label
#: of every frame was ~60% of the reading time); None outside it, where atoms may change between calls
_CHECKED_RESULTS: contextvars.ContextVar = contextvars.ContextVar("cartlorem_checked_results", default=None)
#: inside :func:`config_types_of_files`: the config types of the frames read so far (read_dataset adds its own and
#: leaves the warning about named types that no frame has to it); None outside
_CONFIG_TYPES_SEEN: contextvars.ContextVar = contextvars.ContextVar("cartlorem_config_types_seen", default=None)


def _warn_unknown_config_types(config_type_weights, types, source) -> None:
    unknown = sorted(set(config_type_weights or ()) - set(types))
    if unknown:
        _log.warning("%s: config_type_weights names config type(s) %s that no frame has (the frames' types: %s)",
                     source, ", ".join(map(repr, unknown)), ", ".join(map(repr, sorted(types))))


@contextlib.contextmanager
def config_types_of_files(config_type_weights: Optional[Mapping[str, float]], source: str):
    """Around the :func:`read_dataset` calls of one run's files (training and validation): a type that
    ``config_type_weights`` names is warned of once, when none of the files has it (``source`` names them), not by
    each file that lacks it."""
    seen: set = set()
    token = _CONFIG_TYPES_SEEN.set(seen)
    try:
        yield
    finally:
        _CONFIG_TYPES_SEEN.reset(token)
    _warn_unknown_config_types(config_type_weights, seen, source)


def _calc_results(atoms) -> dict:
    """The results an attached calculator already holds ({} if none); never triggers a calculation.

    Raises ValueError when the results belong to other positions/cell (the atoms were changed
    after the calculation), rather than returning stale numbers.
    """
    checked = _CHECKED_RESULTS.get()
    if checked is not None and id(atoms) in checked:
        return dict(checked[id(atoms)])
    calc = getattr(atoms, "calc", None)
    results = dict(getattr(calc, "results", None) or {})
    if results and getattr(calc, "atoms", None) is not None:
        changes = calc.check_state(atoms)
        if changes:
            raise ValueError(
                f"the attached calculator's results are stale (atoms changed since: {', '.join(changes)})"
            )
    if checked is not None:
        checked[id(atoms)] = results
    return dict(results)


def _describe_key(name: str, key: str) -> str:
    if key == "calc":
        return f"calculator results['{name}'] (or atoms.{'arrays' if name == 'forces' else 'info'}['{name}'])"
    where = "arrays" if name == "forces" else "info"
    return f"atoms.{where}['{key}'] (or calculator results['{key}'])"


def _lookup(atoms, name: str, key: Optional[str]):
    """Raw value of label ``name`` under ``key`` ("calc" or an info/arrays name), or None if absent."""
    if not key:
        return None
    store = atoms.arrays if name == "forces" else atoms.info
    if key == "calc":
        # ase.io.read moves the standard names into the calculator; Atoms built in memory keep them in info/arrays
        value = _calc_results(atoms).get(name)
        return store.get(name) if value is None else value
    if key in store:
        return store[key]
    # ase.io.read moves the standard names (energy, forces, stress, free_energy) into the calculator
    return _calc_results(atoms).get(key)


def _numbers(value) -> np.ndarray:
    """``value`` as float64; ValueError for anything but integers and reals (True is not 1 eV, text is not a
    number: extxyz reads ``energy=T`` as a boolean and ``energy=abc`` as text)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        shown = repr(value) if arr.size <= 9 else f"an array of {arr.dtype}"
        raise ValueError(f"is {shown}, not a number")
    return arr.astype(np.float64)


def _as_stress(value) -> np.ndarray:
    """6-Voigt (xx, yy, zz, yz, xz, xy), 9 or 3×3 → [3, 3]."""
    arr = _numbers(value)
    if arr.size == 6:
        xx, yy, zz, yz, xz, xy = arr.ravel()
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if arr.size == 9:
        return arr.reshape(3, 3)
    raise ValueError(f"stress must have 6 (Voigt), 9 or 3×3 components, got shape {list(arr.shape)}")


def attach_labels(graph: Graph, atoms, keys: Mapping[str, Optional[str]]) -> Graph:
    """Return ``graph`` (one structure, B = 1) with reference labels read from ``atoms``.

    keys: {"energy" | "forces" | "stress": "calc" | NAME | None}. "calc" reads the results the
    attached ASE calculator already holds (single-point results from extxyz; no calculation is
    run), or else the standard name in ``atoms.info`` / ``atoms.arrays`` (where Atoms built in memory
    keep it; ``ase.io.read`` moves it into the results); NAME reads ``atoms.info[NAME]`` (energy, stress) or
    ``atoms.arrays[NAME]`` (forces),
    falling back on calculator results under that name. Labels that are absent, not asked for, or
    (stress) belong to a structure with no periodic direction are filled with zeros and flagged
    False in the masks.

    Sets energy [1] eV, forces [N, 3] eV/Å, stress [1, 3, 3] eV/Å³ (ASE sign convention; Voigt
    6-vectors, 9-vectors and 3×3 matrices accepted) and has_energy/has_forces/has_stress [1] bool.
    Raises ValueError for an unknown label name, a wrongly shaped label or a non-finite value.
    """
    unknown = set(keys) - set(LABELS)
    if unknown:
        raise ValueError(f"unknown label(s) {sorted(unknown)}; expected some of {list(LABELS)}")
    n = int(graph.positions.shape[0])
    if len(atoms) != n:
        raise ValueError(f"graph has {n} atoms but the ase.Atoms has {len(atoms)}")
    dtype = graph.positions.dtype

    values = {name: _lookup(atoms, name, keys.get(name)) for name in LABELS}
    if values["stress"] is not None and not bool(graph.pbc.all()):
        values["stress"] = None  # open structures and slabs have no volume, so no stress: ignore it
    empty = {"energy": np.zeros(1), "forces": np.zeros((n, 3)), "stress": np.zeros((1, 3, 3))}
    out = {}
    for name in LABELS:
        value = values[name]
        out[f"has_{name}"] = value is not None
        if value is None:
            out[name] = empty[name]
            continue
        where = f"{name} label {_describe_key(name, keys[name])}"
        try:
            arr = _as_stress(value)[None] if name == "stress" else _numbers(value)
        except ValueError as err:
            raise ValueError(f"{where}{'' if str(err).startswith('is ') else ':'} {err}") from None
        if name == "energy" and arr.size == 1:
            arr = arr.reshape(1)
        if arr.shape != empty[name].shape:
            raise ValueError(f"{where} has shape {list(arr.shape)}, expected {list(empty[name].shape)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where} contains NaN or inf")
        out[name] = arr
    changes = {name: torch.tensor(out[name], dtype=dtype) for name in LABELS}
    changes.update({f"has_{name}": torch.tensor([out[f"has_{name}"]]) for name in LABELS})
    return graph.replace(**changes)


# where the "calc" key finds each charge label among the calculator results: ASE's property names (ase.io.read
# puts an extxyz per-atom born_effective_charges [N, 9] there, and a dipole from the comment line)
_CALC_NAMES = {"dipole": "dipole", "born_charges": "born_effective_charges"}


def _charge_label_value(atoms, name: str, key: str):
    """(raw dipole / Born-charge label under ``key``, where it was found): "calc" looks at the calculator's
    ``dipole`` / ``born_effective_charges``; another key at ``atoms.info[key]`` for the dipole,
    ``atoms.arrays[key]`` for Born charges, then the calculator's results under ``key``. (None, None) if absent."""
    if key == "calc":
        key, results = _CALC_NAMES[name], _calc_results(atoms)
    else:
        store, store_name = (atoms.info, "info") if name == "dipole" else (atoms.arrays, "arrays")
        if key in store:
            return store[key], f"atoms.{store_name}['{key}']"
        results = _calc_results(atoms)
    if key in results and results[key] is not None:
        return results[key], f"calculator results['{key}']"
    return None, None


def attach_charge_labels(graph: Graph, atoms, dipole_key: Optional[str] = "dipole",
                         born_charges_key: Optional[str] = "born_charges") -> Graph:
    """Return ``graph`` (one structure, B = 1) with the dipole and Born-charge labels of ``atoms``.

    dipole_key: ``atoms.info`` name of the molecular dipole P (3 numbers, e·Å, about the origin of the
    coordinates as given; ``ase.io.read`` puts an extxyz ``dipole`` among the calculator results,
    which are looked at too), "calc" for the calculator's dipole, or None to ignore it. The dipole is
    defined for open structures only: on a periodic structure or slab a dipole among the calculator results
    (which DFT and xTB codes report, and ``ase.io.write`` stores in extxyz) is ignored, while one given in
    ``atoms.info`` is an error.
    born_charges_key: ``atoms.arrays`` name of the Born effective charges, [N, 9] row-major
    Z*_i,ab = ∂P_a/∂r_ib (a the row; [N, 3, 3] accepted), e; "calc" for the calculator's
    ``born_effective_charges`` (ASE's name and layout, e.g. from vasprun.xml, or an extxyz per-atom property of
    that name, which ``ase.io.read`` puts among the calculator results); or None.

    Sets dipole [1, 3], born_charges [N, 3, 3] and has_dipole / has_born_charges [1] (zeros and False
    where absent). Raises ValueError for an ``atoms.info`` dipole on a periodic structure or slab (P is not
    defined there), a wrongly shaped label or a non-finite value.
    """
    n = int(graph.positions.shape[0])
    if len(atoms) != n:
        raise ValueError(f"graph has {n} atoms but the ase.Atoms has {len(atoms)}")
    dtype = graph.positions.dtype
    dipole, dipole_at = _charge_label_value(atoms, "dipole", dipole_key) if dipole_key else (None, None)
    bec, bec_at = _charge_label_value(atoms, "born_charges", born_charges_key) if born_charges_key else (None, None)
    if dipole is not None:
        where = f"dipole label {dipole_at}"
        if bool(graph.pbc.any()):
            if dipole_at.startswith("calculator"):
                dipole = None  # a periodic code's (or a slab's) dipole: not a molecular P, so not a label
            else:
                raise ValueError(
                    f"{where} on a structure with pbc = {graph.pbc[0].tolist()}: the dipole is defined for "
                    "open structures only (a periodic cell or slab has no unique P); remove it, or read the data "
                    "with dipole_key=None (--dipole-key none)"
                )
    if dipole is not None:
        try:
            dipole = _numbers(dipole)
        except ValueError as err:
            raise ValueError(f"{where} {err} (e·Å)") from None
        if dipole.size != 3:
            raise ValueError(f"{where} has shape {list(dipole.shape)}, expected 3 numbers (e·Å)")
        dipole = dipole.reshape(1, 3)
        if not np.all(np.isfinite(dipole)):
            raise ValueError(f"{where} contains NaN or inf")
    if bec is not None:
        where = f"born_charges label {bec_at}"
        try:
            bec = _numbers(bec)
        except ValueError as err:
            raise ValueError(f"{where} {err} (e)") from None
        if bec.shape not in ((n, 9), (n, 3, 3)):
            raise ValueError(
                f"{where} has shape {list(bec.shape)}, expected [{n}, 9] "
                "(row-major Z*_i,ab = dP_a/dr_ib, e) or [N, 3, 3]"
            )
        bec = bec.reshape(n, 3, 3)
        if not np.all(np.isfinite(bec)):
            raise ValueError(f"{where} contains NaN or inf")
    return graph.replace(
        dipole=torch.tensor(np.zeros((1, 3)) if dipole is None else dipole, dtype=dtype),
        born_charges=torch.tensor(np.zeros((n, 3, 3)) if bec is None else bec, dtype=dtype),
        has_dipole=torch.tensor([dipole is not None]),
        has_born_charges=torch.tensor([bec is not None]),
    )


# --------------------------------------------------------------------------------------------------
# reading


def _is_blank(path: Path, chunk: int = 1 << 16) -> bool:
    """True if the file holds nothing but whitespace. Reads it in chunks up to its first non-blank byte, so a
    dataset file is never loaded whole (a blank file is read to its end, in constant memory)."""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return True
            if block.strip():
                return False


def _check_no_frames_after_a_blank_line(path: Path, fmt: Optional[str], n_read: int) -> None:
    """ValueError when an (ext)xyz file goes on after a blank line where a frame's atom count belongs: ASE's reader
    stops there without a word, so the frames after it were lost (``cat a.xyz b.xyz`` of files that end in a blank
    line). ``fmt``: the file's format as read (:func:`_ase_format`). Walks the frames' line counts only; other formats
    are not checked."""
    import collections
    import itertools

    from ase.io.formats import open_with_compression

    if fmt not in ("extxyz", "xyz"):
        return
    blank = None
    with open_with_compression(str(path), "rt") as f:
        lines = enumerate(f, 1)
        for number, line in lines:
            text = line.strip()
            if not text:
                blank = blank or number
                continue
            if blank is not None:
                raise ValueError(f"{str(path)!r}: line {number} follows a blank line (line {blank}) where the next "
                                 f"frame's atom count belongs; ASE's reader stops at a blank line, so only the "
                                 f"{n_read} frame(s) before it were read. Remove the blank line(s) between frames")
            try:
                count = int(text.split()[0])
            except ValueError:
                return  # not an atom count: ASE's reader judged this file; nothing more to say here
            collections.deque(itertools.islice(lines, count + 1), maxlen=0)  # the comment line and the atoms


def _ase_format(path: Path) -> Optional[str]:
    """ASE's name for the format of the file at ``path`` (None where it cannot tell)."""
    from ase.io.formats import filetype

    try:
        return filetype(str(path))
    except Exception:  # noqa: BLE001 -- an unknown format: ase.io.read then says why
        return None


def _lammps_dump_frames(path: Path, fmt: str, frames) -> None:
    """A LAMMPS dump as ASE reads it, made fit for labels: ValueError for a text dump without an ``element`` column
    (ASE takes atom type 1 for H, 2 for He, ...), and no energy in the frames' results (ASE puts 0.0 there, which a
    dump does not hold: it would be trained on as the reference energy of every frame)."""
    if fmt == "lammps-dump-text":
        from ase.io.formats import open_with_compression

        with open_with_compression(str(path), "rt") as f:
            header = next((line for line in f if line.startswith("ITEM: ATOMS")), "")
        if "element" not in header.split()[2:]:
            raise ValueError(f"{str(path)!r} is a LAMMPS dump without an 'element' column ({header.strip()!r}): ASE "
                             "reads its atom types as atomic numbers (type 1 as H, 2 as He); write the dump with the "
                             "elements (dump_modify ID element Na Cl ... and an 'element' column), or convert it to "
                             "extxyz with the right symbols")
    for atoms in frames:
        results = getattr(getattr(atoms, "calc", None), "results", None)
        if results is not None:
            results.pop("energy", None)
            results.pop("free_energy", None)


def _database_frames(path: Path) -> list:
    """The rows of an ASE database file (.db, .json) as ase.Atoms, with each row's key-value pairs and data in
    ``atoms.info`` (data arrays of one row per atom also in ``atoms.arrays``), where ``read_dataset`` looks for
    labels, the charge state and frame weights: ``ase.io.read`` leaves both out, so a total charge, a
    multiplicity, a config_weight or a REF_energy stored with the row were silently not seen."""
    import ase.db

    frames = []
    for row in ase.db.connect(str(path)).select():
        atoms = row.toatoms()
        atoms.info.update(row.key_value_pairs)
        for key, value in (row.data or {}).items():
            atoms.info[key] = value
            try:
                array = np.asarray(value) if isinstance(value, (np.ndarray, list)) else None
            except (ValueError, TypeError):  # a ragged list (e.g. of bonds): no array, kept in atoms.info only
                array = None
            if array is not None and array.ndim >= 2 and array.shape[0] == len(atoms) and array.dtype.kind in "iuf":
                atoms.arrays[key] = array
        frames.append(atoms)
    return frames


def _load_frames(path_or_atoms_list) -> tuple[str, list]:
    """(name used in messages, list of ase.Atoms) from a file path, an Atoms or a list of Atoms."""
    import ase
    import ase.io

    if isinstance(path_or_atoms_list, (str, os.PathLike)):
        path = Path(path_or_atoms_list)
        if not path.exists():
            raise ValueError(f"dataset file {str(path)!r} does not exist")
        if not path.is_file():
            raise ValueError(f"dataset path {str(path)!r} is not a file")
        if _is_blank(path):
            raise ValueError(f"no structures in {str(path)!r} (the file is empty)")
        fmt = "extxyz" if path.suffix.lower() in (".xyz", ".extxyz") else None
        detected = _ase_format(path) if fmt is None else fmt
        try:
            if detected in ("db", "json"):
                frames = _database_frames(path)
            else:
                frames = ase.io.read(str(path), index=":", format=fmt)
        except Exception as err:  # ASE raises many types for malformed files
            raise ValueError(f"could not read {str(path)!r}: {type(err).__name__}: {err}") from err
        if isinstance(frames, ase.Atoms):
            frames = [frames]
        if detected in ("lammps-dump-text", "lammps-dump-binary"):
            _lammps_dump_frames(path, detected, frames)
        _check_no_frames_after_a_blank_line(path, detected, len(frames))
        return str(path), list(frames)
    if isinstance(path_or_atoms_list, ase.Atoms):
        return "structures", [path_or_atoms_list]
    frames = list(path_or_atoms_list)
    for k, a in enumerate(frames):
        if not isinstance(a, ase.Atoms):
            raise ValueError(f"structures[{k}] is a {type(a).__name__}, expected ase.Atoms")
    return "structures", frames


def read_dataset(
    path_or_atoms_list,
    cutoff: float,
    *,
    energy_key: Optional[str] = "calc",
    forces_key: Optional[str] = "calc",
    stress_key: Optional[str] = "calc",
    require: Sequence[str] = ("energy", "forces"),
    dtype: torch.dtype = torch.float64,
    dipole_key: Optional[str] = "dipole",
    born_charges_key: Optional[str] = "born_charges",
    config_type_weights: Optional[Mapping[str, float]] = None,
    name: Optional[str] = None,
) -> list[Graph]:
    """Read structures and their labels into one :class:`Graph` (B = 1) per structure.

    path_or_atoms_list: an extxyz file (any ASE-readable file), an ``ase.Atoms`` or a list of them.
    cutoff: neighbour-list cutoff in Å. energy_key / forces_key / stress_key: "calc" (ASE
    single-point results), an ``atoms.info`` / ``atoms.arrays`` name such as "REF_energy", or None
    to ignore that label (see :func:`attach_labels`). require: labels every structure must carry.
    dtype: floating dtype of positions, cell and labels. dipole_key / born_charges_key: where the
    molecular dipole (e·Å) and the Born effective charges (e, [N, 9]) are, or None (see
    :func:`attach_charge_labels`); structures without them are flagged in has_dipole / has_born_charges.
    Frame weights (``Graph.weight``, the weight of each of a frame's terms in the training loss): MACE's
    ``atoms.info["config_weight"]`` times ``config_type_weights[config_type]`` ({atoms.info "config_type": weight};
    "Default" for a frame without one, 1 for a type not named, as MACE's ``--config_type_weights``); none when
    neither is given. A named type that no frame has is warned of. ``name``: what messages call a list of frames
    (default "structures"; a file's path names the file).

    Raises ValueError, naming the file and frame index, for a missing file, an empty dataset, a
    structure without a required label, NaN positions, overlapping atoms, a zero-volume cell or an
    ``atoms.info`` dipole on a periodic structure or slab. A dipole among the calculator results of such a
    structure is ignored, with one note (logger ``cartlorem.data``, INFO) naming the frames; ``ase.io.read`` puts an
    extxyz ``dipole`` there, so in a file a periodic structure's dipole is always ignored, not an error.
    With forces required, a single atom with open boundaries and no force label gets the force 0 (exact by symmetry;
    MACE's isolated-atom frames often carry an energy only), with a note.
    A one-atom frame marked ``config_type=IsolatedAtom`` (MACE's E0 reference) in a periodic box with no image
    within ``cutoff`` is read as the same atom with open boundaries (its stress is no label), so that it gives its
    element's reference energy (:func:`is_isolated_atom`); a marked frame that cannot be one is warned of.
    """
    keys = {"energy": energy_key, "forces": forces_key, "stress": stress_key}
    require = tuple(require)
    bad = [r for r in require if r not in LABELS]
    if bad:
        raise ValueError(f"require: unknown label(s) {bad}; expected some of {list(LABELS)}")
    for r in require:
        if not keys[r]:
            raise ValueError(f"{r} is required but {r}_key is None")
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be a positive number of Å, got {cutoff}")

    for kind, value in (config_type_weights or {}).items():
        if isinstance(value, (bool, np.bool_)) or not (isinstance(value, (int, float, np.number))
                                                        and math.isfinite(value) and value >= 0):
            raise ValueError(f"config_type_weights[{kind!r}] must be a finite number >= 0, got {value!r}")
    source, frames = _load_frames(path_or_atoms_list)
    if name is not None and source == "structures":
        source = str(name)
    if not frames:
        raise ValueError(f"no structures in {source!r}")
    check_charge_states(frames, source)

    if stress_key and "virial" in stress_key.lower():
        raise ValueError(f"stress_key {stress_key!r} names a virial (eV, e.g. MACE's REF_virials = −V σ), but the "
                         "stress label is the stress σ in eV/Å³ (ASE's sign): store σ = −W / V under another key")
    graphs, ignored, no_stress, boxed, not_references, wrapped, types, zero_forces = [], [], [], [], [], [], set(), []
    other_labels: dict = {}  # {(label, key): [frames]}: other values than the calculator's, under another key
    token = _CHECKED_RESULTS.set({})
    try:
        for k, atoms in enumerate(frames):
            where = f"{source}, frame {k}"
            g = atoms_to_graph(atoms, cutoff, dtype=dtype, label=where)
            if bool(g.pbc.any()) and wrapped_slab(atoms.get_positions(), atoms.get_cell().array, atoms.get_pbc()):
                wrapped.append(k)
            marked = atoms.info.get("config_type") == ISOLATED_ATOM_TYPE
            if (marked and bool(g.pbc.any()) and int(g.positions.shape[0]) == 1 and int(g.edge_index.shape[1]) == 0
                    and abs(float(g.total_charge[0])) < 1e-9):  # a charged one's box (Madelung, background) counts
                # MACE's isolated atom in a DFT code's periodic box: no image within the cutoff, so the same atom open
                g = g.replace(pbc=torch.zeros_like(g.pbc), cell=torch.zeros_like(g.cell))
                boxed.append(k)
            try:
                g = attach_labels(g, atoms, keys)
                g = attach_charge_labels(g, atoms, dipole_key, born_charges_key)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            if dipole_key and bool(g.pbc.any()) and _charge_label_value(atoms, "dipole", dipole_key)[0] is not None:
                ignored.append(k)  # a calculator's dipole of a periodic structure or slab (an info one raised above)
            if (stress_key and not bool(g.pbc.all()) and _lookup(atoms, "stress", stress_key) is not None
                    and k not in boxed[-1:]):
                no_stress.append(k)  # a slab's or molecule's stress (attach_labels left it out)
            _note_other_labels(atoms, g, keys, k, other_labels)
            if ("forces" in require and int(g.positions.shape[0]) == 1 and not bool(g.pbc.any())
                    and not bool(g.has_forces[0])):  # one open atom: its force is 0 by symmetry, the model's too
                g = g.replace(forces=torch.zeros_like(g.positions), has_forces=torch.ones_like(g.has_forces))
                zero_forces.append(k)
            for name in require:
                if not bool(getattr(g, f"has_{name}")[0]):
                    raise _missing_label_error(frames, k, source, name, keys[name])
            if marked and not is_isolated_atom(g):
                not_references.append(k)
            weight = _frame_weight(atoms, where)
            if config_type_weights is not None:
                kind = atoms.info.get("config_type", DEFAULT_CONFIG_TYPE)
                types.add(str(kind))
                weight = (1.0 if weight is None else weight) * float(config_type_weights.get(str(kind), 1.0))
            if weight is not None:
                g = g.replace(weight=torch.tensor([weight], dtype=dtype))
            per_term = _frame_term_weights(atoms, where)
            graphs.append(g if per_term is None else g.replace(term_weight=torch.tensor([per_term], dtype=dtype)))
    finally:
        _CHECKED_RESULTS.reset(token)
    if any(g.weight is not None for g in graphs):  # all or none: one kind of batch for the compiled step
        graphs = [g if g.weight is not None else g.replace(weight=torch.ones(1, dtype=dtype)) for g in graphs]
    if any(g.term_weight is not None for g in graphs):
        graphs = [g if g.term_weight is not None else g.replace(term_weight=torch.ones(1, 3, dtype=dtype))
                  for g in graphs]
    _check_stress_labels(frames, graphs, source, stress_key)
    _check_frame_weights(frames, source)
    seen = _CONFIG_TYPES_SEEN.get()
    if seen is None:
        _warn_unknown_config_types(config_type_weights, types, source)
    else:  # one warning for all of a run's files (config_types_of_files)
        seen.update(types)
    if wrapped:
        _log.warning("%s: %d slab(s) (frames %s) look wrapped across their open cell vector: atoms near both faces of "
                     "the cell with the vacuum between them, so the model sees two half-slabs a vacuum apart. If each "
                     "is one slab, shift the atoms near the top face down by the third cell vector (or centre the slab "
                     "before setting pbc = [True, True, False])", source, len(wrapped), _shown(wrapped))
    for (name, key), where in sorted(other_labels.items()):
        _log.warning("%s: frames %s hold %s %r with other values than the calculator's %s, which is read (%s_key "
                     "'calc', the default): to train on %r pass %s_key=%r (--%s-key %s)", source, _shown(where),
                     "atoms.info" if name == "energy" else "atoms.arrays", key, name, name, key, name, key, name, key)
    if zero_forces:
        _log.info("%s: %d single atom(s) with open boundaries and no force label (frames %s) get the force 0, which "
                  "symmetry gives them", source, len(zero_forces), _shown(zero_forces))
    if boxed:
        _log.info("%s: %d isolated atom(s) in a periodic box (config_type=%s, no image within the %g Å cutoff; frames "
                  "%s) are read as open atoms: their elements' reference energies", source, len(boxed),
                  ISOLATED_ATOM_TYPE, cutoff, _shown(boxed))
    if not_references:
        _log.warning("%s: frame(s) %s are marked config_type=%s (MACE's E0 references) but are not one neutral atom, "
                     "with an energy label, without a neighbour within the %g Å cutoff: they are trained on as "
                     "structures and give no reference energy", source, _shown(not_references), ISOLATED_ATOM_TYPE,
                     cutoff)
    if no_stress:
        _log.info("%s: the stress of %d structure(s) that are not fully periodic (frames %s) is not a label: slabs "
                  "and molecules have no volume, so no stress", source, len(no_stress), _shown(no_stress))
    if ignored:
        _log.info("%s: the dipole among the calculator results of %d periodic structure(s) or slab(s) (frames %s) "
                  "is not a label: the dipole is defined for open structures only", source, len(ignored),
                  _shown(ignored))
    return graphs


#: a stress label above this (eV/Å³; 160 GPa) is more likely another unit (GPa, kbar) or a virial than a stress
IMPLAUSIBLE_STRESS = 1.0


def stress_key_unused(graphs: Sequence[Graph], stress_key: Optional[str]) -> int:
    """The number of fully periodic structures among ``graphs`` when a named ``stress_key`` (not "calc" or None)
    labels none of them (a misspelt key: stress is used where present), else 0."""
    if stress_key in (None, "calc"):
        return 0
    periodic = [g for g in graphs if bool(g.pbc.all())]
    return 0 if any(bool(g.has_stress[0]) for g in periodic) else len(periodic)


def _check_stress_labels(frames, graphs, source: str, stress_key: Optional[str]) -> None:
    """Warnings (logger ``cartlorem.data``): a named stress key found in none of the fully periodic frames (a
    misspelt key trains without stress; the command line refuses it for a training set); with the default "calc",
    other stress-like info keys; stresses above IMPLAUSIBLE_STRESS (GPa or kbar read as eV/Å³)."""
    periodic = [k for k, g in enumerate(graphs) if bool(g.pbc.all())]
    if (not periodic and stress_key not in (None, "calc")
            and not any(_lookup(atoms, "stress", stress_key) is not None for atoms in frames)):
        _log.warning("%s: stress_key %r is in none of its %d frames, and none of them is fully periodic (a stress "
                     "label needs a periodic cell): no stress is read", source, stress_key, len(graphs))
    if not stress_key or not periodic:
        return
    if stress_key_unused(graphs, stress_key):
        _log.warning("%s: stress_key %r is in none of its %d fully periodic frames (frame %d has atoms.info keys "
                     "%s): these frames have no stress label", source, stress_key, len(periodic), periodic[0],
                     sorted(frames[periodic[0]].info))
        return
    labelled = [k for k in periodic if bool(graphs[k].has_stress[0])]
    if not labelled:
        others = sorted(key for key in frames[periodic[0]].info if "stress" in key.lower() or "virial" in key.lower())
        if others:
            _log.warning("%s: no stress among the calculator results of its periodic frames, but frame %d has "
                         "atoms.info %s: pass stress_key (--stress-key) to train on a stress label", source,
                         periodic[0], others)
        return
    largest = max(labelled, key=lambda k: float(graphs[k].stress.abs().max()))
    value = float(graphs[largest].stress.abs().max())
    if value > IMPLAUSIBLE_STRESS:
        _log.warning("%s, frame %d: a stress component of %.3g eV/Å³ (%.3g GPa): stress labels are in eV/Å³ "
                     "(1 eV/Å³ = 160.2 GPa); is %s in GPa or kbar, or a virial?", source, largest, value,
                     value * 160.21766, _describe_key("stress", stress_key))


#: MACE's per-frame weight of every loss term, which read_dataset reads into Graph.weight
FRAME_WEIGHT_KEY = "config_weight"
#: MACE's per-frame weights of the energy, forces and stress terms, which read_dataset reads into Graph.term_weight
TERM_WEIGHT_KEYS = ("config_energy_weight", "config_forces_weight", "config_stress_weight")
#: the config_type of a frame without one, as in MACE's --config_type_weights
DEFAULT_CONFIG_TYPE = "Default"


#: prefixes of atoms.info / arrays keys that hold labels (MACE's REF_energy, REF_forces, ...), lower case
_LABEL_PREFIXES = ("ref_", "dft_", "qm_")


def _note_other_labels(atoms, g: Graph, keys: Mapping, k: int, found: dict) -> None:
    """Record in ``found`` {(label, key): [frames]} the atoms.info energies / atoms.arrays forces under label keys
    (REF_energy, REF_forces, DFT_energy, ...: _LABEL_PREFIXES) whose values differ from the calculator's that
    ``keys`` "calc" read: a file written after another calculator was attached holds its results there, and the
    labels under their own keys."""
    for name, store, size in (("energy", atoms.info, 1), ("forces", atoms.arrays, 3 * len(atoms))):
        if keys[name] != "calc" or not bool(getattr(g, f"has_{name}")[0]):
            continue
        ours = getattr(g, name).detach().double().numpy().ravel()
        for key, value in store.items():
            if not key.lower().startswith(_LABEL_PREFIXES) or not key.lower().endswith(name):
                continue  # labels only (REF_energy, DFT_forces): not predictions (MACE_energy) or metadata
            try:
                theirs = np.asarray(value, dtype=np.float64).ravel()
            except (TypeError, ValueError):
                continue
            if theirs.size == size and np.all(np.isfinite(theirs)) and not np.allclose(theirs, ours, rtol=1e-6,
                                                                                         atol=1e-6):
                found.setdefault((name, key), []).append(k)


def _frame_term_weights(atoms, where: str) -> Optional[list[float]]:
    """[energy, forces, stress] weights of MACE's TERM_WEIGHT_KEYS (1 for each absent one), or None when the frame
    has none of them; ValueError naming the frame for a value that is not a finite number >= 0."""
    if not any(key in atoms.info for key in TERM_WEIGHT_KEYS):
        return None
    return [1.0 if key not in atoms.info else _frame_weight(atoms, where, key) for key in TERM_WEIGHT_KEYS]


def _frame_weight(atoms, where: str, key: str = FRAME_WEIGHT_KEY) -> Optional[float]:
    """``atoms.info[key]`` (by default "config_weight") as a float (None where absent); ValueError naming the frame
    for a value that is not a finite number >= 0."""
    value = atoms.info.get(key)
    if value is None:
        return None
    try:
        if isinstance(value, (bool, np.bool_, str)):
            raise TypeError
        weight = float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"{where}: {key} {value!r} must be a finite number >= 0 (a weight of the frame in the "
                         "training loss; 0 leaves it out)")
    return weight


def _check_frame_weights(frames, source: str) -> None:
    """A warning (logger ``cartlorem.data``) for MACE's other per-property frame weights (``config_virials_weight``,
    ... in atoms.info) other than 1, which cartlorem does not use (``config_weight`` and the energy, forces and
    stress weights, TERM_WEIGHT_KEYS, it does)."""
    weighted: dict[str, int] = {}
    first = None
    for k, atoms in enumerate(frames):
        for key, value in atoms.info.items():
            if not (key.startswith("config_") and key.endswith("weight")) or key in (FRAME_WEIGHT_KEY,
                                                                                      *TERM_WEIGHT_KEYS):
                continue
            try:
                one = float(value) == 1.0
            except (TypeError, ValueError):
                one = False
            if not one:
                weighted[key] = weighted.get(key, 0) + 1
                first = k if first is None else first
    if weighted:
        _log.warning("%s: %s: cartlorem does not use these per-property frame weights (config_weight and "
                     "config_{energy,forces,stress}_weight it does)", source,
                     ", ".join(f"{key} other than 1 in {n} frame(s)" for key, n in sorted(weighted.items()))
                     + f" (the first: frame {first})")


def check_charge_states(frames, source: str = "structures") -> None:
    """Raise one ValueError if any frame's ``info["multiplicity"]`` cannot be its spin state.

    frames: ase.Atoms. A given multiplicity must be an integer ≥ 1 whose parity matches the electron
    count Σ Z − Q (Q = ``info["total_charge"]``, checked when integer-valued; see
    :func:`cartlorem.graph.check_charge_state`). The message names the first bad frame of ``source``
    and counts the others. Frames without a multiplicity are not checked here (they are taken as singlets;
    :func:`cartlorem.graph.atoms_to_graph` checks their total charge).
    """
    bad = []
    for k, atoms in enumerate(frames):
        try:
            charge, multiplicity = info_charge_state(atoms.info, f"{source}, frame {k}")
        except ValueError as err:
            bad.append((k, str(err)))
            continue
        if multiplicity is None:
            continue
        try:
            if isinstance(charge, (bool, np.bool_)) or isinstance(multiplicity, (bool, np.bool_)):
                raise TypeError
            charge, multiplicity = float(charge), float(multiplicity)
        except (TypeError, ValueError):
            bad.append((k, f"{source}, frame {k}: total_charge {charge!r} and multiplicity {multiplicity!r} must be "
                           "numbers"))
            continue
        try:
            check_charge_state(atoms.get_atomic_numbers(), charge, multiplicity,
                               label=f"{source}, frame {k} ({atoms.get_chemical_formula()})")
        except ValueError as err:
            bad.append((k, str(err)))
    if bad:
        others = f" ({len(bad)} of {len(frames)} frames have a bad charge/spin state: {[k for k, _ in bad][:10]})" \
            if len(bad) > 1 else ""
        raise ValueError(bad[0][1] + others)


class MissingLabelError(ValueError):
    """A frame lacks a label that ``require`` asks for. ``finding``: what is missing and where; ``advice``: the
    arguments of :func:`read_dataset` that change it (callers with other options give their own); ``label``: the
    name of the missing label ("energy", "forces", ...)."""

    def __init__(self, finding: str, advice: str, label: Optional[str] = None):
        super().__init__(f"{finding} {advice}")
        self.finding, self.advice, self.label = finding, advice, label


def _missing_label_error(frames, k: int, source: str, name: str, key: str) -> MissingLabelError:
    atoms = frames[k]

    def lacks(a) -> bool:
        try:
            return _lookup(a, name, key) is None or (name == "stress" and not a.pbc.all())
        except ValueError:  # stale calculator results: not a usable label either
            return True

    missing = [m for m, a in enumerate(frames) if lacks(a)]
    if name == "stress" and not atoms.pbc.all():
        reason = "the structure is not periodic in all three directions, so it has no stress"
    else:
        reason = f"looked for {_describe_key(name, key)}"
    results = sorted(_calc_results(atoms))
    store = sorted(atoms.arrays) if name == "forces" else sorted(atoms.info)
    return MissingLabelError(
        f"{source}, frame {k}: no '{name}' label ({reason}); {len(missing)} of {len(frames)} frames lack it "
        f"(first: {missing[:5]}). This frame has calculator results {results} and "
        f"atoms.{'arrays' if name == 'forces' else 'info'} keys {store}.",
        f"Choose another {name}_key, or leave '{name}' out of require.", label=name)


# --------------------------------------------------------------------------------------------------
# reference energies and statistics


def _composition(
    graphs: Sequence[Graph], species: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts [M, S], energies [M] eV, has_energy [M] bool) over all M structures of all graphs.

    Raises ValueError if a structure contains an element that is not in ``species``.
    """
    species = [int(z) for z in species]
    if len(set(species)) != len(species):
        raise ValueError(f"species list has duplicates: {species}")
    zmax = max(species + [int(g.species.max()) for g in graphs if g.species.numel()]) + 1
    column = torch.full((zmax,), -1, dtype=torch.long)
    column[torch.tensor(species, dtype=torch.long)] = torch.arange(len(species))
    counts, energies, has = [], [], []
    for g in graphs:
        col = column[g.species]
        if (col < 0).any():
            from ase.data import chemical_symbols

            extra = sorted(set(g.species[col < 0].tolist()))
            names = ", ".join(
                f"{z} ({chemical_symbols[z] if z < len(chemical_symbols) else '?'})" for z in extra
            )
            raise ValueError(f"dataset contains species {names} that are not in the species list {species}")
        c = torch.zeros(g.num_graphs, len(species), dtype=torch.float64)
        c.index_put_((g.batch, col), torch.ones_like(col, dtype=torch.float64), accumulate=True)
        counts.append(c)
        b = g.num_graphs
        energies.append(g.energy.double() if g.energy is not None else torch.zeros(b, dtype=torch.float64))
        has.append(g.has_energy if g.has_energy is not None else torch.zeros(b, dtype=torch.bool))
    return torch.cat(counts).numpy(), torch.cat(energies).numpy(), torch.cat(has).numpy().astype(bool)


#: MACE's ``config_type`` of an isolated-atom reference (its E0); read_dataset reads such an atom in a periodic box
#: without an image within the cutoff as an open atom
ISOLATED_ATOM_TYPE = "IsolatedAtom"


def _shown(frames: Sequence[int], first: int = 10) -> str:
    return ", ".join(map(str, frames[:first])) + (", ..." if len(frames) > first else "")


def is_isolated_atom(g: Graph) -> bool:
    """Whether ``g`` is one structure that is a single neutral atom with open boundaries and an energy label: an
    isolated-atom reference (what MACE's data mark ``config_type=IsolatedAtom``; :func:`read_dataset` reads such a
    marked atom in a periodic box without an image within the cutoff as open). A batch of structures is not."""
    return (g.num_graphs == 1 and int(g.positions.shape[0]) == 1 and not bool(g.pbc.any())
            and g.energy is not None and g.has_energy is not None and bool(g.has_energy[0])
            and abs(float(g.total_charge[0])) < 1e-9)


def isolated_atom_energies(graphs: Sequence[Graph]) -> dict[int, float]:
    """{Z: E_Z (eV)} from the isolated-atom structures among ``graphs`` (:func:`is_isolated_atom`; single-structure
    graphs, as read_dataset gives them: batches are not looked into): per element the lowest such energy (its
    ground state, where several spin states are given)."""
    out: dict[int, float] = {}
    for g in graphs:
        if is_isolated_atom(g):
            z, e = int(g.species[0]), float(g.energy[0])
            out[z] = min(e, out.get(z, math.inf))
    return out


def fit_reference_energies(
    graphs: Sequence[Graph], species: Sequence[int], *, rcond: float = 1e-10,
    fixed: Optional[Mapping[int, float]] = None,
) -> dict[int, float]:
    """Per-species reference energies E_Z (eV) from energy ≈ Σ_Z n_Z E_Z, by least squares.

    graphs: labelled graphs (single structures or batches); only structures with an energy label
    enter the fit. species: the atomic numbers the model knows; every element in the dataset must
    be among them (ValueError naming the element otherwise). The fit is the minimum-norm
    least-squares solution (SVD, singular values below ``rcond`` × the largest treated as zero):
    exact and unbiased when the compositions determine every E_Z, while species absent from the
    data get 0 and species whose counts are collinear (e.g. O and H in a dataset of water
    clusters) share the energy in the minimum-norm way, the λ → 0 limit of a ridge fit. ``fixed``:
    {Z: E_Z} kept as given (e.g. :func:`isolated_atom_energies`); the others are fitted to what they leave.
    Returns {Z: E_Z} for every Z in ``species``; all zeros (or ``fixed``) when no structure has an energy.
    """
    species = [int(z) for z in species]
    if not species:
        raise ValueError("species list is empty")
    fixed = {int(z): float(e) for z, e in (fixed or {}).items() if int(z) in species}
    counts, energies, has = _composition(graphs, species)
    counts, energies = counts[has], energies[has]  # [M, S], [M]
    out = {z: fixed.get(z, 0.0) for z in species}
    free = [k for k, z in enumerate(species) if z not in fixed]
    if len(energies) == 0 or not free:
        return out
    energies = energies - counts @ np.array([fixed.get(z, 0.0) for z in species])
    coef, *_ = np.linalg.lstsq(counts[:, free], energies, rcond=rcond)
    out.update({species[k]: float(e) for k, e in zip(free, coef)})
    return out


def labels_the_loss_sees(g: Graph) -> Graph:
    """``g`` without the labels that the training loss weighs 0: every label of a structure whose ``Graph.weight``
    is 0, and the energy / forces / stress labels whose ``Graph.term_weight`` is 0 (MACE's config_weight and
    config_energy/forces/stress_weight; MACE's fit and metrics leave them out too)."""
    if g.weight is None and g.term_weight is None:
        return g
    changes = {}
    for k, name in enumerate(("energy", "forces", "stress", "dipole", "born_charges")):
        has = getattr(g, f"has_{name}", None)
        if has is None:
            continue
        keep = has if g.weight is None else has & (g.weight > 0)  # [B], per structure for all of them
        if g.term_weight is not None and k < 3:
            keep = keep & (g.term_weight[:, k] > 0)
        changes[f"has_{name}"] = keep
    return g.replace(**changes)


def training_statistics(graphs: Sequence[Graph], species: Sequence[int]) -> dict:
    """:func:`dataset_statistics` of a training set with its reference energies: those of elements with an
    isolated-atom structure are its energy (:func:`isolated_atom_energies`), the others fitted to what they leave
    (:func:`fit_reference_energies`); the isolated atoms are references, not samples, and stay out of the
    statistics. Other structures weighted 0 (``Graph.weight``: MACE's config_weight) are left out of the fit and the
    statistics, as out of the loss, and so are labels whose term weight is 0 (``Graph.term_weight``); isolated atoms
    give their references whatever their weight (as MACE's E0s). Adds
    "reference_energies" and "isolated_atom_energies" {Z: eV}."""
    isolated = isolated_atom_energies(graphs)
    graphs = [g for g in graphs if g.weight is None or bool((g.weight > 0).any())] or list(graphs)
    seen = [labels_the_loss_sees(g) for g in graphs]
    samples = [s for g, s in zip(graphs, seen) if not is_isolated_atom(g)]  # isolated as read, weights aside
    refs = fit_reference_energies(seen, species, fixed=isolated)
    stats = dataset_statistics(samples or seen, refs)
    stats["reference_energies"], stats["isolated_atom_energies"] = refs, isolated
    return stats


def dataset_statistics(
    graphs: Sequence[Graph], reference_energies: Optional[Mapping[int, float]] = None
) -> dict:
    """Summary numbers for normalising a model, as plain Python numbers.

    Returns a dict with: n_structures, n_atoms; n_energy / n_forces / n_stress (structures with
    that label); species_counts {Z: atoms}; avg_num_neighbors (edges per atom); forces_rms (eV/Å,
    root mean square over all force components of structures with forces; 0 if none);
    residual_energy_per_atom_mean / _std (eV/atom, of (E − Σ_Z n_Z E_Z) / N over structures with
    energies, E_Z from ``reference_energies``, zeros if None; 0 if none).
    """
    if len(graphs) == 0:
        raise ValueError("no graphs to compute statistics on")
    refs = {int(z): float(e) for z, e in (reference_energies or {}).items()}
    present = sorted({int(z) for g in graphs for z in torch.unique(g.species).tolist()})
    species = sorted(set(present) | set(refs)) if reference_energies is not None else present
    if reference_energies is not None:
        missing = [z for z in present if z not in refs]
        if missing:
            raise ValueError(f"dataset contains species {missing} with no reference energy")
    counts, energies, has = _composition(graphs, species)
    ref_vec = np.array([refs.get(z, 0.0) for z in species])
    n_atoms_per = counts.sum(axis=1)
    residual = (energies - counts @ ref_vec)[has] / n_atoms_per[has]

    n_edges = sum(int(g.edge_index.shape[1]) for g in graphs)
    n_atoms = sum(int(g.positions.shape[0]) for g in graphs)
    sq, nf = 0.0, 0
    for g in graphs:
        if g.forces is None or g.has_forces is None:
            continue
        mask = g.has_forces[g.batch]  # [N] atoms of structures with forces
        f = g.forces[mask].double()
        sq += float((f**2).sum())
        nf += f.numel()
    count = lambda name: sum(int(getattr(g, name).sum()) for g in graphs if getattr(g, name) is not None)
    totals = counts.sum(axis=0)
    return {
        "n_structures": int(counts.shape[0]),
        "n_atoms": n_atoms,
        "n_energy": count("has_energy"),
        "n_forces": count("has_forces"),
        "n_stress": count("has_stress"),
        "species_counts": {z: int(c) for z, c in zip(species, totals) if c > 0},
        "avg_num_neighbors": n_edges / n_atoms,
        "forces_rms": float(np.sqrt(sq / nf)) if nf else 0.0,
        "residual_energy_per_atom_mean": float(residual.mean()) if len(residual) else 0.0,
        "residual_energy_per_atom_std": float(residual.std()) if len(residual) else 0.0,
    }


def _structure_key(g: Graph) -> bytes:
    """A digest of what the model is given of one structure: elements, positions, cell, boundaries, charge and
    multiplicity, as stored (the same text read twice gives the same bytes)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for t in (g.species, g.positions, g.cell, g.pbc, g.total_charge, g.multiplicity):
        if t is not None:
            digest.update(str((t.dtype, tuple(t.shape))).encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


def duplicate_structures(graphs: Sequence[Graph], others: Optional[Sequence[Graph]] = None) -> list[tuple[int, int]]:
    """Structures given twice, exactly (the same elements, positions, cell, boundaries, charge and multiplicity;
    the labels are not compared): without ``others``, pairs (k, j), j < k, where structure k of ``graphs`` repeats
    its first copy j; with ``others``, pairs (k, j) where structure k of ``others`` is structure j of ``graphs``.
    Single-structure graphs, as read_dataset gives them."""
    first: dict[bytes, int] = {}
    repeats = []
    for k, g in enumerate(graphs):
        key = _structure_key(g)
        if key in first:
            repeats.append((k, first[key]))
        else:
            first[key] = k
    if others is None:
        return repeats
    return [(k, first[key]) for k, key in enumerate(map(_structure_key, others)) if key in first]


# --------------------------------------------------------------------------------------------------
# splitting


def split(graphs_or_len: Union[Sequence, int], valid_fraction: float = 0.1, seed: int = 0):
    """Deterministic random split into (train_idx, valid_idx), sorted int64 numpy arrays.

    graphs_or_len: a sequence (its length is used) or a number of structures. valid_fraction in
    [0, 1): round(valid_fraction × n) structures go to validation, at least one when the
    fraction is positive and n ≥ 2, never all of them (a single structure is for training). Same seed,
    same split.
    """
    n = int(graphs_or_len) if isinstance(graphs_or_len, (int, np.integer)) else len(graphs_or_len)
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if n < 1:
        raise ValueError("cannot split an empty dataset")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed}")
    n_valid = min(int(round(valid_fraction * n)), n - 1)  # at least one training structure (n = 1: it)
    if valid_fraction > 0 and n >= 2:
        n_valid = max(n_valid, 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_valid:]).astype(np.int64), np.sort(perm[:n_valid]).astype(np.int64)
