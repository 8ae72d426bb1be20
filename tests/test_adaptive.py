"""The adaptive process: η·S held at c·θ (exact on a quadratic, measured by the curvature probe on an MLP, for GD
and Adam), the divergence guard, exact resume and one-line errors for bad options."""
import math

import numpy as np
import pytest
import torch

import flowsim
from flowsim.models.landscapes import QuadraticConfig
from flowsim.scenario import ScenarioError
from flowsim.solvers import PROCESSES, Schedule, make_rule

SPECTRUM = [4.0, 1.0, 0.25]


def quadratic_run(steps, lr=100.0, **options):
    """Adaptive GD on ½ Σ λ_i w_i² from w0 = 1: returns (η_k list, loss_k list, final w)."""
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    cls = PROCESSES["adaptive"]
    process = cls(problem, make_rule("gd"), Schedule(lr), options=cls.Options(**options))
    traj = process.start(problem.w0)
    etas, losses = [], []
    for _ in range(steps):
        out = process.step(traj, False)
        etas.append(out["step_size"])
        losses.append(out["step_loss"])
    return np.array(etas), np.array(losses), traj.w


@pytest.mark.parametrize("c", [0.5, 0.9, 1.0])
def test_quadratic_step_size_is_c_times_two_over_lambda_max_and_matches_gd_at_that_step(c):
    etas, _, w = quadratic_run(40, c=c)
    np.testing.assert_allclose(etas * SPECTRUM[0], 2 * c, rtol=1e-6)
    lr = 2 * c / SPECTRUM[0]
    expected = torch.tensor([(1 - lr * lam) ** 40 for lam in SPECTRUM], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-12)


def test_step_size_is_capped_by_lr():
    etas, _, _ = quadratic_run(5, lr=0.1, c=0.9)
    assert (etas == 0.1).all()


