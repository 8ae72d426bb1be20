"""Differences between the runs of one stored Dataset and a reference run, aligned by step.

:func:`compare` adds to a Dataset from :func:`flowsim.open`, at equal step: a run's k-th step against the
reference's k-th, which is equal time (Σ η) only for runs with the same step sizes:

- ``distance(run, step)``: ‖w − w_ref‖₂, exact where both full weights were kept (``record.keep_weights``),
  else ‖R(w − w_ref)‖ from the random projection ``w_proj`` (≈ the distance, Johnson–Lindenstrauss);
- ``loss_gap(run, step)`` = L − L_ref and, when curvature was recorded, ``sharpness_gap`` = S − S_ref;
- ``function_distance(run, step)``: √(mean over probe inputs of ‖f(x; w) − f(x; w_ref)‖²) where full weights
  were kept (networks only; probe = the first ``probe`` training inputs);
- :func:`relative_distance`: one run's ‖w − w_ref‖ over the reference's travel at the last step both kept w;
- per run: ``final_distance``, ``max_distance``, ``final_loss_gap``, ``final_function_distance`` and the first
  step at which a gap exceeds its tolerance: ``loss_gap_exceeds_at`` (|L − L_ref| > rtol·|L_ref|),
  ``distance_exceeds_at`` (distance > rtol·‖w_ref(step) − w_ref(0)‖, the distance the reference has
  travelled), ``sharpness_gap_exceeds_at`` (|S − S_ref| > rtol·S_ref); NaN when never.

:func:`summary` turns the per-run values into a table. This module reads datasets; it runs nothing.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import xarray as xr

SUMMARY = ("final_loss", "final_loss_gap", "final_distance", "max_distance", "final_function_distance",
           "loss_gap_exceeds_at", "distance_exceeds_at", "sharpness_gap_exceeds_at")


def default_reference(ds: xr.Dataset) -> str:
    """The scenario's ``compare.reference`` when it names a run of ``ds``, else the first run."""
    import yaml
    ref = (yaml.safe_load(ds.attrs.get("scenario", "")) or {}).get("compare", {}) or {}
    name = ref.get("reference")
    return name if name in ds.run.values else str(ds.run.values[0])


def require_runs(ds: xr.Dataset) -> None:
    """A one-line ValueError where ``ds`` cannot be read run by run: two runs share a name (``xr.concat`` of
    :func:`flowsim.simulate`'s datasets, each named after its process; figures and reports select runs by name),
    or it holds no recorded step (every run of its store was stopped before its first write: :func:`flowsim.open`
    still reads it, the runs with their coordinates and an empty ``step``)."""
    names = [str(r) for r in ds.run.values]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"run: more than one run is named {', '.join(map(repr, repeated))}; give each dataset "
                         "its own run name before xr.concat, e.g. ds.assign_coords(run=['adam'])")
    if ds.sizes.get("step", 0) == 0:
        runs = ", ".join(map(str, ds.run.values)) or "none yet"
        raise ValueError(f"nothing recorded yet (runs: {runs}): stopped before the first write; continue with "
                         "flowsim run SCENARIO -o STORE --resume")


def _norm(x: xr.DataArray, dim: str) -> xr.DataArray:
    """Euclidean norm along ``dim``, NaN where any entry is NaN (not recorded)."""
    return np.sqrt((x ** 2).sum(dim, skipna=False))


def _distance(ds: xr.Dataset, name: str, ref: str) -> Optional[tuple[xr.DataArray, xr.DataArray]]:
    """‖x − x_ref‖ and the reference's travel ‖x_ref(step) − x_ref(0)‖ for x = w (param) or w_proj (proj)."""
    if name not in ds:
        return None
    dim = "param" if name == "w" else "proj"
    x = ds[name]
    return _norm(x - x.sel(run=ref), dim), _norm(x.sel(run=ref) - x.sel(run=ref).isel(step=0), dim)


def _first_step(mask: xr.DataArray) -> xr.DataArray:
    """Per run, the first step where ``mask`` holds (NaN when never)."""
    steps = mask.step.where(mask)
    return steps.min("step")


def _function_distance(ds: xr.Dataset, ref: str, problem, probe: int) -> xr.DataArray:
    import torch
    X = problem.X[:probe]
    out = xr.full_like(ds["loss"], np.nan)
    w = ds["w"]
    with torch.no_grad():
        for step in ds.step.values:
            w_ref = w.sel(run=ref, step=step).values
            if np.isnan(w_ref).any():
                continue
            f_ref = problem.outputs(torch.as_tensor(w_ref, dtype=problem.dtype, device=problem.device), X)
            for run in ds.run.values:
                w_run = w.sel(run=run, step=step).values
                if np.isnan(w_run).any():
                    continue
                f = problem.outputs(torch.as_tensor(w_run, dtype=problem.dtype, device=problem.device), X)
                diff = (f - f_ref).reshape(len(X), -1)
                out.loc[dict(run=run, step=step)] = diff.pow(2).sum(1).mean().sqrt().item()
    return out


def _problem_for(ds: xr.Dataset):
    """The Problem of the stored scenario, or None for a landscape (no model outputs), a mismatch, or runs of
    :func:`flowsim.simulate` (made on the caller's own Problem: its scenario names none)."""
    import yaml

    from flowsim.runner import build
    from flowsim.scenario import load
    if (yaml.safe_load(ds.attrs.get("scenario", "")) or {}).get("problem") is None:
        return None
    problem = build(load(ds.attrs["scenario"]))
    if problem.X is None or problem.n_params != ds.sizes["param"]:
        return None
    return problem


