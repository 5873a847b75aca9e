"""An open-loop load generator: mixed-rank ``/generate`` traffic at a set rate for a set time.

Arrival times are drawn before the run starts (Poisson or evenly spaced), so a slow
server does not slow the offered load. Each request is sent once, without retries, and
its outcome is recorded whether it succeeded or failed: the status or the connection error, latency,
time to first token when streaming, the rank used, the request id and the replica that
served it. ``summarize`` turns the records into per-rank latency percentiles, throughput
and counts by status and by replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from clients.client import DEFAULT_URL, AsyncMatloraClient
from clients.errors import APIConnectionError, APIError, APITimeoutError, MatloraError, StreamError
from clients.retry import RetryPolicy
from clients.types import GenerateResult, Rank, TextDelta

logger = logging.getLogger(__name__)

ARRIVALS = ("poisson", "constant")
DEFAULT_PROMPTS = (
    "What is 47 plus 38?",
    "What is 12 times 9?",
    "What is 305 minus 78?",
    "What is 144 divided by 12?",
    "What is 7 plus 6 times 3?",
    "What is 999 plus 1?",
)
# The label of requests sent without a rank, which the server's rank policy then picks.
DEFAULT_RANK_LABEL = "default"


@dataclass(frozen=True)
class LoadConfig:
    """Settings of one load run. Each request draws its rank uniformly from ``ranks``, and None sends no rank."""

    url: str = DEFAULT_URL
    rate: float = 8.0
    duration: float = 30.0
    ranks: tuple[Rank | None, ...] = (1, 4, 8, 16, "auto")
    concurrency: int = 64
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int | None = 16
    temperature: float | None = None
    adapter: str | None = None
    stream: bool = False
    # Send prompts through the server's chat template, as the bundled adapter was trained.
    chat: bool = True
    arrival: Literal["poisson", "constant"] = "poisson"
    seed: int = 0
    timeout: float = 120.0
    # Every matlora replica names itself in this header; behind nginx, "x-matlora-upstream"
    # names the upstream address that nginx picked.
    replica_header: str = "x-matlora-replica"
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if not self.rate > 0:
            problems.append(f"rate={self.rate} must be > 0 requests per second")
        if not self.duration > 0:
            problems.append(f"duration={self.duration} must be > 0 seconds")
        if self.concurrency < 1:
            problems.append(f"concurrency={self.concurrency} must be at least 1")
        if not self.ranks:
            problems.append("ranks must contain at least one rank, e.g. (8,) or ('auto',)")
        if not self.prompts:
            problems.append("prompts must contain at least one prompt")
        if self.arrival not in ARRIVALS:
            problems.append(f"arrival={self.arrival!r} must be one of {ARRIVALS}")
        if not self.timeout > 0:
            problems.append(f"timeout={self.timeout} must be > 0 seconds")
        if problems:
            raise ValueError("invalid LoadConfig: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """Return the settings for a report, without the API key."""
        settings = asdict(self)
        del settings["api_key"]
        return settings


@dataclass
class RequestRecord:
    """The outcome of one request. Times are in seconds, and offsets count from the start of the run.

    ``status`` is the HTTP status as text (``"200"``, ``"429"``), ``"stream_error"`` for an
    error event inside a 200 stream, or ``"connection_error"``, ``"timeout"`` or
    ``"invalid_response"`` when no usable response arrived, and ``"client_error"`` for an
    unexpected exception in this process. ``client_wait_s`` is the time
    the request waited for one of the ``concurrency`` slots before it was sent.
    """

    index: int
    rank_requested: Rank | None
    prompt_index: int
    scheduled_s: float
    client_wait_s: float = 0.0
    status: str = "not_sent"
    status_code: int | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    rank_used: int | None = None
    adapter: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    request_id: str | None = None
    replica: str | None = None
    error_type: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "200"

    @property
    def rank_label(self) -> str:
        return DEFAULT_RANK_LABEL if self.rank_requested is None else str(self.rank_requested)


@dataclass
class LoadReport:
    """The settings, summary and per-request records of one run, as written by ``--json``."""

    config: LoadConfig
    elapsed_s: float
    records: list[RequestRecord]
    summary: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.summary = summarize(self.records, self.elapsed_s, self.config.duration)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "summary": self.summary,
            "requests": [asdict(record) for record in self.records],
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def arrival_times(rate: float, duration: float, arrival: str, rng: random.Random) -> list[float]:
    """Return the send offsets in [0, duration): Poisson arrivals, or one every 1/rate seconds."""
    if arrival == "constant":
        count = int(rate * duration)
        if count < rate * duration:
            count += 1
        return [index / rate for index in range(count)]

    times: list[float] = []
    offset = rng.expovariate(rate)
    while offset < duration:
        times.append(offset)
        offset += rng.expovariate(rate)
    return times


def load_prompts(path: str | Path) -> tuple[str, ...]:
    """Read prompts from a file: one per line, or a ``"prompt"`` field per line of a ``.jsonl`` file."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, start=1):
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise ValueError(f"{path}:{number}: expected a JSON object with a string 'prompt' field")
            prompts.append(entry["prompt"])
        lines = prompts
    if not lines:
        raise ValueError(f"{path} contains no prompts")
    return tuple(lines)


