"""The adapter config: PEFT's LoRA fields plus the rank hierarchy, checked once."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matlora.layer import INFERENCE_SCALINGS, METHODS, SCALINGS, AdapterSpec, trained_inference_scaling

CONFIG_NAME = "adapter_config.json"

# Not "LORA": PEFT must not load this folder as a plain LoRA, because its scale
# depends on the rank served. `matlora export` writes a real PEFT LoRA adapter.
PEFT_TYPE = "MATRYOSHKA_LORA"


class AdapterConfigError(ValueError):
    """An adapter config with one or more invalid fields; the message lists each one."""


@dataclass
class AdapterConfig:
    """Config of a hierarchical LoRA adapter, saved as ``adapter_config.json``.

    Args:
        r: max rank R; every prefix rank 1..R can be served.
        lora_alpha: alpha in s(r) = alpha * {1, 1/r, 1/sqrt(r)}.
        target_modules: names of the linear layers to adapt; a name matches a module whose
            qualified name equals it or ends with ``"." + name``.
        method: ``matryoshka``, ``dylora``, ``lora`` or ``nested``.
        train_ranks: the ranks the objective trains, ascending, the last one equal to r.
        scaling: ``none``, ``rank`` or ``sqrt``.
        inference_scaling: ``drop_p`` (rank k serves s(k) A_k B_k, the inference of the MatryoshkaLoRA
            paper, arXiv 2605.07850) or ``keep_p`` (rank k keeps the training diagonal p[:k]). None
            picks the one that serves what the method trained: ``drop_p`` for nested, else ``keep_p``.
        lora_dropout: dropout on the adapter input during training.
        base_model_name_or_path: the base model the adapter was trained on.
        base_model_fingerprint: hashes of that model's config and weights, checked on load.
    """

    r: int
    target_modules: list[str]
    lora_alpha: float = 1.0
    method: str = "matryoshka"
    train_ranks: list[int] = field(default_factory=list)
    scaling: str = "sqrt"
    inference_scaling: str | None = None
    lora_dropout: float = 0.0
    base_model_name_or_path: str | None = None
    base_model_fingerprint: dict[str, str] = field(default_factory=dict)
    peft_type: str = PEFT_TYPE
    task_type: str = "CAUSAL_LM"
    bias: str = "none"
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if not self.train_ranks and isinstance(self.r, int):
            self.train_ranks = _powers_of_two_up_to(self.r)
        self.target_modules = list(self.target_modules)
        self.train_ranks = list(self.train_ranks)
        if self.inference_scaling is None and self.method in METHODS:
            self.inference_scaling = trained_inference_scaling(self.method)
        problems = self._problems()
        if problems:
            raise AdapterConfigError("invalid adapter config:\n  - " + "\n  - ".join(problems))

    @property
    def max_rank(self) -> int:
        return self.r

    def spec(self) -> AdapterSpec:
        return AdapterSpec(
            method=self.method,
            max_rank=self.r,
            train_ranks=tuple(self.train_ranks),
            scaling=self.scaling,
            alpha=float(self.lora_alpha),
            inference_scaling=self.inference_scaling,
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["max_rank"] = self.r
        return data

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        data = dict(data)
        max_rank = data.pop("max_rank", None)
        if max_rank is not None and max_rank != data.get("r"):
            raise AdapterConfigError(
                f"invalid adapter config:\n  - max_rank ({max_rank}) differs from r ({data.get('r')})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterConfigError(f"invalid adapter config:\n  - unknown fields: {', '.join(unknown)}")
        missing = sorted(name for name in ("r", "target_modules") if name not in data)
        if missing:
            raise AdapterConfigError(f"invalid adapter config:\n  - missing fields: {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def load(cls, directory: str | Path) -> AdapterConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: an adapter folder needs {CONFIG_NAME}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise AdapterConfigError(f"{path} is not valid JSON: {error}") from error
        if data.get("peft_type") not in (None, PEFT_TYPE):
            raise AdapterConfigError(
                f"{path} has peft_type {data.get('peft_type')!r}; this is a plain PEFT adapter, not a "
                f"hierarchical one (expected peft_type {PEFT_TYPE!r}). Load it with peft instead."
            )
        return cls.from_dict(data)

    def _problems(self) -> list[str]:
        problems = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            problems.append(f"r must be an integer >= 1, got {self.r!r}")
        if not self.target_modules or not all(isinstance(name, str) and name for name in self.target_modules):
            problems.append(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.scaling not in SCALINGS:
            problems.append(f"scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if self.inference_scaling not in INFERENCE_SCALINGS:
            problems.append(
                f"inference_scaling must be one of {', '.join(INFERENCE_SCALINGS)}, got {self.inference_scaling!r}"
            )
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            problems.append(f"bias must be 'none' (adapters carry no bias), got {self.bias!r}")
        if self.fan_in_fan_out:
            problems.append("fan_in_fan_out must be false: only nn.Linear layers are supported")
        problems.extend(self._train_rank_problems())
        return problems

    def _train_rank_problems(self) -> list[str]:
        ranks = self.train_ranks
        if not all(isinstance(rank, int) and not isinstance(rank, bool) for rank in ranks):
            return [f"train_ranks must be integers, got {ranks!r}"]
        if not isinstance(self.r, int) or self.r < 1:
            return []
        problems = []
        if ranks != sorted(set(ranks)):
            problems.append(f"train_ranks must be strictly increasing, got {ranks!r}")
        if ranks and (ranks[0] < 1 or ranks[-1] != self.r):
            problems.append(f"train_ranks must lie in 1..r and end with r={self.r}, got {ranks!r}")
        return problems


def _powers_of_two_up_to(max_rank: int) -> list[int]:
    """1, 2, 4, ... below max_rank, then max_rank itself."""
    ranks, rank = [], 1
    while rank < max_rank:
        ranks.append(rank)
        rank *= 2
    return ranks + [max_rank]
