"""Figures of a flowsim Dataset, for notebooks and for the HTML report (:mod:`flowsim.report`).

Each public function takes the Dataset of :func:`flowsim.open` (dims ``run``, ``step``, …; the README's "Reading
a store") and returns a ``matplotlib.figure.Figure`` (no pyplot state: a notebook displays it, ``fig.savefig``
writes it).

Clock: every figure of a dataset has one x axis, ``time`` (Σ η, the gradient-flow clock) or ``step`` (optimizer
steps), and its label says which. ``x=None`` (the default) takes :func:`clock`: ``ds.attrs["clock"]`` when set
(the report sets it), else ``time`` only where Σ η is comparable across the runs (see :func:`clock`). The one
exception: the distances and gaps to a reference, computed at equal step, are drawn against step where the runs'
clocks differ at equal step (:func:`gaps_clock`).

Runs: every run keeps one look (colour, line style, width: :func:`looks`) in every figure; earlier runs are drawn
wider, so a run lying exactly under a later one still shows. A sweep (runs with a ``run_name`` coordinate, see
:mod:`flowsim.sweep`) is coloured by its first swept coordinate, line styles tell the other swept coordinates
apart, and each figure carries a legend of both (:func:`sweep_legend`); its per-run panels become one grid of
small multiples with shared axes, one panel per sweep point. A diverged run is marked where it diverged. A figure
asked for a variable the dataset does not hold (or holds only as NaN), or drawn from runs that share a name,
raises ValueError. This module computes
nothing but smoothing, ratios to thresholds and the edge-of-stability onset; distances and gaps come from
:mod:`flowsim.compare`.
"""
from __future__ import annotations

import math
from numbers import Number
from typing import Optional

import numpy as np
import pandas as pd
import xarray as xr
import yaml
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from flowsim.solvers import PROCESSES

SMOOTH_WINDOW = 20
"""Default smoothing window for discrete losses, in optimizer steps (a centered moving average)."""

EOS_FRACTION = 0.95
"""The edge of stability starts the first time the controlling sharpness reaches this fraction of threshold."""

MAX_LEGEND = 10
"""Axes of an unswept dataset with more labelled lines than this (colours repeat) get no legend."""

TIME_SPREAD = 10.0
"""Largest ratio of the runs' step sizes (lr) at which the clock is still ``time``: beyond it Σ η squashes the
runs with small steps into a corner of the axis."""

XLABEL = {"time": "time  (Σ η, gradient-flow units)", "step": "step  (optimizer steps)",
          "scaled_step": "step × κ  (steps at the swept scale κ = 1)"}
"""The x-axis label of each clock."""

LINESTYLES = ("-", "--", ":", "-.")


def has(ds: xr.Dataset, name: str) -> bool:
    """Whether ``ds`` holds variable ``name`` with at least one finite value."""
    return name in ds.variables and bool(np.isfinite(ds[name].values.astype(float)).any())


def clock(ds: xr.Dataset, x: Optional[str] = None) -> str:
    """The x axis of the figures of ``ds``: ``x`` when given, else ``ds.attrs["clock"]`` when set, else chosen
    by content: ``time`` when the dataset has it, every run uses the same update rule with a step size it was
    given (``lr`` finite: no controller sets η) and the step sizes differ by at most TIME_SPREAD×; ``step``
    otherwise (Σ η of Adam is not GD's, and under a controller or far-apart step sizes it squashes runs). A sweep
    of ``scale`` (:mod:`flowsim.sweep`) is drawn against ``scaled_step``, step × κ: the SDE's clock of its
    scaling rule."""
    x = x or ds.attrs.get("clock")
    if x is None and "scale" in ds.coords:
        return "scaled_step"
    if x is None:
        lr = ds["lr"].values.astype(float) if "lr" in ds.coords else np.array([np.nan])
        same_rule = "rule" in ds.coords and len(set(ds["rule"].values.tolist())) == 1
        comparable = same_rule and bool(np.isfinite(lr).all()) and lr.max() <= TIME_SPREAD * lr.min()
        return "time" if "time" in ds.variables and comparable else "step"
    if x not in XLABEL:
        raise ValueError(f"x: {x!r} is not one of {sorted(XLABEL)}")
    if x == "time" and "time" not in ds.variables:
        raise ValueError("x: the dataset has no time (Σ η) to plot against; use step")
    if x == "scaled_step" and "scale" not in ds.coords:
        raise ValueError("x: scaled_step needs a sweep of scale; use step")
    return x


