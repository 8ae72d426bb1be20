"""Batched execution (scenario key ``batch: true``): which tasks can share one vmapped pass, as one job.

Tasks share a pass when they run the discrete process of the same rule (same hyperparameters) with the same
batch size and sampling, on the same Problem (problem, dtype, device and scenario seed), for the same steps and
record settings, under step-size policies that measure no curvature; they may differ in step size, step-size
schedule and run seed — across the runs of a point and across sweep points. Each member still gets its own run
group, recorder, probes and checkpoints, in the same format as a separate run, so stores and
:func:`flowsim.open` do not know whether a run was batched. Batching is opt-in: a batched run equals its
separate run to rounding, not bit for bit (how close: :mod:`flowsim.solvers.batched`). A group's checkpoint is
one file for all its members (``checkpoints/<group>.group.pt``, named after the group's first run), so a killed
group resumes batched, exactly where it was saved. ``flowsim.runner.execute_job`` runs a job; this module only
groups.
"""
from __future__ import annotations

import json
from typing import Optional

from flowsim.solvers import PROCESSES
from flowsim.sweep import Task, problem_key


def group_key(task: Task) -> Optional[str]:
    """Tasks with equal keys can share a vmapped pass; None for a task that cannot be batched."""
    sc, spec = task.scenario, task.scenario.runs[task.key]
    if not PROCESSES[spec.process].iterates or spec.policy.curvature:
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
