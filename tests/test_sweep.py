"""Sweep expansion: cartesian product, run names and coordinates, selection, and one-line errors."""
import numpy as np
import pytest

import flowsim
from flowsim.scenario import ScenarioError, load
from flowsim.sweep import expand, select

BASE = {
    "name": "sweep", "seed": 0, "device": "cpu", "dtype": "float64",
    "problem": {"model": "mlp", "widths": [4], "activation": "tanh", "dataset": "digits", "classes": [0, 1],
                "n_train": 30, "loss": "mse"},
    "steps": 6,
    "runs": {"gd": {"lr": 0.1}, "mom": {"rule": "momentum", "lr": 0.1, "beta1": 0.5}},
    "record": {"projection_dim": 2, "projection_every": 3},
}


def test_expand_is_the_cartesian_product_with_one_run_per_point_and_key():
    tasks = expand(load({**BASE, "sweep": {"lr": [0.05, 0.1, 0.2], "seed": [0, 1], "runs.mom.beta1": [0.5, 0.9]}}))
    assert len(tasks) == 3 * 2 * 2 * 2
    assert len({t.name for t in tasks}) == len(tasks) and [t.order for t in tasks] == list(range(len(tasks)))
    first = tasks[0]
    assert first.name == "gd[lr=0.05,seed=0,runs_mom_beta1=0.5]"
    assert first.coords == {"runs_mom_beta1": 0.5, "run_name": "gd"}
    for t in tasks:
        lr, seed, beta1 = (float(v.split("=")[1]) for v in t.name[t.name.index("[") + 1:-1].split(","))
        assert t.scenario.runs[t.key].lr == lr and t.scenario.seed == seed
        assert t.scenario.runs["mom"].model_extra["beta1"] == beta1 and t.scenario.sweep is None


def test_no_sweep_gives_the_runs_under_their_own_names():
    assert [(t.name, t.coords) for t in expand(load(BASE))] == [("gd", {}), ("mom", {})]


def test_swept_store_has_point_coordinates_and_each_point_equals_its_own_run():
    ds = flowsim.run({**BASE, "sweep": {"lr": [0.05, 0.2], "seed": [0, 1], "problem.n_train": [20, 30]}},
                     progress=False)
    assert ds.sizes["run"] == 2 * 2 * 2 * 2
    assert set(ds.problem_n_train.values) == {20, 30} and set(ds.run_name.values) == {"gd", "mom"}
    point = ds.isel(run=(ds.lr == 0.2) & (ds.seed == 1) & (ds.problem_n_train == 20))
    assert sorted(point.run_name.values) == ["gd", "mom"]
    alone = flowsim.run({**BASE, "seed": 1, "problem": {**BASE["problem"], "n_train": 20},
                         "runs": {"gd": {"lr": 0.2}, "mom": {"rule": "momentum", "lr": 0.2, "beta1": 0.5}}},
                        progress=False)
    picked = select(ds, lr=0.2, seed=1, problem_n_train=20)
    assert list(picked.run.values) == ["gd", "mom"]
    for name in ("loss", "grad_norm", "w_proj", "time"):
        np.testing.assert_array_equal(picked[name].values, alone[name].values)


@pytest.mark.parametrize("sweep, where", [
    ({"problem.depth": [1]}, "problem.depth: unknown key"),
    ({"lr": [-1.0]}, "runs.gd.lr"),
    ({"lr": []}, "sweep.lr: give at least one value"),
    ({"nothing.lr": [0.1]}, "sweep.nothing.lr: 'nothing' is not a scenario key"),
    ({"beta1": [0.5]}, "runs.gd.beta1: not a hyperparameter"),
    ({"lr": [[0.1]]}, "sweep.lr"),
])
def test_bad_sweeps_fail_with_one_line_naming_the_key(sweep, where):
    with pytest.raises(ScenarioError) as err:
        expand(load({**BASE, "sweep": sweep}))
    assert where in str(err.value) and "\n" not in str(err.value)


