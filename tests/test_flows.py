"""Stable and modified flows: closed forms on quadratics, an independent ODE solver, and the orders of GD's
distance to each flow at fixed time below the edge of stability."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import flowsim
from flowsim.models import build_problem
from flowsim.scenario import ScenarioError
from flowsim.solvers import PROCESSES, make_rule

SPECTRUM = [1.0, 3.0, 10.0]


def quadratic(spectrum=SPECTRUM):
    return build_problem({"model": "quadratic", "spectrum": spectrum}, device="cpu")


def run_process(problem, name, lr, steps, rule=("gd", {}), **options):
    """Run process ``name`` for ``steps`` steps; ``rule`` = (name, hyperparameters)."""
    cls = PROCESSES[name]
    process = cls(problem, make_rule(rule[0], **rule[1]), options=cls.Options(**options))
    traj = process.start(problem.w0)
    for _ in range(steps):
        process.step(traj, lr, measure=False)
    return process, traj


@pytest.mark.parametrize("options", [{"method": "rk4", "substeps": 64},
                                     {"method": "dopri5", "rtol": 1e-10, "atol": 1e-12}])
def test_gradient_flow_on_a_quadratic_is_exp_minus_lambda_t(options):
    lam, lr, steps = torch.tensor(SPECTRUM, dtype=torch.float64), 0.1, 20
    _, traj = run_process(quadratic(), "stable", lr, steps, **options)
    exact = torch.exp(-lam * lr * steps)
    assert ((traj.w - exact).abs() / exact).max() <= 1e-6
    assert traj.time == pytest.approx(lr * steps) and traj.step == steps


def test_modified_flow_on_a_quadratic_is_the_flow_of_the_modified_loss():
    # L̃ = L + (η/4)‖∇L‖² = ½ Σ (λ + ηλ²/2) w²: the modified flow decays at rate η(λ + ηλ²/2) per step.
    lam, lr, steps = torch.tensor(SPECTRUM, dtype=torch.float64), 0.1, 20
    _, traj = run_process(quadratic(), "modified", lr, steps, method="dopri5", rtol=1e-10, atol=1e-20)
    exact = torch.exp(-(lam + lr * lam ** 2 / 2) * lr * steps)
    assert ((traj.w - exact).abs() / exact).max() <= 1e-6


def test_rmsprop_stable_flow_matches_an_independent_ode_solver():
    # dw/dt = −η g/(√ν + ε), dν/dt = (1 − β2)(g² − ν), g = λ w, ν(0) = g(0)², solved by scipy's Radau.
    lam = np.array(SPECTRUM)
    lr, beta2, eps, steps = 0.01, 0.9, 1e-8, 15

    def rhs(t, y):
        w, nu = y[:3], y[3:]
        g = lam * w
        return np.concatenate([-lr * g / (np.sqrt(nu) + eps), (1 - beta2) * (g * g - nu)])

    y0 = np.concatenate([np.ones(3), lam ** 2])
    ref = solve_ivp(rhs, (0, steps), y0, method="Radau", rtol=1e-12, atol=1e-14).y[:, -1]
    _, traj = run_process(quadratic(), "stable", lr, steps, rule=("rmsprop", {"beta2": beta2, "eps": eps}),
                          method="dopri5", rtol=1e-11, atol=1e-13)
    assert np.abs(traj.w.numpy() - ref[:3]).max() / np.abs(ref[:3]).max() <= 1e-6
    assert np.abs(traj.state["nu"].numpy() - ref[3:]).max() / np.abs(ref[3:]).max() <= 1e-6

@pytest.mark.parametrize("method, per_substep", [("rk4", 4), ("euler", 1)])
def test_a_stable_step_evaluates_the_gradient_at_its_start_once(method, per_substep):
    """The step's own gradient (its loss and grad_norm) is the field's first evaluation: a unit of 5 fixed
    substeps costs 5·(evaluations per substep) gradients in all, counted at the problem, and each mode of the
    quadratic (w0 = 1) is the integrator's own iterate, R(−hηλ)^(5·steps), R(z) = 1 + z + z²/2 + z³/6 + z⁴/24 for
    rk4 and 1 + z for euler, h = 1/5."""
    problem = quadratic()
    calls = [0]
    loss_and_grad = problem.loss_and_grad

    def counted(w, idx=None):
        calls[0] += 1
        return loss_and_grad(w, idx)
    problem.loss_and_grad = counted
    lr, steps = 0.1, 3
    _, traj = run_process(problem, "stable", lr, steps, method=method, substeps=5)
    assert calls[0] == steps * 5 * per_substep
    z = -0.2 * lr * torch.tensor(SPECTRUM, dtype=torch.float64)
    R = 1 + z + z ** 2 / 2 + z ** 3 / 6 + z ** 4 / 24 if method == "rk4" else 1 + z
    torch.testing.assert_close(traj.w, R ** (5 * steps), rtol=1e-12, atol=0)



def test_substeps_follow_the_effective_sharpness_and_keep_euler_stable():
    # λ_max = 100, η = 0.05: S_eff = ηλ = 5, so max(4, ⌈2·5⌉) = 10 substeps; one Euler substep is GD, which
    # diverges at ηλ = 5 > 2, while the flow with the chosen substeps decays like exp(−ηλ t).
    problem, lr = quadratic([1.0, 100.0]), 0.05
    dense = torch.linalg.eigvalsh(torch.func.hessian(problem.loss)(problem.w0))
    process, traj = run_process(problem, "stable", lr, 5, method="euler")
    assert process.substeps(traj, lr) == max(4, math.ceil(2 * lr * dense.max().item())) == 10
    assert 0 < traj.w[1] < math.exp(-lr * 100 * 5) * 10  # Euler at h·S_eff = 0.5: (1 − 0.5)^50 ≈ 1e-15
    _, gd_like = run_process(problem, "stable", lr, 5, method="euler", substeps=1)
    assert abs(gd_like.w[1]) > 1.0


def test_modified_flow_substeps_account_for_the_modified_curvature():
    problem, lr = quadratic([1.0, 100.0]), 0.05
    process, traj = run_process(problem, "modified", lr, 1, method="rk4")
    s = lr * 100
    assert process.substeps(traj, lr) == math.ceil(2 * s * (1 + s / 2))


def test_rk4_substeps_follow_the_momentum_flows_turning_rate_not_its_sharpness():
    """EMA momentum's stable flow on a quadratic is linear: per eigenvalue λ, d(w, m)/dt = [[0, −η], [cλ, −c]] (w, m),
    c = 1 − β, whose eigenvalues μ = −c/2 ± i√(cηλ − c²/4) turn w and m about each other (|μ| = √(cηλ)). The
    substeps follow that mode, 2|μ|(|μ|/|Re μ|)^{1/4} = 12 here where ⌈2ηλ_max⌉ would be 100, and the flow they
    integrate is the matrix exponential's to 1e-3 of w0 over 20 units past the momentum's edge (ηλ_max = 50 > 38):
    GD's error budget, h|μ| = ½ over the 1/|μ| units its mode lives. Substeps at h|μ| = ½ alone (5) miss it."""
    from scipy.linalg import expm

    spectrum, lr, beta = [1.0, 5.0, 100.0], 0.5, 0.9
    problem, c = quadratic(spectrum), 1 - beta
    blocks = [np.array([[0.0, -lr], [c * lam, -c]]) for lam in spectrum]
    modes = np.concatenate([np.linalg.eigvals(b) for b in blocks])
    mode = modes[np.argmax(np.abs(modes))]
    assert abs(mode) == pytest.approx(math.sqrt(c * lr * 100.0), rel=1e-12) and mode.real == pytest.approx(-c / 2)
    expected = math.ceil(2 * abs(mode) * (abs(mode) / abs(mode.real)) ** 0.25)
    w0, g0 = problem.w0.numpy(), np.asarray(spectrum) * problem.w0.numpy()
    m0 = make_rule("momentum", beta1=beta).init(problem.w0, torch.as_tensor(g0))["m"].numpy()
    exact = np.array([expm(20 * b) @ np.array([w, m]) for b, w, m in zip(blocks, w0, m0)])
    process, traj = run_process(problem, "stable", lr, 20, rule=("momentum", {"beta1": beta}))
    assert process.substeps(traj, lr) == expected == 12
    assert np.abs(traj.w.numpy() - exact[:, 0]).max() <= 1e-3 * np.abs(w0).max()
    _, coarse = run_process(problem, "stable", lr, 20, rule=("momentum", {"beta1": beta}),
                            substeps=math.ceil(2 * abs(mode)))
    assert np.abs(coarse.w.numpy() - exact[:, 0]).max() > 1e-3 * np.abs(w0).max()


