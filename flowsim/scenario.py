"""The scenario schema (pydantic): what to run, on what, and what to record.

A scenario is YAML text or a dict with the structure of DESIGN.md. Validation is strict: an unknown key, a
wrong type or an impossible value raises :class:`ScenarioError` with one line naming the key. Checks that need
the data (batch larger than the data set, a missing file) happen when the problem is built, before any store
is written. This module runs nothing.
"""
from __future__ import annotations

import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from flowsim.models import CONFIGS, MODELS
from flowsim.solvers import POLICIES, PROCESSES, StepSize, make_rule


class ScenarioError(ValueError):
    """A scenario that cannot run; the message is one line that names the offending key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


StepSizeSpec = Union[str, dict]


class RunSpec(BaseModel):
    """One run: a process over an update rule under a step-size policy.

    ``lr`` alone is the constant step size; ``step_size`` names a policy beside it (``{drop: {at, lr_after}}``)
    or instead of it (``edge``, or ``{edge: {...}}``: the controller sets η). Keys beside the common ones are the
    rule's hyperparameters (``beta1``, ``beta2``, ``eps``, …) or the process's options (its ``Options`` model);
    any other key is an error.
    """
    model_config = ConfigDict(extra="allow")
    process: str = "discrete"
    rule: str = "gd"
    lr: Optional[PositiveFloat] = Field(None, description="the step size (constant, or before a drop)")
    step_size: Optional[StepSizeSpec] = Field(None, description="a policy: edge, {edge: {...}} or {drop: {at, "
                                              "lr_after}} (absent = constant lr)")
    batch_size: Optional[PositiveInt] = Field(None, description="absent = full batch")
    seed: Optional[int] = Field(None, description="minibatch/noise seed; defaults to the scenario seed")

    @field_validator("process")
    @classmethod
    def _known_process(cls, v):
        if v not in PROCESSES:
            raise ValueError(f"unknown process {v!r}; choose from {sorted(PROCESSES)}")
        return v

    @model_validator(mode="after")
    def _split_extras(self):
        extras = dict(self.model_extra or {})
        options_model = PROCESSES[self.process].Options
        opts = {k: extras.pop(k) for k in list(extras) if k in options_model.model_fields}
        for key in extras:
            elsewhere = [name for name, cls in PROCESSES.items() if key in cls.Options.model_fields]
            if elsewhere:
                raise ValueError(f"{key}: does not apply to process {self.process!r} (an option of "
                                 f"{', '.join(elsewhere)})")
        self._hyper = extras
        self.make_rule()
        try:
            self._options = options_model.model_validate(opts)
        except ValidationError as e:
            raise ValueError(_format_error(e)) from None
        self._policy = _make_policy(self.step_size, self.lr)
        return self

    def rule_hyperparameters(self) -> dict:
        return dict(self._hyper)

    def make_rule(self):
        return make_rule(self.rule, **self._hyper)

    @property
    def options(self) -> BaseModel:
        """The process's validated options."""
        return self._options

    @property
    def policy(self) -> StepSize:
        """The run's step-size policy."""
        return self._policy


def _make_policy(spec: Optional[StepSizeSpec], lr: Optional[float]) -> StepSize:
    """The step-size policy of a run's ``step_size`` and ``lr`` keys (errors name the key)."""
    if spec is None:
        spec = "constant"
    if isinstance(spec, str):
        kind, options = spec, {}
    elif len(spec) == 1 and isinstance(next(iter(spec.values())), (dict, type(None))):
        kind, options = next(iter(spec.items()))
        options = options or {}
    else:
        raise ValueError(f"step_size: give one policy, as a name or {{name: {{options}}}}; choose from {sorted(POLICIES)}")
    if kind not in POLICIES:
        raise ValueError(f"step_size: unknown policy {kind!r}; choose from {sorted(POLICIES)}")
    cls = POLICIES[kind]
    if "lr" in cls.model_fields:
        if "lr" in options:
            raise ValueError(f"step_size.{kind}.lr: give it as the run's lr")
        if lr is None:
            raise ValueError(f"lr: required key is missing (the step size of the {kind} policy)")
        options = {**options, "lr": lr}
    elif lr is not None:
        raise ValueError(f"lr: does not apply with step_size {kind} (it sets η itself; its cap is step_size.{kind}.max_lr)")
    try:
        return cls.model_validate(options)
    except ValidationError as e:
        raise ValueError(f"step_size.{kind}.{_format_error(e)}") from None


