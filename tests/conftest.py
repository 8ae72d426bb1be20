"""Every test runs on one CPU thread, in this process and in the processes it starts (OMP_NUM_THREADS=1). Why: on
a 2-core machine that is busy with another job, torch's OpenMP threads wait on each other (the golden run of
tests/test_central_generic.py, at load 6-8: 70 s on one thread, 808 s on two, with ten times the CPU time), and
one thread fixes the order of floating-point reductions, so a test's numbers do not depend on the machine's core
count."""
import os
import time

THREADS = 1
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = str(THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)
_CPU: dict[str, tuple[float, float]] = {}  # nodeid -> (wall s, CPU s of this process, all its threads)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Each test starts on the suite's thread count (a test that changes it does not change it for the next)."""
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture
def tiny_mlp_problem():
    """A small float64 MLP on 60 digits (4 classes) — small enough for dense Hessians."""
    from flowsim.models import build_problem
    return build_problem({"model": "mlp", "widths": [6, 5], "activation": "tanh", "dataset": "digits",
                          "classes": [0, 1, 2, 3], "n_train": 60, "loss": "mse"}, dtype="float64", device="cpu")


def _load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def pytest_report_header(config):
    """The conditions a duration was measured under: cores, torch's threads and how busy the machine is."""
    return f"cpus: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, {_load()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    _CPU[item.nodeid] = (time.perf_counter() - wall, time.process_time() - cpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Beside --durations (wall time, which a busy machine stretches): each slowest test's CPU time, which it
    does not, so a run on a loaded machine still tells what a quiet one would take (setup and teardown
    included; a subprocess's CPU is not counted)."""
    n = config.getoption("durations", None)
    if not n or not _CPU:
        return
    terminalreporter.write_sep("=", f"slowest {n} by CPU time of the test process (wall / CPU), {_load()}")
    for nodeid, (wall, cpu) in sorted(_CPU.items(), key=lambda kv: -kv[1][1])[:n]:
        terminalreporter.write_line(f"{wall:8.1f}s {cpu:8.1f}s  {nodeid}")
