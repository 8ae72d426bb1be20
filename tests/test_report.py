"""Reports and plots: numbers in the summary, sections shown only with their data, one clock per report (chosen
by content or asked for), sweeps (a legend of the swept values, small multiples, final loss against the swept
coordinate), the header's counts and the scenario's keys that apply, every bundled scenario reported at test scale,
and the HTML opened in headless chromium (every figure decoded, its clock and legend read from the DOM, no errors,
no network)."""
import base64
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

import flowsim
from flowsim import plot, report
from flowsim.cli import main
from flowsim.scenario import bundled as bundled_scenarios

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
N = 200          # recorded steps 0..N, every step; curvature every 10 steps


def synthetic() -> xr.Dataset:
    """Five runs holding every recorded variable (every run's, the flows' and the probes'; gaps come from
    flowsim.compare), with known crossings, NaN between measurements and a divergence.

    gd (the reference): sharpness 1 + 3.2k/N vs threshold 2/η = 4 (0.95·4 first reached at the measured step
    180, time 90); adam: sharpness far above its threshold but precond_sharpness = 38/η · k/150 (0.95 first at
    step 150); sgd: diverges at step 120 (loss 1e9 there, NaN after). w_proj of run i is k·i/2 in each of 4
    coordinates every 10 steps, so the distance to gd is k·i.
    """
    k = np.arange(N + 1)
    runs = {  # name: (process, rule, lr, batch_size)
        "gd": ("discrete", "gd", 0.5, 0), "central": ("central", "gd", 0.5, 0), "flow": ("stable", "gd", 0.5, 0),
        "adam": ("discrete", "adam", 0.01, 0), "sgd": ("discrete", "gd", 0.5, 10)}
    nan = np.full(N + 1, np.nan)
    curv = k % 10 == 0

    def at_curv(v):
        return np.where(curv, v, np.nan)

    data = {v: [] for v in ("loss", "step_size", "time", "wall_time", "sharpness", "eigs", "precond_sharpness",
                            "threshold", "noise_kernel_norm", "predicted_loss", "w_proj", "sigma_eigs",
                            "sigma_oscillation_sq", "batch_sharpness", "second_moment_contraction")}
    for i, (name, (process, rule, lr, bs)) in enumerate(runs.items()):
        base = np.exp(-k / 80) * (1 + 0.3 * (-1.0) ** k * (process == "discrete"))
        sharp = at_curv(1 + 3.2 * k / N)
        data["loss"].append(base)
        data["step_size"].append(np.full(N + 1, lr))
        data["time"].append(lr * k)
        data["wall_time"].append(0.01 * k * (i + 1))
        data["threshold"].append(np.full(N + 1, (38 if rule == "adam" else 2) / lr))
        data["precond_sharpness"].append(at_curv(38 / lr * k / 150) if rule == "adam" else nan)
        data["sharpness"].append(at_curv(np.full(N + 1, 5000.0)) if rule == "adam" else sharp)
        data["eigs"].append(np.stack([data["sharpness"][-1] * f for f in (1, 0.8, 0.5)], axis=-1))
        data["noise_kernel_norm"].append(at_curv(np.minimum(k / 100, 1.0)) if bs else nan)
        data["batch_sharpness"].append(at_curv(2 / lr * np.minimum(k / 100, 1.0)) if bs else nan)
        data["second_moment_contraction"].append(at_curv(1 + 0.1 * np.exp(-k / 50)) if bs else nan)
        data["predicted_loss"].append(base * 1.1 if process == "central" else nan)
        sig = np.stack([0.01 * np.exp(-k / 100), nan], axis=-1) if process == "central" else np.stack([nan, nan], -1)
        data["sigma_eigs"].append(sig)
        data["sigma_oscillation_sq"].append(sig * (1 + 0.5 * (-1.0) ** k)[:, None])
        data["w_proj"].append(np.outer(np.where(curv, k * i / 2, np.nan), np.ones(4)))
    sgd = list(runs).index("sgd")
    for v in data:
        data[v][sgd][121:] = np.nan
    data["loss"][sgd][120] = 1e9
    dims = {"eigs": ("run", "step", "eig"), "w_proj": ("run", "step", "proj"), "sigma_eigs": ("run", "step", "crit"),
            "sigma_oscillation_sq": ("run", "step", "crit")}
    ds = xr.Dataset({v: (dims.get(v, ("run", "step")), np.stack(a)) for v, a in data.items()},
                    coords={"run": list(runs), "step": k,
                            **{c: ("run", [r[j] for r in runs.values()])
                               for j, c in enumerate(("process", "rule", "lr", "batch_size"))}})
    ds = ds.set_coords("time")
    ds["diverged"] = ("run", [n == "sgd" for n in runs])
    ds["diverged_at"] = ("run", [120.0 if n == "sgd" else np.nan for n in runs])
    ds.attrs.update(name="synthetic", flowsim_version=flowsim.__version__, device="cpu", dtype="float64",
                    scenario=yaml.safe_dump({"name": "synthetic", "compare": {"reference": "gd"}}))
    return ds


