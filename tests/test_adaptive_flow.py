"""The adaptive process's flow-driven choice of c (``flow``): the central flow's forecast against closed forms
(a quadratic, and an MLP below the edge, where the flow is Euler's gradient flow), against the ``central``
process above the edge, the choice itself (argmin of the forecasts, when it is made) and errors; exact resume
is in test_adaptive.py."""
import math

import numpy as np
import pytest
import torch

import flowsim
from flowsim.models.landscapes import QuadraticConfig
from flowsim.scenario import ScenarioError
from flowsim.solvers import PROCESSES, Schedule, make_rule

SPECTRUM = [4.0, 1.0, 0.25]
MLP = {"model": "mlp", "widths": [16], "activation": "tanh", "dataset": "digits", "classes": [0, 1, 2, 3],
       "n_train": 100, "loss": "mse"}


def adaptive(problem, rule="gd", seed=0, **options):
    cls = PROCESSES["adaptive"]
    return cls(problem, make_rule(rule), Schedule(100.0), seed=seed, options=cls.Options(**options))


def test_quadratic_forecasts_are_eulers_gradient_flow_and_the_flow_picks_the_largest_stable_candidate():
    """On ½ Σ λ_i w_i² from w = 1, below the edge the central flow is the gradient flow, here in 2 Euler
    substeps per step: w_i(H) = (1 − ηλ_i/2)^{2H}. At c = 1.25 (η·λ_max = 2.5) no Σ can stabilize a quadratic
    (its third derivative is 0), so that forecast is NaN; of the others, c = 0.9 forecasts the lowest loss, and
    the controller then holds η·λ_max = 1.8."""
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    process = adaptive(problem, flow={"candidates": [0.5, 0.9, 1.25], "horizon": 3, "substeps": 2})
    lam = torch.tensor(SPECTRUM, dtype=torch.float64)
    for c in (0.5, 0.9):
        eta = 2 * c / SPECTRUM[0]
        expected = 0.5 * (lam * (1 - 0.5 * eta * lam) ** 12).sum().item()
        assert process.forecaster.forecast(problem.w0, None, eta, 3) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(process.forecaster.forecast(problem.w0, None, 2 * 1.25 / SPECTRUM[0], 3))
    traj = process.start(problem.w0)
    etas = [process.step(traj, True)["step_size"] for _ in range(12)]
    assert process.ctl["c"] == 0.9
    np.testing.assert_allclose(np.array(etas) * SPECTRUM[0], 1.8, rtol=1e-6)


def test_mlp_forecast_below_the_edge_is_the_euler_gradient_flow():
    """At c = 0.3 nothing is critical over 5 steps, so the forecast is L after 10 Euler substeps of
    w ← w − (η/2)∇L, computed here with the Problem's gradient alone."""
    problem = flowsim.models.networks.MLPConfig(**MLP).build(device="cpu")
    process = adaptive(problem, flow={"horizon": 5, "substeps": 2})
    traj = process.start(problem.w0)
    S = process.sharpness(traj, problem.grad(problem.w0), None, True)
    eta = 2 * 0.3 / S
    w = problem.w0.clone()
    for _ in range(10):
        w = w - 0.5 * eta * problem.grad(w)
    assert process.forecaster.forecast(problem.w0, None, eta, 5) == pytest.approx(problem.loss(w).item(), rel=1e-10)


def test_mlp_forecast_above_the_edge_is_the_central_processs_predicted_loss():
    """At c = 1.6 the flow starts above the edge and Σ stays active: the forecast equals the ``central`` process's
    recorded predicted_loss (L + ½⟨H, Σ⟩) after the same steps, and exceeds its plain loss there."""
    problem = flowsim.models.networks.MLPConfig(**MLP).build(device="cpu")
    process = adaptive(problem, flow={"horizon": 4, "substeps": 2})
    traj = process.start(problem.w0)
    eta = 2 * 1.6 / process.sharpness(traj, problem.grad(problem.w0), None, True)
    forecast = process.forecaster.forecast(problem.w0, None, eta, 4)
    doc = {"seed": 0, "device": "cpu", "dtype": "float64", "problem": MLP, "steps": 5,
           "runs": {"central": {"process": "central", "rule": "gd", "lr": eta, "substeps": 2, "shadow": False}},
           "record": {"every": 1, "projection_dim": 0}}
    ds = flowsim.run(doc, progress=False).sel(run="central")
    assert forecast == pytest.approx(float(ds.predicted_loss.sel(step=4)), rel=1e-8)
    assert forecast > float(ds.loss.sel(step=4)) * (1 + 1e-6)


def test_the_choice_is_the_argmin_of_the_forecasts_at_the_first_estimate_and_every_flow_every_steps():
    """Scripted forecasts (the lowest at c = 0.75, then 1.0 from the second choice on) on a quadratic with every
    = 5 and flow.every = 10: c is chosen at step 0 and after the steps that reach w_10 and w_20, recorded as
    target_c, and η·λ_max = 2c follows it; NaN forecasts are never chosen."""
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    process = adaptive(problem, every=5, flow={"candidates": [0.5, 0.75, 1.0, 1.5], "every": 10})
    made = []

    def forecast(w, state, lr, steps):
        c = lr * SPECTRUM[0] / 2
        best = 0.75 if len(made) < 4 else 1.0
        made.append(c)
        return math.nan if c > 1.2 else abs(c - best)
    process.forecaster.forecast = forecast
    traj = process.start(problem.w0)
    cs, etas = [], []
    for _ in range(25):
        out = process.step(traj, True)
        cs.append(out["target_c"])
        etas.append(out["step_size"])
    assert len(made) == 3 * 4
    assert cs == [0.75] * 10 + [1.0] * 15
    np.testing.assert_allclose(np.array(etas) * SPECTRUM[0], 2 * np.array(cs), rtol=1e-6)


@pytest.mark.parametrize("run,message", [
    ({"rule": "adam"}, "runs.a.flow: rule: the central flow is derived for gd, scalar_rmsprop, rmsprop, not 'adam'"),
    ({"batch_size": 10}, "runs.a.flow: batch_size: the central flow is a full-batch process"),
    ({"c_start": 3.0}, "runs.a.c_start: does not apply with flow"),
    ({"every": 4, "flow": {"every": 6}}, "runs.a.flow.every: must be a multiple of every (4)"),
    ({"flow": {"candidates": [0.5, 2.5]}}, "runs.a.flow.candidates.1: Input should be less than 2"),
])
def test_bad_flow_options_fail_in_one_line(run, message, tmp_path):
    doc = {"problem": MLP, "steps": 5, "runs": {"a": {"process": "adaptive", "lr": 1.0, "flow": {}, **run}}}
    with pytest.raises(ScenarioError) as err:
        flowsim.run(doc, tmp_path / "s.zarr", progress=False)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "s.zarr").exists()
