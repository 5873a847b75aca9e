"""The cost of one optimizer step for each training method, measured side by side.

Every method trains its own copy of the base model with the project's Trainer
(``trainer.train.HierarchicalTrainer``) on the same data and batch size. Each round runs a
few steps of every method in turn, in an order that alternates direction from round to
round. A Trainer callback times each step from its start to the end of the optimizer
update, so data loading is left out. The first step of every round also builds the
optimizer's state, so it is dropped.

Expected: matryoshka, dylora and lora cost the same within noise (one forward and backward
pass; DyLoRA's prefix slices save a little). Nested runs one forward and backward pass per
training rank, so it should cost about that many times a lora step.

    python -m bench.training_cost          # about 5 minutes on a 2-core CPU
    python -m bench.training_cost --smoke  # under a minute, tiny random model
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common

logger = logging.getLogger(__name__)

NAME = "training_cost"
METHODS = ("matryoshka", "dylora", "lora", "nested")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainingCostConfig:
    """Timing settings. The defaults match the quality benchmark's training runs."""

    base: str = "smollm2-135m"
    data: str = str(common.ARITHMETIC_TASK.relative_to(common.REPO_ROOT))
    max_rank: int = 16
    train_ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    scaling: str = "sqrt"
    batch_size: int = 16
    learning_rate: float = 1e-3
    steps_per_round: int = 4
    rounds: int = 6
    methods: tuple[str, ...] = METHODS
    dtype: str = "auto"

    @classmethod
    def preset(cls, name: str) -> TrainingCostConfig:
        if name == "smoke":
            return cls(
                max_rank=4,
                train_ranks=(1, 2, 4),
                target_modules=("q_proj", "v_proj"),
                batch_size=4,
                steps_per_round=3,
                rounds=2,
            )
        if name == "full":
            return cls(steps_per_round=6, rounds=10)
        if name == "default":
            return cls()
        raise ValueError(f"preset must be smoke, default or full, got {name!r}")


def step_timer(synchronize: Callable[[], None]):
    """Return a TrainerCallback that records the seconds of every optimizer step in ``.durations``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.durations: list[float] = []
            self._started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.durations.append(time.perf_counter() - self._started)

    return StepTimer()


class MethodRunner:
    """One method's model, adapter and data, ready to train a few steps at a time."""

    def __init__(self, method: str, config: TrainingCostConfig, device: str, work_dir: Path) -> None:
        import torch

        from matlora.base_model import load_base
        from matlora.config import AdapterConfig
        from matlora.model import inject_adapter
        from trainer.data import CompletionDataset, PromptFormatter, collate_right_padded, split_examples

        self.method = method
        self.config = config
        self.device = device
        self.work_dir = work_dir
        self.model, tokenizer = load_base(config.base, dtype=config.dtype, device=device)
        self.model.config.use_cache = False
        self.adapter_config = AdapterConfig(
            r=config.max_rank,
            target_modules=list(config.target_modules),
            method=method,
            train_ranks=list(config.train_ranks),
            scaling=config.scaling,
        )
        # Adapter weights in float32 whatever the base dtype, as `matlora train` does.
        inject_adapter(self.model, self.adapter_config, dtype=torch.float32)
        examples, split = split_examples([common.REPO_ROOT / config.data], seed=0, eval_fraction=0.2)
        self.train_set = CompletionDataset([examples[index] for index in split.train], PromptFormatter(tokenizer))
        self.collate = lambda features: collate_right_padded(features, tokenizer.pad_token_id)

    def train_round(self, round_index: int, synchronize: Callable[[], None]) -> list[float]:
        """Train ``steps_per_round`` steps and return their durations in seconds, the first one dropped."""
        import torch
        from transformers import TrainingArguments
        from transformers.trainer_callback import PrinterCallback

        from trainer.train import HierarchicalTrainer

        on_gpu = self.device.startswith("cuda")
        arguments = TrainingArguments(
            output_dir=str(self.work_dir / "trainer" / self.method),
            per_device_train_batch_size=self.config.batch_size,
            learning_rate=self.config.learning_rate,
            max_steps=self.config.steps_per_round,
            # A new seed per round gives DyLoRA new ranks and the loader a new order.
            seed=round_index,
            bf16=on_gpu and torch.cuda.is_bf16_supported(),
            use_cpu=not on_gpu,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
        )
        timer = step_timer(synchronize)
        trainer = HierarchicalTrainer(
            model=self.model,
            args=arguments,
            train_dataset=self.train_set,
            data_collator=self.collate,
            adapter_config=self.adapter_config,
            callbacks=[timer],
        )
        # With the progress bar off, the Trainer prints each run's metrics to stdout, amid the table.
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        return timer.durations[1:]


