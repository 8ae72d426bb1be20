"""The stochastic edge of stability: the noise kernel norm K against the exact second-moment map of SGD on a
linear model, SGD's own runs on both sides of K = 1, and the recorded batch sharpness and second-moment
contraction against dense Hessians (docs/stochastic-edge.md)."""
import itertools
import math

import numpy as np
import pytest
import torch

import flowsim
from flowsim.solvers.curvature import noise_kernel_norm, ntk_eigenvalues
from flowsim.models import build_problem
from flowsim.models.problem import Problem
from flowsim.solvers import Discrete, make_rule

D, B = 8, 2


def _linear(C=1, flat=True, seed=0):
    """f(x) = W x on D = 8 examples in d = 8 dimensions with XXᵀ/D = U diag(λ) Uᵀ, λ = 1.0, 0.9, …, 0.3; U a
    Hadamard matrix (flat eigenvectors: U_iα² = 1/D) or, with ``flat`` False, a random orthogonal one."""
    gen = torch.Generator().manual_seed(seed)
    if flat:
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < D:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)])
        U = H / math.sqrt(D)
    else:
        U = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]
    X = U * (D * torch.linspace(1.0, 0.3, D, dtype=torch.float64)).sqrt()
    Y = X @ torch.randn(D, C, generator=gen, dtype=torch.float64)
    return Problem.from_module(torch.nn.Linear(D, C, bias=False), X, Y, loss="mse", dtype="float64", device="cpu")


def _spectral_radius(p, lr, replacement):
    """ρ of M ↦ E_B[A_B M A_Bᵀ] for the residual map r ← A_B r = (I − (η/B) J J_Bᵀ-on-the-batch) r, averaged over
    every batch: all B-subsets, or all B-tuples with replacement."""
    C = p.Y.shape[1]
    J = torch.func.jacrev(lambda u: p.outputs(u, p.X).reshape(-1))(p.w0).numpy()   # (D·C) × P
    batches = list(itertools.product(range(D), repeat=B) if replacement else itertools.combinations(range(D), B))
    T = 0
    for batch in batches:
        counts = np.repeat(np.bincount(batch, minlength=D), C).astype(float)
        A = np.eye(D * C) - lr / B * (J @ J.T) * counts[None, :]
        T = T + np.kron(A, A)
    return max(abs(np.linalg.eigvals(T / len(batches))))


def _lr_where_k_is(p, B, k_target, replacement=False):
    eigs = ntk_eigenvalues(p, p.w0)
    lo, hi = 0.0, 2 / eigs[0].item()
    for _ in range(100):                           # K is increasing in η
        mid = (lo + hi) / 2
        K = noise_kernel_norm(eigs, mid, B, p.n_examples, p.Y.shape[1], replacement=replacement)
        lo, hi = (mid, hi) if K < k_target else (lo, mid)
    return lo


@pytest.mark.parametrize("C", [1, 2])
@pytest.mark.parametrize("replacement", [False, True])
def test_k_equals_one_exactly_where_the_second_moment_map_has_spectral_radius_one(C, replacement):
    """Flat NTK eigenvectors: ρ crosses 1 between η_K(1 − 1e-6) and η_K(1 + 1e-6), η_K where K = 1."""
    p = _linear(C)
    lr = _lr_where_k_is(p, B, 1.0, replacement)
    assert _spectral_radius(p, lr * (1 - 1e-6), replacement) < 1 < _spectral_radius(p, lr * (1 + 1e-6), replacement)


