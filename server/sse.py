"""Server-sent events: one JSON object per ``data:`` line, and waiting on a client disconnect."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Receive

SSE_MEDIA_TYPE = "text/event-stream"
# Proxies such as nginx buffer responses unless this header turns buffering off, and events must reach the client at once.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: dict[str, Any] | str) -> str:
    """Format one event: ``data: <json>`` and a blank line (a plain string is sent as it is)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client closes the connection (call after the request body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
