"""SIGTERM: not ready at once, new work refused with 503, in-flight work finished, then exit."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import TINY_ADAPTER, ProcessServer

LONG_GENERATION = {"prompt": "Once upon a time", "max_new_tokens": 400, "stream": True}

# Imported by the server process at start-up (Python loads `sitecustomize` from the path):
# each decode step sleeps 10 ms, so the in-flight request is still running when SIGTERM
# arrives however loaded the test machine is.
SLOW_DECODE = """
import time
from server.engine import runner

_decode = runner.ModelRunner.decode


def slow_decode(self, rows):
    time.sleep(0.01)
    return _decode(self, rows)


runner.ModelRunner.decode = slow_decode
"""


@pytest.fixture
def slow_decode_env(tmp_path: Path) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_DECODE)
    return {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}


def serve_args(tiny_model_dir: Path, adapter_dir: Path, graceful_timeout: float) -> list[str]:
    return [
        "--base", str(tiny_model_dir), "--adapter", f"{TINY_ADAPTER}={adapter_dir}",
        "--max-new-tokens-limit", "400", "--graceful-timeout", str(graceful_timeout), "--no-warmup",
    ]  # fmt: skip


def read_events(lines: Iterator[str]) -> list[tuple[float, dict]]:
    """Read the rest of a stream, noting when each event arrived."""
    return [(time.monotonic(), json.loads(line[len("data: ") :])) for line in lines if line.startswith("data: ")]


def test_sigterm_drains_in_flight_requests(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path, slow_decode_env: dict[str, str]
) -> None:
    args = serve_args(tiny_model_dir, tiny_adapters[TINY_ADAPTER], graceful_timeout=30)
    with (
        ProcessServer(tmp_path / "server.log", *args, env=slow_decode_env) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        with http.stream("POST", "/generate", json=LONG_GENERATION) as in_flight:
            lines = in_flight.iter_lines()
            first = next(lines)
            server.process.send_signal(signal.SIGTERM)
            sent_at = time.monotonic()
            readyz = http.get("/readyz")
            while readyz.status_code == 200 and time.monotonic() - sent_at < 5:
                readyz = http.get("/readyz")
            refused = http.post("/generate", json={"prompt": "late", "max_new_tokens": 1})
            events = read_events(lines)
        exit_code = server.process.wait(timeout=30)

    assert first.startswith("data: ")
    assert readyz.status_code == 503
    assert readyz.json() == {"status": "draining"}
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "unavailable"
    assert events[-1][1]["type"] == "done"
    assert sum(arrived > sent_at for arrived, _ in events) > 10  # still generating after SIGTERM
    assert exit_code in (0, -signal.SIGTERM)
    assert "drain finished" in server.log()


def test_sigterm_past_graceful_timeout_fails_leftovers(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path, slow_decode_env: dict[str, str]
) -> None:
    args = serve_args(tiny_model_dir, tiny_adapters[TINY_ADAPTER], graceful_timeout=0)
    with (
        ProcessServer(tmp_path / "server.log", *args, env=slow_decode_env) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        with http.stream("POST", "/generate", json=LONG_GENERATION) as in_flight:
            lines = in_flight.iter_lines()
            next(lines)
            server.process.send_signal(signal.SIGTERM)
            events = read_events(lines)
        exit_code = server.process.wait(timeout=30)

    last = events[-1][1]
    assert last["type"] == "error"
    assert last["error"]["type"] == "unavailable"
    assert exit_code in (0, -signal.SIGTERM)
    assert "graceful timeout of 0 s passed" in server.log()