LRS, SEEDS, NAMES = (0.05, 0.1, 0.2), (0, 1), ("gd", "slow")


def synthetic_sweep() -> xr.Dataset:
    """A 12-run sweep: lr × seed × run_name, stored as ``<run_name>[lr=…,seed=…]`` with the coordinates of
    flowsim.sweep and its scenario. Full batch, so the seeds' runs are identical (each lies under the other);
    loss exp(−ηk/s)·(1 + 0.2(−1)^k) with s = 10 for gd and 20 for slow; sharpness 1 + 3k/N every 10 steps vs
    threshold 2/η; the run gd at lr 0.2, seed 1 diverges at step 150 (loss 1e9 there, NaN after)."""
    k = np.arange(N + 1)
    points = [(lr, seed, name) for lr in LRS for seed in SEEDS for name in NAMES]
    runs = [f"{name}[lr={lr},seed={seed}]" for lr, seed, name in points]
    loss = np.stack([np.exp(-lr * k / (10 if name == "gd" else 20)) * (1 + 0.2 * (-1.0) ** k)
                     for lr, _, name in points])
    sharp = np.stack([np.where(k % 10 == 0, 1 + 3 * k / N, np.nan) for _ in points])
    bad = runs.index("gd[lr=0.2,seed=1]")
    loss[bad, 150], loss[bad, 151:], sharp[bad, 151:] = 1e9, np.nan, np.nan
    ds = xr.Dataset(
        {"loss": (("run", "step"), loss), "sharpness": (("run", "step"), sharp),
         "threshold": (("run", "step"), np.stack([np.full(N + 1, 2 / lr) for lr, _, _ in points])),
         "step_size": (("run", "step"), np.stack([np.full(N + 1, lr) for lr, _, _ in points])),
         "time": (("run", "step"), np.stack([lr * k for lr, _, _ in points])),
         "diverged": ("run", [r == runs[bad] for r in runs]),
         "diverged_at": ("run", [150.0 if r == runs[bad] else np.nan for r in runs])},
        coords={"run": runs, "step": k, "process": ("run", ["discrete"] * 12), "rule": ("run", ["gd"] * 12),
                "lr": ("run", [p[0] for p in points]), "seed": ("run", [p[1] for p in points]),
                "run_name": ("run", [p[2] for p in points]), "batch_size": ("run", [0] * 12)})
    scenario = flowsim.load_scenario({"name": "sweep", "steps": N, "problem": {"model": "quadratic", "spectrum": [1.0]},
                                      "runs": {n: {"lr": 0.1} for n in NAMES},
                                      "sweep": {"lr": list(LRS), "seed": list(SEEDS)}})
    ds.attrs.update(name="sweep", scenario=scenario.to_yaml(), n_params=1234, n_examples=567)
    return ds.set_coords("time")


def test_summary_gives_final_loss_eos_onset_largest_distance_wall_time_and_divergence():
    s = report.summary(report.compared(synthetic()), x="time")
    assert s.loc["gd", "EoS onset (time)"] == 0.5 * 180          # 1 + 3.2k/N ≥ 3.8 ⇔ k ≥ 175 → measured at 180
    assert s.loc["adam", "EoS onset (time)"] == 0.01 * 150       # precond_sharpness decides, not sharpness
    assert s.loc["sgd", "diverged at (time)"] == 0.5 * 120 and np.isnan(s.loc["gd", "diverged at (time)"])
    s = report.summary(report.compared(synthetic()))             # gd and adam: the clock is step
    assert s.loc["gd", "EoS onset (step)"] == 180 and s.loc["adam", "EoS onset (step)"] == 150
    assert s.loc["central", "final loss"] == np.exp(-N / 80)
    assert s.loc["gd", "final loss"] == np.exp(-N / 80) * (1 + 0.3 * (-1) ** N)
    assert s.loc["sgd", "final loss"] == 1e9                   # the last finite value, at the divergence
    assert s.loc["sgd", "diverged at (step)"] == 120 and np.isnan(s.loc["gd", "diverged at (step)"])
    assert s.loc["flow", "largest distance"] == pytest.approx(2 * N, rel=1e-12)        # k·i, i = 2
    assert s.loc["sgd", "largest distance"] == pytest.approx(4 * 120, rel=1e-12)       # until it diverged
    assert s.loc["gd", "largest distance"] == 0
    assert s.loc["adam", "wall time (s)"] == pytest.approx(0.01 * N * 4, rel=1e-12)
    assert s.loc["sgd", "wall time (s)"] == pytest.approx(0.01 * 120 * 5, rel=1e-12)
    assert s["batch size"].tolist() == ["full", "full", "full", "full", 10]          # what ran, not 0 for full
    html = report.render(synthetic())
    rows = {r: re.search(rf"<th>{r}</th>(.*?)</tr>", html, re.S).group(1) for r in ("gd", "sgd")}
    assert "<td>full</td>" in rows["gd"] and "<td>10</td>" in rows["sgd"]
    assert np.isnan(report.summary(synthetic().drop_vars("threshold")).loc["gd", "EoS onset (step)"])


