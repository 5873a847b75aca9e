"""Fixtures for the deployment tests: docker/local_stack.py, loaded as a module."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

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
