"""Build the gallery of published results that flowsim's bundled scenarios reproduce: docs/gallery.md and one
figure per result in docs/gallery/<scenario>.png.

    OMP_NUM_THREADS=1 python docs/make_gallery.py [--only NAME ...] [--steps N] [--out DIR]

Each entry of ENTRIES runs one bundled scenario (store in a temporary directory), draws its figure with
:mod:`flowsim.plot` (panels of several figures stacked), and computes its headline numbers from the returned
Dataset; every number in gallery.md comes from that computation in the same run. ``--steps N`` caps every
scenario at N steps (for quick checks; the claims need the full runs), ``--out DIR`` writes DIR/gallery.md and
DIR/gallery/ instead of docs/. The full run takes ≈ 45 min on one CPU thread
(OMP_NUM_THREADS=1), 28 of them in central-adam-mlp.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave

import flowsim
from flowsim import plot
from flowsim.compare import default_reference, relative_distance

DPI = 90
"""Resolution of the gallery figures, dots per inch (each panel is 7 inches wide)."""

TAIL = 0.3
"""Fraction of a run's steps, at its end, over which medians at the edge are taken (unless a measure says)."""

Measures = dict[str, float]

PAPERS = {
    "cohen21": "Cohen, Kaur, Li, Kolter, Talwalkar (2021), *Gradient Descent on Neural Networks Typically Occurs "
               "at the Edge of Stability*, arXiv 2103.00065",
    "cohen22": "Cohen, Ghorbani, Krishnan, Agarwal, Medapati, Badura, Suo, Cardoze, Nado, Dahl, Gilmer (2022), "
               "*Adaptive Gradient Methods at the Edge of Stability*, arXiv 2207.14484",
    "central": "Cohen, Damian, Talwalkar, Kolter, Lee (2024), *Understanding Optimization in Deep Learning with "
               "Central Flows*, arXiv 2410.24206",
    "barrett": "Barrett & Dherin (2021), *Implicit Gradient Regularization*, arXiv 2009.11162",
    "li": "Li, Tai, E (2017), *Stochastic Modified Equations and Adaptive Stochastic Gradient Algorithms*, "
          "arXiv 1511.06251",
    "malladi": "Malladi, Lyu, Panigrahi, Arora (2022), *On the SDEs and Scaling Rules for Adaptive Gradient "
               "Algorithms*, arXiv 2205.10287",
    "svag": "Li, Malladi, Arora (2021), *On the Validity of Modeling SGD with Stochastic Differential Equations (SDEs)*, "
            "arXiv 2102.12470",
    "rod": "Regis & Chewi (2026), the rod flow, arXiv 2602.01480; its Adam and momentum extension, arXiv "
           "2605.06821 (flowsim's derivation: docs/rod.md)",
    "agarwala": "Agarwala & Pennington (2024), *High dimensional analysis reveals conservative sharpening and a "
                "stochastic edge of stability*, arXiv 2404.19261",
    "andreyev": "Andreyev & Beneventano (2024), *Edge of Stochastic Stability: Revisiting the Edge of Stability "
                "for SGD*, arXiv 2412.20553",
}


# ---- measurements (all read a Dataset of flowsim.run; steps are optimizer steps) ----

def runs(ds: xr.Dataset) -> list[str]:
    return [str(r) for r in ds.run.values]


def edge_ratio(ds: xr.Dataset, run: str, name: Optional[str] = None) -> xr.DataArray:
    """``name`` (default: the run's controlling sharpness, :func:`flowsim.plot.controlling`) over the run's
    stability threshold, per recorded step: η·λ_max/2 for GD (dimensionless; 1 is the edge)."""
    r = ds.sel(run=run)
    return r[name or plot.controlling(ds, run)] / r["threshold"]


def median_over(x: xr.DataArray, start: float, stop: float) -> float:
    """Median of the finite values of ``x`` at steps in [start, stop] (NaN when there are none)."""
    v = x.sel(step=(x.step >= start) & (x.step <= stop)).values
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def tail_median(x: xr.DataArray, frac: float = TAIL) -> float:
    """Median of ``x`` over the last ``frac`` of the recorded steps (the last step included)."""
    last = int(x.step.max())
    return median_over(x, (1 - frac) * last, last)


