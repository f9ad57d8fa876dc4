"""Loss terms: weighted squared errors of energy per atom, forces and stress against the labels.

    L = w_E · mean_s ((E_s − E_s^ref) / N_s)²  +  w_F · mean_{i,α} (F_iα − F_iα^ref)²
      + w_S · mean_{s,αβ} (σ_sαβ − σ_sαβ^ref)²

in eV/atom, eV/Å and eV/Å³; every mean runs only over labelled items (the ``has_*`` masks of the
batch). :func:`validation_loss` is the same expression over a whole set, from its RMSEs.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from ..graph import Graph

__all__ = ["DEFAULT_WEIGHTS", "loss_weights", "weighted_loss", "validation_loss"]

DEFAULT_WEIGHTS = {"energy": 1.0, "forces": 10.0, "stress": 1.0}


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

    out: model output with "energy" [B] eV, "forces" [N, 3] eV/Å and (when stress is trained)
    "stress" [B, 3, 3] eV/Å³. batch: a labelled :class:`Graph` (energy/forces/stress + has_* masks).
    weights: {"energy", "forces", "stress"} → weight. Returns (scalar loss, {term: float}) where the
    terms are the unweighted mean squared errors (eV²/atom², eV²/Å², eV²/Å⁶) of labelled items only;
    a term with no labelled item in the batch is 0.
    """
    loss = out["energy"].new_zeros(())
    terms = {}
    if batch.energy is not None and weights.get("energy", 0.0) > 0:
        mask = batch.has_energy
        if bool(mask.any()):
            err = (out["energy"] - batch.energy)[mask] / batch.num_atoms[mask].to(out["energy"].dtype)
            mse = (err**2).mean()
            loss = loss + weights["energy"] * mse
            terms["energy"] = float(mse.detach())
    if batch.forces is not None and weights.get("forces", 0.0) > 0 and "forces" in out:
        mask = batch.has_forces[batch.batch]  # [N] atoms of structures with force labels
        if bool(mask.any()):
            mse = ((out["forces"] - batch.forces)[mask] ** 2).mean()
            loss = loss + weights["forces"] * mse
            terms["forces"] = float(mse.detach())
    if batch.stress is not None and weights.get("stress", 0.0) > 0 and "stress" in out:
        mask = batch.has_stress
        if bool(mask.any()):
            mse = ((out["stress"] - batch.stress)[mask] ** 2).mean()
            loss = loss + weights["stress"] * mse
            terms["stress"] = float(mse.detach())
    return loss, terms


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
    return total
