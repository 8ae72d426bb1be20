"""The command line: bad scenarios exit 2 with one line naming the key and write no store; list/info/run work."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import flowsim
from flowsim.cli import main
from flowsim.scenario import bundled as bundled_scenarios

GOOD = {"name": "t", "device": "cpu", "steps": 3,
        "problem": {"model": "mlp", "widths": [4], "dataset": "digits", "n_train": 30},
        "runs": {"gd": {"process": "discrete", "rule": "gd", "lr": 0.1}}}


def with_(path, value, doc=None):
    """GOOD with the dotted key ``path`` set to ``value`` (``...`` deletes it)."""
    doc = yaml.safe_load(yaml.safe_dump(doc or GOOD))
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return doc


BAD = [  # (scenario document or raw text, text the one-line error must contain)
    ("name: t\nsteps: [1, 2\n", "not valid YAML"),
    (with_("stepz", 3), "stepz: unknown key"),
    (with_("steps", "many"), "steps:"),
    (with_("steps", ...), "steps: required key is missing"),
    (with_("runs.gd.lr", -0.1), "runs.gd.lr:"),
    (with_("runs.gd.batch_size", 31), "runs.gd.batch_size:"),
    (with_("runs.gd.rule", "magic"), "runs.gd.rule: unknown rule"),
    (with_("runs.gd.process", "magic"), "runs.gd.process:"),
    (with_("runs.gd.beta2", 0.9), "runs.gd.beta2: not a hyperparameter of rule 'gd'"),
    (with_("runs.gd.rule", "adam", with_("runs.gd.beta1", 1.5)), "runs.gd.beta1:"),
    (with_("problem.model", "resnet9000"), "problem.model"),
    (with_("problem.activation", "sigmoidish"), "problem.activation:"),
    (with_("problem.dataset", {"path": "/nonexistent/data.npz"}), "problem.dataset.path: file not found"),
    (with_("problem.init", {"path": "/nonexistent/w0.npy"}), "problem.init.path: file not found"),
    (with_("problem.init", [1.0, 2.0]), "problem.init: has 2 values"),
    (with_("problem.classes", [0, 11]), "problem.classes:"),
    (with_("problem.classes", [3, 5, 3]), "problem.classes: [3] listed more than once"),
    (with_("problem.n_train", 5000), "problem.n_train:"),
    (with_("compare", {"reference": "nope"}), "compare.reference:"),
    (with_("runs", {}), "runs:"),
    (with_("dtype", "float16"), "dtype:"),
    (with_("device", "tpu"), "device:"),
    (with_("runs.gd.step_size", {"drop": {"at": 10, "lr_after": 0.01}}), "runs.gd.step_size.drop.at:"),
    (with_("record", {"every": 0}), "record.every:"),
    (with_("runs.gd.process", "central", with_("runs.gd.batch_size", 10)), "runs.gd.batch_size: does not apply to "
     "the central process"),
]


@pytest.mark.parametrize("doc,expected", BAD, ids=[e for _, e in BAD])
def test_bad_scenario_exits_2_with_one_line_naming_the_key_and_writes_no_store(tmp_path, capsys, doc, expected):
    path, store = tmp_path / "bad.yaml", tmp_path / "out.zarr"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    assert main(["run", str(path), "-o", str(store), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowsim: error: ") and "\n" not in err, err
    assert expected in err, err
    assert not store.exists()


_X = np.random.default_rng(0).normal(size=(30, 4))
_LABELS = (_X[:, 0] > 0).astype(np.int64)
BAD_DATA = [  # (loss, X, Y, text the one-line error must contain)
    ("ce", _X, np.where(_LABELS, "yes", "no"), "Y in {} holds <U3 values, not numbers; save class labels as integers"),
    ("mse", np.where(np.arange(30)[:, None] == 3, np.nan, _X), _X[:, :2], "X in {} has NaN or inf values in 1 row(s), "
     "the first at row 3"),
    ("mse", _X, np.where(np.arange(30)[:, None] >= 28, np.inf, _X[:, :2]), "Y in {} has NaN or inf values in 2 row(s)"),
    ("ce", _X, _LABELS - 1, "Y in {} has negative class labels (the least is -1)"),  # np.eye(C)[-1] would wrap
    ("ce", _X, _LABELS.astype(float), "targets are float64 of shape (30,): save Y as integers: Y.astype(int)"),
    ("ce", _X, np.eye(2)[_LABELS], "targets are float64 of shape (30, 2): save Y as integers: Y.argmax(1) of one-hot"),
    ("ce", _X, _LABELS[:, None], "targets are a column, shape (30, 1): save Y.ravel().astype(int)"),  # it said
    # 'float64 ...: Y.argmax(1) of one-hot rows', of int labels, and argmax(1) makes every label 0
]


@pytest.mark.parametrize("loss,X,Y,expected", BAD_DATA, ids=[e[:28] for *_, e in BAD_DATA])
def test_a_data_file_flowsim_cannot_train_on_exits_2_with_one_line(tmp_path, capsys, loss, X, Y, expected):
    np.savez(tmp_path / "d.npz", X=X, Y=Y)
    doc = with_("problem", {"model": "mlp", "widths": [3], "loss": loss, "dataset": {"path": "d.npz"}})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    assert main(["run", str(tmp_path / "s.yaml"), "-o", str(tmp_path / "o.zarr"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowsim: error: problem.") and "\n" not in err, err
    assert expected.format(tmp_path / "d.npz") in err, err
    assert not (tmp_path / "o.zarr").exists()


BAD_FILES = [  # (key, file name, writer, text the one-line error must contain)
    ("dataset", "d.csv", lambda f: np.savetxt(f, np.c_[_X, _LABELS], delimiter=","),
     "problem.dataset.path: {} is not an .npz archive; save the arrays with np.savez"),  # 'pickled (object) data'
    ("dataset", "d.npy", lambda f: np.save(f, _X), "is not an .npz archive"),  # a TypeError traceback
    ("dataset", "d.npz", lambda f: np.savez(f, X=_X, Y=np.array(["a", "b"] * 15, dtype=object)),
     "problem.dataset.path: {} holds Python objects (an object array)"),  # 'Object arrays cannot be loaded'
    ("init", "w.npz", lambda f: np.savez(f, w=np.zeros(3)),
     "problem.init.path: {} is an .npz archive, not one array"),  # an AttributeError traceback
    ("init", "w.csv", lambda f: np.savetxt(f, np.zeros(3)), "problem.init.path: {} is not a .npy file"),
    # torch.save writes a zip archive that np.load opens as an .npz of other names
    ("init", "w.pt", lambda f: torch.save(torch.zeros(3), f),
     "problem.init.path: {} is a torch.save file, not a numpy array; save the flat weights with np.save"),
    ("dataset", "d.pt", lambda f: torch.save({"X": torch.from_numpy(_X), "Y": torch.from_numpy(_LABELS)}, f),
     "problem.dataset.path: {} is a torch.save file, not an .npz archive; save the arrays with np.savez(path, "
     "X=X.numpy(), Y=Y.numpy())"),  # it read 'lacks array(s) ['X', 'Y']
    ("init", "w.npy", lambda f: np.save(f, np.array(["a", "b", "c"])), "problem.init.path: {} holds <U1 values"),
    ("init", "w.npy", lambda f: np.save(f, np.array([np.nan, 1.0, 2.0])),
     "problem.init: 1 of its values are NaN or inf"),  # the run went on from NaN
]


@pytest.mark.parametrize("key,name,write,expected", BAD_FILES, ids=[f"{k}-{n}-{e[-12:]}" for k, n, _, e in BAD_FILES])
def test_a_file_that_is_not_what_its_key_reads_exits_2_with_one_line(tmp_path, capsys, key, name, write, expected):
    write(tmp_path / name)
    problem = ({"model": "mlp", "widths": [3], "loss": "ce", "dataset": {"path": name}} if key == "dataset" else
               {"model": "quadratic", "spectrum": [1.0, 2.0, 3.0], "init": {"path": name}})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(with_("problem", problem)))
    assert main(["run", str(tmp_path / "s.yaml"), "-o", str(tmp_path / "o.zarr"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowsim: error: problem.") and "\n" not in err, err
    assert expected.format(tmp_path / name) in err, err
    assert not (tmp_path / "o.zarr").exists()


def test_the_real_command_exits_2_without_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_("runs.gd.lr", -1)))
    proc = subprocess.run([sys.executable, "-m", "flowsim.cli", "run", str(path), "-o", str(tmp_path / "o.zarr")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["flowsim: error: runs.gd.lr: Input should be greater than 0"]


def test_python_dash_m_flowsim_is_the_command_and_says_its_version():
    from flowsim import __version__
    proc = subprocess.run([sys.executable, "-m", "flowsim", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"flowsim {__version__}"
    proc = subprocess.run([sys.executable, "-m", "flowsim", "run"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("error: the following arguments are required: "
                                                                 "scenario")


def test_an_existing_store_is_not_overwritten_without_the_flag(tmp_path, capsys):
    path, store = tmp_path / "good.yaml", tmp_path / "out.zarr"
    path.write_text(yaml.safe_dump(GOOD))
    assert main(["run", str(path), "-o", str(store), "-q"]) == 0
    before = flowsim.open(store).loss.values.copy()
    assert main(["run", str(path), "-o", str(store), "-q", "--steps", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    np.testing.assert_array_equal(flowsim.open(store).loss.values, before)
    assert main(["run", str(path), "-o", str(store), "-q", "--steps", "2", "--overwrite"]) == 0
    assert flowsim.open(store).sizes["step"] == 3


def test_a_folder_that_is_not_a_store_is_never_emptied(tmp_path, capsys):
    """`-o` naming a user's folder, or a zarr store flowsim did not write: the run is refused in one line with or
    without --overwrite or --resume, and every file in it stays (create emptied the folder before writing)."""
    import xarray as xr
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    folder, foreign = tmp_path / "my-data", tmp_path / "theirs.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept")
    xr.Dataset({"a": ("x", np.arange(3.0))}).to_zarr(foreign, zarr_format=3)
    for target, why in ((folder, "it holds notes.txt"), (foreign, "it holds a")):
        before = sorted(p.relative_to(target) for p in target.rglob("*"))
        for flags in ([], ["--overwrite"], ["--resume"]):
            assert main(["run", str(path), "-o", str(target), "-q", *flags]) == 2
            assert capsys.readouterr().err.strip() == (f"flowsim: error: store {target}: the folder exists and is "
                                                       f"not a flowsim store ({why}); give a new path (nothing was "
                                                       "removed)")
        assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert (folder / "notes.txt").read_text() == "kept"
    np.testing.assert_array_equal(xr.open_zarr(foreign).a.values, np.arange(3.0))
    with pytest.raises(FileNotFoundError, match=rf"^{foreign} is not a flowsim store \(it holds a\)$"):
        flowsim.open(foreign)
    (foreign / "a").rename(tmp_path / "a")  # its zarr.json alone: attributes flowsim did not write
    xr.Dataset(attrs={"owner": "someone"}).to_zarr(tmp_path / "attrs.zarr", zarr_format=3)
    with pytest.raises(FileNotFoundError, match=r"is not a flowsim store \(a zarr store that flowsim did not write\)$"):
        flowsim.open(tmp_path / "attrs.zarr")
    # what a desktop's file browser leaves in a store it showed does not make the store foreign
    assert main(["run", str(path), "-o", str(tmp_path / "mine.zarr"), "-q"]) == 0
    (tmp_path / "mine.zarr" / ".DS_Store").write_bytes(b"\0")
    assert flowsim.open(tmp_path / "mine.zarr").sizes["run"] == len(GOOD["runs"])
    assert main(["run", str(path), "-o", str(tmp_path / "mine.zarr"), "-q", "--overwrite"]) == 0


def test_steps_override_and_summary_table(tmp_path, capsys):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert main(["run", str(path), "-o", str(tmp_path / "o.zarr"), "-q", "--steps", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "final loss" in out and "gd" in out
    assert flowsim.open(tmp_path / "o.zarr").sizes["step"] == 5


def test_summary_table_of_a_run_that_diverged_before_recording_a_loss(tmp_path, capsys):
    """A central flow that does not exist (quadratic above the edge) diverges at step 0 with no loss recorded:
    the command still exits 0 and its table says so."""
    path = tmp_path / "no-central.yaml"
    path.write_text(yaml.safe_dump({"name": "no-central", "steps": 3, "problem": {"model": "quadratic",
                                    "spectrum": [3.0, 1.0]}, "runs": {"c": {"process": "central", "lr": 1.0}}}))
    with pytest.warns(UserWarning, match="recorded as diverged"):
        assert main(["run", str(path), "-o", str(tmp_path / "o.zarr"), "-q"]) == 0
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row[:6] == ["c", "central", "gd", "1", "nan", "0"]


def test_tables_stay_aligned_with_long_names(tmp_path, capsys):
    """Every column of the run table and of `flowsim list` starts at the same offset on every line, however long
    the names (a sweep's run names are long)."""
    long = "gd-at-a-step-size-of-one-tenth-on-thirty-digits"
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "runs": {long: {"lr": 0.1}, "gd": {"lr": 0.2}}}))
    assert main(["run", str(path), "-o", str(tmp_path / "o.zarr"), "-q", "--steps", "2", "--device", "cpu"]) == 0
    main(["list"])
    run_table, listing = capsys.readouterr().out.split("stored in")
    for table, first_data_column in ((run_table, "process"), (listing.split("\n", 1)[1], "model")):
        lines = [line for line in table.strip().splitlines() if not line.startswith("-")]
        offset = lines[0].index(first_data_column)
        assert all(line[offset - 2:offset] == "  " and line[offset] != " " for line in lines), table


