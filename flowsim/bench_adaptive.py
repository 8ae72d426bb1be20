"""The ``adaptive`` benchmark: the adaptive process against tuned fixed-step baselines, steps and wall time to a
target loss, mean over 3 seeds (the seed sets the network's initialization and the minibatch order).

Not a test. Per task: GD/SGD over a log-spaced grid of 8 step sizes and Adam at its default η = 1e-3 and over a
grid of 8; the target is the full-batch training loss that the best grid GD (lowest mean final loss) reaches at
the budget, per seed. Each method's "steps" and "wall s" are those of the first step whose full-batch loss is at
or below the target (mean over the seeds that reach it; ``hit`` counts them); wall time counts everything the
method does per step (the adaptive process's curvature estimates included) and excludes the loss evaluations
made only for this table (minibatch tasks evaluate the full-batch loss every ``eval_every`` steps). Ratios are
best GD / method (> 1: the method is faster). The parameter-free baselines (schedulefree, prodigyopt; the
``bench`` extra) run when installed.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch

SEEDS = (0, 1, 2)
TASKS = {
    "mlp-digits": {
        "problem": {"model": "mlp", "widths": [64, 32, 32], "activation": "tanh", "dataset": "digits",
                    "classes": [0, 1, 2, 3], "n_train": 400, "loss": "mse"},
        "dtype": "float64", "steps": 300, "batch_size": None, "eval_every": 1,
        "gd": [0.05 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "cnn-mnist1d": {
        "problem": {"model": "cnn", "widths": [16, 16], "pool": "max", "activation": "relu", "n_train": 1000,
                    "loss": "mse", "dataset": {"name": "mnist1d", "size": 2000, "seed": 0}},
        "dtype": "float32", "steps": 300, "batch_size": 100, "eval_every": 10,
        "gd": [0.01 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "transformer-markov": {
        "problem": {"model": "transformer", "d_model": 32, "n_heads": 2, "n_layers": 2, "loss": "ce",
                    "n_train": 500, "dataset": {"name": "markov", "vocab": 8, "length": 8, "size": 1000, "seed": 0}},
        "dtype": "float32", "steps": 300, "batch_size": 100, "eval_every": 10,
        "gd": [0.04 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
}
# (rule, options) of the adaptive process, the same on every task (lr = 100 is only a cap); S is estimated on
# the first 200 examples to tol 1e-2 (≈ 1 % on λ_max), which costs 3–5 HVPs per estimate once warm
CHEAP = {"tol": 1e-2, "curvature_examples": 200}
ADAPTIVE = [("gd", {"c": 1.0, **CHEAP}), ("gd", {"c": 1.2, "ratchet": True, "guard": 10.0, **CHEAP}),
            ("adam", {"c": 1.0, **CHEAP})]


def _problem(task: dict, seed: int):
    from flowsim.models import build_problem
    return build_problem(task["problem"], dtype=task["dtype"], device="cpu", seed=seed)


def _curve(task: dict, problem, stepper, evaluate) -> tuple[np.ndarray, np.ndarray]:
    """Run ``stepper(k)`` for the task's budget; returns (full-batch losses, seconds spent stepping) at the steps
    0, eval_every, 2·eval_every, …. A non-finite or exploded loss ends the curve (the rest stays NaN)."""
    steps, every = task["steps"], task["eval_every"]
    losses = np.full(steps // every + 1, np.nan)
    walls = np.full_like(losses, np.nan)
    wall = 0.0
    l0 = None
    for k in range(steps + 1):
        if k % every == 0:
            loss = evaluate()
            losses[k // every], walls[k // every] = loss, wall
            l0 = loss if l0 is None else l0
            if not math.isfinite(loss) or loss > 1e6 * max(l0, 1.0):
                break
        if k == steps:
            break
        t0 = time.perf_counter()
        stepper(k)
        wall += time.perf_counter() - t0
    return losses, walls


def _flowsim_curve(task, seed, process, rule, lr, options=None, **hyper):
    from flowsim.solvers import PROCESSES, Schedule, make_rule
    problem = _problem(task, seed)
    cls = PROCESSES[process]
    proc = cls(problem, make_rule(rule, **hyper), Schedule(lr), seed=seed, batch_size=task["batch_size"],
               options=cls.Options(**(options or {})))
    traj = proc.start(problem.w0)
    if task["batch_size"] is None:
        return _full_batch_curve(task, proc, traj, problem)
    return _curve(task, problem, lambda k: proc.step(traj, False), lambda: problem.loss(traj.w).item())


def _full_batch_curve(task, proc, traj, problem):
    """Full batch: the loss at w_k is step k's own step_loss (free), so the whole run is timed; the wall time of
    w_k is the time spent before step k."""
    steps = task["steps"]
    losses, walls = np.full(steps + 1, np.nan), np.full(steps + 1, np.nan)
    t0 = time.perf_counter()
    for k in range(steps):
        walls[k] = time.perf_counter() - t0
        losses[k] = loss = proc.step(traj, False)["step_loss"]
        if not math.isfinite(loss) or loss > 1e6 * max(losses[0], 1.0):
            return losses, walls
    walls[steps] = time.perf_counter() - t0
    losses[steps] = problem.loss(traj.w).item()
    return losses, walls


def _torch_optimizer_curve(task, seed, make):
    """A torch.optim optimizer on the flat weights (schedulefree's ``eval()``/``train()`` switch around evaluation)."""
    problem = _problem(task, seed)
    w = problem.w0.clone().requires_grad_(True)
    opt = make([w])
    batch = task["batch_size"]
    from flowsim.solvers.processes import EpochSampler
    sampler = None if batch is None else EpochSampler(problem.n_examples, batch, seed, problem.device)

    def stepper(k):
        idx = None if sampler is None else sampler.indices(k)
        _, g = problem.loss_and_grad(w.detach(), idx)
        w.grad = g
        opt.step()

    def evaluate():
        if hasattr(opt, "eval"):
            opt.eval()
        loss = problem.loss(w.detach()).item()
        if hasattr(opt, "train"):
            opt.train()
        return loss
    if hasattr(opt, "train"):
        opt.train()
    return _curve(task, problem, stepper, evaluate)


def _first_hit(losses, walls, every, target) -> tuple[Optional[int], Optional[float]]:
    hit = np.flatnonzero(losses <= target)
    return (None, None) if hit.size == 0 else (int(hit[0]) * every, float(walls[hit[0]]))


def _summary(curves, targets, every):
    hits = [_first_hit(l, w, every, t) for (l, w), t in zip(curves, targets)]
    ok = [h for h in hits if h[0] is not None]
    finals = [l[np.isfinite(l)][-1] if np.isfinite(l).any() else np.nan for l, _ in curves]
    diverged = sum(bool(np.isnan(l[-1])) for l, _ in curves)
    if not ok:
        return {"hit": 0, "steps": math.nan, "wall": math.nan, "final": float(np.mean(finals)), "diverged": diverged}
    return {"hit": len(ok), "steps": float(np.mean([h[0] for h in ok])), "wall": float(np.mean([h[1] for h in ok])),
            "final": float(np.mean(finals)), "diverged": diverged}


def run_task(name: str, task: dict) -> None:
    every = task["eval_every"] if task["batch_size"] is not None else 1
    grid_gd = {lr: [_flowsim_curve(task, s, "discrete", "gd", lr) for s in SEEDS] for lr in task["gd"]}
    finals = {lr: np.mean([c[0][-1] for c in cs]) for lr, cs in grid_gd.items()}
    best_lr = min(finals, key=lambda lr: finals[lr] if np.isfinite(finals[lr]) else np.inf)
    targets = [c[0][-1] for c in grid_gd[best_lr]]
    grid_adam = {lr: [_flowsim_curve(task, s, "discrete", "adam", lr) for s in SEEDS] for lr in task["adam"]}
    methods = {f"gd best lr={best_lr:g}": grid_gd[best_lr]}
    adam = {lr: _summary(cs, targets, every) for lr, cs in grid_adam.items()}
    best_adam = min(adam, key=lambda lr: (-adam[lr]["hit"], adam[lr]["steps"] if adam[lr]["hit"] else adam[lr]["final"]))
    methods["adam default lr=0.001"] = [_flowsim_curve(task, s, "discrete", "adam", 1e-3) for s in SEEDS]
    methods[f"adam best lr={best_adam:.3g}"] = grid_adam[best_adam]
    for rule, options in ADAPTIVE:
        label = f"adaptive {rule} " + " ".join(f"{k}={v}" for k, v in options.items() if k not in CHEAP)
        methods[label] = [_flowsim_curve(task, s, "adaptive", rule, 100.0, options) for s in SEEDS]
    try:
        import schedulefree
        methods["schedulefree sgd lr=1 (default warmup 0)"] = [
            _torch_optimizer_curve(task, s, lambda p: schedulefree.SGDScheduleFree(p, lr=1.0)) for s in SEEDS]
    except ImportError:
        print("  (schedulefree not installed: pip install flowsim[bench])")
    try:
        import prodigyopt
        methods["prodigy lr=1"] = [_torch_optimizer_curve(task, s, lambda p: prodigyopt.Prodigy(p, lr=1.0))
                                   for s in SEEDS]
    except ImportError:
        print("  (prodigyopt not installed: pip install flowsim[bench])")
    print(f"\n{name}: {task['steps']} steps, batch {task['batch_size'] or 'full'}, seeds {SEEDS}; "
          f"target = best grid GD's final loss, mean {np.mean(targets):.3g}")
    print("  GD grid final loss: " + ", ".join(f"{lr:g}: {v:.3g}" for lr, v in finals.items()))
    print("  Adam grid steps to target: " + ", ".join(
        f"{lr:.2g}: {a['steps']:.0f} ({a['hit']}/3)" for lr, a in adam.items()))
    base = _summary(methods[next(iter(methods))], targets, every)
    print(f"  {'method':<52} {'hit':>4} {'steps':>7} {'wall s':>7} {'final':>9} {'div':>4} {'steps x':>8} {'wall x':>7}")
    for label, cs in methods.items():
        s = _summary(cs, targets, every)
        print(f"  {label:<52} {s['hit']:>2}/3 {s['steps']:>7.0f} {s['wall']:>7.2f} {s['final']:>9.3g} "
              f"{s['diverged']:>4} {base['steps'] / s['steps']:>8.2f} {base['wall'] / s['wall']:>7.2f}")


def adaptive(tasks: Optional[list[str]] = None) -> int:
    """Print the comparison for each task (all three by default, a few minutes on 2 CPU cores)."""
    print(f"adaptive: CPU, {torch.get_num_threads()} threads; the adaptive settings are the same on every task")
    for name in tasks or list(TASKS):
        run_task(name, TASKS[name])
    return 0
