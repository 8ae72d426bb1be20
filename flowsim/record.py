"""What is measured per recorded step, buffered in memory and handed to the store in chunks, at least once a
minute (:class:`Recorder`).

Each recorded variable is declared once, by what records it (a :class:`~flowsim.solvers.processes.Variable`:
extra dims beyond ``step``, units and a description, which the store writes as attrs, so every stored array says
what it is): every run's loss, η and clocks (``RUN_VARIABLES``), a process's own (``Process.variables``: the
central and rod flows' Σ), and each probe's (``Probe.variables``, here). Probes compute measurements at a
recorded step from the problem and the trajectory (projection, weights, curvature through
flowsim.solvers.curvature). This module never opens files: the writer it is given does.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from flowsim.solvers.curvature import (LossGraph, gradient_noise_trace, hessian_operator, noise_kernel_norm,
                                       ntk_eigenvalues, precond_eigenpairs)
from flowsim.solvers.processes import Variable

def declared(*tables: dict[str, Variable]) -> dict[str, Variable]:
    """One run's recorded variables: the union of the tables that declare them (every run's, its process's, its
    probes'); a name declared twice is an error, so that each variable has one owner."""
    out: dict[str, Variable] = {}
    for table in tables:
        for name in table.keys() & out.keys():
            raise ValueError(f"recorded variable {name!r} is declared twice")
        out.update(table)
    return out


class Projection:
    """w ↦ R w with R ∈ ℝ^{d×P}, R_ij ~ N(0, 1/d), drawn from ``seed``: ‖R(w − w′)‖ ≈ ‖w − w′‖ (JL)."""

    def __init__(self, n_params: int, dim: int, seed: int, dtype: torch.dtype, device: torch.device):
        gen = torch.Generator().manual_seed(seed)
        self.matrix = (torch.randn(dim, n_params, generator=gen, dtype=torch.float64) / dim ** 0.5).to(
            dtype=dtype, device=device)

    def __call__(self, w: torch.Tensor) -> np.ndarray:
        return (self.matrix @ w).cpu().numpy()


class Probe:
    """A measurement taken at step k (before the step) every ``every`` steps and at the last step.

    ``__call__(traj, process, lr)`` returns a dict of its ``variables`` measured at ``traj.w`` (and rule state);
    ``lr`` is η_k, the step size of the step about to be taken from there. ``dims`` sizes their extra dims.
    """
    every: int = 1
    variables: dict[str, Variable] = {}
    dims: dict[str, int] = {}

    def __call__(self, traj, process, lr: float) -> dict:
        raise NotImplementedError

    def checkpoint_state(self) -> dict:
        """What an exact resume needs that this probe carries between calls (e.g. warm-start vectors)."""
        return {}

    def restore(self, state: dict) -> None:
        """Set a freshly made probe to a :meth:`checkpoint_state` taken earlier."""


class ProjectionProbe(Probe):
    """Records ``w_proj``."""
    variables = {"w_proj": Variable(("proj",), "weight", "random projection R·w, R_ij ~ N(0, 1/proj) with the "
                                    "scenario seed")}

    def __init__(self, projection: Projection, every: int):
        self.projection, self.every = projection, every
        self.dims = {"proj": projection.matrix.shape[0]}

    def __call__(self, traj, process, lr) -> dict:
        return {"w_proj": self.projection(traj.w)}


class WeightsProbe(Probe):
    """Records the full weights ``w`` (for exact weight-space distances in :func:`flowsim.compare`)."""
    variables = {"w": Variable(("param",), "weight", "the full weight vector (flat, Problem order), every "
                               "record.keep_weights steps")}

    def __init__(self, every: int, n_params: int):
        self.every, self.dims = every, {"param": n_params}

    def __call__(self, traj, process, lr) -> dict:
        return {"w": traj.w.detach().cpu().numpy()}