def test_the_dominant_mode_of_adams_flow_is_the_dense_jacobians():
    """Adam's stable flow on an MLP (the ARPACK path, 2 × 97 unknowns in w and m, ν held): the dominant mode is
    the eigenvalue of largest modulus of the dense Jacobian of the same field, taken independently by jacfwd, to
    ARPACK's 1e-2; it is complex, Re μ = −(1 − β1)/2."""
    problem = small_mlp()
    rule = make_rule("adam", beta1=0.9, beta2=0.99)
    process, traj = run_process(problem, "stable", 0.05, 12, rule=("adam", {"beta1": 0.9, "beta2": 0.99}))
    mode = process.dominant_mode(traj, 0.05)
    w, m, nu, t = traj.w, traj.state["m"], traj.state["v"], traj.state["t"]
    n = w.numel()

    def field(z):
        state = {"m": z[n:], "v": nu, "t": t}
        g = torch.func.grad(problem.loss)(z[:n])
        return torch.cat([rule.step_from(g, state, 0.05, z[:n]), rule.state_rate(g, state)["m"]])

    vals = np.linalg.eigvals(torch.func.jacfwd(field)(torch.cat([w, m])).numpy())
    top = vals[np.argmax(np.abs(vals))]
    assert 2 * n >= 64 and abs(mode) == pytest.approx(np.abs(top), rel=1e-2)
    assert abs(top.imag) > 10 * abs(top.real) and top.real == pytest.approx(-0.05, rel=1e-2)
    assert abs(mode.imag) == pytest.approx(abs(top.imag), rel=1e-2)


