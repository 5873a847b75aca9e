"""The generation engine: one worker thread that owns the model and batches continuously.

Requests arrive from the asyncio event loop with :meth:`Engine.submit` and wait in a
bounded queue. At every iteration the worker admits waiting requests into the batch,
prefills each new prompt, then runs one decode step for every running row. From
:meth:`Engine.submit` until it finishes, fails or is dropped after a cancel, a request is
in exactly one of the waiting, prefilling and running lists, so :meth:`Engine.abort_all`
and the gauges always see it.
Finished or cancelled rows leave after the step and their caches are freed, so requests
join and leave between any two tokens. Text deltas and the final result travel
back to the event loop through :class:`GenerationStream`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from server import metrics
from server.engine.attention import RowKV
from server.engine.runner import ModelRunner, RowInput
from server.engine.sampling import SamplingParams, next_token
from server.engine.stats import ServingStats
from server.engine.text import TextAssembler

logger = logging.getLogger(__name__)


class EngineError(Exception):
    """Base class of the errors the engine raises to request handlers."""


class QueueFullError(EngineError):
    """The waiting queue is at its bound; ``retry_after`` is a wait estimate in seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the server is at capacity: {waiting} requests are already waiting; retry later")
        self.waiting = waiting
        self.retry_after = retry_after


class EngineStoppedError(EngineError):
    """The engine no longer accepts or runs requests (draining or shut down)."""


class GenerationFailedError(EngineError):
    """A forward pass failed while this request was in the batch."""


