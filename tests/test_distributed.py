"""A sweep on a LocalCluster (2 single-threaded worker processes) gives the same dataset as in process."""
import numpy as np
import pytest

import flowsim
from flowsim import cli

distributed = pytest.importorskip("distributed")

SWEEP = {
    "name": "dist", "seed": 0, "device": "cpu", "dtype": "float64",
    "problem": {"model": "mlp", "widths": [4], "activation": "tanh", "dataset": "digits", "classes": [0, 1, 2],
                "n_train": 30, "loss": "mse"},
    "steps": 20,
    "runs": {"gd": {"lr": 0.1}, "sgd": {"lr": 0.1, "batch_size": 8}},
    "record": {"projection_dim": 2, "projection_every": 5, "chunk": 8},
    "sweep": {"lr": [0.05, 0.3], "seed": [0, 1]},
}


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def assert_same(a, b):
    assert list(a.run.values) == list(b.run.values)
    assert sorted(set(a.variables)) == sorted(set(b.variables))
    for name in set(a.variables) - {"wall_time"}:
        x, y = a[name].values, b[name].values
        if x.dtype.kind == "f":
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert x.tolist() == y.tolist(), name


def test_local_cluster_sweep_equals_in_process(cluster, tmp_path):
    local = flowsim.run(SWEEP, tmp_path / "local.zarr", progress=False)
    remote = flowsim.run(SWEEP, tmp_path / "dask.zarr", scheduler=cluster.scheduler_address, progress=False)
    assert remote.sizes["run"] == 8 and set(remote.status.values) == {"complete"}
    assert_same(local, remote)


def test_cli_scheduler_address_and_resume_skip(cluster, tmp_path, capsys):
    store = tmp_path / "cli.zarr"
    path = tmp_path / "dist.yaml"
    path.write_text(flowsim.load_scenario(SWEEP).to_yaml())
    assert cli.main(["run", str(path), "-o", str(store), "-q", "--scheduler", cluster.scheduler_address]) == 0
    before = flowsim.open(store)
    assert cli.main(["run", str(path), "-o", str(store), "-q", "--resume", "--scheduler",
                     cluster.scheduler_address]) == 0
    np.testing.assert_array_equal(flowsim.open(store).wall_time.values, before.wall_time.values)
    capsys.readouterr()


def test_scheduler_without_a_store_path_is_an_error():
    with pytest.raises(ValueError, match="^scheduler: "):
        flowsim.run(SWEEP, None, scheduler="local")


def test_scheduler_without_the_dist_extra_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """With dask.distributed missing, ``--scheduler local`` exits 2 with one line naming the extra, and no store
    is left behind (a rerun would otherwise find an empty store)."""
    import sys

    import yaml
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed → ImportError
    path, store = tmp_path / "s.yaml", tmp_path / "s.zarr"
    path.write_text(yaml.safe_dump(SWEEP))
    assert cli.main(["run", str(path), "-o", str(store), "-q", "--scheduler", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flowsim: error: scheduler: dask.distributed is not installed (pip install 'flowsim[dist]')"
    assert not store.exists()
