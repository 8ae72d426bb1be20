"""Benchmark ``central``: cost of one unit of time (one step) of the central flow against one discrete GD step.

On a float64 tanh MLP on 4-class digits, the step size is set so that exactly k = 1, 2, 3 effective eigenvalues
are above the edge (η = 2.05/λ_k, the SDCP threshold between λ_k and λ_{k+1}), and every repetition integrates the
unit of time that starts at the initial weights: the first substep solves an SDCP with k critical directions
and brings them to the edge, where the next three keep them (HVP counts are those of a warm start at a point
close to the previous one). Cost is reported in wall time and in gradient-equivalents (wall time over that of
one full-batch loss-and-gradient), with the Hessian-vector products the eigensolver used per unit of time.
"""
from __future__ import annotations

import time

import torch


def _timed(fn, repeats: int) -> float:
    """Mean wall time of ``repeats`` calls after one warm-up call (seconds)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def central(repeats: int = 5) -> int:
    import flowsim.solvers.central as central_mod
    from flowsim.models import build_problem
    from flowsim.solvers import Discrete, Schedule
    from flowsim.solvers.central import Central, CentralOptions
    from flowsim.solvers.rules import make_rule

    problem = build_problem({"model": "mlp", "widths": [32, 16], "activation": "tanh", "dataset": "digits",
                             "classes": [0, 1, 2, 3], "n_train": 200, "loss": "mse"}, dtype="float64", device="cpu")
    w = problem.w0
    H = torch.func.hessian(problem.loss)(w)
    lam = torch.linalg.eigvalsh(H).flip(0)
    gd = Discrete(problem, make_rule("gd"), Schedule(0.1))
    t_grad = _timed(lambda: problem.loss_and_grad(w), 10 * repeats)
    traj = gd.start(w)
    t_gd = _timed(lambda: gd.step(traj, measure=False), 10 * repeats)
    print(f"central: cost of one unit of time (4 Euler substeps) vs one GD step; MLP {problem.n_params} params, "
          f"{problem.n_examples} examples, float64, {torch.get_num_threads()} threads")
    print(f"  one gradient {t_grad * 1e3:.2f} ms; one discrete GD step {t_gd * 1e3:.2f} ms "
          f"({t_gd / t_grad:.2f} gradient-equivalents)")
    matvecs = []
    original = central_mod.top_eigenpairs

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        matvecs.append(out.matvecs)
        return out
    central_mod.top_eigenpairs = counting
    try:
        for k in (1, 2, 3):
            lr = 2.05 / lam[k - 1].item()
            crit = 0.5 * lr * (lam[k - 1] + lam[k]).item()
            process = Central(problem, make_rule("gd"), Schedule(lr),
                              options=CentralOptions(crit_threshold=min(crit, 1.95), shadow=False))
            matvecs.clear()
            # every repetition is the unit of time starting at w (so k stays fixed), warm-started from the last
            t = _timed(lambda: process.step(process.start(w), measure=False), repeats)
            per_unit = sum(matvecs) / (repeats + 1)
            print(f"  k = {k} (η = {lr:.4f}, effective eigenvalues {', '.join(f'{lr * x:.2f}' for x in lam[:k + 1])}):"
                  f" {t * 1e3:8.1f} ms per unit = {t / t_gd:6.1f} GD steps = {t / t_grad:6.1f} gradient-equivalents;"
                  f" {per_unit:.0f} HVPs per unit; {process.last['X'].shape[0]} critical at the start")
    finally:
        central_mod.top_eigenpairs = original
    return 0
