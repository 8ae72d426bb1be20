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
from flowsim.record import Probe, Projection, ProjectionProbe, Recorder
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


def record_dims(sc: Scenario) -> dict[str, int]:
    """Sizes of the recorded variables' extra dims (``proj``; curvature adds ``eig``)."""
    return {"proj": sc.record.projection_dim}


def make_probes(problem: Problem, sc: Scenario) -> list[Probe]:
    """The measurements a scenario's ``record:`` asks for, besides loss and grad_norm (shared by all runs)."""
    probes: list[Probe] = []
    if sc.record.projection_dim:
        projection = Projection(problem.n_params, sc.record.projection_dim, sc.seed, problem.dtype, problem.device)
        probes.append(ProjectionProbe(projection, sc.record.projection_every))
    return probes


def simulate(problem: Problem, run: RunSpec, sc: Scenario, writer, probes: list[Probe], dims: dict[str, int],
             progress: bool = False, label: str = "") -> dict:
    """Run one process to ``sc.steps`` and record it. Returns {diverged, diverged_at, wall_time}."""
    rec = sc.record
    seed = run.seed if run.seed is not None else sc.seed
    schedule = Schedule(run.lr, *(run.schedule.drop_at, run.schedule.lr_after) if run.schedule else ())
    process = PROCESSES[run.process](problem, run.make_rule(), schedule, seed=seed, batch_size=run.batch_size,
                                     options=run.options)
    traj = process.start(problem.w0)
    recorder = Recorder(writer, dims, chunk=rec.chunk)
    limit = None
    diverged_at = None
    t0 = time.perf_counter()
    bar = tqdm(total=sc.steps, desc=label, disable=not progress, leave=False, unit="step")
    for k in range(sc.steps + 1):
        last = k == sc.steps
        measure = k % rec.every == 0 or last
        row = {"time": traj.time}
        for probe in probes:
            if k % probe.every == 0 or last:
                row.update(probe(traj, process))
        values = process.measure(traj) if last else process.step(traj, measure)
        step_loss = values.pop("step_loss", values.get("loss"))
        if limit is None:
            limit = rec.divergence_factor * max(abs(step_loss), 1.0) if math.isfinite(step_loss) else 0.0
        bad = not math.isfinite(step_loss) or abs(step_loss) > limit
        if measure or bad or len(row) > 1:
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
    probes, dims = make_probes(problem, sc), record_dims(sc)
    for order, (name, spec) in enumerate(sc.runs.items()):
        writer = store_mod.RunWriter(root, name, run_attrs(name, spec, sc, order), dims, chunk=sc.record.chunk)
        result = simulate(problem, spec, sc, writer, probes, dims, progress=progress, label=name)
        writer.finish(status="diverged" if result["diverged"] else "complete", **result)
    return store_mod.open(target)


def _isatty() -> bool:
    import sys
    return sys.stderr.isatty()
