"""Discrete runs end to end: sampling, recording, divergence, interrupted stores."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
import zarr

import flowsim
from flowsim.solvers import EpochSampler

QUAD = {"name": "quad", "device": "cpu", "problem": {"model": "quadratic", "spectrum": [10.0, 1.0]}, "steps": 50,
        "record": {"projection_dim": 2, "projection_every": 5}}


def test_a_minibatch_epoch_visits_every_example_once():
    sampler = EpochSampler(n=10, batch_size=3, seed=7, device=torch.device("cpu"))
    assert sampler.per_epoch == 4
    for epoch in range(3):
        idx = torch.cat([sampler.indices(epoch * 4 + k) for k in range(4)])
        assert sorted(idx.tolist()) == list(range(10))
    first = torch.cat([sampler.indices(k) for k in range(4)])
    second = torch.cat([sampler.indices(4 + k) for k in range(4)])
    assert not torch.equal(first, second)  # a new permutation each epoch
    again = EpochSampler(n=10, batch_size=3, seed=7, device=torch.device("cpu"))
    assert torch.equal(torch.cat([again.indices(4 + k) for k in range(4)]), second)  # stateless, seeded


def test_discrete_gd_run_is_recorded_on_the_dataset_schema():
    ds = flowsim.run({**QUAD, "runs": {"gd": {"lr": 0.1}}})
    gd = ds.sel(run="gd")
    assert gd.loss.sizes["step"] == 51 and bool(~gd.diverged)
    # GD on ½Σλθ²: θ_k = (1 − ηλ)^k θ_0 exactly
    theta = np.array([(1 - 0.1 * 10) ** 50, (1 - 0.1 * 1) ** 50])
    assert float(gd.loss[-1]) == pytest.approx(0.5 * (10 * theta[0] ** 2 + theta[1] ** 2), rel=1e-12)
    np.testing.assert_allclose(gd.time.values, 0.1 * np.arange(51), rtol=1e-12)
    assert np.isnan(gd.step_size[-1]) and float(gd.step_size[0]) == 0.1
    proj = gd.w_proj.values
    assert np.all(np.isfinite(proj[::5])) and np.all(np.isnan(proj[1:5]))
    for name in ("loss", "grad_norm", "step_size", "wall_time", "w_proj", "diverged", "diverged_at"):
        assert "units" in ds[name].attrs and "long_name" in ds[name].attrs
    assert "quadratic" in ds.attrs["scenario"] and ds.attrs["dtype"] == "float64"
    assert ds.attrs["flowsim_version"] == flowsim.__version__ and ds.attrs["torch_version"] == torch.__version__
    assert ds.attrs["created"][:2] == "20"  # an ISO date stamped by store.create
    assert ds.process.values.tolist() == ["discrete"] and ds.rule.values.tolist() == ["gd"]


def test_a_diverging_run_is_recorded_and_the_other_runs_complete(tmp_path):
    ds = flowsim.run({**QUAD, "runs": {"unstable": {"lr": 0.25}, "stable": {"lr": 0.15}}}, tmp_path / "s.zarr")
    assert bool(ds.diverged.sel(run="unstable")) and not bool(ds.diverged.sel(run="stable"))
    at = int(ds.diverged_at.sel(run="unstable"))
    # |1 − 0.25·10| = 1.5: the loss passes 1e6 × max(L0, 1) after ⌈log(1e6·2/5.5·…)/log 2.25⌉ steps
    L0 = 0.5 * (10 + 1)
    expected = next(k for k in range(100) if 0.5 * (10 * 1.5 ** (2 * k) + 0.85 ** (2 * k)) > 1e6 * L0)
    assert at == expected
    assert ds.status.sel(run="unstable").item() == "diverged"
    assert np.isnan(ds.loss.sel(run="unstable", step=at + 1))
    assert np.all(np.isfinite(ds.loss.sel(run="stable")))


def test_minibatch_runs_are_reproducible_for_a_seed():
    sc = {"device": "cpu", "problem": {"model": "mlp", "widths": [8], "dataset": "digits", "n_train": 60},
          "steps": 12, "record": {"projection_dim": 4, "every": 3},
          "runs": {"a": {"lr": 0.1, "batch_size": 16, "seed": 1}, "b": {"lr": 0.1, "batch_size": 16, "seed": 1},
                   "c": {"lr": 0.1, "batch_size": 16, "seed": 2}}}
    ds = flowsim.run(sc)
    assert np.array_equal(ds.loss.sel(run="a"), ds.loss.sel(run="b"), equal_nan=True)
    assert not np.allclose(ds.loss.sel(run="a")[3:], ds.loss.sel(run="c")[3:])
    assert int(ds.batch_size.sel(run="a")) == 16


@pytest.mark.parametrize("rule,extra", [("momentum", {"beta1": 0.9}), ("scalar_rmsprop", {}), ("rmsprop", {}),
                                        ("adam", {})])
def test_every_rule_runs_through_the_discrete_process(rule, extra):
    ds = flowsim.run({**QUAD, "steps": 5, "runs": {"r": {"rule": rule, "lr": 0.01, **extra}}})
    assert float(ds.loss[0, -1]) < float(ds.loss[0, 0])


def test_a_killed_run_leaves_a_store_that_opens_with_its_completed_chunks(tmp_path):
    scenario = {"name": "long", "device": "cpu", "steps": 100000,
                "problem": {"model": "mlp", "widths": [16], "dataset": "digits", "n_train": 200},
                "runs": {"gd": {"lr": 0.1}}, "record": {"chunk": 50, "projection_dim": 8}}
    path, store = tmp_path / "long.yaml", tmp_path / "long.zarr"
    path.write_text(yaml.safe_dump(scenario))
    proc = subprocess.Popen([sys.executable, "-m", "flowsim.cli", "run", str(path), "-o", str(store), "-q"])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(0.2)
            try:
                # the rows a chunk commits: its run's ``length``, written after all of its arrays (an array's own
                # shape can be ahead of it, and a kill there leaves the chunk before)
                if zarr.open_group(store, mode="r")["runs/gd"].attrs.get("length", 0) >= 150:
                    break
            except (KeyError, FileNotFoundError, ValueError):
                pass
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    ds = flowsim.open(store)
    n = ds.sizes["step"]
    assert n >= 150 and (n - 1) % 50 == 0  # the first row at once, then whole chunks
    assert ds.status.item() == "running"
    np.testing.assert_array_equal(ds.step.values, np.arange(n))
    full = flowsim.run({**scenario, "steps": n - 1})
    np.testing.assert_array_equal(ds.loss.values, full.loss.values)  # completed chunks are exact
