"""Executes the runs of a scenario and writes them to a store; :func:`simulate` runs one process without YAML.

Everything that can fail on bad input (the scenario, the data, files, batch sizes) is checked before the
store is created, so a bad scenario writes nothing. A diverging run is recorded (``diverged``,
``diverged_at``) and the other runs still complete. Every run — alone, in a vmapped batch, on a Dask worker —
is advanced by the one loop, ``flowsim.solvers.loop.advance``; this module sets up its writers, recorders,
probes, checkpoints and progress (a bar on a terminal; elsewhere a plain line on stderr at most every
``PROGRESS_SECONDS``, none for a run shorter than that).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import xarray as xr
from pydantic import BaseModel, ValidationError
import zarr
import zarr.storage

from flowsim import batching
from flowsim import scenario as scenario_mod
from flowsim import store as store_mod
from flowsim import sweep as sweep_mod
from flowsim.models.problem import Problem, resolve_device
from flowsim.record import (NoiseKernelProbe, PrecondSharpnessProbe, Probe, Projection, ProjectionProbe, Recorder,
                            SharpnessProbe, StochasticEdgeProbe, WeightsProbe, declared)
from flowsim.scenario import RecordSpec, RunSpec, Scenario, ScenarioError
from flowsim.solvers import PROCESSES, Rule, StepSize
from flowsim.solvers.batched import BatchedDiscrete
from flowsim.solvers.loop import Member, Single, advance, restore
from flowsim.solvers.processes import RUN_VARIABLES, discrete_start
from flowsim.solvers.rules import given_twice
from flowsim.sweep import Task, problem_key

PROGRESS_SECONDS = 30.0  # at most one progress line per this many seconds where stderr is not a terminal


def build(sc: Scenario) -> Problem:
    """The scenario's Problem; data problems (missing file, bad sizes) become ScenarioError."""
    try:
        problem = sc.problem.build(dtype=sc.dtype, device=sc.device, seed=sc.seed)
    except ValueError as e:
        msg = str(e)
        raise ScenarioError(msg if msg.startswith("problem") else f"problem: {msg}") from None
    for name, run in sc.runs.items():
        check_run(run, problem, sc.seed, f"runs.{name}.")
    check_record(sc.record, problem)
    return problem


def check_run(run: RunSpec, problem: Problem, seed: int, where: str = "") -> None:
    """What the run's process refuses when it is made on this problem (a rule; a batch on a landscape or larger
    than the data) as a one-line ScenarioError, its key prefixed by ``where``."""
    try:
        make_process(run, problem, seed)
    except ValueError as e:
        raise ScenarioError(f"{where}{e}") from None


def check_record(record: RecordSpec, problem: Problem) -> None:
    if record.curvature_every and record.top_k > problem.n_params:
        raise ScenarioError(f"record.top_k: {record.top_k} is more than the {problem.n_params} parameters")


def make_process(run: RunSpec, problem: Problem, seed: int):
    """The run's process over its rule (it raises ValueError for what it cannot run)."""
    return PROCESSES[run.process](problem, run.make_rule(), seed=seed, batch_size=run.batch_size,
                                  options=run.options)


def run_attrs(name: str, run: RunSpec, sc: Scenario, order: int) -> dict:
    """Run-group attrs: its place among the runs, its coordinates — what ran: process, rule, the step-size
    ``policy`` with its ``lr`` (NaN where a controller sets η) and ``max_lr`` (a controller's cap, else NaN),
    batch_size (0 = full batch), seed, a flow's ``discrete_start`` (the discrete rule's own steps before it; NaN
    for a discrete run) — and the rule's and the policy's settings."""
    coords = {"process": run.process, "rule": run.rule, **run.policy.coords(),
              "batch_size": run.batch_size if run.batch_size is not None else 0,
              "seed": run.seed if run.seed is not None else sc.seed,
              "discrete_start": discrete_start(run.options, run.make_rule())}
    return {"order": order, "coords": coords, "hyperparameters": run.make_rule().hyperparameters(),
            "step_size": run.policy.model_dump(mode="json")}


