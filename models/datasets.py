"""Offline datasets: scikit-learn's bundled digits, seeded synthetic sets, and user ``.npz`` files.

Nothing here downloads anything. Every loader returns ``(X, labels_or_targets, n_classes)`` as float64/int64
numpy arrays; ``n_classes`` is None for regression targets. Turning labels into one-hot targets (MSE) or
keeping them as indices (cross-entropy) is the problem builder's job.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from flowsim.models.mnist1d import mnist1d
from flowsim.models.tasks import TOKEN_TASKS


class DatasetSpec(BaseModel):
    """Which data: a bundled/synthetic set by ``name``, or a user file by ``path`` (arrays X, Y)."""
    model_config = ConfigDict(extra="forbid")
    name: Optional[Literal["digits", "teacher_student", "gaussian_mixture", "mnist1d", "sorting", "markov"]] = Field(
        None, description="a bundled (digits, mnist1d) or synthetic set; give exactly one of name and path")
    path: Optional[Path] = Field(None, description=".npz file with arrays X (n × …) and Y (n integer labels "
                                 "0..C-1, or float targets), finite numbers; inputs are used as given (not "
                                 "standardized). Relative: to the scenario file's folder, or to the working "
                                 "directory for YAML text or a dict")
    dim: PositiveInt = Field(16, description="input dimension of the synthetic sets")
    outputs: PositiveInt = Field(1, description="teacher_student: number of regression targets")
    teacher_width: PositiveInt = Field(32, description="teacher_student: hidden width of the tanh teacher")
    n_classes: int = Field(4, ge=2, description="gaussian_mixture: number of classes")
    separation: float = Field(2.0, ge=0, description="gaussian_mixture: distance scale of the class means")
    noise: float = Field(0.0, ge=0, description="teacher_student: std of label noise")
    size: PositiveInt = Field(2000, description="synthetic sets: examples generated before n_train is taken")
    vocab: PositiveInt = Field(8, description="sorting, markov: number of symbols V (the separator is token V)")
    length: PositiveInt = Field(8, description="sorting, markov: target positions per sequence")
    seed: int = Field(0, description="seed of the synthetic generator (independent of the scenario seed)")

    @model_validator(mode="after")
    def _name_xor_path(self):
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of 'name' (digits, teacher_student, gaussian_mixture, mnist1d, "
                             "sorting, markov) or 'path'")
        return self


def standardize(X: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per feature (constant features become 0)."""
    std = X.std(0)
    return (X - X.mean(0)) / np.where(std > 0, std, 1.0)


def digits() -> tuple[np.ndarray, np.ndarray, int]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.data.astype(np.float64), d.target.astype(np.int64), 10


def teacher_student(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray, None]:
    """X ~ N(0, I_dim); Y = tanh-teacher(X) + noise·N(0, 1), teacher weights ~ N(0, 1/fan_in)."""
    rng = np.random.default_rng(spec.seed)
    X = rng.standard_normal((spec.size, spec.dim))
    W1 = rng.standard_normal((spec.dim, spec.teacher_width)) / np.sqrt(spec.dim)
    W2 = rng.standard_normal((spec.teacher_width, spec.outputs)) / np.sqrt(spec.teacher_width)
    Y = np.tanh(X @ W1) @ W2 + spec.noise * rng.standard_normal((spec.size, spec.outputs))
    return X, Y, None


def gaussian_mixture(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray, int]:
    """Class means ~ separation·N(0, I/dim)·√dim; X = mean[label] + N(0, I); labels uniform."""
    rng = np.random.default_rng(spec.seed)
    means = spec.separation * rng.standard_normal((spec.n_classes, spec.dim))
    labels = rng.integers(0, spec.n_classes, spec.size)
    return means[labels] + rng.standard_normal((spec.size, spec.dim)), labels.astype(np.int64), spec.n_classes


def saved_by_torch(path: Path) -> bool:
    """Whether ``path`` is a ``torch.save`` file: a zip archive that np.load opens as an .npz of other arrays."""
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("data.pkl") for name in archive.namelist())


