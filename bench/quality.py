"""Accuracy across ranks of matryoshka, dylora, lora and nested adapters, each at its best learning rate.

The claim under test, from the MatryoshkaLoRA paper: a matryoshka adapter beats a DyLoRA
adapter at every rank and in AURAC, and stays close to plain LoRA at full rank R.

Protocol (every number comes from ``matlora train`` and the trainer's own evaluation code):

1. Sweep: with the first seed, train every method at every learning rate, and plain LoRA
   adapters of the envelope ranks too. Evaluate each on the held-out split. ``matlora
   train`` draws that split from the seed, so every method of a seed gets the same one.
2. Choose, per variant (a method, plus the inference scaling for matryoshka and nested),
   the learning rate with the highest AURAC; per envelope rank, the highest accuracy.
3. Train the other seeds at the chosen learning rates only.
4. Report accuracy per rank (rank 0 is the base model), AURAC over rank and over log2
   rank, the gap to the envelope of separately trained LoRA adapters (ranks 1, 4 and R,
   where rank R is the lora method itself), and training wall time.

Training runs are ``matlora train`` subprocesses; evaluation loads the base model once and
each adapter in turn. Finished runs and evaluations are kept in the work folder and
skipped when the command runs again, so an interrupted benchmark continues where it stopped.

    python -m bench.quality            # about 2 hours on a quiet 2-core CPU (estimate)
    python -m bench.quality --smoke    # a few minutes on a tiny random model
    python -m bench.quality --full --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common

logger = logging.getLogger(__name__)

NAME = "quality"
METHODS = ("matryoshka", "dylora", "lora", "nested")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Inference scalings evaluated per method. None is the adapter's own; for lora that is plain
# truncation at s(R), and for dylora both scalings give s(k).
METHOD_SCALINGS: dict[str, tuple[str | None, ...]] = {
    "matryoshka": ("drop_p", "keep_p"),
    "nested": ("drop_p", "keep_p"),
    "dylora": (None,),
    "lora": (None,),
}
# The share of examples that `matlora train` holds out; 200 of the 1,000 2-digit additions.
EVAL_FRACTION = 0.2
# "Close to lora at full rank" in the verdict: at most this far below, in accuracy.
CLOSE_MARGIN = 0.05
# The name each evaluated adapter gets on the shared base model, one at a time.
EVAL_ADAPTER = "bench"
# Rough costs on a quiet 2-core CPU (AMD EPYC, bfloat16) with SmolLM2-135M, batch 16 and all
# seven projections adapted, for --dry-run's estimate: one training step (one forward and
# backward pass), and greedy evaluation of one rank on 200 held-out examples.
STEP_SECONDS_ESTIMATE = 1.6
RANK_EVAL_SECONDS_ESTIMATE = 15.0


@dataclass(frozen=True)
class QualityConfig:
    """Training and evaluation settings. The defaults are the CPU configuration of about two hours.

    To fit two hours, the default trains 64 optimizer steps per run where the full
    configuration trains 150, because nested training costs one forward and backward pass
    per training rank and the sweep alone trains 18 runs.
    """

    base: str = "smollm2-135m"
    data: str = str(common.ARITHMETIC_TASK.relative_to(common.REPO_ROOT))
    max_rank: int = 16
    train_ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    scaling: str = "sqrt"
    steps: int = 64
    batch_size: int = 16
    learning_rates: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    seeds: tuple[int, ...] = (0, 1)
    envelope_ranks: tuple[int, ...] = (1, 4)
    methods: tuple[str, ...] = METHODS
    eval_limit: int | None = None
    eval_batch_size: int = 32
    with_loss: bool = False
    dtype: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        if not self.learning_rates:
            problems.append("learning_rates must not be empty")
        if not self.seeds:
            problems.append("seeds must not be empty")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            problems.append(f"methods must be among {', '.join(METHODS)}, got {', '.join(unknown)}")
        if not self.train_ranks or self.train_ranks[-1] != self.max_rank:
            problems.append(f"train_ranks must end with max_rank {self.max_rank}, got {list(self.train_ranks)}")
        bad_envelope = [rank for rank in self.envelope_ranks if not 1 <= rank < self.max_rank]
        if bad_envelope:
            problems.append(f"envelope_ranks must lie in 1..{self.max_rank - 1}, got {bad_envelope}")
        if problems:
            raise ValueError("invalid quality benchmark configuration: " + "; ".join(problems))

    @classmethod
    def preset(cls, name: str) -> QualityConfig:
        """Return the ``smoke``, ``default`` or ``full`` configuration."""
        if name == "smoke":
            return cls(
                max_rank=4,
                train_ranks=(1, 2, 4),
                target_modules=("q_proj", "v_proj"),
                steps=2,
                batch_size=4,
                learning_rates=(1e-3, 1e-2),
                envelope_ranks=(1,),
                eval_limit=8,
                eval_batch_size=8,
            )
        if name == "full":
            return cls(
                steps=150,
                learning_rates=(3e-4, 1e-3, 3e-3, 1e-2),
                seeds=(0, 1, 2),
                envelope_ranks=(1, 2, 4, 8),
                with_loss=True,
            )
        if name == "default":
            return cls()
        raise ValueError(f"preset must be smoke, default or full, got {name!r}")


@dataclass(frozen=True)
class Run:
    """One training run: a method at an adapter rank, a learning rate and a seed."""

    method: str
    rank: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-r{self.rank}-lr{self.lr:g}-s{self.seed}"


@dataclass(frozen=True)
class Variant:
    """One row of the tables: a method at a rank, served with one inference scaling.

    An envelope variant is a plain LoRA adapter trained at one rank below R and evaluated
    at that rank only.
    """

    method: str
    rank: int
    inference_scaling: str | None
    envelope: bool = False

    @property
    def label(self) -> str:
        if self.envelope:
            return f"lora r={self.rank} (envelope)"
        if self.inference_scaling is None:
            return self.method
        return f"{self.method} ({self.inference_scaling})"

    def eval_ranks(self, config: QualityConfig) -> list[int]:
        return [self.rank] if self.envelope else list(config.train_ranks)

    def run(self, lr: float, seed: int) -> Run:
        return Run(self.method, self.rank, lr, seed)


def variants(config: QualityConfig) -> list[Variant]:
    """Return the method variants (rank R), then the envelope adapters (lower ranks, plain LoRA)."""
    found = [
        Variant(method, config.max_rank, scaling) for method in config.methods for scaling in METHOD_SCALINGS[method]
    ]
    found += [Variant("lora", rank, None, envelope=True) for rank in config.envelope_ranks]
    return found


def run_groups(config: QualityConfig) -> list[list[Variant]]:
    """Group the variants that share a training run (one adapter, several inference scalings)."""
    groups: dict[tuple[str, int], list[Variant]] = {}
    for variant in variants(config):
        groups.setdefault((variant.method, variant.rank), []).append(variant)
    # Nested runs last within a learning rate: they cost one pass per training rank.
    return sorted(groups.values(), key=lambda group: group[0].method == "nested")


def selection_score(variant: Variant, evaluation: dict[str, Any]) -> float:
    """Return the score that picks a variant's learning rate: AURAC over rank, or an envelope adapter's accuracy."""
    if variant.envelope or evaluation.get("aurac") is None:
        return evaluation["accuracy"][-1]
    return evaluation["aurac"]


def choose_learning_rate(scores: dict[float, float]) -> float:
    """Return the learning rate with the highest score; a tie goes to the smaller rate."""
    if not scores:
        raise ValueError("no learning rate was evaluated")
    return max(sorted(scores), key=lambda lr: scores[lr])


class QualityBenchmark:
    """Runner of the training runs and evaluations that one configuration needs; finished ones are skipped."""

    def __init__(self, config: QualityConfig, work_dir: Path, device: str) -> None:
        self.config = config
        self.work_dir = work_dir
        self.device = device
        self._loaded: tuple[Any, Any] | None = None
        self._held_out: dict[int, tuple[list[int], list[Any]]] = {}

    @property
    def data_path(self) -> Path:
        """The data file; a relative path is relative to the repository root."""
        return common.REPO_ROOT / self.config.data

    def run(self) -> dict[str, Any]:
        """Run the sweep, the other seeds and the base model, and return the result for the JSON file."""
        started = time.perf_counter()
        config = self.config
        sweep_seed = config.seeds[0]

        evaluations: dict[tuple[str, float, int], dict[str, Any]] = {}
        for lr in config.learning_rates:
            for variant_group in run_groups(self.config):
                run = variant_group[0].run(lr, sweep_seed)
                for variant, evaluation in zip(variant_group, self._train_and_evaluate(run, variant_group)):
                    evaluations[(variant.label, lr, sweep_seed)] = evaluation

        chosen = {
            variant.label: choose_learning_rate(
                {
                    lr: selection_score(variant, evaluations[(variant.label, lr, sweep_seed)])
                    for lr in config.learning_rates
                }
            )
            for variant in variants(config)
        }
        logger.info("chosen learning rates: %s", ", ".join(f"{label} {lr:g}" for label, lr in chosen.items()))

        for seed in config.seeds[1:]:
            for variant_group in run_groups(self.config):
                for lr in sorted({chosen[variant.label] for variant in variant_group}):
                    group = [variant for variant in variant_group if chosen[variant.label] == lr]
                    run = group[0].run(lr, seed)
                    for variant, evaluation in zip(group, self._train_and_evaluate(run, group)):
                        evaluations[(variant.label, lr, seed)] = evaluation

        base_accuracy = {seed: self._base_accuracy(seed) for seed in config.seeds}
        train_seconds = self._training_seconds()
        result = summarize(config, evaluations, chosen, base_accuracy, train_seconds)
        result["session_seconds"] = round(time.perf_counter() - started, 1)
        return result

    def pending_runs(self) -> tuple[list[Run], int]:
        """Return the sweep runs not trained yet, and the fewest runs the other seeds will add.

        The other seeds add one run per method and envelope rank, and one more for matryoshka or
        nested when its two inference scalings choose different learning rates.
        """
        sweep_seed = self.config.seeds[0]
        runs = [group[0].run(lr, sweep_seed) for lr in self.config.learning_rates for group in run_groups(self.config)]
        later = len(run_groups(self.config)) * (len(self.config.seeds) - 1)
        return [run for run in runs if not self._is_trained(run)], later

    def _train_and_evaluate(self, run: Run, group: Sequence[Variant]) -> list[dict[str, Any]]:
        run_dir = self._train(run)
        return [self._evaluate(run, run_dir, variant) for variant in group]

    # Training

    def _run_spec(self, run: Run) -> dict[str, Any]:
        config = self.config
        train_ranks = list(config.train_ranks) if run.rank == config.max_rank else [run.rank]
        return {
            **dataclasses.asdict(run),
            "base": config.base,
            "data": config.data,
            "train_ranks": train_ranks,
            "target_modules": list(config.target_modules),
            "scaling": config.scaling,
            "steps": config.steps,
            "batch_size": config.batch_size,
            "dtype": config.dtype,
        }

    def _is_trained(self, run: Run) -> bool:
        run_dir = self.work_dir / "runs" / run.name
        return (run_dir / "training.json").is_file() and (run_dir / "adapter_model.safetensors").is_file()

    def _train(self, run: Run) -> Path:
        run_dir = self.work_dir / "runs" / run.name
        spec = self._run_spec(run)
        spec_path = run_dir / "bench_run.json"
        if spec_path.is_file() and json.loads(spec_path.read_text()) != spec:
            raise ValueError(
                f"{run_dir} contains a run trained with other settings than this configuration ({spec_path}); "
                f"pass another --work-dir or delete that folder"
            )
        if self._is_trained(run):
            logger.info("%s: trained already, skipping", run.name)
            return run_dir

        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        command = train_command({**spec, "data": str(self.data_path)}, run_dir)
        logger.info("%s: training (%s)", run.name, " ".join(command[2:]))
        started = time.perf_counter()
        log_path = run_dir / "train.log"
        with log_path.open("w") as log:
            completed = subprocess.run(
                command, cwd=common.REPO_ROOT, env=self._subprocess_env(), stdout=log, stderr=subprocess.STDOUT
            )
        if completed.returncode != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-20:])
            raise RuntimeError(f"matlora train failed for {run.name} (exit {completed.returncode}):\n{tail}")
        logger.info("%s: trained in %.0f s", run.name, time.perf_counter() - started)
        return run_dir

    def _subprocess_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.device == "cpu":
            # The Trainer uses CUDA whenever a device is visible.
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def _training_seconds(self) -> dict[str, float]:
        seconds = {}
        for path in sorted((self.work_dir / "runs").glob("*/training.json")):
            seconds[path.parent.name] = json.loads(path.read_text())["wall_seconds"]
        return seconds

    # Evaluation

    def _evaluate(self, run: Run, run_dir: Path, variant: Variant) -> dict[str, Any]:
        from trainer.evaluate import evaluate_ranks

        config = self.config
        spec = {
            "ranks": variant.eval_ranks(config),
            "inference_scaling": variant.inference_scaling,
            "limit": config.eval_limit,
            "with_loss": config.with_loss,
        }
        path = self.work_dir / "evals" / f"{run.name}-{variant.inference_scaling or 'own'}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("spec") == spec:
                return record

        from matlora.serialization import load_adapter, remove_adapter

        model, formatter = self._model()
        examples = self._held_out_examples(run.seed, run_dir)
        started = time.perf_counter()
        load_adapter(model, run_dir, EVAL_ADAPTER, dtype=next(model.parameters()).dtype)
        try:
            measured = evaluate_ranks(
                model,
                formatter,
                examples,
                spec["ranks"],
                adapter=EVAL_ADAPTER,
                inference_scaling=variant.inference_scaling,
                batch_size=config.eval_batch_size,
                with_loss=config.with_loss,
                include_base=False,
            )
        finally:
            remove_adapter(model, EVAL_ADAPTER)
        record = {"spec": spec, "seconds": round(time.perf_counter() - started, 1), **measured}
        logger.info("%s %s: accuracy %s (%.0f s)", run.name, variant.label, measured["accuracy"], record["seconds"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        return record

    def _base_accuracy(self, seed: int) -> float:
        from trainer.evaluate import evaluate_ranks

        spec = {"limit": self.config.eval_limit, "base": self.config.base}
        path = self.work_dir / "evals" / f"base-s{seed}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("spec") == spec:
                return record["accuracy"][0]
        model, formatter = self._model()
        examples = self._held_out_examples(seed)
        measured = evaluate_ranks(
            model, formatter, examples, [0], batch_size=self.config.eval_batch_size, with_loss=self.config.with_loss
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"spec": spec, **measured}, indent=2) + "\n")
        return measured["accuracy"][0]

    def _model(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from matlora.base_model import load_base
            from trainer.data import PromptFormatter

            model, tokenizer = load_base(self.config.base, dtype=self.config.dtype, device=self.device)
            self._loaded = (model, PromptFormatter(tokenizer))
        return self._loaded

    def _held_out_examples(self, seed: int, run_dir: Path | None = None) -> list[Any]:
        """Return the seed's held-out examples, checking that a run's saved split is that split."""
        from trainer.data import Split, split_examples

        if seed not in self._held_out:
            examples, split = split_examples([self.data_path], seed, EVAL_FRACTION)
            held_out = [examples[index] for index in split.eval][: self.config.eval_limit]
            self._held_out[seed] = (split.eval, held_out)
        indices, held_out = self._held_out[seed]
        if run_dir is not None:
            saved = Split.load(run_dir)
            if saved is None or saved.eval != indices:
                raise RuntimeError(
                    f"{run_dir}/split.json differs from the split of seed {seed} on {self.config.data}; "
                    f"every run of a seed must hold out the same examples"
                )
        return held_out


def estimate_seconds(config: QualityConfig) -> float:
    """Estimate the whole benchmark's time, for the fewest runs and without the held-out loss pass."""
    groups = run_groups(config)
    runs = len(config.learning_rates) + len(config.seeds) - 1
    steps = sum(
        runs * config.steps * (len(config.train_ranks) if group[0].method == "nested" else 1) for group in groups
    )
    rank_evals = sum(runs * len(variant.eval_ranks(config)) for variant in variants(config)) + len(config.seeds)
    examples = 200 if config.eval_limit is None else min(200, config.eval_limit)
    return (
        steps * STEP_SECONDS_ESTIMATE * config.batch_size / 16
        + rank_evals * RANK_EVAL_SECONDS_ESTIMATE * examples / 200
    )