def test_eta_grows_by_at_most_growth_per_estimate_when_the_sharpness_collapses():
    """Scripted sharpness estimates S = 4, 0.04, −1, 1: η = 2/4 = 0.5 at the first, then ×2 per re-estimate
    instead of jumping to 2/0.04 = 50 or, for S ≤ 0, to lr; back to 2/S = 2 once S = 1. (The true spectrum,
    0.1, keeps every step stable, so the guard never fires.)"""
    problem = QuadraticConfig(spectrum=[0.1]).build(device="cpu")
    cls = PROCESSES["adaptive"]
    process = cls(problem, make_rule("gd"), Schedule(100.0), options=cls.Options(every=1))
    estimates = iter([4.0, 0.04, -1.0, 1.0, 1.0])
    process.sharpness = lambda traj, *_: next(estimates)
    traj = process.start(problem.w0)
    assert [process.step(traj, False)["step_size"] for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("early, expected", [(False, [0, 10, 20]), (True, [0, 1, 2, 4, 8, 10, 20])])
def test_estimates_are_made_every_every_steps_and_with_early_also_at_powers_of_two(early, expected):
    """The sharpness is estimated at step 0 and after the steps that reach w_k, k a multiple of ``every`` —
    with ``early`` also at k = 1, 2, 4, 8 < every, where the rule state and the curvature change fastest."""
    problem = QuadraticConfig(spectrum=[0.1]).build(device="cpu")
    cls = PROCESSES["adaptive"]
    process = cls(problem, make_rule("gd"), Schedule(100.0), options=cls.Options(every=10, early=early))
    seen = []
    process.sharpness = lambda traj, *_: (seen.append(traj.step), 1.0)[1]
    traj = process.start(problem.w0)
    for _ in range(25):
        process.step(traj, False)
    assert seen == expected


MLP = {"model": "mlp", "widths": [32, 32], "activation": "tanh", "dataset": "digits", "classes": [0, 1, 2, 3],
       "n_train": 200, "loss": "mse"}


def test_mlp_holds_eta_times_preconditioned_sharpness_at_its_target_for_gd_and_adam():
    """The probe measures S every 5 steps, half of them between the controller's estimates (every 10): the
    median of η_t·S_t over the last half is within ±10 % of c·θ (θ = 2 for GD, 38 for Adam with β1 = 0.9)."""
    doc = {"name": "adaptive-test", "seed": 0, "device": "cpu", "dtype": "float64", "problem": MLP, "steps": 300,
           "runs": {"gd-0.9": {"process": "adaptive", "rule": "gd", "lr": 100.0, "c": 0.9},
                    "gd-1.0": {"process": "adaptive", "rule": "gd", "lr": 100.0, "c": 1.0},
                    "adam-0.9": {"process": "adaptive", "rule": "adam", "lr": 100.0, "c": 0.9}},
           "record": {"every": 1, "projection_dim": 0, "curvature_every": 5, "precond": True}}
    ds = flowsim.run(doc, progress=False)
    for run, target in [("gd-0.9", 1.8), ("gd-1.0", 2.0), ("adam-0.9", 0.9 * 38)]:
        d = ds.sel(run=run)
        assert not bool(d.diverged)
        product = (d.step_size * d.precond_sharpness).dropna("step").values
        median = np.median(product[len(product) // 2:])
        assert abs(median / target - 1) < 0.10, (run, median)
        theta = 38.0 if run.startswith("adam") else 2.0
        np.testing.assert_allclose((d.step_size * d.threshold).dropna("step").values, theta, rtol=1e-12)
        assert float(d.loss[-1]) < 0.1 * float(d.loss[0])


@pytest.mark.parametrize("ratchet", [False, True])
def test_guard_recovers_from_a_forced_loss_spike(ratchet):
    """c_start = 3 forces η0·λ_max = 6 (unstable: the top mode grows 25× in loss): the guard shrinks the next
    step to η·λ_max = 0.9, the run converges, and η·λ_max is back at 2c = 1.8 after the recoveries."""
    etas, losses, w = quadratic_run(80, c=0.9, c_start=3.0, every=10, ratchet=ratchet)
    products = etas * SPECTRUM[0]
    assert products[0] == pytest.approx(6.0) and products[1] == pytest.approx(0.9)
    assert products[-1] == pytest.approx(1.8)
    assert losses.max() < 25 * losses[0]
    factors = np.prod([(1 - etas * lam) ** 2 for lam in SPECTRUM], axis=1)
    assert 0.5 * np.dot(SPECTRUM, factors) == pytest.approx(0.5 * np.dot(SPECTRUM, w.numpy() ** 2), rel=1e-9)
    assert losses[-1] < 1e-6 * losses[0]


def test_without_the_guard_the_forced_spike_grows_until_the_next_estimate():
    _, losses, _ = quadratic_run(12, c=0.9, c_start=3.0, every=10, guard=1e300)
    assert losses[9] > 1e12 * losses[0]


@pytest.mark.parametrize("rule, batch_size, options", [
    ("adam", 16, {"noise": 0.0}), ("adam", 16, {"noise": 0.05}), ("adam", 16, {"curvature_batch": True}),
    ("adam", 16, {"curvature_batch": True, "hvp": "difference"}), ("adam", 16, {"coherence": True}),
    ("gd", None, {"flow": {"candidates": [0.5, 1.0, 1.25], "horizon": 2, "every": 4}})])
def test_checkpoint_and_restore_continue_exactly(rule, batch_size, options):
    """Minibatch Adam (with and without injected noise, S on the full batch or the step's own, the latter with
    exact or difference products, c scaled by the gradient coherence) and full-batch GD with c chosen by the
    flow, stopped after 8 steps (right after a re-estimate, whose gradient for the next step the fresh process
    computes again) and continued by a fresh process from the checkpoint state."""
    problem = flowsim.models.networks.MLPConfig(**MLP).build(device="cpu")
    cls = PROCESSES["adaptive"]
    options = cls.Options(c=1.0, every=4, **options)

    def make():
        return cls(problem, make_rule(rule), Schedule(100.0), seed=2, batch_size=batch_size, options=options)

    whole = make()
    traj = whole.start(problem.w0)
    for _ in range(14):
        whole.step(traj, False)
    first = make()
    part = first.start(problem.w0)
    for _ in range(8):
        first.step(part, False)
    second = make()
    second.restore({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in first.checkpoint_state().items()})
    part = flowsim.solvers.Trajectory(part.w.clone(), {k: v.clone() for k, v in part.state.items()}, part.step, part.time)
    for _ in range(6):
        second.step(part, False)
    assert torch.equal(part.w, traj.w) and part.time == traj.time and second.ctl["c"] == whole.ctl["c"]


@pytest.mark.parametrize("key,value,message", [
    ("c", 2.5, "runs.a.c: Input should be less than 2"),
    ("guard", 0.5, "runs.a.guard: Input should be greater than 1"),
    ("shrink", 1.0, "runs.a.shrink: Input should be less than 1"),
    ("every", 0, "runs.a.every: Input should be greater than 0"),
    ("noise", -0.1, "runs.a.noise: Input should be greater than or equal to 0"),
    ("noise_until", 0, "runs.a.noise_until: Input should be greater than 0"),
    ("schedule", {"drop_at": 2, "lr_after": 0.1}, "runs.a.schedule: the adaptive process sets η itself"),
    ("first_step", "jump", "runs.a.first_step: Input should be 'edge' or 'line'"),
])
def test_bad_options_fail_in_one_line_naming_the_key(key, value, message, tmp_path):
    doc = {"problem": {"model": "quadratic", "spectrum": SPECTRUM}, "steps": 5,
           "runs": {"a": {"process": "adaptive", "lr": 1.0, key: value}}}
    with pytest.raises(ScenarioError) as err:
        flowsim.run(doc, tmp_path / "s.zarr", progress=False)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "s.zarr").exists()


def test_injected_noise_has_the_stationary_variance_of_noisy_gd_on_a_quadratic():
    """Adaptive GD at c = 0.5 on ½ Σ λ_i w_i² (30 coordinates for each λ of 4, 1, 0.25): η = 2c/λ_max = 0.25
    exactly, so w_i ← (1 − ηλ) w_i + ησ ξ and its stationary variance is ησ²/(λ(2 − ηλ)) — checked over 4000
    steps after a burn-in (relative standard error of each estimate ≈ 2 %; the guard is off)."""
    lams = [4.0, 1.0, 0.25]
    problem = QuadraticConfig(spectrum=[lam for lam in lams for _ in range(30)]).build(device="cpu")
    cls = PROCESSES["adaptive"]
    sigma = 0.3
    process = cls(problem, make_rule("gd"), Schedule(100.0), seed=4,
                  options=cls.Options(c=0.5, noise=sigma, guard=1e12))
    traj = process.start(problem.w0)
    samples = []
    for k in range(4400):
        assert process.step(traj, False)["step_size"] == pytest.approx(0.25, rel=1e-9)
        if k >= 400:
            samples.append(traj.w.clone())
    W = torch.stack(samples).reshape(-1, 3, 30)
    for j, lam in enumerate(lams):
        expected = 0.25 * sigma ** 2 / (lam * (2 - 0.25 * lam))
        assert abs(W[:, j].pow(2).mean().item() / expected - 1) < 0.08


def test_injected_noise_reproduces_stops_at_noise_until_and_depends_on_the_seed():
    problem = QuadraticConfig(spectrum=[2.0, 1.0]).build(device="cpu")
    cls = PROCESSES["adaptive"]

    def run(seed, until):
        process = cls(problem, make_rule("gd"), Schedule(100.0), seed=seed,
                      options=cls.Options(c=0.5, noise=0.1, noise_until=until))
        traj = process.start(problem.w0)
        ws = []
        for _ in range(10):
            process.step(traj, False)
            ws.append(traj.w.clone())
        return ws
    a, b, other = run(0, 5), run(0, 5), run(1, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], other[0])
    # from step 5 on: noiseless GD at η = 2·0.5/2 = 0.5, w_i ← (1 − 0.5 λ_i) w_i
    expected = a[4] * torch.tensor([0.0, 0.5], dtype=torch.float64) ** 5
    torch.testing.assert_close(a[9], expected, rtol=1e-12, atol=1e-15)
    noiseless = a[3] * torch.tensor([0.0, 0.5], dtype=torch.float64)
    assert not torch.allclose(a[4], noiseless)


def test_the_noise_stream_never_meets_the_minibatch_stream():
    """torch's CPU generator keeps the low 32 bits of a seed: the noise seeds must differ there from every
    minibatch (or Brownian) seed, for seeds below 2000 over a million steps."""
    from flowsim.solvers.processes import step_seed
    mask, steps = 0xFFFFFFFF, range(0, 1_000_000, 997)
    minibatch = {step_seed(s, k) & mask for s in range(2000) for k in steps}
    noise = {step_seed(s, k, noise=True) & mask for s in range(0, 2000, 37) for k in steps}
    assert not minibatch & noise


@pytest.mark.parametrize("hvp, rel", [("reverse", 1e-8), ("difference", 1e-6)])
@pytest.mark.parametrize("rule", ["gd", "adam"])
def test_curvature_batch_estimates_the_top_eigenvalue_of_the_next_steps_batch_hessian(rule, hvp, rel):
    """With ``curvature_batch`` the re-estimate made by the step that reaches w_3 is λ_max(P̃⁻¹H_B) at w_3 of the
    minibatch B of the step from w_3, with P̃ of that step (its rule state advanced by g_B(w_3)): against dense
    float64 eigenvalues (exact products, or differences of gradients to O(√ε_m) on this tanh network). That step
    then uses the same g_B."""
    problem = flowsim.models.networks.MLPConfig(**{**MLP, "n_train": 64, "widths": [8]}).build(device="cpu")
    cls = PROCESSES["adaptive"]
    process = cls(problem, make_rule(rule), Schedule(100.0), seed=1, batch_size=16,
                  options=cls.Options(c=0.5, every=3, curvature_batch=True, tol=1e-10, hvp=hvp))
    traj = process.start(problem.w0)
    for _ in range(3):
        process.step(traj, False)
    w3, batch, state = traj.w.clone(), process.sampler.indices(3), traj.state
    H = torch.func.hessian(lambda w: problem.loss(w, batch))(w3)
    _, g = problem.loss_and_grad(w3, batch)
    P = process.rule.precond(process.rule.advance_state(g, state))
    if P is not None:
        H = H / P.sqrt()[:, None] / P.sqrt()[None, :]
    assert process.ctl["S"] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=rel)
    eta = process.ctl["eta"]
    process.step(traj, False)
    torch.testing.assert_close(traj.w, w3 + process.rule.update(g, state, eta)[0], rtol=1e-12, atol=1e-15)


