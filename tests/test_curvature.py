"""Curvature: the eigensolver, preconditioned sharpness, trace and noise kernel against dense references,
and the edge-of-stability results measured through recorded scenarios at test scale."""
import pytest
import torch

from flowsim.solvers.curvature import top_eigenpairs
from flowsim.models import build_problem


SMOOTH_MLP = {"model": "mlp", "widths": [16, 16], "activation": "tanh", "dataset": "digits", "n_train": 200,
              "loss": "mse"}


@pytest.fixture(scope="module")
def mlp_and_hessian():
    """A float64 MLP on 200 digits (1482 parameters) and its dense Hessian at w0."""
    p = build_problem(SMOOTH_MLP, dtype="float64", device="cpu")
    return p, torch.func.hessian(p.loss)(p.w0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_matches_dense_eigvalsh(mlp_and_hessian, k):
    p, H = mlp_and_hessian
    dense = torch.linalg.eigvalsh(H).flip(0)[:k]
    res = top_eigenpairs(lambda v: p.hvp(p.w0, v), p.n_params, k)
    assert ((res.vals - dense).abs() / dense.abs()).max() <= 1e-6
    torch.testing.assert_close(res.vecs.T @ res.vecs, torch.eye(k, dtype=H.dtype), rtol=0, atol=1e-10)
    residual = (H @ res.vecs - res.vecs * res.vals).norm(dim=0)
    assert (residual <= 1e-6 * dense[0]).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_values_only_stops_earlier_with_eigenvalues_within_tol(mlp_and_hessian, k):
    """values_only: the eigenvalue error estimate stops Lanczos before the residuals are small, and the
    eigenvalues are still within tol·λ₁ of the dense ones."""
    p, H = mlp_and_hessian
    dense = torch.linalg.eigvalsh(H).flip(0)[:k]
    for tol in (1e-3, 1e-8):
        both = [top_eigenpairs(lambda v: p.hvp(p.w0, v), p.n_params, k, tol=tol, values_only=values_only)
                for values_only in (False, True)]
        assert both[1].matvecs < both[0].matvecs
        assert (both[1].vals - dense).abs().max() <= tol * dense[0]


def test_warm_start_from_the_answer_needs_few_matvecs(mlp_and_hessian):
    p, H = mlp_and_hessian
    cold = top_eigenpairs(lambda v: p.hvp(p.w0, v), p.n_params, 2)
    warm = top_eigenpairs(lambda v: p.hvp(p.w0, v), p.n_params, 2, v0=cold.vecs)
    assert warm.matvecs <= 4 < cold.matvecs
    torch.testing.assert_close(warm.vals, cold.vals, rtol=1e-6, atol=0)


def test_largest_algebraic_not_largest_magnitude():
    spectrum = torch.tensor([-10.0, 3.0, 2.5, 1.0, -4.0, 0.5], dtype=torch.float64)
    res = top_eigenpairs(lambda v: spectrum * v, 6, 3)
    torch.testing.assert_close(res.vals, torch.tensor([3.0, 2.5, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_eigensolver_rejects_k_larger_than_n():
    with pytest.raises(ValueError, match="^k:"):
        top_eigenpairs(lambda v: v, 3, 4)


@pytest.mark.parametrize("values_only", [False, True])
def test_top_eigenvalue_of_an_indefinite_operator_dominated_by_a_negative_eigenvalue(values_only):
    """Spectrum −1e6, 100 and 198 values in [0, 1]: the top eigenvalue 100 to tol, although the Krylov space of
    two products is nearly invariant and a tolerance scaled by ‖A‖ would accept a top Ritz value of ≈ 1.7 there
    (as a preconditioned Hessian with ν from one gradient does)."""
    n = 200
    spectrum = torch.linspace(0, 1, n, dtype=torch.float64)
    spectrum[0], spectrum[1] = -1e6, 100.0
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    A = Q @ torch.diag(spectrum) @ Q.T
    for tol in (1e-2, 1e-3):
        res = top_eigenpairs(lambda v: A @ v, n, 1, tol=tol, values_only=values_only)
        assert abs(res.vals[0].item() - 100.0) <= tol * 100.0


@pytest.mark.parametrize("start", ["warm", "random"])
def test_block_eigenpairs_match_dense_eigvalsh_to_their_residual_tolerance(mlp_and_hessian, start):
    """LOBPCG on the MLP's Hessian, k = 3, from the dense eigenvectors perturbed by 1e-2 or from random vectors:
    each residual ‖Hu − θu‖ ≤ tol·θ₁ (its stopping rule), so each θ is within tol·θ₁ of an eigenvalue — here of
    the dense top three — and the vectors are orthonormal."""
    from flowsim.solvers.curvature import block_eigenpairs
    p, H = mlp_and_hessian
    dense, vectors = torch.linalg.eigh(H)
    dense, vectors = dense.flip(0)[:3], vectors.flip(1)[:, :3]
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(p.n_params, 3, generator=gen, dtype=torch.float64)
    V0 = vectors + 1e-2 * noise / noise.norm(dim=0) if start == "warm" else noise
    for tol in (1e-3, 1e-8):
        res = block_eigenpairs(lambda v: H @ v, V0, 3, tol=tol)
        assert (res.vals - dense).abs().max() <= tol * dense[0]
        assert ((H @ res.vecs - res.vecs * res.vals).norm(dim=0) <= tol * dense[0]).all()
        torch.testing.assert_close(res.vecs.T @ res.vecs, torch.eye(3, dtype=H.dtype), rtol=0, atol=1e-10)


def test_a_converged_block_costs_one_product_per_pair_and_lanczos_finishes_what_lobpcg_does_not():
    """From exact eigenvectors the block stops after its first k products; with max_iter = 1 on a random start
    it has not converged, and warm-started Lanczos brings it to tol (its products counted too)."""
    from flowsim.solvers.curvature import block_eigenpairs
    n = 300
    spectrum = torch.linspace(-1, 1, n, dtype=torch.float64)
    spectrum[:4] = torch.tensor([5.0, 4.9, 4.0, 3.0], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    A = Q @ torch.diag(spectrum) @ Q.T
    exact = block_eigenpairs(lambda v: A @ v, Q[:, :4], 4, tol=1e-10)
    assert exact.matvecs == 4
    torch.testing.assert_close(exact.vals, spectrum[:4], rtol=0, atol=1e-12)
    start = torch.randn(n, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    res = block_eigenpairs(lambda v: A @ v, start, 4, tol=1e-8, max_iter=1)
    assert res.matvecs > 8  # the block's 4 + 4, then Lanczos
    assert (res.vals - spectrum[:4]).abs().max() <= 1e-8 * 5.0


def test_a_block_wider_than_its_pairs_carries_the_others_at_one_product_each():
    """k = 2 of a block of 5 (two exact eigenvectors, three random columns): a converged start stops after the
    block's 5 products, the carried columns are not iterated, and they come back orthonormal to the top pairs with
    Ritz values no larger than the eigenvalues of their rank (Cauchy interlacing); with a start that has not
    converged, LOBPCG iterates only the top pairs, and Lanczos's finish keeps the block's 5 columns orthonormal."""
    from flowsim.solvers.curvature import block_eigenpairs
    n = 300
    spectrum = torch.linspace(-1, 1, n, dtype=torch.float64)
    spectrum[:5] = torch.tensor([5.0, 4.9, 4.0, 3.0, 2.0], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    A = Q @ torch.diag(spectrum) @ Q.T
    random = torch.randn(n, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    res = block_eigenpairs(lambda v: A @ v, torch.cat([Q[:, :2], random], 1), 2, tol=1e-10)
    assert res.matvecs == 5 and res.vecs.shape == (n, 5)
    torch.testing.assert_close(res.vals[:2], spectrum[:2], rtol=0, atol=1e-12)
    assert (res.vals[2:] <= spectrum[2:5] + 1e-12).all()
    torch.testing.assert_close(res.vecs.T @ res.vecs, torch.eye(5, dtype=A.dtype), rtol=0, atol=1e-10)
    start = torch.randn(n, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    res = block_eigenpairs(lambda v: A @ v, start, 2, tol=1e-8, max_iter=1)
    assert res.matvecs > 5 + 2  # the block's 5, one iteration of the 2 top pairs, then Lanczos
    assert (res.vals[:2] - spectrum[:2]).abs().max() <= 1e-8 * 5.0
    torch.testing.assert_close(res.vecs.T @ res.vecs, torch.eye(5, dtype=A.dtype), rtol=0, atol=1e-10)


def test_precond_eigenpairs_by_lobpcg_and_by_lanczos_agree(mlp_and_hessian):
    """The two methods of the one helper on P̃^{-1/2} H P̃^{-1/2}, k = 3, from the same warm start: the same
    eigenvalues to the tolerance; an unknown method is a one-line error."""
    from flowsim.solvers.curvature import hessian_operator, precond_eigenpairs
    p, H = mlp_and_hessian
    P = torch.rand(p.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 1e-2 + 1e-3
    hvp = hessian_operator(p, p.w0)
    cold = precond_eigenpairs(hvp, P, p.w0, 3, tol=1e-2)
    pairs = [precond_eigenpairs(hvp, P, p.w0, 3, v0=cold.vecs, tol=1e-8, values_only=False, method=method)
             for method in ("lanczos", "lobpcg")]
    assert (pairs[0].vals - pairs[1].vals).abs().max() <= 2e-8 * pairs[0].vals[0]
    with pytest.raises(ValueError, match="^method: must be 'lanczos' or 'lobpcg', got 'arnoldi'$"):
        precond_eigenpairs(hvp, P, p.w0, 3, method="arnoldi")


def test_hessian_operators_match_dense_hessian(mlp_and_hessian):
    from flowsim.solvers.curvature import hessian_operator
    p, H = mlp_and_hessian
    v = torch.randn(p.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for method in ("reverse", "forward"):
        torch.testing.assert_close(hessian_operator(p, p.w0, method=method)(v), H @ v, rtol=1e-10, atol=1e-12)


def test_preconditioned_top_k_matches_generalized_dense_eigenproblem(mlp_and_hessian):
    """λ(P̃⁻¹H) from the symmetric operator P̃^{-1/2} H P̃^{-1/2} against scipy's generalized H u = λ P̃ u."""
    import scipy.linalg

    from flowsim.solvers.curvature import hessian_operator, preconditioned
    p, H = mlp_and_hessian
    P = torch.rand(p.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 1e-2 + 1e-3
    dense = torch.from_numpy(scipy.linalg.eigh(H.numpy(), torch.diag(P).numpy(), eigvals_only=True)[::-1][:3].copy())
    res = top_eigenpairs(preconditioned(hessian_operator(p, p.w0), P), p.n_params, 3)
    assert ((res.vals - dense).abs() / dense.abs()).max() <= 1e-6
    u = res.vecs[:, 0] / P.sqrt()  # eigenvector of P̃⁻¹H
    torch.testing.assert_close((H @ u) / P, res.vals[0] * u, rtol=0, atol=1e-6 * dense[0].item() * u.abs().max().item())


def _linear_regression(D=200, d=100, C=3, seed=6):
    """f(x) = W x with C outputs on Gaussian inputs, targets realizable by a W* (zero loss at the minimum)."""
    from flowsim.models.problem import Problem
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(D, d, generator=gen, dtype=torch.float64)
    Y = X @ torch.randn(d, C, generator=gen, dtype=torch.float64) / d ** 0.5
    return Problem.from_module(torch.nn.Linear(d, C, bias=False), X, Y, loss="mse", dtype="float64", device="cpu")


def test_noise_kernel_norm_against_explicit_ntk_of_a_linear_model():
    """For f(x) = W x (C outputs) the NTK is δ_cc' xᵢ·xⱼ / D: its eigenvalues are those of XXᵀ/D, C times each."""
    from flowsim.solvers.curvature import noise_kernel_norm, ntk_eigenvalues
    D, d, C, B, lr = 40, 12, 3, 4, 0.05
    p = _linear_regression(D, d, C)
    lam = torch.linalg.eigvalsh(p.X @ p.X.T / D)
    eigs = ntk_eigenvalues(p, p.w0)
    torch.testing.assert_close(eigs[:d * C].sort().values, lam[-d:].repeat_interleave(C).sort().values,
                               rtol=1e-10, atol=1e-12)
    kappa = (1 / B - 1 / D) * D / (D - 1)
    expected = kappa * (lr * lam / (2 - (1 - kappa) * lr * lam)).sum().item()
    assert noise_kernel_norm(eigs, lr, B, D, C) == pytest.approx(expected, rel=1e-10)
    # small-step limit K ≈ (η/2)κ·mean ‖∇_w f(xᵢ)‖²/C: here ‖∇_W f(x)‖_F² = C‖x‖²
    small = noise_kernel_norm(eigs, 1e-6, B, D, C)
    assert small == pytest.approx(1e-6 / 2 * kappa * p.X.pow(2).sum(1).mean().item(), rel=1e-5)


def test_sgd_on_linear_regression_diverges_exactly_when_k_crosses_one():
    """The stochastic edge of stability: with η λ_max < 0.5 (far inside the GD-stable range η λ_max < 2), SGD
    with batch 4 converges at the η where K = 0.8 and diverges at the η where K = 1.25."""
    from flowsim.solvers.curvature import noise_kernel_norm, ntk_eigenvalues
    from flowsim.solvers import Discrete, make_rule
    p, B, epochs = _linear_regression(), 4, 100
    eigs = ntk_eigenvalues(p, p.w0)

    def lr_at(k_target):  # K is increasing in η: bisection
        lo, hi = 0.0, 1.0 / eigs[0].item()
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if noise_kernel_norm(eigs, mid, B, p.n_examples, 3) < k_target else (lo, mid)
        return lo

    for k_target, converges in ((0.8, True), (1.25, False)):
        lr = lr_at(k_target)
        assert lr * eigs[0].item() < 0.5
        process = Discrete(p, make_rule("gd"), seed=0, batch_size=B)
        traj = process.start(p.w0)
        for _ in range(epochs * p.n_examples // B):
            process.step(traj, lr, measure=False)
        ratio = p.loss(traj.w).item() / p.loss(p.w0).item()
        assert (ratio < 1e-6) if converges else not (ratio < 1e6), (k_target, ratio)


def test_gradient_noise_trace_from_separate_gradients(tiny_mlp_problem):
    from flowsim.solvers.curvature import gradient_noise_trace
    p = tiny_mlp_problem
    grads = torch.stack([p.grad(p.w0, torch.tensor([i])) for i in range(p.n_examples)])
    expected = (grads - p.grad(p.w0)).pow(2).sum(1).mean().item()
    assert gradient_noise_trace(p, p.w0) == pytest.approx(expected, rel=1e-10)


def _quadratic_scenario(runs, steps=12, **record):
    return {"name": "q", "device": "cpu", "problem": {"model": "quadratic", "spectrum": [4.0, 1.0, 0.5]},
            "steps": steps, "runs": runs,
            "record": {"projection_dim": 0, "curvature_every": 4, "top_k": 3, "eig_tol": 1e-10, **record}}


def test_recorded_curvature_on_a_quadratic_is_its_spectrum_and_gd_threshold():
    import flowsim
    ds = flowsim.run(_quadratic_scenario({"gd": {"lr": 0.1}}), progress=False).sel(run="gd")
    measured = ds.sharpness.dropna("step")
    assert list(measured.step.values) == [0, 4, 8, 12]
    assert abs(measured.values - 4.0).max() <= 1e-9
    assert abs(ds.eigs.sel(step=8).values - [4.0, 1.0, 0.5]).max() <= 1e-9
    assert ds.eigs.dims[-1] == "eig" and ds.eigs.attrs["units"] == "loss/weight²"
    assert ds.threshold.sel(step=4).item() == pytest.approx(2 / 0.1)


def test_recorded_adam_preconditioned_sharpness_from_its_own_state():
    """On diag(λ) the eigenvalues of P̃⁻¹H are λᵢ/P̃ᵢ with P̃ = (1 − β1ᵗ)(√v̂ + ε), replayed here by hand."""
    import flowsim
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.01
    ds = flowsim.run(_quadratic_scenario({"adam": {"rule": "adam", "lr": lr}}, precond=True),
                     progress=False).sel(run="adam")
    assert ds.precond_sharpness.sel(step=0).isnull()  # no optimizer state before the first step
    lam = torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64)
    w, m, v = torch.ones(3, dtype=torch.float64), 0.0, 0.0
    for t in range(1, 9):
        g = lam * w
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        P = (1 - b1 ** t) * ((v / (1 - b2 ** t)).sqrt() + eps)
        w = w - lr * m / P
        if t in (4, 8):
            assert ds.precond_sharpness.sel(step=t).item() == pytest.approx((lam / P).max().item(), rel=1e-9)
    assert ds.threshold.sel(step=4).item() == pytest.approx((2 + 2 * b1) / ((1 - b1) * lr))


def _bundled(name: str, **changes) -> dict:
    """A bundled scenario as a dict, with top-level keys replaced and ``problem``/``record`` keys updated."""
    from flowsim.scenario import bundled as bundled_scenarios
    from flowsim.scenario import load
    doc = load(bundled_scenarios()[name]).model_dump(exclude_none=True)
    for key in ("problem", "record"):
        doc[key].update(changes.pop(key, {}))
    doc.update(device="cpu", **changes)
    return doc


TEST_SCALE = {"problem": {"widths": [32, 32], "n_train": 500},
              "record": {"projection_dim": 0, "top_k": 1, "curvature_every": 20}}


def test_gd_sharpness_settles_at_two_over_eta_for_three_step_sizes():
    """Scenario eos-gd-digits at test scale: median sharpness over the last 30 % of steps ∈ [0.95, 1.10]·2/η."""
    import flowsim
    ds = flowsim.run(_bundled("eos-gd-digits", steps=500, **TEST_SCALE), progress=False)
    assert len(ds.run) == 3
    assert ds.sharpness.sel(run="gd-0.4", step=0).item() < 0.6 * 2 / 0.4  # η = 0.4 starts far below: sharpening
    for run in ds.run.values:
        d = ds.sel(run=run)
        lr = d.lr.item()
        ratio = d.sharpness.sel(step=slice(350, None)).median().item() / (2 / lr)
        assert 0.95 <= ratio <= 1.10, (run, ratio)


def test_adam_preconditioned_sharpness_settles_at_38_over_eta():
    """Scenario adaptive-eos at test scale (its Adam run): median λ_max(P̃⁻¹H) over the last 30 % ∈ 38/η ± 10 %."""
    import flowsim
    doc = _bundled("adaptive-eos", steps=600, **TEST_SCALE)
    doc["runs"] = {"adam": doc["runs"]["adam"]}
    d = flowsim.run(doc, progress=False).sel(run="adam")
    threshold = 38 / d.lr.item()
    assert d.threshold.sel(step=100).item() == pytest.approx(threshold)
    ratio = d.precond_sharpness.sel(step=slice(420, None)).median().item() / threshold
    assert 0.9 <= ratio <= 1.1, ratio


def test_gd_on_xyzw_lands_on_minima_with_sharpness_just_below_two_over_eta():
    """A minimum is stable for GD only if S ≤ 2/η; on ½(1 − xyzw)² GD finds one right at that edge."""
    import flowsim
    doc = _bundled("landscapes-xyzw", record={"every": 100, "curvature_every": 100})
    ds = flowsim.run(doc, progress=False)
    for run in ("gd-0.42", "gd-0.45"):
        d = ds.sel(run=run)
        assert d.loss.isel(step=-1).item() < 1e-12
        ratio = d.sharpness.isel(step=-1).item() / (2 / d.lr.item())
        assert 0.98 <= ratio <= 1.0, (run, ratio)
    flow_like = ds.sel(run="gd-0.1")
    assert flow_like.sharpness.isel(step=-1).item() < 0.3 * 2 / 0.1  # small η: far from the edge


def test_sharpening_resumes_after_a_step_size_cut_up_to_the_new_edge():
    """Scenario eos-lr-drop at test scale (cut at step 300 of 1000): the median sharpness over the last 30 % of
    each phase is within [0.95, 1.10] of that phase's 2/η (η = 0.7, then 0.5)."""
    import flowsim
    doc = _bundled("eos-lr-drop", steps=1000, **TEST_SCALE)
    doc["runs"]["gd-drop"]["step_size"]["drop"]["at"] = 300
    d = flowsim.run(doc, progress=False).sel(run="gd-drop")
    assert d.threshold.sel(step=280).item() == pytest.approx(2 / 0.7)
    assert d.threshold.sel(step=300).item() == pytest.approx(2 / 0.5)
    before = d.sharpness.sel(step=slice(210, 290)).median().item() / (2 / 0.7)
    after = d.sharpness.sel(step=slice(790, None)).median().item() / (2 / 0.5)
    assert 0.95 <= before <= 1.10 and 0.95 <= after <= 1.10, (before, after)
    assert d.sharpness.sel(step=300).item() < 0.85 * 2 / 0.5  # at the cut it is well below the new edge


def test_curvature_keys_that_cannot_be_measured_are_one_line_errors_before_anything_runs():
    import flowsim
    from flowsim.scenario import ScenarioError
    with pytest.raises(ScenarioError, match=r"^record\.top_k: 5 is more than the 3 parameters$"):
        flowsim.run(_quadratic_scenario({"gd": {"lr": 0.1}}, top_k=5), progress=False)
    doc = _quadratic_scenario({"gd": {"lr": 0.1}}, noise_kernel=True)
    with pytest.raises(ScenarioError, match=r"^record\.noise_kernel: "):
        flowsim.run(doc, progress=False)


@pytest.mark.parametrize("dtype, rel", [("float64", 1e-6), ("float32", 1e-2)])
def test_difference_hessian_operator_is_the_hessian_to_the_root_of_machine_epsilon(mlp_and_hessian, dtype, rel):
    """On a smooth (tanh) network the forward difference of gradients matches the dense float64 Hessian to
    O(√ε_m) (1.5e-8 in float64, 3.5e-4 in float32; the bounds allow the third-derivative constant), and reuses
    a given ∇L(w) without changing the product."""
    from flowsim.solvers.curvature import hessian_operator
    p, H = mlp_and_hessian
    q = p
    if dtype != "float64":
        q = build_problem(SMOOTH_MLP, dtype=dtype, device="cpu")
        H = torch.func.hessian(p.loss)(q.w0.double())
    w = q.w0
    v = torch.randn(p.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = H @ v
    Hv = hessian_operator(q, w, method="difference")(v.to(w.dtype)).double()
    assert ((Hv - exact).norm() / exact.norm()).item() <= rel
    g = q.loss_and_grad(w)[1]
    torch.testing.assert_close(hessian_operator(q, w, method="difference", grad=g)(v.to(w.dtype)).double(), Hv)
    zero = torch.zeros_like(w)  # H·0 = 0, where a step of ε/‖v‖ would divide by zero
    assert torch.equal(hessian_operator(q, w, method="difference", grad=g)(zero), zero)
