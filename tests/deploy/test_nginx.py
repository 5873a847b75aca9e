"""nginx/matlora.conf.template in front of stand-in replicas: replays, failure marks and nginx's own errors.

Each stand-in is a small HTTP server in this process that responds to every POST with
the status it is set to, in the replicas' JSON error shape, so every case is exact. nginx
runs as the local stack runs it. Skips when nginx is not installed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

# Beyond the load balancer's client_max_body_size of 1 MiB.
TOO_LARGE = 2 * 1024 * 1024


class StandInReplica(ThreadingHTTPServer):
    """An HTTP server that responds to every POST with ``status``: 200, or the replicas' JSON error shape."""

    daemon_threads = True

    def __init__(self, status: int = 200) -> None:
        super().__init__(("127.0.0.1", 0), _StandInHandler)
        self.status = status
        self.requests = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _StandInHandler(BaseHTTPRequestHandler):
    server: StandInReplica

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.requests += 1
        status = self.server.status
        if status == 200:
            body = {"text": "ok", "replica": self.server.address}
        else:
            body = {"error": {"type": f"status_{status}", "message": f"{self.server.address} answers {status}"}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        if status in (429, 503):
            self.send_header("retry-after", "1")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def stand_ins() -> Iterator[list[StandInReplica]]:
    """Two stand-in replicas, responding 200 until a test sets another status."""
    servers = [StandInReplica(), StandInReplica()]
    threads = [threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def start_nginx(local_stack, tmp_path: Path) -> Iterator[Callable[[list[str]], str]]:
    """A function that starts nginx in front of the given replica addresses and returns its URL."""
    try:
        local_stack.find_program("nginx")
    except FileNotFoundError:
        pytest.skip("nginx not installed (apt-get install nginx)")
    services = []

    def start(addresses: list[str]) -> str:
        port = local_stack.free_port()
        nginx_dir = tmp_path / "nginx"
        local_stack.write_nginx_config(nginx_dir, port, addresses)
        nginx = local_stack.Service("nginx", local_stack.nginx_command(nginx_dir), tmp_path / "nginx-error.log")
        nginx.start()
        services.append(nginx)
        _wait_for_port(port, nginx)
        return f"http://127.0.0.1:{port}"

    yield start
    for nginx in services:
        nginx.stop(timeout=10)


def _wait_for_port(port: int, nginx, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert nginx.running, nginx.log_tail()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nginx did not listen on port {port} within {timeout:.0f} s:\n{nginx.log_tail()}")


def _generate(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url + "/generate", json={"prompt": "1+1=", "rank": 4}, timeout=10, **kwargs)


@pytest.mark.parametrize("status", [429, 503])
def test_all_replicas_rejecting_answers_their_error(stand_ins, start_nginx, status):
    for server in stand_ins:
        server.status = status
    url = start_nginx([server.address for server in stand_ins])

    responses = [_generate(url) for _ in range(6)]

    assert [response.status_code for response in responses] == [status] * 6
    for response in responses:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == f"status_{status}"
        first, replayed = response.headers["x-matlora-upstream"].split(" : ")
        # The replay tries every replica once more, and the client gets the last response.
        assert set(replayed.split(", ")) == {server.address for server in stand_ins}


def test_rejections_mark_no_replica_as_failed(stand_ins, start_nginx):
    """After every replica rejected requests, the next ones are served at once: no 502 for fail_timeout."""
    for server in stand_ins:
        server.status = 429
    url = start_nginx([server.address for server in stand_ins])
    assert {_generate(url).status_code for _ in range(4)} == {429}
    for server in stand_ins:
        server.status = 200

    responses = [_generate(url) for _ in range(4)]

    assert [response.status_code for response in responses] == [200] * 4
    assert {response.json()["replica"] for response in responses} == {server.address for server in stand_ins}


def test_rejected_request_moves_to_free_replica(stand_ins, start_nginx):
    busy, free = stand_ins
    busy.status = 429
    url = start_nginx([busy.address, free.address])

    responses = [_generate(url) for _ in range(4)]

    assert [response.status_code for response in responses] == [200] * 4
    assert {response.json()["replica"] for response in responses} == {free.address}
    assert busy.requests >= 2


def test_no_replica_answers_json_502(local_stack, start_nginx):
    closed = [f"127.0.0.1:{local_stack.free_port()}", f"127.0.0.1:{local_stack.free_port()}"]
    url = start_nginx(closed)

    responses = [_generate(url, headers={"x-request-id": f"req-{index}"}) for index in range(3)]
    readyz = httpx.get(url + "/readyz", timeout=10)

    for index, response in enumerate(responses):
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/json"
        assert response.headers["retry-after"] == "10"
        assert response.json()["error"]["type"] == "bad_gateway"
        assert response.json()["error"]["request_id"] == f"req-{index}"
    assert readyz.status_code == 502
    assert readyz.json()["error"]["type"] == "bad_gateway"


def test_replay_to_closed_replica_answers_json_502(local_stack, stand_ins, start_nginx):
    """The known weak spot (a NOTE in the template): a replay does not move on from a refused connection."""
    busy = stand_ins[0]
    busy.status = 429
    url = start_nginx([busy.address, f"127.0.0.1:{local_stack.free_port()}"])

    responses = [_generate(url) for _ in range(4)]

    assert [response.status_code for response in responses] == [502] * 4
    for response in responses:
        assert response.json()["error"]["type"] == "bad_gateway"
        assert response.headers["retry-after"] == "10"


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/v1/models"])
def test_body_over_limit_answers_json_413(stand_ins, start_nginx, path):
    url = start_nginx([server.address for server in stand_ins])

    response = httpx.post(url + path, content=b"x" * TOO_LARGE, headers={"x-request-id": "big-1"}, timeout=10)

    assert response.status_code == 413
    assert response.json() == {
        "error": {
            "type": "payload_too_large",
            "message": (
                f"request body too large: {TOO_LARGE} bytes; the load balancer accepts at most 1048576 bytes "
                "(client_max_body_size in matlora.conf.template)"
            ),
            "field": "body",
            "value": f"{TOO_LARGE} bytes",
            "allowed": "at most 1048576 bytes",
            "request_id": "big-1",
        }
    }
    assert sum(server.requests for server in stand_ins) == 0


def test_replica_413_passes_through(stand_ins, start_nginx):
    for server in stand_ins:
        server.status = 413
    url = start_nginx([server.address for server in stand_ins])

    response = _generate(url)

    assert response.status_code == 413
    assert response.json()["error"]["type"] == "status_413"
