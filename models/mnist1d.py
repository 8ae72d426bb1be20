"""MNIST-1D (Greydanus 2020, arXiv 2011.14439), generated locally by its published procedure.

Ten hand-made 12-point templates (one per digit) are each padded with zeros, stretched, scaled, circularly
shifted, given correlated background noise and i.i.d. noise, sheared, and resampled to 40 points. The random
draws are made in the original order from ``numpy.random.RandomState(seed)``, so ``size=5000, seed=42`` gives
the arrays of the reference implementation's ``make_dataset`` (before its 80/20 train/test split). Nothing is
downloaded.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

TEMPLATES = np.array([
    [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
    [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
    [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
    [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
    [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
    [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
    [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
    [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
    [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
    [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
])
PADDING = (36, 60)          # zeros appended: uniform integer in [36, 60]
SCALE_COEFF = 0.4           # amplitude × (1 + 0.4·(u − ½))
MAX_TRANSLATION = 48        # circular shift by an integer in [0, 48)
CORR_NOISE_SCALE = 0.25     # background: 0.25·N(0, 1) smoothed by a Gaussian filter of σ = 2 samples
IID_NOISE_SCALE = 0.02
SHEAR_SCALE = 0.75          # minus a linear ramp of slope 0.75·(u − ½) over [−½, ½]
LENGTH = 40                 # points per example


def templates() -> np.ndarray:
    """The ten templates, standardized per row, shifted to start at 0, divided by 6 (10 × 12)."""
    x = TEMPLATES - TEMPLATES.mean(1, keepdims=True)
    x = x / x.std(1, keepdims=True)
    return (x - x[:, :1]) / 6.0


def resample(x: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation of x (on a uniform grid of [0, 1]) at n uniform points of [0, 1]."""
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def transform(x: np.ndarray, rng: np.random.RandomState, eps: float = 1e-8) -> np.ndarray:
    """One random example from template x (the draws in the reference order)."""
    pad = PADDING[0] + int(rng.rand() * (PADDING[1] - PADDING[0] + 1))
    x = resample(np.concatenate([x + eps, np.zeros(pad)]), len(x) + PADDING[1])
    x = x * (1 + SCALE_COEFF * (rng.rand() - 0.5))
    k = rng.choice(MAX_TRANSLATION)
    x = np.concatenate([x[len(x) - k:], x[:len(x) - k]])
    background = gaussian_filter1d(CORR_NOISE_SCALE * rng.randn(len(x)), 2)
    x = np.where(x != 0, x, background)
    x = x + IID_NOISE_SCALE * rng.randn(len(x))
    x = x - SHEAR_SCALE * (rng.rand() - 0.5) * np.linspace(-0.5, 0.5, len(x))
    return resample(x, LENGTH)


def mnist1d(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(X, labels, 10): 10·⌊size/10⌋ examples of 40 points, classes balanced, rows shuffled, X standardized
    as a whole (zero mean, unit standard deviation over all entries)."""
    if size < 10:
        raise ValueError(f"problem.dataset.size: mnist1d needs at least 10 examples (one per class), got {size}")
    rng = np.random.RandomState(seed)
    base = templates()
    per_class = size // 10
    X = np.stack([transform(base[label], rng) for label in range(10) for _ in range(per_class)])
    Y = np.repeat(np.arange(10, dtype=np.int64), per_class)
    order = rng.permutation(len(Y))
    X, Y = X[order], Y[order]
    return (X - X.mean()) / X.std(), Y, 10