def make_probes(problem: Problem, sc: Scenario) -> list[Probe]:
    """The measurements a scenario's ``record:`` asks for, besides loss and grad_norm (shared by all runs)."""
    probes: list[Probe] = []
    if sc.record.projection_dim:
        projection = Projection(problem.n_params, sc.record.projection_dim, sc.seed, problem.dtype, problem.device)
        probes.append(ProjectionProbe(projection, sc.record.projection_every))
    if sc.record.keep_weights:
        probes.append(WeightsProbe(sc.record.keep_weights, problem.n_params))
    rec = sc.record
    if rec.curvature_every:
        sharpness = SharpnessProbe(rec.curvature_every, rec.top_k, rec.eig_tol, rec.curvature_examples,
                                   problem.n_examples)
        probes.append(sharpness)
        if rec.precond:
            probes.append(PrecondSharpnessProbe(sharpness))
        if rec.noise_kernel:
            probes.append(NoiseKernelProbe(rec.curvature_every, rec.noise_kernel_examples, problem.n_examples))
        if rec.stochastic_edge:
            probes.append(StochasticEdgeProbe(sharpness, rec.stochastic_edge_batches))
    return probes


def execute_job(store, group: Optional[str], tasks: list[Task], resume: bool = False,
                problem: Optional[Problem] = None, progress: Optional[str] = None) -> list[str]:
    """Simulate one job of :func:`flowsim.batching.jobs` — one task, or a group run as one vmapped pass — into
    groups ``runs/<task.name>`` of an existing store; returns their statuses. Used in process and, unchanged, as
    the task a Dask worker runs. ``progress``: ``"bar"`` (tqdm, one run), ``"lines"`` (:class:`ProgressLines`)
    or None.

    Whenever a run's recorder writes (its first row, then ``record.chunk`` rows or a minute of work:
    :class:`flowsim.record.Recorder`) every run of the job writes what it holds and the job checkpoints
    (``checkpoints/<name>.pt``, named after its first run, ``<name>.group`` for a group); with ``resume`` it
    continues from there (rows stored after it are cut off first), or starts over when it has none.
    """
    sc = tasks[0].scenario
    problem = build(sc) if problem is None else problem
    in_memory = isinstance(store, store_mod.InMemory)
    root = None if in_memory else zarr.open_group(store, mode="r+", use_consolidated=False)
    name = tasks[0].name if group is None else f"{group}.group"
    saved = store_mod.load_checkpoint(store, name) if resume else None
    if saved is not None and not all(t.name in saved for t in tasks):
        saved = None
    members, writers, recorders = [], [], []
    t0 = time.perf_counter()
    for task in tasks:
        spec = task.scenario.runs[task.key]
        if saved is None and not in_memory and task.name in root["runs"]:
            del root[f"runs/{task.name}"]
        attrs = run_attrs(task.key, spec, task.scenario, task.order)
        attrs["coords"] = {**task.coords, **attrs["coords"]}
        probes, process = make_probes(problem, task.scenario), PROCESSES[spec.process]
        variables = declared(RUN_VARIABLES, process.variables, *(p.variables for p in probes))
        dims = {key: size for part in (process, *probes) for key, size in part.dims.items()}
        writer = (store.writer(task.name, attrs, variables, dims) if in_memory
                  else store_mod.RunWriter(root, task.name, attrs, variables, dims, chunk=sc.record.chunk))
        if saved is not None:
            writer.truncate(saved[task.name]["length"])
        recorder = Recorder(writer, variables, dims, chunk=sc.record.chunk)
        sink = recorder.add
        if progress == "lines" and not members:
            sink = ProgressLines(task.name if group is None else group, sc.steps, sink)
        members.append(Member(spec.policy, sink, probes, t0=t0))
        writers.append(writer)
        recorders.append(recorder)
    engine = _engine(tasks, problem, group is not None)
    traj, start = engine.start(problem.w0), 0
    if saved is not None:
        traj, start = restore(engine, members, [saved[t.name] for t in tasks], problem.device)

    def save(checkpoints: list[Optional[dict]]) -> None:
        for recorder in recorders:  # the checkpoint continues after this step: every run's rows up to it are stored
            recorder.flush()
        store_mod.save_checkpoint(store, name, {t.name: {**c, "length": w.length} for t, c, w
                                                in zip(tasks, checkpoints, writers) if c is not None})
    advance(engine, traj, members, sc.steps, start=start, every=sc.record.every,
            divergence_factor=sc.record.divergence_factor, on_checkpoint=save,
            progress=progress == "bar" and group is None, label=tasks[0].name)
    statuses = []
    for m, writer, recorder in zip(members, writers, recorders):
        recorder.flush()
        status = "complete" if m.diverged_at is None else "diverged"
        writer.finish(status=status, diverged=m.diverged_at is not None, diverged_at=m.diverged_at,
                      wall_time=time.perf_counter() - m.t0)
        statuses.append(status)
    store_mod.drop_checkpoint(store, name)
    return statuses


