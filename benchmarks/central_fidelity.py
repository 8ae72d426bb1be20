"""The ``central-fidelity`` benchmark: how closely the central flow of a rule follows its discrete run at the edge,
on bundled scenarios that run the discrete rule, its stable flow (``flow``) and its central flow (``central``)
side by side, and what one unit of its time costs against GD's central flow on the same problem.

Per scenario, against the targets of the momentum/Adam central flows (the GD flow's own, in its test):
  edge       largest |λ/threshold − 1| of the central run over its curvature measurements with Σ ≠ 0
             (λ_max(P̃⁻¹H) for a preconditioned rule; target ≤ 0.02);
  distance   ‖w − w_discrete‖ over the discrete run's travel at the last kept step, central and stable flow
             (target: central ≤ 0.10 and ≥ 1.5x closer than the stable flow);
  loss       mean |predicted loss − discrete loss averaged over 20 steps| / that average, over the steps with
             Σ ≠ 0 (target ≤ 0.10);
  variance   the discrete run's mean squared oscillation amplitude along Σ's top eigenvector (¼(e·Δw)² from its
             step Δw) over Σ's mean top eigenvalue, over the steps with Σ ≠ 0 (target within 2x);
  cost       one step of the central run at the edge (median over its steps with Σ ≠ 0, the discrete shadow
             included), in gradient-equivalents (one full-batch loss and gradient), against GD's central flow on
             the same problem at its edge.
"""
from __future__ import annotations

import math
import tempfile
import time
from typing import Optional

import numpy as np
import torch
import xarray as xr

import flowsim
from benchmarks.bench import best_of, bundled, parser
from flowsim.compare import relative_distance
from flowsim.solvers.curvature import hessian_operator, precond_eigenpairs
from flowsim.models import build_problem

SCENARIOS = ("central-momentum-mlp", "central-adam-mlp", "central-momentum-cnn", "central-adam-cnn")
WINDOW = 20  # steps in the discrete loss's moving average

HELD_OUT_PROBLEMS = {
    # the tanh MLP 64-32-32-4 on 400 digits on which Adam's flows from w0 failed (β1 = 0.8, η = 0.02, 400 steps)
    "tanh-mlp-digits4": ({"model": "mlp", "widths": [64, 32, 32], "activation": "tanh", "dataset": "digits",
                          "classes": [0, 1, 2, 3], "n_train": 400, "loss": "mse"}, {"beta1": 0.8, "lr": 0.02}, 400),
    # a 16-unit MLP on 200 digits of all ten classes (1.2k weights), ELU
    "elu-mlp-digits": ({"model": "mlp", "widths": [16], "activation": "elu", "dataset": "digits", "n_train": 200,
                        "loss": "mse"}, {"lr": 0.02}, 400),
    # a GELU MLP 32-32 on a seeded Gaussian mixture
    "gelu-mlp-mixture": ({"model": "mlp", "widths": [32, 32], "activation": "gelu", "dataset": "gaussian_mixture",
                          "n_train": 300, "loss": "mse"}, {"lr": 0.02}, 400),
}
"""Full-batch problems on which no choice of the flows was made, run from the rules' defaults (no
``discrete_start``): per problem (problem, Adam's settings, steps). Adam runs at the η given; EMA momentum at its
default β1 = 0.9 and the η that puts η·λ_max(H(w0)) at half its threshold (2 + 2β1)/(1 − β1), so that it reaches
its edge only by sharpening. Fixed before any flow was run on them, but for Adam's η on the second and third:
first 0.01 for 300 steps, where neither discrete run reached its edge (docs/central-momentum.md gives both)."""


def held_out(name: str, rule: str) -> dict:
    """The scenario of held-out problem ``name`` for ``rule`` (adam | momentum): its discrete run, stable flow
    and central flow from defaults."""
    spec, adam, steps = HELD_OUT_PROBLEMS[name]
    if rule == "adam":
        run = {"rule": "adam", **adam}
    else:
        problem = build_problem(spec, dtype="float64", device="cpu")
        top = precond_eigenpairs(hessian_operator(problem, problem.w0), None, problem.w0, 1, tol=1e-6).vals[0].item()
        run = {"rule": "momentum", "lr": 0.5 * 38.0 / top}
    return {"name": f"{rule}-{name}", "seed": 0, "dtype": "float64", "device": "cpu", "problem": spec,
            "steps": steps, "runs": {rule: {"process": "discrete", **run}, "flow": {"process": "stable", **run},
                                     "central": {"process": "central", **run}},
            "record": {"every": 1, "curvature_every": 10, "top_k": 1, "precond": rule == "adam",
                       "keep_weights": 10, "projection_dim": 0},
            "compare": {"reference": rule}}


