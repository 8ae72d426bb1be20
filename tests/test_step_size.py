"""Step-size policies: the edge controller holds η·S at c·θ (exact on a quadratic, measured by the curvature probe
on an MLP, for GD and Adam), its guard, growth cap, re-estimate times and curvature on the step's own batch; exact
resume through the loop's checkpoints; one-line errors for bad options and for options removed; constant, drop
and cdat policies as data."""
import math

import numpy as np
import pytest
import torch

import flowsim
from flowsim.models.landscapes import QuadraticConfig
from flowsim.scenario import ScenarioError
from flowsim.solvers import Discrete, Edge, make_rule
from flowsim.solvers.loop import Member, Single, advance, restore

SPECTRUM = [4.0, 1.0, 0.25]
EXACT = {"early": False, "eig_tol": 1e-3, "max_products": None, "hvp": "reverse"}
"""The controller at the edge rule alone: every estimate to 1e-3 with exact products, no early estimates."""


def drive(problem, rule, policy, steps, batch_size=None, seed=0, options=None):
    """Run ``policy`` on the discrete process of ``rule`` through the loop; returns (rows by step, member,
    trajectory). Rows hold ``step_size`` and ``step_loss``-based divergence bookkeeping as the loop records."""
    process = Discrete(problem, make_rule(rule), seed, batch_size, options)
    rows = {}
    member = Member(policy, lambda k, row: rows.__setitem__(k, row) and False)
    traj = process.start(problem.w0)
    advance(Single(process), traj, [member], steps, divergence_factor=math.inf)
    return rows, member, traj


def quadratic_run(steps, **options):
    """The edge controller with GD on ½ Σ λ_i w_i² from w0 = 1: returns (η_k, loss_k, final w)."""
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    rows, _, traj = drive(problem, "gd", Edge(**{**EXACT, **options}), steps)
    etas = np.array([rows[k]["step_size"] for k in range(steps)])
    losses = np.array([rows[k]["loss"] for k in range(steps)])
    return etas, losses, traj.w


def scripted(estimates, **options):
    """An edge controller whose sharpness estimates are the given numbers, in order."""
    values = iter(estimates)

    class Scripted(Edge):
        def sharpness(self, ctx, state, first):
            return next(values)
    return Scripted(**{**EXACT, **options})


@pytest.mark.parametrize("c", [0.5, 0.9, 1.0])
def test_quadratic_step_size_is_c_times_two_over_lambda_max_and_matches_gd_at_that_step(c):
    etas, _, w = quadratic_run(40, c=c)
    np.testing.assert_allclose(etas * SPECTRUM[0], 2 * c, rtol=1e-6)
    lr = 2 * c / SPECTRUM[0]
    expected = torch.tensor([(1 - lr * lam) ** 40 for lam in SPECTRUM], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-12)


def test_c_defaults_to_the_rules_entry():
    """Without c, GD's first step is η0·λ_max = 1.5·2 = 3 (estimate to 1e-3); Adam's c is 0.5; a given c wins."""
    etas, _, _ = quadratic_run(1)
    assert etas[0] * SPECTRUM[0] == pytest.approx(3.0, rel=1e-3)
    assert Edge().fraction(make_rule("adam")) == 0.5 and Edge().fraction(make_rule("gd")) == 1.5
    assert Edge(c=0.7).fraction(make_rule("gd")) == 0.7


def test_step_size_is_capped_by_max_lr():
    etas, _, _ = quadratic_run(5, max_lr=0.1, c=0.9)
    assert (etas == 0.1).all()


