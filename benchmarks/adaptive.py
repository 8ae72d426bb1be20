"""The ``adaptive`` benchmark: the edge step-size controller (``step_size: edge``) against tuned fixed-step
baselines, CDAT and parameter-free optimizers — steps and wall time to a target loss, mean over seeds (the seed sets
the network's initialization and the minibatch order).

The suite (``TASKS``) has sixteen tasks in three halves (``HALVES``), split before any tuning: the ``tuning`` half holds
the three tasks the controller's defaults were chosen on (a full-batch tanh MLP on digits, MSE; a ReLU CNN on
MNIST-1D, minibatches of 100, MSE; a transformer on a Markov chain, minibatches of 100, cross-entropy) and two more
(a ReLU ResNet-GN on digits, minibatches of 50, cross-entropy; a full-batch GELU MLP on a teacher-student
regression, MSE); the ``held-out`` half (an LSTM on a Markov chain and a ViT on digits, minibatches of 50; a
full-batch tanh CNN on digits; a ReLU MLP on a Gaussian mixture, minibatches of 25; a transformer on sorting,
minibatches of 50; all cross-entropy) is never used to choose a setting; the ``stress`` half (six offline tables
as users bring them, ``STRESS_DATA``: raw digit pixels with and without label noise, Gaussian mixtures with features
scaled 0.1–1000, separable, or with label noise; MLPs, cross-entropy, batches of 4–16 or full, mostly float32) is a
check only. ``--half`` runs one half; the table is printed per half, each with a summary line for the headline
methods (``benchmarks.report.half_summary``).

Per task: GD/SGD over a log-spaced grid of 8 step sizes and Adam at its default η = 1e-3 and over a grid of 8; the
target is the full-batch training loss that the best grid GD (lowest mean final loss) reaches at the budget, per
seed. Beside them: the edge controller's settings of ``EDGE`` (its defaults over Adam and over GD, the same on every
task; the single-option ablations were dropped to keep the held-out half within 30 minutes), CDAT over GD and over
Adam (``CDAT``, ``step_size: cdat`` at its defaults) and the parameter-free torch optimizers schedulefree and
prodigy (the ``bench`` extra; they run when installed). Each method's "steps" and "wall s" are those of the first
step whose full-batch loss is at or below the target (mean over the seeds that reach it; ``hit`` counts them).
Ratios are the baseline's (``BASELINE``) / the method's (> 1: the method is faster).

The flowsim methods (the grids, ``EDGE`` and ``CDAT``) run through :func:`flowsim.simulate` as ``process: discrete``
under their step-size policy. Full batch, the loss at w_k is step k's own (recorded every step, for free); on
minibatch tasks flowsim records η and the wall time at every step, as it always does, the weights are
kept every ``eval_every`` steps and the full-batch loss is evaluated from them after the run, so that no evaluation
made only for this table is timed. A method's wall time at step k counts everything it did before step k (the edge
controller's curvature estimates included; on minibatch tasks also the one full-batch loss and gradient that flowsim
measures at w_0, which the torch optimizers' timing includes for parity).

Every (task, method, seed) curve is stored as run ``<task>[<method>,seed=<seed>]`` (in memory, or in the store given
as ``output``), every step: ``wall_time``, ``step_size`` (η of the step taken from that step; the flowsim methods
only) and ``loss`` (NaN between the evaluations of minibatch tasks); run coordinates ``task``, ``half``, ``method``,
``process``, ``rule``, ``policy``, ``lr`` (NaN where the controller sets η), ``max_lr``, ``batch_size`` (0 = full),
``seed``, ``options`` (the method's settings, as text), ``target`` (loss), ``steps_to_target`` and
``wall_to_target`` (s; NaN where the run never reaches its target), ``timed`` (True); a diverged run ends at its
``diverged_at``. Beside them, per task, the controller's settings of ``EDGE`` and tuned Adam (``adam-best``) run
once more at seed 0 with the curvature measured (:func:`theory_runs`; methods ``<name>.measured`` and, for the
controller in full batch, ``<name>.central``: the central flow under the same controller), untimed (``timed``
False, no target), with ``precond_sharpness`` and ``threshold`` every 10 steps: the report draws η·S/θ from them,
and the tables leave them out. The store is written with ``flowsim.store`` (no public writer of single runs
exists). The printed table is :func:`benchmarks.report.target_summary` of that dataset, as is the report's
(``python -m benchmarks.report STORE``).
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch
import xarray as xr
import yaml
import zarr.storage

import flowsim
from benchmarks import report
from benchmarks.bench import parser
from flowsim import store as store_mod
from flowsim.record import PrecondSharpnessProbe, SharpnessProbe, declared
from flowsim.models import build_problem
from flowsim.solvers import EpochSampler
from flowsim.solvers.processes import RUN_VARIABLES

SEEDS = (0, 1, 2)
HALVES = ("tuning", "held-out", "stress")
"""The three halves of the suite, fixed before any tuning: the edge controller's defaults were chosen on the first
three tuning tasks; the held-out half is never used to choose a setting; the stress half (tables a user brings as
they are: unstandardized inputs, separable cross-entropy, batches of 4–16, label noise, float32) is a check only,
fixed before the controller was run on it and never used to choose a setting."""


def _mixture(n: int, dim: int, classes: int, separation: float, scale_to: float = 1.0, flip: float = 0.0,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian mixture (class means separation·N(0, I), unit noise) with feature j multiplied by the j-th of
    ``dim`` log-spaced scales from 0.1 to ``scale_to`` (1: unscaled) and a fraction ``flip`` of labels replaced by
    uniform ones."""
    rng = np.random.default_rng(seed)
    means = separation * rng.standard_normal((classes, dim))
    labels = rng.integers(0, classes, n)
    X = means[labels] + rng.standard_normal((n, dim))
    if scale_to != 1.0:
        X = X * np.logspace(-1, math.log10(scale_to), dim)
    noisy = rng.random(n) < flip
    labels[noisy] = rng.integers(0, classes, int(noisy.sum()))
    return X, labels


