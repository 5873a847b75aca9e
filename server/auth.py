"""Bearer-token authentication for every route but the probes."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from server.errors import AuthenticationError


def require_api_key(request: Request) -> None:
    """Raise 401 unless the request carries ``Authorization: Bearer <api key>`` (when a key is set)."""
    api_key = request.app.state.settings.api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.get_secret_value().encode()
    ):
        raise AuthenticationError(
            "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


class AuthenticatedRoute(APIRoute):
    """A route that checks the API key before FastAPI reads and parses the request body.

    FastAPI runs dependencies only after parsing the body, so with a dependency a
    malformed body without a key would get 422 rather than 401.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def authenticated_handler(request: Request) -> Response:
            require_api_key(request)
            return await handler(request)

        return authenticated_handler
