"""Adam: an EMA momentum preconditioned by the root of an EMA of g², both bias-corrected."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from flowsim.solvers.rules.base import Rule
from flowsim.solvers.rules.rmsprop import ScalarRMSProp


@dataclass(frozen=True)
class Adam(Rule):
    """Adam with bias correction: w ← w − η m̂ / (√v̂ + ε), m̂ = m/(1 − β1ᵗ), v̂ = v/(1 − β2ᵗ).

    Written as w ← w − η P̃⁻¹ m with P̃ = (1 − β1ᵗ)(√v̂ + ε): the m̂ correction is folded into P̃.
    """
    name: ClassVar[str] = "adam"
    edge_fraction: ClassVar[float] = 0.5
    beta1: float = field(default=0.9, metadata={"description": "EMA coefficient of the gradient, in [0, 1)"})
    beta2: float = field(default=0.999, metadata={"description": "EMA coefficient of g² (elementwise), in [0, 1)"})
    eps: float = field(default=1e-8, metadata={"description": "added to √v̂, the bias-corrected √v (gradient "
                                               "units), ≥ 0"})

    def init(self, w, g0):
        zero = torch.zeros_like(w)
        return {"m": zero, "v": zero.clone(), "t": torch.zeros((), dtype=w.dtype, device=w.device)}

    def advance_state(self, g, state):
        return {"m": self.beta1 * state["m"] + (1 - self.beta1) * g,
                "v": self.beta2 * state["v"] + (1 - self.beta2) * g * g, "t": state["t"] + 1}

    def direction(self, g, state):
        return state["m"]

    def direction_gain(self, state):
        """m settles to (1 − β1ᵗ)·g (m̂ to g): the factor P̃ holds, so the settled step is −η g/(√v̂ + ε)."""
        return 1 - self.beta1 ** state["t"].clamp(min=1)

    def precond(self, state):
        t = state["t"].clamp(min=1)
        v_hat = state["v"] / (1 - self.beta2 ** t)
        return (1 - self.beta1 ** t) * (v_hat.sqrt() + self.eps)

    def threshold_coefficient(self):
        return (2.0 + 2.0 * self.beta1) / (1.0 - self.beta1)

    scaled, svag = ScalarRMSProp.scaled, ScalarRMSProp.svag

    def flow_start(self):
        """⌈1/(1 − β1)⌉, the averaging window of m: Adam's state starts degenerate (m = v = 0, t = 0) and its
        bias-corrected averages are averages of a handful of gradients over its first ~1/(1 − β1) steps (the
        first is a sign step, above the edge), which no flow of the rule follows (docs/central-momentum.md)."""
        return math.ceil(1.0 / (1.0 - self.beta1) - 1e-9)  # β1 = 0.9: 10, not 11 from 1/(1 − 0.9) = 10.000…02
