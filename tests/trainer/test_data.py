"""Data files, the seeded split and the prompt/completion tokenisation."""

import json

import pytest

from matlora.testing import build_tiny_tokenizer
from trainer.data import (
    IGNORE_INDEX,
    DataFormatError,
    Example,
    PromptFormatter,
    Split,
    collate_right_padded,
    read_examples,
    select_split,
    split_examples,
)


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"prompt": f"What is {i} plus 1?", "completion": str(i + 1)}) for i in range(10)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_bigbench_task(addition_task):
    examples = read_examples(addition_task)
    assert len(examples) == 100
    assert all(example.prompt.startswith("What is ") for example in examples)


def test_read_jsonl(jsonl_file):
    assert read_examples(jsonl_file)[3] == Example("What is 3 plus 1?", "4")


def test_read_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}]))
    assert read_examples(path) == [Example("a", "b")]


def test_bad_record_names_fields(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(
        DataFormatError, match=r"example 0 needs 'prompt' and 'completion'.*got \['answer', 'question'\]"
    ):
        read_examples(path)


def test_bad_json_line_names_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(DataFormatError, match=r"data\.jsonl:2 is not valid JSON"):
        read_examples(path)


def test_split_is_deterministic_and_disjoint(jsonl_file):
    _, first = split_examples([jsonl_file], seed=3, eval_fraction=0.3)
    _, second = split_examples([jsonl_file], seed=3, eval_fraction=0.3)
    _, other_seed = split_examples([jsonl_file], seed=4, eval_fraction=0.3)
    assert (first.train, first.eval) == (second.train, second.eval)
    assert first.eval != other_seed.eval
    assert len(first.eval) == 3
    assert sorted(first.train + first.eval) == list(range(10))


def test_split_round_trip_and_selection(tmp_path, jsonl_file):
    examples, split = split_examples([jsonl_file], seed=0, eval_fraction=0.2)
    split.save(tmp_path)
    loaded = Split.load(tmp_path)
    assert loaded == split
    held_out = select_split([jsonl_file], loaded, "eval")
    assert held_out == [examples[index] for index in split.eval]


def test_select_split_rejects_other_files(tmp_path, jsonl_file, addition_task):
    _, split = split_examples([jsonl_file], seed=0, eval_fraction=0.2)
    with pytest.raises(ValueError, match="the data files differ from those the adapter's split was made from"):
        select_split([addition_task], split, "eval")


def test_select_split_without_saved_split(jsonl_file):
    with pytest.raises(ValueError, match="no split.json beside the adapter; pass --split all"):
        select_split([jsonl_file], None, "eval")


def test_chat_template_and_label_mask():
    tokenizer = build_tiny_tokenizer()
    formatter = PromptFormatter(tokenizer)
    features = formatter.training_features(Example("What is 1 plus 2?", "3"))
    prompt_text = "<|im_start|>user\nWhat is 1 plus 2?<|im_end|>\n<|im_start|>assistant\n"
    prompt_length = len(tokenizer(prompt_text, add_special_tokens=False).input_ids)
    assert tokenizer.decode(features["input_ids"]) == prompt_text + "3<|im_end|>"
    assert features["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert features["labels"][prompt_length:] == [tokenizer.convert_tokens_to_ids("3"), tokenizer.eos_token_id]


def test_collate_pads_right_and_masks_padding():
    batch = collate_right_padded(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
