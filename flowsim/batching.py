"""Batched execution (scenario key ``batch: true``): tasks that can share one vmapped pass run as one group.

Tasks share a pass when they run the discrete process of the same rule (same hyperparameters) with the same
batch size and sampling, on the same Problem (problem, dtype, device and scenario seed), for the same steps and record
settings; they may differ in step size, schedule and run seed — across the runs of a point and across sweep
points. Each member still gets its own run group, recorder, probes and checkpoints, in the same format as a
separate run, so stores and :func:`flowsim.open` do not know whether a run was batched. Batching is opt-in:
a batched run equals its separate run to rounding (~1e-15 relative per step), not bit for bit.
A group's checkpoint is one file for all its members (``checkpoints/<group>.group.pt``, named after the group's
first run), so a killed group resumes batched, exactly where it was saved.
"""
from __future__ import annotations

import json
import time
from typing import Optional

import torch
import zarr

from flowsim import store as store_mod
from flowsim.problem import Problem
from flowsim.record import Recorder
from flowsim.runner import _to, build, execute, make_probes, problem_key, record_dims, record_step, run_attrs
from flowsim.solvers import Discrete, Schedule, Trajectory
from flowsim.solvers.batched import BatchedDiscrete, BatchedTrajectory
from flowsim.sweep import Task


def group_key(task: Task) -> Optional[str]:
    """Tasks with equal keys can share a vmapped pass; None for a task that cannot be batched."""
    sc, spec = task.scenario, task.scenario.runs[task.key]
    if spec.process != "discrete":
        return None
    return json.dumps([problem_key(sc), spec.rule, spec.make_rule().hyperparameters(), spec.batch_size,
                       spec.options.model_dump(mode="json"), sc.steps, sc.record.model_dump(mode="json")],
                      sort_keys=True, default=str)


def groups(tasks: list[Task]) -> list[list[Task]]:
    """Tasks gathered into batchable groups, in the order of their first member; unbatchable ones alone."""
    out: dict[str, list[Task]] = {}
    for task in tasks:
        key = group_key(task)
        out.setdefault(task.name if key is None else key, []).append(task)
    return list(out.values())


def jobs(tasks: list[Task], batch: bool, skip: set[str]) -> list[tuple[Optional[str], list[Task]]]:
    """(group name or None, tasks) to execute: batched groups when ``batch`` (named after their first run, so a
    group keeps its name when some of its runs are already finished), else one job per task; runs in ``skip``
    are left out."""
    if batch:
        parts = [(g[0].name if group_key(g[0]) is not None else None, g) for g in groups(tasks)]
    else:
        parts = [(None, [t]) for t in tasks]
    parts = [(name, [t for t in g if t.name not in skip]) for name, g in parts]
    return [(name, g) for name, g in parts if g]


def execute_group(store, group: Optional[str], tasks: list[Task], resume: bool = False,
                  problem: Optional[Problem] = None, progress: bool = False) -> list[str]:
    """Run one job of :func:`jobs` into the store (batched when ``group`` is a name); returns its statuses."""
    problem = build(tasks[0].scenario) if problem is None else problem
    if group is None:
        return [execute(store, t, resume, problem, progress) for t in tasks]
    saved = store_mod.load_checkpoint(store, f"{group}.group") if resume else None
    checkpoints = [None] * len(tasks)
    if saved is not None and all(t.name in saved for t in tasks):
        checkpoints = [saved[t.name] for t in tasks]
    return _simulate_group(store, group, tasks, checkpoints, problem)


