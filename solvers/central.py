"""The central flow (Cohen, Damian, Talwalkar, Kolter, Lee 2025): the time-averaged trajectory of an optimizer
at the edge of stability, as a differential equation in step units (one unit of time = one step).

A rule steps w ← w − η P̃(s)⁻¹ d(g, s) (``Rule.precond``, ``Rule.direction``) with edge η·λ_max(P̃⁻¹H) = c
(``Rule.threshold_coefficient``). With P = (c/2)·P̃/η, whose effective eigenvalues λ(P⁻¹H) put every rule's
edge at 2 (GD: P = I/η), the flow is

    dw/dt = −η P̃⁻¹ d(∇L(w), s) − (c/2) κ P⁻¹ ½ ∇_w⟨H(w), Σ⟩,      Σ = U X Uᵀ,      HU = PUΛ,  UᵀPU = I,

where U holds the *critical* generalized eigenvectors (effective eigenvalue above ``crit_threshold``) and X ⪰ 0
(k×k) solves, at every substep of length dt, the semidefinite complementarity problem that keeps the linearized
next-substep stability matrix Uᵀ(2P − H)U positive semidefinite (``solvers/sdcp.py``). For a rule that steps
along g (GD, the RMSProps) d = g and κ = 1, the flow of the central-flows paper. A rule that steps along a
momentum m (EMA or heavy-ball momentum, Adam; κ = ``Rule.direction_gain``, what m settles to over g) keeps its
own momentum in the state, which follows ∇L as in the stable flow, while the oscillation's correction
½∇⟨H, Σ⟩ to the time-averaged gradient reaches the step at once, as it would through a settled momentum
(``docs/central-momentum.md``: the derivation, and the alternatives measured against the discrete runs).

The flow is generic over update rules: it reads a rule only through ``advance_state``, ``precond``,
``direction`` and ``direction_gain`` (``precond`` differentiated in forward mode, ``advance_state`` exact by its
pole and by polarization, since it is affine in s and quadratic in g). The state held in the
trajectory is the one the step uses at time t (for the discrete rule: the state after its advance at step t);
for an advance s' = A(g, s) = β ⊙ s + A(g, 0) it flows at ds/dt = 2(A(g, s) − s)/(1 + β), the bilinear (Tustin)
image of the discrete average, plus the oscillation's time average D²_g A[HΣH]/(1 + β) (:func:`state_rate`,
:func:`state_rate_sigma`; RMSProp: (2(1 − β2)/(1 + β2))[g² + diag(HΣH) − ν], scalar RMSProp: ‖g‖² + tr(HΣH)),
and the preconditioner's drift dP = ∂P/∂s · ds enters the SDCP (:func:`precond_drift`). It applies to the rules
that declare it (``Rule.central_flow`` None); the others raise with their reason. With no critical direction the
flow is the stable flow (gradient flow for GD). With ``discrete_start`` n the first n steps are the discrete
rule's own and the flow starts at step n from the weights and state they reach: the flows do not follow Adam's
bias-corrected first 1/(1 − β1) steps (``docs/central-momentum.md``).

Integration: ``substeps`` substeps per unit of time (default 4, the reference setting), each solving the SDCP
once. For a rule that steps along g a substep is forward Euler, which keeps the linearized stability exactly at
the edge (η·λ_max = 2 to ~1e-7), or Heun's second-order method (``method: heun``, two field evaluations per
substep), which converges much faster in the substep but holds the edge only to ~1e-3. A momentum turns its
stiff directions (explicit Euler diverges on that rotation), so for a rule that steps along its momentum each
substep integrates the Σ-free flow by classical Runge-Kutta with fresh gradients (3 more gradients) and adds Σ's
parts held over the substep; the SDCP's linear forecast of the substep reads the direction at the state advanced
over it, as the discrete rule does. A flow with no valid Σ (the SDCP has no solution, e.g. a start far above
the edge) is recorded as diverged at that step, with a warning, and so is a flow whose loss or gradient is no
longer finite (its weights blew up, far above the edge).

Eigenpairs come from ``flowsim.solvers.curvature.precond_eigenpairs`` by LOBPCG warm-started from the previous field
evaluation's block, to a residual of ``eig_tol`` (default 1e-3) relative to the top eigenvalue. The step's first
field evaluation takes the block of every pair above ``track_threshold`` plus one, and converges its critical
pairs and the next one (the guard that sees the next direction rise), the rest carried as the block's Ritz pairs;
the others, a fraction of a step later, solve for the pairs that were critical then and the next one, since a
direction moves from ``track_threshold`` to the edge over several steps, not within one (the others keep their
vectors until the next step). Converging every tracked pair instead cost 1.7x and 1.3x the products on the
central flows of RMSProp and Adam (16.3k against 9.5k and 12.2k over 200 steps) and brought the flow no closer to
one solved to 1e-10. Against Lanczos to 1e-10 at every evaluation this moved the
flow's loss by at most 2.4e-4 relative over 150-200 steps at the edge (gd, rmsprop, Adam), and cost 1.5-2.8x
less (docs/measurements.md). The gradient's graph
(``flowsim.solvers.curvature.LossGraph``) is built once per field evaluation and serves the Hessian-vector products
and the third-derivative terms ∇_w(uᵢᵀH(w)uⱼ) for all pairs i ≤ j (reverse mode through H u_j, cheaper on CPU
than nested jvp + grad with torch.func).

Predictions measured at the start of each step: ``predicted_loss`` = L + ½⟨H, Σ⟩, ``predicted_grad_norm_sq`` =
‖g‖² + tr(HΣH) (the time-averaged ‖g‖² of the discrete run), ``sigma_eigs`` (Σ's eigenvalues, weight²). With
``shadow`` (default) the discrete iteration of the same rule runs alongside from the same start, and
``sigma_oscillation_sq`` records ¼(e_l·(w_discrete(t+1) − w_discrete(t)))² along Σ's unit eigenvectors e_l, the
squared amplitude of the discrete run's period-two oscillation along them: its average over a window of steps is
the oscillation variance that ``sigma_eigs`` predicts, whatever the distance between the flow and the discrete
run (which a squared displacement from the flow would count too). This module never touches storage.
"""
from __future__ import annotations