def compare(ds: xr.Dataset, reference: Optional[str] = None, *, rtol: float = 0.1, probe: int = 256,
            problem=None) -> xr.Dataset:
    """``ds`` with the comparison variables of the module docstring added (a new Dataset).

    ``reference``: a run of ``ds`` (default: :func:`default_reference`). ``rtol``: the relative tolerance of the
    ``*_exceeds_at`` steps. ``probe``: number of training inputs for ``function_distance``. ``problem``: the
    Problem the runs were made on (default: rebuilt from the stored scenario, needed only for
    ``function_distance`` and only when full weights were kept; runs of :func:`flowsim.simulate` name no scenario
    problem, so without it they get no ``function_distance``).
    """
    require_runs(ds)
    reference = default_reference(ds) if reference is None else reference
    if reference not in ds.run.values:
        raise ValueError(f"reference: {reference!r} is not a run of this store (runs: {', '.join(map(str, ds.run.values))})")
    if not rtol > 0:
        raise ValueError(f"rtol: must be > 0, got {rtol}")
    out = ds.copy()
    out.attrs["reference"] = reference
    exact, projected = _distance(ds, "w", reference), _distance(ds, "w_proj", reference)
    if exact is None and projected is None:
        distance = travel = xr.full_like(ds["loss"], np.nan)
    elif exact is None:
        distance, travel = projected
    else:
        distance, travel = exact
        if projected is not None:
            distance, travel = distance.fillna(projected[0]), travel.fillna(projected[1])
    out["distance"] = distance.assign_attrs(
        units="weight", long_name="‖w − w_ref‖₂ (exact where full weights were kept, else from w_proj)")
    out["loss_gap"] = (ds["loss"] - ds["loss"].sel(run=reference)).assign_attrs(
        units="loss", long_name=f"loss − loss of the reference run {reference}")
    ref_loss = ds["loss"].sel(run=reference)
    out["loss_gap_exceeds_at"] = _first_step(abs(out["loss_gap"]) > rtol * abs(ref_loss))
    out["distance_exceeds_at"] = _first_step(distance > rtol * travel)
    if "sharpness" in ds:
        out["sharpness_gap"] = (ds["sharpness"] - ds["sharpness"].sel(run=reference)).assign_attrs(
            units="loss/weight²", long_name=f"sharpness − sharpness of the reference run {reference}")
        ref_s = ds["sharpness"].sel(run=reference)
        out["sharpness_gap_exceeds_at"] = _first_step(abs(out["sharpness_gap"]) > rtol * abs(ref_s))
    if "w" in ds:
        problem = _problem_for(ds) if problem is None else problem
        if problem is not None and problem.X is not None:
            out["function_distance"] = _function_distance(ds, reference, problem, probe).assign_attrs(
                units="output", long_name=f"RMS over {min(probe, problem.n_examples)} training inputs of "
                                          f"‖f(x; w) − f(x; w_ref)‖₂")
            out["final_function_distance"] = last_recorded(out["function_distance"])
    out["final_loss"] = last_recorded(ds["loss"])
    out["final_loss_gap"] = last_recorded(out["loss_gap"])
    out["final_distance"] = last_recorded(distance)
    out["max_distance"] = distance.max("step")
    for name in ("loss_gap_exceeds_at", "distance_exceeds_at", "sharpness_gap_exceeds_at"):
        if name in out:
            out[name].attrs.update(units="step", long_name=f"first step where the gap exceeds rtol={rtol}")
    return out


def relative_distance(ds: xr.Dataset, run: str, reference: str) -> float:
    """‖w_run − w_ref‖/‖w_ref − w_ref(0)‖ (dimensionless: the distance over the reference's travel) at the last
    step where both runs' full weights were kept (``record.keep_weights``)."""
    if "w" not in ds:
        raise ValueError("relative_distance: needs the full weights w (record.keep_weights)")
    distance, travel = _distance(ds, "w", reference)
    ratio = (distance.sel(run=run) / travel).dropna("step")
    if ratio.size == 0:
        raise ValueError(f"relative_distance: no step where both {run} and {reference} kept their weights")
    return float(ratio[-1])


def last_recorded(x: xr.DataArray, finite: bool = False) -> xr.DataArray:
    """Per run, the value at the last step where it was recorded — with ``finite``, where it was finite (NaN
    when never)."""
    valid = np.isfinite(x) if finite else x.notnull()
    index = valid.cumsum("step").argmax("step")
    return x.isel(step=index).where(valid.any("step")).drop_vars(["step", "time"], errors="ignore")


def summary(compared: xr.Dataset) -> pd.DataFrame:
    """One row per run: process, rule, lr and the per-run values of :func:`compare` that were computed."""
    cols = {c: compared[c].values for c in ("process", "rule", "lr") if c in compared.coords}
    cols.update({c: compared[c].values for c in SUMMARY if c in compared})
    return pd.DataFrame(cols, index=pd.Index(compared.run.values, name="run"))


def summary_table(compared: xr.Dataset) -> str:
    """:func:`summary` as text, with the reference named."""
    frame = summary(compared)
    text = frame.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-")
    return f"reference: {compared.attrs.get('reference')}\n{text}"