def test_a_point_whose_run_its_problem_refuses_stops_the_sweep_before_anything_runs(tmp_path):
    """A swept batch_size above the data's 30 examples: the first point ran and was stored, then the second raised
    the process's error without its place in the sweep. Now every point is checked first, in one line."""
    doc = {**BASE, "runs": {"gd": {"lr": 0.1, "batch_size": 4}}, "sweep": {"batch_size": [4, 31]}}
    with pytest.raises(ScenarioError, match=r"^sweep point \[batch_size=31\]: runs.gd.batch_size: 31 is larger "
                                            r"than the data \(30 examples\)$"):
        flowsim.run(doc, tmp_path / "s.zarr", progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_sweeping_the_seed_of_runs_that_set_their_own_is_refused():
    doc = {**BASE, "runs": {"gd": {"lr": 0.1, "seed": 4}}, "sweep": {"seed": [0, 1]}}
    with pytest.raises(ScenarioError, match="sweep.seed: run 'gd' sets its own seed"):
        expand(load(doc))


SCALED = {**BASE, "steps": 10,
          "runs": {"adam": {"rule": "adam", "lr": 0.01, "batch_size": 4, "sampling": "iid"},
                   "sgd": {"lr": 0.1, "batch_size": 4, "sampling": "iid"},
                   "hb": {"rule": "momentum", "heavy_ball": True, "beta1": 0.9, "lr": 0.1, "batch_size": 4}},
          "record": {"projection_dim": 0}}


def test_a_scale_sweep_applies_each_rules_scaling_rule_and_divides_the_steps():
    # κ = 4: Adam (square-root) η × 2, 1 − β × 4, ε / 2; SGD (linear) η × 4; heavy ball η × 16; batch × 4; steps ÷ 4
    tasks = {t.name: t for t in expand(load({**SCALED, "sweep": {"scale": [1, 4]}}))}
    one, four = tasks["adam[scale=1]"].scenario, tasks["adam[scale=4]"].scenario
    assert one.steps == 10 and four.steps == 3 and tasks["adam[scale=4]"].coords["scale"] == 4
    adam = four.runs["adam"]
    assert adam.batch_size == 16 and adam.lr == pytest.approx(0.02)
    assert adam.model_extra["beta1"] == pytest.approx(0.6) and adam.model_extra["beta2"] == pytest.approx(0.996)
    assert adam.model_extra["eps"] == pytest.approx(0.5e-8)
    assert four.runs["sgd"].lr == pytest.approx(0.4) and four.runs["sgd"].batch_size == 16
    assert four.runs["hb"].lr == pytest.approx(1.6) and four.runs["hb"].model_extra["beta1"] == pytest.approx(0.6)
    assert one.runs["adam"].lr == 0.01 and one.runs["adam"].batch_size == 4


def test_a_scale_sweep_is_drawn_against_step_times_kappa():
    ds = flowsim.run({**SCALED, "runs": {"sgd": SCALED["runs"]["sgd"]}, "sweep": {"scale": [1, 2]}}, progress=False)
    assert flowsim.plot.clock(ds) == "scaled_step"
    assert list(ds.batch_size.values) == [4, 8] and np.allclose(ds.lr.values, [0.1, 0.2])  # what ran
    x, _ = flowsim.plot.series(ds, "loss", "sgd[scale=2]")
    assert list(x) == [0, 2, 4, 6, 8, 10]
    x, _ = flowsim.plot.series(ds, "loss", "sgd[scale=1]")
    assert list(x) == list(range(11))


@pytest.mark.parametrize("runs, scale, where", [
    ({"gd": {"lr": 0.1}}, [2], "run 'gd' has no batch_size"),
    ({"gd": {"lr": 0.1, "batch_size": 3}}, [0.5], "run 'gd': batch_size 3 × κ = 0.5 is not a whole number"),
    ({"gd": {"step_size": "edge", "batch_size": 4}}, [2], "run 'gd' needs a constant lr"),
    ({"a": {"rule": "adam", "lr": 0.01, "batch_size": 2}}, [16], "run 'a': beta1: 0.9 scaled by κ = 16"),
    ({"gd": {"lr": 0.1, "batch_size": 4}}, [-1], "κ must be a positive number"),
])
def test_bad_scale_sweeps_fail_with_one_line(runs, scale, where):
    with pytest.raises(ScenarioError, match=f"sweep.scale: {where}"):
        expand(load({**BASE, "runs": runs, "sweep": {"scale": scale}}))
