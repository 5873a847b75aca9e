"""`evaluate_ranks` without the loss pass or the base model, and `matlora eval --no-loss`."""

import json

import matlora
from matlora.base_model import load_base
from matlora.cli import main
from trainer.data import Example, PromptFormatter
from trainer.evaluate import evaluate_ranks

EXAMPLES = [Example("What is 1 plus 2?", "3"), Example("What is 4 plus 4?", "8")]


def tiny_model_with_adapter(tiny_model_dir):
    model, tokenizer = load_base(str(tiny_model_dir), dtype="float32", device="cpu")
    matlora.inject_adapter(model, matlora.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return model, PromptFormatter(tokenizer)


def test_evaluate_ranks_without_loss(tiny_model_dir):
    model, formatter = tiny_model_with_adapter(tiny_model_dir)

    measured = evaluate_ranks(model, formatter, EXAMPLES, [1, 4], with_loss=False)

    assert measured["ranks"] == [0, 1, 4]
    assert measured["loss"] == [None, None, None]
    assert len(measured["accuracy"]) == 3


def test_evaluate_ranks_without_base(tiny_model_dir):
    model, formatter = tiny_model_with_adapter(tiny_model_dir)

    measured = evaluate_ranks(model, formatter, EXAMPLES, [4, 1], include_base=False)

    assert measured["ranks"] == [1, 4]
    assert all(isinstance(loss, float) for loss in measured["loss"])
    assert measured["aurac"] is not None


def test_eval_cli_no_loss(tiny_model_dir, addition_task, tmp_path):
    adapter, report = tmp_path / "adapter", tmp_path / "report.json"
    train = ["train", "--base", str(tiny_model_dir), "--data", str(addition_task), "--out", str(adapter)]
    train += [
        "--rank",
        "2",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--target-modules",
        "q_proj",
        "--dtype",
        "float32",
    ]
    assert main(train) == 0

    evaluate = ["eval", "--adapter", str(adapter), "--data", str(addition_task), "--limit", "2", "--no-loss"]
    assert main([*evaluate, "--dtype", "float32", "--out", str(report)]) == 0

    body = json.loads(report.read_text())
    assert body["ranks"] == [0, 1, 2]
    assert body["loss"] == [None, None, None]
    assert len(body["accuracy"]) == 3
