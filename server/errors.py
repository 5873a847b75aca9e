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

from server.context import note_error, request_id_of
from server.validation import FieldProblem, describe, short_value

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error returned to the client with ``status_code`` and a body that names what was wrong.

    Args:
        message: a sentence that says what failed and what to do.
        field: the request field at fault, dotted for nested fields.
        value: the value received (long values are cut, and NaN and infinities written as
            strings, in the response).
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


class ModelNotFoundError(AdapterNotFoundError):
    """An unknown id in ``GET /v1/models/{id}``, with OpenAI's error code for it."""

    error_type = "model_not_found"


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
    """Return the body for ``error`` in the shape of the route family; it serializes as standard JSON."""
    value = short_value(error.value)
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
    """Build the response for ``error`` and note its message for the access log."""
    note_error(request.scope, error.message)
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
            # A 503 is expected while the server drains for a shutdown, so it is no server fault.
            level = logging.INFO if isinstance(error, UnavailableError) else logging.ERROR
            logger.log(level, "request %s failed: %s", request_id_of(request.scope), error.message)
        return error_response(error, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Response:
        return error_response(validation_error(error.errors(), allowed_by_field), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 400 and error.__cause__ is not None:
            # FastAPI raises a bare 400 "There was an error parsing the body" from the parser's exception.
            return error_response(body_parse_error(error.__cause__), request)
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
    problems = [_body_problem(error) or describe(error, allowed_by_field) for error in errors]
    first = problems[0]
    message = "; ".join(problem.message for problem in problems)
    return InvalidRequestError(message, field=first.field, value=first.value, allowed=first.allowed)


def body_parse_error(cause: BaseException) -> InvalidRequestError:
    """Describe why a request body could not be parsed, from the parser's exception."""
    if isinstance(cause, UnicodeDecodeError):
        offending = cause.object[cause.start : cause.start + 1].hex()
        return InvalidRequestError(
            f"the request body is not valid {cause.encoding.upper()}: {cause.reason} (byte 0x{offending} at "
            f"offset {cause.start}); send JSON encoded as UTF-8",
            field="body",
            value=f"byte 0x{offending} at offset {cause.start}",
            allowed="a JSON object encoded as UTF-8",
        )
    if isinstance(cause, RecursionError):
        return InvalidRequestError(
            "the request body nests arrays or objects too deeply for the JSON parser; request bodies need only "
            "a few levels of nesting",
            field="body",
            allowed="a JSON object nested a few levels deep",
        )
    return InvalidRequestError(
        f"the request body could not be parsed: {type(cause).__name__}: {cause}", field="body", allowed="a JSON object"
    )


def _body_problem(error: dict[str, Any]) -> FieldProblem | None:
    """Describe an error of the body as a whole (not JSON, or not an object), else return None."""
    kind = error.get("type")
    if kind == "json_invalid":
        position = error.get("loc", ("body", None))[-1]
        detail = (error.get("ctx") or {}).get("error", "decode error")
        message = f"the request body is not valid JSON: {detail} at character {position}"
        return FieldProblem("body", None, "a JSON object", message)
    if tuple(error.get("loc", ())) == ("body",) and kind in ("missing", "model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object, sent with the header 'Content-Type: application/json'"
        return FieldProblem("body", short_value(error.get("input")), "a JSON object", message)
    return None
