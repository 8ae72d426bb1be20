"""The zarr store: one group per run under ``runs/<name>``, appended chunk by chunk while the run goes.

Layout (zarr v3): root attrs hold the scenario (YAML text), versions, device and dtype; each run group holds
1-D/2-D arrays along ``step`` (with ``dimension_names``, so xarray reads them) and attrs with the run's
coordinates under ``coords`` (process, rule, lr, batch_size, seed, …), its ``order``, its status (running |
complete | diverged) and its ``length`` (the rows stored). A killed run keeps every row it stored (its recorder
writes every ``record.chunk`` rows and at least once a minute: :class:`flowsim.record.Recorder`). :func:`open`
returns one ``xarray.Dataset`` along ``run``, however early the store was killed: a run with no row yet has an
empty ``step``, a store with no run yet an empty ``run``. When all its runs are done the store's metadata is
consolidated (:func:`consolidate`, for plain ``xarray.open_zarr``); a store reopened for writing drops it first
(:func:`reopen`), and flowsim's own reads never use it.

:class:`InMemory` is the same store held in numpy arrays (no zarr), for a result nobody asked to keep on disk.

A store on disk also holds ``flowsim.lock`` (the pid and host of the process writing it; a lock left by a dead
process on this host is taken over) and ``checkpoints/<run>.pt``: the latest checkpoint of each unfinished run,
written atomically right after its rows are written (see :func:`save_checkpoint`).
"""
from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import xarray as xr
import zarr
import zarr.storage

from flowsim.solvers.processes import Variable

StoreLike = Union[str, Path, zarr.storage.StoreLike]


LOCK_NAME = "flowsim.lock"


class StoreLockedError(FileExistsError):
    """Another live process is writing the store."""


DIVERGED_ATTRS = {"units": "1", "long_name": "whether the run diverged: its step loss was not finite or exceeded "
                  "divergence_factor × max(|first loss|, 1)"}
DIVERGED_AT_ATTRS = {"units": "step", "long_name": "the step at which the run diverged (NaN where it did not)"}


def is_store(store: StoreLike) -> bool:
    """Whether ``store`` is a path holding a flowsim store (its root ``zarr.json``)."""
    return isinstance(store, (str, Path)) and (Path(store) / "zarr.json").is_file()


STORE_ENTRIES = frozenset({"zarr.json", "runs", "checkpoints", LOCK_NAME, ".DS_Store", "Thumbs.db", "desktop.ini"})
"""What a flowsim store's folder holds, with the files a desktop's file browser leaves in any folder it shows."""


def foreign(path: Path) -> Optional[str]:
    """Why the existing folder ``path`` is not a flowsim store (nor one killed while being created), or None:
    it holds entries a store does not, or a zarr.json with attributes flowsim did not write."""
    other = sorted(entry.name for entry in path.iterdir() if entry.name not in STORE_ENTRIES)
    if other:
        return f"it holds {', '.join(other[:3])}{', …' if len(other) > 3 else ''}"
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, ValueError):
        return None
    return "a zarr store that flowsim did not write" if attrs and "flowsim_version" not in attrs else None


def _refuse_foreign(path: Path) -> None:
    """A one-line error where a run would write into a folder that is not a flowsim store: replacing it would delete
    the user's files (--overwrite or not), and resuming it would write runs among them."""
    why = foreign(path) if path.is_dir() else None
    if why:
        raise FileExistsError(f"store {path}: the folder exists and is not a flowsim store ({why}); give a new path "
                              "(nothing was removed)")


