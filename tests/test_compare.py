"""flowsim.compare: distances, gaps and first exceedances recomputed independently from the stored arrays."""
import numpy as np
import pytest
import torch
import xarray as xr

import flowsim
from flowsim.cli import main
from flowsim.models import build_problem
from flowsim.record import Projection

PROBLEM = {"model": "mlp", "widths": [8], "activation": "tanh", "dataset": {"name": "teacher_student", "dim": 4},
           "n_train": 32}
SCENARIO = {"name": "cmp", "seed": 0, "device": "cpu", "problem": PROBLEM, "steps": 12,
            "runs": {"gd": {"process": "discrete", "lr": 0.5},
                     "flow": {"process": "stable", "lr": 0.5, "method": "rk4", "substeps": 4},
                     "sgd": {"process": "discrete", "lr": 0.5, "batch_size": 4}},
            "record": {"keep_weights": 3, "projection_dim": 64, "projection_every": 1},
            "compare": {"reference": "gd"}}


@pytest.fixture(scope="module")
def ds():
    return flowsim.run(SCENARIO, progress=False)


def test_distance_is_exact_where_weights_were_kept_and_projected_elsewhere(ds):
    c = flowsim.compare(ds)
    assert c.attrs["reference"] == "gd"
    w = ds.w.values  # (run, step, param), NaN where not kept
    exact = np.linalg.norm(w - w[0], axis=-1)
    kept = ~np.isnan(exact)
    assert kept[:, ::3].all() and not kept[:, 1::3].any()
    np.testing.assert_allclose(c.distance.values[kept], exact[kept], rtol=1e-12)
    # elsewhere ‖R(w − w_ref)‖ from w_proj, whose R (rebuilt from the scenario seed) maps the kept weights
    problem = build_problem(PROBLEM, device="cpu")
    R = Projection(problem.n_params, 64, 0, problem.dtype, problem.device).matrix.numpy()
    proj = ds.w_proj.values
    np.testing.assert_allclose(c.distance.values[~kept], np.linalg.norm(proj - proj[0], axis=-1)[~kept], rtol=1e-12)
    np.testing.assert_allclose(proj[:, ::3], w[:, ::3] @ R.T, rtol=1e-10, atol=1e-12)
    assert (c.distance.sel(run="gd") == 0).all()


def test_relative_distance_is_over_the_reference_travel_at_the_last_kept_step(ds):
    from flowsim.compare import relative_distance
    w = ds.w.sel(step=12).values  # step 12 = the last step, where every run's weights are kept
    travel = np.linalg.norm(w[0] - ds.w.sel(run="gd", step=0).values)
    assert relative_distance(ds, "flow", "gd") == pytest.approx(np.linalg.norm(w[1] - w[0]) / travel, rel=1e-12)
    early = ds.sel(step=slice(0, 10))  # kept at 0, 3, 6, 9: the last is 9
    w9 = early.w.sel(step=9).values
    assert relative_distance(early, "sgd", "gd") == pytest.approx(
        np.linalg.norm(w9[2] - w9[0]) / np.linalg.norm(w9[0] - early.w.sel(run="gd", step=0).values), rel=1e-12)
    with pytest.raises(ValueError, match="keep_weights"):
        relative_distance(ds.drop_vars("w"), "flow", "gd")


def test_loss_gap_and_first_exceedance(ds):
    c = flowsim.compare(ds, "gd", rtol=0.05)
    loss = ds.loss.values
    np.testing.assert_allclose(c.loss_gap.values, loss - loss[0], rtol=0, atol=1e-15)
    for i, run in enumerate(ds.run.values):
        over = np.nonzero(np.abs(loss[i] - loss[0]) > 0.05 * np.abs(loss[0]))[0]
        expected = ds.step.values[over[0]] if over.size else np.nan
        np.testing.assert_equal(c.loss_gap_exceeds_at.sel(run=run).item(), expected)
        w, ref = ds.w.values[i], ds.w.values[0]
        dist = np.where(np.isnan(w).any(-1), np.nan, np.linalg.norm(w - ref, axis=-1))
        assert c.final_distance.sel(run=run).item() == pytest.approx(dist[-1], rel=1e-12)
    assert c.final_loss_gap.sel(run="gd").item() == 0