class ProgressLines:
    """A run's sink (``sink(k, row)``) that also reports its progress as a plain line on stderr, ``flowsim:
    <label>: step k/N (p%), s elapsed, about s left``: at most one every ``PROGRESS_SECONDS``, the first after as
    long (a short run prints none). For stderr that is not a terminal (a log file, a pipe, a notebook)."""

    def __init__(self, label: str, steps: int, sink):
        self.label, self.steps, self.sink = label, steps, sink
        self.t0 = self.last = time.monotonic()
        self.first: Optional[int] = None

    def __call__(self, k: int, row: dict) -> bool:
        now = time.monotonic()
        self.first = k if self.first is None else self.first
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            left = (now - self.t0) / max(k - self.first, 1) * (self.steps - k)
            print(f"flowsim: {self.label}: step {k}/{self.steps} ({k / self.steps:.0%}), {now - self.t0:.0f} s, "
                  f"about {left:.0f} s left", file=sys.stderr, flush=True)
        return self.sink(k, row)


def _engine(tasks: list[Task], problem: Problem, batched: bool):
    """The loop's engine for a job: the run's process, or the vmapped discrete process of a group."""
    spec = tasks[0].scenario.runs[tasks[0].key]
    seeds = [t.scenario.runs[t.key].seed if t.scenario.runs[t.key].seed is not None else t.scenario.seed
             for t in tasks]
    if batched:
        return BatchedDiscrete(problem, spec.make_rule(), seeds, spec.batch_size, spec.options)
    return Single(make_process(spec, problem, seeds[0]))


def prepare(scenario, steps: Optional[int] = None, device: Optional[str] = None) -> Scenario:
    """Validate a scenario and apply command-line overrides (re-validated, so they are checked too; a ``steps``
    override shorter than a step-size drop warns that the drop is not reached)."""
    sc = scenario_mod.load(scenario)
    overrides = {k: v for k, v in {"steps": steps, "device": device}.items() if v is not None}
    if overrides:
        sc = scenario_mod.load({**sc.model_dump(exclude_none=True), **overrides}, preview=steps is not None)
    try:
        resolve_device(sc.device)
    except ValueError as e:
        raise ScenarioError(f"device: {e}") from None
    return sc


