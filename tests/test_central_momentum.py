"""The central flow of the rules that step along a momentum (EMA and heavy-ball momentum, Adam): its closed forms
(one critical direction; below the edge), the identity between the two momentum forms, and its fidelity to the
discrete runs at their edge, (2 + 2β1)/((1 − β1)η)."""
import math

import numpy as np
import pytest
import torch

from flowsim.solvers.curvature import hessian_operator, precond_eigenpairs
from flowsim.models import build_problem
from flowsim.models.problem import Problem
from flowsim.solvers import Discrete, Stable
from flowsim.solvers.central import Central, CentralOptions, sigma_eigenpairs
from flowsim.solvers.rules import make_rule


def _window_mean(x: np.ndarray, m: int = 20) -> np.ndarray:
    """Centered m-step moving average (NaN where the window does not fit)."""
    out = np.full(len(x), np.nan)
    out[m // 2:m // 2 + len(x) - m + 1] = np.convolve(x, np.ones(m) / m, mode="valid")
    return out


@pytest.mark.parametrize("name, hyper, gain", [("gd", {}, 1.0), ("momentum", {"beta1": 0.9}, 1.0),
                                               ("momentum", {"beta1": 0.5, "heavy_ball": True}, 2.0)])
def test_one_critical_direction_is_the_projected_settled_step(name, hyper, gain):
    """L = ½ e^{y+z} x² − y − 2z at x = 0 (S = e^{y+z} along e_x, ∇S = S (0, 1, 1), g = (0, −1, −2)), at the
    rule's edge η = c/S with its momentum settled (m = g; heavy ball m = g/(1 − β1)): the flow is the settled
    step projected off ∇S, −η κ (0, ½, −½) (κ = 1, or 1/(1 − β1) = 2 for heavy ball), and Σ's variance is
    2⟨−g, ∇S⟩/‖∇S‖² = 3/S, as for GD: the momentum changes the edge and the speed, not the balance."""
    def loss(w):
        x, y, z = w
        return 0.5 * torch.exp(y + z) * x * x - y - 2 * z
    w = torch.tensor([0.0, 0.1, 0.1], dtype=torch.float64)
    p = Problem.from_function(loss, w, device="cpu")
    rule = make_rule(name, **hyper)
    S = math.exp(0.2)
    lr = rule.threshold_coefficient() / S
    state = {"m": gain * p.grad(w)} if name == "momentum" else {}
    for dt in (0.25, 0.05):
        process = Central(p, rule, options=CentralOptions(eig_tol=1e-13, shadow=False))
        f = process.field(w, state, lr, dt)
        assert f["X"].shape == (1, 1)
        expected = -lr * gain * torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
        assert float((f["dw"] - expected).norm() / expected.norm()) < 1e-8
        s, E = sigma_eigenpairs(f["U"], f["X"])
        assert s.item() == pytest.approx(3.0 / S, rel=1e-8)
        assert abs(E[0, 0].item()) == pytest.approx(1.0, rel=1e-12)


def test_below_the_edge_the_momentum_flow_is_runge_kutta_at_the_tustin_rate():
    """L = ½ Σ λᵢθᵢ², EMA momentum β1 = 0.9 at η = 2 (η·λ_max = 6 < 38: no critical direction). Per mode the
    flow starts at the first discrete step's state, m = (1 − β1)λθ₀, and is z' = A z for z = (θ, m),
    A = [[0, −η], [kλ, −k]], k = 2(1 − β1)/(1 + β1), integrated by 4 classical Runge-Kutta substeps per step:
    z ← (I + hA + (hA)²/2 + (hA)³/6 + (hA)⁴/24) z with h = ¼, iterated here in float64 for 10 steps."""
    lam = torch.tensor([3.0, 1.0, 0.2], dtype=torch.float64)
    theta0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    p = Problem.from_function(lambda w: 0.5 * (lam * w * w).sum(), theta0, device="cpu")
    beta, lr = 0.9, 2.0
    process = Central(p, make_rule("momentum", beta1=beta), options=CentralOptions(shadow=False))
    traj = process.start(p.w0)
    for _ in range(10):
        out = process.step(traj, lr, measure=True)
        assert math.isnan(out["sigma_eigs"][0])
    k = 2 * (1 - beta) / (1 + beta)
    for i in range(3):
        hA = 0.25 * torch.tensor([[0.0, -lr], [k * lam[i].item(), -k]], dtype=torch.float64)
        step = torch.eye(2, dtype=torch.float64) + hA + hA @ hA / 2 + hA @ hA @ hA / 6 + hA @ hA @ hA @ hA / 24
        z = torch.linalg.matrix_power(step, 40) @ torch.stack([theta0[i], (1 - beta) * lam[i] * theta0[i]])
        torch.testing.assert_close(traj.w[i], z[0], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(traj.state["m"][i], z[1], rtol=1e-12, atol=1e-15)


def test_heavy_ball_is_ema_momentum_at_a_rescaled_step(tiny_mlp_problem):
    """Heavy ball m ← β1 m + g at η is EMA momentum at η/(1 − β1) with m scaled by 1 − β1, step for step; so are
    their central flows: on the tiny MLP at the edge (Σ ≠ 0 within the 15 steps) the weights agree to 1e-10
    relative and m_EMA = (1 − β1) m_HB."""
    p, beta, lr = tiny_mlp_problem, 0.5, 1.5
    runs = {}
    for heavy_ball, step in ((True, lr), (False, lr / (1 - beta))):
        process = Central(p, make_rule("momentum", beta1=beta, heavy_ball=heavy_ball),
                          options=CentralOptions(shadow=False))
        traj = process.start(p.w0)
        sigma = [process.step(traj, step, measure=True)["sigma_eigs"][0] for _ in range(15)]
        runs[heavy_ball] = (traj, np.nan_to_num(np.array(sigma)))
    (hb, sigma), (ema, _) = runs[True], runs[False]
    assert (sigma > 0).any()
    assert ((hb.w - ema.w).norm() / (hb.w - p.w0).norm()).item() < 1e-10
    torch.testing.assert_close(ema.state["m"], (1 - beta) * hb.state["m"], rtol=1e-9, atol=1e-14)


def _digits_mlp(widths, n, classes=(0, 1, 2, 3)):
    spec = {"model": "mlp", "widths": widths, "activation": "tanh", "dataset": "digits", "n_train": n,
            "loss": "mse"}
    if classes is not None:
        spec["classes"] = list(classes)
    return build_problem(spec, dtype="float64", device="cpu")


def _track(p, rule, lr, steps):
    """Central flow (4 Euler substeps), stable flow and discrete run side by side; per step: the flow's
    effective top eigenvalue (edge = 2), Σ's top eigenvalue, the predicted loss, the discrete loss and the
    squared oscillation amplitude along Σ's top eigenvector. Returns the rows and the three trajectories."""
    cf, sf, d = Central(p, rule), Stable(p, rule, options=Stable.Options()), Discrete(p, rule)
    t_cf, t_sf, t_d = cf.start(p.w0), sf.start(p.w0), d.start(p.w0)
    rows = []
    for _ in range(steps):
        out = cf.step(t_cf, lr, measure=True)
        sf.step(t_sf, lr, measure=False)
        rows.append((cf.last["eigs"][0].item(), out["sigma_eigs"][0], out["predicted_loss"],
                     d.step(t_d, lr, measure=True)["loss"], out["sigma_oscillation_sq"][0]))
    eig, sigma, predicted, loss, disp = map(np.array, zip(*rows))
    return (eig, np.nan_to_num(sigma), predicted, loss, disp), (t_cf, t_sf, t_d)


@pytest.mark.slow  # full scale (central-momentum-mlp, 300 steps; ~3 min of CPU); quick: benchmarks central-fidelity
def test_momentum_central_flow_tracks_momentum_at_its_edge():
    """EMA momentum β1 = 0.3 at η = 1.0 (edge θ/η = 3.71) on the tanh MLP 64-32-32-4 of central-gd-mlp (400 digits,
    MSE, float64) reaches the edge at step ≈ 20 and oscillates about it to step ≈ 270. The central flow must hold
    η·λ_max at θ within 1% where Σ ≠ 0, end within 0.10 of the discrete run relative to its travel and ≥ 1.5x
    closer than the stable flow, predict momentum's loss averaged over 20 steps within 10% on average over the
    edge phase, and predict the oscillation variance along Σ's top eigenvector within 2x. (Measured: 3e-5,
    0.025 against 0.096, 4.1%, 0.94.)"""
    p = _digits_mlp([64, 32, 32], 400)
    (eig, sigma, predicted, loss, disp), (t_cf, t_sf, t_d) = _track(p, make_rule("momentum", beta1=0.3), 1.0, 300)
    edge = sigma > 0
    assert edge.sum() >= 200 and np.abs(eig[edge] - 2).max() / 2 < 0.01
    travel = (t_d.w - p.w0).norm()
    rel_cf, rel_sf = ((t_d.w - t_cf.w).norm() / travel).item(), ((t_d.w - t_sf.w).norm() / travel).item()
    assert rel_cf <= 0.10 and rel_sf >= 1.5 * rel_cf
    average = np.full(len(loss), np.nan)  # centred 20-step moving average of the discrete loss
    average[10:len(loss) - 9] = np.convolve(loss, np.ones(20) / 20, mode="valid")
    ok = edge & np.isfinite(average)
    assert np.mean(np.abs(predicted[ok] - average[ok]) / average[ok]) <= 0.10
    assert 0.5 <= disp[edge].mean() / sigma[edge].mean() <= 2.0


@pytest.mark.slow  # 300 steps, over 2 min of CPU on one thread
def test_adam_central_flow_holds_its_edge_tracks_adam_and_predicts_the_oscillation():
    """Adam (β1 = 0.9, β2 = 0.99, ε = 1e-3, η = 0.02) on the tanh MLP 32-32-10 (200 digits, MSE, float64)
    reaches its edge η·λ_max(P̃⁻¹H) = 38 at step ≈ 140. Its central flow and its stable flow start, by default,
    after Adam's first ⌈1/(1 − β1)⌉ = 10 steps (``Rule.flow_start``). Over 300 steps the central flow (4 Euler substeps) must
    hold the edge within 2% — λ_max(P̃⁻¹H) at the flow's own state computed here by an independent Lanczos run
    every 20 steps with Σ ≠ 0 —, end within 0.10 of Adam's travel and ≥ 1.5x closer than the stable flow, and
    predict Adam's oscillation along Σ's top eigenvector within 2x (measured: 0.030 against 0.057, 1.01)."""
    p = _digits_mlp([32, 32], 200, classes=None)
    rule, lr = make_rule("adam", beta1=0.9, beta2=0.99, eps=1e-3), 0.02
    cf, sf, d = Central(p, rule), Stable(p, rule), Discrete(p, rule)  # the flows' default start: step 10
    traj, t_sf, t_d = cf.start(p.w0), sf.start(p.w0), d.start(p.w0)
    sigma, osc, edges = [], [], []
    for k in range(300):
        out = cf.step(traj, lr, measure=True)
        sf.step(t_sf, lr, measure=False)
        d.step(t_d, lr, measure=False)
        sigma.append(out.get("sigma_eigs", [0.0])[0])
        osc.append(out.get("sigma_oscillation_sq", [math.nan])[0])
        if k % 20 == 19 and sigma[-1] > 0:
            P = rule.precond(traj.state)
            top = precond_eigenpairs(hessian_operator(p, traj.w), P, traj.w, 1, tol=1e-10).vals[0].item()
            edges.append(lr * top / rule.threshold_coefficient())
    sigma, osc = np.nan_to_num(np.array(sigma)), np.array(osc)
    edge = sigma > 0
    assert edge.sum() >= 120 and len(edges) >= 6
    assert np.abs(np.array(edges) - 1).max() <= 0.02
    assert 0.5 <= osc[edge].mean() / sigma[edge].mean() <= 2.0
    travel = (t_d.w - p.w0).norm()
    rel_cf, rel_sf = ((t_d.w - traj.w).norm() / travel).item(), ((t_d.w - t_sf.w).norm() / travel).item()
    assert rel_cf <= 0.10 and rel_sf >= 1.5 * rel_cf