def _eigenvector_edge_matrix(p, lr, B):
    """G (D × D, C = 1): the exact condition for ρ = 1 on any design, d = G d for the diagonal d of the fixed
    point M (docs/stochastic-edge.md): G_ij = κD Σ_αβ U_iα U_jα U_iβ U_jβ k_αβ, k_αβ = x_α x_β / (x_α + x_β −
    (1 − κ) x_α x_β), x = ηλ, U the NTK eigenvectors (nonzero modes)."""
    lam, U = torch.linalg.eigh(p.X @ p.X.T / D)
    kappa = (1 / B - 1 / D) * D / (D - 1)
    x = lr * lam
    k = torch.outer(x, x) / (x[:, None] + x[None, :] - (1 - kappa) * torch.outer(x, x))
    return kappa * D * torch.einsum("ia,ja,ab,ib,jb->ij", U, U, k, U, U)


def test_k_is_an_approximation_where_the_eigenvectors_are_not_flat():
    """Same spectrum, random eigenvectors: the exact edge comes earlier than K = 1, and it is where the Perron
    root of G (eigenvalues and eigenvectors) is 1."""
    p = _linear(flat=False)
    assert _spectral_radius(p, _lr_where_k_is(p, B, 1.0), False) > 1.01
    lo, hi = 0.0, _lr_where_k_is(p, B, 1.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if torch.linalg.eigvals(_eigenvector_edge_matrix(p, mid, B)).abs().max() < 1 else (lo, mid)
    assert _spectral_radius(p, lo * (1 - 1e-6), False) < 1 < _spectral_radius(p, lo * (1 + 1e-6), False)


@pytest.mark.parametrize("sampling", ["iid", "epoch"])
def test_sgd_converges_below_k_one_and_diverges_above(sampling):
    p = _linear()
    for k_target, converges in ((0.8, True), (1.25, False)):
        process = Discrete(p, make_rule("gd"), seed=0, batch_size=B, options=Discrete.Options(sampling=sampling))
        traj, lr = process.start(p.w0), _lr_where_k_is(p, B, k_target)
        for _ in range(400):
            process.step(traj, lr, measure=False)
        ratio = p.loss(traj.w).item() / p.loss(p.w0).item()
        assert (ratio < 1e-6) if converges else not (ratio < 1e6), (k_target, ratio)


TINY = {"model": "mlp", "widths": [6], "activation": "tanh", "dataset": "digits", "classes": [0, 1], "n_train": 24,
        "loss": "mse"}


@pytest.fixture(scope="module")
def tiny():
    return build_problem(TINY, dtype="float64", device="cpu")


def _probe(batches=8):
    """The sharpness probe and, following it, the stochastic edge's over ``batches`` batches."""
    from flowsim.record import SharpnessProbe, StochasticEdgeProbe
    sharpness = SharpnessProbe(1, 1, 1e-10, None, 24)
    return sharpness, StochasticEdgeProbe(sharpness, batches)


def _top_eigenvector(p, w):
    return torch.linalg.eigh(torch.func.hessian(p.loss)(w))[1][:, -1]


def test_batch_sharpness_and_second_moment_contraction_match_dense_hessians(tiny):
    p, lr = tiny, 0.5
    process = Discrete(p, make_rule("gd"), seed=3, batch_size=4, options=Discrete.Options(sampling="iid"))
    traj = process.start(p.w0)
    for _ in range(5):
        process.step(traj, lr, measure=False)
    sharpness, edge = _probe()
    out = {**sharpness(traj, process, lr), **edge(traj, process, lr)}
    u = _top_eigenvector(p, traj.w)
    sharp, growth = [], []
    for i in range(8):
        idx = process.sampler.indices(traj.step + i)
        H = torch.func.hessian(lambda v: p.loss(v, idx))(traj.w)
        g = p.grad(traj.w, idx)
        sharp.append((g @ H @ g / (g @ g)).item())
        growth.append(((torch.eye(p.n_params, dtype=H.dtype) - lr * H) @ u).pow(2).sum().item())
    assert out["batch_sharpness"] == pytest.approx(np.mean(sharp), rel=1e-10)
    # the probe's eigenvector is Lanczos's (eig_tol 1e-10 on the eigenvalue, so ≈ 1e-5 on the vector)
    assert out["second_moment_contraction"] == pytest.approx(np.mean(growth), rel=1e-6)


def test_second_moment_contraction_in_full_batch_is_the_classical_edge(tiny):
    """With every batch the whole data set the measurement is (1 − ηλ_max)²: 1 exactly at η = 2/λ_max."""
    p = tiny
    lam = torch.linalg.eigvalsh(torch.func.hessian(p.loss)(p.w0))[-1].item()

    class WholeData:  # a sampler whose every batch is all examples
        def indices(self, step):
            return torch.arange(p.n_examples)

    for lr in (1.0 / lam, 2.0 / lam, 3.0 / lam):
        out = _probe()[1].measure(p, p.w0, WholeData(), 0, lr, _top_eigenvector(p, p.w0))
        assert out["second_moment_contraction"] == pytest.approx((1 - lr * lam) ** 2, rel=1e-8, abs=1e-12)


def test_stochastic_edge_costs_one_hessian_vector_product_per_batch_and_quantity(tiny, monkeypatch):
    """Once the sharpness has its eigenvector: exactly one product per batch for each quantity, 8 apiece at the
    default 8 batches (docs/stochastic-edge.md)."""
    import flowsim.record as record
    calls = []

    class Counted(record.LossGraph):
        def hvp(self, v):
            calls.append(1)
            return super().hvp(v)

    monkeypatch.setattr(record, "LossGraph", Counted)
    p, lr = tiny, 0.5
    process = Discrete(p, make_rule("gd"), seed=0, batch_size=4, options=Discrete.Options(sampling="iid"))
    traj = process.start(p.w0)
    _probe(8)[1].measure(p, traj.w, process.sampler, 0, lr, _top_eigenvector(p, p.w0))
    assert len(calls) == 2 * 8


def test_recorded_for_minibatch_sgd_runs_only():
    doc = {"name": "se", "device": "cpu", "dtype": "float64", "problem": TINY, "steps": 6,
           "runs": {"sgd": {"rule": "gd", "lr": 0.5, "batch_size": 4}, "gd": {"rule": "gd", "lr": 0.5},
                    "momentum": {"rule": "momentum", "lr": 0.5, "batch_size": 4}},
           "record": {"projection_dim": 0, "curvature_every": 3, "stochastic_edge": True,
                      "stochastic_edge_batches": 2}}
    ds = flowsim.run(doc, progress=False)
    for name in ("batch_sharpness", "second_moment_contraction"):
        assert np.isfinite(ds[name].sel(run="sgd").sel(step=[0, 3]).values).all(), name
        for other in ("gd", "momentum"):  # full batch; a step that is not I − ηH_B
            assert np.isnan(ds[name].sel(run=other).values).all(), (name, other)
    fig = flowsim.plot.stochastic_edge(ds, x="step")
    top, bottom = fig.axes
    assert [line.get_label() for line in top.lines] == ["sgd", "edge"]  # the other runs have nothing to draw
    x, y = top.lines[0].get_data()
    expected = (ds.batch_sharpness * ds.step_size / 2).sel(run="sgd").sel(step=[0, 3, 6]).values
    np.testing.assert_allclose(y, expected[np.isfinite(expected)])
    assert top.lines[1].get_ydata()[0] == 1.0 and bottom.lines[-1].get_ydata()[0] == 1.0
    from flowsim.report import render
    assert "Stochastic edge" in render(ds)


def test_stochastic_edge_without_a_minibatch_sgd_run_is_an_error():
    doc = {"name": "se", "device": "cpu", "problem": TINY, "steps": 2,
           "runs": {"gd": {"rule": "gd", "lr": 0.5}, "adam": {"rule": "adam", "lr": 0.01, "batch_size": 4}},
           "record": {"curvature_every": 1, "stochastic_edge": True}}
    with pytest.raises(ValueError, match="record.stochastic_edge: needs a minibatch SGD run"):
        flowsim.run(doc, progress=False)