def run(scenario, store: Union[str, Path, None] = None, *, steps: Optional[int] = None,
        device: Optional[str] = None, overwrite: bool = False, resume: bool = False,
        scheduler: Optional[str] = None, progress: Optional[bool] = None) -> xr.Dataset:
    """Run every run of every sweep point of a scenario and return the recorded Dataset (see :func:`flowsim.open`).

    ``scenario``: a YAML path, YAML text, a dict or a Scenario. ``store``: a ``.zarr`` path, or None to keep
    the results in memory. The store is locked while written (a second writer gets StoreLockedError).
    ``overwrite``: replace an existing store. ``resume``: continue the unfinished runs of an existing store of
    the same scenario from their checkpoints and skip the finished ones. ``scheduler``: None runs in this
    process; ``"local"`` or a Dask scheduler address runs each (point, run) as a task on dask.distributed.
    ``progress``: True: a progress bar per run (tqdm); None (default): a bar where stderr is a terminal, else a
    plain line on stderr at most every ``PROGRESS_SECONDS`` (none for a shorter run); False: none. With a
    scheduler the bar counts finished runs, and there are no lines.
    """
    sc = prepare(scenario, steps, device)
    tasks = sweep_mod.expand(sc)
    problems: dict[str, Problem] = {}
    for task in tasks:
        key = problem_key(task.scenario)
        if key not in problems:
            problems[key] = build(task.scenario)
        if sc.sweep:  # each point's own runs (a swept batch_size) against its problem, before anything runs
            check_run(task.scenario.runs[task.key], problems[key], task.scenario.seed,
                      f"sweep point [{task.name[len(task.key) + 1:-1]}]: runs.{task.key}.")
    if scheduler is not None and store is None:
        raise ValueError("scheduler: Dask workers need a store path to write to (give -o STORE.zarr)")
    if scheduler is not None:
        from flowsim.distributed import require
        require()
    if overwrite and resume:
        raise ValueError("resume: --resume continues a store, --overwrite replaces it; give one of them")
    if progress is None:
        mode = "bar" if sys.stderr.isatty() else "lines"
    else:
        mode = "bar" if progress else None
    target = zarr.storage.MemoryStore() if store is None else store
    first = problems[problem_key(tasks[0].scenario)]
    with store_mod.lock(target):
        if resume and store_mod.is_store(target):
            root = store_mod.reopen(target)
            if root.attrs.get("scenario") != sc.to_yaml():
                raise ScenarioError(f"resume: store {target} holds a different scenario (or other --steps/--device); "
                                    "use --overwrite to replace it")
        else:
            root = store_mod.create(target, {
                "scenario": sc.to_yaml(), "name": sc.name, "device": str(first.device), "dtype": sc.dtype,
                "n_params": first.n_params, "n_examples": first.n_examples}, overwrite=overwrite)
        root.require_group("runs")  # absent only in a store killed while being created
        done = {n for n in root["runs"].group_keys() if root[f"runs/{n}"].attrs.get("status") in ("complete", "diverged")}
        if resume:  # a run killed between finishing and dropping its checkpoint leaves an obsolete one
            for name in done:
                store_mod.drop_checkpoint(target, name)
        todo = batching.jobs(tasks, sc.batch, done if resume else set())
        if scheduler is None:
            for group, job in todo:
                execute_job(target, group, job, resume, problems[problem_key(job[0].scenario)], mode)
        else:
            from flowsim.distributed import execute_all
            execute_all(target, todo, scheduler, execute_job, resume=resume, progress=mode == "bar")
        store_mod.consolidate(target)
    return store_mod.open(target)


