"""The ``curvature`` benchmark: flowsim's warm-started Lanczos against PyHessian's power iteration.

Not a test: it prints timings, Hessian-vector-product (HVP) counts and their ratios in one run. PyHessian
(PyPI ``pyhessian``, GPL, not a flowsim dependency) is used when installed; otherwise that part is skipped with
a message. Everything runs on the CPU in float32 (PyHessian draws float32 vectors), against a dense float64
Hessian of the same model at the same weights.
"""
from __future__ import annotations

import time

import torch

from flowsim.curvature import hessian_operator, top_eigenpairs
from flowsim.models import build_problem

MODEL = {"model": "mlp", "widths": [32, 32], "activation": "tanh", "dataset": "digits", "n_train": 1000,
         "loss": "mse"}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _pyhessian_top1(problem, seed: int):
    """PyHessian's ``hessian(model, criterion, data).eigenvalues(top_n=1)`` (defaults: tol 1e-3, ≤ 100 iters)
    on the module behind ``problem``; returns (eigenvalue, HVP count)."""
    import pyhessian.hessian as ph

    module = build_module(problem)
    calls = {"n": 0}
    hvp = ph.hessian_vector_product

    def counted(*args, **kwargs):
        calls["n"] += 1
        return hvp(*args, **kwargs)
    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(seed)
        crit = lambda out, y: 0.5 * (out - y).pow(2).sum(1).mean()  # noqa: E731 - the Problem's mse
        vals, _ = ph.hessian(module, crit, data=(problem.X, problem.Y), cuda=False).eigenvalues(top_n=1)
    finally:
        ph.hessian_vector_product = hvp
    return vals[0], calls["n"]


def build_module(problem):
    """The float32 nn.Module with the problem's weights w0 (the MLP of MODEL)."""
    from flowsim.models.networks import MLPConfig
    cfg = MLPConfig.model_validate(MODEL)
    module = cfg.make_module((problem.X.shape[1],), problem.Y.shape[1]).to(problem.dtype)
    torch.nn.utils.vector_to_parameters(problem.w0, module.parameters())
    return module


def curvature(steps: int = 300, lr: float = 0.4, every: int = 10) -> int:
    """Top-1 Hessian eigenvalue to 1e-3 relative accuracy: HVP counts and wall time, flowsim vs PyHessian,
    cold; then warm-started tracking along a GD trajectory; then the two HVP methods."""
    p32 = build_problem(MODEL, dtype="float32", device="cpu")
    p64 = build_problem(MODEL, dtype="float64", device="cpu")
    p64.w0 = p32.w0.double()
    n = p32.n_params
    print(f"curvature: MLP {MODEL['widths']} tanh, digits n_train={MODEL['n_train']}, {n} parameters, "
          f"float32, CPU, {torch.get_num_threads()} threads")
    (H, t_dense) = _timed(lambda: torch.func.hessian(p64.loss)(p64.w0))
    exact = torch.linalg.eigvalsh(H)[-1].item()
    print(f"  dense float64 Hessian + eigvalsh: λ_max = {exact:.6f}  ({t_dense:.1f} s)")

    def flowsim_cold():
        return top_eigenpairs(hessian_operator(p32, p32.w0), n, 1, tol=1e-3, dtype=p32.dtype)
    flowsim_cold()
    res, t_fs = _timed(flowsim_cold)
    err_fs = abs(res.vals[0].item() - exact) / exact
    print(f"  flowsim Lanczos (tol 1e-3, cold) : {res.matvecs:4d} HVPs  {t_fs:7.3f} s  rel. error {err_fs:.1e}")
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        print("  PyHessian is not installed (pip install --no-deps pyhessian): comparison skipped")
    else:
        _pyhessian_top1(p32, 0)
        (val, count), t_ph = _timed(lambda: _pyhessian_top1(p32, 0))
        err_ph = abs(val - exact) / exact
        print(f"  PyHessian power iteration (tol 1e-3): {count:4d} HVPs  {t_ph:7.3f} s  rel. error {err_ph:.1e}")
        print(f"  ratios PyHessian/flowsim: HVPs {count / res.matvecs:.1f}x, time {t_ph / t_fs:.1f}x  (targets ≥ 3x)")

    w, v0, counts, errs = p32.w0.clone(), None, [], []
    for k in range(steps + 1):
        if k % every == 0:
            op = hessian_operator(p32, w)
            r = top_eigenpairs(op, n, 1, v0=v0, tol=1e-3, dtype=p32.dtype)
            if v0 is not None:
                counts.append(r.matvecs)
                ref = top_eigenpairs(op, n, 1, tol=1e-7, dtype=p32.dtype).vals[0].item()
                errs.append(abs(r.vals[0].item() - ref) / ref)
            v0 = r.vecs
        w = w - lr * p32.grad(w)
    print(f"  warm-started tracking along GD (η = {lr}, {steps} steps, every {every}): "
          f"{sum(counts) / len(counts):.1f} HVPs per measurement on average (target ≤ 6), "
          f"max rel. error {max(errs):.1e}; final λ_max = {ref:.3f} (2/η = {2 / lr:.3f})")

    v = torch.randn(n, dtype=p32.dtype, generator=torch.Generator().manual_seed(0))
    times = {}
    for method in ("reverse", "forward"):
        op = hessian_operator(p32, p32.w0, method=method)
        op(v)
        times[method] = _timed(lambda: [op(v) for _ in range(10)])[1] / 10
    print(f"  HVP: reverse (double backward, graph reused) {times['reverse'] * 1e3:.1f} ms, forward-over-reverse "
          f"{times['forward'] * 1e3:.1f} ms; ratio forward/reverse = {times['forward'] / times['reverse']:.1f}")
    return 0
