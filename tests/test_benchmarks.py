"""The benchmarks folder (not installed; imported from the repository root): the launcher, and `python -m benchmarks
adaptive -o STORE` at test scale — every (task, method, seed) curve is a run of a flowsim store whose values are
those of independent GD/SGD loops, whose target coordinates follow from its own curves, whose per-task table
aggregates them, and whose report renders that table and one panel per task."""
import contextlib
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr.storage

sys.path.insert(0, str(Path(__file__).parents[1]))  # the benchmarks package lives at the repository root

import flowsim  # noqa: E402
import flowsim.plot  # noqa: E402
import flowsim.report  # noqa: E402
from benchmarks import BENCHMARKS, adaptive, report  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402
from benchmarks.adaptive import Method, Outcome  # noqa: E402
from flowsim import store as store_mod  # noqa: E402
from flowsim.models import build_problem  # noqa: E402
from flowsim.solvers import EpochSampler  # noqa: E402

PROBLEM = {"model": "mlp", "widths": [8], "activation": "tanh", "dataset": "digits", "classes": [0, 1, 2, 3],
           "n_train": 60, "loss": "mse"}
TASKS = {  # GD lr 50 diverges at step 2 of the full-batch task: the best of the grid is 0.4 on both tasks
    "tiny-full": {"half": "tuning", "problem": PROBLEM, "dtype": "float64", "steps": 20, "batch_size": None,
                  "eval_every": 1,
                  "gd": [0.1, 0.4, 50.0], "adam": [1e-3, 1e-2]},
    "tiny-mini": {"half": "held-out", "problem": PROBLEM, "dtype": "float64", "steps": 20, "batch_size": 20,
                  "eval_every": 5,
                  "gd": [0.1, 0.4], "adam": [1e-3, 1e-2]},
}
SEEDS = (0, 1)
METHODS = ["gd-best", "adam-default", "adam-best", "edge-gd-c1", "cdat-gd", "schedulefree-sgd", "prodigy"]
EDGE_C1 = Method("gd", {"edge": {"c": 1.0}})
CDAT_GD = Method("gd", {"cdat": {}})


