"""The comparison report: one self-contained HTML file per store (figures embedded as base64 PNG, no network).

``flowsim report STORE [-o report.html] [--x step|time]`` and ``flowsim run … --report`` call :func:`write`. The
page holds a header (versions, device, dtype, numbers of parameters and training examples, the runs and a sweep's
coordinates, the clock), a summary table (:func:`summary`), one section per entry of ``SECTIONS`` whose variables
the dataset holds (a section without data is left out; a sweep's sections only for a sweep) and the scenario with
only the keys that apply (:func:`scenario_text`). Every figure and every summary column uses one clock, ``step``
or ``time`` (Σ η): the ``x`` asked for, else the one :func:`flowsim.plot.clock` chooses by content; each figure's
``<img>`` states its x-axis labels (``data-x``) and its number of legend entries (``data-legend``). A caller with
datasets of its own kind passes its own ``sections``, ``summary`` and ``appendix`` to :func:`write`. Figures come
from :mod:`flowsim.plot`; distances and gaps to the reference run from :mod:`flowsim.compare` when the store names
a reference. This module runs nothing.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import xarray as xr
import yaml
from matplotlib.figure import Figure

import flowsim
from flowsim import plot
from flowsim.compare import compare, last_recorded, require_runs
from flowsim.scenario import load as load_scenario
from flowsim.store import is_store


@dataclass(frozen=True)
class Section:
    """A report section: shown when the dataset holds any of ``variables`` (and, with ``sweep``, only when it is a
    sweep: :func:`flowsim.plot.sweep_coords`); ``figure(ds, reference)`` draws it against ``plot.clock(ds)``."""
    title: str
    variables: tuple[str, ...]
    figure: Callable[[xr.Dataset, Optional[str]], Figure]
    caption: str
    sweep: bool = False


SECTIONS: tuple[Section, ...] = (
    Section("Final loss across the sweep", ("loss",), lambda ds, ref: plot.final_loss(ds),
            "The last finite loss of each run against the first swept coordinate; one line per combination of the "
            "other swept values (line style), × where the run diverged.", sweep=True),
    Section("Loss", ("loss",), lambda ds, ref: plot.loss(ds),
            f"Full-batch training loss. Discrete runs: raw (faint) and their {plot.SMOOTH_WINDOW}-step centered "
            f"moving average. Dotted lines: divergence."),
    Section("Sharpness and tracked eigenvalues", ("sharpness", "eigs"), lambda ds, ref: plot.sharpness(ds),
            "λ_max(H) (dots) and the tracked top eigenvalues (faint) per run (a sweep: per point, shared axes); "
            "dashed: the run's stability threshold where it applies to λ_max(H) (e.g. 2/η for GD)."),
    Section("Preconditioned sharpness", ("precond_sharpness",), lambda ds, ref: plot.precond_sharpness(ds),
            "λ_max(P̃⁻¹H) per run against its threshold (dashed), e.g. (2 + 2β₁)/((1 − β₁)η) = 38/η for Adam "
            "with β₁ = 0.9."),
    Section("Edge of stability, all runs", ("threshold",), lambda ds, ref: plot.edge(ds),
            "Each run's controlling sharpness over its threshold on one axis: η·λ_max(H)/2 for GD, "
            "λ_max(P̃⁻¹H)/threshold for a preconditioned rule (η·λ/θ, threshold = θ/η); 1 is the edge."),
    Section("Noise kernel norm", ("noise_kernel_norm",), lambda ds, ref: plot.noise_kernel_norm(ds),
            "The noise kernel norm K of minibatch runs against 1, where stochastic training self-stabilizes."),
    Section("Stochastic edge", ("batch_sharpness",), lambda ds, ref: plot.stochastic_edge(ds),
            "Minibatch runs: the batch sharpness E_B[g_BᵀH_Bg_B/‖g_B‖²] times η/2 against 1 (it sits at 2/η at the "
            "edge of stochastic stability), and the second-moment contraction E_B‖(I − ηH_B)u‖² along the top "
            "Hessian eigenvector u against 1, both over the run's own next batches."),
    Section("Distance and gaps to the reference run", tuple(plot.GAPS), lambda ds, ref: plot.gaps(ds, reference=ref),
            "Distance to the reference run in weight space ‖w − w_ref‖ (from the random projection unless full "
            "weights were kept) and in function space, and loss / sharpness differences, all at equal step (a run's "
            "k-th step against the reference's): drawn against time only where that is equal time (one step size)."),
    Section("Central and rod flows: predicted vs actual loss", ("predicted_loss",),
            lambda ds, ref: plot.predicted_loss(ds),
            "The flows' predicted time-averaged loss (central: L(w) + ½⟨H, Σ⟩; rod: the mean of L over the rod's "
            "two ends) against the matching discrete run's "
            f"loss and its {plot.SMOOTH_WINDOW}-step moving average."),
    Section("Central and rod flows: oscillation variance", ("sigma_eigs",), lambda ds, ref: plot.sigma(ds),
            "Eigenvalues of the flow's Σ (the predicted variance of the oscillation, solid; the rod's is ‖δ‖²) "
            "against the "
            f"{plot.SMOOTH_WINDOW}-step average of the discrete run's squared oscillation amplitude along each "
            "eigenvector, ¼(e·Δw)² from its step Δw (dashed)."),
    Section("Step size", ("step_size",), lambda ds, ref: plot.step_size(ds),
            "The step size η used at each step."),
)


def reference(ds: xr.Dataset) -> Optional[str]:
    """The reference run: the dataset's ``reference`` attr, else the scenario's ``compare.reference``."""
    ref = ds.attrs.get("reference")
    if ref is None and "scenario" in ds.attrs:
        ref = ((yaml.safe_load(ds.attrs["scenario"]) or {}).get("compare") or {}).get("reference")
    return ref if ref in ds.run.values else None


def compared(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with distances and gaps to the reference run (:func:`flowsim.compare`), unless already there or
    no reference is named."""
    ref = reference(ds)
    if ref is None or "distance" in ds:
        return ds
    return compare(ds, reference=ref)