def sweep_coords(ds: xr.Dataset) -> list[str]:
    """The run coordinates a sweep varies: those of the scenario's ``sweep:`` keys (``.`` → ``_``), in its
    order, then ``run_name`` when a point has several runs; only those with more than one value. Empty for a
    dataset that is not a sweep (no ``run_name`` coordinate)."""
    if "run_name" not in ds.coords:
        return []
    keys = (yaml.safe_load(ds.attrs.get("scenario") or "") or {}).get("sweep") or {}
    names = [k.replace(".", "_") for k in keys] + ["run_name"]
    return [n for n in names if n in ds.coords and len(pd.unique(ds[n].values)) > 1]


def _sweep_styles(ds: xr.Dataset, coords: list[str]) -> tuple[dict, dict]:
    """A sweep's value of ``coords[0]`` → colour (a sequential colormap for numbers, in increasing order) and
    combination of the other coordinates' values → line style (in order of appearance)."""
    values = list(pd.unique(ds[coords[0]].values))
    if all(isinstance(v, Number) for v in values):
        values = sorted(values)
        colour = {v: to_hex(colormaps["viridis"](0.9 * i / max(len(values) - 1, 1))) for i, v in enumerate(values)}
    else:
        colour = {v: f"C{i % 10}" for i, v in enumerate(values)}
    combos = dict.fromkeys(_combo(ds, coords[1:], r) for r in ds.run.values)
    return colour, {c: LINESTYLES[i % len(LINESTYLES)] for i, c in enumerate(combos)}


def _combo(ds: xr.Dataset, coords: list[str], run) -> tuple:
    return tuple(ds[c].sel(run=run).item() for c in coords)


def _point(coords: list[str], values: tuple) -> str:
    return ", ".join(f"{c} = {v:g}" if isinstance(v, float) else f"{c} = {v}" for c, v in zip(coords, values))


def looks(ds: xr.Dataset) -> dict[str, dict]:
    """Run name → its line properties (``color``, ``linestyle``, ``linewidth``, ``label``), the same in every
    figure. Unswept: a colour per run (C0…C9, then the next line style) and the run's name as label. A sweep: the
    colour of the run's value of the first swept coordinate and the line style of its other swept values, no label
    (the figure's legend is :func:`sweep_legend`). Widths fall from 2.5 (first run) to 1 (last)."""
    runs = [str(r) for r in ds.run.values]
    width = [1.0 + 1.5 * (len(runs) - 1 - i) / max(len(runs) - 1, 1) for i in range(len(runs))]
    coords = sweep_coords(ds)
    if not coords:
        return {r: {"color": f"C{i % 10}", "linestyle": LINESTYLES[i // 10 % len(LINESTYLES)],
                    "linewidth": width[i], "label": r} for i, r in enumerate(runs)}
    colour, style = _sweep_styles(ds, coords)
    return {r: {"color": colour[ds[coords[0]].sel(run=r).item()], "linestyle": style[_combo(ds, coords[1:], r)],
                "linewidth": width[i], "label": None} for i, r in enumerate(runs)}


def sweep_legend(ds: xr.Dataset) -> list[Line2D]:
    """Legend handles of a sweep: one per value of the first swept coordinate (its colour) and one per
    combination of the others (its line style, in black); empty for an unswept dataset."""
    coords = sweep_coords(ds)
    if not coords:
        return []
    colour, style = _sweep_styles(ds, coords)
    return ([Line2D([], [], color=c, linewidth=2, label=_point(coords[:1], (v,))) for v, c in colour.items()]
            + [Line2D([], [], color="k", linestyle=s, linewidth=1.5, label=_point(coords[1:], combo))
               for combo, s in style.items() if combo])


def _key(fig: Figure, ds: xr.Dataset) -> Figure:
    """``fig`` with the sweep's legend (:func:`sweep_legend`) outside its axes, right, in as many columns as
    its height needs (about 0.17 inch an entry); nothing when unswept."""
    handles = sweep_legend(ds)
    if handles:
        columns = math.ceil(len(handles) * 0.17 / max(fig.get_figheight() - 0.4, 0.5))
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, ncols=columns)
    return fig


