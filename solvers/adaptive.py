"""The ``adaptive`` process: the discrete iteration of any rule with its step size set from tracked curvature.

Why a process and not a rule: a rule is a pair of pure functions of the gradient and its state (rules.py), while
setting η needs Hessian-vector products of the Problem at the current weights — something only a process sees.
So ``process: adaptive, rule: R`` runs rule R exactly as ``discrete`` does (full batch or minibatch), but takes
η_k from the controller below (its state is ``Adaptive.ctl``) instead of a fixed schedule.

The controller (units: η in the rule's lr units, S in 1/lr):
- every ``every`` steps (right after the step that reaches w_k, k a multiple of ``every``) it re-estimates
  S_k = λ_max(P̃_k⁻¹H) at w_k (λ_max(H) for GD) with the warm-started Lanczos of
  ``flowsim.curvature.top_eigenpairs`` on the full batch (or the first ``curvature_examples``), and sets
  η_k = min(lr, s·c·θ/S_k), θ = ``Rule.threshold_coefficient()`` (2 for GD, 38 for Adam with β1 = 0.9), so
  that η·S = s·c·θ: c = 1 sits at the edge of stability, c < 1 below it, c > 1 above it (c in (0, 2)).
  P̃_k is the preconditioner of the step from w_k itself: its rule state advanced by that step's gradient,
  which the re-estimating step computes ahead and hands on (no extra gradient). The state before that gradient
  lags one step, which matters where the state changes fastest: after one step Adam's ν is one squared
  gradient (on the bench's transformer, S_P with it is 47× S_P with the ν of the second step);
- ``curvature_batch``: H on the batch of the step from w_k instead, at w_k, from the graph of the gradient
  that step needs anyway (``flowsim.curvature.LossGraph``): no extra forward or backward pass, only the
  products (in full batch, the full Hessian). ``max_products`` caps the products per re-estimate after the
  first; the warm start carries the convergence from one estimate to the next;
- ``hvp``: how the products are made (``flowsim.curvature.hessian_operator``). ``difference`` takes them as
  forward differences of gradients (ε ≈ √machine-ε relative): no gradient graph, and one plain gradient per
  product, cheaper than a double backward on the bench's CNN and transformer (2.2 ms against 3.3 ms, 9.0
  against 16.7 ms per product on 100 examples).
  Where the loss is smooth it is the Hessian to ≈ 3e-4 in float32 (the bench transformer's S_P within 0.5 %).
  On a ReLU/max-pool network it is not: a perturbation of size ε flips O(ε) units, each changing the gradient
  by O(1), so the quotient also counts the curvature of the kinks that the exact Hessian (the second
  derivative within one linear piece) leaves out — on the bench CNN along fixed-η Adam, S_P 1.2–2.4× the
  exact value. It is the curvature a step of finite size meets there;
- ``early``: also re-estimate after the steps that reach w_1, w_2, w_4, … below ``every``: an adaptive rule's
  preconditioner (Adam's ν from a handful of gradients) and the curvature change fastest in the first steps;
- ``c_start`` (default c) replaces c at the first estimate, made in step 0: c_start > 1 starts above the edge, so that
  GD catapults out of its sharp initial region (the fixed-η runs that win on small networks do exactly this);
- ``first_step: line``: step 0 instead takes η* = −g·d/(dᵀHd), the minimizer of the quadratic model of the loss
  along the rule's first update d (at η = 1), H as for S; one more product (where dᵀHd ≤ 0 it falls back to the
  edge rule). For Adam the first update is sign descent (m̂/√v̂ = g/|g|), whose step the sharpness of a
  one-gradient preconditioner says little about: on the bench's tasks η* at w_0 is 0.4–2.2× the best fixed η of
  Adam, while c_start·θ/S_0 (c_start 3.9) is 7–47× below it on the transformer and the CNN. With it the bench's
  headline needs 36, 95 and 75 steps (MLP, CNN, transformer) on seeds 0–2 instead of 37, 85 and 82, and reaches
  every target on seeds 3–5 too;
- ``ratchet``: η never decreases at a regular re-estimate (η_k = max(η_{k−1}, c·θ/S_k)): GD's own
  self-stabilization keeps S ≈ θ/η instead of η following a sharpening S down; with c > 1, η grows by up
  to c per estimate while the run stays stable, until the guard fires (a search for the largest stable η);
- the divergence guard: when a step's loss exceeds ``guard`` × the smallest step loss since the last
  re-estimate, the step about to be taken is shrunk: s ← ``shrink``·s (ratchet: η ← shrink·min(η, c·θ/S_k)),
  with S re-estimated at once; each later regular re-estimate lets s recover by ``recover`` up to 1;
- injected noise (optional): ``noise`` σ > 0 adds η_k·σ·ξ_k to every update at the steps k < ``noise_until``
  (absent = all); ξ_k ~ N(0, I) is drawn on the CPU from its own stream of (seed, k), independent of the
  minibatch draws, so runs reproduce and resume exactly. σ is in gradient units, like SGD's minibatch noise
  η(g_B − g), so the noise follows η_k: it shrinks when the controller lowers η for a sharpening S. On a
  quadratic the stationary variance along λ is η σ²/(λ(2 − ηλ)). A noisy loss trips the guard more often:
  raise ``guard`` with the noise;
- ``decay_on_rise`` δ: at a re-estimate after step ``every``, when the mean step loss since the previous
  re-estimate is above that of the interval before, c ← δ·c for the rest of the run (1 = off). A run whose loss
  creeps up (a ReLU network losing units to too large steps) or stalls on its minibatch noise floor takes
  smaller steps from then on; the guard only sees spikes within one interval;
- ``coherence`` (minibatch): c is scaled by the gradient coherence ρ = ‖∇L‖²/E‖g_B‖² = 1/(1 + B_simple/B),
  B_simple = tr Σ/‖∇L‖² the simple noise scale of McCandlish et al. (2018), whose best step at batch B is this
  fraction of the noiseless one (on the bench's transformer ρ = 0.7–0.9 over the first 100 steps, and the steps to
  its target fall from 111 to 75 with ``first_step: line``, from 89 to 82 with c_start). At each re-estimate
  after the first, one extra gradient on the first half of the next step's batch gives the mean gradients of
  both halves (the other by difference), from which ‖∇L‖² is estimated without bias
  (``flowsim.curvature.gradient_signal``); ρ is the ratio of running sums (memory ``COHERENCE_MEMORY`` per
  re-estimate) of that estimate and of ‖g_B‖², clipped to [``MIN_COHERENCE``, 1]. In full batch ρ = 1 and
  nothing is computed;
- ``flow``: the central flow chooses c. At the first estimate (and at the re-estimates of every ``flow.every``
  steps) the central flow of the rule (solvers/central.py; gd, scalar_rmsprop, rmsprop, full batch) is run
  ``flow.horizon`` steps from w_k at η = min(lr, c·θ/S_k) for each of ``flow.candidates``, and the c whose
  forecast time-averaged loss L + ½⟨H, Σ⟩ at the end is lowest — the largest predicted decrease per step — is
  used until the next choice (recorded as ``target_c``; a choice replaces a c lowered by ``decay_on_rise``). A
  candidate above the edge is forecast with its Σ (the oscillation's loss cost and its sharpness reduction), or
  dropped where no Σ exists (a quadratic); a catapult, which leaves the flow's domain, cannot be forecast, so
  ``c_start`` does not combine with ``flow``. The forecasts run inside the step, so their cost is in the wall time;
- growth: after the first estimate η grows by at most ``growth`` per re-estimate, so a collapsing or non-positive
  S estimate (noisy curvature, e.g. a preconditioner from a few large gradients) cannot throw η to ``lr``.
``lr`` is the largest step size the controller may choose. ``step_size`` records η_k as used (after the guard;
a curvature probe's ``threshold`` at that step still uses the η from before it);
the curvature estimates run inside ``step``, so their cost is in the recorded wall time. The controller's state
(η, s, S, c, the reference loss and the warm-start vectors) is the process's checkpoint state: resume is exact.
"""
from __future__ import annotations

