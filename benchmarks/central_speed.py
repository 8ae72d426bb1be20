"""Where the central flow's time goes, in gradient-step equivalents per unit of time, at the edge of stability.

``python -m benchmarks central-speed [--quick] [--linear]``, on one CPU thread, float64, the central flow as the
central-flows paper runs it (4 Euler substeps; no shadow run; every step measured, as a scenario that records
every step does):

- the cost table, on the problems of ``central-gd-mlp`` (gd, η = 0.5), ``central-gd-cnn`` (gd, η = 0.7) and
  ``central-adam-mlp`` (Adam, its scenario's hyperparameters; the flow from its default start): ``WARMUP`` steps
  into the edge, then ``TIMED`` steps timed. Per step: milliseconds, and that over the time of a plain GD step
  (gradient and update) on the same problem measured in the same run — the GD-step equivalents per unit of
  time; the share of the eigensolve (with its Hessian-vector products per solve), of the third derivatives, of
  the SDCP, of the gradient and its graph, of the measurements at the step's start ("recording"), and the rest;
  the tracked and critical directions at the last step. The targets: ≤ 60 GD-step equivalents on
  central-gd-mlp's problem, and 400 steps of central-adam-mlp in ≤ 5 min.
- ``--linear``: the cost of one unit of time against the number k = 1…8 of critical directions, on a tanh MLP
  32-16 on 200 digits (10 classes) with η = 2.05/λ_k(H(w0)) from its dense Hessian, so that exactly k effective
  eigenvalues are above the edge at w0 (the SDCP threshold set between λ_k and λ_{k+1}): every repetition
  integrates the unit of time from w0, whose first substep brings the k directions to the edge, warm-started
  from the last repetition. The table gives the critical directions the flow found at w0 (fewer than k where
  λ_k and λ_{k+1} are closer than the eigensolver's tolerance). The target: a cost per step that grows at most
  linearly in k.

- ``--reference DIR``: flowsim against the JAX central-flows reference (a checkout of
  alex-damian/central_flows_jax, whose ``Flow.central`` is the central flow of GD and RMSProp), on central-gd-mlp's
  problem (η = 0.5, 4 substeps, float64, from w0, ``REFERENCE_STEPS`` steps), run A B A B on one thread each; the
  reference runs under ``--reference-python`` (a Python with jax, jaxtyping, cvxpy and cvxopt) from
  ``benchmarks/central_reference_jax.py``, on the problem exported here, and tracks a fixed block of
  ``REFERENCE_K`` eigenvectors (flowsim's own block on this problem at the edge: 3 or 4 pairs, the tracked ones
  and the guard). Prints
  each program's median and mean seconds per step (the reference's first step, its compilation, left out), their
  ratio (target ≥ 6x), each in its own plain GD steps, and the largest relative difference between the two losses
  at any step (target ≤ 1 %).

The shares come from wrapping the engine's functions here (the engine keeps no timers). Timings on a busy
machine are not comparable; the GD step is timed right before each case so that the ratio is. Writes nothing
but the reference's temporary files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch

import flowsim.solvers.central as central_module
from flowsim.solvers.curvature import LossGraph
from flowsim.models import build_problem
from flowsim.solvers import Central, make_rule
from flowsim.solvers.central import CentralOptions

from benchmarks.bench import bundled, parser

CASES = {"central-gd-mlp": 150, "central-gd-cnn": 150, "central-adam-mlp": 150}  # scenario: warm-up steps
TIMED = 20
LINEAR_K = tuple(range(1, 9))
LINEAR_PROBLEM = {"model": "mlp", "widths": [32, 16], "activation": "tanh", "dataset": "digits", "n_train": 200,
                  "loss": "mse"}
PARTS = ("eigensolve", "third derivatives", "SDCP", "gradient", "recording")
REFERENCE_STEPS = 400
REFERENCE_K = 4
ONE_THREAD = {"OMP_NUM_THREADS": "1", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


class Timers:
    """Wall time of the central flow's parts, by wrapping the functions that do them (restored on exit)."""

    def __init__(self):
        self.seconds: dict = defaultdict(float)
        self.products = 0
        self.solves = 0

    @contextmanager
    def installed(self):
        saved = (central_module.precond_eigenpairs, LossGraph.third_derivatives, Central._solve,
                 LossGraph.__init__, Central._predictions)

        def timed(part, fn):
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                self.seconds[part] += time.perf_counter() - t0
                return out
            return wrapper

        def eigensolve(*args, **kwargs):
            out = saved[0](*args, **kwargs)
            self.products += out.matvecs
            self.solves += 1
            return out

        central_module.precond_eigenpairs = timed("eigensolve", eigensolve)
        LossGraph.third_derivatives = timed("third derivatives", saved[1])
        Central._solve = staticmethod(timed("SDCP", saved[2]))
        LossGraph.__init__ = timed("gradient", saved[3])
        Central._predictions = timed("recording", saved[4])
        try:
            yield self
        finally:
            (central_module.precond_eigenpairs, LossGraph.third_derivatives, Central._solve, LossGraph.__init__,
             Central._predictions) = saved[0], saved[1], staticmethod(saved[2]), saved[3], saved[4]


