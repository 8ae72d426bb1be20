"""Sweep expansion: a scenario's ``sweep:`` becomes the cartesian product of points, each a full scenario.

``sweep: {lr: [0.02, 0.05], seed: [0, 1], problem.n_train: [500, 1000]}`` — each key names one scalar setting:
- a dotted path from the top of the scenario (``seed``, ``steps``, ``problem.n_train``, ``runs.gd.lr``,
  ``record.every``) sets that value;
- a key without a dot that is not a top-level scenario key (``lr``, ``batch_size``, ``beta1``, …) sets it in
  every run.
- ``scale`` applies each run's scaling rule for a batch κ times larger
  (:meth:`~flowsim.solvers.rules.Rule.scaled`: linear for GD and the momenta, square-root for RMSProp and Adam)
  to its ``batch_size``, ``lr`` and hyperparameters, after the other keys, and divides ``steps`` by κ (rounded
  up), so every point covers the same time of the SDE; the figures then plot against step × κ.
Every point is validated like a scenario of its own. Its runs are stored as ``<run>[key=value,...]`` (e.g.
``gd[lr=0.05,seed=1]``), and the point's values become coordinates along ``run`` in :func:`flowsim.open`, named
by the key with ``.`` → ``_`` (``lr``, ``seed``, ``problem_n_train``, ``runs_gd_lr``), next to ``run_name``
(the key of the run in ``runs:``). The built-in run coordinates (``process``, ``rule``, ``policy``, ``lr``,
``max_lr``, ``batch_size``, ``seed``) always hold the value the run actually used. Select a point with
``ds.isel(run=(ds.lr == 0.05) & (ds.seed == 1))``, or with :func:`select`, which also renames the runs back to
their ``runs:`` keys so the result looks like the store of an unswept scenario.
This module runs nothing.
"""
from __future__ import annotations

import copy
import math
import itertools
import json
from dataclasses import dataclass, field

import xarray as xr

from flowsim.scenario import Scenario, ScenarioError, load, unknown_key
from flowsim.solvers import RULES, make_rule

BUILTIN_COORDS = ("process", "rule", "policy", "lr", "max_lr", "batch_size", "seed")


@dataclass(frozen=True)
class Task:
    """One run of one sweep point: stored as group ``runs/<name>``; ``coords`` are the point's sweep values."""
    name: str
    key: str
    scenario: Scenario
    coords: dict = field(default_factory=dict)
    order: int = 0


def coord_name(key: str) -> str:
    """Coordinate name of a sweep key: ``problem.n_train`` → ``problem_n_train``."""
    return key.replace(".", "_")


def _set(doc: dict, key: str, value) -> None:
    """Set sweep ``key`` to ``value`` in a scenario document (see the module docstring)."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] not in Scenario.model_fields:
        for run in doc["runs"].values():
            run[key] = value
        return
    if parts[0] not in Scenario.model_fields or parts[0] == "sweep":
        allowed = [k for k in Scenario.model_fields if k != "sweep"] if parts[0] != "sweep" else []
        raise ScenarioError(f"sweep.{key}: {parts[0]!r} is not a scenario key"
                            + unknown_key(parts[0], allowed).removeprefix("unknown key"))
    node = doc
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ScenarioError(f"sweep.{key}: {'.'.join(parts[:i + 1])} is not a mapping")
    node[parts[-1]] = value


def _scale(doc: dict, kappa) -> None:
    """Apply sweep key ``scale`` = κ to a scenario document (see the module docstring)."""
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not kappa > 0:
        raise ScenarioError(f"sweep.scale: κ must be a positive number, got {kappa!r}")
    for name, run in doc["runs"].items():
        where = f"sweep.scale: run {name!r}"
        if run.get("batch_size") is None:
            raise ScenarioError(f"{where} has no batch_size to scale (a scaling rule trades batch size for step size)")
        if run.get("lr") is None or run.get("step_size") is not None:
            raise ScenarioError(f"{where} needs a constant lr to scale (no step_size policy)")
        batch = run["batch_size"] * kappa
        if abs(batch - round(batch)) > 1e-9:
            raise ScenarioError(f"{where}: batch_size {run['batch_size']} × κ = {kappa} is not a whole number")
        rule_name = run.get("rule", "gd")
        fields = set(RULES[rule_name].__dataclass_fields__) if rule_name in RULES else set()
        try:
            rule, factor = make_rule(rule_name, **{k: v for k, v in run.items() if k in fields}).scaled(kappa)
        except ValueError as e:
            raise ScenarioError(f"{where}: {e}") from None
        run.update(rule.hyperparameters(), batch_size=round(batch), lr=run["lr"] * factor)
    doc["steps"] = math.ceil(doc["steps"] / kappa - 1e-9)


def _label(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("/", "_").replace("[", "(").replace("]", ")").replace(",", ";")


def expand(sc: Scenario) -> list[Task]:
    """Every (point, run) of a scenario as a :class:`Task`, point-major; a scenario without a sweep gives its
    runs under their own names. Raises ScenarioError (one line naming the key) for a point that is not valid."""
    if not sc.sweep:
        return [Task(name, name, sc, {}, order) for order, name in enumerate(sc.runs)]
    base = sc.model_dump(mode="json", exclude_none=True)
    base.pop("sweep")
    keys = list(sc.sweep)
    names = [coord_name(k) for k in keys]
    if len(set(names)) != len(names):
        raise ScenarioError(f"sweep: keys {keys} give the same coordinate name twice")
    tasks: list[Task] = []
    for values in itertools.product(*(sc.sweep[k] for k in keys)):
        doc = copy.deepcopy(base)
        for k, v in zip(keys, values):
            if k != "scale":
                _set(doc, k, v)
        if "scale" in keys:
            _scale(doc, values[keys.index("scale")])
        label = ",".join(f"{n}={_label(v)}" for n, v in zip(names, values))
        try:
            point = load(doc)
        except ScenarioError as e:
            raise ScenarioError(f"sweep point [{label}]: {e}") from None
        if "seed" in keys:
            own = [r for r, spec in point.runs.items() if spec.seed is not None]
            if own:
                raise ScenarioError(f"sweep.seed: run {own[0]!r} sets its own seed; sweep runs.{own[0]}.seed instead")
        coords = {n: v for n, v in zip(names, values) if n not in BUILTIN_COORDS}
        for key in point.runs:
            tasks.append(Task(f"{key}[{label}]", key, point, {**coords, "run_name": key}, len(tasks)))
    if len({t.name for t in tasks}) != len(tasks):
        raise ScenarioError("sweep: two points give the same run name; use values that differ as text")
    return tasks


def problem_key(sc: Scenario) -> str:
    """What a scenario's Problem depends on; points of a sweep with the same key share one Problem."""
    return json.dumps([sc.problem.model_dump(mode="json"), sc.dtype, sc.device, sc.seed], sort_keys=True)


def select(ds: xr.Dataset, **coords) -> xr.Dataset:
    """The runs of one sweep point (``select(ds, lr=0.05, seed=1)``), with ``run`` renamed to the ``runs:`` keys."""
    mask = True
    for name, value in coords.items():
        if name not in ds.coords:
            raise KeyError(f"{name!r} is not a run coordinate; have {sorted(c for c in ds.coords if ds[c].dims == ('run',))}")
        mask = mask & (ds[name] == value)
    part = ds.isel(run=mask) if coords else ds
    if "run_name" in part.coords and len(set(part.run_name.values.tolist())) == part.sizes["run"]:
        part = part.assign_coords(run=part.run_name.values).drop_vars("run_name")
    return part
