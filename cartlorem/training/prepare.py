"""Before the loop: check the data against the model, and set CartLorem's statistics from data.

The loop itself (``cartlorem.training.loop.train``) never looks inside the model; this module is
the one place that knows CartLorem's normalisation: per-species reference energies (least
squares), the average neighbour count, ``scale`` (force RMS) and ``shift`` (mean residual energy
per atom).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from ..graph import Graph

__all__ = ["check_dataset", "check_edges", "fit_statistics", "refit_reference_energies"]

log = logging.getLogger(__name__)
_CUTOFF_CHECKS = 16  # structures of a set whose edges are compared with a fresh neighbour list


def check_dataset(model, graphs: Sequence[Graph], what: str) -> None:
    """Every structure labelled; species and edge lengths within what ``model`` declares; boundaries and slabs
    that a model with a ``long_range`` block (not None) takes.

    The species check runs when the model has a ``species`` attribute (atomic numbers) and the
    edge checks when it has a ``cutoff`` (Å): no edge longer than the cutoff and, in the first
    ``_CUTOFF_CHECKS`` structures, no pair within it missing (graphs read with a smaller cutoff would
    train on truncated neighbourhoods without a word); other modules are checked for labels only.
    """
    known = set(getattr(model, "species", None) or ())
    cutoff = getattr(model, "cutoff", None)
    if getattr(model, "long_range", None) is not None:  # before anything is written, not in the first batch
        from ..nn.long_range import check_structures

        check_structures(graphs, lambda k: f"{what} structure {k}")
    for k in range(len(graphs)):
        g = graphs[k]
        if g.energy is None and g.forces is None:
            raise ValueError(
                f"{what} structure {k} carries no labels (read it with cartlorem.data.read_dataset)"
            )
        unknown = sorted(set(g.species.tolist()) - known) if known else []
        if unknown:
            from ase.data import chemical_symbols

            names = ", ".join(chemical_symbols[z] for z in unknown)
            raise ValueError(f"{what} structure {k} contains species the model does not know: {names}")
        if cutoff is not None:
            check_edges(g, float(cutoff), f"{what} structure {k}", neighbours=k < _CUTOFF_CHECKS)


def check_edges(g: Graph, cutoff: float, label: str, neighbours: bool = True) -> None:
    """ValueError when ``g`` has an edge longer than the model's ``cutoff`` (Å) or, with ``neighbours`` and one
    structure in ``g``, fewer edges than atom pairs within it (a graph built with another cutoff)."""
    if g.edge_index.shape[1]:
        longest = float(g.edge_vectors().norm(dim=-1).max())
        # the graph's float rounding of lengths far from the origin (float32: 7.6e-6 Å at 100 Å) is not a longer edge
        slack = 8 * torch.finfo(g.positions.dtype).eps * max(1.0, float(g.positions.detach().abs().max()))
        if longest > cutoff * (1 + 1e-6) + 1e-9 + slack:
            raise ValueError(f"{label} has edges up to {longest:.3f} Å, longer than the model cutoff {cutoff} Å: "
                             "read the data with cutoff=model.cutoff")
    if neighbours and g.num_graphs == 1:
        _check_no_missing_edges(g, cutoff, label)


def _check_no_missing_edges(g: Graph, cutoff: float, label: str) -> None:
    """ValueError when the one structure of ``g`` has fewer edges than atom pairs within ``cutoff`` Å (a
    neighbour list recomputed 1e-4 × cutoff inside it, so float32 rounding at the boundary does not count)."""
    from ..graph import neighbour_list

    i, _, _ = neighbour_list(g.positions.detach().cpu().double().numpy(), g.cell[0].detach().cpu().double().numpy(),
                             g.pbc[0].cpu().numpy(), cutoff * (1 - 1e-4))
    have = int(g.edge_index.shape[1])
    if have < len(i):
        raise ValueError(
            f"{label} has {have} edges but {len(i)} directed atom pairs lie within the model cutoff {cutoff} Å: "
            "its graph was built with a smaller cutoff; read the data with cutoff=model.cutoff"
        )


def fit_statistics(model, graphs: Sequence[Graph], *, ranks=None) -> dict:
    """Set a CartLorem's reference energies, ⟨neighbours⟩, scale and shift from ``graphs``.

    Returns :func:`cartlorem.data.training_statistics`: reference energies {Z: eV} from isolated-atom structures
    (one neutral atom, open boundaries) where there are some, the others fitted by least squares; the isolated
    atoms stay in the training data but not in these statistics. scale is the
    force RMS (eV/Å; the residual-energy spread when there are no forces, else 1), shift the mean
    residual energy per atom after the reference energies (eV/atom; the fit is of total energies, so it is ≈ 0
    only where the structures have similar sizes).

    ranks: a ``cartlorem.training.distributed.Ranks`` of several processes (each holding the same
    ``graphs``): process 0 computes the statistics and sends them to the others, so every process
    sets exactly the same numbers (and only process 0 logs them).
    """
    from ..data import training_statistics
    from ..model import CartLorem

    if not isinstance(model, CartLorem):
        raise TypeError(
            f"statistics from data are set for CartLorem models, not {type(model).__name__}: set your "
            "model's normalisation before training and pass statistics=False"
        )
    main = ranks is None or ranks.is_main
    stats = None
    if main:
        graphs = [graphs[k].to(dtype=model.dtype) for k in range(len(graphs))]  # labels as the model sees them
        stats = training_statistics(graphs, model.species)
    if ranks is not None:
        stats = ranks.broadcast(stats)
    if not stats["avg_num_neighbors"] > 0:
        raise ValueError(
            f"no two atoms of the {stats['n_structures']} training structures are within the cutoff {model.cutoff} Å "
            "(no edges, so the model would see isolated atoms only): check the cutoff (in Å) and the positions"
        )
    refs = stats["reference_energies"]
    scale = stats["forces_rms"] or stats["residual_energy_per_atom_std"] or 1.0
    scale_source = ("force RMS, eV/Å" if stats["forces_rms"] else "no forces: spread of the energy per atom, eV/atom"
                    if stats["residual_energy_per_atom_std"] else "no force or energy spread: 1")
    model.set_statistics(
        atomic_energies=refs,
        avg_num_neighbors=stats["avg_num_neighbors"],
        scale=scale,
        shift=stats["residual_energy_per_atom_mean"],
    )
    if not main:
        return stats
    log.info(
        "statistics from %d training structures: ⟨neighbours⟩ %.2f, scale %.4g (%s), "
        "shift %.4f eV/atom",
        stats["n_structures"],
        stats["avg_num_neighbors"],
        float(model.scale),
        scale_source,
        round(float(model.shift), 4) + 0.0,  # no "-0.0000" for a shift of -1e-15
    )
    if stats.get("isolated_atom_energies"):
        from ase.data import chemical_symbols

        fitted = set(model.species) - set(stats["isolated_atom_energies"])
        log.info("reference energies of %s from isolated-atom structures (one neutral atom, open boundaries)%s",
                 ", ".join(f"{chemical_symbols[z]} {e:.4f} eV"
                           for z, e in sorted(stats["isolated_atom_energies"].items())),
                 "; the others fitted" if fitted else "")
    return stats


def refit_reference_energies(model, graphs: Sequence[Graph], *, batch_size: int = 16,
                             elements: Optional[Sequence[int]] = None) -> dict:
    """Correct a trained CartLorem's reference energies for ``graphs`` (fine-tuning on data of another code or level
    of theory, whose energies differ by a constant per element). Returns the corrections {Z: eV}, which are added.

    The corrections are the least-squares fit of energy label − prediction ≈ Σ_Z n_Z δ_Z over the structures with an
    energy label (:func:`cartlorem.data.fit_reference_energies`: minimum norm, so elements absent from ``graphs``
    keep theirs and elements whose counts are collinear share the correction); an element with an isolated-atom
    structure (:func:`cartlorem.data.is_isolated_atom`) takes the correction that makes it exact (the lowest, of
    several). What the model predicts beyond the reference energies is left as it was. ``elements``: the atomic
    numbers whose reference energies are corrected (default: all the model's); the others keep theirs (correction
    0), e.g. the elements :meth:`cartlorem.CartLorem.with_species` added. Every process of a torchrun job computes
    the same numbers from the same ``graphs``.
    """
    from ..data import fit_reference_energies, is_isolated_atom, isolated_atom_energies
    from ..evaluate import predict
    from ..model import CartLorem

    if not isinstance(model, CartLorem):
        raise TypeError(f"reference energies are corrected for CartLorem models, not {type(model).__name__}")
    from ..model import _species_list

    elements = model.species if elements is None else _species_list(elements)
    unknown = sorted(set(elements) - set(model.species))
    if unknown:
        raise ValueError(f"elements {unknown} are not species of the model ({model.species}): their reference "
                         "energies cannot be corrected")
    p = predict(model, graphs, batch_size=batch_size, compute_stress=False, compute_dipole=False,
                compute_born_charges=False, check_cutoff=False)
    if not p.has_energy.any():
        raise ValueError("no training structure has an energy label: there is nothing to correct the reference "
                         "energies with; leave refit_reference_energies out")
    resid = np.where(p.has_energy, p.energy_ref - p.energy_pred, 0.0)  # predict's structures are in graphs' order
    ground = isolated_atom_energies(graphs)  # {Z: lowest isolated-atom energy}, whatever its weight, as a new run's
    residual, fixed, k = [], {z: 0.0 for z in model.species if z not in elements}, 0
    for g in graphs:
        b = int(g.num_graphs)
        residual.append(g.replace(energy=torch.as_tensor(resid[k:k + b]),
                                  has_energy=torch.as_tensor(p.has_energy[k:k + b])))
        if is_isolated_atom(g) and int(g.species[0]) in elements \
                and float(g.energy[0]) == ground[int(g.species[0])]:  # the ground state: made exact
            fixed[int(g.species[0])] = ground[int(g.species[0])] - float(p.energy_pred[k])
        k += b
    # an isolated-atom structure gives its element's correction exactly, as it gives a new model's reference energy
    delta = fit_reference_energies(residual, model.species, fixed=fixed)
    refs = {z: float(model.atomic_energies[i]) + delta[z] for i, z in enumerate(model.species)}
    model.set_statistics(atomic_energies=refs)
    from ase.data import chemical_symbols

    log.info("reference energies corrected for the training set (least squares on what the initial model leaves of "
             "its energies): %s", ", ".join(f"{chemical_symbols[z]} {delta[z]:+.4f} eV" for z in elements))
    return delta

