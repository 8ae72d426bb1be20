"""A real `flowsim run` process killed with SIGKILL before its first write, at step 1, mid-chunk and at the end:
its store opens, reports and compares (or says in one line that nothing is recorded yet), keeps every row it
wrote unchanged, and --resume finishes it equal to the bit to an uninterrupted run.

The child is the real command line, stopped at the chosen moment (it blocks on its stdin where it would record
step k, or finish a run) so that the kill lands there exactly, however busy the machine. It inherits this
process's environment (threads), so the runs made here, the reference and the resumes, compute as it does.
"""
import signal
import subprocess
import sys

import pytest
import yaml

import flowsim
from flowsim import cli
from test_resume import assert_bitwise_equal

SCENARIO = {
    "name": "kill", "seed": 2, "device": "cpu", "dtype": "float64",
    "problem": {"model": "mlp", "widths": [4], "activation": "tanh", "dataset": "digits", "classes": [0, 1, 2],
                "n_train": 40, "loss": "mse"},
    "steps": 20,
    "runs": {"gd": {"rule": "gd", "lr": 0.3}, "adam": {"rule": "adam", "lr": 0.01}},
    "record": {"projection_dim": 3, "projection_every": 4, "curvature_every": 5, "precond": True},
    "compare": {"reference": "gd"},
}

# argv: the Recorder's time bound (s), where to stop ("add" or "finish"), the run, the step; then the CLI's argv
CHILD = """
import functools, sys
from flowsim import cli, record, runner, store
seconds, where, run, step = float(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
runner.Recorder = functools.partial(record.Recorder, seconds=seconds)
add, finish = record.Recorder.add, store.RunWriter.finish

def stop():
    print("stopped", flush=True)
    sys.stdin.readline()  # until killed

def add_or_stop(self, k, values):
    if where == "add" and k == step and self.writer.group.basename == run:
        stop()
    return add(self, k, values)

def finish_or_stop(self, **attrs):
    if where == "finish" and self.group.basename == run:
        stop()
    return finish(self, **attrs)

record.Recorder.add, store.RunWriter.finish = add_or_stop, finish_or_stop
sys.exit(cli.main(sys.argv[5:]))
"""


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kill") / "kill.yaml"
    path.write_text(yaml.safe_dump(SCENARIO, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reference(scenario_file):
    return flowsim.run(scenario_file, scenario_file.parent / "reference.zarr", progress=False)


def kill(scenario_file, store, seconds: float, where: str, run: str, step: int = 0) -> None:
    """Run the scenario in a child process that stops where told, and SIGKILL it there."""
    err = store.with_suffix(".stderr")
    with err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(seconds), where, run, str(step),
                                 "run", str(scenario_file), "-o", str(store), "-q"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            stopped = proc.stdout.readline() == "stopped\n"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.communicate(timeout=60)
    assert stopped and proc.returncode == -signal.SIGKILL, err.read_text()


# (moment, the Recorder's time bound, where the child stops, its run and step, rows of gd and adam then stored)
MOMENTS = [
    ("before-the-first-write", 60.0, "add", "gd", 0, {"gd": 0}),
    ("at-step-1", 60.0, "add", "gd", 1, {"gd": 1}),  # the first row is written at once
    ("mid-chunk", 0.0, "add", "adam", 11, {"gd": 21, "adam": 11}),  # a write per row: rows 0-10 stored
    ("at-the-end", 60.0, "finish", "adam", 0, {"gd": 21, "adam": 21}),  # every row written, not marked complete
]


@pytest.mark.parametrize("moment,seconds,where,run,step,stored", MOMENTS, ids=[m[0] for m in MOMENTS])
def test_a_run_killed_at_any_moment_opens_reports_and_resumes_bitwise(scenario_file, reference, tmp_path, capsys,
                                                                      moment, seconds, where, run, step, stored):
    store = tmp_path / "killed.zarr"
    kill(scenario_file, store, seconds, where, run, step)

    ds = flowsim.open(store)
    assert list(ds.run.values) == list(stored) and ds.sizes["step"] == max(stored.values())
    assert ds.status.sel(run=run).item() == "running"
    capsys.readouterr()
    report, compare = ["report", str(store), "-o", str(tmp_path / "killed.html")], ["compare", str(store)]
    if ds.sizes["step"] == 0:  # nothing to report or compare: one line says so
        for command in (report, compare):
            assert cli.main(command) == 2
            assert capsys.readouterr().err.strip() == (
                "flowsim: error: nothing recorded yet (runs: gd): stopped before the first write; "
                "continue with flowsim run SCENARIO -o STORE --resume")
    else:
        for name, n in stored.items():  # what was written is the uninterrupted run's, unchanged
            for var in ("loss", "w_proj", "sharpness"):
                kept = ds[var].sel(run=name).isel(step=slice(0, n)).values
                assert kept.tobytes() == reference[var].sel(run=name).isel(step=slice(0, n)).values.tobytes()
        assert cli.main(report) == 0 and (tmp_path / "killed.html").stat().st_size > 0
        assert cli.main(compare) == 0
        assert "reference: gd" in capsys.readouterr().out

    resumed = flowsim.run(scenario_file, store, resume=True, progress=False)
    assert set(resumed.status.values) == {"complete"}
    assert_bitwise_equal(resumed, reference)


def test_a_store_killed_before_its_first_run_opens_with_no_runs(tmp_path):
    """Killed between creating the store and starting its first run: no run yet, nothing to report."""
    from flowsim import store as store_mod
    store = tmp_path / "new.zarr"
    store_mod.create(store, {"scenario": yaml.safe_dump(SCENARIO)})
    ds = flowsim.open(store)
    assert ds.sizes["run"] == 0 and ds.sizes["step"] == 0
    with pytest.raises(ValueError, match=r"^nothing recorded yet \(runs: none yet\)"):
        flowsim.compare(ds)
    (store / "zarr.json").unlink()
    with pytest.raises(FileNotFoundError, match="is not a flowsim store"):
        flowsim.open(store)
