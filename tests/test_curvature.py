"""Curvature: the eigensolver, preconditioned sharpness, trace and noise kernel against dense references,
and the edge-of-stability results measured through recorded scenarios at test scale."""
import pytest
import torch

from flowsim.curvature import top_eigenpairs
from flowsim.models import build_problem


@pytest.fixture(scope="module")
def mlp_and_hessian():
    """A float64 MLP on 200 digits (1482 parameters) and its dense Hessian at w0."""
    p = build_problem({"model": "mlp", "widths": [16, 16], "activation": "tanh", "dataset": "digits",
                       "n_train": 200, "loss": "mse"}, dtype="float64", device="cpu")
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