def series(ds: xr.Dataset, name: str, run: str, x: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """The finite points of ``name`` for one run against ``x`` ("time" or "step"; None: :func:`clock`).

    A per-run scalar (no ``step`` dim) is repeated at every recorded step of the run.
    """
    r = ds.sel(run=run)
    return _xy(r, r[name], clock(ds, x))


def _coordinate(r: xr.Dataset, x: str) -> xr.DataArray:
    """The value of the clock ``x`` at each recorded step of ``r`` (one run or all)."""
    return r["time"] if x == "time" else r.step * r["scale"] if x == "scaled_step" else r.step


def _xy(r: xr.Dataset, y: xr.DataArray, x: str) -> tuple[np.ndarray, np.ndarray]:
    if "step" not in y.dims:
        y = y.broadcast_like(r.step)
    xs = _coordinate(r, x).broadcast_like(y)
    xv, yv = np.asarray(xs.values, float), np.asarray(y.values, float)
    ok = np.isfinite(xv) & np.isfinite(yv)
    return xv[ok], yv[ok]


def smoothed(ds: xr.Dataset, run: str, window: int = SMOOTH_WINDOW, name: str = "loss",
             x: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Centered moving average of ``name`` over ``window`` optimizer steps, at the points with a full window
    (none when the run is shorter than the window); against ``x`` (None: :func:`clock`).

    The window is converted to recorded points with the run's median spacing of recorded steps; with an even
    number of points the window at recorded point i is [i − points/2, i + points/2).
    """
    r = ds.sel(run=run)
    return _moving_average(r, r[name], window, clock(ds, x))


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


def eos_onset(ds: xr.Dataset, run: str, x: Optional[str] = None) -> float:
    """First ``x`` (None: :func:`clock`) at which the controlling sharpness ≥ EOS_FRACTION · threshold (NaN if
    never or unmeasured)."""
    name = controlling(ds, run)
    if name is None:
        return float("nan")
    r = ds.sel(run=run)
    xv, ratio = _xy(r, r[name] / (EOS_FRACTION * r["threshold"]), clock(ds, x))
    crossed = ratio >= 1.0
    return float(xv[np.argmax(crossed)]) if crossed.any() else float("nan")


def divergence_x(ds: xr.Dataset, run: str, x: Optional[str] = None) -> float:
    """``x`` (None: :func:`clock`) at which a diverged run diverged (NaN for a run that did not)."""
    x = clock(ds, x)
    r = ds.sel(run=run)
    if "diverged" not in r or not bool(r["diverged"]):
        return float("nan")
    at = float(r["diverged_at"])
    if x != "time" or not np.isfinite(at):
        return at * float(r["scale"]) if x == "scaled_step" else at
    t = r["time"].sel(step=int(at)).values if int(at) in r.step.values else np.nan
    return float(t) if np.isfinite(t) else float(np.nanmax(r["time"].values))


def _figure(panels: int = 1, height: float = 3.2, sharex: bool = False) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(7.0, height * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, list(axes)


def _small_multiples(panels: int, grid: bool, height: float) -> tuple[Figure, list[Axes]]:
    """A column of ``panels`` axes, or with ``grid`` up to three per row with shared x and y axes."""
    cols = min(3, panels) if grid else 1
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(7.0 if cols == 1 else 10.0, height * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, sharex=grid, sharey=grid, squeeze=False).ravel())
    for ax in axes[panels:]:
        fig.delaxes(ax)
    for ax in axes[max(panels - cols, 0):panels]:   # the lowest panel of each column shows its x ticks
        ax.xaxis.set_tick_params(labelbottom=True)
    return fig, axes[:panels]


def _panels(ds: xr.Dataset, runs: list[str]) -> list[tuple[str, list[str]]]:
    """(title, runs) of each panel of a per-run figure: one per run, or in a sweep one per point (the runs
    whose swept values other than ``run_name`` agree), in run order."""
    coords = [c for c in sweep_coords(ds) if c != "run_name"]
    if not sweep_coords(ds):
        return [(r, [r]) for r in runs]
    groups: dict[str, list[str]] = {}
    for r in runs:
        groups.setdefault(_point(coords, _combo(ds, coords, r)) or "all runs", []).append(r)
    return list(groups.items())


def _runs_with(ds: xr.Dataset, *names: str) -> list[str]:
    return [str(r) for r in ds.run.values if any(has(ds.sel(run=r), n) for n in names)]


def _require(ds: xr.Dataset, *names: str) -> None:
    """Every figure's entry check: runs it can tell apart, recorded steps, and one of ``names`` to draw."""
    from flowsim.compare import require_runs
    require_runs(ds)
    if not any(has(ds, n) for n in names):
        raise ValueError(f"the dataset has no {' or '.join(repr(n) for n in names)} to plot")


def _mark_divergence(ax: Axes, ds: xr.Dataset, run: str, color: str, x: str) -> None:
    at = divergence_x(ds, run, x)
    if np.isfinite(at):
        ax.axvline(at, color=color, linestyle=":", linewidth=1.2)
        ax.annotate("diverged", (at, 1.0), xycoords=("data", "axes fraction"), color=color, rotation=90,
                    ha="right", va="top", fontsize=8)


def _finish(ax: Axes, xlabel: str, ylabel: str, log: bool = False) -> None:
    """Labels (``xlabel``: a clock of XLABEL or a plain label), log y, grid, and the legend of the labelled
    lines when there are at most MAX_LEGEND."""
    ax.set_xlabel(XLABEL.get(xlabel, xlabel))
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if 0 < len(ax.get_legend_handles_labels()[0]) <= MAX_LEGEND:
        ax.legend(fontsize=8)


def loss(ds: xr.Dataset, x: Optional[str] = None, window: int = SMOOTH_WINDOW) -> Figure:
    """Training loss of every run (log scale). Discrete runs are drawn faint with their ``window``-step moving
    average on top (the time average that flows are compared with)."""
    _require(ds, "loss")
    x = clock(ds, x)
    fig, (ax,) = _figure()
    look = looks(ds)
    for run in _runs_with(ds, "loss"):
        _loss_lines(ax, ds, run, look[run], x, window if _iterates(ds.sel(run=run)) else 0)
    ax.set_title("training loss")
    _finish(ax, x, "loss", log=_positive(ds, "loss"))
    return _key(fig, ds)


def _loss_lines(ax: Axes, ds: xr.Dataset, run: str, look: dict, x: str, window: int) -> None:
    """The run's loss; with ``window`` > 0 faint, under its moving average (when the run spans a full window)."""
    xv, yv = series(ds, "loss", run, x)
    xs, avg = smoothed(ds, run, window, x=x) if window else ((), ())
    if len(xs):
        ax.plot(xv, yv, color=look["color"], alpha=0.3, linewidth=0.8)
        ax.plot(xs, avg, **{**look, "label": look["label"] and f"{run} ({window}-step average)"})
    else:
        ax.plot(xv, yv, **look)
    _mark_divergence(ax, ds, run, look["color"], x)


def _curvature(ds: xr.Dataset, name: str, title: str, ylabel: str, x: Optional[str], with_eigs: bool) -> Figure:
    x = clock(ds, x)
    panels = _panels(ds, _runs_with(ds, name, *(("eigs",) if with_eigs else ())))
    fig, axes = _small_multiples(len(panels), bool(sweep_coords(ds)), height=2.6)
    look = looks(ds)
    for ax, (panel, runs) in zip(axes, panels):
        for run in runs:
            r, line = ds.sel(run=run), {**look[run], "label": ylabel if len(runs) == 1 else None}
            if with_eigs and has(r, "eigs"):
                for i in range(r.sizes["eig"]):
                    ax.plot(*_xy(r, r["eigs"].isel(eig=i), x), color=line["color"], alpha=0.35, linewidth=0.8,
                            label="tracked eigenvalues" if i == 0 and len(runs) == 1 else None)
            if has(r, name):
                ax.plot(*series(ds, name, run, x), marker=".", markersize=3, **line)
            if threshold_applies(ds, run, name):
                ax.plot(*series(ds, "threshold", run, x), color="k" if len(runs) == 1 else line["color"],
                        linestyle="--", linewidth=1, label="threshold" if run == runs[0] else None)
            _mark_divergence(ax, ds, run, line["color"], x)
        ax.set_title(f"{title} — {panel}", fontsize=10)
        _finish(ax, x, ylabel)
    return _key(fig, ds)


def sharpness(ds: xr.Dataset, x: Optional[str] = None) -> Figure:
    """One panel per run (a sweep: per point, in a grid with shared axes): λ_max(H) and the tracked eigenvalues
    ``eigs``, with the run's stability ``threshold`` (dashed) where the threshold bounds λ_max(H) itself
    (:func:`threshold_applies`: P̃ = I, e.g. GD)."""
    _require(ds, "sharpness", "eigs")
    return _curvature(ds, "sharpness", "sharpness", "λ_max(H)", x, with_eigs=True)


def precond_sharpness(ds: xr.Dataset, x: Optional[str] = None) -> Figure:
    """One panel per run (a sweep: per point, in a grid with shared axes): preconditioned sharpness
    λ_max(P̃⁻¹H) against the run's threshold (dashed)."""
    _require(ds, "precond_sharpness")
    return _curvature(ds, "precond_sharpness", "preconditioned sharpness", "λ_max(P̃⁻¹H)", x, with_eigs=False)


def edge(ds: xr.Dataset, x: Optional[str] = None) -> Figure:
    """Every run's controlling sharpness (:func:`controlling`) over its threshold, on one axis against 1 (the
    edge of stability): η·λ_max(H)/2 for GD, λ_max(P̃⁻¹H)/threshold for a preconditioned rule — in general
    η·λ/θ with θ the rule's threshold coefficient (threshold = θ/η)."""
    _require(ds, "threshold")
    runs = [r for r in _runs_with(ds, "threshold") if controlling(ds, r) is not None]
    if not runs:
        raise ValueError("the dataset has no sharpness measured against a threshold to plot")
    x = clock(ds, x)
    fig, (ax,) = _figure(height=3.0)
    look = looks(ds)
    for run in runs:
        r = ds.sel(run=run)
        ax.plot(*_xy(r, r[controlling(ds, run)] / r["threshold"], x), marker=".", markersize=3, **look[run])
        _mark_divergence(ax, ds, run, look[run]["color"], x)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="edge (η·λ/θ = 1)")
    ax.set_title("sharpness over threshold, all runs")
    _finish(ax, x, "η·λ/θ")
    return _key(fig, ds)


def final_loss(ds: xr.Dataset) -> Figure:
    """A sweep's final loss (the last finite value, log scale) against its first swept coordinate, one line per
    combination of the other swept values (:func:`sweep_legend`); × marks a run that diverged."""
    from flowsim.compare import last_recorded
    coords = sweep_coords(ds)
    if not coords:
        raise ValueError("final_loss: the dataset is not a sweep (no swept run coordinate varies)")
    _require(ds, "loss")
    colour, style = _sweep_styles(ds, coords)
    position = {v: (v if isinstance(v, Number) else i) for i, v in enumerate(colour)}
    final = last_recorded(ds["loss"], finite=True)
    fig, (ax,) = _figure(height=3.0)
    for combo, linestyle in style.items():
        runs = [r for r in ds.run.values if _combo(ds, coords[1:], r) == combo]
        xv = [position[ds[coords[0]].sel(run=r).item()] for r in runs]
        order = np.argsort(xv)
        ys = final.sel(run=runs).values.astype(float)
        ax.plot(np.asarray(xv)[order], ys[order], color="k", linestyle=linestyle, linewidth=1, zorder=1)
        for r, xr_, y in zip(runs, xv, ys):
            diverged = "diverged" in ds and bool(ds["diverged"].sel(run=r))
            ax.plot([xr_], [y], marker="x" if diverged else "o", markersize=7,
                    color=colour[ds[coords[0]].sel(run=r).item()], linestyle="none", zorder=2)
    if not all(isinstance(v, Number) for v in colour):
        ax.set_xticks(list(position.values()), [str(v) for v in position])
    elif min(position) > 0 and max(position) >= 10 * min(position):
        ax.set_xscale("log")
    ax.set_title("final loss across the sweep (× diverged)")
    _finish(ax, coords[0], "final loss", log=_positive(ds, "loss"))
    return _key(fig, ds)


def noise_kernel_norm(ds: xr.Dataset, x: Optional[str] = None) -> Figure:
    """Noise kernel norm K of every run against 1, the stochastic edge of stability (Agarwala & Pennington 2024)."""
    _require(ds, "noise_kernel_norm")
    x = clock(ds, x)
    fig, (ax,) = _figure()
    look = looks(ds)
    for run in _runs_with(ds, "noise_kernel_norm"):
        ax.plot(*series(ds, "noise_kernel_norm", run, x), marker=".", markersize=3, **look[run])
        _mark_divergence(ax, ds, run, look[run]["color"], x)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="K = 1")
    ax.set_title("noise kernel norm")
    _finish(ax, x, "K")
    return _key(fig, ds)


