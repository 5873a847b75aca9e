"""A client that disconnects cancels its generation at the next step."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest

from tests.server.conftest import TINY_ADAPTER, ThreadServer

MAX_NEW_TOKENS = 64
STEP_DELAY_S = 0.02


@pytest.fixture
def slow_decode(tiny_server: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Slow every decode step down, so a request of 64 tokens runs for over a second; return the step sizes."""
    runner = tiny_server.engine.runner
    decode = runner.decode
    steps: list[int] = []

    def slow(rows):
        steps.append(len(rows))
        time.sleep(STEP_DELAY_S)
        return decode(rows)

    monkeypatch.setattr(runner, "decode", slow)
    return steps


def wait_until_idle(server: ThreadServer, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while server.engine.running_count or server.engine.waiting_count:
        assert time.monotonic() - started < timeout, "the engine still runs the request"
        time.sleep(0.01)
    return time.monotonic() - started


def access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> dict:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == "matlora.access" and request_id in record.getMessage():
                return json.loads(record.getMessage())
        time.sleep(0.02)
    raise AssertionError(f"no access-log line for {request_id}")


def test_stream_disconnect_cancels(
    tiny_server: ThreadServer, slow_decode: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="matlora.access")
    body = {"prompt": "count:", "adapter": TINY_ADAPTER, "max_new_tokens": MAX_NEW_TOKENS, "stream": True}
    headers = {"x-request-id": "cancel-stream"}

    with httpx.Client(base_url=tiny_server.url, timeout=30.0) as http:
        with http.stream("POST", "/generate", json=body, headers=headers) as response:
            next(response.iter_lines())  # the first token arrived; now leave

    wait_until_idle(tiny_server)
    line = access_line(caplog, "cancel-stream")
    assert line["status"] == 499
    assert line["cancelled"] is True
    assert len(slow_decode) < MAX_NEW_TOKENS - 1
    # The tokens of the events sent before the client left: the prefill's token and one per decode step at most.
    assert 1 <= line["completion_tokens"] <= 1 + len(slow_decode)


def test_request_disconnect_cancels(
    tiny_server: ThreadServer, slow_decode: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="matlora.access")
    body = {"prompt": "count:", "adapter": TINY_ADAPTER, "max_new_tokens": MAX_NEW_TOKENS}
    headers = {"x-request-id": "cancel-whole"}

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny_server.url}/generate", json=body, headers=headers, timeout=0.3)

    wait_until_idle(tiny_server)
    line = access_line(caplog, "cancel-whole")
    assert line["status"] == 499
    assert line["cancelled"] is True
    assert len(slow_decode) < MAX_NEW_TOKENS - 1


def test_cancelled_rows_leave_others_running(tiny_server: ThreadServer, slow_decode: list[int]) -> None:
    body = {"prompt": "count:", "adapter": TINY_ADAPTER, "max_new_tokens": 20}

    with httpx.Client(base_url=tiny_server.url, timeout=30.0) as http:
        with http.stream("POST", "/generate", json={**body, "stream": True, "max_new_tokens": MAX_NEW_TOKENS}) as gone:
            next(gone.iter_lines())
        kept = http.post("/generate", json=body)

    assert kept.status_code == 200
    assert kept.json()["usage"]["completion_tokens"] <= 20
    wait_until_idle(tiny_server)
