"""Latencies measured while serving, read by the rank policy."""

from __future__ import annotations

import threading
from collections.abc import Iterable

DEFAULT_SMOOTHING = 0.2


class ServingStats:
    """Exponentially weighted averages of decode time per (adapter, rank) and of completion length.

    The engine's worker thread writes; request handlers read. ``smoothing`` is the weight
    of each new observation.
    """

    def __init__(self, smoothing: float = DEFAULT_SMOOTHING) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self._lock = threading.Lock()
        self._token_seconds: dict[tuple[str, int], float] = {}
        self._completion_tokens: dict[str, float] = {}

    def observe_decode_step(self, seconds: float, keys: Iterable[tuple[str, int]]) -> None:
        """Record the time to one more token of the rows at each (adapter, rank) in ``keys``.

        That time is a decode step plus the prefills that ran before it.
        """
        with self._lock:
            for key in set(keys):
                self._token_seconds[key] = self._smooth(self._token_seconds.get(key), seconds)

    def observe_completion(self, adapter: str, completion_tokens: int) -> None:
        with self._lock:
            self._completion_tokens[adapter] = self._smooth(self._completion_tokens.get(adapter), completion_tokens)

    def token_seconds(self, adapter: str) -> dict[int, float]:
        """Return the average seconds per decoded token by rank, for the ranks measured so far."""
        with self._lock:
            return {rank: value for (name, rank), value in self._token_seconds.items() if name == adapter}

    def completion_tokens(self, adapter: str) -> float | None:
        """Return the average number of tokens a request to ``adapter`` generated, or None before the first."""
        with self._lock:
            return self._completion_tokens.get(adapter)

    def _smooth(self, average: float | None, value: float) -> float:
        if average is None:
            return float(value)
        return average + self.smoothing * (value - average)
