"""Step-size policies: how η_k is chosen, the third axis of a run beside its update rule and its process.

A policy is plain data (a frozen pydantic model: its fields are its scenario keys) with two functions in the optax
manner: ``init() -> state`` and ``update(k, ctx, state) -> (η_k, state)``, called by the simulation loop once per
step, before the step, with the step index k and the :class:`StepContext` of the point w_k (None for a policy that
measures no curvature). The state is a plain dict of floats and tensors: the loop checkpoints it, so a resumed
run continues exactly. A policy never sees the network: only what the context hands it (the step index, the
step's loss and gradient on its batch, v ↦ Hv operators at w_k, the rule and its state). Units: η in the rule's
step-size units; curvature in loss/weight² (no η inside).

- :class:`Constant` — η_k = lr.
- :class:`Drop` — lr until step ``at``, ``lr_after`` from then on.
- :class:`Edge` — η from tracked curvature, at a fraction c of the rule's stability threshold (docs/step-size.md).
- :class:`Cdat` — σ times the greedy step along the rule's update, from one Hessian-vector product per step.

A scenario names a policy with ``lr`` alone (constant), ``step_size: {drop: {at, lr_after}}`` beside ``lr``, or
``step_size: edge`` / ``step_size: {edge: {...}}`` (no ``lr``: the controller sets η; its cap is ``max_lr``), or
``step_size: cdat`` / ``step_size: {cdat: {...}}`` (no ``lr`` either).
This module never touches storage and never steps an optimizer.
"""
from __future__ import annotations

import math
from functools import cached_property
from typing import Callable, ClassVar, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt
from torch import Tensor

from flowsim.solvers.curvature import HVP_METHODS, LossGraph, hessian_operator, precond_eigenpairs
from flowsim.solvers.rules import Rule, State

PolicyState = dict


class StepContext:
    """What the loop knows at w_k before step k, computed on first use and shared by the policy and the process.

    ``step`` k, ``w`` w_k, ``state`` the rule state before the step (None before the first step), ``idx`` the
    step's batch (None: full batch). ``loss_and_grad()`` is the step's own
    (loss, gradient) on its batch — the process takes its step with the same tensors.
    """

    def __init__(self, problem, rule: Rule, step: int, w: Tensor, state: Optional[State],
                 idx: Optional[Tensor] = None, precond_state: Optional[Callable[[Tensor], State]] = None):
        self.problem, self.rule, self.step, self.w, self.state = problem, rule, step, w, state
        self.idx = idx
        self._precond_state = precond_state
        self._value: Optional[tuple[Tensor, Tensor]] = None
        self._graph: Optional[LossGraph] = None

    def loss_and_grad(self) -> tuple[Tensor, Tensor]:
        """(L_B(w_k), ∇L_B(w_k)) on the step's batch (detached)."""
        if self._value is None:
            self._value = self.problem.loss_and_grad(self.w, self.idx)
        return self._value

    def hessian(self, method: str = "reverse") -> Callable[[Tensor], Tensor]:
        """v ↦ H v at w_k on the step's batch, by ``method`` (``flowsim.solvers.curvature.hessian_operator``): ``reverse``
        builds the gradient's graph, and the step's gradient comes from it when not computed yet; ``difference``
        starts from the step's gradient."""
        if method == "reverse":
            if self._graph is None:
                self._graph = LossGraph(self.problem, self.w, self.idx)
                if self._value is None:
                    self._value = (self._graph.loss.detach(), self._graph.grad())
            return self._graph.hvp
        return hessian_operator(self.problem, self.w, self.idx, method, grad=self.loss_and_grad()[1])

    def prior_state(self) -> State:
        """The rule state the step starts from (before the first step: the rule's initial state)."""
        return self.state if self.state is not None else self.rule.init(self.w, self.loss_and_grad()[1])

    @cached_property
    def precond_state(self) -> State:
        """The rule state the step's preconditioner P̃ is made of (discrete: the state advanced by the step's
        gradient; a flow: its current state)."""
        g = self.loss_and_grad()[1]
        if self._precond_state is not None:
            return self._precond_state(g)
        return self.rule.advance_state(g, self.prior_state())


