"""Settings of ``matlora serve``: command-line flags over ``MATLORA_*`` environment variables over defaults."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from matlora.base_model import DEFAULT_BASE
from matlora.config import AdapterConfig

BUNDLED_ADAPTER_NAME = "arith"
BUNDLED_ADAPTER_DIR = Path(__file__).resolve().parent.parent / "matlora" / "adapters" / BUNDLED_ADAPTER_NAME
DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
# Adapter names appear in OpenAI model ids as NAME@RANK, so "@" and spaces are not allowed.
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Settings(BaseSettings):
    """All settings of ``matlora serve``. Each field can also be set as the variable ``MATLORA_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="MATLORA_", extra="forbid", validate_default=True)

    base: str = Field(DEFAULT_BASE, description="base model: a local Hugging Face folder or 'smollm2-135m'")
    adapter: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="adapters as [NAME=]DIR (several allowed; a comma-separated list in the environment)",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes, each with its own copy of the model")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")
    dtype: str = Field("auto", description="'auto' (bfloat16 on CUDA and on CPUs with native bf16), or a dtype name")
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for PyTorch in each worker (default: PyTorch's choice; matlora serve gives each "
        "of several workers the number of cores divided by the number of workers)",
    )
    api_key: SecretStr | None = Field(None, description="bearer token every route but /healthz and /readyz requires")
    metrics_auth: bool = Field(True, description="whether /metrics requires the API key too")
    max_new_tokens_limit: int = Field(512, ge=1)
    max_batch_size: int = Field(16, ge=1)
    max_queue: int = Field(64, ge=1, description="requests that may wait for the batch; past it: 429")
    max_body_bytes: int = Field(65536, ge=1)
    rank_policy: Literal["auto", "fixed", "max"] = Field("auto", description="the rank used when a request omits it")
    default_rank: int | None = Field(None, ge=0, description="the rank of the fixed policy")
    target_latency_ms: float = Field(2000.0, gt=0, description="latency the auto policy aims at")
    graceful_timeout: float = Field(30.0, ge=0, description="seconds to finish in-flight requests after SIGTERM")
    warmup: bool = Field(True, description="run one short generation per adapter before reporting ready")
    replica_id: str | None = Field(
        None, description="id sent in the x-matlora-replica header of every response (default: HOSTNAME:PORT)"
    )

    def replica_name(self) -> str:
        return self.replica_id or f"{socket.gethostname()}:{self.port}"

    @field_validator("adapter", mode="before")
    @classmethod
    def _split_adapter_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_rank_policy(self) -> Settings:
        if self.rank_policy == "fixed" and self.default_rank is None:
            raise ValueError("rank_policy 'fixed' needs default_rank (--default-rank N)")
        if self.rank_policy != "fixed" and self.default_rank is not None:
            raise ValueError(
                f"default_rank is only used by rank_policy 'fixed', but rank_policy is {self.rank_policy!r}; "
                "drop --default-rank or add --rank-policy fixed"
            )
        return self

    def adapter_dirs(self) -> dict[str, Path]:
        """Return the adapters to load by name, the bundled one when none is given.

        Raises:
            ValueError: a name is invalid or repeated, or no adapter is given for a custom base.
            FileNotFoundError: a folder (or the bundled adapter) does not exist.
        """
        if not self.adapter:
            return {BUNDLED_ADAPTER_NAME: self._bundled_adapter_dir()}
        dirs: dict[str, Path] = {}
        for spec in self.adapter:
            name, path = parse_adapter_spec(spec)
            if name in dirs:
                raise ValueError(f"adapter name {name!r} is given twice ({dirs[name]} and {path}); name them NAME=DIR")
            if not path.is_dir():
                raise FileNotFoundError(f"adapter folder {path} (from --adapter {spec}) does not exist")
            dirs[name] = path
        return dirs

    def check_adapters(self) -> dict[str, Path]:
        """Return :meth:`adapter_dirs` after checking that each folder holds a valid config that has ``default_rank``.

        Raises:
            ValueError: as :meth:`adapter_dirs`, an invalid adapter config, or a default rank
                above an adapter's max rank.
            FileNotFoundError: as :meth:`adapter_dirs`, or a folder without its config.
        """
        dirs = self.adapter_dirs()
        if self.default_rank is None:
            return dirs
        too_small = []
        for name, directory in dirs.items():
            max_rank = AdapterConfig.load(directory).r
            if max_rank < self.default_rank:
                too_small.append(f"{name} (max rank {max_rank})")
        if too_small:
            raise ValueError(
                f"--default-rank {self.default_rank} is above the max rank of adapter(s) {', '.join(too_small)}; "
                "pick a default rank that every adapter has"
            )
        return dirs

    def _bundled_adapter_dir(self) -> Path:
        if self.base != DEFAULT_BASE:
            raise ValueError(
                f"the bundled adapter {BUNDLED_ADAPTER_NAME!r} fits only the base {DEFAULT_BASE!r}; "
                f"with --base {self.base} pass --adapter [NAME=]DIR"
            )
        if not (BUNDLED_ADAPTER_DIR / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"the bundled adapter {BUNDLED_ADAPTER_NAME!r} is missing: {BUNDLED_ADAPTER_DIR} has no "
                "adapter_config.json. Restore it from git (or rebuild it with `make adapter`), "
                "or pass --adapter [NAME=]DIR"
            )
        return BUNDLED_ADAPTER_DIR


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """Split ``NAME=DIR`` (or ``DIR``, named after its folder) into a checked name and a path."""
    name, separator, directory = spec.partition("=")
    if not separator:
        directory = spec
        name = Path(spec.rstrip("/")).name
    path = Path(directory).expanduser()
    if not _ADAPTER_NAME.match(name):
        raise ValueError(
            f"invalid adapter name {name!r} in --adapter {spec}: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit (e.g. --adapter math=./adapters/math)"
        )
    return name, path
