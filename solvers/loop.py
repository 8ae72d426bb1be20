"""The one simulation loop: advances a process under step-size policies and hands every recorded step on.

Every way flowsim runs something — ``flowsim.simulate``, the scenario runner, vmapped batches of runs, Dask
workers, the benchmarks — goes through :func:`advance`. Per step k it: asks each run's policy for η_k (handing it
the :class:`~flowsim.solvers.step_size.StepContext` of w_k when the policy needs curvature), takes the probes' measurements
at w_k, advances the process (or measures at the last point), checks each run for divergence and hands its row
to the run's sink; after a sink stored a chunk it hands the caller a checkpoint of every running run. The
bookkeeping of a step (step += 1, time += η) is ``Trajectory.tick`` (``solvers/processes.py``; a vmapped batch's
trajectory has its own), which each process's ``step`` calls; the checkpoint dict is built here only.

An *engine* is what the loop advances: :class:`Single` (one process, one run) or a vmapped batch of runs
(``solvers/batched.py``); both offer ``n_runs``, ``member(traj, b)`` and ``member_process(b)`` (what run b's probes
see), ``context(traj, b)``, ``time(traj, b)``,
``step(traj, lrs, measure, ctxs)`` and ``measure(traj)`` (lists over runs), ``checkpoint_state()``/``restore``
and ``trajectory_state(traj, b)``/``join(parts)`` for checkpoints. This module never touches storage: sinks do.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from flowsim.solvers.processes import Process, Trajectory
from flowsim.solvers.step_size import PolicyState, StepSize


@dataclass
class Member:
    """One run in the loop: its step-size ``policy``, its ``probes`` (each called as ``probe(traj, process, η)``
    every ``probe.every`` steps and at the last), and its ``sink(k, row) -> bool`` (True when it stored a chunk,
    so that a checkpoint is due). The rest is the loop's bookkeeping, part of the checkpoint."""
    policy: StepSize
    sink: Callable[[int, dict], bool]
    probes: list = field(default_factory=list)
    policy_state: Optional[PolicyState] = None
    eta: float = math.nan
    limit: Optional[float] = None
    diverged_at: Optional[int] = None
    done: bool = False
    t0: float = 0.0

    def __post_init__(self):
        if self.policy_state is None:
            self.policy_state = self.policy.init()


class Single:
    """One process as an engine of one run."""
    n_runs = 1

    def __init__(self, process: Process):
        self.process = process

    def start(self, w0: torch.Tensor) -> Trajectory:
        return self.process.start(w0)

    def member(self, traj: Trajectory, b: int) -> Trajectory:
        return traj

    def member_process(self, b: int) -> Process:
        return self.process

    def context(self, traj: Trajectory, b: int):
        return self.process.context(traj)

    def time(self, traj: Trajectory, b: int) -> float:
        return traj.time

    def step(self, traj: Trajectory, lrs: list, measure: bool, ctxs: list) -> list[dict]:
        return [self.process.step(traj, lrs[0], measure, ctxs[0])]

    def measure(self, traj: Trajectory) -> list[dict]:
        return [self.process.measure(traj)]

    def checkpoint_state(self) -> dict:
        return self.process.checkpoint_state()

    def restore(self, state: dict) -> None:
        self.process.restore(state)

    def trajectory_state(self, traj: Trajectory, b: int) -> dict:
        return {f.name: getattr(traj, f.name) for f in dataclasses.fields(traj)}

    def join(self, parts: list[dict]) -> Trajectory:
        return Trajectory(**parts[0])


