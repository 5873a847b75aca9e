"""Exceptions raised by the matlora clients, one class per way a request can fail.

The server's error body is ``{"error": {"type", "message", "field", "value", "allowed",
"request_id"}}``; ``error_from_response`` turns it into the matching ``APIError`` subclass.
FastAPI's default ``{"detail": ...}`` body and OpenAI's ``{"error": {"param": ...}}`` body
are read too, so an error from a proxy or an unexpected route still gets a useful message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from clients.retry import parse_retry_after


class MatloraError(Exception):
    """Base class of every error the matlora clients raise."""


class APIConnectionError(MatloraError):
    """The server could not be reached, or the connection broke before a full response."""


class APITimeoutError(APIConnectionError):
    """A connect, read, write or pool timeout expired."""


class InvalidResponseError(MatloraError):
    """The server returned 2xx with a body that does not follow the HTTP API."""


class APIError(MatloraError):
    """The server returned an error: a 4xx/5xx status, or an error event in a stream.

    Attributes:
        status_code: the HTTP status, or None for an error event inside a 200 stream.
        type: the server's error type, e.g. ``"invalid_request"``.
        field, value, allowed: the request field at fault, the value sent and the values the
            server accepts, where the server names them.
        request_id: the server's id for the request (also in its access log).
        body: the parsed error body, or the raw text when it was not JSON.
        headers: the response headers, when a response arrived.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str | None = None,
        field: str | None = None,
        value: Any = None,
        allowed: Any = None,
        request_id: str | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.field = field
        self.value = value
        self.allowed = allowed
        self.request_id = request_id
        self.body = body
        self.headers = headers if headers is not None else {}

    def __str__(self) -> str:
        parts = [self.message]
        if self.field is not None:
            parts.append(f"field={self.field!r}")
        if self.value is not None:
            parts.append(f"value={self.value!r}")
        if self.allowed is not None:
            parts.append(f"allowed={self.allowed!r}")
        if self.request_id is not None:
            parts.append(f"request_id={self.request_id}")
        prefix = f"HTTP {self.status_code}: " if self.status_code is not None else ""
        return prefix + " ".join(parts)


class InvalidRequestError(APIError):
    """The server rejected a field of the request (400 or 422)."""


class AuthenticationError(APIError):
    """The bearer token is missing or wrong (401)."""


class NotFoundError(APIError):
    """The route or resource does not exist (404)."""


class AdapterNotFoundError(NotFoundError):
    """The requested adapter is not loaded (404). ``loaded_adapters`` lists the loaded ones."""

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self.allowed) if isinstance(self.allowed, (list, tuple)) else []


class PayloadTooLargeError(APIError):
    """The request body is over the server's size limit (413)."""


class OverloadedError(APIError):
    """The server is overloaded (429, queue full) or not ready or draining (503).

    ``retry_after`` is the server's Retry-After in seconds, or None when it sent none.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(APIError):
    """The server failed while handling the request (5xx other than 503)."""


class StreamError(APIError):
    """The server sent an error event in place of the final result of a stream."""


def _error_class(status_code: int, field: str | None) -> type[APIError]:
    if status_code in (400, 422):
        return InvalidRequestError
    if status_code == 401:
        return AuthenticationError
    if status_code == 404:
        return AdapterNotFoundError if field == "adapter" else NotFoundError
    if status_code == 413:
        return PayloadTooLargeError
    if status_code in (429, 503):
        return OverloadedError
    if status_code >= 500:
        return ServerError
    return APIError


def error_fields(body: Any) -> dict[str, Any]:
    """Extract message, type, field, value, allowed and request_id from an error body."""
    if not isinstance(body, dict):
        text = body.strip() if isinstance(body, str) else ""
        return {"message": text[:500] or "no error message in the response"}

    error = body.get("error")
    if isinstance(error, dict):
        return {
            "message": str(error.get("message") or "no error message in the response"),
            "type": error.get("type"),
            "field": error.get("field", error.get("param")),
            "value": error.get("value"),
            "allowed": error.get("allowed"),
            "request_id": error.get("request_id"),
        }

    # FastAPI's default shapes: {"detail": "Not Found"} or a list of validation errors.
    detail = body.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        location = first.get("loc") or []
        return {
            "message": str(first.get("msg", "invalid request")),
            "type": first.get("type"),
            "field": str(location[-1]) if location else None,
            "value": first.get("input"),
        }
    if detail is not None:
        return {"message": str(detail)}
    return {"message": f"unrecognised error body: {body!r}"[:500]}


def error_from_response(response: httpx.Response) -> APIError:
    """Build the ``APIError`` subclass for a 4xx/5xx response whose body has been read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text

    fields = error_fields(body)
    fields.setdefault("type", None)
    fields.setdefault("field", None)
    if fields.get("request_id") is None:
        fields["request_id"] = response.headers.get("x-request-id")

    error_class = _error_class(response.status_code, fields["field"])
    message = fields.pop("message")
    kwargs: dict[str, Any] = dict(fields, status_code=response.status_code, body=body, headers=response.headers)
    if error_class is OverloadedError:
        kwargs["retry_after"] = parse_retry_after(response.headers.get("retry-after"))
    return error_class(message, **kwargs)