def from_file(path: Path) -> tuple[np.ndarray, np.ndarray, Optional[int]]:
    """A user ``.npz`` with arrays X (n × …) and Y: integer labels (n,) or float targets (n × …)."""
    if not path.is_file():
        raise ValueError(f"problem.dataset.path: file not found: {path}")
    if not zipfile.is_zipfile(path):  # np.load read a CSV as a pickle, and returned a .npy's one array
        raise ValueError(f"problem.dataset.path: {path} is not an .npz archive; save the arrays with "
                         "np.savez(path, X=X, Y=Y) (a CSV: read it with np.loadtxt first)")
    if saved_by_torch(path):
        raise ValueError(f"problem.dataset.path: {path} is a torch.save file, not an .npz archive; save the arrays "
                         "with np.savez(path, X=X.numpy(), Y=Y.numpy())")
    with np.load(path) as f:
        missing = {"X", "Y"} - set(f.files)
        if missing:
            raise ValueError(f"problem.dataset.path: {path} lacks array(s) {sorted(missing)} (needs X and Y)")
        try:
            X, Y = f["X"], f["Y"]
        except ValueError:  # object arrays (strings from pandas) need pickle, which a data file must not run
            raise ValueError(f"problem.dataset.path: {path} holds Python objects (an object array); save numbers, "
                             "e.g. Y = np.unique(Y, return_inverse=True)[1] for string labels") from None
    for key, a in (("X", X), ("Y", Y)):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            fix = ", e.g. np.unique(Y, return_inverse=True)[1]" if key == "Y" else ""
            raise ValueError(f"problem.dataset.path: {key} in {path} holds {a.dtype} values, not numbers; save "
                             f"{'class labels as integers 0..C-1' if key == 'Y' else 'numeric inputs'}{fix}")
        bad = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(1)) if a.dtype.kind == "f" else []
        if len(bad):
            raise ValueError(f"problem.dataset.path: {key} in {path} has NaN or inf values in {len(bad)} row(s), the "
                             f"first at row {bad[0]}; drop or fill them before saving")
    X = X.astype(np.float64)
    if len(X) != len(Y):
        raise ValueError(f"problem.dataset.path: X has {len(X)} rows but Y has {len(Y)}")
    if np.issubdtype(Y.dtype, np.integer) and Y.ndim == 1:
        if Y.min() < 0:
            raise ValueError(f"problem.dataset.path: Y in {path} has negative class labels (the least is {Y.min()}); "
                             "class labels are integers 0..C-1")
        return X, Y.astype(np.int64), int(Y.max()) + 1
    return X, Y.astype(np.float64), None


def load(spec: DatasetSpec, n_train: Optional[int], classes: Optional[list[int]]):
    """Load, keep the given classes (relabelled 0..k−1 in the given order) and the first ``n_train`` examples.

    Inputs are standardized per feature on the kept examples (token ids are left as they are).
    Returns (X, Y, n_classes).
    """
    if spec.path is not None:
        X, Y, n_classes = from_file(spec.path)
    elif spec.name == "digits":
        X, Y, n_classes = digits()
    elif spec.name == "mnist1d":
        X, Y, n_classes = mnist1d(spec.size, spec.seed)
    elif spec.name in TOKEN_TASKS:
        X, Y, n_classes = TOKEN_TASKS[spec.name](spec.size, spec.vocab, spec.length, spec.seed)
    elif spec.name == "teacher_student":
        X, Y, n_classes = teacher_student(spec)
    else:
        X, Y, n_classes = gaussian_mixture(spec)
    if classes is not None:
        if n_classes is None or Y.ndim > 1:
            raise ValueError("problem.classes: the dataset has regression or sequence targets, not classes")
        bad = [c for c in classes if not 0 <= c < n_classes]
        if bad:
            raise ValueError(f"problem.classes: {bad} not in the dataset's classes 0..{n_classes - 1}")
        keep = np.isin(Y, classes)
        remap = {c: i for i, c in enumerate(classes)}
        X, Y, n_classes = X[keep], np.array([remap[int(c)] for c in Y[keep]], dtype=np.int64), len(classes)
    if n_train is not None:
        if n_train > len(X):
            raise ValueError(f"problem.n_train: {n_train} requested but the dataset has {len(X)} examples")
        X, Y = X[:n_train], Y[:n_train]
    if spec.path is None and spec.name not in TOKEN_TASKS:
        X = standardize(X)
    return X, Y, n_classes