def test_eta_grows_by_at_most_growth_per_estimate_when_the_sharpness_collapses():
    """Scripted sharpness estimates S = 4, 0.04, −1, 1: η = 2/4 = 0.5 at the first, then ×2 per re-estimate
    instead of jumping to 2/0.04 = 50 or, for S ≤ 0, to the cap; back to 2/S = 2 once S = 1. (The true
    spectrum, 0.1, keeps every step stable, so the guard never fires.)"""
    problem = QuadraticConfig(spectrum=[0.1]).build(device="cpu")
    rows, _, _ = drive(problem, "gd", scripted([4.0, 0.04, -1.0, 1.0, 1.0], c=1.0, every=1), 4)
    assert [rows[k]["step_size"] for k in range(4)] == [0.5, 1.0, 2.0, 2.0]


def test_an_estimate_that_is_not_finite_holds_eta_and_at_the_first_step_needs_max_lr():
    """Scripted S = 4, NaN, ∞, 1: an estimate that is not finite (a product overflowed) keeps η at 2/4 = 0.5, and
    the next finite one grows it by at most 2 (it was 1.0 at the NaN, by the growth cap, and 0 at ∞, which the
    cap then held at 0). At the first step S ≤ 0 or not finite bounds nothing: max_lr is taken, and without it a
    one-line error (it was η = ∞); but where the first loss is not finite either, η is NaN and the run records its
    divergence at step 0."""
    problem = QuadraticConfig(spectrum=[0.1]).build(device="cpu")
    rows, _, _ = drive(problem, "gd", scripted([4.0, math.nan, math.inf, 1.0, 1.0], c=1.0, every=1), 4)
    assert [rows[k]["step_size"] for k in range(4)] == [0.5, 0.5, 0.5, 1.0]
    for first in (-1.0, 0.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"^step_size: edge: λ_max\(P̃⁻¹H\) = \S+ at the first step, so no "
                                             r"stability threshold bounds η there; set max_lr"):
            drive(problem, "gd", scripted([first], c=1.0), 1)
        rows, _, _ = drive(problem, "gd", scripted([first, 4.0], c=1.0, every=1, max_lr=0.3), 2)
        assert [rows[k]["step_size"] for k in range(2)] == [0.3, 0.3]
    concave = flowsim.Problem.from_function(lambda w: (w ** 4 - w ** 2).sum(), [0.1, 0.2], device="cpu")
    with pytest.raises(ValueError, match=r"= -1.52 at the first step"):  # H = diag(12w² − 2): −1.88, −1.52
        flowsim.simulate(concave, "gd", "discrete", "edge", 3)
    nowhere = flowsim.Problem.from_function(lambda w: (w ** 2).sum() + (w[0] - 2).sqrt(), [1.0, 2.0], device="cpu")
    ds = flowsim.simulate(nowhere, "gd", "discrete", "edge", 3)  # L(w0) is NaN: a divergence to record, no error
    assert bool(ds.diverged[0]) and ds.diverged_at.item() == 0 and np.isnan(ds.step_size.values[0, 0])


@pytest.mark.parametrize("early, expected", [(False, [0, 10, 20]), (True, [0, 1, 2, 4, 8, 10, 20])])
def test_estimates_are_made_every_every_steps_and_with_early_also_at_powers_of_two(early, expected):
    """The sharpness is estimated at step 0 and at the steps from w_k, k a multiple of ``every`` — with
    ``early`` also at k = 1, 2, 4, 8 < every, where the rule state and the curvature change fastest."""
    problem = QuadraticConfig(spectrum=[0.1]).build(device="cpu")
    seen = []

    class Recording(Edge):
        def sharpness(self, ctx, state, first):
            seen.append(ctx.step)
            return 1.0
    drive(problem, "gd", Recording(**{**EXACT, "every": 10, "early": early}), 25)
    assert seen == expected


MLP = {"model": "mlp", "widths": [32, 32], "activation": "tanh", "dataset": "digits", "classes": [0, 1, 2, 3],
       "n_train": 200, "loss": "mse"}


