"""The ``sweep`` and ``batched`` benchmarks: scaling a sweep out, and batching runs into one vmapped pass.

Not tests: each prints its timings and ratios in one run.
- ``sweep``: a 16-run sweep (8 step sizes × 2 seeds of GD on an MLP on digits) on a LocalCluster with 2 single-
  threaded worker processes, against the same sweep in process, one run after the other (target ≥ 1.6x on 2
  cores). The cluster's start-up is timed separately.
- ``batched``: 8 step sizes of GD on the quickstart MLP (digits, 1000 examples, 2 × 64 tanh, float64) as one
  batched pass (``batch: true``) against 8 sequential runs, both through :func:`flowsim.run` (target ≥ 3x on
  CPU); then the same on a small MLP, where per-step overhead rather than arithmetic dominates.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

import flowsim

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
    with tempfile.TemporaryDirectory() as tmp:
        flowsim.run({**doc, "steps": 2, "sweep": {"lr": [0.1]}}, progress=False)  # warm-up (imports, data)
        t_serial = _timed(lambda: flowsim.run(doc, f"{tmp}/serial.zarr", progress=False))
        t0 = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster):
            t_start = time.perf_counter() - t0
            t_dask = _timed(lambda: flowsim.run(doc, f"{tmp}/dask.zarr", scheduler=cluster.scheduler_address,
                                                progress=False))
    print(f"sweep: 16 runs (8 lr × 2 seeds) × {steps} GD steps, MLP 2×32 on 500 digits, float64, "
          f"{os.cpu_count()} cores, torch threads in process: {torch.get_num_threads()}")
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
              f"ratio = {t_seq / t_batched:.2f}  (target ≥ 3)")
    return 0
