"""`matlora train`, `eval`, `export` and `plot` end to end on a tiny model."""

import json
import subprocess
import sys

import pytest

from matlora.cli import main
from matlora.config import AdapterConfig

METHODS = ["matryoshka", "dylora", "lora", "nested"]


def train(tiny_model_dir, addition_task, out, method="matryoshka", *extra):
    argv = [
        "train",
        "--base",
        str(tiny_model_dir),
        "--data",
        str(addition_task),
        "--out",
        str(out),
        "--method",
        method,
        "--rank",
        "8",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--target-modules",
        "q_proj,v_proj",
        "--dtype",
        "float32",
        *extra,
    ]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def trained(tiny_model_dir, addition_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "adapter"
    return train(tiny_model_dir, addition_task, out, "matryoshka", "--grad-accum", "2", "--seed", "3")


@pytest.mark.parametrize("method", METHODS)
def test_train_writes_adapter_folder(tiny_model_dir, addition_task, tmp_path, method):
    out = train(tiny_model_dir, addition_task, tmp_path / method, method)
    assert {"adapter_config.json", "adapter_model.safetensors", "split.json", "training.json"} <= {
        path.name for path in out.iterdir()
    }
    config = AdapterConfig.load(out)
    assert (config.method, config.r, config.train_ranks) == (method, 8, [1, 2, 4, 8])
    assert config.base_model_fingerprint["config_sha256"]
    log = json.loads((out / "training.json").read_text())
    assert log["global_steps"] == 3


def test_split_beside_adapter_holds_out_a_fifth(trained):
    split = json.loads((trained / "split.json").read_text())
    assert (len(split["train"]), len(split["eval"]), split["seed"]) == (80, 20, 3)
    assert not set(split["train"]) & set(split["eval"])


def test_eval_report(trained, addition_task, tmp_path, capsys):
    report_path, plot_path = tmp_path / "report.json", tmp_path / "curve.png"
    argv = [
        "eval",
        "--adapter",
        str(trained),
        "--data",
        str(addition_task),
        "--ranks",
        "1,2,8",
        "--limit",
        "6",
        "--dtype",
        "float32",
        "--out",
        str(report_path),
        "--plot",
        str(plot_path),
    ]
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["ranks"] == [0, 1, 2, 8]
    assert len(report["accuracy"]) == len(report["loss"]) == 4
    assert report["examples"] == 6
    assert report["split"] == "eval"
    assert report["inference_scaling"] == "keep_p"
    assert {"aurac", "aurac_log2"} <= set(report)
    assert plot_path.stat().st_size > 0
    table = capsys.readouterr().out
    assert "| 0 (base) |" in table
    assert "AURAC" in table


def test_eval_both_inference_scalings_differ(trained, addition_task, tmp_path):
    losses = {}
    for scaling in ("keep_p", "drop_p"):
        path = tmp_path / f"{scaling}.json"
        argv = [
            "eval",
            "--adapter",
            str(trained),
            "--data",
            str(addition_task),
            "--ranks",
            "8",
            "--limit",
            "4",
            "--dtype",
            "float32",
            "--inference-scaling",
            scaling,
            "--out",
            str(path),
        ]
        assert main(argv) == 0
        report = json.loads(path.read_text())
        assert report["inference_scaling"] == scaling
        losses[scaling] = report["loss"]
    assert losses["keep_p"][0] == losses["drop_p"][0]  # rank 0 is the base model either way
    assert losses["keep_p"][1] != losses["drop_p"][1]


def test_eval_rank_above_max_is_an_error(trained, addition_task, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["eval", "--adapter", str(trained), "--data", str(addition_task), "--ranks", "4,32"])
    assert "--ranks must lie in 0..8 for this adapter, got [32]" in str(caught.value)


def test_export_and_plot(trained, tmp_path, capsys):
    assert main(["export", "--adapter", str(trained), "--rank", "4", "--out", str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4

    report = {
        "label": "a",
        "ranks": [0, 1, 2],
        "accuracy": [0.1, 0.5, 0.7],
        "loss": [1, 1, 1],
        "aurac": 0.6,
        "aurac_log2": 0.6,
        "examples": 3,
    }
    (tmp_path / "a.json").write_text(json.dumps(report))
    (tmp_path / "b.json").write_text(json.dumps({**report, "label": "b"}))
    assert main(["plot", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 0


def test_export_rank_out_of_range_is_one_line_error(trained, tmp_path):
    with pytest.raises(SystemExit) as caught:
        main(["export", "--adapter", str(trained), "--rank", "9", "--out", str(tmp_path / "peft")])
    assert "rank must be an integer in 1..8 to export, got 9" in str(caught.value)


def test_unknown_target_module_is_clear_error(tiny_model_dir, addition_task, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(
            [
                "train",
                "--base",
                str(tiny_model_dir),
                "--data",
                str(addition_task),
                "--out",
                str(tmp_path / "x"),
                "--target-modules",
                "q_proj,attn",
                "--max-steps",
                "1",
            ]
        )
    assert caught.value.code == 2
    assert "target module(s) 'attn' match no linear layer" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "matlora", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "--train-ranks" in result.stdout


def test_train_refuses_to_overwrite_adapter(trained, tiny_model_dir, addition_task, capsys):
    with pytest.raises(SystemExit) as caught:
        train(tiny_model_dir, addition_task, trained)
    assert caught.value.code == 2
    assert "already holds an adapter; pass --overwrite to replace it" in capsys.readouterr().err


def test_train_checks_options_before_loading(addition_task, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        main([
            "train", "--base", str(tmp_path / "no-such-model"), "--data", str(addition_task), "--out", str(out),
            "--lr", "-1", "--eval-fraction", "1.5",
        ])  # fmt: skip
    error = capsys.readouterr().err
    assert "learning_rate must be > 0, got -1.0" in error
    assert "eval_fraction must be in [0, 1), got 1.5" in error
    assert not out.exists()
