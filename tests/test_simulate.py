"""The public loop without YAML (``flowsim.simulate``), and the same step-size policy driving every process."""
import numpy as np
import pytest
import torch

import zarr
import zarr.storage

import flowsim
import flowsim.runner
from flowsim.models.landscapes import QuadraticConfig
from flowsim.solvers import GD, PROCESSES, Adam, Drop, Edge

SPECTRUM = [4.0, 1.0, 0.25]
EXACT_EDGE = {"edge": {"c": 0.9, "early": False, "eig_tol": 1e-10, "max_products": None, "hvp": "reverse"}}


def test_simulate_equals_the_scenario_run_of_the_same_settings():
    problem = flowsim.models.build_problem({"model": "mlp", "widths": [8], "activation": "tanh", "dataset": "digits",
                                            "classes": [0, 1, 2], "n_train": 60, "loss": "mse"}, device="cpu")
    ds = flowsim.simulate(problem, "adam", "discrete", 0.01, 30, batch_size=16, seed=0, beta1=0.8,
                          record={"projection_dim": 0})
    doc = {"seed": 0, "device": "cpu", "steps": 30, "record": {"projection_dim": 0},
           "problem": {"model": "mlp", "widths": [8], "activation": "tanh", "dataset": "digits",
                       "classes": [0, 1, 2], "n_train": 60, "loss": "mse"},
           "runs": {"discrete": {"rule": "adam", "lr": 0.01, "batch_size": 16, "beta1": 0.8}}}
    reference = flowsim.run(doc, progress=False)
    assert ds.loss.values.tobytes() == reference.loss.values.tobytes()
    assert ds.step_size.values.tobytes() == reference.step_size.values.tobytes()
    assert ds.rule.item() == "adam" and ds.lr.item() == 0.01 and ds.policy.item() == "constant"
    # numpy scalars and one-element tensors, as a loop over np.logspace gives them: the same run (np.float32 η and
    # a tensor η were "step_size: Input should be a valid string"; np.int64 steps "must be a positive integer")
    for lr in (np.float64(0.01), torch.tensor(0.01, dtype=torch.float64)):
        same = flowsim.simulate(problem, "adam", "discrete", lr, np.int64(30), batch_size=np.int64(16),
                                seed=np.int64(0), beta1=0.8, record={"projection_dim": 0})
        assert same.loss.values.tobytes() == ds.loss.values.tobytes() and same.lr.item() == 0.01
    assert flowsim.simulate(problem, "gd", "discrete", np.float32(0.5), 2).lr.item() == float(np.float32(0.5))


