"""What the benchmarks share — timing (:func:`best_of`), their command-line parser (:func:`parser`), the bundled
scenarios (:func:`bundled`) — and the ``overhead`` benchmark: flowsim's cost over a bare torch loop.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from typing import Optional

import torch
import yaml

import flowsim
import flowsim.scenario
from flowsim.models import build_problem


def best_of(fn, repeats: int = 3) -> float:
    """Smallest wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def parser(name: str, description: str, quick: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser of benchmark ``name`` (``python -m benchmarks NAME``); with ``quick`` (what it
    shortens), a ``--quick`` flag."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=description)
    if quick:
        p.add_argument("--quick", action="store_true", help=f"a short run to check that it works: {quick}")
    return p


def bundled(name: str) -> dict:
    """The bundled scenario ``name`` (``flowsim list``) as a dict."""
    return yaml.safe_load(flowsim.scenario.bundled()[name].read_text())


def overhead(steps: int = 2000, repeats: int = 3) -> int:
    """``steps`` GD steps on the quickstart MLP through :func:`flowsim.run` (loss every step, w_proj every 10, a
    zarr store) against a bare torch loop doing the same updates and measurements. Prints the ratio (target
    ≤ 1.15)."""
    doc = bundled("quickstart")
    doc.pop("compare", None)
    doc.update(steps=steps, device="cpu", runs={"gd": {"process": "discrete", "rule": "gd", "lr": 0.1}})
    doc["record"] = {"every": 1, "projection_dim": 256, "projection_every": 10}  # no curvature: bare does none
    sc = flowsim.load_scenario(doc)
    problem = build_problem(doc["problem"], dtype=sc.dtype, device="cpu", seed=sc.seed)
    n_params = problem.n_params

    def bare():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sc.seed)
            module = sc.problem.make_module((problem.X.shape[1],), problem.Y.shape[1]).to(torch.float64)
        gen = torch.Generator().manual_seed(sc.seed)
        R = torch.randn(256, n_params, generator=gen, dtype=torch.float64) / 16.0
        X, Y, lr = problem.X, problem.Y, 0.1
        losses, projs = [], []
        params = list(module.parameters())
        for k in range(steps + 1):
            if k % 10 == 0:
                projs.append((R @ torch.nn.utils.parameters_to_vector(params)).detach().numpy())
            loss = 0.5 * (module(X) - Y).pow(2).sum(1).mean()
            losses.append(loss.item())
            if k == steps:
                break
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(lr * g)
        return losses

    def through_flowsim():
        with tempfile.TemporaryDirectory() as tmp:
            flowsim.run(sc, f"{tmp}/bench.zarr", progress=False)

    print(f"overhead: {steps} GD steps, quickstart MLP ({n_params} params, {problem.n_examples} examples, "
          f"float64, {torch.get_num_threads()} threads); best of {repeats} after one warm-up each", flush=True)
    bare()  # warm up both paths once
    through_flowsim()
    print("  timing the bare torch loop …", flush=True)
    t_bare = best_of(bare, repeats)
    print("  timing flowsim.run …", flush=True)
    t_flowsim = best_of(through_flowsim, repeats)
    print(f"  bare torch loop : {t_bare:7.3f} s")
    print(f"  flowsim run     : {t_flowsim:7.3f} s  (zarr store, loss every step, w_proj every 10)")
    print(f"  ratio flowsim/bare = {t_flowsim / t_bare:.3f}  (target ≤ 1.15)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("overhead", "flowsim.run against a bare torch loop doing the same GD steps and measurements.",
               quick="200 steps, one timed repeat")
    args = p.parse_args(argv)
    return overhead(200, 1) if args.quick else overhead()
