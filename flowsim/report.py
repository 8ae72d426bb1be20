"""The comparison report: one self-contained HTML file per store (figures embedded as base64 PNG, no network).

``flowsim report STORE [-o report.html]`` and ``flowsim run … --report`` call :func:`write`. The page holds a
summary table (:func:`summary`), one section per entry of ``SECTIONS`` whose variables the dataset holds (a
section without data is left out) and the scenario. A caller with datasets of its own kind passes its own
``sections``, ``summary`` and ``appendix`` to :func:`write`. Figures come from :mod:`flowsim.plot`; distances
and gaps to the reference run from :mod:`flowsim.compare` when the store names a reference. This module runs
nothing.
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
from flowsim.compare import compare, last_recorded


@dataclass(frozen=True)
class Section:
    """A report section: shown when the dataset holds any of ``variables``; ``figure(ds, reference)``."""
    title: str
    variables: tuple[str, ...]
    figure: Callable[[xr.Dataset, Optional[str]], Figure]
    caption: str


SECTIONS: tuple[Section, ...] = (
    Section("Loss", ("loss",), lambda ds, ref: plot.loss(ds),
            f"Full-batch training loss against time (Σ η). Discrete runs: raw (faint) and their "
            f"{plot.SMOOTH_WINDOW}-step centered moving average. Dotted lines: divergence."),
    Section("Sharpness and tracked eigenvalues", ("sharpness", "eigs"), lambda ds, ref: plot.sharpness(ds),
            "λ_max(H) (dots) and the tracked top eigenvalues (faint) per run; dashed: the run's stability "
            "threshold where it applies to λ_max(H) (e.g. 2/η for GD)."),
    Section("Preconditioned sharpness", ("precond_sharpness",), lambda ds, ref: plot.precond_sharpness(ds),
            "λ_max(P̃⁻¹H) per run against its threshold (dashed), e.g. (2 + 2β₁)/((1 − β₁)η) = 38/η for Adam "
            "with β₁ = 0.9."),
    Section("Noise kernel norm", ("noise_kernel_norm",), lambda ds, ref: plot.noise_kernel_norm(ds),
            "The noise kernel norm K of minibatch runs against 1, where stochastic training self-stabilizes."),
    Section("Stochastic edge", ("batch_sharpness",), lambda ds, ref: plot.stochastic_edge(ds),
            "Minibatch runs: the batch sharpness E_B[g_BᵀH_Bg_B/‖g_B‖²] times η/2 against 1 (it sits at 2/η at the "
            "edge of stochastic stability), and the second-moment contraction λ_max(E_B[(I − ηH_B)²]) against 1, "
            "both over the run's own next batches."),
    Section("Distance and gaps to the reference run", tuple(plot.GAPS), lambda ds, ref: plot.gaps(ds, reference=ref),
            "Distance to the reference run in weight space ‖w − w_ref‖ (from the random projection unless full "
            "weights were kept) and in function space, and loss / sharpness differences, at equal step."),
    Section("Central flow: predicted vs actual loss", ("predicted_loss",), lambda ds, ref: plot.predicted_loss(ds),
            "The central flow's predicted time-averaged loss L(w) + ½⟨H, Σ⟩ against the matching discrete run's "
            f"loss and its {plot.SMOOTH_WINDOW}-step moving average."),
    Section("Central flow: oscillation variance", ("sigma_eigs",), lambda ds, ref: plot.sigma(ds),
            "Eigenvalues of the central flow's Σ (the predicted variance of the oscillation, solid) against the "
            f"{plot.SMOOTH_WINDOW}-step average of the discrete run's squared displacement from the flow along "
            "each eigenvector (dashed)."),
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


def summary(ds: xr.Dataset) -> pd.DataFrame:
    """One row per run: process, rule, lr, batch size (0 = full), final loss (last finite), onset time of the
    edge of stability (first time the controlling sharpness ≥ 0.95·threshold, Σ η units), largest distance to
    the reference, wall time (s, last recorded), and the step where a run diverged. NaN = not available."""
    final_loss, final_wall = (_final(ds, v) for v in ("loss", "wall_time"))
    rows = []
    for name in ds.run.values:
        r = ds.sel(run=name)
        rows.append({
            "run": str(name),
            "process": str(r["process"].values),
            "rule": str(r["rule"].values),
            "lr": float(r["lr"]),
            "batch size": int(r["batch_size"]) if "batch_size" in r.coords else 0,
            "final loss": final_loss[name],
            "EoS onset (time)": plot.eos_onset(ds, name),
            "largest distance": float(r["max_distance"]) if "max_distance" in r else np.nan,
            "wall time (s)": final_wall[name],
            "diverged at (step)": float(r["diverged_at"]) if "diverged" in r and bool(r["diverged"]) else np.nan,
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


def sections(ds: xr.Dataset, pool: Sequence[Section] = SECTIONS) -> list[Section]:
    """The sections of ``pool`` whose variables ``ds`` holds (with at least one finite value)."""
    return [s for s in pool if any(plot.has(ds, v) for v in s.variables)]


_present = sections  # render's own ``sections`` argument shadows the function there


Summary = Callable[[xr.Dataset], tuple[pd.DataFrame, str]]
"""A summary: ``ds ↦ (table, note)``, the table shown under "Summary" and a note (plain text) below it."""


def run_summary(ds: xr.Dataset) -> tuple[pd.DataFrame, str]:
    """The default summary: :func:`summary` with a note on the EoS onset and the reference run."""
    ref = reference(ds)
    return summary(ds), (f"EoS onset: first time the controlling sharpness reaches {plot.EOS_FRACTION}·threshold."
                         + (f" Distances are to the reference run {ref}." if ref else ""))


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85rem; } td, th { padding: 0.2rem 0.6rem; text-align: right; }
th { border-bottom: 1px solid #888; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #f4f4f4; } figure { margin: 1rem 0; } img { max-width: 100%; }
figcaption, .meta { color: #555; font-size: 0.85rem; } pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; }
"""


