"""Figures of a flowsim Dataset, for notebooks and for the HTML report (:mod:`flowsim.report`).

Each public function takes the Dataset of :func:`flowsim.open` (dims ``run``, ``step``, …; DESIGN's schema) and
returns a ``matplotlib.figure.Figure`` (no pyplot state: a notebook displays it, ``fig.savefig`` writes it).
The x axis is ``time`` (Σ η, the gradient-flow clock) by default, or ``step`` (optimizer steps). Every run keeps
one colour in every figure; a diverged run is marked where it diverged. A figure asked for a variable the
dataset does not hold (or holds only as NaN) raises ValueError. This module computes nothing but smoothing and
the edge-of-stability onset; distances and gaps come from :mod:`flowsim.compare`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

SMOOTH_WINDOW = 20
"""Default smoothing window for discrete losses, in optimizer steps (a centered moving average)."""

EOS_FRACTION = 0.95
"""The edge of stability starts the first time the controlling sharpness reaches this fraction of threshold."""

MAX_LEGEND = 10
"""Axes with more labelled lines than this (e.g. large sweeps, where colours repeat) get no legend."""

_XLABEL = {"time": "time  (Σ η, gradient-flow units)", "step": "step"}


def has(ds: xr.Dataset, name: str) -> bool:
    """Whether ``ds`` holds variable ``name`` with at least one finite value."""
    return name in ds.variables and bool(np.isfinite(ds[name].values.astype(float)).any())


def colors(ds: xr.Dataset) -> dict[str, str]:
    """Run name → matplotlib colour, fixed by the run's position so that every figure agrees."""
    return {str(r): f"C{i % 10}" for i, r in enumerate(ds.run.values)}


def series(ds: xr.Dataset, name: str, run: str, x: str = "time") -> tuple[np.ndarray, np.ndarray]:
    """The finite points of ``name`` for one run against ``x`` ("time" or "step").

    A per-run scalar (no ``step`` dim) is repeated at every recorded step of the run.
    """
    r = ds.sel(run=run)
    return _xy(r, r[name], x)


def _xy(r: xr.Dataset, y: xr.DataArray, x: str) -> tuple[np.ndarray, np.ndarray]:
    if x not in _XLABEL:
        raise ValueError(f"x: {x!r} is not one of {sorted(_XLABEL)}")
    if "step" not in y.dims:
        y = y.broadcast_like(r.step)
    xs = (r["time"] if x == "time" and "time" in r.variables else r.step).broadcast_like(y)
    xv, yv = np.asarray(xs.values, float), np.asarray(y.values, float)
    ok = np.isfinite(xv) & np.isfinite(yv)
    return xv[ok], yv[ok]


def smoothed(ds: xr.Dataset, run: str, window: int = SMOOTH_WINDOW, name: str = "loss",
             x: str = "time") -> tuple[np.ndarray, np.ndarray]:
    """Centered moving average of ``name`` over ``window`` optimizer steps, at the points with a full window
    (none when the run is shorter than the window).

    The window is converted to recorded points with the run's median spacing of recorded steps; with an even
    number of points the window at recorded point i is [i − points/2, i + points/2).
    """
    r = ds.sel(run=run)
    return _moving_average(r, r[name], window, x)


def _moving_average(r: xr.Dataset, y: xr.DataArray, window: int, x: str) -> tuple[np.ndarray, np.ndarray]:
    if window < 1:
        raise ValueError(f"window: must be ≥ 1 step, got {window}")
    steps, _ = _xy(r, y, "step")
    xv, yv = _xy(r, y, x)
    spacing = float(np.median(np.diff(steps))) if steps.size > 1 else 1.0
    points = max(1, int(round(window / spacing)))
    avg = xr.DataArray(yv, dims="i").rolling(i=points, center=True).mean().values
    full = np.isfinite(avg)
    return xv[full], avg[full]


def threshold_applies(ds: xr.Dataset, run: str, name: str) -> bool:
    """Whether the run's ``threshold`` bounds ``name``: always ``precond_sharpness`` λ_max(P̃⁻¹H) (Cohen et al. 2022);
    ``sharpness`` when the run has no precond_sharpness or equals it wherever both are measured (P̃ = I)."""
    r = ds.sel(run=run)
    if not (has(r, "threshold") and has(r, name)):
        return False
    if name == "precond_sharpness" or not has(r, "precond_sharpness"):
        return True
    s, p = r["sharpness"].values, r["precond_sharpness"].values
    both = np.isfinite(s) & np.isfinite(p)
    return bool(both.any()) and np.array_equal(s[both], p[both])


