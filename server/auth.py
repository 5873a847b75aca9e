"""Bearer-token authentication for every route but the probes."""

from __future__ import annotations

import hmac

from fastapi import Request

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
