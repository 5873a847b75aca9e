"""The embedded SmolLM2-135M base with the bundled adapter, through ``matlora serve`` with no flags."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from server.settings import BUNDLED_ADAPTER_NAME
from tests.server.conftest import ProcessServer
from tests.server.test_batching import post_all

pytestmark = pytest.mark.slow

QUESTION = "What is 47 plus 38?"


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory):
    """``matlora serve`` with no base or adapter flags: the embedded base and the bundled adapter."""
    work = tmp_path_factory.mktemp("smollm2")
    with ProcessServer(work / "server.log", "--max-batch-size", "8", "--rank-policy", "max") as server:
        yield server


def test_bundled_adapter_answers_arithmetic(smollm2_server: ProcessServer) -> None:
    body = {"prompt": QUESTION, "chat": True, "rank": 8, "max_new_tokens": 8}
    answer = httpx.post(f"{smollm2_server.url}/generate", json=body, timeout=120)

    assert answer.status_code == 200
    assert answer.json()["text"] == "85"
    assert answer.json()["finish_reason"] == "stop"
    assert answer.headers["x-matlora-rank"] == "8"


def test_serves_default_base(smollm2_server: ProcessServer) -> None:
    models = httpx.get(f"{smollm2_server.url}/v1/models").json()["data"]
    answer = httpx.post(
        f"{smollm2_server.url}/v1/chat/completions",
        json={
            "model": BUNDLED_ADAPTER_NAME,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=120,
    )

    assert models[0]["id"] == BUNDLED_ADAPTER_NAME
    assert models[0]["max_rank"] >= 8
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"]
    assert "loaded base smollm2-135m (torch.bfloat16, cpu" in smollm2_server.log()


def test_batched_equals_alone_on_smollm2(smollm2_server: ProcessServer) -> None:
    max_rank = httpx.get(f"{smollm2_server.url}/v1/models").json()["data"][0]["max_rank"]
    requests = [
        {
            "prompt": f"Q: What is {a} plus {b}?\nA:" + " Let me think." * (a % 4),
            "rank": rank,
            "max_new_tokens": 6 + a % 7,
        }
        for a, b, rank in [
            (47, 38, 0),
            (12, 9, 1),
            (3, 88, 8),
            (60, 7, max_rank),
            (5, 5, 2),
            (31, 44, max_rank),
            (9, 90, 1),
            (71, 2, 4),
        ]
    ]
    requests[3].update(temperature=0.8, seed=3)

    alone = asyncio.run(post_all(smollm2_server.url, requests, concurrently=False))
    batched = asyncio.run(post_all(smollm2_server.url, requests, concurrently=True))

    assert batched == alone
