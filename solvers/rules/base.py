"""The base of every update rule (:class:`Rule`): an optimizer written once as preconditioned gradient descent, with
the facts about it that the processes, policies and probes read. Each optimizer is one subclass in its own module
of this package; the package's ``__init__`` is the registry.

A rule is a pair of pure functions in the optax style, over a state that is a plain dict of tensors:
``init(w, g0) -> state`` and ``update(g, state, lr, w) -> (Δw, state)``; the discrete step is w ← w + Δw. The
weights enter the step only through ``decay(w)``, a decoupled weight decay (AdamW's), None for the other rules.
Every rule is w ← w − η (P̃⁻¹ d + decay(w)), with ``direction(g, state) = d`` (g for GD, the momentum m, or a
look-ahead mixing the two) and a diagonal ``precond(state) = P̃`` (None for the identity). P̃ excludes η: the
central-flow preconditioner is P = P̃/η. The *preconditioned sharpness* is λ_max(P̃⁻¹H), measured on
P̃^{-1/2} H P̃^{-1/2}, and ``threshold_coefficient`` c gives its stability threshold c/η on a quadratic (2 for
GD, (2 + 2β1)/(1 − β1) for EMA momentum and Adam). Every rule declares it (None for a rule with no threshold),
with the edge controller's default fraction ``edge_fraction`` of it.

The continuous processes read a rule through these same functions only: the stable flow's state ODE is
``state_rate`` = advance_state(g, s) − s, and the central flow (``solvers/central.py``) reads ``advance_state``'s
pole and its part quadratic in g, differentiates ``precond`` in forward mode, and passes the oscillation's
correction to the gradient through ``direction_gain``: a momentum settles to direction_gain·g under a gradient
held fixed. The rod flow (``solvers/rod.py``) needs only the step itself (``advance_state`` then ``step_from``)
and β. ``central_flow`` and ``rod_flow`` (and ``sde``) are each rule's declarations of whether those flows apply
to it: None when they do, else the reason why not; ``stochastic_edge`` whether the stochastic-edge measures do;
``smooth_step`` whether differences of the step measure its Jacobian.
Rules know nothing about processes, problems or storage, and nothing outside this package tests a rule's name.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar, Optional

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
    # None: the SDE (``solvers/sde.py``) applies: the step is differentiable in the gradient, so that its noise is
    # carried by the step's derivative along ξ. Otherwise: the reason why not, one line.
    sde: ClassVar[Optional[str]] = None
    # Whether the step (``advance_state`` then ``step_from``) is a smooth map of (w, state, g), so that differences
    # of it measure its Jacobian (the stable flow's stiffness, ``solvers/flows.py``); a sign step is not: a
    # difference counts the signs a perturbation flips, and forward mode is used instead.
    smooth_step: ClassVar[bool] = True
    # Whether the stochastic-edge measures (batch sharpness and the second-moment contraction, whose edge is 2/η for
    # minibatch SGD) apply to the rule's minibatch runs.
    stochastic_edge: ClassVar[bool] = False
    # Required of every rule: the edge controller's c where a scenario gives none (η·S = c·θ, θ the threshold
    # coefficient); None for a rule without a threshold.
    edge_fraction: ClassVar[Optional[float]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "direction" in cls.__dict__ and "direction_gain" not in cls.__dict__ and cls.central_flow is None:
            raise TypeError(f"{cls.__name__}: overrides direction, so it must declare direction_gain (what its "
                            f"direction settles to under a fixed gradient, over g) or central_flow (why it has "
                            f"none)")
        if "decay" in cls.__dict__ and cls.central_flow is None:
            raise TypeError(f"{cls.__name__}: has a decoupled decay, so it must declare central_flow (the central "
                            f"flow's step is −ηP̃⁻¹d alone)")
        if "name" in cls.__dict__:
            missing = [key for key, declared in (("threshold_coefficient",
                                                  cls.threshold_coefficient is not Rule.threshold_coefficient),
                                                 ("edge_fraction", hasattr(cls, "edge_fraction"))) if not declared]
            if missing:
                raise TypeError(f"{cls.__name__}: must declare {' and '.join(missing)} (its stability threshold on a "
                                f"quadratic, and the edge controller's default fraction of it; None where it has none)")

    def init(self, w: Tensor, g0: Tensor) -> State:
        """Initial state, given the weights and the gradient at the first step."""
        return {}

    def update(self, g: Tensor, state: State, lr: float, w: Tensor) -> tuple[Tensor, State]:
        """One step at weights w: returns (Δw, new state) for gradient g at step size lr."""
        state = self.advance_state(g, state)
        return self.step_from(g, state, lr, w), state

    def step_from(self, g: Tensor, state: State, lr, w: Tensor) -> Tensor:
        """Δw = −η (P̃(s)⁻¹ direction(g, s) + decay(w)) at weights w from state s: the discrete step from its
        already advanced state, and the stable flow's dw/dt from its current one."""
        delta = -lr * self.direction(g, state)
        P = self.precond(state)
        delta = delta if P is None else delta / P
        decay = self.decay(w)
        return delta if decay is None else delta - lr * decay

    def decay(self, w: Tensor) -> Optional[Tensor]:
        """The step's part per unit η that does not come from the gradient and is not preconditioned: a decoupled
        weight decay λw (AdamW's); None where the rule has none."""
        return None

    def pole(self, g: Tensor, state: State) -> State:
        """β = ∂A/∂s for each state tensor, the pole of the advance s' = A(g, s) = β ⊙ s + A(g, 0) (a diagonal affine
        A, β a constant of the rule; ``g`` and ``state`` give only shapes): A(0, 1) − A(0, 0), exact in floating
        point for an EMA (β·1 + 0) and a clock (2 − 1); 0 where s' does not depend on s. Plain arithmetic: a
        forward-mode pass cost ~30× the advance itself on this CPU (torch 2.13)."""
        zero = torch.zeros_like(g)
        ones = self.advance_state(zero, {key: torch.ones_like(value) for key, value in state.items()})
        zeros = self.advance_state(zero, {key: torch.zeros_like(value) for key, value in state.items()})
        return {key: ones[key] - zeros[key] for key in ones}

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

    def threshold_coefficient(self) -> Optional[float]:
        """c such that λ_max(P̃⁻¹H) = c/η is the stability threshold on a quadratic; None where the rule has none
        (a step of bounded size, which no curvature makes diverge). Every rule declares it."""
        raise NotImplementedError

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


