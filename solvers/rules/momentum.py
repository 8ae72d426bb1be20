"""Momentum: EMA or heavy-ball momentum of the gradient, stepped along."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from flowsim.solvers.rules.base import Rule


@dataclass(frozen=True)
class Momentum(Rule):
    """EMA momentum m ← β1 m + (1 − β1) g, w ← w − η m; or heavy ball m ← β1 m + g when ``heavy_ball``.

    Stability threshold on a quadratic: ηλ < 2(1 + β1)/(1 − β1) (EMA), ηλ < 2(1 + β1) (heavy ball).
    """
    name: ClassVar[str] = "momentum"
    edge_fraction: ClassVar[float] = 0.5
    beta1: float = field(default=0.9, metadata={"description": "EMA coefficient of the gradient (heavy ball: the "
                                                "decay of m), in [0, 1)"})
    heavy_ball: bool = field(default=False, metadata={"description": "m ← β1·m + g instead of the EMA "
                                                      "m ← β1·m + (1 − β1)·g (the step is still w ← w − η·m)"})

    def init(self, w, g0):
        return {"m": torch.zeros_like(w)}

    def advance_state(self, g, state):
        scale = 1.0 if self.heavy_ball else 1.0 - self.beta1
        return {"m": self.beta1 * state["m"] + scale * g}

    def direction(self, g, state):
        return state["m"]

    def direction_gain(self, state):
        """m settles to g (EMA) or g/(1 − β1) (heavy ball)."""
        return 1.0 / (1.0 - self.beta1) if self.heavy_ball else 1.0

    def threshold_coefficient(self):
        c = 2.0 * (1.0 + self.beta1)
        return c if self.heavy_ball else c / (1.0 - self.beta1)

    def scaled(self, kappa):
        """1 − β1 × κ and η × κ (EMA); heavy ball, the EMA with η/(1 − β1): η × κ²."""
        return self._with_decays(kappa), kappa ** 2 if self.heavy_ball else kappa