def summary(ds: xr.Dataset, x: Optional[str] = None) -> pd.DataFrame:
    """One row per run: process, rule, lr, a sweep's other swept coordinates, batch size ("full" or B), final loss
    (last finite), the edge-of-stability onset (first ``x`` at which the controlling sharpness ≥ 0.95·threshold),
    largest distance to the reference, wall time (s, last recorded), and the ``x`` at which a run diverged. ``x``:
    "step" or "time" (Σ η), None: :func:`flowsim.plot.clock`; both columns name it. NaN = not available."""
    x = plot.clock(ds, x)
    final_loss, final_wall = (_final(ds, v) for v in ("loss", "wall_time"))
    swept = [c for c in plot.sweep_coords(ds) if c not in ("run_name", "lr")]
    rows = []
    for name in ds.run.values:
        r = ds.sel(run=name)
        rows.append({
            "run": str(name),
            "process": str(r["process"].values),
            "rule": str(r["rule"].values),
            "lr": float(r["lr"]),
            **{c: r[c].item() for c in swept},
            "batch size": int(r.get("batch_size", 0)) or "full",
            "final loss": final_loss[name],
            f"EoS onset ({x})": plot.eos_onset(ds, name, x),
            "largest distance": float(r["max_distance"]) if "max_distance" in r else np.nan,
            "wall time (s)": final_wall[name],
            f"diverged at ({x})": plot.divergence_x(ds, name, x),
        })
    return pd.DataFrame(rows).set_index("run")


def _final(ds: xr.Dataset, name: str) -> pd.Series:
    """Per run, the last finite value of ``name`` (NaN where none, and everywhere when ``ds`` has no ``name``)."""
    if name not in ds:
        return pd.Series(np.nan, index=ds.run.values)
    return last_recorded(ds[name], finite=True).to_series()


