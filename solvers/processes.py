"""Processes: ways of running an update rule on a Problem, advanced one unit of time (one step) at a time.

A process holds a :class:`Trajectory` (w, rule state, step, time) and offers ``step(traj, lr, measure, ctx)`` —
advance from step k to k + 1 at step size ``lr`` (chosen by the run's step-size policy, ``solvers/step_size.py``),
returning what it measured at step k — and ``measure(traj)`` for the current point. ``context(traj)`` is the
:class:`~flowsim.solvers.step_size.StepContext` of the point, shared with the policy so that the step's gradient
is computed once.
Measurements are ``loss`` (full batch) and ``grad_norm`` (‖∇L‖₂, full batch); ``step_loss`` is whatever loss
the step itself evaluated (full or minibatch), used to detect divergence. A flow may begin with the discrete
rule's own steps (its option ``discrete_start``, :class:`DiscreteStart`) and start from the weights and state
they reach. Processes never know which network they run on, and never touch storage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from torch import Tensor
from torch.func import grad_and_value

from flowsim.models.problem import Problem
from flowsim.solvers.rules import Rule, State
from flowsim.solvers.step_size import StepContext


class Variable(NamedTuple):
    """A recorded variable: its dims beyond ``step``, its units and what it is (stored as the array's attrs)."""
    dims: tuple[str, ...]
    units: str
    long_name: str


RUN_VARIABLES: dict[str, Variable] = {
    "loss": Variable((), "loss", "training loss on the full batch, averaged over examples"),
    "grad_norm": Variable((), "loss/weight", "‖∇L(w)‖₂ on the full batch"),
    "step_size": Variable((), "1", "step size η used from this step to the next"),
    "time": Variable((), "gradient-flow time", "Σ η over the steps before this one"),
    "wall_time": Variable((), "s", "wall-clock seconds since the run started"),
}
"""What every run records (the loop: η, time and wall time at every step; loss and grad_norm at ``record.every``).
A process declares what it records beside them in its ``variables``, a probe in its own."""


@dataclass
class Trajectory:
    """The simulated point: weights w, rule state, the step index k and time t = Σ_{j<k} η_j."""
    w: Tensor
    state: Optional[State] = None
    step: int = 0
    time: float = 0.0

    def tick(self, lr: float) -> None:
        """The bookkeeping of one step taken at step size lr: k += 1, t += η."""
        self.step += 1
        self.time += lr


def step_seed(seed: int, index: int) -> int:
    """The seed of the random stream of step (or epoch) ``index`` of a run with ``seed``: a function of these
    only, so every draw is stateless and a resumed run draws exactly what the uninterrupted one did."""
    return seed * 1_000_003 + index


class EpochSampler:
    """Minibatches without replacement within an epoch, stateless in the step index.

    Epoch e uses the permutation of a generator seeded with (seed, e); batch k is slice k mod m of it, where
    m = ⌈n/B⌉ (the last batch of an epoch is smaller when B does not divide n). Resuming at any step is exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.per_epoch = -(-n // batch_size)
        self._epoch, self._perm = None, None

    def indices(self, step: int) -> Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(step_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).to(self.device)
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


class IIDSampler:
    """Each step an independent, uniformly random B-subset of the n examples (the minibatch noise that SGD's
    SDE models), drawn from a generator seeded with (seed, step): stateless, so resuming at any step is exact."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device

    def indices(self, step: int) -> Tensor:
        return self.draws(step, 1)[0]

    def draws(self, step: int, count: int) -> list[Tensor]:
        """``count`` independent batches of step ``step`` (the first is :meth:`indices`)."""
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        return [torch.randperm(self.n, generator=gen)[:self.batch_size].to(self.device) for _ in range(count)]


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DiscreteStart(NoOptions):
    """The flows' option ``discrete_start`` (stable, modified, central flows and the SDE)."""
    discrete_start: Optional[NonNegativeInt] = Field(
        None, description="steps the discrete rule takes itself before the flow starts from the weights and state "
                          "they reach (0: the flow starts at w0); absent: the rule's own start, ⌈1/(1 − β1)⌉ for "
                          "Adam (its bias-corrected first steps), 0 for the other rules")


def discrete_start(options: BaseModel, rule: Rule) -> Optional[int]:
    """The steps a flow with process ``options`` over ``rule`` takes as the discrete rule before it starts: the
    option :class:`DiscreteStart` where given, else the rule's :meth:`~flowsim.solvers.rules.Rule.flow_start`;
    None for a process without the option (the discrete run)."""
    if "discrete_start" not in type(options).model_fields:
        return None
    return rule.flow_start() if options.discrete_start is None else options.discrete_start


class DiscreteOptions(NoOptions):
    sampling: Literal["epoch", "iid"] = Field(
        "epoch", description="epoch: reshuffled each epoch; iid: an independent random batch every step")
    svag: PositiveInt = Field(
        1, description="SVAG with l: each step is l steps at η/l (η/l² for heavy ball) with 1 − β / l, each on two "
                       "independent batches weighted (1 ± √(2l − 1))/2 (the noise ×√l; ν sees one plain batch); the "
                       "run tends to the SDE as l grows, on its clock; 1: the plain run")


def svag_update(problem: Problem, rule: Rule, factor: float, w: Tensor, state: Optional[State], lr,
                batches: Tensor) -> tuple[Tensor, Tensor, State]:
    """One step at η of SVAG with l = len(batches)/2 (Li, Malladi & Arora): l steps of ``rule`` (the run's rule
    scaled for SVAG, :meth:`~flowsim.solvers.rules.Rule.svag`) at η·``factor``. Step j takes the gradient
    g_s = a·g(batches[2j]) + (1 − a)·g(batches[2j + 1]) of two independent batches, a = (1 + √(2l − 1))/2: its
    mean is g and its noise covariance l times a batch's. The state's part linear in the gradient (m) takes g_s,
    its part quadratic in it (ν) the first batch's plain gradient, so that ν follows g² + cΣ/B as in the SDE
    (docs/sde.md). Returns (the first batch's loss, w, state); a pure function of its tensors, so it vmaps over
    runs."""
    l = batches.shape[0] // 2
    a = (1.0 + math.sqrt(2 * l - 1)) / 2
    value_grad = grad_and_value(problem.loss)
    first_loss = None
    for j in range(l):
        g1, loss = value_grad(w, batches[2 * j])
        g2, _ = value_grad(w, batches[2 * j + 1])
        g = a * g1 + (1.0 - a) * g2
        first_loss = loss if first_loss is None else first_loss
        if state is None:
            state = rule.init(w, g1)
        # s⁺ = the odd part of advance_state at g_s + its even part at g1 (m: βm + (1 − β)g_s; ν: β2ν + (1 − β2)g1²)
        odd, even = rule.advance_parts(g, state)[1], rule.advance_parts(g1, state)[0]
        state = {key: odd[key] + even[key] for key in odd}
        w = w + rule.step_from(g, state, lr * factor, w)
    return first_loss, w, state


class Process:
    """Base process. ``Options`` is the pydantic model of the process's own scenario keys (beside the run's)."""
    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    full_batch: ClassVar[bool] = True  # False where the process runs on minibatches (``batch_size`` applies)
    # what its step records beside RUN_VARIABLES, and the sizes of those variables' extra dims
    variables: ClassVar[dict[str, Variable]] = {}
    dims: ClassVar[dict[str, int]] = {}
    # True for the rule's own iterates (the reference the flows approximate, drawing real minibatches where a
    # batch size is set), which is also what a vmapped pass of several runs steps (``solvers/batched.py``)
    iterates: ClassVar[bool] = False

    def __init__(self, problem: Problem, rule: Rule, seed: int = 0, batch_size: Optional[int] = None,
                 options: Optional[BaseModel] = None):
        if batch_size is not None and self.full_batch:
            raise ValueError(f"batch_size: does not apply to the {self.name} process (it runs on the full batch)")
        if batch_size is not None and problem.n_examples == 0:
            raise ValueError("batch_size: this problem has no data to batch (a landscape)")
        if batch_size is not None and batch_size > problem.n_examples:
            raise ValueError(f"batch_size: {batch_size} is larger than the data ({problem.n_examples} examples)")
        self.problem, self.rule, self.seed = problem, rule, seed
        self.batch_size = batch_size
        self.options = options if options is not None else self.Options()

    def start(self, w0: Tensor) -> Trajectory:
        return Trajectory(w=w0.clone())

    @property
    def discrete_start(self) -> int:
        """Steps 0 … discrete_start − 1 are the discrete rule's own (:func:`discrete_start`; 0 for a process
        without the option)."""
        return discrete_start(self.options, self.rule) or 0

    def context(self, traj: Trajectory) -> StepContext:
        """The step context at traj (full batch; the preconditioner of the rule state at traj)."""
        return StepContext(self.problem, self.rule, traj.step, traj.w, traj.state,
                           precond_state=self.precond_state(traj))

    def precond_state(self, traj: Trajectory):
        """None (the discrete convention: the state advanced by the step's gradient), or a function g ↦ the state
        that the process's preconditioner at traj is made of."""
        return None

    def step(self, traj: Trajectory, lr: float, measure: bool, ctx: Optional[StepContext] = None) -> dict:
        raise NotImplementedError

    def measure(self, traj: Trajectory) -> dict:
        loss, g = self.problem.loss_and_grad(traj.w)
        return {"loss": loss.item(), "grad_norm": g.norm().item()}

    def checkpoint_state(self) -> dict:
        """What an exact resume needs beyond the Trajectory (generator states, warm starts): tensors and plain
        values in a dict. The base process keeps nothing between steps."""
        return {}

    def restore(self, state: dict) -> None:
        """Set a freshly built process to a :meth:`checkpoint_state` taken earlier."""


class Discrete(Process):
    """The real iteration: full batch (``batch_size`` None) or minibatch SGD-style sampling."""
    name: ClassVar[str] = "discrete"
    Options: ClassVar[type[BaseModel]] = DiscreteOptions
    full_batch: ClassVar[bool] = False
    iterates: ClassVar[bool] = True

    def __init__(self, problem, rule, seed=0, batch_size=None, options=None):
        super().__init__(problem, rule, seed, batch_size, options)
        full = batch_size is None or batch_size == problem.n_examples
        if batch_size is None and "sampling" in self.options.model_fields_set:
            raise ValueError("sampling: applies only to minibatch runs (give a batch_size)")
        svag = self.options.svag
        if svag > 1 and full:
            raise ValueError("svag: amplifies the minibatch noise; give a batch_size below the number of examples")
        if svag > 1 and self.options.sampling == "epoch" and "sampling" in self.options.model_fields_set:
            raise ValueError("sampling: svag draws two independent batches per step (iid); epoch does not apply")
        sampler = IIDSampler if self.options.sampling == "iid" or svag > 1 else EpochSampler
        self.sampler = None if full else sampler(problem.n_examples, batch_size, seed, problem.device)
        self._svag = rule.svag(svag) if svag > 1 else None

    def context(self, traj: Trajectory) -> StepContext:
        if self.sampler is None:
            return StepContext(self.problem, self.rule, traj.step, traj.w, traj.state)
        return StepContext(self.problem, self.rule, traj.step, traj.w, traj.state, idx=self.sampler.indices(traj.step))

    def step(self, traj: Trajectory, lr: float, measure: bool, ctx: Optional[StepContext] = None) -> dict:
        if self._svag is not None:
            return self._svag_step(traj, lr, measure)
        ctx = self.context(traj) if ctx is None else ctx
        loss, g = ctx.loss_and_grad()
        out = {"step_loss": loss.item(), "step_size": lr}
        if measure:
            out.update({"loss": out["step_loss"], "grad_norm": g.norm().item()} if self.sampler is None
                       else self.measure(traj))
        self.apply(traj, g, lr)
        return out

    def _svag_step(self, traj: Trajectory, lr: float, measure: bool) -> dict:
        out = {"step_size": lr, **(self.measure(traj) if measure else {})}
        batches = torch.stack(self.sampler.draws(traj.step, 2 * self.options.svag))
        loss, traj.w, traj.state = svag_update(self.problem, *self._svag, traj.w, traj.state, lr, batches)
        out["step_loss"] = loss.item()
        traj.tick(lr)
        return out

    def apply(self, traj: Trajectory, g: Tensor, lr: float) -> None:
        """One update of the rule with gradient g at step size lr: w, rule state, step and time advance."""
        if traj.state is None:
            traj.state = self.rule.init(traj.w, g)
        delta, traj.state = self.rule.update(g, traj.state, lr, traj.w)
        traj.w = traj.w + delta
        traj.tick(lr)

