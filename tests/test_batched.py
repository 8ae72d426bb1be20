"""The vmapped pass over several runs equals the separate discrete runs (1e-12, float64)."""
import pytest
import torch

import flowsim
from flowsim.models import build_problem
from flowsim.solvers import Discrete, Schedule, make_rule
from flowsim.solvers.batched import BatchedDiscrete

CASES = [("gd", {}, [0.05, 0.2, 0.5]), ("momentum", {"beta1": 0.9}, [0.01, 0.05, 0.1]),
         ("adam", {}, [1e-3, 1e-2, 3e-2]), ("rmsprop", {"eps": 1e-6}, [1e-3, 1e-2, 3e-2]),
         ("scalar_rmsprop", {}, [1e-2, 1e-1, 3e-1])]


@pytest.fixture(scope="module")
def problem():
    return build_problem({"model": "mlp", "widths": [8, 6], "activation": "tanh", "dataset": "digits",
                          "classes": [0, 1, 2, 3], "n_train": 80, "loss": "mse"}, dtype="float64", device="cpu")


@pytest.mark.parametrize("batch_size", [None, 12])
@pytest.mark.parametrize("rule_name, hyper, lrs", CASES)
def test_batched_pass_equals_separate_runs(problem, rule_name, hyper, lrs, batch_size):
    rule = make_rule(rule_name, **hyper)
    schedules = [Schedule(lrs[0]), Schedule(lrs[1], 20, lrs[0]), Schedule(lrs[2])]
    seeds = [0, 1, 1]
    batched = BatchedDiscrete(problem, rule, schedules, seeds, batch_size)
    bt = batched.start(problem.w0)
    separate = [Discrete(problem, rule, s, seed=seed, batch_size=batch_size) for s, seed in zip(schedules, seeds)]
    trajs = [p.start(problem.w0) for p in separate]
    for k in range(60):
        rows = batched.step(bt, measure=k % 4 == 0)
        for b, (p, t) in enumerate(zip(separate, trajs)):
            row = p.step(t, measure=k % 4 == 0)
            assert rows[b].keys() == row.keys() and rows[b]["step_size"] == row["step_size"]
            for key in row.keys() - {"step_size"}:
                assert rows[b][key] == pytest.approx(row[key], abs=1e-12, rel=0)
    for b, t in enumerate(trajs):
        assert torch.equal(torch.tensor(bt.time[b]), torch.tensor(t.time)) and bt.step == t.step
        assert (bt.w[b] - t.w).abs().max().item() <= 1e-12
        for key, value in t.state.items():
            assert (bt.state[key][b] - value).abs().max().item() <= 1e-12 * max(1.0, value.abs().max().item())
    final = batched.measure(bt)
    for b, (p, t) in enumerate(zip(separate, trajs)):
        assert final[b]["loss"] == pytest.approx(p.measure(t)["loss"], abs=1e-12, rel=0)
