"""The engine against transformers' own generate, bitwise batch invariance of its steps, and its queue."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

import matlora
from matlora.base_model import load_base
from server.engine import Engine, EngineStoppedError, GenerationRequest, QueueFullError
from server.engine.attention import RowKV
from server.engine.runner import MIN_DECODE_ROWS, ModelRunner, RowInput
from tests.server.conftest import TINY_ADAPTER, matlora_samples

PROMPTS = ["The quick brown fox", "1 + 1 =", "a"]


def load_with_adapter(base_dir: Path, adapter_dir: Path, dtype: str):
    model, tokenizer = load_base(str(base_dir), dtype=dtype, device="cpu")
    matlora.load_adapter(model, adapter_dir, TINY_ADAPTER)
    return model, tokenizer


async def generate_all(engine: Engine, requests: list[GenerationRequest]) -> list[str]:
    engine.start()
    try:
        return [(await engine.submit(request).wait()).text for request in requests]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("rank", [0, 3, 8])
def test_engine_matches_transformers_generate(tiny_model_dir: Path, tiny_adapters: dict[str, Path], rank: int) -> None:
    reference, tokenizer = load_with_adapter(tiny_model_dir, tiny_adapters[TINY_ADAPTER], "float32")
    served, _ = load_with_adapter(tiny_model_dir, tiny_adapters[TINY_ADAPTER], "float32")
    expected = []
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad(), matlora.at_rank(rank, adapter=TINY_ADAPTER):
            output = reference.generate(
                input_ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        expected.append(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))

    requests = [
        GenerationRequest(f"r{i}", tokenizer(prompt).input_ids, TINY_ADAPTER, rank, 12)
        for i, prompt in enumerate(PROMPTS)
    ]
    texts = asyncio.run(generate_all(Engine(served, tokenizer), requests))

    assert texts == expected


def test_decode_rows_bitwise_independent_of_batch(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    model, tokenizer = load_with_adapter(tiny_model_dir, tiny_adapters[TINY_ADAPTER], "bfloat16")
    runner = ModelRunner(model, tokenizer.pad_token_id)
    prompts = [tokenizer(p).input_ids for p in [*PROMPTS, "one two three four five six"]]
    ranks = [8, 0, 3, 8]

    def decode_step(rows: list[int]) -> torch.Tensor:
        """Prefill the chosen prompts into fresh caches, then decode one token for all of them together."""
        caches = [RowKV(64) for _ in rows]
        for row, kv in zip(rows, caches):
            runner.prefill(RowInput(prompts[row], 0, kv, TINY_ADAPTER, ranks[row]))
        return runner.decode(
            [RowInput([7], len(prompts[row]), kv, TINY_ADAPTER, ranks[row]) for row, kv in zip(rows, caches)]
        )

    alone = [decode_step([row])[0] for row in range(4)]
    together = decode_step([0, 1, 2, 3])
    shuffled = decode_step([3, 1, 0])

    for row in range(4):
        assert torch.equal(together[row], alone[row])
    assert torch.equal(shuffled[0], alone[3])
    assert torch.equal(shuffled[2], alone[0])
    assert MIN_DECODE_ROWS > 1


def test_kv_cache_overflow_raises() -> None:
    kv = RowKV(capacity=2)
    key = torch.zeros(1, 2, 3, 4)

    with pytest.raises(RuntimeError, match="KV cache overflow: 3 tokens in a row sized for 2"):
        kv.append(0, key, key)


@pytest.mark.parametrize(("max_batch_size", "max_queue"), [(0, 1), (1, 0)])
def test_engine_rejects_empty_limits(max_batch_size: int, max_queue: int) -> None:
    message = f"max_batch_size and max_queue must be >= 1, got {max_batch_size} and {max_queue}"
    with pytest.raises(ValueError, match=re.escape(message)):
        Engine(None, None, max_batch_size=max_batch_size, max_queue=max_queue)


def test_queue_bound_and_stop_accepting(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    model, tokenizer = load_with_adapter(tiny_model_dir, tiny_adapters[TINY_ADAPTER], "bfloat16")
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=2)
    prefill = engine.runner.prefill
    release = threading.Event()

    def held_prefill(row):
        release.wait(timeout=30)
        return prefill(row)

    engine.runner.prefill = held_prefill
    request = GenerationRequest("r", [1, 2, 3], TINY_ADAPTER, 8, 2)

    async def fill_queue() -> list[str]:
        streams = [engine.submit(request)]
        while engine.waiting_count:  # the worker took the first request and keeps it in prefill
            await asyncio.sleep(0.01)
        streams += [engine.submit(request), engine.submit(request)]
        outcomes = []
        with pytest.raises(QueueFullError) as full:
            engine.submit(request)
        outcomes.append(f"full: {full.value.waiting} waiting")
        engine.stop_accepting()
        with pytest.raises(EngineStoppedError):
            engine.submit(request)
        release.set()
        results = [await stream.wait() for stream in streams]
        outcomes += [result.finish_reason for result in results]
        return outcomes

    engine.start()
    try:
        outcomes = asyncio.run(fill_queue())
    finally:
        engine.shutdown()

    assert outcomes == ["full: 2 waiting", "length", "length", "length"]


def test_abort_reaches_request_in_prefill(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    model, tokenizer = load_with_adapter(tiny_model_dir, tiny_adapters[TINY_ADAPTER], "bfloat16")
    engine = Engine(model, tokenizer, max_batch_size=2, max_queue=2)
    prefill = engine.runner.prefill
    in_prefill, release = threading.Event(), threading.Event()

    def held_prefill(row):
        in_prefill.set()
        release.wait(timeout=30)
        return prefill(row)

    engine.runner.prefill = held_prefill
    request = GenerationRequest("r", [1, 2, 3], TINY_ADAPTER, 8, 2)

    async def abort_during_prefill() -> tuple[tuple, str]:
        stream = engine.submit(request)
        assert await asyncio.to_thread(in_prefill.wait, 30)
        seen = (engine.waiting_count, engine.running_count, REGISTRY.get_sample_value("matlora_running_requests"))
        engine.abort_all(EngineStoppedError("stopped by the test"))
        with pytest.raises(EngineStoppedError) as raised:
            await stream.wait()
        return seen, str(raised.value)

    engine.start()
    try:
        seen, error = asyncio.run(abort_during_prefill())
    finally:
        release.set()
        engine.shutdown()

    assert seen == (0, 1, 1.0)
    assert error == "stopped by the test"
    assert engine.running_count == 0


def test_warmup_request_left_out_of_metrics(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    model, tokenizer = load_with_adapter(tiny_model_dir, tiny_adapters[TINY_ADAPTER], "bfloat16")
    engine = Engine(model, tokenizer)
    request = GenerationRequest("warmup", [1, 2, 3], TINY_ADAPTER, 5, 3, warmup=True)
    before = matlora_samples()

    asyncio.run(generate_all(engine, [request]))

    assert matlora_samples() == before
    assert engine.stats.token_seconds(TINY_ADAPTER) == {}
    assert engine.stats.completion_tokens(TINY_ADAPTER) is None