def test_objects_run_as_the_scenario_does_in_memory_and_to_the_bit(tmp_path, monkeypatch):
    """A rule object and a policy object, with curvature recorded, equal flowsim.run of the same YAML-shaped
    scenario in every variable and coordinate to the bit (wall time aside); the result is built without zarr,
    and ``store=`` writes the same as a zarr store."""
    doc = {"seed": 3, "device": "cpu", "steps": 25, "record": {"projection_dim": 8, "curvature_every": 5},
           "problem": {"model": "mlp", "widths": [8], "activation": "tanh", "dataset": "digits",
                       "classes": [0, 1, 2], "n_train": 60, "loss": "mse"},
           "runs": {"discrete": {"rule": "adam", "beta1": 0.8, "step_size": {"edge": {"c": 0.4}}}}}
    reference = flowsim.run(doc, progress=False).drop_vars("wall_time")
    problem = flowsim.runner.build(flowsim.load_scenario(doc))
    args = (problem, Adam(beta1=0.8), "discrete", Edge(c=0.4), 25)
    kwargs = {"seed": 3, "record": flowsim.RecordSpec(projection_dim=8, curvature_every=5)}
    written = flowsim.simulate(*args, **kwargs, store=tmp_path / "s.zarr").drop_vars("wall_time")

    def no_zarr(*_, **__):
        raise AssertionError("simulate opened a zarr store")
    monkeypatch.setattr(zarr, "open_group", no_zarr)
    monkeypatch.setattr(zarr.storage, "MemoryStore", no_zarr)
    ds = flowsim.simulate(*args, **kwargs).drop_vars("wall_time")
    for other in (reference, written):
        assert set(ds.variables) == set(other.variables)
        for name in ds.variables:
            a, b = ds[name].values, other[name].values
            assert a.dtype == b.dtype, name
            assert a.tolist() == b.tolist() if a.dtype == object else a.tobytes() == b.tobytes(), name
    stamped = lambda attrs: {k: v for k, v in attrs.items() if k != "created"}  # noqa: E731
    assert stamped(ds.attrs) == stamped(written.attrs) and ds.attrs["n_params"] == reference.attrs["n_params"]
    with pytest.raises(flowsim.ScenarioError, match=r"^beta1: give the rule's hyperparameters in its object"):
        flowsim.simulate(problem, Adam(), "discrete", 0.01, 3, beta1=0.5)


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_a_process_options_object_runs_as_its_name_with_those_options(process):
    """Each process has its own options class, so an options object names its process; it runs as the name with
    the same options as a dict, to the bit."""
    assert len({cls.Options for cls in PROCESSES.values()}) == len(PROCESSES)
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    options = {"discrete": {}, "sde": {"noise": "isotropic", "sigma": 0.01}}.get(process, {"discrete_start": 1})
    obj = flowsim.simulate(problem, GD(), PROCESSES[process].Options(**options), 0.1, 4, record={"projection_dim": 0})
    named = flowsim.simulate(problem, "gd", process, 0.1, 4, options=options, record={"projection_dim": 0})
    assert obj.process.item() == process and obj.loss.values.tobytes() == named.loss.values.tobytes()
    with pytest.raises(flowsim.ScenarioError, match="^options: give the process's options in its object"):
        flowsim.simulate(problem, GD(), PROCESSES[process].Options(), 0.1, 4, options={"seed": 1})


def test_the_step_size_is_recorded_at_every_step_and_the_loss_at_its_cadence():
    """record.every = 4 over 10 steps of a drop from 0.2 to 0.05 at step 6: η is stored at every step (the
    schedule's own value; the final point takes no step), the loss at steps 0, 4, 8 and the last."""
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    ds = flowsim.simulate(problem, "gd", "discrete", Drop(lr=0.2, at=6, lr_after=0.05), 10,
                          record={"every": 4, "projection_dim": 0}).isel(run=0)
    assert ds.step.values.tolist() == list(range(11))
    assert ds.step_size.values[:10].tolist() == [0.2] * 6 + [0.05] * 4 and np.isnan(ds.step_size.values[10])
    assert np.flatnonzero(np.isfinite(ds.loss.values)).tolist() == [0, 4, 8, 10]


@pytest.mark.parametrize("process", ["discrete", "stable", "modified", "central"])
def test_the_edge_controller_drives_every_process_at_c_times_two_over_lambda_max(process):
    """On ½ Σ λ_i w_i² the Hessian is constant, so the controller (c = 0.9) sets η = 1.8/λ_max = 0.45 at every
    step of every process, and each process then equals its own run at the constant step size 0.45."""
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    options = {"substeps": 8} if process in ("stable", "modified", "central") else {}
    edge = flowsim.simulate(problem, "gd", process, EXACT_EDGE, 15, options=options, record={"projection_dim": 0,
                            "keep_weights": 15})
    fixed = flowsim.simulate(problem, "gd", process, 0.45, 15, options=options, record={"projection_dim": 0,
                             "keep_weights": 15})
    np.testing.assert_allclose(edge.step_size.values[0, :15], 0.45, rtol=1e-9)
    np.testing.assert_allclose(edge.w.values[0, -1], fixed.w.values[0, -1], rtol=1e-9, atol=1e-14)
    assert edge.policy.item() == "edge"