import math
import warnings
from typing import ClassVar, Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt
from torch import Tensor
from torch.func import jvp, vmap

from flowsim.solvers.curvature import LossGraph, precond_eigenpairs
from flowsim.solvers.flows import Layout, rk4_step
from flowsim.solvers.processes import Discrete, DiscreteStart, Process, Trajectory, Variable
from flowsim.solvers.rules import Rule, State
from flowsim.solvers.sdcp import SDCPError, solve_sdcp

CRIT_DIM = 4  # Σ eigenvalues recorded per step (the ``crit`` dimension), largest first, NaN-padded
FLOW_VARIABLES = {
    "predicted_loss": Variable((), "loss", "central flow: L(w) + ½⟨H, Σ⟩; rod flow: ½[L(c + δ) + L(c − δ)]: the "
                               "predicted time-averaged loss of the discrete run"),
    "predicted_grad_norm_sq": Variable((), "(loss/weight)²", "central flow: ‖∇L‖² + tr(HΣH); rod flow: "
                                       "½[‖∇L(c + δ)‖² + ‖∇L(c − δ)‖²]: the predicted time-averaged ‖g‖²"),
    "sigma_eigs": Variable(("crit",), "weight²", "central flow: eigenvalues of the oscillation covariance Σ, "
                           "descending; rod flow: ‖δ_w‖² first (its Σ = δ_w δ_wᵀ)"),
    "sigma_oscillation_sq": Variable(("crit",), "weight²", "central and rod flows: ¼(e·(w_discrete(t+1) − "
                                     "w_discrete(t)))², the discrete run's period-two amplitude² along each unit "
                                     "eigenvector e of Σ"),
}
"""What the central and rod flows record beside every run's variables."""


