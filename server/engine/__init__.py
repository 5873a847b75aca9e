"""Continuous-batching generation engine with a per-row adapter, rank and sampling."""

from server.engine.engine import (
    Engine,
    EngineError,
    EngineStoppedError,
    GenerationFailedError,
    GenerationRequest,
    GenerationResult,
    GenerationStream,
    QueueFullError,
)
from server.engine.sampling import SamplingParams

__all__ = [
    "Engine",
    "EngineError",
    "EngineStoppedError",
    "GenerationFailedError",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStream",
    "QueueFullError",
    "SamplingParams",
]
