"""Vision networks on 1-D signals or 2-D images, channels first: a CNN, a small ResNet with GroupNorm, and a
ViT-style patch transformer.

Inputs are reshaped to ``image_shape`` (C, L) or (C, H, W): known for the bundled sets (digits → 1×8×8
images, mnist1d → 1×40 signals), taken from the file for a ``dataset: {path: …}`` whose X has more than two
dims, and given explicitly otherwise. The convolution and pooling are 1-D or 2-D following that shape. None
of these networks uses batch statistics (no BatchNorm), so each example's loss depends on the weights alone.
Initialization is PyTorch's default for every layer (position embeddings: N(0, 0.02²)), under the scenario seed.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from flowsim.models.base import AttentionFields, NetworkConfig
from flowsim.models.layers import Block, GroupNorm, LayerNorm, conv, pool
from flowsim.models.networks import ACTIVATIONS

IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40)}


class VisionConfig(NetworkConfig):
    """Common part of the vision configs: how a flat input row becomes an image."""
    image_shape: Optional[list[PositiveInt]] = Field(
        None, min_length=2, max_length=3, description="(C, L) or (C, H, W) of one input; inferred when omitted, "
        "but for inputs of shape (A, B) with A > 4 (an image or a signal of A channels) and (H, W, C) with C ≤ 4 < "
        "H, W (channels-last), which need it")

    def input_shape(self, X: np.ndarray) -> tuple[int, ...]:
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
        elif X.ndim > 2:
            shape = X.shape[1:]
            if len(shape) == 2 and shape[0] > 4:  # (n, 28, 28) was read as 28 channels of a 1-D signal, silently
                raise ValueError(f"problem.image_shape: inputs of shape {list(shape)} are a one-channel image or "
                                 f"a signal of {shape[0]} channels; give image_shape: [1, {shape[0]}, {shape[1]}] "
                                 f"or {list(shape)}")
            if len(shape) == 3 and shape[2] <= 4 < min(shape[:2]):  # (H, W, C) was read as (C, H, W), silently
                raise ValueError(f"problem.image_shape: inputs of shape {list(shape)} look channels-last (H, W, C): "
                                 f"save X.transpose(0, 3, 1, 2), or give image_shape: {list(shape)} if they have "
                                 f"{shape[0]} channels")
        elif self.dataset.name in IMAGE_SHAPES:
            shape = IMAGE_SHAPES[self.dataset.name]
        else:
            raise ValueError(f"problem.image_shape: give the (C, L) or (C, H, W) shape of the {X.shape[1]} "
                             f"input features")
        if len(shape) not in (2, 3) or math.prod(shape) != math.prod(X.shape[1:]):
            raise ValueError(f"problem.image_shape: {list(shape)} does not fit inputs of shape {list(X.shape[1:])}")
        return tuple(int(s) for s in shape)


class CNN(nn.Module):
    """conv → activation → pool (while every spatial size is ≥ 2), for each width; then a linear read-out."""

    def __init__(self, in_shape, n_out: int, widths: list[int], kernel: int, pooling: str, activation: str):
        super().__init__()
        channels, *spatial = in_shape
        self.convs, self.pooled, self.pooling = nn.ModuleList(), [], pooling
        self.act = ACTIVATIONS[activation]()
        for width in widths:
            self.convs.append(conv(channels, width, len(spatial), kernel))
            channels, pooled = width, min(spatial) >= 2
            self.pooled.append(pooled)
            spatial = [s // 2 for s in spatial] if pooled else spatial
        self.head = nn.Linear(channels * math.prod(spatial), n_out)

    def forward(self, x: Tensor) -> Tensor:
        for layer, pooled in zip(self.convs, self.pooled):
            x = self.act(layer(x))
            x = pool(x, self.pooling) if pooled else x
        return self.head(x.flatten(1))


class CNNConfig(VisionConfig):
    """CNN with one 'same' convolution of ``widths[i]`` channels per layer, each followed by the activation
    and a 2× ``pool`` (avg or max)."""
    model: Literal["cnn"] = Field("cnn", description="convolutional network on 1-D signals or 2-D images")
    widths: list[PositiveInt] = Field(default_factory=lambda: [32, 32], min_length=1,
                                      description="output channels of each convolution layer")
    kernel: PositiveInt = Field(3, description="convolution kernel size in pixels (per spatial axis); odd, "
                                "for 'same' padding")
    pool: Literal["avg", "max"] = Field("avg", description="2× pooling (mean or max of each 2-pixel window per "
                                        "axis) after each layer while every spatial size is ≥ 2")
    activation: Literal["tanh", "relu", "elu", "gelu"] = Field("tanh", description="nonlinearity after each "
                                                                "convolution")

    @model_validator(mode="after")
    def _odd_kernel(self):
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel: must be odd for 'same' padding, got {self.kernel}")
        return self

    def make_module(self, in_shape, n_out):
        return CNN(in_shape, n_out, self.widths, self.kernel, self.pool, self.activation)


class ResidualBlock(nn.Module):
    """Pre-activation block: x ↦ s(x) + conv(act(GN(conv(act(GN(x)))))); s = identity or a 1×1 projection."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, dims: int, activation: str):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(groups, c_in), conv(c_in, c_out, dims, 3, stride)
        self.norm2, self.conv2 = GroupNorm(groups, c_out), conv(c_out, c_out, dims, 3)
        self.act = ACTIVATIONS[activation]()
        self.shortcut = conv(c_in, c_out, dims, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        return self.shortcut(x) + self.conv2(self.act(self.norm2(h)))


class ResNet(nn.Module):
    """Stem conv, then one stage per width (``blocks`` residual blocks, the first of stages after the first
    with stride 2), then GroupNorm → activation → global average pool → linear."""

    def __init__(self, in_shape, n_out: int, widths: list[int], blocks: int, groups: int, activation: str):
        super().__init__()
        channels, *spatial = in_shape
        dims = len(spatial)
        self.stem = conv(channels, widths[0], dims)
        layers, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for b in range(blocks):
                layers.append(ResidualBlock(c_in, width, 2 if i > 0 and b == 0 else 1, groups, dims, activation))
                c_in = width
        self.stages = nn.Sequential(*layers)
        self.norm, self.act = GroupNorm(groups, c_in), ACTIVATIONS[activation]()
        self.head = nn.Linear(c_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm(self.stages(self.stem(x))))
        return self.head(h.flatten(2).mean(-1))


class ResNetConfig(VisionConfig):
    """Small ResNet with GroupNorm (``groups`` must divide every width)."""
    model: Literal["resnet"] = Field("resnet", description="pre-activation ResNet with GroupNorm")
    widths: list[PositiveInt] = Field(default_factory=lambda: [16, 32], min_length=1,
                                      description="channels per stage (the stem has widths[0]); every stage "
                                      "after the first starts with a stride-2 block")
    blocks: PositiveInt = Field(1, description="residual blocks per stage")
    groups: PositiveInt = Field(4, description="GroupNorm groups; divides every width")
    activation: Literal["tanh", "relu", "elu", "gelu"] = Field("tanh", description="nonlinearity after each "
                                                                "GroupNorm")

    @model_validator(mode="after")
    def _groups_divide(self):
        bad = [w for w in self.widths if w % self.groups]
        if bad:
            raise ValueError(f"groups: {self.groups} does not divide the widths {bad}")
        return self

    def make_module(self, in_shape, n_out):
        return ResNet(in_shape, n_out, self.widths, self.blocks, self.groups, self.activation)


class PatchTransformer(nn.Module):
    """ViT-style: non-overlapping patches → linear embedding + learned positions → transformer blocks
    (bidirectional) → LayerNorm → mean over tokens → linear read-out."""

    def __init__(self, in_shape, n_out: int, patch: int, dim: int, heads: int, layers: int, mlp_width: int):
        super().__init__()
        channels, *spatial = in_shape
        self.patch = patch
        n_tokens = math.prod(s // patch for s in spatial)
        self.embed = nn.Linear(channels * patch ** len(spatial), dim)
        self.pos = nn.Parameter(0.02 * torch.randn(n_tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_width, causal=False) for _ in range(layers)])
        self.norm, self.head = LayerNorm(dim), nn.Linear(dim, n_out)

    def patches(self, x: Tensor) -> Tensor:
        """(N, C, *spatial) → (N, tokens, C·patch^dims), patches in row-major order."""
        n, c, *spatial = x.shape
        p = self.patch
        if len(spatial) == 1:
            return x.reshape(n, c, spatial[0] // p, p).permute(0, 2, 1, 3).reshape(n, -1, c * p)
        h, w = spatial
        return x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c * p * p)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.embed(self.patches(x)) + self.pos)
        return self.head(self.norm(h).mean(1))


class ViTConfig(VisionConfig, AttentionFields):
    """ViT-style patch model; ``patch`` must divide every spatial size of the input."""
    model: Literal["vit"] = Field("vit", description="ViT-style transformer on non-overlapping patches")
    patch: PositiveInt = Field(2, description="patch side in pixels (patches are patch × patch, or patch "
                               "samples in 1-D); divides every spatial size")

    def input_shape(self, X):
        shape = super().input_shape(X)
        if any(s % self.patch for s in shape[1:]):
            raise ValueError(f"problem.patch: {self.patch} does not divide the input's spatial size {list(shape[1:])}")
        return shape

    def make_module(self, in_shape, n_out):
        return PatchTransformer(in_shape, n_out, self.patch, self.d_model, self.n_heads, self.n_layers,
                                self.mlp_width or 4 * self.d_model)
