"""Lion: its published update step by step, no divergence on a quadratic however sharp, and the refusals of what
needs a threshold, a smooth step or a scaling rule."""
import pytest
import torch

import flowsim
from flowsim.models import build_problem
from flowsim.solvers import make_rule


def test_it_is_the_published_update():
    """c = β1 m + (1 − β1) g; w ← w − η sign(c); m ← β2 m + (1 − β2) g, from m = 0, written here as published."""
    problem = build_problem({"model": "mlp", "widths": [5], "dataset": "digits", "n_train": 40}, device="cpu")
    beta1, beta2, lr = 0.9, 0.99, 1e-3
    rule = make_rule("lion", beta1=beta1, beta2=beta2)
    w, state = problem.w0.clone(), None
    reference, m = problem.w0.clone(), torch.zeros_like(problem.w0)
    for _ in range(25):
        g = problem.grad(w)
        state = rule.init(w, g) if state is None else state
        delta, state = rule.update(g, state, lr, w)
        w = w + delta
        g_ref = problem.grad(reference)
        reference = reference - lr * torch.sign(beta1 * m + (1 - beta1) * g_ref)
        m = beta2 * m + (1 - beta2) * g_ref
    assert torch.equal(w, reference)


@pytest.mark.parametrize("beta1, beta2", [(0.0, 0.0), (0.9, 0.99), (0.99, 0.999)])
def test_it_never_diverges_on_a_quadratic_whatever_its_sharpness(beta1, beta2):
    """A diagonal quadratic with λ from 1e-2 to 1e6 at η = 0.01 (ηλ up to 1e4, 5000× GD's edge), from a random start:
    no weight ever leaves the start's range, and after 10000 steps each stays within 2η of the minimum (measured
    at most 1.48η over β = (0, 0), (0.9, 0.99), (0.95, 0.98), (0.99, 0.999))."""
    generator = torch.Generator().manual_seed(0)
    lam = torch.logspace(-2, 6, 50, dtype=torch.float64)
    theta = torch.randn(50, dtype=torch.float64, generator=generator)
    start, lr = theta.abs().max().item(), 0.01
    rule = make_rule("lion", beta1=beta1, beta2=beta2)
    state, largest, late = rule.init(theta, lam * theta), 0.0, 0.0
    for k in range(20000):
        delta, state = rule.update(lam * theta, state, lr, theta)
        theta = theta + delta
        largest = max(largest, theta.abs().max().item())
        if k >= 10000:
            late = max(late, theta.abs().max().item())
    assert largest <= start + lr and late <= 2 * lr


def test_what_needs_a_threshold_a_smooth_step_or_a_scaling_rule_is_refused_in_one_line(tiny_mlp_problem):
    with pytest.raises(flowsim.ScenarioError, match="^step_size: edge holds η at a fraction of the rule's stability "
                                                    "threshold, and rule 'lion' has none$"):
        flowsim.simulate(tiny_mlp_problem, "lion", "discrete", "edge", 3)
    with pytest.raises(ValueError, match="^rule: lion has no known scaling rule"):
        make_rule("lion").scaled(2.0)
    with pytest.raises(ValueError, match="^rule: lion has no known scaling rule"):
        make_rule("lion").svag(4)
    from flowsim.optim import EdgeOptimizer
    with pytest.raises(ValueError, match="rule 'lion' has none$"):
        EdgeOptimizer([torch.nn.Parameter(torch.zeros(3))], make_rule("lion"))