def last_finite(x: xr.DataArray) -> float:
    """The value of ``x`` at its last finite recorded step (NaN when none)."""
    v = x.values[np.isfinite(x.values)]
    return float(v[-1]) if v.size else float("nan")


def edge_medians(ds: xr.Dataset, frac: float = TAIL) -> Measures:
    """Per run: median η·λ/2 (controlling sharpness over threshold) over the last ``frac`` of the steps."""
    pct = round(100 * frac)
    return {f"{run}: median λ/threshold over the last {pct}% of steps": tail_median(edge_ratio(ds, run), frac)
            for run in runs(ds)}


def lr_drop(ds: xr.Dataset) -> Measures:
    """Median λ_max/(2/η) over steps 700–1000 (η = 0.7, before the cut at step 1000) and over the last 30%."""
    ratio = edge_ratio(ds, "gd-drop")
    return {"median λ_max/(2/η) over steps 700–1000 (η = 0.7)": median_over(ratio, 700, 1000),
            f"median λ_max/(2/η) over the last {round(100 * TAIL)}% of steps (η = 0.5)": tail_median(ratio)}


def landscape(ds: xr.Dataset) -> Measures:
    """Per run: the final sharpness λ_max (loss/weight²) and it over 2/η."""
    out = {}
    for run in runs(ds):
        out[f"{run}: final λ_max"] = last_finite(ds["sharpness"].sel(run=run))
        out[f"{run}: final λ_max/(2/η)"] = last_finite(edge_ratio(ds, run))
    return out


def flows(ds: xr.Dataset) -> Measures:
    """Distance of each flow to GD relative to GD's travel at step 100 (before the catapult) and at the end, and
    the first step where it exceeds 10% (flowsim.compare's distance_exceeds_at)."""
    early = ds.sel(step=ds.step <= 100)
    exceeds = flowsim.compare(ds, "gd")["distance_exceeds_at"]
    out = {}
    for run in ("flow", "modified"):
        out[f"{run}: ‖w − w_GD‖/GD's travel at step {int(early.step.max())}"] = relative_distance(early, run, "gd")
        out[f"{run}: same at step {int(ds.step.max())}"] = relative_distance(ds, run, "gd")
        out[f"{run}: first step where it exceeds 0.1"] = float(exceeds.sel(run=run))
    return out


def sde(ds: xr.Dataset) -> Measures:
    """Mean and variance over the sweep's seeds of the loss at the last step, for SGD, its SDE and GD, and the
    relative standard error √(2/(n − 1)) of a variance over n seeds (Gaussian losses)."""
    final = ds["loss"].isel(step=-1)
    n = int((ds.run_name == "sgd").sum())
    out = {f"relative standard error of a variance over {n} seeds": float(np.sqrt(2 / (n - 1)))}
    for name in ("sgd", "sde", "gd"):
        losses = final.sel(run=ds.run_name == name).values
        out[f"{name}: mean loss at step {int(ds.step[-1])}"] = float(np.mean(losses))
        if name != "gd":
            out[f"{name}: variance of the loss at step {int(ds.step[-1])}"] = float(np.var(losses, ddof=1))
    return out


def _scale_means(ds: xr.Dataset, name: str) -> dict[float, dict[int, float]]:
    """κ → {step × κ: mean loss over the seeds} of run ``name`` of a sweep of ``scale``."""
    out = {}
    for kappa in sorted(set(ds.scale.values.tolist())):
        part = ds["loss"].sel(run=(ds.run_name == name) & (ds.scale == kappa)).mean("run")
        out[kappa] = {int(x * kappa): float(v) for x, v in zip(ds.step.values, part.values) if np.isfinite(v)}
    return out


def scaling(ds: xr.Dataset) -> Measures:
    """Per run and κ > 1, the gap of its mean loss over the seeds to κ = 1's at the same step × κ, relative to
    κ = 1's: the largest over the run, its mean, and the largest over the second half of the run; the runs that
    diverged."""
    out: Measures = {}
    for name in dict.fromkeys(ds.run_name.values.tolist()):
        means = _scale_means(ds, name)
        base = means.pop(1.0)
        for kappa, mean in means.items():
            xs = [x for x in mean if x in base and x > 0]
            rel = np.array([abs(mean[x] - base[x]) / base[x] for x in xs])
            late = rel[np.array(xs) >= max(base) / 2]
            out[f"{name}, κ = {kappa:g}: largest gap to κ = 1"] = float(rel.max()) if rel.size else float("nan")
            out[f"{name}, κ = {kappa:g}: mean gap"] = float(rel.mean()) if rel.size else float("nan")
            out[f"{name}, κ = {kappa:g}: largest gap over the second half"] = float(late.max()) if late.size else float("nan")
        out[f"{name}: runs diverged"] = float(ds["diverged"].sel(run=ds.run_name == name).sum())
    return out


