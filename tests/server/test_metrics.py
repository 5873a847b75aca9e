"""``/metrics`` after known traffic, summed over two uvicorn worker processes."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import TINY_ADAPTER, TINY_MAX_RANK, ProcessServer, ThreadServer, matlora_samples

# (rank, max_new_tokens, copies): successful requests sent in parallel over both workers.
TRAFFIC = [(0, 3, 4), (2, 5, 4), (TINY_MAX_RANK, 4, 4)]
INVALID_RANK_REQUESTS = 3
UNKNOWN_ADAPTER_REQUESTS = 2
AUTO_REQUESTS = 2


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """Return every sample by metric name, then by sorted label items."""
    samples: dict[str, dict[tuple, float]] = defaultdict(dict)
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def labels(**items: str) -> tuple:
    return tuple(sorted(items.items()))


@pytest.fixture(scope="module")
def two_workers(tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    log_path = tmp_path_factory.mktemp("metrics") / "server.log"
    args = ["--base", str(tiny_model_dir), "--adapter", f"{TINY_ADAPTER}={tiny_adapters[TINY_ADAPTER]}"]
    args += ["--workers", "2", "--no-warmup", "--rank-policy", "max"]
    with ProcessServer(log_path, *args) as server:
        # /readyz returned 200 from one worker, but the other may still be loading.
        deadline = time.monotonic() + 60
        while server.log().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        yield server


@pytest.fixture(scope="module")
def traffic(two_workers: ProcessServer) -> dict:
    """Send the known traffic once and return the bodies of the successful responses."""
    requests = [
        {"prompt": f"{rank} plus {copy} =", "rank": rank, "max_new_tokens": max_new_tokens}
        for rank, max_new_tokens, copies in TRAFFIC
        for copy in range(copies)
    ]
    # A new connection per request lets the kernel hand requests to either worker.
    fresh_connections = httpx.Limits(max_keepalive_connections=0)
    with (
        httpx.Client(base_url=two_workers.url, timeout=60.0, limits=fresh_connections) as http,
        ThreadPoolExecutor(6) as pool,
    ):
        answers = [response.json() for response in pool.map(lambda body: http.post("/generate", json=body), requests)]
        for _ in range(INVALID_RANK_REQUESTS):
            assert http.post("/generate", json={"prompt": "x", "rank": 99}).status_code == 422
        for _ in range(UNKNOWN_ADAPTER_REQUESTS):
            assert http.post("/generate", json={"prompt": "x", "adapter": "nope"}).status_code == 404
        for _ in range(AUTO_REQUESTS):
            assert http.post("/generate", json={"prompt": "x", "rank": "auto", "max_new_tokens": 1}).status_code == 200
    return {"answers": answers}


def test_requests_counted_by_rank_and_status(two_workers: ProcessServer, traffic: dict) -> None:
    samples = scrape(two_workers.url)["matlora_requests_total"]

    for rank, _, copies in TRAFFIC:
        expected = copies + (AUTO_REQUESTS if rank == TINY_MAX_RANK else 0)
        assert samples[labels(adapter=TINY_ADAPTER, rank=str(rank), status="2xx")] == expected
    assert samples[labels(adapter=TINY_ADAPTER, rank="none", status="4xx")] == INVALID_RANK_REQUESTS
    assert samples[labels(adapter="none", rank="none", status="4xx")] == UNKNOWN_ADAPTER_REQUESTS


def test_tokens_counted_by_rank(two_workers: ProcessServer, traffic: dict) -> None:
    samples = scrape(two_workers.url)
    completion = defaultdict(float)
    prompt = defaultdict(float)
    for answer in traffic["answers"]:
        completion[answer["rank"]] += answer["usage"]["completion_tokens"]
        prompt[answer["rank"]] += answer["usage"]["prompt_tokens"]

    for rank, _, _ in TRAFFIC:
        auto = AUTO_REQUESTS if rank == TINY_MAX_RANK else 0
        key = labels(adapter=TINY_ADAPTER, rank=str(rank))
        assert samples["matlora_generated_tokens_total"][key] == completion[rank] + auto
        assert samples["matlora_prompt_tokens_total"][key] == prompt[rank] + auto * len(b"x")


def test_latency_histograms_count_requests(two_workers: ProcessServer, traffic: dict) -> None:
    samples = scrape(two_workers.url)

    for rank, _, copies in TRAFFIC:
        expected = copies + (AUTO_REQUESTS if rank == TINY_MAX_RANK else 0)
        key = labels(adapter=TINY_ADAPTER, rank=str(rank))
        assert samples["matlora_request_duration_seconds_count"][key] == expected
        assert samples["matlora_time_to_first_token_seconds_count"][key] == expected


def test_policy_and_gauges(two_workers: ProcessServer, traffic: dict) -> None:
    samples = scrape(two_workers.url)

    assert samples["matlora_policy_rank_total"] == {
        labels(adapter=TINY_ADAPTER, rank=str(TINY_MAX_RANK)): AUTO_REQUESTS
    }
    assert samples["matlora_policy_rank"] == {labels(adapter=TINY_ADAPTER): TINY_MAX_RANK}
    assert samples["matlora_queue_depth"] == {(): 0.0}
    assert samples["matlora_running_requests"] == {(): 0.0}
    assert samples["matlora_batch_size_count"][()] >= sum(copies for _, _, copies in TRAFFIC)


def test_both_workers_served(two_workers: ProcessServer, traffic: dict) -> None:
    access = [json.loads(line) for line in two_workers.log().splitlines() if line.startswith('{"request_id"')]

    assert len({line["pid"] for line in access if line["path"] == "/generate" and line["status"] == 200}) == 2


def test_warmup_left_out_of_metrics(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.app")
    before = matlora_samples()

    with ThreadServer(base=str(tiny_model_dir), adapter=[f"{TINY_ADAPTER}={tiny_adapters[TINY_ADAPTER]}"]):
        after = matlora_samples()

    assert any(record.getMessage().startswith("warm-up generation passed") for record in caplog.records)
    assert after == before
