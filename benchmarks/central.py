"""The ``central`` benchmark: cost of one unit of time (one step) of the central flow against one discrete GD step.

On a float64 tanh MLP on 4-class digits, the step size is set so that exactly k = 1, 2, 3 effective eigenvalues
are above the edge (η = 2.05/λ_k, the SDCP threshold between λ_k and λ_{k+1}), and every repetition integrates the
unit of time that starts at the initial weights: the first substep solves an SDCP with k critical directions
and brings them to the edge, where the next three keep them (the eigensolver is warm-started from the previous
repetition, at a point close to it). Cost is reported in wall time and in gradient-equivalents (wall time over
that of one full-batch loss-and-gradient). The processes come from ``flowsim.solvers``; the Hessian-vector products
the central flow's eigensolver uses are internal to it and not counted here.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from benchmarks.bench import parser
from flowsim.models import build_problem
from flowsim.solvers import Central, Discrete, make_rule


def _timed(fn, repeats: int) -> float:
    """Mean wall time of ``repeats`` calls after one warm-up call (seconds)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def central(repeats: int = 5, ks: tuple[int, ...] = (1, 2, 3)) -> int:
    problem = build_problem({"model": "mlp", "widths": [32, 16], "activation": "tanh", "dataset": "digits",
                             "classes": [0, 1, 2, 3], "n_train": 200, "loss": "mse"}, dtype="float64", device="cpu")
    w = problem.w0
    print(f"central: cost of one unit of time (4 Euler substeps) vs one GD step; MLP {problem.n_params} params, "
          f"{problem.n_examples} examples, float64, {torch.get_num_threads()} threads; dense Hessian first …",
          flush=True)
    H = torch.func.hessian(problem.loss)(w)
    lam = torch.linalg.eigvalsh(H).flip(0)
    gd = Discrete(problem, make_rule("gd"))
    t_grad = _timed(lambda: problem.loss_and_grad(w), 10 * repeats)
    traj = gd.start(w)
    t_gd = _timed(lambda: gd.step(traj, 0.1, measure=False), 10 * repeats)
    print(f"  one gradient {t_grad * 1e3:.2f} ms; one discrete GD step {t_gd * 1e3:.2f} ms "
          f"({t_gd / t_grad:.2f} gradient-equivalents)", flush=True)
    for k in ks:
        lr = 2.05 / lam[k - 1].item()
        crit = 0.5 * lr * (lam[k - 1] + lam[k]).item()
        process = Central(problem, make_rule("gd"),
                          options=Central.Options(crit_threshold=min(crit, 1.95), shadow=False))
        # every repetition is the unit of time starting at w (so k stays fixed), warm-started from the last
        t = _timed(lambda: process.step(process.start(w), lr, measure=False), repeats)
        print(f"  k = {k} (η = {lr:.4f}, effective eigenvalues {', '.join(f'{lr * x:.2f}' for x in lam[:k + 1])}):"
              f" {t * 1e3:8.1f} ms per unit = {t / t_gd:6.1f} GD steps = {t / t_grad:6.1f} gradient-equivalents;"
              f" {process.last['X'].shape[0]} critical at the start", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("central", "Cost of one unit of time of the central flow (k = 1, 2, 3 critical directions) "
               "against one GD step.", quick="k = 1 only, 2 repetitions")
    args = p.parse_args(argv)
    return central(repeats=2, ks=(1,)) if args.quick else central()
