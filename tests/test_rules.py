"""Update rules: exact stability thresholds on quadratics, and agreement with torch.optim where they coincide."""
import math

import pytest
import torch

from flowsim.models import build_problem
from flowsim.solvers import Discrete, Drop, make_rule

MARGIN = 1e-6  # relative distance to the threshold


def growth(rule, lam: float, lr: float, steps: int) -> float:
    """|θ_N| / |θ_{N/2}| for the rule on the 1-D quadratic ½λθ² (transients have died out by N/2)."""
    theta = torch.ones(1, dtype=torch.float64)
    state = rule.init(theta, lam * theta)
    half = None
    for k in range(steps):
        delta, state = rule.update(lam * theta, state, lr)
        theta = theta + delta
        if k == steps // 2 - 1:
            half = theta.abs().item()
    return theta.abs().item() / half


def test_gd_on_a_quadratic_converges_just_below_two_over_lambda_and_diverges_just_above():
    spectrum = [7.0, 3.0, 0.5]
    problem = build_problem({"model": "quadratic", "spectrum": spectrum}, device="cpu")
    threshold = 2 / spectrum[0]
    steps = 4000
    for side in (-1, 1):
        lr = threshold * (1 + side * MARGIN)
        process = Discrete(problem, make_rule("gd"))
        traj = process.start(problem.w0)
        for _ in range(steps):
            process.step(traj, lr, measure=False)
        top = abs(traj.w[0].item())
        expected = abs(1 - lr * spectrum[0]) ** steps  # the exact per-step factor of the top mode
        assert top == pytest.approx(expected, rel=1e-9)
        assert (top > 1) == (side > 0), f"side {side}: |θ_top| = {top}"


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9])
def test_ema_momentum_is_stable_just_below_its_threshold_and_unstable_just_above(beta1):
    lam = 3.0
    rule = make_rule("momentum", beta1=beta1)
    assert rule.threshold_coefficient() == pytest.approx(2 * (1 + beta1) / (1 - beta1))
    lr_edge = 2 * (1 + beta1) / ((1 - beta1) * lam)
    below = growth(rule, lam, lr_edge * (1 - MARGIN), 20000)
    above = growth(rule, lam, lr_edge * (1 + MARGIN), 20000)
    assert below < 1 < above
    # near the edge the dominant root is −1 − (1 + β1)/(1 − β1)·2δ·(sign): |root|^{N/2} predicts the growth
    rate = 2 * (1 + beta1) / (1 - beta1) * MARGIN
    assert math.log(above) == pytest.approx(10000 * rate, rel=1e-2)
    assert math.log(below) == pytest.approx(-10000 * rate, rel=1e-2)


def test_heavy_ball_threshold_and_agreement_with_torch_sgd_momentum():
    rule = make_rule("momentum", beta1=0.5, heavy_ball=True)
    lam, edge = 2.0, 2 * (1 + 0.5) / 2.0  # heavy ball: stable iff ηλ < 2(1 + β1)
    assert growth(rule, lam, edge * (1 - MARGIN), 20000) < 1 < growth(rule, lam, edge * (1 + MARGIN), 20000)
    check_against_torch(rule, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5), lr=0.05)


def test_adam_matches_torch_adam_including_bias_correction():
    check_against_torch(make_rule("adam", beta1=0.9, beta2=0.99, eps=1e-8),
                        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99), eps=1e-8), lr=0.01)


def test_gd_matches_torch_sgd():
    check_against_torch(make_rule("gd"), lambda p: torch.optim.SGD(p, lr=0.1), lr=0.1)


def check_against_torch(rule, make_opt, lr, steps=25):
    problem = build_problem({"model": "mlp", "widths": [5], "dataset": "digits", "n_train": 40}, device="cpu")
    w = problem.w0.clone()
    param = torch.nn.Parameter(problem.w0.clone())
    opt = make_opt([param])
    state = None
    for _ in range(steps):
        _, g = problem.loss_and_grad(w)
        state = rule.init(w, g) if state is None else state
        delta, state = rule.update(g, state, lr)
        w = w + delta
        opt.zero_grad()
        param.grad = problem.grad(param.detach())
        opt.step()
    torch.testing.assert_close(w, param.detach(), rtol=1e-12, atol=1e-13)


def test_rmsprop_follows_its_definition():
    beta2, eps, lr = 0.9, 1e-8, 0.01
    rule = make_rule("rmsprop", beta2=beta2, eps=eps)
    scalar = make_rule("scalar_rmsprop", beta2=beta2, eps=eps)
    gs = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * (k + 1) for k in range(3)]
    nu, s = gs[0] ** 2, (gs[0] ** 2).sum()
    state, sstate = rule.init(None, gs[0]), scalar.init(None, gs[0])
    for g in gs:
        nu, s = beta2 * nu + (1 - beta2) * g ** 2, beta2 * s + (1 - beta2) * (g ** 2).sum()
        delta, state = rule.update(g, state, lr)
        sdelta, sstate = scalar.update(g, sstate, lr)
        torch.testing.assert_close(delta, -lr * g / (nu.sqrt() + eps))
        torch.testing.assert_close(sdelta, -lr * g / (s.sqrt() + eps))


def test_adam_threshold_is_38_over_eta_at_beta1_09():
    assert make_rule("adam", beta1=0.9).threshold_coefficient() == pytest.approx(38.0)
    assert make_rule("gd").threshold_coefficient() == 2.0


def test_step_size_drop_schedule():
    s = Drop(lr=0.4, at=10, lr_after=0.1)
    assert [s.update(k, None, s.init())[0] for k in (0, 9, 10, 500)] == [0.4, 0.4, 0.1, 0.1]


@pytest.mark.parametrize("bad,key", [({"beta1": 1.0}, "beta1"), ({"beta2": -0.1}, "beta2"),
                                      ({"eps": -1.0}, "eps"), ({"lr": 1}, "lr")])
def test_bad_hyperparameters_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        make_rule("adam", **bad)
