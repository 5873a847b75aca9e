"""The local stack when every replica is full, when one exits, and when the stack stops.

Each replica of this stack runs one request and queues one more (``--max-batch-size 1
--max-queue 1``), so four long streams fill it. A burst sent meanwhile must get the
replicas' own 429 with Retry-After (or a 200 once a stream has ended), never nginx's
502, and both replicas must serve again at once when the streams end. Then a replica is killed and the stack must report it, and at
last the stack stops while a stream runs, which must finish.

The tests run in file order on one stack, because the last two take parts of it down.
Needs the nginx and prometheus programs and skips without them.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

GRACEFUL_TIMEOUT_S = 10.0
BURST_SIZE = 8
# nginx's default fail_timeout: a replica marked as failed gets no request for this long.
FAIL_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def stack(local_stack, stack_programs, tmp_path_factory: pytest.TempPathFactory, serve_args: list[str]):
    running = local_stack.LocalStack(
        tmp_path_factory.mktemp("overload-stack"),
        serve_args=[*serve_args, "--max-batch-size", "1", "--max-queue", "1"],
        graceful_timeout=GRACEFUL_TIMEOUT_S,
        start_timeout=180,
    )
    running.start()
    yield running
    running.stop()


@dataclass
class Stream:
    """A streaming /generate of ``max_new_tokens`` tokens through nginx, read in a thread."""

    url: str
    # Near the tiny model's context of 512 tokens, so that a stream outlasts the burst.
    max_new_tokens: int = 400
    status: int | None = None
    upstream: str | None = None
    last_event: dict[str, Any] = field(default_factory=dict)
    finished_at: float | None = None
    error: str | None = None
    first_token: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._read)
        self.thread.start()
        return self

    def wait_first_token(self) -> Stream:
        assert self.first_token.wait(60), f"the stream produced no token: {self}"
        assert self.status == 200, self
        return self

    def join(self) -> None:
        self.thread.join(120)

    def _read(self) -> None:
        body = {"prompt": "1+1=", "rank": 8, "max_new_tokens": self.max_new_tokens, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", self.url + "/generate", json=body, timeout=60) as response:
                self.status = response.status_code
                self.upstream = response.headers.get("x-matlora-upstream")
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.last_event = json.loads(line.removeprefix("data:").strip())
                        self.first_token.set()
            self.finished_at = time.time()
        except httpx.HTTPError as error:
            self.error = repr(error)
        finally:
            self.first_token.set()


@dataclass
class Burst:
    streams: list[Stream]
    burst: list[httpx.Response]
    burst_done_at: float
    after: list[httpx.Response]
    after_done_at: float


def _generate(url: str) -> httpx.Response:
    return httpx.post(url + "/generate", json={"prompt": "1+1=", "rank": 4, "max_new_tokens": 4}, timeout=60)


def _occupancy(replica) -> tuple[float, float]:
    """Return a replica's (running, queued) requests, from its own /metrics."""
    text = httpx.get(replica.url + "/metrics", timeout=10).text
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in ("matlora_running_requests", "matlora_queue_depth")
    }
    return values["matlora_running_requests"], values["matlora_queue_depth"]


def _wait_until_full(stack, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        occupancy = {replica.name: _occupancy(replica) for replica in stack.replicas}
        if set(occupancy.values()) == {(1.0, 1.0)}:
            return
        time.sleep(0.05)
    raise AssertionError(f"the replicas did not fill up within {timeout:.0f} s: (running, queued) {occupancy}")


@pytest.fixture(scope="module")
def burst(stack) -> Burst:
    """Fill both replicas with streams, send a burst, then requests one by one once the streams end."""
    streams = [Stream(stack.url).start() for _ in range(4)]
    _wait_until_full(stack)
    with ThreadPoolExecutor(BURST_SIZE) as pool:
        rejected = list(pool.map(lambda _: _generate(stack.url), range(BURST_SIZE)))
    burst_done_at = time.time()
    for stream in streams:
        stream.join()
    after = [_generate(stack.url) for _ in range(4)]
    run = Burst(streams, rejected, burst_done_at, after, time.time())
    print(
        f"streams served by {[stream.upstream for stream in streams]}, ended "
        f"{[round(stream.finished_at - burst_done_at, 2) for stream in streams]} s after the burst; "
        f"burst statuses {dict(Counter(response.status_code for response in rejected))}; "
        f"then {[response.status_code for response in after]} within {run.after_done_at - burst_done_at:.1f} s"
    )
    return run


def test_streams_filled_both_replicas(stack, burst):
    served_by = Counter(stream.upstream.split(", ")[-1].split(" : ")[-1] for stream in burst.streams)
    assert served_by == {replica.address: 2 for replica in stack.replicas}
    for stream in burst.streams:
        assert stream.error is None
        assert stream.last_event["type"] == "done", stream


def test_full_stack_answers_replicas_429(burst):
    statuses = Counter(response.status_code for response in burst.burst)
    # The burst starts while the stack is full; a stream that ends meanwhile frees a slot.
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 1
    for response in burst.burst:
        if response.status_code == 200:
            continue
        assert response.headers["content-type"] == "application/json"
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["type"] == "overloaded"
        # Rejected by the replica nginx picked, then replayed.
        assert " : " in response.headers["x-matlora-upstream"]


def test_stack_serves_right_after_rejections(stack, burst):
    """No replica was marked as failed by its 429s: both serve again within fail_timeout.

    A replica marked as failed would get no request for fail_timeout, so every request
    would go to the other one.
    """
    assert burst.after_done_at - burst.burst_done_at < FAIL_TIMEOUT_S
    assert [response.status_code for response in burst.after] == [200] * len(burst.after)
    served_by = {response.headers["x-matlora-upstream"].split(", ")[-1] for response in burst.after}
    assert served_by == {replica.address for replica in stack.replicas}


def test_nginx_listens_on_loopback_only(stack):
    socket.create_connection(("127.0.0.1", stack.nginx_port), timeout=5).close()
    # 127.0.0.2 is loopback too, but not the address nginx listens on.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", stack.nginx_port), timeout=5)


def test_replica_exit_is_reported(stack, burst, caplog):
    killed = stack.replicas[1]
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(10) == -signal.SIGKILL

    with caplog.at_level(logging.INFO, logger="local_stack"):
        serving = stack.check()
        stack.check()

    assert serving
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith(f"{killed.name} exited unexpectedly (exit code -9); its log ends with:\n")
    assert messages[1:] == ["1 of 2 replicas are left; nginx sends the requests to them"]


def test_stop_lets_request_in_flight_finish(stack, burst):
    stream = Stream(stack.url).start().wait_first_token()
    stopper = threading.Thread(target=stack.stop)
    stopper.start()
    stream.join()
    stopper.join(GRACEFUL_TIMEOUT_S * 3 + 30)

    assert stream.status == 200
    assert stream.error is None
    assert stream.last_event["type"] == "done", stream
    assert not stopper.is_alive()
    assert stack.nginx.process.returncode == 0
    assert stack.replicas[0].process.returncode in (0, -signal.SIGTERM)
