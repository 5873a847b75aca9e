"""End to end: two replicas behind nginx, scraped by Prometheus, one of them stopped mid-traffic.

The stack is docker/local_stack.py's, started on the tiny test model with a random
rank-8 adapter, so that the replicas load in seconds on a 2-core CPU. Two load
generators send mixed-rank traffic through nginx, one streaming and one not. Partway
through, server-2 gets SIGTERM while one of its streams is running. The tests then check
the load generators' records, nginx's access log, the stopped replica's exit and every
query of the Grafana dashboard against Prometheus.

Needs the nginx and prometheus programs (Debian packages nginx and prometheus) and
skips without them. Takes about a minute.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards" / "matlora.json"
GRACEFUL_TIMEOUT_S = 10.0
TRAFFIC_S = 30.0
RATE_PER_GENERATOR = 5.0
# server-2 gets its SIGTERM once each replica has answered this many requests.
SERVED_BEFORE_SIGTERM = 40
RANKS = "0,2,4,8,auto"
# Requests that reach nginx this long after the SIGTERM was sent must not be served by
# the stopped replica. The margin covers the signal's delivery and handling.
SIGNAL_MARGIN_S = 0.5
UPSTREAM_HEADER = "x-matlora-upstream"


def _dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        (f"{panel['title']} [{target['refId']}]", target) for panel in panels for target in panel.get("targets", [])
    ]


@dataclass
class TrafficRun:
    """What happened during the traffic, in wall-clock seconds (``time.time()``)."""

    started_at: float
    finished_at: float
    sigterm_at: float
    records: list[dict[str, Any]]
    access_log: list[dict[str, Any]]
    replica_addresses: dict[str, str]
    readyz_after_sigterm: str
    exit_code: int | None
    exited_at: float | None
    drained_stream: dict[str, Any] = field(default_factory=dict)

    def served_by(self, entry: dict[str, Any]) -> str:
        """Return the replica name that produced a logged response (the last one nginx tried)."""
        address = entry["upstream_addr"].replace(" : ", ", ").split(", ")[-1]
        names = {address: name for name, address in self.replica_addresses.items()}
        return names.get(address, address)


@pytest.fixture(scope="module")
def stack(local_stack, stack_programs, tmp_path_factory: pytest.TempPathFactory, serve_args: list[str]):
    running = local_stack.LocalStack(
        tmp_path_factory.mktemp("stack"),
        serve_args=[*serve_args, "--rank-policy", "auto"],
        graceful_timeout=GRACEFUL_TIMEOUT_S,
        start_timeout=180,
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def traffic(stack, tmp_path_factory: pytest.TempPathFactory) -> TrafficRun:
    """Send the traffic, stop server-2 with SIGTERM partway through, and collect the results."""
    out = tmp_path_factory.mktemp("traffic")
    stopped = stack.replicas[1]

    started_at = time.time()
    generators = [_start_loadgen(stack.url, out / "plain.json", stream=False, seed=1)]
    generators.append(_start_loadgen(stack.url, out / "stream.json", stream=True, seed=2))
    _wait_until_both_served(stack, SERVED_BEFORE_SIGTERM, timeout=60)

    # A long stream on server-2 that is surely running when the SIGTERM arrives.
    drained_stream: dict[str, Any] = {}
    first_token = threading.Event()
    stream_thread = threading.Thread(target=_stream_generate, args=(stopped.url, drained_stream, first_token))
    stream_thread.start()
    assert first_token.wait(30), f"the stream on {stopped.name} produced no token: {drained_stream}"

    sigterm_at = time.time()
    stopped.send_signal()
    readyz = _readyz_status(stopped.url)
    exit_code = stopped.wait(GRACEFUL_TIMEOUT_S + 15)
    exited_at = time.time() if exit_code is not None else None

    stream_thread.join(60)
    for generator in generators:
        assert generator.wait(TRAFFIC_S + 120) == 0, generator.stderr.read()
    finished_at = time.time()

    records = [
        record for name in ("plain.json", "stream.json") for record in json.loads((out / name).read_text())["requests"]
    ]
    access_log = _read_access_log(stack)
    run = TrafficRun(
        started_at=started_at,
        finished_at=finished_at,
        sigterm_at=sigterm_at,
        records=records,
        access_log=access_log,
        replica_addresses={replica.name: replica.address for replica in stack.replicas},
        readyz_after_sigterm=readyz,
        exit_code=exit_code,
        exited_at=exited_at,
        drained_stream=drained_stream,
    )
    print(_figures(run))
    return run


def _read_access_log(stack) -> list[dict[str, Any]]:
    lines = stack.nginx_access_log.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _wait_until_both_served(stack, count: int, timeout: float) -> None:
    """Wait until nginx has logged ``count`` answered /generate requests from each replica."""
    addresses = [replica.address for replica in stack.replicas]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        served = Counter(
            entry["upstream_addr"]
            for entry in _read_access_log(stack)
            if entry["uri"] == "/generate" and entry["status"] == 200
        )
        if all(served[address] >= count for address in addresses):
            return
        time.sleep(0.2)
    raise AssertionError(f"the replicas did not each answer {count} requests within {timeout:.0f} s: {dict(served)}")


def _start_loadgen(url: str, report: Path, stream: bool, seed: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "matlora", "loadgen",
        "--url", url,
        "--rate", str(RATE_PER_GENERATOR),
        "--duration", str(TRAFFIC_S),
        "--ranks", RANKS,
        "--max-new-tokens", "24",
        "--concurrency", "16",
        "--seed", str(seed),
        "--replica-header", UPSTREAM_HEADER,
        "--json", str(report),
    ]  # fmt: skip
    if stream:
        command.append("--stream")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _stream_generate(url: str, result: dict[str, Any], first_token: threading.Event) -> None:
    """POST a streaming /generate of 200 tokens; store the status and the last event in ``result``."""
    body = {"prompt": "1+1=", "rank": 8, "max_new_tokens": 200, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", url + "/generate", json=body, timeout=60) as response:
            result["status"] = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line.removeprefix("data:").strip())
                if event.get("type") == "token":
                    first_token.set()
                result["last_event"] = event
        result["finished_at"] = time.time()
    except httpx.HTTPError as error:
        result["error"] = repr(error)
    finally:
        first_token.set()


def _readyz_status(url: str) -> str:
    """Return /readyz's status code as text, or "refused" when the replica no longer listens."""
    time.sleep(0.2)
    try:
        return str(httpx.get(url + "/readyz", timeout=5).status_code)
    except httpx.ConnectError:
        return "refused"


