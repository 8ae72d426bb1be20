"""Several discrete runs of one problem and one rule, differing only in step size (schedule) and seed,
advanced together as one vmapped pass.

Run b has weights ``W[b]``, rule state ``state[k][b]``, step size ``schedules[b](step)`` and, for minibatch
runs, the minibatch sampler :class:`Discrete` would use with ``seeds[b]`` and ``options`` (its sampling). Gradients are ``vmap(grad)`` of the problem's
loss over the runs, and the rule's ``init``/``update`` are vmapped too, so each run follows exactly the
arithmetic of :class:`Discrete` (up to the summation order of batched matrix products: ~1e-16 relative per
step). Like every process, it never touches storage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from pydantic import BaseModel
from torch import Tensor
from torch.func import grad_and_value, vmap

from flowsim.problem import Problem
from flowsim.solvers.processes import Discrete, Schedule
from flowsim.solvers.rules import Rule, State


@dataclass
class BatchedTrajectory:
    """Weights ``w`` (runs × P), rule state (each tensor with a leading runs dim), step k, times t_b = Σ η_b."""
    w: Tensor
    state: Optional[State] = None
    step: int = 0
    time: list[float] = field(default_factory=list)


class BatchedDiscrete:
    """The discrete iteration for ``len(schedules)`` runs at once (full batch, or minibatches of ``batch_size``
    drawn as :class:`Discrete` with ``options`` draws them)."""

    def __init__(self, problem: Problem, rule: Rule, schedules: list[Schedule], seeds: list[int],
                 batch_size: Optional[int] = None, options: Optional[BaseModel] = None):
        if len(schedules) != len(seeds) or not schedules:
            raise ValueError("schedules and seeds: give one of each per run (at least one run)")
        self.problem, self.rule, self.schedules = problem, rule, schedules
        full = batch_size is None or batch_size >= problem.n_examples
        self.samplers = None if full else [Discrete(problem, rule, sched, seed, batch_size, options).sampler
                                           for sched, seed in zip(schedules, seeds)]
        self._value_grad = vmap(grad_and_value(problem.loss), in_dims=(0, None if full else 0))
        self._init = vmap(rule.init)
        self._update = vmap(rule.update)

    @property
    def n_runs(self) -> int:
        return len(self.schedules)

    def start(self, w0: Tensor) -> BatchedTrajectory:
        return BatchedTrajectory(w=w0.expand(self.n_runs, -1).clone(), time=[0.0] * self.n_runs)

    def _full(self, w: Tensor) -> tuple[Tensor, Tensor]:
        g, loss = vmap(grad_and_value(self.problem.loss))(w)
        return loss, g

    def step(self, traj: BatchedTrajectory, measure: bool) -> list[dict]:
        """Advance every run by one step; per run: ``step_loss``, ``step_size`` and, when ``measure``, the
        full-batch ``loss`` and ``grad_norm`` at the start point (as :meth:`Discrete.step`)."""
        lrs = [s(traj.step) for s in self.schedules]
        if self.samplers is None:
            loss, g = self._full(traj.w)
            full_loss, full_g = loss, g
        else:
            idx = torch.stack([s.indices(traj.step) for s in self.samplers])
            g, loss = self._value_grad(traj.w, idx)
            full_loss, full_g = self._full(traj.w) if measure else (None, None)
        out = [{"step_loss": v, "step_size": lr} for v, lr in zip(loss.tolist(), lrs)]
        if measure:
            for row, v, n in zip(out, full_loss.tolist(), full_g.norm(dim=1).tolist()):
                row.update(loss=v, grad_norm=n)
        if traj.state is None:
            traj.state = self._init(traj.w, g)
        lr = torch.tensor(lrs, dtype=traj.w.dtype, device=traj.w.device)
        delta, traj.state = self._update(g, traj.state, lr)
        traj.w = traj.w + delta
        traj.step += 1
        traj.time = [t + s for t, s in zip(traj.time, lrs)]
        return out

    def measure(self, traj: BatchedTrajectory) -> list[dict]:
        loss, g = self._full(traj.w)
        return [{"loss": v, "grad_norm": n} for v, n in zip(loss.tolist(), g.norm(dim=1).tolist())]
