"""Prometheus metrics of the server, all prefixed ``matlora_``.

With several uvicorn workers each worker is a process with its own counters. When
``PROMETHEUS_MULTIPROC_DIR`` is set (``matlora serve`` always sets it), every worker writes
its values to files there and a scrape of any worker adds up all of them. The variable
must be set before ``prometheus_client`` is first imported.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_RENAMED_FAMILIES = {"matlora_policy_rank_last": "matlora_policy_rank"}

disable_created_metrics()

REQUEST_DURATION = Histogram(
    "matlora_request_duration_seconds",
    "Time from a generation request's arrival to its last byte, for 2xx responses, by adapter and rank used.",
    ["adapter", "rank"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
TIME_TO_FIRST_TOKEN = Histogram(
    "matlora_time_to_first_token_seconds",
    "Time from a generation request's arrival at the engine to its first generated token, by adapter and rank used.",
    ["adapter", "rank"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
REQUESTS = Counter(
    "matlora_requests",
    "Generation requests completed, by adapter, rank used and status class (2xx, 4xx, 5xx). "
    "Requests rejected before an adapter or rank was resolved have adapter or rank 'none'.",
    ["adapter", "rank", "status"],
)
GENERATED_TOKENS = Counter(
    "matlora_generated_tokens", "Tokens generated, by adapter and rank used.", ["adapter", "rank"]
)
PROMPT_TOKENS = Counter(
    "matlora_prompt_tokens", "Prompt tokens processed, by adapter and rank used.", ["adapter", "rank"]
)
QUEUE_DEPTH = Gauge("matlora_queue_depth", "Requests waiting to join the running batch.", multiprocess_mode="livesum")
RUNNING_REQUESTS = Gauge("matlora_running_requests", "Requests in the running batch.", multiprocess_mode="livesum")
BATCH_SIZE = Histogram(
    "matlora_batch_size",
    "Requests (rows) per forward step.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
POLICY_RANK_CHOICES = Counter(
    "matlora_policy_rank", "Ranks chosen by the auto rank policy, by adapter and rank.", ["adapter", "rank"]
)
POLICY_RANK = Gauge(
    "matlora_policy_rank_last",
    "The rank the auto rank policy chose last, by adapter.",
    ["adapter"],
    multiprocess_mode="livemostrecent",
)


class _RenamingCollector:
    """Yield another collector's metric families with the names in ``_RENAMED_FAMILIES`` replaced."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self):
        for family in self.collector.collect():
            new_name = _RENAMED_FAMILIES.get(family.name)
            if new_name is not None:
                family.name = new_name
                family.samples = [sample._replace(name=new_name) for sample in family.samples]
            yield family


def render_latest() -> tuple[bytes, str]:
    """Return the exposition text of all metrics (every worker's, in multiprocess mode) and its content type."""
    source = multiprocess.MultiProcessCollector(None) if os.environ.get(MULTIPROC_DIR_ENV) else REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RenamingCollector(source))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_worker_exited(pid: int) -> None:
    """Drop a stopped worker's live gauges (queue depth, running requests, policy rank) from the sums."""
    if os.environ.get(MULTIPROC_DIR_ENV):
        multiprocess.mark_process_dead(pid)
