"""Rank-elastic hierarchical (Matryoshka) LoRA: one adapter, served at any rank prefix.

The public names below are imported on first use, so ``import matlora`` (and the
``matlora`` command's start) does not load torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "matlora.config": ("AdapterConfig", "AdapterConfigError"),
    "matlora.layer": (
        "DEFAULT_ADAPTER",
        "INFERENCE_SCALINGS",
        "METHODS",
        "SCALINGS",
        "AdapterSpec",
        "MatryoshkaLinear",
        "RankPlan",
        "at_rank",
        "rank_scale",
        "training_p",
    ),
    "matlora.model": ("TargetModuleError", "adapter_configs", "check_rank", "find_target_modules", "inject_adapter"),
    "matlora.serialization": ("AdapterLoadError", "export_peft", "load_adapter", "save_adapter"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterLoadError",
    "AdapterSpec",
    "DEFAULT_ADAPTER",
    "INFERENCE_SCALINGS",
    "METHODS",
    "MatryoshkaLinear",
    "RankPlan",
    "SCALINGS",
    "TargetModuleError",
    "adapter_configs",
    "at_rank",
    "check_rank",
    "export_peft",
    "find_target_modules",
    "inject_adapter",
    "load_adapter",
    "rank_scale",
    "save_adapter",
    "training_p",
]

if TYPE_CHECKING:
    from matlora.config import AdapterConfig, AdapterConfigError
    from matlora.layer import (
        DEFAULT_ADAPTER,
        INFERENCE_SCALINGS,
        METHODS,
        SCALINGS,
        AdapterSpec,
        MatryoshkaLinear,
        RankPlan,
        at_rank,
        rank_scale,
        training_p,
    )
    from matlora.model import TargetModuleError, adapter_configs, check_rank, find_target_modules, inject_adapter
    from matlora.serialization import AdapterLoadError, export_peft, load_adapter, save_adapter


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'matlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
