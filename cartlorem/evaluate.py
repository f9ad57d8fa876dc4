"""Accuracy of a model on labelled graphs: batched predictions, MAE/RMSE, parity plots.

    preds = predict(model, graphs)            # per-structure energies, per-atom forces, stresses
    m = metrics(preds)                        # JSON-ready dict (meV units)
    m = evaluate(model, graphs)               # both in one call
    print(format_table(m))
    text = metrics_json(m)                    # strict JSON: a NaN or infinite metric is null

Metric keys: ``energy_mae_mev_per_atom``, ``energy_rmse_mev_per_atom`` (errors of E/N over
structures with an energy label), ``forces_mae_mev_per_a``, ``forces_rmse_mev_per_a`` (over all
Cartesian components of atoms in structures with force labels), ``stress_mae_mev_per_a3``,
``stress_rmse_mev_per_a3`` (over the 9 components of labelled stresses; only when some structure
has one), ``dipole_mae_e_a``, ``dipole_rmse_e_a`` (e·Å, over the 3 components of labelled molecular
dipoles) and ``born_charges_mae_e``, ``born_charges_rmse_e`` (e, over the 9 components of the Born
effective charges of atoms in labelled structures) when some structure has such a label,
``n_structures``, ``n_atoms``, and the labelled counts ``n_energy``, ``n_forces``, ``n_stress``
(``n_dipole``, ``n_born_charges``: labelled and predicted). A metric with no labelled item is None;
so are the dipole and Born-charge metrics of a model that cannot predict them (no long range).
A model that gives NaN or infinite predictions (one that diverged) gives NaN or infinite metrics here,
and null in :func:`metrics_json` (JSON has no NaN; ``cartlorem evaluate --json`` and the demo's
test_metrics.json are written with it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import labels_the_loss_sees
from .fileio import atomic_write
from .graph import Graph, collate

__all__ = ["Predictions", "predict", "metrics", "metrics_by_group", "metrics_json", "evaluate", "format_table",
           "parity_plot", "not_finite"]


@dataclass
class Predictions:
    """Reference and predicted values for M structures with N atoms in total (float64 numpy).

    n_atoms [M]; energy_ref / energy_pred [M] eV; has_energy [M]; forces_ref / forces_pred [N, 3]
    eV/Å; has_forces [N] (atom belongs to a structure with force labels); structure [N] index of
    each atom's structure; species [N] atomic numbers; stress_ref / stress_pred [M, 3, 3] eV/Å³ (NaN where not predicted);
    has_stress [M]; dipole_ref / dipole_pred [M, 3] e·Å, has_dipole [M]; born_charges_ref /
    born_charges_pred [N, 3, 3] e, has_born_charges [N] (atom of a structure with Born-charge labels).
    Missing references and predictions not made are NaN.
    """

    n_atoms: np.ndarray
    energy_ref: np.ndarray
    energy_pred: np.ndarray
    has_energy: np.ndarray
    forces_ref: np.ndarray
    forces_pred: np.ndarray
    has_forces: np.ndarray
    structure: np.ndarray
    species: np.ndarray
    stress_ref: np.ndarray
    stress_pred: np.ndarray
    has_stress: np.ndarray
    dipole_ref: np.ndarray
    dipole_pred: np.ndarray
    has_dipole: np.ndarray
    born_charges_ref: np.ndarray
    born_charges_pred: np.ndarray
    has_born_charges: np.ndarray

    def save(self, path, inputs: Optional[dict] = None) -> None:
        """Write all arrays to ``path`` in NumPy's ``.npz`` format (``numpy.load`` reads it), under that name as
        given (numpy's own writer would add ``.npz`` to a name without it), atomically. ``inputs`` (what was
        evaluated: model and data files, ...) is written as JSON text in a string array "inputs"
        (``json.loads(str(np.load(path)["inputs"]))``)."""
        from .fileio import atomic_write

        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        if inputs is not None:
            arrays["inputs"] = np.array(json.dumps(inputs))
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))

    def select(self, structures) -> "Predictions":
        """The predictions of some of the structures: ``structures`` (indices or a boolean mask [M]), in that order,
        renumbered from 0."""
        index = np.arange(len(self.n_atoms))[np.asarray(structures)]
        start = np.concatenate([[0], np.cumsum(self.n_atoms)]).astype(np.int64)
        atoms = np.concatenate([np.arange(start[k], start[k + 1]) for k in index] + [np.zeros(0, np.int64)])
        picked = {name: getattr(self, name)[index] for name in _PER_STRUCTURE}
        picked.update({name: getattr(self, name)[atoms] for name in _PER_ATOM})
        picked["structure"] = np.repeat(np.arange(len(index)), self.n_atoms[index])
        return Predictions(**picked)

    def annotate(self, frames) -> list:
        """The ``ase.Atoms`` the predictions were made for (in order), with the predictions added under their own
        names, beside whatever the frames hold (references included): ``info["cartlorem_energy"]`` (eV),
        ``arrays["cartlorem_forces"]`` (eV/Å) and, where predicted, ``info["cartlorem_stress"]`` (3 × 3, eV/Å³),
        ``info["cartlorem_dipole"]`` (e·Å), ``arrays["cartlorem_born_charges"]`` ([N, 9], e). Returns the frames
        (changed in place); ValueError when they are not the structures predicted."""
        frames = list(frames)
        sizes = [len(a) for a in frames]
        if sizes != self.n_atoms.tolist():
            raise ValueError(f"{len(frames)} frames of {sum(sizes)} atoms are not the {len(self.n_atoms)} structures "
                             f"of {int(self.n_atoms.sum())} atoms predicted")
        start = np.concatenate([[0], np.cumsum(self.n_atoms)])
        for k, atoms in enumerate(frames):
            atoms_k = slice(int(start[k]), int(start[k + 1]))
            for name in PREDICTION_KEYS:  # an earlier model's, in a file written before: not this one's
                atoms.info.pop(name, None)
                if name in atoms.arrays:
                    del atoms.arrays[name]
            atoms.info["cartlorem_energy"] = float(self.energy_pred[k])
            atoms.arrays["cartlorem_forces"] = self.forces_pred[atoms_k].copy()
            if np.isfinite(self.stress_pred[k]).all():
                atoms.info["cartlorem_stress"] = self.stress_pred[k].copy()
            if np.isfinite(self.dipole_pred[k]).all():
                atoms.info["cartlorem_dipole"] = self.dipole_pred[k].copy()
            born = self.born_charges_pred[atoms_k]
            if born.size and np.isfinite(born).all():
                atoms.arrays["cartlorem_born_charges"] = born.reshape(-1, 9).copy()
        return frames


_PER_STRUCTURE = ("n_atoms", "energy_ref", "energy_pred", "has_energy", "stress_ref", "stress_pred", "has_stress",
                  "dipole_ref", "dipole_pred", "has_dipole")
_PER_ATOM = ("forces_ref", "forces_pred", "has_forces", "species", "born_charges_ref", "born_charges_pred",
             "has_born_charges")  # and "structure", renumbered by Predictions.select


#: the names :meth:`Predictions.annotate` gives the predictions in a frame's info / arrays
PREDICTION_KEYS = ("cartlorem_energy", "cartlorem_forces", "cartlorem_stress", "cartlorem_dipole",
                   "cartlorem_born_charges")


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().to(torch.float64).numpy()


def predict(
    model,
    graphs: Sequence[Graph],
    *,
    batch_size: int = 16,
    progress: bool = False,
    compute_stress: Optional[bool] = None,
    compute_dipole: Optional[bool] = None,
    compute_born_charges: Optional[bool] = None,
    check_cutoff: bool = True,
) -> Predictions:
    """Run ``model`` on ``graphs`` in batches (eval mode, no graph kept) and collect predictions.

    graphs: a list (or any map-style dataset) of graphs; each batch is cast to the dtype and
    device of the model's parameters. compute_stress: None predicts the stresses of the periodic cells that carry
    a stress label, True those of every periodic cell; other rows of ``stress_pred`` are NaN (molecules and slabs
    have no stress), whatever the batch.
    compute_dipole / compute_born_charges: None predicts them for batches that carry such labels when
    the model has long range (``model.long_range`` not None); True asks every batch (a model without
    long range raises its ValueError). Dipoles are predicted for open structures only (NaN rows for
    periodic cells and slabs; a batch that mixes both gets a second model call for its molecules). ValueError
    when the first graphs' edges do not match the model's cutoff (data read with another ``cutoff``), or, for a
    long-range model, a structure's boundaries are not ones it takes (named by its index in ``graphs``), unless
    ``check_cutoff`` is False (the trainer, which checked them before its first epoch).
    Labels weighted 0 (a frame's ``Graph.weight`` or ``Graph.term_weight``: MACE's config_weight and
    config_energy/forces/stress_weight, :func:`cartlorem.data.labels_the_loss_sees`) are no references here, as
    in MACE's metrics: a label so marked is one its author did not trust.
    """
    if len(graphs) == 0:
        raise ValueError("no structures to evaluate")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    cutoff = getattr(model, "cutoff", None)
    if cutoff is not None and check_cutoff:  # graphs of another cutoff predict other neighbourhoods without a word
        from .training.prepare import _CUTOFF_CHECKS, check_edges

        for k in range(min(len(graphs), _CUTOFF_CHECKS)):
            check_edges(graphs[k], float(cutoff), f"structure {k}")
    if check_cutoff and getattr(model, "long_range", None) is not None:  # named by its index in graphs, not in a batch
        from .nn.long_range import check_structures

        check_structures(graphs, lambda k: f"structure {k}")
    floats = [p for p in model.parameters() if p.is_floating_point()]
    device, dtype = (floats[0].device, floats[0].dtype) if floats else (torch.device("cpu"), None)
    was_training = model.training
    model.eval()
    cols = {
        k: []
        for k in (
            "n_atoms",
            "energy_ref",
            "energy_pred",
            "has_energy",
            "forces_ref",
            "forces_pred",
            "has_forces",
            "structure",
            "species",
            "stress_ref",
            "stress_pred",
            "has_stress",
            "dipole_ref",
            "dipole_pred",
            "has_dipole",
            "born_charges_ref",
            "born_charges_pred",
            "has_born_charges",
        )
    }
    charged = getattr(model, "long_range", None) is not None
    offset = 0
    steps = tqdm(range(0, len(graphs), batch_size), desc="evaluating", unit="batch", leave=False,
                 dynamic_ncols=True, disable=not progress)
    try:
        for start in steps:
            chunk = [labels_the_loss_sees(graphs[k]) for k in range(start, min(start + batch_size, len(graphs)))]
            batch = collate(chunk).to(device=device, dtype=dtype)
            B, N = batch.num_graphs, int(batch.positions.shape[0])
            has_stress = (
                batch.has_stress if batch.has_stress is not None else torch.zeros(B, dtype=torch.bool)
            )
            want_stress = bool(has_stress.any()) if compute_stress is None else compute_stress
            labelled = lambda name: getattr(batch, f"has_{name}") is not None and bool(getattr(batch, f"has_{name}").any())
            want_p = (charged and labelled("dipole")) if compute_dipole is None else compute_dipole
            want_z = (charged and labelled("born_charges")) if compute_born_charges is None else compute_born_charges
            is_open = ~batch.pbc.any(dim=1)  # [B]
            extra = {"compute_born_charges": True} if want_z else {}
            if want_p and bool(is_open.all()):
                extra["compute_dipole"] = True
            out = model(batch, compute_forces=True, compute_stress=want_stress, create_graph=False, **extra)
            nan = lambda *shape: np.full(shape, np.nan)
            dipole_pred = _numpy(out["dipole"]) if "dipole" in out else nan(B, 3)
            if want_p and not bool(is_open.all()) and bool(is_open.any()):
                dipole_pred = _open_dipoles(model, chunk, dipole_pred, device, dtype)
            cols["dipole_pred"].append(dipole_pred)
            cols["born_charges_pred"].append(_numpy(out["born_charges"]) if "born_charges" in out else nan(N, 3, 3))
            cols["n_atoms"].append(_numpy(batch.num_atoms).astype(np.int64))
            cols["energy_pred"].append(_numpy(out["energy"]))
            cols["forces_pred"].append(_numpy(out["forces"]))
            stress_pred = _numpy(out["stress"]) if "stress" in out else nan(B, 3, 3)
            asked = batch.pbc.all(dim=1) if compute_stress else batch.pbc.all(dim=1) & has_stress.to(batch.pbc.device)
            stress_pred[~asked.cpu().numpy()] = np.nan  # rows not asked for: NaN in any batch, not the model's zeros
            cols["stress_pred"].append(stress_pred)
            cols["structure"].append(_numpy(batch.batch).astype(np.int64) + offset)
            cols["species"].append(batch.species.cpu().numpy().astype(np.int64))
            offset += B
            for name, shape in (("energy", (B,)), ("forces", (N, 3)), ("stress", (B, 3, 3)), ("dipole", (B, 3)),
                                ("born_charges", (N, 3, 3))):
                ref, mask = getattr(batch, name), getattr(batch, f"has_{name}")
                if ref is None or mask is None:
                    ref, mask = nan(*shape), np.zeros(B, dtype=bool)
                else:
                    ref, mask = _numpy(ref), mask.cpu().numpy().astype(bool)
                if name in ("forces", "born_charges"):  # per-atom labels: the mask of each atom's structure
                    mask = mask[batch.batch.cpu().numpy()]
                cols[f"{name}_ref"].append(np.where(mask.reshape(-1, *(1,) * (len(shape) - 1)), ref, np.nan))
                cols[f"has_{name}"].append(mask)
    finally:
        model.train(was_training)
    return Predictions(**{k: np.concatenate(v) for k, v in cols.items()})


def _open_dipoles(model, chunk, dipole_pred: np.ndarray, device, dtype) -> np.ndarray:
    """``dipole_pred`` [B, 3] with the rows of the open structures of ``chunk`` (a list of graphs, B
    structures in all) filled by a second model call on those alone (the dipole of a periodic
    structure is not defined, so a batch that mixes both cannot ask for it)."""
    starts = np.cumsum([0] + [g.num_graphs for g in chunk])
    keep = [k for k, g in enumerate(chunk) if not bool(g.pbc.any())]
    if not keep:
        return dipole_pred
    sub = collate([chunk[k] for k in keep]).to(device=device, dtype=dtype)
    p = _numpy(model(sub, compute_forces=False, compute_stress=False, create_graph=False,
                     compute_dipole=True)["dipole"])
    rows = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in keep])
    dipole_pred = dipole_pred.copy()
    dipole_pred[rows] = p
    return dipole_pred


def _mae_rmse(err: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    if err.size == 0:
        return None, None
    return float(np.mean(np.abs(err))), float(np.sqrt(np.mean(err**2)))


def metrics(p: Predictions) -> dict:
    """MAE and RMSE in meV/atom, meV/Å and meV/Å³ (see the module docstring for the keys)."""
    e_err = ((p.energy_pred - p.energy_ref) / p.n_atoms)[p.has_energy] * 1000.0
    f_err = (p.forces_pred - p.forces_ref)[p.has_forces].ravel() * 1000.0
    s_err = (p.stress_pred - p.stress_ref)[p.has_stress].ravel() * 1000.0
    out = {
        "n_structures": int(len(p.n_atoms)),
        "n_atoms": int(p.n_atoms.sum()),
        "n_energy": int(p.has_energy.sum()),
        "n_forces": int(len(np.unique(p.structure[p.has_forces]))),
        "n_stress": int(p.has_stress.sum()),
    }
    out["energy_mae_mev_per_atom"], out["energy_rmse_mev_per_atom"] = _mae_rmse(e_err)
    out["forces_mae_mev_per_a"], out["forces_rmse_mev_per_a"] = _mae_rmse(f_err)
    if p.has_stress.any():
        out["stress_mae_mev_per_a3"], out["stress_rmse_mev_per_a3"] = _mae_rmse(s_err)
    if p.has_dipole.any():  # e·Å, structures with a label and a prediction
        done = p.has_dipole & np.isfinite(p.dipole_pred).all(axis=1)
        out["n_dipole"] = int(done.sum())
        out["dipole_mae_e_a"], out["dipole_rmse_e_a"] = _mae_rmse((p.dipole_pred - p.dipole_ref)[done].ravel())
    if p.has_born_charges.any():  # e, atoms of structures with labels and predictions
        done = p.has_born_charges & np.isfinite(p.born_charges_pred).all(axis=(1, 2))
        out["n_born_charges"] = int(len(np.unique(p.structure[done])))
        out["born_charges_mae_e"], out["born_charges_rmse_e"] = _mae_rmse(
            (p.born_charges_pred - p.born_charges_ref)[done].ravel())
    return out


def metrics_by_group(p: Predictions, groups: Sequence[str]) -> dict[str, dict]:
    """{group: :func:`metrics` of its structures}, for a name per structure (``groups`` [M], e.g. each frame's
    ``config_type``, as MACE's evaluation reports them), in sorted order."""
    groups = np.asarray([str(g) for g in groups], dtype=object)
    if len(groups) != len(p.n_atoms):
        raise ValueError(f"{len(groups)} group names for {len(p.n_atoms)} structures")
    return {name: metrics(p.select(groups == name)) for name in sorted(set(groups))}


def metrics_json(m: dict) -> str:
    """The metrics ``m`` as strict JSON text (indented, ending in a newline) that every JSON reader accepts: a
    non-finite value (NaN or ±inf, from a model that diverged) is written as null, as a metric without labels is;
    ``json.dumps`` alone would write ``NaN``, which is not JSON. Nested mappings (metrics by group) alike."""
    def finite(v):
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return json.dumps(finite(m), indent=2, allow_nan=False) + "\n"


def evaluate(model, graphs: Sequence[Graph], *, batch_size: int = 16, progress: bool = False) -> dict:
    """``metrics(predict(model, graphs))``: accuracy of ``model`` on labelled graphs."""
    return metrics(predict(model, graphs, batch_size=batch_size, progress=progress))


#: the metrics of each quantity: (name, MAE key, RMSE key, unit, labelled-count key)
_ROWS = (
    ("energy", "energy_mae_mev_per_atom", "energy_rmse_mev_per_atom", "meV/atom", "n_energy"),
    ("forces", "forces_mae_mev_per_a", "forces_rmse_mev_per_a", "meV/Å", "n_forces"),
    ("stress", "stress_mae_mev_per_a3", "stress_rmse_mev_per_a3", "meV/Å³", "n_stress"),
    ("dipole", "dipole_mae_e_a", "dipole_rmse_e_a", "e·Å", "n_dipole"),
    ("Born Z*", "born_charges_mae_e", "born_charges_rmse_e", "e", "n_born_charges"),
)


def format_table(m: dict) -> str:
    """A small text table of the metrics."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # n/a: nothing labelled; nan / inf: a model that diverged
    lines = [f"{'quantity':<10}{'MAE':>12}{'RMSE':>12}  {'unit':<10}{'labelled':>9}"]
    for name, mae, rmse, unit, n in _ROWS:
        if mae not in m:
            continue
        lines.append(f"{name:<10}{fmt(m[mae]):>12}{fmt(m[rmse]):>12}  {unit:<10}{m.get(n, ''):>9}")
    lines.append(f"{m['n_structures']} structures, {m['n_atoms']} atoms")
    return "\n".join(lines)


def not_finite(m: dict) -> list[str]:
    """The quantities of the metrics ``m`` whose MAE or RMSE is NaN or infinite: labelled, but the model's
    predictions of them are not finite (a model that diverged)."""
    return [{"Born Z*": "Born charges"}.get(name, name) for name, mae, rmse, *_ in _ROWS
            if any(isinstance(m.get(k), float) and not math.isfinite(m[k]) for k in (mae, rmse))]


def _composition_fit(p: Predictions) -> np.ndarray:
    """Per-structure E_fit [M] eV from a least-squares fit E_ref ≈ Σ_Z n_Z e_Z over labelled structures."""
    zs = np.unique(p.species)
    counts = np.zeros((len(p.n_atoms), len(zs)))
    np.add.at(counts, (p.structure, np.searchsorted(zs, p.species)), 1.0)
    if not p.has_energy.any():
        return np.zeros(len(p.n_atoms))
    coef, *_ = np.linalg.lstsq(counts[p.has_energy], p.energy_ref[p.has_energy], rcond=None)
    return counts @ coef


#: the file types of :func:`parity_plot`, by the path's suffix
PARITY_FORMATS = ("png", "pdf", "svg")


def parity_format(path) -> str:
    """The file type of a parity plot at ``path`` (its suffix, one of PARITY_FORMATS); ValueError otherwise."""
    from pathlib import Path

    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PARITY_FORMATS:
        raise ValueError(f"parity plot {str(path)!r}: name it .png, .pdf or .svg (the file type is the suffix's)")
    return suffix


def parity_plot(p: Predictions, path) -> bool:
    """Energy and force-component parity plots → a PNG, PDF or SVG file, by the suffix of ``path``
    (ValueError for another). False if matplotlib is missing.

    Energies are shown per atom after subtracting a least-squares composition fit (the same for
    reference and prediction), so that structures of different composition share one scale.
    """
    fmt = parity_format(path)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    fit = _composition_fit(p)
    panels = [
        (
            "energy − composition fit (meV/atom)",
            (1000 * (p.energy_ref - fit) / p.n_atoms)[p.has_energy],
            (1000 * (p.energy_pred - fit) / p.n_atoms)[p.has_energy],
        ),
        ("force components (eV/Å)", p.forces_ref[p.has_forces].ravel(), p.forces_pred[p.has_forces].ravel()),
    ]
    for k, (title, ref, pred) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        if ref.size:
            lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
            ax.scatter(ref, pred, s=4, alpha=0.5)
        ax.set_xlabel("reference")
        ax.set_ylabel("predicted")
        ax.set_title(title)
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format=fmt))
    return True
