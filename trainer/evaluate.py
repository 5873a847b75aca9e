"""Evaluate an adapter at every requested rank: exact-match accuracy, loss and AURAC.

Accuracy is greedy generation compared with the reference completion (both stripped).
Loss is the mean cross-entropy per completion token, EOS included, with teacher forcing.
Rank 0 is the base model alone and is always evaluated.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from matlora.layer import DEFAULT_ADAPTER, at_rank
from trainer.data import IGNORE_INDEX, Example, PromptFormatter, collate_right_padded
from trainer.metrics import aurac

logger = logging.getLogger(__name__)

SAMPLES_PER_RANK = 3


@torch.no_grad()
def generate_completions(
    model,
    formatter: PromptFormatter,
    examples: Sequence[Example],
    rank: int,
    adapter: str = DEFAULT_ADAPTER,
    inference_scaling: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
) -> list[str]:
    """Return the greedy completion of each example at ``rank``, in input order."""
    tokenizer = formatter.tokenizer
    prompts = [formatter.prompt_ids(example.prompt) for example in examples]
    # Batches of similar length waste less compute on padding.
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    completions: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device

    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        padded = tokenizer.pad({"input_ids": [prompts[index] for index in batch]}, return_tensors="pt")
        input_ids = padded["input_ids"].to(device)
        with at_rank(rank, adapter, inference_scaling):
            output = model.generate(
                input_ids=input_ids,
                attention_mask=padded["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = output[:, input_ids.shape[1] :]
        for index, tokens in zip(batch, new_tokens):
            completions[index] = tokenizer.decode(tokens, skip_special_tokens=True)
    return completions


@torch.no_grad()
def completion_loss(
    model,
    formatter: PromptFormatter,
    examples: Sequence[Example],
    rank: int,
    adapter: str = DEFAULT_ADAPTER,
    inference_scaling: str | None = None,
    batch_size: int = 16,
) -> float:
    """Return the mean cross-entropy per completion token at ``rank``."""
    device = next(model.parameters()).device
    pad_token_id = formatter.tokenizer.pad_token_id
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        features = [formatter.training_features(example) for example in examples[start : start + batch_size]]
        batch = {key: value.to(device) for key, value in collate_right_padded(features, pad_token_id).items()}
        with at_rank(rank, adapter, inference_scaling):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate_ranks(
    model,
    formatter: PromptFormatter,
    examples: Sequence[Example],
    ranks: Sequence[int],
    adapter: str = DEFAULT_ADAPTER,
    inference_scaling: str | None = None,
    batch_size: int = 32,
    with_loss: bool = True,
    include_base: bool = True,
) -> dict:
    """Evaluate every rank and return the report's measured part.

    Rank 0 (the base model) is added when missing unless ``include_base`` is false, for
    callers that evaluate the base model once for many adapters. Without ``with_loss`` the
    teacher-forced loss pass is skipped and every rank's loss is None.
    """
    ranks = sorted(set(ranks) | {0}) if include_base else sorted(set(ranks))
    targets = [example.completion.strip() for example in examples]
    max_new_tokens = max(len(formatter.completion_ids(example.completion)) for example in examples) + 2
    accuracy, losses, samples = [], [], {}
    for rank in ranks:
        started = time.perf_counter()
        outputs = generate_completions(
            model, formatter, examples, rank, adapter, inference_scaling, batch_size, max_new_tokens
        )
        correct = sum(output.strip() == target for output, target in zip(outputs, targets))
        accuracy.append(correct / len(examples))
        loss = None
        if with_loss:
            loss = completion_loss(model, formatter, examples, rank, adapter, inference_scaling, batch_size)
        losses.append(loss)
        samples[str(rank)] = [
            {"prompt": example.prompt, "target": target, "output": output}
            for example, target, output in zip(examples[:SAMPLES_PER_RANK], targets, outputs)
        ]
        logger.info(
            "rank %d: accuracy %.3f, loss %s (%.1f s)",
            rank,
            accuracy[-1],
            "not computed" if loss is None else f"{loss:.4f}",
            time.perf_counter() - started,
        )
    adapter_ranks = [rank for rank in ranks if rank >= 1]
    adapter_accuracy = [acc for rank, acc in zip(ranks, accuracy) if rank >= 1]
    has_curve = len(adapter_ranks) >= 2
    return {
        "ranks": ranks,
        "accuracy": accuracy,
        "loss": losses,
        "aurac": aurac(adapter_ranks, adapter_accuracy) if has_curve else None,
        "aurac_log2": aurac(adapter_ranks, adapter_accuracy, log2=True) if has_curve else None,
        "examples": len(examples),
        "samples": samples,
    }


def markdown_table(report: dict) -> str:
    """Render a report as a Markdown table: one row per rank, then the AURAC lines."""
    lines = [
        f"**{report.get('label', 'adapter')}** ({report.get('examples')} examples)",
        "",
        "| rank | accuracy | loss |",
        "|---:|---:|---:|",
    ]
    for rank, acc, loss in zip(report["ranks"], report["accuracy"], report["loss"]):
        name = "0 (base)" if rank == 0 else str(rank)
        loss_text = "-" if loss is None else f"{loss:.4f}"
        lines.append(f"| {name} | {acc:.3f} | {loss_text} |")
    if report.get("aurac") is not None:
        lines += ["", f"AURAC {report['aurac']:.3f} (over rank), {report['aurac_log2']:.3f} (over log2 rank)"]
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def plot_reports(reports: Sequence[dict], path: str | Path, title: str = "Accuracy by rank") -> Path:
    """Overlay the rank-accuracy curves of several reports on a log2 rank axis.

    Rank 0 cannot sit on a log axis, so each report's base-model accuracy is drawn as a
    dotted horizontal line in the colour of its curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for report in reports:
        points = [(rank, acc) for rank, acc in zip(report["ranks"], report["accuracy"]) if rank >= 1]
        label = report.get("label", "adapter")
        if report.get("aurac") is not None:
            label += f" (AURAC {report['aurac']:.2f})"
        (line,) = axis.plot([r for r, _ in points], [a for _, a in points], marker="o", label=label)
        if 0 in report["ranks"]:
            axis.axhline(report["accuracy"][report["ranks"].index(0)], color=line.get_color(), linestyle=":")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("rank (log2 axis); dotted: base model")
    axis.set_ylabel("exact-match accuracy")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


@torch.no_grad()
def update_norms(
    model, ranks: Sequence[int], adapter: str = DEFAULT_ADAPTER, inference_scaling: str | None = None
) -> list[float]:
    """Return, per rank, the Frobenius norm of the weight update served at that rank over all layers.

    The update of a layer at rank k is ``B[:, :k] diag(c_k) A[:k]``. Its squared norm is
    ``sum_ij c_i c_j (B^T B)_ij (A A^T)_ij`` over i, j < k, so no out x in matrix is built.
    """
    from matlora.model import iter_adapter_weights

    squared = [0.0] * len(ranks)
    for _, weights in iter_adapter_weights(model, adapter):
        lora_a, lora_b = weights.lora_A.double(), weights.lora_B.double()
        gram = (lora_b.T @ lora_b) * (lora_a @ lora_a.T)  # (max_rank, max_rank)
        for position, rank in enumerate(ranks):
            if rank == 0:
                continue
            scale = torch.as_tensor(weights.spec.prefix_scale(rank, inference_scaling), dtype=torch.float64)
            scale = scale.expand(rank) if scale.dim() == 0 else scale
            squared[position] += float(scale @ gram[:rank, :rank] @ scale)
    return [value**0.5 for value in squared]
