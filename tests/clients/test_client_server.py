"""The clients against a real ``matlora serve`` on 127.0.0.1, with a tiny model and a random adapter.

These tests start the server as a subprocess through its command line, so they depend
only on the flags and the HTTP API the server promises. They are skipped until
``server/app.py`` exists.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clients.client import (
    AdapterNotFoundError,
    AsyncMatloraClient,
    AuthenticationError,
    InvalidRequestError,
    MatloraClient,
    PayloadTooLargeError,
    TextDelta,
)
from clients.loadgen import LoadConfig, run_load
from matlora.cli import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("server.app") is None, reason="the server (server/app.py) has not landed yet"
)

API_KEY = "test-key"
ADAPTER = "tiny"
MAX_RANK = 8
MAX_BODY_BYTES = 4096
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_random_adapter(directory: Path) -> Path:
    """Save a rank-8 adapter with random ``lora_B`` (it starts at zero) for the tiny model."""
    import torch

    from matlora import AdapterConfig, inject_adapter, save_adapter
    from matlora.model import iter_adapter_weights
    from matlora.testing import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model(len(build_tiny_tokenizer()), seed=0)
    config = AdapterConfig(r=MAX_RANK, target_modules=["q_proj", "v_proj"])
    inject_adapter(model, config, ADAPTER)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, weights in iter_adapter_weights(model, ADAPTER):
            weights.lora_B.copy_(torch.randn(weights.lora_B.shape, generator=generator) * 0.5)
    return save_adapter(model, directory, ADAPTER)


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("served")
    adapter_dir = build_random_adapter(work / "adapter")
    port = free_port()
    command = [
        sys.executable, "-m", "matlora", "serve",
        "--base", str(tiny_model_dir),
        "--adapter", f"{ADAPTER}={adapter_dir}",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--device", "cpu",
        "--api-key", API_KEY,
        "--max-new-tokens-limit", "64",
        "--max-body-bytes", str(MAX_BODY_BYTES),
    ]  # fmt: skip
    log_path = work / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with MatloraClient(url, timeout=5) as probe:
            probe.wait_until_ready(timeout=STARTUP_TIMEOUT_S, interval=0.25)
    except Exception:
        process.kill()
        process.wait()
        pytest.fail(f"matlora serve did not become ready; its log:\n{log_path.read_text()[-4000:]}")
    yield url
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def client(base_url: str) -> Iterator[MatloraClient]:
    with MatloraClient(base_url, api_key=API_KEY, timeout=60) as client:
        yield client


def test_health_and_ready(client):
    assert client.health().ok
    assert client.ready().ok


@pytest.mark.parametrize("rank", [0, 1, 4, MAX_RANK])
def test_generate_at_rank(client, rank):
    result = client.generate("What is 47 plus 38?", rank=rank, max_new_tokens=8, temperature=0)
    assert result.rank == rank
    assert result.adapter == ADAPTER
    assert result.headers["x-matlora-rank"] == str(rank)
    assert result.finish_reason in ("stop", "length")
    assert 1 <= result.usage.completion_tokens <= 8
    assert result.usage.prompt_tokens > 0
    assert result.request_id


def test_generate_auto_rank(client):
    result = client.generate("What is 47 plus 38?", rank="auto", max_new_tokens=4)
    assert 0 <= result.rank <= MAX_RANK


def test_stream_matches_generate(client):
    expected = client.generate("What is 12 times 9?", rank=4, max_new_tokens=12, temperature=0)
    with client.generate_stream("What is 12 times 9?", rank=4, max_new_tokens=12, temperature=0) as stream:
        events = list(stream)
    deltas = "".join(event.text for event in events if isinstance(event, TextDelta))
    assert deltas == stream.result.text
    assert stream.result.text == expected.text
    assert stream.result.rank == 4


def test_list_models(client):
    ids = {model.id for model in client.list_models()}
    assert ADAPTER in ids
    assert f"{ADAPTER}@{MAX_RANK}" in ids


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"rank": MAX_RANK + 1}, "rank"),
        ({"rank": -1}, "rank"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_invalid_field_rejected(client, arguments, field):
    with pytest.raises(InvalidRequestError) as caught:
        client.generate("hi", **arguments)
    assert caught.value.status_code == 422
    assert caught.value.field == field


def test_empty_prompt_rejected(client):
    with pytest.raises(InvalidRequestError) as caught:
        client.generate("   ")
    assert caught.value.field == "prompt"


def test_unknown_adapter(client):
    with pytest.raises(AdapterNotFoundError) as caught:
        client.generate("hi", adapter="missing")
    assert caught.value.loaded_adapters == [ADAPTER]


def test_missing_token(base_url):
    with MatloraClient(base_url, api_key="") as anonymous, pytest.raises(AuthenticationError):
        anonymous.generate("hi")


def test_body_too_large(client):
    with pytest.raises(PayloadTooLargeError):
        client.generate("x" * (2 * MAX_BODY_BYTES))


def test_async_concurrent_mixed_ranks(base_url, client):
    prompts = [(f"What is {n} plus {n}?", rank) for n, rank in enumerate([0, 1, 2, 4, 8, 4, 1, 0])]
    alone = [client.generate(prompt, rank=rank, max_new_tokens=6, temperature=0).text for prompt, rank in prompts]

    async def together():
        async with AsyncMatloraClient(base_url, api_key=API_KEY, timeout=60) as async_client:
            calls = [async_client.generate(p, rank=r, max_new_tokens=6, temperature=0) for p, r in prompts]
            return [result.text for result in await asyncio.gather(*calls)]

    assert asyncio.run(together()) == alone


def test_ask_command(base_url, capsys):
    code = main(
        [
            "ask",
            "What is 47 plus 38?",
            "--rank",
            "4",
            "--max-new-tokens",
            "4",
            "--url",
            base_url,
            "--api-key",
            API_KEY,
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rank"] == 4


@pytest.mark.parametrize("stream", [False, True])
def test_loadgen_all_answered(base_url, stream):
    config = LoadConfig(
        url=base_url,
        rate=20,
        duration=1.0,
        arrival="constant",
        ranks=(0, 4, MAX_RANK, "auto"),
        max_new_tokens=4,
        stream=stream,
        api_key=API_KEY,
        timeout=60,
    )
    report = asyncio.run(run_load(config))
    assert report.summary["status_counts"] == {"200": 20}
    assert all(record.request_id for record in report.records)
    if stream:
        assert all(record.ttft_s is not None for record in report.records)


def test_ready_probe_needs_no_token(base_url):
    response = httpx.get(f"{base_url}/readyz")
    assert response.status_code == 200