def advance(engine, traj, members: list[Member], steps: int, *, start: int = 0, every: int = 1,
            divergence_factor: float = 1e6, on_checkpoint: Optional[Callable[[list[Optional[dict]]], None]] = None,
            progress: bool = False, label: str = "") -> None:
    """Run steps ``start`` … ``steps`` − 1 of ``engine`` from ``traj`` and record steps ``start`` … ``steps``.

    Loss and grad_norm are measured every ``every`` steps and at the last; a run diverges when its step loss is
    not finite or exceeds ``divergence_factor`` × max(|first step loss|, 1) (it is then recorded at that step
    and stops; the others go on). ``on_checkpoint(checkpoints)`` gets, after a sink stored a chunk, one dict per
    run (None for a finished one) that :func:`restore` continues from exactly.
    """
    bar = tqdm(total=steps, initial=start, desc=label, disable=not progress, leave=False, unit="step")
    for k in range(start, steps + 1):
        last = k == steps
        measure = k % every == 0 or last
        ctxs = [None] * engine.n_runs
        for b, m in enumerate(members):
            if m.done or (last and m.policy.curvature):
                continue  # a curvature policy sets no η where no step follows: the last one stands
            ctxs[b] = engine.context(traj, b) if m.policy.curvature else None
            m.eta, m.policy_state = m.policy.update(k, ctxs[b], m.policy_state)
        rows = {}
        for b, m in enumerate(members):
            if not m.done:
                rows[b] = {"time": engine.time(traj, b)}
                for probe in m.probes:
                    if k % probe.every == 0 or last:
                        rows[b].update(probe(engine.member(traj, b), engine.member_process(b), m.eta))
        values = engine.measure(traj) if last else engine.step(traj, [m.eta for m in members], measure, ctxs)
        stored = False
        for b, row in rows.items():
            stored |= _record(members[b], k, row, values[b], measure, divergence_factor)
        if all(m.done for m in members):
            break
        bar.update(1)
        if stored and on_checkpoint is not None:
            on_checkpoint([None if m.done else _checkpoint(engine, traj, b, m, k + 1) for b, m in enumerate(members)])
    bar.close()


def _record(m: Member, k: int, row: dict, values: dict, measure: bool, factor: float) -> bool:
    """Hand step k's row to the run's sink: its time, wall time and η at every step, its loss and gradient norm
    where measured, and whatever its probes measured; returns whether the sink stored a chunk. Sets the
    divergence limit at the first step seen."""
    step_loss = values.pop("step_loss", values.get("loss"))
    if m.limit is None:
        m.limit = factor * max(abs(step_loss), 1.0) if math.isfinite(step_loss) else 0.0
    bad = not math.isfinite(step_loss) or abs(step_loss) > m.limit
    row.update(values if measure else {k_: v for k_, v in values.items() if k_ == "step_size"})
    row["wall_time"] = time.perf_counter() - m.t0
    stored = bool(m.sink(k, row))
    if bad:
        m.diverged_at, m.done = k, True
    return stored


def _checkpoint(engine, traj, b: int, m: Member, k: int) -> dict:
    return {"k": k, "limit": m.limit, "wall_time": time.perf_counter() - m.t0, "eta": m.eta,
            "trajectory": to_device(engine.trajectory_state(traj, b), "cpu"),
            "process": to_device(engine.checkpoint_state(), "cpu") if engine.n_runs == 1 else {},
            "policy": to_device(m.policy_state, "cpu"),
            "probes": [to_device(p.checkpoint_state(), "cpu") for p in m.probes]}


def restore(engine, members: list[Member], checkpoints: list[dict], device) -> tuple[object, int]:
    """(trajectory, first step) that continue a run from :func:`advance`'s checkpoints, one per member (all
    taken at the same step); sets each member's bookkeeping, policy and probe state, and the engine's."""
    for m, c in zip(members, checkpoints):
        m.limit, m.eta, m.t0 = c["limit"], c["eta"], m.t0 - c["wall_time"]
        m.policy_state = to_device(c["policy"], device)
        for probe, state in zip(m.probes, c["probes"]):
            probe.restore(to_device(state, device))
    if engine.n_runs == 1:
        engine.restore(to_device(checkpoints[0]["process"], device))
    return engine.join([to_device(c["trajectory"], device) for c in checkpoints]), checkpoints[0]["k"]


def to_device(value, device):
    """``value`` (tensors, possibly in dicts/lists) with every tensor detached and on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value