def scaling_figure(ds: xr.Dataset) -> Figure:
    """Per run, the mean loss over the seeds of each κ against step × κ (the SDE's clock)."""
    names = list(dict.fromkeys(ds.run_name.values.tolist()))
    fig = Figure(figsize=(7.0, 3.0 * len(names)), layout="constrained")
    for ax, name in zip(np.atleast_1d(fig.subplots(len(names), 1)), names):
        for i, (kappa, mean) in enumerate(_scale_means(ds, name).items()):
            ax.plot(list(mean), list(mean.values()), color=f"C{i}", label=f"κ = {kappa:g}")
        ax.set(xlabel=plot.XLABEL["scaled_step"], ylabel="loss (mean over seeds)", yscale="log", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def central(ds: xr.Dataset) -> Measures:
    """The central flow's largest |λ/threshold − 1| over the recorded sharpness (Lanczos estimates, every
    ``record.curvature_every`` steps) where Σ ≠ 0, the number of steps with Σ ≠ 0, and the distances to the
    discrete run (relative to its travel) of the central and the stable flow at the last kept step."""
    ref = default_reference(ds)
    active = (ds["sigma_eigs"].sel(run="central") > 0).any("crit")
    dev = abs(edge_ratio(ds, "central") - 1).where(active)
    d_central, d_flow = relative_distance(ds, "central", ref), relative_distance(ds, "flow", ref)
    return {"central: max |λ/threshold − 1| over the sharpness measurements with Σ ≠ 0": float(dev.max()),
            "central: steps with Σ ≠ 0": float(active.sum()),
            f"central: ‖w − w_{ref}‖/{ref}'s travel at the end": d_central,
            "stable flow: same": d_flow,
            "stable flow / central flow distance": d_flow / d_central}


def rod(ds: xr.Dataset) -> Measures:
    """Per rule (the runs ``<rule>``, ``<rule>-stable``, ``-central``, ``-rod``): each flow's distance to the discrete
    run (relative to its travel) at the last kept step, and its wall time."""
    out = {}
    for ref in ("gd", "adam"):
        for flow in ("stable", "central", "rod"):
            run = f"{ref}-{flow}"
            out[f"{run}: ‖w − w_{ref}‖/{ref}'s travel at the end"] = relative_distance(ds, run, ref)
            out[f"{run}: wall time, s"] = last_finite(ds["wall_time"].sel(run=run))
    return out


def noise_kernel(ds: xr.Dataset) -> Measures:
    """Per surviving run: median noise kernel norm K (dimensionless), η·λ_max/2 and, where recorded, batch
    sharpness·η/2 and second-moment contraction over the last half."""
    out = {}
    for run in runs(ds):
        if not bool(ds["diverged"].sel(run=run)):
            if plot.has(ds.sel(run=run), "noise_kernel_norm"):
                out[f"{run}: median K over the last 50%"] = tail_median(ds["noise_kernel_norm"].sel(run=run), 0.5)
            out[f"{run}: median η·λ_max/2 over the last 50%"] = tail_median(edge_ratio(ds, run, "sharpness"), 0.5)
            if plot.has(ds.sel(run=run), "batch_sharpness"):
                out.update(stochastic_edge(ds.sel(run=[run]), sharpness=False))
    return out


def stochastic_edge(ds: xr.Dataset, sharpness: bool = True) -> Measures:
    """Per run: median batch sharpness·η/2, (with ``sharpness``) λ_max·η/2 and second-moment contraction over the
    last half."""
    out = {}
    for run in runs(ds):
        out[f"{run}: median batch sharpness·η/2 over the last 50%"] = \
            tail_median(edge_ratio(ds, run, "batch_sharpness"), 0.5)
        if sharpness:
            out[f"{run}: median λ_max·η/2 over the last 50%"] = tail_median(edge_ratio(ds, run, "sharpness"), 0.5)
        out[f"{run}: median E_B‖(I − ηH_B)u‖² over the last 50%"] = \
            tail_median(ds.second_moment_contraction.sel(run=run), 0.5)
    return out


def distance_figure(ds: xr.Dataset) -> Figure:
    """:func:`flowsim.plot.gaps` reduced to its distance panel: ‖w − w_ref‖ of every run to the scenario's reference."""
    compared = flowsim.compare(ds).drop_vars(["function_distance", "loss_gap", "sharpness_gap"], errors="ignore")
    return plot.gaps(compared, x="step", reference=compared.attrs["reference"])


def sde_figure(ds: xr.Dataset) -> Figure:
    """Mean ± one standard deviation over seeds of the loss against steps, for GD, SGD and the SDE."""
    fig = Figure(figsize=(7.0, 3.2), layout="constrained")
    ax = fig.subplots()
    for i, name in enumerate(("gd", "sgd", "sde")):
        loss = ds["loss"].sel(run=ds.run_name == name)
        mean, sd = loss.mean("run").values, loss.std("run").values
        ax.plot(ds.step, mean, color=f"C{i}", label=f"{name} (mean over {loss.sizes['run']} seeds)")
        ax.fill_between(ds.step, mean - sd, mean + sd, color=f"C{i}", alpha=0.2)
    ax.set(xlabel="step", ylabel="loss", title="loss over seeds: mean ± 1 s.d.")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ---- the gallery ----

@dataclass
class Entry:
    """One published result: the scenario that reproduces it, how to draw and measure it, what it claims."""
    scenario: str
    title: str
    claim: str
    papers: tuple[str, ...]
    figures: tuple[Callable[[xr.Dataset], Figure], ...]
    measure: Callable[[xr.Dataset], Measures]


def _by_step(f: Callable) -> Callable[[xr.Dataset], Figure]:
    return lambda ds: f(ds, x="step")


ENTRIES = [
    Entry("eos-gd-digits", "Edge of stability for full-batch GD",
          "Under full-batch GD the sharpness λ_max(H) rises (progressive sharpening) until it reaches 2/η, then "
          "hovers at or just above it while the loss keeps decreasing over long times.",
          ("cohen21",), (_by_step(plot.sharpness),), edge_medians),
    Entry("eos-lr-drop", "A step-size cut at the edge of stability",
          "After the step size is cut at the edge, sharpening resumes until λ_max reaches the new 2/η.",
          ("cohen21",), (_by_step(plot.sharpness),), lr_drop),
    Entry("landscapes-xyzw", "The edge on a minimal landscape, ½(1 − xyzw)²",
          "Small η reaches the gradient-flow minimum; larger η lands on a minimum whose sharpness is just below 2/η.",
          ("cohen21",), (_by_step(plot.sharpness),), landscape),
    Entry("adaptive-eos", "Adaptive edge of stability (Adam, RMSProp)",
          "For preconditioned methods the preconditioned sharpness λ_max(P̃⁻¹H) equilibrates at the threshold of the "
          "underlying momentum method: 38/η for Adam with β1 = 0.9, 2/η for RMSProp.",
          ("cohen22",), (_by_step(plot.precond_sharpness),), edge_medians),
    Entry("flows-mlp-eos", "Gradient flow and the modified flow follow GD until the edge",
          "Gradient flow, and closer still the modified flow of L + (η/4)‖∇L‖², track GD while it is stable; once "
          "GD's sharpness passes 2/η it catapults and both flows leave it.",
          ("cohen21", "barrett"), (_by_step(plot.sharpness), distance_figure), flows),
    Entry("sde-linreg", "SGD as a stochastic differential equation",
          "Over seeds, the loss of SGD and of its SDE dθ = −η∇L dt + η√(Σ/B) dW agree in mean and variance up to the "
          "SDE's weak error O(η); GD is the noiseless reference.",
          ("li",), (sde_figure,), sde),
    Entry("scaling-sgd", "The linear scaling rule of SGD",
          "A batch κ times larger with η × κ is the same SDE: the mean loss curves on the clock step × κ coincide "
          "while κη stays below the edge, and break apart once it passes it.",
          ("svag",), (scaling_figure,), scaling),
    Entry("scaling-adam", "The square-root scaling rule of Adam",
          "A batch κ times larger with η × √κ, 1 − β × κ and ε/√κ is the same SDE where the noise dominates the "
          "second moment: on the clock step × κ the mean loss curves meet once the run reaches its noise floor; "
          "during the descent, where the gradient dominates, larger κ is slower.",
          ("malladi",), (scaling_figure,), scaling),
    Entry("scaling-adam-digits", "The square-root scaling rule of Adam where the noise dominates ν",
          "On digits with batches of 1 the gradient noise dominates ν from the start "
          "(flowsim.sde_check.square_root_slowdown: κ = 4 descends at 0.89 of κ = 1's rate at w0), SVAG says the SDE "
          "holds, and the mean loss curves at κ = 1, 2, 4 stay within 10 % of each other on the clock step × κ "
          "through the whole descent; κ = 4 lags by about what its slowdown predicts.",
          ("malladi",), (scaling_figure,), scaling),
    Entry("scaling-rmsprop", "The square-root scaling rule of RMSProp",
          "As for Adam: η × √κ, 1 − β2 × κ, ε/√κ for a batch κ times larger; the curves meet at the noise floor.",
          ("malladi",), (scaling_figure,), scaling),
    Entry("central-gd-mlp", "Central flow of GD",
          "The central flow holds η·λ_max at 2 and follows the time average of GD at the edge, much closer than "
          "gradient flow does.",
          ("central",), (_by_step(plot.sharpness), distance_figure), central),
    Entry("central-scalar-rmsprop-mlp", "Central flow of scalar RMSProp",
          "The central flow of scalar RMSProp holds the preconditioned sharpness at 2/η and follows the discrete "
          "run's time average.",
          ("central",), (_by_step(plot.precond_sharpness), distance_figure), central),
    Entry("central-rmsprop-mlp", "Central flow of RMSProp",
          "The central flow of RMSProp holds λ_max(P̃⁻¹H) at 2/η, its ν flowing with the oscillation, and follows the "
          "discrete run's time average, far closer than the stable flow.",
          ("central",), (_by_step(plot.precond_sharpness), distance_figure), central),
    Entry("central-momentum-mlp", "Central flow of EMA momentum (derived here)",
          "At momentum's edge (2 + 2β1)/((1 − β1)η) the weights and the momentum flip together; the central flow "
          "(docs/central-momentum.md) holds η·λ_max there and follows momentum closer than its stable flow.",
          ("cohen22", "central"), (_by_step(plot.sharpness), distance_figure), central),
    Entry("central-adam-mlp", "Central flow of Adam (derived here)",
          "The central flow of Adam holds λ_max(P̃⁻¹H) at 38/η with its v flowing with the oscillation. Started, "
          "like the stable flow, from Adam's state after its first 1/(1 − β1) steps, it ends within a tenth of "
          "Adam's travel and closer to Adam than the stable flow (docs/central-momentum.md).",
          ("cohen22", "central"), (_by_step(plot.precond_sharpness), distance_figure), central),
    Entry("flows-rod", "The rod flow beside the central and stable flows, for GD and Adam",
          "The rod flow (docs/rod.md) moves the centre and half-length of the rod through consecutive iterates with "
          "the rule's own step at its two ends: no eigensolver. Its predicted loss (the mean of L over the ends) and "
          "its ‖δ‖² are drawn against the discrete run's, like the central flow's.",
          ("rod", "central"), (_by_step(plot.predicted_loss), _by_step(plot.sigma)), rod),
    Entry("seos-mlp", "Stochastic edge of stability: the noise kernel norm",
          "With small batches the noise kernel norm K, not η·λ_max/2, controls stability: SGD is pushed back below "
          "K = 1 and settles just inside it while λ_max stays far below 2/η (conservative sharpening). The batch "
          "sharpness × η/2 and the mean-square growth along the top Hessian eigenvector settle near 1 with it.",
          ("agarwala",), (_by_step(plot.noise_kernel_norm), _by_step(plot.stochastic_edge)), noise_kernel),
    Entry("eoss-mlp", "Edge of stochastic stability: batch sharpness",
          "Under minibatch SGD the batch sharpness E_B[g_BᵀH_Bg_B/‖g_B‖²] rises and hovers at 2/η while λ_max of the "
          "full-batch Hessian stays well below it.",
          ("andreyev",), (_by_step(plot.stochastic_edge),), stochastic_edge),
]


def stacked(figures: list[Figure]) -> np.ndarray:
    """The figures rendered at DPI and stacked top to bottom (RGBA pixels, white padding on the right)."""
    images = []
    for fig in figures:
        fig.set_dpi(DPI)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        images.append(np.asarray(canvas.buffer_rgba()))
    width = max(im.shape[1] for im in images)
    return np.concatenate([np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255)
                           for im in images])


