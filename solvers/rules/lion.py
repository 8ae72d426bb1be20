"""Lion: the sign of an interpolation between the momentum and the gradient, a step of one size in every weight."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from flowsim.solvers.rules.base import Rule


@dataclass(frozen=True)
class Lion(Rule):
    """Lion (Chen et al., 2023), without weight decay: c = β1 m + (1 − β1) g, w ← w − η sign(c),
    m ← β2 m + (1 − β2) g; m starts at 0. The state carries c beside m (``interpolation``, made from the m before
    the step), so that the step reads the advanced state as every rule's does.

    Every weight moves by exactly η (or 0) at every step, whatever the curvature, so Lion has no stability
    threshold: no step size makes it diverge on a quadratic (on one aligned with the weights it settles within
    about 1.5η of the minimum in each; docs/theory.md). What needs a threshold, a smooth step or a scaling rule
    does not apply, each with its reason.
    """
    name: ClassVar[str] = "lion"
    edge_fraction: ClassVar[None] = None
    central_flow: ClassVar[str] = ("lion has no central flow: sign(·) is no smooth preconditioner, so its step is not "
                                   "w − ηP̃⁻¹d with a differentiable P̃")
    rod_flow: ClassVar[str] = "lion has no rod flow: its step, a sign, is not a smooth map of (w, m)"
    sde: ClassVar[str] = ("lion has no SDE here: a sign step is not differentiable in the gradient, and its noise "
                          "changes the drift itself (E sign(g + ξ) ≠ sign g), which the SDE's linear noise omits")
    smooth_step: ClassVar[bool] = False
    beta1: float = field(default=0.9, metadata={"description": "weight of the momentum in the interpolation c whose "
                                                "sign is the step, in [0, 1)"})
    beta2: float = field(default=0.99, metadata={"description": "EMA coefficient of the momentum m, in [0, 1)"})

    def init(self, w, g0):
        return {"m": torch.zeros_like(w), "interpolation": torch.zeros_like(w)}

    def advance_state(self, g, state):
        return {"m": self.beta2 * state["m"] + (1 - self.beta2) * g,
                "interpolation": self.beta1 * state["m"] + (1 - self.beta1) * g}

    def direction(self, g, state):
        return state["interpolation"].sign()

    def threshold_coefficient(self):
        return None

    def scaled(self, kappa):
        raise ValueError("rule: lion has no known scaling rule with the batch size (a sign step's noise enters its "
                         "drift), so it cannot be scaled or run under SVAG")