import math
from typing import Annotated, Callable, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator
import torch
from torch import Tensor

from flowsim.curvature import (HVP_METHODS, LossGraph, gradient_signal, hessian_operator, preconditioned,
                               top_eigenpairs)
from flowsim.solvers.central import Central, CentralOptions
from flowsim.solvers.processes import Discrete, DiscreteOptions, Schedule, Trajectory, step_seed
from flowsim.solvers.rules import State


class FlowChoice(BaseModel):
    """``flow``: the central flow chooses c (module docstring)."""
    model_config = ConfigDict(extra="forbid")
    candidates: list[Annotated[float, Field(gt=0, lt=2)]] = Field(
        [0.5, 0.75, 1.0, 1.25], min_length=1, description="the c values compared (each in (0, 2))")
    horizon: PositiveInt = Field(10, description="steps of the flow over which their predicted losses are compared")
    every: Optional[PositiveInt] = Field(None, description="choose again at the re-estimate of every this many "
                                         "steps (absent = only at the first estimate)")
    substeps: PositiveInt = Field(2, description="Euler substeps per step of the forecasting flow")


class AdaptiveOptions(DiscreteOptions):
    c: float = Field(1.0, gt=0, lt=2, description="target η·S as a fraction of the rule's threshold θ (2 for GD)")
    c_start: Optional[float] = Field(None, gt=0, lt=4, description="c at the first estimate (absent = c)")
    first_step: Literal["edge", "line"] = Field("edge", description="η of step 0: c_start·θ/S_0 (edge), or the "
                                                "minimizer of the quadratic model along the rule's first update (line)")
    every: PositiveInt = Field(10, description="re-estimate the sharpness every this many steps")
    early: bool = Field(False, description="also re-estimate at steps 1, 2, 4, … below ``every`` (the rule state "
                        "and the curvature change fastest in the first steps)")
    ratchet: bool = Field(False, description="η never decreases at a regular re-estimate (only the guard lowers it)")
    guard: float = Field(2.0, gt=1, description="a step loss above this × the smallest since the last estimate "
                         "shrinks the step")
    shrink: float = Field(0.5, gt=0, lt=1, description="factor applied to the step size by the guard")
    recover: float = Field(1.25, ge=1, description="factor by which a shrunk step recovers at each re-estimate (≤ 1×)")
    decay_on_rise: float = Field(1.0, gt=0, le=1, description="c is multiplied by this at a re-estimate after "
                                 "step ``every`` whose interval's mean step loss rose above the one before (1 = off)")
    growth: float = Field(2.0, gt=1, description="η grows by at most this factor per re-estimate (an S estimate "
                          "that collapses, or is ≤ 0, cannot throw η to lr)")
    noise: float = Field(0.0, ge=0, description="σ of the injected noise η·σ·ξ per step (gradient units; 0 = none)")
    noise_until: Optional[PositiveInt] = Field(None, description="inject noise only before this step (absent = always)")
    tol: PositiveFloat = Field(1e-3, description="eigensolver tolerance: relative eigenvalue error "
                               "(``top_eigenpairs`` values_only)")
    curvature_examples: Optional[PositiveInt] = Field(None, description="estimate S on the first this many "
                                                      "examples (absent = all)")
    curvature_batch: bool = Field(False, description="estimate S on the step's own batch, from its gradient's "
                                  "graph (no extra forward/backward pass)")
    max_products: Optional[PositiveInt] = Field(None, description="at most this many Hessian-vector products "
                                                "per re-estimate after the first (absent = until tol)")
    flow: Optional[FlowChoice] = Field(None, description="choose c by the central flow's forecast (absent = c)")
    coherence: bool = Field(False, description="scale c by the gradient coherence ‖∇L‖²/E‖g_B‖² (minibatch; "
                            "one extra half-batch gradient per re-estimate)")
    hvp: Literal[HVP_METHODS] = Field(
        "reverse", description="Hessian-vector products: exact (reverse: double backward; forward: jvp of grad) "
        "or the forward difference of gradients (cheaper, relative error ≈ √machine epsilon)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.curvature_batch and self.curvature_examples is not None:
            raise ValueError("curvature_examples: does not apply with curvature_batch (S is on the step's batch)")
        if self.first_step == "line" and self.c_start is not None:
            raise ValueError("c_start: does not apply with first_step: line (step 0 takes the line minimizer)")
        if self.flow is not None and self.c_start is not None:
            raise ValueError("c_start: does not apply with flow (the flow chooses c from the first estimate on)")
        if self.flow is not None and self.flow.every is not None and self.flow.every % self.every:
            raise ValueError(f"flow.every: must be a multiple of every ({self.every}): c is chosen at a re-estimate")
        return self


INITIAL_CONTROL = {"eta": math.nan, "scale": 1.0, "S": math.nan, "ref": math.inf, "vecs": None,
                   "loss_sum": 0.0, "loss_n": 0, "last_mean": math.inf,
                   "signal_sq": 0.0, "batch_sq": 0.0}
"""The controller's state before the first step: η, the guard's scale s, S, the guard's reference loss, the warm
start, the step losses of the current and previous intervals between re-estimates (``decay_on_rise``), and the
running sums of the ‖∇L‖² estimates and of ‖g_B‖² (``coherence``)."""
COHERENCE_MEMORY = 0.8
"""Weight of the past in the running sums of ``coherence``: its estimates average over ≈ 5 re-estimates (one
half-batch pair alone is too noisy where ρ is small)."""
MIN_COHERENCE = 0.05
"""Floor of the coherence factor: the unbiased ‖∇L‖² estimate can come out ≤ 0 where ρ is small."""


class Adaptive(Discrete):
    """Discrete iteration with η_k = min(lr, s·c·θ/S_k) from warm-started curvature tracking (module docstring)."""
    name: ClassVar[str] = "adaptive"
    Options: ClassVar[type[BaseModel]] = AdaptiveOptions

    def __init__(self, problem, rule, schedule, seed=0, batch_size=None, options=None):
        super().__init__(problem, rule, schedule, seed, batch_size, options)
        if schedule.drop_at is not None:
            raise ValueError("schedule: the adaptive process sets η itself; a step-size drop does not apply")
        self.lr_max = schedule.lr
        n = problem.n_examples
        m = self.options.curvature_examples
        self.curvature_idx = None if m is None or m >= n else torch.arange(m, device=problem.device)
        self.schedule = self.step_size
        self.ctl = {**INITIAL_CONTROL, "c": self.options.c}
        self.forecaster = None
        self._ahead = None  # (w, loss, g, v ↦ Hv) of the next step, computed by a step that re-estimated
        if self.options.flow is not None:
            try:
                self.forecaster = Central(problem, rule, Schedule(self.lr_max), seed, batch_size,
                                          CentralOptions(substeps=self.options.flow.substeps, shadow=False))
            except ValueError as e:
                raise ValueError(f"flow: {e}") from None

    def step_size(self, step: int) -> float:
        """η for the step about to be taken (the process's schedule: the curvature probe reads it); NaN before
        the first step, which makes the first estimate."""
        return self.ctl["eta"]

    def _prior_state(self, traj: Trajectory, g: Tensor) -> State:
        """The rule state the step from traj starts from (before the first step: the rule's initial state)."""
        return traj.state if traj.state is not None else self.rule.init(traj.w, g)

    def _state(self, traj: Trajectory, g: Tensor) -> State:
        """The rule state that the step from traj with gradient g makes its preconditioner of."""
        return self.rule.advance_state(g, self._prior_state(traj, g))

    def sharpness(self, traj: Trajectory, g: Tensor, hessian: Optional[Callable], first: bool) -> float:
        """S = λ_max(P̃⁻¹H) at traj.w: H = ``hessian`` (v ↦ Hv, ``curvature_batch``: on the batch of the step from
        traj.w) or else on the curvature examples; P̃ of the step from traj.w with gradient g."""
        w = traj.w
        H = self._hessian(traj, hessian)
        P = self.rule.precond(self._state(traj, g))
        res = top_eigenpairs(H if P is None else preconditioned(H, P), w.numel(), 1, v0=self.ctl["vecs"],
                             tol=self.options.tol, max_iter=None if first else self.options.max_products,
                             dtype=w.dtype, device=w.device, values_only=True)
        self.ctl["vecs"] = res.vecs
        return res.vals[0].item()

    def _hessian(self, traj: Trajectory, hessian: Optional[Callable]) -> Callable:
        """v ↦ Hv at traj.w: ``hessian`` (the step's batch, ``curvature_batch``) or on the curvature examples."""
        return hessian or hessian_operator(self.problem, traj.w, self.curvature_idx, self.options.hvp)

    def line_step(self, traj: Trajectory, g: Tensor, hessian: Optional[Callable]) -> float:
        """η* = −g·d/(dᵀHd), d the update of the rule's step from traj at η = 1: the minimizer of the quadratic
        model of the loss along that update (inf where the model is not convex along d)."""
        d = self.rule.update(g, self._prior_state(traj, g), 1.0)[0]
        curvature = (d * self._hessian(traj, hessian)(d)).sum().item()
        return -(g * d).sum().item() / curvature if curvature > 0 else math.inf

    def _choose_c(self, traj: Trajectory, g: Tensor, S: float) -> float:
        """The candidate c whose central flow, run ``flow.horizon`` steps from traj at η = min(lr, c·θ/S),
        forecasts the lowest loss (the largest decrease per step); the current c when no forecast is finite."""
        f, theta, state = self.options.flow, self.rule.threshold_coefficient(), self._state(traj, g)
        forecast = {c: self.forecaster.forecast(traj.w, state, min(self.lr_max, c * theta / S) if S > 0
                                                else self.lr_max, f.horizon) for c in f.candidates}
        finite = {c: v for c, v in forecast.items() if math.isfinite(v)}
        return min(finite, key=finite.get) if finite else self.ctl["c"]

    def _estimate(self, traj: Trajectory, g: Tensor, hessian: Optional[Callable], first: bool = False,
                  spike: bool = False, choose: bool = False) -> None:
        o, ctl = self.options, self.ctl
        S = ctl["S"] = self.sharpness(traj, g, hessian, first)
        if not spike and ctl["loss_n"]:
            mean = ctl["loss_sum"] / ctl["loss_n"]
            if mean > ctl["last_mean"] and traj.step > o.every:
                ctl["c"] *= o.decay_on_rise
            ctl["last_mean"], ctl["loss_sum"], ctl["loss_n"] = mean, 0.0, 0
        if choose:
            ctl["c"] = self._choose_c(traj, g, S)
        c = o.c_start if first and o.c_start is not None else ctl["c"] * self.coherence()
        target = c * self.rule.threshold_coefficient() / S if S > 0 else math.inf
        if spike:
            ctl["ref"] = math.inf
            if o.ratchet:
                ctl["eta"] = o.shrink * min(ctl["eta"], target)
                return
            ctl["scale"] *= o.shrink
        elif not first:
            ctl["scale"] = min(1.0, ctl["scale"] * o.recover)
        eta = ctl["scale"] * target
        if first and o.first_step == "line":
            line = self.line_step(traj, g, hessian)
            eta = line if math.isfinite(line) else eta
        if not first:
            eta = min(eta, o.growth * ctl["eta"])
            if o.ratchet:
                eta = max(ctl["eta"], eta)
        ctl["eta"] = min(self.lr_max, eta)
        ctl["ref"] = math.inf

    def coherence(self) -> float:
        """ρ, the factor of c (``coherence``; 1 without it, in full batch and before its first estimate)."""
        if self.ctl["batch_sq"] <= 0:
            return 1.0
        return min(1.0, max(MIN_COHERENCE, self.ctl["signal_sq"] / self.ctl["batch_sq"]))

    def _track_coherence(self, traj: Trajectory, g: Tensor) -> None:
        """Add the step from traj's ‖∇L‖² estimate and ‖g_B‖² (g: its batch gradient) to the running sums."""
        idx = self._batch(traj.step)
        n1 = idx.numel() // 2
        g1 = self.problem.loss_and_grad(traj.w, idx[:n1])[1]
        g2 = (idx.numel() * g - n1 * g1) / (idx.numel() - n1)
        population = self.problem.n_examples if self.options.sampling == "epoch" else math.inf
        signal = gradient_signal(g1, g2, n1, idx.numel() - n1, population)
        self.ctl["signal_sq"] = COHERENCE_MEMORY * self.ctl["signal_sq"] + signal
        self.ctl["batch_sq"] = COHERENCE_MEMORY * self.ctl["batch_sq"] + g.pow(2).sum().item()

    def _loss_and_grad(self, w: Tensor, idx: Optional[Tensor], with_hessian: bool):
        """(loss, g, v ↦ Hv or None) of the step's batch; the product only with ``curvature_batch``, and then
        from the same graph as g (``hvp: reverse``) or from differences of g (``hvp: difference``)."""
        hvp = self.options.hvp if with_hessian and self.options.curvature_batch else None
        if hvp == "reverse":
            graph = LossGraph(self.problem, w, idx)
            return graph.loss.detach(), graph.grad(), graph.hvp
        loss, g = self.problem.loss_and_grad(w, idx)
        return loss, g, None if hvp is None else hessian_operator(self.problem, w, idx, hvp, grad=g)

    def _batch(self, step: int) -> Optional[Tensor]:
        return None if self.sampler is None else self.sampler.indices(step)

    def _step_gradient(self, traj: Trajectory, with_hessian: bool):
        """(loss, g, v ↦ Hv or None) of the step from traj on its batch: computed ahead by the step before (for
        its re-estimate) when that step reached these weights, else now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] is traj.w:
            return ahead[1:]
        return self._loss_and_grad(traj.w, self._batch(traj.step), with_hessian)

    def step(self, traj, measure):
        k, o = traj.step, self.options
        first = math.isnan(self.ctl["eta"])
        loss, g, hessian = self._step_gradient(traj, first)
        if first:  # inside the step, so that its cost is timed
            self._estimate(traj, g, hessian, first=True, choose=o.flow is not None)
        step_loss = loss.item()
        if step_loss > o.guard * self.ctl["ref"]:
            if hessian is None and o.curvature_batch:
                _, _, hessian = self._loss_and_grad(traj.w, self._batch(k), True)
            self._estimate(traj, g, hessian, spike=True)
        self.ctl["ref"] = min(self.ctl["ref"], step_loss)
        self.ctl["loss_sum"] += step_loss
        self.ctl["loss_n"] += 1
        lr = self.ctl["eta"]
        out = {"step_loss": step_loss, "step_size": lr}
        if measure:
            out.update({"loss": step_loss, "grad_norm": g.norm().item()} if self.sampler is None
                       else self.measure(traj))
            out["target_c"] = self.ctl["c"] * self.coherence()
        self.apply(traj, g, lr)
        if o.noise > 0 and (o.noise_until is None or k < o.noise_until):
            gen = torch.Generator().manual_seed(step_seed(self.seed, k, noise=True))
            xi = torch.randn(traj.w.shape, generator=gen, dtype=torch.float64)
            traj.w = traj.w + (lr * o.noise) * xi.to(dtype=traj.w.dtype, device=traj.w.device)
        reached = k + 1
        if reached % o.every == 0 or (o.early and reached < o.every and reached & (reached - 1) == 0):
            # the next step's gradient, now: its rule state is the preconditioner that step will use
            self._ahead = (traj.w, *self._step_gradient(traj, True))
            if o.coherence and self.sampler is not None:
                self._track_coherence(traj, self._ahead[2])
            choose = o.flow is not None and o.flow.every is not None and reached % o.flow.every == 0
            self._estimate(traj, *self._ahead[2:], choose=choose)
        return out

    def checkpoint_state(self) -> dict:
        return {k: v for k, v in self.ctl.items() if v is not None}

    def restore(self, state: dict) -> None:
        self.ctl = {**INITIAL_CONTROL, "c": self.options.c, **state}
        self._ahead = None
