"""Ragged attention: every batch row keeps its own unpadded key/value cache.

Rows in a continuous batch have different lengths. Padding them to one length and
masking moves each row's keys to other positions, which changes the summation order
inside the attention kernel, so a row's output would depend on its batch mates.
Measured on CPU SDPA with bfloat16: a left-padded row differed from the same row alone
in 7 of 20 cases. Here attention runs row by row on the row's own keys and values,
with exactly the shapes the row has when it runs alone.

The pieces plug into transformers through its extension points: a
:class:`~transformers.Cache` whose ``update`` returns one key/value tensor per row, and
an attention function, registered as :data:`ATTENTION_NAME`, that consumes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, Cache

ATTENTION_NAME = "matlora_ragged"


class RowKV:
    """Key and value tensors of one sequence: one buffer of ``capacity`` tokens per layer.

    Buffers are allocated on the first write, shaped (1, kv_heads, capacity, head_dim),
    and filled in place, so appending a token never copies the cached ones.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def __len__(self) -> int:
        """Return the number of cached tokens (the same in every layer between forward passes)."""
        return self.lengths[0] if self.lengths else 0

    def append(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key`` and ``value`` (1, kv_heads, n, head_dim) after the cached tokens and return all of them."""
        if layer_idx == len(self.keys):
            shape = (1, key.shape[1], self.capacity, key.shape[3])
            self.keys.append(key.new_empty(shape))
            self.values.append(value.new_empty(shape))
            self.lengths.append(0)
        start = self.lengths[layer_idx]
        end = start + key.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens in a row sized for {self.capacity}")
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


class RaggedCache(Cache):
    """The cache of one forward pass: one :class:`RowKV` per batch row."""

    def __init__(self, rows: list[RowKV]) -> None:
        super().__init__(layers=[])
        self.rows = rows

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if key_states.shape[0] != len(self.rows):
            raise ValueError(f"got keys for {key_states.shape[0]} rows but the cache has {len(self.rows)} rows")
        keys, values = [], []
        for b, row in enumerate(self.rows):
            key, value = row.append(layer_idx, key_states[b : b + 1], value_states[b : b + 1])
            keys.append(key)
            values.append(value)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((len(row) for row in self.rows), default=0)


def ragged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: list[torch.Tensor],
    value: list[torch.Tensor],
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attend each row's queries to that row's cached keys and values.

    ``query`` is (batch, heads, new_tokens, head_dim); ``key`` and ``value`` hold one
    (1, kv_heads, length, head_dim) tensor per row, as :class:`RaggedCache` returns them.
    A row's new tokens are its whole prompt (causal among themselves) or one token that
    attends to the whole cache. Returns (batch, new_tokens, heads, head_dim), the layout of
    transformers' attention functions.
    """
    if not isinstance(key, list):
        raise TypeError(f"{ATTENTION_NAME} attention needs a RaggedCache, got keys of type {type(key).__name__}")
    new_tokens = query.shape[2]
    outputs = []
    for b in range(query.shape[0]):
        cached = key[b].shape[2]
        if new_tokens > 1 and new_tokens != cached:
            raise ValueError(
                f"{ATTENTION_NAME} attention takes a whole prompt or one new token per row; "
                f"got {new_tokens} new tokens after {cached - new_tokens} cached ones"
            )
        outputs.append(
            F.scaled_dot_product_attention(
                query[b : b + 1],
                key[b],
                value[b],
                is_causal=new_tokens > 1,
                scale=scaling,
                enable_gqa=query.shape[1] != key[b].shape[1],
            )
        )
    return torch.cat(outputs).transpose(1, 2).contiguous(), None


def enable_ragged_attention(model: nn.Module) -> None:
    """Register :func:`ragged_attention` with transformers and switch ``model`` to it."""
    AttentionInterface.register(ATTENTION_NAME, ragged_attention)
    model.set_attn_implementation(ATTENTION_NAME)
