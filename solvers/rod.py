"""The rod flow: an explicit flow of an optimizer at the edge of stability, built from its one-step map alone.

A rule's step is a map z ↦ Φ(z) of its phase space z = (w, state) (``Rule.advance_state`` then
``Rule.step_from``). At the edge the iterates oscillate with period two, so they are read as the two ends of a
*rod*, z_k = c(k) + (−1)ᵏ δ(k), with a centre c and a signed half-length δ that move slowly. Asking that the rod
one unit of time later be the image of the rod now, Φ(c ± δ) = c(k + 1) ∓ δ(k + 1), and keeping the first order
in the time derivatives gives the flow, per unit of time (one step; docs/rod.md derives it):

    dc/dt = ½[Φ(c + δ) + Φ(c − δ)] − c,        dδ/dt = −½[Φ(c + δ) − Φ(c − δ)] − δ.

For GD, Φ(w) = w − η∇L(w): dc/dt = −(η/2)[∇L(c + δ) + ∇L(c − δ)] (the gradient averaged over the rod's ends, whose
part even in δ is ∇[L + ½δᵀHδ]: the oscillation pushes the centre down the sharpness, the central flow's
self-stabilization) and dδ/dt = (η/2)[∇L(c + δ) − ∇L(c − δ)] − 2δ, linearly (ηH − 2)δ: δ grows along an
eigenvector exactly when ηλ > 2, and the third derivative along δ is what stops it. Every period-two orbit
{a, Φ(a)} of the map is a fixed point of the flow (c, δ) = ((a + Φ(a))/2, (a − Φ(a))/2), and every fixed point of
the map one with δ = 0; with δ = 0 the centre follows c' = Φ(c) − c, the map's own increment read as a rate.

The flow is generic: it reads a rule only through ``init``, ``advance_state`` and ``step_from`` (and
:func:`~flowsim.solvers.central.state_rate`'s β = ∂advance_state/∂s), so a rule defined anywhere gets one; a rule
whose map it does not describe declares why (``Rule.rod_flow``). The state in z is the one the step uses (after
the rule's advance), as in the central flow, and the trajectory's state is the centre's. Three choices complete
the flow for a rule with a state (docs/rod.md derives them; each keeps every period-two orbit a fixed point):
the centre's state moves at the central flow's Tustin rate (2/(1 + β))(A(g, s) − s) at each end; δ's state part
is the map's own, whose next state takes the gradient at the next point w + Δw (two more gradients per field
evaluation); and only w and the momenta (``Rule.momenta``) oscillate, while a second moment or a clock is carried
at the centre with δ = 0. Linearized, δ then moves at −(A + I)δ for the Jacobian A of the step: it grows exactly
where an eigenvalue μ of A passes −1, at −(μ + 1) against the discrete run's log|μ|. Each field evaluation is the
map at the rod's two ends: one vmapped gradient pass (2 gradients; 4 for a rule with a momentum). ``substeps``
classical Runge–Kutta substeps per unit of time cost 4 field evaluations each, 1 by default: the linear rates
−(μ + 1) of a stable map lie within 2 of 0, where one substep is stable. No eigensolver, no host synchronisation
inside a step.

The rod starts, at step n = ``discrete_start``, through the discrete iterates z_n, z_{n+1}, z_{n+2} (two steps of
the map): c = ¾z_n + ½z_{n+1} − ¼z_{n+2}, δ = ¼(z_n − 2z_{n+1} + z_{n+2}), exact for a uniform drift plus a
period-two oscillation, and placing c at time n rather than half a step later. The probes at step n see w_n.

Recorded (measured at the start of each step): ``loss`` and ``grad_norm`` at the centre (the probes' sharpness is
the centre's too), ``predicted_loss`` ½[L(c + δ) + L(c − δ)] and ``predicted_grad_norm_sq`` ½[‖∇L(c + δ)‖² +
‖∇L(c − δ)‖²] (the discrete run's averages over a period), ``sigma_eigs`` [‖δ_w‖²] (the oscillation's variance:
the rod's Σ is δ_w δ_wᵀ) and, with ``shadow``, ``sigma_oscillation_sq``: ¼(e·(w_discrete(t + 1) −
w_discrete(t)))² along e = δ_w/‖δ_w‖ of the discrete run started with the flow. This module never touches storage.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import numpy as np
import torch
from pydantic import BaseModel, Field, PositiveInt
from torch import Tensor
from torch.func import grad_and_value, vmap

from flowsim.solvers.central import CRIT_DIM, FLOW_VARIABLES, state_rate
from flowsim.solvers.flows import Layout, rk4_step
from flowsim.solvers.processes import Discrete, DiscreteStart, Process, Trajectory
from flowsim.solvers.rules import State


class RodOptions(DiscreteStart):
    """The rod process's own scenario keys."""
    substeps: PositiveInt = Field(1, description="classical Runge–Kutta substeps per unit of time (one step), 8 "
                                                 "gradients each (16 for a rule with a momentum)")
    shadow: bool = Field(True, description="run the discrete iteration alongside and record sigma_oscillation_sq")


