"""Between the routes and the engine: resolve adapter and rank, check every limit, submit.

All input checks happen here or in the request schemas, before the request reaches
the engine, so bad input never reaches the model.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from server.context import GenerationRecord
from server.engine import (
    Engine,
    EngineError,
    EngineStoppedError,
    GenerationRequest,
    GenerationResult,
    GenerationStream,
    QueueFullError,
    SamplingParams,
)
from server.errors import (
    AdapterNotFoundError,
    ApiError,
    GenerationError,
    InvalidRequestError,
    OverloadedError,
    UnavailableError,
)
from server.loading import AdapterInfo, LoadedModel
from server.policy import Load, RankPolicy
from server.state import ServerState

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying a replica that is shutting down.
DRAINING_RETRY_AFTER = 5
WARMUP_PROMPT = "1 + 1 ="


@dataclass(frozen=True)
class GenerationOptions:
    """A request's generation options, whatever route it came from.

    The ``*_field`` names are the route's names for the options, used in error messages
    (``max_tokens`` on the OpenAI routes, ``max_new_tokens`` on ``/generate``). ``model``
    is the OpenAI model id when the rank came from it (``arith@8``).
    """

    adapter: str | None = None
    rank: int | str | None = None
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter_field: str = "adapter"
    rank_field: str = "rank"
    max_new_tokens_field: str = "max_new_tokens"
    model: str | None = None


class GenerationService:
    """Turn validated options and a prompt into an engine request, and engine errors into API errors.

    Args:
        loaded: the model, tokenizer and adapters.
        engine: the running engine.
        policy: decides omitted and ``auto`` ranks.
        state: the server's readiness and drain flags.
        max_new_tokens_limit: the max number of tokens one request may generate.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        engine: Engine,
        policy: RankPolicy,
        state: ServerState,
        max_new_tokens_limit: int,
    ) -> None:
        self.loaded = loaded
        self.engine = engine
        self.policy = policy
        self.state = state
        self.max_new_tokens_limit = max_new_tokens_limit

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return self.loaded.adapters

    def resolve_adapter(self, name: str | None, field: str = "adapter") -> AdapterInfo:
        """Return the named adapter, or the only one when ``name`` is None."""
        names = sorted(self.adapters)
        if name is None:
            if len(names) == 1:
                return self.adapters[names[0]]
            raise InvalidRequestError(
                f"{field} is required: this server has several adapters ({', '.join(names)})",
                field=field,
                value=None,
                allowed=names,
            )
        if name not in self.adapters:
            raise AdapterNotFoundError(
                f"unknown adapter {name!r}; loaded adapters: {', '.join(names)}", field=field, value=name, allowed=names
            )
        return self.adapters[name]

    def encode_prompt(self, prompt: str, field: str = "prompt") -> list[int]:
        return self._checked_prompt(self._tokenize(prompt, field, add_special_tokens=True), field)

    def encode_chat(self, messages: list[dict[str, str]], field: str = "messages") -> list[int]:
        """Apply the tokenizer's chat template (with the assistant turn opened) and tokenize."""
        tokenizer = self.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"the base model {self.loaded.base} has no chat template; use /v1/completions or /generate",
                field=field,
            )
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # the template itself rejects some conversations, e.g. by role order
            raise InvalidRequestError(f"the chat template rejected these messages: {error}", field=field) from error
        return self._checked_prompt(self._tokenize(text, field, add_special_tokens=False), field)

    def start(
        self, request_id: str, prompt_ids: list[int], options: GenerationOptions, record: GenerationRecord
    ) -> GenerationStream:
        """Check the options against the adapter and the limits, pick the rank, and submit.

        Raises:
            ApiError: 404 unknown adapter; 422 a rank, length or token limit out of range;
                429 queue full; 503 draining.
        """
        if self.state.draining:
            raise UnavailableError(
                "the server is shutting down; retry on another replica",
                headers={"Retry-After": str(DRAINING_RETRY_AFTER)},
            )
        adapter = self.resolve_adapter(options.adapter, options.adapter_field)
        record.adapter = adapter.name
        record.rank_requested = options.rank
        record.prompt_tokens = len(prompt_ids)
        self._check_rank(adapter, options)
        max_new_tokens = self._max_new_tokens(len(prompt_ids), options)

        load = Load(self.engine.waiting_count, self.engine.running_count, self.engine.max_batch_size)
        rank = self.policy.choose(adapter, options.rank, max_new_tokens, load)
        record.rank_used = rank
        request = GenerationRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            adapter=adapter.name,
            rank=rank,
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(options.temperature, options.top_p, options.seed),
            stop=options.stop,
        )
        try:
            return self.engine.submit(request)
        except QueueFullError as error:
            raise OverloadedError(str(error), headers={"Retry-After": str(error.retry_after)}) from error
        except EngineStoppedError as error:
            raise UnavailableError(str(error), headers={"Retry-After": str(DRAINING_RETRY_AFTER)}) from error

    async def warm_up(self) -> None:
        """Generate two tokens per adapter at rank 0 and at its max rank, so the first request is not slow."""
        prompt_ids = self.encode_prompt(WARMUP_PROMPT)
        for adapter in self.adapters.values():
            for rank in sorted({0, adapter.max_rank}):
                request = GenerationRequest(
                    f"warmup-{adapter.name}-{rank}", prompt_ids, adapter.name, rank, max_new_tokens=2, warmup=True
                )
                await self.engine.submit(request).wait()

    def _tokenize(self, text: str, field: str, add_special_tokens: bool) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # JSON can escape a lone surrogate such as "\ud800"
            raise InvalidRequestError(
                f"{field} is not valid Unicode: {error.reason} at character {error.start}",
                field=field,
                value=text[max(0, error.start - 20) : error.start + 20],
                allowed="valid Unicode text",
            ) from error
        return self.loaded.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def _checked_prompt(self, prompt_ids: list[int], field: str) -> list[int]:
        context = self.loaded.context_length
        if not prompt_ids:
            raise InvalidRequestError(
                f"{field} has no tokens", field=field, value="0 tokens", allowed="1 or more tokens"
            )
        if len(prompt_ids) >= context:
            raise InvalidRequestError(
                f"{field} is {len(prompt_ids)} tokens, but the model's context is {context} tokens, which must "
                f"also hold at least one generated token; shorten it to at most {context - 1} tokens",
                field=field,
                value=f"{len(prompt_ids)} tokens",
                allowed=f"1..{context - 1} tokens",
            )
        return prompt_ids

    def _check_rank(self, adapter: AdapterInfo, options: GenerationOptions) -> None:
        rank = options.rank
        if not isinstance(rank, int) or 0 <= rank <= adapter.max_rank:
            return
        name, max_rank = adapter.name, adapter.max_rank
        if options.model is not None:
            raise InvalidRequestError(
                f"the rank in model {options.model!r} is out of range: adapter {name!r} serves ranks 0..{max_rank} "
                f"(0 is the base model); use {name}@0 to {name}@{max_rank}, or {name}@auto",
                field=options.rank_field,
                value=options.model,
                allowed=f"{name}@0..{name}@{max_rank} or {name}@auto",
            )
        raise InvalidRequestError(
            f"{options.rank_field} is out of range: got {rank}, allowed 0..{max_rank} for adapter {name!r} "
            "(0 is the base model) or 'auto'",
            field=options.rank_field,
            value=rank,
            allowed=f"0..{max_rank} or 'auto'",
        )

    def _max_new_tokens(self, prompt_tokens: int, options: GenerationOptions) -> int:
        """Return the requested token budget after checking it against the limits, or the largest allowed one."""
        field = options.max_new_tokens_field
        room = self.loaded.context_length - prompt_tokens
        max_allowed = min(self.max_new_tokens_limit, room)
        requested = options.max_new_tokens
        if requested is None:
            return max_allowed
        if requested > self.max_new_tokens_limit:
            raise InvalidRequestError(
                f"{field} must be at most {self.max_new_tokens_limit} on this server, got {requested}",
                field=field,
                value=requested,
                allowed=f"1..{self.max_new_tokens_limit}",
            )
        if requested > room:
            raise InvalidRequestError(
                f"{field} is {requested}, but the prompt's {prompt_tokens} tokens leave room for only {room} more "
                f"in the model's context of {self.loaded.context_length} tokens",
                field=field,
                value=requested,
                allowed=f"1..{max_allowed}",
            )
        return requested


