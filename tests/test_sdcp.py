"""The SDCP solver: complementarity on random instances, the X = 0 reduction, the one-direction closed form,
and agreement with an independent convex solver (cvxpy, Clarabel) on the equivalent quadratic problem."""
import numpy as np
import pytest

from flowsim.solvers.sdcp import solve_sdcp

cp = pytest.importorskip("cvxpy", reason="cvxpy is the independent reference (the 'test' extra installs it)")


def residual_operator(A0: np.ndarray, B: np.ndarray):
    """A(X) = A0 + B[X] as a function of X."""
    k = A0.shape[0]
    return lambda X: A0 + (B @ X.reshape(-1)).reshape(k, k)


def random_instance(k: int, rng: np.random.Generator):
    """A0 symmetric with negative eigenvalues; B = Sᵀ G Gᵀ S, positive definite on symmetric matrices."""
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    S = np.zeros((len(pairs), k * k))  # symmetric-coordinate extraction: (svec-like) = S vec(X)
    for r, (i, j) in enumerate(pairs):
        S[r, i * k + j] = S[r, j * k + i] = 0.5 if i != j else 1.0
    G = rng.standard_normal((len(pairs), len(pairs)))
    B = S.T @ (G @ G.T + 0.1 * np.eye(len(pairs))) @ S
    M = rng.standard_normal((k, k))
    return M + M.T - 0.5 * np.eye(k), B


def reference(A0, B):
    """min ½⟨X, B[X]⟩ + ⟨A0, X⟩ over X ⪰ 0 with cvxpy; returns (X, objective)."""
    k = A0.shape[0]
    w, V = np.linalg.eigh(0.5 * (B + B.T))
    L = V * np.sqrt(np.clip(w, 0, None))
    X = cp.Variable((k, k), PSD=True)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ cp.vec(X, order="C")) + cp.sum(cp.multiply(A0, X))))
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    return X.value, prob.value


def objective(A0, B, X):
    return 0.5 * X.reshape(-1) @ B @ X.reshape(-1) + np.sum(A0 * X)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_random_instances_are_complementary_and_match_cvxpy(k):
    rng = np.random.default_rng(100 + k)
    for _ in range(6):
        A0, B = random_instance(k, rng)
        X = solve_sdcp(A0, B)
        A = residual_operator(A0, B)(X)
        scale = np.linalg.norm(A0)
        assert np.allclose(X, X.T, atol=0)
        assert np.linalg.eigvalsh(X)[0] >= -1e-8 * scale
        assert np.linalg.eigvalsh(A)[0] >= -1e-8 * scale
        assert abs(np.sum(X * A)) <= 1e-8 * scale
        X_ref, f_ref = reference(A0, B)
        # the unique minimiser: same point, and our objective is no worse than the conic solver's
        assert objective(A0, B, X) <= f_ref + 1e-9 * scale
        assert np.linalg.norm(X - X_ref) <= 1e-4 * max(np.linalg.norm(X_ref), 1.0)


def test_psd_residual_reduces_to_zero_exactly():
    rng = np.random.default_rng(1)
    _, B = random_instance(3, rng)
    M = rng.standard_normal((3, 3))
    A0 = M @ M.T
    assert np.array_equal(solve_sdcp(A0, B), np.zeros((3, 3)))


def test_one_direction_closed_form():
    assert solve_sdcp([[-0.3]], [[2.0]])[0, 0] == pytest.approx(0.15, rel=1e-15)
    assert solve_sdcp([[0.3]], [[2.0]])[0, 0] == 0.0


def test_no_solution_is_an_error():
    with pytest.raises(ValueError, match="^B:"):
        solve_sdcp([[-1.0]], [[0.0]])
    with pytest.raises(ValueError, match="^B: must have shape"):
        solve_sdcp(np.eye(2), np.eye(3))
