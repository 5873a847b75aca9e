"""The embedded base model's cache: converted once, into files that every user can read."""

import stat
from pathlib import Path

import pytest

from matlora import base_model
from matlora.testing import build_tiny_model, build_tiny_tokenizer


@pytest.fixture
def converted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The cache folder of the embedded base model, converted from the tiny model instead of the GGUF file."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    monkeypatch.setattr(base_model, "_load_gguf", lambda: (model, tokenizer))
    monkeypatch.setenv("MATLORA_CACHE", str(tmp_path / "cache"))
    return base_model.resolve_base(base_model.DEFAULT_BASE)


def test_converted_cache_is_in_matlora_cache(converted, tmp_path):
    assert converted == tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert (converted / "config.json").is_file()
    assert (converted / "model.safetensors").is_file()


def test_converted_files_are_readable_by_other_users(converted):
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in converted.iterdir()}
    assert modes["model.safetensors"] == 0o644
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(converted.stat().st_mode) == 0o755
