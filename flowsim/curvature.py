"""Curvature of the loss along a trajectory: Hessian-vector products, a warm-started top-k eigensolver,
preconditioned sharpness, Hutchinson trace, and the noise kernel norm K of small-batch SGD.

Conventions: H = ∇²L(w) of the loss averaged over examples (``Problem`` conventions); the *sharpness* is
λ_max(H); the *preconditioned sharpness* is λ_max(P̃⁻¹H), computed on the symmetric P̃^{-1/2} H P̃^{-1/2}, where
P̃ is the rule's diagonal preconditioner without η (``Rule.precond``); its stability threshold is c/η with
c = ``Rule.threshold_coefficient()``. Every eigenvalue here is in loss/weight² units (no η inside).
This module measures; it never steps an optimizer and never touches storage.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor


class Eigenpairs(NamedTuple):
    """``vals`` (k,) descending, ``vecs`` (n, k) orthonormal columns, ``matvecs`` = operator applications used."""
    vals: Tensor
    vecs: Tensor
    matvecs: int


def top_eigenpairs(matvec: Callable[[Tensor], Tensor], n: int, k: int = 1, *, v0: Optional[Tensor] = None,
                   tol: float = 1e-6, max_iter: Optional[int] = None, dtype: torch.dtype = torch.float64,
                   device: Optional[torch.device] = None, seed: int = 0) -> Eigenpairs:
    """The k largest *algebraic* eigenvalues of a symmetric operator and their eigenvectors.

    Lanczos with full reorthogonalization (classical Gram–Schmidt applied twice). ``matvec`` maps one vector
    (n,) to (n,) — it is never called on batches. The Krylov space starts from the normalized sum of the
    columns of ``v0`` (n, j) when given (a warm start: pass the previous measurement's ``vecs``), else from a
    random vector drawn from ``seed`` (on the CPU, so results do not depend on the device). Stops when every
    one of the top k Ritz pairs (θ, y) has residual ‖A y − θ y‖ ≤ tol · ‖T‖₂, with ‖T‖₂ (the largest |Ritz
    value|) estimating ‖A‖₂; each returned θ is then within tol · ‖A‖₂ of an eigenvalue of A (and in practice
    within ≈ ‖r‖²/gap). ``max_iter`` bounds the Krylov dimension (default min(n, 300)); when it is reached the
    best Ritz pairs are returned. If the Krylov space becomes invariant before k pairs converge, it is
    extended by a random vector orthogonal to it. Like every Krylov method it cannot see directions absent
    from its start vector: a warm start that is an exact invariant subspace of A returns that subspace's
    eigenpairs. ``dtype``/``device``: those of the vectors (default: ``v0``'s, else float64 on the default
    device). Returns :class:`Eigenpairs` (vals, vecs, matvecs).
    """
    if not 1 <= k <= n:
        raise ValueError(f"k: must be in [1, n={n}], got {k}")
    if tol <= 0:
        raise ValueError(f"tol: must be > 0, got {tol}")
    if v0 is not None:
        v0 = v0.reshape(n, -1)
        dtype, device = v0.dtype, v0.device if device is None else device
    device = torch.get_default_device() if device is None else torch.device(device)
    m_max = min(n, 300) if max_iter is None else min(n, max_iter)
    if m_max < k:
        raise ValueError(f"max_iter: must be ≥ k={k}, got {max_iter}")
    gen = torch.Generator().manual_seed(seed)

    def random_vector() -> Tensor:
        return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    Q = torch.empty(m_max, n, dtype=dtype, device=device)
    q = v0.to(dtype=dtype, device=device).sum(1) if v0 is not None else random_vector()
    if q.norm() == 0:
        q = random_vector()
    q = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    theta = S = None
    for m in range(1, m_max + 1):
        Q[m - 1] = q
        z = matvec(q)
        alpha = torch.dot(q, z).item()
        z = z - alpha * q - (beta * Q[m - 2] if m > 1 else 0)
        for _ in range(2):
            z = z - Q[:m].T @ (Q[:m] @ z)
        beta = z.norm().item()
        alphas.append(alpha)
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        theta, S = theta.flip(0), S.flip(1)
        scale = max(theta.abs().max().item(), torch.finfo(dtype).tiny)
        residuals = beta * S[m - 1, :k].abs()
        if m >= k and bool((residuals <= tol * scale).all()):
            break
        if m == m_max:
            break
        betas.append(beta)
        if beta <= 1e3 * torch.finfo(dtype).eps * scale:
            z = random_vector()
            for _ in range(2):
                z = z - Q[:m].T @ (Q[:m] @ z)
            betas[-1] = beta = 0.0
            q = z / z.norm()
        else:
            q = z / beta
    vecs = Q[:m].T @ S[:, :k].to(dtype=dtype, device=device)
    return Eigenpairs(theta[:k].to(dtype=dtype, device=device), vecs, m)
