"""API errors and the one place that turns every exception into an HTTP response.

Routes under ``/v1/`` respond in OpenAI's error shape, with 400 for invalid input as
OpenAI does. The other routes respond with::

    {"error": {"type", "message", "field", "value", "allowed", "request_id"}}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.context import request_id_of

logger = logging.getLogger(__name__)

_MAX_VALUE_CHARS = 200


class ApiError(Exception):
    """An error returned to the client with ``status_code`` and a body that names what was wrong.

    Args:
        message: a sentence that says what failed and what to do.
        field: the request field at fault, dotted for nested fields.
        value: the value received (long values are cut in the response).
        allowed: the values the field accepts, in words (``"0..16 or 'auto'"``), or a list of
            them (the loaded adapter names).
        headers: extra response headers (Retry-After, WWW-Authenticate).
    """

    status_code = 500
    error_type = "internal_error"
    openai_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: Any = None,
        allowed: str | list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        Exception.__init__(self, message)
        self.message = message
        self.field = field
        self.value = value
        self.allowed = allowed
        self.headers = headers or {}


class InvalidRequestError(ApiError):
    status_code = 422
    error_type = "invalid_request"
    openai_type = "invalid_request_error"


class AdapterNotFoundError(ApiError):
    status_code = 404
    error_type = "adapter_not_found"
    openai_type = "invalid_request_error"


class AuthenticationError(ApiError):
    status_code = 401
    error_type = "unauthorized"
    openai_type = "authentication_error"


class PayloadTooLargeError(ApiError, StarletteHTTPException):
    """A request body over the size limit.

    It is also an ``HTTPException`` because it is raised while FastAPI reads the body,
    and FastAPI turns any other exception from there into a 400.
    """

    status_code = 413
    error_type = "payload_too_large"
    openai_type = "invalid_request_error"

    def __init__(self, message: str, **details: Any) -> None:
        ApiError.__init__(self, message, **details)
        self.detail = message


class OverloadedError(ApiError):
    status_code = 429
    error_type = "overloaded"
    openai_type = "rate_limit_error"


class UnavailableError(ApiError):
    status_code = 503
    error_type = "unavailable"
    openai_type = "server_error"


class GenerationError(ApiError):
    status_code = 500
    error_type = "generation_failed"
    openai_type = "server_error"


def error_body(error: ApiError, request_id: str | None, openai: bool) -> dict[str, Any]:
    """Return the JSON body for ``error`` in the shape of the route family."""
    value = _short(error.value)
    if openai:
        return {
            "error": {
                "message": error.message,
                "type": error.openai_type,
                "param": error.field,
                "code": error.error_type,
                "request_id": request_id,
            }
        }
    body = {"type": error.error_type, "message": error.message}
    if error.field is not None:
        body.update(field=error.field, value=value, allowed=error.allowed)
    body["request_id"] = request_id
    return {"error": body}


def error_response(error: ApiError, request: Request) -> Response:
    openai = is_openai_path(request.url.path)
    status = 400 if openai and isinstance(error, InvalidRequestError) else error.status_code
    body = render_json(error_body(error, request_id_of(request.scope), openai))
    return Response(body, status_code=status, headers=error.headers, media_type="application/json")


def render_json(body: dict[str, Any]) -> bytes:
    """Serialize an error body. ASCII escapes keep it valid even when it echoes a lone surrogate a client sent."""
    return json.dumps(body, ensure_ascii=True, default=str).encode()


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def install_exception_handlers(app: FastAPI, allowed_by_field: Mapping[str, str]) -> None:
    """Map API errors, invalid bodies, unknown routes and unexpected exceptions to responses.

    ``allowed_by_field`` describes the accepted values of request fields, by field name.
    """

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> Response:
        if error.status_code >= 500:
            logger.error("request %s failed: %s", request_id_of(request.scope), error.message)
        return error_response(error, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Response:
        return error_response(validation_error(error.errors(), allowed_by_field), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        api_error = ApiError(str(error.detail), headers=dict(error.headers or {}))
        api_error.status_code = error.status_code
        api_error.error_type = "not_found" if error.status_code == 404 else "http_error"
        api_error.openai_type = "invalid_request_error"
        return error_response(api_error, request)

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, error: Exception) -> Response:
        request_id = request_id_of(request.scope)
        logger.exception("request %s failed with an unexpected error", request_id)
        message = f"internal error while handling request {request_id}; the server logged the details"
        return error_response(ApiError(message), request)


def validation_error(
    errors: list[dict[str, Any]], allowed_by_field: Mapping[str, str] | None = None
) -> InvalidRequestError:
    """Turn pydantic's errors into one error.

    The first error gives ``field``, ``value`` and ``allowed`` (from ``allowed_by_field``
    when it describes the field, else from the error); the message lists every error.
    """
    described = [_describe(error, allowed_by_field or {}) for error in errors]
    field, value, allowed, _ = described[0]
    message = "; ".join(text for *_, text in described)
    return InvalidRequestError(message, field=field, value=value, allowed=allowed)


def _describe(error: dict[str, Any], allowed_by_field: Mapping[str, str]) -> tuple[str, Any, str | None, str]:
    context = error.get("ctx") or {}
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    field = context.get("field") or ".".join(location) or "body"
    value = context.get("value", error.get("input"))
    allowed = allowed_by_field.get(field) or _allowed_from_context(context)
    if error.get("type") == "json_invalid":
        message = f"the request body is not valid JSON: {context.get('error', 'decode error')}"
        return "body", None, "a JSON object", message
    if field == "body" and error.get("type") in ("missing", "model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object, sent with the header 'Content-Type: application/json'"
        return field, _short(value), "a JSON object", message
    if error.get("type") == "missing":
        return field, None, allowed, f"{field}: field required"
    if error.get("type") == "extra_forbidden":
        return field, value, "no such field", f"{field}: unknown field; check its spelling"
    if error.get("type") == "unknown_field":
        return field, None, "no such field", error.get("msg", "unknown field")
    text = f"{field}: {error.get('msg', 'invalid value')} (got {_short(value)!r})"
    if allowed:
        text += f"; allowed: {allowed}"
    return field, value, allowed, text


def _allowed_from_context(context: dict[str, Any]) -> str | None:
    bounds = []
    for key, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if key in context:
            bounds.append(f"{symbol} {context[key]}")
    if bounds:
        return " and ".join(bounds)
    if "allowed" in context:
        return str(context["allowed"])
    if "max_length" in context:
        return f"at most {context['max_length']} items"
    if "min_length" in context:
        return f"at least {context['min_length']} items"
    return None


def _short(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str) and len(value) > _MAX_VALUE_CHARS:
        return value[:_MAX_VALUE_CHARS] + f"... ({len(value)} characters)"
    if isinstance(value, (dict, list)) and len(repr(value)) > _MAX_VALUE_CHARS:
        return repr(value)[:_MAX_VALUE_CHARS] + "..."
    return value