class Rod(Process):
    """The rod flow of a rule that declares one (``Rule.rod_flow`` None; full batch): the discrete iterates read
    as the two ends c ± δ of a rod, moved by the rule's own step at its ends, with no eigensolver (docs/rod.md;
    the module docstring)."""
    name: ClassVar[str] = "rod"
    Options: ClassVar[type[BaseModel]] = RodOptions
    variables: ClassVar[dict] = FLOW_VARIABLES
    dims: ClassVar[dict[str, int]] = {"crit": CRIT_DIM}

    def __init__(self, problem, rule, seed=0, batch_size=None, options=None):
        if rule.rod_flow is not None:
            raise ValueError(f"rule: {rule.rod_flow}")
        super().__init__(problem, rule, seed, batch_size, options)
        self._discrete = Discrete(problem, rule, seed)  # the discrete_start steps, the start and the shadow run
        self._delta: Optional[Tensor] = None  # the rod's half-length δ over the packed phase space
        self._layout: Optional[Layout] = None
        self._shadow: Optional[Trajectory] = None
        self._gradients = vmap(grad_and_value(problem.loss))
        self._momenta = rule.momenta(problem.w0)

    def substeps(self, traj: Trajectory, lr: float) -> int:
        """Runge–Kutta substeps per unit of time (the option)."""
        return self.options.substeps

    def precond_state(self, traj: Trajectory):
        """The flow's preconditioner is made of the centre's state; the discrete run's convention before the rod
        is built."""
        if self._delta is None:
            return None
        return lambda g: traj.state

    def _set_layout(self, state: State) -> None:
        """The packing of (w, state); the mask of its entries that oscillate (w and the momenta); the state rate's
        scale 2/(1 + β) (``solvers/central.py``, :func:`~flowsim.solvers.central.state_rate`)."""
        self._layout = Layout(self.problem.n_params, state)
        self._oscillating = self._layout.pack(
            torch.ones_like(self.problem.w0),
            {key: torch.ones_like(value) if key in self._momenta else torch.zeros_like(value)
             for key, value in state.items()})
        self._scale = state_rate(self.rule, torch.zeros_like(self.problem.w0), state)[1]

    def field(self, c: Tensor, delta: Tensor, lr: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(dc/dt, dδ/dt, the losses at the ends c ± δ, their ‖∇L‖²) at step size ``lr`` (docs/rod.md)."""
        rule, layout = self.rule, self._layout
        ends = torch.stack([c + delta, c - delta])
        w, state = vmap(layout.unpack)(ends)
        g, losses = self._gradients(w)
        step = vmap(lambda g, state, w: rule.step_from(g, state, lr, w))(g, state, w)
        # the state's next value takes the gradient at the next point: two more gradients where a momentum
        # oscillates (elsewhere δ's state part is masked out, and the ends' own gradients stand in)
        g_next = self._gradients(w + step)[0] if self._momenta else g

        def parts(w, state, g, step, g_next):
            advanced = rule.advance_state(g, state)
            rate = {key: self._scale[key] * (advanced[key] - value) for key, value in state.items()}
            return layout.pack(step, rate), layout.pack(w + step, rule.advance_state(g_next, state))

        rates, images = vmap(parts)(w, state, g, step, g_next)
        return (0.5 * (rates[0] + rates[1]), self._oscillating * (-0.5 * (images[0] - images[1]) - delta),
                losses, g.pow(2).sum(1))

    def _start(self, traj: Trajectory, lr: float) -> Tensor:
        """The rod through z_n, z_{n+1}, z_{n+2} (two discrete steps at ``lr``; z = (w, the state its step
        uses)): sets δ and returns c, packed."""
        discrete = Trajectory(w=traj.w, state=traj.state, step=traj.step)
        g = self.problem.grad(traj.w)
        if discrete.state is None:
            discrete.state = self.rule.init(traj.w, g)
        self._set_layout(discrete.state)
        points = [self._layout.pack(discrete.w, self.rule.advance_state(g, discrete.state))]
        for _ in range(2):
            self._discrete.apply(discrete, g, lr)
            g = self.problem.grad(discrete.w)
            points.append(self._layout.pack(discrete.w, self.rule.advance_state(g, discrete.state)))
        z0, z1, z2 = points
        self._delta = self._oscillating * 0.25 * (z0 - 2 * z1 + z2)
        if self.options.shadow:
            self._shadow = Trajectory(w=traj.w.clone(), state=traj.state)
        return torch.where(self._oscillating.bool(), 0.75 * z0 + 0.5 * z1 - 0.25 * z2, z0)

    def step(self, traj: Trajectory, lr: float, measure: bool, ctx=None) -> dict:
        if traj.step < self.discrete_start:
            return self._discrete.step(traj, lr, measure, ctx)
        if self._delta is None:
            c = self._start(traj, lr)
        else:
            if self._layout is None:  # resumed from a checkpoint
                self._set_layout(traj.state or {})
            c = self._layout.pack(traj.w, traj.state)
        c_next, delta_next, losses, grad_sq = self._advance(c, self._delta, lr)
        out = {"step_loss": losses.mean().item(), "step_size": lr}
        if self.options.shadow:
            before = self._shadow.w
            self._discrete.step(self._shadow, lr, measure=False)
            shadow_step = self._shadow.w - before
        if measure:
            out.update(self._predictions(c, self._delta, losses, grad_sq,
                                         shadow_step if self.options.shadow else None))
        traj.w, traj.state = self._layout.unpack(c_next)
        self._delta = delta_next
        traj.tick(lr)
        return out

    def _advance(self, c: Tensor, delta: Tensor, lr: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c, δ) one unit of time later by ``substeps`` classical Runge–Kutta substeps, and the losses and
        ‖∇L‖² at the ends of the rod at the start."""
        start = []

        def rates(rod: Tensor) -> Tensor:
            dc, d_delta, losses, grad_sq = self.field(rod[0], rod[1], lr)
            if not start:
                start.extend([losses, grad_sq])
            return torch.stack([dc, d_delta])

        rod = torch.stack([c, delta])
        for _ in range(self.options.substeps):
            rod = rk4_step(rates, rod, 1.0 / self.options.substeps)
        return rod[0], rod[1], start[0], start[1]

    def _predictions(self, c: Tensor, delta: Tensor, losses: Tensor, grad_sq: Tensor,
                     shadow_step: Optional[Tensor]) -> dict:
        """Measurements at the start of the step (see the module docstring)."""
        loss, g = self.problem.loss_and_grad(self._layout.unpack(c)[0])
        delta_w = self._layout.unpack(delta)[0]
        amplitude_sq = delta_w.pow(2).sum()
        out = {"loss": loss.item(), "grad_norm": g.norm().item(), "predicted_loss": losses.mean().item(),
               "predicted_grad_norm_sq": grad_sq.mean().item()}
        out["sigma_eigs"] = _first_of_crit(amplitude_sq)
        if shadow_step is not None:
            e = delta_w / amplitude_sq.sqrt().clamp(min=torch.finfo(c.dtype).tiny)
            out["sigma_oscillation_sq"] = _first_of_crit(0.25 * (e @ shadow_step).pow(2))
        return out

    def checkpoint_state(self) -> dict:
        return {"delta": self._delta, "shadow_w": None if self._shadow is None else self._shadow.w,
                "shadow_state": None if self._shadow is None else self._shadow.state}

    def restore(self, state: dict) -> None:
        self._delta = state["delta"]
        if state["shadow_w"] is not None:
            self._shadow = Trajectory(w=state["shadow_w"], state=state["shadow_state"])


def _first_of_crit(value: Tensor) -> np.ndarray:
    """A ``crit`` row (CRIT_DIM values) holding ``value`` first, NaN after: the rod has one oscillating vector."""
    row = np.full(CRIT_DIM, np.nan)
    row[0] = value.item()
    return row
