"""Deterministic continuous processes: the stable flow and the modified flow of any update rule.

Time is in steps: the flow integrated over one unit of time is compared with one discrete step. A rule
w ← w − η P̃⁻¹ m (``solvers/rules/``) becomes the ODE, per unit time,

    dw/dt = −η P̃(s)⁻¹ direction(g, s),      ds/dt = rule.state_rate(g, s),      g = ∇L(w),

the *stable flow* (gradient flow dw/dt = −η∇L for GD; RMSProp's ν follows dν/dt = (1 − β2)(g² − ν)). The
*modified flow* replaces g by g + (η/2) H P̃⁻¹ g (P̃ frozen at the current state): for GD this is ∇ of
L + (η/4)‖∇L‖², Barrett & Dherin's backward-error-analysis flow, which follows GD to second order in η; for
other rules it is the same correction with the preconditioned step, not a full second-order analysis.

Reusable pieces (the central flow and the SDE build on them): :class:`Layout` packs (w, state) into one flat
vector y; :func:`velocity` turns a gradient (or any force replacing it) into dy/dt; :func:`flow_field` gives
the vector field f(t, y) of one unit (optionally vectorized over a batch of y); :func:`integrate_unit`
integrates one unit, t = 0 → 1, with torchdiffeq; ``Stable.substeps`` picks the substeps from the sharpness.
This module never touches storage.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator
from torch import Tensor
from torch.func import grad, jvp, vmap
from torchdiffeq import odeint

from flowsim.solvers.curvature import hessian_operator, precond_eigenpairs
from flowsim.models.problem import Problem
from flowsim.solvers.processes import Discrete, DiscreteStart, Process, Trajectory
from flowsim.solvers.rules import Rule, State

VectorField = Callable[[Tensor, Tensor], Tensor]


class Layout:
    """Packs (w, rule state) into one flat vector y = [w, state[k] for k in sorted keys] and unpacks it.

    Built from a template state (shapes only). Works on one vector y of length ``size``; vmap it for batches.
    """

    def __init__(self, n_params: int, state: State):
        self.n_params = n_params
        self.keys = sorted(state)
        self.shapes = [state[k].shape for k in self.keys]
        self.sizes = [n_params] + [state[k].numel() for k in self.keys]
        self.size = sum(self.sizes)

    def pack(self, w: Tensor, state: State) -> Tensor:
        return torch.cat([w.reshape(-1)] + [state[k].reshape(-1) for k in self.keys])

    def unpack(self, y: Tensor) -> tuple[Tensor, State]:
        w, *parts = torch.split(y, self.sizes)
        return w, {k: p.reshape(s) for k, p, s in zip(self.keys, parts, self.shapes)}


def flow_field(problem: Problem, rule: Rule, lr: float, layout: Layout, modified: bool = False,
               vectorized: bool = False) -> VectorField:
    """The stable-flow (or modified-flow) vector field f(t, y) = dy/dt per unit time at step size ``lr``.

    y is ``layout.pack(w, state)``; f returns ``layout.pack(dw/dt, ds/dt)`` with dw/dt = −η P̃⁻¹ direction(g̃, s),
    ds/dt = rule.state_rate(g̃, s), g̃ = ∇L(w) (stable) or ∇L + (η/2) H P̃⁻¹ ∇L (modified). The field is
    autonomous (t is ignored). ``vectorized``: f takes a batch y (paths × size) and evaluates every row with
    torch.func + vmap (the SDE's ensembles); otherwise y is one vector and derivatives come from reverse mode
    (cheaper per call: the modified term is a double backward through the same graph as g).
    """
    if vectorized:
        grad_fn = grad(problem.loss)

        def gradient(w: Tensor, state: State) -> Tensor:
            g = grad_fn(w)
            if not modified:
                return g
            P = rule.precond(state)
            return g + 0.5 * lr * jvp(grad_fn, (w,), (g if P is None else g / P,))[1]
    else:
        def gradient(w: Tensor, state: State) -> Tensor:
            if not modified:
                return problem.grad(w)
            with torch.enable_grad():
                w = w.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(problem.loss(w), w, create_graph=True)
                P = rule.precond(state)
                v = (g if P is None else g / P).detach()
                (hv,) = torch.autograd.grad(g, w, v)
            return g.detach() + 0.5 * lr * hv

    def field(t: Tensor, y: Tensor) -> Tensor:
        w, state = layout.unpack(y)
        return velocity(rule, lr, layout, w, state, gradient(w, state))

    if vectorized:
        return vmap(field, in_dims=(None, 0))
    return field


def velocity(rule: Rule, lr: float, layout: Layout, w: Tensor, state: State, g: Tensor) -> Tensor:
    """dy/dt = layout.pack(−η (P̃⁻¹ direction(g, s) + decay(w)), rule.state_rate(g, s)) for the gradient g at
    (w, s)."""
    return layout.pack(rule.step_from(g, state, lr, w), rule.state_rate(g, state))


def integrate_unit(field: VectorField, y0: Tensor, method: str = "rk4", substeps: int = 4, rtol: float = 1e-7,
                   atol: float = 1e-9) -> Tensor:
    """y(1) for dy/dt = field(t, y), y(0) = y0, with torchdiffeq.

    ``euler``/``rk4``: ``substeps`` equal steps on [0, 1] (rk4 is torchdiffeq's 3/8-rule, order 4).
    ``dopri5``: adaptive with ``rtol``/``atol``. A solution that blows up (dopri5's step size underflows)
    returns NaN, so the caller sees divergence rather than an exception.
    """
    if method == "dopri5":
        t = torch.tensor([0.0, 1.0], dtype=y0.dtype, device=y0.device)
        try:
            return odeint(field, y0, t, method="dopri5", rtol=rtol, atol=atol)[-1]
        except AssertionError as e:
            if "underflow" not in str(e):
                raise
            return torch.full_like(y0, math.nan)
    t = torch.linspace(0.0, 1.0, substeps + 1, dtype=y0.dtype, device=y0.device)
    return odeint(field, y0, t, method=method)[-1]


def preconditioned_sharpness(problem: Problem, rule: Rule, w: Tensor, state: State,
                             v0: Optional[Tensor] = None, tol: float = 1e-3) -> tuple[float, Tensor]:
    """(λ_max(P̃^{-1/2} H P̃^{-1/2}), its eigenvector) by warm-started Lanczos; loss/weight² units, no η.

    ``v0``: the previous eigenvector (warm start). ``tol``: relative eigenvalue error (only an estimate is needed).
    """
    pairs = precond_eigenpairs(hessian_operator(problem, w), rule.precond(state), w, v0=v0, tol=tol, max_iter=30)
    return pairs.vals[0].item(), pairs.vecs


class StepCount(BaseModel):
    """Substeps per unit of time for fixed-step methods: ``substeps``, or chosen from the current sharpness."""
    model_config = ConfigDict(extra="forbid")
    substeps: Optional[PositiveInt] = Field(
        None, description="fixed substeps per step; absent = max(4, ⌈2 S_eff⌉), S_eff = η λ_max(P̃⁻¹H)")
    sharpness_every: PositiveInt = Field(1, description="re-estimate S_eff every this many steps")
    max_substeps: PositiveInt = Field(
        1000, description="cap on the chosen substeps (a preconditioner near 0, e.g. Adam from v = 0, makes S_eff "
                          "huge although the flow is not stiff there; use dopri5 for such rules)")


class FlowOptions(StepCount, DiscreteStart):
    """Scenario keys of the stable flow (and, as :class:`ModifiedOptions`, of the modified flow)."""
    method: Literal["euler", "rk4", "dopri5"] = Field(
        "rk4", description="integrator: euler or rk4 (fixed substeps), or dopri5 (adaptive, to rtol and atol)")
    rtol: PositiveFloat = Field(1e-7, description="dopri5 relative tolerance")
    atol: PositiveFloat = Field(1e-9, description="dopri5 absolute tolerance (weight units)")

    @model_validator(mode="after")
    def _substeps_need_fixed_steps(self):
        if self.method == "dopri5" and self.substeps is not None:
            raise ValueError("substeps: only for the fixed-step methods euler and rk4 (dopri5 adapts its steps)")
        return self


class ModifiedOptions(FlowOptions):
    """Scenario keys of the modified flow: the stable flow's. Its own class, so that an options object names its
    process (``Modified.Options(substeps=8)``)."""


class Stable(Process):
    """The stable flow of the rule (gradient flow for GD), one unit of time per ``step``.

    The flow starts at step n = ``discrete_start`` (default: the rule's :meth:`~flowsim.solvers.rules.Rule.flow_start`,
    0 but for Adam) from the discrete run's weights and state there (its first n steps are the rule's own); from
    w0 (n = 0) the rule state starts at ``rule.init(w0, ∇L(w0))`` like the discrete run.
    With fixed-step methods and no ``substeps``, the number of substeps is max(4, ⌈2 S_eff⌉) with
    S_eff = η λ_max(P̃⁻¹H) (the stiffness of the flow in units of one step; explicit Euler is stable for
    S_eff/substeps < 2), estimated every ``sharpness_every`` steps by warm-started Lanczos.
    """
    name: ClassVar[str] = "stable"
    Options: ClassVar[type[BaseModel]] = FlowOptions
    modified: ClassVar[bool] = False

    def __init__(self, problem, rule, seed=0, batch_size=None, options=None):
        super().__init__(problem, rule, seed, batch_size, options)
        self._sharpness, self._eigvec = None, None
        self._discrete = Discrete(problem, rule, seed, batch_size)  # the discrete_start steps (the SDE's minibatch)

    def context(self, traj: Trajectory):
        """The discrete run's context over the ``discrete_start`` steps (its batch, its preconditioner), the
        flow's after."""
        if traj.step < self.discrete_start:
            return self._discrete.context(traj)
        return super().context(traj)

    def precond_state(self, traj: Trajectory):
        """The flow's preconditioner is made of its current state (the rule's initial state at the start)."""
        return lambda g: traj.state if traj.state is not None else self.rule.init(traj.w, g)

    def step(self, traj: Trajectory, lr: float, measure: bool, ctx=None) -> dict:
        if traj.step < self.discrete_start:
            return self._discrete.step(traj, lr, measure, ctx)
        ctx = self.context(traj) if ctx is None else ctx
        loss, g = ctx.loss_and_grad()
        out = {"step_loss": loss.item(), "step_size": lr}
        if measure:
            out.update(loss=out["step_loss"], grad_norm=g.norm().item())
        if traj.state is None:
            traj.state = self.initial_state(traj, g)
        layout = Layout(self.problem.n_params, traj.state)
        y = self.advance(layout, layout.pack(traj.w, traj.state), lr, self.substeps(traj, lr), traj.step)
        traj.w, traj.state = layout.unpack(y)
        traj.tick(lr)
        return out

    def initial_state(self, traj: Trajectory, g: Tensor) -> State:
        """The rule state the flow starts from at traj, given the step's gradient g (the discrete run's init)."""
        return self.rule.init(traj.w, g)

    def checkpoint_state(self) -> dict:
        """The sharpness estimate and its warm-start vector, so that a resumed run picks the same substeps."""
        return {"sharpness": self._sharpness, "eigvec": self._eigvec}

    def restore(self, state: dict) -> None:
        self._sharpness, self._eigvec = state.get("sharpness"), state.get("eigvec")

    def advance(self, layout: Layout, y: Tensor, lr: float, substeps: int, step: int) -> Tensor:
        """y at the end of unit ``step`` from y at its start."""
        field = flow_field(self.problem, self.rule, lr, layout, modified=self.modified)
        o = self.options
        return integrate_unit(field, y, o.method, substeps, o.rtol, o.atol)

    def effective_sharpness(self, traj: Trajectory, lr: float) -> float:
        """S_eff = η λ_max(P̃⁻¹H) of this flow's Jacobian, in units of one step (re-estimated every
        ``sharpness_every`` steps). For the modified flow the Jacobian's scale is S_eff (1 + S_eff/2)."""
        if self._sharpness is None or traj.step % self.options.sharpness_every == 0:
            self._sharpness, self._eigvec = preconditioned_sharpness(self.problem, self.rule, traj.w, traj.state,
                                                                     self._eigvec)
        s = lr * max(self._sharpness, 0.0)
        return s * (1 + s / 2) if self.modified else s

    def substeps(self, traj: Trajectory, lr: float) -> int:
        """Substeps of unit ``traj.step``: the fixed ``substeps`` option, else max(4, ⌈2 S_eff⌉) capped at
        ``max_substeps`` (also where S_eff is not finite: the state has diverged, and the step records it)."""
        if self.options.substeps is not None:
            return self.options.substeps
        if self.options.method == "dopri5":
            return 0
        s_eff = self.effective_sharpness(traj, lr)
        if not math.isfinite(s_eff):
            return self.options.max_substeps
        return min(self.options.max_substeps, max(4, math.ceil(2 * s_eff)))


class Modified(Stable):
    """The modified flow: the stable flow of L + (η/4)‖∇L‖² (for GD; see the module docstring)."""
    name: ClassVar[str] = "modified"
    Options: ClassVar[type[BaseModel]] = ModifiedOptions
    modified: ClassVar[bool] = True
