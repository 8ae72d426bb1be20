"""Several discrete runs of one problem and one rule, differing only in step size and seed, advanced together
as one vmapped pass: an engine of the simulation loop (``solvers/loop.py``), whose policies set each run's η.

Run b has weights ``W[b]``, rule state ``state[k][b]``, step size ``lrs[b]`` at each step and, for minibatch
runs, the minibatch sampler :class:`Discrete` would use with ``seeds[b]`` and ``options`` (its sampling). Gradients are ``vmap(grad)`` of the problem's
loss over the runs, and the rule's ``init``/``update`` are vmapped too, so each run follows exactly the
arithmetic of :class:`Discrete` up to the summation order of batched matrix products: equal to the separate run
to rounding, not bit for bit. Measured in float64 on a small MLP (GD, momentum, the RMSProps, Adam): full batch
bit for bit on CPU; minibatches ≤ 5e-17 relative in w after one step, ≤ 3e-15 after 200 (tests/test_batched.py
holds them to 1e-12). Like every process, it never touches storage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from pydantic import BaseModel
from torch import Tensor
from torch.func import grad_and_value, vmap

from flowsim.models.problem import Problem
from flowsim.solvers.processes import Discrete, Trajectory, svag_update
from flowsim.solvers.rules import Rule, State


@dataclass
class BatchedTrajectory:
    """Weights ``w`` (runs × P), rule state (each tensor with a leading runs dim), step k, times t_b = Σ η_b."""
    w: Tensor
    state: Optional[State] = None
    step: int = 0
    time: list[float] = field(default_factory=list)

    def tick(self, lrs: list[float]) -> None:
        """The bookkeeping of one step of every run (:meth:`Trajectory.tick` run by run)."""
        self.step += 1
        self.time = [t + lr for t, lr in zip(self.time, lrs)]


class BatchedDiscrete:
    """The discrete iteration for ``len(seeds)`` runs at once (full batch, or minibatches of ``batch_size``
    drawn as :class:`Discrete` with ``options`` draws them)."""

    def __init__(self, problem: Problem, rule: Rule, seeds: list[int], batch_size: Optional[int] = None,
                 options: Optional[BaseModel] = None):
        if not seeds:
            raise ValueError("seeds: give one per run (at least one run)")
        self.problem, self.rule = problem, rule
        self.processes = [Discrete(problem, rule, seed, batch_size, options) for seed in seeds]
        full = self.processes[0].sampler is None
        self.samplers = None if full else [p.sampler for p in self.processes]
        self._value_grad = vmap(grad_and_value(problem.loss), in_dims=(0, None if full else 0))
        self._init = vmap(rule.init)
        self._update = vmap(rule.update)
        svag = self.processes[0]._svag
        self._svag = None if svag is None else lambda *args: svag_update(problem, *svag, *args)

    @property
    def n_runs(self) -> int:
        return len(self.processes)

    def member(self, traj: BatchedTrajectory, b: int) -> Trajectory:
        """Run b's point as a :class:`Trajectory` (views of the batch's tensors)."""
        state = None if traj.state is None else {k: v[b] for k, v in traj.state.items()}
        return Trajectory(w=traj.w[b], state=state, step=traj.step, time=traj.time[b])

    def member_process(self, b: int) -> Discrete:
        return self.processes[b]

    def context(self, traj: BatchedTrajectory, b: int):
        raise ValueError("step_size: a policy that measures curvature cannot run in a vmapped batch")

    def time(self, traj: BatchedTrajectory, b: int) -> float:
        return traj.time[b]

    def checkpoint_state(self) -> dict:
        return {}

    def trajectory_state(self, traj: BatchedTrajectory, b: int) -> dict:
        return vars(self.member(traj, b))

    def join(self, parts: list[dict]) -> BatchedTrajectory:
        """The batched trajectory of the runs' checkpointed trajectories (all at the same step)."""
        state = None if parts[0]["state"] is None else {k: torch.stack([p["state"][k] for p in parts])
                                                        for k in parts[0]["state"]}
        return BatchedTrajectory(w=torch.stack([p["w"] for p in parts]), state=state, step=parts[0]["step"],
                                 time=[p["time"] for p in parts])

    def start(self, w0: Tensor) -> BatchedTrajectory:
        return BatchedTrajectory(w=w0.expand(self.n_runs, -1).clone(), time=[0.0] * self.n_runs)

    def _full(self, w: Tensor) -> tuple[Tensor, Tensor]:
        g, loss = vmap(grad_and_value(self.problem.loss))(w)
        return loss, g

    def step(self, traj: BatchedTrajectory, lrs: list[float], measure: bool, ctxs=None) -> list[dict]:
        """Advance run b by one step of size ``lrs[b]``; per run: ``step_loss``, ``step_size`` and, when
        ``measure``, the full-batch ``loss`` and ``grad_norm`` at the start point (as :meth:`Discrete.step`)."""
        if self._svag is not None:
            return self._svag_step(traj, lrs, measure)
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
        delta, traj.state = self._update(g, traj.state, lr, traj.w)
        traj.w = traj.w + delta
        traj.tick(lrs)
        return out

    def _svag_step(self, traj: BatchedTrajectory, lrs: list[float], measure: bool) -> list[dict]:
        """:meth:`Discrete._svag_step` for every run: :func:`svag_update` vmapped over the runs."""
        out = self.measure(traj) if measure else [{} for _ in lrs]
        l = self.processes[0].options.svag
        batches = torch.stack([torch.stack(s.draws(traj.step, 2 * l)) for s in self.samplers])
        lr = torch.tensor(lrs, dtype=traj.w.dtype, device=traj.w.device)
        in_dims = (0, None if traj.state is None else 0, 0, 0)
        loss, traj.w, traj.state = vmap(self._svag, in_dims=in_dims)(traj.w, traj.state, lr, batches)
        for row, v, eta in zip(out, loss.tolist(), lrs):
            row.update(step_loss=v, step_size=eta)
        traj.tick(lrs)
        return out

    def measure(self, traj: BatchedTrajectory) -> list[dict]:
        loss, g = self._full(traj.w)
        return [{"loss": v, "grad_norm": n} for v, n in zip(loss.tolist(), g.norm(dim=1).tolist())]