class _Member:
    """One run of a batched group: its writer, recorder, probes and divergence bookkeeping."""

    def __init__(self, root, task: Task, checkpoint: Optional[dict], problem: Problem, t0: float):
        sc, spec = task.scenario, task.scenario.runs[task.key]
        self.name = task.name
        if checkpoint is None and task.name in root["runs"]:
            del root[f"runs/{task.name}"]
        attrs = run_attrs(task.key, spec, sc, task.order)
        attrs["coords"] = {**task.coords, **attrs["coords"]}
        self.writer = store_mod.RunWriter(root, task.name, attrs, record_dims(sc, problem), chunk=sc.record.chunk)
        self.schedule = Schedule(spec.lr, *(spec.schedule.drop_at, spec.schedule.lr_after) if spec.schedule else ())
        self.seed = spec.seed if spec.seed is not None else sc.seed
        self.process = Discrete(problem, spec.make_rule(), self.schedule, seed=self.seed, batch_size=spec.batch_size,
                                options=spec.options)
        self.probes = make_probes(problem, sc)
        self.recorder = Recorder(self.writer, record_dims(sc, problem), chunk=sc.record.chunk)
        self.limit, self.diverged_at, self.t0 = None, None, t0
        if checkpoint is not None:
            self.writer.truncate(checkpoint["length"])
            self.limit, self.t0 = checkpoint["limit"], t0 - checkpoint["wall_time"]
            for probe, state in zip(self.probes, checkpoint["probes"]):
                probe.restore(_to(state, problem.device))
        self.saved = self.writer.length

    def finish(self) -> str:
        self.recorder.flush()
        status = "complete" if self.diverged_at is None else "diverged"
        self.writer.finish(status=status, diverged=self.diverged_at is not None, diverged_at=self.diverged_at,
                           wall_time=time.perf_counter() - self.t0)
        return status


def _member_trajectory(traj: BatchedTrajectory, b: int) -> Trajectory:
    state = None if traj.state is None else {k: v[b] for k, v in traj.state.items()}
    return Trajectory(w=traj.w[b], state=state, step=traj.step, time=traj.time[b])


def _simulate_group(store, group: str, tasks: list[Task], checkpoints: list[Optional[dict]],
                    problem: Problem) -> list[str]:
    sc, spec = tasks[0].scenario, tasks[0].scenario.runs[tasks[0].key]
    rec = sc.record
    root = zarr.open_group(store, mode="r+")
    t0 = time.perf_counter()
    members = [_Member(root, t, c, problem, t0) for t, c in zip(tasks, checkpoints)]
    engine = BatchedDiscrete(problem, spec.make_rule(), [m.schedule for m in members], [m.seed for m in members],
                             spec.batch_size, spec.options)
    traj, start = engine.start(problem.w0), 0
    if checkpoints[0] is not None:
        parts = [_to(c["trajectory"], problem.device) for c in checkpoints]
        state = None if parts[0]["state"] is None else {k: torch.stack([p["state"][k] for p in parts])
                                                        for k in parts[0]["state"]}
        traj = BatchedTrajectory(w=torch.stack([p["w"] for p in parts]), state=state, step=parts[0]["step"],
                                 time=[p["time"] for p in parts])
        start = checkpoints[0]["k"]
    statuses: dict[str, str] = {}
    for k in range(start, sc.steps + 1):
        last = k == sc.steps
        measure = k % rec.every == 0 or last
        active = [(b, m) for b, m in enumerate(members) if m.name not in statuses]
        rows = {}
        for b, m in active:
            rows[b] = {"time": traj.time[b]}
            for probe in m.probes:
                if k % probe.every == 0 or last:
                    rows[b].update(probe(_member_trajectory(traj, b), m.process))
        values = engine.measure(traj) if last else engine.step(traj, measure)
        for b, m in active:
            m.limit, bad = record_step(m.recorder, k, rows[b], values[b], measure, m.limit, rec.divergence_factor,
                                       m.t0)
            if bad:
                m.diverged_at = k
                statuses[m.name] = m.finish()
        if len(statuses) == len(members):
            break
        if any(m.writer.length != m.saved for m in members if m.name not in statuses):
            saved = {}
            for b, m in enumerate(members):
                if m.name not in statuses:
                    m.saved = m.writer.length
                    saved[m.name] = {
                        "k": k + 1, "limit": m.limit, "length": m.saved, "wall_time": time.perf_counter() - m.t0,
                        "trajectory": _to(vars(_member_trajectory(traj, b)), "cpu"), "process": {},
                        "probes": [_to(p.checkpoint_state(), "cpu") for p in m.probes]}
            store_mod.save_checkpoint(store, f"{group}.group", saved)
    for m in members:
        if m.name not in statuses:
            statuses[m.name] = m.finish()
    store_mod.drop_checkpoint(store, f"{group}.group")
    return [statuses[t.name] for t in tasks]
