"""RMSProp: the gradient divided by the root of an average of its square, scalar (one ν) or diagonal."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from flowsim.solvers.rules.base import Rule


@dataclass(frozen=True)
class ScalarRMSProp(Rule):
    """ν ← β2 ν + (1 − β2)‖g‖² (a scalar), w ← w − η g / (√ν + ε). ν starts at ‖g0‖²."""
    name: ClassVar[str] = "scalar_rmsprop"
    edge_fraction: ClassVar[float] = 0.5
    beta2: float = field(default=0.99, metadata={"description": "EMA coefficient of ‖g‖², in [0, 1)"})
    eps: float = field(default=1e-8, metadata={"description": "added to √ν (gradient units), ≥ 0"})

    def init(self, w, g0):
        return {"nu": g0.pow(2).sum().reshape(1)}

    def advance_state(self, g, state):
        return {"nu": self.beta2 * state["nu"] + (1 - self.beta2) * g.pow(2).sum()}

    def precond(self, state):
        return state["nu"].sqrt() + self.eps

    def threshold_coefficient(self):
        """2, as GD's: the step is GD's preconditioned by √ν + ε."""
        return 2.0

    def scaled(self, kappa):
        """The square-root rule: 1 − β2 × κ, η × √κ, ε / √κ (ν scales as the noise, 1/κ, where noise dominates it)."""
        return self._with_decays(kappa, eps=self.eps / math.sqrt(kappa)), math.sqrt(kappa)

    def svag(self, l):
        """1 − β / l and η / l: SVAG feeds ν the plain batch gradient, so ν keeps its scale and the linear rule
        applies."""
        return self._with_decays(1.0 / l), 1.0 / l


@dataclass(frozen=True)
class RMSProp(ScalarRMSProp):
    """ν ← β2 ν + (1 − β2) g² (elementwise), w ← w − η g / (√ν + ε). ν starts at g0²."""
    name: ClassVar[str] = "rmsprop"
    beta2: float = field(default=0.99, metadata={"description": "EMA coefficient of g² (elementwise), in [0, 1)"})

    def init(self, w, g0):
        return {"nu": g0.pow(2)}

    def advance_state(self, g, state):
        return {"nu": self.beta2 * state["nu"] + (1 - self.beta2) * g.pow(2)}