def test_list_shows_the_bundled_scenarios_and_info_the_versions(capsys):
    assert "quickstart" in bundled_scenarios()
    assert main(["list"]) == 0
    assert "quickstart" in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "flowsim" in out and "torch" in out and "device" in out


def test_quickstart_reaches_the_edge_of_stability_at_the_larger_step_size():
    """The quickstart's claim at 500 steps: η = 0.1 stays stable, η = 0.4 sharpens to 2/η and stays there."""
    ds = flowsim.run(bundled_scenarios()["quickstart"], steps=500, device="cpu", progress=False)
    assert not ds.diverged.any()
    assert np.all(np.diff(ds.loss.sel(run="gd-stable").values) < 0)  # stable: monotone decrease
    stable = ds.sharpness.sel(run="gd-stable").dropna("step")
    assert float(stable.max()) < 0.5 * 2 / 0.1
    eos = ds.sharpness.sel(run="gd-eos").dropna("step")
    assert 0.95 * 5 <= float(eos[int(0.7 * eos.size):].median()) <= 1.10 * 5  # 2/η = 5
    loss = ds.loss.sel(run="gd-eos").values
    assert np.any(np.diff(loss[300:]) > 0) and loss[-1] < loss[0]  # non-monotone, yet decreasing


def test_steps_shorter_than_a_drop_runs_without_it_and_warns_in_one_line(tmp_path):
    """A preview of a scenario with a step-size drop (eos-lr-drop drops at step 1000): it runs, every step at the
    first step size, with one warning line on stderr (the real command); a scenario file itself still may not
    drop after its last step."""
    store = tmp_path / "preview.zarr"
    proc = subprocess.run([sys.executable, "-m", "flowsim.cli", "run", "eos-lr-drop", "-o", str(store), "-q",
                           "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowsim: warning: ")
    assert "runs.gd-drop.step_size.drop.at: 1000 is after the last step 3: the drop is not reached" in lines[0]
    ds = flowsim.open(store).sel(run="gd-drop")
    assert (ds.step_size.sel(step=slice(0, 2)).values == 0.7).all() and ds.policy.item() == "drop"


def test_relative_paths_in_a_scenario_file_are_taken_from_its_folder(tmp_path, monkeypatch):
    """A scenario file's relative dataset.path and init.path name files beside it, from any working directory
    (the stored scenario names them absolutely, so compare finds them too); a dict's are the working directory's."""
    from flowsim.models import build_problem
    study, elsewhere = tmp_path / "study", tmp_path / "elsewhere"
    (study / "data").mkdir(parents=True)
    elsewhere.mkdir()
    rng = np.random.default_rng(0)
    np.savez(study / "data" / "d.npz", X=rng.normal(size=(20, 3)), Y=rng.integers(0, 2, 20))
    problem = {"model": "mlp", "widths": [2], "loss": "ce", "dataset": {"path": "data/d.npz"}}
    n = build_problem({**problem, "dataset": {"path": str(study / "data" / "d.npz")}}, device="cpu").n_params
    np.save(study / "w0.npy", np.linspace(-1, 1, n))
    doc = {**GOOD, "problem": {**problem, "init": {"path": "w0.npy"}},
           "record": {"projection_dim": 2, "keep_weights": 3}}
    (study / "s.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(study / "s.yaml"), "-o", "o.zarr", "-q"]) == 0
    assert main(["compare", "o.zarr"]) == 0  # function distances: the problem is rebuilt from the stored scenario
    stored = flowsim.load_scenario(flowsim.open("o.zarr").attrs["scenario"]).problem
    assert stored.dataset.path == study / "data" / "d.npz" and stored.init.path == study / "w0.npy"
    (study / "sweep.yaml").write_text(yaml.safe_dump({**doc, "sweep": {"problem.init.path": ["w0.npy", "/w1.npy"]}}))
    swept = flowsim.load_scenario(study / "sweep.yaml").sweep["problem.init.path"]
    assert swept == [str(study / "w0.npy"), "/w1.npy"]  # swept paths too; absolute ones as they are
    with pytest.raises(flowsim.ScenarioError, match="problem.dataset.path: file not found: data/d.npz"):
        flowsim.run(doc, progress=False)
    monkeypatch.chdir(study)
    expected = flowsim.open(elsewhere / "o.zarr").loss.values
    assert flowsim.run(doc, progress=False).loss.values.tobytes() == expected.tobytes()


def test_progress_reaches_a_non_terminal_as_plain_lines_and_a_short_run_prints_none(monkeypatch, capsys):
    """Where stderr is not a terminal (here: captured) a run prints a plain line at most every PROGRESS_SECONDS
    (none for a run shorter than that); with the interval at 0, one per recorded step."""
    import re
    from flowsim import runner
    doc = {**GOOD, "steps": 6, "runs": {"gd": {"lr": 0.1}, "gd2": {"lr": 0.2}}}
    flowsim.run(doc)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(runner, "PROGRESS_SECONDS", 0.0)
    flowsim.run(doc)
    lines = capsys.readouterr().err.splitlines()
    assert [re.fullmatch(r"flowsim: (gd2?): step (\d)/6 \(\d+%\), \d+ s, about \d+ s left", line).groups()
            for line in lines] == [(run, str(k)) for run in ("gd", "gd2") for k in range(7)]
    flowsim.run(doc, progress=False)
    assert capsys.readouterr().err == ""
