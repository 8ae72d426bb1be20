"""Update rules (what an optimizer does) and processes (how it is run: discrete, flows, SDE).

``PROCESSES`` and ``RULES`` are the registries that scenario names resolve through.
"""
from flowsim.solvers.processes import Discrete, EpochSampler, Process, Schedule, Trajectory
from flowsim.solvers.rules import RULES, Rule, make_rule
from flowsim.solvers.flows import Modified, Stable  # noqa: E402
from flowsim.solvers.sde import SDE  # noqa: E402

from flowsim.solvers.central import Central  # noqa: E402
from flowsim.solvers.adaptive import Adaptive  # noqa: E402

PROCESSES: dict[str, type[Process]] = {p.name: p for p in (Discrete, Stable, Modified, SDE, Central, Adaptive)}

__all__ = ["PROCESSES", "RULES", "Discrete", "EpochSampler", "Process", "Rule", "Schedule", "Trajectory",
           "make_rule"]
