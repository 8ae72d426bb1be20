"""The central flow: its limits (below the edge = gradient flow; one critical direction = projected gradient
flow), its third-derivative terms, and its fidelity to the discrete run at the edge of stability."""
import math

import numpy as np
import pytest
import torch

from flowsim.problem import Problem
from flowsim.solvers.central import Central, CentralOptions, LossGraph, sigma_eigenpairs
from flowsim.solvers.processes import Schedule
from flowsim.solvers.rules import make_rule


def central(problem, rule="gd", lr=0.5, **options):
    return Central(problem, make_rule(rule), Schedule(lr), options=CentralOptions(**options))


def test_third_derivatives_match_finite_differences_of_hvps(tiny_mlp_problem):
    """∇_w(uᵢᵀH(w)uⱼ) = ∂_{uᵢ}(H(w)uⱼ) by symmetry of the third derivative; central differences, ε = 1e-4."""
    p = tiny_mlp_problem
    gen = torch.Generator().manual_seed(0)
    U = torch.randn(p.n_params, 2, generator=gen, dtype=torch.float64)
    U = U / U.norm(dim=0)
    T = LossGraph(p, p.w0).third_derivatives(U)
    eps = 1e-4
    for i in range(2):
        for j in range(2):
            fd = (p.hvp(p.w0 + eps * U[:, i], U[:, j]) - p.hvp(p.w0 - eps * U[:, i], U[:, j])) / (2 * eps)
            assert float((T[i, j] - fd).norm() / fd.norm()) < 1e-6


def test_below_the_edge_the_central_flow_is_euler_gradient_flow():
    """L = ½ Σ λᵢθᵢ² with ηλ_max = 1.8 < 1.95: no critical direction, so each of the 4 Euler substeps per
    step multiplies θᵢ by (1 − ηλᵢ/4) exactly (Heun: by 1 − h + h²/2, h = ηλᵢ/4)."""
    lam = torch.tensor([3.0, 1.0, 0.2], dtype=torch.float64)
    theta0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    p = Problem.from_function(lambda w: 0.5 * (lam * w * w).sum(), theta0, device="cpu")
    for method, factor in (("euler", lambda h: 1 - h), ("heun", lambda h: 1 - h + h * h / 2)):
        process = central(p, lr=0.6, method=method, shadow=False)
        traj = process.start(p.w0)
        for _ in range(10):
            out = process.step(traj, measure=True)
            assert out["sigma_eigs"][0] != out["sigma_eigs"][0]  # NaN: Σ has no direction
            assert out["predicted_loss"] == out["loss"]
        expected = theta0 * factor(0.6 * lam / 4) ** 40
        assert torch.allclose(traj.w, expected, rtol=1e-12, atol=0)


def test_one_critical_direction_is_the_projected_gradient_flow():
    """L = ½ e^{y+z} x² − y − 2z at x = 0: S = e^{y+z} along e_x, ∇S = S (0, 1, 1), g = (0, −1, −2), and
    gradient flow sharpens (⟨−g, ∇S⟩ > 0). At η = 2/S the central flow is −η Π⊥_{∇S} g = −η (0, ½, −½) and
    Σ's variance is σ² = 2⟨−g, ∇S⟩/‖∇S‖² = 3/S (Damian et al.'s self-stabilization)."""
    def loss(w):
        x, y, z = w
        return 0.5 * torch.exp(y + z) * x * x - y - 2 * z
    w = torch.tensor([0.0, 0.1, 0.1], dtype=torch.float64)
    p = Problem.from_function(loss, w, device="cpu")
    S = math.exp(0.2)
    lr = 2.0 / S
    for dt in (0.25, 0.05):
        f = central(p, lr=lr, eig_tol=1e-13, shadow=False).field(w, {}, lr, dt)
        assert f["X"].shape == (1, 1)
        expected = -lr * torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
        assert float((f["dw"] - expected).norm() / expected.norm()) < 1e-8
        s, E = sigma_eigenpairs(f["U"], f["X"])
        assert s.item() == pytest.approx(3.0 / S, rel=1e-8)
        assert abs(E[0, 0].item()) == pytest.approx(1.0, rel=1e-12)


def test_rules_without_a_derivation_are_rejected(tiny_mlp_problem):
    with pytest.raises(ValueError, match="^rule: the central flow is derived for gd, scalar_rmsprop, rmsprop"):
        Central(tiny_mlp_problem, make_rule("momentum"), Schedule(0.1))
    with pytest.raises(ValueError, match="^batch_size:"):
        Central(tiny_mlp_problem, make_rule("gd"), Schedule(0.1), batch_size=10)
