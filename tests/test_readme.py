"""The README teaches what runs: its quickstart YAML is the bundled file, and its tour — every ```python and
```sh block, in order — runs as written from a directory outside the clone. The first setup command installs
flowsim as a package (not editable), which a folder named ``flowsim`` beside the script cannot shadow."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_the_quickstart_shown_is_the_bundled_one():
    assert blocks("yaml")[0] == (ROOT / "scenarios" / "quickstart.yaml").read_text()


def test_the_tour_runs_as_written_from_outside_the_clone(tmp_path):
    python, shell = blocks("python"), blocks("sh")
    assert len(python) >= 4 and shell
    script = tmp_path / "tour.py"
    script.write_text("\n".join(python))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    median = float(re.search(r"η·λ_max/2 over the last 300 steps = ([0-9.]+)", done.stdout).group(1))
    assert 0.95 < median < 1.1, done.stdout  # the quickstart's claim: GD at η = 0.4 sits at its edge
    for name in ("quickstart-sharpness.png", "quickstart-loss.png", "quickstart.html"):
        assert (tmp_path / name).stat().st_size > 1000, name
    for line in "\n".join(shell).splitlines():
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (line, done.stderr[-3000:])


def test_setup_commands_are_the_documented_ones():
    """The user's command installs the package, the developer's the editable checkout and runs the suite."""
    user, developer = re.findall(r"^    (python -m venv .*)$", README, flags=re.M)[:2]
    assert "pip install . &&" in user and "flowsim run quickstart" in user
    assert 'pip install -e ".[test,dist,bench]"' in developer and developer.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()  # CI installs the same extras and runs the same test command
    assert '-e ".[test,dist,bench]"' in ci and "\npython -m pytest -q\n" in ci


@pytest.mark.skipif(shutil.which("pip") is None and shutil.which("pip3") is None, reason="needs pip")
def test_an_installed_flowsim_is_not_shadowed_by_a_folder_named_flowsim(tmp_path):
    """A script in the folder that holds the clone (itself named flowsim, a namespace package to Python) imports
    the installed package: what `pip install .` gives, as in the README's first command."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("flowsim", "models", "solvers", "scenarios", "data"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    beside = tmp_path / "work"
    (beside / "flowsim").mkdir(parents=True)  # the clone, as seen from the folder that holds it
    done = subprocess.run([sys.executable, "-c", "import flowsim; flowsim.load_scenario('quickstart'); "
                           "print(flowsim.data.path('moons.npz').is_file())"],
                          cwd=beside, env={**ENV, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


def test_no_tracked_file_points_outside_the_repository():
    """The project carries its own docs: no file cites the workplace's design notes or a path above the clone."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    pattern = re.compile(r"THEORY\.md|DESIGN\.md|STYLE\.md|\.\./shared")
    cited = [f for f in files if f.endswith((".py", ".md", ".yaml", ".cfg", ".toml"))
             and pattern.search((ROOT / f).read_text(encoding="utf-8", errors="replace"))]
    assert cited == []
