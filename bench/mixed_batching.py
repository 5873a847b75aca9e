"""Mixed-rank batching and the auto rank policy, measured through the real server.

The benchmark starts ``matlora serve`` and drives it with ``matlora loadgen``.

1. Concurrency sweep. For each concurrency C, a burst of requests is sent with at most C in
   flight, so a new request starts as soon as one finishes (a closed loop). It runs once
   with ranks drawn uniformly from the adapter's training ranks (``mixed``) and once with
   every request at the max rank R (``max``), the two alternating. Latency counts from the
   moment a request is sent, so time spent waiting for one of the C slots is left out.
2. Auto policy under load. The server restarts with ``--target-latency-ms``. Open-loop
   Poisson traffic at multiples of the capacity measured at rank R in step 1 is sent
   twice: once with every request at R, once with ``rank: "auto"``. The table shows the latency,
   the rejected requests and the ranks the policy picked, with the accuracy those ranks
   reached in the quality benchmark (or in a ``matlora eval`` report).

Generation stops at the end-of-sequence token, so requests at different ranks may produce
different numbers of tokens. The tables give the tokens per request beside the latency.

    python -m bench.mixed_batching          # about 5 minutes on a 2-core CPU
    python -m bench.mixed_batching --smoke  # a few minutes, tiny random model
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common

logger = logging.getLogger(__name__)

NAME = "mixed_batching"
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAME = "bench"
# The per-rank accuracy used when no report is given: the project's default variant.
QUALITY_VARIANT = "matryoshka (keep_p)"
READY_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class MixedBatchingConfig:
    """Load settings. The defaults are the CPU configuration of about 5 minutes.

    ``adapter`` None serves the bundled adapter when the repository has one, else a random
    adapter of rank ``random_rank`` on ``random_targets`` (timing depends on the shape only).
    """

    base: str = "smollm2-135m"
    adapter: str | None = None
    random_rank: int = 16
    random_targets: tuple[str, ...] = ALL_PROJECTIONS
    concurrencies: tuple[int, ...] = (1, 4, 16, 32)
    requests_per_slot: int = 4
    min_requests: int = 16
    max_new_tokens: int = 16
    max_batch_size: int = 16
    max_queue: int = 64
    repeats: int = 2
    load_factors: tuple[float, ...] = (0.8, 1.5)
    load_seconds: float = 30.0
    target_latency_ms: float | None = None
    request_timeout_s: float = 600.0

    @classmethod
    def preset(cls, name: str) -> MixedBatchingConfig:
        if name == "smoke":
            return cls(
                random_rank=8,
                random_targets=("q_proj", "v_proj"),
                concurrencies=(1, 4),
                requests_per_slot=2,
                min_requests=4,
                max_new_tokens=8,
                max_batch_size=4,
                repeats=1,
                load_factors=(1.5,),
                load_seconds=3.0,
            )
        if name == "full":
            return cls(concurrencies=(1, 2, 4, 8, 16, 32, 64), repeats=3, load_factors=(0.5, 0.8, 1.2, 2.0))
        if name == "default":
            return cls()
        raise ValueError(f"preset must be smoke, default or full, got {name!r}")

    def burst_size(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_slot * concurrency)


@dataclass(frozen=True)
class ServedAdapter:
    """The adapter the server runs: where it is, how it is passed to ``matlora serve``, and its ranks."""

    directory: Path
    serve_arguments: tuple[str, ...]
    max_rank: int
    train_ranks: tuple[int, ...]
    random: bool


def served_adapter(config: MixedBatchingConfig, work_dir: Path) -> ServedAdapter:
    """Return the adapter to serve: the given one, the bundled one, or a random one built once."""
    from matlora.config import AdapterConfig
    from server.settings import BUNDLED_ADAPTER_DIR

    random = False
    if config.adapter is not None:
        directory = Path(config.adapter)
        arguments: tuple[str, ...] = ("--adapter", f"{ADAPTER_NAME}={directory}")
    elif config.base == "smollm2-135m" and (BUNDLED_ADAPTER_DIR / "adapter_config.json").is_file():
        directory, arguments = BUNDLED_ADAPTER_DIR, ()
    else:
        directory = common.build_random_adapter(
            config.base, config.random_rank, config.random_targets, work_dir / "random-adapter"
        )
        arguments, random = ("--adapter", f"{ADAPTER_NAME}={directory}"), True
    adapter_config = AdapterConfig.load(directory)
    return ServedAdapter(directory, arguments, adapter_config.r, tuple(adapter_config.train_ranks), random)


# Server and load generator


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(config: MixedBatchingConfig, adapter: ServedAdapter, port: int, device: str, target_ms: float | None):
    command = [sys.executable, "-m", "matlora", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--base", config.base, *adapter.serve_arguments, "--device", device]
    command += ["--max-batch-size", str(config.max_batch_size), "--max-queue", str(config.max_queue)]
    if target_ms is not None:
        command += ["--target-latency-ms", f"{target_ms:g}"]
    return command


@contextlib.contextmanager
def running_server(command: list[str], log_path: Path, url: str) -> Iterator[None]:
    """Start ``matlora serve``, wait until ``/readyz`` returns 200, and stop it (SIGTERM) on exit."""
    import httpx

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=common.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    tail = "\n".join(log_path.read_text().splitlines()[-20:])
                    raise RuntimeError(
                        f"matlora serve exited with code {process.returncode} before it was ready:\n{tail}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"matlora serve was not ready after {READY_TIMEOUT_S:.0f} s; see {log_path}")
                time.sleep(1)
            logger.info("server ready at %s (log: %s)", url, log_path)
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                logger.warning("matlora serve (pid %d) ignored SIGTERM for 60 s; killing it", process.pid)
                process.kill()
                process.wait()


def run_loadgen(
    url: str,
    ranks: Sequence[int | str],
    rate: float,
    duration: float,
    concurrency: int,
    arrival: str,
    config: MixedBatchingConfig,
    seed: int,
    out: Path,
) -> dict[str, Any]:
    """Run ``matlora loadgen`` once and return its JSON report (settings, summary and every request)."""
    command = [sys.executable, "-m", "matlora", "--log-level", "WARNING", "loadgen", "--url", url]
    command += ["--rate", f"{rate:g}", "--duration", f"{duration:g}", "--concurrency", str(concurrency)]
    command += ["--arrival", arrival, "--ranks", ",".join(map(str, ranks)), "--seed", str(seed)]
    command += ["--max-new-tokens", str(config.max_new_tokens), "--temperature", "0"]
    command += ["--timeout", f"{config.request_timeout_s:g}", "--json", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(command, cwd=common.REPO_ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"matlora loadgen failed (exit {completed.returncode}):\n{completed.stderr[-2000:]}")
    return json.loads(out.read_text())


def burst(
    url: str,
    ranks: Sequence[int | str],
    count: int,
    concurrency: int,
    config: MixedBatchingConfig,
    seed: int,
    out: Path,
) -> dict[str, Any]:
    """Send ``count`` requests at once with at most ``concurrency`` in flight (a closed loop)."""
    # All arrivals fall within the first 0.1 s, so every request is scheduled at the start
    # and waits in the load generator for a free slot.
    duration = 0.1
    return run_loadgen(url, ranks, count / duration, duration, concurrency, "constant", config, seed, out)


# Summaries


def run_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Return throughput, latency percentiles, tokens per request and ranks used of one load run."""
    from clients.loadgen import percentile

    records = report["requests"]
    answered = [record for record in records if record["status"] == "200"]
    latencies = [record["latency_s"] for record in answered]
    tokens = [record["completion_tokens"] or 0 for record in answered]
    summary = report["summary"]
    return {
        "requests": len(records),
        "ok": len(answered),
        "rejected": sum(record["status"] in ("429", "503") for record in records),
        "failed": len(records) - len(answered),
        "throughput_rps": summary["throughput_rps"],
        "tokens_per_s": summary["tokens_per_s"],
        "latency_p50_s": percentile(latencies, 50) if latencies else None,
        "latency_p95_s": percentile(latencies, 95) if latencies else None,
        "tokens_per_request": sum(tokens) / len(tokens) if tokens else None,
        "ranks_used": dict(sorted(Counter(str(record["rank_used"]) for record in answered).items())),
    }


