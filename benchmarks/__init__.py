"""flowsim's benchmarks: scripts that time flowsim against baselines and print the ratios, one run each.

They are not part of the installed package (``setup.cfg`` installs ``flowsim`` only) and use flowsim's public API
alone. Run one from the repository root with ``python -m benchmarks NAME [options]``; ``python -m benchmarks
--help`` lists them (``BENCHMARKS``) with their duration on 2 CPU cores, and ``python -m benchmarks NAME --help``
gives a benchmark's options (``--quick``: a short run that checks it works). What each measures and its last
measured figures: ``benchmarks/README.md``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: ``target`` ``"module:function"`` (the function takes the command-line arguments after the
    name and returns an exit code), its ``duration`` (``"full | --quick"``, wall time on 2 CPU cores with
    ``OMP_NUM_THREADS=1``) and what it measures (``about``)."""
    target: str
    duration: str
    about: str

    def load(self) -> Callable:
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)


BENCHMARKS: dict[str, Benchmark] = {
    "overhead": Benchmark("benchmarks.bench:main", "40 s | 5 s",
                          "flowsim.run against a bare torch loop doing the same 2000 GD steps (target ≤ 1.15)"),
    "curvature": Benchmark("benchmarks.curvature:main", "10 s | 10 s",
                           "top Hessian eigenvalue: warm-started Lanczos against PyHessian (bench extra)"),
    "flows": Benchmark("benchmarks.flows:main", "1 min | 10 s",
                       "seconds per unit of time of every flow and the SDE against GD/SGD, on an MLP and a CNN"),
    "central-fidelity": Benchmark("benchmarks.central_fidelity:main", "45 min | 40 s",
                                  "central flows of momentum and Adam against their discrete runs and stable flows "
                                  "at the edge (MLP, CNN): the four fidelity figures and the cost per step"),
    "flows-fidelity": Benchmark("benchmarks.flows_fidelity:main", "≈ 1.5 h | 1 min",
                                "the stable, central and rod flows of the 9 bundled central-flow scenarios against "
                                "their discrete runs: distance, edge, predicted loss, cost per unit of time"),
    "central-speed": Benchmark("benchmarks.central_speed:main", "5 min | 20 s",
                               "the central flow's cost per step in GD steps, part by part (central-gd-mlp, "
                               "-gd-cnn, -adam-mlp; targets ≤ 60 and 400 steps ≤ 5 min); --linear: against "
                               "k = 1..8 critical directions; --reference DIR: beside the JAX central-flows "
                               "reference (target ≥ 6x)"),
    "models": Benchmark("benchmarks.models:main", "7 s | 4 s",
                        "seconds per GD step and per HVP of each bundled network family"),
    "sweep": Benchmark("benchmarks.sweep:main_sweep", "10 s | 10 s",
                       "a 16-run sweep on a LocalCluster of 2 workers against in process (dist extra)"),
    "batched": Benchmark("benchmarks.sweep:main_batched", "10 s | 5 s",
                         "8 step sizes as one vmapped pass against 8 sequential runs"),
    "adaptive": Benchmark("benchmarks.adaptive:main", "25 min | 5 min",
                          "the edge step-size controller against tuned GD/Adam, CDAT, schedulefree, prodigy on 10 "
                          "tasks, a tuning and a held-out half (bench extra)"),
    "optim": Benchmark("benchmarks.optim:main", "1 min | 10 s",
                       "wall time per step of flowsim.optim.EdgeAdam against torch.optim.Adam, full batch and "
                       "minibatches of 32 (goal ≤ 1.3x)"),
    "sde-fidelity": Benchmark("benchmarks.sde:main", "17 min | 30 s",
                              "the SDE ensembles of Adam, RMSProp and EMA momentum against their minibatch "
                              "ensembles (target within 10 %), and SVAG's verdict, on a tuning and a held-out "
                              "problem"),
    "options": Benchmark("benchmarks.options:main", "≈ 5 min/half | 1 min",
                         "each option of the edge controller toggled from its defaults, on both halves of the "
                         "adaptive suite (needs an adaptive store)"),
}
"""Every benchmark by the name ``python -m benchmarks NAME`` takes."""
