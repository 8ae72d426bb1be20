"""The ``sde-fidelity`` benchmark: the SDE ensemble of each rule against its minibatch ensemble, and SVAG's verdict.

For Adam, RMSProp and EMA momentum at B = 4 it prints the gap between the mean loss (and the mean norm of each
state tensor) of ``--runs`` discrete runs and as many SDE paths: the largest over the steps and the average,
relative to the discrete mean (target: within 10 %), with the standard error of the average. Then
:func:`flowsim.sde_check.does_the_sde_hold` (SVAG l = 1, 2, 4, 8) gives its verdict on each. Two problems: the
*tuning* one (a tanh MLP 4-16-1 on 64 teacher-student examples, where the SDE's construction was checked) and a
*held-out* one no choice was made on (a GELU MLP 8-32-3 on 96 examples of a 3-class Gaussian mixture,
cross-entropy).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.bench import parser
from flowsim.models import build_problem
from flowsim.sde_check import discrete_ensemble, does_the_sde_hold, sde_ensemble
from flowsim.solvers import make_rule

PROBLEMS = {
    "tuning": {"model": "mlp", "widths": [16], "activation": "tanh", "n_train": 64,
               "dataset": {"name": "teacher_student", "dim": 4, "outputs": 1}},
    "held-out": {"model": "mlp", "widths": [32], "activation": "gelu", "n_train": 96, "loss": "ce",
                 "dataset": {"name": "gaussian_mixture", "dim": 8, "n_classes": 3}},
}
RULES = [("adam", {}, 0.01), ("rmsprop", {}, 0.01), ("momentum", {"beta1": 0.9}, 0.1)]  # (rule, hyper, η)


def main(argv: list[str]) -> int:
    p = parser("sde-fidelity", __doc__.splitlines()[0], quick="8 runs, 30 steps, the tuning problem")
    p.add_argument("--runs", type=int, default=64, help="discrete runs and SDE paths per rule (default 64)")
    p.add_argument("--steps", type=int, default=200, help="steps per run (default 200)")
    args = p.parse_args(argv)
    runs, steps = (8, 30) if args.quick else (args.runs, args.steps)
    torch.set_num_threads(1)
    for label, spec in list(PROBLEMS.items())[:1 if args.quick else None]:
        problem = build_problem(spec, device="cpu")
        print(f"{label}: {problem}, B = 4, {runs} runs, {steps} steps")
        print(f"  {'rule':<9} {'quantity':<8} {'largest gap':>12} {'mean gap':>9} {'± SE':>7}")
        for name, hyper, lr in RULES:
            rule, t0 = make_rule(name, **hyper), time.perf_counter()
            discrete = discrete_ensemble(problem, rule, lr, steps, 4, runs)
            sde = sde_ensemble(problem, rule, lr, steps, 4, runs, options={"substeps": 4})
            for key in discrete:
                d, s = discrete[key][1:], sde[key][1:]
                scale = np.abs(d.mean(1))
                rel = np.abs(s.mean(1) - d.mean(1)) / scale
                se = np.sqrt(d.var(1) / runs + s.var(1) / runs) / scale
                k = int(np.nanargmax(rel))
                print(f"  {name:<9} {key.removesuffix('_norm'):<8} {100 * rel[k]:>7.1f} % @{k + 1:<3} "
                      f"{100 * np.nanmean(rel):>7.1f} % {100 * np.nanmean(se):>5.1f} %")
            verdict = does_the_sde_hold(problem, rule, lr, steps, 4, seeds=runs)["verdict"]
            print(f"  {name:<9} {verdict} [{time.perf_counter() - t0:.0f} s]")
    return 0