def test_mlp_holds_eta_times_preconditioned_sharpness_at_its_target_for_gd_and_adam():
    """The probe measures S every 5 steps, half of them between the controller's estimates (every 10): the
    median of η_t·S_t over the last half is within ±10 % of c·θ (θ = 2 for GD, 38 for Adam with β1 = 0.9)."""
    def edge(c):
        return {"edge": {**EXACT, "c": c}}
    doc = {"name": "edge-test", "seed": 0, "device": "cpu", "dtype": "float64", "problem": MLP, "steps": 300,
           "runs": {"gd-0.9": {"rule": "gd", "step_size": edge(0.9)},
                    "gd-1.0": {"rule": "gd", "step_size": edge(1.0)},
                    "adam-0.9": {"rule": "adam", "step_size": edge(0.9)}},
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
        assert d.policy.item() == "edge" and math.isnan(d.lr.item()) and d.max_lr.item() == math.inf


def test_guard_recovers_from_a_forced_loss_spike():
    """A first estimate S = 1.2 of λ_max = 4 forces η0·λ_max = 0.9·2·4/1.2 = 6 (unstable: the top mode grows 25×
    in loss): the guard shrinks the next steps to η·λ_max = 0.9, and from the next regular estimate (step 10) on
    η·λ_max is back at 2c = 1.8: the guard's shrink lasts until then, so spikes cannot compound over a long run."""
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    policy = scripted([1.2] + [4.0] * 20, c=0.9, every=10)
    rows, _, traj = drive(problem, "gd", policy, 80)
    etas = np.array([rows[k]["step_size"] for k in range(80)])
    losses = np.array([rows[k]["loss"] for k in range(80)])
    products = etas * SPECTRUM[0]
    assert products[0] == pytest.approx(6.0)
    np.testing.assert_allclose(products[1:10], 0.9, rtol=1e-12)
    np.testing.assert_allclose(products[10:], 1.8, rtol=1e-12)
    assert losses.max() < 25 * losses[0]
    factors = np.prod([(1 - etas * lam) ** 2 for lam in SPECTRUM], axis=1)
    assert 0.5 * np.dot(SPECTRUM, factors) == pytest.approx(0.5 * np.dot(SPECTRUM, traj.w.numpy() ** 2), rel=1e-9)
    assert losses[-1] < 1e-6 * losses[0]


def test_without_the_guard_the_forced_spike_grows_until_the_next_estimate():
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    rows, _, _ = drive(problem, "gd", scripted([1.2] + [4.0] * 5, c=0.9, every=10, guard=1e300), 12)
    assert rows[9]["loss"] > 1e12 * rows[0]["loss"]


@pytest.mark.parametrize("rule, batch_size, options", [
    ("adam", 16, {}), ("adam", 16, {"hvp": "difference"}), ("adam", 16, {"early": True}), ("gd", None, {})])
def test_checkpoint_and_restore_continue_exactly(rule, batch_size, options):
    """The loop's checkpoint after step 7 (policy state, rule state, warm starts) continues a run exactly: 14
    steps at once equal 8 steps, a fresh process and policy restored from the checkpoint, and 6 more."""
    problem = flowsim.models.networks.MLPConfig(**MLP).build(device="cpu")
    policy = Edge(**{**EXACT, "c": 1.0, "every": 4, **options})

    def engine():
        return Single(Discrete(problem, make_rule(rule), seed=2, batch_size=batch_size))
    whole = engine()
    traj = whole.start(problem.w0)
    advance(whole, traj, [Member(policy, lambda k, row: False)], 14, divergence_factor=math.inf)
    saved = []
    first = engine()
    part = first.start(problem.w0)
    advance(first, part, [Member(policy, lambda k, row: k == 7)], 8, divergence_factor=math.inf,
            on_checkpoint=saved.append)
    second, member = engine(), Member(policy, lambda k, row: False)
    resumed, start = restore(second, [member], saved[-1], "cpu")
    assert start == 8
    advance(second, resumed, [member], 14, start=start, divergence_factor=math.inf)
    assert torch.equal(resumed.w, traj.w) and resumed.time == traj.time


@pytest.mark.parametrize("key,value,message", [
    ("c", 2.5, "runs.a.step_size.edge.c: Input should be less than 2"),
    ("guard", 0.5, "runs.a.step_size.edge.guard: Input should be greater than 1"),
    ("shrink", 1.0, "runs.a.step_size.edge.shrink: Input should be less than 1"),
    ("every", 0, "runs.a.step_size.edge.every: Input should be greater than 0"),
    ("c_start", 2.0, "runs.a.step_size.edge.c_start: unknown key"),
    ("coherence", True, "runs.a.step_size.edge.coherence: unknown key"),  # options removed for want of a gain
    ("decay_on_rise", 0.5, "runs.a.step_size.edge.decay_on_rise: unknown key"),
    ("first_step", "line", "runs.a.step_size.edge.first_step: unknown key"),
])
def test_bad_options_fail_in_one_line_naming_the_key(key, value, message, tmp_path):
    doc = {"problem": {"model": "quadratic", "spectrum": SPECTRUM}, "steps": 5,
           "runs": {"a": {"step_size": {"edge": {key: value}}}}}
    with pytest.raises(ScenarioError) as err:
        flowsim.run(doc, tmp_path / "s.zarr", progress=False)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("run, message", [
    ({"lr": 1.0, "step_size": "edge"}, "runs.a.lr: does not apply with step_size edge"),
    ({"step_size": {"drop": {"at": 2, "lr_after": 0.1}}}, "runs.a.lr: required key is missing"),
    ({"lr": 1.0, "step_size": "warmup"}, "runs.a.step_size: unknown policy 'warmup'"),
    ({"lr": 1.0, "step_size": {"drop": {"at": 2, "lr_after": 0.1}, "edge": {}}}, "runs.a.step_size: give one policy"),
    ({"process": "stable", "lr": 1.0, "batch_size": 2}, "runs.a.batch_size: does not apply to the stable process"),
    ({"lr": 1.0, "sampling": "iid"}, "runs.a.sampling: applies only to minibatch runs"),
    ({"lr": 1.0, "substeps": 4}, "runs.a.substeps: does not apply to process 'discrete' (an option of stable,"),
])
def test_keys_that_do_not_apply_fail_in_one_line(run, message, tmp_path):
    doc = {"problem": {"model": "mlp", "widths": [3], "dataset": "digits", "classes": [0, 1], "n_train": 12},
           "steps": 5, "runs": {"a": run}}
    with pytest.raises(ScenarioError) as err:
        flowsim.run(doc, tmp_path / "s.zarr", progress=False)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("hvp, rel", [("reverse", 1e-8), ("difference", 1e-6)])
@pytest.mark.parametrize("rule", ["gd", "adam"])
def test_the_estimate_is_the_top_eigenvalue_of_the_steps_own_batch_hessian(rule, hvp, rel):
    """The re-estimate at step 3 is λ_max(P̃⁻¹H_B) at w_3 of the minibatch B of the step
    from w_3, with P̃ of that step (its rule state advanced by g_B(w_3)): against dense float64 eigenvalues (exact
    products, or differences of gradients to O(√ε_m) on this tanh network). That step then uses the same g_B."""
    problem = flowsim.models.networks.MLPConfig(**{**MLP, "n_train": 64, "widths": [8]}).build(device="cpu")
    policy = Edge(**{**EXACT, "c": 0.5, "every": 3, "eig_tol": 1e-10, "hvp": hvp})
    _, member, traj = drive(problem, rule, policy, 3, batch_size=16, seed=1)
    process = Discrete(problem, make_rule(rule), seed=1, batch_size=16)
    w3, batch, state = traj.w.clone(), process.sampler.indices(3), traj.state
    ctx = process.context(traj)
    eta, after = policy.update(3, ctx, member.policy_state)
    H = torch.func.hessian(lambda w: problem.loss(w, batch))(w3)
    _, g = problem.loss_and_grad(w3, batch)
    P = process.rule.precond(process.rule.advance_state(g, state))
    if P is not None:
        H = H / P.sqrt()[:, None] / P.sqrt()[None, :]
    assert after["S"] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=rel)
    process.step(traj, eta, False, ctx)
    torch.testing.assert_close(traj.w, w3 + process.rule.update(g, state, eta, w3)[0], rtol=1e-12, atol=1e-15)


