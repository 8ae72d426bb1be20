"""The scenario schema (pydantic): what to run, on what, and what to record.

A scenario is YAML text or a dict (every key: docs/scenario-reference.md). Validation is strict: an unknown key, a
wrong type or an impossible value raises :class:`ScenarioError` with one line naming the key (every error found,
in document order, joined by '; '; an unknown key gets the closest allowed key as a suggestion). Checks that need
the data (batch larger than the data set, a missing file) happen when the problem is built, before any store
is written. A relative file path (``FILE_KEYS``) in a scenario file is taken from the file's folder, in YAML
text or a dict from the working directory. This module runs nothing.
"""
from __future__ import annotations

import copy
import difflib
import re
import types
import warnings
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from flowsim.models import CONFIGS, MODELS
from flowsim.solvers import POLICIES, PROCESSES, RULES, StepSize, make_rule


class ScenarioError(ValueError):
    """A scenario that cannot run; the message is one line that names the offending key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


StepSizeSpec = Union[str, dict]


class RunSpec(BaseModel):
    """One run: a process over an update rule under a step-size policy.

    ``lr`` alone is the constant step size; ``step_size`` names a policy beside it (``{drop: {at, lr_after}}``)
    or instead of it (``edge``, ``cdat``, or ``{edge: {...}}``, ``{cdat: {...}}``: the policy sets η). Keys beside
    the common ones are the rule's hyperparameters (``beta1``, ``beta2``, ``eps``, …) or the process's options (its
    ``Options`` model); any other key is an error.
    """
    model_config = ConfigDict(extra="allow")
    process: str = Field("discrete", description=f"how the rule is run: {', '.join(PROCESSES)} (options below)")
    rule: str = Field("gd", description=f"the update rule: {', '.join(RULES)} (hyperparameters below)")
    lr: Optional[PositiveFloat] = Field(None, description="the step size η (constant, or before a drop)")
    step_size: Optional[StepSizeSpec] = Field(None, description="a policy: edge, {edge: {...}}, cdat, {cdat: {...}} "
                                              "or {drop: {at, lr_after}} (absent = constant lr)")
    batch_size: Optional[PositiveInt] = Field(None, description="examples per minibatch (absent = full batch)")
    seed: Optional[int] = Field(None, description="minibatch/noise seed; defaults to the scenario seed")

    @field_validator("process", "rule")
    @classmethod
    def _known(cls, v, info):
        known = PROCESSES if info.field_name == "process" else RULES
        if v not in known:
            raise ValueError(f"unknown {info.field_name} {v!r}; choose from {sorted(known)}")
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
            if not any(key in (f.name for f in fields(rule)) for rule in RULES.values()):
                allowed = [*type(self).model_fields, *options_model.model_fields,
                           *(f.name for f in fields(RULES[self.rule]))]
                raise ValueError(f"{key}: {unknown_key(key, allowed)}")
        self._hyper = extras
        self.make_rule()
        try:
            self._options = options_model.model_validate(opts)
        except ValidationError as e:
            raise ValueError(errors(e, opts, options_model)[0]) from None
        self._policy = _make_policy(self.step_size, self.lr)
        self._policy.check(self.make_rule())
        return self

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
        raise ValueError(errors(e, options, cls, prefix=("step_size", kind))[0]) from None


class RecordSpec(Strict):
    """What is recorded. Steps are optimizer steps; step 0 is the initial point."""
    every: PositiveInt = Field(1, description="record loss and grad_norm every this many steps (η, time and wall "
                               "time are recorded at every step)")
    projection_dim: NonNegativeInt = Field(256, description="size of the random projection w_proj (0 = none)")
    projection_every: PositiveInt = Field(10, description="record w_proj every this many steps")
    keep_weights: NonNegativeInt = Field(0, description="store the full weights w every this many steps (0 = never)")
    chunk: PositiveInt = Field(500, description="recorded rows per write to the store (and per zarr chunk); a run "
                               "writes sooner, its first row at once and then whenever a minute has passed since "
                               "its last write, so that a kill loses at most about a minute of work")
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
        "E_B‖(I − ηH_B)u‖², u the top Hessian eigenvector, with the curvature (minibatch SGD runs: discrete, "
        "rule gd; not recorded for other runs)")
    stochastic_edge_batches: PositiveInt = Field(
        8, description="batches E_B averages over: those of the run's next this many steps, as its sampler draws them")

    @model_validator(mode="after")
    def _keys_apply(self):
        """A key that only qualifies another measurement is an error without it (it recorded nothing, silently);
        its default is none (a record dumped whole and read back, as a sweep point's, holds every key)."""
        for key, needs in NEEDS.items():
            if getattr(self, key) != type(self).model_fields[key].default and not getattr(self, needs):
                raise ValueError(f"{key}: does not apply without {needs} (nothing would be recorded)")
        return self


NEEDS = {"top_k": "curvature_every", "eig_tol": "curvature_every", "curvature_examples": "curvature_every",
         "precond": "curvature_every", "noise_kernel": "curvature_every", "stochastic_edge": "curvature_every",
         "noise_kernel_examples": "noise_kernel", "stochastic_edge_batches": "stochastic_edge",
         "projection_every": "projection_dim"}
"""Each record key that qualifies another measurement, and the key that turns that measurement on."""


class CompareSpec(Strict):
    """What ``flowsim compare`` measures against."""
    reference: str = Field(description="the run the others are compared with (one of the runs' names)")


def check_record_applies(record: RecordSpec, loss: Optional[str], runs: Optional[dict[str, RunSpec]]) -> None:
    """The record keys that need a loss or a kind of run the scenario lacks, as a one-line ValueError: ``loss`` the
    problem's (None: a landscape), ``runs`` the runs (None: not known yet, as where a sweep may set batch_size)."""
    if record.stochastic_edge and runs is not None and not any(
            PROCESSES[run.process].iterates and RULES[run.rule].stochastic_edge and run.batch_size
            for run in runs.values()):
        applies = ", ".join(name for name, rule in RULES.items() if rule.stochastic_edge)
        raise ValueError(f"record.stochastic_edge: needs a minibatch SGD run (process discrete, a batch_size, "
                         f"rule {applies}); there is none")
    if record.noise_kernel and loss != "mse":
        raise ValueError("record.noise_kernel: the noise kernel norm K is defined for networks with the mse loss")


ProblemSpec = Annotated[Union[tuple(CONFIGS)], Field(discriminator="model")]
RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
"""A run's name is its group's folder in the store: no '/', no '.' or '..', no hidden folder."""


class Scenario(Strict):
    """A scenario: the runs to make on one problem and what to record of them."""
    name: str = Field("scenario", description="the scenario's name (the default store is <name>.zarr)")
    seed: int = Field(0, description="seed of the initial weights, minibatches and noise")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to run (auto: cuda when available)")
    dtype: Literal["float32", "float64"] = Field("float64", description="floating-point precision of the runs")
    problem: ProblemSpec = Field(description="the loss landscape or network and its data; model chooses which")
    steps: PositiveInt = Field(description="optimizer steps per run (step 0 is the initial point)")
    runs: dict[str, RunSpec] = Field(..., min_length=1, description="run name (letters, digits, _ - .) → run")
    record: RecordSpec = Field(RecordSpec(), description="what is recorded")
    compare: Optional[CompareSpec] = Field(None, description="the reference run of flowsim compare")
    sweep: Optional[dict[str, list]] = Field(
        None, description="key (dotted path, or a run key for every run) → values; cartesian product, see flowsim.sweep")
    batch: bool = Field(False, description="run discrete runs differing only in step size, schedule or seed (across "
                        "sweep points too) as one vmapped pass; equal to separate runs to rounding, see flowsim.batching")

    @field_validator("runs")
    @classmethod
    def _run_names(cls, runs):
        for name in runs:
            if not RUN_NAME.match(name):
                raise ValueError(f"run name {name!r} may only use letters, digits, '_', '-' and '.', and starts with "
                                 "a letter, a digit or '_'")
            if name == "zarr.json":
                raise ValueError("run name 'zarr.json' is the name of the store's own metadata file")
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
        check_record_applies(self.record, getattr(self.problem, "loss", None), None if self.sweep else self.runs)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def unknown_key(key, allowed) -> str:
    """The message for an unknown key: 'unknown key', with the closest allowed key as a suggestion."""
    close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1)
    return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")


