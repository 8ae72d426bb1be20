"""The code's shape, checked: no module outside the registries tests a rule's or a process's name (what a rule or a
process is, it declares itself, so that a new one needs no edit elsewhere)."""
import ast
from pathlib import Path

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
