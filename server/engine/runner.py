"""Forward passes whose result for a request does not depend on the other requests in the batch.

A greedy response must be the same token for token whether its request runs alone or
batched with others. Floating-point sums are not associative, so that needs every
number of a request to be computed in the same order in both cases:

- A prompt is prefilled on its own, with no padding: the same call as when alone.
- Decode steps batch one token per request. Attention runs per row on the row's own
  cache (``attention.py``). The adapters compute their one-token deltas in float64
  (``matlora.layer``), whose rounding differences are far below one step of the model's
  dtype.
- The base model's matrix multiplications take all rows at once. CPU GEMM libraries use
  other kernels, with another summation order, for very few rows: oneDNN's bfloat16 path
  here changes kernels below 3 rows for some shapes and is row-invariant from there on.
  So a decode step always has at least ``MIN_DECODE_ROWS`` rows, topped up with filler
  rows whose results are thrown away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import matlora
from server.engine.attention import RaggedCache, RowKV, enable_ragged_attention

# NOTE: measured for oneDNN 3.12 bfloat16 kernels on an AVX512-BF16 CPU (torch 2.13). Other
# libraries (MKL float32, cuBLAS) change summation order at any row count, so there a batched
# greedy response can differ from the lone one in rare near-ties.
MIN_DECODE_ROWS = 4


@dataclass
class RowInput:
    """One row of a forward pass: its new tokens, its cache, and the adapter and rank it runs at.

    ``position`` is the position of the first new token, which is the number of tokens
    already in ``kv``.
    """

    token_ids: list[int]
    position: int
    kv: RowKV
    adapter: str
    rank: int


class ModelRunner:
    """Runs prefill and decode steps of a causal LM with matlora adapters.

    Args:
        model: a Hugging Face causal LM; it is switched to ragged attention.
        filler_token_id: the input token of filler rows.
    """

    def __init__(self, model: nn.Module, filler_token_id: int) -> None:
        enable_ragged_attention(model)
        self.model = model
        self.filler_token_id = filler_token_id
        self.device = next(model.parameters()).device

    def prefill(self, row: RowInput) -> torch.Tensor:
        """Run one prompt (``row.position`` 0, empty cache) and return its next-token logits, (vocab,) float32."""
        return self._forward([row])[0]

    def decode(self, rows: list[RowInput]) -> torch.Tensor:
        """Run one new token per row and return the next-token logits, (len(rows), vocab) float32."""
        real_rows = len(rows)
        # Fillers share the first row's adapter and rank: a batch at one rank then stays one
        # group, which skips the adapters' per-group row gathering.
        fillers = [
            RowInput([self.filler_token_id], 0, RowKV(capacity=1), rows[0].adapter, rows[0].rank)
            for _ in range(MIN_DECODE_ROWS - real_rows)
        ]
        return self._forward(rows + fillers)[:real_rows]

    def _forward(self, rows: list[RowInput]) -> torch.Tensor:
        width = max(len(row.token_ids) for row in rows)
        if width > 1 and len(rows) > 1:
            raise ValueError(f"prompts are prefilled one at a time; got {len(rows)} rows of up to {width} tokens")
        input_ids = torch.tensor([row.token_ids for row in rows], dtype=torch.long)
        position_ids = torch.tensor([list(range(row.position, row.position + width)) for row in rows])
        cache = RaggedCache([row.kv for row in rows])

        with torch.inference_mode(), matlora.at_rank([row.rank for row in rows], adapter=[row.adapter for row in rows]):
            output = self.model(
                input_ids=input_ids.to(self.device),
                position_ids=position_ids.to(self.device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return output.logits[:, -1].float()
