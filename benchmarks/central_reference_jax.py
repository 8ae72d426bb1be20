"""Run by ``python -m benchmarks central-speed --reference DIR`` under a Python that has JAX: the JAX central-flows
reference's central flow (``Flow.central``, GD, 4 substeps, float64, CPU) on a tanh MLP exported by flowsim.

``python benchmarks/central_reference_jax.py DIR PROBLEM.npz STEPS K LR OUT.json``: DIR is a checkout of the
reference (its ``src`` holds ``central_flows_jax``), PROBLEM.npz holds X, Y, w0 and the layer widths ``dims``
(flowsim's parameter layout: per layer the weight, out × in, then the bias; tanh between layers; loss
½‖f − y‖² averaged over examples), K the reference's tracked eigenvectors (a fixed block). Writes the loss at
each step's start, each step's seconds (the first includes JAX's compilation) and its plain GD step's seconds
(gradient and update, jitted, best of three × 50) to OUT.json. This file imports nothing from flowsim.
"""
import json
import sys
import time

import numpy as np


def main(ref_dir: str, problem: str, steps: int, k: int, lr: float, out: str) -> None:
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    sys.path.insert(0, f"{ref_dir}/src")
    from central_flows_jax import Flow, GradientDescent

    data = np.load(problem)
    X, Y, w0 = jnp.asarray(data["X"]), jnp.asarray(data["Y"]), jnp.asarray(data["w0"])
    dims = [int(d) for d in data["dims"]]

    def loss_fn(w):
        h, offset = X, 0
        for i in range(len(dims) - 1):
            size = dims[i] * dims[i + 1]
            W = w[offset:offset + size].reshape(dims[i + 1], dims[i])
            b = w[offset + size:offset + size + dims[i + 1]]
            offset += size + dims[i + 1]
            h = h @ W.T + b
            if i < len(dims) - 2:
                h = jnp.tanh(h)
        return 0.5 * jnp.mean(jnp.sum((h - Y) ** 2, 1))

    opt = GradientDescent(lr=lr)
    flow = Flow(loss_fn, opt)
    carry = (w0, opt.init(w0), jax.random.normal(jax.random.PRNGKey(0), (len(w0), k), dtype=jnp.float64))
    losses, seconds = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        carry, aux = flow.central(*carry)
        jax.block_until_ready(carry)
        seconds.append(time.perf_counter() - t0)
        losses.append(float(aux["L"]))
    gd = jax.jit(lambda w: w - lr * jax.grad(loss_fn)(w))
    w = jax.block_until_ready(gd(w0))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(50):
            w = gd(w)
        jax.block_until_ready(w)
        best = min(best, (time.perf_counter() - t0) / 50)
    with open(out, "w") as f:
        json.dump({"loss": losses, "seconds": seconds, "gd_step": best}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