def _figures(run: TrafficRun) -> str:
    statuses = Counter(record["status"] for record in run.records)
    split = Counter(run.served_by(entry) for entry in run.access_log if entry["uri"] == "/generate")
    replayed = [entry for entry in run.access_log if "," in entry["upstream_addr"] or ":" in entry["upstream_status"]]
    served_after = Counter(
        run.served_by(entry)
        for entry in run.access_log
        if entry["uri"] == "/generate" and entry["msec"] - entry["request_time"] > run.sigterm_at
    )
    in_flight = [
        entry
        for entry in run.access_log
        if run.served_by(entry) == "server-2" and entry["msec"] - entry["request_time"] < run.sigterm_at < entry["msec"]
    ]
    exited = "did not exit" if run.exited_at is None else f"exited {run.exited_at - run.sigterm_at:.1f} s later"
    stream = run.drained_stream
    stream_end = stream.get("finished_at", run.sigterm_at) - run.sigterm_at
    return "\n".join(
        [
            f"load generators: {len(run.records)} requests sent, statuses {dict(statuses)}",
            f"nginx /generate responses by replica: {dict(split)}",
            f"replayed by nginx: {len(replayed)} ({Counter(entry['upstream_status'] for entry in replayed)})",
            f"SIGTERM to server-2 at +{run.sigterm_at - run.started_at:.1f} s: /readyz then {run.readyz_after_sigterm}, "
            f"{exited} with code {run.exit_code}",
            f"stream in flight on server-2: status {stream.get('status')}, last event "
            f"{stream.get('last_event', {}).get('type')} ({stream.get('last_event', {}).get('finish_reason')}) "
            f"{stream_end:.1f} s after the SIGTERM",
            f"requests in flight on server-2 through nginx at the SIGTERM: {len(in_flight)}, "
            f"statuses {dict(Counter(entry['status'] for entry in in_flight))}",
            f"requests nginx received after the SIGTERM, by replica that answered: {dict(served_after)}",
        ]
    )


