"""The registry of update rules: every optimizer of :mod:`flowsim.solvers.rules` by its scenario name.

Each rule is one :class:`~flowsim.solvers.rules.base.Rule` subclass in its own module here, declaring what the rest
of flowsim needs to know of it (its stability threshold, the edge controller's default fraction, which flows
apply); adding one is its module, its line in :data:`RULES` and its tests. This module holds no rule's facts.
"""
from __future__ import annotations

from dataclasses import fields

import pydantic

from flowsim.solvers.rules.adam import Adam
from flowsim.solvers.rules.adamw import AdamW
from flowsim.solvers.rules.base import Rule, State
from flowsim.solvers.rules.gd import GD
from flowsim.solvers.rules.lion import Lion
from flowsim.solvers.rules.momentum import Momentum
from flowsim.solvers.rules.nadam import NAdam
from flowsim.solvers.rules.nesterov import Nesterov
from flowsim.solvers.rules.rmsprop import RMSProp, ScalarRMSProp

RULES: dict[str, type[Rule]] = {r.name: r for r in (GD, Momentum, Nesterov, ScalarRMSProp, RMSProp, Adam, NAdam,
                                                    AdamW, Lion)}

def make_rule(name: str, /, **hyper) -> Rule:
    """Look a rule up by name and type-check its hyperparameters; errors name the offending key."""
    if name not in RULES:
        raise ValueError(f"rule: unknown rule {name!r}; choose from {sorted(RULES)}")
    cls = RULES[name]
    known = [f.name for f in fields(cls)]
    unknown = set(hyper) - set(known)
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: not a hyperparameter of rule {name!r} "
                         f"(it takes {', '.join(known) or 'none'})")
    try:
        return pydantic.TypeAdapter(cls).validate_python(hyper, strict=False)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        raise ValueError(f"{'.'.join(map(str, err['loc']))}: {msg}" if err["loc"] else msg) from None


def given_twice(rule: Rule, hyperparameters: dict) -> str:
    """The one-line message for a rule object passed with hyperparameters beside it (by ``flowsim.simulate`` and
    the SDE check, which take a rule object or a name with its hyperparameters)."""
    return (f"{sorted(hyperparameters)[0]}: give the rule's hyperparameters in its object ({type(rule).__name__}(...)) "
            "or with its name, not both")


__all__ = ["RULES", "Adam", "AdamW", "GD", "Lion", "Momentum", "NAdam", "Nesterov", "RMSProp", "Rule", "ScalarRMSProp",
           "State", "given_twice", "make_rule"]