def render(ds: xr.Dataset, sections: Sequence[Section] = SECTIONS, summary: Summary = run_summary,
           appendix: Sequence[tuple[str, str]] = (("scenario", "Scenario"),)) -> str:
    """The report of ``ds`` as one HTML document (str); ``ds`` is compared to its reference run first.

    ``sections``: the figures to draw (those whose variables ``ds`` holds); ``summary``: the table and its note;
    ``appendix``: (attr, title) pairs, each attr of ``ds`` shown verbatim under its title."""
    ds = compared(ds)
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
             "<h2>Summary</h2>",
             table.to_html(na_rep="–", float_format=lambda v: f"{v:.4g}", border=0, escape=True),
             f"<p class='meta'>{e(note)}</p>"]
    for s in _present(ds, sections):
        parts.append(f"<h2>{e(s.title)}</h2><figure><img alt='{e(s.title)}' src='{figure_uri(s.figure(ds, ref))}'>"
                     f"<figcaption>{e(s.caption)}</figcaption></figure>")
    for key, title in appendix:
        if key in ds.attrs:
            parts.append(f"<h2>{e(title)}</h2><pre>{e(str(ds.attrs[key]))}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write(source: Union[xr.Dataset, str, Path], path: Union[str, Path, None] = None, *,
          sections: Sequence[Section] = SECTIONS, summary: Summary = run_summary,
          appendix: Sequence[tuple[str, str]] = (("scenario", "Scenario"),)) -> Path:
    """Write the report of a Dataset or a store to ``path`` (default: the store's path with ``.html``);
    ``sections``, ``summary`` and ``appendix`` as in :func:`render` (a dataset of another kind brings its own)."""
    if path is None:
        if isinstance(source, xr.Dataset):
            raise ValueError("path: required when reporting a Dataset (no store path to derive it from)")
        path = Path(source).with_suffix(".html")
    ds = source if isinstance(source, xr.Dataset) else flowsim.open(source)
    path = Path(path)
    path.write_text(render(ds, sections, summary, appendix), encoding="utf-8")
    return path