def train_command(spec: dict[str, Any], run_dir: Path) -> list[str]:
    """Return the ``matlora train`` command line of one run."""
    return [
        sys.executable,
        "-m",
        "matlora",
        "train",
        "--base", spec["base"],
        "--data", spec["data"],
        "--out", str(run_dir),
        "--method", spec["method"],
        "--rank", str(spec["rank"]),
        "--train-ranks", ",".join(map(str, spec["train_ranks"])),
        "--scaling", spec["scaling"],
        "--target-modules", ",".join(spec["target_modules"]),
        "--lr", repr(spec["lr"]),
        "--batch-size", str(spec["batch_size"]),
        "--max-steps", str(spec["steps"]),
        "--seed", str(spec["seed"]),
        "--eval-fraction", repr(EVAL_FRACTION),
        "--dtype", spec["dtype"],
        "--logging-steps", "10",
        # A run that stopped after saving its weights is trained again from the start.
        "--overwrite",
    ]  # fmt: skip


# Summary


def summarize(
    config: QualityConfig,
    evaluations: dict[tuple[str, float, int], dict[str, Any]],
    chosen: dict[str, float],
    base_accuracy: dict[int, float],
    train_seconds: dict[str, float],
) -> dict[str, Any]:
    """Turn the evaluations into the result: one row per variant at its chosen rate, the envelope, the verdict."""
    rows = []
    for variant in variants(config):
        if variant.envelope:
            continue
        rows.append(_variant_row(config, variant, chosen[variant.label], evaluations, base_accuracy, train_seconds))
    envelope = _envelope(config, evaluations, chosen, base_accuracy, train_seconds)
    for row in rows:
        row["envelope_gap"] = _envelope_gap(row, envelope)

    sweep_seed = config.seeds[0]
    sweep = [
        {
            "variant": variant.label,
            "lr": lr,
            "seed": sweep_seed,
            "score": selection_score(variant, evaluations[(variant.label, lr, sweep_seed)]),
            "chosen": lr == chosen[variant.label],
        }
        for variant in variants(config)
        for lr in config.learning_rates
    ]
    return {
        "benchmark": NAME,
        "config": dataclasses.asdict(config),
        "protocol": (
            f"learning rate chosen per variant by AURAC (envelope adapters: by accuracy) on the held-out split "
            f"of seed {sweep_seed}; the other seeds ran at the chosen rate only"
        ),
        "held_out_examples": _held_out_count(evaluations),
        "base_accuracy": {str(seed): accuracy for seed, accuracy in base_accuracy.items()},
        "variants": rows,
        "envelope": envelope,
        "sweep": sweep,
        "verdict": verdict(rows, config.max_rank),
        "compute_seconds": round(
            sum(train_seconds.values()) + sum(record.get("seconds", 0.0) for record in evaluations.values()), 1
        ),
    }


