"""Scenario errors: unknown keys get a 'did you mean', several errors are all reported in document order, YAML
errors name the line of the bad text; docs/scenario-reference.md is generated from the schema."""
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

import flowsim
from flowsim.cli import main
from flowsim.models import CONFIGS
from flowsim.models.base import InitFile
from flowsim.models.datasets import DatasetSpec
from flowsim.scenario import CompareSpec, RecordSpec, RunSpec, Scenario, ScenarioError, load
from flowsim.scenario_reference import REGENERATE, reference_markdown
from flowsim.solvers import POLICIES, PROCESSES, RULES
from flowsim.sweep import expand

BASE = "problem: {model: quadratic, spectrum: [1.0, 3.0]}\nsteps: 3\nruns: {gd: {lr: 0.1}}\n"
MLP = "problem: {model: mlp, widths: [3], dataset: digits, n_train: 12}\nsteps: 3\nruns: {gd: {lr: 0.1}}\n"


def error(text: str) -> str:
    with pytest.raises(ScenarioError) as e:
        load(text)
    return str(e.value)


@pytest.mark.parametrize("text,expected", [
    ("stepz: 3\n" + BASE, "stepz: unknown key (did you mean 'steps'?)"),
    (MLP.replace("widths", "widht"), "problem.widht: unknown key (did you mean 'widths'?)"),
    (MLP.replace("dataset: digits", "dataset: {nam: digits}"),
     "problem.dataset.nam: unknown key (did you mean 'name'?)"),
    (BASE.replace("lr: 0.1", "lr: 0.1, lrr: 0.2"), "runs.gd.lrr: unknown key (did you mean 'lr'?)"),
    (BASE.replace("lr: 0.1", "lr: 0.1, rule: momentum, bta1: 0.5"),
     "runs.gd.bta1: unknown key (did you mean 'beta1'?)"),
    (BASE.replace("lr: 0.1", "lr: 0.1, process: stable, substep: 2"),
     "runs.gd.substep: unknown key (did you mean 'substeps'?)"),
    (BASE.replace("lr: 0.1", "step_size: {edge: {max_l: 1.0}}"),
     "runs.gd.step_size.edge.max_l: unknown key (did you mean 'max_lr'?)"),
    (BASE + "record: {evry: 2}\n", "record.evry: unknown key (did you mean 'every'?)"),
    (BASE.replace("lr: 0.1", "lr: 0.1, zzz: 1"), "runs.gd.zzz: unknown key"),
    # the suggestion comes from the keys of the model named, not of every model
    (BASE.replace("spectrum: [1.0, 3.0]", "spectrum: [1.0], widths: [3]"), "problem.widths: unknown key"),
    # a key of the mapping around it, or of a mapping beside it, is sent there
    (MLP.replace("dataset: digits, n_train: 12", "dataset: {name: digits, n_train: 12}"),
     "problem.dataset.n_train: unknown key (it belongs in problem: n_train: ...)"),
    (MLP.replace("dataset: digits", "dataset: gaussian_mixture, size: 50"),
     "problem.size: unknown key (it belongs in problem.dataset: {size: ...})"),
    # a model written as a mapping, as other configuration systems nest it
    (MLP.replace("model: mlp, widths: [3]", "model: {name: mlp, widths: [3]}"),
     "problem.model: a model's name, with its options beside it in problem (problem: {model: mlp, widths: [32], "
     "dataset: digits}), got a mapping"),
])
def test_an_unknown_key_gets_the_closest_allowed_key_as_a_suggestion(text, expected):
    assert error(text) == expected


