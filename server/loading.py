"""Load the base model and the adapters a server is started with."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

import matlora
from matlora.base_model import default_device, load_base
from server.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter: its name, max rank R (every rank 0..R can be served) and trained ranks."""

    name: str
    max_rank: int
    train_ranks: tuple[int, ...]
    target_modules: tuple[str, ...]
    path: Path


@dataclass
class LoadedModel:
    """The base model with its adapters, its tokenizer, and how many positions a sequence may use."""

    model: torch.nn.Module
    tokenizer: object
    adapters: dict[str, AdapterInfo]
    base: str
    dtype: torch.dtype
    device: torch.device
    context_length: int


def load_model(settings: Settings) -> LoadedModel:
    """Load ``settings.base`` and every adapter of ``settings.check_adapters()``, logging what and how fast."""
    started = time.perf_counter()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = default_device() if settings.device == "auto" else torch.device(settings.device)
    with _no_progress_bars():
        model, tokenizer = load_base(settings.base, dtype=settings.dtype, device=device)
    dtype = next(model.parameters()).dtype

    adapters = {}
    for name, directory in settings.check_adapters().items():
        config = matlora.load_adapter(model, directory, name)
        adapters[name] = AdapterInfo(
            name=name,
            max_rank=config.r,
            train_ranks=tuple(config.train_ranks),
            target_modules=tuple(config.target_modules),
            path=directory,
        )
        logger.info(
            "loaded adapter %s from %s: max rank %d, trained ranks %s, targets %s, method %s, %s",
            name,
            directory,
            config.r,
            ",".join(map(str, config.train_ranks)),
            ",".join(config.target_modules),
            config.method,
            config.inference_scaling,
        )
    model.eval()

    context_length = int(getattr(model.config, "max_position_embeddings", 2048))
    logger.info(
        "loaded base %s (%s, %s, context %d tokens, %d CPU threads) and %d adapter(s) in %.1f s",
        settings.base,
        dtype,
        device,
        context_length,
        torch.get_num_threads(),
        len(adapters),
        time.perf_counter() - started,
    )
    return LoadedModel(model, tokenizer, adapters, settings.base, dtype, device, context_length)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Turn off transformers' progress bars for the block.

    Progress bars only clutter line-based server logs. Also, tqdm's first bar creates a
    multiprocessing lock, which is a POSIX semaphore. It leaks when a uvicorn worker ends by
    SIGTERM, because uvicorn re-raises the signal after its shutdown and the process dies
    before multiprocessing's exit handlers can unlink the semaphore.
    """
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()