class CentralOptions(DiscreteStart):
    """The central process's own scenario keys."""
    substeps: PositiveInt = Field(4, description="integration substeps per unit of time (one step)")
    method: Literal["euler", "heun"] = Field("euler", description="forward Euler (the Σ-free part of a momentum "
                                             "rule by Runge-Kutta), or Heun's 2nd-order method")
    crit_threshold: PositiveFloat = Field(1.95, description="effective eigenvalue (2 = edge) above which a "
                                                             "direction enters the SDCP")
    track_threshold: PositiveFloat = Field(1.5, description="effective eigenvalues above this are tracked")
    eig_tol: PositiveFloat = Field(1e-3, description="eigensolver residual tolerance, relative to the top "
                                   "eigenvalue (raised to 100 × the dtype's machine epsilon: 1.2e-5 in float32); "
                                   "the default moved the flow's loss by ≤ 2.4e-4 against 1e-10 "
                                   "(docs/measurements.md)")
    shadow: bool = Field(True, description="run the discrete iteration alongside and record "
                                           "sigma_oscillation_sq")


class NotFinite(ArithmeticError):
    """The central flow's loss or gradient is no longer finite: it has diverged (a result the step records)."""


class Central(Process):
    """The central flow of a rule that declares one (``Rule.central_flow`` None; full batch). See the module
    docstring."""
    name: ClassVar[str] = "central"
    Options: ClassVar[type[BaseModel]] = CentralOptions
    variables: ClassVar[dict[str, Variable]] = FLOW_VARIABLES
    dims: ClassVar[dict[str, int]] = {"crit": CRIT_DIM}

    def __init__(self, problem, rule, seed=0, batch_size=None, options=None):
        if rule.central_flow is not None:
            raise ValueError(f"rule: {rule.central_flow}")
        super().__init__(problem, rule, seed, batch_size, options)
        self._vecs: Optional[Tensor] = None  # warm start of the eigensolver
        self._k = 2  # eigenpairs requested at a full solve: the tracked ones and a guard
        self._critical = 0  # critical pairs at the last full solve: they and the next are solved for at the other
        # substeps
        self._shadow: Optional[Trajectory] = None
        self._discrete = Discrete(problem, rule, seed)  # the shadow run's steps and the discrete_start steps
        self._steps_along_momentum = type(rule).direction is not Rule.direction
        self.last: dict = {}  # the field evaluation at the start of the last step (for inspection)

    def start(self, w0: Tensor) -> Trajectory:
        if self.options.shadow:
            self._shadow = Trajectory(w=w0.clone())
        return Trajectory(w=w0.clone())

    # ---- the vector field -------------------------------------------------------------------------------
    def _precond(self, state: State, lr: float) -> Tensor:
        """P = (c/2)·P̃/η as a vector (n,) or a 1-element tensor (scalar P̃): the edge is at λ(P⁻¹H) = 2."""
        Pt = self.rule.precond(state)
        w = self.problem.w0
        half_c = self.rule.threshold_coefficient() / 2
        return (torch.ones(1, dtype=w.dtype, device=w.device) if Pt is None else Pt.reshape(-1)) * half_c / lr

    def _eigenpairs(self, graph: LossGraph, w: Tensor, P: Tensor, full: bool) -> tuple[Tensor, Tensor]:
        """Top effective eigenvalues (desc) and orthonormal eigenvectors of P^{-1/2} H P^{-1/2}, warm-started from
        the last solve. ``full`` (the step's first field evaluation): the block of every tracked pair and the
        guard, of which the critical pairs and the next one are converged (solved again with one more while that
        one is critical too) and the rest are the block's Ritz pairs; else only the pairs that were critical at
        the last full solve and the next one, the others kept as they were (see the module docstring)."""
        n = self.problem.n_params
        v0 = self._vecs if self._vecs is not None and self._vecs.shape[0] == n else None
        tol = max(self.options.eig_tol, 100 * torch.finfo(w.dtype).eps)
        crit = self.options.crit_threshold
        cold = v0 is None  # Lanczos, every pair converged
        k = min(self._k, n) if cold else min(self._critical + 1, self._k, n)
        block = min(self._k, n) if full and not cold else None
        while True:
            vals, vecs, _ = precond_eigenpairs(graph.hvp, P, w, k, v0=v0, tol=tol, seed=self.seed,
                                               values_only=False, method="lobpcg", block=block)
            critical = int((vals > crit).sum())
            if block is None or k == block or critical < k:
                break
            v0, k = vecs, min(critical + 1, block)
        if full or cold:
            self._vecs = vecs
            self._k = int((vals > self.options.track_threshold).sum()) + 1
            self._critical = critical
        else:
            self._vecs = torch.cat([vecs, v0[:, k:]], 1)
        return vals, vecs

    def field(self, w: Tensor, state: State, lr: float, dt: float, full: bool = True) -> dict:
        """dw/dt, ds/dt and the quantities they were built from, at (w, state), for a substep of length dt.
        ``full``: take the whole tracked block, converging its critical pairs and the next (else only those: the
        module docstring).

        Returns a dict: ``loss``, ``g``, ``eigs`` (effective, desc), ``U`` (n, k critical generalized
        eigenvectors, UᵀPU = I), ``X`` (k, k), ``dw``, ``ds`` (dict like the state).
        """
        graph = LossGraph(self.problem, w)
        loss, g = graph.loss.detach(), graph.grad()
        if not bool(torch.isfinite(loss)) or not bool(torch.isfinite(g).all()):
            raise NotFinite(f"the loss or the gradient is not finite (loss {loss.item():.3g})")
        P = self._precond(state, lr)
        eigs, vecs = self._eigenpairs(graph, w, P, full)
        k = int((eigs > self.options.crit_threshold).sum())
        U = vecs[:, :k] / P.sqrt()[:, None]
        lam = eigs[:k]
        half_c = self.rule.threshold_coefficient() / 2
        ds0, scale = state_rate(self.rule, g, state)
        dw0 = self._velocity(g, state, lr, _axpy(state, dt, ds0))
        out = {"loss": loss, "g": g, "eigs": eigs, "U": U, "P": P, "X": g.new_zeros(k, k), "dw": dw0, "ds": ds0,
               "dw0": dw0, "ds0": ds0}
        if k == 0:
            return out
        c = 2.0  # the stability matrix is Uᵀ(2P − H)U
        T = graph.third_derivatives(U).reshape(k * k, -1)  # rows: ∇(u_aᵀ H u_b), a-major
        dw_X = -0.5 * half_c * self.rule.direction_gain(state) * (T / P).T  # dw/dt = dw0 + dw_X @ vec(X)
        A0 = torch.diag(c - lam).reshape(-1) - dt * (T @ dw0)
        B = -dt * (T @ dw_X)
        ds_X: State = {}
        if state:  # the state's rate has a Σ part, and the preconditioner's drift enters A too
            HU = P[:, None] * U * lam
            ds_X = state_rate_sigma(self.rule, state, scale, HU)  # ds/dt = ds0 + Σ_ab X_ab ds_X[ab]
            if self.rule.precond(state) is not None:
                Q = (U[:, :, None] * U[:, None, :]).reshape(-1, k * k).T  # rows: u_a ⊙ u_b
                if P.numel() == 1:
                    Q = Q.sum(1, keepdim=True)
                tangents = {key: torch.cat([ds0[key][None], ds_X[key]]) for key in state}  # ds0, then the pairs
                dP = precond_drift(self.rule, state, tangents) * half_c / lr  # P's drift along ds0, then per pair
                A0 = A0 + c * dt * Q @ dP[0]
                B = B + c * dt * Q @ dP[1:].T
        X = self._solve(A0, B, k)
        x = X.reshape(-1)
        out.update(X=X, dw=dw0 + dw_X @ x)
        if ds_X:
            out["ds"] = {key: ds0[key] + (x @ ds_X[key].reshape(k * k, -1)).reshape(ds0[key].shape) for key in ds0}
        return out

    def _velocity(self, g: Tensor, state: State, lr: float, direction_state: Optional[State] = None) -> Tensor:
        """dw/dt without Σ: the rule's own step −η P̃(s)⁻¹ d(g, s'), s' = ``direction_state`` (default s). The
        field's forecast of a substep reads d at the state advanced over it, as the discrete rule advances its
        state before it steps (for GD and the RMSProps d = g and s' does not matter)."""
        Pt = self.rule.precond(state)
        d = self.rule.direction(g, state if direction_state is None else direction_state)
        return -lr * (d if Pt is None else d / Pt)

    @staticmethod
    def _solve(A0: Tensor, B: Tensor, k: int) -> Tensor:
        """X from the SDCP, with B replaced by its symmetric positive semidefinite part."""
        Bn = B.detach().cpu().double().numpy()
        Bn = 0.5 * (Bn + Bn.T)
        d, V = np.linalg.eigh(Bn)
        Bn = (V * np.clip(d, 0, None)) @ V.T
        X = solve_sdcp(A0.detach().cpu().double().numpy().reshape(k, k), Bn)
        return torch.as_tensor(X, dtype=A0.dtype, device=A0.device)

    # ---- stepping ---------------------------------------------------------------------------------------
    def _initial_state(self, w: Tensor, g: Tensor, state: Optional[State]) -> State:
        """The flow's state at its start, the one the next discrete step's preconditioner is made of: the rule's
        ``state`` before that step (init at w0), advanced at g."""
        return self.rule.advance_state(g, state if state is not None else self.rule.init(w, g))

    def precond_state(self, traj: Trajectory):
        """The flow's preconditioner is made of its current state (at its start: the next discrete step's); the
        discrete run's convention over the ``discrete_start`` steps."""
        if traj.step < self.discrete_start:
            return None
        return lambda g: traj.state if traj.step > self.discrete_start else self._initial_state(traj.w, g,
                                                                                                 traj.state)

    def step(self, traj: Trajectory, lr: float, measure: bool, ctx=None) -> dict:
        if traj.step < self.discrete_start:
            return self._discrete.step(traj, lr, measure, ctx)
        if traj.step == self.discrete_start:  # the flow starts here, from the discrete run's weights and state
            if self.options.shadow:
                self._shadow = Trajectory(w=traj.w.clone(), state=traj.state)
            traj.state = self._initial_state(traj.w, self.problem.grad(traj.w), traj.state)
        try:
            w, state, first = self._advance(traj.w, traj.state, lr)
        except (SDCPError, NotFinite) as e:  # the flow has left the domain where it is defined: a result
            warnings.warn(f"central flow, step {traj.step}: {e}; recorded as diverged", stacklevel=2)
            return {"step_loss": math.nan, "step_size": lr}
        out = {"step_loss": first["loss"].item(), "step_size": lr}
        self.last = first
        shadow_step = None
        if self.options.shadow:
            before = self._shadow.w
            self._discrete.step(self._shadow, lr, measure=False)
            shadow_step = self._shadow.w - before
        if measure:
            out.update(self._predictions(first, shadow_step))
        traj.w, traj.state = w, state
        traj.tick(lr)
        return out

    def _advance(self, w: Tensor, state: State, lr: float) -> tuple[Tensor, State, dict]:
        """(w, state) one unit of time later, and the field evaluation at the start."""
        n, dt = self.options.substeps, 1.0 / self.options.substeps
        for i in range(n):
            f = self.field(w, state, lr, dt, full=i == 0)
            if i == 0:
                first = f
            if self.options.method == "euler" and self._steps_along_momentum:
                w, state = self._rk4_substep(w, state, lr, dt, f)
            elif self.options.method == "euler":
                w, state = w + dt * f["dw"], _axpy(state, dt, f["ds"])
            else:
                f2 = self.field(w + dt * f["dw"], _axpy(state, dt, f["ds"]), lr, dt, full=False)
                w = w + 0.5 * dt * (f["dw"] + f2["dw"])
                state = _axpy(_axpy(state, 0.5 * dt, f["ds"]), 0.5 * dt, f2["ds"])
        return w, state, first

    def _rk4_substep(self, w: Tensor, state: State, lr: float, dt: float, f: dict) -> tuple[Tensor, State]:
        """One substep of a rule that steps along its momentum: the Σ-free flow (w' = −η P̃⁻¹ d, s' its rate) by
        classical Runge-Kutta (``flowsim.solvers.flows.rk4_step``) with fresh gradients, plus the Σ parts of f
        held over the substep."""
        layout = Layout(self.problem.n_params, state)
        sigma = layout.pack(f["dw"] - f["dw0"], {key: f["ds"][key] - f["ds0"][key] for key in state})

        def rate(y: Tensor, g: Optional[Tensor] = None) -> Tensor:
            w_, s_ = layout.unpack(y)
            g = self.problem.grad(w_) if g is None else g
            return layout.pack(self._velocity(g, s_, lr), state_rate(self.rule, g, s_)[0]) + sigma

        y = layout.pack(w, state)
        return layout.unpack(rk4_step(rate, y, dt, k1=rate(y, f["g"])))

    def _predictions(self, f: dict, shadow_step: Optional[Tensor]) -> dict:
        """Measurements at the start point from its field evaluation and the shadow run's step from the same
        time (see the module docstring)."""
        U, X, P, g = f["U"], f["X"], f["P"], f["g"]
        k = X.shape[0]
        lam = f["eigs"][:k]
        HU = P[:, None] * U * lam
        out = {"loss": f["loss"].item(), "grad_norm": g.norm().item(), "predicted_loss": _predicted_loss(f).item(),
               "predicted_grad_norm_sq": (g.pow(2).sum() + (X * (HU.T @ HU)).sum()).item()}
        s, E = sigma_eigenpairs(U, X)
        sig = np.full(CRIT_DIM, np.nan)
        sig[:min(k, CRIT_DIM)] = s[:CRIT_DIM].cpu().numpy()
        out["sigma_eigs"] = sig
        if shadow_step is not None:
            osc = np.full(CRIT_DIM, np.nan)
            osc[:min(k, CRIT_DIM)] = (0.25 * (E.T @ shadow_step).pow(2))[:CRIT_DIM].cpu().numpy()
            out["sigma_oscillation_sq"] = osc
        return out

    def checkpoint_state(self) -> dict:
        out = {"k": self._k, "critical": self._critical, "vecs": self._vecs}
        if self.options.shadow:
            out.update(shadow_w=self._shadow.w, shadow_state=self._shadow.state)
        return out

    def restore(self, state: dict) -> None:
        self._k, self._critical, self._vecs = state["k"], state.get("critical", 0), state["vecs"]
        if self.options.shadow:
            self._shadow = Trajectory(w=state["shadow_w"], state=state["shadow_state"])


