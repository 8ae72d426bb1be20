"""Exact resume after SIGKILL, finished runs skipped, and the store lock (second writer, stale lock)."""
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
import zarr

import flowsim
from flowsim import cli
from flowsim import store as store_mod

SCENARIO = {
    "name": "resume", "seed": 3, "device": "cpu", "dtype": "float64",
    "problem": {"model": "mlp", "widths": [4], "activation": "tanh", "dataset": "digits", "classes": [0, 1, 2],
                "n_train": 40, "loss": "mse"},
    "steps": 240,
    "runs": {"sgd": {"process": "discrete", "rule": "momentum", "lr": 0.2, "batch_size": 7, "beta1": 0.5},
             "adam": {"process": "discrete", "rule": "adam", "lr": 0.01}},
    "record": {"every": 1, "projection_dim": 3, "projection_every": 5, "chunk": 8},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def flowsim_run(path, store, *flags) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flowsim.cli", "run", str(path), "-o", str(store), "-q", *flags],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_bitwise_equal(a, b):
    """Every variable and coordinate identical to the bit (wall-clock times excepted)."""
    assert list(a.run.values) == list(b.run.values)
    names = sorted(set(a.variables) - {"wall_time"})
    assert names == sorted(set(b.variables) - {"wall_time"})
    for name in names:
        x, y = a[name].values, b[name].values
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if x.dtype.kind in "fiub":
            assert x.tobytes() == y.tobytes(), f"{name} differs"
        else:
            assert x.tolist() == y.tolist(), f"{name} differs"


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "resume.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    return path


def wait_for_checkpoint(proc, store) -> None:
    """Wait until the subprocess is computing: a checkpoint of this launch is on disk, or it has ended."""
    folder = store / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in folder.glob("*.pt")} if folder.exists() else {}
    while proc.poll() is None and not any(before.get(p) != p.stat().st_mtime_ns for p in list(folder.glob("*.pt"))
                                          if p.exists()):
        time.sleep(0.01)


def stored_rows(store) -> int:
    """The rows the store's runs hold (their groups' ``length``; 0 before there is any)."""
    try:
        runs = zarr.open_group(store, mode="r", use_consolidated=False)["runs"]
        return sum(runs[name].attrs.get("length", 0) for name in runs.group_keys())
    except (KeyError, FileNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="module")
def reference_and_compute(scenario_file):
    """The uninterrupted run, in a subprocess with the same environment as the killed ones, and its runs' own
    computing time (the sum of their recorded wall times), which kill moments scale with (so they follow how
    loaded the machine is)."""
    store = scenario_file.parent / "reference.zarr"
    proc = flowsim_run(scenario_file, store)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    ds = flowsim.open(store)
    return ds, float(sum(ds.wall_time.sel(run=run).dropna("step")[-1] for run in ds.run.values))


