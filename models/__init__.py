"""Bundled models: closed-form landscapes and networks, each a pydantic config that builds a Problem.

``MODELS`` maps the ``problem.model`` name of a scenario to its config class; :func:`build_problem` builds one
from a plain dict. Register a new model by adding its config class here.
"""
from __future__ import annotations

from flowsim.models.base import ModelConfig, NetworkConfig
from flowsim.models.landscapes import ProductConfig, QuadraticConfig
from flowsim.models.networks import MLPConfig
from flowsim.models.sequence import LSTMConfig, TransformerConfig
from flowsim.models.vision import CNNConfig, ResNetConfig, ViTConfig

CONFIGS = [QuadraticConfig, ProductConfig, MLPConfig, CNNConfig, ResNetConfig, ViTConfig, TransformerConfig,
           LSTMConfig]
MODELS = {name: cfg for cfg in CONFIGS for name in cfg.model_fields["model"].annotation.__args__}


def build_problem(spec: dict, dtype="float64", device="auto", seed: int = 0):
    """Build the Problem described by a scenario's ``problem:`` mapping."""
    name = spec.get("model")
    if name not in MODELS:
        raise ValueError(f"problem.model: unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name].model_validate(spec).build(dtype=dtype, device=device, seed=seed)


__all__ = ["MODELS", "CONFIGS", "ModelConfig", "NetworkConfig", "build_problem"]
