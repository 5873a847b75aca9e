"""OpenAI-compatible routes: ``/v1/models``, ``/v1/models/{id}``, ``/v1/completions`` and ``/v1/chat/completions``.

``model`` is an adapter name, served at the rank the policy picks, or ``NAME@RANK``
(``arith@8``, ``arith@auto``). Responses and stream chunks follow OpenAI's shapes, so
OpenAI client libraries work unchanged.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from server.auth import AuthenticatedRoute
from server.context import CLIENT_CLOSED_REQUEST, GenerationRecord, generation_record, request_id_of
from server.engine import EngineError, GenerationResult, GenerationStream
from server.errors import InvalidRequestError, ModelNotFoundError, error_body
from server.openai_schemas import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from server.routes.generate import RANK_HEADER
from server.service import GenerationOptions, GenerationService, collect, log_stream_error, to_api_error
from server.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_event, wait_for_disconnect

router = APIRouter(prefix="/v1", route_class=AuthenticatedRoute)

OWNER = "matlora"
# A rank in a model id. A minus sign is accepted so that "arith@-1" is reported as a rank out of range.
_RANK_IN_MODEL = re.compile(r"-?\d+")


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """List every adapter, then each ``NAME@RANK`` it can serve."""
    return {"object": "list", "data": list(_models(request).values())}


@router.get("/models/{model_id}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """Return one entry of ``/v1/models``; an unknown id gets 404 with code ``model_not_found``."""
    models = _models(request)
    if model_id in models:
        return models[model_id]
    service: GenerationService = request.app.state.service
    adapters = sorted(service.adapters.values(), key=lambda adapter: adapter.name)
    allowed = [f"{a.name}, {a.name}@0..{a.name}@{a.max_rank}" for a in adapters]
    raise ModelNotFoundError(
        f"unknown model {model_id!r}; the models are {'; '.join(allowed)} (GET /v1/models lists them)",
        field="model",
        value=model_id,
        allowed=allowed,
    )


def _models(request: Request) -> dict[str, dict[str, Any]]:
    """Return the model entries by id: each adapter, then each ``NAME@RANK`` it can serve."""
    service: GenerationService = request.app.state.service
    created = request.app.state.started_at
    models = {}
    for adapter in service.adapters.values():
        ranks = list(range(adapter.max_rank + 1))
        common = {"object": "model", "created": created, "owned_by": OWNER, "max_rank": adapter.max_rank}
        models[adapter.name] = {"id": adapter.name, **common, "ranks": ranks, "train_ranks": list(adapter.train_ranks)}
        for rank in ranks:
            model_id = f"{adapter.name}@{rank}"
            models[model_id] = {"id": model_id, **common, "parent": adapter.name, "rank": rank}
    return models


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    service: GenerationService = request.app.state.service
    prompt_ids = service.encode_prompt(body.prompt)
    return await _serve(body, body.max_tokens, prompt_ids, request, chat=False)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    service: GenerationService = request.app.state.service
    messages = [{"role": message.role, "content": message.text()} for message in body.messages]
    prompt_ids = service.encode_chat(messages)
    return await _serve(body, body.token_limit, prompt_ids, request, chat=True)


def parse_model(model: str) -> tuple[str, int | str | None]:
    """Split ``NAME@RANK`` into the adapter name and the rank (an int, ``"auto"``, or None without ``@``).

    A negative rank is returned as it is, for the range check to report.
    """
    name, separator, rank = model.partition("@")
    if not separator:
        return model, None
    if rank == "auto":
        return name, rank
    if _RANK_IN_MODEL.fullmatch(rank):
        return name, int(rank)
    raise InvalidRequestError(
        f"model must be NAME or NAME@RANK with RANK an integer or 'auto', got {model!r}",
        field="model",
        value=model,
        allowed="NAME, NAME@RANK (e.g. arith@8) or NAME@auto",
    )


def _options(body: OpenAIRequest, max_tokens: int | None) -> GenerationOptions:
    adapter, model_rank = parse_model(body.model)
    if model_rank is not None and body.rank is not None and model_rank != body.rank:
        raise InvalidRequestError(
            f"rank {body.rank!r} contradicts the rank in model {body.model!r}; give the rank once",
            field="rank",
            value=body.rank,
            allowed=repr(model_rank),
        )
    rank = model_rank if model_rank is not None else body.rank
    return GenerationOptions(
        adapter=adapter,
        rank=rank,
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        adapter_field="model",
        rank_field="model" if model_rank is not None else "rank",
        max_new_tokens_field="max_tokens",
        model=body.model if model_rank is not None else None,
    )


async def _serve(
    body: OpenAIRequest, max_tokens: int | None, prompt_ids: list[int], request: Request, chat: bool
) -> Response:
    service: GenerationService = request.app.state.service
    record = generation_record(request.scope)
    request_id = request_id_of(request.scope)
    stream = service.start(request_id, prompt_ids, _options(body, max_tokens), record)
    chunk = _Chunks(chat, request_id, f"{record.adapter}@{record.rank_used}")
    headers = {RANK_HEADER: str(record.rank_used)}

    if body.stream:
        events = _events(stream, record, chunk, body.include_usage)
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers={**SSE_HEADERS, **headers})
    disconnected = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        result = await collect(stream, disconnected, record)
    finally:
        disconnected.cancel()
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(chunk.whole(result), headers=headers)


async def _events(
    stream: GenerationStream, record: GenerationRecord, chunk: _Chunks, include_usage: bool
) -> AsyncIterator[str]:
    """Yield OpenAI stream chunks and ``[DONE]``; a client that leaves cancels the generation.

    ``record.completion_tokens`` counts the tokens of the chunks sent so far, so a stream
    that ends early logs what its client received.
    """
    try:
        first = chunk.first()
        if first is not None:
            yield sse_event(first)
        async for delta in stream:
            yield sse_event(chunk.delta(delta))
            record.completion_tokens = stream.tokens_read
        result = stream.result
        record.completion_tokens = result.completion_tokens
        record.finish_reason = result.finish_reason
        yield sse_event(chunk.finish(result.finish_reason))
        if include_usage:
            yield sse_event(chunk.usage(result))
    except EngineError as error:
        record.error = str(error)
        log_stream_error(error, stream.request.request_id)
        yield sse_event(error_body(to_api_error(error), stream.request.request_id, openai=True))
    finally:
        if not stream.done:
            stream.cancel()
            record.cancelled = True
    yield sse_event("[DONE]")


class _Chunks:
    """Build the response body or the stream chunks of one request, as a text or chat completion."""

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        prefix = "chatcmpl" if chat else "cmpl"
        self.common = {"id": f"{prefix}-{request_id}", "created": int(time.time()), "model": model}

    def whole(self, result: GenerationResult) -> dict[str, Any]:
        if self.chat:
            content = {"message": {"role": "assistant", "content": result.text}}
        else:
            content = {"text": result.text}
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": result.finish_reason}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.common, "object": kind, "choices": [choice], "usage": _usage(result)}

    def first(self) -> dict[str, Any] | None:
        """Return the chunk that opens a chat stream with the assistant role (None for text completions)."""
        if not self.chat:
            return None
        return self._chunk({"delta": {"role": "assistant", "content": ""}}, None)

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk({"delta": {"content": text}} if self.chat else {"text": text}, None)

    def finish(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({"delta": {}} if self.chat else {"text": ""}, finish_reason)

    def usage(self, result: GenerationResult) -> dict[str, Any]:
        return {**self.common, "object": self._object, "choices": [], "usage": _usage(result)}

    @property
    def _object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, content: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}
        return {**self.common, "object": self._object, "choices": [choice]}


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
