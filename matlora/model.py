"""Put hierarchical adapters into any PyTorch model with ``nn.Linear`` layers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from matlora.config import AdapterConfig
from matlora.layer import DEFAULT_ADAPTER, MatryoshkaLinear

# Adapter configs by name, kept on the root module so callers can list what is loaded.
_CONFIGS_ATTR = "matlora_adapters"


class TargetModuleError(ValueError):
    """A target module name matched no linear layer of the model."""


def linear_layer_names(model: nn.Module) -> list[str]:
    """Return the distinct last name parts of the model's linear layers (q_proj, lm_head, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_layers(model)})


def find_target_modules(model: nn.Module, target_modules: Iterable[str]) -> list[str]:
    """Return the qualified names of the linear layers that ``target_modules`` selects.

    A target matches a module whose name equals it or ends with ``"." + target``, as in
    PEFT. Every target must match at least one linear layer.

    Raises:
        TargetModuleError: names each target that matched nothing and lists the model's
            linear layer names.
    """
    targets = list(target_modules)
    linears = _linear_layers(model)
    selected = [name for name in linears if any(_matches(name, target) for target in targets)]
    unmatched = [target for target in targets if not any(_matches(name, target) for name in linears)]
    if unmatched:
        raise TargetModuleError(
            f"target module(s) {', '.join(map(repr, unmatched))} match no linear layer of "
            f"{type(model).__name__}; its linear layers are: {', '.join(linear_layer_names(model))}"
        )
    return selected


def inject_adapter(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str = DEFAULT_ADAPTER,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Add a hierarchical adapter to ``model`` in place and return it.

    Each targeted ``nn.Linear`` is wrapped in a :class:`MatryoshkaLinear` (once; a second
    adapter reuses the wrapper). Base weights are frozen; only the new adapter's
    ``lora_A`` and ``lora_B`` require gradients. ``dtype`` defaults to the base weights'.

    Example:
        >>> config = AdapterConfig(r=16, target_modules=["q_proj", "v_proj"], method="matryoshka")
        >>> model = inject_adapter(model, config)  # doctest: +SKIP
        >>> with matlora.at_rank(4):  # doctest: +SKIP
        ...     model.generate(**inputs)
    """
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"model already has an adapter named {adapter_name!r}; pick another name")
    targets = find_target_modules(model, config.target_modules)

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    spec = config.spec()
    for name in targets:
        layer = model.get_submodule(name)
        if not isinstance(layer, MatryoshkaLinear):
            layer = MatryoshkaLinear(layer)
            _replace_submodule(model, name, layer)
        layer.add_adapter(adapter_name, spec, config.lora_dropout, dtype)
    for _, adapter_weights in iter_adapter_weights(model, adapter_name):
        adapter_weights.lora_A.requires_grad_(True)
        adapter_weights.lora_B.requires_grad_(True)

    configs[adapter_name] = config
    setattr(model, _CONFIGS_ATTR, configs)
    return model


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """Return the adapters on ``model`` by name (a copy; empty when there are none)."""
    return dict(getattr(model, _CONFIGS_ATTR, {}))


def iter_adapter_weights(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
    """Yield (qualified layer name, AdapterWeights) for each layer that carries the adapter."""
    for name, module in model.named_modules():
        if isinstance(module, MatryoshkaLinear) and adapter_name in module.adapters:
            yield name, module.adapters[adapter_name]


def adapter_parameters(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> list[nn.Parameter]:
    return [p for _, weights in iter_adapter_weights(model, adapter_name) for p in (weights.lora_A, weights.lora_B)]


def check_rank(model: nn.Module, rank: object, adapter: str = DEFAULT_ADAPTER) -> None:
    """Raise ValueError unless ``adapter`` is on ``model`` and ``rank`` is in 0..its max rank."""
    configs = adapter_configs(model)
    if adapter not in configs:
        raise ValueError(f"unknown adapter {adapter!r}; loaded: {', '.join(sorted(configs)) or 'none'}")
    max_rank = configs[adapter].r
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= max_rank:
        raise ValueError(f"rank must be an integer in 0..{max_rank} for adapter {adapter!r}, got {rank!r}")


def _linear_layers(model: nn.Module) -> list[str]:
    """Qualified names of the adaptable linear layers: plain nn.Linear or already wrapped."""
    wrapped = {name for name, module in model.named_modules() if isinstance(module, MatryoshkaLinear)}
    return [
        name
        for name, module in model.named_modules()
        if name in wrapped or (isinstance(module, nn.Linear) and name.rpartition(".")[0] not in wrapped)
    ]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
