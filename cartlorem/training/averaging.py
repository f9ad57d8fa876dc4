"""Exponential moving average (EMA) of the trained parameters.

``torch.optim.swa_utils.AveragedModel`` was considered: it keeps a second full copy of the module
(a deepcopy, which not every model supports cheaply) and starts the average at the first
post-step weights. This class keeps only the parameter tensors, averages from the initial
weights with a warm-up, swaps the average into the model for validation and saving, and its
state is plain tensors and numbers (``torch.load(weights_only=True)`` reads it); checkpoints of
earlier versions resume unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage:
    """Shadow copy of parameters, θ̄ ← d θ̄ + (1 − d) θ after every optimiser step.

    The decay warms up as d = min(decay, (1 + n) / (10 + n)) after n updates, so that the average
    is not dominated by the random initial weights in short runs.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.parameters = list(parameters)
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.parameters], 1.0 - d)  # one fused update

    @contextlib.contextmanager
    def applied(self):
        """Temporarily put the averaged weights into the model (restored on exit)."""
        backup = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for p, s in zip(self.parameters, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.parameters, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": [s.detach().cpu() for s in self.shadow],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's parameters")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v.to(device=s.device, dtype=s.dtype))
