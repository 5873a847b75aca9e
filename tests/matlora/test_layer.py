"""The adapter maths: p vectors, the training forward and rank-k inference."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from matlora import AdapterSpec, RankPlan, at_rank, rank_scale, training_p
from matlora.layer import AdapterWeights, MatryoshkaLinear

IN_FEATURES, OUT_FEATURES, MAX_RANK = 12, 10, 8
TRAIN_RANKS = (1, 2, 4, 8)


def make_layer(method="matryoshka", scaling="sqrt", alpha=2.0, inference_scaling="keep_p", seed=0):
    """A MatryoshkaLinear whose lora_B is random, so every rank changes the output."""
    torch.manual_seed(seed)
    layer = MatryoshkaLinear(nn.Linear(IN_FEATURES, OUT_FEATURES))
    spec = AdapterSpec(method, MAX_RANK, TRAIN_RANKS, scaling, alpha, inference_scaling)
    layer.add_adapter("default", spec)
    nn.init.normal_(layer.adapters["default"].lora_B)
    return layer


def weights(layer: MatryoshkaLinear) -> AdapterWeights:
    return layer.adapters["default"]


def prefix(x, layer, rank, scale):
    """The rank-r adapter term written out: scale * x A[:r]^T B[:, :r]^T."""
    adapter = weights(layer)
    return scale * (x @ adapter.lora_A[:rank].T @ adapter.lora_B[:, :rank].T)


@pytest.mark.parametrize(
    ("scaling", "alpha", "expected"),
    [("none", 1.0, 1.0), ("none", 3.0, 3.0), ("rank", 8.0, 2.0), ("sqrt", 8.0, 4.0)],
)
def test_rank_scale(scaling, alpha, expected):
    assert rank_scale(4, alpha, scaling) == expected


def test_rank_scale_rejects_unknown_scaling():
    with pytest.raises(ValueError, match="scaling must be one of none, rank, sqrt, got 'log'"):
        rank_scale(4, 1.0, "log")


def test_matryoshka_p_from_issue_example():
    p = training_p("matryoshka", 8, [1, 2, 4, 8], "none", 1.0)
    assert p.tolist() == [4.0, 3.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]


def test_matryoshka_p_sqrt_scaling():
    p = training_p("matryoshka", 4, [1, 2, 4], "sqrt", 1.0)
    expected = torch.tensor([1 + 2**-0.5 + 0.5, 2**-0.5 + 0.5, 0.5, 0.5])
    torch.testing.assert_close(p, expected)


def test_lora_p_is_constant_full_rank_scale():
    assert training_p("lora", 8, [1, 2, 4, 8], "rank", 8.0).tolist() == [1.0] * 8


def test_dylora_p_masks_after_sampled_rank():
    assert training_p("dylora", 8, [1, 2, 4, 8], "rank", 4.0, dylora_rank=2).tolist() == [2.0, 2.0] + [0.0] * 6


def test_nested_p_equals_matryoshka_p():
    nested = training_p("nested", 8, [1, 2, 4, 8], "sqrt", 1.0)
    torch.testing.assert_close(nested, training_p("matryoshka", 8, [1, 2, 4, 8], "sqrt", 1.0))


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_matryoshka_forward_equals_sum_of_prefix_adapters(scaling):
    layer = make_layer(scaling=scaling)
    x = torch.randn(3, 5, IN_FEATURES)
    expected = layer.base_layer(x) + sum(prefix(x, layer, r, rank_scale(r, 2.0, scaling)) for r in TRAIN_RANKS)
    torch.testing.assert_close(layer(x), expected)


def test_lora_forward_is_plain_lora():
    layer = make_layer(method="lora", scaling="rank")
    x = torch.randn(4, IN_FEATURES)
    expected = layer.base_layer(x) + prefix(x, layer, MAX_RANK, 2.0 / MAX_RANK)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("rank", TRAIN_RANKS)
def test_dylora_step_equals_masked_p(rank):
    """A DyLoRA step trains at_rank(b, drop_p): the same as the full forward with p = s(b) on b entries."""
    layer = make_layer(method="dylora")
    adapter = weights(layer)
    x = torch.randn(4, IN_FEATURES)
    p = training_p("dylora", MAX_RANK, TRAIN_RANKS, "sqrt", 2.0, dylora_rank=rank)
    expected = layer.base_layer(x) + F.linear(F.linear(x, adapter.lora_A) * p, adapter.lora_B)
    with at_rank(rank, inference_scaling="drop_p"):
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("rank", range(1, MAX_RANK + 1))
def test_rank_k_drop_p_is_scaled_slice(rank):
    layer = make_layer()
    x = torch.randn(2, 3, IN_FEATURES)
    expected = layer.base_layer(x) + prefix(x, layer, rank, rank_scale(rank, 2.0, "sqrt"))
    with at_rank(rank, inference_scaling="drop_p"):
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("rank", range(1, MAX_RANK + 1))
def test_rank_k_keep_p_keeps_trained_diagonal(rank):
    layer = make_layer()
    adapter = weights(layer)
    x = torch.randn(2, 3, IN_FEATURES)
    expected = layer.base_layer(x) + (x @ adapter.lora_A[:rank].T * adapter.p[:rank]) @ adapter.lora_B[:, :rank].T
    with at_rank(rank):
        torch.testing.assert_close(layer(x), expected)


def test_keep_p_at_max_rank_is_training_forward():
    layer = make_layer()
    x = torch.randn(2, IN_FEATURES)
    training = layer(x)
    with at_rank(MAX_RANK):
        torch.testing.assert_close(layer(x), training)


@pytest.mark.parametrize(("method", "expected_scale"), [("lora", 2.0 / 8**0.5), ("dylora", 2.0 / 3**0.5)])
def test_keep_p_scale_for_lora_and_dylora(method, expected_scale):
    spec = AdapterSpec(method, MAX_RANK, TRAIN_RANKS, "sqrt", 2.0, "keep_p")
    assert spec.prefix_scale(3) == pytest.approx(expected_scale)


def test_rank_zero_is_base_layer():
    layer = make_layer()
    x = torch.randn(2, IN_FEATURES)
    with at_rank(0):
        torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_rank_k_computes_on_prefix_slices_only(monkeypatch):
    layer = make_layer()
    shapes = []
    real_linear = F.linear

    def recording_linear(input, weight, bias=None):
        shapes.append(tuple(weight.shape))
        return real_linear(input, weight, bias)

    monkeypatch.setattr(F, "linear", recording_linear)
    with at_rank(3):
        layer.adapters["default"].prefix_delta(torch.randn(2, IN_FEATURES), 3, None)
    assert shapes == [(3, IN_FEATURES), (OUT_FEATURES, 3)]


def test_mixed_ranks_match_rows_run_alone():
    layer = make_layer()
    x = torch.randn(5, 4, IN_FEATURES)
    ranks = [0, 3, 8, 3, 1]
    with at_rank(ranks):
        mixed = layer(x)
    for row, rank in enumerate(ranks):
        with at_rank(rank):
            torch.testing.assert_close(mixed[row], layer(x[row : row + 1])[0])


def test_mixed_adapters_per_row():
    layer = make_layer()
    other = AdapterSpec("lora", 4, (4,), "none", 1.0, "keep_p")
    layer.add_adapter("other", other)
    nn.init.normal_(layer.adapters["other"].lora_B)
    x = torch.randn(2, IN_FEATURES)
    with at_rank([2, 4], adapter=["default", "other"]):
        mixed = layer(x)
    with at_rank(4, adapter="other"):
        torch.testing.assert_close(mixed[1], layer(x[1:])[0])


def test_rank_above_max_is_rejected():
    layer = make_layer()
    with at_rank(MAX_RANK + 1), pytest.raises(ValueError, match=r"rank must be in 0\.\.8 for this adapter, got 9"):
        layer(torch.randn(1, IN_FEATURES))


@pytest.mark.parametrize("rank", [-1, 2.5, True, "4"])
def test_plan_rejects_invalid_rank(rank):
    with pytest.raises(ValueError, match="rank must be an integer >= 0"):
        RankPlan.build(rank)


def test_plan_groups_rows_by_rank():
    plan = RankPlan.build([4, 0, 4, 2])
    groups = {(group.adapter, group.rank): group.rows.tolist() for group in plan.groups}
    assert groups == {("default", 4): [0, 2], ("default", 0): [1], ("default", 2): [3]}


def test_plan_with_one_rank_uses_every_row():
    assert RankPlan.build([3, 3, 3]).groups[0].rows is None


def test_at_rank_is_private_to_each_thread():
    layer = make_layer()
    x = torch.randn(2, 6, IN_FEATURES)
    expected = {}
    for rank in (1, 8):
        with at_rank(rank):
            expected[rank] = layer(x)
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def run(rank):
        try:
            with at_rank(rank):
                barrier.wait()
                for _ in range(50):
                    results[rank] = layer(x)
        except Exception as error:  # surfaced by the assert below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (1, 8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for rank in (1, 8):
        torch.testing.assert_close(results[rank], expected[rank])


def test_training_forward_needs_single_adapter():
    layer = make_layer()
    layer.add_adapter("other", AdapterSpec("lora", 4, (4,), "none", 1.0, "keep_p"))
    with pytest.raises(RuntimeError, match="this layer has 2 adapters"):
        layer(torch.randn(1, IN_FEATURES))


def test_gradients_reach_only_the_served_prefix():
    layer = make_layer()
    with at_rank(2, inference_scaling="drop_p"):
        layer(torch.randn(3, IN_FEATURES)).sum().backward()
    adapter = weights(layer)
    assert adapter.lora_A.grad[:2].abs().sum() > 0
    assert adapter.lora_A.grad[2:].abs().sum() == 0
    assert adapter.lora_B.grad[:, 2:].abs().sum() == 0


def test_inference_weights_follow_in_place_updates():
    layer = make_layer()
    x = torch.randn(2, IN_FEATURES)
    with torch.no_grad(), at_rank(4):
        before = layer(x)
        weights(layer).lora_B.mul_(2.0)
        after = layer(x)
    delta_before = before - layer.base_layer(x)
    torch.testing.assert_close(after - layer.base_layer(x), 2.0 * delta_before)


def test_inference_and_training_paths_agree():
    layer = make_layer()
    x = torch.randn(3, 2, IN_FEATURES)
    for scaling in ("keep_p", "drop_p"):
        with at_rank(5, inference_scaling=scaling):
            trained = layer(x)
            with torch.no_grad():
                served = layer(x)
        torch.testing.assert_close(served, trained)


def test_decode_delta_does_not_depend_on_batch():
    """A one-token row gets the same bfloat16 output alone and among other rows at its rank."""
    layer = make_layer().to(torch.bfloat16)
    x = torch.randn(7, 1, IN_FEATURES, dtype=torch.bfloat16)
    with torch.no_grad(), at_rank(8):
        batched = layer(x)
        for row in range(7):
            assert torch.equal(layer(x[row : row + 1])[0], batched[row])


def test_rows_of_adapter_missing_on_layer_get_base_output():
    layer = make_layer()
    x = torch.randn(2, IN_FEATURES)
    with torch.no_grad(), at_rank([4, 4], adapter=["default", "elsewhere"]):
        mixed = layer(x)
    torch.testing.assert_close(mixed[1], layer.base_layer(x[1:])[0])


def test_per_row_ranks_must_match_batch():
    layer = make_layer()
    with (
        at_rank([4, 8]),
        pytest.raises(ValueError, match="at_rank was given 2 per-row ranks or adapters, but the batch has 3 rows"),
    ):
        layer(torch.randn(3, IN_FEATURES))


def test_decode_row_same_bits_alone_and_in_mixed_batch():
    layer = make_layer().to(torch.bfloat16)
    x = torch.randn(6, 1, IN_FEATURES, dtype=torch.bfloat16)
    ranks = [8, 3, 8, 0, 5, 3]
    with torch.no_grad():
        with at_rank(ranks):
            mixed = layer(x)
        for row, rank in enumerate(ranks):
            with at_rank(rank):
                assert torch.equal(layer(x[row : row + 1])[0], mixed[row])
