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
    model: Literal["mlp"] = Field("mlp", description="fully connected network on flat inputs")
    widths: list[PositiveInt] = Field(default_factory=lambda: [64, 64], description="hidden layer widths "
                                      "(units), input to output; [] = a linear model")
    activation: Literal["tanh", "relu", "elu", "gelu"] = Field("tanh", description="nonlinearity after each "
                                                                "hidden layer")
    bias: bool = Field(True, description="whether every linear layer (the read-out too) has a bias")

    def make_module(self, in_shape, n_out):
        layers, fan_in = [], in_shape[0]
        for width in self.widths:
            layers += [torch.nn.Linear(fan_in, width, bias=self.bias), ACTIVATIONS[self.activation]()]
            fan_in = width
        layers.append(torch.nn.Linear(fan_in, n_out, bias=self.bias))
        return torch.nn.Sequential(*layers)