@contextlib.contextmanager
def tiny_bench():
    """The bench on TASKS and SEEDS with one edge setting and CDAT over GD (about 5 s on one CPU thread)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adaptive, "TASKS", TASKS)
        mp.setattr(adaptive, "SEEDS", SEEDS)
        mp.setattr(adaptive, "EDGE", {"edge-gd-c1": EDGE_C1})
        mp.setattr(adaptive, "CDAT", {"cdat-gd": CDAT_GD})
        yield mp


@pytest.fixture(scope="module")
def bench_store(tmp_path_factory):
    """(store path, printed text) of the tiny bench run through the launcher."""
    pytest.importorskip("schedulefree")
    pytest.importorskip("prodigyopt")
    path = tmp_path_factory.mktemp("bench") / "bench-adaptive.zarr"
    out = io.StringIO()
    with tiny_bench(), contextlib.redirect_stdout(out):
        assert main(["adaptive", "-o", str(path)]) == 0
    return path, out.getvalue()


def gd_losses(task: dict, seed: int, lr: float) -> list[float]:
    """Full-batch losses at the steps 0, eval_every, … of a plain GD/SGD loop (w ← w − lr·g on the task's
    epoch-sampled minibatches, the whole batch when batch_size is None)."""
    problem = build_problem(task["problem"], dtype=task["dtype"], device="cpu", seed=seed)
    sampler = task["batch_size"] and EpochSampler(problem.n_examples, task["batch_size"], seed, problem.device)
    w, losses = problem.w0.clone(), []
    for k in range(task["steps"] + 1):
        if k % task["eval_every"] == 0:
            losses.append(problem.loss(w).item())
        if k < task["steps"]:
            w = w - lr * problem.loss_and_grad(w, sampler.indices(k) if sampler else None)[1]
    return losses


MEASURED = {"tiny-full": ["edge-gd-c1.measured", "edge-gd-c1.central", "adam-best.measured"],
            "tiny-mini": ["edge-gd-c1.measured", "adam-best.measured"]}
"""The untimed runs per task: the controller's (the central flow only in full batch) and tuned Adam's."""


def test_bench_stores_one_run_per_task_method_and_seed(bench_store):
    ds = flowsim.open(bench_store[0])
    expected = [name for t in TASKS for name in [f"{t}[{m},seed={s}]" for m in METHODS for s in SEEDS]
                + [f"{t}[{m},seed=0]" for m in MEASURED[t]]]
    assert list(ds.run.values) == expected
    assert list(ds["timed"].values) == [not any(m in r for ms in MEASURED.values() for m in ms) for r in expected]
    ds = report.timed(ds)
    mini = ds.isel(run=(ds["task"] == "tiny-mini").values)
    assert mini.sizes["run"] == len(METHODS) * len(SEEDS)
    assert set(mini["method"].values) == set(METHODS) and list(mini["seed"].values) == list(SEEDS) * len(METHODS)
    assert set(mini["batch_size"].values) == {20}
    assert set(ds.sel(run=ds["task"] == "tiny-full")["batch_size"].values) == {0}
    gd = ds.sel(run="tiny-full[gd-best,seed=1]")
    assert (str(gd["process"].values), str(gd["rule"].values), float(gd["lr"])) == ("discrete", "gd", 0.4)
    edge = ds.sel(run="tiny-mini[edge-gd-c1,seed=0]")
    assert (str(edge["process"].values), str(edge["policy"].values), str(edge["options"].values)) == \
        ("discrete", "edge", "c=1.0")
    assert np.isnan(float(edge["lr"])) and float(edge["max_lr"]) == np.inf
    cdat = ds.sel(run="tiny-full[cdat-gd,seed=1]")
    assert (str(cdat["rule"].values), str(cdat["policy"].values), str(cdat["options"].values)) == ("gd", "cdat", "")
    for task in TASKS:
        assert set(ds.sel(run=ds["task"] == task)["half"].values) == {TASKS[task]["half"]}
    assert str(ds.sel(run="tiny-mini[prodigy,seed=1]")["process"].values) == "torch"
    assert ds.attrs["baseline"] == "gd-best" and "tiny-mini" in ds.attrs["bench"]
    assert ds["loss"].attrs["units"] == "loss" and ds["wall_time"].attrs["units"] == "s"
    assert not ds["diverged"].any() and set(ds["status"].values) == {"complete"}


@pytest.mark.parametrize("task", list(TASKS))
def test_stored_losses_equal_an_independent_gd_loop(bench_store, task):
    ds = flowsim.open(bench_store[0])
    spec, every = TASKS[task], TASKS[task]["eval_every"]
    for seed in SEEDS:
        run = ds.sel(run=f"{task}[gd-best,seed={seed}]")
        loss = run["loss"].dropna("step")
        assert list(loss.step.values) == list(range(0, spec["steps"] + 1, every))
        problem = build_problem(spec["problem"], dtype=spec["dtype"], device="cpu", seed=seed)
        assert float(loss[0]) == pytest.approx(problem.loss(problem.w0).item(), rel=1e-12)
        np.testing.assert_allclose(loss.values, gd_losses(spec, seed, 0.4), rtol=1e-9)
        wall = run["wall_time"].dropna("step")
        assert list(wall.step.values) == list(range(spec["steps"] + 1)) and (np.diff(wall.values) > 0).all()
        eta = run["step_size"]
        assert (eta.values[:-1] == 0.4).all() and np.isnan(eta.values[-1])  # no step is taken from the last


def test_step_size_is_recorded_where_the_method_has_one(bench_store):
    ds = flowsim.open(bench_store[0])
    for task in TASKS:
        edge = ds["step_size"].sel(run=f"{task}[edge-gd-c1,seed=0]").dropna("step")
        assert list(edge.step.values) == list(range(TASKS[task]["steps"]))
        assert ((edge > 0) & (edge < 100.0)).all() and np.unique(edge.values).size > 1
        adam = ds["step_size"].sel(run=f"{task}[adam-default,seed=1]").dropna("step")
        assert (adam.values == 1e-3).all() and adam.size == edge.size
        cdat = ds["step_size"].sel(run=f"{task}[cdat-gd,seed=1]").dropna("step")
        assert list(cdat.step.values) == list(range(TASKS[task]["steps"])) and (cdat > 0).all()
        for method in ("schedulefree-sgd", "prodigy"):
            assert np.isnan(ds["step_size"].sel(run=f"{task}[{method},seed=0]")).all()


def test_the_measured_controller_runs_hold_eta_s_at_c(bench_store):
    """The untimed runs are the controller's seed-0 runs (the same losses to the bit); in full batch, at a step
    where the controller re-estimated S (step 10), η·λ_max/θ measured to 1e-3 is its c = 1 within its own
    tolerance (1e-2), for the discrete run and for the central flow under the same controller."""
    ds = flowsim.open(bench_store[0])
    for task, methods in MEASURED.items():
        timed = ds.sel(run=f"{task}[edge-gd-c1,seed=0]")
        for method in methods:
            if method.startswith("adam-best"):
                continue
            run = ds.sel(run=f"{task}[{method},seed=0]")
            assert str(run["process"].values) == ("central" if method.endswith("central") else "discrete")
            assert (str(run["policy"].values), str(run["options"].values)) == ("edge", "c=1.0")
            ratio = (run["precond_sharpness"] / run["threshold"]).dropna("step")
            assert list(ratio.step.values) == [10, 20]
            if method.endswith("measured"):
                loss = run["loss"].dropna("step")
                np.testing.assert_array_equal(loss.values, timed["loss"].sel(step=loss.step).values)
            if task == "tiny-full":
                assert float(ratio.sel(step=10)) == pytest.approx(1.0, abs=1e-2)
    assert report.target_summary(ds).index.get_level_values("method").isin(METHODS).all()


def test_tuned_adam_measured_is_its_timed_run_with_its_edge_fraction(bench_store):
    """Tuned Adam's untimed run is its seed-0 run (the same losses to the bit, the grid's best η), with S and
    Adam's threshold θ/η = 38/η recorded every 10 steps."""
    ds = flowsim.open(bench_store[0])
    for task in MEASURED:
        timed, run = ds.sel(run=f"{task}[adam-best,seed=0]"), ds.sel(run=f"{task}[adam-best.measured,seed=0]")
        assert (str(run["rule"].values), float(run["lr"])) == ("adam", float(timed["lr"]))
        loss = run["loss"].dropna("step")
        np.testing.assert_array_equal(loss.values, timed["loss"].sel(step=loss.step).values)
        ratio = (run["precond_sharpness"] / run["threshold"]).dropna("step")
        assert list(ratio.step.values) == [10, 20] and (ratio > 0).all()
        assert float(run["threshold"].sel(step=10)) == pytest.approx(38 / float(timed["lr"]), rel=1e-12)