def _variant_row(
    config: QualityConfig,
    variant: Variant,
    lr: float,
    evaluations: dict[tuple[str, float, int], dict[str, Any]],
    base_accuracy: dict[int, float],
    train_seconds: dict[str, float],
) -> dict[str, Any]:
    by_seed = {seed: evaluations[(variant.label, lr, seed)] for seed in config.seeds}
    accuracy_by_seed = {seed: [base_accuracy[seed], *record["accuracy"]] for seed, record in by_seed.items()}
    seconds = [train_seconds[variant.run(lr, seed).name] for seed in config.seeds]
    return {
        "label": variant.label,
        "method": variant.method,
        "inference_scaling": variant.inference_scaling,
        "lr": lr,
        "ranks": [0, *variant.eval_ranks(config)],
        "accuracy_mean": _mean_columns(list(accuracy_by_seed.values())),
        "accuracy_by_seed": {str(seed): values for seed, values in accuracy_by_seed.items()},
        "aurac_mean": _mean([record["aurac"] for record in by_seed.values()]),
        "aurac_by_seed": {str(seed): record["aurac"] for seed, record in by_seed.items()},
        "aurac_log2_mean": _mean([record["aurac_log2"] for record in by_seed.values()]),
        "aurac_log2_by_seed": {str(seed): record["aurac_log2"] for seed, record in by_seed.items()},
        "train_seconds_mean": _mean(seconds),
        "train_seconds_by_seed": {str(seed): value for seed, value in zip(config.seeds, seconds)},
    }


