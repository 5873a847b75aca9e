"""Batched responses equal lone responses token for token, with mixed ranks, adapters, lengths and sampling."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import OTHER_ADAPTER, OTHER_MAX_RANK, TINY_ADAPTER, TINY_MAX_RANK, ThreadServer

WORDS = "one two three plus minus seven eight nine what is the sum of and then".split()


def mixed_requests(count: int, seed: int) -> list[dict]:
    """Requests that differ in adapter, rank, prompt length, token budget, sampling and stop strings."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        adapter = TINY_ADAPTER if i % 3 else OTHER_ADAPTER
        max_rank = TINY_MAX_RANK if adapter == TINY_ADAPTER else OTHER_MAX_RANK
        request = {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))),
            "adapter": adapter,
            "rank": rng.randint(0, max_rank),
            "max_new_tokens": rng.randint(1, 40),
        }
        if i % 4 == 1:
            request.update(temperature=0.9, top_p=0.8, seed=i)
        if i % 5 == 2:
            request["stop"] = ["e"]
        requests.append(request)
    return requests


async def post_all(url: str, requests: list[dict], concurrently: bool) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as http:

        async def post(request: dict) -> dict:
            response = await http.post("/generate", json=request)
            assert response.status_code == 200, response.text
            answer = response.json()
            del answer["id"]
            return answer

        if concurrently:
            return await asyncio.gather(*(post(request) for request in requests))
        return [await post(request) for request in requests]


@pytest.fixture(scope="module")
def batching_server(tiny_model_dir: Path, tiny_adapters: dict[str, Path]):
    # bfloat16 whatever the CPU: the serving path is row-invariant for oneDNN's bfloat16 kernels
    # (see server/engine/runner.py), while float32 goes to MKL, which is not.
    with ThreadServer(
        base=str(tiny_model_dir),
        adapter=[f"{name}={path}" for name, path in tiny_adapters.items()],
        dtype="bfloat16",
        max_batch_size=8,
        max_queue=64,
    ) as server:
        yield server


def test_batched_equals_alone(batching_server: ThreadServer) -> None:
    requests = mixed_requests(40, seed=0)

    alone = asyncio.run(post_all(batching_server.url, requests, concurrently=False))
    batched = asyncio.run(post_all(batching_server.url, requests, concurrently=True))

    mismatches = [(i, requests[i], a, b) for i, (a, b) in enumerate(zip(alone, batched)) if a != b]
    assert mismatches == []
    assert len({answer["text"] for answer in alone}) > 30  # the requests really differ


def test_batch_really_shared_steps(batching_server: ThreadServer) -> None:
    from server import metrics

    def decode_steps_with_many_rows() -> float:
        buckets = {s.labels["le"]: s.value for s in _samples(metrics.BATCH_SIZE) if s.name.endswith("_bucket")}
        return buckets["+Inf"] - buckets["1.0"]

    before = decode_steps_with_many_rows()
    asyncio.run(post_all(batching_server.url, mixed_requests(8, seed=1), concurrently=True))

    assert decode_steps_with_many_rows() > before


def _samples(metric):
    return [sample for family in metric.collect() for sample in family.samples]