async def run_load(config: LoadConfig, http_client: httpx.AsyncClient | None = None) -> LoadReport:
    """Send the run's traffic and return every request's record once the last one finishes.

    ``http_client`` replaces the connection pool of ``config.concurrency`` connections that
    is built otherwise (tests pass one with a mock transport).
    """
    rng = random.Random(config.seed)
    schedule = arrival_times(config.rate, config.duration, config.arrival, rng)
    records = [
        RequestRecord(
            index=index,
            rank_requested=rng.choice(config.ranks),
            prompt_index=rng.randrange(len(config.prompts)),
            scheduled_s=offset,
        )
        for index, offset in enumerate(schedule)
    ]
    logger.info(
        "sending %d requests over %.1f s (%s arrivals at %.2f/s) to %s",
        len(records),
        config.duration,
        config.arrival,
        config.rate,
        config.url,
    )

    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    http = http_client if http_client is not None else httpx.AsyncClient(limits=limits)
    client = AsyncMatloraClient(
        config.url,
        api_key=config.api_key,
        timeout=httpx.Timeout(config.timeout, connect=min(5.0, config.timeout)),
        retry=RetryPolicy(max_attempts=1),
        http_client=http,
    )
    slots = asyncio.Semaphore(config.concurrency)
    try:
        start = time.perf_counter()
        tasks = []
        for record in records:
            await asyncio.sleep(max(0.0, start + record.scheduled_s - time.perf_counter()))
            tasks.append(asyncio.create_task(_send_one(client, config, record, slots, start)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    finally:
        if http_client is None:
            await http.aclose()
    return LoadReport(config=config, elapsed_s=elapsed, records=records)


async def _send_one(
    client: AsyncMatloraClient,
    config: LoadConfig,
    record: RequestRecord,
    slots: asyncio.Semaphore,
    start: float,
) -> None:
    async with slots:
        sent = time.perf_counter()
        record.client_wait_s = max(0.0, sent - start - record.scheduled_s)
        try:
            result = await _generate(client, config, record, sent)
        except APIError as exc:
            _record_error(record, exc, "stream_error" if isinstance(exc, StreamError) else str(exc.status_code))
            record.status_code = exc.status_code if exc.status_code is not None else 200
            record.request_id = exc.request_id
            record.replica = exc.headers.get(config.replica_header)
        except APITimeoutError as exc:
            _record_error(record, exc, "timeout")
        except APIConnectionError as exc:
            _record_error(record, exc, "connection_error")
        except MatloraError as exc:
            _record_error(record, exc, "invalid_response")
        except Exception as exc:
            # Keep the run going. The record contains the error, and the log its traceback.
            logger.exception("request %d failed in the client", record.index)
            _record_error(record, exc, "client_error")
        else:
            _record_result(record, result, config.replica_header)
        record.latency_s = time.perf_counter() - sent


async def _generate(
    client: AsyncMatloraClient, config: LoadConfig, record: RequestRecord, sent: float
) -> GenerateResult:
    arguments: dict[str, Any] = {
        "rank": record.rank_requested,
        "adapter": config.adapter,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "chat": True if config.chat else None,
    }
    prompt = config.prompts[record.prompt_index]
    if not config.stream:
        return await client.generate(prompt, **arguments)

    async with await client.generate_stream(prompt, **arguments) as stream:
        async for event in stream:
            if isinstance(event, TextDelta) and record.ttft_s is None:
                record.ttft_s = time.perf_counter() - sent
        return await stream.until_done()


def _record_result(record: RequestRecord, result: GenerateResult, replica_header: str) -> None:
    record.status = "200"
    record.status_code = 200
    record.rank_used = result.rank
    record.adapter = result.adapter
    record.finish_reason = result.finish_reason
    record.prompt_tokens = result.usage.prompt_tokens
    record.completion_tokens = result.usage.completion_tokens
    record.request_id = result.request_id
    record.replica = result.headers.get(replica_header)


def _record_error(record: RequestRecord, error: Exception, status: str) -> None:
    record.status = status
    record.error_type = getattr(error, "type", None) or type(error).__name__
    record.error = str(error)


def percentile(values: Sequence[float], q: float) -> float:
    """Return the q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def latency_stats(values: Sequence[float]) -> dict[str, float] | None:
    """Return p50, p95, p99, mean and max of ``values`` in seconds, or None when there are none."""
    if not values:
        return None
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values),
        "max": max(values),
    }


def _group_summary(records: Sequence[RequestRecord]) -> dict[str, Any]:
    answered = [record for record in records if record.ok]
    return {
        "requests": len(records),
        "ok": len(answered),
        "latency_s": latency_stats([record.latency_s for record in answered if record.latency_s is not None]),
        "ttft_s": latency_stats([record.ttft_s for record in answered if record.ttft_s is not None]),
        "ranks_used": dict(sorted(Counter(str(record.rank_used) for record in answered).items())),
        "status_counts": dict(sorted(Counter(record.status for record in records).items())),
    }


def summarize(records: Sequence[RequestRecord], elapsed_s: float, duration_s: float) -> dict[str, Any]:
    """Return the run's counts, throughput and, per requested rank and for ``"all"``, latency percentiles."""
    answered = [record for record in records if record.ok]
    completion_tokens = sum(record.completion_tokens or 0 for record in answered)
    labels = sorted({record.rank_label for record in records}, key=_rank_sort_key)
    by_rank = {label: _group_summary([r for r in records if r.rank_label == label]) for label in labels}
    by_rank["all"] = _group_summary(records)
    return {
        "requests": len(records),
        "ok": len(answered),
        "failed": len(records) - len(answered),
        "elapsed_s": elapsed_s,
        "offered_rps": len(records) / duration_s,
        "throughput_rps": len(answered) / elapsed_s if elapsed_s > 0 else 0.0,
        "completion_tokens": completion_tokens,
        "tokens_per_s": completion_tokens / elapsed_s if elapsed_s > 0 else 0.0,
        "status_counts": dict(sorted(Counter(record.status for record in records).items())),
        "replica_counts": dict(sorted(Counter(record.replica or "unknown" for record in records).items())),
        "by_rank": by_rank,
    }


def _rank_sort_key(label: str) -> tuple[int, int | str]:
    return (0, int(label)) if label.isdigit() else (1, label)


def format_summary(summary: dict[str, Any]) -> str:
    """Render a summary as a table: one row per requested rank, latencies in milliseconds."""
    header = f"{'rank':>8} {'sent':>6} {'ok':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'ttft p50':>9} {'ttft p95':>9}  ranks used"
    lines = [header]
    for label, group in summary["by_rank"].items():
        latency = group["latency_s"] or {}
        ttft = group["ttft_s"] or {}
        used = " ".join(f"{rank}:{count}" for rank, count in group["ranks_used"].items())
        lines.append(
            f"{label:>8} {group['requests']:>6} {group['ok']:>6} {_ms(latency.get('p50')):>8} "
            f"{_ms(latency.get('p95')):>8} {_ms(latency.get('p99')):>8} {_ms(ttft.get('p50')):>9} "
            f"{_ms(ttft.get('p95')):>9}  {used}"
        )
    statuses = " ".join(f"{status}={count}" for status, count in summary["status_counts"].items())
    replicas = " ".join(f"{replica}={count}" for replica, count in summary["replica_counts"].items())
    lines.append(
        f"{summary['requests']} sent, {summary['ok']} ok in {summary['elapsed_s']:.1f} s: "
        f"{summary['throughput_rps']:.2f} requests/s, {summary['tokens_per_s']:.1f} tokens/s"
    )
    lines.append(f"statuses: {statuses}")
    lines.append(f"replicas: {replicas}")
    return "\n".join(line.rstrip() for line in lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"
