"""A scripted stand-in for the matlora server, served through ``httpx.MockTransport``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def generate_body(text: str = "85", rank: int = 8, **overrides: Any) -> dict[str, Any]:
    body = {
        "id": "req-1",
        "text": text,
        "rank": rank,
        "adapter": "arith",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 7, "completion_tokens": 2},
    }
    body.update(overrides)
    return body


def json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers={"x-request-id": "req-1", **(headers or {})})


def error_reply(status: int, message: str, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    return json_reply(status, {"error": {"message": message, "request_id": "req-1", **fields}}, headers)


def sse_reply(events: list[dict[str, Any]], headers: dict[str, str] | None = None) -> httpx.Response:
    content = "".join(f"data: {json.dumps(event)}\n\n" for event in events).encode()
    return httpx.Response(
        200,
        content=content,
        headers={"content-type": "text/event-stream; charset=utf-8", "x-request-id": "req-1", **(headers or {})},
    )


class FakeServer:
    """A fake server that responds to each request with the next scripted reply, or with ``default`` after the last.

    A reply is a response, an exception to raise (e.g. ``httpx.ConnectError``), or a
    function of the request. ``requests`` records every request received.
    """

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.default: Reply = json_reply(200, generate_body())
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if self.replies else self.default
        if isinstance(reply, Exception):
            raise reply
        if callable(reply):
            return reply(request)
        return reply

    # Reply builders, reachable from tests through the fixture because test modules
    # cannot import conftest under --import-mode=importlib.
    generate_body = staticmethod(generate_body)
    json_reply = staticmethod(json_reply)
    error_reply = staticmethod(error_reply)
    sse_reply = staticmethod(sse_reply)

    def json_bodies(self) -> list[Any]:
        return [json.loads(request.content) if request.content else None for request in self.requests]

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the retry waits of both clients instead of sleeping."""
    recorded: list[float] = []

    async def fake_async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr("clients.client.time.sleep", recorded.append)
    monkeypatch.setattr("clients.client.asyncio.sleep", fake_async_sleep)
    monkeypatch.setattr("clients.client.random.random", lambda: 0.0)
    return recorded
