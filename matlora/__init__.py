"""Rank-elastic hierarchical (Matryoshka) LoRA: one adapter, served at any rank prefix."""

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

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADAPTER",
    "INFERENCE_SCALINGS",
    "METHODS",
    "SCALINGS",
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterLoadError",
    "AdapterSpec",
    "MatryoshkaLinear",
    "RankPlan",
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
