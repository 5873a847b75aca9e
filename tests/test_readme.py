"""The README's Python example runs as written."""

import os
import re

import pytest

from tests.conftest import REPO_ROOT


def python_blocks(section: str) -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(f"## {section}")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)


@pytest.mark.slow
def test_python_api_example_runs(tmp_path, monkeypatch):
    (example,) = python_blocks("Using adapters from Python")
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {"__name__": "readme_example"})
    assert sorted(os.listdir(tmp_path / "my-adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
