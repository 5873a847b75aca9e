"""Decode latency by rank, and throughput by concurrency through the real server.

1. Per-token decode latency on the embedded default base at ranks 0, 1, 8 and R, at
   batch 1 and batch 8, through the server's own decode path (ragged attention, float64
   adapter deltas, filler rows). Each measurement prefills fresh caches, then times
   ``--steps`` decode steps. Batch sizes and ranks take turns in alternating order. Each
   rank's ratio to rank 0 is taken within a round, before the median over rounds.
2. Throughput of ``matlora serve`` at concurrency 1, 4 and 16: the same mixed-rank
   greedy requests (ranks 0, 1, 8, R in turn), sent with at most C in flight. Concurrency
   1 is one-at-a-time serving. Levels take turns in alternating order over the rounds.

The CPU is shared, so every figure is a median over rounds, and ratios are formed within
a round. The adapter is the bundled one when present, else a random one of rank 16 on
all seven projections (timing depends on the shape only).

    python -m bench.serve_latency                # about 1 minute on a 2-core CPU
    python -m bench.serve_latency --rounds 1 --requests 4 --steps 4   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import common

logger = logging.getLogger(__name__)

NAME = "serve_latency"
ADAPTER_NAME = "bench"
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BATCH_SIZES = (1, 8)
CONCURRENCIES = (1, 4, 16)
PROMPT = "Question: What is 47 plus 38? Think step by step, then give the answer.\nAnswer:"
READY_TIMEOUT_S = 600.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, help="adapter folder (default: the bundled one, else a random one)")
    parser.add_argument(
        "--threads", type=int, default=1, help="PyTorch CPU threads, here and in the server (default: 1)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all variants (default: 3)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per measurement (default: 16)")
    parser.add_argument(
        "--requests", type=int, default=16, help="requests per concurrency level and round (default: 16)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request (default: 32)")
    parser.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR, help="where the JSON and table go")
    parser.add_argument("--work-dir", type=Path, default=common.WORK_DIR / NAME, help="folder for the random adapter")
    return parser


def resolve_adapter(args: argparse.Namespace) -> Path:
    from server.settings import BUNDLED_ADAPTER_DIR

    if args.adapter is not None:
        return args.adapter
    if (BUNDLED_ADAPTER_DIR / "adapter_config.json").is_file():
        return BUNDLED_ADAPTER_DIR
    return common.build_random_adapter("smollm2-135m", 16, ALL_PROJECTIONS, args.work_dir / "adapter")


def measure_decode(adapter_dir: Path, rounds: int, steps: int) -> dict[str, Any]:
    """Time decode steps per rank and batch size; return the medians and the ratios to rank 0."""
    import torch

    import matlora
    from matlora.base_model import load_base
    from server.engine.attention import RowKV
    from server.engine.runner import ModelRunner, RowInput

    model, tokenizer = load_base("smollm2-135m")
    max_rank = matlora.load_adapter(model, adapter_dir, ADAPTER_NAME).r
    runner = ModelRunner(model, tokenizer.pad_token_id)
    prompt_ids = tokenizer(PROMPT).input_ids
    ranks = sorted({0, 1, min(8, max_rank), max_rank})

    def step_seconds(batch: int, rank: int) -> float:
        caches = [RowKV(len(prompt_ids) + steps + 1) for _ in range(batch)]
        for kv in caches:
            runner.prefill(RowInput(prompt_ids, 0, kv, ADAPTER_NAME, rank))
        times = []
        for _ in range(steps):
            rows = [RowInput([13], len(kv), kv, ADAPTER_NAME, rank) for kv in caches]
            started = time.perf_counter()
            runner.decode(rows)
            times.append(time.perf_counter() - started)
        return common.median(times)

    step_seconds(1, max_rank)  # warm-up
    rounds_measured: list[dict[int, dict[int, float]]] = []  # round -> batch -> rank -> seconds per step
    for round_index in range(rounds):
        measured: dict[int, dict[int, float]] = {}
        for batch in common.round_order(BATCH_SIZES, round_index):
            measured[batch] = {rank: step_seconds(batch, rank) for rank in common.round_order(ranks, round_index)}
            times = {rank: f"{seconds * 1000:.1f} ms" for rank, seconds in measured[batch].items()}
            logger.info("decode batch %d round %d: %s", batch, round_index, times)
        rounds_measured.append(measured)

    rows = []
    for batch in BATCH_SIZES:
        for rank in ranks:
            seconds = common.median([measured[batch][rank] for measured in rounds_measured])
            rows.append(
                {
                    "batch": batch,
                    "rank": rank,
                    "ms_per_token": seconds * 1000,
                    "tokens_per_second": batch / seconds,
                    "ratio_to_rank0": common.median(
                        [measured[batch][rank] / measured[batch][0] for measured in rounds_measured]
                    ),
                }
            )
    return {
        "max_rank": max_rank,
        "ranks": ranks,
        "prompt_tokens": len(prompt_ids),
        "steps": steps,
        "rows": rows,
        "threads": torch.get_num_threads(),
        "seconds_per_step_by_round": rounds_measured,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(adapter_dir: Path, threads: int, log_path: Path) -> Iterator[str]:
    import httpx

    port = free_port()
    command = [
        sys.executable, "-m", "matlora", "serve", "--adapter", f"{ADAPTER_NAME}={adapter_dir}",
        "--port", str(port), "--threads", str(threads), "--max-batch-size", "16", "--rank-policy", "max",
    ]  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"matlora serve did not become ready; see {log_path}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=60)


async def run_closed_loop(url: str, requests: Sequence[dict], concurrency: int) -> tuple[float, list[dict]]:
    """Send ``requests`` with at most ``concurrency`` in flight; return the wall time and the response bodies."""
    import httpx

    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def send(body: dict) -> dict:
            async with slots:
                response = await http.post("/generate", json=body)
                response.raise_for_status()
                return response.json()

        started = time.perf_counter()
        bodies = await asyncio.gather(*(send(body) for body in requests))
        return time.perf_counter() - started, bodies


def measure_throughput(url: str, max_rank: int, rounds: int, count: int, max_new_tokens: int) -> dict[str, Any]:
    ranks = sorted({0, 1, min(8, max_rank), max_rank})
    requests = [
        {
            "prompt": f"Question: What is {11 + 7 * i} plus {3 + 5 * i}?\nAnswer:",
            "rank": ranks[i % len(ranks)],
            "max_new_tokens": max_new_tokens,
        }
        for i in range(count)
    ]
    asyncio.run(run_closed_loop(url, requests[:2], 2))  # warm-up
    per_round: list[dict[int, dict]] = []
    reference_texts = None
    for round_index in range(rounds):
        results = {}
        for concurrency in common.round_order(CONCURRENCIES, round_index):
            seconds, bodies = asyncio.run(run_closed_loop(url, requests, concurrency))
            tokens = sum(body["usage"]["completion_tokens"] for body in bodies)
            texts = [body["text"] for body in bodies]
            reference_texts = reference_texts or texts
            results[concurrency] = {"seconds": seconds, "tokens": tokens, "same_texts": texts == reference_texts}
            logger.info("concurrency %d round %d: %.1f s, %d tokens", concurrency, round_index, seconds, tokens)
        per_round.append(results)

    rows = []
    for concurrency in CONCURRENCIES:
        runs = [results[concurrency] for results in per_round]
        rows.append(
            {
                "concurrency": concurrency,
                "requests_per_second": common.median([count / run["seconds"] for run in runs]),
                "tokens_per_second": common.median([run["tokens"] / run["seconds"] for run in runs]),
                "speedup_vs_one_at_a_time": common.median(
                    [results[1]["seconds"] / results[concurrency]["seconds"] for results in per_round]
                ),
                "tokens_per_request": runs[0]["tokens"] / count,
                "same_texts_as_first_run": all(run["same_texts"] for run in runs),
            }
        )
    return {
        "requests": count,
        "max_new_tokens": max_new_tokens,
        "ranks": ranks,
        "rows": rows,
        "runs_by_round": per_round,
    }


def render_markdown(result: dict[str, Any]) -> str:
    decode = result["decode"]
    decode_rows = [
        [
            row["batch"],
            row["rank"],
            common.fmt(row["ms_per_token"], 1),
            common.fmt(row["tokens_per_second"], 1),
            common.fmt(row["ratio_to_rank0"]),
        ]
        for row in decode["rows"]
    ]
    throughput = result["throughput"]
    throughput_rows = [
        [
            row["concurrency"],
            common.fmt(row["requests_per_second"], 2),
            common.fmt(row["tokens_per_second"], 1),
            common.fmt(row["speedup_vs_one_at_a_time"], 2),
            "yes" if row["same_texts_as_first_run"] else "no",
        ]
        for row in throughput["rows"]
    ]
    return "\n\n".join(
        [
            f"Decode steps on smollm2-135m with a rank-{decode['max_rank']} adapter "
            f"({decode['prompt_tokens']}-token prompts, median of {result['config']['rounds']} rounds). A step "
            "gives every request in the batch one token, so its time is each request's per-token latency. "
            "Each ratio is taken within a round, then the median over rounds:",
            common.markdown_table(["batch", "rank", "ms per step", "tokens/s", "ratio to rank 0"], decode_rows),
            f"Throughput of `matlora serve` on {throughput['requests']} greedy requests of up to "
            f"{throughput['max_new_tokens']} tokens at ranks {', '.join(map(str, throughput['ranks']))} in turn:",
            common.markdown_table(
                ["concurrency", "requests/s", "tokens/s", "speedup vs one at a time", "same texts"], throughput_rows
            ),
            common.environment_note(result["environment"]) + f" {result['config']['threads']} PyTorch thread(s).",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging("INFO")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    adapter_dir = resolve_adapter(args)
    result: dict[str, Any] = {
        "config": {
            **vars(args),
            "adapter": common.display_path(adapter_dir),
            "results_dir": common.display_path(args.results_dir),
            "work_dir": common.display_path(args.work_dir),
        },
        "environment": common.environment("cpu"),
    }
    result["decode"] = measure_decode(adapter_dir, args.rounds, args.steps)
    with running_server(adapter_dir, args.threads, args.work_dir / "server.log") as url:
        result["throughput"] = measure_throughput(
            url, result["decode"]["max_rank"], args.rounds, args.requests, args.max_new_tokens
        )
    markdown = common.write_outputs(NAME, result, args.results_dir, render_markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
