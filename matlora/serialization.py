"""Adapter folders: save, load with every check, and export one rank as a PEFT adapter.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` at full rank.
Tensor names follow PEFT: ``base_model.model.<layer>.lora_A.weight`` (max_rank x in)
and ``...lora_B.weight`` (out x max_rank). Only safetensors is read, never pickle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from matlora.config import CONFIG_NAME, AdapterConfig
from matlora.layer import DEFAULT_ADAPTER
from matlora.model import adapter_configs, inject_adapter, iter_adapter_weights

WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class AdapterLoadError(ValueError):
    """An adapter folder that does not fit the model it is loaded into. The message gives the reason."""


def base_model_fingerprint(model: nn.Module) -> dict[str, str]:
    """Return the base model's name and short hashes of its config and weights.

    The weight hash covers 4096 fixed entries of the input embedding, rounded to
    bfloat16, so the same model loaded in float32 or bfloat16 gets the same hash.
    """
    config = getattr(model, "config", None)
    fields = {}
    if config is not None:
        keys = (
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "max_position_embeddings",
        )
        fields = {key: getattr(config, key, None) for key in keys}
    config_hash = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = embedding.weight if embedding is not None else next(model.parameters())
    flat = weight.detach().reshape(-1)
    count = min(4096, flat.numel())
    index = torch.arange(count, device=flat.device) * (flat.numel() // count)
    sample = flat[index].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
    weights_hash = hashlib.sha256(sample).hexdigest()[:16]

    name = getattr(config, "name_or_path", None) or type(model).__name__
    return {"name": str(name), "config_sha256": config_hash, "weights_sha256": weights_hash}


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = DEFAULT_ADAPTER,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the adapter's config and full-rank weights to ``directory`` and return it."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"model has no adapter {adapter_name!r}; it has: {', '.join(sorted(configs)) or 'none'}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors = {}
    for name, weights in iter_adapter_weights(model, adapter_name):
        for part in ("lora_A", "lora_B"):
            tensor = getattr(weights, part).detach()
            tensors[f"{_PREFIX}{name}.{part}.weight"] = (tensor.to(dtype) if dtype else tensor).contiguous().cpu()
    _save_readable(tensors, directory / WEIGHTS_NAME)
    configs[adapter_name].save(directory)
    return directory


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = DEFAULT_ADAPTER,
    dtype: torch.dtype | None = None,
    check_base_model: bool = True,
) -> AdapterConfig:
    """Inject the adapter saved in ``directory`` into ``model`` and load its weights.

    Raises:
        FileNotFoundError: the folder lacks the config or the weights file.
        AdapterConfigError: the config is invalid (every bad field is listed).
        AdapterLoadError: the weights file misses tensors, has unexpected ones, has a
            tensor of the wrong shape, or the adapter was trained on another base model.
    """
    directory = Path(directory)
    config = AdapterConfig.load(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found: an adapter folder needs {WEIGHTS_NAME}")
    if check_base_model:
        _check_base_model(model, config, directory)

    inject_adapter(model, config, adapter_name, dtype)
    try:
        _load_weights(model, weights_path, adapter_name)
    except AdapterLoadError:
        remove_adapter(model, adapter_name)
        raise
    return config


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete an adapter's weights from every layer and forget its config."""
    for name, _ in list(iter_adapter_weights(model, adapter_name)):
        del model.get_submodule(name).adapters[adapter_name]
    configs = adapter_configs(model)
    configs.pop(adapter_name, None)
    model.matlora_adapters = configs


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Return the saved tensors of an adapter folder by name (CPU, as stored)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter folder needs {WEIGHTS_NAME}")
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def export_peft(
    directory: str | Path,
    rank: int,
    out_dir: str | Path,
    inference_scaling: str | None = None,
) -> Path:
    """Write rank ``rank`` of a hierarchical adapter as a standard PEFT LoRA adapter.

    The rank-k scale c_k is folded into ``lora_B`` and ``lora_alpha`` is set to ``r``, so
    PEFT's own scale alpha / r is 1 and PEFT computes exactly
    ``base(x) + ((x A[:k]^T) * c_k) B[:, :k]^T``. ``inference_scaling`` defaults to the
    adapter's own.
    """
    config = AdapterConfig.load(directory)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= config.r:
        raise ValueError(f"rank must be an integer in 1..{config.r} to export, got {rank!r}")
    scale = config.spec().prefix_scale(rank, inference_scaling)
    scale = torch.as_tensor(scale, dtype=torch.float64)

    tensors = {}
    for key, tensor in read_adapter_tensors(directory).items():
        if key.endswith(".lora_A.weight"):
            tensors[key] = tensor[:rank].contiguous()
        elif key.endswith(".lora_B.weight"):
            tensors[key] = (tensor[:, :rank].double() * scale).to(tensor.dtype).contiguous()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_readable(tensors, out_dir / WEIGHTS_NAME)
    peft_config = {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "base_model_name_or_path": config.base_model_name_or_path,
        "inference_mode": True,
    }
    (out_dir / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _save_readable(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates the file readable by its owner only; a server running as another
    # user (a container's non-root user, say) must be able to read it.
    path.chmod(0o644)


def _check_base_model(model: nn.Module, config: AdapterConfig, directory: Path) -> None:
    expected = config.base_model_fingerprint
    if not expected:
        return
    actual = base_model_fingerprint(model)
    mismatched = [
        key for key in ("config_sha256", "weights_sha256") if key in expected and expected[key] != actual[key]
    ]
    if mismatched:
        raise AdapterLoadError(
            f"adapter {directory} was trained on base model {expected.get('name')!r} "
            f"({', '.join(f'{key} {expected[key]}' for key in mismatched)}), but this model is "
            f"{actual['name']!r} ({', '.join(f'{key} {actual[key]}' for key in mismatched)}). "
            f"Load the adapter on the base model it was trained on."
        )


def _load_weights(model: nn.Module, weights_path: Path, adapter_name: str) -> None:
    expected = {}
    for name, weights in iter_adapter_weights(model, adapter_name):
        expected[f"{_PREFIX}{name}.lora_A.weight"] = weights.lora_A
        expected[f"{_PREFIX}{name}.lora_B.weight"] = weights.lora_B

    with safe_open(str(weights_path), framework="pt") as handle:
        stored = set(handle.keys())
        missing = sorted(set(expected) - stored)
        unexpected = sorted(stored - set(expected))
        if missing or unexpected:
            raise AdapterLoadError(
                f"{weights_path} does not match its config's target modules: "
                f"{len(missing)} missing tensor(s){_listing(missing)}; "
                f"{len(unexpected)} unexpected tensor(s){_listing(unexpected)}"
            )
        wrong_shapes = []
        for key, parameter in expected.items():
            shape = tuple(handle.get_slice(key).get_shape())
            if shape != tuple(parameter.shape):
                wrong_shapes.append(f"{key}: stored {shape}, model expects {tuple(parameter.shape)}")
        if wrong_shapes:
            raise AdapterLoadError(f"{weights_path} has tensors of the wrong shape: " + "; ".join(wrong_shapes))
        with torch.no_grad():
            for key, parameter in expected.items():
                parameter.copy_(handle.get_tensor(key))


def _listing(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return f" ({shown}{more})"
