"""AURAC on curves whose area is worked out by hand, and the served update norms."""

import pytest
import torch

from matlora import AdapterConfig, inject_adapter
from matlora.model import iter_adapter_weights
from matlora.testing import build_tiny_model
from trainer.evaluate import update_norms
from trainer.metrics import aurac


def test_constant_curve_gives_its_value():
    assert aurac([1, 2, 4, 8, 16], [0.7] * 5) == pytest.approx(0.7)
    assert aurac([1, 2, 4, 8, 16], [0.7] * 5, log2=True) == pytest.approx(0.7)


def test_linear_axis_weights_wide_intervals():
    # Trapezoids: [1,2] (0+0.5)/2*1 = 0.25, [2,4] (0.5+1)/2*2 = 1.5; span 3.
    assert aurac([1, 2, 4], [0.0, 0.5, 1.0]) == pytest.approx(1.75 / 3)


def test_log2_axis_weights_each_doubling_equally():
    # On log2: x = 0, 1, 2; trapezoids 0.25 and 0.75; span 2.
    assert aurac([1, 2, 4], [0.0, 0.5, 1.0], log2=True) == pytest.approx(0.5)


def test_reference_curve_from_five_ranks():
    accuracy = [0.34, 0.67, 0.88, 0.91, 0.91]
    ranks = [1, 2, 4, 8, 16]
    # (0.505*1 + 0.775*2 + 0.895*4 + 0.91*8) / 15 and (0.505 + 0.775 + 0.895 + 0.91) / 4
    assert aurac(ranks, accuracy) == pytest.approx(12.915 / 15)
    assert aurac(ranks, accuracy, log2=True) == pytest.approx(3.085 / 4)


def test_rank_zero_is_left_out_and_order_does_not_matter():
    assert aurac([4, 0, 1, 2], [1.0, 0.9, 0.0, 0.5]) == pytest.approx(1.75 / 3)


def test_needs_two_adapter_ranks():
    with pytest.raises(ValueError, match=r"AURAC needs at least two ranks >= 1, got \[0, 4\]"):
        aurac([0, 4], [0.1, 0.5])


def test_lengths_must_match():
    with pytest.raises(ValueError, match="got 3 ranks but 2 accuracies"):
        aurac([1, 2, 4], [0.1, 0.5])


def test_update_norms_match_explicit_matrices():
    model = build_tiny_model(vocab_size=32)
    inject_adapter(model, AdapterConfig(r=4, target_modules=["q_proj"], train_ranks=[1, 2, 4]))
    with torch.no_grad():
        for _, weights in iter_adapter_weights(model, "default"):
            weights.lora_B.normal_()

    for scaling in ("keep_p", "drop_p"):
        norms = update_norms(model, [0, 2, 4], inference_scaling=scaling)
        expected = [0.0]
        for rank in (2, 4):
            squared = 0.0
            for _, weights in iter_adapter_weights(model, "default"):
                scale = torch.as_tensor(weights.spec.prefix_scale(rank, scaling)).expand(rank)
                update = weights.lora_B[:, :rank] @ torch.diag(scale) @ weights.lora_A[:rank]
                squared += float(update.double().pow(2).sum())
            expected.append(squared**0.5)
        assert norms == pytest.approx(expected, rel=1e-5)