class SharpnessProbe(Probe):
    """Records ``sharpness`` (λ_max of the Hessian), the top ``top_k`` eigenvalues ``eigs`` and the rule's
    ``threshold`` c/η_k at the point w_k, before step k (``Rule.threshold_coefficient``, η_k the step size of step
    k: the value the sharpness (GD) or the preconditioned sharpness (preconditioned rules) equilibrates at; NaN for
    a rule without one). Curvature is measured on the first ``examples`` training examples (all when None), by
    warm-started Lanczos to ``tol``. The probes that build on this one (:class:`PrecondSharpnessProbe`,
    :class:`StochasticEdgeProbe`) read its Hessian operator and top eigenvector of the same step, so they follow it
    in a run's probes. Its eigenvectors are kept between calls as warm starts, forgotten when it sees a different
    process; they are its checkpoint state, so a resumed run continues with the same warm starts."""
    variables = {
        "sharpness": Variable((), "loss/weight²", "λ_max of the Hessian of the loss (on record.curvature_examples)"),
        "eigs": Variable(("eig",), "loss/weight²", "top record.top_k Hessian eigenvalues, descending"),
        "threshold": Variable((), "1/lr", "stability threshold c/η of the rule at this step (2/η for GD)"),
    }

    def __init__(self, every: int, top_k: int, tol: float, examples: Optional[int], n_examples: int):
        self.every, self.top_k, self.tol, self.dims = every, top_k, tol, {"eig": top_k}
        self.idx = None if examples is None or examples >= n_examples else torch.arange(examples)
        self._process, self._warm = None, None
        self.hessian, self.top = None, None  # this step's: the operator v ↦ Hv, (λ_max, its unit eigenvector)

    def checkpoint_state(self) -> dict:
        return {} if self._warm is None else {"vecs": self._warm}

    def restore(self, state: dict) -> None:
        self._process, self._warm = None, state.get("vecs")

    def __call__(self, traj, process, lr: float) -> dict:
        if process is not self._process:
            self._process, self._warm = process, self._warm if self._process is None else None
        w = traj.w
        self.hessian = hessian_operator(process.problem, w, None if self.idx is None else self.idx.to(w.device))
        res = precond_eigenpairs(self.hessian, None, w, self.top_k, v0=self._warm, tol=self.tol)
        self._warm, self.top = res.vecs, (res.vals[0].item(), res.vecs[:, 0])
        return {"sharpness": self.top[0], "eigs": res.vals.cpu().numpy(),
                "threshold": (process.rule.threshold_coefficient() or math.nan) / lr}


class PrecondSharpnessProbe(Probe):
    """Records ``precond_sharpness`` λ_max(P̃⁻¹H) with the rule state at step k, on ``sharpness``'s Hessian of the
    same step: NaN at step 0 (no state before the first step), the sharpness itself for a rule without a
    preconditioner (GD, momentum). Warm-started as :class:`SharpnessProbe`."""
    variables = {"precond_sharpness": Variable((), "1/lr", "λ_max(P̃⁻¹H), P̃ the rule's preconditioner without η; "
                                               "NaN before the first step")}

    def __init__(self, sharpness: SharpnessProbe):
        self.sharpness, self.every = sharpness, sharpness.every
        self._process, self._warm = None, None

    def checkpoint_state(self) -> dict:
        return {} if self._warm is None else {"vecs": self._warm}

    def restore(self, state: dict) -> None:
        self._process, self._warm = None, state.get("vecs")

    def __call__(self, traj, process, lr: float) -> dict:
        if traj.state is None:
            return {}
        P = process.rule.precond(traj.state)
        if P is None:
            return {"precond_sharpness": self.sharpness.top[0]}
        if process is not self._process:
            self._process, self._warm = process, self._warm if self._process is None else None
        res = precond_eigenpairs(self.sharpness.hessian, P, traj.w, self.sharpness.top_k, v0=self._warm,
                                 tol=self.sharpness.tol)
        self._warm = res.vecs
        return {"precond_sharpness": res.vals[0].item()}


class NoiseKernelProbe(Probe):
    """Records the noise kernel norm ``noise_kernel_norm`` K and ``grad_noise_trace`` tr Σ of a minibatch run (K is
    0 in full batch, which records neither), on the first ``examples`` training examples; K needs the MSE loss."""
    variables = {
        "noise_kernel_norm": Variable((), "1", "K = (κ/C) Σ ηλ/(2 − (1 − κ)ηλ), κ = (1/B − 1/D)·D/(D − 1), NTK "
                                      "eigenvalues λ, C outputs (minibatch runs; "
                                      "flowsim.solvers.curvature.noise_kernel_norm)"),
        "grad_noise_trace": Variable((), "(loss/weight)²", "trace of the per-example gradient covariance"),
    }

    def __init__(self, every: int, examples: int, n_examples: int):
        self.every = every
        self.idx = None if examples >= n_examples else torch.arange(examples)

    def __call__(self, traj, process, lr: float) -> dict:
        problem, w = process.problem, traj.w
        if process.batch_size is None or process.batch_size >= problem.n_examples:
            return {}
        idx = None if self.idx is None else self.idx.to(w.device)
        return {"noise_kernel_norm": noise_kernel_norm(ntk_eigenvalues(problem, w, idx), lr, process.batch_size,
                                                       problem.n_examples, problem.Y[0].numel()),
                "grad_noise_trace": gradient_noise_trace(problem, w, idx)}