class StepSize(BaseModel):
    """Base policy. ``kind`` is its name in scenarios; ``curvature`` says whether it needs the context (a policy
    that does not is never handed one, and runs in vmapped batches)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str]
    curvature: ClassVar[bool] = False

    def init(self) -> PolicyState:
        return {}

    def check(self, rule: Rule) -> None:
        """Raise ValueError, one line, where the policy cannot set η for ``rule`` (every rule by default)."""

    def update(self, k: int, ctx: Optional[StepContext], state: PolicyState) -> tuple[float, PolicyState]:
        """η_k for step k and the new state; ``ctx`` is None for a policy without ``curvature``."""
        raise NotImplementedError

    def coords(self) -> dict:
        """Run coordinates that say what ran: ``policy`` (its kind), ``lr`` (its step size; NaN where a controller
        sets η) and ``max_lr`` (a controller's cap; NaN for a schedule)."""
        return {"policy": self.kind, "lr": getattr(self, "lr", math.nan), "max_lr": math.nan}


class Constant(StepSize):
    """η_k = lr."""
    kind: ClassVar[str] = "constant"
    lr: PositiveFloat

    def update(self, k, ctx, state):
        return self.lr, state


class Drop(StepSize):
    """η_k = ``lr`` for k < ``at``, ``lr_after`` from step ``at`` on."""
    kind: ClassVar[str] = "drop"
    lr: PositiveFloat
    at: PositiveInt = Field(description="the first step taken at lr_after")
    lr_after: PositiveFloat = Field(description="the step size η from step at on")

    def update(self, k, ctx, state):
        return (self.lr_after if k >= self.at else self.lr), state


class Edge(StepSize):
    """The edge controller: η_k = min(max_lr, s·c·θ/S), S = λ_max(P̃⁻¹H) re-estimated every ``every`` steps.

    θ = ``Rule.threshold_coefficient()`` (2 for GD, 38 for Adam with β1 = 0.9), so η·S = c·θ: c = 1 sits at the
    edge of stability; c's default is the rule's ``edge_fraction`` (1.5 for GD, 0.5 for the others, chosen on the
    tuning half of the adaptive benchmark's suite). P̃ is the preconditioner of the step η
    is set for. s is the divergence guard's scale: 1 from each regular estimate on, × ``shrink`` at each loss spike
    until the next one. S is measured on each estimating step's own batch by warm-started Lanczos (products by
    ``hvp``).

    The guard reads the loss, not S: at a spike η becomes at most ``shrink`` × the η set at the last regular
    estimate, whatever the new estimate says (S collapses where cross-entropy flattens, and a re-estimate there
    would raise η), and only a regular estimate may raise η, by at most ``growth`` × the η taken. With the defaults
    (shrink × growth = 1) η cannot rise across an interval that had a spike, and spikes do not compound from one
    interval to the next.

    The loss's rounding floor, ``eps`` of its dtype × the first step's loss (1.2e-7 × L0 in float32): where a step's
    loss is at or below it, S measured there is rounding error (separable cross-entropy reaches it, and S → 0 there
    let η double at every estimate, to 10⁷ over Adam), so an estimate on such a step never raises η, and such a
    loss is no reference for the guard (on small batches that fit exactly, any nonzero batch loss would be a spike).
    An estimate that is not finite (a Hessian-vector product overflowed) never raises η either. At the first
    step, where no η exists yet, S ≤ 0 or not finite leaves η unbounded: then ``max_lr`` is taken, and without one
    it is a one-line error (it was η = ∞, and a run of NaN), but where the first loss itself is not finite: η is
    then NaN, and the run records its divergence.

    The defaults and the options kept are those measured on the tuning half of the adaptive benchmark's suite
    (docs/step-size.md gives each with its effect on both halves).
    """
    kind: ClassVar[str] = "edge"
    curvature: ClassVar[bool] = True
    c: Optional[float] = Field(None, gt=0, lt=2, description="target η·S as a fraction of the rule's threshold θ "
                               "(absent: the rule's own, 1.5 for gd, 0.5 for the other rules)")
    max_lr: PositiveFloat = Field(math.inf, description="the largest η the controller may set")
    every: PositiveInt = Field(10, description="re-estimate S every this many steps")
    early: bool = Field(True, description="also re-estimate at steps 1, 2, 4, … below every")
    guard: float = Field(2.0, gt=1, description="a step loss above this × the smallest since the last estimate "
                         "(of those above the loss's rounding floor) re-estimates S and shrinks the step until the "
                         "next regular estimate")
    shrink: float = Field(0.5, gt=0, lt=1, description="the guard's factor: at a spike η is at most this × the "
                          "η set at the last regular estimate")
    growth: float = Field(2.0, gt=1, description="η grows by at most this factor per re-estimate")
    eig_tol: PositiveFloat = Field(1e-2, description="eigensolver tolerance: relative eigenvalue error")
    max_products: Optional[PositiveInt] = Field(4, description="Hessian-vector products per re-estimate after "
                                                "the first (absent = until eig_tol)")
    hvp: Literal[HVP_METHODS] = Field("difference", description="Hessian-vector products: difference (of "
                                      "gradients), or exact by reverse (double backward) or forward (jvp of grad)")

    def coords(self):
        return {"policy": self.kind, "lr": math.nan, "max_lr": self.max_lr}

    def check(self, rule: Rule) -> None:
        if rule.threshold_coefficient() is None:
            raise ValueError(f"step_size: edge holds η at a fraction of the rule's stability threshold, and rule "
                             f"{rule.name!r} has none")

    def fraction(self, rule: Rule) -> float:
        """c for ``rule``: the scenario's, else the rule's ``edge_fraction``."""
        self.check(rule)
        return self.c if self.c is not None else rule.edge_fraction

    def init(self) -> PolicyState:
        return {"eta": math.nan, "base": math.nan, "scale": 1.0, "S": math.nan, "ref": math.inf, "floor": 0.0,
                "vecs": None}

    # ---- the controller ---------------------------------------------------------------------------------
    def update(self, k: int, ctx: StepContext, state: PolicyState) -> tuple[float, PolicyState]:
        state = dict(state)
        first = math.isnan(state["eta"])
        if first:
            self._estimate(ctx, state, first=True)
        elif k % self.every == 0 or (self.early and k < self.every and k & (k - 1) == 0):
            self._estimate(ctx, state)
        loss = ctx.loss_and_grad()[0]  # after the estimate: a reverse-mode estimate computes it on its way
        step_loss = loss.item()
        if first:
            state["floor"] = torch.finfo(loss.dtype).eps * abs(step_loss)
        if step_loss > self.guard * state["ref"]:
            self._estimate(ctx, state, spike=True)
        if step_loss > state["floor"]:  # a loss at its rounding floor is no reference for a spike
            state["ref"] = min(state["ref"], step_loss)
        return state["eta"], state

    def sharpness(self, ctx: StepContext, state: PolicyState, first: bool) -> float:
        """S = λ_max(P̃⁻¹H) at w_k on the step's batch, with the preconditioner of step k (warm-started from the
        last estimate)."""
        P = ctx.rule.precond(ctx.precond_state)
        res = precond_eigenpairs(ctx.hessian(self.hvp), P, ctx.w, v0=state["vecs"], tol=self.eig_tol,
                                 max_iter=None if first else self.max_products)
        state["vecs"] = res.vecs
        return res.vals[0].item()

    def _estimate(self, ctx: StepContext, state: PolicyState, first: bool = False, spike: bool = False) -> None:
        S = state["S"] = self.sharpness(ctx, state, first)
        if first and not 0 < S < math.inf and self.max_lr == math.inf:
            if not math.isfinite(ctx.loss_and_grad()[0].item()):  # a start that has diverged: the run records it
                state["eta"] = state["base"] = math.nan
                return
            raise ValueError(f"step_size: edge: λ_max(P̃⁻¹H) = {S:.3g} at the first step, so no stability "
                             f"threshold bounds η there; set max_lr (the largest η to take)")
        target = self.fraction(ctx.rule) * ctx.rule.threshold_coefficient() / S if 0 < S < math.inf else math.inf
        state["scale"] = state["scale"] * self.shrink if spike else 1.0  # a regular estimate starts afresh
        eta = state["scale"] * target
        if spike:  # at most shrink × the η of the last regular estimate, whatever S says now
            eta = min(eta, self.shrink * state["base"])
        elif not first and (not math.isfinite(S) or ctx.loss_and_grad()[0].item() <= state["floor"]):
            eta = min(eta, state["eta"])  # S is no measurement there: a product overflowed, or rounding error
        elif not first:
            eta = min(eta, self.growth * state["eta"])
        state["eta"] = min(self.max_lr, eta)
        if not spike:
            state["base"] = state["eta"]
        state["ref"] = math.inf


class Cdat(StepSize):
    """CDAT (Roulet, Agarwala et al. 2024, arXiv 2407.06183): η_k = σ·n_k/d_k along the rule's update u_k at η = 1,
    n = max(−gᵀu, 0), d = |uᵀHu|, each an exponential moving average (coefficient ``ema``; the bias correction
    cancels in the ratio). σ = 1 is the greedy step (the minimizer of the quadratic model along u), σ = 2 steps
    "on edge" (to the model's level set through w_k). One Hessian-vector product per step, on the step's batch."""
    kind: ClassVar[str] = "cdat"
    curvature: ClassVar[bool] = True
    sigma: float = Field(2.0, gt=0, description="multiple of the greedy step: 1 greedy, 2 on edge")
    ema: float = Field(0.9, ge=0, lt=1, description="EMA coefficient of the numerator and the denominator")
    hvp: Literal[HVP_METHODS] = Field("difference", description="Hessian-vector products: reverse, forward or "
                                      "difference (as for edge)")

    def coords(self):
        return {"policy": self.kind, "lr": math.nan, "max_lr": math.inf}

    def init(self) -> PolicyState:
        return {"n": 0.0, "d": 0.0}

    def update(self, k, ctx, state):
        g = ctx.loss_and_grad()[1]
        u = ctx.rule.update(g, ctx.prior_state(), 1.0, ctx.w)[0]
        n = max(-(g * u).sum().item(), 0.0)
        d = abs((u * ctx.hessian(self.hvp)(u)).sum().item())
        state = {"n": self.ema * state["n"] + (1 - self.ema) * n, "d": self.ema * state["d"] + (1 - self.ema) * d}
        eta = self.sigma * state["n"] / state["d"] if state["d"] > 0 else math.inf
        return eta, state


POLICIES: dict[str, type[StepSize]] = {p.kind: p for p in (Constant, Drop, Edge, Cdat)}
