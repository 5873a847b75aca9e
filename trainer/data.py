"""Prompt/completion data: reading, a seeded train/eval split, and tokenisation.

Accepted files:
- JSONL, one ``{"prompt": ..., "completion": ...}`` object per line;
- JSON, a list of such objects;
- a BIG-bench ``task.json``, whose ``examples`` carry ``input`` and ``target``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SPLIT_NAME = "split.json"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class Split:
    """A deterministic train/eval split over the concatenation of the data files."""

    seed: int
    eval_fraction: float
    sources: list[dict]
    train: list[int]
    eval: list[int]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SPLIT_NAME
        body = {
            "seed": self.seed,
            "eval_fraction": self.eval_fraction,
            "sources": self.sources,
            "train": self.train,
            "eval": self.eval,
        }
        path.write_text(json.dumps(body) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Split | None:
        """Return the split saved beside an adapter, or None when there is none."""
        path = Path(directory) / SPLIT_NAME
        if not path.is_file():
            return None
        body = json.loads(path.read_text())
        return cls(body["seed"], body["eval_fraction"], body["sources"], body["train"], body["eval"])


class DataFormatError(ValueError):
    """A data file that is not prompt/completion JSON(L) or a BIG-bench task."""


def read_examples(path: str | Path) -> list[Example]:
    """Read every example of one data file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [_parse_line(path, number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path} is not valid JSON: {error}") from error
        records = body["examples"] if isinstance(body, dict) and "examples" in body else body
    if not isinstance(records, list) or not records:
        raise DataFormatError(f"{path} holds no examples; expected a list of prompt/completion objects")
    return [_to_example(path, index, record) for index, record in enumerate(records)]


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def split_examples(paths: Sequence[str | Path], seed: int, eval_fraction: float) -> tuple[list[Example], Split]:
    """Read the files and split their examples by ``seed``; the same inputs give the same split."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    examples: list[Example] = []
    sources = []
    for path in paths:
        file_examples = read_examples(path)
        sources.append({"path": str(path), "sha256": file_sha256(path), "examples": len(file_examples)})
        examples.extend(file_examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    eval_count = round(len(examples) * eval_fraction)
    split = Split(seed, eval_fraction, sources, sorted(order[eval_count:]), sorted(order[:eval_count]))
    return examples, split


def select_split(paths: Sequence[str | Path], split: Split | None, part: str) -> list[Example]:
    """Return the ``part`` ("train", "eval" or "all") examples of the data files.

    Raises:
        ValueError: a part other than "all" was asked for but there is no saved split,
            or the files differ from those the split was made from.
    """
    examples = [example for path in paths for example in read_examples(path)]
    if part == "all":
        return examples
    if part not in ("train", "eval"):
        raise ValueError(f"split must be train, eval or all, got {part!r}")
    if split is None:
        raise ValueError(f"no {SPLIT_NAME} beside the adapter; pass --split all to evaluate every example")
    hashes = [file_sha256(path) for path in paths]
    if hashes != [source["sha256"] for source in split.sources]:
        trained_on = ", ".join(source["path"] for source in split.sources)
        raise ValueError(
            f"the data files differ from those the adapter's split was made from ({trained_on}); "
            f"pass the same files, or --split all"
        )
    return [examples[index] for index in getattr(split, part)]


class PromptFormatter:
    """Turn examples into token ids: the chat template when the tokenizer has one."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def prompt_text(self, prompt: str) -> str:
        if not self.uses_chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, prompt: str) -> list[int]:
        # The chat template writes its own special tokens.
        add_special = not self.uses_chat_template
        return self.tokenizer(self.prompt_text(prompt), add_special_tokens=add_special).input_ids

    def completion_ids(self, completion: str) -> list[int]:
        """Completion tokens followed by EOS, so the model learns where to stop."""
        ids = self.tokenizer(completion, add_special_tokens=False).input_ids
        return ids + [self.tokenizer.eos_token_id]

    def training_features(self, example: Example) -> dict[str, list[int]]:
        """input_ids and labels, with the prompt masked out of the loss."""
        prompt = self.prompt_ids(example.prompt)
        completion = self.completion_ids(example.completion)
        return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


class CompletionDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[Example], formatter: PromptFormatter) -> None:
        self.features = [formatter.training_features(example) for example in examples]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


def collate_right_padded(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a training batch on the right; padded label positions are ignored by the loss."""
    length = max(len(feature["input_ids"]) for feature in features)
    input_ids = torch.full((len(features), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), length), dtype=torch.long)
    for row, feature in enumerate(features):
        size = len(feature["input_ids"])
        input_ids[row, :size] = torch.tensor(feature["input_ids"])
        labels[row, :size] = torch.tensor(feature["labels"])
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _parse_line(path: Path, number: int, line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}:{number} is not valid JSON: {error}") from error


def _to_example(path: Path, index: int, record: object) -> Example:
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
    elif isinstance(record, dict) and "input" in record and "target" in record:
        prompt, completion = record["input"], record["target"]
        # BIG-bench allows a list of acceptable targets; train on the first.
        if isinstance(completion, list):
            completion = completion[0] if completion else ""
    else:
        raise DataFormatError(
            f"{path}: example {index} needs 'prompt' and 'completion' (or BIG-bench 'input' and 'target'), "
            f"got {sorted(record) if isinstance(record, dict) else type(record).__name__}"
        )
    if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt.strip():
        raise DataFormatError(f"{path}: example {index} needs a non-empty string prompt and a string completion")
    return Example(prompt, completion)
