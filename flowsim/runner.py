"""Executes the runs of a scenario in this process and writes them to a store.

Everything that can fail on bad input (the scenario, the data, files, batch sizes) is checked before the
store is created, so a bad scenario writes nothing. A diverging run is recorded (``diverged``,
``diverged_at``) and the other runs still complete.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Union

import torch
import xarray as xr
import zarr.storage
from tqdm.auto import tqdm

import flowsim
from flowsim import scenario as scenario_mod
from flowsim import store as store_mod
from flowsim.problem import Problem, resolve_device
from flowsim.record import Projection, Recorder
from flowsim.scenario import RunSpec, Scenario, ScenarioError
from flowsim.solvers import PROCESSES, Schedule


def build(sc: Scenario) -> Problem:
    """The scenario's Problem; data problems (missing file, bad sizes) become ScenarioError."""
    try:
        problem = sc.problem.build(dtype=sc.dtype, device=sc.device, seed=sc.seed)
    except ValueError as e:
        msg = str(e)
        raise ScenarioError(msg if msg.startswith("problem") else f"problem: {msg}") from None
    for name, run in sc.runs.items():
        if run.batch_size is not None:
            if problem.n_examples == 0:
                raise ScenarioError(f"runs.{name}.batch_size: the {problem.meta.get('model')} landscape has no data to batch")
            if run.batch_size > problem.n_examples:
                raise ScenarioError(f"runs.{name}.batch_size: {run.batch_size} is larger than the data "
                                    f"({problem.n_examples} examples)")
    return problem


def run_attrs(name: str, run: RunSpec, sc: Scenario, order: int) -> dict:
    """Run-group attrs: its place among the runs, its coordinates (batch_size 0 = full batch), rule settings."""
    coords = {"process": run.process, "rule": run.rule, "lr": run.lr,
              "batch_size": run.batch_size if run.batch_size is not None else 0,
              "seed": run.seed if run.seed is not None else sc.seed}
    return {"order": order, "coords": coords, "hyperparameters": run.make_rule().hyperparameters()}


def simulate(problem: Problem, run: RunSpec, sc: Scenario, writer, projection: Optional[Projection],
             progress: bool = False, label: str = "") -> dict:
    """Run one process to ``sc.steps`` and record it. Returns {diverged, diverged_at, wall_time}."""
    rec = sc.record
    seed = run.seed if run.seed is not None else sc.seed
    schedule = Schedule(run.lr, *(run.schedule.drop_at, run.schedule.lr_after) if run.schedule else ())
    process = PROCESSES[run.process](problem, run.make_rule(), schedule, seed=seed, batch_size=run.batch_size,
                                     options=run.options)
    traj = process.start(problem.w0)
    dims = {"proj": projection.matrix.shape[0] if projection is not None else 0}
    recorder = Recorder(writer, dims, chunk=rec.chunk)
    limit = None
    diverged_at = None
    t0 = time.perf_counter()
    bar = tqdm(total=sc.steps, desc=label, disable=not progress, leave=False, unit="step")
    for k in range(sc.steps + 1):
        last = k == sc.steps
        measure = k % rec.every == 0 or last
        row = {"time": traj.time}
        if projection is not None and (k % rec.projection_every == 0 or last):
            row["w_proj"] = projection(traj.w)
        values = process.measure(traj) if last else process.step(traj, measure)
        step_loss = values.pop("step_loss", values.get("loss"))
        if limit is None:
            limit = rec.divergence_factor * max(abs(step_loss), 1.0) if math.isfinite(step_loss) else 0.0
        bad = not math.isfinite(step_loss) or abs(step_loss) > limit
        if measure or bad or "w_proj" in row:
            row.update(values if measure else {"step_size": values["step_size"]})
            row["wall_time"] = time.perf_counter() - t0
            recorder.add(k, row)
        if bad:
            diverged_at = k
            break
        bar.update(1)
    bar.close()
    recorder.flush()
    return {"diverged": diverged_at is not None, "diverged_at": diverged_at,
            "wall_time": time.perf_counter() - t0}


def prepare(scenario, steps: Optional[int] = None, device: Optional[str] = None) -> Scenario:
    """Validate a scenario and apply command-line overrides (re-validated, so they are checked too)."""
    sc = scenario_mod.load(scenario)
    overrides = {k: v for k, v in {"steps": steps, "device": device}.items() if v is not None}
    if overrides:
        sc = scenario_mod.load({**sc.model_dump(exclude_none=True), **overrides})
    try:
        resolve_device(sc.device)
    except ValueError as e:
        raise ScenarioError(f"device: {e}") from None
    return sc


def run(scenario, store: Union[str, Path, None] = None, *, steps: Optional[int] = None,
        device: Optional[str] = None, overwrite: bool = False, progress: Optional[bool] = None) -> xr.Dataset:
    """Run every run of a scenario and return the recorded Dataset (see :func:`flowsim.open`).

    ``scenario``: a YAML path, YAML text, a dict or a Scenario. ``store``: a ``.zarr`` path, or None to keep
    the results in memory. ``progress``: show progress bars (default: when stderr is a terminal).
    """
    sc = prepare(scenario, steps, device)
    problem = build(sc)
    progress = _isatty() if progress is None else progress
    target = zarr.storage.MemoryStore() if store is None else store
    root = store_mod.create(target, {
        "scenario": sc.to_yaml(), "name": sc.name, "flowsim_version": flowsim.__version__,
        "torch_version": torch.__version__, "device": str(problem.device), "dtype": sc.dtype,
        "n_params": problem.n_params, "n_examples": problem.n_examples,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, overwrite=overwrite)
    dim = sc.record.projection_dim
    projection = Projection(problem.n_params, dim, sc.seed, problem.dtype, problem.device) if dim else None
    for order, (name, spec) in enumerate(sc.runs.items()):
        writer = store_mod.RunWriter(root, name, run_attrs(name, spec, sc, order), {"proj": dim},
                                     chunk=sc.record.chunk)
        result = simulate(problem, spec, sc, writer, projection, progress=progress, label=name)
        writer.finish(status="diverged" if result["diverged"] else "complete", **result)
    return store_mod.open(target)


def _isatty() -> bool:
    import sys
    return sys.stderr.isatty()