@contextmanager
def lock(store: StoreLike):
    """Hold ``<store>/flowsim.lock`` (pid and host) while writing; in-memory stores need no lock.

    The directory is created if needed. A lock held by a live process raises :class:`StoreLockedError`; one left
    by a process of this host that no longer exists is taken over. The lock file is removed on exit.
    """
    if not isinstance(store, (str, Path)):
        yield
        return
    path = Path(store) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    me = f"{os.getpid()} {socket.gethostname()}"
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _read_lock(path)
            if attempt == 0 and holder is not None and holder[1] == socket.gethostname() and not _alive(holder[0]):
                path.unlink(missing_ok=True)
                continue
            who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
            raise StoreLockedError(f"store {store} is being written by {who} (lock file {path}); "
                                   "wait for it to finish, or remove the lock file if that process is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        if _read_lock(path) == (os.getpid(), socket.gethostname()):
            path.unlink(missing_ok=True)


def _read_lock(path: Path) -> Optional[tuple[int, str]]:
    try:
        pid, host = path.read_text().split(maxsplit=1)
        return int(pid), host.strip()
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create(store: StoreLike, attrs: dict, overwrite: bool = False) -> zarr.Group:
    """Create an empty store with root ``attrs`` plus its provenance (``flowsim_version``, ``torch_version``,
    ``created``); an existing store is an error unless ``overwrite``.

    Replacing a store on disk removes everything in it except the lock file.
    """
    if isinstance(store, (str, Path)):
        path = Path(store)
        _refuse_foreign(path)
        if is_store(path) and not overwrite:
            raise FileExistsError(f"store {path} already exists (use --overwrite to replace it, "
                                  "or --resume to continue its unfinished runs)")
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"store {path} exists and is not a directory")
        for child in path.iterdir() if path.exists() else ():
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    root = zarr.open_group(store, mode="a" if isinstance(store, (str, Path)) else "w", zarr_format=3)
    root.attrs.update(_with_provenance(attrs))
    root.create_group("runs")
    return root


