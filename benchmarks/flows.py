"""The ``flows`` benchmark: cost per unit of time of the continuous processes against the discrete step.

It prints seconds per unit of time (one unit = one optimizer step) and the ratios stable flow / GD, modified
flow / GD, central flow / GD, rod flow / GD and SDE / SGD, on the quickstart's MLP and cnn-digits' CNN (``MODELS``), at a point
of the GD trajectory past 2/η (after warm-up GD steps, run by :func:`flowsim.simulate`) so that the substeps
chosen from the sharpness, and the central flow's critical directions, are those a run at the edge needs. Each process is built from
``flowsim.solvers.PROCESSES`` and timed over its own ``step`` from that point.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

import flowsim
from benchmarks.bench import parser
from flowsim.models import build_problem
from flowsim.solvers import PROCESSES, make_rule

# label: (problem, dtype, η past the edge, warm-up GD steps to get there) — the quickstart's MLP and cnn-digits' CNN
MODELS = {
    "quickstart MLP": ({"model": "mlp", "widths": [64, 64], "activation": "tanh", "dataset": "digits",
                        "n_train": 1000, "loss": "mse"}, "float64", 0.4, 200),
    "cnn-digits CNN": ({"model": "cnn", "widths": [16, 16], "pool": "avg", "activation": "tanh", "dataset": "digits",
                        "n_train": 500, "loss": "mse"}, "float32", 0.2, 300),
}


def _per_unit(problem, name: str, w, lr: float, units: int, batch_size=None, **options) -> tuple[float, int]:
    """(seconds per unit, substeps of the last unit) of process ``name`` from w, after one warm-up unit."""
    cls = PROCESSES[name]
    process = cls(problem, make_rule("gd"), seed=0, batch_size=batch_size, options=cls.Options(**options))
    traj = process.start(w)
    process.step(traj, lr, measure=False)
    t0 = time.perf_counter()
    for _ in range(units):
        process.step(traj, lr, measure=False)
    seconds = (time.perf_counter() - t0) / units
    return seconds, process.substeps(traj, lr) if hasattr(process, "substeps") else 1


def flows(warmup_scale: float = 1.0, units: int = 5, batch_size: int = 32) -> int:
    for label, (model, dtype, lr, warmup) in MODELS.items():
        warmup = max(1, int(warmup * warmup_scale))
        problem = build_problem(model, dtype=dtype, device="cpu")
        print(f"flows: {label} ({problem.n_params} params, {problem.n_examples} examples, {dtype}, "
              f"{torch.get_num_threads()} threads); {warmup} GD steps at η = {lr} first …", flush=True)
        gd = flowsim.simulate(problem, "gd", "discrete", lr, warmup,
                              record={"every": warmup, "projection_dim": 0, "keep_weights": warmup})
        w = torch.as_tensor(gd["w"].sel(step=warmup).values[0], dtype=problem.dtype)
        print(f"  from GD step {warmup}: seconds per unit of time", flush=True)
        t_gd, _ = _per_unit(problem, "discrete", w, lr, 4 * units)
        t_sgd, _ = _per_unit(problem, "discrete", w, lr, 4 * units, batch_size=batch_size, sampling="iid")
        rows = [("GD (full batch)", t_gd, 1, None), (f"SGD (B = {batch_size})", t_sgd, 1, None)]
        for name, opts, text in [("stable", {"method": "rk4"}, "stable flow, rk4"),
                                 ("stable", {"method": "euler"}, "stable flow, euler"),
                                 ("modified", {"method": "rk4"}, "modified flow, rk4"),
                                 ("sde", {"method": "euler"}, f"SDE, euler (B = {batch_size})"),
                                 ("central", {}, "central flow, euler"),
                                 ("rod", {}, "rod flow, rk4")]:
            print(f"  timing {text} …", flush=True)
            seconds, substeps = _per_unit(problem, name, w, lr, units,
                                          batch_size=batch_size if name == "sde" else None, **opts)
            rows.append((text, seconds, substeps, seconds / (t_sgd if name == "sde" else t_gd)))
        for text, seconds, substeps, ratio in rows:
            vs = "" if ratio is None else f"  ratio {ratio:7.1f} × {'SGD' if 'SDE' in text else 'GD'}"
            print(f"  {text:<26} {seconds * 1e3:9.2f} ms/unit  substeps {substeps:3d}{vs}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("flows", "Seconds per unit of time of every continuous process against GD/SGD, on two models.",
               quick="a tenth of the warm-up steps, one timed unit")
    args = p.parse_args(argv)
    return flows(warmup_scale=0.1, units=1) if args.quick else flows()
