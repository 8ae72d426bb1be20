"""Ensembles of a minibatch run and of its SDE, side by side: "does the SDE hold here?"

:func:`discrete_ensemble` runs one discrete rule under many seeds as one vmapped pass (independent random
batches every step, the sampling the SDE models); :func:`sde_ensemble` integrates as many SDE paths, each from
its own seed's discrete start. Both return per-step ensemble statistics of the loss and of the norm of each
rule-state tensor, on the same clock (one unit = one step at η). :func:`does_the_sde_hold` runs SVAG at several l
beside the SDE and gives a one-line verdict; :func:`plot` draws it. :func:`square_root_slowdown` measures, at a
point, the premise of Adam's and RMSProp's square-root scaling rule. This module only runs and summarises; it
never touches storage.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from flowsim.models.problem import Problem
from flowsim.solvers.batched import BatchedDiscrete
from flowsim.solvers.flows import Layout
from flowsim.solvers.processes import DiscreteOptions, discrete_start
from flowsim.solvers.rules import Rule, given_twice, make_rule
from flowsim.solvers.sde import SDE, SDEOptions, noise_variance


def _record(out: dict, problem: Problem, W: torch.Tensor, state) -> None:
    """Append the per-member loss and state norms of one step to ``out`` (lists of numpy arrays)."""
    with torch.no_grad():
        out.setdefault("loss", []).append(torch.func.vmap(problem.loss)(W).cpu().numpy())
        for key, value in sorted((state or {}).items()):
            if value.dim() > 1:  # a per-weight state (m, ν), not a clock
                out.setdefault(f"{key}_norm", []).append(value.norm(dim=1).cpu().numpy())


def discrete_ensemble(problem: Problem, rule: Rule, lr: float, steps: int, batch_size: int,
                      seeds: int = 32, svag: int = 1) -> dict[str, np.ndarray]:
    """Per-step statistics of ``seeds`` discrete minibatch runs (seeds 0 … seeds − 1, an independent uniform
    batch every step; SVAG with l = ``svag``): ``loss`` and ``<key>_norm`` arrays of shape (steps + 1, seeds),
    step 0 at w0."""
    engine = BatchedDiscrete(problem, rule, list(range(seeds)), batch_size, DiscreteOptions(sampling="iid", svag=svag))
    traj = engine.start(problem.w0)
    out: dict = {}
    for _ in range(steps):
        _record(out, problem, traj.w, traj.state)
        engine.step(traj, [lr] * seeds, measure=False)
    _record(out, problem, traj.w, traj.state)
    return _stack(out, steps)


def sde_ensemble(problem: Problem, rule: Rule, lr: float, steps: int, batch_size: int, paths: int = 32,
                 seed: int = 0, options: Optional[dict] = None) -> dict[str, np.ndarray]:
    """Per-step statistics of ``paths`` runs of the ``sde`` process with ``options``: path i takes the rule's
    discrete start (its ``discrete_start`` steps) with seed i, as the discrete ensemble's member i does, then
    follows the SDE, the ensemble's Brownian motion seeded by ``seed``. Same keys and shapes as
    :func:`discrete_ensemble`."""
    process, n0 = _sde(problem, rule, seed, batch_size, steps, options)
    engine = BatchedDiscrete(problem, rule, list(range(paths)), batch_size, DiscreteOptions(sampling="iid"))
    traj = engine.start(problem.w0)
    out: dict = {}
    for _ in range(n0):
        _record(out, problem, traj.w, traj.state)
        engine.step(traj, [lr] * paths, measure=False)
    if traj.state is None:  # each path's first batch, as the sde process starts (its ``initial_state``)
        idx = torch.stack([sampler.indices(n0) for sampler in engine.samplers])
        grads = torch.func.vmap(torch.func.grad(problem.loss), in_dims=(0, 0))(traj.w, idx)
        traj.state = torch.func.vmap(rule.init)(traj.w, grads)
    layout = Layout(problem.n_params, {k: v[0] for k, v in traj.state.items()})
    ys = torch.func.vmap(layout.pack)(traj.w, traj.state)
    member = engine.member(traj, 0)
    substeps = process.substeps(member, lr)
    for k in range(n0, steps):
        w, state = torch.func.vmap(layout.unpack)(ys)
        _record(out, problem, w, state)
        ys = process.advance_paths(layout, ys, lr, substeps, k, seed)
    _record(out, problem, *torch.func.vmap(layout.unpack)(ys))
    return _stack(out, steps)


def _sde(problem: Problem, rule: Rule, seed: int, batch_size: int, steps: int, options: Optional[dict] = None):
    """The ``sde`` process and its discrete start n0; a one-line ValueError for a rule without an SDE, a batch
    the data cannot fill, or ``steps`` that end within the discrete start."""
    process = SDE(problem, rule, seed, batch_size, SDEOptions.model_validate(options or {}))
    n0 = discrete_start(process.options, rule)
    if n0 >= steps:
        raise ValueError(f"steps: {steps} leave no step for the SDE after the rule's first {n0} (its discrete start, "
                         "where its flows begin); give more steps")
    return process, n0


def _stack(out: dict, steps: int) -> dict[str, np.ndarray]:
    """The rows as arrays (steps + 1, members); a state that did not exist yet at step 0 is NaN there."""
    stats = {key: np.stack(rows) for key, rows in out.items()}
    return {key: np.concatenate([np.full((steps + 1 - len(v), v.shape[1]), np.nan), v]) for key, v in stats.items()}


TOLERANCE = 0.1
"""The relative gap of mean losses within which :func:`does_the_sde_hold` says the SDE holds (the issue's 10 %)."""


def does_the_sde_hold(problem: Problem, rule: Union[str, Rule], lr: float, steps: int, batch_size: int,
                      seeds: int = 32, ls: tuple[int, ...] = (1, 2, 4, 8), paths: int = 32,
                      **hyperparameters) -> dict:
    """SVAG with l in ``ls`` (``seeds`` runs each) and the SDE (``paths`` paths) on one problem, and a verdict.
    ``rule`` is a rule object or a name with its ``hyperparameters`` (``"adam", beta1=0.8``), as in
    ``flowsim.simulate``; what cannot run is a one-line ValueError before anything runs.

    Returns ``svag`` {l: (steps + 1, seeds) losses}, ``sde`` ((steps + 1, paths) losses), ``gaps`` (the relative
    gap of the geometric-mean loss of SVAG at the largest l to l = 1's, and of the SDE's to SVAG's at the largest
    l, each averaged over the steps; geometric, since runs at the edge have heavy-tailed losses),
    ``standard_error`` (of those gaps, relative), ``holds`` and
    ``verdict``, one line. The SDE holds where both gaps are within TOLERANCE and three standard errors are too;
    it does not where a gap exceeds TOLERANCE by more than three standard errors, or a run diverged; otherwise
    the seeds cannot tell (``holds`` None). The SDE takes its default substeps.
    """
    if isinstance(rule, str):
        rule = make_rule(rule, **hyperparameters)
    elif hyperparameters:
        raise ValueError(given_twice(rule, hyperparameters))
    _sde(problem, rule, 0, batch_size, steps)  # what cannot run fails here, not after the SVAG ensembles
    svag = {l: discrete_ensemble(problem, rule, lr, steps, batch_size, seeds, svag=l)["loss"] for l in ls}
    sde = sde_ensemble(problem, rule, lr, steps, batch_size, paths)["loss"]
    first, last = svag[ls[0]], svag[ls[-1]]

    def gap(a, b):  # on log losses: a run at the edge has heavy-tailed losses, their mean a huge error
        la, lb = np.log(a[1:]), np.log(b[1:])
        rel = np.expm1(np.abs(la.mean(1) - lb.mean(1)))  # the larger over the smaller, − 1
        se = np.sqrt(la.var(1) / la.shape[1] + lb.var(1) / lb.shape[1])
        return float(rel.mean()), float(se.mean())

    (svag_gap, svag_se), (sde_gap, sde_se) = gap(last, first), gap(sde, last)
    gaps, ses = (svag_gap, sde_gap), (svag_se, sde_se)
    if not all(np.isfinite(gaps + ses)):
        holds, head = False, "the SDE does not hold here: a run diverged"
    else:
        if any(g > TOLERANCE + 3 * e for g, e in zip(gaps, ses)):
            holds, head = False, "the SDE does not hold here"
        elif all(g <= TOLERANCE and 3 * e <= TOLERANCE for g, e in zip(gaps, ses)):
            holds, head = True, "the SDE holds here"
        else:
            holds, head = None, f"{seeds} seeds cannot tell whether the SDE holds here (give more)"
        head += (f": SVAG l = {ls[-1]} is {100 * svag_gap:.3g} % from l = {ls[0]} and the SDE {100 * sde_gap:.3g} % "
                 f"from SVAG l = {ls[-1]} (geometric-mean loss over {steps} steps, ± {100 * max(ses):.2g} %; tolerance "
                 f"{100 * TOLERANCE:.0f} %)")
    verdict = head
    return {"svag": svag, "sde": sde, "gaps": {"svag": svag_gap, "sde": sde_gap},
            "standard_error": {"svag": svag_se, "sde": sde_se}, "holds": holds, "verdict": verdict}


def square_root_slowdown(problem: Problem, w: torch.Tensor, batch_size: int,
                         kappas: tuple[float, ...] = (2, 4)) -> dict[float, float]:
    """For each κ, how fast the loss falls on the SDE's clock (step × κ) under the square-root rule at κ (batch
    κB, η × √κ, ε / √κ: ``Rule.scaled``) relative to κ = 1, at w, for Adam and RMSProp (elementwise ν, ε ≪ √ν).

    1 where the gradient noise dominates ν, the rule's premise; 1/√κ where the gradient does. With ν at its mean
    over batches of b examples, g² + s_b (s_b = c_b·diag(Σ)/b, c_b the finite-population factor), and m at g, a
    step at κ moves each weight by −η√κ g/√(g² + s_κB), so per unit of the clock (1/κ step) the loss falls at
    Σ g²/√(κ(g² + s_κB)), against Σ g²/√(g² + s_B) at κ = 1 (docs/sde.md). Weights whose per-example gradients
    are all zero are left out."""
    if batch_size < 1 or any(k < 1 for k in kappas):
        raise ValueError(f"batch_size and kappas: at least 1, got {batch_size} and {tuple(kappas)}")
    G = problem.per_example_grads(w)
    g2 = G.mean(0).pow(2)
    variance = G.var(0, unbiased=False)
    moving = (g2 + variance) > 0
    g2, variance = g2[moving], variance[moving]

    def rate(kappa: float) -> torch.Tensor:
        s = variance * noise_variance(problem.n_examples, round(kappa * batch_size))
        return (g2 / (kappa * (g2 + s)).sqrt()).sum()

    return {float(k): float(rate(k) / rate(1)) for k in kappas}


def plot(result: dict, ax=None):
    """The mean loss of each SVAG l and the SDE's mean with its ±1 std band, on the SDE's clock (steps at η),
    titled with the verdict. Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    ax = ax if ax is not None else plt.subplots(figsize=(6, 4))[1]
    for l, loss in result["svag"].items():
        ax.plot(loss.mean(1), label=f"SVAG l = {l}" if l > 1 else "discrete (l = 1)", lw=1.2)
    mean, std = result["sde"].mean(1), result["sde"].std(1)
    steps = np.arange(len(mean))
    ax.plot(steps, mean, "k--", lw=1.5, label="SDE mean")
    ax.fill_between(steps, mean - std, mean + std, color="k", alpha=0.12, label="SDE ± 1 std")
    ax.set(xlabel="step (SDE clock, units of η)", ylabel="loss", yscale="log")
    ax.set_title(result["verdict"], fontsize=7, wrap=True)
    ax.legend(fontsize=7)
    return ax