def measure(config: TrainingCostConfig, device: str, work_dir: Path) -> dict[str, list[list[float]]]:
    """Return, per method, the step durations of each round."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else _no_op
    runners = [MethodRunner(method, config, device, work_dir) for method in config.methods]
    durations: dict[str, list[list[float]]] = {method: [] for method in config.methods}
    for round_index in range(config.rounds):
        for runner in common.round_order(runners, round_index):
            durations[runner.method].append(runner.train_round(round_index, synchronize))
        logger.info("round %d of %d done", round_index + 1, config.rounds)
    return durations


def _no_op() -> None:
    return None


def summarize(config: TrainingCostConfig, durations: dict[str, list[list[float]]]) -> list[dict[str, Any]]:
    """Return one row per method: median step time, its spread, and the ratio to lora in the same rounds."""
    reference = durations.get("lora")
    rows = []
    for method, rounds in durations.items():
        steps = [value for round_steps in rounds for value in round_steps]
        quartiles = statistics.quantiles(steps, n=4, method="inclusive") if len(steps) > 1 else steps * 3
        ratio = None
        if reference is not None:
            ratios = [common.median(ours) / common.median(theirs) for ours, theirs in zip(rounds, reference)]
            ratio = common.median(ratios)
        rows.append(
            {
                "method": method,
                "median_s": common.median(steps),
                "p25_s": quartiles[0],
                "p75_s": quartiles[2],
                "steps_timed": len(steps),
                "ratio_to_lora": ratio,
                "expected_ratio": len(config.train_ranks) if method == "nested" else 1.0,
            }
        )
    return rows


def render_markdown(result: dict[str, Any]) -> str:
    config = result["config"]
    table = [
        [
            row["method"],
            f"{row['median_s']:.3f}",
            f"{row['p25_s']:.3f} to {row['p75_s']:.3f}",
            common.fmt(row["ratio_to_lora"], 2),
            f"{row['expected_ratio']:g}",
            str(row["steps_timed"]),
        ]
        for row in result["methods"]
    ]
    headers = ["method", "s per step (median)", "middle half", "ratio to lora", "expected", "steps timed"]
    return "\n".join(
        [
            f"Batch {config['batch_size']} of 2-digit additions, R={config['max_rank']}, training ranks "
            f"{config['train_ranks']}, targets {', '.join(config['target_modules'])}, base {config['base']}. "
            f"{config['rounds']} interleaved rounds of {config['steps_per_round']} steps per method, the first "
            f"step of each round dropped; the ratio is the median over rounds of the method's median step over "
            f"lora's in the same round.",
            "",
            common.markdown_table(headers, table),
            "",
            common.environment_note(result.get("environment", {})),
        ]
    )


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["methods"]
    figure, axis = plt.subplots(figsize=(6, 4))
    positions = range(len(rows))
    medians = [row["median_s"] for row in rows]
    errors = [[row["median_s"] - row["p25_s"] for row in rows], [row["p75_s"] - row["median_s"] for row in rows]]
    axis.bar(positions, medians, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    lora = next((row for row in rows if row["method"] == "lora"), None)
    if lora is not None:
        expected = [lora["median_s"] * row["expected_ratio"] for row in rows]
        axis.scatter(positions, expected, marker="_", s=600, color="black", label="expected (lora x passes)")
        axis.legend(fontsize=8)
    axis.set_xticks(list(positions), [row["method"] for row in rows])
    axis.set_ylabel("seconds per optimizer step (median; bars: middle half)")
    axis.set_title(f"Training step cost, batch {result['config']['batch_size']}", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.training_cost",
        description="Time optimizer steps of matryoshka, dylora, lora and nested training, interleaved.",
    )
    common.add_common_arguments(parser)
    parser.add_argument("--work-dir", type=Path, default=None, help="folder for the Trainer's scratch files")
    parser.add_argument("--base", default=None, help="base model (default: smollm2-135m; a tiny model with --smoke)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the preset's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)
    work_dir = common.work_dir(args, NAME)
    config = TrainingCostConfig.preset(common.preset_name(args))
    overrides: dict[str, Any] = {}
    if args.smoke and args.base is None:
        from matlora.testing import build_tiny_model_dir

        tiny_base = work_dir / "tiny-model"
        if not (tiny_base / "config.json").is_file():
            build_tiny_model_dir(tiny_base, seed=0)
        overrides["base"] = str(tiny_base)
    for field, value in (("base", args.base), ("rounds", args.rounds), ("batch_size", args.batch_size)):
        if value is not None:
            overrides[field] = value
    config = dataclasses.replace(config, **overrides)
    device = common.resolve_device(args.device)
    environment = common.environment(device)

    started = time.perf_counter()
    durations = measure(config, device, work_dir)
    result = {
        "environment": environment,
        "benchmark": NAME,
        "config": dataclasses.asdict(config),
        "methods": summarize(config, durations),
        "durations_s": durations,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out_dir = common.results_dir(args)
    plot(result, out_dir / f"{NAME}.png")
    print(common.write_outputs(NAME, result, out_dir, render_markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
