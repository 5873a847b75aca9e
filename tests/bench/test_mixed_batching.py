"""Tests of the mixed-batching benchmark's summaries (the server runs are exercised by its --smoke run)."""

from __future__ import annotations

import json

import pytest

from bench import mixed_batching
from bench.mixed_batching import MixedBatchingConfig, ServedAdapter


def record(status: str, latency: float, tokens: int = 16, rank: int | None = 16) -> dict:
    return {"status": status, "latency_s": latency, "completion_tokens": tokens, "rank_used": rank}


REPORT = {
    "requests": [
        record("200", 1.0, rank=16),
        record("200", 2.0, tokens=8, rank=1),
        record("200", 3.0, rank=1),
        record("429", 0.01, tokens=0, rank=None),
    ],
    "summary": {"throughput_rps": 1.5, "tokens_per_s": 20.0},
}


def test_run_summary_counts_and_percentiles():
    summary = mixed_batching.run_summary(REPORT)

    assert summary["requests"] == 4
    assert summary["ok"] == 3
    assert summary["rejected"] == 1
    assert summary["failed"] == 1
    assert summary["latency_p50_s"] == 2.0
    assert summary["latency_p95_s"] == pytest.approx(2.9)
    assert summary["tokens_per_request"] == pytest.approx(40 / 3)
    assert summary["ranks_used"] == {"1": 2, "16": 1}


def test_pooled_averages_throughput_and_pools_requests():
    other = {"requests": [record("200", 4.0)], "summary": {"throughput_rps": 0.5, "tokens_per_s": 10.0}}

    summary = mixed_batching.pooled([REPORT, other])

    assert summary["ok"] == 4
    assert summary["throughput_rps"] == 1.0
    assert summary["tokens_per_s"] == 15.0
    assert summary["latency_p50_s"] == 2.5


def test_expected_accuracy_weighs_ranks():
    accuracy = {1: 0.3, 16: 0.9}

    assert mixed_batching.expected_accuracy({"1": 2, "16": 1}, accuracy) == pytest.approx(0.5)
    assert mixed_batching.expected_accuracy({"8": 1}, accuracy) is None
    assert mixed_batching.expected_accuracy({}, accuracy) is None


def test_accuracy_from_eval_report(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"label": "arith", "ranks": [0, 1, 16], "accuracy": [0.0, 0.3, 0.9]}))
    adapter = ServedAdapter(tmp_path, (), 16, (1, 16), random=False)

    accuracy, source = mixed_batching.accuracy_by_rank(path, adapter)

    assert accuracy == {0: 0.0, 1: 0.3, 16: 0.9}
    assert source == f"{path} (arith)"


def test_default_target_uses_full_batch_at_max_rank():
    config = MixedBatchingConfig(max_batch_size=16)
    sweep = [
        {"mode": "max", "concurrency": 4, "latency_p50_s": 0.5},
        {"mode": "max", "concurrency": 16, "latency_p50_s": 1.0},
        {"mode": "max", "concurrency": 32, "latency_p50_s": 2.0},
        {"mode": "mixed", "concurrency": 16, "latency_p50_s": 0.9},
    ]

    assert mixed_batching._default_target_ms(sweep, config) == 1500.0


def test_burst_size_has_a_floor():
    config = MixedBatchingConfig(requests_per_slot=4, min_requests=16)

    assert config.burst_size(1) == 16
    assert config.burst_size(32) == 128