def test_target_coordinates_follow_from_the_stored_curves(bench_store):
    ds = report.timed(flowsim.open(bench_store[0]))
    outcomes = set()
    for run in ds.run.values:
        r = ds.sel(run=run)
        base = ds.sel(run=f"{r['task'].values}[gd-best,seed={int(r['seed'])}]")
        assert float(r["target"]) == float(base["loss"].dropna("step")[-1])
        loss = r["loss"].dropna("step")
        reached = loss.step.values[loss.values <= float(r["target"])]
        if reached.size:
            assert float(r["steps_to_target"]) == reached[0]
            assert float(r["wall_to_target"]) == float(r["wall_time"].sel(step=reached[0]))
        else:
            assert np.isnan(float(r["steps_to_target"])) and np.isnan(float(r["wall_to_target"]))
        outcomes.add(bool(reached.size))
    assert outcomes == {True, False}
    assert (ds.sel(run=ds["method"] == "gd-best")["steps_to_target"] <= 20).all()


def test_target_summary_aggregates_each_task_and_method(bench_store):
    ds = flowsim.open(bench_store[0])
    table = report.target_summary(ds)
    assert list(table.index) == [(t, m) for t in TASKS for m in METHODS]
    for task in TASKS:
        base = ds.sel(run=(ds["task"] == task) & (ds["method"] == "gd-best"))
        for method in METHODS:
            runs = ds.sel(run=(ds["task"] == task) & (ds["method"] == method))
            steps, walls = runs["steps_to_target"].values, runs["wall_to_target"].values
            row = table.loc[(task, method)]
            finals = [float(runs["loss"].sel(run=r).dropna("step")[-1]) for r in runs.run.values]
            assert (row["runs"], row["hit"], row["diverged"]) == (2, np.isfinite(steps).sum(), 0)
            assert row["final loss"] == pytest.approx(np.mean(finals), rel=1e-12)
            if np.isfinite(steps).any():
                assert row["steps"] == pytest.approx(np.nanmean(steps))
                assert row["wall s"] == pytest.approx(np.nanmean(walls))
                assert row["steps x"] == pytest.approx(np.nanmean(base["steps_to_target"]) / np.nanmean(steps))
                assert row["wall x"] == pytest.approx(np.nanmean(base["wall_to_target"]) / np.nanmean(walls))
            else:
                assert np.isnan([row["steps"], row["wall s"], row["steps x"], row["wall x"]]).all()
        assert table.loc[(task, "gd-best"), "hit"] == 2 and table.loc[(task, "gd-best"), "steps x"] == 1.0