@dataclass(frozen=True)
class GenerationRequest:
    """A request the HTTP layer has validated: token ids, the adapter and rank to run at, and how to sample.

    A ``warmup`` request is left out of the Prometheus metrics and the serving stats.
    """

    request_id: str
    prompt_ids: list[int]
    adapter: str
    rank: int
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    warmup: bool = False


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation. ``finish_reason`` is ``stop`` (EOS or a stop string) or ``length``."""

    request_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter: str
    rank: int
    time_to_first_token: float | None


class GenerationStream:
    """The request handler's side of one submitted request.

    Iterate it for the text deltas; :attr:`result` is set when the iteration ends, and
    the iteration raises the engine's error if the generation failed. :attr:`tokens_read`
    is the number of tokens generated up to the last delta read. :meth:`cancel` stops the
    generation at the next step (for a client that went away). The engine's worker thread
    reports through the ``send_*`` methods, which are thread-safe.
    """

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.result: GenerationResult | None = None
        self.tokens_read = 0
        self.cancelled = False
        self._loop = loop
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._done = False

    @property
    def done(self) -> bool:
        """Whether the result or the error has been read."""
        return self._done

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[str]:
        while not self._done:
            kind, payload = await self._events.get()
            if kind == "delta":
                text, self.tokens_read = payload
                yield text
                continue
            self._done = True
            if kind == "error":
                raise payload
            self.result = payload

    async def wait(self) -> GenerationResult:
        """Read the whole stream and return the result."""
        async for _ in self:
            pass
        return self.result

    def send_delta(self, text: str, completion_tokens: int) -> None:
        self._send("delta", (text, completion_tokens))

    def send_result(self, result: GenerationResult) -> None:
        self._send("result", result)

    def send_error(self, error: EngineError) -> None:
        self._send("error", error)

    def _send(self, kind: str, payload: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop closed during shutdown, so no handler is left to read the event
            logger.debug("dropped a %s event of request %s: event loop closed", kind, self.request.request_id)


@dataclass(eq=False)
class _Sequence:
    """A request inside the worker: its cache, tokens so far and text."""

    stream: GenerationStream
    text: TextAssembler
    generator: torch.Generator | None
    submitted_at: float
    kv: RowKV | None = None
    last_token: int | None = None
    completion_tokens: int = 0
    first_token_at: float | None = None
    finished: bool = False

    @property
    def request(self) -> GenerationRequest:
        return self.stream.request


class Engine:
    """Continuous batching over one model, with per-row adapter, rank and sampling.

    Args:
        model: a causal LM with the adapters loaded; the engine's thread is its only user.
        tokenizer: the model's tokenizer (decoding, pad and EOS tokens).
        max_batch_size: max number of requests in the running batch.
        max_queue: max number of requests waiting to join it; past that :meth:`submit` raises
            :class:`QueueFullError`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_batch_size: int = 16,
        max_queue: int = 64,
    ) -> None:
        # Every request waits in the queue before it joins the batch, so a queue of 0 would reject all.
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size} and {max_queue}")
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.runner = ModelRunner(model, pad_token_id)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.stats = ServingStats()

        # The worker changes these lists only under the lock, so another thread finds each request in one of them.
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []  # admitted into the batch, prompt not run yet
        self._running: list[_Sequence] = []
        self._condition = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="matlora-engine", daemon=True)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        """Return the number of requests in the batch, including those whose prompt is being prefilled."""
        return len(self._prefilling) + len(self._running)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queue a request and return its stream. Call from the event loop's thread.

        Raises:
            EngineStoppedError: the engine is draining or stopped.
            QueueFullError: ``max_queue`` requests are already waiting.
        """
        stream = GenerationStream(request, asyncio.get_running_loop())
        sequence = _Sequence(
            stream=stream,
            text=TextAssembler(self.tokenizer, request.stop),
            generator=request.sampling.make_generator(self.runner.device),
            submitted_at=time.perf_counter(),
        )
        with self._condition:
            if not self._accepting or not self.is_alive:
                raise EngineStoppedError("the server is shutting down and accepts no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(len(self._waiting), self.estimate_wait_seconds(request.adapter))
            self._waiting.append(sequence)
            self._update_gauges()
            self._condition.notify()
        return stream

    def estimate_wait_seconds(self, adapter: str) -> int:
        """Estimate (whole seconds, at least 1) how long until a queued request would start."""
        token_seconds = max(self.stats.token_seconds(adapter).values(), default=0.0)
        tokens = self.stats.completion_tokens(adapter) or 0.0
        batches_ahead = len(self._waiting) / self.max_batch_size
        return max(1, round(batches_ahead * tokens * token_seconds))

    def stop_accepting(self) -> None:
        """Reject new requests from now on; queued and running ones go on."""
        with self._condition:
            self._accepting = False

    def abort_all(self, error: EngineError) -> None:
        """Fail every queued, prefilling and running request with ``error`` (the end of a drain that timed out).

        The streams get the error at once. A request in the middle of a forward pass
        leaves the batch after that pass.
        """
        with self._condition:
            sequences = [*self._waiting, *self._prefilling, *self._running]
            self._waiting.clear()
            for sequence in sequences:
                sequence.stream.cancel()
                sequence.stream.send_error(error)
            self._update_gauges()
            self._condition.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the worker thread after its current step."""
        with self._condition:
            self._accepting = False
            self._stopping = True
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        logger.info("engine started: max batch size %d, max queue %d", self.max_batch_size, self.max_queue)
        while True:
            with self._condition:
                while not self._stopping and not self._waiting and not self._running:
                    self._condition.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            # A running row waits for this iteration's prefills too, so its time per token counts them.
            iteration_started = time.perf_counter()
            for sequence in admitted:
                self._prefill(sequence)
            self._drop_cancelled()
            if self._running:
                self._decode(iteration_started)
            self._drop_cancelled()
        for sequence in [*self._waiting, *self._prefilling, *self._running]:
            sequence.stream.send_error(EngineStoppedError("the server stopped before this request finished"))
        logger.info("engine stopped")

    def _admit(self) -> list[_Sequence]:
        """Move waiting requests into the batch while it has room and return them; the caller holds the lock.

        Cancelled waiting requests are dropped first, so they neither take a slot nor count as queued.
        """
        self._waiting = deque(s for s in self._waiting if not s.stream.cancelled)
        while self._waiting and self.running_count < self.max_batch_size:
            self._prefilling.append(self._waiting.popleft())
        self._update_gauges()
        return list(self._prefilling)

    def _prefill(self, sequence: _Sequence) -> None:
        """Run a new request's prompt, take its first token, and move it to the running rows unless it is done."""
        request = sequence.request
        if not request.warmup:
            metrics.BATCH_SIZE.observe(1)
            metrics.PROMPT_TOKENS.labels(request.adapter, str(request.rank)).inc(len(request.prompt_ids))
        sequence.kv = RowKV(capacity=len(request.prompt_ids) + request.max_new_tokens)
        row = RowInput(request.prompt_ids, 0, sequence.kv, request.adapter, request.rank)
        # NOTE: a long prompt runs in one forward pass, so the running batch waits for all of it.
        # Chunked prefill, which interleaves prompt chunks with decode steps, would avoid that.
        try:
            logits = self.runner.prefill(row)
        except Exception:
            self._fail([sequence], "prefill")
        else:
            if not sequence.stream.cancelled:  # aborted during the pass: _drop_cancelled releases it
                self._take_token(sequence, logits)
        with self._condition:
            self._prefilling.remove(sequence)
            if not sequence.finished:
                self._running.append(sequence)
            self._update_gauges()

    def _decode(self, iteration_started: float) -> None:
        """Run one decode step for the whole batch and drop the rows that finished.

        The time per token given to the rank policy starts at ``iteration_started``.
        """
        sequences = self._running
        observed = [s for s in sequences if not s.request.warmup]
        if observed:
            metrics.BATCH_SIZE.observe(len(observed))
        rows = [RowInput([s.last_token], len(s.kv), s.kv, s.request.adapter, s.request.rank) for s in sequences]
        try:
            logits = self.runner.decode(rows)
        except Exception:
            self._fail(sequences, "decode step")
        else:
            keys = [(s.request.adapter, s.request.rank) for s in observed]
            if keys:
                self.stats.observe_decode_step(time.perf_counter() - iteration_started, keys)
            for sequence, row_logits in zip(sequences, logits):
                self._take_token(sequence, row_logits)
        self._remove_finished()

    def _take_token(self, sequence: _Sequence, logits: torch.Tensor) -> None:
        """Choose the sequence's next token from its logits and append it; a failure fails this request only."""
        try:
            token = next_token(logits, sequence.request.sampling, sequence.generator)
            self._append_token(sequence, token)
        except Exception:
            self._fail([sequence], "token choice")

    def _fail(self, sequences: list[_Sequence], stage: str) -> None:
        """Fail requests after an error, logging their ids; their clients get a 500. The engine goes on."""
        request_ids = ", ".join(s.request.request_id for s in sequences)
        logger.exception("%s failed; failing requests %s", stage, request_ids)
        for sequence in sequences:
            if not sequence.finished:
                self._release(sequence)
                sequence.stream.send_error(
                    GenerationFailedError(f"generation failed for request {sequence.request.request_id}")
                )

    def _append_token(self, sequence: _Sequence, token: int) -> None:
        request = sequence.request
        if sequence.first_token_at is None:
            sequence.first_token_at = time.perf_counter()
            if not request.warmup:
                metrics.TIME_TO_FIRST_TOKEN.labels(request.adapter, str(request.rank)).observe(
                    sequence.first_token_at - sequence.submitted_at
                )
        sequence.last_token = token
        sequence.completion_tokens += 1

        if token in self.eos_token_ids:
            self._finish(sequence, "stop")
            return
        delta = sequence.text.add_token(token)
        if delta:
            sequence.stream.send_delta(delta, sequence.completion_tokens)
        if sequence.text.stopped:
            self._finish(sequence, "stop")
        elif sequence.completion_tokens >= request.max_new_tokens:
            self._finish(sequence, "length")

    def _finish(self, sequence: _Sequence, finish_reason: str) -> None:
        delta = sequence.text.finish()
        if delta:
            sequence.stream.send_delta(delta, sequence.completion_tokens)
        request = sequence.request
        result = GenerationResult(
            request_id=request.request_id,
            text=sequence.text.text,
            finish_reason=finish_reason,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=sequence.completion_tokens,
            adapter=request.adapter,
            rank=request.rank,
            time_to_first_token=sequence.first_token_at - sequence.submitted_at,
        )
        if not request.warmup:
            self.stats.observe_completion(request.adapter, sequence.completion_tokens)
        self._release(sequence)
        sequence.stream.send_result(result)

    def _release(self, sequence: _Sequence) -> None:
        """Mark a sequence finished, count its tokens and free its cache."""
        request = sequence.request
        if not request.warmup:
            metrics.GENERATED_TOKENS.labels(request.adapter, str(request.rank)).inc(sequence.completion_tokens)
        sequence.finished = True
        sequence.kv = None

    def _drop_cancelled(self) -> None:
        cancelled = [s for s in self._running if s.stream.cancelled]
        if not cancelled:
            return
        for sequence in cancelled:
            logger.info("cancelled request %s after %d tokens", sequence.request.request_id, sequence.completion_tokens)
            self._release(sequence)
        self._remove_finished()

    def _remove_finished(self) -> None:
        with self._condition:
            self._running = [s for s in self._running if not s.finished]
            self._update_gauges()

    def _update_gauges(self) -> None:
        """Set the queue-depth and running gauges, leaving out warm-up requests; the caller holds the lock."""
        metrics.QUEUE_DEPTH.set(sum(not s.request.warmup for s in self._waiting))
        in_batch = [*self._prefilling, *self._running]
        metrics.RUNNING_REQUESTS.set(sum(not s.request.warmup for s in in_batch))


def _eos_token_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    """Return the token ids that end a generation: the generation config's EOS ids and the tokenizer's."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
