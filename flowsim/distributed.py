"""Runs the tasks of a scenario (one per sweep point and run, or one per batched group) on dask.distributed.

Each task is ``run_job`` (the runner's :func:`flowsim.runner.execute_job`) on a worker: it builds its Problem, simulates, and writes its own
run group (and checkpoints) to the shared store, so the store must be a path every worker can reach. The
process that submits the tasks holds the store's lock. ``scheduler="local"`` starts a LocalCluster with one
single-threaded worker process per core; any other value is the address of a running scheduler.
Needs the ``dist`` extra (dask, distributed). This module knows nothing about what a task simulates.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from flowsim.sweep import Task


def require() -> None:
    """A one-line ValueError when dask.distributed is not installed (checked before anything is written)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ValueError("scheduler: dask.distributed is not installed (pip install 'flowsim[dist]')") from None


def client_for(scheduler: str):
    """A dask.distributed Client: a new LocalCluster for ``"local"``, else one connected to ``scheduler``."""
    require()
    from distributed import Client, LocalCluster
    if scheduler == "local":
        cluster = LocalCluster(n_workers=os.cpu_count() or 1, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster)
    try:
        return Client(scheduler, timeout=10)
    except (OSError, TimeoutError) as e:
        raise ValueError(f"scheduler: cannot reach the Dask scheduler at {scheduler!r} ({e})") from None


def execute_all(store, jobs: list[tuple[Optional[str], list[Task]]], scheduler, run_job: Callable,
                resume: bool = False, progress: bool = False, client=None) -> dict[str, str]:
    """Run ``jobs`` (:func:`flowsim.batching.jobs`: a batched group, or one task) on the cluster and wait for
    all of them; returns run name → status.

    ``scheduler``: ``"local"`` or an address (ignored when a ``client`` is given). ``run_job(store, group, job,
    resume)`` runs one job on a worker and returns its statuses. A task that fails raises
    its error here, after the other tasks finish.
    """
    from distributed import as_completed
    if not isinstance(store, (str, Path)):
        raise ValueError("scheduler: Dask workers need a store path to write to")
    own = client is None
    client = client_for(scheduler) if own else client
    try:
        path = str(Path(store).resolve())
        futures = {client.submit(run_job, path, group, job, resume, key=f"flowsim-{job[0].name}-{os.getpid()}",
                                 pure=False): job for group, job in jobs}
        statuses, error = {}, None
        for future in tqdm(as_completed(futures), total=len(futures), disable=not progress, unit="run"):
            if future.status == "error" and error is None:
                error = future.exception()
            elif future.status == "finished":
                statuses.update(zip((t.name for t in futures[future]), future.result()))
        if error is not None:
            raise error
        return statuses
    finally:
        if own:
            cluster = client.cluster
            client.close()
            if cluster is not None:
                cluster.close()