def stochastic_edge(ds: xr.Dataset, x: Optional[str] = None) -> Figure:
    """The edge of stochastic stability per minibatch run: batch sharpness × η/2 against 1 (batch sharpness at
    2/η, Andreyev & Beneventano 2024) and E_B‖(I − ηH_B)u‖² along the top Hessian eigenvector u against 1 (the
    second-moment edge along the sharpest direction; logarithmic axis)."""
    _require(ds, "batch_sharpness")
    x = clock(ds, x)
    fig, axes = _figure(2, height=2.6, sharex=True)
    look = looks(ds)
    scaled = ds.assign(batch_sharpness=ds.batch_sharpness * ds.step_size / 2)
    for ax, name, title in ((axes[0], "batch_sharpness", "batch sharpness × η/2"),
                            (axes[1], "second_moment_contraction", "E_B‖(I − ηH_B)u₁‖²")):
        for run in _runs_with(scaled, name):
            ax.plot(*series(scaled, name, run, x), marker=".", markersize=3, **look[run])
            _mark_divergence(ax, ds, run, look[run]["color"], x)
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="edge")
        ax.set_title(title)
        # the contraction is a growth factor (≥ 0): on a linear axis a diverging run flattens the others
        _finish(ax, x, title, log=name == "second_moment_contraction")
    return _key(fig, ds)


