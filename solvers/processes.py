"""Processes: ways of running an update rule on a Problem, advanced one unit of time (one step) at a time.

A process holds a :class:`Trajectory` (w, rule state, step, time) and offers ``step(traj, measure)`` — advance
from step k to k + 1, returning what it measured at step k — and ``measure(traj)`` for the current point.
Measurements are ``loss`` (full batch) and ``grad_norm`` (‖∇L‖₂, full batch); ``step_loss`` is whatever loss
the step itself evaluated (full or minibatch), used to detect divergence. Processes never know which network
they run on, and never touch storage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from flowsim.problem import Problem
from flowsim.solvers.rules import Rule, State


@dataclass
class Trajectory:
    """The simulated point: weights w, rule state, the step index k and time t = Σ_{j<k} η_j."""
    w: Tensor
    state: Optional[State] = None
    step: int = 0
    time: float = 0.0


class Schedule:
    """Step size η_k: ``lr`` until ``drop_at`` (a step index), ``lr_after`` from then on."""

    def __init__(self, lr: float, drop_at: Optional[int] = None, lr_after: Optional[float] = None):
        self.lr, self.drop_at, self.lr_after = lr, drop_at, lr_after

    def __call__(self, step: int) -> float:
        if self.drop_at is not None and step >= self.drop_at:
            return self.lr_after
        return self.lr


def step_seed(seed: int, index: int, noise: bool = False) -> int:
    """The seed of the random stream of step (or epoch) ``index`` of a run with ``seed``: a function of these
    only, so every draw is stateless and a resumed run draws exactly what the uninterrupted one did.

    ``noise`` selects the stream of injected noise, independent of the minibatch (and Brownian) stream of the
    same step: its seeds have bit 31 flipped, so the two never meet while seed·1_000_003 + index < 2³¹ (seeds
    below 2000 over a million steps; torch's CPU generator keeps only the low 32 bits of a seed)."""
    base = seed * 1_000_003 + index
    return base ^ 0x9E3779B9 if noise else base


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
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        return torch.randperm(self.n, generator=gen)[:self.batch_size].to(self.device)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DiscreteOptions(NoOptions):
    sampling: Literal["epoch", "iid"] = Field(
        "epoch", description="epoch: reshuffled each epoch; iid: an independent random batch every step")


class Process:
    """Base process. ``Options`` is the pydantic model of the process's own scenario keys (beside the run's)."""
    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, problem: Problem, rule: Rule, schedule: Schedule, seed: int = 0,
                 batch_size: Optional[int] = None, options: Optional[BaseModel] = None):
        self.problem, self.rule, self.schedule, self.seed = problem, rule, schedule, seed
        self.batch_size = batch_size
        self.options = options if options is not None else self.Options()

    def start(self, w0: Tensor) -> Trajectory:
        return Trajectory(w=w0.clone())

    def step(self, traj: Trajectory, measure: bool) -> dict:
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

    def __init__(self, problem, rule, schedule, seed=0, batch_size=None, options=None):
        super().__init__(problem, rule, schedule, seed, batch_size, options)
        full = batch_size is None or batch_size >= problem.n_examples
        sampler = IIDSampler if self.options.sampling == "iid" else EpochSampler
        self.sampler = None if full else sampler(problem.n_examples, batch_size, seed, problem.device)

    def step(self, traj: Trajectory, measure: bool) -> dict:
        lr = self.schedule(traj.step)
        if self.sampler is None:
            loss, g = self.problem.loss_and_grad(traj.w)
            out = {"step_loss": loss.item(), "step_size": lr}
            if measure:
                out.update(loss=out["step_loss"], grad_norm=g.norm().item())
        else:
            loss, g = self.problem.batch_loss_and_grad(traj.w, self.sampler.indices(traj.step))
            out = {"step_loss": loss.item(), "step_size": lr}
            if measure:
                out.update(self.measure(traj))
        self.apply(traj, g, lr)
        return out

    def apply(self, traj: Trajectory, g: Tensor, lr: float) -> None:
        """One update of the rule with gradient g at step size lr: w, rule state, step and time advance."""
        if traj.state is None:
            traj.state = self.rule.init(traj.w, g)
        delta, traj.state = self.rule.update(g, traj.state, lr)
        traj.w = traj.w + delta
        traj.step += 1
        traj.time += lr

