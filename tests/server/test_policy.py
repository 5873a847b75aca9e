"""Rank policies: the auto policy's predictions, and its steps down and up under real load."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.engine.stats import ServingStats
from server.loading import AdapterInfo
from server.policy import Load, RankPolicy
from tests.server.conftest import TINY_ADAPTER, TINY_MAX_RANK, ThreadServer

ADAPTER = AdapterInfo("math", max_rank=16, train_ranks=(1, 2, 4, 8, 16), target_modules=("q_proj",), path=Path("."))
IDLE = Load(waiting=0, running=0, max_batch_size=4)


def measured_stats(token_ms: dict[int, float], completion_tokens: int = 10) -> ServingStats:
    stats = ServingStats()
    for rank, milliseconds in token_ms.items():
        stats.observe_decode_step(milliseconds / 1000, [("math", rank)])
    stats.observe_completion("math", completion_tokens)
    return stats


@pytest.mark.parametrize(
    ("waiting", "running", "batches"),
    [(0, 0, 1), (0, 3, 1), (0, 4, 2), (3, 4, 2), (4, 4, 3), (7, 2, 3)],
)
def test_load_batches_to_wait_for(waiting: int, running: int, batches: int) -> None:
    assert Load(waiting, running, max_batch_size=4).batches_to_wait_for() == batches


def test_auto_picks_max_rank_without_measurements() -> None:
    policy = RankPolicy("auto", None, target_latency_ms=1, stats=ServingStats())

    assert policy.choose(ADAPTER, None, max_new_tokens=100, load=IDLE) == 16


def test_auto_picks_largest_rank_meeting_target() -> None:
    # 10 tokens each: ranks 1..16 predict 100, 110, 120, 150, 200 ms when idle.
    stats = measured_stats({1: 10, 2: 11, 4: 12, 8: 15, 16: 20})
    policy = RankPolicy("auto", None, target_latency_ms=160, stats=stats)

    assert policy.choose(ADAPTER, "auto", max_new_tokens=100, load=IDLE) == 8


def test_auto_steps_down_under_load_and_back_up() -> None:
    stats = measured_stats({1: 10, 2: 11, 4: 12, 8: 15, 16: 20})
    policy = RankPolicy("auto", None, target_latency_ms=250, stats=stats)
    busy = Load(waiting=4, running=4, max_batch_size=4)  # waits for 2 more batches: x3

    ranks = [policy.choose(ADAPTER, "auto", 100, load) for load in (IDLE, busy, IDLE)]

    assert ranks == [16, 1, 16]


def test_auto_uses_nearest_larger_measured_rank() -> None:
    stats = measured_stats({1: 10, 16: 30})
    policy = RankPolicy("auto", None, target_latency_ms=250, stats=stats)

    predictions = policy.predict_seconds(ADAPTER, [1, 2, 8, 16], max_new_tokens=100, load=IDLE)

    assert predictions == pytest.approx({1: 0.1, 2: 0.3, 8: 0.3, 16: 0.3})


def test_auto_expects_at_most_max_new_tokens() -> None:
    stats = measured_stats({16: 10}, completion_tokens=50)
    policy = RankPolicy("auto", None, target_latency_ms=250, stats=stats)

    assert policy.predict_seconds(ADAPTER, [16], max_new_tokens=5, load=IDLE) == {16: pytest.approx(0.05)}
    assert policy.predict_seconds(ADAPTER, [16], max_new_tokens=500, load=IDLE) == {16: pytest.approx(0.5)}


@pytest.mark.parametrize(
    ("name", "default_rank", "requested", "rank"),
    [("max", None, None, 16), ("fixed", 4, None, 4), ("fixed", 4, 2, 2), ("max", None, 0, 0), ("auto", None, 3, 3)],
)
def test_policy_choice(name: str, default_rank: int | None, requested, rank: int) -> None:
    policy = RankPolicy(name, default_rank, target_latency_ms=1000, stats=ServingStats())

    assert policy.choose(ADAPTER, requested, max_new_tokens=10, load=IDLE) == rank


def test_explicit_auto_overrides_fixed_policy() -> None:
    policy = RankPolicy("fixed", 2, target_latency_ms=1000, stats=ServingStats())

    assert policy.choose(ADAPTER, "auto", max_new_tokens=10, load=IDLE) == 16


@pytest.fixture(scope="module")
def auto_server(tiny_model_dir: Path, tiny_adapters: dict[str, Path]):
    """One request at a time, so queued requests multiply the predicted latency."""
    with ThreadServer(
        base=str(tiny_model_dir),
        adapter=[f"{TINY_ADAPTER}={tiny_adapters[TINY_ADAPTER]}"],
        rank_policy="auto",
        max_batch_size=1,
        max_queue=64,
    ) as server:
        yield server


def test_auto_policy_under_real_load(auto_server: ThreadServer) -> None:
    """Idle: the max rank. With 20 or more requests queued ahead: the smallest trained rank. Drained: the max again.

    The target is set to 5 times the idle prediction measured here; with 20 requests
    queued ahead the prediction is 22 times the idle one. Each side has a margin of over
    4, so the speed of the shared CPU does not decide the outcome.
    """
    policy = auto_server.app.state.service.policy
    adapter = auto_server.app.state.service.adapters[TINY_ADAPTER]
    body = {"prompt": "1 + 1 =", "max_new_tokens": 16}
    with httpx.Client(base_url=auto_server.url, timeout=120.0) as http:
        for rank in adapter.train_ranks:  # measure every candidate rank while idle
            http.post("/generate", json={**body, "rank": rank})
        idle_predictions = policy.predict_seconds(adapter, list(adapter.train_ranks), 16, Load(0, 0, 1))
        policy.target_seconds = 5 * max(idle_predictions.values())

        idle_rank = http.post("/generate", json={**body, "rank": "auto"}).json()["rank"]
        with ThreadPoolExecutor(24) as pool:
            load = [pool.submit(http.post, "/generate", json={**body, "rank": TINY_MAX_RANK}) for _ in range(24)]
            while auto_server.engine.waiting_count < 20:
                time.sleep(0.005)
            loaded_rank = http.post("/generate", json={**body, "rank": "auto"}).json()["rank"]
            load_statuses = {future.result().status_code for future in load}
        drained_rank = http.post("/generate", json=body).json()["rank"]

    assert load_statuses == {200}
    assert idle_rank == TINY_MAX_RANK
    assert loaded_rank == 1
    assert drained_rank == TINY_MAX_RANK
