"""Update rules: every optimizer written once as preconditioned gradient descent.

A rule is a pair of pure functions in the optax style, over a state that is a plain dict of tensors:
``init(w, g0) -> state`` and ``update(g, state, lr) -> (Δw, state)``; the discrete step is w ← w + Δw.
Every rule is w ← w − η P̃⁻¹ m, with ``direction(state) = m`` (g for GD) and a diagonal ``precond(state) = P̃``
(None for the identity). P̃ excludes η: the central-flow preconditioner is P = P̃/η. The *preconditioned
sharpness* is λ_max(P̃⁻¹H), measured on P̃^{-1/2} H P̃^{-1/2}, and ``threshold_coefficient`` c gives its stability
threshold c/η on a quadratic (2 for GD, (2 + 2β1)/(1 − β1) for EMA momentum and Adam).

The continuous processes read a rule through these same functions only: the stable flow's state ODE is
``state_rate`` = advance_state(g, s) − s, and the central flow (``solvers/central.py``) differentiates
``advance_state`` and ``precond`` in forward mode, and passes the oscillation's correction to the gradient
through ``direction_gain``: a momentum settles to direction_gain·g under a gradient held fixed. The rod flow
(``solvers/rod.py``) needs only the step itself (``advance_state`` then ``step_from``) and β. ``central_flow`` and
``rod_flow`` are each rule's declarations of whether those flows apply to it: None when they do, else the reason
why not.
Rules know nothing about processes, problems or storage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, Optional

import pydantic
import torch
from torch import Tensor

State = dict[str, Tensor]


@dataclass(frozen=True)
class Rule:
    name: ClassVar[str]
    # None: the central flow applies. That declares the update is w ← w − η P̃(s)⁻¹ d with a direction d that
    # is g, or a momentum linear in the gradients that settles to ``direction_gain``·g under a gradient held
    # fixed; ``precond`` is diagonal and differentiable in s (where it is not, e.g. √ν at ν = 0, the flow holds
    # it still), and
    # ``advance_state`` is affine in s with a nonzero diagonal coefficient (s' = β ⊙ s + A(g, 0)) and quadratic
    # in g. Otherwise: the reason why not, one line.
    central_flow: ClassVar[Optional[str]] = None
    # None: the rod flow applies (``solvers/rod.py``). That declares the step z ↦ Φ(z) of the phase space z = (w,
    # state) a smooth map defined around its iterates, so that c ± δ for a rod near them is a state the rule can
    # step from (a ν kept positive by its own average). Otherwise: the reason why not, one line.
    rod_flow: ClassVar[Optional[str]] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "direction" in cls.__dict__ and "direction_gain" not in cls.__dict__ and cls.central_flow is None:
            raise TypeError(f"{cls.__name__}: overrides direction, so it must declare direction_gain (what its "
                            f"direction settles to under a fixed gradient, over g) or central_flow (why it has "
                            f"none)")

    def init(self, w: Tensor, g0: Tensor) -> State:
        """Initial state, given the weights and the gradient at the first step."""
        return {}

    def update(self, g: Tensor, state: State, lr: float) -> tuple[Tensor, State]:
        """One step: returns (Δw, new state) for gradient g at step size lr."""
        state = self.advance_state(g, state)
        return self.step_from(g, state, lr), state

    def step_from(self, g: Tensor, advanced: State, lr) -> Tensor:
        """Δw = −η P̃⁻¹ direction(g, s) from the already advanced state s."""
        delta = -lr * self.direction(g, advanced)
        P = self.precond(advanced)
        return delta if P is None else delta / P

    def advance_parts(self, g: Tensor, state: State) -> tuple[State, State]:
        """(even, odd) parts of advance_state in g: ((a(g) + a(−g))/2, (a(g) − a(−g))/2). For a state affine in
        itself and at most quadratic in g, the odd part is the term linear in g (m's (1 − β1)g) and the even part
        the rest (β·s, ν's (1 − β2)g², a clock)."""
        plus, minus = self.advance_state(g, state), self.advance_state(-g, state)
        return ({k: 0.5 * (plus[k] + minus[k]) for k in plus}, {k: 0.5 * (plus[k] - minus[k]) for k in plus})

    def advance_state(self, g: Tensor, state: State) -> State:
        return state

    def quadratic_part(self, u: Tensor, state: State) -> State:
        """Q(u): the part of advance_state(·, state) quadratic in u, its even part less its value at 0 (ν's
        (1 − β2)u²; zero for the other tensors)."""
        even, zero = self.advance_parts(u, state)[0], self.advance_state(torch.zeros_like(u), state)
        return {key: even[key] - zero[key] for key in zero}

    def momenta(self, w: Tensor) -> frozenset[str]:
        """The state tensors whose update has a part odd in the gradient (a momentum's m): those with a nonzero
        odd part of :meth:`advance_parts` at a gradient of ones from the initial state. They oscillate with w at
        the edge; the even ones (ν, a clock) do not."""
        u = torch.ones_like(w)
        odd = self.advance_parts(u, self.init(w, u))[1]
        return frozenset(key for key, part in odd.items() if bool(part.abs().max() > 0))

    def second_moments(self, w: Tensor) -> frozenset[str]:
        """The state tensors whose update is quadratic in the gradient (RMSProp's and Adam's ν): those with a
        nonzero :meth:`quadratic_part` at a gradient of ones from the initial state."""
        u = torch.ones_like(w)
        quadratic = self.quadratic_part(u, self.init(w, u))
        return frozenset(key for key, part in quadratic.items() if bool(part.abs().max() > 0))

    def direction(self, g: Tensor, state: State) -> Tensor:
        return g

    def precond(self, state: State) -> Optional[Tensor]:
        """Diagonal preconditioner P̃ (without η), or None for the identity."""
        return None

    def direction_gain(self, state: State) -> float | Tensor:
        """κ: held at a gradient g from ``state`` on, the direction settles to κ·g (1 for the rules that step
        along g). The central flow passes the oscillation's correction to the gradient through it."""
        return 1.0

    def threshold_coefficient(self) -> float:
        """c such that λ_max(P̃⁻¹H) = c/η is the stability threshold on a quadratic."""
        return 2.0

    def flow_start(self) -> int:
        """How the rule's flows begin by default: the number n of its own discrete steps they take before the flow
        starts from the weights and state those steps reach (the processes' ``discrete_start``). 0 where the
        flow is defined from the rule's initial state (GD, momentum from m = 0, the RMSProps from ν = g0²)."""
        return 0

    def state_rate(self, g: Tensor, state: State) -> State:
        """d(state)/dt per unit time (one step) at gradient g, the stable flow's explicit state ODE: the
        increment advance_state(g, s) − s read as a rate (EMA momentum (1 − β1)(g − m), heavy ball
        g − (1 − β1)m, the ν rules (1 − β2)(g² − ν), Adam's clock t: 1)."""
        advanced = self.advance_state(g, state)
        return {key: advanced[key] - value for key, value in state.items()}

    def scaled(self, kappa: float) -> tuple["Rule", float]:
        """The rule's scaling rule: (the rule with its hyperparameters for κ times the batch size, the factor on η),
        so that one step at κ follows, in the SDE, κ steps at κ = 1. GD: η × κ (the linear rule); the momentum
        and ν rules rescale their averages, 1 − β × κ (docs/sde.md)."""
        return self, kappa

    def svag(self, l: int) -> tuple["Rule", float]:
        """The rule and the factor on η of one SVAG step with l (``svag_update`` in solvers/processes.py): the
        scaling rule of κ = 1/l with the noise amplified l-fold in place of the batch made smaller."""
        return self.scaled(1.0 / l)

    def _with_decays(self, kappa: float, **changes) -> "Rule":
        """A copy with each β of the rule at 1 − κ(1 − β), and ``changes``; a β that leaves [0, 1) is an error."""
        for key in ("beta1", "beta2"):
            if hasattr(self, key):
                beta = 1.0 - kappa * (1.0 - getattr(self, key))
                if not 0 <= beta < 1:
                    raise ValueError(f"{key}: {getattr(self, key)} scaled by κ = {kappa:g} gives 1 − κ(1 − {key}) = "
                                     f"{beta:g}, outside [0, 1)")
                changes[key] = beta
        return replace(self, **changes)

    def hyperparameters(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __post_init__(self):
        for k in ("beta1", "beta2"):
            if hasattr(self, k) and not 0 <= getattr(self, k) < 1:
                raise ValueError(f"{k}: must be in [0, 1), got {getattr(self, k)}")
        if hasattr(self, "eps") and self.eps < 0:
            raise ValueError(f"eps: must be ≥ 0, got {self.eps}")


@dataclass(frozen=True)
class GD(Rule):
    """Gradient descent: w ← w − η g."""
    name: ClassVar[str] = "gd"


@dataclass(frozen=True)
class Momentum(Rule):
    """EMA momentum m ← β1 m + (1 − β1) g, w ← w − η m; or heavy ball m ← β1 m + g when ``heavy_ball``.

    Stability threshold on a quadratic: ηλ < 2(1 + β1)/(1 − β1) (EMA), ηλ < 2(1 + β1) (heavy ball).
    """
    name: ClassVar[str] = "momentum"
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


@dataclass(frozen=True)
class ScalarRMSProp(Rule):
    """ν ← β2 ν + (1 − β2)‖g‖² (a scalar), w ← w − η g / (√ν + ε). ν starts at ‖g0‖²."""
    name: ClassVar[str] = "scalar_rmsprop"
    beta2: float = field(default=0.99, metadata={"description": "EMA coefficient of ‖g‖², in [0, 1)"})
    eps: float = field(default=1e-8, metadata={"description": "added to √ν (gradient units), ≥ 0"})

    def init(self, w, g0):
        return {"nu": g0.pow(2).sum().reshape(1)}

    def advance_state(self, g, state):
        return {"nu": self.beta2 * state["nu"] + (1 - self.beta2) * g.pow(2).sum()}

    def precond(self, state):
        return state["nu"].sqrt() + self.eps

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


@dataclass(frozen=True)
class Adam(Rule):
    """Adam with bias correction: w ← w − η m̂ / (√v̂ + ε), m̂ = m/(1 − β1ᵗ), v̂ = v/(1 − β2ᵗ).

    Written as w ← w − η P̃⁻¹ m with P̃ = (1 − β1ᵗ)(√v̂ + ε): the m̂ correction is folded into P̃.
    """
    name: ClassVar[str] = "adam"
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


RULES: dict[str, type[Rule]] = {r.name: r for r in (GD, Momentum, ScalarRMSProp, RMSProp, Adam)}


def make_rule(name: str, /, **hyper) -> Rule:
    """Look a rule up by name and type-check its hyperparameters; errors name the offending key."""
    if name not in RULES:
        raise ValueError(f"rule: unknown rule {name!r}; choose from {sorted(RULES)}")
    cls = RULES[name]
    known = [f.name for f in fields(cls)]
    unknown = set(hyper) - set(known)
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: not a hyperparameter of rule {name!r} "
                         f"(it takes {', '.join(known) or 'none'})")
    try:
        return pydantic.TypeAdapter(cls).validate_python(hyper, strict=False)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        raise ValueError(f"{'.'.join(map(str, err['loc']))}: {msg}" if err["loc"] else msg) from None
