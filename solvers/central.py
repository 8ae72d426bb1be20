"""The central flow (Cohen, Damian, Talwalkar, Kolter, Lee 2025): the time-averaged trajectory of an optimizer
at the edge of stability, as a differential equation in step units (one unit of time = one step).

For a rule written as preconditioned GD with P = P̃(s)/η (``Rule.precond``; GD: P = I/η), the flow is

    dw/dt = −P⁻¹ [∇L(w) + ½ ∇_w⟨H(w), Σ⟩],      Σ = U X Uᵀ,      HU = PUΛ,  UᵀPU = I,

where U holds the *critical* generalized eigenvectors (effective eigenvalue λ of P^{-1/2} H P^{-1/2} above
``crit_threshold``; 2 is the edge) and X ⪰ 0 (k×k) solves, at every substep of length dt, the semidefinite
complementarity problem that keeps the linearized next-substep stability matrix Uᵀ(2P − H)U positive
semidefinite (``solvers/sdcp.py``). RMSProp's ν flows too, dν/dt = ((1 − β2)/β2)[g² + diag(HΣH) − ν]
(scalar RMSProp: ‖g‖² + tr(HΣH)); the 1/β2 factor is the reference code's. The state held in the trajectory is
the one the preconditioner is made of at time t (for the discrete rule: the state after its advance at step t).
Derived here for gd, scalar_rmsprop and rmsprop; other rules raise. With no critical direction the flow is the
stable flow (gradient flow for GD).

Integration: ``substeps`` forward-Euler substeps per unit of time (default 4, the reference setting), or Heun's
second-order method (``method: heun``, two field evaluations per substep). Each Euler substep keeps the linearized
stability exactly at the edge (η·λ_max = 2 to ~1e-7); Heun's average of two fields converges much faster in the
substep (scenarios/central-gd-mlp.yaml: halving it moves the end point by 0.005 of the distance to GD, against
0.06 for 8 → 16 Euler substeps) but holds the edge only to ~1e-3. A flow with no valid Σ (the SDCP has no
solution, e.g. a start far above the edge) is recorded as diverged at that step, with a warning.

Eigenpairs come from the warm-started Lanczos solver ``flowsim.curvature.top_eigenpairs`` at every field
evaluation, tracking every effective eigenvalue above ``track_threshold`` plus one. The gradient's graph
(``flowsim.curvature.LossGraph``) is built once per field evaluation and serves the Hessian-vector products
and the third-derivative terms ∇_w(uᵢᵀH(w)uⱼ) for all pairs i ≤ j (reverse mode through H u_j: ~4x cheaper on
CPU than nested jvp + grad with torch.func, same values to 1e-16).

Predictions measured at the start of each step: ``predicted_loss`` = L + ½⟨H, Σ⟩, ``predicted_grad_norm_sq`` =
‖g‖² + tr(HΣH) (the time-averaged ‖g‖² of the discrete run), ``sigma_eigs`` (Σ's eigenvalues, weight²). With
``shadow`` (default) the discrete iteration of the same rule runs alongside from the same start, and
``sigma_displacement_sq`` records (e_l·(w_discrete − w))² along Σ's unit eigenvectors e_l: its average over a
window of steps is the oscillation variance that ``sigma_eigs`` predicts. ``Central.forecast`` gives the predicted
loss a number of steps ahead of any point (the adaptive process's ``flow`` choice of c). This module never
touches storage.
"""
from __future__ import annotations

import math
import warnings
from typing import ClassVar, Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt
from torch import Tensor

from flowsim.curvature import LossGraph, preconditioned, top_eigenpairs
from flowsim.solvers.processes import Discrete, Process, Trajectory
from flowsim.solvers.rules import State
from flowsim.solvers.sdcp import SDCPError, solve_sdcp

SUPPORTED_RULES = ("gd", "scalar_rmsprop", "rmsprop")
CRIT_DIM = 4  # Σ eigenvalues recorded per step (the ``crit`` dimension), largest first, NaN-padded


class CentralOptions(BaseModel):
    """The central process's own scenario keys."""
    model_config = ConfigDict(extra="forbid")
    substeps: PositiveInt = Field(4, description="integration substeps per unit of time (one step)")
    method: Literal["euler", "heun"] = Field("euler", description="forward Euler, or Heun's 2nd-order method")
    crit_threshold: PositiveFloat = Field(1.95, description="effective eigenvalue (2 = edge) above which a "
                                                             "direction enters the SDCP")
    track_threshold: PositiveFloat = Field(1.5, description="effective eigenvalues above this are tracked")
    eig_tol: PositiveFloat = Field(1e-10, description="Lanczos residual tolerance, relative to the top eigenvalue "
                                   "(raised to 100 × the dtype's machine epsilon: 1.2e-5 in float32)")
    shadow: bool = Field(True, description="run the discrete iteration alongside and record "
                                           "sigma_displacement_sq")


