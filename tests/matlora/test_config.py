"""AdapterConfig: defaults, validation that lists every bad field, and the JSON round trip."""

import json

import pytest

from matlora import AdapterConfig, AdapterConfigError
from matlora.config import CONFIG_NAME, PEFT_TYPE


def test_default_train_ranks_are_powers_of_two_then_r():
    assert AdapterConfig(r=12, target_modules=["q_proj"]).train_ranks == [1, 2, 4, 8, 12]


def test_max_rank_is_r():
    config = AdapterConfig(r=16, target_modules=["q_proj"])
    assert config.max_rank == 16
    assert config.to_dict()["max_rank"] == 16


def test_every_invalid_field_is_listed_once():
    with pytest.raises(AdapterConfigError) as caught:
        AdapterConfig(r=8, target_modules=[], method="lorax", scaling="log", lora_alpha=0, train_ranks=[1, 4, 2])
    message = str(caught.value)
    assert "target_modules must be a non-empty list" in message
    assert "method must be one of matryoshka, dylora, lora, nested, got 'lorax'" in message
    assert "scaling must be one of none, rank, sqrt, got 'log'" in message
    assert "lora_alpha must be a number > 0, got 0" in message
    assert "train_ranks must be strictly increasing, got [1, 4, 2]" in message


def test_train_ranks_must_end_with_r():
    with pytest.raises(AdapterConfigError, match=r"train_ranks must lie in 1\.\.r and end with r=8, got \[1, 2, 4\]"):
        AdapterConfig(r=8, target_modules=["q_proj"], train_ranks=[1, 2, 4])


@pytest.mark.parametrize("r", [0, -2, 2.5, True])
def test_invalid_r(r):
    with pytest.raises(AdapterConfigError, match="r must be an integer >= 1"):
        AdapterConfig(r=r, target_modules=["q_proj"])


def test_inference_scaling_must_be_known():
    with pytest.raises(AdapterConfigError, match="inference_scaling must be one of drop_p, keep_p, got 'paper'"):
        AdapterConfig(r=4, target_modules=["q_proj"], inference_scaling="paper")


@pytest.mark.parametrize(
    ("method", "expected"), [("matryoshka", "keep_p"), ("nested", "drop_p"), ("dylora", "keep_p"), ("lora", "keep_p")]
)
def test_inference_scaling_default_by_method(method, expected):
    assert AdapterConfig(r=4, target_modules=["q_proj"], method=method).inference_scaling == expected


def test_explicit_inference_scaling_is_kept():
    config = AdapterConfig(r=4, target_modules=["q_proj"], method="nested", inference_scaling="keep_p")
    assert config.inference_scaling == "keep_p"


def test_save_load_round_trip(tmp_path):
    config = AdapterConfig(r=8, target_modules=["q_proj", "v_proj"], method="dylora", scaling="rank", lora_alpha=4.0)
    config.save(tmp_path)
    assert AdapterConfig.load(tmp_path) == config
    stored = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert stored["peft_type"] == PEFT_TYPE
    assert stored["max_rank"] == 8


def test_load_rejects_plain_peft_adapter(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterConfigError, match="this is a plain PEFT adapter"):
        AdapterConfig.load(tmp_path)


def test_load_rejects_unknown_fields(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"r": 8, "target_modules": ["q_proj"], "rnak": 3}))
    with pytest.raises(AdapterConfigError, match="unknown fields: rnak"):
        AdapterConfig.load(tmp_path)


def test_load_reports_missing_fields(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"method": "lora"}))
    with pytest.raises(AdapterConfigError, match="missing fields: r, target_modules"):
        AdapterConfig.load(tmp_path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="an adapter folder needs adapter_config.json"):
        AdapterConfig.load(tmp_path)