def controlling(ds: xr.Dataset, run: str) -> Optional[str]:
    """The variable compared with the run's ``threshold``: ``precond_sharpness`` where the run has it, else
    ``sharpness``; None when the run has neither or no threshold."""
    return next((n for n in ("precond_sharpness", "sharpness") if threshold_applies(ds, run, n)), None)


def eos_onset(ds: xr.Dataset, run: str, x: str = "time") -> float:
    """First ``x`` at which the controlling sharpness ≥ EOS_FRACTION · threshold (NaN if never or unmeasured)."""
    name = controlling(ds, run)
    if name is None:
        return float("nan")
    r = ds.sel(run=run)
    xv, ratio = _xy(r, r[name] / (EOS_FRACTION * r["threshold"]), x)
    crossed = ratio >= 1.0
    return float(xv[np.argmax(crossed)]) if crossed.any() else float("nan")


def divergence_x(ds: xr.Dataset, run: str, x: str = "time") -> float:
    """``x`` at which a diverged run diverged (NaN for a run that did not)."""
    r = ds.sel(run=run)
    if "diverged" not in r or not bool(r["diverged"]):
        return float("nan")
    at = float(r["diverged_at"])
    if x == "step" or "time" not in r.variables or not np.isfinite(at):
        return at
    t = r["time"].sel(step=int(at)).values if int(at) in r.step.values else np.nan
    return float(t) if np.isfinite(t) else float(np.nanmax(r["time"].values))


