"""Per-row next-token choice: greedy, or temperature and nucleus (top-p) sampling.

Each sampled request draws from its own ``torch.Generator`` seeded by its ``seed``, so a
request with a seed gets the same tokens whatever other requests share its batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

# Temperatures below this are greedy, as in vLLM: dividing logits by a smaller one overflows
# float32, and the distribution is already all on the top token.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request. ``temperature`` 0 is greedy, which ignores ``top_p`` and ``seed``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        """Return the request's generator: seeded by ``seed``, else by fresh randomness; None when greedy."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device=device).manual_seed(seed)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits (vocab,): the top one when greedy, else a sample."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
        # is below top_p. The top token always stays, also for a top_p below float32's resolution.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        outside = mass_before >= params.top_p
        outside[0] = False
        choice = torch.multinomial(sorted_probs.masked_fill(outside, 0.0), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
