"""Adapter folders: injection, save/load with every error, and the PEFT export."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import matlora
from matlora import AdapterConfig, AdapterLoadError, TargetModuleError, at_rank, inject_adapter
from matlora.base_model import load_base
from matlora.serialization import WEIGHTS_NAME, base_model_fingerprint, export_peft, load_adapter, save_adapter
from matlora.testing import build_tiny_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def trained_adapter(model, method="matryoshka", r=8, inference_scaling="keep_p", seed=1):
    """Inject an adapter and give it random weights, as if it had been trained."""
    config = AdapterConfig(
        r=r,
        target_modules=TARGETS,
        method=method,
        scaling="sqrt",
        lora_alpha=2.0,
        inference_scaling=inference_scaling,
        base_model_fingerprint=base_model_fingerprint(model),
    )
    inject_adapter(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in matlora.model.adapter_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return config


@pytest.fixture
def model():
    return build_tiny_model(vocab_size=64, seed=0)


@pytest.fixture
def saved_adapter(tmp_path):
    source = build_tiny_model(vocab_size=64, seed=0)
    trained_adapter(source)
    save_adapter(source, tmp_path / "adapter")
    return source, tmp_path / "adapter"


def logits_at(model, rank, input_ids, inference_scaling=None):
    with torch.no_grad(), at_rank(rank, inference_scaling=inference_scaling):
        return model(input_ids).logits


def test_inject_freezes_base_and_trains_adapter(model):
    trained_adapter(model)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable
    assert all(".lora_A" in name or ".lora_B" in name for name in trainable)
    # 2 layers x 3 targets x (lora_A + lora_B)
    assert len(trainable) == 12


def test_unknown_target_lists_linear_layers(model):
    config = AdapterConfig(r=4, target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(TargetModuleError) as caught:
        inject_adapter(model, config)
    message = str(caught.value)
    assert "'qkv_proj' match no linear layer of LlamaForCausalLM" in message
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message


def test_second_adapter_reuses_wrappers(model):
    trained_adapter(model)
    inject_adapter(model, AdapterConfig(r=4, target_modules=["q_proj"]), "second")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, matlora.MatryoshkaLinear)
    assert sorted(layer.adapters) == ["default", "second"]
    assert sorted(matlora.adapter_configs(model)) == ["default", "second"]


def test_round_trip_gives_same_logits(saved_adapter):
    source, directory = saved_adapter
    loaded = build_tiny_model(vocab_size=64, seed=0)
    config = load_adapter(loaded, directory)
    assert config.r == 8
    input_ids = torch.randint(0, 64, (2, 7))
    for rank in (0, 1, 5, 8):
        torch.testing.assert_close(logits_at(loaded, rank, input_ids), logits_at(source, rank, input_ids))


def test_saved_tensors_use_peft_names_at_full_rank(saved_adapter):
    _, directory = saved_adapter
    tensors = load_file(str(directory / WEIGHTS_NAME))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{key}.lora_A.weight"].shape == (8, 64)
    assert tensors[f"{key}.lora_B.weight"].shape == (64, 8)
    assert len(tensors) == 12


def test_load_missing_tensor(saved_adapter):
    _, directory = saved_adapter
    tensors = load_file(str(directory / WEIGHTS_NAME))
    del tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    save_file(tensors, str(directory / WEIGHTS_NAME))
    model = build_tiny_model(vocab_size=64, seed=0)
    with pytest.raises(
        AdapterLoadError,
        match=r"1 missing tensor\(s\) \(base_model\.model\.model\.layers\.1\.mlp\.down_proj\.lora_B\.weight\); 0 unexpected",
    ):
        load_adapter(model, directory)
    assert matlora.adapter_configs(model) == {}


def test_load_unexpected_tensor(saved_adapter):
    _, directory = saved_adapter
    tensors = load_file(str(directory / WEIGHTS_NAME))
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(8, 64)
    save_file(tensors, str(directory / WEIGHTS_NAME))
    with pytest.raises(
        AdapterLoadError, match=r"0 missing tensor\(s\); 1 unexpected tensor\(s\) \(.*k_proj\.lora_A\.weight\)"
    ):
        load_adapter(build_tiny_model(vocab_size=64, seed=0), directory)


def test_load_wrong_shape(saved_adapter):
    _, directory = saved_adapter
    tensors = load_file(str(directory / WEIGHTS_NAME))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 64)
    save_file(tensors, str(directory / WEIGHTS_NAME))
    with pytest.raises(
        AdapterLoadError, match=rf"{key.replace('.', '[.]')}: stored \(4, 64\), model expects \(8, 64\)"
    ):
        load_adapter(build_tiny_model(vocab_size=64, seed=0), directory)


def test_load_on_other_base_model(saved_adapter):
    _, directory = saved_adapter
    other = build_tiny_model(vocab_size=64, seed=5)
    with pytest.raises(
        AdapterLoadError, match=r"was trained on base model .*\(weights_sha256 .*Load the adapter on the base model"
    ):
        load_adapter(other, directory)


def test_load_on_other_architecture(saved_adapter):
    _, directory = saved_adapter
    with pytest.raises(AdapterLoadError, match="config_sha256"):
        load_adapter(build_tiny_model(vocab_size=64, seed=0, hidden_size=32), directory)


def test_fingerprint_ignores_dtype():
    model = build_tiny_model(vocab_size=64, seed=0)
    assert base_model_fingerprint(model) == base_model_fingerprint(model.to(torch.bfloat16))


def test_load_missing_weights_file(saved_adapter):
    _, directory = saved_adapter
    (directory / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="an adapter folder needs adapter_model.safetensors"):
        load_adapter(build_tiny_model(vocab_size=64, seed=0), directory)


def test_load_never_unpickles(saved_adapter, monkeypatch):
    _, directory = saved_adapter

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", refuse)
    load_adapter(build_tiny_model(vocab_size=64, seed=0), directory)


@pytest.mark.parametrize("inference_scaling", ["keep_p", "drop_p"])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_peft_export_matches_matlora(tmp_path, tiny_model_dir, rank, inference_scaling):
    peft = pytest.importorskip("peft")
    model, _ = load_base(str(tiny_model_dir), dtype="float32")
    trained_adapter(model, inference_scaling=inference_scaling)
    save_adapter(model, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", rank, tmp_path / "peft")

    base, _ = load_base(str(tiny_model_dir), dtype="float32")
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    peft_model.eval()
    input_ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        expected = logits_at(model, rank, input_ids)
        torch.testing.assert_close(peft_model(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_export_config(tmp_path):
    model = build_tiny_model(vocab_size=64)
    trained_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", 4, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 4)
    assert config["target_modules"] == sorted(TARGETS)


@pytest.mark.parametrize("rank", [0, 9])
def test_peft_export_rejects_rank_out_of_range(tmp_path, rank):
    model = build_tiny_model(vocab_size=64)
    trained_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=rf"rank must be an integer in 1\.\.8 to export, got {rank}"):
        export_peft(tmp_path / "adapter", rank, tmp_path / "peft")


def test_check_rank(model):
    trained_adapter(model)
    matlora.check_rank(model, 8)
    with pytest.raises(ValueError, match=r"rank must be an integer in 0\.\.8 for adapter 'default', got 9"):
        matlora.check_rank(model, 9)
    with pytest.raises(ValueError, match="unknown adapter 'math'; loaded: default"):
        matlora.check_rank(model, 2, "math")


def test_inject_into_plain_module():
    """Adapters work on any nn.Module with linear layers, not only transformers models."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    inject_adapter(net, AdapterConfig(r=2, target_modules=["0", "2"]))
    assert isinstance(net[0], matlora.MatryoshkaLinear)
    with at_rank(1):
        assert net(torch.randn(3, 4)).shape == (3, 2)


def test_saved_weights_are_readable_by_other_users(saved_adapter):
    _, directory = saved_adapter
    assert (directory / WEIGHTS_NAME).stat().st_mode & 0o777 == 0o644
