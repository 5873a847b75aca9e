"""Subcommands ``train``, ``eval``, ``export`` and ``plot`` of the ``matlora`` command."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

METHODS = ("matryoshka", "dylora", "lora", "nested")
SCALINGS = ("none", "rank", "sqrt")
INFERENCE_SCALINGS = ("drop_p", "keep_p")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_eval(subparsers)
    _register_export(subparsers)
    _register_plot(subparsers)


def int_list(text: str) -> list[int]:
    """Parse "1,2,4" into [1, 2, 4]."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {text!r}") from None


def name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _register_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a hierarchical LoRA adapter",
        description="Fine-tune a causal LM with a hierarchical LoRA adapter whose every rank prefix works.",
    )
    parser.add_argument(
        "--base", default="smollm2-135m", help="local Hugging Face model folder, or smollm2-135m (default)"
    )
    parser.add_argument(
        "--data", nargs="+", required=True, help="JSONL/JSON prompt-completion file(s) or BIG-bench task.json"
    )
    parser.add_argument("--out", required=True, help="folder for the adapter, its split and its training log")
    parser.add_argument("--method", choices=METHODS, default="matryoshka", help="training method (default: matryoshka)")
    parser.add_argument("--rank", type=int, default=16, help="max rank R (default: 16)")
    parser.add_argument(
        "--train-ranks",
        type=int_list,
        default=None,
        help="ranks the objective trains, ending with R (default: 1,2,4,...,R)",
    )
    parser.add_argument(
        "--scaling",
        choices=SCALINGS,
        default="sqrt",
        help="per-rank scale s(r): alpha times 1, 1/r or 1/sqrt(r) (default: sqrt)",
    )
    parser.add_argument("--lora-alpha", type=float, default=1.0, help="alpha in s(r) (default: 1.0)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default: 0)")
    parser.add_argument(
        "--inference-scaling",
        choices=INFERENCE_SCALINGS,
        default=None,
        help="how rank k is served: keep_p keeps the trained p[:k], drop_p uses s(k) as the MatryoshkaLoRA paper does "
        "(default: what the method trained, keep_p, or drop_p for nested)",
    )
    parser.add_argument(
        "--target-modules",
        type=name_list,
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated linear layer names to adapt (default: all seven Llama projections)",
    )
    parser.add_argument(
        "--lr",
        "--learning-rate",
        dest="learning_rate",
        type=float,
        default=1e-3,
        help="peak learning rate (default: 1e-3)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="examples per device per micro-batch (default: 16)")
    parser.add_argument(
        "--grad-accum",
        "--gradient-accumulation-steps",
        dest="gradient_accumulation_steps",
        type=int,
        default=1,
        help="micro-batches per optimizer step (default: 1)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0 (default: -1)"
    )
    parser.add_argument(
        "--epochs",
        type=float,
        default=1.0,
        help="passes over the training split when --max-steps is not set (default: 1)",
    )
    parser.add_argument(
        "--warmup-ratio", type=float, default=0.0, help="fraction of steps for linear warm-up (default: 0)"
    )
    parser.add_argument("--lr-scheduler", default="linear", help="transformers scheduler name (default: linear)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the split, the initialisation and DyLoRA's ranks (default: 0)"
    )
    parser.add_argument(
        "--eval-fraction", type=float, default=0.2, help="share of examples held out for evaluation (default: 0.2)"
    )
    parser.add_argument("--dtype", default="auto", help="base model dtype: auto, bfloat16 or float32 (default: auto)")
    parser.add_argument(
        "--save-dtype",
        default="float32",
        help="dtype of the saved adapter weights: float32 or bfloat16 (default: float32)",
    )
    parser.add_argument(
        "--save-steps",
        type=int,
        default=0,
        help="write an adapter checkpoint every N steps; 0 writes only the final one",
    )
    parser.add_argument(
        "--logging-steps", type=int, default=10, help="log the training loss every N steps (default: 10)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from trainer.train import TrainOptions, run_training

    options = TrainOptions(
        data=args.data,
        out=args.out,
        base=args.base,
        method=args.method,
        rank=args.rank,
        train_ranks=args.train_ranks or [],
        scaling=args.scaling,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        inference_scaling=args.inference_scaling,
        target_modules=args.target_modules if isinstance(args.target_modules, list) else name_list(args.target_modules),
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        epochs=args.epochs,
        warmup_ratio=args.warmup_ratio,
        lr_scheduler=args.lr_scheduler,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
        dtype=args.dtype,
        save_dtype=args.save_dtype,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        overwrite=args.overwrite,
    )
    run_training(options)
    return 0


def _register_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate an adapter at several ranks",
        description="Greedy exact-match accuracy and loss per rank (rank 0 is the base model), with AURAC.",
    )
    parser.add_argument("--base", default=None, help="base model (default: the one in the adapter config)")
    parser.add_argument("--adapter", required=True, help="adapter folder")
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="the data file(s) the adapter was trained on, or other prompt-completion files",
    )
    parser.add_argument(
        "--split",
        choices=("eval", "train", "all"),
        default="eval",
        help="which examples: the held-out split saved beside the adapter (default), its training split, or all",
    )
    parser.add_argument(
        "--ranks",
        default=None,
        help="comma-separated ranks, or 'all' for 1..R (default: the training ranks); rank 0 is always added",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of the split")
    parser.add_argument(
        "--inference-scaling", choices=INFERENCE_SCALINGS, default=None, help="override the adapter's inference scaling"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch (default: 32)")
    parser.add_argument(
        "--no-loss",
        dest="with_loss",
        action="store_false",
        help="skip the teacher-forced loss pass, which costs about one forward pass over the examples per rank; "
        "the report's loss is then null",
    )
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16 or float32 (default: auto)")
    parser.add_argument(
        "--label", default=None, help="name of this curve in tables and plots (default: method and scaling)"
    )
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--plot", default=None, help="write the rank-accuracy curve here (PNG)")
    parser.set_defaults(handler=_run_eval)


def parse_eval_ranks(text: str | None, max_rank: int, train_ranks: list[int]) -> list[int]:
    if text is None:
        ranks = list(train_ranks)
    elif text.strip() == "all":
        ranks = list(range(1, max_rank + 1))
    else:
        ranks = int_list(text)
    invalid = [rank for rank in ranks if not 0 <= rank <= max_rank]
    if invalid:
        raise SystemExit(f"matlora eval: error: --ranks must lie in 0..{max_rank} for this adapter, got {invalid}")
    return ranks


def _run_eval(args: argparse.Namespace) -> int:
    from matlora.base_model import load_base
    from matlora.config import AdapterConfig
    from matlora.serialization import load_adapter
    from trainer.data import PromptFormatter, Split, select_split
    from trainer.evaluate import evaluate_ranks, markdown_table, plot_reports, update_norms, write_report

    started = time.perf_counter()
    config = AdapterConfig.load(args.adapter)
    ranks = parse_eval_ranks(args.ranks, config.r, config.train_ranks)
    examples = select_split(args.data, Split.load(args.adapter), args.split)
    if args.limit is not None:
        examples = examples[: args.limit]
    if not examples:
        raise SystemExit("matlora eval: error: no examples to evaluate")

    base = args.base or config.base_model_name_or_path
    model, tokenizer = load_base(base, dtype=args.dtype)
    load_adapter(model, args.adapter, dtype=next(model.parameters()).dtype)
    scaling = args.inference_scaling or config.inference_scaling
    measured = evaluate_ranks(
        model,
        PromptFormatter(tokenizer),
        examples,
        ranks,
        inference_scaling=scaling,
        batch_size=args.batch_size,
        with_loss=args.with_loss,
    )

    measured["update_norm"] = update_norms(model, measured["ranks"], inference_scaling=scaling)

    report = {
        "label": args.label or f"{config.method} ({scaling})",
        "adapter": str(args.adapter),
        "base": base,
        "method": config.method,
        "max_rank": config.r,
        "train_ranks": config.train_ranks,
        "scaling": config.scaling,
        "inference_scaling": scaling,
        "data": [str(path) for path in args.data],
        "split": args.split,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **measured,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(markdown_table(report))
    if args.out:
        write_report(report, args.out)
    if args.plot:
        plot_reports([report], args.plot)
    return 0


def _register_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export one rank as a standard PEFT LoRA adapter",
        description="Write rank K of a hierarchical adapter as a PEFT LoRA adapter with the scale folded in.",
    )
    parser.add_argument("--adapter", required=True, help="hierarchical adapter folder")
    parser.add_argument("--rank", type=int, required=True, help="rank K to export, 1..R")
    parser.add_argument("--out", required=True, help="folder for the PEFT adapter")
    parser.add_argument(
        "--inference-scaling", choices=INFERENCE_SCALINGS, default=None, help="override the adapter's inference scaling"
    )
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from matlora.serialization import export_peft

    try:
        out = export_peft(args.adapter, args.rank, args.out, args.inference_scaling)
    except ValueError as error:
        raise SystemExit(f"matlora export: error: {error}") from None
    logger.info("wrote a rank-%d PEFT LoRA adapter to %s", args.rank, out)
    return 0


def _register_plot(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="overlay the rank-accuracy curves of several eval reports",
        description="Draw accuracy against rank for each `matlora eval` report on one plot.",
    )
    parser.add_argument("reports", nargs="+", help="JSON reports written by matlora eval --out")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--title", default="Accuracy by rank", help="plot title")
    parser.set_defaults(handler=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from trainer.evaluate import markdown_table, plot_reports

    reports = [json.loads(Path(path).read_text()) for path in args.reports]
    for report in reports:
        print(markdown_table(report) + "\n")
    plot_reports(reports, args.out, args.title)
    return 0