def test_bench_prints_the_table_and_report_renders_it(bench_store, tmp_path):
    path, printed = bench_store
    for task in TASKS:
        assert f"\n{task}: 20 steps" in printed
        assert re.search(r"^  \[ 1/\d+\] gd η = 0\.1 ", printed, re.M)  # progress, one line per method
    assert len(re.findall(r"^prodigy\s+1\s+2\s+\d\s", printed, re.M)) == 2
    assert f"stored in {path}" in printed
    html_path = tmp_path / "r.html"
    assert report.main([str(path), "-o", str(html_path)]) == 0
    html = html_path.read_text()
    rows = re.findall(r"<th>([\w.-]+)</th>\s*((?:<td>[^<]*</td>\s*)+)</tr>", html)
    assert [m for m, _ in rows] == METHODS * len(TASKS)
    table = report.target_summary(flowsim.open(path))
    for i, (_, cells) in enumerate(rows):
        values = [table[column].iloc[i] for column in table.columns]
        assert re.findall(r"<td>([^<]*)</td>", cells) == [
            str(v) if not isinstance(v, float) else "–" if np.isnan(v) else f"{v:.4g}" for v in values]
    for title in ("Loss per task", "Step size per task", "The edge, measured", "Benchmark settings"):
        assert f"<h2>{title}</h2>" in html
    assert "<h2>Loss</h2>" not in html and html.count("data:image/png;base64,") == 3


def test_a_method_that_does_not_apply_to_a_task_is_left_out_with_its_reason(capsys):
    """iid sampling needs minibatches: on the full-batch task the bench says why and goes on."""
    methods = {"edge-gd-c1": EDGE_C1, "edge-gd-iid": Method("gd", {"edge": {"c": 1.0}}, {"sampling": "iid"})}
    full, _ = adaptive._methods(TASKS["tiny-full"], (0,), methods)
    mini, _ = adaptive._methods(TASKS["tiny-mini"], (0,), methods)
    assert {"edge-gd-c1", "edge-gd-iid"} <= set(mini) and "edge-gd-c1" in full
    assert "edge-gd-iid" not in full
    assert ("edge-gd-iid: does not apply to this task (sampling: applies only to minibatch runs (give a "
            "batch_size))") in capsys.readouterr().out


