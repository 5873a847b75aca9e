"""Per-request facts shared by the routes and the middleware that logs and counts requests."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from starlette.types import Scope

# Nginx's status code for a request whose client closed the connection before the response.
CLIENT_CLOSED_REQUEST = 499


@dataclass
class GenerationRecord:
    """Facts about one generation request, filled in by its route, for the access log and the metrics."""

    adapter: str | None = None
    rank_requested: int | str | None = None
    rank_used: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False

    def as_log_fields(self) -> dict[str, Any]:
        return asdict(self)


def request_id_of(scope: Scope) -> str | None:
    return scope.get("state", {}).get("request_id")


def note_error(scope: Scope, message: str) -> None:
    """Keep the message of the error response sent for this request, for its access-log line."""
    scope.setdefault("state", {})["error"] = message


def noted_error(scope: Scope) -> str | None:
    return scope.get("state", {}).get("error")


def generation_record(scope: Scope) -> GenerationRecord:
    """Return the request's record, created on first use."""
    state = scope.setdefault("state", {})
    if "generation" not in state:
        state["generation"] = GenerationRecord()
    return state["generation"]