def gd_step_seconds(problem, steps: int = 50) -> float:
    """Best of three: seconds per plain GD step (gradient and update) on ``problem``."""
    best = float("inf")
    for _ in range(3):
        w = problem.w0.clone()
        t0 = time.perf_counter()
        for _ in range(steps):
            w = w - 1e-3 * problem.grad(w)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def central_process(scenario: str, lr: Optional[float] = None):
    """The problem, the central process (4 Euler substeps, no shadow) and η of ``scenario``'s central run."""
    doc = bundled(scenario)
    spec = dict(doc["runs"]["central"])
    rule = make_rule(spec.pop("rule"), **{k: v for k, v in spec.items() if k not in ("process", "lr", "substeps")})
    problem = build_problem(doc["problem"], dtype="float64", device="cpu", seed=doc.get("seed", 0))
    return problem, Central(problem, rule, options=CentralOptions(substeps=4, shadow=False)), lr or spec["lr"]


def measure(scenario: str, warmup: int, timed: int, lr: Optional[float] = None) -> dict:
    """Warm up, then time ``timed`` steps of the central flow of ``scenario`` part by part."""
    problem, process, lr = central_process(scenario, lr)
    traj = process.start(problem.w0)
    for _ in range(warmup):
        process.step(traj, lr, measure=False)
    gd = gd_step_seconds(problem)
    with Timers().installed() as timers:
        t0 = time.perf_counter()
        for _ in range(timed):
            process.step(traj, lr, measure=True)
        total = (time.perf_counter() - t0) / timed
    crit = process.last["X"].shape[0] if "X" in process.last else 0
    shares = {part: timers.seconds[part] / timed / total for part in PARTS}
    return {"ms": 1e3 * total, "gd_eq": total / gd, "gd_ms": 1e3 * gd, "shares": shares,
            "products": timers.products / max(timers.solves, 1), "tracked": process._k - 1, "critical": crit}


def linear(ks: tuple[int, ...], repeats: int) -> None:
    """The ``--linear`` table (see the module docstring)."""
    problem = build_problem(LINEAR_PROBLEM, dtype="float64", device="cpu")
    w = problem.w0
    lam = torch.linalg.eigvalsh(torch.func.hessian(problem.loss)(w)).flip(0)
    gd = gd_step_seconds(problem)
    print(f"\n| critical | η | ms/step | GD steps/step | GD steps per critical direction |  (MLP 32-16, {problem.n_params} "
          f"parameters, GD step {1e3 * gd:.2f} ms)")
    print("|---|---|---|---|---|")
    for k in ks:
        lr = 2.05 / lam[k - 1].item()
        crit = 0.5 * lr * (lam[k - 1] + lam[k]).item()  # exactly k effective eigenvalues above it at w0
        process = Central(problem, make_rule("gd"), options=CentralOptions(crit_threshold=crit, shadow=False))
        process.step(process.start(w), lr, measure=False)  # a warm start for the timed repetitions
        t0 = time.perf_counter()
        for _ in range(repeats):
            process.step(process.start(w), lr, measure=False)
        seconds = (time.perf_counter() - t0) / repeats
        critical = process.last["X"].shape[0]  # k, unless λ_k and λ_{k+1} are too close for the tolerance
        print(f"| {critical} | {lr:.4f} | {1e3 * seconds:.1f} | {seconds / gd:.0f} | {seconds / gd / critical:.0f} |")