def test_max_products_caps_every_re_estimate_after_the_first(monkeypatch):
    import flowsim.solvers.step_size as step_size
    solve, used = step_size.precond_eigenpairs, []

    def counted(*args, **kwargs):
        result = solve(*args, **kwargs)
        used.append(result.matvecs)
        return result
    monkeypatch.setattr(step_size, "precond_eigenpairs", counted)
    problem = flowsim.models.networks.MLPConfig(**MLP).build(device="cpu")
    policy = Edge(**{**EXACT, "c": 1.0, "every": 2, "max_products": 2, "eig_tol": 1e-9})
    drive(problem, "adam", policy, 12, batch_size=32)  # estimates at steps 0, 2, …, 10 (none where no step follows)
    assert len(used) == 6 and used[0] > 2 and max(used[1:]) == 2


def test_warm_capped_estimates_hold_eta_at_c_times_two_over_lambda_max_on_a_quadratic():
    etas, _, _ = quadratic_run(30, c=0.9, every=5, max_products=1)
    np.testing.assert_allclose(etas * SPECTRUM[0], 1.8, rtol=1e-6)


def test_the_default_edge_runs_from_a_scenario_and_records_what_ran():
    """``step_size: edge`` alone: coordinates policy = edge, lr = NaN (no fake step size), max_lr = inf; the
    stored step_size is the η of every step, step 0 included, and η·S_P at the first estimate is below θ."""
    doc = {"problem": MLP, "steps": 12, "device": "cpu",
           "runs": {"a": {"rule": "adam", "step_size": "edge"}, "b": {"rule": "gd", "lr": 0.3}},
           "record": {"projection_dim": 0}}
    ds = flowsim.run(doc, progress=False)
    a = ds.sel(run="a")
    assert a.policy.item() == "edge" and math.isnan(a.lr.item()) and a.max_lr.item() == math.inf
    assert np.isfinite(a.step_size.sel(step=slice(0, 11)).values).all()
    assert ds.sel(run="b").policy.item() == "constant" and ds.sel(run="b").lr.item() == 0.3
    assert (ds.sel(run="b").step_size.sel(step=slice(0, 11)).values == 0.3).all()


