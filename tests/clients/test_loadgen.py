"""The load generator: arrival schedules, per-request records, summaries and the JSON report."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from clients.loadgen import (
    LoadConfig,
    LoadReport,
    RequestRecord,
    arrival_times,
    format_summary,
    load_prompts,
    percentile,
    run_load,
    summarize,
)


def test_constant_arrivals():
    rng = random.Random(0)
    assert arrival_times(4, 1.0, "constant", rng) == [0.0, 0.25, 0.5, 0.75]
    assert arrival_times(2.5, 1.0, "constant", rng) == [0.0, 0.4, 0.8]


def test_poisson_arrivals_seeded():
    first = arrival_times(100, 10.0, "poisson", random.Random(7))
    second = arrival_times(100, 10.0, "poisson", random.Random(7))
    assert first == second
    assert first == sorted(first)
    assert 0 < first[0] and first[-1] < 10.0
    # 1000 expected; a Poisson count is within 4 standard deviations (+-126) with this seed.
    assert 874 <= len(first) <= 1126


def test_percentile_interpolates():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile(values, 100) == 4.0
    assert percentile([5.0], 99) == 5.0


def test_load_prompts_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What is 1 plus 1?\n\n  \nWhat is 2 plus 2?\n")
    assert load_prompts(path) == ("What is 1 plus 1?", "What is 2 plus 2?")


def test_load_prompts_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a\\nb"}\n{"prompt": "c", "answer": "d"}\n')
    assert load_prompts(path) == ("a\nb", "c")


def test_load_prompts_jsonl_missing_field(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:1: expected a JSON object with a string 'prompt' field"):
        load_prompts(path)


def test_load_prompts_empty(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n")
    with pytest.raises(ValueError, match="contains no prompts"):
        load_prompts(path)


def test_config_rejects_bad_settings():
    with pytest.raises(
        ValueError, match=r"rate=0 .*concurrency=0 .*ranks must contain at least one rank.*arrival='burst'"
    ):
        LoadConfig(rate=0, concurrency=0, ranks=(), arrival="burst")


def test_config_json_omits_api_key():
    settings = LoadConfig(api_key="s3cret").to_json()
    assert "api_key" not in settings
    assert "s3cret" not in json.dumps(settings)


def record(index, rank, status="200", latency=0.1, **fields) -> RequestRecord:
    base = RequestRecord(index=index, rank_requested=rank, prompt_index=0, scheduled_s=index * 0.1)
    base.status = status
    base.status_code = int(status) if status.isdigit() else None
    base.latency_s = latency
    for name, value in fields.items():
        setattr(base, name, value)
    return base


def test_summarize_counts_and_percentiles():
    records = [
        record(0, 8, latency=0.1, rank_used=8, completion_tokens=4, replica="a"),
        record(1, 8, latency=0.3, rank_used=8, completion_tokens=4, replica="b"),
        record(2, "auto", latency=0.2, rank_used=4, completion_tokens=2, ttft_s=0.05, replica="a"),
        record(3, "auto", status="429", latency=0.01, replica="b"),
        record(4, None, status="connection_error", latency=0.001),
    ]
    summary = summarize(records, elapsed_s=2.0, duration_s=1.0)

    assert summary["requests"] == 5
    assert summary["ok"] == 3
    assert summary["failed"] == 2
    assert summary["offered_rps"] == 5.0
    assert summary["throughput_rps"] == 1.5
    assert summary["completion_tokens"] == 10
    assert summary["tokens_per_s"] == 5.0
    assert summary["status_counts"] == {"200": 3, "429": 1, "connection_error": 1}
    assert summary["replica_counts"] == {"a": 2, "b": 2, "unknown": 1}
    assert list(summary["by_rank"]) == ["8", "auto", "default", "all"]

    rank8 = summary["by_rank"]["8"]
    assert (rank8["requests"], rank8["ok"]) == (2, 2)
    assert rank8["latency_s"]["p50"] == pytest.approx(0.2)
    assert rank8["latency_s"]["max"] == 0.3
    assert rank8["ttft_s"] is None
    assert rank8["ranks_used"] == {"8": 2}

    auto = summary["by_rank"]["auto"]
    assert auto["status_counts"] == {"200": 1, "429": 1}
    assert auto["latency_s"]["p99"] == 0.2
    assert auto["ttft_s"]["p50"] == 0.05
    assert auto["ranks_used"] == {"4": 1}

    assert summary["by_rank"]["default"]["latency_s"] is None
    assert summary["by_rank"]["all"]["requests"] == 5


def test_format_summary_table():
    records = [record(0, 8, latency=0.25, rank_used=8, completion_tokens=3), record(1, 1, status="503")]
    text = format_summary(summarize(records, elapsed_s=1.0, duration_s=1.0))
    lines = text.splitlines()
    assert lines[0].split() == [
        "rank",
        "sent",
        "ok",
        "p50",
        "ms",
        "p95",
        "ms",
        "p99",
        "ms",
        "ttft",
        "p50",
        "ttft",
        "p95",
        "ranks",
        "used",
    ]
    assert lines[1].split() == ["1", "1", "0", "-", "-", "-", "-", "-"]
    assert lines[2].split() == ["8", "1", "1", "250", "250", "250", "-", "-", "8:1"]
    assert lines[4] == "2 sent, 1 ok in 1.0 s: 1.00 requests/s, 3.0 tokens/s"
    assert lines[5] == "statuses: 200=1 503=1"


def fake_generate(request: httpx.Request) -> httpx.Response:
    """Answer by rank: 16 gets 429, 2 fails to connect, others succeed; streams when asked."""
    body = json.loads(request.content)
    rank = body.get("rank")
    if rank == 16:
        return httpx.Response(429, json={"error": {"message": "queue full"}}, headers={"retry-after": "1"})
    if rank == 2:
        raise httpx.ConnectError("connection refused")
    used = 4 if rank in ("auto", None) else rank
    result = {
        "id": f"id-{body['prompt']}",
        "text": "85",
        "rank": used,
        "adapter": "arith",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 5, "completion_tokens": body["max_new_tokens"]},
    }
    headers = {"x-request-id": result["id"], "x-matlora-replica": f"replica-{used % 2}"}
    if not body.get("stream"):
        return httpx.Response(200, json=result, headers=headers)
    events = [{"type": "token", "text": "8"}, {"type": "token", "text": "5"}, {"type": "done", **result}]
    content = "".join(f"data: {json.dumps(event)}\n\n" for event in events).encode()
    return httpx.Response(200, content=content, headers={"content-type": "text/event-stream", **headers})


def run_fake_load(config: LoadConfig) -> LoadReport:
    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake_generate)) as http:
            return await run_load(config, http_client=http)

    return asyncio.run(main())


@pytest.mark.parametrize("stream", [False, True])
def test_run_load_records_every_outcome(stream):
    config = LoadConfig(
        url="http://matlora.test",
        rate=400,
        duration=0.1,
        arrival="constant",
        ranks=(1, 2, 16, "auto", None),
        prompts=("p0", "p1"),
        max_new_tokens=3,
        stream=stream,
        seed=1,
    )
    report = run_fake_load(config)

    assert len(report.records) == 40
    assert [record.index for record in report.records] == list(range(40))
    for record in report.records:
        if record.rank_requested == 16:
            assert (record.status, record.status_code, record.error_type) == ("429", 429, "OverloadedError")
        elif record.rank_requested == 2:
            assert (record.status, record.status_code) == ("connection_error", None)
            assert "connection refused" in record.error
        else:
            assert record.status == "200"
            assert record.rank_used == (4 if record.rank_requested in ("auto", None) else 1)
            assert record.completion_tokens == 3
            assert record.request_id == f"id-p{record.prompt_index}"
            assert record.replica == f"replica-{record.rank_used % 2}"
            assert (record.ttft_s is not None) == stream
        assert record.latency_s is not None

    summary = report.summary
    assert summary["requests"] == 40
    assert sum(summary["status_counts"].values()) == 40
    assert set(summary["status_counts"]) == {"200", "429", "connection_error"}
    assert set(summary["by_rank"]) == {"1", "2", "16", "auto", "default", "all"}


def test_run_load_report_json(tmp_path):
    config = LoadConfig(url="http://matlora.test", rate=200, duration=0.05, arrival="constant", ranks=(8,))
    report = run_fake_load(config)
    path = tmp_path / "report.json"
    report.write_json(path)

    written = json.loads(path.read_text())
    assert written["config"]["rate"] == 200
    assert written["config"]["ranks"] == [8]
    assert written["summary"]["ok"] == 10
    assert len(written["requests"]) == 10
    assert written["requests"][0]["status"] == "200"
    assert written["requests"][0]["rank_used"] == 8
