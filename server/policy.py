"""Rank policies: the rank a request runs at when it omits ``rank`` or requests ``"auto"``.

- ``max``: the adapter's max rank R.
- ``fixed``: ``--default-rank``.
- ``auto``: the largest trained rank whose predicted latency meets ``--target-latency-ms``,
  the smallest trained rank when none does. The prediction for rank r is::

      seconds_per_token(r) * expected_tokens * batches_to_wait_for

  ``seconds_per_token(r)`` is the running average time between two tokens of a row at
  rank r: a decode step plus the prompt prefills that ran before it. It grows with the
  batch size and with the rate of new requests. ``expected_tokens`` is the average
  completion length so far, capped by the request's ``max_new_tokens``.
  ``batches_to_wait_for`` is 1 when the request joins the batch at once, plus one per
  full batch of requests queued ahead of it. With no load the policy picks R; under load
  it steps down, and back up when the queue drains.

Only the adapter's trained ranks are candidates (never 0): they are the prefixes the
training objective made good, and rank 0 would silently drop the adapter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

from server import metrics
from server.engine.stats import ServingStats
from server.loading import AdapterInfo

logger = logging.getLogger(__name__)

PolicyName = Literal["auto", "fixed", "max"]
AUTO = "auto"


@dataclass(frozen=True)
class Load:
    """The engine's load: requests waiting, requests running, and the batch size limit."""

    waiting: int
    running: int
    max_batch_size: int

    def batches_to_wait_for(self) -> int:
        """Return 1 if a new request joins the batch at once, plus one per full batch queued before it."""
        free_slots = self.max_batch_size - self.running
        queued_past_free = self.waiting + 1 - free_slots
        if queued_past_free <= 0:
            return 1
        return 1 + math.ceil(queued_past_free / self.max_batch_size)


class RankPolicy:
    """Choose ranks for requests that leave them open.

    Args:
        name: what an omitted rank means: ``auto``, ``fixed`` or ``max``.
        default_rank: the rank of the ``fixed`` policy.
        target_latency_ms: the latency the ``auto`` choice aims to meet.
        stats: the latencies measured while serving.
    """

    def __init__(
        self,
        name: PolicyName,
        default_rank: int | None,
        target_latency_ms: float,
        stats: ServingStats,
    ) -> None:
        if name == "fixed" and default_rank is None:
            raise ValueError("the fixed rank policy needs a default rank")
        self.name = name
        self.default_rank = default_rank
        self.target_seconds = target_latency_ms / 1000
        self.stats = stats

    def choose(self, adapter: AdapterInfo, requested: int | str | None, max_new_tokens: int, load: Load) -> int:
        """Return the rank to run at: ``requested`` if it is a number, else the policy's choice."""
        if isinstance(requested, int):
            return requested
        if requested == AUTO or self.name == "auto":
            return self.choose_auto(adapter, max_new_tokens, load)
        if self.name == "fixed":
            return self.default_rank
        return adapter.max_rank

    def choose_auto(self, adapter: AdapterInfo, max_new_tokens: int, load: Load) -> int:
        """Return the largest trained rank predicted to meet the target (the smallest if none does)."""
        candidates = sorted(set(adapter.train_ranks) | {adapter.max_rank})
        predictions = self.predict_seconds(adapter, candidates, max_new_tokens, load)
        meeting = [rank for rank in candidates if predictions[rank] <= self.target_seconds]
        # NOTE: every rank is assumed to generate the adapter's average completion length. Where
        # low ranks generate longer completions, the smallest rank can be slower than R.
        rank = meeting[-1] if meeting else candidates[0]
        logger.debug(
            "auto rank %d for %s (target %.3f s, predicted %s, load %s)",
            rank,
            adapter.name,
            self.target_seconds,
            {r: round(p, 3) for r, p in predictions.items()},
            load,
        )
        metrics.POLICY_RANK_CHOICES.labels(adapter.name, str(rank)).inc()
        metrics.POLICY_RANK.labels(adapter.name).set(rank)
        return rank

    def predict_seconds(
        self, adapter: AdapterInfo, ranks: list[int], max_new_tokens: int, load: Load
    ) -> dict[int, float]:
        """Return the predicted latency of a new request at each rank in ``ranks``."""
        measured = self.stats.token_seconds(adapter.name)
        average_tokens = self.stats.completion_tokens(adapter.name)
        expected_tokens = max_new_tokens if average_tokens is None else min(max_new_tokens, average_tokens)
        batches = load.batches_to_wait_for()
        return {rank: _seconds_per_token(measured, rank) * expected_tokens * batches for rank in ranks}


def _seconds_per_token(measured: dict[int, float], rank: int) -> float:
    """Return the measured time per token at ``rank``, else at the nearest measured rank above it
    (a larger rank costs at least as much), else below it; 0 when nothing is measured yet."""
    if rank in measured:
        return measured[rank]
    above = [r for r in measured if r > rank]
    if above:
        return measured[min(above)]
    below = [r for r in measured if r < rank]
    return measured[max(below)] if below else 0.0
