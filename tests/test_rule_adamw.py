"""AdamW: torch's AdamW, its decoupled decay in every process (exact on a flat loss), and its stability threshold on
a quadratic with v̂ held, against the roots of the linear map's characteristic polynomial."""
import math

import numpy as np
import pytest
import torch

import flowsim
from flowsim.solvers import make_rule
from test_rules import MARGIN, check_against_torch, growth, held_adam_state


def test_it_is_torch_adamw():
    check_against_torch(make_rule("adamw", beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1),
                        lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
                        lr=0.01)


def test_without_decay_it_is_adam():
    check_against_torch(make_rule("adamw", weight_decay=0.0), lambda p: torch.optim.Adam(p, lr=0.01), lr=0.01)


def test_on_a_flat_loss_each_process_decays_the_weights_as_derived():
    """L = 0 (its gradient is 0, so Adam's part of the step is 0): discrete w_k = (1 − ηλ)ᵏ w0; after the rule's
    10 discrete steps, the stable and modified flows w0·(1 − ηλ)¹⁰·e^{−ηλ(k − 10)}; the rod's centre the same
    from c = ¾z₁₀ + ½z₁₁ − ¼z₁₂ = z₁₀(¾ + ½r − ¼r²), r = 1 − ηλ (its half-length decays at 2 − ηλ)."""
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    problem = flowsim.Problem.from_function(lambda w: 0.0 * (w * w).sum(), w0)
    lr, decay, steps = 0.1, 0.5, 30
    r = 1 - lr * decay
    expected = {"discrete": r ** steps, "stable": r ** 10 * math.exp(-lr * decay * (steps - 10)),
                "modified": r ** 10 * math.exp(-lr * decay * (steps - 10)),
                "rod": r ** 10 * (0.75 + 0.5 * r - 0.25 * r * r) * math.exp(-lr * decay * (steps - 10))}
    for process, factor in expected.items():
        ds = flowsim.simulate(problem, "adamw", process, lr, steps, weight_decay=decay,
                              record={"keep_weights": steps, "projection_dim": 0})
        np.testing.assert_allclose(ds.w.sel(run=process).values[-1], factor * w0.numpy(), rtol=1e-6, err_msg=process)


def spectral_radius(beta1: float, a: float, x: float) -> float:
    """The largest |z| of AdamW's map on ½hθ² with P held, x = ηh/P, a = 1 − ηλ, from the characteristic
    polynomial of (θ, ηm/P) ↦ (θ', ηm'/P): z² − (a + β1 − (1 − β1)x)z + aβ1."""
    return max(abs(np.roots([1.0, -(a + beta1 - (1 - beta1) * x), a * beta1])))


@pytest.mark.parametrize("beta1", [0.5, 0.9])
def test_it_diverges_exactly_past_its_threshold_with_the_preconditioner_held(beta1):
    """The threshold is ηh/P = (2 − ηλ)(1 + β1)/(1 − β1): at the η solving it, η·(1 ∓ 1e-6) shrinks and grows, at
    the root's rate; ``threshold_coefficient`` is its limit ηλ → 0, Adam's."""
    decay, h, v = 0.3, 3.0, 0.25
    rule = make_rule("adamw", beta1=beta1, beta2=1 - 1e-15, eps=1e-8, weight_decay=decay)
    k = (1 + beta1) / (1 - beta1)
    assert rule.threshold_coefficient() == pytest.approx(2 * k, rel=1e-14)
    P = math.sqrt(v) + 1e-8
    edge = 2 * k / (h / P + decay * k)  # η with ηh/P = (2 − ηλ)k
    for side in (-1, 1):
        lr = edge * (1 + side * MARGIN)
        rate = growth(rule, h, lr, 20000, held_adam_state(v))
        assert (rate > 1) == (side > 0)
        assert math.log(rate) == pytest.approx(10000 * math.log(spectral_radius(beta1, 1 - lr * decay, lr * h / P)),
                                               rel=1e-2)
