"""Tests of the quality benchmark: learning-rate choice, the summary, the verdict, and a tiny run end to end."""

from __future__ import annotations

import json

import pytest

from bench import quality
from bench.quality import QualityConfig, Variant
from trainer.metrics import aurac

CONFIG = QualityConfig(
    max_rank=4,
    train_ranks=(1, 2, 4),
    learning_rates=(1e-3, 1e-2),
    seeds=(0, 1),
    envelope_ranks=(1,),
    methods=("matryoshka", "dylora", "lora"),
)


def evaluation(accuracy: list[float], ranks: list[int] | None = None, seconds: float = 1.0) -> dict:
    ranks = ranks or [1, 2, 4]
    curve = len(ranks) > 1
    return {
        "ranks": ranks,
        "accuracy": accuracy,
        "aurac": aurac(ranks, accuracy) if curve else None,
        "aurac_log2": aurac(ranks, accuracy, log2=True) if curve else None,
        "examples": 200,
        "seconds": seconds,
    }


def test_choose_learning_rate_best_score():
    assert quality.choose_learning_rate({1e-3: 0.5, 3e-3: 0.7, 1e-2: 0.6}) == 3e-3


def test_choose_learning_rate_tie_smaller():
    assert quality.choose_learning_rate({1e-2: 0.7, 1e-3: 0.7}) == 1e-3


def test_variants_of_config():
    labels = [variant.label for variant in quality.variants(CONFIG)]

    assert labels == ["matryoshka (drop_p)", "matryoshka (keep_p)", "dylora", "lora", "lora r=1 (envelope)"]


def test_config_rejects_envelope_rank_at_max_rank():
    with pytest.raises(ValueError, match=r"envelope_ranks must lie in 1\.\.3, got \[4\]"):
        QualityConfig(max_rank=4, train_ranks=(1, 2, 4), envelope_ranks=(4,))


def test_train_command_has_run_settings(tmp_path):
    benchmark = quality.QualityBenchmark(CONFIG, tmp_path, "cpu")
    spec = benchmark._run_spec(quality.Run("lora", 1, 1e-3, 0))

    command = quality.train_command(spec, tmp_path / "run")

    assert command[1:4] == ["-m", "matlora", "train"]
    assert command[command.index("--train-ranks") + 1] == "1"
    assert command[command.index("--lr") + 1] == "0.001"
    assert command[command.index("--eval-fraction") + 1] == "0.2"


def sweep_evaluations() -> tuple[dict, dict]:
    """Evaluations of CONFIG where lr 1e-2 wins for every variant but matryoshka (keep_p)."""
    curves = {
        "matryoshka (drop_p)": {1e-3: [0.1, 0.2, 0.3], 1e-2: [0.5, 0.6, 0.8]},
        "matryoshka (keep_p)": {1e-3: [0.6, 0.7, 0.9], 1e-2: [0.5, 0.6, 0.8]},
        "dylora": {1e-3: [0.3, 0.4, 0.5], 1e-2: [0.4, 0.5, 0.7]},
        "lora": {1e-3: [0.0, 0.2, 0.6], 1e-2: [0.1, 0.3, 0.82]},
    }
    evaluations = {}
    for label, by_lr in curves.items():
        for lr, accuracy in by_lr.items():
            evaluations[(label, lr, 0)] = evaluation(accuracy)
    evaluations[("lora r=1 (envelope)", 1e-3, 0)] = evaluation([0.7], [1])
    evaluations[("lora r=1 (envelope)", 1e-2, 0)] = evaluation([0.6], [1])
    chosen = {
        "matryoshka (drop_p)": 1e-2,
        "matryoshka (keep_p)": 1e-3,
        "dylora": 1e-2,
        "lora": 1e-2,
        "lora r=1 (envelope)": 1e-3,
    }
    # Seed 1 at the chosen rates: the same curves shifted down by 0.1.
    for label, lr in chosen.items():
        seed0 = evaluations[(label, lr, 0)]
        evaluations[(label, lr, 1)] = evaluation([value - 0.1 for value in seed0["accuracy"]], seed0["ranks"])
    return evaluations, chosen


def train_seconds(chosen: dict) -> dict[str, float]:
    seconds = {}
    for variant in quality.variants(CONFIG):
        for lr in CONFIG.learning_rates:
            for seed in CONFIG.seeds:
                seconds[variant.run(lr, seed).name] = 10.0 + seed
    return seconds


def test_summarize_rows_at_chosen_rates():
    evaluations, chosen = sweep_evaluations()

    result = quality.summarize(CONFIG, evaluations, chosen, {0: 0.0, 1: 0.02}, train_seconds(chosen))

    rows = {row["label"]: row for row in result["variants"]}
    assert [row["label"] for row in result["variants"]] == [
        "matryoshka (drop_p)",
        "matryoshka (keep_p)",
        "dylora",
        "lora",
    ]
    keep_p = rows["matryoshka (keep_p)"]
    assert keep_p["lr"] == 1e-3
    assert keep_p["ranks"] == [0, 1, 2, 4]
    assert keep_p["accuracy_by_seed"] == {"0": [0.0, 0.6, 0.7, 0.9], "1": [0.02, 0.5, 0.6, 0.8]}
    assert keep_p["accuracy_mean"] == pytest.approx([0.01, 0.55, 0.65, 0.85])
    assert keep_p["aurac_mean"] == pytest.approx(
        (aurac([1, 2, 4], [0.6, 0.7, 0.9]) + aurac([1, 2, 4], [0.5, 0.6, 0.8])) / 2
    )
    assert keep_p["train_seconds_mean"] == 10.5


