"""NAdam: torch's NAdam with its momentum schedule off, and its stability threshold on a quadratic with v̂ held,
against the roots of the linear map's characteristic polynomial (Nesterov's at η/(√v̂ + ε))."""
import math

import pytest
import torch

from flowsim.solvers import make_rule
from test_rule_nesterov import spectral_radius
from test_rules import MARGIN, check_against_torch, growth, held_adam_state


def test_it_is_torch_nadam_with_a_constant_momentum_coefficient():
    """torch's μₜ = β1(1 − ½·0.96^(t·momentum_decay)) is β1 exactly once 0.96^(t·1e9) underflows to 0. torch keeps
    the product of the μₜ in the default dtype (float32 otherwise: a 3e-8 relative error per step)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        check_against_torch(make_rule("nadam", beta1=0.9, beta2=0.99, eps=1e-8),
                            lambda p: torch.optim.NAdam(p, lr=0.01, betas=(0.9, 0.99), eps=1e-8, momentum_decay=1e9),
                            lr=0.01)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("beta1", [0.5, 0.9])
def test_it_diverges_exactly_past_its_threshold_with_the_preconditioner_held(beta1):
    """On ½λθ² from a state whose clock is past every bias correction (β^t = 0) and whose v barely moves
    (β2 = 1 − 1e-15), the step is EMA Nesterov at η/P, P = √v + ε: at λη/P = θ(1 ∓ 1e-6) the iterate shrinks below
    and grows above, at the rate of the polynomial's root over the last 10000 steps."""
    rule = make_rule("nadam", beta1=beta1, beta2=1 - 1e-15, eps=1e-8)
    c = rule.threshold_coefficient()
    assert c == pytest.approx(2 * (1 + beta1) / ((1 + 2 * beta1) * (1 - beta1)), rel=1e-14)
    lam, v = 3.0, 0.25
    P = math.sqrt(v) + 1e-8
    for side in (-1, 1):
        lr = c * P / lam * (1 + side * MARGIN)
        rate = growth(rule, lam, lr, 20000, held_adam_state(v))
        assert (rate > 1) == (side > 0)
        x = lr * lam / P * (1 - beta1)  # the heavy-ball form's ηλ
        assert math.log(rate) == pytest.approx(10000 * math.log(spectral_radius(beta1, x)), rel=1e-2)
