"""The ``sweep`` and ``batched`` benchmarks: scaling a sweep out, and batching runs into one vmapped pass.

Each prints its timings and ratios in one run, every run going through :func:`flowsim.run`.
- ``sweep``: a 16-run sweep (8 step sizes × 2 seeds of GD on an MLP on digits) on a LocalCluster with 2 single-
  threaded worker processes (the ``dist`` extra), against the same sweep in process, one run after the other
  (target ≥ 1.6x on 2 cores). The cluster's start-up is timed separately.
- ``batched``: 8 step sizes of GD on the quickstart MLP (digits, 1000 examples, 2 × 64 tanh, float64) as one
  batched pass (``batch: true``) against 8 sequential runs (target ≥ 3x on CPU); then the same on a small MLP,
  where per-step overhead rather than arithmetic dominates.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Optional

import torch

import flowsim
from benchmarks.bench import parser

MLP = {"model": "mlp", "widths": [64, 64], "activation": "tanh", "dataset": "digits", "n_train": 1000, "loss": "mse"}
LRS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sweep(steps: int = 200) -> int:
    from distributed import Client, LocalCluster
    doc = {"name": "bench-sweep", "device": "cpu", "dtype": "float64",
           "problem": {**MLP, "widths": [32, 32], "n_train": 500}, "steps": steps,
           "runs": {"gd": {"lr": 0.1}}, "record": {"projection_dim": 64, "projection_every": 10},
           "sweep": {"lr": LRS, "seed": [0, 1]}}
    print(f"sweep: 16 runs (8 lr × 2 seeds) × {steps} GD steps, MLP 2×32 on 500 digits, float64, "
          f"{os.cpu_count()} cores, torch threads in process: {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        flowsim.run({**doc, "steps": 2, "sweep": {"lr": [0.1]}}, progress=False)  # warm-up (imports, data)
        print("  in process, serial …", flush=True)
        t_serial = _timed(lambda: flowsim.run(doc, f"{tmp}/serial.zarr", progress=False))
        print("  on a LocalCluster of 2 workers …", flush=True)
        t0 = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster):
            t_start = time.perf_counter() - t0
            t_dask = _timed(lambda: flowsim.run(doc, f"{tmp}/dask.zarr", scheduler=cluster.scheduler_address,
                                                progress=False))
    print(f"  in process, serial      : {t_serial:7.2f} s")
    print(f"  LocalCluster(2 workers) : {t_dask:7.2f} s  (+ {t_start:.2f} s to start the cluster)")
    print(f"  ratio serial/cluster = {t_serial / t_dask:.2f}  (target ≥ 1.6; with start-up: "
          f"{t_serial / (t_dask + t_start):.2f})")
    return 0


def batched(steps: int = 100) -> int:
    print(f"batched: {len(LRS)} step sizes of GD × {steps} steps through flowsim.run (in memory), float64, "
          f"torch threads: {torch.get_num_threads()}")
    for label, problem in (("quickstart MLP 2×64, 1000 digits", MLP),
                           ("small MLP 1×16, 200 digits", {**MLP, "widths": [16], "n_train": 200})):
        doc = {"name": "bench-batched", "device": "cpu", "dtype": "float64", "problem": problem, "steps": steps,
               "runs": {"gd": {"lr": 0.1}}, "record": {"projection_dim": 0}, "sweep": {"lr": LRS}}
        flowsim.run({**doc, "steps": 2}, progress=False)  # warm-up
        flowsim.run({**doc, "steps": 2, "batch": True}, progress=False)
        t_seq = _timed(lambda: flowsim.run(doc, progress=False))
        t_batched = _timed(lambda: flowsim.run({**doc, "batch": True}, progress=False))
        print(f"  {label}: sequential {t_seq:6.2f} s, batched {t_batched:6.2f} s, "
              f"ratio = {t_seq / t_batched:.2f}  (target ≥ 3)", flush=True)
    return 0


def main_sweep(argv: Optional[list[str]] = None) -> int:
    p = parser("sweep", "A 16-run sweep on a LocalCluster of 2 workers against the same sweep in process "
               "(needs the dist extra).", quick="20 steps per run")
    args = p.parse_args(argv)
    return sweep(20) if args.quick else sweep()


def main_batched(argv: Optional[list[str]] = None) -> int:
    p = parser("batched", "8 step sizes of GD as one vmapped pass against 8 sequential runs.",
               quick="10 steps per run")
    args = p.parse_args(argv)
    return batched(10) if args.quick else batched()
