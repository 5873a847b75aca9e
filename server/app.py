"""The FastAPI application: ``create_app(settings)`` wires settings, model, engine and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

import matlora
from server import metrics
from server.engine import Engine, EngineStoppedError
from server.errors import install_exception_handlers
from server.loading import load_model
from server.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from server.policy import RankPolicy
from server.routes import generate, health, openai
from server.schemas import MAX_SEED
from server.service import GenerationService
from server.settings import Settings
from server.state import DrainOnSigterm, ServerState

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """Build the app; the model loads, and the engine starts, when the app starts up."""
    state = ServerState()
    docs = settings.api_key is None  # with a key, every route but the probes needs it; the docs pages cannot send it
    app = FastAPI(
        title="matlora",
        version=matlora.__version__,
        summary="Serve hierarchical LoRA adapters at any rank per request",
        lifespan=_lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    app.state.server_state = state
    app.state.started_at = int(time.time())

    install_exception_handlers(app, _allowed_values(settings))
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, state=state, replica_id=settings.replica_name())
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(openai.router)
    return app


def create_app_from_env() -> FastAPI:
    """Build the app from ``MATLORA_*`` variables: the factory each uvicorn worker process calls."""
    return create_app(Settings())


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model, start the engine, warm up and take over SIGTERM; stop the engine at shutdown."""
    settings: Settings = app.state.settings
    state: ServerState = app.state.server_state
    started = time.perf_counter()

    loaded = await asyncio.to_thread(load_model, settings)
    engine = Engine(loaded.model, loaded.tokenizer, settings.max_batch_size, settings.max_queue)
    policy = RankPolicy(settings.rank_policy, settings.default_rank, settings.target_latency_ms, engine.stats)
    service = GenerationService(loaded, engine, policy, state, settings.max_new_tokens_limit)
    app.state.engine = engine
    app.state.service = service
    engine.start()
    try:
        if settings.warmup:
            warmup_started = time.perf_counter()
            await service.warm_up()
            logger.info("warm-up generation passed in %.1f s", time.perf_counter() - warmup_started)
        _install_drain(state, engine, settings.graceful_timeout)
        state.ready = True
        logger.info(
            "ready in %.1f s: %s with adapters %s, rank policy %s, max batch %d, max queue %d",
            time.perf_counter() - started,
            loaded.base,
            ", ".join(f"{a.name} (max rank {a.max_rank})" for a in loaded.adapters.values()),
            settings.rank_policy,
            settings.max_batch_size,
            settings.max_queue,
        )
        yield
    finally:
        state.ready = False
        engine.shutdown()
        metrics.mark_worker_exited(os.getpid())
        logger.info("stopped")


def _install_drain(state: ServerState, engine: Engine, graceful_timeout: float) -> None:
    def is_idle() -> bool:
        return state.active_generations == 0 and engine.waiting_count == 0 and engine.running_count == 0

    def abort() -> None:
        engine.abort_all(EngineStoppedError("the server shut down before this request finished"))

    if not DrainOnSigterm(state, is_idle, abort, graceful_timeout).install():
        logger.info("not in the main thread: SIGTERM keeps uvicorn's handler, without the graceful drain")


def _allowed_values(settings: Settings) -> dict[str, str]:
    """Describe the accepted values of request fields whose error alone would not say it."""
    return {
        "temperature": ">= 0 (0 is greedy)",
        "top_p": "0 < top_p <= 1",
        "max_new_tokens": f"1..{settings.max_new_tokens_limit}",
        "max_tokens": f"1..{settings.max_new_tokens_limit}",
        "max_completion_tokens": f"1..{settings.max_new_tokens_limit}",
        "seed": f"0..{MAX_SEED}",
        "stream": "true or false",
        "chat": "true or false",
        "prompt": "a non-empty string",
        "adapter": "the name of a loaded adapter",
        "model": "an adapter name, NAME@RANK (e.g. arith@8) or NAME@auto",
        "messages": "a list of 1 or more messages",
    }
