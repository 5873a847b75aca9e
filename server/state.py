"""Readiness and the graceful drain that SIGTERM starts.

On SIGTERM the replica at once reports not ready on ``/readyz`` and rejects new
generation requests with 503 and Retry-After. Requests already accepted may finish for
``graceful_timeout`` seconds; the rest then fail with 503. Only then does uvicorn get
the signal to exit, so closing the listener cuts off no accepted request.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_DRAIN_POLL_SECONDS = 0.05
# Max seconds that the requests failed at the graceful timeout get to send their 503 before uvicorn stops.
_ABORT_GRACE_SECONDS = 2.0


@dataclass
class ServerState:
    """Lifecycle flags of one server process, read by ``/readyz`` and the routes."""

    ready: bool = False
    draining: bool = False
    active_generations: int = 0


class DrainOnSigterm:
    """Replace the SIGTERM handler (uvicorn's) with a drain that calls it when done.

    Args:
        state: the flags the drain sets.
        is_idle: whether no generation is queued, running or still sending its response.
        abort: fails whatever is left when the timeout passes.
        timeout: seconds the in-flight requests get.
    """

    def __init__(
        self,
        state: ServerState,
        is_idle: Callable[[], bool],
        abort: Callable[[], None],
        timeout: float,
    ) -> None:
        self.state = state
        self.is_idle = is_idle
        self.abort = abort
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler = None
        self._task: asyncio.Task | None = None

    def install(self) -> bool:
        """Take over SIGTERM; return False (and do nothing) outside the main thread, where signals cannot be set."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._loop = asyncio.get_running_loop()
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return True

    def _on_sigterm(self, signum: int, frame) -> None:
        if self.state.draining:
            logger.warning("second SIGTERM during the drain: exiting now")
            self._exit(signum, frame)
            return
        self._loop.call_soon_threadsafe(self._start_drain, signum, frame)

    def _start_drain(self, signum: int, frame) -> None:
        self.state.draining = True
        logger.info("SIGTERM: not ready any more; finishing in-flight requests within %.0f s", self.timeout)
        self._task = self._loop.create_task(self._drain(signum, frame))

    async def _drain(self, signum: int, frame) -> None:
        started = time.monotonic()
        await _wait_until(self.is_idle, self.timeout)
        if not self.is_idle():
            logger.warning("graceful timeout of %.0f s passed: failing the requests still in flight", self.timeout)
            self.abort()
            await _wait_until(lambda: self.state.active_generations == 0, _ABORT_GRACE_SECONDS)
        logger.info("drain finished in %.1f s; shutting down", time.monotonic() - started)
        self._exit(signum, frame)

    def _exit(self, signum: int, frame) -> None:
        previous = self._previous_handler
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)


async def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    """Return when ``condition()`` is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(_DRAIN_POLL_SECONDS)
