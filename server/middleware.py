"""ASGI middleware: request ids, the access log and request metrics, and the body size limit.

Both are plain ASGI middleware rather than ``BaseHTTPMiddleware``, so streamed responses
pass through untouched and a client disconnect reaches the route.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import metrics
from server.context import CLIENT_CLOSED_REQUEST, generation_record, noted_error, request_id_of
from server.errors import PayloadTooLargeError, error_body, is_openai_path, render_json
from server.state import ServerState

access_logger = logging.getLogger("matlora.access")

REQUEST_ID_HEADER = "x-request-id"
REPLICA_HEADER = "x-matlora-replica"
GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
# A client-supplied request id is kept when it is short and plain; otherwise a new one is made.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """Give each request an id (the client's ``x-request-id`` if valid), return it, and log one JSON line.

    The line carries the message of the error response, if one was sent.

    Every response also names the replica in ``x-matlora-replica``.

    For generation routes it also counts the request in ``matlora_requests_total``,
    observes ``matlora_request_duration_seconds`` for 2xx responses, and tracks the
    request as in flight for the graceful drain.
    """

    def __init__(self, app: ASGIApp, state: ServerState, replica_id: str) -> None:
        self.app = app
        self.state = state
        self.replica_id = replica_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        supplied = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = supplied if _VALID_REQUEST_ID.match(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        is_generation = scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
        status = {"code": 500}

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                headers[REPLICA_HEADER] = self.replica_id
            await send(message)

        if is_generation:
            self.state.active_generations += 1
        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            if is_generation:
                self.state.active_generations -= 1
            self._log(scope, status["code"], time.perf_counter() - started, is_generation)

    def _log(self, scope: Scope, status: int, seconds: float, is_generation: bool) -> None:
        line = {
            "request_id": request_id_of(scope),
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "latency_ms": round(seconds * 1000, 1),
            "pid": os.getpid(),
        }
        if is_generation:
            record = generation_record(scope)
            if record.cancelled:
                status = line["status"] = CLIENT_CLOSED_REQUEST
            elif record.error is not None and status < 500:
                # A stream that began with 200 but failed later counts as a server error.
                status = 500
            line.update(record.as_log_fields())
            _count(record.adapter, record.rank_used, status, seconds)
        error = noted_error(scope)
        if error is not None and line.get("error") is None:
            line["error"] = error
        access_logger.info(json.dumps(line))


def _count(adapter: str | None, rank: int | None, status: int, seconds: float) -> None:
    adapter_label = adapter or "none"
    rank_label = str(rank) if rank is not None else "none"
    metrics.REQUESTS.labels(adapter_label, rank_label, f"{status // 100}xx").inc()
    if 200 <= status < 300:
        metrics.REQUEST_DURATION.labels(adapter_label, rank_label).observe(seconds)


class BodySizeLimitMiddleware:
    """Respond 413 when a request body is larger than ``max_bytes``.

    A declared ``content-length`` is checked before reading; a chunked body is counted
    while the route reads it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, send, f"{declared} bytes")
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error(f"more than {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)

    def _error(self, size: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body too large: {size}; the limit is {self.max_bytes} bytes (--max-body-bytes)",
            field="body",
            value=size,
            allowed=f"at most {self.max_bytes} bytes",
        )

    async def _reject(self, scope: Scope, send: Send, size: str) -> None:
        error = self._error(size)
        body = render_json(error_body(error, request_id_of(scope), is_openai_path(scope["path"])))
        await send(
            {
                "type": "http.response.start",
                "status": error.status_code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
