"""Typed results of the matlora HTTP API, parsed from the server's JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from clients.errors import InvalidResponseError

Rank = int | Literal["auto"]


@dataclass(frozen=True)
class Usage:
    """Token counts of one generation."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerateResult:
    """The result of ``POST /generate``, or the final ``done`` event of a stream.

    ``rank`` is the rank the server used, which for ``rank="auto"`` or an omitted rank is
    the policy's choice. ``request_id`` comes from the ``x-request-id`` header (or the body's
    ``id`` when the header is missing) and ``headers`` contains every response header.
    """

    id: str
    text: str
    rank: int
    adapter: str | None
    finish_reason: str
    usage: Usage
    request_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any, headers: Mapping[str, str] | None = None) -> GenerateResult:
        """Parse a response body, raising ``InvalidResponseError`` when a field is missing."""
        headers = headers if headers is not None else {}
        if not isinstance(body, dict):
            raise InvalidResponseError(f"expected a JSON object from /generate, got {body!r:.200}")
        try:
            usage = body["usage"]
            return cls(
                id=str(body["id"]),
                text=str(body["text"]),
                rank=int(body["rank"]),
                adapter=body.get("adapter"),
                finish_reason=str(body["finish_reason"]),
                usage=Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"])),
                request_id=headers.get("x-request-id") or str(body["id"]),
                headers=headers,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidResponseError(f"invalid /generate result {body!r:.300}: {exc!r}") from exc


@dataclass(frozen=True)
class TextDelta:
    """One ``token`` event of a stream: the text added since the previous event."""

    text: str


StreamEvent = TextDelta | GenerateResult


@dataclass(frozen=True)
class ModelInfo:
    """One entry of ``GET /v1/models``: an adapter (``arith``) or an adapter at a rank (``arith@8``).

    ``ranks`` is the list of ranks the server reports for the entry, when it reports one.
    ``raw`` is the whole entry as sent.
    """

    id: str
    ranks: tuple[int, ...] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def adapter(self) -> str:
        return self.id.partition("@")[0]

    @property
    def rank(self) -> int | None:
        """The rank after ``@`` in the id, or None for a plain adapter name."""
        _, sep, rank = self.id.partition("@")
        return int(rank) if sep and rank.isdigit() else None

    @classmethod
    def from_json(cls, entry: Any) -> ModelInfo:
        if not isinstance(entry, dict) or "id" not in entry:
            raise InvalidResponseError(f"expected a model entry with an 'id', got {entry!r:.200}")
        ranks = entry.get("ranks")
        parsed_ranks = tuple(int(rank) for rank in ranks) if isinstance(ranks, list) else None
        return cls(id=str(entry["id"]), ranks=parsed_ranks, raw=entry)


@dataclass(frozen=True)
class HealthStatus:
    """The response of ``/healthz`` or ``/readyz``. ``ok`` is True on 2xx and False on 503."""

    ok: bool
    status_code: int
    body: Any = None
