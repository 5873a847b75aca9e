"""When and how long the clients wait before sending a request again.

Only requests that the server cannot have started are retried: a 429 (queue full), a
503 (not ready or draining) and a connection that was never opened. A read timeout or a
connection that broke after the request went out is not retried, because the generation
may already have run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

RETRY_STATUS_CODES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter that honours the server's Retry-After.

    The backoff after failed attempt ``n`` is ``min(max_backoff, initial_backoff * 2 ** (n - 1))``.
    Without Retry-After the wait is the backoff shortened by a random fraction of at most
    ``jitter``. With Retry-After the wait is Retry-After plus a random extra of at most
    ``jitter`` times the backoff. So it is never shorter than the server requested, and
    clients turned away at the same moment do not all come back together. Retrying stops
    after ``max_attempts`` attempts in all, or when the next wait would take the total
    time slept past ``max_wait`` seconds.

    Example::

        RetryPolicy(max_attempts=1)  # never retry
    """

    max_attempts: int = 4
    max_wait: float = 30.0
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if self.max_attempts < 1:
            problems.append(f"max_attempts={self.max_attempts} must be at least 1 (1 means no retry)")
        if self.max_wait < 0:
            problems.append(f"max_wait={self.max_wait} must be >= 0 seconds")
        if self.initial_backoff < 0:
            problems.append(f"initial_backoff={self.initial_backoff} must be >= 0 seconds")
        if self.max_backoff < self.initial_backoff:
            problems.append(f"max_backoff={self.max_backoff} must be >= initial_backoff={self.initial_backoff}")
        if not 0 <= self.jitter <= 1:
            problems.append(f"jitter={self.jitter} must be between 0 and 1")
        if problems:
            raise ValueError("invalid RetryPolicy: " + "; ".join(problems))

    def backoff(self, attempt: int, random_fraction: float) -> float:
        """Return the backoff in seconds after failed attempt ``attempt`` (1-based).

        ``random_fraction`` in [0, 1) scales the jitter, e.g. ``random.random()``.
        """
        delay = min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1))
        return delay * (1 - self.jitter * random_fraction)

    def next_delay(
        self, attempt: int, waited: float, retry_after: float | None, random_fraction: float
    ) -> float | None:
        """Return the seconds to wait before the next attempt, or None to give up.

        Args:
            attempt: the number of the attempt that just failed, starting at 1.
            waited: the seconds already slept between earlier attempts.
            retry_after: the server's Retry-After in seconds, if it sent one.
            random_fraction: a number in [0, 1) that picks the jitter.
        """
        if attempt >= self.max_attempts:
            return None
        if retry_after is None:
            delay = self.backoff(attempt, random_fraction)
        else:
            delay = retry_after + self.jitter * random_fraction * self.backoff(attempt, 0.0)
        if waited + delay > self.max_wait:
            return None
        return delay


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Return a Retry-After header as seconds from now, or None when it is absent or invalid.

    The header is either a number of seconds or an HTTP date (RFC 9110, section 10.2.3).
    A date in the past gives 0.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None

    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, moment.timestamp() - current)
