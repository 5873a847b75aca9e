"""The client subcommands: ``matlora ask`` (one request) and ``matlora loadgen`` (traffic at a set rate).

The handlers import httpx and the client modules when called, so ``matlora --help``
stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import asdict
from typing import Any

from clients import API_KEY_ENV, DEFAULT_URL


def parse_rank(value: str) -> int | str:
    """Parse a ``--rank`` value: an integer such as ``8``, or ``auto``."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rank {value!r}: expected an integer such as 8, or 'auto'") from None


def parse_ranks(value: str) -> tuple[int | str | None, ...]:
    """Parse a ``--ranks`` list such as ``1,4,8,auto``, where ``default`` sends no rank."""
    ranks: list[int | str | None] = []
    for item in value.split(","):
        item = item.strip()
        ranks.append(None if item == "default" else parse_rank(item))
    return tuple(ranks)


def finite_float(value: str) -> float:
    """Parse a number that JSON can carry: not NaN and not infinite."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a finite number")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a number > 0")
    return number


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected an integer >= 1")
    return number


def non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected an integer >= 0")
    return number


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server or load balancer address (default: {DEFAULT_URL})")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"bearer token for a server started with --api-key (default: ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=120.0,
        help="seconds to wait for the server's response, or for the next event of a stream (default: 120)",
    )


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="adapter name (optional when the server loads one adapter)")
    parser.add_argument(
        "--max-new-tokens", type=int, help="maximum number of tokens to generate (default: the server's)"
    )
    parser.add_argument(
        "--temperature", type=finite_float, help="sampling temperature, 0 for greedy (default: the server's)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    ask = subparsers.add_parser(
        "ask",
        help="send one prompt to a matlora server and print the answer",
        description="Send one prompt to POST /generate. The text goes to stdout and the rank used to stderr.",
    )
    ask.add_argument(
        "prompt", help="the prompt, sent as a user message through the chat template, or '-' to read it from stdin"
    )
    ask.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as given, without the chat template (the bundled adapter expects the template)",
    )
    ask.add_argument(
        "--rank",
        type=parse_rank,
        help="adapter rank 0..R (0 is the base model alone) or 'auto' (default: the server's rank policy)",
    )
    _add_sampling_arguments(ask)
    ask.add_argument("--top-p", type=finite_float, help="nucleus sampling probability mass, 0 < p <= 1")
    ask.add_argument(
        "--stop", action="append", metavar="TEXT", help="stop generating at this text (repeat for several)"
    )
    ask.add_argument("--seed", type=int, help="random seed for sampling")
    ask.add_argument("--stream", action="store_true", help="print the text token by token as it is generated")
    ask.add_argument(
        "--json",
        action="store_true",
        help="print the full result as JSON (with --stream, one JSON object per event)",
    )
    ask.add_argument(
        "--retries", type=non_negative_int, default=3, help="retries on 429, 503 and refused connections (default: 3)"
    )
    _add_connection_arguments(ask)
    ask.set_defaults(handler=run_ask)

    loadgen = subparsers.add_parser(
        "loadgen",
        help="send mixed-rank traffic at a set rate and report latency per rank",
        description=(
            "Send POST /generate requests at a set rate for a set time (open loop: arrivals do not wait "
            "for answers), each once and without retries, then print latency percentiles per requested rank, "
            "throughput and counts by status and by replica."
        ),
    )
    loadgen.add_argument("--rate", type=positive_float, default=8.0, help="requests per second (default: 8)")
    loadgen.add_argument("--duration", type=positive_float, default=30.0, help="seconds of traffic (default: 30)")
    loadgen.add_argument(
        "--ranks",
        type=parse_ranks,
        default=(1, 4, 8, 16, "auto"),
        help="comma-separated ranks drawn uniformly per request; 'auto' and 'default' (no rank) "
        "are allowed (default: 1,4,8,16,auto)",
    )
    loadgen.add_argument(
        "--concurrency",
        type=positive_int,
        default=64,
        help="maximum requests in flight; later arrivals wait in the client (default: 64)",
    )
    loadgen.add_argument(
        "--arrival",
        choices=["poisson", "constant"],
        default="poisson",
        help="Poisson arrivals or one every 1/rate seconds (default: poisson)",
    )
    loadgen.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts, one per line, or a .jsonl file with a 'prompt' field (default: built-in arithmetic questions)",
    )
    loadgen.add_argument(
        "--raw",
        action="store_true",
        help="send the prompts as given, without the chat template (default: through the chat template)",
    )
    _add_sampling_arguments(loadgen)
    loadgen.set_defaults(max_new_tokens=16)
    loadgen.add_argument("--stream", action="store_true", help="stream the responses and measure time to first token")
    loadgen.add_argument(
        "--seed", type=int, default=0, help="seed of the arrival times, ranks and prompts (default: 0)"
    )
    loadgen.add_argument(
        "--replica-header",
        default="x-matlora-replica",
        help="response header that names the replica, recorded per request (default: x-matlora-replica)",
    )
    loadgen.add_argument("--json", metavar="FILE", help="also write the settings, summary and every request's record")
    _add_connection_arguments(loadgen)
    loadgen.set_defaults(handler=run_loadgen)


def _quiet_http_logs() -> None:
    # httpx logs every request at INFO, which floods a load run, so its lines show only at --log-level DEBUG.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _read_prompt(prompt: str) -> str:
    return sys.stdin.read() if prompt == "-" else prompt


def run_ask(args: argparse.Namespace) -> int:
    from clients.client import MatloraClient, RetryPolicy, TextDelta
    from clients.errors import MatloraError

    arguments: dict[str, Any] = {
        "rank": args.rank,
        "adapter": args.adapter,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "stop": args.stop,
        "seed": args.seed,
        "chat": None if args.raw else True,
    }
    _quiet_http_logs()
    prompt = _read_prompt(args.prompt)
    retry = RetryPolicy(max_attempts=args.retries + 1)
    try:
        with MatloraClient(args.url, api_key=args.api_key or None, timeout=args.timeout, retry=retry) as client:
            if not args.stream:
                result = client.generate(prompt, **arguments)
                _write_result(result, args.json)
                return 0
            with client.generate_stream(prompt, **arguments) as stream:
                for event in stream:
                    if args.json:
                        _write_json_event(event)
                    elif isinstance(event, TextDelta):
                        sys.stdout.write(event.text)
                        sys.stdout.flush()
                result = stream.until_done()
            if not args.json:
                sys.stdout.write("\n")
                _write_rank_line(result)
            return 0
    except MatloraError as exc:
        sys.stderr.write(f"error: {exc}\n{_hint(exc, args.url)}")
        return 1


def _write_result(result: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(_result_json(result)) + "\n")
        return
    sys.stdout.write(result.text + "\n")
    _write_rank_line(result)


def _result_json(result: Any) -> dict[str, Any]:
    body = asdict(result)
    del body["headers"]
    return body


def _write_json_event(event: Any) -> None:
    from clients.client import TextDelta

    if isinstance(event, TextDelta):
        body = {"type": "token", "text": event.text}
    else:
        body = {"type": "done", **_result_json(event)}
    sys.stdout.write(json.dumps(body) + "\n")
    sys.stdout.flush()


def _write_rank_line(result: Any) -> None:
    sys.stderr.write(
        f"rank {result.rank}, adapter {result.adapter}, finish_reason {result.finish_reason}, "
        f"tokens {result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} generated, "
        f"request {result.request_id}\n"
    )


def _hint(error: Exception, url: str) -> str:
    from clients.errors import APIConnectionError, APITimeoutError, AuthenticationError

    if isinstance(error, APITimeoutError):
        return "hint: raise --timeout, or ask for fewer tokens with --max-new-tokens\n"
    if isinstance(error, APIConnectionError):
        return f"hint: is a server running at {url}? Start one with `matlora serve`, or pass --url\n"
    if isinstance(error, AuthenticationError):
        return f"hint: pass the server's token with --api-key or ${API_KEY_ENV}\n"
    return ""


def run_loadgen(args: argparse.Namespace) -> int:
    import asyncio

    from clients.loadgen import DEFAULT_PROMPTS, LoadConfig, format_summary, load_prompts, run_load

    try:
        prompts = load_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"error: cannot read --prompts {args.prompts}: {exc}\n")
        return 1
    config = LoadConfig(
        url=args.url,
        rate=args.rate,
        duration=args.duration,
        ranks=args.ranks,
        concurrency=args.concurrency,
        prompts=prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        adapter=args.adapter,
        stream=args.stream,
        chat=not args.raw,
        arrival=args.arrival,
        seed=args.seed,
        timeout=args.timeout,
        replica_header=args.replica_header,
        api_key=args.api_key or None,
    )
    _quiet_http_logs()
    report = asyncio.run(run_load(config))
    sys.stdout.write(format_summary(report.summary) + "\n")
    if args.json:
        report.write_json(args.json)
        sys.stderr.write(f"wrote {len(report.records)} request records to {args.json}\n")
    if report.records and not any(record.ok for record in report.records):
        sys.stderr.write("error: no request succeeded; see the counts by status above\n")
        return 1
    return 0
