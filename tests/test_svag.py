"""SVAG (``svag: l`` on the discrete process): l = 1 is the plain run to the bit, the vmapped ensemble equals the
single runs, and on linear regression the SVAG ensemble's mean loss approaches the SDE's exact mean as l grows;
the rules' scaling rules and SVAG's errors."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import flowsim
from flowsim.models import build_problem
from flowsim.scenario import ScenarioError
from flowsim.sde_check import discrete_ensemble, does_the_sde_hold, square_root_slowdown
from flowsim.sde_check import plot as plot_sde_check
from flowsim.solvers import make_rule
from flowsim.solvers.batched import BatchedDiscrete
from flowsim.solvers.processes import DiscreteOptions
from flowsim.solvers.sde import ensemble


def linear_regression(n=64):
    return build_problem({"model": "mlp", "widths": [], "n_train": n,
                          "dataset": {"name": "teacher_student", "dim": 4, "outputs": 1, "noise": 0.5}},
                         device="cpu")


def small_mlp():
    return build_problem({"model": "mlp", "widths": [8], "activation": "tanh", "n_train": 32,
                          "dataset": {"name": "teacher_student", "dim": 3, "outputs": 1}}, device="cpu")


@pytest.mark.parametrize("rule", ["gd", "adam"])
def test_svag_with_l_1_is_the_plain_discrete_run_to_the_bit(rule):
    problem = small_mlp()
    plain = flowsim.simulate(problem, rule, "discrete", 0.02, 12, batch_size=4, seed=2, options={"sampling": "iid"},
                             record={"keep_weights": 1})
    svag = flowsim.simulate(problem, rule, "discrete", 0.02, 12, batch_size=4, seed=2,
                            options={"sampling": "iid", "svag": 1}, record={"keep_weights": 1})
    assert np.array_equal(plain.w.values, svag.w.values) and np.array_equal(plain.loss.values, svag.loss.values)


@pytest.mark.parametrize("rule", ["momentum", "rmsprop"])
def test_a_vmapped_svag_ensemble_is_its_single_runs_and_keeps_the_sde_clock(rule):
    problem, l, steps = small_mlp(), 4, 5
    engine = BatchedDiscrete(problem, make_rule(rule), [3, 7], 4, DiscreteOptions(svag=l))
    traj = engine.start(problem.w0)
    for _ in range(steps):
        engine.step(traj, [0.05, 0.05], measure=False)
    for b, seed in enumerate([3, 7]):
        ds = flowsim.simulate(problem, rule, "discrete", 0.05, steps, batch_size=4, seed=seed, options={"svag": l},
                              record={"keep_weights": 1})
        np.testing.assert_allclose(ds.w.values[0, -1], traj.w[b].numpy(), rtol=1e-12, atol=1e-14)
        assert ds.time.values[0, -1] == pytest.approx(steps * 0.05)  # one recorded step = one unit at η


def exact_sde_mean_loss(problem, lr, B, T):
    """E L(w(t)), t = 0 … T, of SGD's SDE on linear regression, dw = −η∇L dt + η √(cΣ(w)/B) dW, from the closed
    linear ODE of its first and second moments (Σ(w) is quadratic in w), solved by scipy."""
    X = np.c_[problem.X.numpy(), np.ones(problem.n_examples)]  # weights, then the bias
    y = problem.Y.numpy()[:, 0]
    n, P = X.shape
    H, b, c = X.T @ X / n, X.T @ y / n, (n - B) / (n - 1) / B

    def moments(t, z):
        m, S = z[:P], z[P:].reshape(P, P)
        r2 = np.einsum("ip,pq,iq->i", X, S, X) - 2 * y * (X @ m) + y ** 2  # E rᵢ²
        Egg = H @ S @ H - np.outer(H @ m, b) - np.outer(b, H @ m) + np.outer(b, b)
        Sigma = (X.T * r2) @ X / n - Egg
        dS = -lr * (H @ S - np.outer(b, m) + S @ H - np.outer(m, b)) + lr ** 2 * c * Sigma
        return np.r_[-lr * (H @ m - b), dS.ravel()]

    w0 = problem.w0.numpy()
    sol = solve_ivp(moments, (0, T), np.r_[w0, np.outer(w0, w0).ravel()], rtol=1e-11, atol=1e-13,
                    t_eval=np.arange(T + 1))
    return np.array([0.5 * np.trace(H @ z[P:].reshape(P, P)) - b @ z[:P] + y @ y / (2 * n) for z in sol.y.T])


def test_svag_approaches_the_sdes_exact_mean_loss_about_like_one_over_l():
    # Linear regression, GD at η = 0.5 (ηλ_max = 0.64), B = 4, 6 units of time, 4000 runs per l. The SDE's mean
    # loss comes from its moment ODE; the error of SVAG's mean, averaged over the units, falls like ~1/l (measured:
    # 0.040, 0.015, 0.0055, 0.0033 at l = 1, 2, 4, 8, standard error ≈ 0.0015 a unit).
    problem, lr, B, T, N = linear_regression(), 0.5, 4, 6, 4000
    exact = exact_sde_mean_loss(problem, lr, B, T)
    errors, ses = {}, {}
    for l in (1, 2, 4, 8):
        loss = discrete_ensemble(problem, make_rule("gd"), lr, T, B, N, svag=l)["loss"][1:]
        errors[l] = np.abs(loss.mean(1) - exact[1:]).mean()
        ses[l] = (loss.std(1) / math.sqrt(N)).mean()
    assert errors[1] > 10 * ses[1], errors
    for l in (2, 4, 8):
        assert errors[l] <= 1.5 * errors[1] / l + 3 * ses[l], (l, errors, ses)
    assert errors[1] > errors[2] > errors[4], errors
    # the SDE itself, integrated by flowsim, has that mean too
    W = ensemble(problem, make_rule("gd"), lr, T, N, seed=3, batch_size=B, options={"substeps": 8})
    sde_loss = torch.func.vmap(problem.loss)(W).numpy()
    assert abs(sde_loss.mean() - exact[-1]) <= 3 * sde_loss.std() / math.sqrt(N) + 0.01 * errors[1]


@pytest.mark.parametrize("name, hyper, kappa, expected, factor", [
    ("gd", {}, 4.0, {}, 4.0),
    ("momentum", {"beta1": 0.9}, 0.5, {"beta1": 0.95}, 0.5),
    ("momentum", {"beta1": 0.9, "heavy_ball": True}, 0.5, {"beta1": 0.95}, 0.25),
    ("rmsprop", {"beta2": 0.99}, 4.0, {"beta2": 0.96, "eps": 0.5e-8}, 2.0),
    ("adam", {"beta1": 0.9, "beta2": 0.999}, 0.25, {"beta1": 0.975, "beta2": 0.99975, "eps": 2e-8}, 0.5),
])
def test_each_rule_scales_by_its_own_rule(name, hyper, kappa, expected, factor):
    # linear rule for GD and EMA momentum (η × κ, 1 − β × κ), heavy ball as the EMA with η/(1 − β) (η × κ²),
    # the square-root rule for the ν rules (η × √κ, 1 − β × κ, ε / √κ)
    rule, f = make_rule(name, **hyper).scaled(kappa)
    assert f == pytest.approx(factor)
    for key, value in expected.items():
        assert getattr(rule, key) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_the_square_root_slowdown_is_the_scaled_rules_mean_step_over_every_batch(name):
    """At w, each κ's rule (``Rule.scaled``, ε = 0) steps from ν = E[g_B²] over every batch of κB distinct examples
    of 6, enumerated, and m = g; its loss rate on the clock step × κ, −gᵀΔw/κ, over κ = 1's is the slowdown. An
    independent check of the closed form, its finite-population factor included; with identical examples (no
    noise) it is 1/√κ exactly."""
    problem = build_problem({"model": "mlp", "widths": [3], "activation": "tanh", "n_train": 6,
                             "dataset": {"name": "teacher_student", "dim": 2, "outputs": 1, "noise": 0.5}},
                            device="cpu")
    w = problem.w0 + 0.3 * torch.randn(problem.n_params, generator=torch.Generator().manual_seed(0),
                                       dtype=problem.dtype)
    g = problem.loss_and_grad(w)[1]

    def rate(kappa):
        rule, factor = make_rule(name, eps=0.0).scaled(kappa)
        batches = itertools.combinations(range(problem.n_examples), 2 * kappa)
        nu = torch.stack([problem.loss_and_grad(w, torch.tensor(b))[1].pow(2) for b in batches]).mean(0)
        state = {"m": g, "v": nu, "t": torch.tensor(1e6, dtype=w.dtype)} if name == "adam" else {"nu": nu}
        return -(g * rule.step_from(g, state, 0.01 * factor, w)).sum() / kappa

    measured = square_root_slowdown(problem, w, batch_size=2, kappas=(2, 3))
    for kappa in (2, 3):
        assert measured[kappa] == pytest.approx(float(rate(kappa) / rate(1)), rel=1e-10)
    assert 1 / math.sqrt(3) < measured[3] < measured[2] < 1
    identical = build_problem({"model": "mlp", "widths": [3], "activation": "tanh", "n_train": 1,
                               "dataset": {"name": "teacher_student", "dim": 2, "outputs": 1}}, device="cpu")
    assert square_root_slowdown(identical, identical.w0, 1, (4,))[4] == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(ValueError, match="batch_size and kappas: at least 1"):
        square_root_slowdown(problem, w, 0)


def test_svag_errors_name_the_key():
    problem = small_mlp()
    with pytest.raises(ScenarioError, match="^svag: "):
        flowsim.simulate(problem, "gd", "discrete", 0.1, 2, options={"svag": 2})
    with pytest.raises(ScenarioError, match="^sampling: "):
        flowsim.simulate(problem, "gd", "discrete", 0.1, 2, batch_size=4, options={"svag": 2, "sampling": "epoch"})
    with pytest.raises(ValueError, match="^beta1: 0.9 scaled by κ = 16 "):  # 1 − 16·0.1 < 0
        make_rule("adam").scaled(16.0)
    with pytest.raises(ScenarioError, match="^svag: "):
        flowsim.simulate(problem, "gd", "discrete", 0.1, 2, batch_size=4, options={"svag": 0})


@pytest.mark.parametrize("name", ["rmsprop", "adam"])
def test_an_svag_step_amplifies_the_noise_of_what_is_averaged_linearly_and_feeds_nu_a_plain_batch(name):
    # One SVAG step with l = 4, recomputed by hand from the two batches of each of its 4 steps: m takes
    # g_s = a·g1 + (1 − a)·g2, ν takes g1², at 1 − β / 4 and η / 4, so ν follows g² + cΣ/B as in the SDE
    problem, l, lr, B = small_mlp(), 4, 0.05, 4
    ds = flowsim.simulate(problem, name, "discrete", lr, 1, batch_size=B, seed=5, options={"svag": l},
                          record={"keep_weights": 1})
    process = flowsim.solvers.Discrete(problem, make_rule(name), 5, B, DiscreteOptions(svag=l))
    batches = process.sampler.draws(0, 2 * l)
    base = make_rule(name)
    b2 = 1 - (1 - base.beta2) / l
    b1 = 1 - (1 - base.beta1) / l if name == "adam" else None
    a = (1 + math.sqrt(2 * l - 1)) / 2
    w = problem.w0.clone()
    m = v = None
    for j in range(l):
        g1, g2 = problem.grad(w, batches[2 * j]), problem.grad(w, batches[2 * j + 1])
        gs = a * g1 + (1 - a) * g2
        if name == "rmsprop":
            v = g1 ** 2 if v is None else v
            v = b2 * v + (1 - b2) * g1 ** 2
            w = w - lr / l * gs / (v.sqrt() + base.eps)
        else:
            m = torch.zeros_like(w) if m is None else m
            v = torch.zeros_like(w) if v is None else v
            m, v, t = b1 * m + (1 - b1) * gs, b2 * v + (1 - b2) * g1 ** 2, j + 1
            w = w - lr / l * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + base.eps)
    np.testing.assert_allclose(ds.w.values[0, -1], w.numpy(), rtol=1e-12, atol=1e-15)


def test_the_check_takes_a_rule_by_name_and_refuses_what_cannot_run_before_running():
    """A name with its hyperparameters is the rule object (it was an AttributeError: 'str' object has no
    attribute 'init'); a rule without an SDE, a batch larger than the data or steps that end within the rule's
    discrete start are one line, not minutes later."""
    problem = linear_regression()
    by_name = does_the_sde_hold(problem, "adam", 0.01, 8, 8, seeds=2, paths=2, ls=(1, 2), beta1=0.8)
    by_object = does_the_sde_hold(problem, make_rule("adam", beta1=0.8), 0.01, 8, 8, seeds=2, paths=2, ls=(1, 2))
    np.testing.assert_array_equal(by_name["sde"], by_object["sde"])
    for args, kw, message in ((("lion", 0.01, 3, 8), {}, r"^rule: lion has no SDE here"),
                              (("gd", 0.1, 3, 10 ** 4), {}, r"^batch_size: 10000 is larger than the data"),
                              (("adam", 0.01, 3, 8), {"bta1": 0.5}, r"^bta1: not a hyperparameter of rule 'adam'"),
                              ((make_rule("gd"), 0.1, 3, 8), {"beta1": 0.5},
                               r"^beta1: give the rule's hyperparameters in its object \(GD\(...\)\) or with"),
                              # Adam's SDE begins after its first 5 steps at beta1 = 0.8 (it was a numpy error)
                              (("adam", 0.01, 5, 8), {"beta1": 0.8}, r"^steps: 5 leave no step for the SDE after the "
                                                                     r"rule's first 5 \(its discrete start")):
        with pytest.raises(ValueError, match=message):
            does_the_sde_hold(problem, *args, seeds=2, paths=2, **kw)


def test_the_verdict_says_the_sde_holds_for_sgd_at_small_steps_and_not_past_the_edge():
    # Linear regression, B = 8, 20 steps, 64 seeds and paths: at η = 0.1 (ηλ_max = 0.13) SVAG barely moves
    # with l and the SDE sits on it (measured: 2.0 % and 0.6 %, ± 1.3 %); at η = 2.5 (ηλ_max = 3.2) the discrete
    # run diverges exponentially and SVAG at l = 8 does not.
    problem = linear_regression()
    small = does_the_sde_hold(problem, make_rule("gd"), 0.1, 20, 8, seeds=64, paths=64)
    assert small["holds"] is True and small["verdict"].startswith("the SDE holds here: SVAG l = 8 is ")
    assert small["gaps"]["svag"] < 0.1 and small["gaps"]["sde"] < 0.1
    assert set(small["svag"]) == {1, 2, 4, 8} and small["sde"].shape == (21, 64)
    large = does_the_sde_hold(problem, "gd", 2.5, 20, 8, seeds=64, paths=64)  # a name, as simulate takes
    assert large["holds"] is False and large["verdict"].startswith("the SDE does not hold here")
    ax = plot_sde_check(small)
    assert len(ax.lines) == 4 + 1 and ax.get_title() == small["verdict"]