GAPS = {"distance": ("‖w − w_ref‖", "distance to the reference (weights)"),
        "function_distance": ("RMS ‖f(x; w) − f(x; w_ref)‖", "distance to the reference (outputs)"),
        "loss_gap": ("L − L_ref", "loss − reference loss"),
        "sharpness_gap": ("S − S_ref", "sharpness − reference sharpness")}
"""The comparison variables of :func:`flowsim.compare`: their titles and y-axis labels."""


def gaps_clock(ds: xr.Dataset, x: Optional[str] = None) -> str:
    """The x axis of :func:`gaps`. :func:`flowsim.compare` pairs the runs at equal step, so the gaps are drawn
    against ``x`` (None: :func:`clock`) only where every run has the same value of it at every step (e.g. Σ η of
    runs with one step size), else against ``step``: at its own Σ η, the gap of a run with a 4× smaller step to
    the reference would be drawn at a quarter of the time at which the reference was compared."""
    x = clock(ds, x)
    if x == "step":
        return x
    xs = _coordinate(ds, x)
    spread = (xs.max("run") - xs.min("run")).fillna(0)
    return x if bool((spread <= 1e-9 * abs(xs).max("run").fillna(0)).all()) else "step"


def gaps(ds: xr.Dataset, x: Optional[str] = None, reference: Optional[str] = None) -> Figure:
    """Distances and loss/sharpness gaps of every run to the reference run, one panel per variable present;
    computed at equal step (the alignment flowsim.compare uses) and drawn against ``x`` only where that is the
    same alignment, else against step (:func:`gaps_clock`). A dataset without them is compared first
    (:func:`flowsim.compare`, against ``reference`` or the scenario's)."""
    if not any(has(ds, n) for n in GAPS):
        from flowsim.compare import compare
        ds = compare(ds, reference)
    names = [n for n in GAPS if has(ds, n)]
    _require(ds, *GAPS)
    x = gaps_clock(ds, x)
    fig, axes = _figure(len(names), height=2.6, sharex=True)
    look = looks(ds)
    for ax, name in zip(axes, names):
        for run in _runs_with(ds, name):
            if run == reference:
                continue
            ax.plot(*series(ds, name, run, x), **look[run])
            _mark_divergence(ax, ds, run, look[run]["color"], x)
        title, ylabel = GAPS[name]
        ax.set_title(title + (f"  (reference: {reference})" if reference else ""), fontsize=10)
        _finish(ax, x, ylabel, log=name.endswith("distance") and _positive(ds, name))
    return _key(fig, ds)


