"""The ``optim`` benchmark: wall time per step of ``flowsim.optim.EdgeAdam`` against ``torch.optim.Adam`` in the
same process, on the same model, data and closure.

A GELU MLP 16-64-64-4 (4.5k parameters, float32) on 1024 examples of a Gaussian mixture, cross-entropy, trained by
a user's loop: one closure per step (zero_grad, forward, backward, return the loss). Two settings: full batch and
minibatches of 32. Per setting, blocks of ``STEPS`` steps of each optimizer alternate ``REPEATS`` times (so a
load that comes and goes on a shared machine hits both alike); the figure is the median block's seconds per step,
and the ratio EdgeAdam / Adam (goal ≤ 1.3). EdgeAdam's time includes everything the controller does: its
curvature estimates (every 10 steps, up to 4 Hessian-vector products each, as forward differences of the
closure's gradients) and the step-loss guard.

Both optimizers start each block from the same weights (EdgeAdam's), and denormal floats are flushed to zero while
the blocks run: the mixture is separable, and EdgeAdam fits it within ~50 steps, where the softmax's tails are
denormal and the user's own closure costs 2× (1.99 against 1.02 ms per call on the two trained models, 0.92 both
with denormals flushed). Without both, the ratio measured how far each had trained, not what the optimizer costs.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from benchmarks.bench import parser
from flowsim.optim import EdgeAdam

STEPS, REPEATS = 100, 7
N, DIM, CLASSES = 1024, 16, 4


def _data_and_model(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(CLASSES, DIM, generator=gen)
    Y = torch.randint(0, CLASSES, (N,), generator=gen)
    X = means[Y] + torch.randn(N, DIM, generator=gen)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                                torch.nn.GELU(), torch.nn.Linear(64, CLASSES))
    return X, Y, model


def _block(model, opt, X, Y, batch: Optional[int], start: int, steps: int) -> float:
    """Seconds per step of ``steps`` steps of ``opt`` from batch position ``start``."""
    def run(k):
        i = (k * (batch or N)) % N
        xb, yb = (X, Y) if batch is None else (X[i:i + batch], Y[i:i + batch])

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss
        opt.step(closure)
    t0 = time.perf_counter()
    for k in range(start, start + steps):
        run(k)
    return (time.perf_counter() - t0) / steps


def compare(batch: Optional[int], steps: int = STEPS, repeats: int = REPEATS) -> tuple[float, float]:
    """(EdgeAdam's, Adam's) median seconds per step over ``repeats`` alternating blocks of ``steps`` steps."""
    X, Y, edge_model = _data_and_model()
    _, _, adam_model = _data_and_model()
    edge, adam = EdgeAdam(edge_model.parameters()), torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    _block(edge_model, edge, X, Y, batch, 0, 10), _block(adam_model, adam, X, Y, batch, 0, 10)  # warm up
    times = {"edge": [], "adam": []}
    flush = torch.set_flush_denormal(True)  # False where the CPU cannot
    for r in range(repeats):
        start = 10 + r * steps
        adam_model.load_state_dict(edge_model.state_dict())  # the same weights: the same cost of the closure
        times["edge"].append(_block(edge_model, edge, X, Y, batch, start, steps))
        times["adam"].append(_block(adam_model, adam, X, Y, batch, start, steps))
    if flush:
        torch.set_flush_denormal(False)
    return statistics.median(times["edge"]), statistics.median(times["adam"])


def optim(steps: int = STEPS, repeats: int = REPEATS) -> int:
    print(f"optim: EdgeAdam against torch.optim.Adam, {torch.get_num_threads()} threads, CPU; median of {repeats} "
          f"alternating blocks of {steps} steps", flush=True)
    print(f"  {'batch':<8} {'EdgeAdam ms/step':>17} {'Adam ms/step':>13} {'ratio':>6}", flush=True)
    for batch in (None, 32):
        edge, adam = compare(batch, steps, repeats)
        print(f"  {batch or 'full':<8} {edge * 1e3:>17.3f} {adam * 1e3:>13.3f} {edge / adam:>6.2f}", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("optim", "Wall time per step of flowsim.optim.EdgeAdam against torch.optim.Adam, full batch and "
               "minibatches of 32 (goal: ratio <= 1.3).", quick="3 blocks of 50 steps")
    args = p.parse_args(argv)
    return optim(50, 3) if args.quick else optim()
