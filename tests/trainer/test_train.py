"""The training methods on a tiny model: DyLoRA's per-step rank and nested's summed loss."""

import pytest
import torch
from transformers import TrainingArguments

from matlora import AdapterConfig, at_rank, inject_adapter
from matlora.base_model import load_base
from matlora.layer import active_plan
from trainer.data import CompletionDataset, PromptFormatter, collate_right_padded, read_examples
from trainer.train import HierarchicalTrainer

TRAIN_RANKS = [1, 2, 4, 8]


def build_trainer(tiny_model_dir, addition_task, tmp_path, method, grad_accum=1, max_steps=4):
    model, tokenizer = load_base(str(tiny_model_dir), dtype="float32")
    config = AdapterConfig(r=8, target_modules=["q_proj", "v_proj"], method=method, train_ranks=TRAIN_RANKS)
    inject_adapter(model, config)
    dataset = CompletionDataset(read_examples(addition_task)[:32], PromptFormatter(tokenizer))
    args = TrainingArguments(
        output_dir=str(tmp_path / "checkpoints"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_accum,
        max_steps=max_steps,
        learning_rate=1e-2,
        seed=7,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    return HierarchicalTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=lambda features: collate_right_padded(features, tokenizer.pad_token_id),
        adapter_config=config,
    )


def test_dylora_rank_is_resampled_per_optimizer_step(tiny_model_dir, addition_task, tmp_path):
    # 32 examples in micro-batches of 4 make 4 optimizer steps of 2 micro-batches per epoch.
    trainer = build_trainer(tiny_model_dir, addition_task, tmp_path, "dylora", grad_accum=2, max_steps=8)
    seen = []

    def record(module, inputs):
        plan = active_plan()
        seen.append((trainer.state.global_step, plan.groups[0].rank, plan.inference_scaling))

    trainer.model.register_forward_pre_hook(record)
    trainer.train()

    assert len(seen) == 8 * 2
    for step in range(8):
        micro_batches = seen[step * 2 : step * 2 + 2]
        assert micro_batches == [(step, trainer.dylora_rank(step), "drop_p")] * 2
    assert len({rank for _, rank, _ in seen}) >= 2


def test_dylora_rank_depends_only_on_seed_and_step(tiny_model_dir, addition_task, tmp_path):
    trainer = build_trainer(tiny_model_dir, addition_task, tmp_path, "dylora")
    ranks = [trainer.dylora_rank(step) for step in range(40)]
    assert ranks == [trainer.dylora_rank(step) for step in range(40)]
    assert set(ranks) == set(TRAIN_RANKS)


def test_nested_loss_is_sum_over_train_ranks(tiny_model_dir, addition_task, tmp_path):
    trainer = build_trainer(tiny_model_dir, addition_task, tmp_path, "nested")
    model = trainer.model
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    batch = collate_right_padded([trainer.train_dataset[i] for i in range(4)], 0)

    nested = trainer.compute_loss(model, dict(batch))
    expected = 0.0
    for rank in TRAIN_RANKS:
        with at_rank(rank, inference_scaling="drop_p"):
            expected += model(**batch).loss
    torch.testing.assert_close(nested, expected)


@pytest.mark.parametrize("method", ["matryoshka", "lora"])
def test_full_rank_methods_train_the_p_forward(tiny_model_dir, addition_task, tmp_path, method):
    trainer = build_trainer(tiny_model_dir, addition_task, tmp_path, method)
    plans = []
    trainer.model.register_forward_pre_hook(lambda module, inputs: plans.append(active_plan()))
    trainer.train()
    assert plans == [None] * 4
