"""Synthetic token-sequence tasks for the sequence models, generated from a seed (nothing is downloaded).

Tokens 0..V−1 are symbols and token V is a separator, so a model's input vocabulary is V + 1 and it predicts
one of V symbols at each target position. Each task returns ``(X, Y, V)``: X (n × T_in) holds token ids as
float64 (a Problem's inputs are floating point; models compare them with integers), Y (n × T_out) the target
ids (int64). Targets are the last T_out positions of the input (T_out = ``length`` for both tasks).

- ``sorting``: X = [s₁ … s_T, SEP, σ₁ … σ_{T−1}], Y = [σ₁ … σ_T] with σ = sorted(s), s uniform in 0..V−1
  (repeats allowed): the answer is produced position by position after the separator (teacher forcing).
- ``markov``: next-token prediction on a first-order Markov chain: s₀ uniform, transition rows drawn from a
  symmetric Dirichlet(``MARKOV_CONCENTRATION``), X = s₀ … s_{T−1}, Y = s₁ … s_T. The lowest reachable
  cross-entropy is the chain's conditional entropy, not 0.
"""
from __future__ import annotations

import numpy as np

MARKOV_CONCENTRATION = 0.5


def sorting(size: int, vocab: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(seed)
    s = rng.integers(0, vocab, (size, length))
    answer = np.sort(s, axis=1)
    X = np.concatenate([s, np.full((size, 1), vocab), answer[:, :-1]], axis=1)
    return X.astype(np.float64), answer.astype(np.int64), vocab


def markov_chain(vocab: int, seed: int) -> np.ndarray:
    """The task's transition matrix (rows sum to 1), drawn from ``seed``."""
    return np.random.default_rng(seed).dirichlet(np.full(vocab, MARKOV_CONCENTRATION), size=vocab)


def markov(size: int, vocab: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng([seed, 1])
    cumulative = np.cumsum(markov_chain(vocab, seed), axis=1)
    s = np.empty((size, length + 1), dtype=np.int64)
    s[:, 0] = rng.integers(0, vocab, size)
    for t in range(length):
        u = rng.random(size)
        s[:, t + 1] = np.minimum((u[:, None] > cumulative[s[:, t]]).sum(1), vocab - 1)
    return s[:, :-1].astype(np.float64), s[:, 1:], vocab


TOKEN_TASKS = {"sorting": sorting, "markov": markov}