def _predicted_loss(f: dict) -> Tensor:
    """L + ½⟨H, Σ⟩ = L + ½ Σ_i λ_i X_ii from a field evaluation (UᵀPU = I, so ⟨H, UXUᵀ⟩ = Σ λ_i X_ii)."""
    X = f["X"]
    return f["loss"] + 0.5 * (torch.diagonal(X) * f["eigs"][:X.shape[0]]).sum()


def sigma_eigenpairs(U: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (desc, weight²) and unit eigenvectors (n, k) of Σ = U X Uᵀ, from the k×k X^{1/2} UᵀU X^{1/2}."""
    if X.shape[0] == 0:
        return X.new_zeros(0), U
    d, R = torch.linalg.eigh(X)
    Xh = (R * d.clamp(min=0).sqrt()) @ R.T
    s, V = torch.linalg.eigh(Xh @ (U.T @ U) @ Xh)
    s, V = s.flip(0).clamp(min=0), V.flip(1)
    E = U @ Xh @ V
    return s, E / E.norm(dim=0).clamp(min=torch.finfo(U.dtype).tiny)


# ---- the rule's state, by autodiff over the rule's own functions -----------------------------------------------
def state_rate(rule: Rule, g: Tensor, state: State) -> tuple[State, State]:
    """(ds/dt without Σ, its scale 2/(1 + β)): the central flow's state rate at gradient g.

    The flow holds the post-advance state s of a discrete update s' = A(g, s) = β ⊙ s + A(g, 0), an average of
    past gradients with mean age β/(1 − β) steps. The flow's step over a unit of time integrates its state, so
    the state must lag by half a step more: ds/dt = 2(A(g, s) − s)/(1 + β) = (2(1 − β)/(1 + β))(s_∞ − s), the
    bilinear (Tustin) image of the pole β, whose lag is (1 + β)/(2(1 − β)). The backward difference
    (A(g, s) − s)/β lags β/(1 − β), the stable flow's A(g, s) − s lags 1/(1 − β): for RMSProp's β2 = 0.99 all
    three agree within 1 %; for a momentum at β1 = 0.5 they differ by 2×, and on the digits MLP at the edge only
    the Tustin rate keeps the central flow closer to the discrete run than the stable flow
    (``docs/central-momentum.md``). β is ``Rule.pole``'s. EMA momentum: (2(1 − β1)/(1 + β1))(g − m); GD: {}.
    """
    if not state:
        return {}, {}
    advanced, beta = rule.advance_state(g, state), rule.pole(g, state)
    for key in state:
        if bool((beta[key] == 0).any()):
            raise ValueError(f"rule: {rule.name!r} forgets its state {key!r} in one step (∂A/∂s = 0), so its "
                             f"state has no central-flow rate")
    scale = {key: 2 / (1 + beta[key]) for key in state}
    return {key: (advanced[key] - state[key]) * scale[key] for key in state}, scale


def state_rate_sigma(rule: Rule, state: State, scale: State, HU: Tensor) -> State:
    """The Σ part of ds/dt as a map on vec(X): key ↦ (k², *shape), entry a·k + b = ½ D²_g A[(HU)_a, (HU)_b] times
    the rate's scale 2/(1 + β) (:func:`state_rate`), so that Σ_ab X_ab entry_ab is the oscillation's time
    average ½ D²_g A[H Σ H], scaled. A is quadratic in g and affine in s (``Rule.central_flow``), so D²_g A is
    constant, and by polarization at s = 0, D²_g A[u, v] = ¼[A(u + v) + A(−u − v) − A(u − v) − A(v − u)]: plain
    evaluations of the advance, vmapped over the pairs a ≤ b (a forward-mode jvp cost several times more on this
    CPU). RMSProp: (2(1 − β2)/(1 + β2))(HU)_a ⊙ (HU)_b (scalar RMSProp: its sum); a momentum: 0."""
    k = HU.shape[1]
    a, b = torch.triu_indices(k, k, device=HU.device)
    m = a.numel()
    Y = HU.T
    plus, minus = Y[a] + Y[b], Y[a] - Y[b]
    zero = {key: torch.zeros_like(value) for key, value in state.items()}
    A = vmap(lambda h: rule.advance_state(h, zero))(torch.cat([plus, -plus, minus, -minus]))
    pair = torch.empty(k, k, dtype=torch.long, device=HU.device)  # (a, b) ↦ its row among the pairs, both orders
    pair[a, b] = pair[b, a] = torch.arange(m, device=HU.device)
    rows = pair.reshape(-1)
    return {key: (0.125 * ((A[key][:m] + A[key][m:2 * m]) - (A[key][2 * m:3 * m] + A[key][3 * m:]))
                  * scale[key])[rows] for key in state}


def precond_drift(rule: Rule, state: State, tangents: State) -> Tensor:
    """dP̃ = ∂P̃/∂s · t for a batch of state tangents t (key ↦ (m, *shape)), as (m, size of P̃), with non-finite
    entries set to 0: where ∂P̃/∂s does not exist (√ν at ν = 0, a weight that never had a gradient) the
    preconditioner is taken not to move."""
    d = vmap(lambda t: jvp(rule.precond, (state,), (t,))[1].reshape(-1))(tangents)
    return torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)


def _axpy(state: State, a: float, rate: State) -> State:
    """state + a · rate, key by key."""
    return {key: value + a * rate[key] for key, value in state.items()}
