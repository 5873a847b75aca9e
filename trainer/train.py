"""Train a hierarchical LoRA adapter with the Hugging Face Trainer.

The Trainer brings the optimizer, the schedule, gradient accumulation, mixed precision,
checkpoints, progress bars and multi-GPU launches (``accelerate launch -m matlora train``).
This module adds what the methods need on top:

- ``lora`` and ``matryoshka`` train the full-rank forward with their fixed p;
- ``dylora`` samples one rank b from ``train_ranks`` per optimizer step, the same for every
  layer, every micro-batch of the step and every process, and trains the rank-b prefix
  scaled by s(b);
- ``nested`` sums the loss at every training rank r, each scaled by s(r): one forward and
  backward per training rank, the objective that matryoshka approximates in one pass.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from matlora.base_model import load_base, parse_dtype
from matlora.config import CONFIG_NAME, AdapterConfig, AdapterConfigError
from matlora.layer import DEFAULT_ADAPTER, at_rank
from matlora.model import inject_adapter
from matlora.serialization import base_model_fingerprint, save_adapter
from trainer.data import CompletionDataset, PromptFormatter, collate_right_padded, split_examples

logger = logging.getLogger(__name__)

TRAINING_LOG_NAME = "training.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainOptions:
    """Everything one training run needs; the CLI fills it from its flags."""

    data: list[str]
    out: str
    base: str = "smollm2-135m"
    method: str = "matryoshka"
    rank: int = 16
    train_ranks: list[int] = field(default_factory=list)
    scaling: str = "sqrt"
    lora_alpha: float = 1.0
    lora_dropout: float = 0.0
    inference_scaling: str | None = None  # None: the one that serves what the method trained
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    learning_rate: float = 1e-3
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    epochs: float = 1.0
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    seed: int = 0
    eval_fraction: float = 0.2
    dtype: str = "auto"
    save_dtype: str = "float32"
    save_steps: int = 0
    logging_steps: int = 10
    overwrite: bool = False

    def validate(self) -> None:
        """Raise ValueError listing every invalid option, before anything is loaded or written."""
        problems = []
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and not self.epochs > 0:
            problems.append(
                f"give max_steps > 0 or epochs > 0, got max_steps {self.max_steps} and epochs {self.epochs}"
            )
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.eval_fraction < 1:
            problems.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.save_steps < 0:
            problems.append(f"save_steps must be >= 0, got {self.save_steps}")
        if (Path(self.out) / CONFIG_NAME).exists() and not self.overwrite:
            problems.append(
                f"{self.out} already holds an adapter; pass --overwrite to replace it, or pick another --out"
            )
        try:
            self.adapter_config(fingerprint={})
        except AdapterConfigError as error:
            problems.extend(line.strip("- ") for line in str(error).splitlines()[1:])
        if problems:
            raise ValueError("invalid training options:\n  - " + "\n  - ".join(problems))

    def adapter_config(self, fingerprint: dict[str, str]) -> AdapterConfig:
        return AdapterConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            target_modules=list(self.target_modules),
            method=self.method,
            train_ranks=list(self.train_ranks),
            scaling=self.scaling,
            inference_scaling=self.inference_scaling,
            lora_dropout=self.lora_dropout,
            base_model_name_or_path=self.base,
            base_model_fingerprint=fingerprint,
        )


class HierarchicalTrainer(Trainer):
    """A Trainer whose loss follows the adapter's training method."""

    def __init__(self, *args, adapter_config: AdapterConfig, adapter_name: str = DEFAULT_ADAPTER, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter_config = adapter_config
        self.adapter_name = adapter_name

    def dylora_rank(self, step: int) -> int:
        """The DyLoRA rank b of optimizer step ``step``, a pure function of the seed and the step.

        Every micro-batch of a gradient-accumulation step sees the same ``global_step``, and
        so does every process of a distributed run, so all of them train the same b.
        """
        return random.Random(self.args.seed * 1_000_003 + step).choice(self.adapter_config.train_ranks)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        method = self.adapter_config.method
        if method == "dylora":
            rank = self.dylora_rank(self.state.global_step)
            with at_rank(rank, self.adapter_name, inference_scaling="drop_p"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if method == "nested":
            total = None
            for rank in self.adapter_config.train_ranks:
                with at_rank(rank, self.adapter_name, inference_scaling="drop_p"):
                    loss = super().compute_loss(model, inputs, False, num_items_in_batch)
                total = loss if total is None else total + loss
            return (total, None) if return_outputs else total
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Checkpoints hold the adapter only; the frozen base model is never written again.
        output_dir = output_dir or self.args.output_dir
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir, self.adapter_name)


def run_training(options: TrainOptions) -> Path:
    """Train an adapter, save it with its split and training log in ``options.out``, return the folder."""
    started = time.perf_counter()
    options.validate()
    # Reading and splitting the data is cheap, so bad files fail before the model loads.
    examples, split = split_examples(options.data, options.seed, options.eval_fraction)
    out = Path(options.out)
    torch.manual_seed(options.seed)

    model, tokenizer = load_base(options.base, dtype=options.dtype)
    model.config.use_cache = False
    config = options.adapter_config(base_model_fingerprint(model))
    options.train_ranks = list(config.train_ranks)
    # Adapter weights stay in float32 whatever the base dtype, as PEFT does by default.
    inject_adapter(model, config, DEFAULT_ADAPTER, dtype=torch.float32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "training %s adapter: rank %d, train ranks %s, scaling %s, %d trainable parameters",
        config.method,
        config.r,
        config.train_ranks,
        config.scaling,
        trainable,
    )

    out.mkdir(parents=True, exist_ok=True)
    split.save(out)
    formatter = PromptFormatter(tokenizer)
    train_set = CompletionDataset([examples[index] for index in split.train], formatter)
    logger.info("data: %d training and %d held-out examples", len(split.train), len(split.eval))

    trainer = HierarchicalTrainer(
        model=model,
        args=_training_arguments(options, out),
        train_dataset=train_set,
        data_collator=lambda features: collate_right_padded(features, tokenizer.pad_token_id),
        adapter_config=config,
    )
    result = trainer.train()

    save_adapter(model, out, DEFAULT_ADAPTER, dtype=parse_dtype(options.save_dtype, model.device))
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    wall_seconds = time.perf_counter() - started
    _write_training_log(out, options, trainer, result.training_loss, wall_seconds, model.dtype)
    logger.info("saved the adapter to %s (%.0f s in all)", out, wall_seconds)
    return out


def _training_arguments(options: TrainOptions, out: Path) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=options.learning_rate,
        weight_decay=options.weight_decay,
        lr_scheduler_type=options.lr_scheduler,
        warmup_steps=options.warmup_ratio,
        max_steps=options.max_steps,
        num_train_epochs=options.epochs,
        seed=options.seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        logging_steps=options.logging_steps,
        save_strategy="steps" if options.save_steps > 0 else "no",
        save_steps=options.save_steps or 500,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
    )


def _write_training_log(
    out: Path, options: TrainOptions, trainer: Trainer, loss: float, wall_seconds: float, dtype: torch.dtype
) -> None:
    body = {
        "options": asdict(options),
        "base_dtype": str(dtype).removeprefix("torch."),
        "final_training_loss": loss,
        "global_steps": trainer.state.global_step,
        "wall_seconds": round(wall_seconds, 1),
        "log_history": trainer.state.log_history,
    }
    (out / TRAINING_LOG_NAME).write_text(json.dumps(body, indent=2) + "\n")
