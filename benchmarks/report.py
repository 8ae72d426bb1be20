"""The table and the HTML report of a benchmark store: runs of several tasks and methods (``python -m benchmarks
adaptive -o STORE`` writes one).

Such a store's runs carry the coordinates ``task``, ``method``, ``seed``, ``lr``, ``target``, ``steps_to_target``
and ``wall_to_target``, and its root attrs name the ``baseline`` method and hold the benchmark's settings
(``bench``, YAML). :func:`target_summary` is the per-(task, method) table the benchmark prints; :func:`write` is the
report, drawn by ``flowsim.report.write`` with this module's summary and sections (:data:`TASK_SECTIONS`, one panel
per task). A store whose runs carry ``half`` (the half of the suite: tuning or held-out) is summarized per half
(:func:`by_half`, :func:`half_summary`). Re-render the report of a stored benchmark with ``python -m
benchmarks.report STORE [-o report.html]``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib import colormaps
from matplotlib.figure import Figure

from flowsim.report import Section
from flowsim.report import write as write_report


def final(ds: xr.Dataset, name: str = "loss") -> np.ndarray:
    """Per run, the last finite value of ``name`` along ``step`` (NaN where there is none)."""
    values = np.asarray(ds[name].transpose("run", "step").values, dtype=float)
    out = np.full(values.shape[0], np.nan)
    for i, row in enumerate(values):
        ok = np.flatnonzero(np.isfinite(row))
        if ok.size:
            out[i] = row[ok[-1]]
    return out


def timed(ds: xr.Dataset) -> xr.Dataset:
    """The runs compared in the tables (``timed``; all of them in a store without that coordinate): not the
    untimed runs with curvature measured (``benchmarks.adaptive.theory_runs``)."""
    return ds if "timed" not in ds.coords else ds.isel(run=ds["timed"].values.astype(bool))


def target_summary(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (task, method) of a benchmark dataset's :func:`timed` runs: lr, runs (seeds), hit (runs that reach
    their target), the mean steps and wall seconds to the target over those runs (NaN: none does), the mean final loss
    (last finite), the diverged runs, and the ratios of the ``baseline`` method's (``ds.attrs``) steps and wall seconds
    on the same task to the method's (> 1: the method is faster); ``vs adam``: the final loss over :data:`TUNED_ADAM`'s
    on the same task (NaN where it did not run)."""
    ds = timed(ds)
    runs = pd.DataFrame({
        "task": ds["task"].values, "method": ds["method"].values, "lr": ds["lr"].values,
        "steps": ds["steps_to_target"].values, "wall s": ds["wall_to_target"].values,
        "final loss": final(ds, "loss"), "diverged": ds["diverged"].values})
    table = runs.groupby(["task", "method"], sort=False).agg(
        lr=("lr", "first"), runs=("lr", "size"), hit=("steps", "count"), steps=("steps", "mean"),
        **{"wall s": ("wall s", "mean"), "final loss": ("final loss", "mean"), "diverged": ("diverged", "sum")})
    tasks = table.index.get_level_values("task")
    base = table.xs(ds.attrs["baseline"], level="method")
    for column, ratio in (("steps", "steps x"), ("wall s", "wall x")):
        table[ratio] = base[column].reindex(tasks).to_numpy() / table[column].to_numpy()
    adam = table["final loss"].xs(TUNED_ADAM, level="method") if TUNED_ADAM in table.index.get_level_values(
        "method") else pd.Series(dtype=float)
    table["vs adam"] = table["final loss"].to_numpy() / adam.reindex(tasks).to_numpy()
    return table


TUNED_ADAM = "adam-best"
"""The method whose final loss the column ``vs adam`` of :func:`target_summary` divides by: Adam at the step size
of its grid that reaches the target on the most seeds, then in the fewest steps."""
DEFAULT_ADAM = "adam-default"
"""Adam at its default η = 1e-3, what a user gets without tuning: each half's summary counts the tasks where a
headline method's final loss is below it."""
HEADLINE = ("edge-adam", "edge-gd")
"""The methods each half's summary line is about: the edge controller's defaults over Adam and over GD."""
PARAMETER_FREE = ("prodigy", "schedulefree-sgd")
"""The methods the headline methods' mean log10 final loss is compared against, with CDAT over the same rule."""
LOSS_FLOOR = 1e-8
"""Final losses below it count as it in the log10 comparison of :func:`half_summary`: a float32 cross-entropy
reaches exactly 0 once every example's term rounds to 0 (below ≈ 6e-8), and log10 0 would make the mean −inf."""


def halves(ds: xr.Dataset) -> list[str]:
    """The halves of the suite the dataset's runs belong to, in order (``[""]`` for a store without ``half``)."""
    if "half" not in ds.coords:
        return [""]
    return [str(h) for h in dict.fromkeys(ds["half"].values)]


def of_half(ds: xr.Dataset, half: str) -> xr.Dataset:
    """The runs of one half (all of them for a store without ``half``)."""
    return ds if "half" not in ds.coords else ds.isel(run=(ds["half"] == half).values)