def make_entry(entry: Entry, out: Path, steps: Optional[int], workdir: Path) -> xr.Dataset:
    """Run the entry's scenario (capped at ``steps`` when given), save out/gallery/<scenario>.png and return the
    Dataset."""
    ds = flowsim.run(entry.scenario, workdir / f"{entry.scenario}.zarr", steps=steps, overwrite=True, progress=False)
    (out / "gallery").mkdir(parents=True, exist_ok=True)
    imsave(out / "gallery" / f"{entry.scenario}.png", stacked([f(ds) for f in entry.figures]))
    return ds


def section(entry: Entry, measures: Measures, steps: int, seconds: float, diverged: list[str]) -> str:
    """The entry's markdown: title, figure, claim, measured numbers, papers, scenario and command."""
    lines = [f"## {entry.title}", "", f"![{entry.scenario}](gallery/{entry.scenario}.png)", "", entry.claim,
              "", f"Measured ({steps} steps, {seconds:.0f} s on one CPU thread):", ""]
    lines += [f"- {k}: {v:.4g}" for k, v in measures.items()]
    lines += [f"- diverged: {d}" for d in diverged]
    lines += ["", "Paper: " + "; ".join(PAPERS[p] for p in entry.papers) + ".", "",
              f"Scenario: [`{entry.scenario}`](../scenarios/{entry.scenario}.yaml) — "
              f"`flowsim run {entry.scenario} -o {entry.scenario}.zarr`", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Duration: ≈ 45 min on one CPU "
                                     "thread (OMP_NUM_THREADS=1), 28 of them in central-adam-mlp; "
                                     "it prints each scenario's wall time as it goes.")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="scenarios to run (default: all entries)")
    parser.add_argument("--steps", type=int, help="cap every scenario at this many steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="directory for gallery.md")
    args = parser.parse_args(argv)
    entries = [e for e in ENTRIES if args.only is None or e.scenario in args.only]
    if args.only and len(entries) != len(args.only):
        parser.error(f"--only: known scenarios are {', '.join(e.scenario for e in ENTRIES)}")
    warnings.filterwarnings("ignore", message="Object at .* is not recognized")  # zarr, on flowsim's own files
    begin = time.perf_counter()
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in entries:
            print(f"[{time.perf_counter() - begin:7.0f} s] {entry.scenario} …", flush=True)
            start = time.perf_counter()
            ds = make_entry(entry, args.out, args.steps, Path(tmp))
            seconds = time.perf_counter() - start
            diverged = [f"{r} at step {float(ds.diverged_at.sel(run=r)):.0f}" for r in runs(ds)
                        if bool(ds.diverged.sel(run=r))]
            sections.append(section(entry, entry.measure(ds), int(ds.step.max()), seconds, diverged))
            print(f"[{time.perf_counter() - begin:7.0f} s] {entry.scenario} done in {seconds:.0f} s", flush=True)
    total = time.perf_counter() - begin
    command = "OMP_NUM_THREADS=1 python docs/make_gallery.py" + (f" --steps {args.steps}" if args.steps else "")
    head = ["# Gallery: published results reproduced by the bundled scenarios", "",
            f"Generated by `{command}` in {total / 60:.1f} min; every figure and number below comes from that run. "
            "Steps are optimizer steps; λ/threshold is the controlling sharpness over the run's stability threshold "
            "(η·λ_max/2 for GD, 1 is the edge). The theory behind each entry is in [theory.md](theory.md).", ""]
    (args.out / "gallery.md").write_text("\n".join(head + sections))
    print(f"wrote {args.out / 'gallery.md'} in {total:.0f} s")


if __name__ == "__main__":
    main()