def _figure(panels: int = 1, height: float = 3.2, sharex: bool = False) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(7.0, height * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, list(axes)


def _runs_with(ds: xr.Dataset, *names: str) -> list[str]:
    return [str(r) for r in ds.run.values if any(has(ds.sel(run=r), n) for n in names)]


def _require(ds: xr.Dataset, *names: str) -> None:
    if not any(has(ds, n) for n in names):
        raise ValueError(f"the dataset has no {' or '.join(repr(n) for n in names)} to plot")


def _mark_divergence(ax: Axes, ds: xr.Dataset, run: str, color: str, x: str) -> None:
    at = divergence_x(ds, run, x)
    if np.isfinite(at):
        ax.axvline(at, color=color, linestyle=":", linewidth=1.2)
        ax.annotate("diverged", (at, 1.0), xycoords=("data", "axes fraction"), color=color, rotation=90,
                    ha="right", va="top", fontsize=8)


def _finish(ax: Axes, x: str, ylabel: str, log: bool = False) -> None:
    if ax.get_subplotspec().is_last_row() or len(ax.get_shared_x_axes().get_siblings(ax)) == 1:
        ax.set_xlabel(_XLABEL[x])
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if 0 < len(ax.get_legend_handles_labels()[0]) <= MAX_LEGEND:
        ax.legend(fontsize=8)


def loss(ds: xr.Dataset, x: str = "time", window: int = SMOOTH_WINDOW) -> Figure:
    """Training loss of every run (log scale). Discrete runs are drawn faint with their ``window``-step moving
    average on top (the time average that flows are compared with)."""
    _require(ds, "loss")
    fig, (ax,) = _figure()
    col = colors(ds)
    for run in _runs_with(ds, "loss"):
        _loss_lines(ax, ds, run, col[run], x, window if str(ds["process"].sel(run=run).values) == "discrete" else 0)
    ax.set_title("training loss")
    _finish(ax, x, "loss", log=_positive(ds, "loss"))
    return fig


def _loss_lines(ax: Axes, ds: xr.Dataset, run: str, color: str, x: str, window: int) -> None:
    """The run's loss; with ``window`` > 0 faint, under its moving average (when the run spans a full window)."""
    xv, yv = series(ds, "loss", run, x)
    xs, avg = smoothed(ds, run, window, x=x) if window else ((), ())
    if len(xs):
        ax.plot(xv, yv, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(xs, avg, color=color, label=f"{run} ({window}-step average)")
    else:
        ax.plot(xv, yv, color=color, label=run)
    _mark_divergence(ax, ds, run, color, x)


def _curvature(ds: xr.Dataset, name: str, title: str, ylabel: str, x: str, with_eigs: bool) -> Figure:
    runs = _runs_with(ds, name, *(("eigs",) if with_eigs else ()))
    fig, axes = _figure(len(runs), height=2.6)
    col = colors(ds)
    for ax, run in zip(axes, runs):
        r = ds.sel(run=run)
        if with_eigs and has(r, "eigs"):
            for i in range(r.sizes["eig"]):
                ax.plot(*_xy(r, r["eigs"].isel(eig=i), x), color=col[run], alpha=0.35, linewidth=0.8,
                        label="tracked eigenvalues" if i == 0 else None)
        if has(r, name):
            ax.plot(*series(ds, name, run, x), color=col[run], marker=".", markersize=3, label=ylabel)
        if threshold_applies(ds, run, name):
            ax.plot(*series(ds, "threshold", run, x), color="k", linestyle="--", linewidth=1, label="threshold")
        _mark_divergence(ax, ds, run, col[run], x)
        ax.set_title(f"{title} — {run}", fontsize=10)
        _finish(ax, x, ylabel)
    return fig


def sharpness(ds: xr.Dataset, x: str = "time") -> Figure:
    """One panel per run: λ_max(H) and the tracked eigenvalues ``eigs``, with the run's stability ``threshold``
    (dashed) where the threshold bounds λ_max(H) itself (:func:`threshold_applies`: P̃ = I, e.g. GD)."""
    _require(ds, "sharpness", "eigs")
    return _curvature(ds, "sharpness", "sharpness", "λ_max(H)", x, with_eigs=True)


def precond_sharpness(ds: xr.Dataset, x: str = "time") -> Figure:
    """One panel per run: preconditioned sharpness λ_max(P̃⁻¹H) against the run's threshold (dashed)."""
    _require(ds, "precond_sharpness")
    return _curvature(ds, "precond_sharpness", "preconditioned sharpness", "λ_max(P̃⁻¹H)", x, with_eigs=False)


def noise_kernel_norm(ds: xr.Dataset, x: str = "time") -> Figure:
    """Noise kernel norm K of every run against 1, the stochastic edge of stability (Agarwala & Pennington 2024)."""
    _require(ds, "noise_kernel_norm")
    fig, (ax,) = _figure()
    col = colors(ds)
    for run in _runs_with(ds, "noise_kernel_norm"):
        ax.plot(*series(ds, "noise_kernel_norm", run, x), color=col[run], marker=".", markersize=3, label=run)
        _mark_divergence(ax, ds, run, col[run], x)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="K = 1")
    ax.set_title("noise kernel norm")
    _finish(ax, x, "K")
    return fig


def stochastic_edge(ds: xr.Dataset, x: str = "time") -> Figure:
    """The edge of stochastic stability per minibatch run: batch sharpness × η/2 against 1 (batch sharpness at
    2/η, Andreyev & Beneventano 2024) and λ_max(E_B[(I − ηH_B)²]) against 1 (the second-moment edge)."""
    _require(ds, "batch_sharpness")
    fig, axes = _figure(2, height=2.6, sharex=True)
    col = colors(ds)
    scaled = ds.assign(batch_sharpness=ds.batch_sharpness * ds.step_size / 2)
    for ax, name, title in ((axes[0], "batch_sharpness", "batch sharpness × η/2"),
                            (axes[1], "second_moment_contraction", "λ_max(E_B[(I − ηH_B)²])")):
        for run in _runs_with(scaled, name):
            ax.plot(*series(scaled, name, run, x), color=col[run], marker=".", markersize=3, label=run)
            _mark_divergence(ax, ds, run, col[run], x)
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="edge")
        ax.set_title(title)
        _finish(ax, x, title)
    return fig


GAPS = {"distance": "‖w − w_ref‖", "function_distance": "RMS ‖f(x; w) − f(x; w_ref)‖", "loss_gap": "L − L_ref",
        "sharpness_gap": "S − S_ref"}
"""The comparison variables of :func:`flowsim.compare` and their titles."""


def gaps(ds: xr.Dataset, x: str = "step", reference: Optional[str] = None) -> Figure:
    """Distances and loss/sharpness gaps of every run to the reference run, one panel per variable present;
    against steps by default, the alignment flowsim.compare uses. A dataset without them is compared first
    (:func:`flowsim.compare`, against ``reference`` or the scenario's)."""
    if not any(has(ds, n) for n in GAPS):
        from flowsim.compare import compare
        ds = compare(ds, reference)
    names = [n for n in GAPS if has(ds, n)]
    _require(ds, *GAPS)
    fig, axes = _figure(len(names), height=2.6, sharex=True)
    col = colors(ds)
    for ax, name in zip(axes, names):
        for run in _runs_with(ds, name):
            if run == reference:
                continue
            ax.plot(*series(ds, name, run, x), color=col[run], label=run)
            _mark_divergence(ax, ds, run, col[run], x)
        ax.set_title(f"{GAPS[name]}" + (f"  (reference: {reference})" if reference else ""), fontsize=10)
        _finish(ax, x, name, log=name.endswith("distance") and _positive(ds, name))
    return fig