def test_simulate_names_a_bad_argument_in_one_line(tmp_path):
    problem = QuadraticConfig(spectrum=SPECTRUM).build(device="cpu")
    with pytest.raises(flowsim.ScenarioError, match=r"^lr: does not apply with step_size edge"):
        flowsim.simulate(problem, "gd", "discrete", "edge", 5, lr=0.1)
    with pytest.raises(flowsim.ScenarioError, match=r"^beta1: must be in \[0, 1\), got 1.5$"):
        flowsim.simulate(problem, "adam", "central", 0.1, 5, beta1=1.5)
    with pytest.raises(flowsim.ScenarioError, match=r"^process: unknown process 'ode'"):
        flowsim.simulate(problem, "gd", "ode", 0.1, 5)
    with pytest.raises(flowsim.ScenarioError, match=r"^record.curvature_evry: unknown key \(did you mean "
                                                    r"'curvature_every'\?\)$"):
        flowsim.simulate(problem, "gd", "discrete", 0.1, 5, record={"curvature_evry": 2})
    with pytest.raises(flowsim.ScenarioError, match=r"^lr: the step size is the argument step_size .*=0.01\)$"):
        flowsim.simulate(problem, "adam", steps=5, lr=0.01)  # it ran at the default step_size, 0.1, silently
    with pytest.raises(flowsim.ScenarioError, match=r"^batch_size: this problem has no data to batch \(a landscape\)$"):
        flowsim.simulate(problem, "gd", "discrete", 0.1, 5, batch_size=4)
    data = flowsim.Problem.from_module(torch.nn.Linear(3, 1), torch.randn(10, 3), torch.randn(10, 1), device="cpu")
    with pytest.raises(flowsim.ScenarioError, match=r"^batch_size: 11 is larger than the data \(10 examples\)$"):
        flowsim.simulate(data, "gd", "discrete", 0.1, 5, batch_size=11)  # it ran full batches, stored as 11
    with pytest.raises(flowsim.ScenarioError, match=r"^record.top_k: 5 is more than the 4 parameters$"):
        flowsim.simulate(data, "gd", "discrete", 0.1, 5, record={"top_k": 5, "curvature_every": 1})
    with pytest.raises(flowsim.ScenarioError, match=r"^seed: must be an integer, got 'a'$"):
        flowsim.simulate(data, "gd", "discrete", 0.1, 5, seed="a")
    with pytest.raises(flowsim.ScenarioError, match=r"^problem: must be a flowsim.Problem .*got Linear$"):
        flowsim.simulate(torch.nn.Linear(3, 1), "gd", "discrete", 0.1, 3)  # an AttributeError: no 'meta'
    stored = flowsim.simulate(data, "gd", "discrete", 0.1, 3, store=tmp_path / "s.zarr")
    with pytest.raises(flowsim.ScenarioError, match=r"^store: \S+s.zarr already exists; simulate writes a new store"):
        flowsim.simulate(data, "adam", "discrete", 0.1, 3, store=tmp_path / "s.zarr")  # it named --overwrite
    assert flowsim.open(tmp_path / "s.zarr").loss.equals(stored.loss)  # left as it was
    # a record key for a run or loss it does not apply to recorded nothing, silently (a scenario refused it)
    with pytest.raises(flowsim.ScenarioError, match=r"^record.stochastic_edge: needs a minibatch SGD run"):
        flowsim.simulate(data, "adam", "discrete", 0.1, 5, batch_size=4,
                         record={"stochastic_edge": True, "curvature_every": 1})
    labels = flowsim.Problem.from_module(torch.nn.Linear(3, 2), torch.randn(10, 3), torch.arange(10) % 2, loss="ce",
                                         device="cpu")
    with pytest.raises(flowsim.ScenarioError, match=r"^record.noise_kernel: .* with the mse loss$"):
        flowsim.simulate(labels, "gd", "discrete", 0.1, 5, batch_size=4,
                         record={"noise_kernel": True, "curvature_every": 1})
    assert torch.equal(problem.w0, QuadraticConfig(spectrum=SPECTRUM).build(device="cpu").w0)


def test_import_flowsim_imports_no_benchmark_code():
    """The engine stands apart from the lab: a fresh interpreter that imports flowsim (and its solvers) has no
    module of benchmarks/ loaded, and the installed package has no bench module."""
    import subprocess
    import sys
    code = ("import sys, flowsim, flowsim.solvers, flowsim.runner, flowsim.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('benchmarks', 'flowsim') and 'bench' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