def test_max_products_caps_every_re_estimate_after_the_first(monkeypatch):
    import flowsim.solvers.adaptive as adaptive
    solve, used = adaptive.top_eigenpairs, []

    def counted(*args, **kwargs):
        result = solve(*args, **kwargs)
        used.append(result.matvecs)
        return result
    monkeypatch.setattr(adaptive, "top_eigenpairs", counted)
    problem = flowsim.models.networks.MLPConfig(**MLP).build(device="cpu")
    cls = PROCESSES["adaptive"]
    process = cls(problem, make_rule("adam"), Schedule(100.0), seed=0, batch_size=32,
                  options=cls.Options(every=2, curvature_batch=True, max_products=2, tol=1e-9))
    traj = process.start(problem.w0)
    for _ in range(12):
        process.step(traj, False)
    assert len(used) == 7 and used[0] > 2 and max(used[1:]) == 2


@pytest.mark.parametrize("curvature_batch", [False, True])
def test_curvature_batch_holds_eta_at_c_times_two_over_lambda_max_on_a_quadratic(curvature_batch):
    etas, _, _ = quadratic_run(30, c=0.9, every=5, curvature_batch=curvature_batch, max_products=1)
    np.testing.assert_allclose(etas * SPECTRUM[0], 1.8, rtol=1e-6)