def test_function_distance_is_the_rms_output_difference_on_the_probe_set(ds):
    c = flowsim.compare(ds, "gd", probe=10)
    problem = build_problem(PROBLEM, device="cpu")
    X = problem.X[:10]
    w = ds.w.sel(step=12)
    f_ref = problem.outputs(torch.as_tensor(w.sel(run="gd").values), X)
    f = problem.outputs(torch.as_tensor(w.sel(run="sgd").values), X)
    expected = (f - f_ref).pow(2).sum(1).mean().sqrt().item()
    assert c.function_distance.sel(run="sgd", step=12).item() == pytest.approx(expected, rel=1e-12)
    assert np.isnan(c.function_distance.sel(run="sgd", step=1).item())


def test_sharpness_gap_when_sharpness_was_recorded(ds):
    d = ds.copy()
    s = np.full(d.loss.shape, np.nan)
    s[:, ::6] = [[4.0, 4.0, 4.0], [4.0, 5.0, 6.0], [4.0, 4.2, 3.0]]
    d["sharpness"] = (("run", "step"), s)
    c = flowsim.compare(d, "gd", rtol=0.1)
    np.testing.assert_allclose(c.sharpness_gap.sel(step=6).values, [0.0, 1.0, 0.2])
    np.testing.assert_equal(c.sharpness_gap_exceeds_at.values, [np.nan, 6, 12])


def test_runs_of_simulate_compare_without_their_problem_and_with_it_get_the_function_distance():
    """simulate's scenario names no problem (the Problem is the caller's), and compare of its runs with full
    weights kept raised 'problem: required key is missing' while rebuilding it. Without the Problem the runs now
    get every variable but function_distance; with it, function_distance is the RMS over the inputs of the
    outputs' distance, computed here on the module itself."""
    gen = torch.Generator().manual_seed(0)
    X, labels = torch.randn(30, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (30,), generator=gen)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    problem = flowsim.Problem.from_module(module, X, labels, loss="ce", device="cpu")
    runs = [flowsim.simulate(problem, rule, "discrete", lr, 6, record={"keep_weights": 3}).assign_coords(run=[rule])
            for rule, lr in (("gd", 0.5), ("adam", 0.05))]
    joined = xr.concat(runs, "run")
    without = flowsim.compare(joined, "gd")
    assert "function_distance" not in without
    w = joined.w.sel(step=6)
    np.testing.assert_allclose(without.distance.sel(step=6, run="adam"), np.linalg.norm(w.sel(run="adam") -
                                                                                        w.sel(run="gd")), rtol=1e-12)
    outputs = []
    for run in ("gd", "adam"):
        torch.nn.utils.vector_to_parameters(torch.as_tensor(w.sel(run=run).values), module.parameters())
        outputs.append(module(X).detach())
    expected = (outputs[1] - outputs[0]).pow(2).sum(1).mean().sqrt().item()
    assert flowsim.compare(joined, "gd", problem=problem).function_distance.sel(step=6, run="adam").item() == \
        pytest.approx(expected, rel=1e-10)


def test_cli_prints_the_summary_and_rejects_an_unknown_reference(ds, tmp_path, capsys):
    store = tmp_path / "cmp.zarr"
    flowsim.run(SCENARIO, store, progress=False)
    assert main(["compare", str(store), "--reference", "flow"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("reference: flow") and all(run in out for run in ("gd", "flow", "sgd"))
    assert "distance_exceeds_at" in out
    assert main(["compare", str(store), "--reference", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowsim: error: reference: 'nope'") and "\n" not in err