def _moving_average(x: np.ndarray, m: int = WINDOW) -> np.ndarray:
    out = np.full(len(x), np.nan)
    if len(x) >= m:
        out[m // 2:m // 2 + len(x) - m + 1] = np.convolve(x, np.ones(m) / m, mode="valid")
    return out


def checks(ds: xr.Dataset, ref: str) -> dict:
    """The four fidelity figures of the module docstring from a run of the scenario."""
    central = ds.sel(run="central")
    active = np.nan_to_num(central["sigma_eigs"].isel(crit=0).values) > 0
    name = "precond_sharpness" if "precond_sharpness" in ds and np.isfinite(central["precond_sharpness"]).any() \
        else "sharpness"
    ratio = (central[name] / central["threshold"]).values
    measured = np.isfinite(ratio) & active
    average = _moving_average(ds["loss"].sel(run=ref).values)
    ok = active & np.isfinite(average)
    predicted = central["predicted_loss"].values
    sigma = central["sigma_eigs"].isel(crit=0).values
    disp = central["sigma_oscillation_sq"].isel(crit=0).values
    return {"edge steps": int(active.sum()), "steps": int(ds.sizes["step"]),
            "edge": float(np.abs(ratio[measured] - 1).max()) if measured.any() else math.nan,
            "central": relative_distance(ds, "central", ref), "stable": relative_distance(ds, "flow", ref),
            "loss": float(np.mean(np.abs(predicted[ok] - average[ok]) / average[ok])) if ok.any() else math.nan,
            "variance": float(disp[active].mean() / sigma[active].mean()) if active.any() else math.nan}


def _edge_step_time(ds: xr.Dataset) -> float:
    """Median wall time of one step of the central run at the edge (Σ ≠ 0), from its ``wall_time`` (seconds; the
    median leaves out the steps that also measure curvature)."""
    central = ds.sel(run="central")
    active = np.nan_to_num(central["sigma_eigs"].isel(crit=0).values) > 0
    dt = np.diff(central["wall_time"].values, prepend=0.0)
    return float(np.median(dt[active]))


def costs(doc: dict, ds: xr.Dataset, tmp: str) -> tuple[float, float]:
    """One step of the scenario's central flow at the edge and of GD's central flow on the same problem (30 steps
    from the start at η = 2.05/λ_max(w0), so at its edge from the first step), in gradient-equivalents (one
    full-batch loss and gradient)."""
    problem = build_problem(doc["problem"], dtype=doc.get("dtype", "float64"), device="cpu")
    w = problem.w0
    t_grad = best_of(lambda: problem.loss_and_grad(w), repeats=20)
    top = precond_eigenpairs(hessian_operator(problem, w), None, w, 1, tol=1e-8).vals[0].item()
    gd = {**doc, "name": f"{doc['name']}-gd", "steps": 30, "compare": {"reference": "central"},
          "runs": {"central": {"process": "central", "rule": "gd", "lr": 2.05 / top}}}
    ds_gd = flowsim.run(gd, f"{tmp}/{gd['name']}.zarr", progress=False)
    return _edge_step_time(ds) / t_grad, _edge_step_time(ds_gd) / t_grad


def fidelity(docs: list[dict], steps: Optional[int] = None) -> int:
    print(f"central-fidelity: {', '.join(doc['name'] for doc in docs)}; {torch.get_num_threads()} threads",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for doc in docs:
            name, ref = doc["name"], doc["compare"]["reference"]
            t0 = time.perf_counter()
            ds = flowsim.run(doc, f"{tmp}/{name}.zarr", steps=steps, progress=False)
            c = checks(ds, ref)
            rule_cost, gd_cost = costs(doc, ds, tmp)
            rows.append((name, c, rule_cost, gd_cost))
            print(f"  {name}: {c['edge steps']}/{c['steps']} steps at the edge; edge {c['edge']:.1e}; distance "
                  f"{c['central']:.3f} (stable flow {c['stable']:.3f}, {c['stable'] / c['central']:.2f}x); loss "
                  f"{c['loss']:.3f}; variance {c['variance']:.2f}; one step at the edge {rule_cost:.0f} "
                  f"gradient-equivalents (GD's central flow {gd_cost:.0f}); {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n| scenario | steps at the edge | edge (≤ 0.02) | distance (≤ 0.10) | stable flow | closer (≥ 1.5x) "
          "| loss (≤ 0.10) | variance (0.5-2) | unit cost | GD's |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, c, rule_cost, gd_cost in rows:
        print(f"| {name} | {c['edge steps']}/{c['steps']} | {c['edge']:.1e} | {c['central']:.3f} | "
              f"{c['stable']:.3f} | {c['stable'] / c['central']:.2f}x | {c['loss']:.3f} | {c['variance']:.2f} | "
              f"{rule_cost:.0f} | {gd_cost:.0f} |")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("central-fidelity", "The central flow of momentum and Adam against their discrete runs and stable "
               "flows at the edge: the four fidelity figures and the cost of a unit of time.",
               quick="central-momentum-mlp for 60 steps")
    p.add_argument("scenarios", nargs="*", default=list(SCENARIOS), help=f"bundled scenarios (default: "
                   f"{' '.join(SCENARIOS)}); each runs discrete, flow and central runs")
    p.add_argument("--held-out", action="store_true", help="instead, Adam and EMA momentum from their defaults on "
                   f"the held-out problems ({', '.join(HELD_OUT_PROBLEMS)})")
    args = p.parse_args(argv)
    if args.quick:
        return fidelity([bundled("central-momentum-mlp")], 60)
    if args.held_out:
        return fidelity([held_out(name, rule) for rule in ("adam", "momentum") for name in HELD_OUT_PROBLEMS])
    return fidelity([bundled(name) for name in args.scenarios])