def test_curvature_batch_with_curvature_examples_fails_in_one_line(tmp_path):
    doc = {"problem": {"model": "quadratic", "spectrum": SPECTRUM}, "steps": 5,
           "runs": {"a": {"process": "adaptive", "lr": 1.0, "curvature_batch": True, "curvature_examples": 10}}}
    with pytest.raises(ScenarioError) as err:
        flowsim.run(doc, tmp_path / "s.zarr", progress=False)
    assert "curvature_examples: does not apply with curvature_batch" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("decay, expected", [(1.0, [1.0] * 6), (0.5, [1.0, 1.0, 1.0, 0.5, 0.5, 0.25])])
def test_decay_on_rise_lowers_c_after_each_interval_whose_mean_loss_rose(decay, expected):
    """A constant estimate S = 1 (η = 2c, c = 0.5) and step losses 1.0, 0.9, 0.95, 0.8, 0.85, 0.7 with a zero
    gradient, re-estimating after every step (every = 1): with ``decay_on_rise`` 0.5, c halves after each step
    whose loss rose (0.95 > 0.9, 0.85 > 0.8), so η halves from the next step on, and stays lowered (the
    last loss is the seventh step's, whose gradient the sixth computes ahead for its re-estimate)."""
    problem = QuadraticConfig(spectrum=[0.1]).build(device="cpu")
    cls = PROCESSES["adaptive"]
    process = cls(problem, make_rule("gd"), Schedule(100.0), options=cls.Options(c=0.5, every=1,
                                                                                 decay_on_rise=decay))
    losses = iter([1.0, 0.9, 0.95, 0.8, 0.85, 0.7, 0.6])
    process.sharpness = lambda traj, *_: 1.0
    process._loss_and_grad = lambda w, idx, hessian: (torch.tensor(next(losses)), torch.zeros_like(w), None)
    traj = process.start(problem.w0)
    outs = [process.step(traj, True) for _ in range(6)]
    assert [out["step_size"] for out in outs] == expected
    assert [out["target_c"] for out in outs] == [eta / 2 for eta in expected]


