"""``POST /generate``: a prompt, as given or through the chat template, at the rank asked for or chosen by the policy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from server.auth import AuthenticatedRoute
from server.context import CLIENT_CLOSED_REQUEST, GenerationRecord, generation_record, request_id_of
from server.engine import EngineError, GenerationResult, GenerationStream
from server.errors import error_body
from server.schemas import GenerateRequest, GenerateResponse, Usage
from server.service import GenerationOptions, GenerationService, collect, log_stream_error, to_api_error
from server.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_event, wait_for_disconnect

RANK_HEADER = "x-matlora-rank"

router = APIRouter(route_class=AuthenticatedRoute)


@router.post("/generate", response_model=GenerateResponse, responses={200: {"content": {SSE_MEDIA_TYPE: {}}}})
async def generate(body: GenerateRequest, request: Request) -> Response:
    """Generate from ``prompt``. With ``stream: true`` the response is a stream of server-sent events."""
    service: GenerationService = request.app.state.service
    record = generation_record(request.scope)
    request_id = request_id_of(request.scope)
    options = GenerationOptions(
        adapter=body.adapter,
        rank=body.rank,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=tuple(body.stop or ()),
    )
    if body.chat:
        prompt_ids = service.encode_chat([{"role": "user", "content": body.prompt}], field="chat")
    else:
        prompt_ids = service.encode_prompt(body.prompt)
    stream = service.start(request_id, prompt_ids, options, record)
    headers = {RANK_HEADER: str(record.rank_used)}

    if body.stream:
        return StreamingResponse(_events(stream, record), media_type=SSE_MEDIA_TYPE, headers={**SSE_HEADERS, **headers})
    disconnected = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        result = await collect(stream, disconnected, record)
    finally:
        disconnected.cancel()
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(_response(result).model_dump(), headers=headers)


def _response(result: GenerationResult) -> GenerateResponse:
    return GenerateResponse(
        id=result.request_id,
        text=result.text,
        rank=result.rank,
        adapter=result.adapter,
        finish_reason=result.finish_reason,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
    )


async def _events(stream: GenerationStream, record: GenerationRecord) -> AsyncIterator[str]:
    """Yield token events, then one done or error event. A client that leaves cancels the generation.

    ``record.completion_tokens`` counts the tokens of the events sent so far, so a stream
    that ends early logs what its client received.
    """
    try:
        async for delta in stream:
            yield sse_event({"type": "token", "text": delta})
            record.completion_tokens = stream.tokens_read
        record.completion_tokens = stream.result.completion_tokens
        record.finish_reason = stream.result.finish_reason
        yield sse_event({"type": "done", **_response(stream.result).model_dump()})
    except EngineError as error:
        record.error = str(error)
        log_stream_error(error, stream.request.request_id)
        yield sse_event({"type": "error", **error_body(to_api_error(error), stream.request.request_id, openai=False)})
    finally:
        if not stream.done:
            stream.cancel()
            record.cancelled = True