def test_every_request_answered(traffic):
    failed = [record for record in traffic.records if record["status"] != "200"]
    assert len(traffic.records) >= TRAFFIC_S * RATE_PER_GENERATOR
    assert not failed, f"{len(failed)} requests failed, e.g. {failed[:3]}"


def test_requests_used_mixed_ranks(traffic):
    used = {record["rank_used"] for record in traffic.records}
    assert {0, 2, 4, 8} <= used


def test_both_replicas_served(traffic):
    split = Counter(traffic.served_by(entry) for entry in traffic.access_log if entry["status"] == 200)
    assert split["server-1"] > 0
    assert split["server-2"] > 0


def test_load_generator_saw_upstream_header(traffic):
    headers = {record["replica"] for record in traffic.records}
    assert None not in headers


def test_readiness_false_after_sigterm(traffic):
    assert traffic.readyz_after_sigterm in ("503", "refused")


def test_in_flight_stream_finished(traffic):
    stream = traffic.drained_stream
    assert stream.get("status") == 200, stream
    assert stream["last_event"]["type"] == "done", stream
    assert stream["last_event"]["finish_reason"] == "length"


def test_stopped_replica_exits_cleanly(traffic):
    # uvicorn ends by raising the SIGTERM it caught again, so a clean exit after the
    # drain reads as "killed by SIGTERM" (shells show 143); SIGKILL would be -9.
    assert traffic.exit_code in (0, -signal.SIGTERM)
    assert traffic.exited_at - traffic.sigterm_at < GRACEFUL_TIMEOUT_S + 5


def test_nginx_routes_around_stopped_replica(traffic):
    received_after = [
        entry
        for entry in traffic.access_log
        if entry["uri"] == "/generate" and entry["msec"] - entry["request_time"] > traffic.sigterm_at + SIGNAL_MARGIN_S
    ]
    served = Counter(traffic.served_by(entry) for entry in received_after)
    assert served["server-1"] > 0
    assert served["server-2"] == 0


@pytest.mark.parametrize(("panel", "target"), _dashboard_targets(), ids=[name for name, _ in _dashboard_targets()])
def test_dashboard_query_returns_data(stack, traffic, resolve_grafana_variables, panel, target):
    end = time.time()
    start = traffic.started_at - 5
    if target.get("instant"):
        expr = resolve_grafana_variables(target["expr"], time_range=f"{math.ceil(end - start)}s")
        response = httpx.get(stack.prometheus_url + "/api/v1/query", params={"query": expr, "time": end}, timeout=10)
    else:
        expr = resolve_grafana_variables(target["expr"], rate_interval="20s")
        params = {"query": expr, "start": start, "end": end, "step": "5s"}
        response = httpx.get(stack.prometheus_url + "/api/v1/query_range", params=params, timeout=10)

    assert response.status_code == 200, response.text
    values = _sample_values(response.json()["data"])
    assert any(math.isfinite(value) for value in values), f"{panel}: no data for {expr}"


def _sample_values(data: dict[str, Any]) -> list[float]:
    if data["resultType"] == "matrix":
        return [float(value) for series in data["result"] for _, value in series["values"]]
    return [float(series["value"][1]) for series in data["result"]]
