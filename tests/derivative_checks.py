"""Derivative checks shared by the model tests: HVPs and third-derivative terms against finite differences.

All in float64. Central differences with step ε = 1e-5 have truncation error O(ε²) and round-off O(1e-16/ε),
so a correct derivative agrees to ~1e-8 relative (the ViT's third derivative, whose error scales exactly as
ε² — 2.8e-4, 2.8e-6, 2.8e-8 at ε = 1e-3, 1e-4, 1e-5 — is the worst case here); a wrong formula (a missing
term, a wrong fused kernel) shows as an error of order 1e-1.
"""
import torch
from torch.func import grad, jvp


def unit_vectors(n: int, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    vs = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(count)]
    return [v / v.norm() for v in vs]


def hvp_fd_error(p, seed: int = 0, eps: float = 1e-5) -> float:
    """‖FD − Hv‖/‖Hv‖ with FD = (∇L(w + εv) − ∇L(w − εv)) / 2ε at w0, v a random unit vector."""
    (v,) = unit_vectors(p.n_params, 1, seed)
    fd = (p.grad(p.w0 + eps * v) - p.grad(p.w0 - eps * v)) / (2 * eps)
    hv = p.hvp(p.w0, v)
    return float((fd - hv).norm() / hv.norm())


def third_derivative(p, w, u, v):
    """∇_w(uᵀH(w)v): reverse mode over (forward over reverse)."""
    return grad(lambda x: u @ jvp(grad(p.loss), (x,), (v,))[1])(w)


def third_derivative_fd_error(p, seed: int = 0, eps: float = 1e-5) -> float:
    """Relative error of ∇_w(uᵀH(w)v) against (H(w + εu)v − H(w − εu)v) / 2ε, which equals it by the symmetry
    of the third-derivative tensor: ∂_u(H v) = D³L[u, v, ·] = ∇_w(uᵀHv)."""
    u, v = unit_vectors(p.n_params, 2, seed)
    exact = third_derivative(p, p.w0, u, v)
    fd = (p.hvp(p.w0 + eps * u, v) - p.hvp(p.w0 - eps * u, v)) / (2 * eps)
    return float((exact - fd).norm() / fd.norm())


def dense_hessian_error(p, seed: int = 0) -> tuple[float, float]:
    """(max |H v − hvp(v)| / max |H v|, asymmetry max |H − Hᵀ| / max |H|) for the dense torch.func.hessian."""
    H = torch.func.hessian(p.loss)(p.w0)
    (v,) = unit_vectors(p.n_params, 1, seed)
    Hv = H @ v
    return float((Hv - p.hvp(p.w0, v)).abs().max() / Hv.abs().max()), float((H - H.T).abs().max() / H.abs().max())