def coherence_process(batch_size, **options):
    problem = flowsim.models.networks.MLPConfig(**{**MLP, "n_train": 64}).build(device="cpu", dtype=torch.float64)
    cls = PROCESSES["adaptive"]
    return problem, cls(problem, make_rule("adam"), Schedule(100.0), seed=3, batch_size=batch_size,
                        options=cls.Options(c=0.5, every=2, growth=1e9, **options))


def test_coherence_changes_nothing_in_full_batch():
    runs = []
    for coherence in (False, True):
        problem, process = coherence_process(None, coherence=coherence)
        traj = process.start(problem.w0)
        runs.append([process.step(traj, True) for _ in range(9)])
    assert [o["step_size"] for o in runs[1]] == [o["step_size"] for o in runs[0]]
    assert all(o["target_c"] == 0.5 for o in runs[1])


@pytest.mark.parametrize("sampling, population", [("epoch", 64), ("iid", math.inf)])
def test_coherence_scales_the_target_by_the_half_batch_estimate_of_the_next_steps_batch(sampling, population):
    """B = 16 of D = 64: the re-estimate after step 1 sets η·S = c·ρ·θ with ρ = (g1·g2 + ‖g1 − g2‖²/(D·(1/8 +
    1/8)))/‖g_B‖² from the two halves of the batch of the step from w_2 (D = inf, no correction, when batches
    are drawn with replacement), computed here independently; the recorded target_c is c·ρ."""
    problem, process = coherence_process(16, coherence=True, sampling=sampling)
    traj = process.start(problem.w0)
    for _ in range(2):
        process.step(traj, False)
    batch = process.sampler.indices(2)
    g1, g2, g = (problem.loss_and_grad(traj.w, idx)[1] for idx in (batch[:8], batch[8:], batch))
    signal = (g1 @ g2).item() + (g1 - g2).pow(2).sum().item() / (population * (1 / 8 + 1 / 8))
    rho = signal / g.pow(2).sum().item()
    assert 0.05 < rho < 0.9
    assert process.ctl["eta"] * process.ctl["S"] == pytest.approx(0.5 * rho * 38.0, rel=1e-9)
    assert process.step(traj, True)["target_c"] == pytest.approx(0.5 * rho, rel=1e-12)


@pytest.mark.parametrize("rule, expected", [
    ("gd", sum(v ** 2 for v in SPECTRUM) / sum(v ** 3 for v in SPECTRUM)), ("adam", 1.0)])
def test_line_first_step_is_the_minimizer_of_the_quadratic_along_the_rules_first_update(rule, expected):
    """½ Σ λ_i w_i² from w0 = 1, so g = λ: GD's first update −g is minimized at Σλ²/Σλ³, Adam's (bias-corrected
    sign descent, −g/(|g| + ε)) at Σ|λ|/Σλ = 1 (up to ε)."""
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    cls = PROCESSES["adaptive"]
    process = cls(problem, make_rule(rule), Schedule(100.0), options=cls.Options(first_step="line"))
    assert process.step(process.start(problem.w0), False)["step_size"] == pytest.approx(expected, rel=1e-6)


def test_line_first_step_falls_back_to_the_edge_where_the_model_is_concave_along_the_update():
    """Spectrum (−1, 0.5), g = λ: gᵀHg = −1 + 0.125 < 0, so step 0 takes c·2/λ_max = 0.5·2/0.5."""
    lam = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    problem = flowsim.Problem.from_function(lambda w: 0.5 * (lam * w * w).sum(), torch.ones(2), dtype="float64",
                                            device="cpu")
    cls = PROCESSES["adaptive"]
    process = cls(problem, make_rule("gd"), Schedule(100.0), options=cls.Options(c=0.5, first_step="line"))
    assert process.step(process.start(problem.w0), False)["step_size"] == pytest.approx(2.0, rel=1e-6)


def test_line_first_step_with_c_start_fails_in_one_line(tmp_path):
    doc = {"problem": {"model": "quadratic", "spectrum": SPECTRUM}, "steps": 5,
           "runs": {"a": {"process": "adaptive", "lr": 1.0, "first_step": "line", "c_start": 2.0}}}
    with pytest.raises(ScenarioError) as err:
        flowsim.run(doc, tmp_path / "s.zarr", progress=False)
    assert str(err.value).startswith("runs.a.c_start: does not apply with first_step: line")
    assert "\n" not in str(err.value) and not (tmp_path / "s.zarr").exists()