def test_runs_that_share_a_name_are_refused_in_one_line_and_once_named_are_compared():
    """``flowsim.simulate`` names its run after its process, so GD and Adam simulated apart and joined by
    ``xr.concat`` were two runs named 'discrete': the report raised a TypeError, a figure numpy's "truth value of an
    array is ambiguous", and compare ran on them. Each is now one line; once named, the loss gap to GD is Adam's
    loss minus GD's, step by step."""
    problem = flowsim.Problem.from_function(lambda w: (w ** 2).sum() + (w ** 4).sum(), [1.0, -0.5], device="cpu")
    gd = flowsim.simulate(problem, "gd", "discrete", 0.1, 20)
    adam = flowsim.simulate(problem, "adam", "discrete", 0.01, 20)
    joined = xr.concat([gd, adam], "run")
    for show in (report.render, flowsim.compare, plot.loss, plot.step_size):
        with pytest.raises(ValueError, match=r"^run: more than one run is named 'discrete'; give each dataset its "
                                             r"own run name before xr.concat, e.g. ds.assign_coords\(run=\['adam'\]\)$"):
            show(joined)
    named = xr.concat([gd.assign_coords(run=["gd"]), adam.assign_coords(run=["adam"])], "run")
    gap = flowsim.compare(named, "gd")["loss_gap"].sel(run="adam").values
    np.testing.assert_array_equal(gap, adam["loss"].values[0] - gd["loss"].values[0])
    assert "<th>adam</th>" in report.render(named)


def test_moving_average_is_the_mean_over_a_full_window_of_steps():
    ds = synthetic().isel(run=[0])
    loss = ds.loss.values[0]
    steps, avg = plot.smoothed(ds, "gd", window=20, x="step")
    assert steps[0] == 10 and steps[-1] == N - 9                       # window [k − 10, k + 10), full only
    np.testing.assert_allclose(avg, [loss[int(k) - 10:int(k) + 10].mean() for k in steps], rtol=1e-12)
    # recorded every 4th step, a 20-step window is 5 recorded points: [k − 8, k + 8] in steps
    sub = ds.isel(step=slice(0, None, 4))
    steps4, avg4 = plot.smoothed(sub, "gd", window=20, x="step")
    assert steps4[0] == 8 and steps4[-1] == N - 8
    np.testing.assert_allclose(avg4, [loss[int(k) - 8:int(k) + 9:4].mean() for k in steps4], rtol=1e-12)
    assert plot.smoothed(ds.isel(step=slice(0, 19)), "gd", window=20)[1].size == 0


def _dashed(ax):
    return [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]


def test_threshold_is_drawn_against_the_variable_it_applies_to():
    ds = synthetic()
    sharp = plot.sharpness(ds).axes
    assert [a.get_title().split("— ")[1] for a in sharp] == ["gd", "central", "flow", "adam", "sgd"]
    np.testing.assert_array_equal(_dashed(sharp[0])[0].get_ydata(), 2 / 0.5)
    assert not _dashed(sharp[3])                                   # adam's threshold is for λ_max(P̃⁻¹H)
    pre = plot.precond_sharpness(ds).axes
    assert len(pre) == 1 and pre[0].get_title().endswith("adam")
    np.testing.assert_array_equal(_dashed(pre[0])[0].get_ydata(), 38 / 0.01)
    gd = ds.sel(run="gd")
    same = ds.copy(deep=True)
    same["precond_sharpness"].loc[{"run": "gd"}] = gd.sharpness            # P̃ = I: the threshold bounds both
    assert _dashed(plot.sharpness(same).axes[0]) and plot.threshold_applies(same, "gd", "sharpness")
    same["precond_sharpness"].loc[{"run": "gd"}] = gd.sharpness * 2        # a real preconditioner
    assert not _dashed(plot.sharpness(same).axes[0])
    assert report.summary(same, "time").loc["gd", "EoS onset (time)"] == 0.5 * 60    # 2 + 6.4k/N ≥ 3.8 ⇔ k ≥ 56.25
    with pytest.raises(ValueError, match="noise_kernel_norm"):
        plot.noise_kernel_norm(ds.drop_vars("noise_kernel_norm"))