def _with_provenance(attrs: dict) -> dict:
    """A store's root ``attrs`` with the versions that wrote it and when."""
    from flowsim import __version__
    return {"flowsim_version": __version__, "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **attrs}


class RunWriter:
    """Appends recorded columns (``step`` plus the run's declared ``variables``) to one run group; keeps all
    arrays the same length."""

    def __init__(self, root: zarr.Group, name: str, attrs: dict, variables: dict[str, Variable],
                 dims: dict[str, int], chunk: int = 512):
        self.group = root.require_group(f"runs/{name}")
        self.group.attrs.update({**attrs, "status": "running"})
        self.variables, self.dims, self.chunk, self.length = variables, dims, chunk, 0

    def _array(self, name: str) -> zarr.Array:
        if name in self.group:
            return self.group[name]
        extra = () if name == "step" else self.variables[name].dims
        shape = tuple(self.dims[d] for d in extra)
        is_step = name == "step"
        arr = self.group.create_array(
            name, shape=(self.length, *shape), chunks=(self.chunk, *shape),
            dtype="i8" if is_step else "f8", fill_value=-1 if is_step else np.nan,
            dimension_names=["step", *extra])
        if not is_step:
            _, units, long_name = self.variables[name]
            arr.attrs.update({"units": units, "long_name": long_name})
        return arr

    def append(self, columns: dict[str, np.ndarray]) -> None:
        n = len(columns["step"])
        for name in {"step", *columns, *(k for k in self.group.array_keys())}:
            arr = self._array(name)
            data = columns.get(name)
            if data is None:
                data = np.full((n, *arr.shape[1:]), np.nan)
            arr.append(data, axis=0)
        self.length += n
        self.group.attrs["length"] = self.length  # rows past this (a chunk cut short by a kill) are not read

    def truncate(self, length: int) -> None:
        """Cut every array back to ``length`` rows (rows written after the checkpoint a run resumes from)."""
        for name in self.group.array_keys():
            arr = self.group[name]
            arr.resize((min(length, arr.shape[0]), *arr.shape[1:]))
        self.length = length
        self.group.attrs["length"] = length

    def finish(self, **attrs: Any) -> None:
        self.group.attrs.update(attrs)


class InMemory:
    """A store that stays in memory as numpy arrays, with no zarr behind it: what :func:`flowsim.simulate` records
    into unless it is given a store. Its runs take a :class:`RunWriter`'s calls (:meth:`writer`), and
    :meth:`open` gives the Dataset :func:`open` gives of the same rows. It keeps no checkpoints."""

    def __init__(self, attrs: dict):
        self.attrs = _with_provenance(attrs)
        self.runs: dict[str, MemoryRun] = {}

    def writer(self, name: str, attrs: dict, variables: dict[str, Variable], dims: dict[str, int]) -> "MemoryRun":
        self.runs[name] = MemoryRun(attrs, variables, dims)
        return self.runs[name]

    def open(self) -> xr.Dataset:
        return _combine([(name, run.attrs, run.dataset()) for name, run in self.runs.items()], self.attrs)


class MemoryRun:
    """One run's rows in memory, with :class:`RunWriter`'s interface for a run that is never resumed (``append``,
    ``finish``, ``length``) and its arrays' dims, dtypes (int64 steps, float64 values), NaN filling and
    attributes."""

    def __init__(self, attrs: dict, variables: dict[str, Variable], dims: dict[str, int]):
        self.attrs, self.variables, self.dims, self.length = {**attrs, "status": "running"}, variables, dims, 0
        self.columns: dict[str, list[np.ndarray]] = {}

    def _dims(self, name: str) -> tuple[str, ...]:
        return () if name == "step" else self.variables[name].dims

    def append(self, columns: dict[str, np.ndarray]) -> None:
        n = len(columns["step"])
        for name in {"step", *columns, *self.columns}:
            shape = tuple(self.dims[d] for d in self._dims(name))
            dtype = np.int64 if name == "step" else np.float64
            if name not in self.columns:  # first recorded now: the rows before hold the fill value
                self.columns[name] = [np.full((self.length, *shape), -1 if name == "step" else np.nan, dtype)]
            data = columns.get(name)
            self.columns[name].append(np.full((n, *shape), np.nan) if data is None else np.asarray(data, dtype))
        self.length += n

    def finish(self, **attrs: Any) -> None:
        self.attrs.update(attrs)

    def dataset(self) -> xr.Dataset:
        if "step" not in self.columns:
            return xr.Dataset(coords={"step": np.zeros(0, dtype=np.int64)})
        variables = {name: xr.Variable(("step", *self._dims(name)), np.concatenate(parts),
                                       attrs={} if name == "step" else {"units": self.variables[name].units,
                                                                        "long_name": self.variables[name].long_name})
                     for name, parts in self.columns.items()}
        return xr.Dataset(variables).set_coords("step")


def reopen(store: StoreLike) -> zarr.Group:
    """An existing store's root for writing. Its consolidated metadata (:func:`consolidate`), which appending
    would make stale, is dropped first; flowsim itself always reads the store unconsolidated."""
    if isinstance(store, (str, Path)):
        _refuse_foreign(Path(store))
    root = zarr.open_group(store, mode="r+", use_consolidated=False)
    if isinstance(store, (str, Path)) and "consolidated_metadata" in json.loads(
            (Path(store) / "zarr.json").read_text()):
        root.attrs.put(dict(root.attrs))  # rewrites zarr.json from the unconsolidated view
    return root


def consolidate(store: StoreLike) -> None:
    """Write the consolidated metadata of a finished store on disk, so that ``xarray.open_zarr`` opens it (or one
    run group) without a warning. Zarr's own warnings while consolidating (format 3 does not specify consolidation
    yet; the lock file is not a zarr node) are silenced here."""
    if isinstance(store, (str, Path)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(store)


def _checkpoint_path(store: StoreLike, name: str) -> Optional[Path]:
    return Path(store) / "checkpoints" / f"{name}.pt" if isinstance(store, (str, Path)) else None


def save_checkpoint(store: StoreLike, name: str, checkpoint: dict) -> None:
    """Write a run's checkpoint (tensors and plain values, via ``torch.save``) atomically; no-op in memory."""
    path = _checkpoint_path(store, name)
    if path is None:
        return
    path.parent.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with builtins.open(tmp, "wb") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(store: StoreLike, name: str) -> Optional[dict]:
    """The latest checkpoint of run ``name`` (tensors on the CPU), or None."""
    path = _checkpoint_path(store, name)
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def drop_checkpoint(store: StoreLike, name: str) -> None:
    path = _checkpoint_path(store, name)
    if path is not None:
        path.unlink(missing_ok=True)


def _open_group(group: zarr.Group) -> xr.Dataset:
    """A run group's first ``attrs['length']`` rows (those stored before any kill) as a Dataset indexed by step;
    a group killed before its first write has no rows (an empty ``step``)."""
    arrays = dict(group.arrays())
    if "step" not in arrays:
        return xr.Dataset(coords={"step": np.zeros(0, dtype=np.int64)})
    n = group.attrs.get("length", min((a.shape[0] for a in arrays.values()), default=0))
    variables = {name: xr.Variable(arr.metadata.dimension_names, arr[:n], attrs=dict(arr.attrs))
                 for name, arr in arrays.items()}
    return xr.Dataset(variables).set_coords("step")


def open(store: StoreLike) -> xr.Dataset:  # noqa: A001 - mirrors xarray.open_dataset
    """Read a store as one Dataset with dims (run, step, …); runs of different lengths are NaN-padded."""
    if isinstance(store, (str, Path)) and not Path(store).exists():
        raise FileNotFoundError(f"store {store} does not exist")
    if isinstance(store, (str, Path)) and not is_store(store):
        raise FileNotFoundError(f"{store} is not a flowsim store (it has no zarr.json: a run killed before it "
                                "wrote anything, or another folder)")
    why = foreign(Path(store)) if isinstance(store, (str, Path)) else None
    if why:
        raise FileNotFoundError(f"{store} is not a flowsim store ({why})")
    root = zarr.open_group(store, mode="r", use_consolidated=False)
    names = root["runs"].group_keys() if "runs" in root else ()
    return _combine([(name, dict(root[f"runs/{name}"].attrs), _open_group(root[f"runs/{name}"])) for name in names],
                    dict(root.attrs))


def _combine(runs: list[tuple[str, dict, xr.Dataset]], attrs: dict) -> xr.Dataset:
    """One Dataset along ``run`` of the runs' (name, group attributes, rows), in the order they were started, with
    the store's ``attrs``; runs of different lengths are NaN-padded."""
    parts = []
    for name, run_attrs, ds in sorted(runs, key=lambda run: run[1].get("order", 0)):
        coords = {**run_attrs.get("coords", {}), "status": run_attrs.get("status", "running")}
        ds = ds.expand_dims(run=[name]).assign_coords({k: ("run", [_coord_value(v)]) for k, v in coords.items()})
        ds["diverged"] = ("run", [bool(run_attrs.get("diverged", False))], DIVERGED_ATTRS)
        ds["diverged_at"] = ("run", [float("nan") if run_attrs.get("diverged_at") is None
                                     else run_attrs["diverged_at"]], DIVERGED_AT_ATTRS)
        parts.append(ds)
    if not parts:  # killed before its first run began
        parts = [xr.Dataset(coords={"run": np.zeros(0, dtype=object), "step": np.zeros(0, dtype=np.int64)})]
    ds = xr.concat(parts, dim="run", join="outer", combine_attrs="drop_conflicts", fill_value=np.nan,
                   data_vars="all", coords="different", compat="equals")
    if "time" in ds:
        ds = ds.set_coords("time")
    ds.attrs = dict(attrs)
    return ds


def _coord_value(v: Any) -> Any:
    return np.nan if v is None else v
