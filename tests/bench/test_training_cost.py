"""Tests of the training-cost benchmark: the summary, and a tiny interleaved measurement."""

from __future__ import annotations

import dataclasses

import pytest

from bench import training_cost
from bench.training_cost import TrainingCostConfig


def test_summarize_ratios_to_lora_per_round():
    config = TrainingCostConfig(train_ranks=(1, 2, 4), max_rank=4)
    durations = {"lora": [[1.0, 1.2], [1.1, 1.1]], "nested": [[5.0, 5.2], [5.5, 5.5]]}

    rows = {row["method"]: row for row in training_cost.summarize(config, durations)}

    assert rows["lora"]["median_s"] == pytest.approx(1.1)
    assert rows["lora"]["ratio_to_lora"] == pytest.approx(1.0)
    assert rows["lora"]["p25_s"] == pytest.approx(1.075)
    assert rows["lora"]["p75_s"] == pytest.approx(1.125)
    # Round ratios 5.1 / 1.1 and 5.5 / 1.1; their median is their mean.
    assert rows["nested"]["ratio_to_lora"] == pytest.approx((5.1 / 1.1 + 5.5 / 1.1) / 2)
    assert rows["nested"]["expected_ratio"] == 3
    assert rows["nested"]["steps_timed"] == 4


def test_summarize_without_lora_has_no_ratio():
    rows = training_cost.summarize(TrainingCostConfig(), {"dylora": [[1.0]]})

    assert rows[0]["ratio_to_lora"] is None
    assert rows[0]["p25_s"] == 1.0


def test_measure_on_tiny_model(tiny_model_dir, tmp_path):
    config = TrainingCostConfig(
        base=str(tiny_model_dir),
        max_rank=4,
        train_ranks=(1, 2, 4),
        target_modules=("q_proj", "v_proj"),
        batch_size=2,
        steps_per_round=3,
        rounds=2,
    )

    durations = training_cost.measure(config, "cpu", tmp_path)

    assert sorted(durations) == ["dylora", "lora", "matryoshka", "nested"]
    # Two rounds of three steps, the first step of each dropped.
    assert all(len(rounds) == 2 and all(len(steps) == 2 for steps in rounds) for rounds in durations.values())
    markdown = training_cost.render_markdown(
        {
            "config": dataclasses.asdict(config),
            "methods": training_cost.summarize(config, durations),
        }
    )
    assert "| nested |" in markdown
