"""The semidefinite complementarity problem (SDCP) that fixes the central flow's covariance, solved by hand.

SDCP(A0, B): find a symmetric k×k X with

    X ⪰ 0,    A(X) = A0 + B[X] ⪰ 0,    ⟨X, A(X)⟩ = 0,

where A0 is symmetric and B is a self-adjoint, positive semidefinite linear map on symmetric k×k matrices,
given as a (k², k²) matrix acting on the row-major ``X.reshape(-1)``. It is the optimality condition of the
convex problem min_X ½⟨X, B[X]⟩ + ⟨A0, X⟩ over X ⪰ 0; with B positive definite on symmetric matrices the
solution is unique. k is small (the number of critical directions, ≤ ~5), so everything is dense numpy in
float64. Three cases, cheapest first: A0 ⪰ 0 gives X = 0; k = 1 has the closed form x = max(0, −a0/b); otherwise
a primal-dual interior-point method (HKM direction, Mehrotra's centering heuristic) on the pair (X, Z = A(X)).
This module knows nothing about losses, optimizers or torch.
"""
from __future__ import annotations

import numpy as np


class SDCPError(ValueError):
    """The SDCP has no solution, or the interior-point method did not reach its tolerance."""


STALL_TOL = 1e-8  # accepted complementarity/residual when the iteration stalls at rounding level before tol


def solve_sdcp(A0, B, tol: float = 1e-12, max_iter: int = 200) -> np.ndarray:
    """The solution X (k×k, float64) of SDCP(A0, B); see the module docstring for conventions.

    ``tol``: relative accuracy of complementarity ⟨X, A⟩ and of the residual A0 + B[X] − Z, measured after
    scaling A0 and B to unit Frobenius norm. Raises ValueError when the shapes are wrong, and its subclass
    :class:`SDCPError` when A0 has a negative direction that B cannot fix (no solution) or the iteration stalls.
    """
    A0 = np.asarray(A0, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A0.ndim != 2 or A0.shape[0] != A0.shape[1]:
        raise ValueError(f"A0: must be a square matrix, got shape {A0.shape}")
    k = A0.shape[0]
    if B.shape != (k * k, k * k):
        raise ValueError(f"B: must have shape ({k * k}, {k * k}) for a {k}×{k} A0, got {B.shape}")
    A0 = 0.5 * (A0 + A0.T)
    if k == 0 or np.linalg.eigvalsh(A0)[0] >= 0:
        return np.zeros((k, k))
    B = _restrict_to_symmetric(B, k)
    if k == 1:
        a0, b = A0[0, 0], B[0, 0]
        if b <= 0:
            raise SDCPError(f"B: must be positive where A0 is negative (a0 = {a0:.3g}, b = {b:.3g}): no solution")
        return np.array([[-a0 / b]])
    a, b = np.linalg.norm(A0), np.linalg.norm(B)
    if b == 0:
        raise SDCPError("B: is zero while A0 has a negative eigenvalue: no solution")
    A0, B = A0 / a, B / b
    X = _interior_point(A0, B, k, tol, max_iter)
    return X * (a / b)


def _restrict_to_symmetric(B: np.ndarray, k: int) -> np.ndarray:
    """B composed with symmetrization on both sides: the same map on symmetric matrices, zero elsewhere."""
    T = B.reshape(k, k, k, k)
    T = 0.25 * (T + T.transpose(1, 0, 2, 3) + T.transpose(0, 1, 3, 2) + T.transpose(1, 0, 3, 2))
    return T.reshape(k * k, k * k)


def _max_step(M: np.ndarray, dM: np.ndarray) -> float:
    """Largest α ≤ 1 such that M + α dM ⪰ 0, for M ≻ 0."""
    d, V = np.linalg.eigh(M)
    if d[0] <= 0:
        return 0.0
    R = V / np.sqrt(d)  # M^{-1/2} up to rotation: Rᵀ M R = I
    lo = np.linalg.eigvalsh(R.T @ dM @ R)[0]
    return 1.0 if lo >= -1.0 else -1.0 / lo


def _interior_point(A0: np.ndarray, B: np.ndarray, k: int, tol: float, max_iter: int) -> np.ndarray:
    """Infeasible primal-dual path following for X ⪰ 0, Z = A0 + B[X] ⪰ 0, XZ = 0 (A0, B of order one)."""
    eye = np.eye(k)
    Bt = B.reshape(k, k, k, k)  # Bt[i, j, a, b] = (B[E_ab])_ij
    X, Z = eye.copy(), eye.copy()

    def sym(M):
        return 0.5 * (M + M.swapaxes(0, 1))

    for _ in range(max_iter):
        rp = A0 + (B @ X.reshape(-1)).reshape(k, k) - Z
        mu = np.sum(X * Z) / k
        if mu < tol and np.abs(rp).max() < tol:
            break
        Zi = np.linalg.inv(Z)
        # HKM: ΔX + sym(X ΔZ Z⁻¹) = σμZ⁻¹ − X with ΔZ = B[ΔX] + rp, solved as a k² × k² linear system
        K = np.eye(k * k) + sym(np.einsum("ip,pqab,qj->ijab", X, Bt, Zi)).reshape(k * k, k * k)
        lu_rhs = -X - sym(X @ rp @ Zi)

        def direction(sigma):
            rhs = lu_rhs + sigma * mu * Zi
            dX = np.linalg.solve(K, rhs.reshape(-1)).reshape(k, k)
            dX = 0.5 * (dX + dX.T)
            dZ = (B @ dX.reshape(-1)).reshape(k, k) + rp
            return dX, 0.5 * (dZ + dZ.T)

        dX, dZ = direction(0.0)
        alpha = min(_max_step(X, dX), _max_step(Z, dZ))
        sigma = (1.0 - alpha) ** 3 if alpha < 1 else 0.0
        dX, dZ = direction(max(sigma, 1e-2))
        alpha = min(1.0, 0.95 * min(_max_step(X, dX), _max_step(Z, dZ)))
        if alpha == 0.0:  # X or Z lost definiteness to rounding: the current point is as good as it gets
            break
        X, Z = X + alpha * dX, Z + alpha * dZ
    else:
        if mu > STALL_TOL or np.abs(rp).max() > STALL_TOL:  # a stall short of tol but below STALL_TOL is rounding
            raise SDCPError(f"SDCP: the interior-point method did not converge in {max_iter} iterations "
                             f"(μ = {mu:.2e}, residual {np.abs(rp).max():.2e})")
    return 0.5 * (X + X.T)
