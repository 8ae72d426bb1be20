"""Update rules: exact stability thresholds on quadratics, and agreement with torch.optim where they coincide."""
import math

import numpy as np
import pytest
import torch

import flowsim
from flowsim.models import build_problem
from flowsim.solvers import PROCESSES, RULES, Discrete, Drop, make_rule

MARGIN = 1e-6  # relative distance to the threshold


def growth(rule, lam: float, lr: float, steps: int, state=None) -> float:
    """|θ_N| / |θ_{N/2}| for the rule on the 1-D quadratic ½λθ² from θ = 1 and ``state`` (None: the rule's initial
    one); transients have died out by N/2."""
    theta = torch.ones(1, dtype=torch.float64)
    state = rule.init(theta, lam * theta) if state is None else state
    half = None
    for k in range(steps):
        delta, state = rule.update(lam * theta, state, lr, theta)
        theta = theta + delta
        if k == steps // 2 - 1:
            half = theta.abs().item()
    return theta.abs().item() / half


def held_adam_state(v: float) -> dict:
    """An Adam-family state whose clock is past every bias correction (β^t = 0) and whose v is ``v``: with β2 =
    1 − 1e-15 it barely moves, so that the preconditioner is held."""
    return {"m": torch.zeros(1, dtype=torch.float64), "v": torch.full((1,), v, dtype=torch.float64),
            "t": torch.tensor(1e18, dtype=torch.float64)}


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
        delta, state = rule.update(g, state, lr, w)
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
        delta, state = rule.update(g, state, lr, None)
        sdelta, sstate = scalar.update(g, sstate, lr, None)
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


DECLARATIONS = {"central": "central_flow", "rod": "rod_flow", "sde": "sde"}
"""The process → the rule's declaration of whether that process applies (the others apply to every rule)."""


@pytest.mark.parametrize("process", sorted(PROCESSES))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_runs_through_every_process_or_is_refused_with_its_declared_reason(tiny_mlp_problem, rule,
                                                                                       process):
    """12 steps (past Adam's and NAdam's default discrete start of 10) from w0 at η = 0.01: the loss stays finite
    and moves from L(w0); or the run is refused, in one line, with exactly the reason the rule declares."""
    reason = getattr(RULES[rule], DECLARATIONS.get(process, ""), None)
    run = lambda: flowsim.simulate(tiny_mlp_problem, rule, process, 0.01, 12,  # noqa: E731
                                   batch_size=20 if process == "sde" else None)
    if reason is not None:
        with pytest.raises(flowsim.ScenarioError) as refusal:
            run()
        assert str(refusal.value) == f"rule: {reason}" and "\n" not in reason
        return
    loss = run().loss.sel(run=process).values
    assert np.isfinite(loss).all() and loss[-1] != loss[0]


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_edge_controller_runs_every_rule_with_a_threshold_and_refuses_the_others(tiny_mlp_problem, rule):
    """Under ``step_size: edge`` the first η is c·θ/S (c the rule's edge_fraction, θ its threshold coefficient,
    S = λ_max(P̃⁻¹H) at w0, dense eigvalsh in float64 for the rules without a preconditioner at step 0); a rule
    without a threshold is refused in one line."""
    made = make_rule(rule)
    if made.threshold_coefficient() is None:
        with pytest.raises(flowsim.ScenarioError, match=rf"^step_size: edge holds η at a fraction of the rule's "
                                                         rf"stability threshold, and rule '{rule}' has none$"):
            flowsim.simulate(tiny_mlp_problem, rule, "discrete", "edge", 5)
        return
    ds = flowsim.simulate(tiny_mlp_problem, rule, "discrete", "edge", 5)
    eta = ds.step_size.sel(run="discrete").values[:-1]  # the last row is the final point: no step taken from it
    assert np.isfinite(eta).all() and np.isfinite(ds.loss.values).all()
    if made.precond(made.init(tiny_mlp_problem.w0, tiny_mlp_problem.grad(tiny_mlp_problem.w0))) is None:
        H = torch.autograd.functional.hessian(tiny_mlp_problem.loss, tiny_mlp_problem.w0)
        top = torch.linalg.eigvalsh(H)[-1].item()
        assert eta[0] == pytest.approx(made.edge_fraction * made.threshold_coefficient() / top, rel=1e-2)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_pole_is_the_forward_mode_derivative_of_the_advance_in_its_state(rule):
    """``Rule.pole`` (plain arithmetic) equals ∂A/∂s along ones by forward mode at a random gradient and state, to
    the bit: the advance is affine in s with a constant β."""
    gen = torch.Generator().manual_seed(0)
    w, g = (torch.randn(7, dtype=torch.float64, generator=gen) for _ in range(2))
    made = make_rule(rule)
    state = {key: value + torch.rand(value.shape, dtype=value.dtype, generator=gen)
             for key, value in made.init(w, g).items()}
    with torch.autograd.forward_ad.dual_level():
        out = made.advance_state(g, {key: torch.autograd.forward_ad.make_dual(value, torch.ones_like(value))
                                     for key, value in state.items()})
        derivative = {key: torch.autograd.forward_ad.unpack_dual(value).tangent for key, value in out.items()}
    pole = made.pole(g, state)
    assert pole.keys() == derivative.keys()
    for key in pole:
        assert torch.equal(pole[key], derivative[key] if derivative[key] is not None else torch.zeros_like(pole[key]))
