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


def test_sweeping_the_seed_of_runs_that_set_their_own_is_refused():
    doc = {**BASE, "runs": {"gd": {"lr": 0.1, "seed": 4}}, "sweep": {"seed": [0, 1]}}
    with pytest.raises(ScenarioError, match="sweep.seed: run 'gd' sets its own seed"):
        expand(load(doc))
