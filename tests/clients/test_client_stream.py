"""Streaming generation: server-sent events parsed into text deltas and the final result."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from clients.client import (
    APIConnectionError,
    AsyncMatloraClient,
    GenerateResult,
    InvalidRequestError,
    InvalidResponseError,
    MatloraClient,
    RetryPolicy,
    StreamError,
    TextDelta,
    Usage,
)


def make_client(server) -> MatloraClient:
    http = httpx.Client(transport=server.transport)
    return MatloraClient("http://matlora.test", http_client=http, retry=RetryPolicy(max_attempts=1))


def token_events(server, *texts):
    events = [{"type": "token", "text": text} for text in texts]
    done = {"type": "done", **server.generate_body(text="".join(texts), rank=4)}
    return [*events, done]


def test_stream_request(server):
    server.default = server.sse_reply(token_events(server, "8", "5"))
    with make_client(server) as client, client.generate_stream("What is 47 plus 38?", rank=4) as stream:
        stream.until_done()

    (request,) = server.requests
    assert request.headers["accept"] == "text/event-stream"
    assert json.loads(request.content) == {"prompt": "What is 47 plus 38?", "rank": 4, "stream": True}


def test_stream_events(server):
    server.default = server.sse_reply(token_events(server, "8", "5"), headers={"x-request-id": "abc"})
    with make_client(server) as client, client.generate_stream("hi") as stream:
        events = list(stream)

    assert events == [
        TextDelta("8"),
        TextDelta("5"),
        GenerateResult(
            id="req-1",
            text="85",
            rank=4,
            adapter="arith",
            finish_reason="stop",
            usage=Usage(prompt_tokens=7, completion_tokens=2),
            request_id="abc",
        ),
    ]
    assert stream.result == events[-1]


def test_stream_split_across_chunks(server):
    payload = b"".join(f"data: {json.dumps(event)}\r\n\r\n".encode() for event in token_events(server, "a", "b"))
    chunks = [payload[index : index + 7] for index in range(0, len(payload), 7)]
    server.default = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(chunks))
    with make_client(server) as client, client.generate_stream("hi") as stream:
        events = list(stream)
    assert [event.text for event in events] == ["a", "b", "ab"]


def test_stream_ignores_comments_and_unknown_events(server):
    body = (
        b": ping\n\n"
        b'data: {"type": "token", "text": "x"}\n\n'
        b"event: heartbeat\n\n"
        b'data: {"type": "progress", "step": 1}\n\n'
        + f"data: {json.dumps({'type': 'done', **server.generate_body(text='x')})}\n\n".encode()
    )
    server.default = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
    with make_client(server) as client, client.generate_stream("hi") as stream:
        events = list(stream)
    assert [type(event) for event in events] == [TextDelta, GenerateResult]


def test_stream_error_event(server):
    error = {"type": "server_error", "message": "generation failed", "request_id": "req-9"}
    server.default = server.sse_reply([{"type": "token", "text": "8"}, {"type": "error", "error": error}])
    with make_client(server) as client, client.generate_stream("hi") as stream:
        received = []
        with pytest.raises(StreamError) as caught:
            for event in stream:
                received.append(event)

    assert received == [TextDelta("8")]
    assert caught.value.status_code is None
    assert caught.value.type == "server_error"
    assert caught.value.request_id == "req-9"
    assert str(caught.value) == "generation failed request_id=req-9"


def test_stream_without_done_event(server):
    server.default = server.sse_reply([{"type": "token", "text": "8"}])
    with make_client(server) as client, client.generate_stream("hi") as stream:
        with pytest.raises(APIConnectionError, match="ended before its final 'done' event"):
            stream.until_done()


def test_stream_event_not_json(server):
    server.default = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b"data: {oops\n\n")
    with make_client(server) as client, client.generate_stream("hi") as stream:
        with pytest.raises(InvalidResponseError, match="not JSON"):
            list(stream)


def test_stream_rejected_before_start(server):
    server.default = server.error_reply(422, "top_p out of range", field="top_p", value=1.5, allowed="0 < top_p <= 1")
    with make_client(server) as client, pytest.raises(InvalidRequestError) as caught:
        client.generate_stream("hi", top_p=1.5)
    assert caught.value.field == "top_p"


def test_stream_wrong_content_type(server):
    server.default = server.json_reply(200, server.generate_body())
    with make_client(server) as client, pytest.raises(InvalidResponseError, match="text/event-stream"):
        client.generate_stream("hi")


def test_stream_connection_drop(server):
    def broken_body():
        yield b'data: {"type": "token", "text": "8"}\n\n'
        raise httpx.ReadError("connection reset")

    server.default = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=broken_body())
    with make_client(server) as client, client.generate_stream("hi") as stream:
        with pytest.raises(APIConnectionError, match="connection reset"):
            list(stream)


def test_stream_closed_early(server):
    server.default = server.sse_reply(token_events(server, "8", "5"))
    with make_client(server) as client:
        with client.generate_stream("hi") as stream:
            first = next(iter(stream))
        assert first == TextDelta("8")
        assert stream.response.is_closed
        assert stream.result is None


def test_async_stream_events(server):
    server.default = server.sse_reply(token_events(server, "4", "2"))

    async def main():
        http = httpx.AsyncClient(transport=server.transport)
        async with AsyncMatloraClient("http://matlora.test", http_client=http) as client:
            stream = await client.generate_stream("hi", rank="auto")
            async with stream:
                events = [event async for event in stream]
            return events, stream.result

    events, result = asyncio.run(main())
    assert events[:2] == [TextDelta("4"), TextDelta("2")]
    assert result.text == "42"
    assert result.rank == 4
    assert json.loads(server.requests[0].content) == {"prompt": "hi", "rank": "auto", "stream": True}


def test_async_stream_error_event(server):
    server.default = server.sse_reply([{"type": "error", "error": {"message": "out of memory"}}])

    async def main():
        http = httpx.AsyncClient(transport=server.transport)
        async with AsyncMatloraClient("http://matlora.test", http_client=http) as client:
            async with await client.generate_stream("hi") as stream:
                await stream.until_done()

    with pytest.raises(StreamError, match="out of memory"):
        asyncio.run(main())
