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

Every (task, method, seed) curve is stored through :mod:`flowsim.store` as run ``<task>[<method>,seed=<seed>]``
(in memory, or in the store given as ``output``), every step: ``wall_time``, ``step_size`` (η of the step taken
from that step; the flowsim processes only) and ``loss`` (NaN between the evaluations of minibatch tasks); run
coordinates ``task``, ``method``, ``process``, ``rule``, ``lr``, ``batch_size`` (0 = full), ``seed``,
``options`` (the adaptive process's, as text), ``target`` (loss), ``steps_to_target`` and ``wall_to_target``
(s; NaN where the run never reaches its target); a diverged run ends at its ``diverged_at``. The printed table
is :func:`flowsim.report.target_summary` of that dataset, as is the report's (``flowsim report STORE``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch
import yaml
import zarr
import zarr.storage

from flowsim import store as store_mod

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
        "dtype": "float32", "steps": 300, "batch_size": 100, "eval_every": 2,
        "gd": [0.01 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "transformer-markov": {
        "problem": {"model": "transformer", "d_model": 32, "n_heads": 2, "n_layers": 2, "loss": "ce",
                    "n_train": 500, "dataset": {"name": "markov", "vocab": 8, "length": 8, "size": 1000, "seed": 0}},
        "dtype": "float32", "steps": 300, "batch_size": 100, "eval_every": 2,
        "gd": [0.04 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
}
# method name: (rule, options) of the adaptive process, the same on every task (lr = 100 is only a cap); S is
# estimated on the first 200 examples to tol 1e-2 (≈ 1 % on λ_max), which costs 3–5 HVPs per estimate once warm
CHEAP = {"tol": 1e-2, "curvature_examples": 200}
BATCH = {"c": 0.5, "first_step": "line", "early": True, "tol": 1e-2, "curvature_batch": True, "max_products": 4,
         "hvp": "difference"}
FLOW = {"candidates": [0.75, 1.0, 1.25, 1.5], "horizon": 30, "every": 50}
ADAPTIVE = {"adaptive-gd-c1": ("gd", {"c": 1.0, **CHEAP}),
            "adaptive-gd-c1.25": ("gd", {"c": 1.25, **CHEAP}),
            "adaptive-gd-flow": ("gd", {"flow": FLOW, **CHEAP}),
            "adaptive-gd-c1.2-ratchet": ("gd", {"c": 1.2, "ratchet": True, "guard": 10.0, **CHEAP}),
            "adaptive-adam-c1": ("adam", {"c": 1.0, **CHEAP}),
            "adaptive-adam-c0.5-early": ("adam", {"c": 0.5, "c_start": 3.9, "early": True, **CHEAP}),
            "adaptive-adam-c0.5-batch": ("adam", BATCH),
            "adaptive-adam-c0.5-batch-decay": ("adam", {**BATCH, "decay_on_rise": 0.5}),
            "adaptive-adam-c0.5-batch-decay-exact": ("adam", {**BATCH, "decay_on_rise": 0.5, "hvp": "reverse"}),
            "adaptive-adam-c0.5-batch-decay-coherence": ("adam", {**BATCH, "decay_on_rise": 0.5, "coherence": True})}
# adaptive-adam-c0.5-early: the fixed-η Adam that wins on the digits MLP (η = 0.024) runs at η·S_P/θ ≈ 52 at its
# first step (P̃ from one gradient), 2.5 at the second and 0.3–0.4 through its fast phase; so c_start > 1 for
# the first estimate, early re-estimates while ν settles, and c = 0.5 below the edge.
# adaptive-adam-c0.5-batch: the same controller, but step 0 at the minimizer of the quadratic model along Adam's
# first update (first_step: line; that update is sign descent, and η* at w_0 is 0.4–2.2x the best fixed η of
# Adam, where c_start·θ/S_0 is 7–47x below it), and S from the Hessian of each estimating step's own batch with
# at most 4 warm products per re-estimate, each the forward difference of two gradients of that batch (hvp:
# difference: one plain gradient of 100 examples, no graph; with 2 products the estimates are too rough).
# -decay: c halves after each interval whose mean step loss rose. On the minibatch tasks η = c·θ/S has no stable
# level, because S falls as η rises: on the transformer (seed 0) λ_max(H) fell from 3.6 to 1.5 while η rose from
# 0.02 to 0.12 over steps 10–40 with √ν unchanged, and on the CNN (seed 4) from 7 to 4 at η = 0.15 while its
# ReLUs died. -exact: -decay with exact products (double backward through the gradient's graph); on the
# transformer (smooth) both give the same S; on the ReLU/max-pool CNN the difference quotient also counts the
# kinks that a perturbation crosses, and its S_P is 1.2–2.4x the exact one (solvers/adaptive.py), so η is lower
# there. -coherence (the headline): -decay with c times the gradient coherence ‖∇L‖²/E‖g_B‖² (1 in full batch,
# so the MLP is unchanged; 0.7–0.9 on the transformer's first 100 steps).
# One full run, steps to target (MLP, CNN, transformer): -batch 35.7, 78, 128; -decay 35.7, 78, 111; -exact
# 35.7, 109 (2/3 seeds), 101; -coherence 35.7, 94.7, 75.3 against Adam's best grid step 34.3, 117, 73.3.
# Seeds 3–5 (the same settings, loss every 2 steps): -coherence 29.7, 83.3, 80.7 (Adam's best 30.7, 103, 78.7).
# With c_start 3.9 instead of first_step line: -coherence 37.3, 84.7, 82; -decay 37.3, 89.3, 89.3, and on seeds
# 3–5 the CNN reached its target on 2/3 seeds with -coherence.
# adaptive-gd-flow: the central flow chooses c among FLOW's candidates at steps 0, 50, 100, …, forecasting 30
# steps ahead (full batch only: on the minibatch tasks the bench says it does not apply); the fixed-c runs at
# two of its candidates are beside it.
BASELINE = "gd-best"
"""The method the ratios are taken against: GD/SGD at the step size of its grid with the lowest mean final loss."""


@dataclass
class Curve:
    """One run, every step: ``wall_time`` (s spent stepping before that step), ``step_size`` (η of the step
    taken from it; NaN where the method has none) and the full-batch ``loss`` (NaN where not evaluated). The
    curve ends at ``diverged_at``, the first step whose loss is non-finite or above 1e6·max(L₀, 1) (None: it
    did not)."""
    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    wall_time: list = field(default_factory=list)
    step_size: list = field(default_factory=list)
    diverged_at: Optional[int] = None

    def add(self, step: int, wall: float, step_size: float = math.nan, loss: Optional[float] = None) -> bool:
        """Append one step (``loss`` None: not evaluated there); True when its loss ends the curve."""
        self.step.append(step)
        self.wall_time.append(wall)
        self.step_size.append(step_size)
        self.loss.append(math.nan if loss is None else loss)
        if loss is not None and (not math.isfinite(loss) or loss > 1e6 * max(self.loss[0], 1.0)):
            self.diverged_at = step
        return self.diverged_at is not None


class Method(NamedTuple):
    """A compared method: its run coordinates and its curve for each of SEEDS."""
    process: str
    rule: str
    lr: float
    options: str
    curves: list[Curve]


def _problem(task: dict, seed: int):
    from flowsim.models import build_problem
    return build_problem(task["problem"], dtype=task["dtype"], device="cpu", seed=seed)


def _curve(task: dict, stepper: Callable[[int], float], evaluate: Callable[[], float]) -> Curve:
    """Run ``stepper(k)`` (returns the step size of step k, NaN if none) for the task's budget and record
    ``evaluate()``, the full-batch loss, at the steps 0, eval_every, 2·eval_every, … and the last; only stepping
    is timed."""
    curve, wall, every, steps = Curve(), 0.0, task["eval_every"], task["steps"]
    for k in range(steps + 1):
        if curve.add(k, wall, loss=evaluate() if k % every == 0 or k == steps else None) or k == steps:
            break
        t0 = time.perf_counter()
        curve.step_size[-1] = stepper(k)
        wall += time.perf_counter() - t0
    return curve


def _flowsim_curve(task, seed, process, rule, lr, options=None, **hyper) -> Curve:
    from flowsim.solvers import PROCESSES, Schedule, make_rule
    problem = _problem(task, seed)
    cls = PROCESSES[process]
    proc = cls(problem, make_rule(rule, **hyper), Schedule(lr), seed=seed, batch_size=task["batch_size"],
               options=cls.Options(**(options or {})))
    traj = proc.start(problem.w0)
    if task["batch_size"] is None:
        return _full_batch_curve(task, proc, traj, problem)
    return _curve(task, lambda k: proc.step(traj, False)["step_size"], lambda: problem.loss(traj.w).item())


def _full_batch_curve(task, proc, traj, problem) -> Curve:
    """Full batch: the loss at w_k is step k's own step_loss (free), so the whole run is timed; the wall time of
    w_k is the time spent before step k."""
    curve, t0 = Curve(), time.perf_counter()
    for k in range(task["steps"]):
        wall = time.perf_counter() - t0
        out = proc.step(traj, False)
        if curve.add(k, wall, out["step_size"], out["step_loss"]):
            return curve
    wall = time.perf_counter() - t0
    curve.add(task["steps"], wall, loss=problem.loss(traj.w).item())
    return curve


def _torch_optimizer_curve(task, seed, make) -> Curve:
    """A torch.optim optimizer on the flat weights (schedulefree's ``eval()``/``train()`` switch around
    evaluation); no step size is recorded (the parameter-free methods adapt theirs internally)."""
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
        return math.nan

    def evaluate():
        if hasattr(opt, "eval"):
            opt.eval()
        loss = problem.loss(w.detach()).item()
        if hasattr(opt, "train"):
            opt.train()
        return loss
    if hasattr(opt, "train"):
        opt.train()
    return _curve(task, stepper, evaluate)


def _first_hit(curve: Curve, target: float) -> tuple[Optional[int], Optional[float]]:
    """(step, wall s) of the first recorded loss ≤ target; (None, None) if none is."""
    hit = np.flatnonzero(np.asarray(curve.loss) <= target)
    return (None, None) if hit.size == 0 else (curve.step[hit[0]], curve.wall_time[hit[0]])


def _at_budget(curves: list[Curve]) -> float:
    """Mean loss at the budget over the seeds; inf when a seed diverged (never the best of a grid)."""
    return float(np.mean([math.inf if c.diverged_at is not None else c.loss[-1] for c in curves]))


def _methods(task: dict) -> tuple[dict[str, Method], list[float]]:
    """Run the grids and every compared method on one task, printing the grids; returns the methods (BASELINE
    first) and the target of each seed (the baseline's loss at the budget)."""
    grid_gd = {lr: [_flowsim_curve(task, s, "discrete", "gd", lr) for s in SEEDS] for lr in task["gd"]}
    finals = {lr: _at_budget(cs) for lr, cs in grid_gd.items()}
    best_lr = min(finals, key=finals.get)
    targets = [c.loss[-1] for c in grid_gd[best_lr]]
    grid_adam = {lr: [_flowsim_curve(task, s, "discrete", "adam", lr) for s in SEEDS] for lr in task["adam"]}
    hits = {lr: [h for c, t in zip(cs, targets) if (h := _first_hit(c, t)[0]) is not None]
            for lr, cs in grid_adam.items()}
    best_adam = min(grid_adam, key=lambda lr: (-len(hits[lr]), np.mean(hits[lr]) if hits[lr] else
                                               _at_budget(grid_adam[lr])))
    print(f"  target = best grid GD's final loss, mean {np.mean(targets):.3g}")
    print("  GD grid final loss: " + ", ".join(f"{lr:g}: {v:.3g}" for lr, v in finals.items()))
    print("  Adam grid steps to target: " + ", ".join(
        f"{lr:.2g}: {np.mean(hs) if hs else math.nan:.0f} ({len(hs)}/{len(SEEDS)})" for lr, hs in hits.items()))
    methods = {BASELINE: Method("discrete", "gd", best_lr, "", grid_gd[best_lr]),
               "adam-default": Method("discrete", "adam", 1e-3, "",
                                      [_flowsim_curve(task, s, "discrete", "adam", 1e-3) for s in SEEDS]),
               "adam-best": Method("discrete", "adam", best_adam, "", grid_adam[best_adam])}
    for method, (rule, options) in ADAPTIVE.items():
        try:
            curves = [_flowsim_curve(task, s, "adaptive", rule, 100.0, options) for s in SEEDS]
        except ValueError as e:  # e.g. the flow-driven choice on a minibatch task
            print(f"  {method}: does not apply to this task ({e})")
            continue
        methods[method] = Method("adaptive", rule, 100.0, " ".join(f"{k}={v}" for k, v in options.items()), curves)
    try:
        import schedulefree
        methods["schedulefree-sgd"] = Method("discrete", "schedulefree_sgd", 1.0, "", [
            _torch_optimizer_curve(task, s, lambda p: schedulefree.SGDScheduleFree(p, lr=1.0)) for s in SEEDS])
    except ImportError:
        print("  (schedulefree not installed: pip install flowsim[bench])")
    try:
        import prodigyopt
        methods["prodigy"] = Method("discrete", "prodigy", 1.0, "", [
            _torch_optimizer_curve(task, s, lambda p: prodigyopt.Prodigy(p, lr=1.0)) for s in SEEDS])
    except ImportError:
        print("  (prodigyopt not installed: pip install flowsim[bench])")
    return methods, targets


def _write(root: zarr.Group, name: str, task: dict, methods: dict[str, Method], targets: list[float],
           order: int) -> int:
    """Write each (method, seed) curve of task ``name`` as run ``name[method,seed=S]`` at positions ``order``,
    ``order + 1``, …; returns the next position."""
    for method, m in methods.items():
        for seed, curve, target in zip(SEEDS, m.curves, targets):
            steps, wall = _first_hit(curve, target)
            coords = {"task": name, "method": method, "process": m.process, "rule": m.rule, "lr": float(m.lr),
                      "batch_size": task["batch_size"] or 0, "seed": seed, "options": m.options,
                      "target": float(target), "steps_to_target": steps, "wall_to_target": wall}
            columns = {"step": np.asarray(curve.step, dtype=np.int64), "loss": np.asarray(curve.loss),
                       "wall_time": np.asarray(curve.wall_time)}
            if np.isfinite(curve.step_size).any():
                columns["step_size"] = np.asarray(curve.step_size)
            writer = store_mod.RunWriter(root, f"{name}[{method},seed={seed}]", {"order": order, "coords": coords},
                                         dims={})
            writer.append(columns)
            diverged = curve.diverged_at is not None
            writer.finish(status="diverged" if diverged else "complete", diverged=diverged,
                          diverged_at=curve.diverged_at)
            order += 1
    return order


def adaptive(tasks: Optional[list[str]] = None, output: Union[str, Path, None] = None,
             overwrite: bool = False) -> int:
    """Print the comparison for each task (all three by default, ≈ 17 minutes on one CPU thread); with ``output``,
    also keep every curve in that store (an existing one only with ``overwrite``)."""
    from flowsim.report import target_summary
    if output is not None and store_mod.is_store(output) and not overwrite:
        raise FileExistsError(f"store {output} already exists (use --overwrite to replace it)")
    names = tasks or list(TASKS)
    settings = {"seeds": list(SEEDS), "tasks": {n: TASKS[n] for n in names},
                "adaptive": {m: {"rule": rule, **options} for m, (rule, options) in ADAPTIVE.items()}}
    store = zarr.storage.MemoryStore() if output is None else output
    print(f"adaptive: CPU, {torch.get_num_threads()} threads; the adaptive settings are the same on every task")
    with store_mod.lock(store):
        root = store_mod.create(store, {
            "name": "bench-adaptive", "device": "cpu", "threads": torch.get_num_threads(), "baseline": BASELINE,
            "bench": yaml.safe_dump(settings, sort_keys=False, default_flow_style=None)}, overwrite=overwrite)
        order = 0
        for name in names:
            task = TASKS[name]
            print(f"\n{name}: {task['steps']} steps, batch {task['batch_size'] or 'full'}, seeds {SEEDS}")
            methods, targets = _methods(task)
            order = _write(root, name, task, methods, targets, order)
            ds = store_mod.open(store)
            table = target_summary(ds.isel(run=(ds["task"] == name).values)).droplevel("task")
            print(table.to_string(float_format=lambda v: f"{v:.3g}"))
    if output is not None:
        print(f"\nstored in {output}  (open with flowsim.open({str(output)!r}); report: flowsim report {output})")
    return 0
