"""Curvature of the loss along a trajectory: Hessian-vector products, a warm-started top-k eigensolver,
preconditioned sharpness, the gradient-noise trace, and the noise kernel norm K of small-batch SGD.

Conventions: H = ∇²L(w) of the loss averaged over examples (``Problem`` conventions); the *sharpness* is
λ_max(H); the *preconditioned sharpness* is λ_max(P̃⁻¹H), computed on the symmetric P̃^{-1/2} H P̃^{-1/2}, where
P̃ is the rule's diagonal preconditioner without η (``Rule.precond``); its stability threshold is c/η with
c = ``Rule.threshold_coefficient()``. Every eigenvalue here is in loss/weight² units (no η inside).
This module measures; it never steps an optimizer, never records and never touches storage.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple, Optional

import numpy as np
import scipy.linalg
import torch
from scipy.linalg.lapack import dsyevd
from torch import Tensor


SQRT_EPS64 = math.sqrt(np.finfo(np.float64).eps)


class Eigenpairs(NamedTuple):
    """``vals`` (k,) descending, ``vecs`` (n, k) orthonormal columns, ``matvecs`` = operator applications used."""
    vals: Tensor
    vecs: Tensor
    matvecs: int


def top_eigenpairs(matvec: Callable[[Tensor], Tensor], n: int, k: int = 1, *, v0: Optional[Tensor] = None,
                   tol: float = 1e-6, max_iter: Optional[int] = None, dtype: torch.dtype = torch.float64,
                   device: Optional[torch.device] = None, seed: int = 0, values_only: bool = False) -> Eigenpairs:
    """The k largest *algebraic* eigenvalues of a symmetric operator and their eigenvectors.

    Lanczos with full reorthogonalization (classical Gram–Schmidt applied twice). ``matvec`` maps one
    vector (n,) to (n,) — it is never called on batches. The Krylov space starts from the normalized sum of the
    columns of ``v0`` (n, j) when given (a warm start: pass the previous measurement's ``vecs``), else from a
    random vector drawn from ``seed`` (on the CPU, so results do not depend on the device). Stops when every
    one of the top k Ritz pairs (θ, y) has residual r = ‖A y − θ y‖ ≤ tol · s, s = max_{i≤k} |θ_i| (floored at
    √ε_64 · ‖T‖₂, ‖T‖₂ the largest |Ritz value|); each returned θ is then within tol · s of an eigenvalue of A
    (and in practice within ≈ r²/gap). Scaling by the wanted Ritz values rather than by ‖T‖₂ matters for
    indefinite operators: a preconditioned Hessian with eigenvalues ≈ −1e6 and a top one of 5e4 would otherwise
    accept a top Ritz value of 81 after two products. With ``values_only`` — when only the eigenvalues must be
    accurate, as for sharpness — a pair also counts as converged once its eigenvalue error estimate is below
    tol · s: θ moved by at most that since the previous Krylov step, r²/gap is below it (gap: the distance to
    the nearest other Ritz value), and r ≤ 0.3 √tol · s (so that r²/gap ≤ tol for any relative gap ≥ 0.09
    even though the Ritz gap overestimates the true one). This heuristic roughly halves the products at tol
    1e-3; ``python -m benchmarks curvature`` measures its errors against dense eigenvalues. ``max_iter`` bounds the
    Krylov dimension (default min(n, 300)); when it is reached the best Ritz pairs are returned. If the Krylov
    space becomes invariant before k pairs converge, it is extended by a random vector orthogonal to it. Like
    every Krylov method it cannot see directions absent from its start vector: a warm start that is an exact
    invariant subspace of A returns that subspace's eigenpairs. The vectors have ``v0``'s dtype when it is
    given, else ``dtype``; ``device`` defaults to ``v0``'s, else the default device. Returns
    :class:`Eigenpairs` (vals, vecs, matvecs).
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

    Q = torch.empty(m_max, n, dtype=dtype, device=device)  # the Lanczos vectors, one per row
    q = v0.to(dtype=dtype, device=device).sum(1) if v0 is not None else random_vector()
    if q.norm() == 0:
        q = random_vector()
    torch.div(q, q.norm(), out=Q[0])
    T = np.zeros((m_max, m_max))  # the Lanczos tridiagonal, filled as it grows (float64, on the host)
    tiny = torch.finfo(dtype).tiny
    previous: list = []
    for m in range(1, m_max + 1):
        z = matvec(Q[m - 1])
        Qm = Q[:m]
        coefficients = torch.mv(Qm, z)  # the last is α = qᵀAq; the rest vanish in exact arithmetic, but β_{m−1}
        alpha = coefficients[m - 1].item()
        z = torch.addmv(z, Qm.T, coefficients, alpha=-1)  # the three-term recurrence and a Gram–Schmidt pass
        z = torch.addmv(z, Qm.T, torch.mv(Qm, z), alpha=-1)  # and once more ("twice is enough")
        beta = torch.linalg.vector_norm(z).item()
        T[m - 1, m - 1] = alpha
        theta, S, _ = dsyevd(T[:m, :m])  # LAPACK directly: np.linalg.eigh's checks cost as much as the solve
        # Python floats from here: for a handful of Ritz values they are several times faster than numpy calls
        theta, last = theta.tolist()[::-1], S[m - 1].tolist()[::-1]
        norm = max(abs(theta[0]), abs(theta[-1]), tiny)  # ‖T‖₂, an estimate of ‖A‖₂
        # tolerances scale with the wanted Ritz values (as ARPACK's): scaled by ‖T‖, a large negative eigenvalue
        # would pass a top Ritz value that has not yet seen the top eigenvector
        scale = max(max(abs(t) for t in theta[:k]), SQRT_EPS64 * norm, tiny)
        converged = m >= k and all(
            _ritz_converged(theta, i, beta * abs(last[i]), previous, tol, scale, values_only and m > k)
            for i in range(k))
        previous = theta
        if converged or m == m_max:
            break
        if beta <= 1e3 * torch.finfo(dtype).eps * norm:
            z = random_vector()
            for _ in range(2):
                z = z - Qm.T @ (Qm @ z)
            beta = 0.0
            torch.div(z, z.norm(), out=Q[m])
        else:
            torch.div(z, beta, out=Q[m])
        T[m - 1, m] = T[m, m - 1] = beta
    vecs = Q[:m].T @ torch.from_numpy(S[:, ::-1][:, :k].copy()).to(dtype=dtype, device=device)
    return Eigenpairs(torch.tensor(theta[:k], dtype=dtype, device=device), vecs, m)


def block_eigenpairs(matvec: Callable[[Tensor], Tensor], V0: Tensor, k: int, *, tol: float = 1e-6,
                     max_iter: int = 2, seed: int = 0, values_only: bool = False) -> Eigenpairs:
    """The k largest eigenpairs of a symmetric operator by LOBPCG (Knyazev 2001, without preconditioner) with
    soft locking, warm-started from the block ``V0`` (n, p ≥ k; the block size is p).

    Each iteration applies the operator only to the residuals of the top k pairs not yet converged and takes the
    Rayleigh–Ritz pairs of [V, R, P] (V the block, R those residuals, P the previous update directions), so a
    warm start that already holds its pairs to ``tol`` costs p products and each pair that is not costs one more
    per iteration. The block's other p − k columns are carried, not iterated: they enter every Rayleigh–Ritz (a
    direction that rises among them is seen) and come back after the top k as the block's Ritz pairs, not
    necessarily converged (each Ritz value a lower bound on the eigenvalue of its rank), at one product each per
    solve. Convergence is :func:`top_eigenpairs`'s: residual ≤ tol · s for each of the top k (s their
    largest |θ|), or with ``values_only`` the eigenvalue error estimate. The Ritz values of a block are lower
    bounds on the eigenvalues they approximate, and a block cannot see a direction far from its span, so a block
    started from the previous solve's vectors is the tool for a spectrum that moves little between solves; if
    it has not converged after ``max_iter`` iterations, warm-started Lanczos finishes from its vectors. More
    iterations cost fewer products on the central flows of RMSProp and Adam (8: 7.2k over 200 steps each,
    against 9.5k and 12.2k at 2), but from a random block LOBPCG can settle on an interior eigenpair whose
    residual passes (tests/test_curvature.py: 1.961 for the third of 2.285, 2.023, 2.000 at 8 iterations), and
    Lanczos does not. ``matvec`` maps (n,) to (n,). Returns :class:`Eigenpairs` (``matvecs``: products used,
    Lanczos's included)."""
    n, p = V0.shape
    if not 1 <= k <= p:
        raise ValueError(f"k: must be in [1, p={p}] (the columns of V0), got {k}")
    apply = lambda V: torch.stack([matvec(V[:, j]) for j in range(V.shape[1])], 1)  # noqa: E731
    limit = 0.01 / torch.finfo(V0.dtype).eps  # the largest condition of [V, R, P]'s Gram matrix that is kept
    V = torch.linalg.qr(V0).Q
    S, AS = V, apply(V)
    products, previous, Pd, APd = p, None, None, None
    without_p = p  # the columns of S before P's: [V, R]
    for iteration in range(max_iter + 1):
        GA = (S.T @ AS).double().cpu().numpy()
        GB = (S.T @ S).double().cpu().numpy()
        if np.linalg.cond(GB) > limit:  # P has become dependent on [V, R]: drop it
            S, AS = S[:, :without_p], AS[:, :without_p]
            GA, GB = GA[:S.shape[1], :S.shape[1]], GB[:S.shape[1], :S.shape[1]]
        theta, C = scipy.linalg.eigh(0.5 * (GA + GA.T), 0.5 * (GB + GB.T))
        theta, C = theta[::-1][:p].copy(), torch.from_numpy(C[:, ::-1][:, :p].copy()).to(V)
        if iteration > 0:  # the update directions: the part of the new block outside the old one
            Pd, APd = S[:, p:] @ C[p:], AS[:, p:] @ C[p:]
            norm = Pd.norm(dim=0).clamp(min=torch.finfo(V.dtype).tiny)
            Pd, APd = Pd / norm, APd / norm
        V, AV = S @ C, AS @ C
        R = AV - V * torch.from_numpy(theta).to(V)
        residual = R.norm(dim=0).tolist()
        values = theta.tolist()
        scale = max(max(abs(t) for t in values[:k]), SQRT_EPS64 * max(abs(values[0]), abs(values[-1])),
                    torch.finfo(V.dtype).tiny)
        active = [i for i in range(k) if not _ritz_converged(values, i, residual[i], previous, tol, scale,
                                                             values_only and previous is not None)]
        previous = values
        if not active:
            return Eigenpairs(torch.tensor(values, dtype=V.dtype, device=V.device), V, products)
        if iteration == max_iter:
            break
        Ra = R[:, active]
        Ra = torch.linalg.qr(Ra - V @ (V.T @ Ra)).Q
        ARa = apply(Ra)
        products += len(active)
        S, AS = torch.cat([V, Ra], 1), torch.cat([AV, ARa], 1)
        without_p = S.shape[1]
        if Pd is not None:
            S, AS = torch.cat([S, Pd[:, active]], 1), torch.cat([AS, APd[:, active]], 1)
    rest = top_eigenpairs(matvec, n, k, v0=V[:, :k], tol=tol, dtype=V.dtype, device=V.device, seed=seed,
                          values_only=values_only)
    others = V[:, k:] - rest.vecs @ (rest.vecs.T @ V[:, k:])  # the block's other Ritz vectors, kept orthonormal
    others = torch.linalg.qr(others).Q
    return Eigenpairs(torch.cat([rest.vals, torch.tensor(values[k:], dtype=V.dtype, device=V.device)]),
                      torch.cat([rest.vecs, others], 1), products + rest.matvecs)


def _ritz_converged(theta: list, i: int, residual: float, previous: list, tol: float, scale: float,
                    values_only: bool) -> bool:
    """Whether the Ritz value ``theta[i]`` (of the descending list ``theta``; ``previous``: the list one Krylov
    step earlier) with ``residual`` ‖A y − θ y‖ has converged to ``tol · scale``: by its residual or, with
    ``values_only``, by its eigenvalue error estimate (the rules are in ``top_eigenpairs``)."""
    if residual <= tol * scale:
        return True
    if not values_only or residual > 0.3 * math.sqrt(tol) * scale:
        return False
    gap = min(abs(theta[i] - t) for j, t in enumerate(theta) if j != i)
    error = max(abs(theta[i] - previous[i]), residual ** 2 / gap if gap > 0 else math.inf)
    return error <= tol * scale


# ---- operators ----------------------------------------------------------------------------------------------
HVP_METHODS = ("reverse", "forward", "difference")


def hessian_operator(problem, w: Tensor, idx: Optional[Tensor] = None, method: str = "reverse",
                     grad: Optional[Tensor] = None) -> Callable[[Tensor], Tensor]:
    """v ↦ H(w) v for the loss on the examples ``idx`` (all when None).

    ``reverse`` (default, exact): double backward — the gradient's graph is built once at w, then each product
    is one backward pass through it. ``forward`` (exact): forward-over-reverse (``Problem.hvp``, jvp of grad),
    which rebuilds everything per product. ``difference`` (approximate): the forward difference of gradients
    (∇L(w + εv) − ∇L(w))/ε, ε = √ε_m·max(1, ‖w‖)/‖v‖ with ε_m the dtype's machine epsilon: one plain gradient per
    product and no graph, with a relative error of order √ε_m where the loss is smooth — enough for an eigenvalue
    to 1e-2, not for third derivatives. Which is cheaper depends on the model (docs/step-size.md gives figures).
    On a piecewise-linear (ReLU, max-pool) network it is not the Hessian: it also counts the kinks that a
    perturbation of size ε crosses.
    ``grad``: ∇L(w) on idx where already computed (difference).
    """
    if method == "forward":
        return lambda v: problem.hvp(w, v, idx)
    if method == "difference":
        g0 = problem.loss_and_grad(w, idx)[1] if grad is None else grad
        return difference_product(lambda u: problem.loss_and_grad(u, idx)[1], w, g0)
    if method != "reverse":
        raise ValueError(f"method: must be one of {HVP_METHODS}, got {method!r}")
    return LossGraph(problem, w, idx).hvp


def difference_product(fn: Callable[[Tensor], Tensor], x: Tensor, fx: Tensor) -> Callable[[Tensor], Tensor]:
    """v ↦ J v for the Jacobian J of ``fn`` at x (``fx`` = fn(x)), by the forward difference (fn(x + εv) − fx)/ε,
    ε = √ε_m·max(1, ‖x‖)/‖v‖ with ε_m the dtype's machine epsilon: one evaluation of fn per product, with a
    relative error of order √ε_m where fn is smooth (a zero v gives 0). Where fn is piecewise linear (ReLU) it also
    counts the kinks that a perturbation of size ε crosses."""
    scale = math.sqrt(torch.finfo(x.dtype).eps) * max(1.0, x.norm().item())

    def product(v: Tensor) -> Tensor:
        norm = v.norm().item()
        if norm == 0:  # J0 = 0 (CDAT's zero update on a batch whose gradient is exactly 0)
            return torch.zeros_like(v)
        eps = scale / norm
        return (fn(x + eps * v) - fx) / eps
    return product


class LossGraph:
    """L(w), ∇L(w) on the examples ``idx`` (all when None) with the gradient's graph kept: one forward and one
    backward pass, after which each Hessian-vector product (double backward) and third-derivative term at w is
    one more backward pass through it. A step that needs its gradient and curvature at the same point pays for
    one graph."""

    def __init__(self, problem, w: Tensor, idx: Optional[Tensor] = None):
        with torch.enable_grad():
            self.leaf = w.detach().requires_grad_(True)
            self.loss = problem.loss(self.leaf, idx)
            (self.g,) = torch.autograd.grad(self.loss, self.leaf, create_graph=True)

    def grad(self) -> Tensor:
        return self.g.detach()

    def hvp(self, v: Tensor) -> Tensor:
        """H(w) v (one backward pass through the gradient's graph)."""
        with torch.enable_grad():
            return torch.autograd.grad(self.g, self.leaf, v, retain_graph=True)[0].detach()

    def third_derivatives(self, U: Tensor) -> Tensor:
        """T (k, k, n) with T[i, j] = ∇_w(uᵢᵀ H(w) uⱼ) for the columns of U (n, k): reverse mode over the
        gradient's graph (Hu_j kept with its graph, then one backward per pair i ≤ j; mirrored)."""
        k = U.shape[1]
        T = U.new_empty(k, k, U.shape[0])
        with torch.enable_grad():
            for j in range(k):
                (hu,) = torch.autograd.grad(self.g, self.leaf, U[:, j], retain_graph=True, create_graph=True)
                for i in range(j + 1):
                    if hu.requires_grad:
                        (T[i, j],) = torch.autograd.grad(hu, self.leaf, U[:, i], retain_graph=True)
                    else:  # H does not depend on w (a quadratic): no third derivative
                        T[i, j] = 0.0
                    T[j, i] = T[i, j]
        return T


def preconditioned(matvec: Callable[[Tensor], Tensor], precond: Tensor) -> Callable[[Tensor], Tensor]:
    """v ↦ P̃^{-1/2} A P̃^{-1/2} v for a diagonal P̃ > 0 (a vector, or a 1-element tensor for a scalar P̃).

    Its eigenvalues are those of P̃⁻¹A; an eigenvector u of it gives P̃^{-1/2} u for P̃⁻¹A.
    """
    d = precond.rsqrt()
    return lambda v: d * matvec(d * v)


def precond_eigenpairs(hvp: Callable[[Tensor], Tensor], precond: Optional[Tensor], w: Tensor, k: int = 1, *,
                       v0: Optional[Tensor] = None, tol: float = 1e-3, max_iter: Optional[int] = None, seed: int = 0,
                       values_only: bool = True, method: Literal["lanczos", "lobpcg"] = "lanczos",
                       block: Optional[int] = None) -> Eigenpairs:
    """The top k eigenpairs of P̃^{-1/2} H P̃^{-1/2} at w — the eigenvalues of P̃⁻¹H, the preconditioned sharpness
    first. ``hvp`` is v ↦ Hv, ``precond`` the diagonal P̃ (a vector or a 1-element tensor; None for the identity:
    then it is λ_max(H)), ``v0`` the previous ``vecs`` (a warm start). The one helper behind every sharpness in
    flowsim: probes, flows, the central flow and the edge controller.

    ``method``: warm-started Lanczos (:func:`top_eigenpairs`, from the sum of v0's columns), or, where a block of
    k pairs is tracked from one solve to the next at a small move of w (the central flow's substeps), LOBPCG from
    that block (:func:`block_eigenpairs`; v0's first ``block`` columns (default k), random ones added when the
    block grew; cold: Lanczos). With ``block`` > k LOBPCG converges the top k pairs and returns the block's other
    Ritz pairs after them, unconverged (the central flow carries the pairs below its edge so). ``max_iter`` bounds
    Lanczos's Krylov dimension. Measured products per solve (``python -m benchmarks
    central-speed``): on the central flow's substeps LOBPCG needs fewer, since a block that is still converged costs
    k products where Lanczos needs k + 2 or more; from a stale or random start Lanczos needs fewer (a random 200 ×
    200 test matrix with a warm start perturbed by 1e-3 to 1e-1: 9–14 against 12–33)."""
    if method not in ("lanczos", "lobpcg"):
        raise ValueError(f"method: must be 'lanczos' or 'lobpcg', got {method!r}")
    if block is not None and (method != "lobpcg" or not k <= block <= w.numel()):
        raise ValueError(f"block: a LOBPCG block of k={k} to n={w.numel()} columns, got {block} with method "
                         f"{method!r}")
    op = hvp if precond is None else preconditioned(hvp, precond)
    if method == "lobpcg" and v0 is not None:
        p = k if block is None else block
        v0 = v0.reshape(w.numel(), -1)[:, :p].to(w)
        if v0.shape[1] < p:  # more pairs than last time: random columns for the new ones
            gen = torch.Generator().manual_seed(seed)
            extra = torch.randn(w.numel(), p - v0.shape[1], generator=gen, dtype=torch.float64)
            v0 = torch.cat([v0, extra.to(v0)], 1)
        return block_eigenpairs(op, v0, k, tol=tol, seed=seed, values_only=values_only)
    return top_eigenpairs(op, w.numel(), k, v0=v0, tol=tol, max_iter=max_iter, dtype=w.dtype, device=w.device,
                          seed=seed, values_only=values_only)


# ---- noise --------------------------------------------------------------------------------------------------
def ntk_eigenvalues(problem, w: Tensor, idx: Optional[Tensor] = None) -> Tensor:
    """Eigenvalues (descending) of the empirical NTK Θ = J Jᵀ / D on the D examples ``idx`` (all when None).

    J is the (D·C) × P Jacobian of the C model outputs per example; for the MSE loss ½‖f − y‖² averaged over
    examples, Θ's nonzero eigenvalues are those of the Gauss–Newton matrix JᵀJ/D. Returns the min(D·C, P)
    eigenvalues of the smaller of the two Gram matrices (the rest are zero). Memory: D·C·P numbers.
    """
    X = problem.X if idx is None else problem.X[idx]
    J = torch.func.jacrev(lambda u: problem.outputs(u, X).reshape(-1))(w.detach())
    gram = J @ J.T if J.shape[0] <= J.shape[1] else J.T @ J
    return torch.linalg.eigvalsh(gram / X.shape[0]).flip(0)


def noise_kernel_norm(ntk_eigs: Tensor, lr: float, batch_size: int, n_examples: int, n_outputs: int = 1, *,
                      replacement: bool = False) -> float:
    """K = (κ/C) Σ_α ηλ_α / (2 − (1 − κ)ηλ_α), the noise kernel norm of SGD with batch B (dimensionless).

    λ_α: the D·C eigenvalues of the NTK Θ = JJᵀ/D (``ntk_eigenvalues``; loss/weight², so ηλ_α is a number)
    for the MSE loss ½‖f − y‖² averaged over examples; η = ``lr``; D = ``n_examples``; C = ``n_outputs``;
    κ = (1/B − 1/D)·D/(D − 1) for a uniformly random B-subset per step (both flowsim samplers draw without
    replacement within a step), κ = 1/B for B draws with ``replacement``. Modes with ηλ_α ≥ 2 give inf.

    Derivation (linear model, residual r = f − y ∈ ℝ^{DC}, after Agarwala & Pennington 2024, arXiv 2404.19261):
    a step on batch B is r ← (I − ηΘ − ηΘΔ) r with Δ = (D/B)P_B − I, P_B the batch's diagonal selector
    (multiplicities with replacement), E Δ = 0 and E[Δ M Δ] = κ(D·bdiag M − M), bdiag keeping the C×C block of
    each example. The second moment M = E rrᵀ thus obeys exactly
    M ← (I − ηΘ)M(I − ηΘ) − κη²ΘMΘ + κDη²Θ (bdiag M) Θ, on the range of Θ where r lives.
    Where the NTK eigenvectors are *flat* — bdiag(Σ_{α: λ_α = λ} u_α u_αᵀ) = (m_λ/DC)·I for every nonzero
    eigenvalue λ of multiplicity m_λ (e.g. a Hadamard design; a linear model f = Wx has Θ = (XXᵀ/D) ⊗ I_C and
    needs this of XXᵀ only) — the diagonal m_α = u_αᵀMu_α closes: m_α ← [(1 − ηλ_α)² − κη²λ_α²] m_α +
    (κ/C)η²λ_α² Σ_β m_β, and its spectral radius is 1 exactly when K = 1 (ρ < 1 ⇔ K < 1). Otherwise the
    exact threshold depends on the eigenvectors as well (fourth moments of their entries), and K is an
    approximation that treats the residual as spread evenly over examples and outputs (docs/stochastic-edge.md).
    For epoch sampling (batches of one epoch not independent) K is the same approximation.
    """
    x = lr * ntk_eigs.double()
    if bool((x >= 2).any()):
        return float("inf")
    B, D = batch_size, n_examples
    kappa = 1.0 / B if replacement else (1.0 / B - 1.0 / D) * D / (D - 1)
    return kappa * (x / (2 - (1 - kappa) * x)).sum().item() / n_outputs


def gradient_noise_trace(problem, w: Tensor, idx: Optional[Tensor] = None) -> float:
    """tr Σ(w) = (1/D) Σ_i ‖∇ℓ_i − ∇L‖² on the D examples ``idx``: the per-example gradient covariance trace."""
    G = problem.per_example_grads(w, idx)
    return (G - G.mean(0)).pow(2).sum(1).mean().item()


