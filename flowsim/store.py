"""The zarr store: one group per run under ``runs/<name>``, appended chunk by chunk while the run goes.

Layout (zarr v3): root attrs hold the scenario (YAML text), versions, device and dtype; each run group holds
1-D/2-D arrays along ``step`` (with ``dimension_names``, so xarray reads them) and attrs with the run's
coordinates under ``coords`` (process, rule, lr, batch_size, seed, …), its ``order`` and its status (running | complete | diverged).
A killed run keeps every chunk it completed. :func:`open` returns one ``xarray.Dataset`` along ``run``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import xarray as xr
import zarr
import zarr.storage

from flowsim.record import VARIABLES

StoreLike = Union[str, Path, zarr.storage.StoreLike]


def create(store: StoreLike, attrs: dict, overwrite: bool = False) -> zarr.Group:
    """Create an empty store with root ``attrs``; an existing store is an error unless ``overwrite``."""
    if isinstance(store, (str, Path)):
        path = Path(store)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"store {path} already exists (use --overwrite to replace it)")
            shutil.rmtree(path)
    root = zarr.open_group(store, mode="w", zarr_format=3)
    root.attrs.update(attrs)
    root.create_group("runs")
    return root


class RunWriter:
    """Appends recorded columns (``step`` plus VARIABLES) to one run group; keeps all arrays the same length."""

    def __init__(self, root: zarr.Group, name: str, attrs: dict, dims: dict[str, int], chunk: int = 512):
        self.group = root.require_group(f"runs/{name}")
        self.group.attrs.update({**attrs, "status": "running"})
        self.dims, self.chunk, self.length = dims, chunk, 0

    def _array(self, name: str) -> zarr.Array:
        if name in self.group:
            return self.group[name]
        extra = () if name == "step" else VARIABLES[name][0]
        shape = tuple(self.dims[d] for d in extra)
        is_step = name == "step"
        arr = self.group.create_array(
            name, shape=(self.length, *shape), chunks=(self.chunk, *shape),
            dtype="i8" if is_step else "f8", fill_value=-1 if is_step else np.nan,
            dimension_names=["step", *extra])
        if not is_step:
            _, units, long_name = VARIABLES[name]
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

    def finish(self, **attrs: Any) -> None:
        self.group.attrs.update(attrs)


def _open_group(store: StoreLike, name: str) -> xr.Dataset:
    ds = xr.open_dataset(store, engine="zarr", group=f"runs/{name}", consolidated=False, chunks=None)
    return ds.load().set_coords("step")


def open(store: StoreLike) -> xr.Dataset:  # noqa: A001 - mirrors xarray.open_dataset
    """Read a store as one Dataset with dims (run, step, …); runs of different lengths are NaN-padded."""
    if isinstance(store, (str, Path)) and not Path(store).exists():
        raise FileNotFoundError(f"store {store} does not exist")
    root = zarr.open_group(store, mode="r")
    names = sorted(root["runs"].group_keys(), key=lambda n: root[f"runs/{n}"].attrs.get("order", 0))
    parts = []
    for name in names:
        attrs = dict(root[f"runs/{name}"].attrs)
        ds = _open_group(store, name)
        coords = {**attrs.get("coords", {}), "status": attrs.get("status", "running")}
        ds = ds.expand_dims(run=[name]).assign_coords({k: ("run", [_coord_value(v)]) for k, v in coords.items()})
        ds["diverged"] = ("run", [bool(attrs.get("diverged", False))])
        ds["diverged_at"] = ("run", [float("nan") if attrs.get("diverged_at") is None else attrs["diverged_at"]])
        parts.append(ds)
    if not parts:
        raise ValueError(f"store {store} holds no runs")
    ds = xr.concat(parts, dim="run", join="outer", combine_attrs="drop_conflicts", fill_value=np.nan,
                   data_vars="all", coords="different", compat="equals")
    if "time" in ds:
        ds = ds.set_coords("time")
    ds.attrs = dict(root.attrs)
    return ds


def _coord_value(v: Any) -> Any:
    return np.nan if v is None else v
