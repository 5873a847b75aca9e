"""SIGTERM: not ready at once, new work refused with 503, in-flight work finished, then exit."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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


# Also imported at start-up: a prompt of over 100 tokens creates the file named by
# PREFILL_STARTED, then takes 3 s to prefill, so SIGTERM can arrive during the prefill.
HELD_PREFILL = """
import os
import time
from pathlib import Path

from server.engine import runner

_prefill = runner.ModelRunner.prefill


def held_prefill(self, row):
    if len(row.token_ids) > 100:
        Path(os.environ["PREFILL_STARTED"]).touch()
        time.sleep(3)
    return _prefill(self, row)


runner.ModelRunner.prefill = held_prefill
"""
LONG_PROMPT = {"prompt": "x" * 300, "max_new_tokens": 60}


def hook_env(tmp_path: Path, hook: str) -> dict[str, str]:
    """Return the environment that makes a server process import ``hook`` at start-up."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(hook)
    return {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def slow_decode_env(tmp_path: Path) -> dict[str, str]:
    return hook_env(tmp_path, SLOW_DECODE)


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


def test_graceful_timeout_fails_request_in_prefill(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    started = tmp_path / "prefill-started"
    env = {**hook_env(tmp_path, HELD_PREFILL), "PREFILL_STARTED": str(started)}
    args = serve_args(tiny_model_dir, tiny_adapters[TINY_ADAPTER], graceful_timeout=0)
    with (
        ProcessServer(tmp_path / "server.log", *args, env=env) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        in_flight = pool.submit(http.post, "/generate", json=LONG_PROMPT)
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        response = in_flight.result(timeout=30)
        exit_code = server.process.wait(timeout=30)

    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["type"] == "unavailable"
    assert response.json()["error"]["message"] == "the server shut down before this request finished"
    assert exit_code in (0, -signal.SIGTERM)
    assert "graceful timeout of 0 s passed" in server.log()
