"""Model configurations: each bundled model is a pydantic config that builds a :class:`flowsim.Problem`.

A config's ``model`` field names it in scenario YAML; ``build(dtype, device, seed)`` returns the Problem with
seeded, deterministic initial weights (built in float32 under a forked RNG, then cast, so float32 and float64
runs start from the same point). ``init: {path: w0.npy}`` replaces the initial weights by a flat vector.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from flowsim.models.datasets import DatasetSpec, load, saved_by_torch
from flowsim.models.problem import Problem


class InitFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path = Field(description="a .npy file (relative: to the scenario file's folder, or to the working "
                       "directory for YAML text or a dict), read with numpy.load and flattened; it must hold as "
                       "many values as the model has parameters")


class ModelConfig(BaseModel):
    """Base of every model config. Subclasses set ``model: Literal[...]`` and implement ``build``."""
    model_config = ConfigDict(extra="forbid")
    init: Optional[Union[InitFile, list[float]]] = Field(
        None, description="flat initial weights (as many as the model has parameters), or {path: w0.npy}; "
        "absent = seeded default")

    def build(self, dtype="float64", device="auto", seed: int = 0) -> Problem:
        raise NotImplementedError

    def initial_vector(self, default: torch.Tensor) -> torch.Tensor:
        """``default`` unless ``init`` gives a flat vector of the same size."""
        if self.init is None:
            return default
        if isinstance(self.init, InitFile):
            if not self.init.path.is_file():
                raise ValueError(f"problem.init.path: file not found: {self.init.path}")
            values = _flat_array(self.init.path)
        else:
            values = np.asarray(self.init, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"problem.init: {np.count_nonzero(~np.isfinite(values))} of its values are NaN or inf")
        if values.size != default.numel():
            raise ValueError(f"problem.init: has {values.size} values but the model has {default.numel()} parameters")
        return torch.as_tensor(values, dtype=default.dtype, device=default.device)


def _flat_array(path) -> np.ndarray:
    """The numbers of a ``.npy`` file, flat; anything else (an .npz archive, a CSV, strings) is a one-line error
    (np.load returned an archive, or read a CSV as a pickle)."""
    fix = "save the flat weights with np.save(path, w0)"
    try:
        values = np.load(path)
    except ValueError:
        raise ValueError(f"problem.init.path: {path} is not a .npy file; {fix}") from None
    if not isinstance(values, np.ndarray):
        values.close()
        if saved_by_torch(path):
            raise ValueError(f"problem.init.path: {path} is a torch.save file, not a numpy array; save the flat "
                             "weights with np.save(path, torch.nn.utils.parameters_to_vector(model.parameters())"
                             ".detach().numpy())")
        raise ValueError(f"problem.init.path: {path} is an .npz archive, not one array; {fix}")
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"problem.init.path: {path} holds {values.dtype} values, not numbers; {fix}")
    return values.reshape(-1)


class NetworkConfig(ModelConfig):
    """A network trained on a dataset with MSE (½‖f − y‖², one-hot y for classes) or cross-entropy."""
    dataset: DatasetSpec = Field(DatasetSpec(name="digits"), description="a dataset name, or a mapping "
                                 "(see `problem.dataset`)")
    n_train: Optional[PositiveInt] = Field(None, description="train on the first this many examples (after "
                                           "classes); absent = all")
    classes: Optional[list[int]] = Field(None, min_length=2, description="keep only these class labels, "
                                         "relabelled 0..k−1 in the given order; absent = all")
    loss: Literal["mse", "ce"] = Field("mse", description="mse = ½‖f − y‖² (y one-hot for class labels) "
                                       "averaged over examples, or ce = cross-entropy in nats")
    init_scale: PositiveFloat = Field(1.0, description="the default initial weights times this (the edge of "
                                      "stochastic stability shows from small initializations, e.g. 0.2)")

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_by_name(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("classes")
    @classmethod
    def _classes_once_each(cls, v):
        twice = sorted({c for c in v if v.count(c) > 1}) if v else []
        if twice:
            raise ValueError(f"{twice} listed more than once (each class is relabelled to its position)")
        return v

    @model_validator(mode="after")
    def _scale_needs_the_default_init(self):
        if self.init is not None and self.init_scale != 1.0:
            raise ValueError("init_scale: does not apply with init (the initial weights are given)")
        return self

    def make_module(self, in_shape: tuple[int, ...], n_out: int) -> torch.nn.Module:
        raise NotImplementedError

    def input_shape(self, X: np.ndarray) -> tuple[int, ...]:
        """Shape of one input as the module wants it (flat by default)."""
        return (int(np.prod(X.shape[1:])),)

    def build(self, dtype="float64", device="auto", seed: int = 0) -> Problem:
        X, Y, n_classes = load(self.dataset, self.n_train, self.classes)
        if self.loss == "ce" and n_classes is None:
            what = f"{Y.dtype} of shape {Y.shape}"
            if self.dataset.path is None:
                fix = f"{self.dataset.name} is a regression set: use loss mse"
            elif Y.ndim == 2 and Y.shape[1] == 1:  # labels as a column (of any dtype): argmax(1) would make them 0
                what, fix = f"a column, shape {Y.shape}", "save Y.ravel().astype(int)"
            else:
                fix = "save Y as integers: " + ("Y.argmax(1) of one-hot rows" if Y.ndim == 2 else "Y.astype(int)")
            raise ValueError(f"problem.loss: 'ce' needs integer class labels, but the dataset's targets are {what}: "
                             f"{fix}")
        if n_classes is not None and self.loss == "mse":
            Y = np.eye(n_classes)[Y]
        n_out = n_classes if n_classes is not None else int(np.prod(Y.shape[1:]) or 1)
        in_shape = self.input_shape(X)
        X = X.reshape(len(X), *in_shape)
        if n_classes is None and Y.ndim == 1:
            Y = Y[:, None]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.make_module(in_shape, n_out)
        problem = Problem.from_module(module, torch.as_tensor(X), torch.as_tensor(Y), loss=self.loss,
                                      dtype=dtype, device=device,
                                      meta={"model": self.model, "n_train": len(X), "n_classes": n_classes or 0})
        problem.w0 = self.initial_vector(problem.w0 * self.init_scale)
        return problem


class AttentionFields(BaseModel):
    """Sizes shared by the attention models (ViT, transformer): width, heads, depth, block-MLP width."""
    d_model: PositiveInt = Field(32, description="width of the token embeddings and the residual stream")
    n_heads: PositiveInt = Field(2, description="attention heads per block; divides d_model")
    n_layers: PositiveInt = Field(2, description="number of transformer blocks")
    mlp_width: Optional[PositiveInt] = Field(None, description="hidden width of the block MLPs (4·d_model)")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide d_model = {self.d_model}")
        return self
