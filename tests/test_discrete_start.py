"""A flow's ``discrete_start``: its first n steps are the discrete rule's own, bit for bit, and from step n it is the
same flow started from the discrete run's weights and state there (stable and central flows, Adam)."""
import numpy as np
import pytest
import torch

import flowsim
from flowsim.compare import relative_distance
from flowsim.models import build_problem
from flowsim.solvers import Central, Discrete, Stable, make_rule
from flowsim.solvers.processes import Trajectory

N, STEPS = 3, 6


def _problem():
    spec = {"model": "mlp", "widths": [8], "activation": "tanh", "dataset": "digits", "classes": [0, 1, 2],
            "n_train": 40, "loss": "mse"}
    return build_problem(spec, dtype="float64", device="cpu")


def _discrete(p, rule, lr, steps):
    """The discrete run's trajectories after 0 … steps steps."""
    d = Discrete(p, rule)
    traj = d.start(p.w0)
    path = [Trajectory(w=traj.w)]
    for _ in range(steps):
        d.step(traj, lr, measure=False)
        path.append(Trajectory(w=traj.w, state=dict(traj.state)))
    return path


@pytest.mark.parametrize("process", [Stable, Central])
def test_the_flow_after_discrete_start_is_the_flow_started_from_the_discrete_state(process):
    """Bit for bit: the discrete run up to step N, then the flow started there; the central flow's shadow stays
    the discrete run throughout."""
    p, rule, lr = _problem(), make_rule("adam", beta1=0.9, beta2=0.99, eps=1e-3), 0.05
    path = _discrete(p, rule, lr, STEPS)
    late = process(p, rule, options=process.Options(discrete_start=N))
    traj = late.start(p.w0)
    for k in range(STEPS):
        if k == N:  # the flow's state at its start: the central flow's is the next discrete step's (advanced)
            state = late.precond_state(traj)(p.grad(traj.w))
            expected = path[N + 1 if process is Central else N].state
            assert all(torch.equal(state[key], expected[key]) for key in expected)
        late.step(traj, lr, measure=True)
        if k < N:
            assert torch.equal(traj.w, path[k + 1].w)
    fresh = process(p, rule, options=process.Options(discrete_start=0))
    other = Trajectory(w=path[N].w.clone(), state=path[N].state)  # the flow from the discrete state at step N
    for _ in range(STEPS - N):
        fresh.step(other, lr, measure=False)
    assert torch.equal(traj.w, other.w)
    assert traj.step == STEPS and traj.time == pytest.approx(STEPS * lr)
    if process is Central:
        assert torch.equal(late._shadow.w, path[STEPS].w)


def test_discrete_start_is_a_flow_option():
    with pytest.raises(ValueError, match="discrete_start"):
        flowsim.simulate(_problem(), "adam", "discrete", 0.05, steps=2, options={"discrete_start": 2})
    with pytest.raises(ValueError, match="discrete_start"):
        flowsim.simulate(_problem(), "gd", "stable", 0.05, steps=2, options={"discrete_start": -1})


def test_a_policy_sees_the_discrete_runs_preconditioner_over_the_discrete_steps():
    """The edge controller over the first n steps of a flow sets the discrete run's step sizes, to the bit (its
    S uses P̃ of the state advanced by the step's gradient there, the flow's own state after)."""
    p = _problem()
    discrete = flowsim.simulate(p, "adam", "discrete", "edge", steps=N, eps=1e-3).squeeze()
    for process in ("stable", "central"):
        late = flowsim.simulate(p, "adam", process, "edge", steps=N + 2, eps=1e-3,
                                options={"discrete_start": N}).squeeze()
        assert (late.step_size.values[:N] == discrete.step_size.values[:N]).all()
        assert late.loss.values[N] == discrete.loss.values[N]