class Central(Process):
    """The central flow of a gd, scalar_rmsprop or rmsprop rule (full batch). See the module docstring."""
    name: ClassVar[str] = "central"
    Options: ClassVar[type[BaseModel]] = CentralOptions

    def __init__(self, problem, rule, schedule, seed=0, batch_size=None, options=None):
        super().__init__(problem, rule, schedule, seed, batch_size, options)
        if rule.name not in SUPPORTED_RULES:
            raise ValueError(f"rule: the central flow is derived for {', '.join(SUPPORTED_RULES)}, not {rule.name!r}")
        if batch_size is not None and batch_size < problem.n_examples:
            raise ValueError("batch_size: the central flow is a full-batch process")
        self._vecs: Optional[Tensor] = None  # warm start of the eigensolver
        self._k = 2  # eigenpairs requested
        self._shadow: Optional[Trajectory] = None
        self._discrete = Discrete(problem, rule, schedule, seed) if self.options.shadow else None
        self.last: dict = {}  # the field evaluation at the start of the last step (for inspection)

    def start(self, w0: Tensor) -> Trajectory:
        if self._discrete is not None:
            self._shadow = Trajectory(w=w0.clone())
        return Trajectory(w=w0.clone())

    # ---- the vector field -------------------------------------------------------------------------------
    def _precond(self, state: State, lr: float) -> Tensor:
        """P = P̃/η as a vector (n,) or a 1-element tensor (scalar P̃)."""
        Pt = self.rule.precond(state)
        w = self.problem.w0
        return (torch.ones(1, dtype=w.dtype, device=w.device) if Pt is None else Pt.reshape(-1)) / lr

    def _eigenpairs(self, graph: LossGraph, w: Tensor, P: Tensor) -> tuple[Tensor, Tensor]:
        """Top effective eigenvalues (desc) and orthonormal eigenvectors of P^{-1/2} H P^{-1/2}; warm-started."""
        n = self.problem.n_params
        k = min(self._k, n)
        op = preconditioned(graph.hvp, P)
        v0 = self._vecs if self._vecs is not None and self._vecs.shape[0] == n else None
        tol = max(self.options.eig_tol, 100 * torch.finfo(w.dtype).eps)
        vals, vecs, _ = top_eigenpairs(op, n, k, v0=v0, tol=tol, dtype=w.dtype,
                                       device=w.device, seed=self.seed)
        self._vecs = vecs
        self._k = int((vals > self.options.track_threshold).sum()) + 1
        return vals, vecs

    def field(self, w: Tensor, state: State, lr: float, dt: float) -> dict:
        """dw/dt, ds/dt and the quantities they were built from, at (w, state), for a substep of length dt.

        Returns a dict: ``loss``, ``g``, ``eigs`` (effective, desc), ``U`` (n, k critical generalized
        eigenvectors, UᵀPU = I), ``X`` (k, k), ``dw``, ``ds`` (dict like the state).
        """
        graph = LossGraph(self.problem, w)
        loss, g = graph.loss.detach(), graph.grad()
        P = self._precond(state, lr)
        eigs, vecs = self._eigenpairs(graph, w, P)
        k = int((eigs > self.options.crit_threshold).sum())
        U = vecs[:, :k] / P.sqrt()[:, None]
        lam = eigs[:k]
        dw0 = -g / P
        ds0 = self._state_rate(g, state)
        out = {"loss": loss, "g": g, "eigs": eigs, "U": U, "P": P, "X": g.new_zeros(k, k), "dw": dw0, "ds": ds0}
        if k == 0:
            return out
        T = graph.third_derivatives(U).reshape(k * k, -1)  # rows: ∇(u_aᵀ H u_b), a-major
        dw_X = -0.5 * (T / P).T  # dw/dt = dw0 + dw_X @ vec(X)
        A0 = torch.diag(2 - lam).reshape(-1) - dt * (T @ dw0)
        B = -dt * (T @ dw_X)
        ds_X = None
        if state:  # ν-rules: the state's rate and the preconditioner's drift enter A too
            HU = P[:, None] * U * lam
            ds_X = self._state_rate_X(HU)
            nu = state["nu"].reshape(-1)  # dP/dν = 1/(2η√ν); 0 where ν = 0 (a weight with no gradient ever)
            dP_dnu = torch.where(nu > 0, 0.5 / (lr * nu.sqrt()), torch.zeros_like(nu))
            Q = (U[:, :, None] * U[:, None, :]).reshape(-1, k * k).T  # rows: u_a ⊙ u_b
            if P.numel() == 1:
                Q = Q.sum(1, keepdim=True)
            A0 = A0 + 2 * dt * Q @ (dP_dnu * ds0["nu"].reshape(-1))
            B = B + 2 * dt * Q @ (dP_dnu[:, None] * ds_X)
        X = self._solve(A0, B, k)
        x = X.reshape(-1)
        out.update(X=X, dw=dw0 + dw_X @ x)
        if ds_X is not None:
            out["ds"] = {"nu": ds0["nu"] + (ds_X @ x).reshape(ds0["nu"].shape)}
        return out

    @staticmethod
    def _solve(A0: Tensor, B: Tensor, k: int) -> Tensor:
        """X from the SDCP, with B replaced by its symmetric positive semidefinite part."""
        Bn = B.detach().cpu().double().numpy()
        Bn = 0.5 * (Bn + Bn.T)
        d, V = np.linalg.eigh(Bn)
        Bn = (V * np.clip(d, 0, None)) @ V.T
        X = solve_sdcp(A0.detach().cpu().double().numpy().reshape(k, k), Bn)
        return torch.as_tensor(X, dtype=A0.dtype, device=A0.device)

    def _state_rate(self, g: Tensor, state: State) -> State:
        """ds/dt without Σ: ((1 − β2)/β2)(g² − ν) for the ν-rules (the discrete increment over β2)."""
        if not state:
            return {}
        return {"nu": (self.rule.advance_state(g, state)["nu"] - state["nu"]) / self.rule.beta2}

    def _state_rate_X(self, HU: Tensor) -> Tensor:
        """The Σ part of dν/dt as a matrix on vec(X): column (a, b) = ((1 − β2)/β2) · (HU)_a ⊙ (HU)_b (summed
        for scalar RMSProp), so that its product with vec(X) is ((1 − β2)/β2) diag(HΣH) (or tr)."""
        k = HU.shape[1]
        c = (1 - self.rule.beta2) / self.rule.beta2
        cols = (HU[:, :, None] * HU[:, None, :]).reshape(-1, k * k)
        if self.rule.name == "scalar_rmsprop":
            cols = cols.sum(0, keepdim=True)
        return c * cols

    # ---- stepping ---------------------------------------------------------------------------------------
    def _initial_state(self, w: Tensor, g: Tensor) -> State:
        """The state the first discrete step's preconditioner is made of: init, then one advance at g0."""
        return self.rule.advance_state(g, self.rule.init(w, g))

    def step(self, traj: Trajectory, measure: bool) -> dict:
        lr = self.schedule(traj.step)
        if traj.state is None:
            traj.state = self._initial_state(traj.w, self.problem.grad(traj.w))
        try:
            w, state, first = self._advance(traj.w, traj.state, lr)
        except SDCPError as e:  # the flow has left the domain where it is defined: a result, like divergence
            warnings.warn(f"central flow, step {traj.step}: {e}; recorded as diverged", stacklevel=2)
            return {"step_loss": math.nan, "step_size": lr}
        out = {"step_loss": first["loss"].item(), "step_size": lr}
        if measure:
            out.update(self._predictions(first, traj))
        self.last = first
        if self._discrete is not None:
            self._discrete.step(self._shadow, measure=False)
        traj.w, traj.state = w, state
        traj.step += 1
        traj.time += lr
        return out

    def _advance(self, w: Tensor, state: State, lr: float) -> tuple[Tensor, State, dict]:
        """(w, state) one unit of time later, and the field evaluation at the start."""
        n, dt = self.options.substeps, 1.0 / self.options.substeps
        for i in range(n):
            f = self.field(w, state, lr, dt)
            if i == 0:
                first = f
            if self.options.method == "euler":
                w, state = w + dt * f["dw"], _axpy(state, dt, f["ds"])
            else:
                f2 = self.field(w + dt * f["dw"], _axpy(state, dt, f["ds"]), lr, dt)
                w = w + 0.5 * dt * (f["dw"] + f2["dw"])
                state = _axpy(_axpy(state, 0.5 * dt, f["ds"]), 0.5 * dt, f2["ds"])
        return w, state, first

    def forecast(self, w: Tensor, state: Optional[State], lr: float, steps: int) -> float:
        """The time-averaged loss L + ½⟨H, Σ⟩ (loss units) that the flow predicts ``steps`` steps of step size
        ``lr`` after (w, state) (state None: the first discrete step's); NaN where the flow leaves its domain on
        the way (no valid Σ). The eigensolver starts cold, so a forecast depends on its arguments only."""
        self._vecs, self._k = None, 2
        if state is None:
            state = self._initial_state(w, self.problem.grad(w))
        try:
            for _ in range(steps):
                w, state, _ = self._advance(w, state, lr)
            return _predicted_loss(self.field(w, state, lr, 1.0 / self.options.substeps)).item()
        except SDCPError:
            return math.nan

    def _predictions(self, f: dict, traj: Trajectory) -> dict:
        """Measurements at the start point from its field evaluation (see the module docstring)."""
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
        if self._shadow is not None:
            disp = np.full(CRIT_DIM, np.nan)
            d = (E.T @ (self._shadow.w - traj.w)).pow(2)
            disp[:min(k, CRIT_DIM)] = d[:CRIT_DIM].cpu().numpy()
            out["sigma_displacement_sq"] = disp
        return out

    def checkpoint_state(self) -> dict:
        out = {"k": self._k, "vecs": self._vecs}
        if self._shadow is not None:
            out.update(shadow_w=self._shadow.w, shadow_state=self._shadow.state)
        return out

    def restore(self, state: dict) -> None:
        self._k, self._vecs = state["k"], state["vecs"]
        if self._discrete is not None:
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


def _axpy(state: State, a: float, rate: State) -> State:
    """state + a · rate, key by key."""
    return {key: value + a * rate[key] for key, value in state.items()}
