"""Wall time per step of the central flow at the edge of stability, for a guard against slowdowns of its field.

``python -m benchmarks central-speed [--quick]``: on one CPU thread, the float64 tanh MLP 64-32-32-4 on 400
digits of classes 0-3 (MSE) runs the central flow (4 Euler substeps, no shadow discrete run) of gd at η = 0.5 and
of rmsprop at η = 0.004 (β2 = 0.99, ε = 1e-3) for 150 steps into the edge of stability, then times 30 more steps
one by one. It prints the median and minimum milliseconds per step, the number of critical directions at the
last step, and the ratio of the median to ``BASELINE_MS`` (gd's median measured on the development machine before
the central flow became generic over rules; a ratio above 1.10 flags a slowdown there). Timings on another
machine, or on a busy one, are not comparable to the baseline. Uses only the public API; writes nothing.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from flowsim.models import build_problem
from flowsim.solvers import Central, make_rule
from flowsim.solvers.central import CentralOptions

from benchmarks.bench import parser

BASELINE_MS = {"gd": 122.9}
PROBLEM = {"model": "mlp", "widths": [64, 32, 32], "activation": "tanh", "dataset": "digits",
           "classes": [0, 1, 2, 3], "n_train": 400, "loss": "mse"}
CASES = {"gd": (0.5, {}), "rmsprop": (0.004, {"beta2": 0.99, "eps": 1e-3})}


def time_steps(rule_name: str, warmup: int = 150, timed: int = 30) -> tuple[list[float], int]:
    """Seconds per step of ``timed`` steps after ``warmup`` steps, and the critical directions at the end."""
    problem = build_problem(PROBLEM, dtype="float64", device="cpu")
    lr, hyper = CASES[rule_name]
    process = Central(problem, make_rule(rule_name, **hyper), options=CentralOptions(substeps=4, shadow=False))
    traj = process.start(problem.w0)
    for _ in range(warmup):
        process.step(traj, lr, measure=False)
    times = []
    for _ in range(timed):
        t0 = time.perf_counter()
        process.step(traj, lr, measure=False)
        times.append(time.perf_counter() - t0)
    return times, process.last["X"].shape[0]


def main(argv: Optional[list[str]] = None) -> int:
    args = parser("central-speed", "Milliseconds per step of the central flow at the edge (gd, rmsprop) against "
                  "the baseline.", quick="20 warm-up steps, 5 timed").parse_args(argv)
    torch.set_num_threads(1)
    for name in CASES:
        times, k = time_steps(name, 20, 5) if args.quick else time_steps(name)
        median, best = 1e3 * statistics.median(times), 1e3 * min(times)
        line = f"{name:8s} median {median:7.1f} ms/step  min {best:7.1f} ms/step  critical directions {k}"
        if name in BASELINE_MS:
            line += f"  ratio to baseline {median / BASELINE_MS[name]:.3f} (baseline {BASELINE_MS[name]} ms)"
        print(line, flush=True)
    return 0
