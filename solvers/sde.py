"""SGD as a stochastic differential equation: the stable flow plus noise, integrated with torchsde.

Time is in steps (one unit = one optimizer step), Itô form, for a rule with preconditioner P̃ and state s:

    minibatch:  dw = f_w dt + η P̃⁻¹ √(c Σ(w)/B) dW,      isotropic:  dw = f_w dt + σ dW,      ds = f_s dt,

where (f_w, f_s) is the stable-flow field (:func:`flowsim.solvers.flows.flow_field`), Σ(w) = (1/n) Σᵢ (gᵢ − g)(gᵢ − g)ᵀ
the per-example gradient covariance, B the batch size and c = (n − B)/(n − 1) the finite-population factor of
drawing B of n examples without replacement, so one unit of the SDE has the covariance of one SGD step's
gradient noise (Li, Tai & E's first-order stochastic modified equation; c = 0 for the full batch).
Σ^{1/2} dW is applied as Gᵀ dW / √n with G the centred n × P per-example gradient matrix and W an
n-dimensional Brownian motion (torchsde ``general`` noise through ``f_and_g_prod``). Neither G nor a P × P
matrix is formed: Gᵀv = Σᵢ (vᵢ − v̄) ∇ℓᵢ = ∇_w Σᵢ (vᵢ − v̄) ℓᵢ(w) is a vector–Jacobian product of the per-example
losses, computed in the same backward pass as ∇L (two cotangents, vmapped).
Isotropic noise is the seed proposal's σ dW, σ in weight units per √step, not preconditioned. Noise enters w
only: a rule's state follows its stable-flow ODE on the full-batch gradient. With ``discrete_start`` n (default:
the rule's ``flow_start``, 0 but for Adam) the first n steps are the discrete rule's own minibatch steps, and the
SDE starts from the weights and state they reach.

The Brownian motion of unit k is a ``torchsde.BrownianInterval`` on [0, 1] seeded with (seed, k), so a seed
reproduces a path and resuming at any step is exact. :func:`ensemble` integrates many paths at once.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal, Optional

import torch
import torchsde
from pydantic import BaseModel, Field, NonNegativeFloat, model_validator
from torch import Tensor
from torch.func import vjp, vmap

from flowsim.problem import Problem
from flowsim.solvers.flows import Layout, Stable, StepCount, flow_field, velocity
from flowsim.solvers.processes import DiscreteStart, step_seed
from flowsim.solvers.rules import Rule


class SDEOptions(StepCount, DiscreteStart):
    """Scenario keys of the SDE process."""
    noise: Literal["minibatch", "isotropic"] = Field(
        "minibatch", description="minibatch: SGD's gradient covariance at the run's batch_size; isotropic: σ dW")
    sigma: NonNegativeFloat = Field(0.0, description="isotropic noise scale (weight units per √step)")
    method: Literal["euler", "milstein", "srk"] = Field(
        "euler", description="torchsde method; milstein and srk need the diagonal (isotropic) noise")

    @model_validator(mode="after")
    def _consistent(self):
        if self.noise == "minibatch" and self.method != "euler":
            raise ValueError(f"method: {self.method!r} needs diagonal noise; minibatch noise is general: use euler")
        if self.noise == "minibatch" and self.sigma:
            raise ValueError("sigma: only for noise: isotropic (minibatch noise comes from the data)")
        return self


class _MinibatchSDE(torch.nn.Module):
    """dy = drift dt + diffusion·dW, both from one call (y, v) ↦ (drift, diffusion·v) (torchsde general noise)."""
    noise_type, sde_type = "general", "ito"

    def __init__(self, drift_and_noise):
        super().__init__()
        self.drift_and_noise = drift_and_noise

    def f_and_g_prod(self, t, y, v):
        return self.drift_and_noise(y, v)


class _IsotropicSDE(torch.nn.Module):
    """dy = drift dt + diag(g) dW with a constant diagonal g (torchsde diagonal noise)."""
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, drift, diffusion):
        super().__init__()
        self.drift, self.diffusion = drift, diffusion

    def f(self, t, y):
        return self.drift(t, y)

    def g(self, t, y):
        return self.diffusion.expand_as(y)


class SDE(Stable):
    """SGD's SDE (or the isotropic-noise SDE) over any rule; one unit of time per ``step``.

    Substeps per unit: ``substeps``, else max(4, ⌈2 S_eff⌉) as for the stable flow. ``seed`` seeds the noise.
    """
    name: ClassVar[str] = "sde"
    Options: ClassVar[type[BaseModel]] = SDEOptions

    full_batch: ClassVar[bool] = False

    def __init__(self, problem, rule, seed=0, batch_size=None, options=None):
        super().__init__(problem, rule, seed, batch_size, options)
        if self.options.noise == "isotropic" and batch_size is not None:
            raise ValueError("batch_size: does not apply with noise: isotropic (σ sets the noise)")
        if self.options.noise == "minibatch":
            if problem.n_examples == 0:
                raise ValueError("noise: minibatch noise needs data; this landscape has none (use noise: isotropic)")
            if batch_size is None:
                raise ValueError("batch_size: the sde process with minibatch noise needs a batch_size")

    def advance(self, layout: Layout, y: Tensor, lr: float, substeps: int, step: int) -> Tensor:
        return self.advance_paths(layout, y[None], lr, substeps, step, self.seed)[0]

    def advance_paths(self, layout: Layout, ys: Tensor, lr: float, substeps: int, step: int, seed: int) -> Tensor:
        """Paths ys (paths × layout.size) at the end of unit ``step``; Brownian motion seeded by (seed, step)."""
        o = self.options
        if o.noise == "minibatch":
            sde, channels = _MinibatchSDE(vmap(self.drift_and_noise(layout, lr))), self.problem.n_examples
        else:
            diffusion = torch.zeros(layout.size, dtype=ys.dtype, device=ys.device)
            diffusion[:layout.n_params] = o.sigma
            field = flow_field(self.problem, self.rule, lr, layout, vectorized=True)
            sde, channels = _IsotropicSDE(field, diffusion), layout.size
        bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(ys.shape[0], channels), dtype=ys.dtype,
                                       device=ys.device, entropy=step_seed(seed, step),
                                       levy_area_approximation="space-time" if o.method == "srk" else "none")
        ts = torch.tensor([0.0, 1.0], dtype=ys.dtype, device=ys.device)
        return torchsde.sdeint(sde, ys, ts, bm=bm, method=o.method, dt=1.0 / substeps)[-1]

    def drift_and_noise(self, layout: Layout, lr: float):
        """(y, v) ↦ (stable-flow drift, noise η P̃⁻¹ √(c/B) Gᵀ v / √n) for one path, v ∈ ℝⁿ (no noise on the
        state). One forward pass of the per-example losses, one vmapped backward for ∇L and Gᵀv."""
        n, B = self.problem.n_examples, min(self.batch_size, self.problem.n_examples)
        scale = lr * math.sqrt((n - B) / max(n - 1, 1) / B / n)
        problem, rule = self.problem, self.rule

        def drift_and_noise(y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            w, state = layout.unpack(y)
            losses, pullback = vjp(problem.per_example_losses, w)
            cotangents = torch.stack([torch.full_like(losses, 1.0 / n), scale * (v - v.mean())])
            g, gv = vmap(pullback)(cotangents)[0]
            P = rule.precond(state)
            noise = layout.pack(gv if P is None else gv / P, {k: torch.zeros_like(s) for k, s in state.items()})
            return velocity(rule, lr, layout, state, g), noise

        return drift_and_noise


def ensemble(problem: Problem, rule: Rule, lr: float, steps: int, paths: int, seed: int = 0,
             batch_size: Optional[int] = None, options: Optional[dict] = None,
             w0: Optional[Tensor] = None) -> Tensor:
    """Weights (paths × P) of ``paths`` independent SDE paths after ``steps`` units, all from ``w0``
    (default ``problem.w0``) and the rule's initial state (``discrete_start`` 0), integrated together. ``options``: :class:`SDEOptions` keys. Substeps are fixed
    at the start (from S_eff at w0 unless given). Path i is not the single run with seed i: unit k of the
    whole ensemble draws one Brownian motion of shape (paths, channels) seeded by (seed, k).
    """
    process = SDE(problem, rule, seed, batch_size, SDEOptions.model_validate(options or {}))
    if process.discrete_start:
        raise ValueError(f"discrete_start: the ensemble starts every path at w0 from the rule's initial state; "
                         f"give discrete_start: 0 to run {rule.name}'s SDE from there")
    traj = process.start(problem.w0 if w0 is None else w0)
    traj.state = rule.init(traj.w, problem.grad(traj.w))
    layout = Layout(problem.n_params, traj.state)
    ys = layout.pack(traj.w, traj.state).expand(paths, layout.size).contiguous()
    substeps = process.substeps(traj, lr)
    for k in range(steps):
        ys = process.advance_paths(layout, ys, lr, substeps, k, seed)
    return ys[:, :problem.n_params]

