"""The ``options`` benchmark: what each option of the edge controller is worth, on both halves of the adaptive
suite — the table an option needs to keep its place.

Each variant of ``VARIANTS`` is the controller's defaults over Adam with one option changed (the first row is the
defaults themselves). It runs on every task of the adaptive benchmark's suite (``benchmarks.adaptive.TASKS``, 3
seeds) and is compared with that benchmark's stored runs (``--store``, written by ``python -m benchmarks adaptive
-o STORE``): the per-seed target (the best grid GD/SGD's final loss) and tuned Adam's final loss. Per half and
variant it prints the mean over tasks of log10(final loss / tuned Adam's) (lower is better; final losses floored
at ``benchmarks.report.LOSS_FLOOR``), the tasks where it reaches the target in ≥ 1.5x fewer steps than the best
GD/SGD, the tasks where its final loss is ≤ 1.1x tuned Adam's, and diverged runs. The tuning half is where a
default may be chosen; the held-out half is reported beside it, every time.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np

import flowsim
from benchmarks import adaptive, report
from benchmarks.bench import parser

VARIANTS: dict[str, dict] = {
    "defaults": {},
    "c 1 (at the edge)": {"c": 1.0},
    "c 0.25": {"c": 0.25},
    "no early estimates": {"early": False},
    "no guard": {"guard": 1e300},
    "no growth cap": {"growth": 1e300},
    "S to eig_tol (no product cap)": {"max_products": None},
    "2 products per re-estimate": {"max_products": 2},
    "re-estimate every 20": {"every": 20},
    "exact products": {"hvp": "reverse"},
}
"""Variant name → the controller's options that differ from its defaults."""


def _reference(ds, task: str, method: str, name: str) -> np.ndarray:
    runs = ds.isel(run=(ds["task"] == task) & (ds["method"] == method))
    return runs[name].values if name != "final" else report.final(runs, "loss")


def options(store: str, half: str = "all", variants: Optional[list[str]] = None, seeds=adaptive.SEEDS) -> int:
    stored = flowsim.open(store)
    tasks = adaptive.select(half)
    names = variants or list(VARIANTS)
    print(f"options: edge-adam variants on {len(tasks)} tasks × {len(seeds)} seeds, against {store}", flush=True)
    rows = []
    t0 = time.perf_counter()
    for name in names:
        for task_name, task in tasks.items():
            targets = _reference(stored, task_name, "gd-best", "target")
            gd_steps = np.nanmean(_reference(stored, task_name, "gd-best", "steps_to_target"))
            adam_final = np.mean(_reference(stored, task_name, report.TUNED_ADAM, "final"))
            method = adaptive.Method("adam", {"edge": VARIANTS[name]} if VARIANTS[name] else "edge")
            finals, steps, diverged = [], [], 0
            for seed, target in zip(seeds, targets):
                curve, _ = adaptive.flowsim_curve(task, seed, method)
                loss = np.asarray(curve.loss, float)
                finals.append(loss[np.isfinite(loss)][-1] if curve.diverged_at is None else math.inf)
                steps.append(adaptive._first_hit(curve, target)[0])
                diverged += curve.diverged_at is not None
            hit = [s for s in steps if s is not None]
            final = float(np.mean(finals))
            rows.append((name, task["half"], task_name, final / adam_final,
                         len(hit) == len(seeds) and gd_steps / np.mean(hit) >= 1.5, diverged))
            print(f"  {name:<30} {task_name:<20} final/adam {final / adam_final:9.3g}  steps "
                  f"{np.mean(hit) if hit else math.nan:6.1f} (gd-best {gd_steps:5.1f})  diverged {diverged}  "
                  f"[{time.perf_counter() - t0:5.0f} s]", flush=True)
    print("\nper half: mean log10(final / tuned Adam's) | tasks ≥ 1.5x fewer steps | tasks ≤ 1.1x Adam | diverged")
    for h in dict.fromkeys(r[1] for r in rows):
        print(f"  {h}:")
        for name in names:
            mine = [r for r in rows if r[0] == name and r[1] == h]
            logs = [math.log10(max(r[3], report.LOSS_FLOOR)) if math.isfinite(r[3]) else math.inf for r in mine]
            print(f"    {name:<30} {np.mean(logs):+7.3f}   {sum(r[4] for r in mine)}/{len(mine)}   "
                  f"{sum(r[3] <= 1.1 for r in mine)}/{len(mine)}   {sum(r[5] for r in mine)}", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("options", "What each option of the edge controller is worth, on both halves of the adaptive suite.",
               quick="the defaults and one variant, one seed")
    p.add_argument("--store", required=True, help="a store of `python -m benchmarks adaptive -o STORE`")
    p.add_argument("--half", choices=["tuning", "held-out", "all"], default="all")
    args = p.parse_args(argv)
    if args.quick:
        return options(args.store, args.half, ["defaults", "no early estimates"], seeds=adaptive.SEEDS[:1])
    return options(args.store, args.half)