def _envelope(
    config: QualityConfig,
    evaluations: dict[tuple[str, float, int], dict[str, Any]],
    chosen: dict[str, float],
    base_accuracy: dict[int, float],
    train_seconds: dict[str, float],
) -> dict[str, Any] | None:
    """Accuracy of separately trained LoRA adapters: one per envelope rank, and the lora method at rank R."""
    if "lora" not in config.methods:
        return None
    members = [variant for variant in variants(config) if variant.envelope]
    members.append(Variant("lora", config.max_rank, None))
    accuracy_by_seed = {}
    for seed in config.seeds:
        row = [base_accuracy[seed]]
        for variant in members:
            record = evaluations[(variant.label, chosen[variant.label], seed)]
            row.append(record["accuracy"][record["ranks"].index(variant.rank)])
        accuracy_by_seed[seed] = row
    seconds = [
        train_seconds[variant.run(chosen[variant.label], seed).name] for variant in members for seed in config.seeds
    ]
    return {
        "label": "envelope (one lora per rank)",
        "ranks": [0, *(variant.rank for variant in members)],
        "lr": {str(variant.rank): chosen[variant.label] for variant in members},
        "accuracy_mean": _mean_columns(list(accuracy_by_seed.values())),
        "accuracy_by_seed": {str(seed): values for seed, values in accuracy_by_seed.items()},
        "train_seconds_total_mean": sum(seconds) / len(config.seeds),
    }