async def collect(
    stream: GenerationStream, disconnected: asyncio.Future, record: GenerationRecord
) -> GenerationResult | None:
    """Wait for a whole generation unless the client disconnects first; return its result or None.

    Engine errors become API errors and are noted in ``record``.
    """
    waiting = asyncio.ensure_future(stream.wait())
    try:
        await asyncio.wait({waiting, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiting.done():
            stream.cancel()
            waiting.cancel()
            record.cancelled = True
    if record.cancelled:
        return None
    try:
        result = waiting.result()
    except EngineError as error:
        record.error = str(error)
        raise to_api_error(error) from error
    record.completion_tokens = result.completion_tokens
    record.finish_reason = result.finish_reason
    return result


def log_stream_error(error: EngineError, request_id: str) -> None:
    """Log the engine error that ended a stream: at INFO for a shutdown, which is expected, else at WARNING."""
    level = logging.INFO if isinstance(error, EngineStoppedError) else logging.WARNING
    logger.log(level, "stream of request %s ended with an error: %s", request_id, error)


def to_api_error(error: EngineError) -> ApiError:
    """Map an engine error to its API error: 503 when the engine stopped (shutdown), else 500."""
    if isinstance(error, EngineStoppedError):
        return UnavailableError(str(error), headers={"Retry-After": str(DRAINING_RETRY_AFTER)})
    return GenerationError(str(error))
