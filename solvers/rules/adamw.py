"""AdamW: Adam with a decoupled weight decay, outside its preconditioner."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from flowsim.solvers.rules.adam import Adam


@dataclass(frozen=True)
class AdamW(Adam):
    """AdamW: w ← w − η (m̂ / (√v̂ + ε) + λ w), Adam's step plus a weight decay λ that the preconditioner does not
    scale (``torch.optim.AdamW``, which multiplies w by 1 − ηλ before Adam's step: the same update).

    Stability threshold on a quadratic, with v̂ held (docs/theory.md): λ_max(P̃⁻¹H)·η < (2 − ηλ)(1 + β1)/(1 − β1),
    Adam's lowered by the factor 1 − ηλ/2; ``threshold_coefficient`` gives Adam's, the limit ηλ → 0 (at the usual
    η = 1e-3 and λ = 0.01 the two differ by 5e-6, relative).
    """
    name: ClassVar[str] = "adamw"
    central_flow: ClassVar[str] = ("adamw has no central flow: its decoupled decay moves the edge by the factor "
                                   "1 − ηλ/2 and adds a step outside the preconditioner, neither of which the "
                                   "central flow carries (process rod covers it)")
    weight_decay: float = field(default=0.01, metadata={"description": "λ, the decoupled weight decay: the step "
                                                        "adds −η·λ·w outside the preconditioner, ≥ 0"})

    def decay(self, w):
        return self.weight_decay * w if self.weight_decay else None

    def __post_init__(self):
        super().__post_init__()
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be ≥ 0, got {self.weight_decay}")
