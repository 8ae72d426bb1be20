"""Closed-form loss landscapes L(w) used to check the theory exactly.

- ``quadratic``: L = ½ Σ λ_i w_i² with the given spectrum (GD is stable iff η λ_max < 2).
- ``xyzw``: L = ½(1 − xyzw)²  (depth-4 scalar factorization: GD finds minima with sharpness ≈ 2/η).
- ``x2y2``: L = ½(1 − x²y²)²  (Zhu et al.'s minimal edge-of-stability example).
- ``xy``:   L = ½(1 − xy)²    (depth 2: the contrast case without edge-of-stability behaviour).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveFloat

from flowsim.models.base import ModelConfig
from flowsim.models.problem import Problem


class QuadraticConfig(ModelConfig):
    model: Literal["quadratic"] = Field("quadratic", description="L = ½ Σ λ_i w_i²; default w0 = all ones")
    spectrum: list[PositiveFloat] = Field(..., min_length=1, description="Hessian eigenvalues λ_i")

    def build(self, dtype="float64", device="auto", seed: int = 0) -> Problem:
        lam = torch.tensor(self.spectrum, dtype=torch.float64)
        problem = Problem.from_function(lambda w: 0.5 * (lam.to(w) * w * w).sum(), torch.ones(len(lam)),
                                        dtype=dtype, device=device, meta={"model": self.model})
        problem.w0 = self.initial_vector(problem.w0)
        return problem


PRODUCT_LANDSCAPES = {
    "xyzw": (lambda w: 0.5 * (1 - w.prod()) ** 2, [1.8, 1.2, 0.6, 0.5]),
    "x2y2": (lambda w: 0.5 * (1 - (w[0] * w[1]) ** 2) ** 2, [2.0, 0.2]),
    "xy": (lambda w: 0.5 * (1 - w[0] * w[1]) ** 2, [2.0, 0.2]),
}


class ProductConfig(ModelConfig):
    """½(1 − ∏ factors)² landscapes; default initial points are off-balance so that the dynamics is not 1-D."""
    model: Literal["xyzw", "x2y2", "xy"] = Field(description="xyzw: ½(1 − xyzw)², x2y2: ½(1 − x²y²)², "
                                                 "xy: ½(1 − xy)²")

    def build(self, dtype="float64", device="auto", seed: int = 0) -> Problem:
        fn, default = PRODUCT_LANDSCAPES[self.model]
        problem = Problem.from_function(fn, default, dtype=dtype, device=device, meta={"model": self.model})
        problem.w0 = self.initial_vector(problem.w0)
        return problem