def _python_number(value):
    """A numpy scalar or a one-element tensor as the Python int or float it holds; anything else as it is."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return value.item()
    return value


def simulate(problem: Problem, rule: Union[str, Rule] = "gd", process: Union[str, BaseModel] = "discrete",
             step_size: Union[float, str, dict, StepSize] = 0.1, steps: int = 100, *,
             batch_size: Optional[int] = None, seed: int = 0, options: Optional[dict] = None,
             record: Union[dict, RecordSpec, None] = None, store: Union[str, Path, None] = None,
             progress: bool = False, **hyperparameters) -> xr.Dataset:
    """Run one process of one update rule under one step-size policy on ``problem``, and return what was
    recorded as the Dataset :func:`flowsim.open` gives (one run, named after the process).

    ``rule``: a rule object (``Adam(beta1=0.8)``, :mod:`flowsim.solvers`) or a name with its hyperparameters as
    keywords (``"adam", beta1=0.8``); ``process``: a process's options object (``Central.Options(substeps=8)``,
    ``Rod.Options()``: each process's own class, so it names the process) or a process name with its options in
    ``options``; ``step_size``: a
    policy object (``Edge(c=0.5)``, ``Drop(lr=0.1, at=100, lr_after=0.01)``), a number (a constant η), or a
    policy as a scenario spells it (``"edge"``, ``{"edge": {"c": 0.5}}``); ``record``: a :class:`RecordSpec` or
    the scenario's ``record:`` keys. Objects and names run the same: they are checked as a scenario's keys are
    (one-line :class:`ScenarioError`). The result is built in memory; with ``store`` (a path that does not exist
    yet) it is also written there as a zarr store, as ``flowsim run`` writes one. Numbers may be numpy scalars
    or one-element tensors (a sweep's ``np.logspace``).
    """
    step_size, steps, seed, batch_size = (_python_number(v) for v in (step_size, steps, seed, batch_size))
    if not isinstance(problem, Problem):
        raise ScenarioError(f"problem: must be a flowsim.Problem (Problem.from_module(module, X, Y) or "
                            f"from_function(fn, w0)), got {type(problem).__name__}")
    if isinstance(process, BaseModel):
        processes = {cls.Options: name for name, cls in PROCESSES.items()}
        if type(process) not in processes:
            raise ScenarioError(f"process: {type(process).__name__} is not a process's options (Central.Options(...), "
                                f"…) nor a process name; choose from {sorted(PROCESSES)}")
        if options:
            raise ScenarioError("options: give the process's options in its object or with its name, not both")
        process, options = processes[type(process)], process.model_dump(exclude_unset=True)
    if "lr" in hyperparameters and isinstance(step_size, (int, float)):  # step_size (0.1 by default) replaced it
        raise ScenarioError(f"lr: the step size is the argument step_size (a number for a constant η, or a policy): "
                            f"simulate(problem, {rule if isinstance(rule, str) else type(rule).__name__ + '()'!r}, "
                            f"..., step_size={hyperparameters['lr']!r})")
    if isinstance(rule, Rule):
        if hyperparameters:
            raise ScenarioError(given_twice(rule, hyperparameters))
        rule, hyperparameters = rule.name, rule.hyperparameters()
    run = {"process": process, "rule": rule, **hyperparameters, **(options or {})}
    if batch_size is not None:
        run["batch_size"] = batch_size
    if isinstance(step_size, StepSize):
        policy = step_size.model_dump(exclude_unset=True)
        if "lr" in policy:
            run["lr"] = policy.pop("lr")
        step_size = {step_size.kind: policy}
    if isinstance(step_size, (int, float)):
        run["lr"] = step_size
    else:
        run["step_size"] = step_size
    try:
        spec = RunSpec.model_validate(run)
    except ValidationError as e:
        raise ScenarioError("; ".join(scenario_mod.errors(e, run, RunSpec))) from None
    record = record.model_dump(exclude_unset=True) if isinstance(record, RecordSpec) else record
    try:
        rec = RecordSpec.model_validate(record or {})
    except ValidationError as e:
        raise ScenarioError("; ".join(scenario_mod.errors(e, record, RecordSpec, ("record",)))) from None
    if not isinstance(steps, int) or steps < 1:
        raise ScenarioError(f"steps: must be a positive integer, got {steps!r}")
    if not isinstance(seed, int):
        raise ScenarioError(f"seed: must be an integer, got {seed!r}")
    check_record(rec, problem)
    try:
        scenario_mod.check_record_applies(rec, problem.meta.get("loss"), {process: spec})
    except ValueError as e:
        raise ScenarioError(str(e)) from None
    # the problem is the caller's own, not a scenario's: the scenario is built around it, unvalidated
    sc = Scenario.model_construct(name="simulate", seed=seed, device=problem.device.type, dtype=str(problem.dtype).removeprefix("torch."),
                                  problem=None, steps=steps, runs={process: spec}, record=rec, compare=None, sweep=None,
                                  batch=False)
    check_run(sc.runs[process], problem, seed)
    attrs = {"scenario": sc.to_yaml(), "name": sc.name, "device": str(problem.device), "dtype": sc.dtype,
             "n_params": problem.n_params, "n_examples": problem.n_examples}
    target = store_mod.InMemory(attrs) if store is None else store
    if store is not None:
        if store_mod.is_store(store):  # create's own line names the command line's flags, which simulate lacks
            raise ScenarioError(f"store: {store} already exists; simulate writes a new store (remove it, or give "
                                "another path)")
        store_mod.create(store, attrs)
    execute_job(target, None, [Task(process, process, sc)], problem=problem, progress="bar" if progress else None)
    if store is None:
        return target.open()
    store_mod.consolidate(store)
    return store_mod.open(store)
