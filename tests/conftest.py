"""Fixtures shared by every test package: tiny models built in code, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from matlora.testing import build_tiny_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
ARITHMETIC_DATA = REPO_ROOT / "data" / "bigbench-arithmetic"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a byte-level ChatML tokenizer, saved once per session."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def addition_task() -> Path:
    """BIG-bench 1-digit addition (100 examples), small enough for CLI runs."""
    return ARITHMETIC_DATA / "1_digit_addition" / "task.json"