def half_summary(ds: xr.Dataset, table: Optional[pd.DataFrame] = None) -> list[str]:
    """For each of :data:`HEADLINE` present in ``ds`` (the runs of one half), one line: on how many tasks it needs
    at least 1.5x fewer steps than the baseline (``steps x`` ≥ 1.5), on how many its final loss is at most 1.1x
    tuned Adam's (``vs adam`` ≤ 1.1) and on how many below :data:`DEFAULT_ADAM`'s, its mean over the tasks of log10(final loss / other's final loss) for each of
    :data:`PARAMETER_FREE` and CDAT over the same rule (``cdat-<rule>``; < 0: lower loss; losses floored at
    :data:`LOSS_FLOOR`), and its diverged runs."""
    table = target_summary(ds) if table is None else table
    tasks = list(dict.fromkeys(table.index.get_level_values("task")))
    methods = set(table.index.get_level_values("method"))
    lines = []
    for method in HEADLINE:
        if method not in methods:
            continue
        rows = table.xs(method, level="method").reindex(tasks)
        n = int(rows["runs"].notna().sum())
        rule = str(ds["rule"].values[(ds["method"] == method).values][0])
        fewer = int((rows["steps x"] >= 1.5).sum())
        close = int((rows["vs adam"] <= 1.1).sum())
        below = int((rows["final loss"].to_numpy() < table.xs(DEFAULT_ADAM, level="method")["final loss"].reindex(
            tasks).to_numpy()).sum()) if DEFAULT_ADAM in methods else 0
        versus = []
        for other in (*PARAMETER_FREE, f"cdat-{rule}"):
            if other not in methods:
                continue
            ratio = np.log10(np.maximum(rows["final loss"].to_numpy(), LOSS_FLOOR) / np.maximum(
                table.xs(other, level="method")["final loss"].reindex(tasks).to_numpy(), LOSS_FLOOR))
            versus.append(f"{other} {np.nanmean(ratio):+.2f}" if np.isfinite(ratio).any() else f"{other} –")
        lines.append(f"{method}: >= 1.5x fewer steps than {ds.attrs['baseline']} on {fewer}/{n} tasks; final loss "
                     f"<= 1.1x {TUNED_ADAM}'s on {close}/{n}, below {DEFAULT_ADAM}'s on {below}/{n}; mean log10 "
                     f"final loss vs "
                     f"{', '.join(versus) or '–'} (< 0: lower); diverged {int(rows['diverged'].sum())}/"
                     f"{int(rows['runs'].sum())} runs")
    return lines


def by_half(ds: xr.Dataset) -> str:
    """The table of :func:`target_summary` per half of the suite, each followed by its :func:`half_summary`."""
    parts = []
    for half in halves(ds):
        sub = of_half(ds, half)
        table = target_summary(sub)
        tasks = ", ".join(dict.fromkeys(table.index.get_level_values("task")))
        parts.append("\n".join([f"== {half or 'all'} half: {tasks} ==",
                                 table.to_string(float_format=lambda v: f"{v:.3g}"),
                                 *(f"  {line}" for line in half_summary(sub, table))]))
    return "\n\n".join(parts)


def summary(ds: xr.Dataset) -> tuple[pd.DataFrame, str]:
    """The report's summary: :func:`target_summary` and what its columns mean."""
    base = ds.attrs["baseline"]
    lines = [f"{half or 'all'} half — {line}" for half in halves(ds) for line in half_summary(of_half(ds, half))]
    return target_summary(ds), (
        f"Per task and method over its seeds: steps and wall s to the target (the loss that {base} reaches at the "
        f"budget, per seed), mean over the runs that reach it; final loss: mean of the last finite loss; steps x, "
        f"wall x: {base} / method (> 1: faster than {base}); vs adam: final loss / {TUNED_ADAM}'s. "
        + " ".join(f"{line}." for line in lines))


