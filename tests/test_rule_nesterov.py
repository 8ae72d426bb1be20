"""Nesterov momentum: torch's step in its heavy-ball form, the EMA form as the heavy-ball one at η(1 − β1), and its
stability threshold on a quadratic, against the roots of the linear map's characteristic polynomial."""
import math

import numpy as np
import pytest
import torch

from flowsim.models import build_problem
from flowsim.solvers import make_rule
from test_rules import MARGIN, check_against_torch, growth


def test_the_heavy_ball_form_is_torch_sgd_with_nesterov():
    check_against_torch(make_rule("nesterov", beta1=0.9, heavy_ball=True),
                        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True), lr=0.05)


def test_the_ema_form_is_the_heavy_ball_form_at_eta_times_one_minus_beta1():
    problem = build_problem({"model": "mlp", "widths": [5], "dataset": "digits", "n_train": 40}, device="cpu")
    beta1, lr = 0.8, 0.3
    ema, heavy = make_rule("nesterov", beta1=beta1), make_rule("nesterov", beta1=beta1, heavy_ball=True)
    w_ema, w_heavy, s_ema, s_heavy = problem.w0.clone(), problem.w0.clone(), None, None
    for _ in range(25):
        g_ema, g_heavy = problem.grad(w_ema), problem.grad(w_heavy)
        s_ema = ema.init(w_ema, g_ema) if s_ema is None else s_ema
        s_heavy = heavy.init(w_heavy, g_heavy) if s_heavy is None else s_heavy
        d_ema, s_ema = ema.update(g_ema, s_ema, lr, w_ema)
        d_heavy, s_heavy = heavy.update(g_heavy, s_heavy, lr * (1 - beta1), w_heavy)
        w_ema, w_heavy = w_ema + d_ema, w_heavy + d_heavy
    torch.testing.assert_close(w_ema, w_heavy, rtol=1e-12, atol=1e-13)


def spectral_radius(beta1: float, x: float) -> float:
    """The largest |z| of the heavy-ball Nesterov map on ½λθ² at x = ηλ, from the characteristic polynomial of
    (θ, ηm) ↦ (θ', ηm'): z² − (1 + β1 − x(1 + β1))z + β1(1 − x)."""
    return max(abs(np.roots([1.0, -(1 + beta1 - x * (1 + beta1)), beta1 * (1 - x)])))


@pytest.mark.parametrize("heavy_ball", [False, True])
@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9])
def test_it_diverges_exactly_past_its_threshold(beta1, heavy_ball):
    """At ηλ = θ(1 ∓ 1e-6), θ = 2(1 + β1)/((1 + 2β1)(1 − β1)) (EMA) or 2(1 + β1)/(1 + 2β1) (heavy ball), the
    iterate shrinks below and grows above, at the rate the polynomial's root gives over the last 10000 steps."""
    rule = make_rule("nesterov", beta1=beta1, heavy_ball=heavy_ball)
    c = rule.threshold_coefficient()
    expected = 2 * (1 + beta1) / (1 + 2 * beta1) / (1 if heavy_ball else 1 - beta1)
    assert c == pytest.approx(expected, rel=1e-14)
    lam = 3.0
    for side in (-1, 1):
        lr = c / lam * (1 + side * MARGIN)
        x = lr * lam * (1 if heavy_ball else 1 - beta1)  # the heavy-ball form's ηλ
        rate = growth(rule, lam, lr, 20000)
        assert (rate > 1) == (side > 0)
        assert math.log(rate) == pytest.approx(10000 * math.log(spectral_radius(beta1, x)), rel=1e-2)
