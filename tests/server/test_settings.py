"""Settings from flags and ``MATLORA_*`` variables, and ``matlora serve`` refusing bad ones before starting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from matlora.cli import main
from server import settings as settings_module
from server.cli import _share_cores
from server.settings import BUNDLED_ADAPTER_NAME, Settings, parse_adapter_spec


def test_environment_variables_fill_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATLORA_PORT", "9001")
    monkeypatch.setenv("MATLORA_API_KEY", "sesame")
    monkeypatch.setenv("MATLORA_METRICS_AUTH", "false")
    monkeypatch.setenv("MATLORA_ADAPTER", "a=/x,b=/y")

    settings = Settings()

    assert settings.port == 9001
    assert settings.api_key.get_secret_value() == "sesame"
    assert settings.metrics_auth is False
    assert settings.adapter == ["a=/x", "b=/y"]


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATLORA_PORT", "9001")

    assert Settings(port=9002).port == 9002


def test_defaults_match_contract() -> None:
    settings = Settings()

    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8000, 1)
    assert (settings.max_new_tokens_limit, settings.max_batch_size, settings.max_queue) == (512, 16, 64)
    assert (settings.max_body_bytes, settings.target_latency_ms, settings.graceful_timeout) == (65536, 2000.0, 30.0)
    assert (settings.rank_policy, settings.metrics_auth, settings.warmup) == ("auto", True, True)


def test_api_key_hidden_in_repr() -> None:
    assert "sesame" not in repr(Settings(api_key="sesame"))


@pytest.mark.parametrize(
    ("spec", "name", "path"),
    [
        ("math=/a/b", "math", Path("/a/b")),
        ("/a/b/arith/", "arith", Path("/a/b/arith/")),
        ("x.y-1=rel", "x.y-1", Path("rel")),
    ],
)
def test_parse_adapter_spec(spec: str, name: str, path: Path) -> None:
    assert parse_adapter_spec(spec) == (name, path)


def test_missing_bundled_adapter_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(settings_module, "BUNDLED_ADAPTER_DIR", tmp_path / "arith")

    with pytest.raises(FileNotFoundError) as raised:
        Settings().adapter_dirs()

    assert f"the bundled adapter '{BUNDLED_ADAPTER_NAME}' is missing" in str(raised.value)
    assert "--adapter [NAME=]DIR" in str(raised.value)


def test_bundled_adapter_used_without_adapter_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(settings_module, "BUNDLED_ADAPTER_DIR", tmp_path)

    assert Settings().adapter_dirs() == {BUNDLED_ADAPTER_NAME: tmp_path}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rank_policy": "fixed"}, "rank_policy 'fixed' needs default_rank"),
        ({"default_rank": 4}, "default_rank is only used by rank_policy 'fixed'"),
        ({"dtype": "int8"}, "dtype must be one of auto, bfloat16"),
        ({"max_batch_size": 0}, "greater than or equal to 1"),
    ],
)
def test_invalid_settings(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(**fields)

    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank-policy", "fixed"], "rank_policy 'fixed' needs default_rank (--default-rank N)"),
        (["--port", "70000"], "port is out of range: got 70000, allowed 1..65535 (--port or MATLORA_PORT)"),
        (["--threads", "0"], "threads is out of range: got 0, allowed >= 1 (--threads or MATLORA_THREADS)"),
        (["--max-queue", "0"], "max_queue is out of range: got 0, allowed >= 1 (--max-queue or MATLORA_MAX_QUEUE)"),
        (
            ["--dtype", "int8"],
            "dtype must be one of auto, bfloat16, bf16, float16, fp16, float32, fp32, got 'int8' "
            "(--dtype or MATLORA_DTYPE)\n",
        ),
        (
            ["--adapter", "/no/such/adapter"],
            "adapter folder /no/such/adapter (from --adapter /no/such/adapter) does not exist",
        ),
        (["--adapter", "a@b=/tmp"], "invalid adapter name 'a@b'"),
        (["--adapter", "x=/tmp", "--adapter", "x=/var"], "adapter name 'x' is given twice"),
    ],
)
def test_serve_rejects_bad_settings_before_starting(
    args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", *args])

    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("workers", "threads", "cores", "expected"),
    [(2, None, 2, 1), (2, None, 8, 4), (3, None, 2, 1), (2, 3, 2, 3), (1, None, 8, None)],
)
def test_workers_share_cores(workers: int, threads: int | None, cores: int, expected: int | None) -> None:
    settings = Settings(workers=workers, threads=threads)

    assert _share_cores(settings, cores).threads == expected


def test_api_key_help_points_to_variable(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert "prefer the variable MATLORA_API_KEY" in help_text
