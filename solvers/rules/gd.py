"""Gradient descent: the rule with no state and no preconditioner."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flowsim.solvers.rules.base import Rule


@dataclass(frozen=True)
class GD(Rule):
    """Gradient descent: w ← w − η g."""
    name: ClassVar[str] = "gd"
    # 1.5, above GD's edge, where its self-stabilization holds the run: chosen on the tuning half of the adaptive
    # benchmark's suite (docs/step-size.md).
    edge_fraction: ClassVar[float] = 1.5
    stochastic_edge: ClassVar[bool] = True

    def threshold_coefficient(self):
        return 2.0