def test_adams_flows_start_after_the_averaging_window_of_m_and_the_others_at_w0():
    """Rule.flow_start: ⌈1/(1 − β1)⌉ for Adam (β1 = 0.9 gives 10 although 1/(1 − 0.9) is 10.000…02 in floating
    point), 0 for the rules whose flows are defined from their initial state."""
    assert [make_rule("adam", beta1=b).flow_start() for b in (0.0, 0.5, 0.8, 0.9, 0.99)] == [1, 2, 5, 10, 100]
    assert {name: make_rule(name).flow_start() for name in ("gd", "momentum", "scalar_rmsprop", "rmsprop")} == \
        dict.fromkeys(("gd", "momentum", "scalar_rmsprop", "rmsprop"), 0)


@pytest.mark.parametrize("process", ["stable", "modified", "central", "sde"])
def test_every_flow_of_adam_starts_with_its_own_steps_by_default(process):
    """From defaults (no ``discrete_start``) every flow of Adam at β1 = 0.5 takes Adam's first 2 steps itself, bit
    for bit (the SDE on the discrete run's minibatches), then moves off the discrete run; the stored coordinate
    says where the flow started."""
    batch = {"batch_size": 8} if process == "sde" else {}
    adam = {"rule": "adam", "lr": 0.05, "beta1": 0.5, "eps": 1e-3, **batch}
    doc = {"name": "start", "seed": 0, "dtype": "float64", "device": "cpu", "steps": 4,
           "problem": {"model": "mlp", "widths": [8], "activation": "tanh", "dataset": "digits", "classes": [0, 1, 2],
                       "n_train": 40, "loss": "mse"},
           "runs": {"adam": {"process": "discrete", **adam}, "flow": {"process": process, **adam}},
           "record": {"projection_dim": 0, "keep_weights": 1}}
    ds = flowsim.run(doc, progress=False)
    w = ds.w.sel(run="flow").values, ds.w.sel(run="adam").values
    assert (w[0][:3] == w[1][:3]).all() and not (w[0][3:] == w[1][3:]).all()
    assert int(ds.discrete_start.sel(run="flow")) == 2 and np.isnan(float(ds.discrete_start.sel(run="adam")))


def test_adams_flows_from_defaults_follow_adam_on_a_problem_where_they_failed_from_w0():
    """The tanh MLP 64-32-32-4 on 400 digits, Adam β1 = 0.8, η = 0.02 (held-out problem ``tanh-mlp-digits4`` of
    ``python -m benchmarks central-fidelity --held-out``). Started at w0 (the old default) the central flow
    recorded no preconditioned sharpness and the stable flow ended ~3e30 times farther from Adam than it; from
    the rule's start (step 5) both follow Adam. At step 60 (η·λ_max(P̃⁻¹H) at 0.87 of its edge): the central flow
    0.058 of Adam's travel away, the stable flow 0.093 (deterministic float64; 400 steps: 0.120 and 0.212)."""
    adam = {"rule": "adam", "lr": 0.02, "beta1": 0.8}
    doc = {"name": "adam-defaults", "seed": 0, "dtype": "float64", "device": "cpu", "steps": 60,
           "problem": {"model": "mlp", "widths": [64, 32, 32], "activation": "tanh", "dataset": "digits",
                       "classes": [0, 1, 2, 3], "n_train": 400, "loss": "mse"},
           "runs": {"adam": {"process": "discrete", **adam}, "stable": {"process": "stable", **adam},
                    "central": {"process": "central", **adam}},
           "record": {"curvature_every": 10, "top_k": 1, "precond": True, "keep_weights": 60, "projection_dim": 0},
           "compare": {"reference": "adam"}}
    ds = flowsim.run(doc, progress=False)
    measured = ds.precond_sharpness.sel(run="central", step=slice(10, None, 10))  # NaN at step 0: no state yet
    assert np.isfinite(measured.values).all() and measured.size == 6
    central, stable = (relative_distance(ds, run, "adam") for run in ("central", "stable"))
    assert central <= 0.10 and stable >= 1.5 * central
