"""Typed Python clients for the matlora server, sync (``MatloraClient``) and async (``AsyncMatloraClient``).

Example::

    from clients.client import MatloraClient

    with MatloraClient("http://127.0.0.1:8000") as client:
        result = client.generate("What is 47 plus 38?", rank=8, max_new_tokens=16)
        print(result.text, result.rank)

        with client.generate_stream("What is 47 plus 38?", rank="auto") as stream:
            for event in stream:
                if isinstance(event, TextDelta):
                    print(event.text, end="")

Requests that fail with 429 or 503, or whose connection could not be opened, are sent
again under the client's ``RetryPolicy``. Every other failure raises at once, as one of
the ``MatloraError`` subclasses in ``clients.errors``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import httpx
from httpx_sse import EventSource

from clients import API_KEY_ENV, DEFAULT_URL
from clients.errors import (
    AdapterNotFoundError,
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    InvalidRequestError,
    InvalidResponseError,
    MatloraError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ServerError,
    StreamError,
    error_fields,
    error_from_response,
)
from clients.retry import RETRY_STATUS_CODES, RetryPolicy
from clients.types import GenerateResult, HealthStatus, ModelInfo, Rank, StreamEvent, TextDelta, Usage

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AdapterNotFoundError",
    "AsyncGenerationStream",
    "AsyncMatloraClient",
    "AuthenticationError",
    "GenerateResult",
    "GenerationStream",
    "HealthStatus",
    "InvalidRequestError",
    "InvalidResponseError",
    "MatloraClient",
    "MatloraError",
    "ModelInfo",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "Rank",
    "RetryPolicy",
    "ServerError",
    "StreamError",
    "StreamEvent",
    "TextDelta",
    "Usage",
    "build_generate_body",
]

logger = logging.getLogger(__name__)

# Generation on a CPU can take tens of seconds, but a server that does not accept the
# connection within seconds is down or overloaded.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)

# The request cannot have reached the server's handler, so sending it again is safe.
_RETRYABLE_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def build_generate_body(
    prompt: str,
    *,
    rank: Rank | None = None,
    adapter: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    chat: bool | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    """Build the JSON body of ``POST /generate``, leaving out the fields that are None.

    Ranges are not checked here because the server checks each value and responds with 422
    naming the field. Only values that JSON cannot carry raise here: a NaN or infinite
    ``temperature`` or ``top_p`` (ValueError) and a ``stop`` that is not text (TypeError).
    A single ``stop`` string is sent as a one-element list.
    """
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, Sequence) or not all(isinstance(item, str) for item in stop):
            raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
    body: dict[str, Any] = {"prompt": prompt}
    optional = {
        "rank": rank,
        "adapter": adapter,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "chat": chat,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    if stop is not None:
        body["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if stream:
        body["stream"] = True
    return body


def parse_stream_event(data: str, headers: Mapping[str, str]) -> StreamEvent | None:
    """Parse the ``data`` of one server-sent event.

    Returns a ``TextDelta`` for a ``token`` event, the ``GenerateResult`` for the final
    ``done`` event, and None for an event type this client does not know. Raises
    ``StreamError`` for an ``error`` event.
    """
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise InvalidResponseError(f"stream event is not JSON: {data!r:.200}") from exc
    if not isinstance(payload, dict):
        raise InvalidResponseError(f"stream event is not a JSON object: {data!r:.200}")

    event_type = payload.get("type")
    if event_type == "token":
        return TextDelta(str(payload.get("text", "")))
    if event_type == "done":
        return GenerateResult.from_json(payload, headers)
    if event_type == "error":
        fields = error_fields({"error": payload.get("error")})
        fields["request_id"] = fields.get("request_id") or headers.get("x-request-id")
        message = fields.pop("message")
        raise StreamError(message, body=payload, headers=headers, **fields)
    logger.debug("ignoring stream event of unknown type %r", event_type)
    return None


def _connection_error(exc: httpx.TransportError, request: httpx.Request) -> APIConnectionError:
    target = f"{request.method} {request.url}"
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"{type(exc).__name__} on {target}: {str(exc) or 'timed out'}")
    return APIConnectionError(f"{type(exc).__name__} on {target}: {exc}")


def _check_event_stream(response: httpx.Response) -> None:
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        raise InvalidResponseError(
            f"expected a text/event-stream response to a streaming request, got content-type {content_type!r}"
        )


class _ClientBase:
    """Settings and request building shared by the sync and async clients."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        retry: RetryPolicy | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.retry = retry if retry is not None else RetryPolicy()
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._headers = {"accept": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _request(
        self,
        http: httpx.Client | httpx.AsyncClient,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        timeout: float | httpx.Timeout | None,
    ) -> httpx.Request:
        headers = dict(self._headers)
        if body is not None and body.get("stream"):
            headers["accept"] = "text/event-stream"
        return http.build_request(
            method,
            self.base_url + path,
            json=body,
            headers=headers,
            timeout=self.timeout if timeout is None else timeout,
        )

    def _retry_delay(self, attempt: int, waited: float, error: MatloraError, retry: bool) -> float | None:
        """Return the wait before the next attempt, or None when ``error`` must be raised."""
        if not retry:
            return None
        retry_after = error.retry_after if isinstance(error, OverloadedError) else None
        delay = self.retry.next_delay(attempt, waited, retry_after, random.random())
        if delay is None:
            return None
        logger.warning(
            "attempt %d of %d failed (%s); retrying in %.2f s", attempt, self.retry.max_attempts, error, delay
        )
        return delay


class MatloraClient(_ClientBase):
    """A blocking client for one matlora server (or a load balancer in front of several).

    Args:
        base_url: the server's address, e.g. ``http://127.0.0.1:8000``.
        api_key: the bearer token; when None, ``$MATLORA_API_KEY`` is used if set.
        timeout: seconds, or an ``httpx.Timeout``; a streaming read times out when no
            event arrives for that long.
        retry: the retry policy for 429, 503 and connection failures;
            ``RetryPolicy(max_attempts=1)`` turns retries off.
        http_client: an ``httpx.Client`` to send through (proxies, TLS, test transports);
            the caller keeps ownership and closes it.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retry)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()

    def generate(
        self,
        prompt: str,
        *,
        rank: Rank | None = None,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        chat: bool | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> GenerateResult:
        """Generate a completion of ``prompt`` and return it once it is complete.

        ``rank`` is an integer 0..R (0 is the base model alone) or ``"auto"``; None lets
        the server's rank policy choose. ``chat=True`` sends the prompt as one user message
        through the model's chat template. Fields left as None take the server's defaults.

        Raises:
            InvalidRequestError: a field is out of range. Its ``field``, ``value`` and
                ``allowed`` name the field, the value sent and what the server accepts.
            AdapterNotFoundError: ``adapter`` is not loaded (``loaded_adapters`` lists them).
            OverloadedError: still 429/503 after the retries.
            APIConnectionError: the server could not be reached.
        """
        body = build_generate_body(
            prompt,
            rank=rank,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            chat=chat,
        )
        response = self._send("POST", "/generate", body, timeout=timeout)
        return GenerateResult.from_json(_json(response), response.headers)

    def generate_stream(
        self,
        prompt: str,
        *,
        rank: Rank | None = None,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        chat: bool | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> GenerationStream:
        """Start a streaming generation and return its events once the server has accepted it.

        Takes the same arguments as ``generate`` and raises the same errors before the
        stream starts. Use the stream as a context manager so that its connection is
        closed when the loop ends early.
        """
        body = build_generate_body(
            prompt,
            rank=rank,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            chat=chat,
            stream=True,
        )
        response = self._send("POST", "/generate", body, timeout=timeout, stream=True)
        try:
            _check_event_stream(response)
        except InvalidResponseError:
            response.close()
            raise
        return GenerationStream(response)

    def list_models(self) -> list[ModelInfo]:
        """Return the entries of ``GET /v1/models``: each adapter, and each adapter at each rank."""
        body = _json(self._send("GET", "/v1/models"))
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise InvalidResponseError(f"expected {{'data': [...]}} from /v1/models, got {body!r:.200}")
        return [ModelInfo.from_json(entry) for entry in body["data"]]

    def health(self) -> HealthStatus:
        """Probe ``GET /healthz`` once (no retry): ``ok`` is False when the server responds with 503."""
        return _health_status(self._send("GET", "/healthz", retry=False, accept_status=503))

    def ready(self) -> HealthStatus:
        """Probe ``GET /readyz`` once (no retry): ``ok`` is False while loading, warming up or draining."""
        return _health_status(self._send("GET", "/readyz", retry=False, accept_status=503))

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Poll ``/readyz`` until it returns 200, raising ``APITimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ready().ok:
                    return
            except APIConnectionError:
                pass
            if time.monotonic() >= deadline:
                raise APITimeoutError(f"{self.base_url}/readyz did not return 200 within {timeout} s")
            time.sleep(interval)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> MatloraClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        stream: bool = False,
        retry: bool = True,
        accept_status: int | None = None,
    ) -> httpx.Response:
        """Send a request, retrying under the policy, and return a response below 400.

        ``accept_status`` is one error status returned as it is rather than raised.
        A streamed response is returned open and the caller closes it.
        """
        attempt, waited = 1, 0.0
        while True:
            request = self._request(self._http, method, path, body, timeout)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error: MatloraError = _connection_error(exc, request)
                if not isinstance(exc, _RETRYABLE_TRANSPORT_ERRORS):
                    raise error from exc
            else:
                if response.status_code < 400 or response.status_code == accept_status:
                    return response
                response.read()
                response.close()
                error = error_from_response(response)
                if response.status_code not in RETRY_STATUS_CODES:
                    raise error

            delay = self._retry_delay(attempt, waited, error, retry)
            if delay is None:
                raise error
            time.sleep(delay)
            waited += delay
            attempt += 1


class AsyncMatloraClient(_ClientBase):
    """The asyncio version of ``MatloraClient``, with the same arguments and methods."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retry)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient()

    async def generate(
        self,
        prompt: str,
        *,
        rank: Rank | None = None,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        chat: bool | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> GenerateResult:
        """Generate a completion of ``prompt``; see ``MatloraClient.generate``."""
        body = build_generate_body(
            prompt,
            rank=rank,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            chat=chat,
        )
        response = await self._send("POST", "/generate", body, timeout=timeout)
        return GenerateResult.from_json(_json(response), response.headers)

    async def generate_stream(
        self,
        prompt: str,
        *,
        rank: Rank | None = None,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        chat: bool | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> AsyncGenerationStream:
        """Start a streaming generation; see ``MatloraClient.generate_stream``.

        Use ``async with`` on the stream so that its connection is closed when the loop
        ends early.
        """
        body = build_generate_body(
            prompt,
            rank=rank,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            chat=chat,
            stream=True,
        )
        response = await self._send("POST", "/generate", body, timeout=timeout, stream=True)
        try:
            _check_event_stream(response)
        except InvalidResponseError:
            await response.aclose()
            raise
        return AsyncGenerationStream(response)

    async def list_models(self) -> list[ModelInfo]:
        """Return the entries of ``GET /v1/models``; see ``MatloraClient.list_models``."""
        body = _json(await self._send("GET", "/v1/models"))
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise InvalidResponseError(f"expected {{'data': [...]}} from /v1/models, got {body!r:.200}")
        return [ModelInfo.from_json(entry) for entry in body["data"]]

    async def health(self) -> HealthStatus:
        """Probe ``GET /healthz`` once (no retry)."""
        return _health_status(await self._send("GET", "/healthz", retry=False, accept_status=503))

    async def ready(self) -> HealthStatus:
        """Probe ``GET /readyz`` once (no retry)."""
        return _health_status(await self._send("GET", "/readyz", retry=False, accept_status=503))

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Poll ``/readyz`` until it returns 200, raising ``APITimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (await self.ready()).ok:
                    return
            except APIConnectionError:
                pass
            if time.monotonic() >= deadline:
                raise APITimeoutError(f"{self.base_url}/readyz did not return 200 within {timeout} s")
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncMatloraClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        stream: bool = False,
        retry: bool = True,
        accept_status: int | None = None,
    ) -> httpx.Response:
        """Send a request, retrying under the policy; see ``MatloraClient._send``."""
        attempt, waited = 1, 0.0
        while True:
            request = self._request(self._http, method, path, body, timeout)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error: MatloraError = _connection_error(exc, request)
                if not isinstance(exc, _RETRYABLE_TRANSPORT_ERRORS):
                    raise error from exc
            else:
                if response.status_code < 400 or response.status_code == accept_status:
                    return response
                await response.aread()
                await response.aclose()
                error = error_from_response(response)
                if response.status_code not in RETRY_STATUS_CODES:
                    raise error

            delay = self._retry_delay(attempt, waited, error, retry)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            waited += delay
            attempt += 1


class GenerationStream:
    """The events of one streaming generation: ``TextDelta`` per token, then the ``GenerateResult``.

    Iterate it once. After the ``done`` event, ``result`` contains the final result. An
    ``error`` event raises ``StreamError``, and a stream that ends without a final event
    raises ``APIConnectionError``.
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.result: GenerateResult | None = None
        self._events = self._iter_events()

    def __iter__(self) -> Iterator[StreamEvent]:
        return self._events

    def until_done(self) -> GenerateResult:
        """Consume the remaining events and return the final result."""
        for _ in self._events:
            pass
        return _final_result(self)

    def close(self) -> None:
        self._events.close()
        self.response.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _iter_events(self) -> Iterator[StreamEvent]:
        try:
            for sse in EventSource(self.response).iter_sse():
                if not sse.data:
                    continue
                event = parse_stream_event(sse.data, self.response.headers)
                if isinstance(event, GenerateResult):
                    self.result = event
                    yield event
                    return
                if event is not None:
                    yield event
        except httpx.TransportError as exc:
            raise _connection_error(exc, self.response.request) from exc
        finally:
            self.response.close()
        raise APIConnectionError(f"the stream from {self.response.url} ended before its final 'done' event")


class AsyncGenerationStream:
    """The asyncio version of ``GenerationStream``."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.result: GenerateResult | None = None
        self._events = self._iter_events()

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._events

    async def until_done(self) -> GenerateResult:
        """Consume the remaining events and return the final result."""
        async for _ in self._events:
            pass
        return _final_result(self)

    async def aclose(self) -> None:
        await self._events.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _iter_events(self) -> AsyncIterator[StreamEvent]:
        try:
            async for sse in EventSource(self.response).aiter_sse():
                if not sse.data:
                    continue
                event = parse_stream_event(sse.data, self.response.headers)
                if isinstance(event, GenerateResult):
                    self.result = event
                    yield event
                    return
                if event is not None:
                    yield event
        except httpx.TransportError as exc:
            raise _connection_error(exc, self.response.request) from exc
        finally:
            await self.response.aclose()
        raise APIConnectionError(f"the stream from {self.response.url} ended before its final 'done' event")


def _final_result(stream: GenerationStream | AsyncGenerationStream) -> GenerateResult:
    # A stream that raised part-way is exhausted without a result.
    if stream.result is None:
        raise MatloraError(f"the stream from {stream.response.url} ended without a final result")
    return stream.result


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise InvalidResponseError(
            f"{response.request.method} {response.request.url} returned {response.status_code} "
            f"with a body that is not JSON: {response.text!r:.200}"
        ) from exc


def _health_status(response: httpx.Response) -> HealthStatus:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return HealthStatus(ok=response.is_success, status_code=response.status_code, body=body)