def _envelope_gap(row: dict[str, Any], envelope: dict[str, Any] | None) -> dict[str, float]:
    """Return the row's mean accuracy minus the envelope's, at each envelope rank both evaluated."""
    if envelope is None:
        return {}
    gaps = {}
    for rank, envelope_accuracy in zip(envelope["ranks"], envelope["accuracy_mean"]):
        if rank >= 1 and rank in row["ranks"]:
            gaps[str(rank)] = row["accuracy_mean"][row["ranks"].index(rank)] - envelope_accuracy
    return gaps


def verdict(rows: Sequence[dict[str, Any]], max_rank: int) -> dict[str, Any]:
    """Check the claim for each matryoshka inference scaling and return the findings with one sentence each.

    The claim holds for a scaling when matryoshka's mean accuracy beats dylora's at every
    rank >= 1, its mean AURAC is higher, and at rank R it is at most ``CLOSE_MARGIN`` below lora.
    """
    by_label = {row["label"]: row for row in rows}
    dylora, lora = by_label.get("dylora"), by_label.get("lora")
    findings = {}
    for scaling, description in (("drop_p", "as the paper serves it, P dropped"), ("keep_p", "with P kept")):
        matryoshka = by_label.get(f"matryoshka ({scaling})")
        if matryoshka is None or dylora is None or lora is None:
            continue
        ranks = [rank for rank in matryoshka["ranks"] if rank >= 1]
        margins = [_accuracy_at(matryoshka, rank) - _accuracy_at(dylora, rank) for rank in ranks]
        wins = sum(margin > 0 for margin in margins)
        aurac_margin = matryoshka["aurac_mean"] - dylora["aurac_mean"]
        full_rank_gap = _accuracy_at(matryoshka, max_rank) - _accuracy_at(lora, max_rank)
        holds = wins == len(ranks) and aurac_margin > 0 and full_rank_gap >= -CLOSE_MARGIN
        sentence = (
            f"Matryoshka {description}: the claim {'reproduces' if holds else 'does not reproduce'}. "
            f"It beats dylora at {wins} of {len(ranks)} ranks (margins {min(margins):+.3f} to {max(margins):+.3f}), "
            f"its AURAC is {matryoshka['aurac_mean']:.3f} against dylora's {dylora['aurac_mean']:.3f} "
            f"({aurac_margin:+.3f}), and at rank {max_rank} it scores {_accuracy_at(matryoshka, max_rank):.3f} "
            f"against lora's {_accuracy_at(lora, max_rank):.3f} ({full_rank_gap:+.3f}; close means at most "
            f"{CLOSE_MARGIN:.2f} below)."
        )
        findings[scaling] = {
            "holds": holds,
            "ranks_won": wins,
            "ranks": len(ranks),
            "margins": dict(zip(map(str, ranks), margins)),
            "aurac_margin": aurac_margin,
            "full_rank_gap": full_rank_gap,
            "sentence": sentence,
        }
    return findings