@pytest.fixture(scope="module")
def reference(reference_and_compute):
    return reference_and_compute[0]


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(scenario_file, reference_and_compute, tmp_path):
    """Five launches are each killed at a random moment once they are computing (a checkpoint of theirs is on
    disk): up to 0.3 of the runs' computing time later, and before they store 60 more of the 482 rows, so that
    the work is not done before the fifth kill however the machine's load changes."""
    reference, compute = reference_and_compute
    store, rng = tmp_path / "killed.zarr", random.Random(6)
    kills, resumed_from_checkpoint = 0, 0
    for _ in range(20):
        if kills == 5:
            break
        resumed_from_checkpoint += any((store / "checkpoints").glob("*.pt")) if store.exists() else 0
        proc = flowsim_run(scenario_file, store, "--resume")
        wait_for_checkpoint(proc, store)
        rows, deadline = stored_rows(store), time.monotonic() + rng.uniform(0.0, 0.3) * compute
        while proc.poll() is None and time.monotonic() < deadline and stored_rows(store) < rows + 60:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate(timeout=300)
    assert kills == 5
    proc = flowsim_run(scenario_file, store, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert resumed_from_checkpoint >= 2, "too few kills landed after a checkpoint to test resuming"
    ds = flowsim.open(store)
    assert set(ds.status.values) == {"complete"}
    assert not (store / store_mod.LOCK_NAME).exists() and not list((store / "checkpoints").glob("*.pt"))
    assert_bitwise_equal(ds, reference)


def test_resume_skips_finished_runs(scenario_file, reference, tmp_path):
    store = tmp_path / "done.zarr"
    flowsim.run(scenario_file, store, progress=False)
    before = flowsim.open(store)
    after = flowsim.run(scenario_file, store, resume=True, progress=False)
    assert after.wall_time.values.tobytes() == before.wall_time.values.tobytes()  # nothing was re-run


def test_a_finished_store_opens_with_xarray_without_warning_and_stays_true_after_a_resume(scenario_file, tmp_path):
    """flowsim consolidates a store's metadata when its runs are done (xarray.open_zarr then does not warn); a
    resume drops it before appending, so no reader ever sees the shapes of before the resume."""
    import warnings
    import xarray as xr
    doc = {**SCENARIO, "steps": 40, "runs": {"sgd": SCENARIO["runs"]["sgd"]}}
    short, store = tmp_path / "short.yaml", tmp_path / "s.zarr"
    short.write_text(yaml.safe_dump(doc))
    flowsim.run(short, store, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = xr.open_zarr(store, group="runs/sgd")
    assert run.loss.sizes["step"] == 41
    root = store_mod.reopen(store)  # a resume starts here: the consolidated view must go before anything grows
    assert zarr.open_group(store, mode="r").metadata.consolidated_metadata is None
    root["runs/sgd"].attrs["status"] = "running"  # as if killed: the resume runs it again (no checkpoint)
    flowsim.run(short, store, resume=True, progress=False)
    assert zarr.open_group(store, mode="r").metadata.consolidated_metadata is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xr.open_zarr(store, group="runs/sgd").loss.sizes["step"] == 41


def test_resume_of_a_different_scenario_is_refused(scenario_file, tmp_path, capsys):
    store = tmp_path / "other.zarr"
    flowsim.run({**SCENARIO, "steps": 3}, store, progress=False)
    assert cli.main(["run", str(scenario_file), "-o", str(store), "--resume", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowsim: error: resume:") and "\n" not in err


def test_second_writer_exits_2_and_the_first_completes_intact(scenario_file, reference, tmp_path, capsys):
    store = tmp_path / "shared.zarr"
    first = flowsim_run(scenario_file, store)
    while not (store / store_mod.LOCK_NAME).exists():
        assert first.poll() is None, first.communicate()[1]
        time.sleep(0.02)
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert cli.main(["run", str(scenario_file), "-o", str(store), "-q", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "is being written by process" in err and str(first.pid) in err and "\n" not in err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert_bitwise_equal(flowsim.open(store), reference)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = tmp_path / "stale.zarr"
    store.mkdir()
    (store / store_mod.LOCK_NAME).write_text(f"{dead.pid} {os.uname().nodename}")
    ds = flowsim.run({**SCENARIO, "steps": 3}, store, progress=False)
    assert set(ds.status.values) == {"complete"} and not (store / store_mod.LOCK_NAME).exists()


def test_overwrite_replaces_a_store_and_keeps_nothing_of_it(tmp_path):
    store = tmp_path / "over.zarr"
    flowsim.run({**SCENARIO, "steps": 5}, store, progress=False)
    ds = flowsim.run({**SCENARIO, "steps": 2, "runs": {"gd": {"lr": 0.1}}}, store, overwrite=True, progress=False)
    assert list(ds.run.values) == ["gd"] and ds.sizes["step"] == 3
    assert np.isfinite(ds.loss.values).all()


PROCESSES_DOC = {
    "name": "processes", "seed": 1, "device": "cpu", "dtype": "float64",
    "problem": {"model": "mlp", "widths": [4], "activation": "tanh", "dataset": "digits", "classes": [0, 1, 2],
                "n_train": 30, "loss": "mse"},
    "steps": 16,
    "runs": {"sde": {"process": "sde", "rule": "gd", "lr": 0.3, "batch_size": 6},
             "stable": {"process": "stable", "rule": "gd", "lr": 0.3},
             "central": {"process": "central", "rule": "gd", "lr": 1.0},  # S0 = 10.4: 1–2 critical directions
             # its discrete steps end at step 4, where a checkpoint is taken (chunk 4)
             "late": {"process": "central", "rule": "adam", "lr": 0.05, "eps": 1e-3, "discrete_start": 4},
             "iid": {"process": "discrete", "rule": "gd", "lr": 0.3, "batch_size": 6, "sampling": "iid"},
             "rod": {"process": "rod", "rule": "momentum", "lr": 2.0, "beta1": 0.5}},
    "record": {"every": 1, "projection_dim": 2, "chunk": 4, "curvature_every": 3},
}


def test_every_process_and_the_curvature_probe_resume_bitwise(tmp_path, monkeypatch):
    """Interrupted right after its second chunk is stored (rows past the checkpoint exist), each run in turn:
    Brownian motion, iid sampler, flow substeps, central-flow warm starts, a flow's start after its discrete steps,
    the rod's half-length and shadow run, and Lanczos warm starts all resume."""
    from flowsim.store import RunWriter
    reference = flowsim.run(PROCESSES_DOC, tmp_path / "ref.zarr", progress=False)
    append, calls, kills = RunWriter.append, [], []

    def append_then_die(self, columns):
        append(self, columns)
        calls.append(self.group.name)
        if calls.count(self.group.name) == 2:
            kills.append(self.group.name)
            raise KeyboardInterrupt
    monkeypatch.setattr(RunWriter, "append", append_then_die)
    for _ in PROCESSES_DOC["runs"]:
        with pytest.raises(KeyboardInterrupt):
            flowsim.run(PROCESSES_DOC, tmp_path / "killed.zarr", resume=True, progress=False)
    monkeypatch.setattr(RunWriter, "append", append)
    ds = flowsim.run(PROCESSES_DOC, tmp_path / "killed.zarr", resume=True, progress=False)
    assert sorted(kills) == sorted(f"/runs/{name}" for name in PROCESSES_DOC["runs"])
    assert_bitwise_equal(ds, reference)