def _members(t) -> list:
    """The types a field annotation may hold (through Annotated, Optional and Union)."""
    if get_origin(t) is Annotated:
        return _members(get_args(t)[0])
    if get_origin(t) in (Union, types.UnionType):
        return [m for a in get_args(t) for m in _members(a)]
    return [t]


def _is_model(t) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _keys_at(model: type[BaseModel], loc) -> list[str]:
    """The keys allowed in the mapping at pydantic error location ``loc`` (whose steps are fields, mapping keys,
    list indices and union tags) inside ``model``."""
    found = [model]
    for part in loc:
        found = [m for t in found for m in _members(t)]
        step = [t.model_fields[part].annotation for t in found if _is_model(t) and part in t.model_fields]
        step += [get_args(t)[-1] for t in found if get_origin(t) in (dict, list)]
        found = [MODELS[part]] if part in MODELS and MODELS[part] in found else step or found
    return [k for t in found for m in _members(t) if _is_model(m) for k in m.model_fields]


def _where_it_belongs(model: type[BaseModel], loc, around, path: list) -> str:
    """' (it belongs in ...)' for an unknown key at pydantic location ``loc`` (dotted ``path`` in the document)
    that is a key of the mapping around its own (at location ``around``; ``n_train`` written inside ``dataset``)
    or of a mapping beside it (``size`` written beside ``dataset``), else ''."""
    key = loc[-1]
    if around is not None and key in _keys_at(model, around):
        return f" (it belongs in {'.'.join(map(str, path[:-2])) or 'the scenario'}: {key}: ...)"
    for field in _keys_at(model, loc[:-1]):
        if key in _keys_at(model, (*loc[:-1], field)):
            return f" (it belongs in {'.'.join(map(str, [*path[:-1], field]))}: {{{key}: ...}})"
    return ""