def figure_uri(fig: Figure, dpi: int = 100) -> str:
    """A ``data:image/png;base64,…`` URI of ``fig``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def x_labels(fig: Figure) -> list[str]:
    """The distinct x-axis labels of ``fig``'s axes (one for a figure drawn on one clock)."""
    return sorted({ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()})


def legend_entries(fig: Figure) -> int:
    """The number of legend entries of ``fig``, its own legends and its axes' together."""
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes)]
    return sum(len(leg.get_texts()) for leg in legends if leg is not None)


def sections(ds: xr.Dataset, pool: Sequence[Section] = SECTIONS) -> list[Section]:
    """The sections of ``pool`` whose variables ``ds`` holds (with at least one finite value); a sweep's sections
    only when ``ds`` is a sweep."""
    sweep = bool(plot.sweep_coords(ds))
    return [s for s in pool if any(plot.has(ds, v) for v in s.variables) and (sweep or not s.sweep)]


_present = sections  # render's own ``sections`` argument shadows the function there


Summary = Callable[[xr.Dataset], tuple[pd.DataFrame, str]]
"""A summary: ``ds ↦ (table, note)``, the table shown under "Summary" and a note (plain text) below it."""


def run_summary(ds: xr.Dataset) -> tuple[pd.DataFrame, str]:
    """The default summary: :func:`summary` with a note on the clock, the EoS onset and the reference run."""
    ref, x = reference(ds), plot.clock(ds)
    return summary(ds), (f"EoS onset: first {x} at which the controlling sharpness reaches {plot.EOS_FRACTION}·"
                         f"threshold; EoS onset and diverged at are in {plot.XLABEL[x]}."
                         + (f" Distances are to the reference run {ref}." if ref else ""))


def scenario_text(text: str) -> str:
    """The stored scenario (YAML) with only the keys that apply: under ``problem.dataset`` and ``record`` the keys
    at their schema defaults are left out (those of the datasets and measurements the scenario did not choose);
    loading the result gives the same scenario. Text that does not load as a scenario is returned as it is."""
    try:
        sc = load_scenario(text)
    except ValueError:
        return text
    doc = sc.model_dump(mode="json", exclude_none=True)
    doc["record"] = sc.record.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    if isinstance(doc["problem"].get("dataset"), dict):
        doc["problem"]["dataset"] = sc.problem.dataset.model_dump(mode="json", exclude_none=True,
                                                                  exclude_defaults=True)
    return yaml.safe_dump({k: v for k, v in doc.items() if v != {}}, sort_keys=False)