UNSWEPT = [s for s in report.SECTIONS if not s.sweep]


def test_sections_appear_only_with_their_variables():
    assert "Distance and gaps to the reference run" not in [s.title for s in report.sections(synthetic())]
    ds = report.compared(synthetic())
    assert [s.title for s in report.sections(ds)] == [s.title for s in UNSWEPT]      # not a sweep
    for section in UNSWEPT:
        less = ds.drop_vars([v for v in section.variables if v in ds])
        titles = [s.title for s in report.sections(less)]
        assert section.title not in titles and len(titles) == len(UNSWEPT) - 1
    html = report.render(ds.assign(noise_kernel_norm=ds.noise_kernel_norm * np.nan))   # all-NaN = absent
    assert "Noise kernel norm" not in html and html.count("<img") == len(UNSWEPT) - 1
    assert [s.title for s in report.sections(synthetic_sweep())] == [
        "Final loss across the sweep", "Loss", "Sharpness and tracked eigenvalues", "Edge of stability, all runs",
        "Step size"]


def test_sigma_figure_sets_each_eigenvalue_against_the_averaged_oscillation():
    ds = synthetic()
    (ax,) = plot.sigma(ds, x="time").axes
    assert ax.get_title().endswith("central")
    solid, dashed = ax.get_lines()                     # the second Σ eigenvalue is all NaN: not drawn
    k = np.arange(N + 1)
    np.testing.assert_allclose(solid.get_ydata(), 0.01 * np.exp(-k / 100), rtol=1e-12)
    disp = 0.01 * np.exp(-k / 100) * (1 + 0.5 * (-1.0) ** k)
    steps = (dashed.get_xdata() / 0.5).round().astype(int)
    np.testing.assert_allclose(dashed.get_ydata(), [disp[s - 10:s + 10].mean() for s in steps], rtol=1e-12)