_ABSENT = object()


def _child(node, part):
    """node[part] where node is a mapping with key part or a list with index part, else _ABSENT."""
    if isinstance(node, dict) and part in node or (isinstance(node, list) and isinstance(part, int)
                                                   and 0 <= part < len(node)):
        return node[part]
    return _ABSENT


def _position(doc, loc) -> tuple:
    """Where the key at loc is in doc, for sorting in document order: each step's index among its siblings (a
    key that is absent comes after them)."""
    position, node = [], doc
    for part in loc:
        if isinstance(node, dict):
            position.append(list(node).index(part) if part in node else len(node))
        elif isinstance(node, list) and isinstance(part, int):
            position.append(part)
        else:
            break
        node = _child(node, part)
    return tuple(position)


def errors(err: ValidationError, doc, model: type[BaseModel], prefix: tuple = ()) -> list[str]:
    """The errors of validating doc as model, each 'dotted.key: message' (keys below ``prefix``), one per key, in
    document order."""
    found = {}
    for e in err.errors():
        loc, node, at = [], doc, []  # the steps of e's location that are keys of doc (not union tags), and where
        for i, part in enumerate(e["loc"]):
            child = _child(node, part)
            if child is not _ABSENT or (i == len(e["loc"]) - 1 and e["type"] == "missing"):
                loc.append(part)
                at.append(i)
                node = child
        msg = e["msg"].removeprefix("Value error, ")
        nested = re.match(r"^([A-Za-z_][\w.\-]*): (.*)$", msg)
        if nested:
            loc += nested.group(1).split(".")
            msg = nested.group(2)
        if e["type"] == "extra_forbidden":
            msg = unknown_key(loc[-1], _keys_at(model, e["loc"][:-1]))
            if "did you mean" not in msg:
                around = e["loc"][:at[-2]] if len(at) >= 2 else None  # the mapping that holds the key's own
                msg += _where_it_belongs(model, e["loc"], around, [*prefix, *loc])
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "union_tag_invalid":
            loc.append("model")
            tag = e["input"].get("model")
            msg = ("a model's name, with its options beside it in problem (problem: {model: mlp, widths: [32], "
                   "dataset: digits}), got a mapping" if isinstance(tag, dict)
                   else f"unknown model {tag!r}; choose from {sorted(MODELS)}")
        found.setdefault(".".join(map(str, [*prefix, *loc])) or "scenario", (_position(doc, loc), msg))
    return [f"{where}: {msg}" for where, (_, msg) in sorted(found.items(), key=lambda item: item[1][0])]


