"""The Python API mirrors the command line: bundled scenario names resolve from any directory, ``import flowsim``
gives the plot functions, and a plot that needs a comparison computes it."""
import subprocess
import sys

import flowsim


def test_a_bundled_scenario_name_runs_from_any_directory_and_flowsim_plot_needs_no_import(tmp_path):
    code = ("import flowsim; ds = flowsim.run('quickstart', steps=3, device='cpu', progress=False); "
            "print(list(ds.run.values), ds.sizes['step'], callable(flowsim.plot.sharpness))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['gd-stable', 'gd-eos'] 4 True"


def test_gaps_of_an_opened_store_compares_it_first(tmp_path):
    doc = {"problem": {"model": "quadratic", "spectrum": [4.0, 1.0]}, "steps": 5, "device": "cpu",
           "runs": {"a": {"lr": 0.1}, "b": {"lr": 0.2}}, "record": {"projection_dim": 2, "projection_every": 1}}
    flowsim.run(doc, tmp_path / "s.zarr", progress=False)
    ds = flowsim.open(tmp_path / "s.zarr")
    assert "distance" not in ds
    fig = flowsim.plot.gaps(ds, reference="a")
    assert len(fig.axes) >= 1 and fig.axes[0].lines  # b's distance to a, drawn


def test_a_name_that_is_neither_a_file_nor_a_bundled_scenario_is_one_line(tmp_path, capsys):
    from flowsim.cli import main
    assert main(["run", "no-such-scenario", "-o", str(tmp_path / "s.zarr"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flowsim: error: scenario: no file or bundled scenario named 'no-such-scenario' (see flowsim list)"
    assert not (tmp_path / "s.zarr").exists()