def pooled(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool the repeats of one setting: percentiles over all their requests, throughput averaged over runs."""
    summaries = [report["summary"] for report in reports]
    combined = {
        "requests": [record for report in reports for record in report["requests"]],
        "summary": {
            "throughput_rps": sum(summary["throughput_rps"] for summary in summaries) / len(summaries),
            "tokens_per_s": sum(summary["tokens_per_s"] for summary in summaries) / len(summaries),
        },
    }
    return run_summary(combined)


def expected_accuracy(ranks_used: dict[str, int], accuracy: dict[int, float]) -> float | None:
    """Return the mean accuracy of the successful requests, from the accuracy of the rank each ran at."""
    total = sum(ranks_used.values())
    if not total or any(int(rank) not in accuracy for rank in ranks_used):
        return None
    return sum(count * accuracy[int(rank)] for rank, count in ranks_used.items()) / total


def accuracy_by_rank(report_path: Path | None, adapter: ServedAdapter) -> tuple[dict[int, float], str]:
    """Return the per-rank accuracy to weigh the policy's ranks with, and where it came from.

    A ``matlora eval`` report given with ``--accuracy-report`` comes first, then the
    ``report.json`` in the served adapter's folder (the bundled adapter has one). Without
    either, the quality benchmark's results for the project's default variant are used,
    when their R is the served adapter's. Otherwise the table is empty.
    """
    if report_path is None and not adapter.random and (adapter.directory / "report.json").is_file():
        report_path = adapter.directory / "report.json"
    if report_path is not None:
        report = json.loads(report_path.read_text())
        source = f"{common.display_path(report_path)} ({report.get('label', 'eval report')})"
        return dict(zip(report["ranks"], report["accuracy"])), source
    quality = common.RESULTS_DIR / "quality.json"
    if not quality.is_file():
        return {}, "none (no quality results and no --accuracy-report)"
    result = json.loads(quality.read_text())
    row = next((row for row in result["variants"] if row["label"] == QUALITY_VARIANT), None)
    if row is None or result["config"]["max_rank"] != adapter.max_rank:
        return (
            {},
            f"none ({quality.relative_to(common.REPO_ROOT)} has no {QUALITY_VARIANT} row at R={adapter.max_rank})",
        )
    source = f"{quality.relative_to(common.REPO_ROOT)}, {QUALITY_VARIANT} at lr {row['lr']:g}, mean of seeds"
    if adapter.random:
        source += "; the served adapter is random, so this is the accuracy a trained adapter of its shape reached"
    return dict(zip(row["ranks"], row["accuracy_mean"])), source


# The benchmark


def run(config: MixedBatchingConfig, work_dir: Path, device: str, accuracy_report: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    adapter = served_adapter(config, work_dir)
    mixed_ranks = sorted(set(adapter.train_ranks))
    modes = {"mixed": mixed_ranks, "max": [adapter.max_rank]}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    loads = work_dir / "loadgen"

    reports: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with running_server(serve_command(config, adapter, port, device, None), work_dir / "server-sweep.log", url):
        # One untimed burst warms the server's caches and the auto policy's statistics.
        burst(url, mixed_ranks, config.max_batch_size, config.max_batch_size, config, 99, loads / "warmup.json")
        for repeat in range(config.repeats):
            for concurrency in config.concurrencies:
                for mode in common.round_order(list(modes), repeat):
                    out = loads / f"c{concurrency}-{mode}-{repeat}.json"
                    report = burst(url, modes[mode], config.burst_size(concurrency), concurrency, config, repeat, out)
                    reports.setdefault((concurrency, mode), []).append(report)
                    logger.info(
                        "concurrency %d, %s ranks, repeat %d: %s",
                        concurrency,
                        mode,
                        repeat + 1,
                        _short(run_summary(report)),
                    )
    sweep = []
    for (concurrency, mode), runs in sorted(reports.items()):
        summary = pooled(runs)
        sweep.append({"concurrency": concurrency, "mode": mode, "ranks": modes[mode], **summary})

    capacity = max(row["throughput_rps"] for row in sweep if row["mode"] == "max")
    target_ms = config.target_latency_ms or _default_target_ms(sweep, config)
    accuracy, accuracy_source = accuracy_by_rank(accuracy_report, adapter)
    policy_runs = []
    command = serve_command(config, adapter, port, device, target_ms)
    with running_server(command, work_dir / "server-policy.log", url):
        burst(url, ["auto"], config.max_batch_size, config.max_batch_size, config, 98, loads / "warmup-policy.json")
        for index, factor in enumerate(config.load_factors):
            rate = factor * capacity
            for mode in common.round_order(["max", "auto"], index):
                ranks = ["auto"] if mode == "auto" else [adapter.max_rank]
                out = loads / f"load{factor:g}-{mode}.json"
                report = run_loadgen(url, ranks, rate, config.load_seconds, 1024, "poisson", config, index, out)
                summary = run_summary(report)
                summary["expected_accuracy"] = expected_accuracy(summary["ranks_used"], accuracy)
                policy_runs.append({"load_factor": factor, "offered_rps": rate, "mode": mode, **summary})
                logger.info("load %.1fx capacity, rank %s: %s", factor, mode, _short(summary))

    return {
        "benchmark": NAME,
        "config": dataclasses.asdict(config),
        "adapter": {
            "directory": common.display_path(adapter.directory),
            "max_rank": adapter.max_rank,
            "train_ranks": list(adapter.train_ranks),
            "random": adapter.random,
        },
        "sweep": sweep,
        "policy": {
            "target_latency_ms": target_ms,
            "capacity_rps": capacity,
            "accuracy_by_rank": {str(rank): value for rank, value in accuracy.items()},
            "accuracy_source": accuracy_source,
            "runs": policy_runs,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def _default_target_ms(sweep: Sequence[dict[str, Any]], config: MixedBatchingConfig) -> float:
    """1.5 times the p50 latency at R with a full batch in flight, in whole milliseconds.

    A request that waits behind a full batch then misses the target at R, so the policy
    has to step down under overload and can stay at R when the server keeps up.
    """
    full = [row for row in sweep if row["mode"] == "max" and row["concurrency"] >= config.max_batch_size]
    row = (
        min(full, key=lambda row: row["concurrency"])
        if full
        else max((row for row in sweep if row["mode"] == "max"), key=lambda row: row["concurrency"])
    )
    return float(round(1.5 * 1000 * row["latency_p50_s"]))


def _short(summary: dict[str, Any]) -> str:
    p50 = summary["latency_p50_s"]
    return (
        f"{summary['ok']}/{summary['requests']} ok, {summary['throughput_rps']:.2f} requests/s, "
        f"p50 {'-' if p50 is None else f'{1000 * p50:.0f} ms'}, ranks {summary['ranks_used']}"
    )


# Output


def render_markdown(result: dict[str, Any]) -> str:
    adapter, policy, config = result["adapter"], result["policy"], result["config"]
    kind = "a random adapter" if adapter["random"] else f"the adapter in {adapter['directory']}"
    sweep_rows = [
        [
            str(row["concurrency"]),
            f"{row['mode']} ({','.join(map(str, row['ranks']))})",
            f"{row['throughput_rps']:.2f}",
            f"{row['tokens_per_s']:.1f}",
            _ms(row["latency_p50_s"]),
            _ms(row["latency_p95_s"]),
            common.fmt(row["tokens_per_request"], 1),
            f"{row['ok']}/{row['requests']}",
        ]
        for row in result["sweep"]
    ]
    policy_rows = [
        [
            f"{run['load_factor']:g}x ({run['offered_rps']:.2f}/s)",
            run["mode"],
            f"{run['throughput_rps']:.2f}",
            _ms(run["latency_p50_s"]),
            _ms(run["latency_p95_s"]),
            f"{run['rejected']}/{run['requests']}",
            " ".join(f"{rank}:{count}" for rank, count in run["ranks_used"].items()) or "-",
            common.fmt(run["expected_accuracy"]),
        ]
        for run in policy["runs"]
    ]
    accuracy = ", ".join(f"{rank}: {value:.3f}" for rank, value in policy["accuracy_by_rank"].items()) or "none"
    return "\n".join(
        [
            f"`matlora serve` with {kind} (R={adapter['max_rank']}), --max-batch-size {config['max_batch_size']}, "
            f"--max-queue {config['max_queue']}; `matlora loadgen` requests of at most {config['max_new_tokens']} "
            f"new tokens, greedy.",
            "",
            f"### Concurrency sweep (closed loop, {config['repeats']} interleaved repeats pooled)",
            "",
            common.markdown_table(
                ["concurrency", "ranks", "requests/s", "tokens/s", "p50 ms", "p95 ms", "tokens/request", "ok"],
                sweep_rows,
            ),
            "",
            f"### Auto policy against rank {adapter['max_rank']} under load "
            f"(target {policy['target_latency_ms']:.0f} ms; capacity at rank {adapter['max_rank']}: "
            f"{policy['capacity_rps']:.2f} requests/s)",
            "",
            common.markdown_table(
                ["offered load", "rank", "requests/s", "p50 ms", "p95 ms", "rejected", "ranks used", "accuracy"],
                policy_rows,
            ),
            "",
            "Accuracy is the mean, over answered requests, of the accuracy of the rank each ran at. "
            f"Accuracy by rank: {accuracy}. Source: {policy['accuracy_source']}.",
            "",
            common.environment_note(result.get("environment", {})),
        ]
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}"


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput_axis, latency_axis, policy_axis) = plt.subplots(1, 3, figsize=(14, 4))
    concurrencies = sorted({row["concurrency"] for row in result["sweep"]})
    for mode, marker in (("mixed", "o"), ("max", "s")):
        rows = [row for row in result["sweep"] if row["mode"] == mode]
        label = f"{mode} ({','.join(map(str, rows[0]['ranks']))})" if rows else mode
        concurrency = [row["concurrency"] for row in rows]
        throughput_axis.plot(concurrency, [row["throughput_rps"] for row in rows], f"-{marker}", label=label)
        (line,) = latency_axis.plot(
            concurrency, [_seconds(row["latency_p50_s"]) for row in rows], f"-{marker}", label=f"{label} p50"
        )
        latency_axis.plot(
            concurrency,
            [_seconds(row["latency_p95_s"]) for row in rows],
            f":{marker}",
            color=line.get_color(),
            label=f"{label} p95",
        )
    for axis, ylabel in ((throughput_axis, "requests/s"), (latency_axis, "latency, s")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(value) for value in concurrencies])
        axis.set_xlabel("concurrency")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)

    runs = result["policy"]["runs"]
    labels = [f"{run['load_factor']:g}x\n{run['mode']}" for run in runs]
    positions = range(len(runs))
    policy_axis.bar(positions, [_seconds(run["latency_p95_s"]) for run in runs], color="tab:blue", alpha=0.7)
    policy_axis.set_xticks(list(positions), labels, fontsize=8)
    policy_axis.set_ylabel("p95 latency, s (bars)")
    policy_axis.axhline(result["policy"]["target_latency_ms"] / 1000, color="grey", linestyle="--")
    accuracy_axis = policy_axis.twinx()
    accuracy_axis.plot(positions, [run["expected_accuracy"] or float("nan") for run in runs], "o", color="tab:red")
    accuracy_axis.set_ylabel("accuracy of the ranks used (dots)")
    accuracy_axis.set_ylim(0, 1.02)
    policy_axis.set_title("auto policy vs max rank (dashed: target)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _seconds(value: float | None) -> float:
    return float("nan") if value is None else value


# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mixed_batching",
        description="Throughput and latency of matlora serve with mixed ranks against max rank, "
        "and the auto rank policy against max rank under load.",
    )
    common.add_common_arguments(parser)
    parser.add_argument("--work-dir", type=Path, default=None, help="folder for server logs and load reports")
    parser.add_argument("--base", default=None, help="base model (default: smollm2-135m; a tiny model with --smoke)")
    parser.add_argument("--adapter", default=None, help="adapter folder to serve (default: bundled, else random)")
    parser.add_argument(
        "--target-latency-ms", type=float, default=None, help="auto policy target (default: 1.5x a full batch's p50)"
    )
    parser.add_argument(
        "--accuracy-report", type=Path, default=None, help="matlora eval JSON with the served adapter's accuracy"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)
    work_dir = common.work_dir(args, NAME)
    config = MixedBatchingConfig.preset(common.preset_name(args))
    overrides: dict[str, Any] = {}
    if args.smoke and args.base is None:
        from matlora.testing import build_tiny_model_dir

        tiny_base = work_dir / "tiny-model"
        if not (tiny_base / "config.json").is_file():
            build_tiny_model_dir(tiny_base, seed=0)
        overrides["base"] = str(tiny_base)
    for field, value in (("base", args.base), ("adapter", args.adapter), ("target_latency_ms", args.target_latency_ms)):
        if value is not None:
            overrides[field] = value
    config = dataclasses.replace(config, **overrides)
    device = common.resolve_device(args.device)
    environment = common.environment(device)
    result = {"environment": environment, **run(config, work_dir, device, args.accuracy_report)}
    out_dir = common.results_dir(args)
    plot(result, out_dir / f"{NAME}.png")
    print(common.write_outputs(NAME, result, out_dir, render_markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
