"""What is measured per recorded step, buffered in memory and handed to the store in chunks.

``VARIABLES`` is the one table of recorded variables: extra dims beyond ``step``, units and a description —
the store writes them as attrs, so every stored array says what it is. Probes compute measurements at a
recorded step from the problem and the trajectory (the random projection lives here; curvature elsewhere).
This module never opens files: the writer it is given does.
"""
from __future__ import annotations

import numpy as np
import torch

# name: (extra dims, units, long_name)
VARIABLES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "loss": ((), "loss", "training loss on the full batch, averaged over examples"),
    "grad_norm": ((), "loss/weight", "‖∇L(w)‖₂ on the full batch"),
    "step_size": ((), "1", "step size η used from this step to the next"),
    "target_c": ((), "1", "adaptive process: c, the target η·S as a fraction of the rule's threshold θ (chosen "
                 "by the central flow with options.flow; times the gradient coherence with options.coherence)"),
    "time": ((), "gradient-flow time", "Σ η over the steps before this one"),
    "wall_time": ((), "s", "wall-clock seconds since the run started"),
    "w_proj": (("proj",), "weight", "random projection R·w, R_ij ~ N(0, 1/proj) with the scenario seed"),
    "w": (("param",), "weight", "the full weight vector (flat, Problem order), every record.keep_weights steps"),
    "predicted_loss": ((), "loss", "central flow: L(w) + ½⟨H, Σ⟩, the predicted time-averaged loss of the discrete run"),
    "predicted_grad_norm_sq": ((), "(loss/weight)²", "central flow: ‖∇L‖² + tr(HΣH), the predicted time-averaged ‖g‖²"),
    "sigma_eigs": (("crit",), "weight²", "central flow: eigenvalues of the oscillation covariance Σ, descending"),
    "sigma_displacement_sq": (("crit",), "weight²",
                              "central flow: (e·(w_discrete − w))² along each unit eigenvector e of Σ"),
    "sharpness": ((), "loss/weight²", "λ_max of the Hessian of the loss (on record.curvature_examples)"),
    "eigs": (("eig",), "loss/weight²", "top record.top_k Hessian eigenvalues, descending"),
    "precond_sharpness": ((), "1/lr", "λ_max(P̃⁻¹H), P̃ the rule's preconditioner without η; NaN before the first step"),
    "threshold": ((), "1/lr", "stability threshold c/η of the rule at this step (2/η for GD)"),
    "noise_kernel_norm": ((), "1", "K = (1/C)(1/B − 1/D) Σ ηλ/(2 − ηλ), NTK eigenvalues λ, C outputs (minibatch runs)"),
    "grad_noise_trace": ((), "(loss/weight)²", "trace of the per-example gradient covariance"),
}


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

    ``__call__(traj, process)`` returns a dict of VARIABLES entries measured at ``traj.w`` (and rule state).
    """
    every: int = 1

    def __call__(self, traj, process) -> dict:
        raise NotImplementedError

    def checkpoint_state(self) -> dict:
        """What an exact resume needs that this probe carries between calls (e.g. warm-start vectors)."""
        return {}

    def restore(self, state: dict) -> None:
        """Set a freshly made probe to a :meth:`checkpoint_state` taken earlier."""


class ProjectionProbe(Probe):
    """Records ``w_proj``."""

    def __init__(self, projection: Projection, every: int):
        self.projection, self.every = projection, every

    def __call__(self, traj, process) -> dict:
        return {"w_proj": self.projection(traj.w)}


class WeightsProbe(Probe):
    """Records the full weights ``w`` (for exact weight-space distances in :func:`flowsim.compare`)."""

    def __init__(self, every: int):
        self.every = every

    def __call__(self, traj, process) -> dict:
        return {"w": traj.w.detach().cpu().numpy()}


class Recorder:
    """Buffers one run's recorded steps and flushes them to ``writer.append`` every ``chunk`` rows.

    Rows are added with :meth:`add`; a value not given in a row is NaN (not measured at that step).
    """

    def __init__(self, writer, dims: dict[str, int], chunk: int = 500):
        self.writer, self.dims, self.chunk = writer, dims, chunk
        self.rows: list[dict] = []

    def add(self, step: int, values: dict) -> None:
        unknown = set(values) - set(VARIABLES)
        if unknown:
            raise KeyError(f"not a recorded variable: {sorted(unknown)}")
        self.rows.append({"step": step, **values})
        if len(self.rows) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        n = len(self.rows)
        columns: dict[str, np.ndarray] = {"step": np.array([r["step"] for r in self.rows], dtype=np.int64)}
        for name, (extra, _, _) in VARIABLES.items():
            if not any(name in r for r in self.rows):
                continue
            shape = tuple(self.dims[d] for d in extra)
            col = np.full((n, *shape), np.nan)
            for i, r in enumerate(self.rows):
                if name in r:
                    col[i] = r[name]
            columns[name] = col
        self.writer.append(columns)
        self.rows = []
