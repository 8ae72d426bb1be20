"""The ``flows`` benchmark: cost per unit of time of the continuous processes against the discrete step.

Not a test: it prints seconds per unit of time (one unit = one optimizer step) and the ratios stable flow / GD,
modified flow / GD and SDE / SGD, on the quickstart MLP (digits, 1000 examples, 2 × 64 tanh, float64), at a
point of the GD trajectory past 2/η (after ``warmup`` GD steps at η = 0.4, where S_eff = ηS ≈ 2.5)
so that the substeps chosen from the sharpness are those a run at the edge needs.
"""
from __future__ import annotations

import time

import torch

from flowsim.models import build_problem
from flowsim.solvers import PROCESSES, Schedule, make_rule

MODEL = {"model": "mlp", "widths": [64, 64], "activation": "tanh", "dataset": "digits", "n_train": 1000,
         "loss": "mse"}


def _per_unit(problem, name: str, w, lr: float, units: int, batch_size=None, **options) -> tuple[float, int]:
    """(seconds per unit, substeps of the last unit) of process ``name`` from w, after one warm-up unit."""
    cls = PROCESSES[name]
    process = cls(problem, make_rule("gd"), Schedule(lr), seed=0, batch_size=batch_size,
                  options=cls.Options(**options))
    traj = process.start(w)
    process.step(traj, measure=False)
    t0 = time.perf_counter()
    for _ in range(units):
        process.step(traj, measure=False)
    seconds = (time.perf_counter() - t0) / units
    return seconds, process.substeps(traj, lr) if hasattr(process, "substeps") else 1


def flows(warmup: int = 200, units: int = 5, lr: float = 0.4, batch_size: int = 32) -> int:
    problem = build_problem(MODEL, dtype="float64", device="cpu")
    gd = PROCESSES["discrete"](problem, make_rule("gd"), Schedule(lr))
    traj = gd.start(problem.w0)
    for _ in range(warmup):
        gd.step(traj, measure=False)
    w = traj.w
    print(f"flows: quickstart MLP ({problem.n_params} params, {problem.n_examples} examples, float64, "
          f"{torch.get_num_threads()} threads), from GD step {warmup} at η = {lr}; seconds per unit of time")
    t_gd, _ = _per_unit(problem, "discrete", w, lr, 4 * units)
    t_sgd, _ = _per_unit(problem, "discrete", w, lr, 4 * units, batch_size=batch_size, sampling="iid")
    rows = [("GD (full batch)", t_gd, 1, None), (f"SGD (B = {batch_size})", t_sgd, 1, None)]
    for label, name, base, opts in [("stable flow, rk4", "stable", t_gd, {"method": "rk4"}),
                                    ("stable flow, euler", "stable", t_gd, {"method": "euler"}),
                                    ("modified flow, rk4", "modified", t_gd, {"method": "rk4"}),
                                    (f"SDE, euler (B = {batch_size})", "sde", t_sgd, {"method": "euler"})]:
        seconds, substeps = _per_unit(problem, name, w, lr, units, batch_size=batch_size if name == "sde" else None,
                                      **opts)
        rows.append((label, seconds, substeps, seconds / base))
    for label, seconds, substeps, ratio in rows:
        vs = "" if ratio is None else f"  ratio {ratio:7.1f} × {'SGD' if 'SDE' in label else 'GD'}"
        print(f"  {label:<26} {seconds * 1e3:9.2f} ms/unit  substeps {substeps:3d}{vs}")
    return 0