def predicted_loss(ds: xr.Dataset, x: str = "time", window: int = SMOOTH_WINDOW) -> Figure:
    """One panel per run with ``predicted_loss`` (central flows): the prediction L(w) + ½⟨H, Σ⟩, the flow's own
    L(w), and the loss of the matching discrete run (same rule, lr and batch size) with its moving average."""
    _require(ds, "predicted_loss")
    runs = _runs_with(ds, "predicted_loss")
    fig, axes = _figure(len(runs), height=2.8)
    col = colors(ds)
    for ax, run in zip(axes, runs):
        ax.plot(*series(ds, "predicted_loss", run, x), color=col[run], label=f"{run}: predicted")
        if has(ds.sel(run=run), "loss"):
            ax.plot(*series(ds, "loss", run, x), color=col[run], linestyle="--", linewidth=1, label=f"{run}: L(w)")
        partner = discrete_partner(ds, run)
        if partner is not None:
            _loss_lines(ax, ds, partner, col[partner], x, window)
        _mark_divergence(ax, ds, run, col[run], x)
        ax.set_title(f"predicted vs actual loss — {run}", fontsize=10)
        _finish(ax, x, "loss", log=_positive(ds, "loss") and _positive(ds, "predicted_loss"))
    return fig


def sigma(ds: xr.Dataset, x: str = "time", window: int = SMOOTH_WINDOW) -> Figure:
    """One panel per central-flow run: each eigenvalue of Σ (``sigma_eigs``, the predicted oscillation variance,
    weight²) against the ``window``-step moving average of the shadow discrete run's squared displacement along
    that eigenvector (``sigma_displacement_sq``), log scale."""
    _require(ds, "sigma_eigs")
    runs = _runs_with(ds, "sigma_eigs")
    fig, axes = _figure(len(runs), height=2.8)
    for ax, run in zip(axes, runs):
        r = ds.sel(run=run)
        for i in range(r.sizes["crit"]):
            if not has(r.isel(crit=i), "sigma_eigs"):
                continue
            ax.plot(*_xy(r, r["sigma_eigs"].isel(crit=i), x), color=f"C{i}", label=f"Σ eigenvalue {i + 1}")
            if has(r.isel(crit=i), "sigma_displacement_sq"):
                ax.plot(*_moving_average(r, r["sigma_displacement_sq"].isel(crit=i), window, x), color=f"C{i}",
                        linestyle="--", label=f"discrete displacement² ({window}-step average)")
        _mark_divergence(ax, ds, run, "k", x)
        ax.set_title(f"oscillation variance along Σ — {run}", fontsize=10)
        _finish(ax, x, "weight²", log=_positive(r, "sigma_eigs"))
    return fig


def discrete_partner(ds: xr.Dataset, run: str) -> Optional[str]:
    """The first discrete run with the same rule, lr and batch size as ``run`` (None if there is none)."""
    keys = [k for k in ("rule", "lr", "batch_size") if k in ds.coords]
    me = ds.sel(run=run)
    for other in ds.run.values:
        o = ds.sel(run=other)
        if (other != run and str(o["process"].values) == "discrete" and has(o, "loss")
                and all(o[k].values == me[k].values for k in keys)):
            return str(other)
    return None


def step_size(ds: xr.Dataset, x: str = "step") -> Figure:
    """Step size η used at each step, every run (log scale); drawn against steps by default."""
    _require(ds, "step_size")
    fig, (ax,) = _figure(height=2.8)
    col = colors(ds)
    for run in _runs_with(ds, "step_size"):
        ax.plot(*series(ds, "step_size", run, x), color=col[run], label=run, drawstyle="steps-post")
        _mark_divergence(ax, ds, run, col[run], x)
    ax.set_title("step size")
    _finish(ax, x, "η", log=_positive(ds, "step_size"))
    return fig


def _positive(ds: xr.Dataset, name: str) -> bool:
    v = ds[name].values.astype(float)
    return bool((v[np.isfinite(v)] > 0).all())