def _accuracy_at(row: dict[str, Any], rank: int) -> float:
    return row["accuracy_mean"][row["ranks"].index(rank)]


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _mean_columns(rows: Sequence[Sequence[float]]) -> list[float]:
    return [sum(column) / len(column) for column in zip(*rows)]


def _held_out_count(evaluations: dict[tuple[str, float, int], dict[str, Any]]) -> int | None:
    counts = {record.get("examples") for record in evaluations.values()}
    return counts.pop() if len(counts) == 1 else None


# Output


def render_markdown(result: dict[str, Any]) -> str:
    """Render the result as the Markdown tables the README includes."""
    config = result["config"]
    seeds = [str(seed) for seed in config["seeds"]]
    ranks = result["variants"][0]["ranks"] if result["variants"] else []
    rows = [_accuracy_cells(row, ranks) for row in result["variants"]]
    envelope = result.get("envelope")
    if envelope:
        cells = [envelope["label"], "per rank"]
        cells += [
            common.fmt(envelope["accuracy_mean"][envelope["ranks"].index(rank)]) if rank in envelope["ranks"] else ""
            for rank in ranks
        ]
        cells += ["", "", f"{envelope['train_seconds_total_mean']:.0f} (all ranks)"]
        rows.append(cells)
    headers = ["variant", "lr", *(("0 (base)" if rank == 0 else str(rank)) for rank in ranks)]
    headers += ["AURAC", "AURAC log2", "train s"]

    parts = [
        f"### Accuracy by rank, mean of seeds {', '.join(seeds)}",
        "",
        common.markdown_table(headers, rows),
        "",
        f"{config['steps']} steps of batch {config['batch_size']} on {Path(config['data']).parent.name} "
        f"(held-out examples: {result['held_out_examples']}), base {config['base']}, R={config['max_rank']}, "
        f"training ranks {config['train_ranks']}, scaling {config['scaling']}, targets "
        f"{', '.join(config['target_modules'])}. {result['protocol'][0].upper()}{result['protocol'][1:]}.",
        "",
        "### AURAC per seed",
        "",
        _aurac_table(result, seeds),
    ]

    if envelope:
        parts += ["", "### Gap to the envelope (accuracy minus that of a LoRA trained at that rank alone)", ""]
        parts.append(_gap_table(result, envelope))

    parts += ["", f"### Learning-rate sweep (seed {seeds[0]}; * marks the chosen rate)", "", _sweep_table(result)]
    parts += ["", "### Verdict", ""]
    sentences = [f"- {finding['sentence']}" for finding in result["verdict"].values()]
    parts += sentences or ["Matryoshka, dylora and lora did not all run, so there is no verdict."]
    parts += ["", common.environment_note(result.get("environment", {}))]
    return "\n".join(parts)