def predicted_loss(ds: xr.Dataset, x: Optional[str] = None, window: int = SMOOTH_WINDOW) -> Figure:
    """One panel per run with ``predicted_loss`` (central and rod flows): the prediction (L(w) + ½⟨H, Σ⟩; the
    rod's mean of L over its ends), the flow's own
    L(w), and the loss of the matching discrete run (same rule, lr and batch size) with its moving average."""
    _require(ds, "predicted_loss")
    x = clock(ds, x)
    runs = _runs_with(ds, "predicted_loss")
    fig, axes = _figure(len(runs), height=2.8)
    look = looks(ds)
    for ax, run in zip(axes, runs):
        color = look[run]["color"]
        ax.plot(*series(ds, "predicted_loss", run, x), color=color, label=f"{run}: predicted")
        if has(ds.sel(run=run), "loss"):
            ax.plot(*series(ds, "loss", run, x), color=color, linestyle="--", linewidth=1, label=f"{run}: L(w)")
        partner = discrete_partner(ds, run)
        if partner is not None:
            _loss_lines(ax, ds, partner, {**look[partner], "label": partner}, x, window)
        _mark_divergence(ax, ds, run, color, x)
        ax.set_title(f"predicted vs actual loss — {run}", fontsize=10)
        _finish(ax, x, "loss", log=_positive(ds, "loss") and _positive(ds, "predicted_loss"))
    return fig


