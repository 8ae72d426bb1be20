"""Nesterov momentum: a momentum stepped along with a look-ahead, the gradient's share of the next momentum added."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from flowsim.solvers.rules.momentum import Momentum


@dataclass(frozen=True)
class Nesterov(Momentum):
    """EMA Nesterov momentum m ← β1 m + (1 − β1) g, w ← w − η((1 − β1) g + β1 m); or, with ``heavy_ball``,
    m ← β1 m + g, w ← w − η(g + β1 m) (``torch.optim.SGD(nesterov=True)``). The EMA form is the heavy-ball form at
    η(1 − β1), as for :class:`Momentum`.

    Stability threshold on a quadratic (docs/theory.md): ηλ < 2(1 + β1)/((1 + 2β1)(1 − β1)) (EMA),
    ηλ < 2(1 + β1)/(1 + 2β1) (heavy ball): the look-ahead lowers the edge below plain momentum's.
    """
    name: ClassVar[str] = "nesterov"
    central_flow: ClassVar[str] = ("nesterov has no central flow: its step mixes g and m (a look-ahead), and the "
                                   "central flow is derived for a step along the state or along g (process rod "
                                   "covers it)")
    heavy_ball: bool = field(default=False, metadata={"description": "m ← β1·m + g and the step w ← w − η(g + β1·m) "
                                                      "instead of the EMA forms"})

    def direction(self, g, state):
        return (g if self.heavy_ball else (1.0 - self.beta1) * g) + self.beta1 * state["m"]

    def threshold_coefficient(self):
        c = 2.0 * (1.0 + self.beta1) / (1.0 + 2.0 * self.beta1)
        return c if self.heavy_ball else c / (1.0 - self.beta1)
