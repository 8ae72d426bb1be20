"""The ``flows-fidelity`` benchmark: the stable, central and rod flows of every bundled central-flow scenario
against its discrete run, in one run per scenario (the scenario's own runs, with a ``rod`` run added beside them).

Per scenario and flow:
  distance  ‖w − w_discrete‖ over the discrete run's travel at the last kept step;
  edge      the flow's controlling sharpness over its threshold (η·λ_max(P̃⁻¹H)/θ, η·λ_max(H)/2 for GD), median
            and largest |· − 1| over its curvature measurements in the edge phase (the steps where the central
            flow has Σ ≠ 0);
  loss      mean |predicted loss − the discrete loss averaged over 20 steps| / that average over the edge phase
            (central: L + ½⟨H, Σ⟩; rod: ½[L(c + δ) + L(c − δ)]);
  cost      one unit of time: the rod's gradient evaluations, counted (a wrapper around its vmapped gradient, over
            a few steps from the scenario's start), and every flow's median wall time per step over its run (the
            central flow's over the edge phase), in full-batch gradient evaluations, with the central flow's wall
            time over the rod's.

Targets (the rod flow): distance ≤ 1.25 × the central flow's on 6 of 8 scenarios where the discrete run holds its
edge and ≥ 1.5 × closer than the stable flow on all; ≤ 16 gradient evaluations per unit of time; ≥ 20 × less wall
time than the central flow.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from typing import Optional

import numpy as np
import torch
import xarray as xr

import flowsim
from benchmarks.bench import best_of, bundled, parser
from benchmarks.central_fidelity import _moving_average
from flowsim.compare import relative_distance
from flowsim.models import build_problem
from flowsim.solvers import Rod, make_rule

SCENARIOS = ("central-gd-mlp", "central-gd-gelu-mlp", "central-gd-cnn", "central-rmsprop-mlp",
             "central-scalar-rmsprop-mlp", "central-momentum-mlp", "central-momentum-cnn", "central-adam-mlp",
             "central-adam-cnn")
FLOWS = ("flow", "central", "rod")


def with_rod(doc: dict) -> tuple[dict, str]:
    """The scenario with a ``rod`` run of the stable flow's rule and settings (its integrator keys dropped), and
    the name of its discrete run."""
    doc = copy.deepcopy(doc)
    flow = doc["runs"]["flow"]
    doc["runs"]["rod"] = {**{k: v for k, v in flow.items() if k not in ("method", "substeps", "rtol", "atol")},
                          "process": "rod"}
    return doc, doc["compare"]["reference"]


def edge_phase(ds: xr.Dataset) -> np.ndarray:
    """The steps where the central flow has Σ ≠ 0."""
    return np.nan_to_num(ds["sigma_eigs"].sel(run="central").isel(crit=0).values) > 0


def figures(ds: xr.Dataset, ref: str, run: str, phase: np.ndarray) -> dict:
    """distance, edge (median, largest deviation) and loss of ``run`` (module docstring)."""
    r = ds.sel(run=run)
    name = "precond_sharpness" if "precond_sharpness" in ds and np.isfinite(r["precond_sharpness"]).any() \
        else "sharpness"
    ratio = (r[name] / r["threshold"]).values
    measured = np.isfinite(ratio) & phase
    out = {"distance": relative_distance(ds, run, ref),
           "edge": float(np.median(ratio[measured])) if measured.any() else math.nan,
           "edge_dev": float(np.abs(ratio[measured] - 1).max()) if measured.any() else math.nan,
           "loss": math.nan}
    if "predicted_loss" in r and np.isfinite(r["predicted_loss"].values).any():
        average = _moving_average(ds["loss"].sel(run=ref).values)
        ok = phase & np.isfinite(average) & np.isfinite(r["predicted_loss"].values)
        if ok.any():
            out["loss"] = float(np.mean(np.abs(r["predicted_loss"].values[ok] - average[ok]) / average[ok]))
    return out


def step_seconds(ds: xr.Dataset, run: str, phase: Optional[np.ndarray] = None) -> float:
    """Median wall time of one step of ``run`` (over ``phase`` where given), from its ``wall_time``; the steps the
    discrete rule takes before a flow starts are left out."""
    r = ds.sel(run=run)
    dt = np.diff(r["wall_time"].values, prepend=0.0)
    start = r["discrete_start"].values
    keep = np.arange(dt.size) >= (int(start) if np.isfinite(start) else 0)
    keep &= np.isfinite(dt)
    if phase is not None:
        keep &= phase[:dt.size]
    return float(np.median(dt[keep])) if keep.any() else math.nan


def counted_gradients(doc: dict, steps: int = 4) -> float:
    """Gradient evaluations per unit of time of the scenario's rod flow, counted over ``steps`` steps after its
    start (the start's own three discrete points left out)."""
    spec = doc["runs"]["rod"]
    problem = build_problem(doc["problem"], dtype=doc.get("dtype", "float64"), device="cpu")
    hyper = {k: v for k, v in spec.items() if k not in ("process", "rule", "lr", "discrete_start")}
    rod = Rod(problem, make_rule(spec["rule"], **hyper))
    traj = rod.start(problem.w0)
    while traj.step <= rod.discrete_start:  # the discrete steps and the flow's first step (which builds the rod)
        rod.step(traj, spec["lr"], measure=False)
    count, gradients = [0], rod._gradients

    def counting(w):
        count[0] += w.shape[0]
        return gradients(w)
    rod._gradients = counting
    for _ in range(steps):
        rod.step(traj, spec["lr"], measure=False)
    return count[0] / steps


def fidelity(names: list[str], steps: Optional[int] = None) -> int:
    print(f"flows-fidelity: {', '.join(names)}; {torch.get_num_threads()} threads", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            doc, ref = with_rod(bundled(name))
            t0 = time.perf_counter()
            ds = flowsim.run(doc, f"{tmp}/{name}.zarr", steps=steps, progress=False)
            phase = edge_phase(ds)
            problem = build_problem(doc["problem"], dtype=doc.get("dtype", "float64"), device="cpu")
            t_grad = best_of(lambda: problem.loss_and_grad(problem.w0), repeats=20)
            f = {run: figures(ds, ref, run, phase) for run in FLOWS}
            seconds = {"flow": step_seconds(ds, "flow"), "central": step_seconds(ds, "central", phase),
                       "rod": step_seconds(ds, "rod")}
            counted = counted_gradients(doc)
            rows.append((name, int(phase.sum()), int(ds.sizes["step"]), f, seconds, t_grad, counted))
            print(f"  {name}: {time.perf_counter() - t0:.0f} s; distance stable {f['flow']['distance']:.3f}, "
                  f"central {f['central']['distance']:.3f}, rod {f['rod']['distance']:.3f}", flush=True)
    print("\n| scenario | edge phase | distance: stable | central | rod | rod/central (≤ 1.25) | stable/rod (≥ 1.5) "
          "| edge: central | rod | loss: central | rod | per unit: rod gradients (≤ 16) | wall, in gradients: "
          "stable | central | rod | central/rod (≥ 20) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, active, total, f, seconds, t_grad, counted in rows:
        s, c, r = f["flow"], f["central"], f["rod"]
        print(f"| {name} | {active}/{total} | {s['distance']:.3f} | {c['distance']:.3f} | {r['distance']:.3f} | "
              f"{r['distance'] / c['distance']:.2f} | {s['distance'] / r['distance']:.2f} | "
              f"{c['edge']:.3f} (±{c['edge_dev']:.0e}) | {r['edge']:.3f} (±{r['edge_dev']:.2f}) | {c['loss']:.3f} | "
              f"{r['loss']:.3f} | {counted:.0f} | {seconds['flow'] / t_grad:.0f} | {seconds['central'] / t_grad:.0f} "
              f"| {seconds['rod'] / t_grad:.0f} | {seconds['central'] / seconds['rod']:.0f} |")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("flows-fidelity", "The stable, central and rod flows of each bundled central-flow scenario against "
               "its discrete run: distance, edge, predicted loss and the cost of a unit of time.",
               quick="central-gd-gelu-mlp for 60 steps")
    p.add_argument("scenarios", nargs="*", default=list(SCENARIOS),
                   help=f"bundled scenarios (default: {' '.join(SCENARIOS)})")
    args = p.parse_args(argv)
    if args.quick:
        return fidelity(["central-gd-gelu-mlp"], 60)
    return fidelity(args.scenarios)