def test_a_sweep_too_large_for_a_legend_still_lays_out():
    ds = synthetic()
    big = xr.concat([ds.assign_coords(run=[f"{r}-{i}" for r in ds.run.values]) for i in range(10)], "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # matplotlib warns when constrained layout collapses
        fig = plot.gaps(flowsim.compare(big, reference="gd-0"), reference="gd-0")
        report.figure_uri(fig)
    assert all(ax.get_legend() is None for ax in fig.axes)


def test_distance_to_reference_skips_the_reference_and_marks_the_divergence():
    ds = report.compared(synthetic())
    axes = plot.gaps(ds, reference="gd").axes
    assert [a.get_ylabel() for a in axes] == ["distance to the reference (weights)", "loss − reference loss",
                                              "sharpness − reference sharpness"]
    ax = axes[0]
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert "gd" not in labels and {"central", "flow", "adam", "sgd"} <= set(labels)
    flow = ax.get_lines()[labels.index("flow")]
    np.testing.assert_array_equal(flow.get_xdata(), np.arange(0, N + 1, 10))               # NaN steps skipped
    np.testing.assert_allclose(flow.get_ydata(), 2 * np.arange(0, N + 1, 10), rtol=1e-12)
    assert [t.get_text() for t in ax.texts] == ["diverged"]
    assert ax.get_lines()[labels.index("sgd") + 1].get_xdata()[0] == 120     # the divergence line, in steps


def test_gaps_are_drawn_against_the_step_at_which_they_were_compared():
    """flowsim.compare pairs a run's k-th step with the reference's: on the time clock a gap is drawn at time only
    where equal step is equal time, never at the run's own Σ η (there adam's gap at step k would sit at 1/50 of
    the reference's time)."""
    ds = report.compared(synthetic()).assign_attrs(clock="time")
    compared = ds.step.where(np.isfinite(ds.loss_gap.sel(run="adam")), drop=True).values
    axes = plot.gaps(ds, reference="gd").axes
    assert [ax.get_xlabel() for ax in axes] == [plot.XLABEL["step"]] * 3
    adam = next(ln for ln in axes[1].get_lines() if ln.get_label() == "adam")
    np.testing.assert_array_equal(adam.get_xdata(), compared)
    np.testing.assert_array_equal(adam.get_ydata(), (ds.loss.sel(run="adam") - ds.loss.sel(run="gd")).values)
    assert f"compared at equal step: {plot.XLABEL['step']}" in report.header(ds)
    same = report.compared(synthetic().sel(run=["gd", "central", "flow"])).assign_attrs(clock="time")  # one η
    axes = plot.gaps(same, reference="gd").axes
    assert [ax.get_xlabel() for ax in axes] == [plot.XLABEL["time"]] * 3
    flow = next(ln for ln in axes[1].get_lines() if ln.get_label() == "flow")
    np.testing.assert_array_equal(flow.get_xdata(), same.time.sel(run="gd").values)
    assert "compared at equal step" not in report.header(same)


def test_report_cli_writes_next_to_the_store_and_fails_in_one_line(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    doc = {"name": "t", "device": "cpu", "steps": 6, "record": {"projection_dim": 4},
           "problem": {"model": "quadratic", "spectrum": [1.0, 0.5]},
           "runs": {"ok": {"lr": 0.5}, "blowup": {"lr": 30.0}}}
    flowsim.run(doc, store, progress=False)
    assert main(["report", str(store)]) == 0
    html = (tmp_path / "s.html").read_text()
    assert html.count("<img") == 2                                   # loss and step size
    # blowup: L_k = ½ Σ λ (1 − ηλ)^{2k} w0² first exceeds 1e6 · max(L_0, 1) (the default divergence_factor)
    w0, lam = flowsim.runner.build(flowsim.load_scenario(doc)).w0.numpy(), np.array([1.0, 0.5])
    L = [0.5 * np.sum(lam * (1 - 30.0 * lam) ** (2 * k) * w0 ** 2) for k in range(7)]
    expected = next(k for k in range(7) if L[k] > 1e6 * max(L[0], 1))
    summary = report.summary(flowsim.open(store))
    assert summary.loc["blowup", "diverged at (step)"] == expected and np.isnan(summary.loc["ok", "diverged at (step)"])
    assert main(["report", str(store), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text() == html
    assert set(re.findall(r"data-x='([^']*)'", html)) == {plot.XLABEL["step"]}       # lr 0.5 and 30: step
    assert "2 parameters · 0 training examples" in html                          # the store's n_params, n_examples
    assert main(["report", str(store), "-o", str(tmp_path / "t.html"), "--x", "time"]) == 0
    timed = (tmp_path / "t.html").read_text()
    assert set(re.findall(r"data-x='([^']*)'", timed)) == {plot.XLABEL["time"]}
    assert "<th>EoS onset (time)</th>" in timed and "<th>diverged at (time)</th>" in timed and "(step)" not in timed
    capsys.readouterr()
    assert main(["report", str(tmp_path / "missing.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.zarr" in err
    # -o a folder: the report inside it (it was an IsADirectoryError traceback); a missing folder is made
    (tmp_path / "reports").mkdir()
    assert main(["report", str(store), "-o", str(tmp_path / "reports")]) == 0
    assert main(["report", str(store), "-o", str(tmp_path / "new" / "r.html")]) == 0
    assert (tmp_path / "reports" / "s.html").read_text() == html == (tmp_path / "new" / "r.html").read_text()
    # -o the store itself: a file written into it would make it a folder flowsim refuses as a store
    capsys.readouterr()
    assert main(["report", str(store), "-o", str(store)]) == 2
    assert capsys.readouterr().err.strip() == (f"flowsim: error: path: {store} is a store; give the report a file "
                                               f"name, e.g. {tmp_path / 's.html'}")
    assert sorted(p.name for p in store.iterdir()) == ["checkpoints", "runs", "zarr.json"]


def test_the_clock_is_chosen_by_content_and_can_be_asked_for():
    ds = synthetic()
    assert plot.clock(ds) == "step"                                      # gd and adam: Σ η is not comparable
    gd_only = ds.sel(run=["gd", "central", "flow", "sgd"])
    assert plot.clock(gd_only) == "time"
    assert plot.clock(gd_only.assign_coords(lr=("run", [0.5, 0.5, 0.5, 0.04]))) == "step"   # 12.5× apart
    assert plot.clock(gd_only.assign_coords(lr=("run", [0.5, 0.5, 0.5, np.nan]))) == "step"  # a controller
    assert plot.clock(gd_only.drop_vars("time")) == "step"
    assert plot.clock(ds.assign_attrs(clock="time")) == "time" and plot.clock(gd_only, "step") == "step"
    with pytest.raises(ValueError, match="no time"):
        plot.clock(gd_only.drop_vars("time"), "time")
    with pytest.raises(ValueError, match="'steps' is not one of"):
        report.render(ds, x="steps")


@pytest.mark.parametrize("x", [None, "time"])
def test_every_figure_of_a_report_uses_one_clock(x):
    ds = report.compared(synthetic()).assign_attrs(clock=x or plot.clock(synthetic()))
    labels = {s.title: report.x_labels(s.figure(ds, "gd")) for s in report.sections(ds)}
    gaps = labels.pop("Distance and gaps to the reference run")
    assert gaps == [plot.XLABEL["step"]]                        # compared at equal step, not equal time: step
    assert set(map(tuple, labels.values())) == {(plot.XLABEL[x or "step"],)}, labels
    html = report.render(synthetic(), x=x)
    assert set(re.findall(r"data-x='([^']*)'", html)) == {plot.XLABEL[x or "step"], plot.XLABEL["step"]}
    assert f"x axis of every figure: {plot.XLABEL[x or 'step']}" in html
    assert set(re.findall(r"<th>[^<]*\((step|time)\)</th>", html)) == {x or "step"}     # no mixed summary columns


def test_a_sweep_figure_has_a_legend_of_the_swept_values_and_every_run_has_its_own_look():
    ds = synthetic_sweep()
    assert plot.sweep_coords(ds) == ["lr", "seed", "run_name"]
    fig = plot.loss(ds)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "lr = 0.05", "lr = 0.1", "lr = 0.2", "seed = 0, run_name = gd", "seed = 0, run_name = slow",
        "seed = 1, run_name = gd", "seed = 1, run_name = slow"]
    (ax,) = fig.axes
    averages = [ln for ln in ax.get_lines() if ln.get_alpha() is None and len(ln.get_xdata()) > 2]  # not raw, not ⋮
    assert len({(ln.get_color(), ln.get_linestyle()) for ln in averages}) == 12        # 12 runs, 12 looks
    for figure in (plot.step_size(ds), plot.edge(ds), plot.sharpness(ds), plot.final_loss(ds)):
        assert len(figure.legends) == 1 and report.legend_entries(figure) >= 7


def test_a_run_lying_under_another_stays_visible():
    ds = synthetic_sweep()                                   # the seeds of a full-batch run are identical
    look = plot.looks(ds)
    a, b = "gd[lr=0.1,seed=0]", "gd[lr=0.1,seed=1]"
    np.testing.assert_array_equal(ds.loss.sel(run=a), ds.loss.sel(run=b))
    assert look[a]["color"] == look[b]["color"] and look[a]["linestyle"] != look[b]["linestyle"]
    assert look[a]["linewidth"] > look[b]["linewidth"]       # drawn first and wider: it shows around b
    unswept = plot.looks(synthetic())
    widths = [unswept[r]["linewidth"] for r in synthetic().run.values]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 5
    (ax,) = plot.loss(synthetic()).axes
    drawn = {ln.get_label(): ln.get_linewidth() for ln in ax.get_lines()}
    assert drawn["central"] > drawn["flow"]                  # identical losses (both flows), both visible


def test_a_sweep_sharpness_is_one_small_multiples_figure_with_a_panel_per_point():
    ds = synthetic_sweep()
    fig = plot.sharpness(ds)
    axes = fig.axes
    assert len(axes) == len(LRS) * len(SEEDS)                # one panel per point, both runs of the point in it
    assert [a.get_title().split("— ")[1] for a in axes][:2] == ["lr = 0.05, seed = 0", "lr = 0.05, seed = 1"]
    assert all(len([ln for ln in a.get_lines() if ln.get_marker() == "."]) == len(NAMES) for a in axes)
    assert all(axes[0].get_shared_x_axes().joined(axes[0], a) and axes[0].get_shared_y_axes().joined(axes[0], a)
               for a in axes)
    assert len(plot.sharpness(synthetic()).axes) == 5        # unswept: one panel per run, own axes


def test_the_final_loss_is_drawn_against_the_swept_coordinate():
    ds = synthetic_sweep()
    (ax,) = plot.final_loss(ds).axes
    assert ax.get_xlabel() == "lr"
    markers = [ln for ln in ax.get_lines() if ln.get_marker() in ("o", "x")]
    assert len(markers) == 12
    diverged = [ln for ln in markers if ln.get_marker() == "x"]
    assert len(diverged) == 1 and diverged[0].get_xdata()[0] == 0.2 and diverged[0].get_ydata()[0] == 1e9
    gd = {ln.get_xdata()[0]: ln.get_ydata()[0] for ln in markers if ln.get_marker() == "o"
          and ln.get_ydata()[0] == pytest.approx(np.exp(-ln.get_xdata()[0] * N / 10) * 1.2)}
    assert sorted(gd) == list(LRS)                           # gd's final loss at each lr
    with pytest.raises(ValueError, match="not a sweep"):
        plot.final_loss(synthetic())


def test_the_edge_figure_puts_every_run_on_one_normalized_axis():
    ds = synthetic()
    (ax,) = plot.edge(ds, x="step").axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    k = np.arange(0, N + 1, 10)
    np.testing.assert_allclose(lines["gd"].get_ydata(), (1 + 3.2 * k / N) * 0.5 / 2, rtol=1e-12)   # η·λ/2
    np.testing.assert_allclose(lines["adam"].get_ydata(), k / 150, rtol=1e-12)                       # λ(P̃⁻¹H)/(38/η)
    assert lines["edge (η·λ/θ = 1)"].get_ydata()[0] == 1.0


def test_the_header_counts_parameters_and_examples_and_the_scenario_shows_the_keys_that_apply():
    html = report.render(synthetic_sweep())
    assert "12 runs (sweep: lr 3 × seed 2 × run_name 2) · 1,234 parameters · 567 training examples" in html
    stored = flowsim.load_scenario("quickstart").to_yaml()
    assert "teacher_width" in stored and "stochastic_edge_batches" in stored
    shown = report.scenario_text(stored)
    doc = yaml.safe_load(shown)
    assert doc["problem"]["dataset"] == {"name": "digits"} and doc["record"] == {"curvature_every": 10}
    assert doc["problem"]["widths"] == [64, 64] and doc["runs"]["gd-eos"]["lr"] == 0.4
    assert flowsim.load_scenario(shown) == flowsim.load_scenario(stored)        # the same scenario
    assert report.scenario_text("not: [a scenario") == "not: [a scenario"


class Chromium:
    """Headless chromium driven through the DevTools protocol over a pipe (--remote-debugging-pipe)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", "--window-size=1100,900"]

    def __init__(self, exe: str, timeout: float = 60):
        self.timeout, self.profile = timeout, tempfile.TemporaryDirectory()
        to_browser, self._w = os.pipe()
        self._r, from_browser = os.pipe()
        cmd = " ".join([exe, *self.FLAGS, f"--user-data-dir={self.profile.name}", "about:blank",
                        f"3<&{to_browser}", f"4>&{from_browser}"])
        self.proc = subprocess.Popen(["bash", "-c", "exec " + cmd], pass_fds=(to_browser, from_browser),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.buf, self.id, self.events = b"", 0, []

    def send(self, method, session=None, **params):
        self.id += 1
        msg = {"id": self.id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read()
            if m.get("id") == self.id:
                assert "error" not in m, f"{method}: {m['error']}"
                return m["result"]
            self.events.append(m)

    def _read(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._r, 1 << 20)
            assert chunk, "chromium closed the pipe"
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def load(self, path: Path, screenshot: Path = None) -> dict:
        """Open ``path`` in a new tab; return its images [alt, complete, naturalWidth], their data attributes
        ({alt, x, legend}: what each figure states of its x axes and legend entries), the text of the header
        line with the counts, the errors it logged and every request it made that was not file: or data:."""
        self.events = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        s = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.send(f"{domain}.enable", session=s)
        self.send("Page.navigate", session=s, url=path.resolve().as_uri())
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == s for e in self.events):
            self.events.append(self._read())
        images = json.loads(self.send("Runtime.evaluate", session=s, returnByValue=True, expression=(
            "JSON.stringify([...document.images].map(i => [i.alt, i.complete, i.naturalWidth]))"))["result"]["value"])
        figures, counts = json.loads(self.send("Runtime.evaluate", session=s, returnByValue=True, expression=(
            "JSON.stringify([[...document.images].map(i => ({alt: i.alt, ...i.dataset})),"
            " document.getElementById('counts')?.textContent ?? null])"))["result"]["value"])
        if screenshot is not None:
            size = self.send("Page.getLayoutMetrics", session=s)["cssContentSize"]
            shot = self.send("Page.captureScreenshot", session=s, format="png", captureBeyondViewport=True,
                             clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        self.send("Target.closeTarget", targetId=target)
        mine = [e for e in self.events if e.get("sessionId") == s]
        errors = [e["params"] for e in mine if e["method"] == "Runtime.exceptionThrown"
                  or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
                  or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))]
        requests = [e["params"]["request"]["url"] for e in mine if e["method"] == "Network.requestWillBeSent"
                    and not e["params"]["request"]["url"].startswith(("file:", "data:"))]
        return {"images": images, "figures": figures, "counts": counts, "errors": errors, "requests": requests}

    def close(self):
        self.send("Browser.close")
        self.proc.wait(timeout=30)
        os.close(self._w)
        os.close(self._r)
        self.profile.cleanup()


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    ARTIFACTS.mkdir(exist_ok=True)
    b = Chromium(exe)
    yield b
    b.close()


def assert_renders(page: dict, n_figures: int):
    assert len(page["images"]) == n_figures
    assert all(complete and width > 0 for _, complete, width in page["images"]), page["images"]
    assert page["errors"] == [] and page["requests"] == []


def test_the_browser_check_catches_a_broken_figure_and_a_logged_error(browser, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><img alt='x' src='data:image/png;base64,iVBORw0KGgoAAAA'>"
                   "<script>console.error('boom')</script></body></html>")
    page = browser.load(bad)
    assert page["images"] == [["x", True, 0]] and len(page["errors"]) >= 1


def test_report_with_every_section_a_diverged_run_and_nan_gaps_renders_in_chromium(browser, tmp_path):
    ds = synthetic()
    path = report.write(ds, tmp_path / "synthetic.html")
    page = browser.load(path, screenshot=ARTIFACTS / "report_synthetic.png")
    assert_renders(page, len(UNSWEPT))
    assert [alt for alt, _, _ in page["images"]] == [s.title for s in UNSWEPT]
    assert (ARTIFACTS / "report_synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", path.read_text())     # nothing to fetch


def test_a_sweep_report_has_a_legend_and_one_clock_on_every_figure_in_chromium(browser, tmp_path):
    path = report.write(synthetic_sweep(), tmp_path / "sweep.html", x="step")
    page = browser.load(path, screenshot=ARTIFACTS / "report_sweep.png")
    assert_renders(page, 5)
    figures = {f["alt"]: f for f in page["figures"]}
    assert figures["Final loss across the sweep"]["x"] == "lr"             # against the swept coordinate
    clocked = [f for alt, f in figures.items() if alt != "Final loss across the sweep"]
    assert {f["x"] for f in clocked} == {plot.XLABEL["step"]}                # one clock, the one asked for
    assert all(int(f["legend"]) >= 7 for f in figures.values())              # 3 lr + 4 (seed, run_name)
    assert page["counts"].startswith("12 runs (sweep: lr 3 × seed 2 × run_name 2) · 1,234 parameters")
    assert page["counts"].endswith(plot.XLABEL["step"])


STEPS = 2   # test scale for the bundled scenarios: steps 0, 1, 2 (curvature is measured at the first and last)


@pytest.mark.parametrize("name", sorted(bundled_scenarios()))
def test_every_bundled_scenario_gets_a_report_at_test_scale(name, browser, tmp_path):
    doc = yaml.safe_load(bundled_scenarios()[name].read_text())
    doc.setdefault("record", {})["projection_dim"] = 4
    for run in doc["runs"].values():        # a step-size drop moves into the short run, in proportion
        if "schedule" in run:
            run["schedule"]["drop_at"] = max(1, run["schedule"]["drop_at"] * STEPS // doc["steps"])
    for key, values in doc.get("sweep", {}).items():     # a sweep keeps its first two points
        doc["sweep"][key] = values[:2]
    doc["device"] = "cpu"
    scenario = tmp_path / f"{name}.yaml"
    scenario.write_text(yaml.safe_dump(doc))
    store = tmp_path / f"{name}.zarr"
    assert main(["run", str(scenario), "-o", str(store), "--steps", str(STEPS), "-q", "--report"]) == 0
    ds = flowsim.open(store)
    page = browser.load(store.with_suffix(".html"), screenshot=ARTIFACTS / f"report_{name}.png"
                        if name == "quickstart" else None)
    assert_renders(page, len(report.sections(report.compared(ds))))
    sweep = ["Final loss across the sweep"] if plot.sweep_coords(ds) else []
    assert [alt for alt, _, _ in page["images"]][:len(sweep) + 1] == sweep + ["Loss"]
    gaps = "Distance and gaps to the reference run"                          # compared at equal step
    clocks = {f["x"] for f in page["figures"] if f["alt"] not in sweep + [gaps]}
    assert len(clocks) == 1 and clocks <= set(plot.XLABEL.values())          # one clock, on every other figure
    assert [f["x"] for f in page["figures"] if f["alt"] == gaps] in (
        [], [plot.XLABEL[plot.gaps_clock(report.compared(ds))]])
    assert not sweep or all(int(f["legend"]) > 0 for f in page["figures"])


def test_a_real_central_flow_store_gets_every_section_it_measured(browser, tmp_path):
    doc = {"name": "cf", "device": "cpu", "steps": 6, "compare": {"reference": "gd"},
           "problem": {"model": "mlp", "widths": [8], "dataset": "digits", "classes": [0, 1, 2, 3], "n_train": 40},
           "runs": {"gd": {"process": "discrete", "lr": 0.9}, "central": {"process": "central", "lr": 0.9},
                    "flow": {"process": "stable", "lr": 0.9}},
           "record": {"curvature_every": 2, "top_k": 2, "precond": True, "projection_dim": 8, "projection_every": 2}}
    ds = flowsim.run(doc, tmp_path / "cf.zarr", progress=False)
    page = browser.load(report.write(tmp_path / "cf.zarr"))
    expected = [s.title for s in UNSWEPT if s.title not in ("Noise kernel norm", "Stochastic edge")]
    assert [alt for alt, _, _ in page["images"]] == expected
    assert_renders(page, len(expected))
    assert report.summary(report.compared(ds)).loc["gd", "largest distance"] == 0
