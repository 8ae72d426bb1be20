"""A small causal transformer (GPT-style, hand-written LayerNorm) for the token tasks of ``tasks.py``.

One example is one row of token ids, given as floats (a Problem casts its inputs to its dtype); the model
compares them with the integers 0..V, so the embedding is a one-hot matrix product, differentiable to any order.
The model reads the whole input causally and returns logits (N × T_out × V) at the last T_out positions, the
positions that have targets. Loss conventions (the Problem's): ``ce`` is the cross-entropy in nats averaged over
examples and target positions; ``mse`` is ½‖f − onehot‖² summed over target positions and symbols, averaged
over examples.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from flowsim.models.base import NetworkConfig
from flowsim.models.datasets import DatasetSpec
from flowsim.models.layers import Block, LayerNorm
from flowsim.models.tasks import TOKEN_TASKS


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
        ids = torch.arange(self.embed.shape[0], device=tokens.device, dtype=tokens.dtype)
        onehot = (tokens[..., None] == ids).to(self.embed.dtype)
        h = self.blocks(onehot @ self.embed + self.pos)
        return self.head(self.norm(h[:, -self.n_predict:]))


class TransformerConfig(NetworkConfig):
    """Causal transformer on a token task (``dataset: {name: sorting | markov, vocab, length, size, seed}``).

    Token embeddings are N(0, 1), position embeddings N(0, 0.02²), linear layers PyTorch's default.
    """
    model: Literal["transformer"] = "transformer"
    dataset: DatasetSpec = DatasetSpec(name="sorting")
    loss: Literal["mse", "ce"] = "ce"
    d_model: PositiveInt = 32
    n_heads: PositiveInt = 2
    n_layers: PositiveInt = 2
    mlp_width: Optional[PositiveInt] = Field(None, description="hidden width of the block MLPs (4·d_model)")

    @model_validator(mode="after")
    def _checks(self):
        if self.dataset.name not in TOKEN_TASKS:
            raise ValueError(f"dataset: the transformer needs a token task ({', '.join(TOKEN_TASKS)})")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide d_model = {self.d_model}")
        return self

    def make_module(self, in_shape, n_out):
        return CausalTransformer(n_out, in_shape[0], self.dataset.length, self.d_model, self.n_heads,
                                 self.n_layers, self.mlp_width or 4 * self.d_model)
