"""Loss terms: weighted squared errors of energy per atom, forces, stress, dipole and Born charges.

    L = w_E · mean_s ((E_s − E_s^ref) / N_s)²  +  w_F · mean_{i,α} (F_iα − F_iα^ref)²
      + w_S · mean_{s,αβ} (σ_sαβ − σ_sαβ^ref)²  +  w_P · mean_{s,α} (P_sα − P_sα^ref)²
      + w_Z · mean_{i,αβ} (Z*_iαβ − Z*_iαβ^ref)²

in eV/atom, eV/Å, eV/Å³, e·Å and e; every mean runs only over labelled items (the ``has_*`` masks
of the batch). Each squared error is multiplied by its structure's weight (``Graph.weight``: MACE's
``atoms.info["config_weight"]``, 1 where not given; 0 adds nothing) and, for energy, forces and stress,
by the term's weight of that structure (``Graph.term_weight``: MACE's ``config_energy_weight``,
``config_forces_weight``, ``config_stress_weight``), and the means still divide by the number of labelled items,
those weighted 0 included (for a fully labelled set MACE's mean over the batch). Validation metrics and the validation loss, which picks the
best model, are unweighted, but leave the labels weighted 0 out (:func:`cartlorem.data.labels_the_loss_sees`, as
MACE's metrics).
The dipole and Born-charge weights default to 0; with a weight > 0 the trainer asks the model for those
outputs (:func:`charge_outputs`), which needs a long-range model and labelled data (:func:`check_loss_labels`).
:func:`validation_loss` is the same expression over a whole set, from its RMSEs.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from ..data import labels_the_loss_sees
from ..graph import Graph

__all__ = ["DEFAULT_WEIGHTS", "loss_weights", "weighted_loss", "loss_terms", "validation_loss", "charge_outputs",
           "check_loss_labels", "check_labels_to_fit"]

#: Energy 10 : forces 1 won benchmarks/settings.py (results/settings.md; dimers, cumulene and the demo set,
#: 20 epochs, multipole, C = 16): on the dimers energy MAE 6.3 meV/atom against 21.6 at 1 : 1 and 62.6 at
#: 0.1 : 1 (the earlier default 1 : 10), forces as good (55.0 against 54.0 and 53.5 meV/Å).
DEFAULT_WEIGHTS = {"energy": 10.0, "forces": 1.0, "stress": 1.0, "dipole": 0.0, "born_charges": 0.0}
_CHARGE_TERMS = {"dipole": ("compute_dipole", "dipole_key", "--dipole-key", "atoms.info"),
                 "born_charges": ("compute_born_charges", "born_charges_key", "--born-charges-key", "atoms.arrays")}


def loss_weights(weights: Optional[Mapping[str, float]] = None) -> dict:
    """``DEFAULT_WEIGHTS`` updated with ``weights``; ValueError for an unknown term or a bad value."""
    w = dict(DEFAULT_WEIGHTS)
    for k, v in (weights or {}).items():
        if k not in DEFAULT_WEIGHTS:
            raise ValueError(f"unknown loss weight {k!r}; expected some of {list(DEFAULT_WEIGHTS)}")
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"loss weight {k!r} must be a finite number >= 0, got {v}")
        w[k] = float(v)
    return w


def weighted_loss(out: dict, batch: Graph, weights: Mapping[str, float]) -> tuple[torch.Tensor, dict]:
    """Weighted squared-error loss of predictions ``out`` against the labels of ``batch``.

    out: model output with "energy" [B] eV, "forces" [N, 3] eV/Å and (when those terms are trained)
    "stress" [B, 3, 3] eV/Å³, "dipole" [B, 3] e·Å, "born_charges" [N, 3, 3] e. batch: a labelled
    :class:`Graph` (labels + has_* masks). weights: {"energy", "forces", "stress", "dipole",
    "born_charges"} → weight. Returns (scalar loss, {term: float}) where the terms are the mean squared
    errors without the loss weights, with the frame weights (``batch.weight`` × ``batch.term_weight``) (eV²/atom²,
    eV²/Å², eV²/Å⁶, e²Å², e²) of labelled items only; a term with no labelled item in the batch is absent.
    ValueError when a dipole / Born-charge term has a weight > 0 and labels in the batch but ``out`` lacks the
    prediction (ask the model with :func:`charge_outputs`).
    """
    for name in _CHARGE_TERMS:  # a charge term asked for by the weights and the labels needs the model's output
        has = getattr(batch, f"has_{name}", None)
        if (name not in out and getattr(batch, name, None) is not None and has is not None
                and weights.get(name, 0.0) > 0 and bool(has.any())):
            raise ValueError(f"the {name} loss weight is > 0 and the batch has {name} labels, but the model output "
                             f"has no {name!r} (call the model with {_CHARGE_TERMS[name][0]}=True)")
    loss = out["energy"].new_zeros(())
    terms = {}
    for name, (mse, count) in loss_terms(out, batch, weights).items():
        if int(count) > 0:  # a term with no labelled item in the batch is absent
            loss = loss + weights[name] * mse
            terms[name] = float(mse.detach())
    return loss, terms


def loss_terms(out: dict, batch: Graph, weights: Mapping[str, float]) -> dict:
    """{term: (mean squared error, number of labelled items)} of :func:`weighted_loss`, as tensors, for every
    term that has a weight > 0, labels in ``batch`` and a prediction in ``out`` (0 and 0 when no item of the
    batch is labelled). Branches on which labels and outputs exist, never on values, so that
    ``torch.compile`` traces it whole (:mod:`cartlorem.training.compiled`)."""
    def masked_mse(diff, mask, weight=None):  # mean of (weight ×) diff² over every element of the labelled rows
        rows = mask.shape + (1,) * (diff.dim() - 1)  # mask [rows]; weight [rows] or None
        err = torch.where(mask.reshape(rows), diff, torch.zeros_like(diff))
        items = mask.sum() * (diff[0].numel() if diff.dim() > 1 else 1)
        sq = err**2
        if weight is not None:  # a row weighted 0 adds 0, also when its error overflows (inf × 0 would be NaN)
            weight = weight.reshape(rows).to(diff.dtype)
            sq = torch.where(weight > 0, sq * weight, torch.zeros_like(sq))
        return sq.sum() / items.clamp(min=1).to(diff.dtype), items

    w = getattr(batch, "weight", None)  # [B] or None
    w_atoms = None if w is None else w.index_select(0, batch.batch)
    per_term = getattr(batch, "term_weight", None)  # [B, 3] (energy, forces, stress) or None

    def term(k):  # structure weight × the term's weight [B], or None (1)
        if per_term is None:
            return w
        return per_term[:, k] if w is None else w * per_term[:, k]

    terms = {}
    if batch.energy is not None and weights.get("energy", 0.0) > 0:
        e = out["energy"]  # atoms per structure by index_add, not bincount (whose size depends on the values)
        atoms = torch.zeros_like(e).index_add(0, batch.batch, torch.ones_like(batch.batch, dtype=e.dtype))
        terms["energy"] = masked_mse((e - batch.energy) / atoms, batch.has_energy, term(0))
    if batch.forces is not None and weights.get("forces", 0.0) > 0 and "forces" in out:
        forces_w = term(1)
        terms["forces"] = masked_mse(out["forces"] - batch.forces, batch.has_forces[batch.batch],
                                     None if forces_w is None else forces_w.index_select(0, batch.batch))
    if batch.stress is not None and weights.get("stress", 0.0) > 0 and "stress" in out:
        terms["stress"] = masked_mse(out["stress"] - batch.stress, batch.has_stress, term(2))
    for name in _CHARGE_TERMS:  # dipole [B, 3] per structure, born_charges [N, 3, 3] per atom
        ref, has = getattr(batch, name, None), getattr(batch, f"has_{name}", None)
        if ref is None or has is None or not weights.get(name, 0.0) > 0 or name not in out:
            continue
        per_atom = name != "dipole"
        terms[name] = masked_mse(out[name] - ref, has[batch.batch] if per_atom else has, w_atoms if per_atom else w)
    return terms


def charge_outputs(weights: Mapping[str, float], batch: Graph) -> dict:
    """Keyword arguments of the model call that ask for the charge outputs the loss needs on ``batch``:
    ``compute_dipole=True`` / ``compute_born_charges=True`` when that weight is > 0 and some structure of
    the batch has the label; {} otherwise (so models without these options are called as before)."""
    kw = {}
    for name, (flag, *_) in _CHARGE_TERMS.items():
        has = getattr(batch, f"has_{name}", None)
        if weights.get(name, 0.0) > 0 and has is not None and bool(has.any()):
            kw[flag] = True
    return kw


def check_loss_labels(model, graphs, weights: Mapping[str, float], what: str = "training") -> None:
    """ValueError when the weights leave nothing to train or a dipole / Born-charge weight > 0 cannot be trained.

    That is: every weight is 0; no structure of ``graphs`` carries a label of a term with a weight > 0;
    or, for a dipole / Born-charge weight > 0, the model has no long range (``model.long_range`` is None;
    modules without that attribute are not checked), no structure carries the label, or (dipole)
    dipole-labelled molecules share the set with periodic structures or slabs, for which the model's
    dipole is not defined.
    """
    if not any(weights.get(name, 0.0) > 0 for name in DEFAULT_WEIGHTS):
        raise ValueError(f"every loss weight is 0 ({', '.join(DEFAULT_WEIGHTS)}): there is nothing to train; give "
                         "a labelled term a weight > 0")
    frame_weights = [getattr(graphs[k], "weight", None) for k in range(len(graphs))]
    if frame_weights and all(w is not None and not bool((w > 0).any()) for w in frame_weights):
        raise ValueError(f"every one of the {len(graphs)} {what} structures has weight 0 (atoms.info['config_weight'] "
                         "times config_type_weights / --config-type-weights for its config_type): there is nothing "
                         "to train; give some a weight > 0")
    graphs = [labels_the_loss_sees(graphs[k]) for k in range(len(graphs))]  # config_*_weight 0: no label
    wanted = [name for name in _CHARGE_TERMS if weights.get(name, 0.0) > 0]
    if not wanted:  # (the charge terms get their own messages below)
        check_labels_to_fit(graphs, weights, what)
        return
    if hasattr(model, "long_range") and getattr(model, "long_range") is None:
        raise ValueError(
            f"the {' and '.join(wanted)} loss weight(s) are > 0, but this model has no long range "
            "(long_range=None) and so no learned charges to give a dipole or Born charges; use long_range="
            "'multipole' or 'lorem', or set the weight(s) to 0"
        )
    counts = dict.fromkeys(wanted, 0)
    periodic = 0
    for k in range(len(graphs)):
        g = graphs[k]
        periodic += int(g.pbc.any(dim=1).sum())
        for name in wanted:
            has = getattr(g, f"has_{name}", None)
            counts[name] += 0 if has is None else int(has.sum())
    # first: the dipoles of periodic structures are no labels (read_dataset drops a calculator's), so the advice
    # of the no-label message below would send the user to atoms.info, which refuses them
    if "dipole" in wanted and periodic:
        raise ValueError(
            f"the dipole loss weight is > 0 but {periodic} of the {what} structures are periodic or slabs, whose "
            "dipole the model does not define; train the dipole on a set of molecules only"
        )
    for name in wanted:
        if counts[name] == 0:
            _, key, flag, store = _CHARGE_TERMS[name]
            raise ValueError(
                f"the {name} loss weight is {weights[name]} but none of the {len(graphs)} {what} structures carries "
                f"a {name} label: name the {store} key that holds it ({key}, {flag} on the command line), or set "
                "the weight to 0"
            )


def check_labels_to_fit(graphs, weights: Mapping[str, float], what: str = "validation") -> None:
    """ValueError when no structure of ``graphs`` carries a label of a term with a weight > 0: such a training
    set has nothing to fit, and such a validation set a loss of 0 every epoch (so the first epoch would be kept
    as the best and early stopping would end the run there)."""
    positive = [name for name in DEFAULT_WEIGHTS if weights.get(name, 0.0) > 0]
    for k in range(len(graphs)):
        g = labels_the_loss_sees(graphs[k])  # labels of frames or terms weighted 0 do not count
        if any(getattr(g, f"has_{name}", None) is not None and bool(getattr(g, f"has_{name}").any())
               for name in positive):
            return
    raise ValueError(
        f"none of the {len(graphs)} {what} structures carries a label of a loss term with a weight > 0 ("
        + ", ".join(f"{name} {weights[name]:g}" for name in positive) + "): there is "
        + ("nothing to train" if what == "training" else "no loss to select the best model by")
        + "; read the labels (energy_key, forces_key, stress_key) or give a labelled term a weight > 0 (labels "
        "whose frame weight, config_weight times config_type_weights, or config_energy/forces/stress_weight is 0 "
        "do not count)"
    )


def validation_loss(m: dict, weights: Mapping[str, float]) -> float:
    """The loss expression of :func:`weighted_loss` over a whole set, from the RMSEs (meV units) of
    ``cartlorem.evaluate.metrics``."""
    total = 0.0
    for name, key in (
        ("energy", "energy_rmse_mev_per_atom"),
        ("forces", "forces_rmse_mev_per_a"),
        ("stress", "stress_rmse_mev_per_a3"),
    ):
        if weights.get(name, 0.0) > 0 and m.get(key) is not None:
            total += weights[name] * (m[key] / 1000.0) ** 2
    for name, key in (("dipole", "dipole_rmse_e_a"), ("born_charges", "born_charges_rmse_e")):  # e·Å, e
        if weights.get(name, 0.0) > 0 and m.get(key) is not None:
            total += weights[name] * m[key] ** 2
    return total
