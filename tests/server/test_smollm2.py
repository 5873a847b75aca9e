"""The embedded SmolLM2-135M base through ``matlora serve``: the bundled adapter, or a random one until it exists."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch

from matlora import AdapterConfig, inject_adapter, save_adapter
from matlora.base_model import load_base
from matlora.model import iter_adapter_weights
from server.settings import BUNDLED_ADAPTER_DIR, BUNDLED_ADAPTER_NAME
from tests.server.conftest import ProcessServer
from tests.server.test_batching import post_all

pytestmark = pytest.mark.slow

QUESTION = "What is 47 plus 38?"


def random_smollm2_adapter(directory: Path) -> Path:
    """A rank-16 adapter on all seven projections, the bundled adapter's shape, with random weights."""
    model, _ = load_base("smollm2-135m", dtype="float32", device="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    inject_adapter(model, AdapterConfig(r=16, target_modules=targets, lora_alpha=16.0), BUNDLED_ADAPTER_NAME)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, weights in iter_adapter_weights(model, BUNDLED_ADAPTER_NAME):
            weights.lora_B.copy_(torch.randn(weights.lora_B.shape, generator=generator) * 0.02)
    return save_adapter(model, directory, BUNDLED_ADAPTER_NAME)


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("smollm2")
    args = ["--max-batch-size", "8", "--rank-policy", "max"]
    if not (BUNDLED_ADAPTER_DIR / "adapter_config.json").is_file():
        # TODO: drop this branch once the bundled adapter is committed.
        args += ["--adapter", f"{BUNDLED_ADAPTER_NAME}={random_smollm2_adapter(work / 'adapter')}"]
    with ProcessServer(work / "server.log", *args) as server:
        yield server


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