class RecordSpec(Strict):
    """What is recorded. Steps are optimizer steps; step 0 is the initial point."""
    every: PositiveInt = Field(1, description="record loss and grad_norm every this many steps")
    projection_dim: NonNegativeInt = Field(256, description="size of the random projection w_proj (0 = none)")
    projection_every: PositiveInt = Field(10, description="record w_proj every this many steps")
    keep_weights: NonNegativeInt = Field(0, description="store the full weights w every this many steps (0 = never)")
    chunk: PositiveInt = Field(500, description="recorded rows per write to the store")
    divergence_factor: PositiveFloat = Field(
        1e6, description="a run diverges when its loss is not finite or exceeds this × max(L(w0), 1)")
    curvature_every: Optional[PositiveInt] = Field(
        None, description="measure sharpness, eigs and threshold every this many steps (absent = never)")
    top_k: PositiveInt = Field(1, description="number of top Hessian eigenvalues recorded in eigs")
    eig_tol: PositiveFloat = Field(
        1e-3, description="eigensolver tolerance: estimated eigenvalue error ≤ this × the largest |top-k eigenvalue| "
        "(top_eigenpairs values_only)")
    precond: bool = Field(False, description="also record precond_sharpness λ_max(P̃⁻¹H) of the rule's preconditioner")
    noise_kernel: bool = Field(False, description="also record noise_kernel_norm K and grad_noise_trace (minibatch runs, mse)")
    curvature_examples: Optional[PositiveInt] = Field(
        None, description="measure curvature on the first this many training examples (absent = all)")
    noise_kernel_examples: PositiveInt = Field(128, description="K and grad_noise_trace use the first this many examples")
    stochastic_edge: bool = Field(
        False, description="also record batch_sharpness E_B[g_BᵀH_Bg_B/‖g_B‖²] and second_moment_contraction "
        "λ_max(E_B[(I − ηH_B)²]) with the curvature (minibatch discrete runs; not recorded in full batch)")
    stochastic_edge_batches: PositiveInt = Field(
        8, description="batches E_B averages over: those of the run's next this many steps, as its sampler draws them")


class CompareSpec(Strict):
    reference: str


ProblemSpec = Annotated[Union[tuple(CONFIGS)], Field(discriminator="model")]
RUN_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class Scenario(Strict):
    name: str = "scenario"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float64"
    problem: ProblemSpec
    steps: PositiveInt
    runs: dict[str, RunSpec] = Field(..., min_length=1)
    record: RecordSpec = RecordSpec()
    compare: Optional[CompareSpec] = None
    sweep: Optional[dict[str, list]] = Field(
        None, description="key (dotted path, or a run key for every run) → values; cartesian product, see flowsim.sweep")
    batch: bool = Field(False, description="run discrete runs differing only in step size, schedule or seed (across "
                        "sweep points too) as one vmapped pass; equal to separate runs to rounding, see flowsim.batching")

    @field_validator("runs")
    @classmethod
    def _run_names(cls, runs):
        for name in runs:
            if not RUN_NAME.match(name):
                raise ValueError(f"run name {name!r} may only use letters, digits, '_', '-' and '.'")
        return runs

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo):
        if self.compare is not None and self.compare.reference not in self.runs:
            raise ValueError(f"compare.reference: {self.compare.reference!r} is not one of the runs {list(self.runs)}")
        for key, values in (self.sweep or {}).items():
            if not values:
                raise ValueError(f"sweep.{key}: give at least one value")
            if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
                raise ValueError(f"sweep.{key}: values must be scalars (numbers, strings, booleans or null)")
        for name, run in self.runs.items():
            drop = getattr(run.policy, "at", None)
            if drop is not None and drop > self.steps:
                message = f"runs.{name}.step_size.drop.at: {drop} is after the last step {self.steps}"
                if not (info.context or {}).get("preview"):
                    raise ValueError(message)
                warnings.warn(f"{message}: the drop is not reached", stacklevel=2)
        if self.record.noise_kernel and getattr(self.problem, "loss", None) != "mse":
            raise ValueError("record.noise_kernel: the noise kernel norm K is defined for networks with the mse loss")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    if len(loc) > 1 and loc[0] == "problem" and loc[1] in MODELS:
        loc.pop(1)
    loc = [p for p in loc if not p.startswith("function-")]
    msg = first["msg"].removeprefix("Value error, ")
    nested = re.match(r"^([A-Za-z_][\w.]*): (.*)$", msg)
    if nested:
        loc.append(nested.group(1))
        msg = nested.group(2)
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif first["type"] == "union_tag_invalid":
        loc.append("model")
        msg = f"unknown model {first['input'].get('model')!r}; choose from {sorted(MODELS)}"
    where = ".".join(loc) or "scenario"
    return f"{where}: {msg}"


def bundled() -> dict[str, Path]:
    """Scenario name → path of the YAML files shipped in ``flowsim.scenarios`` (``flowsim list``)."""
    folder = resources.files("flowsim.scenarios")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def load(source: Union[str, Path, dict, Scenario], preview: bool = False) -> Scenario:
    """Validate a scenario given as a YAML file path, the name of a bundled scenario (``"quickstart"``, from
    any directory), YAML text, a dict or a Scenario. ``preview``: a run shortened by ``--steps``, where a
    step-size drop after the last step warns instead of failing."""
    if isinstance(source, Scenario):
        return source
    if isinstance(source, str) and "\n" not in source and ":" not in source:  # a path or a bundled name
        if Path(source).is_file():
            source = Path(source)
        elif source in bundled():
            source = bundled()[source]
        else:
            raise ScenarioError(f"scenario: no file or bundled scenario named {source!r} (see flowsim list)")
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        if not path.is_file():
            raise ScenarioError(f"scenario file not found: {path}")
        source = path.read_text()
    if isinstance(source, str):
        try:
            source = yaml.safe_load(source)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ScenarioError(f"scenario is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(source, dict):
        raise ScenarioError("scenario: expected a mapping of keys (name, problem, steps, runs, …)")
    try:
        return Scenario.model_validate(source, context={"preview": preview})
    except ValidationError as e:
        raise ScenarioError(_format_error(e)) from None