def _digits_raw(flip: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as they are (pixel values 0–16, not standardized), a fraction ``flip`` of labels
    replaced by uniform ones (seed 0)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    noisy = rng.random(len(labels)) < flip
    labels[noisy] = rng.integers(0, 10, int(noisy.sum()))
    return d.data, labels


STRESS_DATA: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits-raw": lambda: _digits_raw(),
    "digits-raw-noisy": lambda: _digits_raw(flip=0.2),
    "scaled-mixture": lambda: _mixture(1000, 16, 4, 2.0, scale_to=1000.0),
    "separable": lambda: _mixture(1000, 16, 2, 2.0),
    "noisy-mixture": lambda: _mixture(1000, 16, 4, 1.0, flip=0.2),
    "scaled-separable": lambda: _mixture(1000, 16, 2, 2.0, scale_to=1000.0),
}
"""The stress half's data (inputs X, integer labels), generated offline and used as given: flowsim does not
standardize a dataset read from a file (``dataset: {path}``). Two classes of 16-dimensional Gaussians whose means are
2·N(0, I) apart are linearly separable (the means lie ≈ 11 noise units apart)."""
TASKS = {
    # tuning half: the three tasks the controller's defaults were chosen on, and two more
    "mlp-digits": {
        "half": "tuning",
        "problem": {"model": "mlp", "widths": [64, 32, 32], "activation": "tanh", "dataset": "digits",
                    "classes": [0, 1, 2, 3], "n_train": 400, "loss": "mse"},
        "dtype": "float64", "steps": 300, "batch_size": None, "eval_every": 1,
        "gd": [0.05 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "cnn-mnist1d": {
        "half": "tuning",
        "problem": {"model": "cnn", "widths": [16, 16], "pool": "max", "activation": "relu", "n_train": 1000,
                    "loss": "mse", "dataset": {"name": "mnist1d", "size": 2000, "seed": 0}},
        "dtype": "float32", "steps": 300, "batch_size": 100, "eval_every": 2,
        "gd": [0.01 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "transformer-markov": {
        "half": "tuning",
        "problem": {"model": "transformer", "d_model": 32, "n_heads": 2, "n_layers": 2, "loss": "ce",
                    "n_train": 500, "dataset": {"name": "markov", "vocab": 8, "length": 8, "size": 1000, "seed": 0}},
        "dtype": "float32", "steps": 300, "batch_size": 100, "eval_every": 2,
        "gd": [0.04 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "resnet-digits": {
        "half": "tuning",
        "problem": {"model": "resnet", "widths": [8, 16], "blocks": 1, "groups": 4, "activation": "relu",
                    "dataset": "digits", "n_train": 500, "loss": "ce"},
        "dtype": "float32", "steps": 300, "batch_size": 50, "eval_every": 2,
        "gd": [0.02 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "gelu-teacher": {
        "half": "tuning",
        "problem": {"model": "mlp", "widths": [32, 32], "activation": "gelu", "n_train": 500, "loss": "mse",
                    "dataset": {"name": "teacher_student", "dim": 16, "size": 1000, "seed": 0}},
        "dtype": "float64", "steps": 300, "batch_size": None, "eval_every": 1,
        "gd": [0.02 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    # held-out half
    "lstm-markov": {
        "half": "held-out",
        "problem": {"model": "lstm", "hidden": 32, "loss": "ce", "n_train": 500,
                    "dataset": {"name": "markov", "vocab": 8, "length": 8, "size": 1000, "seed": 0}},
        "dtype": "float32", "steps": 300, "batch_size": 50, "eval_every": 2,
        "gd": [0.1 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "vit-digits": {
        "half": "held-out",
        "problem": {"model": "vit", "patch": 2, "d_model": 16, "n_heads": 2, "n_layers": 2, "dataset": "digits",
                    "n_train": 300, "loss": "ce"},
        "dtype": "float32", "steps": 300, "batch_size": 50, "eval_every": 2,
        "gd": [0.01 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "cnn-digits": {
        "half": "held-out",
        "problem": {"model": "cnn", "widths": [16, 16], "pool": "avg", "activation": "tanh", "dataset": "digits",
                    "n_train": 300, "loss": "ce"},
        "dtype": "float32", "steps": 300, "batch_size": None, "eval_every": 1,
        "gd": [0.32 * 2 ** k for k in range(8)], "adam": [1e-3 * 3 ** k for k in range(8)]},
    "mlp-mixture": {
        "half": "held-out",
        "problem": {"model": "mlp", "widths": [64, 64], "activation": "relu", "n_train": 1000, "loss": "ce",
                    "dataset": {"name": "gaussian_mixture", "dim": 16, "n_classes": 4, "separation": 0.5,
                                "size": 2000, "seed": 0}},
        "dtype": "float32", "steps": 300, "batch_size": 25, "eval_every": 2,
        "gd": [0.01 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "transformer-sorting": {
        "half": "held-out",
        "problem": {"model": "transformer", "d_model": 16, "n_heads": 2, "n_layers": 2, "loss": "ce",
                    "n_train": 300, "dataset": {"name": "sorting", "vocab": 8, "length": 8, "size": 1000, "seed": 0}},
        "dtype": "float32", "steps": 300, "batch_size": 50, "eval_every": 2,
        "gd": [0.02 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    # stress half: a check only (HALVES)
    "digits-raw": {
        "half": "stress", "data": "digits-raw",
        "problem": {"model": "mlp", "widths": [64, 64], "activation": "relu", "n_train": 500, "loss": "ce"},
        "dtype": "float32", "steps": 300, "batch_size": 16, "eval_every": 2,
        "gd": [1e-4 * 3 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "digits-raw-noisy": {
        "half": "stress", "data": "digits-raw-noisy",
        "problem": {"model": "mlp", "widths": [64], "activation": "tanh", "n_train": 500, "loss": "ce"},
        "dtype": "float32", "steps": 300, "batch_size": 8, "eval_every": 2,
        "gd": [1e-4 * 3 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "scaled-mixture": {
        "half": "stress", "data": "scaled-mixture",
        "problem": {"model": "mlp", "widths": [32, 32], "activation": "gelu", "n_train": 500, "loss": "ce"},
        "dtype": "float64", "steps": 300, "batch_size": 16, "eval_every": 2,
        "gd": [1e-7 * 4 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "separable-ce": {
        "half": "stress", "data": "separable",
        "problem": {"model": "mlp", "widths": [32, 32], "activation": "tanh", "n_train": 500, "loss": "ce"},
        "dtype": "float32", "steps": 300, "batch_size": None, "eval_every": 1,
        "gd": [0.1 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "noisy-mixture": {
        "half": "stress", "data": "noisy-mixture",
        "problem": {"model": "mlp", "widths": [64, 64], "activation": "relu", "n_train": 500, "loss": "ce"},
        "dtype": "float32", "steps": 300, "batch_size": 4, "eval_every": 2,
        "gd": [0.002 * 2 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
    "scaled-separable": {
        "half": "stress", "data": "scaled-separable",
        "problem": {"model": "mlp", "widths": [32, 32], "activation": "gelu", "n_train": 500, "loss": "ce"},
        "dtype": "float32", "steps": 300, "batch_size": 8, "eval_every": 2,
        "gd": [1e-7 * 4 ** k for k in range(8)], "adam": [1e-4 * 3 ** k for k in range(8)]},
}


class Method(NamedTuple):
    """A flowsim method: its update ``rule``, its ``step_size`` as :func:`flowsim.simulate` takes it (a number,
    ``"edge"``, or ``{"edge": {...}}``) and the discrete process's ``options``."""
    rule: str
    step_size: Union[float, str, dict]
    options: dict = {}


EDGE: dict[str, Method] = {
    "edge-adam": Method("adam", "edge"),  # the defaults: the headline setting
    "edge-gd": Method("gd", "edge"),
}
"""The edge controller's settings compared, the same on every task: its defaults (c = 0.5 over Adam and 1.5 over
GD, S on each estimating step's own batch by at most 4 warm difference products) over Adam and over GD. What each
option is worth is the ``options`` benchmark (benchmarks/options.py), run against this benchmark's store."""
CDAT: dict[str, Method] = {
    "cdat-gd": Method("gd", {"cdat": {}}),
    "cdat-adam": Method("adam", {"cdat": {}}),
}
"""CDAT (``step_size: cdat``, its defaults: σ = 2, "on edge", EMA 0.9, one difference product per step) over GD
and over Adam: the published step-size policy that the edge controller is measured against."""
THEORY_SEED = 0
THEORY_EVERY = 10
"""The controller's runs of ``EDGE`` and tuned Adam's are made once more at seed ``THEORY_SEED`` with λ_max(P̃⁻¹H)
on all examples measured every ``THEORY_EVERY`` steps (:func:`theory_runs`): untimed, since the measurement would
count in their wall time. Tuned Adam's η·S/θ is the fraction of its edge that the best constant step uses."""
BASELINE = "gd-best"
"""The method the ratios are taken against: GD/SGD at the step size of its grid with the lowest mean final loss."""


@dataclass
class Curve:
    """One run, every step: ``wall_time`` (s spent before that step), ``step_size`` (η of the step taken from it;
    NaN where the method has none) and the full-batch ``loss`` (NaN where not evaluated). The curve ends at
    ``diverged_at``, the first step whose loss is non-finite or above 1e6·max(L₀, 1), or where flowsim stopped
    the run as diverged (None: it did not)."""
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


@dataclass
class Outcome:
    """A compared method on one task: its run coordinates (process, rule, policy, lr, max_lr, options) and its
    curve for each seed."""
    coords: dict
    curves: list[Curve]


def _dataset(name: str) -> str:
    """The path of stress data ``name`` (``STRESS_DATA``) as an .npz file, written on first use."""
    path = Path(tempfile.gettempdir()) / "flowsim-bench-stress" / f"{name}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        X, Y = STRESS_DATA[name]()
        partial = path.with_suffix(f".{time.time_ns()}.npz")
        np.savez(partial, X=X, Y=Y.astype(np.int64))
        partial.replace(path)  # whole or absent, when two benchmarks start at once
    return str(path)


def _problem(task: dict, seed: int):
    spec = task["problem"] if "data" not in task else {**task["problem"], "dataset": {"path": _dataset(task["data"])}}
    return build_problem(spec, dtype=task["dtype"], device="cpu", seed=seed)


def _settings(method: Method) -> str:
    """The method's settings beyond its rule and constant η, as text (``""`` for the controller's defaults)."""
    policy = method.step_size if isinstance(method.step_size, dict) else {}
    return " ".join(f"{k}={v}" for spec in (*policy.values(), method.options) for k, v in spec.items())


def flowsim_curve(task: dict, seed: int, method: Method) -> tuple[Curve, dict]:
    """(curve, run coordinates) of ``method`` on the task at ``seed``, run by :func:`flowsim.simulate`."""
    problem = _problem(task, seed)
    steps, batch, every = task["steps"], task["batch_size"], task["eval_every"]
    if batch is None:  # the loss at w_k is step k's own, measured for free
        record = {"every": 1, "projection_dim": 0}
    else:  # η and wall time are recorded every step; the weights every eval_every steps (for the loss)
        record = {"every": steps, "projection_dim": 0, "keep_weights": every}
    ds = flowsim.simulate(problem, method.rule, "discrete", method.step_size, steps, batch_size=batch, seed=seed,
                          options=method.options or None, record=record).isel(run=0)
    coords = {k: ds[k].item() for k in ("process", "rule", "policy", "lr", "max_lr")}
    wall, eta = ds["wall_time"].values, ds["step_size"].values
    curve = Curve()
    for i, k in enumerate(int(k) for k in ds.step.values):
        if batch is None:
            loss = float(ds["loss"].values[i])
        elif k % every == 0 or k == steps:
            loss = problem.loss(torch.as_tensor(ds["w"].values[i], dtype=problem.dtype)).item()
        else:
            loss = None
        # flowsim's wall_time at step k counts step k too: the time before step k is the one recorded at k − 1
        if curve.add(k, 0.0 if i == 0 else float(wall[i - 1]), float(eta[i]), loss):
            break
    if curve.diverged_at is None and bool(ds["diverged"]):
        curve.diverged_at = int(ds["diverged_at"])
    return curve, {**coords, "options": _settings(method)}


def theory_runs(task: dict, methods: dict[str, Method], central: bool = True) -> dict[str, xr.Dataset]:
    """For each setting of ``methods``, at seed ``THEORY_SEED``: the discrete run again with ``precond_sharpness``
    S = λ_max(P̃⁻¹H) and ``threshold`` θ/η recorded every ``THEORY_EVERY`` steps (method ``<name>.measured``), and
    with ``central`` on a full-batch task the central flow driven by the same step sizes (``<name>.central``; the
    central flow is a full-batch process). Their ratio is η·S/θ: the controller's c where its estimates hold, the
    fraction of its edge a constant step uses, 1 at the edge of stability."""
    record = {"every": task["eval_every"], "curvature_every": THEORY_EVERY, "precond": True, "projection_dim": 0}
    processes = ({"measured": "discrete"} if task["batch_size"] or not central else
                 {"measured": "discrete", "central": "central"})
    runs = {}
    for name, method in methods.items():
        for suffix, process in processes.items():
            runs[f"{name}.{suffix}"] = flowsim.simulate(
                _problem(task, THEORY_SEED), method.rule, process, method.step_size, task["steps"],
                batch_size=task["batch_size"], seed=THEORY_SEED, options=method.options or None,
                record=record).isel(run=0).assign_coords(options=_settings(method))
    return runs


def _median_edge_fraction(ds: xr.Dataset) -> float:
    """Median over the measured steps after step 0 of η·S/θ (``precond_sharpness`` / ``threshold``)."""
    ratio = (ds["precond_sharpness"] / ds["threshold"]).dropna("step")
    return float(np.median(ratio.sel(step=ratio.step > 0).values))


def _curve(task: dict, stepper: Callable[[int], float], evaluate: Callable[[], float],
           start: Optional[Callable[[], object]] = None) -> Curve:
    """Run ``stepper(k)`` (returns the step size of step k, NaN if none) for the task's budget and record
    ``evaluate()``, the full-batch loss, at the steps 0, eval_every, 2·eval_every, … and the last; only
    ``start()`` (timed with step 0) and stepping are timed."""
    curve, wall, every, steps = Curve(), 0.0, task["eval_every"], task["steps"]
    for k in range(steps + 1):
        if curve.add(k, wall, loss=evaluate() if k % every == 0 or k == steps else None) or k == steps:
            break
        t0 = time.perf_counter()
        if k == 0 and start is not None:
            start()
        curve.step_size[-1] = stepper(k)
        wall += time.perf_counter() - t0
    return curve


def torch_optimizer_curve(task: dict, seed: int, make) -> Curve:
    """A torch.optim optimizer on the flat weights (schedulefree's ``eval()``/``train()`` switch around
    evaluation); no step size is recorded (the parameter-free methods adapt theirs internally). On minibatch
    tasks its time includes one full-batch loss and gradient at w_0, as flowsim's does."""
    problem = _problem(task, seed)
    w = problem.w0.clone().requires_grad_(True)
    opt = make([w])
    batch = task["batch_size"]
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
    start = None if sampler is None else (lambda: problem.loss_and_grad(w.detach()))
    return _curve(task, stepper, evaluate, start)


def _first_hit(curve: Curve, target: float) -> tuple[Optional[int], Optional[float]]:
    """(step, wall s) of the first recorded loss ≤ target; (None, None) if none is."""
    hit = np.flatnonzero(np.asarray(curve.loss) <= target)
    return (None, None) if hit.size == 0 else (curve.step[hit[0]], curve.wall_time[hit[0]])


def _at_budget(curves: list[Curve]) -> float:
    """Mean loss at the budget over the seeds; inf when a seed diverged (never the best of a grid)."""
    return float(np.mean([math.inf if c.diverged_at is not None else c.loss[-1] for c in curves]))


class _Progress:
    """One line per method as it finishes: its position, name and seconds."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __call__(self, label: str, fn):
        t0 = time.perf_counter()
        out = fn()
        self.done += 1
        print(f"  [{self.done:2d}/{self.total}] {label:<34} {time.perf_counter() - t0:6.1f} s", flush=True)
        return out


def _flowsim_outcome(task: dict, seeds, method: Method) -> Outcome:
    runs = [flowsim_curve(task, s, method) for s in seeds]
    return Outcome(runs[0][1], [c for c, _ in runs])


def _methods(task: dict, seeds=SEEDS, methods: Optional[dict[str, Method]] = None
             ) -> tuple[dict[str, Outcome], list[float]]:
    """Run the grids and every compared method on one task, printing progress and the grids; returns the
    outcomes (BASELINE first) and the target of each seed (the baseline's loss at the budget)."""
    methods = {**EDGE, **CDAT} if methods is None else methods
    progress = _Progress(len(task["gd"]) + len(task["adam"]) + 1 + len(methods) + 2)
    grid_gd = {lr: progress(f"gd η = {lr:.3g}", lambda: _flowsim_outcome(task, seeds, Method("gd", lr)))
               for lr in task["gd"]}
    finals = {lr: _at_budget(o.curves) for lr, o in grid_gd.items()}
    best_lr = min(finals, key=finals.get)
    targets = [c.loss[-1] for c in grid_gd[best_lr].curves]
    grid_adam = {lr: progress(f"adam η = {lr:.3g}", lambda: _flowsim_outcome(task, seeds, Method("adam", lr)))
                 for lr in task["adam"]}
    hits = {lr: [h for c, t in zip(o.curves, targets) if (h := _first_hit(c, t)[0]) is not None]
            for lr, o in grid_adam.items()}
    best_adam = min(grid_adam, key=lambda lr: (-len(hits[lr]), np.mean(hits[lr]) if hits[lr] else
                                               _at_budget(grid_adam[lr].curves)))
    outcomes = {BASELINE: grid_gd[best_lr],
                "adam-default": progress("adam η = 0.001 (default)",
                                         lambda: _flowsim_outcome(task, seeds, Method("adam", 1e-3))),
                "adam-best": grid_adam[best_adam]}
    for name, method in methods.items():
        try:
            outcomes[name] = progress(name, lambda: _flowsim_outcome(task, seeds, method))
        except flowsim.ScenarioError as e:  # e.g. a process option for minibatches only, on a full-batch task
            progress.done += 1
            print(f"  {name}: does not apply to this task ({e})", flush=True)
    torch_optimizers = {"schedulefree-sgd": ("schedulefree", "SGDScheduleFree", "schedulefree_sgd"),
                        "prodigy": ("prodigyopt", "Prodigy", "prodigy")}
    for name, (package, cls, rule) in torch_optimizers.items():
        try:
            make = getattr(__import__(package), cls)
        except ImportError:
            progress.done += 1
            print(f"  ({package} not installed: pip install -e '.[bench]')", flush=True)
            continue
        curves = progress(f"{name} (torch)",
                          lambda: [torch_optimizer_curve(task, s, lambda p: make(p, lr=1.0)) for s in seeds])
        outcomes[name] = Outcome({"process": "torch", "rule": rule, "policy": "internal", "lr": 1.0,
                                  "max_lr": math.nan, "options": ""}, curves)
    print(f"  target = best grid GD's final loss, mean {np.mean(targets):.3g}")
    print("  GD grid final loss: " + ", ".join(f"{lr:g}: {v:.3g}" for lr, v in finals.items()))
    print("  Adam grid steps to target: " + ", ".join(
        f"{lr:.2g}: {np.mean(hs) if hs else math.nan:.0f} ({len(hs)}/{len(seeds)})" for lr, hs in hits.items()))
    return outcomes, targets


def _write(root, name: str, task: dict, outcomes: dict[str, Outcome], targets: list[float], order: int,
           seeds=SEEDS) -> int:
    """Write each (method, seed) curve of task ``name`` as run ``name[method,seed=S]`` at positions ``order``,
    ``order + 1``, …; returns the next position."""
    for method, outcome in outcomes.items():
        for seed, curve, target in zip(seeds, outcome.curves, targets):
            steps, wall = _first_hit(curve, target)
            coords = {"task": name, "half": task.get("half", ""), "method": method, "timed": True, **outcome.coords,
                      "lr": float(outcome.coords["lr"]),
                      "max_lr": float(outcome.coords["max_lr"]), "batch_size": task["batch_size"] or 0,
                      "seed": seed, "target": float(target), "steps_to_target": steps, "wall_to_target": wall}
            columns = {"step": np.asarray(curve.step, dtype=np.int64), "loss": np.asarray(curve.loss),
                       "wall_time": np.asarray(curve.wall_time)}
            if np.isfinite(curve.step_size).any():
                columns["step_size"] = np.asarray(curve.step_size)
            writer = store_mod.RunWriter(root, f"{name}[{method},seed={seed}]", {"order": order, "coords": coords},
                                         STORED, dims={})
            writer.append(columns)
            diverged = curve.diverged_at is not None
            writer.finish(status="diverged" if diverged else "complete", diverged=diverged,
                          diverged_at=curve.diverged_at)
            order += 1
    return order


THEORY_VARIABLES = ("loss", "step_size", "wall_time", "sharpness", "precond_sharpness", "threshold")
STORED = declared(RUN_VARIABLES, SharpnessProbe.variables, PrecondSharpnessProbe.variables)
"""What this benchmark's store holds of each run: the curves, and the curvature of the theory runs."""


def _write_theory(root, name: str, task: dict, runs: dict[str, xr.Dataset], order: int) -> int:
    """Write the runs of :func:`theory_runs` as ``name[method,seed=THEORY_SEED]`` with ``timed`` False (no target:
    the table leaves them out); returns the next position."""
    for method, ds in runs.items():
        coords = {"task": name, "half": task.get("half", ""), "method": method, "timed": False,
                  **{k: ds[k].item() for k in ("process", "rule", "policy", "options")},
                  **{k: float(ds[k]) for k in ("lr", "max_lr")}, "batch_size": task["batch_size"] or 0,
                  "seed": THEORY_SEED, "target": math.nan, "steps_to_target": math.nan,
                  "wall_to_target": math.nan}
        writer = store_mod.RunWriter(root, f"{name}[{method},seed={THEORY_SEED}]",
                                     {"order": order, "coords": coords}, STORED, dims={})
        writer.append({"step": ds.step.values.astype(np.int64),
                       **{v: ds[v].values.astype(float) for v in THEORY_VARIABLES if v in ds}})
        diverged = bool(ds["diverged"])
        writer.finish(status="diverged" if diverged else "complete", diverged=diverged,
                      diverged_at=int(ds["diverged_at"]) if diverged else None)
        order += 1
    return order


def select(half: str = "all", tasks: Optional[dict[str, dict]] = None) -> dict[str, dict]:
    """The tasks (default ``TASKS``) of one half of the suite (``"tuning"``, ``"held-out"``), or all of them."""
    tasks = TASKS if tasks is None else tasks
    if half != "all" and half not in HALVES:
        raise ValueError(f"half: {half!r} is none of {', '.join(HALVES)}, all")
    return {n: t for n, t in tasks.items() if half == "all" or t["half"] == half}


def quick(tasks: dict[str, dict]) -> dict[str, dict]:
    """The tasks shortened for ``--quick``: 60 steps, every other step size of each grid."""
    return {n: {**t, "steps": 60, "gd": t["gd"][1::2], "adam": t["adam"][1::2]} for n, t in tasks.items()}


def adaptive(tasks: Optional[dict[str, dict]] = None, output: Union[str, Path, None] = None,
             overwrite: bool = False, seeds=None, methods: Optional[dict[str, Method]] = None,
             html: bool = False, theory: bool = True) -> xr.Dataset:
    """Print the comparison for each of ``tasks`` (default ``TASKS``) over ``seeds`` (default ``SEEDS``) with
    the compared settings ``methods`` (default ``EDGE`` and ``CDAT``), and return every curve as a Dataset;
    with ``output``, keep them in that store (an existing one only with ``overwrite``) and with ``html`` write
    its report beside it; ``theory`` False leaves out the untimed runs of :func:`theory_runs` (the tables do not
    use them)."""
    tasks = TASKS if tasks is None else tasks
    seeds = tuple(SEEDS if seeds is None else seeds)
    methods = {**EDGE, **CDAT} if methods is None else methods
    if output is not None and store_mod.is_store(output) and not overwrite:
        raise FileExistsError(f"store {output} already exists (use --overwrite to replace it)")
    settings = {"seeds": list(seeds), "tasks": tasks,
                "methods": {m: {"rule": s.rule, "step_size": s.step_size, **({"options": s.options} if s.options
                                                                            else {})} for m, s in methods.items()}}
    store = zarr.storage.MemoryStore() if output is None else output
    print(f"adaptive: CPU, {torch.get_num_threads()} threads; the edge settings are the same on every task",
          flush=True)
    with store_mod.lock(store):
        root = store_mod.create(store, {
            "name": "bench-adaptive", "device": "cpu", "threads": torch.get_num_threads(), "baseline": BASELINE,
            "bench": yaml.safe_dump(settings, sort_keys=False, default_flow_style=None)}, overwrite=overwrite)
        order = 0
        for name, task in tasks.items():
            print(f"\n{name}: {task['steps']} steps, batch {task['batch_size'] or 'full'}, seeds {seeds}", flush=True)
            outcomes, targets = _methods(task, seeds, methods)
            order = _write(root, name, task, outcomes, targets, order, seeds)
            if theory:
                edge = {n: m for n, m in methods.items() if n in EDGE}
                t0 = time.perf_counter()
                tuned = {"adam-best": Method("adam", float(outcomes["adam-best"].coords["lr"]))}
                measured = {**theory_runs(task, edge), **theory_runs(task, tuned, central=False)}
                print(f"  the controller's runs and tuned Adam's again, measured (seed {THEORY_SEED}): "
                      f"{time.perf_counter() - t0:.1f} s; median η·S/θ " + ", ".join(
                          f"{m.removesuffix('.measured')} {_median_edge_fraction(ds):.2g}"
                          for m, ds in measured.items() if m.endswith(".measured")), flush=True)
                order = _write_theory(root, name, task, measured, order)
            ds = flowsim.open(store)
            table = report.target_summary(ds.isel(run=(ds["task"] == name).values)).droplevel("task")
            print(table.to_string(float_format=lambda v: f"{v:.3g}"), flush=True)
        print(f"\n{report.by_half(flowsim.open(store))}", flush=True)
    if output is not None:
        print(f"\nstored in {output}  (open with flowsim.open({str(output)!r}); report: "
              f"python -m benchmarks.report {output})")
        if html:
            print(f"report: {report.write(output)}")
    return flowsim.open(store)


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("adaptive", "The edge step-size controller against tuned GD/SGD and Adam grids, Adam at 1e-3, CDAT, "
               "schedulefree and prodigy on a tuning, a held-out and a stress half of sixteen tasks: steps and wall "
               "time to the best grid GD's final loss, final loss against tuned Adam's and Adam at 1e-3's.",
               quick="60 steps, one seed, every other step size of each grid")
    p.add_argument("-o", "--output", help="a store (.zarr) to keep every curve in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--report", action="store_true", help="also write the store's HTML report (STORE.html)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help=f"a subset of the tasks ({', '.join(TASKS)})")
    p.add_argument("--half", choices=(*HALVES, "all"), default="all",
                   help="the tasks of one half of the suite (default all; with --tasks, those of the half)")
    p.add_argument("--no-theory", action="store_true", help="leave out the untimed seed-0 runs with curvature "
                   "measured (the report's \"The edge, measured\"; the tables do not use them)")
    args = p.parse_args(argv)
    if args.report and args.output is None:
        p.error("--report: needs a store (-o STORE)")
    unknown = sorted(set(args.tasks or ()) - set(TASKS))
    if unknown:
        p.error(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    tasks = {n: t for n, t in select(args.half).items() if n in (args.tasks or TASKS)}
    if not tasks:
        p.error(f"--half {args.half}: none of the tasks {', '.join(args.tasks or TASKS)} is in it")
    adaptive(quick(tasks) if args.quick else tasks, args.output, args.overwrite,
             seeds=(0,) if args.quick else None, html=args.report, theory=not args.no_theory)
    return 0