def test_summarize_envelope_and_gap():
    evaluations, chosen = sweep_evaluations()

    result = quality.summarize(CONFIG, evaluations, chosen, {0: 0.0, 1: 0.0}, train_seconds(chosen))

    envelope = result["envelope"]
    assert envelope["ranks"] == [0, 1, 4]
    assert envelope["lr"] == {"1": 1e-3, "4": 1e-2}
    assert envelope["accuracy_mean"] == pytest.approx([0.0, 0.65, 0.77])
    dylora = next(row for row in result["variants"] if row["label"] == "dylora")
    assert dylora["envelope_gap"] == pytest.approx({"1": 0.35 - 0.65, "4": 0.65 - 0.77})


def test_summarize_sweep_marks_chosen_rates():
    evaluations, chosen = sweep_evaluations()

    result = quality.summarize(CONFIG, evaluations, chosen, {0: 0.0, 1: 0.0}, train_seconds(chosen))

    marked = {(entry["variant"], entry["lr"]) for entry in result["sweep"] if entry["chosen"]}
    assert marked == set(chosen.items())
    envelope_scores = [entry["score"] for entry in result["sweep"] if entry["variant"] == "lora r=1 (envelope)"]
    assert envelope_scores == [0.7, 0.6]


def row(label: str, accuracy: list[float], aurac_mean: float) -> dict:
    return {"label": label, "ranks": [0, 1, 2, 4], "accuracy_mean": accuracy, "aurac_mean": aurac_mean}


def test_verdict_holds():
    rows = [
        row("matryoshka (drop_p)", [0.0, 0.5, 0.6, 0.8], 0.65),
        row("dylora", [0.0, 0.4, 0.5, 0.7], 0.55),
        row("lora", [0.0, 0.1, 0.3, 0.82], 0.4),
    ]

    finding = quality.verdict(rows, max_rank=4)["drop_p"]

    assert finding["holds"] is True
    assert finding["ranks_won"] == 3
    assert finding["aurac_margin"] == pytest.approx(0.1)
    assert finding["full_rank_gap"] == pytest.approx(-0.02)
    assert finding["sentence"].startswith("Matryoshka as the paper serves it, P dropped: the claim reproduces.")


def test_verdict_fails_on_lost_rank():
    rows = [
        row("matryoshka (keep_p)", [0.0, 0.3, 0.6, 0.7], 0.6),
        row("dylora", [0.0, 0.4, 0.5, 0.6], 0.55),
        row("lora", [0.0, 0.1, 0.3, 0.9], 0.4),
    ]

    finding = quality.verdict(rows, max_rank=4)["keep_p"]

    assert finding["holds"] is False
    assert finding["ranks_won"] == 2
    assert finding["full_rank_gap"] == pytest.approx(-0.2)
    assert "does not reproduce" in finding["sentence"]


def test_verdict_needs_dylora_and_lora():
    assert quality.verdict([row("matryoshka (drop_p)", [0.0, 0.5, 0.6, 0.8], 0.65)], max_rank=4) == {}


def test_render_markdown_has_every_table():
    evaluations, chosen = sweep_evaluations()
    result = quality.summarize(CONFIG, evaluations, chosen, {0: 0.0, 1: 0.0}, train_seconds(chosen))

    markdown = quality.render_markdown(result)

    for heading in ("### Accuracy by rank", "### AURAC per seed", "### Gap to the envelope", "### Learning-rate sweep"):
        assert heading in markdown
    assert "| matryoshka (keep_p) | 0.001 | 0.000 | 0.550 | 0.650 | 0.850 |" in markdown
    assert "- Matryoshka with P kept: the claim" in markdown


def test_smoke_run_end_to_end_and_resume(tmp_path):
    """Two tiny training runs (lora at R and the rank-1 envelope), evaluated, then skipped on a second call."""
    work_dir, results_dir = tmp_path / "work", tmp_path / "results"
    argv = ["--smoke", "--methods", "lora", "--lrs", "0.01", "--seeds", "0"]
    argv += ["--work-dir", str(work_dir), "--results-dir", str(results_dir)]

    assert quality.main(argv) == 0

    result = json.loads((results_dir / "quality.json").read_text())
    assert [row["label"] for row in result["variants"]] == ["lora"]
    assert result["envelope"]["ranks"] == [0, 1, 4]
    assert result["held_out_examples"] == 8
    assert (results_dir / "quality.png").stat().st_size > 0
    assert (results_dir / "quality.md").read_text().startswith("### Accuracy by rank")
    trained = work_dir / "runs" / "lora-r4-lr0.01-s0" / "training.json"
    first_mtime = trained.stat().st_mtime_ns

    assert quality.main(argv) == 0

    assert trained.stat().st_mtime_ns == first_mtime


def test_changed_settings_in_same_work_dir_raise(tmp_path):
    benchmark = quality.QualityBenchmark(CONFIG, tmp_path, "cpu")
    run = quality.Run("lora", 4, 1e-3, 0)
    run_dir = tmp_path / "runs" / run.name
    run_dir.mkdir(parents=True)
    (run_dir / "bench_run.json").write_text(json.dumps({**benchmark._run_spec(run), "steps": 999}))

    with pytest.raises(ValueError, match="contains a run trained with other settings"):
        benchmark._train(run)


def test_envelope_variant_evaluates_its_own_rank():
    assert Variant("lora", 1, None, envelope=True).eval_ranks(CONFIG) == [1]
    assert Variant("matryoshka", 4, "drop_p").eval_ranks(CONFIG) == [1, 2, 4]