FILE_KEYS = ("problem.dataset.path", "problem.init.path")


def _from_folder(doc: dict, folder: Path) -> dict:
    """A scenario file's ``doc`` with its relative ``FILE_KEYS`` paths (set, or swept in ``sweep``) made absolute
    from the file's ``folder``, so that the run and its stored scenario find them from any working directory."""
    def join(value):
        return str(folder / value) if isinstance(value, str) and not Path(value).is_absolute() else value
    doc = copy.deepcopy(doc)
    for key in FILE_KEYS:
        *parents, last = key.split(".")
        node = doc
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            node[last] = join(node[last])
        sweep = doc.get("sweep")
        swept = sweep.get(key) if isinstance(sweep, dict) else None
        if isinstance(swept, list):
            doc["sweep"][key] = [join(v) for v in swept]
    return doc


def bundled() -> dict[str, Path]:
    """Scenario name → path of the YAML files shipped in ``flowsim.scenarios`` (``flowsim list``)."""
    folder = resources.files("flowsim.scenarios")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def load(source: Union[str, Path, dict, Scenario], preview: bool = False) -> Scenario:
    """Validate a scenario given as a YAML file path, the name of a bundled scenario (``"quickstart"``, from
    any directory), YAML text, a dict or a Scenario. ``preview``: a run shortened by ``--steps``, where a
    step-size drop after the last step warns instead of failing. Relative file paths in a file are taken from
    its folder (:func:`_from_folder`), elsewhere from the working directory."""
    if isinstance(source, Scenario):
        return source
    folder = None
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
        source, folder = path.read_text(), path.resolve().parent
    if isinstance(source, str):
        try:
            source = yaml.load(source, Loader=_Loader)
        except yaml.YAMLError as e:
            where = _yaml_position(source, e)
            raise ScenarioError(f"scenario is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(source, dict):
        raise ScenarioError("scenario: expected a mapping of keys (name, problem, steps, runs, …)")
    if folder is not None:
        source = _from_folder(source, folder)
    try:
        return Scenario.model_validate(source, context={"preview": preview})
    except ValidationError as e:
        raise ScenarioError("; ".join(errors(e, source, Scenario))) from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does: ``1e-3`` and ``1e4`` are floats (PyYAML, after
    YAML 1.1, reads a float without a dot as text, and ``steps: 1e4`` was refused as not an integer)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _yaml_position(text: str, err: yaml.YAMLError) -> str:
    """' at line L, column C' (1-based) of the text a YAML error is about. Where the parser noticed it only at
    the end of the text, or at the next token after a key without ':', that is the last text before its mark."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return ""
    index = mark.index
    if not text[index:].strip() or getattr(err, "problem", None) == "could not find expected ':'":
        index = max(len(text[:index].rstrip()) - 1, 0)
    line, line_start = text.count("\n", 0, index) + 1, text.rfind("\n", 0, index) + 1
    return f" at line {line}, column {index - line_start + 1}"
