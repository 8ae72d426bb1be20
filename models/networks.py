"""Fully connected networks (MLP) for flat inputs."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt

from flowsim.models.base import NetworkConfig

ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "elu": torch.nn.ELU, "gelu": torch.nn.GELU}


class MLPConfig(NetworkConfig):
    """MLP with hidden ``widths``, one ``activation`` after each hidden layer, and a linear read-out.

    Weights use PyTorch's default ``nn.Linear`` initialization under the scenario seed.
    """
    model: Literal["mlp"] = "mlp"
    widths: list[PositiveInt] = Field(default_factory=lambda: [64, 64])
    activation: Literal["tanh", "relu", "elu", "gelu"] = "tanh"
    bias: bool = True

    def make_module(self, in_shape, n_out):
        layers, fan_in = [], in_shape[0]
        for width in self.widths:
            layers += [torch.nn.Linear(fan_in, width, bias=self.bias), ACTIVATIONS[self.activation]()]
            fan_in = width
        layers.append(torch.nn.Linear(fan_in, n_out, bias=self.bias))
        return torch.nn.Sequential(*layers)