def _accuracy_cells(row: dict[str, Any], ranks: Sequence[int]) -> list[str]:
    cells = [row["label"], f"{row['lr']:g}"]
    cells += [common.fmt(_accuracy_at(row, rank)) if rank in row["ranks"] else "" for rank in ranks]
    cells += [common.fmt(row["aurac_mean"]), common.fmt(row["aurac_log2_mean"]), f"{row['train_seconds_mean']:.0f}"]
    return cells


def _aurac_table(result: dict[str, Any], seeds: Sequence[str]) -> str:
    headers = ["variant", *(f"AURAC s{seed}" for seed in seeds), "mean"]
    headers += [*(f"log2 s{seed}" for seed in seeds), "mean"]
    rows = []
    for row in result["variants"]:
        cells = [
            row["label"],
            *(common.fmt(row["aurac_by_seed"][seed]) for seed in seeds),
            common.fmt(row["aurac_mean"]),
        ]
        cells += [*(common.fmt(row["aurac_log2_by_seed"][seed]) for seed in seeds), common.fmt(row["aurac_log2_mean"])]
        rows.append(cells)
    return common.markdown_table(headers, rows)


def _gap_table(result: dict[str, Any], envelope: dict[str, Any]) -> str:
    ranks = [str(rank) for rank in envelope["ranks"] if rank >= 1]
    rows = [[row["label"], *(_signed(row["envelope_gap"].get(rank)) for rank in ranks)] for row in result["variants"]]
    return common.markdown_table(["variant", *(f"rank {rank}" for rank in ranks)], rows)


