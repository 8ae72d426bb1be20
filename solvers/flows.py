"""Deterministic continuous processes: the stable flow and the modified flow of any update rule.

Time is in steps: the flow integrated over one unit of time is compared with one discrete step. A rule
w ← w − η P̃⁻¹ m (``solvers/rules/``) becomes the ODE, per unit time,

    dw/dt = −η P̃(s)⁻¹ direction(g, s),      ds/dt = rule.state_rate(g, s),      g = ∇L(w),

the *stable flow* (gradient flow dw/dt = −η∇L for GD; RMSProp's ν follows dν/dt = (1 − β2)(g² − ν)). The
*modified flow* replaces g by g + (η/2) H P̃⁻¹ g (P̃ frozen at the current state): for GD this is ∇ of
L + (η/4)‖∇L‖², Barrett & Dherin's backward-error-analysis flow, which follows GD to second order in η; for
other rules it is the same correction with the preconditioned step, not a full second-order analysis.

Reusable pieces (the central flow and the SDE build on them): :class:`Layout` packs (w, state) into one flat
vector y; :func:`velocity` turns a gradient (or any force replacing it, :func:`flow_gradient`) into dy/dt;
:func:`flow_field` gives the vector field f(t, y) of one unit (optionally vectorized over a batch of y);
:func:`integrate_unit` integrates one unit, t = 0 → 1 (:func:`rk4_step`, or torchdiffeq's dopri5);
``Stable.substeps`` picks the substeps from the stiffness (:func:`dominant_eigenvalue` for rk4). This module
never touches storage.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Literal, Optional

import numpy as np
import scipy.sparse.linalg
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator
from torch import Tensor
from torch.func import grad, jvp, vmap
from torchdiffeq import odeint

from flowsim.solvers.curvature import difference_product, hessian_operator, precond_eigenpairs
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


def flow_gradient(problem: Problem, rule: Rule, lr: float, modified: bool = False,
                  functional: bool = False) -> Callable[[Tensor, State], Tensor]:
    """(w, s) ↦ g̃, the force of the stable flow (g = ∇L(w)) or of the modified flow (g + (η/2) H P̃(s)⁻¹ g).
    ``functional``: written in torch.func (for vmap and forward-mode products); otherwise reverse mode, cheaper
    per call (the modified term is a double backward through the same graph as g)."""
    if functional:
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
    return gradient


def flow_field(problem: Problem, rule: Rule, lr: float, layout: Layout, modified: bool = False,
               vectorized: bool = False) -> VectorField:
    """The stable-flow (or modified-flow) vector field f(t, y) = dy/dt per unit time at step size ``lr``.

    y is ``layout.pack(w, state)``; f returns ``layout.pack(dw/dt, ds/dt)`` with dw/dt = −η P̃⁻¹ direction(g̃, s),
    ds/dt = rule.state_rate(g̃, s), g̃ from :func:`flow_gradient`. The field is autonomous (t is ignored).
    ``vectorized``: f takes a batch y (paths × size) and evaluates every row with torch.func + vmap (the SDE's
    ensembles); otherwise y is one vector and derivatives come from reverse mode.
    """
    gradient = flow_gradient(problem, rule, lr, modified, functional=vectorized)

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
                   atol: float = 1e-9, f0: Optional[Tensor] = None) -> Tensor:
    """y(1) for dy/dt = field(t, y), y(0) = y0 (an autonomous field: t is ignored).

    ``euler``/``rk4``: ``substeps`` equal steps on [0, 1], forward Euler or classical Runge–Kutta
    (:func:`rk4_step`); ``f0``: field(y0) where already known, the first substep's first evaluation.
    ``dopri5``: adaptive with ``rtol``/``atol``, by torchdiffeq. A solution that blows up (dopri5's step size
    underflows) returns NaN, so the caller sees divergence rather than an exception.
    """
    if method == "dopri5":
        t = torch.tensor([0.0, 1.0], dtype=y0.dtype, device=y0.device)
        try:
            return odeint(field, y0, t, method="dopri5", rtol=rtol, atol=atol)[-1]
        except AssertionError as e:
            if "underflow" not in str(e):
                raise
            return torch.full_like(y0, math.nan)
    h, y, first = 1.0 / substeps, y0, f0
    for _ in range(substeps):
        if method == "rk4":
            y = rk4_step(lambda z: field(None, z), y, h, k1=first)
        else:
            y = y + h * (field(None, y) if first is None else first)
        first = None
    return y


def rk4_step(field: Callable[[Tensor], Tensor], y: Tensor, h: float, k1: Optional[Tensor] = None) -> Tensor:
    """y + h(k₁ + 2k₂ + 2k₃ + k₄)/6: one classical Runge–Kutta step of length h of dy/dt = field(y) (``k1``:
    field(y) where already known). The flows' one RK4: the stable flow's fixed grid, the rod flow, and the Σ-free
    part of a momentum's central flow. Against torchdiffeq's fixed-grid rk4 (its 3/8 rule) on the stable flows of
    central-momentum-mlp's and the Adam check's problems, 8 substeps: 35 field evaluations' time per unit against
    42 and 48 (torchdiffeq's own work between evaluations), with an error against 64 substeps of 2.5e-6 and
    7.9e-6 against 2.6e-6 and 1.5e-5."""
    k1 = field(y) if k1 is None else k1
    k2 = field(y + 0.5 * h * k1)
    k3 = field(y + 0.5 * h * k2)
    k4 = field(y + h * k3)
    return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def preconditioned_sharpness(problem: Problem, rule: Rule, w: Tensor, state: State,
                             v0: Optional[Tensor] = None, tol: float = 1e-3) -> tuple[float, Tensor]:
    """(λ_max(P̃^{-1/2} H P̃^{-1/2}), its eigenvector) by warm-started Lanczos; loss/weight² units, no η.

    ``v0``: the previous eigenvector (warm start). ``tol``: relative eigenvalue error (only an estimate is needed).
    """
    pairs = precond_eigenpairs(hessian_operator(problem, w), rule.precond(state), w, v0=v0, tol=tol, max_iter=30)
    return pairs.vals[0].item(), pairs.vecs


DENSE_JACOBIAN = 64
"""Below this many unknowns :func:`dominant_eigenvalue` takes the dense Jacobian's eigenvalues."""
ARNOLDI_VECTORS = 6
"""ARPACK's Krylov basis in :func:`dominant_eigenvalue`: warm-started on central-adam-mlp's stable flow it
converges in 7 products, |μ| within 0.1 % of ARPACK's default basis of 20, which takes 21. The Rayleigh–Ritz
step before it, on the last span, settles 61 % of the estimates in 2 products there, 74–83 % on the two
full-scale central-flow checks' stable flows (docs/measurements.md)."""


def dominant_eigenvalue(product: Callable[[Tensor], Tensor], y: Tensor, basis: Optional[Tensor] = None,
                        tol: float = 1e-2) -> tuple[complex, Tensor]:
    """(μ, Q): the eigenvalue of largest modulus of the Jacobian J of a flow's field at y, given v ↦ Jv
    (``product``), and an orthonormal real basis Q (n, 1 or 2) of its eigenvector's span (the real and imaginary
    parts), the next call's warm start ``basis``. A warm start is tried first by Rayleigh–Ritz on that span (one
    product per column): its top Ritz pair (μ, x) is taken when ‖Jx − μx‖ ≤ tol·|μ|·‖x‖, ARPACK's own test;
    else ARPACK's restarted Arnoldi (``scipy.sparse.linalg.eigs``, relative accuracy ``tol``) starts from x.
    The dense Jacobian, from the same products, below DENSE_JACOBIAN unknowns. A flow with a momentum has complex
    pairs, which a symmetric eigensolver cannot see. μ is infinite where y or the products are not finite."""
    n = y.numel()
    diverged = complex(math.inf), torch.ones_like(y)[:, None]
    if not bool(torch.isfinite(y).all()):
        return diverged

    def matvec(v: np.ndarray) -> np.ndarray:
        tangent = torch.as_tensor(np.ascontiguousarray(v).reshape(-1), dtype=y.dtype, device=y.device)
        return product(tangent).detach().cpu().double().numpy()

    start = None
    if n < DENSE_JACOBIAN:
        jacobian = np.stack([matvec(e) for e in np.eye(n)], 1)
        if not np.isfinite(jacobian).all():
            return diverged
        vals, vecs = np.linalg.eig(jacobian)
    else:
        if basis is not None:  # Rayleigh–Ritz on the last span
            Q = np.linalg.qr(basis.detach().cpu().double().numpy().reshape(n, -1))[0]
            JQ = np.stack([matvec(q) for q in Q.T], 1)
            if not np.isfinite(JQ).all():
                return diverged
            vals, C = np.linalg.eig(Q.T @ JQ)
            top = int(np.argmax(np.abs(vals)))
            x, Jx = Q @ C[:, top], JQ @ C[:, top]
            if np.linalg.norm(Jx - vals[top] * x) <= tol * abs(vals[top]) * np.linalg.norm(x):
                return complex(vals[top]), _real_span(x, y)
            start = x.real + x.imag
        operator = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
        try:
            vals, vecs = scipy.sparse.linalg.eigs(operator, k=1, which="LM", v0=start, tol=tol, ncv=ARNOLDI_VECTORS)
        except scipy.sparse.linalg.ArpackNoConvergence as e:  # its best estimate still bounds the substeps
            vals, vecs = e.eigenvalues, e.eigenvectors
        except scipy.sparse.linalg.ArpackError:  # no Arnoldi factorization: products not finite
            return diverged
    if len(vals) == 0 or not np.all(np.isfinite(vals)):
        return diverged
    top = int(np.argmax(np.abs(vals)))
    return complex(vals[top]), _real_span(vecs[:, top], y)


def _real_span(x: np.ndarray, like: Tensor) -> Tensor:
    """An orthonormal real basis (n, 1 or 2) of the span of a complex vector's real and imaginary parts (one
    column where the vector is real up to rounding), as a tensor like ``like``."""
    Q, R = np.linalg.qr(np.stack([x.real, x.imag], 1))
    keep = np.abs(np.diag(R)) > 1e-8 * np.abs(R).max()
    return torch.as_tensor(Q[:, keep] if keep.any() else Q[:, :1], dtype=like.dtype, device=like.device)


def rk4_substeps(mode: complex) -> float:
    """Substeps per unit for RK4 on a flow whose stiffest mode is e^{μt}: 2|μ|·(|μ|/|Re μ|)^{1/4} (|Re μ| at least
    1e-4 |μ|). RK4 errs by ≈ |μ|(h|μ|)⁴/120 per unit of time on that mode, which lives 1/|Re μ| units; this keeps
    the total at GD's, h|μ| = ½ on a real μ (2|μ| substeps there), and for a momentum's weakly damped turning
    (Re μ = −(1 − β)/2) takes (|μ|/|Re μ|)^{1/4} ≈ 2.6 times more (ρ = 2.2, β = 0.9)."""
    radius = abs(mode)
    if not math.isfinite(radius):
        return math.inf
    return 2 * radius * (radius / max(abs(mode.real), 1e-4 * radius)) ** 0.25 if radius > 0 else 0.0


class StepCount(BaseModel):
    """Substeps per unit of time for fixed-step methods: ``substeps``, or chosen from the current sharpness."""
    model_config = ConfigDict(extra="forbid")
    substeps: Optional[PositiveInt] = Field(
        None, description="fixed substeps per step; absent = chosen from the stiffness: rk4 from the dominant "
                          "mode μ of the flow's Jacobian, 2|μ|(|μ|/|Re μ|)^(1/4); euler and the SDE max(4, "
                          "⌈2 S_eff⌉), S_eff = η λ_max(P̃⁻¹H)")
    sharpness_every: PositiveInt = Field(1, description="re-estimate the stiffness every this many steps")
    max_substeps: PositiveInt = Field(
        1000, description="cap on the chosen substeps (a preconditioner near 0, e.g. Adam from v = 0, makes the "
                          "stiffness huge although the flow is not stiff there; use dopri5 for such rules)")


class FlowOptions(StepCount, DiscreteStart):
    """Scenario keys of the stable flow (and, as :class:`ModifiedOptions`, of the modified flow)."""
    method: Literal["euler", "rk4", "dopri5"] = Field(
        "rk4", description="integrator: euler or classical rk4 (fixed substeps), or dopri5 (adaptive, to rtol "
               "and atol)")
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
    With fixed-step methods and no ``substeps``, the substeps follow the flow's stiffness, re-estimated every
    ``sharpness_every`` steps (``substeps``): for rk4 the dominant mode μ of its Jacobian (Arnoldi, warm-started),
    for euler S_eff = η λ_max(P̃⁻¹H) (Lanczos; explicit Euler is stable for S_eff/substeps < 2 on GD). A momentum's
    mode turns (|μ| ≈ √((1 − β)S_eff)): on central-adam-mlp's stable flow rk4 takes 7–24 substeps where
    ⌈2 S_eff⌉ took 41–319 (400 steps in 76 s, not 576 s), and ends 2.1e-6 of its travel from it (docs/measurements.md).
    """
    name: ClassVar[str] = "stable"
    Options: ClassVar[type[BaseModel]] = FlowOptions
    modified: ClassVar[bool] = False

    def __init__(self, problem, rule, seed=0, batch_size=None, options=None):
        super().__init__(problem, rule, seed, batch_size, options)
        self._sharpness, self._eigvec = None, None
        self._mode, self._mode_vec = None, None
        self._momenta = rule.momenta(problem.w0)
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
        force = g if ctx.idx is None and not self.modified else None  # the field's own force at the start
        y = self.advance(layout, layout.pack(traj.w, traj.state), lr, self.substeps(traj, lr, force), traj.step,
                         force)
        traj.w, traj.state = layout.unpack(y)
        traj.tick(lr)
        return out

    def initial_state(self, traj: Trajectory, g: Tensor) -> State:
        """The rule state the flow starts from at traj, given the step's gradient g (the discrete run's init)."""
        return self.rule.init(traj.w, g)

    def checkpoint_state(self) -> dict:
        """The stiffness estimates and their warm-start vectors, so that a resumed run picks the same substeps."""
        mode = None if self._mode is None else (self._mode.real, self._mode.imag)
        return {"sharpness": self._sharpness, "eigvec": self._eigvec, "mode": mode, "mode_vec": self._mode_vec}

    def restore(self, state: dict) -> None:
        self._sharpness, self._eigvec = state.get("sharpness"), state.get("eigvec")
        mode = state.get("mode")
        self._mode, self._mode_vec = None if mode is None else complex(*mode), state.get("mode_vec")

    def advance(self, layout: Layout, y: Tensor, lr: float, substeps: int, step: int,
                force: Optional[Tensor] = None) -> Tensor:
        """y at the end of unit ``step`` from y at its start (``force``: the flow's g̃ there, where the step has
        it: the stable flow's ∇L at full batch, which then is not evaluated again)."""
        field = flow_field(self.problem, self.rule, lr, layout, modified=self.modified)
        o = self.options
        f0 = None if force is None else velocity(self.rule, lr, layout, *layout.unpack(y), force)
        return integrate_unit(field, y, o.method, substeps, o.rtol, o.atol, f0)

    def effective_sharpness(self, traj: Trajectory, lr: float) -> float:
        """S_eff = η λ_max(P̃⁻¹H) of this flow's Jacobian, in units of one step (re-estimated every
        ``sharpness_every`` steps). For the modified flow the Jacobian's scale is S_eff (1 + S_eff/2)."""
        if self._sharpness is None or traj.step % self.options.sharpness_every == 0:
            self._sharpness, self._eigvec = preconditioned_sharpness(self.problem, self.rule, traj.w, traj.state,
                                                                     self._eigvec)
        s = lr * max(self._sharpness, 0.0)
        return s * (1 + s / 2) if self.modified else s

    def dominant_mode(self, traj: Trajectory, lr: float, force: Optional[Tensor] = None) -> complex:
        """μ, the eigenvalue of largest modulus of the flow field's Jacobian in w and the momenta
        (``Rule.momenta``) at the current point, in units of one step (re-estimated every ``sharpness_every``
        steps, warm-started). Without a momentum it is real, −S_eff (:meth:`effective_sharpness`, by Lanczos: the
        Jacobian −ηP̃⁻¹H is similar to a symmetric one, and ARPACK doubled the cost of GD's rk4 flow, 83 against
        42 ms per unit on the quickstart MLP). With one, ARPACK's Arnoldi (:func:`dominant_eigenvalue`) finds
        −c/2 ± i√(cηλ_max − c²/4), c = 1 − β, for an EMA momentum, whose w and m turn about each other rather than
        decay (first by Rayleigh–Ritz on the last estimate's span), on Jacobian-vector products by forward
        differences of the field
        (:func:`~flowsim.solvers.curvature.difference_product`: one gradient each, with a relative error of order
        √ε_m, far inside ARPACK's 1e-2), or by forward mode where the rule's step is not smooth
        (``Rule.smooth_step``: Lion's sign). The rest of the state (ν, a clock) is held: it moves at rates
        1 − β2, its coupling to w carries a factor 1 − β2, and √ν has no derivative where ν = 0. ``force``: the
        flow's g̃ at the current point where known (the differences' base point then costs no gradient)."""
        if not self._momenta:  # the Jacobian in w alone, −ηP̃⁻¹H (modified: its S(1 + S/2)), has real eigenvalues
            return complex(-self.effective_sharpness(traj, lr))
        if self._mode is None or traj.step % self.options.sharpness_every == 0:
            rule, state = self.rule, traj.state
            fast = Layout(self.problem.n_params, {k: state[k] for k in self._momenta})
            gradient = flow_gradient(self.problem, rule, lr, self.modified, functional=not rule.smooth_step)

            def fast_field(z: Tensor, g: Optional[Tensor] = None) -> Tensor:  # the held state enters as
                w, moving = fast.unpack(z)  # constants: no perturbation of √ν
                s = {**state, **moving}
                g = gradient(w, s) if g is None else g
                rate = rule.state_rate(g, s)
                return fast.pack(rule.step_from(g, s, lr, w), {k: rate[k] for k in fast.keys})

            y = fast.pack(traj.w, state)
            if rule.smooth_step:  # one gradient per product; a forward-mode jvp through the network cost 5–6
                product = difference_product(fast_field, y, fast_field(y, force))
            else:
                def product(v: Tensor) -> Tensor:
                    return jvp(fast_field, (y,), (v,))[1]
            self._mode, self._mode_vec = dominant_eigenvalue(product, y, self._mode_vec)
        return self._mode

    def substeps(self, traj: Trajectory, lr: float, force: Optional[Tensor] = None) -> int:
        """Substeps of unit ``traj.step``: the fixed ``substeps`` option, else, capped at ``max_substeps`` (also
        where the estimate is not finite: the state has diverged, and the step records it), at least 4 and
        :func:`rk4_substeps` of the dominant mode for rk4, ⌈2 S_eff⌉ for euler (stable while
        h ≤ 2|Re μ|/|μ|²: 2/S_eff for GD, 1/S_eff for a momentum, whose Re μ = −(1 − β)/2). ``force``: as for
        :meth:`dominant_mode`."""
        if self.options.substeps is not None:
            return self.options.substeps
        if self.options.method == "dopri5":
            return 0
        needed = rk4_substeps(self.dominant_mode(traj, lr, force)) if self.options.method == "rk4" else \
            2 * self.effective_sharpness(traj, lr)
        if not math.isfinite(needed):
            return self.options.max_substeps
        return min(self.options.max_substeps, max(4, math.ceil(needed)))


class Modified(Stable):
    """The modified flow: the stable flow of L + (η/4)‖∇L‖² (for GD; see the module docstring)."""
    name: ClassVar[str] = "modified"
    Options: ClassVar[type[BaseModel]] = ModifiedOptions
    modified: ClassVar[bool] = True
