"""Sequence models for the token tasks of ``tasks.py``: a small causal transformer (GPT-style, hand-written
LayerNorm) and a one-layer LSTM (hand-written cell, no fused kernel).

One example is one row of token ids, given as floats (a Problem casts its inputs to its dtype); the models
compare them with the integers 0..V, so the embedding is a one-hot matrix product, differentiable to any order.
A model reads the whole input causally and returns logits (N × T_out × V) at the last T_out positions, the
positions that have targets. Loss conventions (the Problem's): ``ce`` is the cross-entropy in nats averaged over
examples and target positions; ``mse`` is ½‖f − onehot‖² summed over target positions and symbols, averaged
over examples.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from flowsim.models.base import AttentionFields, NetworkConfig
from flowsim.models.datasets import DatasetSpec
from flowsim.models.layers import Block, LayerNorm
from flowsim.models.tasks import TOKEN_TASKS


def one_hot(tokens: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """(…, T) float or integer token ids → (…, T, n) one-hot rows in ``dtype``."""
    ids = torch.arange(n, device=tokens.device, dtype=tokens.dtype)
    return (tokens[..., None] == ids).to(dtype)


class CausalTransformer(nn.Module):
    """Token one-hot @ embedding + learned positions → causal pre-norm blocks → LayerNorm → linear read-out."""

    def __init__(self, vocab: int, length: int, n_predict: int, dim: int, heads: int, layers: int, mlp_width: int):
        super().__init__()
        self.n_predict = n_predict
        self.embed = nn.Parameter(torch.randn(vocab + 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(length, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_width, causal=True) for _ in range(layers)])
        self.norm, self.head = LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.blocks(one_hot(tokens, self.embed.shape[0], self.embed.dtype) @ self.embed + self.pos)
        return self.head(self.norm(h[:, -self.n_predict:]))


class LSTM(nn.Module):
    """One-hot tokens → one LSTM layer (gates i, f, g, o from one linear map of [x_t, h_{t−1}]; h₀ = c₀ = 0)
    → linear read-out of h_t at the target positions."""

    def __init__(self, vocab: int, n_predict: int, hidden: int):
        super().__init__()
        self.vocab, self.n_predict, self.hidden = vocab, n_predict, hidden
        self.cell = nn.Linear(vocab + 1 + hidden, 4 * hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = one_hot(tokens, self.vocab + 1, self.cell.weight.dtype)
        h = c = x.new_zeros(x.shape[0], self.hidden)
        outputs = []
        for t in range(x.shape[1]):
            i, f, g, o = self.cell(torch.cat([x[:, t], h], -1)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return self.head(torch.stack(outputs[-self.n_predict:], 1))


class SequenceConfig(NetworkConfig):
    """A model on a token task (``dataset: {name: sorting | markov, vocab, length, size, seed}``)."""
    dataset: DatasetSpec = Field(DatasetSpec(name="sorting"), description="a token task: sorting or markov, "
                                 "by name or as a mapping (see `problem.dataset`)")
    loss: Literal["mse", "ce"] = Field("ce", description="ce = cross-entropy in nats averaged over examples and "
                                       "target positions, or mse = ½‖f − onehot‖² summed over target positions, "
                                       "averaged over examples")

    @model_validator(mode="after")
    def _token_task(self):
        if self.dataset.name not in TOKEN_TASKS:
            raise ValueError(f"dataset: the {self.model} needs a token task ({', '.join(TOKEN_TASKS)})")
        return self


class LSTMConfig(SequenceConfig):
    """One-layer LSTM; weights PyTorch's default ``nn.Linear`` initialization."""
    model: Literal["lstm"] = Field("lstm", description="one-layer LSTM on a token task")
    hidden: PositiveInt = Field(32, description="LSTM state size (of h and of c)")

    def make_module(self, in_shape, n_out):
        return LSTM(n_out, self.dataset.length, self.hidden)


class TransformerConfig(SequenceConfig, AttentionFields):
    """Causal transformer. Token embeddings are N(0, 1), position embeddings N(0, 0.02²), linear layers
    PyTorch's default."""
    model: Literal["transformer"] = Field("transformer", description="causal (GPT-style) transformer on a "
                                          "token task")

    def make_module(self, in_shape, n_out):
        return CausalTransformer(n_out, in_shape[0], self.dataset.length, self.d_model, self.n_heads,
                                 self.n_layers, self.mlp_width or 4 * self.d_model)