def _sweep_table(result: dict[str, Any]) -> str:
    rates = result["config"]["learning_rates"]
    scores: dict[str, dict[float, str]] = {}
    for entry in result["sweep"]:
        mark = "*" if entry["chosen"] else ""
        scores.setdefault(entry["variant"], {})[entry["lr"]] = common.fmt(entry["score"]) + mark
    rows = [[label, *(by_lr.get(lr, "") for lr in rates)] for label, by_lr in scores.items()]
    table = common.markdown_table(["variant (score)", *(f"lr {lr:g}" for lr in rates)], rows)
    table += "\n\nThe score is AURAC over rank for a method, accuracy at its rank for an envelope adapter."
    at_edge = [
        entry["variant"] for entry in result["sweep"] if entry["chosen"] and entry["lr"] in (min(rates), max(rates))
    ]
    if len(rates) > 1 and at_edge:
        table += f" Chosen at an end of the sweep, so a rate beyond it may score higher: {', '.join(at_edge)}."
    return table


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Draw every variant's mean accuracy by rank (band: range over seeds) and the envelope on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for row in result["variants"]:
        xs = [_plot_x(rank) for rank in row["ranks"]]
        seeds = list(row["accuracy_by_seed"].values())
        lows = [min(column) for column in zip(*seeds)]
        highs = [max(column) for column in zip(*seeds)]
        style = "--" if row["inference_scaling"] == "drop_p" else "-"
        label = f"{row['label']}, lr {row['lr']:g} (AURAC {common.fmt(row['aurac_mean'], 2)})"
        (line,) = axis.plot(xs, row["accuracy_mean"], style, marker="o", label=label)
        axis.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.12)
    envelope = result.get("envelope")
    if envelope:
        xs = [_plot_x(rank) for rank in envelope["ranks"]]
        axis.plot(xs, envelope["accuracy_mean"], ":", color="black", marker="*", markersize=10, label=envelope["label"])

    ranks = sorted({rank for row in result["variants"] for rank in row["ranks"]})
    axis.set_xticks([_plot_x(rank) for rank in ranks], ["0\n(base)" if rank == 0 else str(rank) for rank in ranks])
    axis.set_xlabel("rank (log2 spacing)")
    axis.set_ylabel("exact-match accuracy, held-out split")
    axis.set_ylim(-0.02, 1.02)
    config = result["config"]
    axis.set_title(
        f"{Path(config['base']).name}, 2-digit addition, R={config['max_rank']}, {config['steps']} steps, "
        f"mean of {len(config['seeds'])} seeds (band: range)",
        fontsize=10,
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_x(rank: int) -> float:
    # log2 spacing, with rank 0 one step left of rank 1.
    return -1.0 if rank == 0 else math.log2(rank)


# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description="Train matryoshka, dylora, lora and nested adapters with a learning-rate sweep and several seeds, "
        "and compare their accuracy at every rank.",
    )
    common.add_common_arguments(parser)
    parser.add_argument("--work-dir", type=Path, default=None, help="folder for training runs and evaluations")
    parser.add_argument("--base", default=None, help="base model (default: smollm2-135m; a tiny model with --smoke)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the preset's)")
    parser.add_argument("--lrs", type=_float_list, default=None, help="learning rates to sweep, comma-separated")
    parser.add_argument("--seeds", type=_int_list, default=None, help="seeds, comma-separated; the first is swept")
    parser.add_argument("--methods", type=_name_list, default=None, help=f"methods, from {','.join(METHODS)}")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N held-out examples")
    parser.add_argument(
        "--with-loss", action="store_true", default=None, help="also compute the held-out loss per rank (slower)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the sweep runs not trained yet and estimate the total time, then stop",
    )
    return parser


def config_from_args(args: argparse.Namespace, tiny_base: Path | None) -> QualityConfig:
    config = QualityConfig.preset(common.preset_name(args))
    overrides: dict[str, Any] = {}
    if tiny_base is not None:
        overrides["base"] = str(tiny_base)
    for field, value in (
        ("base", args.base),
        ("steps", args.steps),
        ("learning_rates", args.lrs),
        ("seeds", args.seeds),
        ("methods", args.methods),
        ("eval_limit", args.eval_limit),
        ("with_loss", args.with_loss),
    ):
        if value is not None:
            overrides[field] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(config, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)
    work_dir = common.work_dir(args, NAME)
    tiny_base = None
    if args.smoke and args.base is None:
        from matlora.testing import build_tiny_model_dir

        tiny_base = work_dir / "tiny-model"
        if not (tiny_base / "config.json").is_file():
            build_tiny_model_dir(tiny_base, seed=0)
    config = config_from_args(args, tiny_base)
    device = common.resolve_device(args.device)
    benchmark = QualityBenchmark(config, work_dir, device)

    if args.dry_run:
        pending, later = benchmark.pending_runs()
        print(f"{len(pending)} sweep runs to train in {work_dir}, then at least {later} runs for the other seeds:")
        for run in pending:
            print(f"  {run.name}")
        hours = estimate_seconds(config) / 3600
        print(f"The whole benchmark takes about {hours:.1f} h on a quiet 2-core CPU with SmolLM2-135M (estimate).")
        return 0

    environment = common.environment(device)
    result = {"environment": environment, **benchmark.run()}
    out_dir = common.results_dir(args)
    plot(result, out_dir / f"{NAME}.png")
    print(common.write_outputs(NAME, result, out_dir, render_markdown))
    return 0


def _float_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    sys.exit(main())
