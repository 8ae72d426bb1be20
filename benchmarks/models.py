"""The ``models`` benchmark: cost of the bundled network families on the CPU.

For the problem of each family's bundled scenario (its dtype, full batch) it prints the parameter count, the
seconds per GD step (loss and gradient, ``Problem.loss_and_grad``) and per Hessian-vector product
(``Problem.hvp``), and their ratio.
"""
from __future__ import annotations

from typing import Optional

import torch

from benchmarks.bench import best_of, bundled, parser
from flowsim.models import build_problem

SCENARIOS = ("cnn-digits", "cnn-mnist1d", "resnet-digits", "vit-digits", "transformer-markov", "lstm-markov")


def models(repeats: int = 5, scenarios: tuple[str, ...] = SCENARIOS) -> int:
    print(f"models: best of {repeats}, {torch.get_num_threads()} threads, CPU, full batch")
    print(f"  {'scenario':<20} {'params':>7} {'examples':>8} {'dtype':>8} {'GD step s':>10} {'HVP s':>8} {'HVP/step':>8}",
          flush=True)
    for name in scenarios:
        doc = bundled(name)
        dtype = doc.get("dtype", "float64")
        p = build_problem(doc["problem"], dtype=dtype, device="cpu", seed=doc.get("seed", 0))
        v = torch.randn(p.n_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(p.dtype)
        p.loss_and_grad(p.w0), p.hvp(p.w0, v)  # warm up
        t_step = best_of(lambda: p.loss_and_grad(p.w0), repeats)
        t_hvp = best_of(lambda: p.hvp(p.w0, v), repeats)
        print(f"  {name:<20} {p.n_params:>7} {p.n_examples:>8} {dtype:>8} {t_step:>10.4f} {t_hvp:>8.4f} "
              f"{t_hvp / t_step:>8.2f}", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("models", "Seconds per GD step and per Hessian-vector product of each bundled network family.",
               quick="best of 1, the CNN on digits and the LSTM only")
    args = p.parse_args(argv)
    return models(1, ("cnn-digits", "lstm-markov")) if args.quick else models()