def against_reference(ref_dir: str, python: str, steps: int, repeats: int = 2) -> None:
    """The ``--reference`` table (see the module docstring)."""
    problem, process, lr = central_process("central-gd-mlp")
    rule, options = process.rule, process.options
    doc = bundled("central-gd-mlp")["problem"]
    X, Y = problem.X.reshape(len(problem.X), -1), problem.Y
    dims = [X.shape[1], *doc["widths"], Y.shape[1]]
    driver = Path(__file__).with_name("central_reference_jax.py")
    ours, theirs = {"seconds": []}, {"seconds": []}
    with tempfile.TemporaryDirectory() as tmp:
        npz, out = os.path.join(tmp, "problem.npz"), os.path.join(tmp, "reference.json")
        np.savez(npz, X=X.cpu().numpy(), Y=Y.cpu().numpy(), w0=problem.w0.cpu().numpy(), dims=np.array(dims))
        for _ in range(repeats):
            process = Central(problem, rule, options=options)  # a fresh flow on the same problem
            traj, losses = process.start(problem.w0), []
            for _ in range(steps):
                t0 = time.perf_counter()
                losses.append(process.step(traj, lr, measure=False)["step_loss"])
                ours["seconds"].append(time.perf_counter() - t0)
            ours.update(loss=np.array(losses), gd_step=gd_step_seconds(problem))
            subprocess.run([python, str(driver), ref_dir, npz, str(steps), str(REFERENCE_K), str(lr), out],
                           check=True, env={**os.environ, **ONE_THREAD})
            with open(out) as f:
                run = json.load(f)
            theirs["seconds"] += run["seconds"][1:]  # the first step compiles
            theirs.update(loss=np.array(run["loss"]), gd_step=run["gd_step"])
    a, b = np.array(ours["seconds"]), np.array(theirs["seconds"])
    gap = np.abs(ours["loss"] - theirs["loss"]) / np.abs(theirs["loss"])
    print(f"\n| program | ms/step (median) | ms/step (mean) | own GD steps/step (median) |  (central-gd-mlp's problem, "
          f"{steps} steps × {repeats}, A B A B)")
    print("|---|---|---|---|")
    for name, t, run in (("flowsim", a, ours), (f"JAX reference (k = {REFERENCE_K})", b, theirs)):
        print(f"| {name} | {1e3 * np.median(t):.1f} | {1e3 * t.mean():.1f} | "
              f"{np.median(t) / run['gd_step']:.0f} (GD step {1e3 * run['gd_step']:.3f} ms) |")
    print(f"flowsim is {np.median(b) / np.median(a):.1f}x faster (median; mean {b.mean() / a.mean():.1f}x; target "
          f"≥ 6x); the losses differ by at most {gap.max():.1e} relative at any step (step {int(gap.argmax())}; "
          f"target ≤ 1e-2)")


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("central-speed", "The central flow's cost per unit of time in GD-step equivalents, part by part.",
               quick="central-gd-mlp only, 20 warm-up steps, 3 timed")
    p.add_argument("--linear", action="store_true", help="also the cost per step against the number k = 1..8 of "
                   "critical directions")
    p.add_argument("--reference", metavar="DIR", help="also run the JAX central-flows reference checked out in DIR "
                   "beside flowsim on central-gd-mlp's problem (see the module docstring)")
    p.add_argument("--reference-python", metavar="PYTHON", default=sys.executable,
                   help="the Python that runs the reference (with jax, jaxtyping, cvxpy, cvxopt; default: this one)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cases = {"central-gd-mlp": 20} if args.quick else CASES
    timed = 3 if args.quick else TIMED
    print("| problem | ms/step | GD steps/step | " + " | ".join(PARTS) + " | other | products/solve | tracked | "
          "critical |")
    print("|---" * (len(PARTS) + 7) + "|")
    for scenario, warmup in cases.items():
        r = measure(scenario, warmup, timed)
        other = 1 - sum(r["shares"].values())
        print(f"| {scenario} | {r['ms']:.1f} | {r['gd_eq']:.0f} (GD step {r['gd_ms']:.2f} ms) | "
              + " | ".join(f"{100 * r['shares'][part]:.0f} %" for part in PARTS)
              + f" | {100 * other:.0f} % | {r['products']:.1f} | {r['tracked']} | {r['critical']} |")
    if args.linear:
        linear(LINEAR_K[:2] if args.quick else LINEAR_K, repeats=1 if args.quick else 3)
    if args.reference:
        against_reference(args.reference, args.reference_python, 20 if args.quick else REFERENCE_STEPS)
    return 0