def test_cdat_takes_the_greedy_step_at_sigma_one_and_holds_the_edge_at_two():
    """On ½ Σ λ_i w_i² with GD and no EMA: σ = 1 is exact steepest descent, η_k = gᵀg/gᵀHg (H = diag λ); σ = 2
    on one eigenvalue is η = 2/λ, where w flips sign every step and the loss stays put."""
    from flowsim.solvers import Cdat
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    rows, _, _ = drive(problem, "gd", Cdat(sigma=1.0, ema=0.0, hvp="reverse"), 6)
    lam, w = torch.tensor(SPECTRUM, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for k in range(6):
        g = lam * w
        eta = (g @ g / (g @ (lam * g))).item()
        assert rows[k]["step_size"] == pytest.approx(eta, rel=1e-12), k
        w = w - eta * g
    single = QuadraticConfig(spectrum=[3.0]).build(device="cpu")
    rows, _, traj = drive(single, "gd", Cdat(ema=0.0, hvp="reverse"), 5)
    assert [rows[k]["step_size"] for k in range(5)] == pytest.approx([2 / 3.0] * 5, rel=1e-12)
    assert traj.w.item() == pytest.approx(-single.w0.item(), rel=1e-12)  # five flips


def test_cdat_steps_along_the_rule_update_with_averaged_numerator_and_denominator():
    """Adam's first update u (η = 1) from the rule itself, uᵀHu from the dense Hessian: η_0 = σ(−gᵀu)/|uᵀHu|;
    with ema the ratio of the two running averages, and cdat is a scenario policy like any other."""
    from flowsim.solvers import Cdat
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    rule = make_rule("adam")
    g = problem.loss_and_grad(problem.w0)[1]
    u = rule.update(g, rule.init(problem.w0, g), 1.0, problem.w0)[0]
    H = torch.diag(torch.tensor(SPECTRUM, dtype=torch.float64))
    rows, _, _ = drive(problem, "adam", Cdat(ema=0.5, hvp="reverse"), 2)
    n0, d0 = (-(g @ u)).item(), (u @ H @ u).item()
    assert rows[0]["step_size"] == pytest.approx(2 * n0 / d0, rel=1e-12)
    delta, state = rule.update(g, rule.init(problem.w0, g), rows[0]["step_size"], problem.w0)
    g1 = problem.loss_and_grad(problem.w0 + delta)[1]
    u1 = rule.update(g1, state, 1.0, problem.w0 + delta)[0]
    n1, d1 = (-(g1 @ u1)).item(), (u1 @ H @ u1).item()
    assert rows[1]["step_size"] == pytest.approx(2 * (0.25 * n0 + 0.5 * n1) / (0.25 * d0 + 0.5 * d1), rel=1e-12)
    ds = flowsim.simulate(problem, "adam", "discrete", {"cdat": {"sigma": 1.5}}, 3)
    assert ds.policy.item() == "cdat" and np.isnan(ds.lr.item()) and np.isinf(ds.max_lr.item())
    with pytest.raises(ScenarioError, match=r"sigma"):
        flowsim.simulate(problem, "gd", "discrete", {"cdat": {"sigma": -1}}, 3)


def separable_ce(seed=0, dtype="float64", raw=True):
    """64 points of two classes whose means are ±1 per coordinate (unit noise; separable but for a few points),
    with ``raw`` features scaled by 0.1 … 100 as a user's raw table is, a GELU MLP 4-16-2, cross-entropy."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(64) % 2
    X = (2 * y[:, None] - 1) + torch.randn(64, 4, generator=gen, dtype=torch.float64)
    if raw:
        X = X * torch.logspace(-1, 2, 4, dtype=torch.float64)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    return flowsim.Problem.from_module(net, X, y, loss="ce", dtype=dtype, device="cpu")


class BeforeTheSafeguard(Edge):
    """The controller as it was: a loss spike re-estimated S and η could rise there by ``growth`` as at any
    estimate, and every regular estimate let η rise by ``growth`` whatever the loss did."""
    def _estimate(self, ctx, state, first=False, spike=False):
        S = state["S"] = self.sharpness(ctx, state, first)
        target = self.fraction(ctx.rule) * ctx.rule.threshold_coefficient() / S if S > 0 else math.inf
        state["scale"] = state["scale"] * self.shrink if spike else 1.0
        eta = state["scale"] * target if first else min(state["scale"] * target, self.growth * state["eta"])
        state["eta"], state["ref"] = min(self.max_lr, eta), math.inf


class StepLosses(Edge):
    """The controller, keeping each step's loss on its batch (what the guard reads)."""
    seen: list = []

    def update(self, k, ctx, state):
        self.seen.append(ctx.loss_and_grad()[0].item())
        return super().update(k, ctx, state)


@pytest.mark.parametrize("rule", ["adam", "gd"])
def test_the_curvature_collapse_runaway_on_separable_cross_entropy_is_stopped(rule):
    """Batches of 8. As cross-entropy flattens, the estimate S collapses. Before the safeguard a loss spike
    re-estimated S and could raise η by ``growth`` like any estimate: Adam's η rose to over 10³ × its first value
    and the loss left every bound. With it the run stays finite and η moves only as the definition allows, checked
    step by step against the spikes found here from the step losses (a step loss above ``guard`` × the smallest
    since the last estimate): at a spike η_k ≤ shrink × the η set at the last regular estimate (steps 1, 2, 4, 8,
    10, 20, …), at a regular estimate η_k ≤ growth·η_{k−1}, elsewhere η_k = η_{k−1}."""
    steps, problem = 300, separable_ce()
    if rule == "adam":
        rows, _, _ = drive(problem, rule, BeforeTheSafeguard(), steps, batch_size=8)
        before = np.array([rows[k]["step_size"] for k in range(steps)])
        losses = np.array([rows[k]["loss"] for k in range(steps + 1)])
        assert before.max() > 1e3 * before[0]
        assert not (np.isfinite(losses) & (losses < 1e3 * losses[0])).all()

    policy = StepLosses(seen=[])
    rows, _, _ = drive(problem, rule, policy, steps, batch_size=8)
    etas = np.array([rows[k]["step_size"] for k in range(steps)])
    losses = np.array([rows[k]["loss"] for k in range(steps + 1)])
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    spikes, _ = check_the_definition(policy, etas, torch.finfo(torch.float64).eps * policy.seen[0])
    assert spikes > 0  # the guard acted


def check_the_definition(policy, etas, floor):
    """Check every η_k against the controller's definition, from its step losses ``policy.seen``: at a regular
    estimate (steps 1, 2, 4, 8, 10, 20, …) η_k ≤ growth·η_{k−1}, and η_k ≤ η_{k−1} where the step's loss is at
    ``floor``; at a spike (a step loss above ``guard`` × the smallest above ``floor`` since the last estimate)
    η_k ≤ shrink × the η set at the last regular estimate; elsewhere η_k = η_{k−1}. Returns (spikes, settled
    estimates)."""
    base, ref, spikes, settled = etas[0], math.inf, 0, 0
    for k in range(1, len(etas)):
        loss = policy.seen[k]
        if k % 10 == 0 or k in (1, 2, 4, 8):
            settled += loss <= floor
            assert etas[k] <= (1 if loss <= floor else policy.growth) * etas[k - 1] * (1 + 1e-12)
            base, ref = etas[k], math.inf
        elif loss > policy.guard * ref:
            assert etas[k] <= policy.shrink * base * (1 + 1e-12)
            spikes, ref = spikes + 1, math.inf
        else:
            assert etas[k] == etas[k - 1]
        if loss > floor:
            ref = min(ref, loss)
    return spikes, settled


@pytest.mark.parametrize("rule", ["adam", "gd"])
@pytest.mark.parametrize("batch_size", [None, 8])
def test_eta_is_not_raised_once_the_loss_is_at_its_rounding_floor(rule, batch_size):
    """In float32 separable cross-entropy reaches its rounding floor (eps × the first loss, 1.2e-7 × L0: 0 here)
    and the estimate S there is rounding error. Before the floor rule, full batch, η doubled at every estimate with
    nothing to stop it (2⁴³ × its first value over GD, 2 × 10¹² over Adam, in 400 steps: the loss is 0 and never
    spikes). With it η follows the definition step by step (``check_the_definition``): it is never raised by an
    estimate whose loss is at the floor, and a loss at the floor is no reference for a spike."""
    steps, problem = 400, separable_ce(dtype="float32", raw=False)
    if batch_size is None:
        rows, _, _ = drive(problem, rule, BeforeTheSafeguard(), steps)
        before = np.array([rows[k]["step_size"] for k in range(steps)])
        assert before.max() > 1e10 * before[0] and rows[steps]["loss"] == 0
    policy = StepLosses(seen=[])
    rows, _, _ = drive(problem, rule, policy, steps, batch_size=batch_size)
    etas = np.array([rows[k]["step_size"] for k in range(steps)])
    floor = torch.finfo(torch.float32).eps * policy.seen[0]
    _, settled = check_the_definition(policy, etas, floor)
    if batch_size is None:
        assert settled > 10  # the floor was reached and held η