def test_a_diverged_curve_is_stored_as_a_diverged_run():
    task = TASKS["tiny-full"]
    curve, coords = adaptive.flowsim_curve(task, 0, Method("gd", 50.0))
    memory = zarr.storage.MemoryStore()
    root = store_mod.create(memory, {"baseline": "gd-huge"})
    adaptive._write(root, "tiny-full", task, {"gd-huge": Outcome(coords, [curve])}, [1e-2], 0, seeds=(0,))
    r = flowsim.open(memory).sel(run="tiny-full[gd-huge,seed=0]")
    assert curve.diverged_at == 2 and bool(r["diverged"]) and float(r["diverged_at"]) == 2
    assert str(r["status"].values) == "diverged" and np.isnan(float(r["steps_to_target"]))
    assert list(r["loss"].dropna("step").step.values) == [0, 1, 2] and r["loss"].sel(step=2) > 1e6
    assert (str(r["policy"].values), float(r["lr"])) == ("constant", 50.0)


def test_a_minibatch_curve_diverged_between_evaluations_ends_where_flowsim_stopped_it():
    task = {**TASKS["tiny-mini"], "eval_every": 5}
    curve, _ = adaptive.flowsim_curve(task, 0, Method("gd", 50.0))
    assert curve.diverged_at == 2 and curve.step[-1] == 2 and np.isnan(curve.loss[-1])  # flowsim's step loss
    assert len(curve.step) == len(curve.wall_time) == len(curve.step_size) == curve.diverged_at + 1