def sigma(ds: xr.Dataset, x: Optional[str] = None, window: int = SMOOTH_WINDOW) -> Figure:
    """One panel per central- or rod-flow run: each eigenvalue of Σ (``sigma_eigs``, the predicted oscillation variance,
    weight²) against the ``window``-step moving average of the shadow discrete run's squared oscillation
    amplitude along that eigenvector (``sigma_oscillation_sq``), log scale."""
    _require(ds, "sigma_eigs")
    x = clock(ds, x)
    runs = _runs_with(ds, "sigma_eigs")
    fig, axes = _figure(len(runs), height=2.8)
    for ax, run in zip(axes, runs):
        r = ds.sel(run=run)
        for i in range(r.sizes["crit"]):
            if not has(r.isel(crit=i), "sigma_eigs"):
                continue
            ax.plot(*_xy(r, r["sigma_eigs"].isel(crit=i), x), color=f"C{i}", label=f"Σ eigenvalue {i + 1}")
            if has(r.isel(crit=i), "sigma_oscillation_sq"):
                ax.plot(*_moving_average(r, r["sigma_oscillation_sq"].isel(crit=i), window, x), color=f"C{i}",
                        linestyle="--", label=f"discrete oscillation amplitude² ({window}-step average)")
        _mark_divergence(ax, ds, run, "k", x)
        ax.set_title(f"oscillation variance along Σ — {run}", fontsize=10)
        _finish(ax, x, "weight²", log=_positive(r, "sigma_eigs"))
    return fig


def _iterates(run: xr.Dataset) -> bool:
    """Whether one run of a dataset ran the rule's own iterates (the discrete process; its loss oscillates)."""
    process = PROCESSES.get(str(run["process"].values))
    return process is not None and process.iterates


def discrete_partner(ds: xr.Dataset, run: str) -> Optional[str]:
    """The first discrete run with the same rule, lr and batch size as ``run`` (None if there is none)."""
    keys = [k for k in ("rule", "lr", "batch_size") if k in ds.coords]
    me = ds.sel(run=run)
    for other in ds.run.values:
        o = ds.sel(run=other)
        if (other != run and _iterates(o) and has(o, "loss")
                and all(o[k].values == me[k].values for k in keys)):
            return str(other)
    return None


def step_size(ds: xr.Dataset, x: Optional[str] = None) -> Figure:
    """Step size η used at each step, every run (log scale)."""
    _require(ds, "step_size")
    x = clock(ds, x)
    fig, (ax,) = _figure(height=2.8)
    look = looks(ds)
    for run in _runs_with(ds, "step_size"):
        ax.plot(*series(ds, "step_size", run, x), drawstyle="steps-post", **look[run])
        _mark_divergence(ax, ds, run, look[run]["color"], x)
    ax.set_title("step size")
    _finish(ax, x, "η", log=_positive(ds, "step_size"))
    return _key(fig, ds)


def _positive(ds: xr.Dataset, name: str) -> bool:
    v = ds[name].values.astype(float)
    return bool((v[np.isfinite(v)] > 0).all())
