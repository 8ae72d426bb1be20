"""docs/scenario-reference.md, generated from the scenario's pydantic models (one source of truth; a test fails
when the file drifts). Regenerate with ``python -m flowsim.scenario_reference > docs/scenario-reference.md``."""
from __future__ import annotations

import inspect
import types
from dataclasses import MISSING, fields
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from flowsim.models import CONFIGS
from flowsim.models.base import InitFile
from flowsim.models.datasets import DatasetSpec
from flowsim.scenario import CompareSpec, RecordSpec, RunSpec, Scenario, _is_model
from flowsim.solvers import POLICIES, PROCESSES, RULES

REGENERATE = "python -m flowsim.scenario_reference > docs/scenario-reference.md"
BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥"}


def _type(t, metadata=()) -> str:
    """A field's type in words, with its bounds (from ``metadata`` and Annotated)."""
    if get_origin(t) is Annotated:
        return _type(get_args(t)[0], [*metadata, *t.__metadata__])
    if get_origin(t) in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type(m, metadata) for m in get_args(t) if m is not type(None)))
    if get_origin(t) is Literal:
        name = "one of " + ", ".join(f"`{v}`" for v in get_args(t))
    elif get_origin(t) in (list, dict):
        name = f"{get_origin(t).__name__} of {_type(get_args(t)[-1])}"
    else:
        name = "mapping" if _is_model(t) else t.__name__
    bounds = [f"{sign} {getattr(m, key)}" for m in metadata for key, sign in BOUNDS.items()
              if getattr(m, key, None) is not None]
    return ", ".join([name, *bounds])


def _value(v) -> str:
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="json", exclude_defaults=True)
    return "`" + yaml.safe_dump(v, default_flow_style=True, width=1000).removesuffix("...\n").strip() + "`"


def _cell(text) -> str:
    return (text or "").replace("|", "\\|").replace("<", "&lt;")


def _table(rows) -> list[str]:
    return ["| key | type | default | description |", "|---|---|---|---|",
            *(f"| `{key}` | {_cell(kind)} | {default} | {_cell(text)} |" for key, kind, default, text in rows), ""]


def _model_rows(model: type[BaseModel], skip=()) -> list[tuple]:
    rows = []
    for key, f in model.model_fields.items():
        if key not in skip:
            default = "required" if f.is_required() else _value(f.get_default(call_default_factory=True))
            rows.append((key, _type(f.annotation, f.metadata), default, f.description))
    return rows


def _section(title: str, doc, rows) -> list[str]:
    return [title, "", *([inspect.cleandoc(doc), ""] if doc else []), *(_table(rows) if rows else ["No keys.", ""])]


def reference_markdown() -> str:
    lines = ["# Scenario reference", "",
             f"Generated from the pydantic models of `flowsim.scenario`; do not edit. Regenerate with `{REGENERATE}`.",
             "A key that is absent takes its default; a default of `null` means absent (see the description).", ""]
    lines += _section("## Top level", Scenario.__doc__, _model_rows(Scenario))
    lines += ["## `problem`", "", "`model` chooses the problem; each takes the keys below.", ""]
    for config in CONFIGS:
        lines += _section(f"### model: {' | '.join(get_args(config.model_fields['model'].annotation))}",
                          config.__doc__, _model_rows(config))
    lines += _section("### `problem.dataset`", DatasetSpec.__doc__, _model_rows(DatasetSpec))
    lines += _section("### `problem.init`", "A flat vector of initial weights, or `{path: w0.npy}`.",
                      _model_rows(InitFile))
    lines += _section("## `runs.<name>`", RunSpec.__doc__, _model_rows(RunSpec))
    lines += ["### Rule hyperparameters (`runs.<name>`, by rule)", ""]
    for name, rule in RULES.items():
        rows = [(f.name, f.type, "required" if f.default is MISSING else _value(f.default),
                 f.metadata.get("description")) for f in fields(rule)]
        lines += _section(f"#### rule: {name}", rule.__doc__, rows)
    lines += ["### Process options (`runs.<name>`, by process)", ""]
    for name, process in PROCESSES.items():
        lines += _section(f"#### process: {name}", process.__doc__, _model_rows(process.Options))
    lines += ["### Step-size policies (`runs.<name>.step_size`)", ""]
    for name, policy in POLICIES.items():
        lines += _section(f"#### step_size: {name}", policy.__doc__, _model_rows(policy, skip=("lr",)))
    lines += _section("## `record`", RecordSpec.__doc__, _model_rows(RecordSpec))
    lines += _section("## `compare`", CompareSpec.__doc__, _model_rows(CompareSpec))
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