class StochasticEdgeProbe(Probe):
    """Records ``batch_sharpness`` and ``second_moment_contraction`` of a minibatch run of a rule they apply to
    (``Rule.stochastic_edge``: SGD, whose step maps a perturbation by I − ηH_B), on the batches of steps k, …,
    k + ``batches`` − 1 as the run's sampler draws them: one Hessian-vector product per batch for the batch
    sharpness and one for mean_B ‖(I − η_k H_B)u‖² along the top Hessian eigenvector u that ``sharpness`` has just
    found (docs/stochastic-edge.md: why along it and not λ_max over all directions)."""
    variables = {
        "batch_sharpness": Variable((), "loss/weight²", "E_B[g_Bᵀ H_B g_B / ‖g_B‖²], gradient and Hessian on the same "
                                    "minibatch B, over record.stochastic_edge_batches of the run's upcoming batches "
                                    "(minibatch SGD runs)"),
        "second_moment_contraction": Variable((), "1", "E_B‖(I − ηH_B)u‖² over the same batches, u the unit top "
                                              "eigenvector of the Hessian: > 1 where the mean square of a "
                                              "perturbation along the sharpest direction grows under the step "
                                              "(minibatch SGD runs)"),
    }

    def __init__(self, sharpness: SharpnessProbe, batches: int):
        self.sharpness, self.every, self.batches = sharpness, sharpness.every, batches

    def __call__(self, traj, process, lr: float) -> dict:
        if getattr(process, "sampler", None) is None or not process.rule.stochastic_edge:
            return {}
        return self.measure(process.problem, traj.w, process.sampler, traj.step, lr, self.sharpness.top[1])

    def measure(self, problem, w: Tensor, sampler, step: int, lr: float, top: Tensor) -> dict:
        """Both measures at w on the batches of steps step, step + 1, …; ``top`` the Hessian's unit top
        eigenvector."""
        graphs = [LossGraph(problem, w, sampler.indices(step + i)) for i in range(self.batches)]
        rayleigh = [(g.grad() @ g.hvp(g.grad()) / g.grad().pow(2).sum()).item() for g in graphs]
        growth = [(top - lr * g.hvp(top)).pow(2).sum().item() for g in graphs]
        return {"batch_sharpness": float(np.mean(rayleigh)), "second_moment_contraction": float(np.mean(growth))}


class Recorder:
    """Buffers one run's recorded steps and hands them to ``writer.append``: the first row at once (a store shows
    every run from its first step on), then whenever ``chunk`` rows are buffered or ``seconds`` of wall time have
    passed since the last hand-over.

    Rows are added with :meth:`add`; a value not given in a row is NaN (not measured at that step). The time
    bound (a minute by default, checked as each row is added) makes the writes follow the run's cost: a fast run
    writes whole chunks, a slow one (a central flow at seconds per step) holds no more than about a minute of
    work, or the steps between two recorded rows when they take longer, only in memory, where a kill loses it.
    """

    def __init__(self, writer, variables: dict[str, Variable], dims: dict[str, int], chunk: int = 500,
                 seconds: float = 60.0):
        self.writer, self.variables, self.dims, self.chunk, self.seconds = writer, variables, dims, chunk, seconds
        self.rows: list[dict] = []
        self.written = -math.inf

    def add(self, step: int, values: dict) -> bool:
        """Buffer one row; returns whether the rows were handed to the writer."""
        unknown = set(values) - set(self.variables)
        if unknown:
            raise KeyError(f"not a declared variable of this run: {sorted(unknown)}")
        self.rows.append({"step": step, **values})
        if len(self.rows) >= self.chunk or time.monotonic() - self.written >= self.seconds:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        if not self.rows:
            return
        n = len(self.rows)
        columns: dict[str, np.ndarray] = {"step": np.array([r["step"] for r in self.rows], dtype=np.int64)}
        for name, (extra, _, _) in self.variables.items():
            if not any(name in r for r in self.rows):
                continue
            shape = tuple(self.dims[d] for d in extra)
            col = np.full((n, *shape), np.nan)
            for i, r in enumerate(self.rows):
                if name in r:
                    col[i] = r[name]
            columns[name] = col
        self.writer.append(columns)
        self.rows, self.written = [], time.monotonic()
