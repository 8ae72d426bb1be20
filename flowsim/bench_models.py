"""The ``models`` benchmark: cost of the bundled network families on the CPU.

Not a test: for the problem of each family's bundled scenario (its dtype, full batch) it prints the parameter
count, the seconds per GD step (loss and gradient) and per Hessian-vector product, and their ratio.
"""
from __future__ import annotations

import torch

from flowsim.bench import best_of

SCENARIOS = ("cnn-digits", "cnn-mnist1d", "resnet-digits", "vit-digits", "transformer-markov", "lstm-markov")


def models(repeats: int = 5) -> int:
    from flowsim.cli import bundled_scenarios
    from flowsim.scenario import load

    print(f"models: best of {repeats}, {torch.get_num_threads()} threads, CPU, full batch")
    print(f"  {'scenario':<20} {'params':>7} {'examples':>8} {'dtype':>8} {'GD step s':>10} {'HVP s':>8} {'HVP/step':>8}")
    for name in SCENARIOS:
        sc = load(bundled_scenarios()[name])
        p = sc.problem.build(dtype=sc.dtype, device="cpu", seed=sc.seed)
        v = torch.randn(p.n_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(p.dtype)
        p.loss_and_grad(p.w0), p.hvp(p.w0, v)  # warm up
        t_step = best_of(lambda: p.loss_and_grad(p.w0), repeats)
        t_hvp = best_of(lambda: p.hvp(p.w0, v), repeats)
        print(f"  {name:<20} {p.n_params:>7} {p.n_examples:>8} {sc.dtype:>8} {t_step:>10.4f} {t_hvp:>8.4f} "
              f"{t_hvp / t_step:>8.2f}")
    return 0
