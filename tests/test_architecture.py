"""The code's shape, checked: the three folders import in one direction (models/ under solvers/ under flowsim/), and
no module outside the registries tests a rule's or a process's name (what a rule or a process is, it declares
itself, so that a new one needs no edit elsewhere)."""
import ast
from pathlib import Path

import pytest

from flowsim.solvers import PROCESSES, RULES

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flowsim", "solvers", "models")
REGISTRIES = {ROOT / "solvers" / "__init__.py", ROOT / "solvers" / "rules" / "__init__.py"}
NAMES = set(RULES) | set(PROCESSES)


def _named(node) -> set:
    """The rule or process names a node spells as string constants (itself, or the items of a tuple/list/set)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {i.value for i in items if isinstance(i, ast.Constant) and i.value in NAMES}


def name_tests(path: Path, root: Path = ROOT) -> list[str]:
    """Comparisons with a rule or process name, and dicts keyed by such names only (a table of facts kept outside
    the rules: ``{"gd": 1.5}``), in the module at ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            names = set().union(*(_named(n) for n in [node.left, *node.comparators]))
        elif isinstance(node, ast.Dict) and node.keys and all(k is not None and _named(k) for k in node.keys):
            names = set().union(*(_named(k) for k in node.keys))
        else:
            continue
        if names:
            found.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)[:80]}")
    return found


def test_no_name_test_on_a_rule_or_process_outside_the_registries():
    modules = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py")) if p not in REGISTRIES]
    assert len(modules) > 40
    assert [hit for path in modules for hit in name_tests(path)] == []


def test_the_scan_sees_each_form_of_name_test(tmp_path):
    """The scan itself: a comparison, a membership test and a dict keyed by names are each caught."""
    module = tmp_path / "m.py"
    module.write_text('a = rule.name == "gd"\nb = process in ("discrete", "sde")\nc = {"adam": 0.5}\n'
                      'd = spec.name == "digits"\n')
    assert [hit.split()[0] for hit in name_tests(module, tmp_path)] == ["m.py:1", "m.py:2", "m.py:3"]


LAYERS = {"models": 0, "solvers": 1, "flowsim": 2}
"""Each folder's height: a module may import its own folder's modules and those of lower folders."""


def layer_of(module: str) -> int:
    """The height of an imported module of the package (flowsim.models.* the floor, flowsim.solvers.* the middle,
    the rest of flowsim the roof)."""
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 and parts[1] in ("models", "solvers") else LAYERS["flowsim"]


def upward_imports(path: Path, height: int, root: Path = ROOT) -> list[str]:
    """The imports of the module at ``path`` (in its folder of ``height``) of a higher folder, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        found += [f"{path.relative_to(root)}:{node.lineno} imports {name}" for name in names
                  if name.split(".")[0] == "flowsim" and layer_of(name) > height]
    return found


def test_no_module_imports_a_higher_folder():
    modules = [(p, height) for folder, height in LAYERS.items() for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(modules) > 40
    assert [hit for path, height in modules for hit in upward_imports(path, height)] == []


def test_the_import_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import flowsim.models.problem\nfrom flowsim.solvers import Rule\n"
                      "def f():\n    from flowsim.store import open\n    import flowsim\n")
    assert [hit.split()[0] for hit in upward_imports(module, LAYERS["models"], tmp_path)] == ["m.py:2", "m.py:4",
                                                                                                "m.py:5"]
    assert [hit.split()[0] for hit in upward_imports(module, LAYERS["solvers"], tmp_path)] == ["m.py:4", "m.py:5"]


def test_each_recorded_variable_has_one_owner():
    """Every run's variables, each process's and each probe's are disjoint tables (the flows share one), and
    ``declared`` refuses a name declared twice."""
    from flowsim import record
    from flowsim.solvers.processes import RUN_VARIABLES, Variable
    probes = [cls for cls in vars(record).values() if isinstance(cls, type) and issubclass(cls, record.Probe)]
    tables = {id(t): t for t in [RUN_VARIABLES, *(p.variables for p in PROCESSES.values()),
                                 *(p.variables for p in probes)]}
    union = record.declared(*tables.values())
    assert {"loss", "step_size", "sigma_eigs", "w_proj", "w", "sharpness", "batch_sharpness"} <= set(union)
    assert all(isinstance(v, Variable) and v.units and v.long_name for v in union.values())
    with pytest.raises(ValueError, match="^recorded variable 'loss' is declared twice$"):
        record.declared(RUN_VARIABLES, {"loss": RUN_VARIABLES["loss"]})