def header(ds: xr.Dataset) -> str:
    """The header line (plain text): runs, a sweep's coordinates and their numbers of values, parameters and
    training examples (``n_params``, ``n_examples`` attrs; a sweep that varies the problem: of its first point),
    and the clock of every figure (and of the distances and gaps where they cannot use it: :func:`plot.gaps_clock`)."""
    swept = plot.sweep_coords(ds)
    parts = [f"{ds.sizes['run']} runs"
             + (" (sweep: " + " × ".join(f"{c} {len(pd.unique(ds[c].values))}" for c in swept) + ")" if swept else "")]
    first = " (first sweep point)" if any(c.startswith("problem_") for c in swept) else ""
    parts += [f"{ds.attrs[a]:,} {what}{first}" for a, what in (("n_params", "parameters"),
                                                               ("n_examples", "training examples")) if a in ds.attrs]
    x = plot.clock(ds)
    axis = f"x axis of every figure: {plot.XLABEL[x]}"
    if any(plot.has(ds, n) for n in plot.GAPS) and plot.gaps_clock(ds) != x:
        axis += f"; of the distances and gaps, compared at equal step: {plot.XLABEL['step']}"
    return " · ".join(parts + [axis])


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85rem; } td, th { padding: 0.2rem 0.6rem; text-align: right; }
th { border-bottom: 1px solid #888; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #f4f4f4; } figure { margin: 1rem 0; } img { max-width: 100%; }
figcaption, .meta { color: #555; font-size: 0.85rem; } pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; }
"""


def render(ds: xr.Dataset, sections: Sequence[Section] = SECTIONS, summary: Summary = run_summary,
           appendix: Sequence[tuple[str, str]] = (("scenario", "Scenario"),), x: Optional[str] = None) -> str:
    """The report of ``ds`` as one HTML document (str); ``ds`` is compared to its reference run first. A dataset
    with no recorded step (a store killed before its first write) or with two runs of one name is a one-line
    ValueError.

    ``sections``: the figures to draw (those whose variables ``ds`` holds); ``summary``: the table and its note;
    ``appendix``: (attr, title) pairs, each attr of ``ds`` shown under its title (verbatim; the scenario through
    :func:`scenario_text`); ``x``: the clock of every figure and the summary, "step" or "time" (None: chosen by
    :func:`flowsim.plot.clock`), set as ``ds.attrs["clock"]`` for the sections and the summary."""
    require_runs(ds)
    ds = compared(ds)
    ds = ds.assign_attrs(clock=plot.clock(ds, x))
    ref = reference(ds)
    e = html.escape
    name = ds.attrs.get("name", "flowsim")
    meta = " · ".join(f"{k} {e(str(ds.attrs[a]))}" for k, a in (
        ("flowsim", "flowsim_version"), ("torch", "torch_version"), ("device", "device"), ("dtype", "dtype"),
        ("created", "created")) if a in ds.attrs)
    table, note = summary(ds)
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>flowsim report: {e(name)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>flowsim report: {e(name)}</h1>",
             f"<p class='meta'>{meta or e('flowsim ' + flowsim.__version__)}</p>",
             f"<p class='meta' id='counts'>{e(header(ds))}</p>",
             "<h2>Summary</h2>",
             table.to_html(na_rep="–", float_format=lambda v: f"{v:.4g}", border=0, escape=True),
             f"<p class='meta'>{e(note)}</p>"]
    for s in _present(ds, sections):
        fig = s.figure(ds, ref)
        parts.append(f"<h2>{e(s.title)}</h2><figure><img alt='{e(s.title)}' data-x='{e(' | '.join(x_labels(fig)))}' "
                     f"data-legend='{legend_entries(fig)}' src='{figure_uri(fig)}'>"
                     f"<figcaption>{e(s.caption)}</figcaption></figure>")
    for key, title in appendix:
        if key in ds.attrs:
            text = scenario_text(ds.attrs[key]) if key == "scenario" else str(ds.attrs[key])
            parts.append(f"<h2>{e(title)}</h2><pre>{e(text)}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write(source: Union[xr.Dataset, str, Path], path: Union[str, Path, None] = None, *,
          sections: Sequence[Section] = SECTIONS, summary: Summary = run_summary,
          appendix: Sequence[tuple[str, str]] = (("scenario", "Scenario"),), x: Optional[str] = None) -> Path:
    """Write the report of a Dataset or a store to ``path`` (default: the store's path with ``.html``; a folder:
    that name inside it; missing folders are made); ``sections``, ``summary``, ``appendix`` and ``x`` (the clock)
    as in :func:`render` (a dataset of another kind brings its own)."""
    if path is None:
        if isinstance(source, xr.Dataset):
            raise ValueError("path: required when reporting a Dataset (no store path to derive it from)")
        path = Path(source).with_suffix(".html")
    ds = source if isinstance(source, xr.Dataset) else flowsim.open(source)
    path = Path(path)
    if is_store(path):  # a file written into a store makes it a folder flowsim no longer takes for a store
        raise ValueError(f"path: {path} is a store; give the report a file name, e.g. {path.with_suffix('.html')}")
    if path.is_dir():
        name = (f"{ds.attrs.get('name', 'report')}" if isinstance(source, xr.Dataset) else Path(source).stem)
        path = path / f"{name}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(ds, sections, summary, appendix, x), encoding="utf-8")
    return path
