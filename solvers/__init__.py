"""The three axes of a run — update rules (what an optimizer does), processes (how it is run: discrete, flows,
SDE, central flow, rod flow) and step-size policies (how η is chosen) — and the one loop that advances them.

``RULES``, ``PROCESSES`` and ``POLICIES`` are the registries that scenario names resolve through.
"""
from flowsim.solvers.rules import (RULES, GD, Adam, AdamW, Lion, Momentum, NAdam, Nesterov, RMSProp, Rule,
                                   ScalarRMSProp, make_rule)
from flowsim.solvers.step_size import POLICIES, Cdat, Constant, Drop, Edge, StepContext, StepSize
from flowsim.solvers.processes import Discrete, EpochSampler, Process, Trajectory
from flowsim.solvers.flows import Modified, Stable
from flowsim.solvers.sde import SDE
from flowsim.solvers.central import Central
from flowsim.solvers.rod import Rod

PROCESSES: dict[str, type[Process]] = {p.name: p for p in (Discrete, Stable, Modified, SDE, Central, Rod)}

__all__ = ["GD", "POLICIES", "PROCESSES", "RULES", "Adam", "AdamW", "Cdat", "Central", "Constant", "Discrete", "Drop",
           "Edge", "EpochSampler", "Lion", "Modified", "Momentum", "NAdam", "Nesterov", "Process", "RMSProp", "Rod",
           "Rule", "SDE", "ScalarRMSProp", "Stable", "StepContext", "StepSize", "Trajectory", "make_rule"]