def test_a_warm_dominant_mode_is_one_rayleigh_ritz_on_the_last_span_and_arnoldi_where_that_fails():
    """J = Q B Qᵀ (Q a random orthogonal 200 × 200, B block-diagonal: the pair −0.1 ± 5i, then pairs and real
    values of modulus ≤ 3; J is normal, so a Ritz pair with residual r is within r of an eigenvalue). Cold, ARPACK
    finds −0.1 ± 5i. After J moves by 1e-3 (relative), the last span (2 columns) gives the new dominant pair by
    Rayleigh–Ritz in 2 products, within ARPACK's 1e-2 of the dense eigenvalues; a random span fails the residual
    test and Arnoldi finishes. A real dominant eigenvalue keeps a one-column span: 1 product. Products that are
    not finite give an infinite μ."""
    from flowsim.solvers.flows import dominant_eigenvalue
    rng = np.random.default_rng(0)
    n = 200

    def normal(top):
        blocks = [top] + [np.array([[a, -b], [b, a]]) for a, b in rng.uniform(-2, 2, (n // 2 - 1, 2)) * 0.7]
        B = np.zeros((n, n))
        for i, block in enumerate(blocks):
            B[2 * i:2 * i + 2, 2 * i:2 * i + 2] = block
        Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
        return Q @ B @ Q.T

    def counted(J):
        calls = [0]

        def product(v):
            calls[0] += 1
            return torch.as_tensor(J) @ v
        return product, calls

    y = torch.zeros(n, dtype=torch.float64)
    J = normal(np.array([[-0.1, -5.0], [5.0, -0.1]]))
    product, _ = counted(J)
    mode, span = dominant_eigenvalue(product, y)
    assert abs(abs(mode) - abs(complex(-0.1, 5))) <= 1e-2 * 5 and span.shape == (n, 2)
    E = rng.standard_normal((n, n))
    moved = J + 1e-3 * np.linalg.norm(J, 2) * E / np.linalg.norm(E, 2)
    vals = np.linalg.eigvals(moved)
    top = vals[np.argmax(np.abs(vals))]
    product, calls = counted(moved)
    warm, _ = dominant_eigenvalue(product, y, span)
    assert calls[0] == 2 and abs(warm - top) <= 1e-2 * abs(top) and warm.imag != 0
    product, calls = counted(moved)
    cold, _ = dominant_eigenvalue(product, y, torch.as_tensor(rng.standard_normal((n, 2))))
    assert calls[0] > 2 and abs(abs(cold) - abs(top)) <= 1e-2 * abs(top)
    real = normal(np.diag([-6.0, 0.5]))
    product, _ = counted(real)
    mode, span = dominant_eigenvalue(product, y)
    product, calls = counted(real)
    again, _ = dominant_eigenvalue(product, y, span)
    assert span.shape == (n, 1) and calls[0] == 1 and again == pytest.approx(-6.0, rel=1e-2)
    assert dominant_eigenvalue(lambda v: v * math.nan, y, span)[0] == math.inf  # a product that overflowed


def test_the_stiffness_of_a_sign_step_comes_from_its_derivative_not_its_differences():
    """Lion's stable flow steps along sign(c) (``Rule.smooth_step`` False), and along the flow entries of c cross 0.
    At a point where one is 1e-12 its dominant mode is the dense Jacobian's (jacfwd, where sign' = 0) to 1e-2, so
    its substeps stay at the floor of 4; a difference of the field would count that sign's flip (|μ| of order
    1/ε)."""
    problem = small_mlp()
    rule = make_rule("lion")
    process, traj = run_process(problem, "stable", 0.01, 3, rule=("lion", {}))
    traj.state["interpolation"][0] = 1e-12
    mode = process.dominant_mode(traj, 0.01)
    w, state = traj.w, traj.state
    n = w.numel()

    def field(z):
        s = {"interpolation": z[n:2 * n], "m": z[2 * n:]}
        g = torch.func.grad(problem.loss)(z[:n])
        rate = rule.state_rate(g, s)
        return torch.cat([rule.step_from(g, s, 0.01, z[:n]), rate["interpolation"], rate["m"]])

    vals = np.linalg.eigvals(torch.func.jacfwd(field)(torch.cat([w, state["interpolation"], state["m"]])).numpy())
    assert abs(mode) == pytest.approx(np.abs(vals).max(), rel=1e-2) and abs(mode) < 2
    assert process.substeps(traj, 0.01) == 4


def small_mlp():
    return build_problem({"model": "mlp", "widths": [8], "activation": "tanh",
                          "dataset": {"name": "teacher_student", "dim": 4}, "n_train": 32}, device="cpu")


def test_gd_distance_to_gradient_flow_is_first_order_and_to_modified_flow_second_order():
    # At fixed gradient-flow time T = 4 and below the edge (η S ≤ 0.4 < 2), halving η halves ‖w_GD − w_GF‖
    # (order 1) and quarters ‖w_GD − w_MF‖ (order 2).
    problem, T = small_mlp(), 4.0
    sharpness = torch.linalg.eigvalsh(torch.func.hessian(problem.loss)(problem.w0)).max().item()
    distances = {}
    for lr in (0.2, 0.1):
        assert lr * sharpness < 0.5
        steps = round(T / lr)
        _, gd = run_process(problem, "discrete", lr, steps)
        _, gf = run_process(problem, "stable", lr, steps, method="rk4", substeps=8)
        _, mf = run_process(problem, "modified", lr, steps, method="rk4", substeps=8)
        distances[lr] = ((gd.w - gf.w).norm().item(), (gd.w - mf.w).norm().item())
    first = distances[0.2][0] / distances[0.1][0]
    second = distances[0.2][1] / distances[0.1][1]
    assert 2 * 0.8 <= first <= 2 * 1.2, first
    assert 4 * 0.75 <= second <= 4 * 1.25, second


def test_flow_runs_in_a_scenario_with_state_and_records_losses():
    ds = flowsim.run({"name": "f", "device": "cpu", "problem": {"model": "quadratic", "spectrum": SPECTRUM},
                      "steps": 4, "record": {"projection_dim": 0, "keep_weights": 2},
                      "runs": {"flow": {"process": "stable", "lr": 0.1, "method": "dopri5", "rtol": 1e-10,
                                        "atol": 1e-12},
                               "rms": {"process": "stable", "rule": "rmsprop", "lr": 0.01},
                               "adam": {"process": "stable", "rule": "adam", "lr": 0.01, "method": "dopri5"}}},
                     progress=False)
    lam = np.array(SPECTRUM)
    exact = 0.5 * (lam * np.exp(-2 * lam * 0.1 * np.arange(5)[:, None])).sum(1)
    np.testing.assert_allclose(ds.loss.sel(run="flow").values, exact, rtol=1e-8)
    np.testing.assert_allclose(ds.w.sel(run="flow", step=4).values, np.exp(-lam * 0.4), rtol=1e-8)
    assert np.isnan(ds.w.sel(run="flow", step=1).values).all()
    for run in ("rms", "adam"):
        assert bool((ds.loss.sel(run=run).diff("step") < 0).all())


@pytest.mark.parametrize("extra, key", [({"method": "midpoint"}, "runs.flow.method"),
                                        ({"method": "dopri5", "substeps": 8}, "runs.flow.substeps"),
                                        ({"substeps": 0}, "runs.flow.substeps")])
def test_flow_options_are_checked_and_errors_name_the_key(extra, key):
    with pytest.raises(ScenarioError, match=f"^{key}: "):
        flowsim.load_scenario({"problem": {"model": "quadratic", "spectrum": [1.0]}, "steps": 1,
                               "runs": {"flow": {"process": "stable", "lr": 0.1, **extra}}})


def test_bundled_flow_and_sde_scenarios_validate():
    from flowsim.scenario import bundled as bundled_scenarios
    processes = {name: {run.process for run in flowsim.load_scenario(bundled_scenarios()[name]).runs.values()}
                 for name in ("flows-mlp-eos", "sde-linreg")}
    assert processes == {"flows-mlp-eos": {"discrete", "stable", "modified"}, "sde-linreg": {"discrete", "sde"}}


def test_a_flow_whose_state_turns_non_finite_records_the_divergence():
    """The modified flow of Adam asked to start at w0 (``discrete_start: 0``) starts from ν = 0, where λ_max(P̃⁻¹H) is ≈ 1e10: the capped substeps cannot hold
    it, the state is NaN after step 0, and the next step's substep count (from a NaN S_eff) takes the cap instead
    of raising, so the run ends as diverged at step 1."""
    doc = {"problem": {"model": "mlp", "widths": [3], "dataset": "digits", "classes": [0, 1], "n_train": 12},
           "steps": 2, "runs": {"a": {"rule": "adam", "lr": 0.01, "process": "modified", "discrete_start": 0}},
           "record": {"projection_dim": 0}}
    ds = flowsim.run(doc, progress=False)
    assert bool(ds.diverged.sel(run="a")) and int(ds.diverged_at.sel(run="a")) == 1
