"""``matlora serve``: run the inference server under uvicorn.

Every flag is also an environment variable ``MATLORA_<NAME>``; a flag given on the command
line wins over the variable, which wins over the default. With ``--workers N`` each of
the N uvicorn worker processes loads its own copy of the model and rebuilds the same
settings from the environment, which this command fills in before starting them.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
ENV_PREFIX = "MATLORA_"


def register(subparsers: argparse._SubParsersAction) -> None:
    from server.settings import Settings

    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    parser = subparsers.add_parser(
        "serve",
        help="serve adapters at any rank over HTTP",
        description="Serve a base model with hierarchical LoRA adapters; each request picks its rank. "
        "Each flag can also be set as the environment variable MATLORA_<FLAG NAME>, e.g. MATLORA_PORT.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--base", help=f"local Hugging Face model folder or {defaults['base']} (default)")
    parser.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]DIR",
        help="an adapter folder to serve, named NAME (default: the folder name); repeat for several. "
        "Without it, the bundled adapter 'arith' on the default base is served",
    )
    parser.add_argument("--host", help=f"address to listen on (default: {defaults['host']})")
    parser.add_argument("--port", type=int, help=f"port to listen on (default: {defaults['port']})")
    parser.add_argument(
        "--workers", type=int, help="uvicorn worker processes, each with its own model copy (default: 1)"
    )
    parser.add_argument("--device", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--dtype",
        help="auto (bfloat16 on CUDA and on CPUs with native bf16, else float32), bfloat16, float16 or float32 "
        "(default: auto)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for PyTorch in each worker (default: one per core, or with --workers N, "
        "the number of cores divided by N, at least 1)",
    )
    parser.add_argument(
        "--api-key",
        help="bearer token required by every route except /healthz and /readyz (default: none). Other users "
        "can read a flag with ps, so prefer the variable MATLORA_API_KEY",
    )
    parser.add_argument(
        "--metrics-auth",
        action=argparse.BooleanOptionalAction,
        help="whether /metrics needs the API key too (default: yes)",
    )
    parser.add_argument(
        "--max-new-tokens-limit",
        type=int,
        help=f"max tokens one request may generate (default: {defaults['max_new_tokens_limit']})",
    )
    parser.add_argument(
        "--max-batch-size", type=int, help=f"max requests decoded together (default: {defaults['max_batch_size']})"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        help=f"max requests waiting for the batch; more get 429 (default: {defaults['max_queue']})",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        help=f"largest request body; larger gets 413 (default: {defaults['max_body_bytes']})",
    )
    parser.add_argument(
        "--rank-policy",
        choices=["auto", "fixed", "max"],
        help="rank of requests that omit it: auto (largest rank meeting --target-latency-ms under the current "
        "load), fixed (--default-rank) or max (default: auto)",
    )
    parser.add_argument("--default-rank", type=int, help="the rank of --rank-policy fixed")
    parser.add_argument(
        "--target-latency-ms",
        type=float,
        help=f"request latency the auto policy aims at, in ms (default: {defaults['target_latency_ms']:.0f})",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        help=f"seconds in-flight requests get to finish after SIGTERM (default: {defaults['graceful_timeout']:.0f})",
    )
    parser.add_argument(
        "--replica-id",
        help="id sent in the x-matlora-replica header of every response, for load-balancer checks "
        "(default: HOSTNAME:PORT)",
    )
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        help="run a short generation per adapter before reporting ready (default: yes)",
    )
    parser.set_defaults(handler=serve)


def serve(args: argparse.Namespace) -> int:
    """Check the settings, then run uvicorn until it is stopped."""
    settings = _share_cores(_settings(args), _cpu_cores())
    settings.check_adapters()  # a missing or unfit adapter fails here, before any worker starts
    metrics_dir = _prepare_metrics_dir()
    try:
        return _run_uvicorn(settings, args.log_level)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _settings(args: argparse.Namespace):
    from pydantic import ValidationError

    from server.settings import Settings
    from server.validation import describe, field_bounds

    flags = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    try:
        return Settings(**flags)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            problem = describe(item, field_bounds(Settings))
            message = problem.message
            if problem.field:
                message += f" (--{problem.field.replace('_', '-')} or {ENV_PREFIX}{problem.field.upper()})"
            problems.append(message)
        raise ValueError("invalid settings:\n  - " + "\n  - ".join(problems)) from None


def _share_cores(settings, cores: int):
    """Give each of several workers ``cores // workers`` threads (at least 1) unless ``--threads`` is set.

    Otherwise each worker process would start PyTorch's default of one thread per core,
    and the workers' threads would contend for the same cores.
    """
    if settings.workers == 1 or settings.threads is not None:
        return settings
    return settings.model_copy(update={"threads": max(1, cores // settings.workers)})


def _cpu_cores() -> int:
    """Return the number of cores this process may run on (its CPU affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _prepare_metrics_dir() -> Path | None:
    """Point prometheus_client's multiprocess mode at an empty folder; return it if this run created it.

    A folder given in ``PROMETHEUS_MULTIPROC_DIR`` is kept but emptied of old metric files,
    which would otherwise be added to this run's counts.
    """
    existing = os.environ.get(METRICS_DIR_ENV)
    if existing:
        folder = Path(existing)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        return None
    folder = Path(tempfile.mkdtemp(prefix="matlora-metrics-"))
    os.environ[METRICS_DIR_ENV] = str(folder)
    return folder


def _run_uvicorn(settings, log_level: str) -> int:
    import uvicorn

    from server.app import create_app

    if settings.workers > 1:
        _export_settings(settings)
        app: Any = "server.app:create_app_from_env"
    else:
        app = create_app(settings)
    uvicorn.run(
        app,
        factory=settings.workers > 1,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=_log_config(log_level),
        access_log=False,
        timeout_graceful_shutdown=int(settings.graceful_timeout) + 5,
    )
    return 0


def _export_settings(settings) -> None:
    """Write every setting to its ``MATLORA_*`` variable so the worker processes rebuild the same settings."""
    for name, value in settings.model_dump().items():
        key = ENV_PREFIX + name.upper()
        if value is None:
            os.environ.pop(key, None)
        elif name == "api_key":
            os.environ[key] = settings.api_key.get_secret_value()
        elif isinstance(value, bool):
            os.environ[key] = "true" if value else "false"
        elif isinstance(value, list):
            os.environ[key] = ",".join(value)
        else:
            os.environ[key] = str(value)


def _log_config(level: str) -> dict[str, Any]:
    """Uvicorn's logging plus the project's: module logs with a timestamp, access lines as bare JSON.

    Worker processes start with fresh logging, so the configuration must travel to them
    through uvicorn rather than through ``logging.basicConfig`` in this process.
    """
    from uvicorn.config import LOGGING_CONFIG

    config = {**LOGGING_CONFIG}
    config["formatters"] = {
        **LOGGING_CONFIG["formatters"],
        "matlora": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json_lines": {"format": "%(message)s"},
    }
    config["handlers"] = {
        **LOGGING_CONFIG["handlers"],
        "matlora": {"class": "logging.StreamHandler", "formatter": "matlora", "stream": "ext://sys.stderr"},
        "access_json": {"class": "logging.StreamHandler", "formatter": "json_lines", "stream": "ext://sys.stderr"},
    }
    config["loggers"] = {
        **LOGGING_CONFIG["loggers"],
        "matlora.access": {"handlers": ["access_json"], "level": "INFO", "propagate": False},
    }
    config["root"] = {"handlers": ["matlora"], "level": level}
    return config
