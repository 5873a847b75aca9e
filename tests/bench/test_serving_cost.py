"""Tests of the serving-cost benchmark: the multiply-add floor and one tiny run end to end."""

from __future__ import annotations

import pytest

from bench import serving_cost
from bench.serving_cost import ServingConfig


def test_count_macs_on_tiny_model(tiny_model_dir):
    from matlora.base_model import load_base

    model, _ = load_base(str(tiny_model_dir), dtype="float32", device="cpu")

    macs = serving_cost.count_macs(model, ["q_proj", "v_proj"])

    # Per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate/up/down 64x128; two layers.
    assert macs["linear"] == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
    assert macs["head"] == 64 * 259
    # 2 (scores and weighted sum) x 4 heads x head_dim 16 x 2 layers.
    assert macs["attention"] == 256
    # q_proj (64 in + 64 out) and v_proj (64 in + 32 out) on two layers.
    assert macs["adapter_per_rank"] == 2 * (128 + 96)


def test_count_macs_same_with_adapter(tiny_model_dir):
    import matlora
    from matlora.base_model import load_base

    model, _ = load_base(str(tiny_model_dir), dtype="float32", device="cpu")
    plain = serving_cost.count_macs(model, ["q_proj", "v_proj"])
    matlora.inject_adapter(model, matlora.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))

    assert serving_cost.count_macs(model, ["q_proj", "v_proj"]) == plain


def test_floor_ratios_by_hand():
    macs = {"linear": 100, "head": 20, "attention": 2, "adapter_per_rank": 5}

    floors = serving_cost.floor_ratios(macs, rank=2, prompt_tokens=4, decode_tokens=2)

    # Prefill: 4 x 100 + 20 + 2 x (1 + 2 + 3 + 4) = 440 base, 4 x 2 x 5 = 40 adapter.
    assert floors["prefill"] == pytest.approx(1 + 40 / 440)
    # Decode: 100 + 20 + 2 x 5.5 average keys = 131 base, 2 x 5 = 10 adapter.
    assert floors["decode"] == pytest.approx(1 + 10 / 131)


def test_floor_ratios_rank_zero_is_one():
    macs = {"linear": 100, "head": 20, "attention": 2, "adapter_per_rank": 5}

    assert serving_cost.floor_ratios(macs, 0, 4, 2) == {"prefill": 1.0, "decode": 1.0}


def test_mixed_ranks_cycle():
    assert serving_cost.mixed_ranks([0, 1, 4], 5) == [0, 1, 4, 0, 1]


def test_served_ranks_add_max_rank():
    config = ServingConfig(ranks=(0, 1, 2, 4, 8, 16))

    assert config.served_ranks(32) == [0, 1, 2, 4, 8, 16, 32]
    assert config.served_ranks(4) == [0, 1, 2, 4]


def test_run_on_tiny_model(tiny_model_dir, tmp_path):
    config = ServingConfig(
        base=str(tiny_model_dir),
        max_rank=4,
        target_modules=("q_proj", "v_proj"),
        ranks=(0, 1),
        batch_sizes=(1, 2),
        prompt_tokens=8,
        decode_tokens=2,
        rounds=1,
        profile_steps=1,
    )

    result = serving_cost.run(config, tmp_path, "cpu")

    assert list(result["batches"]) == ["1", "2"]
    assert sorted(result["batches"]["1"]["variants"]) == [
        "base", "matlora@0", "matlora@1", "matlora@4", "merged", "peft@1", "peft@4"
    ]  # fmt: skip
    assert "matlora mixed" in result["batches"]["2"]["variants"]
    base = result["batches"]["1"]["variants"]["base"]
    assert base["prefill_ratio"] == 1.0
    assert base["decode_ratio"] == 1.0
    assert result["setup"]["peft_adapter_dtype"] == result["setup"]["dtype"]
    assert result["profile"]["matlora"]["adapter_ms_per_step"] is not None
    assert result["profile"]["base"]["adapter_ms_per_step"] is None
    markdown = serving_cost.render_markdown(result)
    assert "### Batch 1" in markdown
    assert "### Batch 2" in markdown
    serving_cost.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