def per_task(ds: xr.Dataset, name: str = "loss") -> Figure:
    """One panel per ``task``: ``name`` of each :func:`timed` run of the task against steps, one colour per ``method``
    with all its seeds, log scale where positive (a step size drawn as steps), a dotted line where a run diverged; on
    the loss panels the task's mean ``target`` (dashed)."""
    ds = timed(ds)
    tasks = [str(t) for t in dict.fromkeys(ds["task"].values)
             if np.isfinite(ds[name].isel(run=(ds["task"] == t).values).values.astype(float)).any()]
    if not tasks:
        raise ValueError(f"the dataset has no {name!r} to plot")
    methods = [str(m) for m in dict.fromkeys(ds["method"].values)]
    palette = [f"C{i}" for i in range(10)] if len(methods) <= 10 else list(colormaps["tab20"].colors)
    colour = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    fig = Figure(figsize=(7.0, 2.8 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), 1, squeeze=False)[:, 0]
    for ax, task in zip(axes, tasks):
        sub = ds.isel(run=(ds["task"] == task).values)
        labelled, positive = set(), True
        for run in sub.run.values:
            r = sub.sel(run=run)
            y = r[name].dropna("step")
            if y.size == 0:
                continue
            method = str(r["method"].values)
            positive &= bool((y.values > 0).all())
            ax.plot(y.step.values, y.values, color=colour[method], linewidth=0.9, alpha=0.8,
                    label=None if method in labelled else method,
                    drawstyle="steps-post" if name == "step_size" else "default")
            labelled.add(method)
            if bool(r["diverged"]) and np.isfinite(float(r["diverged_at"])):
                ax.axvline(float(r["diverged_at"]), color=colour[method], linestyle=":", linewidth=1.2)
        if name == "loss" and "target" in sub.coords:
            ax.axhline(float(sub["target"].mean()), color="k", linestyle="--", linewidth=1, label="target (mean)")
        ax.set_title(f"{name} — {task}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        if positive:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def edge_measured(ds: xr.Dataset) -> Figure:
    """Per task (one row), the untimed runs (not :func:`timed`: the controller's and tuned Adam's): left, η·S/θ
    against steps, with S = λ_max(P̃⁻¹H) on all examples and θ the rule's threshold (recorded ``precond_sharpness``
    / ``threshold``), the discrete run solid and the central flow under the same controller dashed, the edge at 1
    (grey); right, their full-batch loss."""
    runs = ds.isel(run=~ds["timed"].values.astype(bool)) if "timed" in ds.coords else ds.isel(run=[])
    runs = runs.isel(run=np.isfinite(runs["precond_sharpness"].values).any(axis=1)) if runs.sizes["run"] else runs
    if runs.sizes["run"] == 0:
        raise ValueError("the dataset has no measured controller runs (precond_sharpness) to plot")
    tasks = [str(t) for t in dict.fromkeys(runs["task"].values)]
    methods = list(dict.fromkeys(str(m).split(".")[0] for m in runs["method"].values))
    fig = Figure(figsize=(9.0, 2.6 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    for (ratio_ax, loss_ax), task in zip(axes, tasks):
        sub = runs.isel(run=(runs["task"] == task).values)
        for run in sub.run.values:
            r = sub.sel(run=run)
            colour = f"C{methods.index(str(r['method'].values).split('.')[0]) % 10}"
            style = "--" if str(r["process"].values) == "central" else "-"
            ratio = (r["precond_sharpness"] / r["threshold"]).dropna("step")
            ratio_ax.plot(ratio.step.values, ratio.values, style, color=colour, marker=".", linewidth=1,
                          label=str(r["method"].values))
            loss = r["loss"].dropna("step")
            loss_ax.plot(loss.step.values, loss.values, style, color=colour, linewidth=1,
                         label=str(r["method"].values))
        ratio_ax.axhline(1.0, color="0.5", linewidth=1, label="edge (η·S = θ)")
        ratio_ax.set_title(f"η·λ_max(P̃⁻¹H)/θ — {task}", fontsize=10)
        loss_ax.set_title(f"loss — {task}", fontsize=10)
        loss_ax.set_yscale("log")
        for ax in (ratio_ax, loss_ax):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return fig


TASK_SECTIONS: tuple[Section, ...] = (
    Section("Loss per task", ("loss",), lambda ds, ref: per_task(ds, "loss"),
            "Full-batch training loss against optimizer steps, one colour per method (all seeds drawn); dashed: "
            "the mean over seeds of the target. Dotted lines: divergence."),
    Section("Step size per task", ("step_size",), lambda ds, ref: per_task(ds, "step_size"),
            "The step size η used at each recorded step, for the methods that have one (in the rule's own "
            "units: Adam's η is not GD's)."),
    Section("The edge, measured", ("precond_sharpness",), lambda ds, ref: edge_measured(ds),
            "The edge controller's runs once more at seed 0, untimed, with S = λ_max(P̃⁻¹H) on all examples measured "
            "every 10 steps: η·S/θ (θ the rule's threshold: 2 for GD, 38 for Adam), which the controller sets to c "
            "on its own estimate (by default 0.5 over Adam, 1.5 over GD; on minibatches that estimate is the step's "
            "batch's) and which is 1 at the edge of stability; dashed, on full-batch tasks, the central flow driven "
            "by the same controller; adam-best: tuned Adam's constant step, whose η·S/θ is the fraction of its edge "
            "that the best constant step uses. "
            "Right: the full-batch loss of the same runs."),
)


def write(source: Union[xr.Dataset, str, Path], path: Union[str, Path, None] = None) -> Path:
    """Write the HTML report of a benchmark Dataset or store to ``path`` (default: the store's path with
    ``.html``): :func:`target_summary`, :data:`TASK_SECTIONS` and the benchmark's settings."""
    return write_report(source, path, sections=TASK_SECTIONS, summary=summary,
                        appendix=(("bench", "Benchmark settings"),))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description="Write the HTML report of a benchmark store.")
    parser.add_argument("store", help="a store written by a benchmark (python -m benchmarks adaptive -o STORE)")
    parser.add_argument("-o", "--output", help="the HTML file (default: the store's path with .html)")
    args = parser.parse_args(argv)
    print(f"report: {write(args.store, args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
