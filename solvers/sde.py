"""The SDE of a minibatch run of any rule (SGD's, Adam's, RMSProp's, a momentum's), integrated with torchsde.

Time is in steps (one unit = one optimizer step), Itô form. A rule's step from (w, s) at the minibatch gradient
g + ξ is w ← w − η P̃(s⁺)⁻¹ d(g + ξ, s⁺), s⁺ = advance_state(g + ξ, s); ξ has mean 0 and covariance cΣ(w)/B, with
Σ(w) = (1/n) Σᵢ (gᵢ − g)(gᵢ − g)ᵀ the per-example gradient covariance, B the batch size and c = (n − B)/(n − 1)
the finite-population factor of drawing B of n examples without replacement (c = 0 for the full batch). The SDE
takes, per unit of time, that step's mean as its drift and its part linear in ξ as its noise (Li, Tai & E's
first-order stochastic modified equation, extended to the rule's state as Malladi, Lyu, Panigrahi & Arora do
for RMSprop and Adam):

    ds = (E_ξ s⁺ − s) dt + ∂_g s⁺ √(cΣ/B) dW         (no noise on second moments such as ν),
    dw = −η P̃(E_ξ s⁺)⁻¹ d(g, s⁺) dt − η P̃⁻¹ ∂_g d √(cΣ/B) dW,

so RMSProp's and Adam's ν follow E[g_B²] = g² + c·diag(Σ)/B, a momentum's m carries the noise to w, and GD's SDE is
dw = −η g dt + η √(cΣ/B) dW. A momentum m ← βm + c·g is then taken to every order in 1 − β (:func:`exact_ema`):
its drift × ln(1/β)/(1 − β), its noise × √(2 ln(1/β)/(1 − β²)), and w moves along m advanced by the fraction
(1 − βκ)/(1 − β) of its step in place of s⁺, which makes m and w exact at every step under a constant gradient
and noise. The derivation is in docs/sde.md. Σ^{1/2} dW is applied as Gᵀ dW / √n with G the
centred n × P per-example gradient matrix and W an n-dimensional Brownian motion (torchsde ``general`` noise
through ``f_and_g_prod``); no P × P matrix is formed. For a rule without a second moment, Gᵀv is a
vector–Jacobian product of the per-example losses in the same backward pass as ∇L; a second moment needs the n
per-example gradients themselves. Isotropic noise is σ dW on w (σ in weight units per √step, not
preconditioned) over the stable flow. With ``discrete_start`` n (default: the rule's ``flow_start``, 0 but for
Adam) the first n steps are the discrete rule's own minibatch steps; the state starts as the discrete run's does,
from the gradient of that step's batch.

The Brownian motion of unit k is a ``torchsde.BrownianInterval`` on [0, 1] seeded with (seed, k), so a seed
reproduces a path and resuming at any step is exact. :func:`ensemble` integrates many paths at once.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal, NamedTuple, Optional

import torch
import torchsde
from pydantic import BaseModel, Field, NonNegativeFloat, model_validator
from torch import Tensor
from torch.func import jvp, vjp, vmap

from flowsim.models.problem import Problem
from flowsim.solvers.flows import Layout, Stable, StepCount, flow_field
from flowsim.solvers.processes import DiscreteStart, Trajectory, step_seed
from flowsim.solvers.rules import Rule, State


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

    Substeps per unit: ``substeps``, else max(4, ⌈2 S_eff⌉), as for the stable flow by euler. ``seed`` seeds the
    noise.
    """
    name: ClassVar[str] = "sde"
    Options: ClassVar[type[BaseModel]] = SDEOptions

    full_batch: ClassVar[bool] = False

    def __init__(self, problem, rule, seed=0, batch_size=None, options=None):
        noise = (options if options is not None else self.Options()).noise
        if rule.sde is not None:
            raise ValueError(f"rule: {rule.sde}")
        if noise == "minibatch" and problem.n_examples == 0:
            raise ValueError("noise: minibatch noise needs data; this landscape has none (use noise: isotropic)")
        super().__init__(problem, rule, seed, batch_size, options)
        if self.options.noise == "isotropic" and batch_size is not None:
            raise ValueError("batch_size: does not apply with noise: isotropic (σ sets the noise)")
        if self.options.noise == "minibatch":
            if batch_size is None:
                raise ValueError("batch_size: the sde process with minibatch noise needs a batch_size")
            self._noise_variance = noise_variance(problem.n_examples, batch_size)
            self._second_moments = rule.second_moments(problem.w0)
            self._ema = exact_ema(rule, problem.w0)  # the isotropic SDE runs over the stable flow instead
        else:
            self._second_moments = frozenset()

    def advance(self, layout: Layout, y: Tensor, lr: float, substeps: int, step: int,
                force: Optional[Tensor] = None) -> Tensor:
        """One path (``force`` is not used: the SDE's drift has its own noise)."""
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

    def initial_state(self, traj: Trajectory, g: Tensor) -> State:
        """The rule's initial state from the gradient of the discrete run's batch at this step, as the discrete
        run starts (RMSProp's ν0 = g_B²: its spread over batches lasts ~1/(1 − β2) steps), not from g."""
        return self.rule.init(traj.w, self._discrete.context(traj).loss_and_grad()[1])

    def drift_and_noise(self, layout: Layout, lr: float):
        """(y, v) ↦ (drift, noise·v) for one path, v ∈ ℝⁿ: the discrete step's increment at the minibatch
        gradient g + ξ, its mean as the drift and its part linear in ξ as the noise.

        ξ = √(c/(Bn)) Gᵀ(v − v̄), G the n × P per-example gradients, is one unit's gradient noise (covariance
        cΣ/B for v ~ N(0, I)). The step from state s moves w by −η P̃(s)⁻¹ d(g, s⁺), d = ``direction`` taken with
        the advanced state s⁺ = advance_state(g, s) as the discrete step takes it (g for GD and RMSProp, the
        advanced m = β1 m + (1 − β1)g for momentum and Adam), and s by s⁺ − s. Noise: w gets −η P̃⁻¹ ∂_g d·ξ,
        the state ∂_g s⁺·ξ (m: (1 − β1)ξ) except for second moments (ν), which follow their mean only: the
        part of s⁺ quadratic in g adds E_ξ of itself to the drift (ν: (1 − β2)·c·diag(Σ)/B). A momentum's
        increment and noise take the factors of :func:`exact_ema`, and d takes it advanced by its lag fraction.
        One forward pass of the per-example losses and one vmapped backward (all n per-example gradients for a
        rule with a second moment)."""
        scale = math.sqrt(self._noise_variance / self.problem.n_examples)
        problem, rule, second_moments, ema = self.problem, self.rule, self._second_moments, self._ema

        def state_of_the_step(u: Tensor, state: State) -> State:
            """The state w's drift is taken at: the advanced one, each momentum advanced by its lag factor only."""
            advanced = rule.advance_state(u, state)
            return {key: state[key] + ema[key].lag * (value - state[key]) if key in ema else value
                    for key, value in advanced.items()}

        def drift_and_noise(y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            w, state = layout.unpack(y)
            if second_moments:
                G = problem.per_example_grads(w)
                g = G.mean(0)
                centred = G - g
                xi = scale * (centred.T @ v)  # centred's rows sum to 0: v̄ drops out
                bias = _noise_second_moment(rule, state, centred, self._noise_variance)
            else:
                losses, pullback = vjp(problem.per_example_losses, w)
                cotangents = torch.stack([torch.full_like(losses, 1.0 / losses.numel()), scale * (v - v.mean())])
                g, xi = vmap(pullback)(cotangents)[0]
                bias = {}
            d, d_noise = jvp(lambda u: rule.direction(u, state_of_the_step(u, state)), (g,), (xi,))
            advanced, s_noise = jvp(lambda u: rule.advance_state(u, state), (g,), (xi,)) if state else ({}, {})
            advanced = {key: value + bias.get(key, 0.0) for key, value in advanced.items()}  # E over ξ
            P = rule.precond(advanced)
            drift_s = {key: (advanced[key] - value) * (ema[key].rate if key in ema else 1.0)
                       for key, value in state.items()}
            noise_s = {key: torch.zeros_like(value) if key in second_moments else
                       value * (ema[key].noise if key in ema else 1.0) for key, value in s_noise.items()}
            decay = rule.decay(w)
            drift_w = -lr * (d if P is None else d / P)
            return (layout.pack(drift_w if decay is None else drift_w - lr * decay, drift_s),
                    layout.pack(-lr * (d_noise if P is None else d_noise / P), noise_s))

        return drift_and_noise


def noise_variance(n: int, batch_size: int) -> float:
    """c/B: the gradient noise of one batch of B distinct examples of n has covariance (c/B)·Σ, Σ the per-example
    gradients' covariance and c = (n − B)/(n − 1) the finite-population factor (0 for the full batch)."""
    B = min(batch_size, n)
    return (n - B) / max(n - 1, 1) / B


class EMAFactors(NamedTuple):
    """A momentum's factors over its first-order increment (``exact_ema``): ``rate`` on its drift, ``noise`` on its
    noise, ``lag`` on the advance of the state w's drift is taken at."""
    rate: Tensor
    noise: Tensor
    lag: Tensor


def exact_ema(rule: Rule, w: Tensor) -> dict[str, EMAFactors]:
    """For each momentum of ``rule`` (``Rule.momenta``: m ← βm + c·g, EMA or heavy ball), the factors that make the
    SDE's m and w equal the discrete run's at every step under a constant gradient and noise (docs/sde.md):
    rate κ = ln(1/β)/(1 − β) (m gathers as 1 − βᵏ, not 1 − e^{−(1−β)k}), noise √(2 ln(1/β)/(1 − β²)) (m's
    variance at rest is the discrete c²σ²/(1 − β²), not c²σ²/(2(1 − β))), and lag (1 − βκ)/(1 − β) (w then
    gathers Σⱼ mⱼ: w's drift takes m advanced by that fraction of its step, not all of it). β is the rule's pole
    ∂m⁺/∂m (``Rule.pole``); a momentum with β outside (0, 1) keeps the first-order SDE (factors 1)."""
    poles = rule.pole(w, rule.init(w, torch.ones_like(w)))
    factors = {}
    for key in rule.momenta(w):
        beta = poles[key].to(torch.float64)
        inside = (beta > 0) & (beta < 1)
        b = torch.where(inside, beta, torch.full_like(beta, 0.5))  # any β in (0, 1), replaced below
        log = -torch.log(b)
        rate = log / (1 - b)
        factors[key] = EMAFactors(*(torch.where(inside, f, torch.ones_like(f)).to(w.dtype) for f in (
            rate, torch.sqrt(2 * log / (1 - b * b)), (1 - b * rate) / (1 - b))))
    return factors


def _noise_second_moment(rule: Rule, state: State, centred: Tensor, variance: float) -> State:
    """E_ξ Q(ξ) for ξ of covariance variance·Σ, Σ = centredᵀcentred/n: variance/n · Σᵢ Q(centred_i)."""
    parts = vmap(lambda u: rule.quadratic_part(u, state))(centred)
    return {key: variance / centred.shape[0] * value.sum(0) for key, value in parts.items()}


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

