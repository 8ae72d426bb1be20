"""flowsim: discrete optimizers and their continuous approximations at the edge of stability, side by side.

Public surface: :func:`run` (a scenario → a Dataset), :func:`simulate` (one process of one rule under one
step-size policy on a Problem, from objects, no YAML), :func:`open` (a store → a Dataset), :func:`compare` (runs
against a reference run), :class:`Problem`, :class:`RecordSpec` (what a run records), :func:`load_scenario`.
Models live in ``flowsim.models``; update rules, processes, step-size policies and the simulation loop in
``flowsim.solvers``.
"""
__version__ = "0.1.0"

from flowsim.compare import compare  # noqa: E402
from flowsim.models.problem import Problem  # noqa: E402
from flowsim.runner import run, simulate  # noqa: E402
from flowsim.scenario import RecordSpec, Scenario, ScenarioError  # noqa: E402
from flowsim.scenario import load as load_scenario  # noqa: E402
from flowsim.store import open  # noqa: E402,A001



def __getattr__(name: str):
    """``flowsim.plot`` and ``flowsim.report`` (they load matplotlib) and ``flowsim.data`` without a separate
    import, on first use."""
    if name in ("plot", "report", "data"):
        import importlib
        return importlib.import_module(f"flowsim.{name}")
    raise AttributeError(f"module 'flowsim' has no attribute {name!r}")


__all__ = ["Problem", "RecordSpec", "compare", "Scenario", "ScenarioError", "load_scenario", "open", "run",
           "simulate", "__version__"]
