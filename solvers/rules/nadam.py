"""NAdam: Adam with Nesterov's look-ahead in its bias-corrected momentum."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flowsim.solvers.rules.adam import Adam


@dataclass(frozen=True)
class NAdam(Adam):
    """NAdam with a constant momentum coefficient: w ← w − η m̃ / (√v̂ + ε), with the look-ahead
    m̃ = β1 m / (1 − β1ᵗ⁺¹) + (1 − β1) g / (1 − β1ᵗ) in place of Adam's m̂ = m / (1 − β1ᵗ) (m, v and v̂ as Adam's,
    t the advanced clock). This is ``torch.optim.NAdam`` with its momentum schedule switched off
    (``momentum_decay`` → ∞, so that its μₜ = β1), and optax's ``nadam``.

    Written as Adam's w ← w − η P̃⁻¹ d with Adam's P̃ = (1 − β1ᵗ)(√v̂ + ε): d = (1 − β1ᵗ) m̃. Stability threshold
    on a quadratic, with v̂ held: λ_max(P̃⁻¹H)·η < 2(1 + β1)/((1 + 2β1)(1 − β1)), Nesterov's (13.6 at β1 = 0.9,
    against Adam's 38; docs/theory.md).
    """
    name: ClassVar[str] = "nadam"
    central_flow: ClassVar[str] = ("nadam has no central flow: its step mixes g and m (a look-ahead), and the "
                                   "central flow is derived for a step along the state or along g (process rod "
                                   "covers it)")

    def direction(self, g, state):
        t = state["t"].clamp(min=1)
        return self.beta1 * state["m"] * (1 - self.beta1 ** t) / (1 - self.beta1 ** (t + 1)) + (1 - self.beta1) * g

    def threshold_coefficient(self):
        return 2.0 * (1.0 + self.beta1) / ((1.0 + 2.0 * self.beta1) * (1.0 - self.beta1))
