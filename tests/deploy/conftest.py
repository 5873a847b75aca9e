"""Fixtures for the deployment tests: docker/local_stack.py loaded as a module, and a tiny model to serve."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from matlora import AdapterConfig, inject_adapter, save_adapter
from matlora.base_model import load_base
from matlora.model import iter_adapter_weights

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"


def _load_local_stack() -> ModuleType:
    # docker/ is not a package (and "docker" is also the name of the Docker SDK), so the
    # script is loaded from its path, registered first so that its dataclasses resolve.
    name = "matlora_local_stack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DOCKER_DIR / "local_stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def local_stack() -> ModuleType:
    return _load_local_stack()


@pytest.fixture(scope="session")
def stack_programs(local_stack: ModuleType) -> None:
    """Skip the test unless the nginx and prometheus programs are installed."""
    for program in ("nginx", "prometheus"):
        try:
            local_stack.find_program(program)
        except FileNotFoundError:
            pytest.skip(f"{program} not installed; the local stack needs apt-get install -y nginx prometheus")


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A rank-8 adapter on q_proj and v_proj of the tiny model, with random non-zero weights."""
    model, _ = load_base(str(tiny_model_dir), dtype="float32", device="cpu")
    inject_adapter(model, AdapterConfig(r=8, target_modules=["q_proj", "v_proj"]), "toy")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, weights in iter_adapter_weights(model, "toy"):
            weights.lora_B.copy_(torch.randn(weights.lora_B.shape, generator=generator) * 0.5)
    return save_adapter(model, tmp_path_factory.mktemp("adapter"), "toy")


@pytest.fixture(scope="session")
def serve_args(tiny_model_dir: Path, adapter_dir: Path) -> list[str]:
    """``matlora serve`` arguments for a replica of the tiny model with the adapter "toy", on CPU."""
    return [
        "--base", str(tiny_model_dir),
        "--adapter", f"toy={adapter_dir}",
        "--device", "cpu",
        # One thread each: two replicas on a 2-core machine slow down badly when
        # both run PyTorch's default of one thread per core.
        "--threads", "1",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def dashboard() -> dict:
    return json.loads((DOCKER_DIR / "grafana" / "dashboards" / "matlora.json").read_text())


@pytest.fixture(scope="session")
def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """Every (panel title, PromQL expression) of the dashboard, in panel order."""
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _resolve_grafana_variables(expr: str, rate_interval: str = "30s", time_range: str = "5m") -> str:
    replacements = {
        "$__rate_interval": rate_interval,
        "$__range": time_range,
        "$adapter": ".*",
        "$replica": ".*",
    }
    for variable, value in replacements.items():
        expr = expr.replace(variable, value)
    return expr


@pytest.fixture(scope="session")
def resolve_grafana_variables() -> Callable[..., str]:
    """A function that makes a dashboard query runnable by Prometheus itself.

    ``$__rate_interval`` and ``$__range`` become the given durations (keywords
    ``rate_interval``, default "30s", and ``time_range``, default "5m"), and ``$adapter``
    and ``$replica`` become ``.*``, as the dashboard's "All" does.
    """
    return _resolve_grafana_variables
