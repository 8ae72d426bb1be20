"""Update rules (what an optimizer does) and processes (how it is run: discrete, flows, SDE).

``PROCESSES`` and ``RULES`` are the registries that scenario names resolve through.
"""
from flowsim.solvers.processes import Discrete, EpochSampler, Process, Schedule, Trajectory
from flowsim.solvers.rules import RULES, Rule, make_rule

PROCESSES: dict[str, type[Process]] = {p.name: p for p in (Discrete,)}

__all__ = ["PROCESSES", "RULES", "Discrete", "EpochSampler", "Process", "Rule", "Schedule", "Trajectory",
           "make_rule"]