@pytest.mark.parametrize("sweep,expected", [
    ("{problm.n_train: [3]}", "sweep.problm.n_train: 'problm' is not a scenario key (did you mean 'problem'?)"),
    ("{recrd.every: [2]}", "sweep.recrd.every: 'recrd' is not a scenario key (did you mean 'record'?)"),
    ("{nothing.lr: [0.1]}", "sweep.nothing.lr: 'nothing' is not a scenario key"),
    ("{sweep.lr: [0.1]}", "sweep.sweep.lr: 'sweep' is not a scenario key"),
    # a key without a dot is a run key: it is checked, with its suggestion, as a key of every run
    ("{lrr: [0.1]}", "sweep point [lrr=0.1]: runs.gd.lrr: unknown key (did you mean 'lr'?)"),
    ("{runs.gd.lrr: [0.1]}", "sweep point [runs_gd_lrr=0.1]: runs.gd.lrr: unknown key (did you mean 'lr'?)"),
])
def test_an_unknown_sweep_key_gets_the_closest_key_as_a_suggestion(sweep, expected):
    with pytest.raises(ScenarioError) as e:
        expand(load(BASE + f"sweep: {sweep}\n"))
    assert str(e.value) == expected


@pytest.mark.parametrize("record,expected", [
    ("{precond: true}", "record.precond: does not apply without curvature_every (nothing would be recorded)"),
    ("{top_k: 3}", "record.top_k: does not apply without curvature_every"),
    ("{stochastic_edge: true}", "record.stochastic_edge: does not apply without curvature_every"),
    ("{curvature_every: 2, noise_kernel_examples: 8}", "record.noise_kernel_examples: does not apply without "
                                                       "noise_kernel"),
    ("{projection_dim: 0, projection_every: 5}", "record.projection_every: does not apply without projection_dim"),
])
def test_a_record_key_without_the_measurement_it_qualifies_is_an_error(record, expected):
    """These recorded nothing, silently, from a scenario and from flowsim.simulate alike. Turning a measurement off
    explicitly (precond: false) is no error."""
    assert error(BASE + f"record: {record}\n").startswith(expected)
    assert load(BASE + "record: {precond: false, curvature_every: 2, top_k: 2}\n").record.top_k == 2
    problem = load(BASE).problem.build(device="cpu")
    with pytest.raises(ScenarioError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        flowsim.simulate(problem, "gd", "discrete", 0.1, 2, record=yaml.safe_load(record))


def test_the_command_line_reports_the_suggestion_in_one_line(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text(BASE.replace("lr: 0.1", "lrr: 0.1"))
    assert main(["run", str(path), "-o", str(tmp_path / "out.zarr"), "-q"]) == 2
    assert capsys.readouterr().err == "flowsim: error: runs.gd.lrr: unknown key (did you mean 'lr'?)\n"


STEPS_TEN = "steps: Input should be a valid integer, unable to parse string as an integer"


def test_a_type_error_is_reported_beside_an_earlier_error():
    text = BASE.replace("spectrum: [1.0, 3.0]", "spectrum: [1.0], spectrumm: [2.0]").replace("steps: 3", "steps: ten")
    assert error(text) == f"problem.spectrumm: unknown key (did you mean 'spectrum'?); {STEPS_TEN}"


def test_several_errors_are_reported_in_document_order():
    text = "runs: {gd: {lrr: 0.1}}\nsteps: ten\nproblem: {model: quadratic, spectrum: [1.0]}\nrecord: {evry: 2}\n"
    assert error(text) == ("runs.gd.lrr: unknown key (did you mean 'lr'?); " + STEPS_TEN
                           + "; record.evry: unknown key (did you mean 'every'?)")
    reordered = "record: {evry: 2}\nsteps: ten\nproblem: {model: quadratic, spectrum: [1.0]}\nruns: {gd: {lrr: 0.1}}\n"
    assert error(reordered) == ("record.evry: unknown key (did you mean 'every'?); " + STEPS_TEN
                                + "; runs.gd.lrr: unknown key (did you mean 'lr'?)")


def test_a_key_is_reported_once_even_where_several_types_were_tried():
    text = BASE.replace("lr: 0.1", "lr: 0.1, step_size: [1]")
    assert error(text) == "runs.gd.step_size: Input should be a valid string"


@pytest.mark.parametrize("text,where", [
    ("name: t\nsteps: [1, 2\n", "line 2, column 12"),  # noticed at the end of the text
    ("name: t\nsteps\nruns: {}\n", "line 2, column 5"),  # a key without ':', noticed on the next line
    ("name: t\n\tsteps: 3\n", "line 2, column 1"),  # the bad character itself
    ("runs:\n  gd:\n    lr: 0.1\n   rule: gd\n", "line 4, column 4"),  # a bad indentation
])
def test_a_yaml_error_names_the_line_of_the_bad_text(text, where):
    assert error(text).startswith(f"scenario is not valid YAML at {where}: ")


@pytest.mark.parametrize("name,expected", [
    ("a/b", "may only use letters, digits, '_', '-' and '.', and starts with a letter, a digit or '_'"),
    ("..", "may only use letters, digits, '_', '-' and '.', and starts with a letter, a digit or '_'"),
    (".hidden", "may only use letters, digits, '_', '-' and '.', and starts with a letter, a digit or '_'"),
    ("zarr.json", "is the name of the store's own metadata file"),
])
def test_a_run_name_that_is_no_group_folder_is_refused_before_anything_is_written(name, expected, tmp_path):
    """A run's name is its group's folder: '..' and 'zarr.json' passed, and failed in zarr after the store was
    created (an existing one replaced by an empty store)."""
    assert error(BASE.replace("runs: {gd:", f"runs: {{'{name}':")) == f"runs: run name {name!r} {expected}"
    path = tmp_path / "s.yaml"
    path.write_text(BASE.replace("runs: {gd:", f"runs: {{'{name}':"))
    assert main(["run", str(path), "-o", str(tmp_path / "o.zarr"), "-q"]) == 2
    assert not (tmp_path / "o.zarr").exists()


def test_numbers_in_exponent_notation_are_numbers_as_in_yaml_1_2():
    """PyYAML reads 1e4 and 1e-3 (no dot) as text: steps: 1e4 was refused as not an integer."""
    sc = load(BASE.replace("steps: 3", "steps: 1e2").replace("lr: 0.1", "lr: 1e-3") + "record: {every: 1E1}\n"
              "sweep: {lr: [2e-3, 5.0e-3]}\n")
    assert (sc.steps, sc.runs["gd"].lr, sc.record.every, sc.sweep["lr"]) == (100, 1e-3, 10, [2e-3, 5e-3])
    assert error(BASE.replace("steps: 3", "steps: 2.5e0")) == ("steps: Input should be a valid integer, got a "
                                                               "number with a fractional part")
    assert load(BASE.replace("lr: 0.1", "lr: 0.1, rule: gd") + "name: 1e\n").name == "1e"  # text stays text


def test_the_reference_is_generated_from_the_schema():
    committed = Path(__file__).parents[1] / "docs" / "scenario-reference.md"
    assert committed.read_text() == reference_markdown(), f"docs/scenario-reference.md is stale: run {REGENERATE}"


def test_every_scenario_key_has_a_description():
    models = [Scenario, RunSpec, RecordSpec, CompareSpec, *(p.Options for p in PROCESSES.values()), *POLICIES.values(),
              *CONFIGS, DatasetSpec, InitFile]
    missing = [f"{m.__name__}.{key}" for m in models for key, f in m.model_fields.items()
               if not f.description and not (m in POLICIES.values() and key == "lr")]  # a policy's lr is the run's
    missing += [f"{rule.__name__}.{f.name}" for rule in RULES.values() for f in fields(rule)
                if not f.metadata.get("description")]
    assert not missing


def test_no_key_of_the_reference_has_a_blank_description():
    rows = [line for line in reference_markdown().splitlines() if line.startswith("| `")]
    assert rows and not [row for row in rows if row.endswith("|  |")]