def test_bench_refuses_an_existing_store_before_running(bench_store, monkeypatch, capsys):
    monkeypatch.setattr(adaptive, "_methods", lambda *a, **k: pytest.fail("the bench ran"))
    assert main(["adaptive", "-o", str(bench_store[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"benchmarks: error: store {bench_store[0]} already exists (use --overwrite to replace it)"


def test_a_bench_without_a_store_rejects_output(monkeypatch, capsys):
    monkeypatch.setattr("benchmarks.bench.overhead", lambda *a, **k: pytest.fail("the bench ran"))
    with pytest.raises(SystemExit) as exit_:
        main(["overhead", "-o", "x.zarr"])
    assert exit_.value.code == 2
    assert "python -m benchmarks overhead: error: unrecognized arguments: -o x.zarr" in capsys.readouterr().err


def test_without_output_the_bench_prints_and_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    with tiny_bench() as mp:
        mp.setattr(adaptive, "TASKS", {"tiny-full": {**TASKS["tiny-full"], "gd": [0.4], "adam": [1e-2]}})
        assert main(["adaptive"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^gd-best\s+0\.4\s+2\s+2\s+20\s", printed, re.M)
    assert "stored in" not in printed and list(tmp_path.iterdir()) == []


def test_quick_shortens_every_task_and_halves_its_grids():
    short = adaptive.quick(adaptive.TASKS)
    assert list(short) == list(adaptive.TASKS)
    for name, task in short.items():
        assert task["steps"] == 60 and task["gd"] == adaptive.TASKS[name]["gd"][1::2]
        assert len(task["adam"]) == 4 and task["problem"] == adaptive.TASKS[name]["problem"]
        assert task["half"] == adaptive.TASKS[name]["half"]


def test_the_suite_is_split_into_a_tuning_a_held_out_and_a_stress_half():
    assert adaptive.HALVES == ("tuning", "held-out", "stress")
    assert all(task["half"] in adaptive.HALVES for task in adaptive.TASKS.values())
    halves = {half: adaptive.select(half) for half in adaptive.HALVES}
    assert all(len(tasks) >= 5 for tasks in halves.values())
    assert sorted(n for tasks in halves.values() for n in tasks) == sorted(adaptive.TASKS)
    assert adaptive.select("all") == adaptive.TASKS
    assert {"mlp-digits", "cnn-mnist1d", "transformer-markov"} <= set(halves["tuning"])  # where the defaults came from
    for task in adaptive.TASKS.values():
        assert len(task["gd"]) == len(task["adam"]) == 8 and task["steps"] > 60
    with pytest.raises(ValueError, match="half: 'test'"):
        adaptive.select("test")


def test_the_stress_tables_are_what_their_names_say():
    """Features scaled 0.1 … 1000 (a spread of 10⁴ in standard deviation), raw pixels 0–16, and two classes that a
    least-squares linear classifier separates exactly; 20 % of labels redrawn uniformly (about 18 % change)."""
    stress = adaptive.select("stress")
    assert len(stress) >= 6 and all(t["problem"]["loss"] == "ce" for t in stress.values())
    assert {t["batch_size"] for t in stress.values()} - {None} <= set(range(4, 17))
    X, _ = adaptive.STRESS_DATA["scaled-mixture"]()
    assert X.std(0).max() / X.std(0).min() > 1e3
    X, _ = adaptive.STRESS_DATA["digits-raw"]()
    assert X.min() == 0 and X.max() == 16
    X, y = adaptive.STRESS_DATA["separable"]()
    A = np.c_[X, np.ones(len(X))]
    w = np.linalg.lstsq(A, 2.0 * y - 1, rcond=None)[0]
    assert ((A @ w > 0) == (y == 1)).all()
    _, clean = adaptive.STRESS_DATA["digits-raw"]()
    _, noisy = adaptive.STRESS_DATA["digits-raw-noisy"]()
    assert 0.12 < (clean != noisy).mean() < 0.2


def test_half_selects_the_tasks_of_one_half(capsys):
    ran = []
    with tiny_bench() as mp:
        mp.setattr(adaptive, "adaptive", lambda tasks, *a, **k: ran.append(list(tasks)))
        assert main(["adaptive", "--half", "held-out"]) == 0
        assert main(["adaptive", "--half", "tuning", "--quick"]) == 0
        assert main(["adaptive", "--tasks", "tiny-full", "tiny-mini"]) == 0
        with pytest.raises(SystemExit):
            main(["adaptive", "--half", "held-out", "--tasks", "tiny-full"])
    assert ran == [["tiny-mini"], ["tiny-full"], ["tiny-full", "tiny-mini"]]
    assert "--half held-out: none of the tasks tiny-full is in it" in capsys.readouterr().err


def test_the_quick_run_stores_each_half_and_cdat(tmp_path):
    pytest.importorskip("schedulefree")
    pytest.importorskip("prodigyopt")
    path = tmp_path / "quick.zarr"
    out = io.StringIO()
    with tiny_bench(), contextlib.redirect_stdout(out):
        assert main(["adaptive", "--quick", "-o", str(path)]) == 0
    ds = flowsim.open(path)
    assert set(ds["seed"].values) == {0} and {"cdat-gd", "edge-gd-c1"} <= set(ds["method"].values)
    for task in TASKS:
        runs = ds.sel(run=ds["task"] == task)
        assert set(runs["half"].values) == {TASKS[task]["half"]} and int(runs["loss"].step.max()) <= 60
    assert str(ds.sel(run="tiny-mini[cdat-gd,seed=0]")["policy"].values) == "cdat"
    printed = out.getvalue()
    assert printed.index("== tuning half: tiny-full ==") < printed.index("== held-out half: tiny-mini ==")


def test_each_half_is_summarized_from_its_own_table(bench_store, monkeypatch):
    monkeypatch.setattr(report, "HEADLINE", ("edge-gd-c1", "no-such-method"))
    ds = flowsim.open(bench_store[0])
    assert report.halves(ds) == ["tuning", "held-out"]
    for half, task in (("tuning", "tiny-full"), ("held-out", "tiny-mini")):
        sub = report.of_half(ds, half)
        assert set(sub["task"].values) == {task}
        table = report.target_summary(sub)
        row = table.loc[(task, "edge-gd-c1")]
        assert row["vs adam"] == pytest.approx(row["final loss"] / table.loc[(task, "adam-best"), "final loss"])
        floor = report.LOSS_FLOOR
        versus = {m: np.log10(max(row["final loss"], floor) / max(table.loc[(task, m), "final loss"], floor))
                  for m in ("prodigy", "schedulefree-sgd", "cdat-gd")}
        [line] = report.half_summary(sub)
        below = int(row["final loss"] < table.loc[(task, "adam-default"), "final loss"])
        assert line == (
            f"edge-gd-c1: >= 1.5x fewer steps than gd-best on {int(row['steps x'] >= 1.5)}/1 tasks; final loss "
            f"<= 1.1x adam-best's on {int(row['vs adam'] <= 1.1)}/1, below adam-default's on {below}/1; mean log10 "
            f"final loss vs "
            + ", ".join(f"{m} {v:+.2f}" for m, v in versus.items()) + " (< 0: lower); diverged 0/2 runs")
        assert f"== {half} half: {task} ==\n" in report.by_half(ds)
        assert f"{half} half — {line}." in report.summary(ds)[1]


def test_the_launcher_lists_every_benchmark_with_its_duration(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name, benchmark in BENCHMARKS.items():
        assert re.search(rf"^  {re.escape(name)}\s+{re.escape(benchmark.duration)}\s", out, re.M)
        assert callable(benchmark.load())
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-bench"])
    assert exit_.value.code == 2 and "unknown benchmark 'no-such-bench'" in capsys.readouterr().err


def test_flowsim_keeps_no_benchmark_code():
    """The engine's report and figures are generic: the benchmarks bring their own table and sections."""
    for name in ("target_summary", "TASK_SECTIONS"):
        assert not hasattr(flowsim.report, name)
    assert not hasattr(flowsim.plot, "per_task")
    root = Path(__file__).parents[1]
    for path in ("flowsim/report.py", "flowsim/plot.py"):
        assert not re.search(r"\btask|bench", (root / path).read_text())


def test_central_fidelity_reads_its_figures_from_the_runs_it_makes(capsys):
    """`central-fidelity --quick` (central-momentum-mlp for 60 steps): the row's figures are those of the store's
    runs — Σ ≠ 0 from step ≈ 18 on (42 of 61 steps), the edge held to 1e-3, both distances measured against the
    momentum run."""
    assert main(["central-fidelity", "--quick"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| central-momentum-mlp |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    at_edge, total = map(int, cells[1].split("/"))
    assert total == 61 and 35 <= at_edge <= 50
    assert float(cells[2]) < 1e-3
    assert 0 < float(cells[3]) < float(cells[4])


def test_central_speed_splits_a_steps_time_into_parts_that_the_engine_still_has():
    """`central-speed` times the central flow's parts by wrapping the engine's functions: each wrapped part took
    time (none was renamed away), their shares add up to at most the step, the eigensolve counted its products,
    and the wrappers are gone afterwards."""
    from benchmarks import central_speed
    from flowsim.solvers.central import Central
    solve = Central._solve
    r = central_speed.measure("central-gd-mlp", warmup=3, timed=2)
    assert all(r["shares"][part] > 0 for part in ("eigensolve", "gradient", "recording"))
    assert 0 < sum(r["shares"].values()) <= 1 and r["products"] >= 1 and r["gd_eq"] > 1
    assert Central._solve is solve


def test_flows_fidelity_counts_the_rod_flows_gradients_and_reads_the_runs(capsys):
    """`flows-fidelity --quick` (central-gd-gelu-mlp for 60 steps): GD's rod flow takes one RK4 substep of four
    field evaluations at the rod's two ends, so its counter must read 8 gradient evaluations per unit of time;
    the ratio columns are the distance columns' ratios (to their rounding)."""
    assert main(["flows-fidelity", "--quick"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| central-gd-gelu-mlp |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1].endswith("/61")
    stable, central, rod = map(float, cells[2:5])
    assert min(stable, central, rod) > 0
    for printed, a, b in ((cells[5], rod, central), (cells[6], stable, rod)):  # the distances are rounded to 1e-3
        assert abs(float(printed) - a / b) <= a / b * (5e-4 / a + 5e-4 / b) + 5e-3
    assert float(cells[11]) == 8
